"""Verdicts on seeded random Llama-shaped pairs whose answer is known by construction.

Each case draws a small model (1-4 blocks, hidden 8-96, MLPs 1-4x as wide, some 8 wide, gated or not, tied or
untied head, one of float64, float32, bf16 and float16) and one transformation with a known answer: the same
weights, a cast, a dense change, a rank-4 update of one matrix or of every one, an independent model, one block
replaced, one MLP's neurons reordered, pruning, a 50/50 merge with another model, a vocabulary grown, a block
dropped or repeated, a bf16 round trip of a float32 model. A fuzz of 1,050 such pairs found the float64 rank and
the chance reordering fixed with these tests (test_f64_rank.py, test_permutation.py); this keeps a sample of it
in the suite."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from weightdiff import compare
from weightdiff.judge.relatedness import low_rank_cap
from weightdiff.options import Thresholds

DTYPES = ("F64", "F32", "BF16", "F16")
KINDS = ("same", "cast", "dense", "lowrank", "lora_all", "indep", "partial", "permute", "prune", "merge", "resize",
         "drop", "dup", "twin")


def _model(r, hidden: int, wide: int, layers: int, vocab: int, tied: bool, gated: bool) -> dict:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{m}.weight"] = (hidden, hidden)
        shapes[p + "mlp.up_proj.weight"], shapes[p + "mlp.down_proj.weight"] = (wide, hidden), (hidden, wide)
        if gated:
            shapes[p + "mlp.gate_proj.weight"] = (wide, hidden)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return {k: r.standard_normal(s) * 0.02 if len(s) > 1 else 1 + 0.05 * r.standard_normal(s) for k, s in shapes.items()}


def _case(seed: int):
    r = np.random.default_rng(20_000 + seed)
    kind = KINDS[seed % len(KINDS)]
    dtype = DTYPES[(seed // len(KINDS)) % len(DTYPES)]
    hidden = int(r.choice([8, 16, 32, 64, 96]))
    layers, wide = int(r.integers(1, 5)), int(r.choice([1, 2, 4])) * hidden
    tied, gated = bool(r.random() < 0.4), bool(r.random() < 0.5)
    if kind in ("partial", "permute", "drop", "dup"):
        layers = max(layers, 2)
    base = _model(r, hidden, wide, layers, int(r.choice([64, 128])), tied, gated)
    tuned = {k: v.copy() for k, v in base.items()}
    mats = [k for k, v in base.items() if v.ndim == 2 and "embed" not in k and "lm_head" not in k]
    low: list[str] = []
    if kind == "dense":
        tuned = {k: v + 0.02 * np.abs(v).mean() * r.standard_normal(v.shape) for k, v in base.items()}
    elif kind in ("lowrank", "lora_all"):
        low = mats if kind == "lora_all" else [mats[int(r.integers(len(mats)))]]
        for k in low:
            m, n = base[k].shape
            upd = r.standard_normal((m, 4)) @ r.standard_normal((4, n))
            tuned[k] = base[k] + upd * (0.1 * np.linalg.norm(base[k]) / np.linalg.norm(upd))
    elif kind == "indep":
        tuned = _model(r, hidden, wide, layers, base["model.embed_tokens.weight"].shape[0], tied, gated)
    elif kind == "partial":
        i = int(r.integers(layers))
        for k in mats:
            if f"layers.{i}." in k:
                tuned[k] = r.standard_normal(base[k].shape) * 0.02
    elif kind == "permute":
        i, order = int(r.integers(layers)), r.permutation(wide)
        p = f"model.layers.{i}.mlp."
        for m in ("up_proj", "gate_proj"):
            if p + m + ".weight" in base:
                tuned[p + m + ".weight"] = base[p + m + ".weight"][order]
        tuned[p + "down_proj.weight"] = base[p + "down_proj.weight"][:, order]
    elif kind == "prune":
        for k in mats:
            t = base[k].copy()
            t[np.abs(t) < np.quantile(np.abs(t), 0.5)] = 0.0
            tuned[k] = t
    elif kind == "merge":
        tuned = {k: 0.5 * v + 0.5 * r.standard_normal(v.shape) * 0.02 if v.ndim > 1 else v for k, v in base.items()}
    elif kind == "resize":
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in base:
                tuned[k] = np.concatenate([base[k], r.standard_normal((8, hidden)) * 0.02])
    elif kind == "drop":
        tuned = {k: v for k, v in base.items() if f"layers.{layers - 1}." not in k}
    elif kind == "dup":      # block 0 repeated: the tuned model's blocks 0 and 1 are both base block 0
        tuned = {}
        for k, v in base.items():
            parts = k.split(".")
            if parts[1] == "layers":
                i = int(parts[2])
                tuned[".".join(parts[:2] + [str(i + 1 if i else 0)] + parts[3:])] = v.copy()
                if i == 0:
                    tuned[".".join(parts[:2] + ["1"] + parts[3:])] = v.copy()
            else:
                tuned[k] = v.copy()
    return kind, dtype, base, tuned, low


def _stored(tensors: dict, dtype: str) -> dict:
    from weightdiff.io.safetensors_write import to_storage

    return {k: (dtype, to_storage(v, dtype)) for k, v in tensors.items()}


@pytest.mark.parametrize("seed", range(len(KINDS) * len(DTYPES)))
def test_a_pair_with_a_known_answer_reads_it(tmp_path, seed):
    kind, dtype, base, tuned, low = _case(seed)
    if kind == "same":
        b, t = _stored(base, dtype), _stored(base, dtype)
    elif kind == "cast":       # stored in the next dtype of the list (float16 -> float64)
        b, t = _stored(base, dtype), _stored(_stored_values(base, dtype), DTYPES[(DTYPES.index(dtype) + 1) % 4])
    elif kind == "twin":       # a float32 model against its bf16 copy stored as float32
        b, t = _stored(base, "F32"), _stored(_stored_values(base, "BF16"), "F32")
    else:
        b, t = _stored(base, dtype), _stored(tuned, dtype)
    res = compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), threads=1)
    s = res.summary
    want = {"same": {"identical"}, "cast": {"cast_only", "identical"}, "twin": {"cast_only"},
            "indep": {"unrelated", "inconclusive"}, "partial": {"partial"}, "permute": {"derived", "identical"}}
    assert s.verdict in want.get(kind, {"derived"}), (kind, dtype, s.verdict, s.verdict_reason)
    flag = {"permute": "permuted_units", "prune": "pruned_elements", "merge": "far_from_base",
            "drop": "removed_tensors"}.get(kind)
    assert flag is None or flag in s.flags, (kind, dtype, s.flags)
    for k in low:             # a rank-4 update reads 4, in every dtype
        assert res.tensor(k).rank.numerical_rank == 4, (k, dtype, res.tensor(k).rank.numerical_rank)
    if kind == "lora_all" and all(4 <= low_rank_cap(*base[k].shape, Thresholds()) for k in low):
        assert s.form["kind"] == "low_rank", (dtype, s.form)


def _stored_values(tensors: dict, dtype: str) -> dict:
    """The values ``tensors`` hold once stored in ``dtype``, as float64."""
    from weightdiff.kernels.dtypes import decode
    from weightdiff.io.safetensors_write import to_storage

    return {k: decode(to_storage(v, dtype), dtype) for k, v in tensors.items()}
