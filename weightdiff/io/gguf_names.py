"""llama.cpp tensor names -> Hugging Face names, and the value transforms to undo.

llama.cpp's converter (``convert_hf_to_gguf.py``) renames every tensor
(``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``) and, for some
architectures, changes the values on the way: it permutes the rows of the Q/K
projections of llama and of the architectures converted as llama (``LlamaModel.permute``,
``PERMUTED``), transposes GPT-2's ``Conv1D`` weights
(``GPT2Model.modify_tensors``) and adds 1 to Gemma's RMSNorm weights
(``GemmaModel.modify_tensors``, ``Gemma2Model.modify_tensors``, Gemma 3's ``norm_shift``).
``hf_name`` gives the Hugging Face name and the transform that brings the GGUF tensor back
to the Hugging Face tensor, so a GGUF pairs with its safetensors base tensor by tensor.
The tables follow gguf-py's ``TensorNameMap`` (tests check every entry against it);
docs/formats.md lists the transforms with their source.

>>> hf_name("llama", "blk.3.attn_q.weight", {"llama.attention.head_count": 32})
Mapped(name='model.layers.3.self_attn.q_proj.weight', transform='permute', heads=32)
>>> hf_name("gpt2", "blk.0.attn_qkv.weight", {})
Mapped(name='transformer.h.0.attn.c_attn.weight', transform='transpose', heads=0)
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Mapped", "hf_name", "ARCHITECTURES", "GENERATED", "PERMUTED"]

_L = "model.layers.{}."
_LLAMA = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": _L + "input_layernorm",
    "blk.{}.attn_q": _L + "self_attn.q_proj",
    "blk.{}.attn_k": _L + "self_attn.k_proj",
    "blk.{}.attn_v": _L + "self_attn.v_proj",
    "blk.{}.attn_output": _L + "self_attn.o_proj",
    "blk.{}.ffn_norm": _L + "post_attention_layernorm",
    "blk.{}.ffn_gate": _L + "mlp.gate_proj",
    "blk.{}.ffn_up": _L + "mlp.up_proj",
    "blk.{}.ffn_down": _L + "mlp.down_proj",
}
_QK_NORM = {"blk.{}.attn_q_norm": _L + "self_attn.q_norm", "blk.{}.attn_k_norm": _L + "self_attn.k_norm"}
_GEMMA2 = {**_LLAMA,
           "blk.{}.post_attention_norm": _L + "post_attention_layernorm",
           "blk.{}.ffn_norm": _L + "pre_feedforward_layernorm",
           "blk.{}.post_ffw_norm": _L + "post_feedforward_layernorm"}
_PHI3 = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": _L + "input_layernorm",
    "blk.{}.attn_qkv": _L + "self_attn.qkv_proj",
    "blk.{}.attn_output": _L + "self_attn.o_proj",
    "blk.{}.ffn_norm": _L + "post_attention_layernorm",
    "blk.{}.ffn_up": _L + "mlp.gate_up_proj",
    "blk.{}.ffn_down": _L + "mlp.down_proj",
}
_H = "transformer.h.{}."
_GPT2 = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "blk.{}.attn_norm": _H + "ln_1",
    "blk.{}.attn_qkv": _H + "attn.c_attn",
    "blk.{}.attn_output": _H + "attn.c_proj",
    "blk.{}.ffn_norm": _H + "ln_2",
    "blk.{}.ffn_up": _H + "mlp.c_fc",
    "blk.{}.ffn_down": _H + "mlp.c_proj",
}

#: mixture-of-experts layers: llama.cpp stacks the experts' matrices into one ``[experts, m, n]`` tensor
#: per projection (``torch.stack`` over the expert index, ``LlamaModel``/``Qwen2MoeModel.modify_tensors``);
#: ``{x}`` marks the expert index of the Hugging Face name each slice came from
_MIXTRAL = {
    "blk.{}.ffn_gate_inp": _L + "block_sparse_moe.gate",
    "blk.{}.ffn_gate_exps": _L + "block_sparse_moe.experts.{x}.w1",
    "blk.{}.ffn_down_exps": _L + "block_sparse_moe.experts.{x}.w2",
    "blk.{}.ffn_up_exps": _L + "block_sparse_moe.experts.{x}.w3",
}
_QWEN_MOE = {
    "blk.{}.ffn_gate_inp": _L + "mlp.gate",
    "blk.{}.ffn_gate_exps": _L + "mlp.experts.{x}.gate_proj",
    "blk.{}.ffn_up_exps": _L + "mlp.experts.{x}.up_proj",
    "blk.{}.ffn_down_exps": _L + "mlp.experts.{x}.down_proj",
}
_SHARED_EXPERT = {
    "blk.{}.ffn_gate_inp_shexp": _L + "mlp.shared_expert_gate",
    "blk.{}.ffn_gate_shexp": _L + "mlp.shared_expert.gate_proj",
    "blk.{}.ffn_up_shexp": _L + "mlp.shared_expert.up_proj",
    "blk.{}.ffn_down_shexp": _L + "mlp.shared_expert.down_proj",
}

#: the architectures llama.cpp converts with ``LlamaModel.modify_tensors`` and ``undo_permute`` left True:
#: ``LlamaModel`` itself and its subclasses ``ArceeModel``, ``SmolLM3Model``, ``GraniteModel``,
#: ``LlamaEmbedNemotronModel`` and ``Mistral3Model.Ministral3Model`` keep llama's tensor names and permute
#: the Q/K rows (weights and biases) for ggml's RoPE. ``Llama4Model`` and ``ApertusModel`` subclass it with
#: ``undo_permute = False`` and are not here; ``GraniteMoeModel`` splits a fused ``input_linear`` that no
#: Hugging Face name gives back, so it is left unmapped (``hf_name`` then keeps every name, and the judge
#: reads what differs as inconclusive: flag ``gguf_unmapped``).
PERMUTED = ("llama", "arcee", "smollm3", "granite", "llama-embed", "mistral3")

#: general.architecture -> {GGUF name (without .weight/.bias): Hugging Face name}
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": {**_LLAMA, **_MIXTRAL},   # Llama 1-3, Mistral, Mixtral (LlamaModel)
    "arcee": _LLAMA,                   # ArceeModel(LlamaModel); its MLP has no gate
    "smollm3": _LLAMA,                 # SmolLM3Model(LlamaModel)
    "granite": _LLAMA,                 # GraniteModel(LlamaModel), dense Granite 3.x
    "llama-embed": _LLAMA,             # LlamaEmbedNemotronModel(LlamaModel)
    "mistral3": _LLAMA,                # Ministral3Model(LlamaModel), Ministral 3 / Mistral 3 text
    "qwen2": _LLAMA,            # Qwen2Model: no permutation
    "qwen2moe": {**_LLAMA, **_QWEN_MOE, **_SHARED_EXPERT},
    "qwen3moe": {**_LLAMA, **_QK_NORM, **_QWEN_MOE},
    "qwen3": {**_LLAMA, **_QK_NORM},
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": {**_GEMMA2, **_QK_NORM},
    "phi3": _PHI3,
    "gpt2": _GPT2,
}

#: tensors the converter generates from config.json (rope tables): not weights of the HF model
GENERATED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class Mapped(NamedTuple):
    """The Hugging Face name of a GGUF tensor and the transform that undoes the converter's.

    ``transform``: ``None``; ``"permute"`` (Q/K rows, ``heads`` heads); ``"transpose"``
    (GPT-2 Conv1D); ``"minus_one"`` (Gemma norm weights stored as 1 + w).
    """

    name: str
    transform: str | None = None
    heads: int = 0


def _heads(meta: dict, key: str, bid: int) -> int:
    value = meta.get(key)
    if isinstance(value, list):               # per-layer head counts
        value = value[bid] if 0 <= bid < len(value) else None
    return value if type(value) is int else 0


def head_dim(meta: dict, arch: str, bid: int = -1, q_rows: int = 0) -> int | None:
    """The attention head size of block ``bid``: ``{arch}.attention.key_length``, else the embedding length over
    the block's head count (llama.cpp's default; the count may be given per layer, as a list), else the block's
    query rows ``q_rows`` over that count (llama.cpp's n_embd_head_k, without an embedding length); None when
    none of them is a whole number.

    >>> head_dim({"llama.embedding_length": 64, "llama.attention.head_count": [4, 8]}, "llama", 1)
    8
    >>> head_dim({"llama.attention.head_count": 4}, "llama", 0, q_rows=64)
    16
    """
    k = meta.get(f"{arch}.attention.key_length")
    if type(k) is int and k > 0:
        return k
    e, h = meta.get(f"{arch}.embedding_length"), _heads(meta, f"{arch}.attention.head_count", bid)
    for total in (e, q_rows):
        if type(total) is int and total > 0 and h > 0 and total % h == 0:
            return total // h
    return None


def block_index(name: str) -> int:
    """The block number of a GGUF tensor name (``blk.3.attn_q.weight``: 3), -1 outside the blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else -1


def hf_name(arch: str, name: str, meta: dict) -> Mapped:
    """Map GGUF tensor ``name`` of architecture ``arch``; unknown names come back unchanged."""
    table = ARCHITECTURES.get(arch)
    stem, dot, leaf = name.rpartition(".")
    if table is None or not dot or leaf not in ("weight", "bias"):
        return Mapped(name)
    m = _BLOCK.match(stem)
    bid, key = (int(m.group(1)), "blk.{}." + m.group(2)) if m else (-1, stem)
    target = table.get(key)
    if target is None:
        return Mapped(name)
    out = (target.format(bid, x="{x}") if m else target) + "." + leaf
    part = key.removeprefix("blk.{}.")
    if "{x}" in out:
        return Mapped(out, "experts")
    if arch in PERMUTED and part in ("attn_q", "attn_k"):
        heads = _heads(meta, f"{arch}.attention.head_count", bid)
        if part == "attn_k":
            heads = _heads(meta, f"{arch}.attention.head_count_kv", bid) or heads
        return Mapped(out, "permute", heads)
    if arch == "gpt2" and part in _GPT2_CONV1D and leaf == "weight":
        return Mapped(out, "transpose")
    if arch.startswith("gemma") and out.endswith("norm.weight"):
        return Mapped(out, "minus_one")
    return Mapped(out)
