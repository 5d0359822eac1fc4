"""Casts the half-ulp test cannot explain: through a third dtype (fp32 -> fp16 -> bf16) and past the
range of the cast dtype (fp16 overflow). Each is a proof of a cast (bitwise the chain's values), so
the verdict is cast_only with the chain named; a fine-tune of 1e-3 in the same dtypes stays derived."""

from __future__ import annotations

import numpy as np
import pytest

import weightdiff
from weightdiff.io.safetensors_write import to_storage
from weightdiff.kernels import reference as ref
from weightdiff.measure import recast
from conftest import write_checkpoint
from models import llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    t = llama(np.random.default_rng(11), layers=2)
    t["model.layers.0.mlp.down_proj.weight"][0, :40] = np.logspace(-9, -4, 40)   # fp16 subnormals
    t["model.layers.1.mlp.down_proj.weight"][0, :3] = [1e5, -7e4, 3e-9]         # beyond fp16's range
    return t, write_checkpoint(tmp_path_factory.mktemp("base"), t)


def _cast(tensors: dict, *chain: str, change: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tensors.items():
        x = v.astype(np.float64)
        if change:
            x = x * (1 + change * rng.standard_normal(x.shape))
        for d in chain:
            x = ref.round_to(x, d).reshape(v.shape)
        out[k] = (chain[-1], to_storage(x, chain[-1]))
    return out


def _run(tmp_path, base, tensors):
    tuned = write_checkpoint(tmp_path / "tuned", tensors)
    return weightdiff.compare(str(base), str(tuned))


def test_fp32_to_fp16_to_bf16_is_cast_only_through_fp16(tmp_path, base):
    tensors, path = base
    r = _run(tmp_path, path, _cast(tensors, "F16", "BF16"))
    s = r.summary
    assert s.verdict == "cast_only", s.verdict_reason
    assert s.delta_params == 0 and s.params_by_status["changed"] == 0
    assert "cast_rounded_twice" in s.flags
    twice = [t for t in r.tensors if t.cast and t.cast["through"] == "F16"]
    assert twice and all(t.status == "rounding" and t.cast["unexplained"] == 0 for t in twice)
    assert all(t.frac_beyond_rounding > 0 for t in twice)       # the half-ulp share stays what it measures
    assert "F32 -> F16 -> BF16" in s.verdict_reason and "through float16" in s.verdict_reason
    assert "fine-tune" not in " ".join(s.headline)


def test_fp16_overflow_in_a_plain_cast_is_cast_only_with_overflow(tmp_path, base):
    tensors, path = base
    r = _run(tmp_path, path, _cast(tensors, "F16"))
    s = r.summary
    assert s.verdict == "cast_only", s.verdict_reason
    t = next(t for t in r.tensors if t.name == "model.layers.1.mlp.down_proj.weight")
    assert t.status == "rounding" and t.nonfinite == 2
    assert t.cast == {"chain": ["F32", "F16"], "through": None, "elements": t.numel, "unexplained": 0,
                      "overflow": 2, "saturated": 0}
    assert "cast_overflow" in s.flags and "nonfinite" in s.flags
    assert "2 values overflowed to infinity in the cast" in s.verdict_reason


def test_a_saturating_cast_is_a_cast(tmp_path, base):
    tensors, path = base
    cast = _cast(tensors, "F16")
    name = "model.layers.1.mlp.down_proj.weight"
    v = cast[name][1].copy()
    v.reshape(-1)[:2] = [65504.0, -65504.0]
    cast[name] = ("F16", v)
    r = _run(tmp_path, path, cast)
    assert r.summary.verdict == "cast_only"
    t = next(t for t in r.tensors if t.name == name)
    assert t.cast["saturated"] == 2 and t.cast["overflow"] == 0


@pytest.mark.parametrize("chain", [("F16", "BF16"), ("F16",), ("BF16",)])
def test_a_small_dense_fine_tune_through_the_same_casts_stays_derived(tmp_path, base, chain):
    tensors, path = base
    r = _run(tmp_path, path, _cast(tensors, *chain, change=1e-3))
    s = r.summary
    assert s.verdict == "derived"
    assert s.params_by_status["changed"] > 0.9 * s.params_total
    assert not any(t.cast for t in r.tensors)


def test_a_nan_where_the_base_had_a_number_is_no_cast(tmp_path, base):
    tensors, path = base
    cast = _cast(tensors, "F16")
    name = "model.layers.0.self_attn.q_proj.weight"
    v = cast[name][1].copy()
    v.reshape(-1)[5] = np.nan
    cast[name] = ("F16", v)
    r = _run(tmp_path, path, cast)
    assert r.summary.verdict == "derived"
    assert next(t for t in r.tensors if t.name == name).status == "changed"


def test_chains_tried_and_the_probe_stops_a_fine_tune(monkeypatch, tmp_path, base):
    assert recast.chains("F32", "BF16") == [None, "F16"]
    assert recast.chains("F64", "BF16") == [None, "F16", "F32"]
    assert recast.chains("BF16", "F16") == [None]          # through F32 a bf16 value is exact
    assert recast.chains("F32", "F8_E4M3") == []
    # the same dtype, rounded through a narrower one (a fp16 model loaded as bf16 and saved back)
    assert recast.chains("F16", "F16") == ["BF16"] and recast.chains("BF16", "BF16") == ["F16"]
    tensors, path = base
    tuned = write_checkpoint(tmp_path / "ft", _cast(tensors, "F16", "BF16", change=1e-3))
    seen = []
    real = recast.cpu.recast_counts
    monkeypatch.setattr(recast.cpu, "recast_counts", lambda b, t, *a: seen.append(len(b)) or real(b, t, *a))
    r = weightdiff.compare(str(path), str(tuned))
    assert r.summary.verdict == "derived" and seen
    assert max(seen) <= recast.PROBE                          # every changed tensor failed in its probe


def test_same_dtype_rounded_through_bf16_is_a_cast(tmp_path):
    # GPTQModel on CPU loads a fp16 model as bf16 and writes its biases back as F16: every value bf16(base).
    # Same dtype on both sides, so no cast chain was tried, and the biases read "changed" (verdict derived)
    import torch

    from weightdiff.comparison import compare
    from weightdiff.io.safetensors_write import save_file

    rng = np.random.default_rng(1)
    b = {"model.layers.0.self_attn.q_proj.bias": (rng.standard_normal(64) * 0.05).astype(np.float16),
         "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float16)}
    t = dict(b)
    t["model.layers.0.self_attn.q_proj.bias"] = torch.tensor(b["model.layers.0.self_attn.q_proj.bias"]).bfloat16().half().numpy()
    r = compare(save_file(tmp_path / "b.safetensors", b), save_file(tmp_path / "t.safetensors", t))
    rec = r.tensor("model.layers.0.self_attn.q_proj.bias")
    assert rec.status == "rounding" and rec.cast["chain"] == ["F16", "BF16", "F16"]
    assert r.summary.verdict == "cast_only"
    # a real change of the same vector is not explained
    t["model.layers.0.self_attn.q_proj.bias"] = b["model.layers.0.self_attn.q_proj.bias"] + np.float16(0.01)
    r = compare(save_file(tmp_path / "b.safetensors", b), save_file(tmp_path / "t2.safetensors", t))
    assert r.tensor("model.layers.0.self_attn.q_proj.bias").status == "changed"


def test_a_float32_model_held_in_bf16_and_saved_back_as_float32_is_a_cast(tmp_path, base):
    """Every tensor, matrices too, is bf16(base) stored as F32: a model loaded in bf16 and saved back. The
    same-dtype chain was tried on vectors only, so the matrices read changed and the model "DERIVED: a fine-tune".
    A dense 1e-3 fine-tune (below 2^-8 relative, so its matrices are probed) stays derived."""
    tensors, path = base
    r = _run(tmp_path, path, _cast(tensors, "BF16", "F32"))
    s = r.summary
    assert s.verdict == "cast_only" and "cast_rounded_twice" in s.flags, (s.verdict, s.flags, s.verdict_reason)
    mats = [t for t in r.tensors if len(t.shape) == 2]
    assert mats and all(t.status == "rounding" and t.cast["chain"] == ["F32", "BF16", "F32"] for t in mats)
    from weightdiff.render.sentences import verdict_title

    assert "through a narrower dtype and back" in verdict_title(r.to_dict()["summary"])
    r = _run(tmp_path / "ft", path, _cast(tensors, "F32", change=1e-3, seed=3))
    assert r.summary.verdict == "derived" and all(t.cast is None for t in r.tensors if len(t.shape) == 2)


def _bf16(x: np.ndarray) -> np.ndarray:
    return (to_storage(x.astype(np.float32), "BF16").view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_matrices_off_a_bf16_base_grid_beside_matrices_on_it_are_not_a_cast(tmp_path):
    """A bf16 base upcast to fp32 with small per-column scales (|l - 1| <= 1.5e-3, IA3 merged) in some
    matrices: those values are within the base's rounding but no conversion of it (bf16 -> fp32 is exact),
    while the untouched matrices stay exactly on its grid. It read "CAST ONLY ... so no weight was trained
    further"; now inconclusive, flag off_grid_mixed. Every matrix off the grid (two roundings of one fp32
    original) stays cast_only, in words that do not claim nothing was trained."""
    from weightdiff.render.sentences import plain_language

    t = llama(np.random.default_rng(3), layers=2)
    base = {k: _bf16(v) for k, v in t.items()}
    b = write_checkpoint(tmp_path / "b", base, dtype="BF16")
    rng = np.random.default_rng(4)
    tuned = dict(base)
    scaled = [k for k in base if k.endswith(("k_proj.weight", "v_proj.weight"))]
    for k in scaled:
        tuned[k] = (base[k] * (1 + rng.uniform(-1.5e-3, 1.5e-3, base[k].shape[1]))).astype(np.float32)
    r = weightdiff.compare(b, write_checkpoint(tmp_path / "t", tuned, dtype="F32"), rank=False)
    s = r.summary
    assert s.verdict == "inconclusive" and "off_grid_mixed" in s.flags, (s.verdict, s.flags)
    assert s.scope["off_grid"]["off_grid"] == len(scaled) and s.scope["off_grid"]["on_grid"] >= 4
    assert "no conversion of the base" in s.headline[0] or "no conversion of it" in s.verdict_reason
    # the same weights as one fp32 original and its bf16 rounding: every matrix off the grid
    orig = {k: v.astype(np.float32) for k, v in t.items()}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b2", orig, dtype="BF16"),
                           write_checkpoint(tmp_path / "t2", orig, dtype="F32"), rank=False)
    assert r.summary.verdict == "cast_only" and "off_grid_mixed" not in r.summary.flags
    words = " ".join(plain_language(r.to_dict()))
    assert "trained further" not in words and "the weights cannot tell the two apart" in words
