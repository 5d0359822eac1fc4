"""The reference scale: cast-rounding floors measured from the base's own weights, and the
unrelated level derived from the norms, each checked against the real thing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.measure.floors import SAMPLE, FloorAccumulator
from weightdiff.render.reference import reference_scale


def _points(data: dict) -> dict:
    return {p["key"]: p for p in data["reference"]["points"]}


@pytest.fixture(scope="module")
def fp32_base(tmp_path_factory):
    rng = np.random.default_rng(7)
    tensors = llama(rng, layers=2, hidden=128, inter=256)
    root = tmp_path_factory.mktemp("ref")
    return tensors, root, write_checkpoint(root / "base", tensors, dtype="F32")


@pytest.mark.parametrize("cast", ["BF16", "F16"])
def test_cast_floor_predicts_the_change_a_real_cast_makes(fp32_base, cast):
    tensors, root, base = fp32_base
    tuned = write_checkpoint(root / f"tuned_{cast}", tensors, dtype=cast)
    data = compare(base, tuned, rank=False).to_dict()
    pts = _points(data)
    measured = data["summary"]["relatedness_rel_change"]           # the large matrices, as the scale uses
    assert pts["model"]["rel_change"] == pytest.approx(measured, rel=1e-9)
    # the floor is the expected change of rounding weights of these magnitudes: a real cast reads it
    assert pts[cast]["rel_change"] == pytest.approx(measured, rel=0.03)
    assert pts[cast]["one_minus_cosine"] == pytest.approx(pts["model"]["one_minus_cosine"], rel=0.06)
    assert pts["F16"]["rel_change"] < pts["BF16"]["rel_change"] / 6      # three more mantissa bits


def test_unrelated_level_from_the_norms_matches_independent_inits(tmp_path):
    a = llama(np.random.default_rng(1), layers=2, hidden=128, inter=256)
    b = {k: v * (1.3 if v.ndim == 2 else 1.0) for k, v in llama(np.random.default_rng(2), layers=2, hidden=128,
                                                                 inter=256).items()}
    data = compare(write_checkpoint(tmp_path / "a", a, dtype="F32"), write_checkpoint(tmp_path / "b", b, dtype="F32"),
                   rank=False).to_dict()
    assert data["summary"]["verdict"] == "unrelated"
    pts = _points(data)
    # what two independently initialised models really read, against the level derived from norms alone
    assert pts["model"]["rel_change"] == pytest.approx(pts["unrelated"]["rel_change"], rel=0.01)
    assert pts["model"]["one_minus_cosine"] == pytest.approx(1.0, abs=0.02)
    assert pts["unrelated"]["rel_change"] == pytest.approx(math.sqrt(1 + 1.3 ** 2), rel=0.02)


def test_floor_accumulator_by_hand_and_sampling():
    acc = FloorAccumulator()
    acc.add(np.array([1.0, -3.0, 0.0, 70000.0], dtype=np.float32), "F32")
    r = acc.result()
    # 1.0: exponent 0; -3.0: exponent 1; 0 contributes nothing; 70000 overflows fp16
    assert r["BF16"] ** 2 == pytest.approx((2.0 ** -14 + 2.0 ** -12 + 2.0 ** (2 * (16 - 7))) / 12)
    assert r["F16"] ** 2 == pytest.approx((2.0 ** -20 + 2.0 ** -18) / 12)
    assert r["F16_overflow"] == 1
    x = np.random.default_rng(0).normal(0, 0.02, 4 * SAMPLE + 3).astype(np.float32)
    full, sampled = FloorAccumulator(), FloorAccumulator()
    for i in range(0, x.size, SAMPLE // 2):           # windows below the sample size: every element
        full.add(x[i:i + SAMPLE // 2], "F32")
    sampled.add(x, "F32")                              # one window: a strided sample of it
    assert sampled.result()["BF16"] == pytest.approx(full.result()["BF16"], rel=0.01)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    same = FloorAccumulator()
    same.add(bf16, "BF16")
    assert same.result()["BF16"] == pytest.approx(sampled.result()["BF16"], rel=0.01)


def test_scale_from_rows_and_old_json_without_floors():
    rows = [{"status": "changed", "compared": "float", "cosine": 0.9, "module": "attn.q", "shape": [64, 64],
             "numel": 4096, "numel_compared": 4096, "norm_base": 2.0, "norm_tuned": 2.0, "norm_delta": 0.2},
            {"status": "changed", "compared": "float", "cosine": 0.9, "module": "norm", "shape": [64],
             "numel": 64, "numel_compared": 64, "norm_base": 8.0, "norm_tuned": 8.0, "norm_delta": 1.0}]
    s = reference_scale({"tensors": rows, "settings": {"thresholds": {"large_matrix_numel": 1024}}})
    keys = [p["key"] for p in s["points"]]
    assert keys == ["model", "unrelated"] and s["matrices"] == 1      # norm gains never count
    assert s["points"][0]["rel_change"] == pytest.approx(0.1)
    assert s["points"][1]["rel_change"] == pytest.approx(math.sqrt(2))
    assert reference_scale({"tensors": []})["points"] == []


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64", "F8_E4M3", "I8", "U8"])
def test_small_floors_equal_one_accumulator_per_array(dtype):
    """The batched floors of many small tensors are the bits of one ``FloorAccumulator`` each,
    with zeros, subnormals, non-finite values, overflows, empty and all-zero arrays among them."""
    from kernel_cases import make_pair

    from weightdiff.measure.floors import small_floors

    rng = np.random.default_rng(3)
    arrays = [make_pair(rng, n, dtype, dtype)[0] for n in (1, 5, 0, 300, 4096, 17, 2, SAMPLE)]
    arrays.append(np.zeros(9, arrays[0].dtype))
    wide = (rng.standard_normal(64) * np.exp2(rng.integers(-140, 140, 64))).astype(np.float64)
    if dtype in ("F32", "F64"):
        arrays.append(wide.astype(arrays[0].dtype))      # bins far apart: the sums must still agree
    got = small_floors(arrays, dtype)
    for a, g in zip(arrays, got):
        acc = FloorAccumulator()
        acc.add(a, dtype)
        assert g == acc.result() and [type(v) for v in g.values()] == [float, float, int]
    with pytest.raises(ValueError):
        small_floors([np.zeros(SAMPLE + 1, np.float32)], "F32")


def test_a_tied_head_row_is_left_out_of_the_scale_as_out_of_the_summary(tmp_path):
    """The tuned model ties its head; the tied row (its embedding against the base head) is not
    evidence, so the memo's "this model" point must agree with summary.relatedness_* (it read
    a rel change of 1.4 beside "none of its own weights changed")."""
    tensors = llama(np.random.default_rng(3), layers=2, hidden=128, inter=256)
    tuned = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    data = compare(write_checkpoint(tmp_path / "b", tensors), write_checkpoint(tmp_path / "t", tuned),
                   rank=False).to_dict()
    assert any(t.get("tied") for t in data["tensors"])
    assert _points(data)["model"]["rel_change"] == pytest.approx(data["summary"]["relatedness_rel_change"], abs=1e-12)
    assert _points(data)["model"]["one_minus_cosine"] == pytest.approx(0.0, abs=1e-12)
