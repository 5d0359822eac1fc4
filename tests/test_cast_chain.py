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


def _twins(tensors: dict, rounded: str, through: str = "BF16", dtype: str = "F16", fine_dtype: str | None = None,
           change: float = 0.0, seed: int = 0) -> tuple[dict, dict]:
    """(base, tuned) as two roundings of one original: ``rounded`` names the side that goes through ``through``
    first; both stored in ``dtype`` (the fine side in ``fine_dtype`` when given). ``change``: a dense relative
    update of the coarse side's values in ``through``, rounded to it again (a side trained in bf16)."""
    rng = np.random.default_rng(seed)
    fine, coarse = {}, {}
    for k, v in tensors.items():
        x = v.astype(np.float64)
        c = ref.round_to(x, through).reshape(v.shape)
        if change:
            c = ref.round_to(c * (1 + change * rng.standard_normal(c.shape)), through).reshape(v.shape)
        fd = fine_dtype or dtype
        fine[k] = (fd, to_storage(ref.round_to(x, fd).reshape(v.shape), fd))
        coarse[k] = (dtype, to_storage(ref.round_to(c, dtype).reshape(v.shape), dtype))
    return (coarse, fine) if rounded == "base" else (fine, coarse)


@pytest.mark.parametrize("rounded", ["tuned", "base"])
def test_fp16_exports_of_a_model_and_of_its_bf16_copy_are_two_roundings(tmp_path, base, rounded):
    """An fp16 export of a float32 model against an fp16 export of its bf16 copy: round_F16(x) against
    round_F16(round_BF16(x)), no cast of each other (6-9% of each tensor rounds the other way through the chain).
    Read "DERIVED: a fine-tune" in either order; now cast_only with ``cast.rounded`` naming the bf16 side."""
    from weightdiff.render.sentences import verdict_title

    tensors, _ = base
    b, t = _twins(tensors, rounded)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t))
    s = r.summary
    assert s.verdict == "cast_only", (s.verdict, s.flags, s.verdict_reason)
    moved = [x for x in r.tensors if x.status == "rounding"]
    assert moved and all(x.cast and x.cast["rounded"] == rounded and x.cast["through"] == "BF16"
                         and x.cast["unexplained"] == 0 for x in moved)
    assert any(len(x.shape) == 2 for x in moved)
    assert ("cast_base_rounded" in s.flags) == (rounded == "base")
    title = verdict_title(r.to_dict()["summary"])
    assert ("the base holds the rounded values" in title) == (rounded == "base"), title
    assert "cannot tell apart" in title and "not training" not in title and "cast_two_roundings" in s.flags
    assert "two roundings of one original" in s.verdict_reason and "bitwise a cast" not in s.verdict_reason
    assert f"F16 and F16, the {rounded} side through BF16" in s.verdict_reason and "->" not in s.verdict_reason
    assert "two roundings of one original" in moved[0].note


def test_a_bf16_copy_stored_as_float32_given_as_the_base_is_the_rounded_side(tmp_path, base):
    """The base is the float32 original rounded to bf16 and stored as float32, the tuned model the original
    (float32, and as a float16 export): no chain from the base gives values finer than it holds."""
    tensors, _ = base
    for fine in ("F32", "F16"):
        b, t = _twins(tensors, "base", dtype="F32", fine_dtype=fine)
        r = weightdiff.compare(write_checkpoint(tmp_path / f"b{fine}", b), write_checkpoint(tmp_path / f"t{fine}", t))
        s = r.summary
        assert s.verdict == "cast_only" and "cast_base_rounded" in s.flags, (fine, s.verdict, s.flags)


@pytest.mark.parametrize("rounded,dtype,fine", [("tuned", "F16", None), ("base", "F16", None),
                                                ("base", "F32", None), ("tuned", "F32", None),
                                                ("base", "F32", "F16")])
