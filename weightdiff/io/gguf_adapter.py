r"""llama.cpp LoRA adapters in GGUF (``convert_lora_to_gguf.py``), read as the LoRA factor pairs they are.

llama.cpp's converter turns a PEFT LoRA adapter into a GGUF of ``general.type`` ``adapter``,
``adapter.type`` ``lora``, ``adapter.lora.alpha`` (the config's ``lora_alpha``) and, for each module,
``<gguf name>.lora_a`` (A, [r, in]) and ``<gguf name>.lora_b`` (B, [out, r]), named as the base model's
GGUF tensors (``blk.3.attn_q.weight.lora_a``). llama.cpp (``llama-adapter.cpp``, ``llm_graph_context::
build_lora_mm``, ``llama-export-lora``) computes each adapted weight as W + scale x B @ A with scale =
alpha / r, r the module's own rank (``lora_b``'s ne[0]), or 1 when alpha is 0 or missing: neither
``use_rslora`` nor ``rank_pattern``/``alpha_pattern`` survive the conversion, so that is what the adapter
does wherever llama.cpp loads it, and what is measured here.

The converter runs the base architecture's own ``modify_tensors`` on the factor pair, so:

- the names are mapped back to Hugging Face's with ``gguf_names`` (``model.layers.3.self_attn.q_proj``),
  and each pair is handed to the LoRA path under PEFT's names (``base_model.model.<m>.lora_A.weight``);
- Q/K of the architectures converted as llama have B's rows permuted as llama.cpp permutes those weights
  (``LlamaModel.permute``), by a head count the adapter does not carry: it is taken from the base
  (its GGUF metadata, its config.json or params.json) when the pair meets it (``resolve_rows``), and the
  rows are read back in Hugging Face's order (``Checkpoint.row_order``);
- stacked experts (``blk.N.ffn_up_exps.weight.lora_a`` [experts, r, in]) split into each expert's pair;
- ``token_embd.weight.lora_a`` is stored transposed ([vocab, r]: ``llm_build_inp_embd`` gathers its
  rows), read back as PEFT's ``lora_embedding_A`` [r, vocab];
- mergekit-extract-lora's norm weights (``blk.N.attn_norm.weight``) are skipped, as llama.cpp skips them
  (``llama-adapter.cpp``: "TODO: add support for norm vector"), and a note says so.

Anything llama.cpp's loader refuses is refused in one line: a ``general.type`` other than ``adapter``, an
``adapter.type`` other than ``lora``, a tensor that is neither a factor nor a norm weight, a factor without
its partner; GPT-2's Conv1D layers (their factors come out of the converter transposed against the base)
and split adapters are refused too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, escape_name

__all__ = ["GGUFLora", "lora_header", "peft_names", "adapter_config", "adapter_checkpoint", "resolve_rows",
           "MERGE_HINT"]

MERGE_HINT = "merge it into its base with llama-export-lora, and compare the merged GGUF"
_PEFT = "base_model.model."


@dataclass
class GGUFLora:
    """What a llama.cpp LoRA adapter's header says: ``alpha`` (0 when the key is missing, as llama.cpp reads
    it), the architecture it was converted for, the norm weights llama.cpp skips, the length of an aLoRA
    invocation sequence, and the B factors whose rows llama.cpp permuted (PEFT name -> "q" or "k")."""

    alpha: float
    arch: str
    norms: list = field(default_factory=list)
    invocation: int = 0
    rope: dict = field(default_factory=dict)
    #: the base the adapter's model card names (``general.base_model.0.*``), None when it names none
    base_model: str | None = None


def lora_header(meta: dict, infos: list, path: Path, evidence: str) -> GGUFLora:
    """The adapter's header, checked as llama.cpp's loader checks it (``evidence``: what says it is an
    adapter); CheckpointError for an adapter weightdiff cannot read."""
    kind = meta.get("general.type")
    atype = meta.get("adapter.type")
    if kind != "adapter":
        # llama.cpp: "expect general.type to be 'adapter'"; as a model, its factors read as added tensors
        shown = f"`{escape_name(kind)}`" if isinstance(kind, str) else "missing"
        why = "" if evidence.startswith("general.type") else f" ({evidence})"
        raise CheckpointError(path, f"looks like a llama.cpp adapter{why}, but its general.type is {shown}, "
                                    "not `adapter`, so llama.cpp does not load it as one either",
                              "convert the adapter again with llama.cpp's convert_lora_to_gguf.py")
    if atype != "lora":
        shown = f"`{escape_name(atype)}`" if isinstance(atype, str) and atype else "missing"
        raise CheckpointError(path, f"is a llama.cpp adapter whose adapter.type is {shown}: weightdiff reads LoRA "
                                    "adapters (adapter.type `lora`) only, as llama.cpp does", MERGE_HINT)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(path, "is a llama.cpp LoRA adapter without general.architecture, so the base tensors "
                                    "its factors change are unknown (llama.cpp refuses it too)",
                              "convert the adapter again with llama.cpp's convert_lora_to_gguf.py")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(path, f"adapter.lora.alpha is {escape_name(repr(alpha))[:40]}, not a finite number",
                              "convert the adapter again with llama.cpp's convert_lora_to_gguf.py")
    tokens = meta.get("adapter.alora.invocation_tokens")
    invocation = len(tokens) if isinstance(tokens, (list, tuple)) else 0
    return GGUFLora(float(alpha), arch, invocation=invocation, base_model=_declared_base(meta))


def peft_names(mapped: str, which: str, embedding: bool) -> str:
    """PEFT's name of factor ``which`` ("a" or "b") of the module whose weight is ``mapped``
    (``model.layers.0.self_attn.q_proj.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``;
    an embedding's ``...embed_tokens.lora_embedding_A``)."""
    module = mapped.removesuffix(".weight")
    if embedding:
        return f"{_PEFT}{module}.lora_embedding_{which.upper()}"
    return f"{_PEFT}{module}.lora_{which.upper()}.weight"


def adapter_config(lora: GGUFLora, tensors: dict, path: Path):
    """The ``AdapterConfig`` the LoRA path reads a llama.cpp adapter with: ``source`` "llama.cpp" (each
    module's scale alpha / its own rank, or 1 when alpha is 0), ``r`` the most common rank, the targets the
    modules' leaf names. CheckpointError for an adapter without factors."""
    from .peft_adapter import AdapterConfig, _LORA_RE

    ranks: Counter = Counter()
    leaves: dict[str, None] = {}
    for name, info in tensors.items():
        m = _LORA_RE.match(name)
        if m is None:
            continue
        if (m["ab"] == "A" or m["eab"] == "A") and info.shape:
            ranks[int(info.shape[0])] += 1
            leaves.setdefault(m["mod"].rsplit(".", 1)[-1], None)
    if not ranks:
        raise CheckpointError(path, "is a llama.cpp LoRA adapter that holds no factors: there is no change to measure")
    r = min(ranks, key=lambda k: (-ranks[k], k))
    return AdapterConfig(r, lora.alpha, list(leaves), False, False, lora.base_model, {}, path=path,
                         source="llama.cpp")


def _declared_base(meta: dict) -> str | None:
    """The base the adapter's model card names (the converter's ``general.base_model.0.*`` keys): its Hub repo id
    from ``repo_url``, else its ``organization/name``; a claim, reported beside the verdict (io.declared)."""
    url = meta.get("general.base_model.0.repo_url")
    if isinstance(url, str) and url.startswith("https://huggingface.co/") and url.count("/") >= 4:
        return url.removeprefix("https://huggingface.co/").strip("/") or None
    name, org = meta.get("general.base_model.0.name"), meta.get("general.base_model.0.organization")
    if isinstance(name, str) and name.strip():
        return f"{org.strip()}/{name.strip()}" if isinstance(org, str) and org.strip() else name.strip()
    return None


def adapter_checkpoint(lora: GGUFLora, shown, file: Path, tensors: dict, metadata: dict, root: Path):
    """The located checkpoint of a llama.cpp LoRA adapter: format ``adapter``, its factors under PEFT's names
    (``Checkpoint.lora``), read through ``GGUFFile``; notes for the norm weights llama.cpp skips and an aLoRA's
    invocation sequence."""
    from .gguf_read import GGUFFile
    from .located import Checkpoint

    config = adapter_config(lora, tensors, file)
    ckpt = Checkpoint(shown, "adapter", [file], tensors, dict(metadata), root, adapter=config, opener=GGUFFile)
    ckpt._headers[file] = tensors
    ckpt.gguf_lora = lora
    where = escape_name(str(shown))
    if lora.norms:
        ckpt.notes.append(f"{where}: {len(lora.norms)} norm weight{'s' if len(lora.norms) != 1 else ''} in the "
                          f"adapter (`{escape_name(lora.norms[0])}`{' ...' if len(lora.norms) > 1 else ''}, "
                          "mergekit-extract-lora's) not measured: llama.cpp skips them when it loads the adapter")
    if lora.invocation:
        ckpt.notes.append(f"{where}: an activated LoRA (aLoRA): llama.cpp applies it only after its "
                          f"{lora.invocation}-token invocation sequence; the change measured is the one it applies "
                          "from there on")
    return ckpt


def _base_heads(base, name: str, role: str, configs: dict) -> tuple[int | None, str]:
    """The head count llama.cpp permuted ``role`` ("q" or "k") of base tensor ``name`` by, and where it was read;
    (None, why) when the base does not say. ``configs``: each base's config.json read once (id -> doc or error)."""
    heads = (getattr(base, "rope_heads", None) or {}).get(name)
    if heads:                                   # a GGUF base: the count its own reader un-permuted it by
        return heads, "its GGUF metadata"
    order = (getattr(base, "row_order", None) or {}).get(name)
    info = base.tensors.get(name)
    if order and info is not None and info.shape and info.shape[0] % order == 0:
        return info.shape[0] // order, "its params.json"     # a Meta/Mistral consolidated base
    from .model_config import config_of

    if id(base) not in configs:             # once per base, not once per Q/K module
        try:
            configs[id(base)] = config_of(base)
        except (CheckpointError, OSError) as exc:
            configs[id(base)] = exc
    doc = configs[id(base)]
    if isinstance(doc, Exception):
        return None, f"its config.json cannot be read ({doc})"
    if not isinstance(doc, dict):
        return None, "it has no config.json"
    doc = doc.get("text_config") if isinstance(doc.get("text_config"), dict) and \
        "num_attention_heads" not in doc else doc
    nh = doc.get("num_attention_heads")
    nkv = doc.get("num_key_value_heads", nh)
    got = nh if role == "q" else (nkv if nkv is not None else nh)
    if type(got) is not int or got < 1:
        return None, "its config.json gives no num_attention_heads" if role == "q" else \
            "its config.json gives no num_key_value_heads or num_attention_heads"
    return got, "its config.json"


def resolve_rows(tuned, the_plan, bases) -> None:
    """Put the rows of each Q/K ``lora_b`` that llama.cpp permuted back in Hugging Face's order
    (``tuned.row_order``), with the head count of the base weight it changes; CheckpointError when the base
    does not say how many heads that weight has, or a count that does not divide its rows."""
    lora = getattr(tuned, "gguf_lora", None)
    if lora is None:
        return
    for base in bases:
        arch = (base.metadata or {}).get("general.architecture") if base.format == "gguf" else None
        if arch is not None and arch != lora.arch:
            # llama.cpp: "model arch and LoRA arch mismatch"; its names and row order are another converter's
            raise CheckpointError(tuned.files[0], f"is a llama.cpp LoRA adapter for architecture "
                                                  f"`{escape_name(lora.arch)}`, but the base "
                                                  f"({escape_name(str(base.path))}) is `{escape_name(arch)}` "
                                                  "(llama.cpp refuses the pair too)",
                                  "is this adapter for another base model?")
    from .gguf_names import ARCHITECTURES

    if lora.arch not in ARCHITECTURES and any(base.format != "gguf" for base in bases):
        # its factors keep llama.cpp's names (blk.0.attn_q.weight), which only a GGUF base of its architecture has
        raise CheckpointError(tuned.files[0], f"is a llama.cpp LoRA adapter for architecture "
                                              f"`{escape_name(lora.arch)}`, whose GGUF names weightdiff does not map "
                                              "back to Hugging Face's, so they pair with no weight of a base in "
                                              "another format", "compare it against the base's GGUF")
    pending = lora.rope
    configs: dict = {}
    for p in the_plan.pairs:
        f = p.lora
        if f is None or p.kind != "lora" or f.b_name not in pending:
            continue
        base = bases[p.base_index]
        info = base.tensors[p.base_name]
        role = pending[f.b_name]
        heads, where = _base_heads(base, p.base_name, role, configs)
        q = f"`{escape_name(f.b_name)}`"
        if heads is None:
            raise CheckpointError(tuned.files[0], f"the rows of {q} are in llama.cpp's rotary order, put back in "
                                                  f"Hugging Face's by the base's head count, but the base "
                                                  f"({escape_name(str(base.path))}) does not give it: {where}",
                                  "compare against the base GGUF, or a base folder with its config.json")
        rows = int(info.shape[0]) if info.shape else 0
        if int(tuned.tensors[f.b_name].shape[0]) != rows:
            continue                            # refused by the shape check against the base
        if heads < 1 or rows % (2 * heads):
            raise CheckpointError(tuned.files[0], f"the rows of {q} are in llama.cpp's rotary order, but the base's "
                                                  f"`{escape_name(p.base_name)}` has {rows:,} rows and {heads} "
                                                  f"{'query' if role == 'q' else 'key'} heads by {where}, which "
                                                  "do not split into whole rotary pairs",
                                  "is this adapter for another base model?")
        tuned.row_order[f.b_name] = rows // heads
