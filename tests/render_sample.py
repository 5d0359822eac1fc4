"""A compare-shaped result dict for the render tests, computed (not typed in) from small arrays.

``sample_result()`` builds a 12-block Llama-like model (hidden 64) in numpy, applies a
known fine-tune to it (a rank-4 update on q and v of blocks 10 and 11, a new
classification head ``score.weight``, a vocabulary grown from 500 to 508 rows), and
measures the pair with plain float64 numpy: norms, cosine, singular values. Every
number in the dict therefore agrees with every other (block norms are the root sum of
squares of their tensors, counts add up), as they will in ``weightdiff compare``'s
JSON; the renderers can be tested before and without the compute path.
"""

from __future__ import annotations

import copy
import math

import numpy as np

HIDDEN, FFN, BLOCKS, VOCAB, NEW_TOKENS, LABELS, LORA_RANK = 64, 172, 12, 500, 8, 3, 4
LORA_BLOCKS = (10, 11)
MODULES = {"self_attn.q_proj": ("attn.q", (HIDDEN, HIDDEN)), "self_attn.k_proj": ("attn.k", (HIDDEN, HIDDEN)),
           "self_attn.v_proj": ("attn.v", (HIDDEN, HIDDEN)), "self_attn.o_proj": ("attn.o", (HIDDEN, HIDDEN)),
           "mlp.gate_proj": ("mlp.gate", (FFN, HIDDEN)), "mlp.up_proj": ("mlp.up", (FFN, HIDDEN)),
           "mlp.down_proj": ("mlp.down", (HIDDEN, FFN)), "input_layernorm": ("norm", (HIDDEN,)),
           "post_attention_layernorm": ("norm", (HIDDEN,))}


def _rank(delta: np.ndarray, k: int = 16) -> dict:
    s = np.linalg.svd(delta, compute_uv=False)
    e = s ** 2
    total = float(e.sum())
    cum = np.cumsum(e) / total
    p = s / s.sum()
    p = p[p > 0]
    m, n = delta.shape
    floor = 2.0 ** -9 / math.sqrt(12) * 0.02 * (math.sqrt(m) + math.sqrt(n))
    return {"stable_rank": total / float(e[0]), "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "energy_rank_90": int(np.searchsorted(cum, 0.90) + 1), "energy_rank_99": int(np.searchsorted(cum, 0.99) + 1),
            "numerical_rank": int((s > 1.5 * floor).sum()), "noise_floor": floor,
            "spectrum": [float(v) for v in s[:k]], "energy_captured": float(e[:k].sum() / total),
            "method": "exact", "shape_2d": [m, n], "exact": True, "extra": {}}


def _tensor(name: str, block: str | None, module: str | None, b: np.ndarray | None, t: np.ndarray,
            status: str | None = None) -> dict:
    rec = {"name": name, "base_name": name if b is not None else None, "status": status, "shape": list(t.shape),
           "base_shape": None if b is None else list(b.shape), "dtype_base": None if b is None else "BF16",
           "dtype_tuned": "BF16", "numel": int(t.size), "numel_compared": 0, "norm_base": None, "norm_tuned": None,
           "norm_delta": None, "rel_change": None, "cosine": None, "frac_changed": None,
           "frac_beyond_rounding": None, "max_abs_delta": None, "nonfinite": 0, "sign_flips": 0, "base_index": 0,
           "compared": "none" if b is None else "float", "block": block, "module": module, "note": None, "rank": None}
    if b is None:
        rec["status"] = "added"
        return rec
    bb = b[: t.shape[0]] if b.shape != t.shape else b
    tt = t[: b.shape[0]] if b.shape != t.shape else t
    d = tt - bb
    nb, nt, nd = (float(np.linalg.norm(x)) for x in (bb, tt, d))
    rec.update(numel_compared=int(bb.size), norm_base=nb, norm_tuned=nt, norm_delta=nd, rel_change=nd / nb,
               cosine=float((bb * tt).sum() / (nb * nt)), frac_changed=float((d != 0).mean()),
               frac_beyond_rounding=float((d != 0).mean()), max_abs_delta=float(np.abs(d).max()),
               sign_flips=int(((bb > 0) != (tt > 0)).sum()), compared="float")
    rec["status"] = status or ("changed" if nd > 0 else "unchanged")
    if nd > 0 and d.ndim == 2:
        rec["rank"] = _rank(d)
    return rec