def test_a_bf16_fine_tune_beside_its_original_is_no_pair_of_roundings(tmp_path, base, rounded, dtype, fine):
    """The bf16 side trained (a dense 1e-3 update, rounded to bf16 again): whole bf16 steps that no rounding of
    one original gives, so derived, and each matrix fails the twin test in its probe."""
    tensors, _ = base
    b, t = _twins(tensors, rounded, dtype=dtype, fine_dtype=fine, change=1e-3, seed=5)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t))
    assert r.summary.verdict == "derived", (r.summary.verdict, r.summary.flags)
    assert all(not (x.cast or {}).get("rounded") for x in r.tensors if len(x.shape) == 2)


def test_some_matrices_bitwise_beside_bf16_twins_are_inconclusive(tmp_path, base):
    """A bf16-valued float32 base against a float32 model of which some matrices are bitwise the base's and others
    finer within one bf16 rounding: no one rounding of a model gives that (a change below bf16's step would), so
    inconclusive with off_grid_mixed, not cast_only."""
    from weightdiff.render.sentences import verdict_reason, verdict_title

    tensors, _ = base
    b, t = _twins(tensors, "base", dtype="F32")
    kept = [k for k in t if k.endswith(("q_proj.weight", "k_proj.weight"))]
    for k in kept:
        t[k] = b[k]
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    s = r.summary
    assert s.verdict == "inconclusive" and "off_grid_mixed" in s.flags, (s.verdict, s.flags)
    assert s.scope["off_grid"]["on_grid"] == len(kept) and s.scope["off_grid"]["through"] == ["BF16"]
    d = r.to_dict()
    assert "narrower dtype" in verdict_title(d["summary"]) and "through bfloat16;" in verdict_reason(d)


def test_twin_rule_against_brute_force_roundings():
    """``reference.twin_explained`` against the roundings themselves: every pair (round_F(x), round_F(round_V(x))) over
    random magnitudes from float16 subnormals to large values is explained, in either role; a coarse value moved
    by one step of V (or a fine value put on V's grid off the coarse one) is not, where the sides' dtype is finer
    than V by at least two bits there."""
    # a float16 0.99756 beside a bf16 1.0 (stored in float16): bf16 rounds to 1.0 only from 1 - 2^-9 = 0.99805 up, and
    # float16 rounds 0.99756 from at most 0.99780: no one original (a norm-only fine-tune read cast_only)
    assert not ref.twin_explained(np.array([float(np.float16(0.9975))]), "F16", (), np.array([1.0]), "F16", ["BF16"])[0]
    assert ref.twin_explained(np.array([float(np.float16(0.9982))]), "F16", (), np.array([1.0]), "F16", ["BF16"])[0]
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 4, 20000),
                        [1.0, 1 - 2.0 ** -9, 1 - 2.0 ** -10, 2.0 ** -14, 65504.0, -3e-8]])
    for dtype, via in (("F16", "BF16"), ("F32", "BF16"), ("F32", "F16")):
        fine = ref.round_to(x, dtype)
        coarse = ref.round_to(ref.round_to(x, via), dtype)
        ok = np.isfinite(fine) & np.isfinite(coarse)
        assert ref.twin_explained(fine[ok], dtype, (), coarse[ok], dtype, [via]).all(), (dtype, via)
        # one step of V on the coarse side, where that is no rounding of the same x
        step = 2 * ref.half_ulp(np.abs(coarse), via)
        moved = ref.round_to(coarse + np.sign(coarse - fine + 1e-300) * step, dtype)
        h_f, h_v = ref.half_ulp(np.abs(fine), dtype), ref.half_ulp(np.abs(fine), via)
        far = ok & np.isfinite(moved) & (np.abs(moved - fine) > h_v + h_f + ref.half_ulp(np.abs(moved), dtype))
        assert far.sum() > 1000
        assert not ref.twin_explained(fine[far], dtype, (), moved[far], dtype, [via]).any(), (dtype, via)
        # a fine side that is itself on V's grid, one step off the coarse value: bf16 would have rounded to it
        on = ok & (coarse != 0) & (2 * h_f <= h_v)
        f2 = ref.round_to(coarse[on] + step[on], dtype)
        assert not ref.twin_explained(f2, dtype, (), coarse[on], dtype, [via]).any(), (dtype, via)


