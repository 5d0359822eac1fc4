"""Tiny model state dicts with real family names (Llama, GPT-2, ViT), built with numpy.

Used by the end-to-end tests: each builder returns an ordered ``{name: float32 array}``
so a test can change exactly what it wants and know the answer.
"""

from __future__ import annotations

import numpy as np


def llama(rng: np.random.Generator, layers: int = 4, hidden: int = 128, inter: int = 256,
          vocab: int = 512, kv: int | None = None, std: float = 0.02, tied: bool = False) -> dict:
    kv = kv or hidden
    t: dict[str, np.ndarray] = {}
    t["model.embed_tokens.weight"] = rng.normal(0, std, (vocab, hidden)).astype(np.float32)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rng.normal(0, std, (hidden, hidden)).astype(np.float32)
        t[p + "self_attn.k_proj.weight"] = rng.normal(0, std, (kv, hidden)).astype(np.float32)
        t[p + "self_attn.v_proj.weight"] = rng.normal(0, std, (kv, hidden)).astype(np.float32)
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, std, (hidden, hidden)).astype(np.float32)
        t[p + "mlp.gate_proj.weight"] = rng.normal(0, std, (inter, hidden)).astype(np.float32)
        t[p + "mlp.up_proj.weight"] = rng.normal(0, std, (inter, hidden)).astype(np.float32)
        t[p + "mlp.down_proj.weight"] = rng.normal(0, std, (hidden, inter)).astype(np.float32)
        t[p + "input_layernorm.weight"] = (1 + rng.normal(0, 0.01, hidden)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + rng.normal(0, 0.01, hidden)).astype(np.float32)
    t["model.norm.weight"] = (1 + rng.normal(0, 0.01, hidden)).astype(np.float32)
    if not tied:
        t["lm_head.weight"] = rng.normal(0, std, (vocab, hidden)).astype(np.float32)
    return t


def gpt2(rng: np.random.Generator, layers: int = 2, hidden: int = 64, vocab: int = 300, positions: int = 64,
         prefix: str = "transformer.", std: float = 0.02) -> dict:
    t: dict[str, np.ndarray] = {}
    t[prefix + "wte.weight"] = rng.normal(0, std, (vocab, hidden)).astype(np.float32)
    t[prefix + "wpe.weight"] = rng.normal(0, std, (positions, hidden)).astype(np.float32)
    for i in range(layers):
        p = f"{prefix}h.{i}."
        t[p + "ln_1.weight"] = np.ones(hidden, np.float32)
        t[p + "ln_1.bias"] = np.zeros(hidden, np.float32)
        t[p + "attn.c_attn.weight"] = rng.normal(0, std, (hidden, 3 * hidden)).astype(np.float32)
        t[p + "attn.c_attn.bias"] = rng.normal(0, std, 3 * hidden).astype(np.float32)
        t[p + "attn.c_proj.weight"] = rng.normal(0, std, (hidden, hidden)).astype(np.float32)
        t[p + "attn.c_proj.bias"] = rng.normal(0, std, hidden).astype(np.float32)
        t[p + "ln_2.weight"] = np.ones(hidden, np.float32)
        t[p + "ln_2.bias"] = np.zeros(hidden, np.float32)
        t[p + "mlp.c_fc.weight"] = rng.normal(0, std, (hidden, 4 * hidden)).astype(np.float32)
        t[p + "mlp.c_fc.bias"] = rng.normal(0, std, 4 * hidden).astype(np.float32)
        t[p + "mlp.c_proj.weight"] = rng.normal(0, std, (4 * hidden, hidden)).astype(np.float32)
        t[p + "mlp.c_proj.bias"] = rng.normal(0, std, hidden).astype(np.float32)
    t[prefix + "ln_f.weight"] = np.ones(hidden, np.float32)
    t[prefix + "ln_f.bias"] = np.zeros(hidden, np.float32)
    return t