def _build_tensors(rng: np.random.Generator) -> list[dict]:
    out = []
    emb = rng.normal(0, 0.02, (VOCAB, HIDDEN))
    emb_t = np.vstack([emb, rng.normal(0, 0.02, (NEW_TOKENS, HIDDEN))])
    out.append(_tensor("model.embed_tokens.weight", "embed", "embed", emb, emb_t, "resized"))
    for i in range(BLOCKS):
        for suffix, (kind, shape) in MODULES.items():
            name = f"model.layers.{i}.{suffix}.weight"
            w = 1 + rng.normal(0, 0.05, shape) if kind == "norm" else rng.normal(0, 0.02, shape)
            t = w
            if i in LORA_BLOCKS and kind in ("attn.q", "attn.v"):
                a, bm = rng.normal(0, 0.02, (LORA_RANK, shape[1])), rng.normal(0, 0.05, (shape[0], LORA_RANK))
                t = w + bm @ a
            out.append(_tensor(name, f"layers.{i}", kind, w, t))
    out.append(_tensor("model.norm.weight", "final_norm", "norm", np.ones(HIDDEN), np.ones(HIDDEN)))
    head = rng.normal(0, 0.02, (VOCAB, HIDDEN))
    head_t = np.vstack([head, rng.normal(0, 0.02, (NEW_TOKENS, HIDDEN))])
    out.append(_tensor("lm_head.weight", "head", "head", head, head_t, "resized"))
    out.append(_tensor("score.weight", "head", "head", None, rng.normal(0, 0.02, (LABELS, HIDDEN))))
    return out


def _changed(t: dict) -> bool:
    return t["status"] in ("changed", "resized", "added")


def _blocks(tensors: list[dict]) -> list[dict]:
    order: dict[str, list[dict]] = {}
    for t in tensors:
        order.setdefault(t["block"], []).append(t)
    blocks = []
    for name, ts in order.items():
        nb2 = sum((t["norm_base"] or 0) ** 2 for t in ts)
        nd2 = sum((t["norm_delta"] or 0) ** 2 for t in ts)
        mods: dict[str, list[float]] = {}
        for t in ts:
            if t["norm_base"] is not None:
                acc = mods.setdefault(t["module"], [0.0, 0.0])
                acc[0] += t["norm_base"] ** 2
                acc[1] += t["norm_delta"] ** 2
        ranks = [t["rank"]["numerical_rank"] for t in ts if t["rank"]]
        blocks.append({
            "block": name, "index": int(name.split(".")[1]) if name.startswith("layers.") else None,
            "params": sum(t["numel"] for t in ts), "params_changed": sum(t["numel"] for t in ts if _changed(t)),
            "tensors": len(ts), "tensors_changed": sum(_changed(t) for t in ts),
            "rel_change": math.sqrt(nd2 / nb2) if nb2 else None, "norm_base": math.sqrt(nb2),
            "norm_delta": math.sqrt(nd2), "delta_params": sum(_delta_params(t) for t in ts),
            "max_numerical_rank": max(ranks) if ranks else None,
            "modules": {k: math.sqrt(v[1] / v[0]) for k, v in mods.items()}})
    return blocks


def _delta_params(t: dict) -> int:
    if t["status"] == "added":
        return t["numel"]
    if t["status"] == "resized":
        return t["numel"] - t["numel_compared"] + (t["numel_compared"] if t["norm_delta"] else 0)
    if t["status"] != "changed":
        return 0
    if t["rank"] is None:
        return t["numel"]
    m, n = t["rank"]["shape_2d"]
    return min(m * n, t["rank"]["energy_rank_99"] * (m + n))