def _routed(tensors: dict, dtype: str, *vias: str, moved: float = 0.0, seed: int = 0) -> dict:
    """Each tensor rounded through ``vias`` in order and stored in ``dtype``; ``moved``: that share of the values then
    stepped by one ``dtype`` ulp up or down at random (a pure-``dtype`` fine-tune of the smallest size)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tensors.items():
        x = v.astype(np.float64).reshape(-1)
        for via in vias:
            x = ref.round_to(x, via)
        x = ref.round_to(x, dtype)
        if moved:
            pick = np.flatnonzero(rng.random(x.size) < moved)
            step = 2 * ref.half_ulp(np.abs(np.nan_to_num(x[pick], posinf=0.0, neginf=0.0)), dtype)
            x[pick] = ref.round_to(x[pick] + np.where(rng.random(pick.size) < 0.5, step, -step), dtype)
        out[k] = (dtype, to_storage(x.reshape(v.shape), dtype))
    return out


@pytest.mark.parametrize("b_route,t_route,rounded,vias", [
    # a bf16 release against a float16 release upcast to float32
    (("BF16",), ("F32", "F16"), "tuned", {"base": [], "tuned": ["F16"]}),
    # a bf16 copy and a float16 copy of one float32 model, both stored as float32
    (("F32", "BF16"), ("F32", "F16"), "both", {"base": ["BF16"], "tuned": ["F16"]}),
    # the float32 original against a float16 release loaded as bf16 and saved as float32
    (("F32",), ("F32", "F16", "BF16"), "tuned", {"base": [], "tuned": ["F16", "BF16"]}),
    # a bf16 release against the float16 release converted to bf16: bf16(x) against bf16(f16(x))
    (("BF16",), ("BF16", "F16"), "tuned", {"base": [], "tuned": ["F16"]}),
    (("BF16", "F16"), ("BF16",), "base", {"base": ["F16"], "tuned": []}),
])
def test_roundings_through_float16_on_either_side_are_two_roundings(tmp_path, base, b_route, t_route, rounded, vias):
    """Two roundings of one float32 original where float16 is on the side that a single narrower rounding did not
    cover, or both sides are rounded, or one went through two formats: each read "DERIVED: a fine-tune" of the same
    weights. Now cast_only, each record naming each side's roundings (``cast.vias``)."""
    from weightdiff.render.sentences import verdict_title

    tensors, _ = base
    b, t = _routed(tensors, *b_route), _routed(tensors, *t_route)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    s = r.summary
    assert s.verdict == "cast_only", (s.verdict, s.flags, s.verdict_reason)
    # (a vector may need fewer roundings: the fewest that explain a tensor are the ones named)
    twins = [x for x in r.tensors if (x.cast or {}).get("rounded") and len(x.shape) == 2]
    assert twins and all(x.cast["rounded"] == rounded and x.cast["vias"] == vias and x.cast["unexplained"] == 0
                         for x in twins), [(x.name, x.cast) for x in twins]
    assert ("cast_both_rounded" in s.flags) == (rounded == "both")
    assert ("cast_base_rounded" in s.flags) == (rounded in ("base", "both"))
    title = verdict_title(r.to_dict()["summary"])
    assert "cannot tell apart" in title and ("each side holds" in title) == (rounded == "both"), title
    route = " and ".join(f"the {side} side through {' then '.join(v)}" for side, v in vias.items() if v)
    assert route in s.verdict_reason and route in twins[0].note, (route, s.verdict_reason)