def vit(rng: np.random.Generator, layers: int = 2, hidden: int = 64, patches: int = 17, prefix: str = "vit.",
        std: float = 0.02) -> dict:
    t: dict[str, np.ndarray] = {}
    t[prefix + "embeddings.cls_token"] = rng.normal(0, std, (1, 1, hidden)).astype(np.float32)
    t[prefix + "embeddings.position_embeddings"] = rng.normal(0, std, (1, patches, hidden)).astype(np.float32)
    t[prefix + "embeddings.patch_embeddings.projection.weight"] = rng.normal(0, std, (hidden, 3, 4, 4)).astype(np.float32)
    t[prefix + "embeddings.patch_embeddings.projection.bias"] = np.zeros(hidden, np.float32)
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}."
        for m in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            t[p + m + ".weight"] = rng.normal(0, std, (hidden, hidden)).astype(np.float32)
            t[p + m + ".bias"] = np.zeros(hidden, np.float32)
        t[p + "intermediate.dense.weight"] = rng.normal(0, std, (4 * hidden, hidden)).astype(np.float32)
        t[p + "intermediate.dense.bias"] = np.zeros(4 * hidden, np.float32)
        t[p + "output.dense.weight"] = rng.normal(0, std, (hidden, 4 * hidden)).astype(np.float32)
        t[p + "output.dense.bias"] = np.zeros(hidden, np.float32)
        for ln in ("layernorm_before", "layernorm_after"):
            t[p + ln + ".weight"] = np.ones(hidden, np.float32)
            t[p + ln + ".bias"] = np.zeros(hidden, np.float32)
    t[prefix + "layernorm.weight"] = np.ones(hidden, np.float32)
    t[prefix + "layernorm.bias"] = np.zeros(hidden, np.float32)
    return t


def low_rank_update(rng: np.random.Generator, w: np.ndarray, rank: int, rel: float = 0.05) -> np.ndarray:
    """``w + U @ V.T`` with a rank-``rank`` update whose norm is ``rel`` times ``w``'s."""
    u = rng.normal(size=(w.shape[0], rank))
    v = rng.normal(size=(w.shape[1], rank))
    d = u @ v.T
    d *= rel * np.linalg.norm(w) / np.linalg.norm(d)
    return (w + d).astype(np.float32)


def moe(rng: np.random.Generator, style: str = "mixtral", layers: int = 2, hidden: int = 64, inter: int = 64,
        experts: int = 4, vocab: int = 96, kv: int = 32, shared: int = 0, std: float = 0.02) -> dict:
    """A mixture-of-experts state dict as transformers saves it, one matrix per expert: Mixtral's
    ``block_sparse_moe.experts.{x}.w1/w2/w3`` (``style="mixtral"``) or Qwen-MoE's
    ``mlp.experts.{x}.gate_proj/up_proj/down_proj`` with a router ``mlp.gate`` (``"qwen"``, and a
    shared expert with ``shared`` > 0)."""
    t = llama(rng, layers=layers, hidden=hidden, inter=inter, vocab=vocab, kv=kv, std=std)
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("gate_proj", "up_proj", "down_proj"):
            del t[p + "mlp." + m + ".weight"]
        block = p + ("block_sparse_moe." if style == "mixtral" else "mlp.")
        t[block + "gate.weight"] = rng.normal(0, std, (experts, hidden)).astype(np.float32)
        names = ("w1", "w3", "w2") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for x in range(experts):
            for m, shape in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter))):
                t[f"{block}experts.{x}.{m}.weight"] = rng.normal(0, std, shape).astype(np.float32)
        if shared:
            for m, shape in zip(("gate_proj", "up_proj", "down_proj"), ((shared, hidden), (shared, hidden),
                                                                       (hidden, shared))):
                t[f"{p}mlp.shared_expert.{m}.weight"] = rng.normal(0, std, shape).astype(np.float32)
            t[f"{p}mlp.shared_expert_gate.weight"] = rng.normal(0, std, (1, hidden)).astype(np.float32)
    return t
