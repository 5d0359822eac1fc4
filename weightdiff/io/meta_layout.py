"""Meta / Mistral consolidated checkpoints read under Hugging Face names, in Hugging Face row order.

Meta's Llama releases (``consolidated.00.pth`` with ``params.json``) and Mistral's
(``consolidated.safetensors`` with ``params.json``, often beside the Hugging Face files of the same
release) name each tensor as their reference code does (``layers.3.attention.wq.weight``) and keep
the query and key rows of each attention head in the interleaved order of their rotary embedding.
transformers' converters (``convert_llama_weights_to_hf.py``, ``convert_mistral_weights_to_hf.py``)
rename every tensor and permute the rows of ``wq`` and ``wk`` (``permute_for_rope``: each head's rows
viewed as (head_dim/2, 2) and transposed). A fine-tune published in one layout against a base in the
other would pair nothing; ``apply`` gives a located checkpoint the Hugging Face names and hands the
Q/K rows out in the Hugging Face order, so it pairs and measures tensor by tensor like the converted
model (the converter's output compared with its input reads identical: tests/test_meta_layout.py).

The head counts come from ``params.json`` beside the weights (``n_heads``, ``n_kv_heads``, ``dim``,
``head_dim``; the Hugging Face spellings of Mixtral's first release too), else from ``config.json``.
Without either, ``wq`` and ``wk`` keep their names, and a note says why (two such checkpoints still pair
them by name; against a Hugging Face model they are unpaired and the verdict says so: flag
``meta_layout_unmapped``).
``rope.freqs`` (Llama 2's table of rotary frequencies, computed from params.json) is not a weight
and is left out. A model-parallel shard of a larger release (``consolidated.01.pth`` of Llama 2 70B:
an eighth of each head-split matrix) is refused by its shapes.

>>> hf_of("layers.3.attention.wq.weight")
('model.layers.3.self_attn.q_proj.weight', 'q')
>>> hf_of("layers.0.feed_forward.experts.5.w2.weight")
('model.layers.0.block_sparse_moe.experts.5.w2.weight', None)
>>> interleaved_rows(np.arange(8), 4).tolist()
[0, 2, 1, 3, 4, 6, 5, 7]
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .files import load_json, read_beside

__all__ = ["apply", "hf_of", "interleaved_rows", "is_meta_layout", "is_meta_qk", "PARAMS_CAP"]

#: params.json is a few hundred bytes; a cap keeps a hostile one from filling the memory
PARAMS_CAP = 1 << 20

_L = r"^layers\.(\d+)\."
#: (pattern, Hugging Face name, rope rows): Meta's and Mistral's names as transformers' converters map them
_TABLE = [(re.compile(p), h, q) for p, h, q in (
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight", None),
    (r"^norm\.weight$", "model.norm.weight", None),
    (r"^output\.weight$", "lm_head.weight", None),
    (_L + r"attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight", None),
    (_L + r"ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight", None),
    (_L + r"attention\.wq\.weight$", r"model.layers.\1.self_attn.q_proj.weight", "q"),
    (_L + r"attention\.wk\.weight$", r"model.layers.\1.self_attn.k_proj.weight", "k"),
    (_L + r"attention\.wv\.weight$", r"model.layers.\1.self_attn.v_proj.weight", None),
    (_L + r"attention\.wo\.weight$", r"model.layers.\1.self_attn.o_proj.weight", None),
    (_L + r"feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight", None),
    (_L + r"feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight", None),
    (_L + r"feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight", None),
    # mistral-inference's mixture of experts (Mixtral 8x22B, consolidated.safetensors)
    (_L + r"feed_forward\.gate\.weight$", r"model.layers.\1.block_sparse_moe.gate.weight", None),
    (_L + r"feed_forward\.experts\.(\d+)\.(w[123])\.weight$",
     r"model.layers.\1.block_sparse_moe.experts.\2.\3.weight", None),
)]
_MARK = re.compile(_L + r"attention\.w[qkvo]\.weight$")
_QK = re.compile(_L + r"attention\.w[qk]\.weight$")
#: not weights: Llama 2's rotary frequency table
_GENERATED = ("rope.freqs",)


def hf_of(name: str) -> tuple[str, str | None] | None:
    """(Hugging Face name, ``"q"``/``"k"`` for rows in rotary order, else None), or None for a name
    the table does not know."""
    for pat, hf, rope in _TABLE:
        if pat.match(name):
            return pat.sub(hf, name), rope
    return None


def is_meta_qk(name: str) -> bool:
    """A query or key projection under Meta's / Mistral's name (``layers.N.attention.wq.weight``): left
    so when no head counts came with the checkpoint (judge: flag ``meta_layout_unmapped``)."""
    return _QK.match(name) is not None


def is_meta_layout(names) -> bool:
    """True when the tensor names are Meta's / Mistral's (an attention projection named ``wq``..``wo``)."""
    return any(_MARK.match(n) for n in names)


def interleaved_rows(r: np.ndarray, head_dim: int) -> np.ndarray:
    """The stored row of each Hugging Face row of a Q/K projection kept in rotary (interleaved) order.

    transformers' ``permute_for_rope`` views a head's ``head_dim`` rows as (head_dim/2, 2) and swaps the
    axes, so Hugging Face row (h, j, k) = h*head_dim + j*head_dim/2 + k is stored at row
    h*head_dim + 2k + j (llama.cpp's GGUF keeps the same order: weightdiff.io.gguf_read)."""
    half = head_dim // 2
    h, i = np.divmod(r, head_dim)
    j, k = np.divmod(i, half)
    return h * head_dim + 2 * k + j


def _int(doc: dict, *keys: str) -> int | None:
    for k in keys:
        v = doc.get(k)
        if v is not None:
            return v if type(v) is int and v > 0 else -1
    return None


def _heads(doc: dict, where: Path | str) -> tuple[int, int, int, int | None]:
    """(query heads, key/value heads, head size, model width or None) from params.json or config.json."""
    nh = _int(doc, "n_heads", "num_attention_heads")
    nkv = _int(doc, "n_kv_heads", "num_key_value_heads")
    dim = _int(doc, "dim", "hidden_size")
    hd = _int(doc, "head_dim")
    bad = [k for k, v in (("n_heads", nh), ("n_kv_heads", nkv), ("dim", dim), ("head_dim", hd)) if v == -1]
    if bad:
        raise CheckpointError(where, f"`{bad[0]}` is not a positive integer, so the query/key rows of the "
                                     "consolidated weights cannot be put in Hugging Face's order")
    if nh is None:
        raise CheckpointError(where, "gives no `n_heads`, so the query/key rows of the consolidated weights "
                                     "cannot be put in Hugging Face's order")
    if hd is None:
        if dim is None or dim % nh:
            raise CheckpointError(where, "gives neither `head_dim` nor a `dim` that `n_heads` divides, so the "
                                         "query/key rows of the consolidated weights cannot be put in Hugging "
                                         "Face's order")
        hd = dim // nh
    if hd % 2:
        raise CheckpointError(where, f"heads of {hd} (odd): rotary embeddings pair the rows of a head, so this "
                                     "cannot describe these weights")
    return nh, nkv or nh, hd, dim


def _read_params(ckpt) -> tuple[dict, str] | None:
    """(document, file name) of params.json, else config.json, beside the weights; None when neither."""
    read = getattr(ckpt, "read_config", None)
    root = ckpt.config_dir or ckpt.root
    for fname in ("params.json", "config.json"):
        if read is not None:
            doc = read(fname)
            where = fname
        else:
            got = read_beside(root, fname, PARAMS_CAP) if root is not None else None
            if got is None:
                continue
            where = got[0]
            doc = load_json(got[1], got[0], fname)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise CheckpointError(where, "is not a JSON object")
        if fname == "config.json" and not any(k in doc for k in ("num_attention_heads", "n_heads")):
            continue
        return doc, where
    return None


def apply(ckpt) -> None:
    """Rename a located Meta/Mistral-layout checkpoint's tensors to Hugging Face names and have it hand
    out its Q/K rows in Hugging Face order (``Checkpoint.row_order``); nothing for any other layout."""
    names = list(ckpt.tensors)
    if not is_meta_layout(names):
        return
    found = _read_params(ckpt)
    shown = escape_name(str(ckpt.path))
    if found is not None:
        doc, where = found
        nh, nkv, hd, dim = _heads(doc, where)
    out: dict = {}
    file_names = dict(ckpt.file_names)
    order: dict[str, int] = {}
    skipped, kept = [], []
    for name, info in ckpt.tensors.items():
        if name in _GENERATED:
            skipped.append(name)
            continue
        got = hf_of(name)
        out_name, rope = got if got is not None else (name, None)
        if rope is not None and found is None:
            out_name, rope = name, None          # its rows cannot be put in order: kept as it is
            kept.append(name)
        if out_name in out:
            raise CheckpointError(info.path, f"tensors `{escape_name(file_names.get(out_name, out_name))}` and "
                                             f"`{escape_name(name)}` both map to `{escape_name(out_name)}`")
        if rope is not None:
            heads = nh if rope == "q" else nkv
            want = heads * hd
            rows = info.shape[0] if info.shape else 0
            if len(info.shape) != 2 or (dim is not None and info.shape[1] != dim):
                raise CheckpointError(info.path, f"tensor `{escape_name(name)}` is {list(info.shape)}, not "
                                                 f"[{want}, {dim if dim is not None else 'dim'}] as {escape_name(str(where))} "
                                                 "describes (the wrong params.json?)")
            if rows != want:
                parts = want // rows if rows and want % rows == 0 else 0
                if parts > 1:
                    raise CheckpointError(info.path, f"tensor `{escape_name(name)}` has {rows:,} rows where "
                                                     f"{escape_name(str(where))}'s {heads} heads of {hd} need {want:,}: "
                                                     f"one of {parts} model-parallel shards of a consolidated "
                                                     "checkpoint",
                                          "merge the shards with transformers' conversion script "
                                          "(convert_llama_weights_to_hf.py) and compare its output")
                raise CheckpointError(info.path, f"tensor `{escape_name(name)}` has {rows:,} rows, but "
                                                 f"{escape_name(str(where))}'s {heads} heads of {hd} need {want:,} "
                                                 "(the wrong params.json?)")
            order[out_name] = hd
        if out_name != name:
            file_names[out_name] = file_names.get(name, name)
            info = _renamed(info, out_name)
        out[out_name] = info
    ckpt.tensors = out
    ckpt.stored = out
    ckpt.file_names = file_names
    ckpt.row_order = order
    ckpt.metadata = dict(ckpt.metadata or {})
    ckpt.metadata["layout"] = "Meta/Mistral consolidated"
    if found is None:
        note = (f"{shown}: Meta's / Mistral's consolidated layout, read under Hugging Face names except its "
                f"{len(kept)} query/key projection{'s' if len(kept) != 1 else ''} (`layers.N.attention.wq`, `wk`), "
                "kept as they are: no params.json or config.json beside the weights gives the attention heads "
                "needed to put their rows in Hugging Face's order, so they pair by name only with a checkpoint "
                "of the same layout")
    else:
        layers = len({n.split(".")[2] for n in order})
        note = (f"{shown}: Meta's / Mistral's consolidated layout, read under Hugging Face names, the query/key "
                f"rows of {len(order)} projection{'s' if len(order) != 1 else ''} in {layers} layer"
                f"{'s' if layers != 1 else ''} put in Hugging Face's order (heads from "
                f"{escape_name(Path(str(where)).name)}: {nh} query, {nkv} key/value, {hd} wide)")
    if skipped:
        note += f"; {', '.join(skipped)} left out (computed from the parameters, not a weight)"
    ckpt.notes.append(note)


def _renamed(info, name: str):
    from dataclasses import replace

    return replace(info, name=name)