@pytest.mark.parametrize("dtype,via", [("BF16", "F16"), ("F16", "BF16")])
def test_a_fine_tune_of_one_step_per_value_is_no_double_rounding(tmp_path, base, dtype, via):
    """A pure-bf16 (or fp16) fine-tune whose smallest updates moved 2% of the values by one step: rounding through
    the other format first moves a value by one step only onto the even neighbour, where that format puts the
    original on a tie, so half of those steps are none; derived, and no matrix passes the twin test."""
    tensors, _ = base
    b, t = _routed(tensors, dtype), _routed(tensors, dtype, moved=0.02, seed=3)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    assert r.summary.verdict == "derived", (r.summary.verdict, r.summary.flags)
    assert not any((x.cast or {}).get("rounded") for x in r.tensors if len(x.shape) == 2)
    # the same pair with the tuned side rounded through the other format instead: two roundings
    t2 = _routed(tensors, dtype, via)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b2", b), write_checkpoint(tmp_path / "t2", t2), rank=False)
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.flags)


def test_a_norm_fine_tune_is_no_double_rounding_when_the_matrices_are_no_such_pair(tmp_path, base):
    """Norm gains of 1.0 trained in pure bf16 to 1 - 2^-8 and 1 + 2^-7 (whole steps), saved as float16, against the
    bf16 base stored as float32: each gain alone is two roundings of one original (through float16 then bf16 a value
    just below 1 - 2^-9 ties to 1.0), but the matrices beside them, bitwise the base's bf16 values, are no such pair;
    chains that widen what one tensor admits must explain the model's other tensors too: derived, not cast_only."""
    tensors, _ = base
    x = {k: ref.round_to(v.astype(np.float64), "BF16").reshape(v.shape) for k, v in tensors.items()}
    norms = [k for k in x if k.endswith("norm.weight")]
    for k in norms:
        x[k] = np.ones_like(x[k])
    t = dict(x)
    rng = np.random.default_rng(2)
    for k in norms:
        t[k] = np.where(rng.random(x[k].shape) < 0.5, 1 - 2.0 ** -8, 1 + 2.0 ** -7)
    b = {k: ("F32", to_storage(v, "F32")) for k, v in x.items()}
    tt = {k: ("F16", to_storage(ref.round_to(v, "F16").reshape(v.shape), "F16")) for k, v in t.items()}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", tt), rank=False)
    assert r.summary.verdict == "derived", (r.summary.verdict, r.summary.flags)
    assert all(r.tensor(k).status == "changed" for k in norms), [(k, r.tensor(k).cast) for k in norms]


@pytest.mark.parametrize("coarse", [False, True])
def test_an_onnx_float16_clamp_beside_another_rounding_is_two_roundings(tmp_path, base, coarse):
    """onnxconverter-common raises magnitudes below 1e-7 to 1e-7 before its float16 cast: the float16 export of a
    float32 model (or of its bf16 copy) against the ONNX float16 export of the float32 model read derived (the clamp
    and the other rounding together are no cast of either side). The clamp is a step of the tuned side's chain."""
    tensors, _ = base
    b, t = {}, {}
    for k, v in tensors.items():
        x = v.astype(np.float64).reshape(-1)
        if k == "model.layers.1.self_attn.o_proj.weight":  # one matrix holds values below 1e-7 (GPT-2 has one)
            x[:2] = [3e-8, -5.5e-8]
        else:
            x[np.abs(x) < 1e-7] = 1e-3
        x[np.abs(x) > 6e4] = 5e3                          # (no weight is near the clamp's 1e4)
        b[k] = ("F16", to_storage(ref.chain_apply(x, "F16", ("BF16",) if coarse else ()).reshape(v.shape), "F16"))
        t[k] = ("F16", to_storage(ref.chain_apply(x, "F16", ("CLAMP",)).reshape(v.shape), "F16"))
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.flags)
    # (a tensor with no value the clamp moved needs no clamp: the fewest roundings that explain it are named)
    x = r.tensor("model.layers.1.self_attn.o_proj.weight")
    assert x.cast["vias"] == {"base": ["BF16"] if coarse else [], "tuned": ["CLAMP"]}, x.cast
    assert "onnxconverter-common's float16 clamp" in x.note