def sample_result(seed: int = 7) -> dict:
    """A fresh, self-consistent ``weightdiff.compare/1`` dict (see the module docstring)."""
    rng = np.random.default_rng(seed)
    tensors = _build_tensors(rng)
    blocks = _blocks(tensors)
    layered = [b for b in blocks if b["index"] is not None]
    by_status = {s: 0 for s in ("unchanged", "rounding", "changed", "resized", "added", "removed")}
    t_status = dict(by_status)
    for t in tensors:   # as weightdiff.judge.verdict counts: a resized tensor's shared rows, its new rows as added
        if t["status"] == "resized":
            by_status["resized"] += t["numel_compared"]
            by_status["added"] += t["numel"] - t["numel_compared"]
        else:
            by_status[t["status"]] += t["numel"]
        t_status[t["status"]] += 1
    total = sum(t["numel"] for t in tensors)
    nb2 = sum((t["norm_base"] or 0) ** 2 for t in tensors)
    nd2 = sum((t["norm_delta"] or 0) ** 2 for t in tensors)
    dp = sum(_delta_params(t) for t in tensors)
    modules: dict[str, dict] = {}
    for t in tensors:
        m = modules.setdefault(t["module"], {"params": 0, "params_changed": 0, "tensors": 0, "_b": 0.0, "_d": 0.0})
        m["params"] += t["numel"]
        m["params_changed"] += t["numel"] if _changed(t) else 0
        m["tensors"] += 1
        m["_b"] += (t["norm_base"] or 0) ** 2
        m["_d"] += (t["norm_delta"] or 0) ** 2
    for m in modules.values():
        b2, d2 = m.pop("_b"), m.pop("_d")
        m["rel_change"] = math.sqrt(d2 / b2) if b2 else None
    changed_layers = [b for b in layered if b["tensors_changed"]]
    max_rank = max(t["rank"]["numerical_rank"] for t in tensors if t["rank"] and t["status"] == "changed")
    files = [{"name": "model.safetensors", "bytes": 2 * total + 4096, "sha256": "ab" * 32}]
    return {
        "schema": "weightdiff.compare/1",
        "tool": {"name": "weightdiff", "version": "0.1.0"},
        "settings": {"rank": True, "rank_k": 16, "subspace": False, "device": "cpu", "include": [], "exclude": [],
                     "seed": 0, "exact_svd_max": 2048,
                     "thresholds": {"rounding_frac": 0.0, "unrelated_cosine": 0.2, "unrelated_rel_change": 0.9,
                                    "large_matrix_numel": 4096, "noise_floor_factor": 1.5, "low_rank_share": 0.1,
                                    "low_rank_max": 256, "sparse_frac": 0.1}},
        "base": [{"path": "base/", "format": "safetensors", "params": total - NEW_TOKENS * HIDDEN * 2 - LABELS * HIDDEN,
                  "bytes": files[0]["bytes"], "dtypes": {"BF16": total}, "files": files}],
        "tuned": {"path": "tuned/", "format": "safetensors", "params": total, "bytes": files[0]["bytes"],
                  "dtypes": {"BF16": total}, "files": [dict(files[0], sha256="cd" * 32)]},
        "plan": {"alignment": [], "notes": [], "counts": {"matched": len(tensors) - 1, "added": 1}},
        "summary": {
            "verdict": "derived", "verdict_reason": "large matrices keep cosine 0.9999 with the base",
            "scope": {"blocks_changed": len(changed_layers), "blocks_total": len(layered),
                      "tensors_changed": sum(_changed(t) for t in tensors), "tensors_total": len(tensors)},
            "form": {"kind": "low_rank", "max_numerical_rank": max_rank},
            "flags": ["added_tensors", "resized_embeddings"], "params_total": total, "params_by_status": by_status,
            "tensors_by_status": t_status, "relative_change": math.sqrt(nd2 / nb2), "relatedness_cosine": 0.9999,
            "blocks_total": len(layered), "blocks_changed": len(changed_layers), "delta_params": dp,
            "delta_params_share": dp / total, "compressed_bytes": {}, "headline": []},
        "modules": modules, "blocks": blocks, "tensors": tensors,
        "run": {"seconds": 0.5, "command": "weightdiff compare base/ tuned/ --json out.json",
                "versions": {"python": "3.12.0", "weightdiff": "0.1.0", "numpy": np.__version__}},
    }


_CACHE: dict[int, dict] = {}


def cached_result(seed: int = 7) -> dict:
    """``sample_result`` computed once per seed; a deep copy each call, so tests may mutate it."""
    if seed not in _CACHE:
        _CACHE[seed] = sample_result(seed)
    return copy.deepcopy(_CACHE[seed])