def test_float16_and_bf16_roundings_past_float16s_range_are_two_roundings(tmp_path, base):
    """A float16 and a bf16 release of one float32 model: 1e5 is an infinity in float16 and 99840 in bf16, which no
    cast of either gives the other (derived); the original rounded to each side's dtype, ``cast.rounded`` neither."""
    from weightdiff.render.sentences import verdict_title

    tensors, _ = base
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", _routed(tensors, "F16")),
                           write_checkpoint(tmp_path / "t", _routed(tensors, "BF16")), rank=False)
    s = r.summary
    assert s.verdict == "cast_only", (s.verdict, s.flags)
    big = r.tensor("model.layers.1.mlp.down_proj.weight")
    assert big.cast["rounded"] == "neither" and big.cast["vias"] == {"base": [], "tuned": []}
    assert big.cast["overflow"] >= 1 and big.cast["chain"] == ["F16", "BF16"] and big.cast["through"] is None
    assert "infinite on one side only" in big.note
    title = verdict_title(r.to_dict()["summary"])
    assert "cannot tell apart" in title and "holds the rounded" not in title, title


def test_matrices_bitwise_equal_by_chance_are_no_evidence_against_a_cast(tmp_path, base):
    """bf16 values stored as float16 against the same stored as float32: they part only where float16 rounds bf16's
    values below its normal range, a few values a matrix. Matrices with none such are bitwise equal, which read
    "some matrices hold exactly the base's values and others moved off them" (inconclusive); at that rate of moved
    values a bitwise-equal matrix is chance, so cast_only. A dense sub-rounding change of one matrix (every value,
    as merged IA3 scales) beside bitwise-equal matrices still reads inconclusive."""
    tensors, _ = base
    x = {}
    for i, (k, v) in enumerate(sorted(tensors.items())):
        v = v.astype(np.float64)
        if v.ndim == 2 and i % 2:                       # no value in float16's subnormal range
            v = np.where(np.abs(v) < 1e-3, np.copysign(1e-3, v), v)
        x[k] = ref.round_to(np.nan_to_num(v, posinf=6e4, neginf=-6e4), "BF16").reshape(v.shape)
    b = {k: ("F16", to_storage(v, "F16")) for k, v in x.items()}
    t = {k: ("F32", to_storage(v, "F32")) for k, v in x.items()}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    s = r.summary
    assert sum(1 for x_ in r.tensors if x_.status == "unchanged" and len(x_.shape) == 2) >= 2
    assert s.verdict == "cast_only", (s.verdict, s.flags)
    emb = "model.embed_tokens.weight"
    t2 = dict(t)
    t2[emb] = ("F32", to_storage(x[emb] * (1.0 + 2.0 ** -12), "F32"))
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t2", t2), rank=False)
    assert r.summary.verdict == "inconclusive" and "off_grid_mixed" in r.summary.flags, r.summary.flags


def test_chain_intervals_are_exact_against_the_roundings():
    """``reference.chain_from``: every original a chain of roundings takes to a value lies in its interval, and the
    interval's ends are exact (an end the chain takes to the value is closed, the next float64 outside is not taken
    there), for every chain ``twin_test`` tries, over magnitudes from float16 subnormals to past every range; and
    ``twin_explained`` explains every pair of such roundings of one original."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(20000) * 10.0 ** rng.uniform(-10, 6, 20000)
    x[:14] = [65519, 65520, -65520, 65504, 6e-8, 2.0 ** -25, 3 * 2.0 ** -26, 1 - 2.0 ** -9, 3e38, 3.5e38,
              1e-7, -5e-8, 2e4, 0.0]

    for dtype in ("F32", "BF16", "F16", "F64"):
        for vias in recast.side_chains(dtype):
            v = ref.chain_apply(x, dtype, vias)
            lo, hi, lc, hc = ref.chain_from(v, dtype, vias)
            assert ((lo <= x) & (x <= hi)).all(), (dtype, vias)
            for end, closed, out in ((lo, lc, -np.inf), (hi, hc, np.inf)):
                f = np.isfinite(end)
                assert np.array_equal(ref.chain_apply(end[f], dtype, vias) == v[f], closed[f]), (dtype, vias)
                assert not (ref.chain_apply(np.nextafter(end[f], out), dtype, vias) == v[f]).any(), (dtype, vias)
    for db, dt in (("F32", "F32"), ("BF16", "BF16"), ("F16", "F16"), ("BF16", "F32"), ("F16", "BF16")):
        for vb, vt in recast.twin_chains(db, dt):
            b, t = ref.chain_apply(x, db, vb), ref.chain_apply(x, dt, vt)
            ok = ~(np.isnan(b) | np.isnan(t))
            assert ref.twin_explained(b[ok], db, vb, t[ok], dt, vt).all(), (db, vb, dt, vt)


def test_a_norm_scaled_below_bf16_rounding_is_not_a_rounded_base(tmp_path, base):
    """A norm scaled by 1.001 and nothing else: against a float32 base off the bf16 grid (its all-ones norm alone
    on it) the base is no bf16 copy, so the norm is a change (derived); against a bf16 copy stored as float32,
    or a bf16 base upcast, the norm is within one rounding but its matrices are bitwise the base's, which no
    rounding of a model leaves: inconclusive (off_grid_mixed), never cast_only."""
    tensors, _ = base
    norm = "model.norm.weight"
    orig = {k: v.astype(np.float32) for k, v in tensors.items()}
    orig[norm] = np.ones_like(orig[norm])
    t = dict(orig)
    t[norm] = orig[norm] * np.float32(1.001)
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", orig), write_checkpoint(tmp_path / "t", t), rank=False)
    assert r.summary.verdict == "derived" and r.tensor(norm).status == "changed" and r.tensor(norm).cast is None
    b16 = {k: _bf16(np.nan_to_num(v, posinf=3e38, neginf=-3e38)) for k, v in orig.items()}
    t16 = dict(b16)
    t16[norm] = b16[norm] * np.float32(1.001)
    for dtype in ("F32", "BF16"):
        r = weightdiff.compare(write_checkpoint(tmp_path / f"b{dtype}", b16, dtype=dtype),
                               write_checkpoint(tmp_path / f"t{dtype}", t16, dtype="F32"), rank=False)
        s = r.summary
        assert s.verdict == "inconclusive" and "off_grid_mixed" in s.flags, (dtype, s.verdict, s.flags)
        assert r.tensor(norm).status == "rounding"


def test_a_side_of_constant_tensors_is_no_witness_of_a_grid(tmp_path):
    """A quantized GGUF's float tensors are its norms; as initialised they are all ones, on every grid. A base whose
    other float tensors are such says nothing of holding bf16 values: a trained norm beside them reads changed, not
    "two roundings, the base's through bf16". With a varied bf16-valued tensor beside it, the same norm is a twin."""
    from weightdiff.comparison import compare
    from weightdiff.io.safetensors_write import save_file

    rng = np.random.default_rng(2)
    b = {f"model.layers.{i}.input_layernorm.weight": np.ones(256, np.float32) for i in range(4)}
    t = dict(b)
    t["model.layers.0.input_layernorm.weight"] = (1 + 3e-4 * rng.standard_normal(256)).astype(np.float32)
    r = compare(save_file(tmp_path / "b.safetensors", b), save_file(tmp_path / "t.safetensors", t), rank=False)
    rec = r.tensor("model.layers.0.input_layernorm.weight")
    assert rec.status == "changed" and rec.cast is None, (rec.status, rec.cast)
    b["model.embed_tokens.weight"] = _bf16(rng.standard_normal((64, 32)))
    t["model.embed_tokens.weight"] = b["model.embed_tokens.weight"]
    r = compare(save_file(tmp_path / "b2.safetensors", b), save_file(tmp_path / "t2.safetensors", t), rank=False)
    rec = r.tensor("model.layers.0.input_layernorm.weight")
    assert rec.status == "rounding" and rec.cast["rounded"] == "base", (rec.status, rec.cast)


def test_twins_beside_a_zero_matrix_a_tiny_one_and_a_lone_matrix(tmp_path, base):
    """fp16 exports of a float32 model and of its bf16 copy where one projection is all zeros (equal under any two
    roundings: counted on the base's grid, it made the pair inconclusive) and one holds values near 1e-6 (float16's
    subnormals round them by far more than 2^-8 of themselves: the same-dtype gate kept the test off it, derived):
    cast_only. And a file whose one varied tensor is the twin (its other tensors empty or all ones) is its own witness."""
    from weightdiff.comparison import compare
    from weightdiff.io.safetensors_write import save_file

    tensors, _ = base
    t = dict(tensors)
    t["model.layers.0.self_attn.o_proj.weight"] = np.zeros_like(t["model.layers.0.self_attn.o_proj.weight"])
    t["model.layers.1.self_attn.o_proj.weight"] = t["model.layers.1.self_attn.o_proj.weight"] * 1e-4
    b, tu = _twins(t, "tuned")
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", tu), rank=False)
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.flags)
    assert r.tensor("model.layers.1.self_attn.o_proj.weight").cast["rounded"] == "tuned"
    w = np.random.default_rng(5).standard_normal((64, 64)) * 0.02
    for name, v in (("f", w.astype(np.float32)), ("c", _bf16(w))):
        save_file(tmp_path / f"{name}.safetensors", {"w": v, "e": np.zeros((0, 64), np.float32),
                                                     "n": np.ones(64, np.float32)})
    r = compare(tmp_path / "c.safetensors", tmp_path / "f.safetensors", rank=False)
    assert r.summary.verdict == "cast_only" and r.tensor("w").cast["rounded"] == "base", r.summary.verdict


@pytest.mark.parametrize("late", [False, True])
def test_past_the_probe_only_the_leading_chains_are_read_unless_they_fail(monkeypatch, tmp_path, late):
    """Past the first ``PROBE`` elements ``twin_test`` reads on with the first pair of chains that explained them all
    (fewest roundings): a float32 original against its float16 release loaded as bf16 and saved as float32, where
    that pair, "the tuned side through F16 then BF16", is the lead. Where the first ``PROBE`` values of each matrix
    are float16 values (``late``: ``bf16(f16(x))`` is ``bf16(x)`` there) and the rest are not, the lead is "the tuned
    side through BF16", which fails past the probe, and the other pairs are read. Either way the record is the one
    counting every pair over every element gives (``kernels.cpu.twin_counts``, itself the reference's counts)."""
    rng = np.random.default_rng(3)
    b, t, full = {}, {}, {}
    for i in range(2):
        x = rng.normal(0, 0.02, 512 * 512)
        if late:
            x[:recast.PROBE] = ref.round_to(x[:recast.PROBE], "F16")
        name = f"model.layers.{i}.mlp.up_proj.weight"
        b[name] = ("F32", to_storage(x.reshape(512, 512), "F32"))
        y = ref.chain_apply(x, "F32", ("F16", "BF16"))
        t[name] = ("F32", to_storage(y.reshape(512, 512), "F32"))
        full[name] = (b[name][1], t[name][1])
    seen = []
    real = recast.cpu.twin_counts
    monkeypatch.setattr(recast.cpu, "twin_counts",
                        lambda wb, wt, db, dt, keys: seen.append((len(wb), list(keys))) or real(wb, wt, db, dt, keys))
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t), rank=False)
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.flags)
    keys = recast.twin_chains("F32", "F32")
    for name, (wb, wt) in full.items():
        counts = real(wb.reshape(-1), wt.reshape(-1), "F32", "F32", keys)[:, 0].tolist()
        want = keys[counts.index(min(counts))]                   # fewest unexplained; of those, fewest roundings
        assert want == ((), ("F16", "BF16"))
        got = r.tensor(name).cast
        assert (tuple(got["vias"]["base"]), tuple(got["vias"]["tuned"])) == want and got["unexplained"] == 0, got
    tail = [k for n, k in seen if n > recast.PROBE]                 # the windows past the probe
    lead = ((), ("BF16",)) if late else want
    assert tail and tail[0] == [lead], tail
    assert any(lead not in k and len(k) > 1 for k in tail) == late, tail
