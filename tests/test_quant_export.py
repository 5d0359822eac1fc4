"""Dequantized exports: a float checkpoint whose rows lie on one uniform int8 grid each (an int8
ONNX export converted back to float) is recognised from sampled rows and judged against the
grid's own noise floor. The float values come from ONNX's own DequantizeLinear (the onnx
package's reference evaluator), per output channel, as an int8 export stores them."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from weightdiff import compare  # noqa: E402
from weightdiff.io.safetensors_write import to_storage  # noqa: E402
from weightdiff.kernels import quant_floor as QF  # noqa: E402

from conftest import write_checkpoint  # noqa: E402

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def onnx_int8_roundtrip(w: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8 (QuantizeLinear's rounding), then ONNX DequantizeLinear back to float32."""
    scale = (np.abs(w).max(1) / 127.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                                           numpy_helper.from_array(np.zeros(w.shape[0], np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {})[0]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(8)
    base = {n: (rng.standard_normal((128, 384)) * 0.05).astype(np.float32) for n in NAMES}
    tuned = {}
    for n, w in base.items():
        d = rng.standard_normal((128, 4)) @ rng.standard_normal((4, 384))
        tuned[n] = (w + 0.05 * np.linalg.norm(w) * d / np.linalg.norm(d)).astype(np.float32)
    return base, tuned


def test_rows_of_an_export_are_on_one_grid(weights):
    y = onnx_int8_roundtrip(weights[0][NAMES[0]])
    step, lo, hi, levels = QF.row_grids(y)
    assert np.all(np.isfinite(step)) and levels.max() <= 255


def test_export_of_the_base_is_quantized_only(tmp_path, weights):
    base, _ = weights
    b = write_checkpoint(tmp_path / "base", base)
    t = write_checkpoint(tmp_path / "export", {n: onnx_int8_roundtrip(w) for n, w in base.items()})
    r = compare(b, t, rank=False)
    assert r.summary.verdict == "quantized_only", r.summary.verdict_reason
    q = [x.quant for x in r.tensors]
    assert all(x["format"] == "dequantized" and x["scheme"].startswith("int8 grid per row") for x in q)
    assert all(x["within"] and x["test"] == "bound" for x in q)


def test_export_of_a_fine_tune_is_derived(tmp_path, weights):
    base, tuned = weights
    b = write_checkpoint(tmp_path / "base", base)
    t = write_checkpoint(tmp_path / "export", {n: onnx_int8_roundtrip(w) for n, w in tuned.items()})
    r = compare(b, t, rank=False)
    assert r.summary.verdict == "derived"
    assert all(x.quant is not None and not x.quant["within"] and x.quant["beyond_share"] > 0.01 for x in r.tensors)


def test_a_plain_fine_tune_is_not_taken_for_an_export(tmp_path, weights):
    base, tuned = weights
    r = compare(write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "t", tuned), rank=False)
    assert r.summary.verdict == "derived" and all(x.quant is None for x in r.tensors)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_gains_near_one_stored_narrower_are_no_export(tmp_path, weights, dtype):
    """bf16's values in [1, 2) are the multiples of 2^-7 (float16's of 2^-10): a 2-D tensor of gains near 1 cast to
    bf16 or float16 lies on a uniform grid of a few dozen levels per row, the dtype's own, and read QUANTIZED ONLY
    ("int5 grid per row") for a plain cast of the model. A grid no coarser than the dtype's spacing at the row's least
    value is no export: CAST ONLY, the gains `rounding`; an ONNX int8 export of a matrix beside them still is one."""
    base, _ = weights
    rng = np.random.default_rng(4)
    b = dict(base)
    b["model.layers.2.ls.weight"] = (1.0 + 0.05 * np.abs(rng.standard_normal((8, 128)))).astype(np.float32)
    cast = {n: (dtype, to_storage(w.astype(np.float64), dtype)) for n, w in b.items()}
    r = compare(write_checkpoint(tmp_path / "base", b), write_checkpoint(tmp_path / "cast", cast), rank=False)
    gains = r.tensor("model.layers.2.ls.weight")
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.verdict_reason)
    assert gains.status == "rounding" and gains.quant is None, (gains.status, gains.quant)
    cast[NAMES[1]] = (dtype, to_storage(onnx_int8_roundtrip(base[NAMES[1]]).astype(np.float64), dtype))
    r = compare(write_checkpoint(tmp_path / "base2", b), write_checkpoint(tmp_path / "export", cast), rank=False)
    assert r.tensor("model.layers.2.ls.weight").quant is None
    if dtype == "F16":                   # (bf16 blurs an int8 grid: the round-trip test's business, not this one)
        assert r.tensor(NAMES[1]).quant["format"] == "dequantized"


def test_a_matrix_in_a_dtypes_uniform_range_is_not_taken_for_an_export(tmp_path, weights):
    """Every float16 value below 2^-13 is a multiple of 2^-24: a matrix of values near 1e-6 (a layer scale, a
    zero-initialised projection barely trained) stored as float16 lies on a uniform grid of a hundred levels per row,
    float16's own. Against its float32 original it read QUANTIZED ONLY for a plain cast; a grid no coarser than the
    dtype's smallest spacing is no export. A real int8 export of such a matrix beside it still reads as one."""
    base, _ = weights
    b = dict(base)
    b["model.layers.2.mlp.up_proj.weight"] = base[NAMES[0]] * np.float32(1e-6 / 0.05)
    t = {n: ("F16", w.astype(np.float16)) for n, w in b.items()}
    r = compare(write_checkpoint(tmp_path / "base", b), write_checkpoint(tmp_path / "f16", t), rank=False)
    tiny = r.tensor("model.layers.2.mlp.up_proj.weight")
    steps = QF.row_grids(t["model.layers.2.mlp.up_proj.weight"][1][:8].astype(np.float64))[0]
    assert np.isfinite(steps).all() and np.allclose(steps, 2.0 ** -24)          # float16's own grid, sampled
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.verdict_reason)
    assert tiny.status == "rounding" and tiny.quant is None, (tiny.status, tiny.quant)
    # and float16's grid held in float32 (a float16 release upcast): the tuned side through F16
    up = {n: ("F32", w.astype(np.float16).astype(np.float32)) for n, w in b.items()}
    r = compare(write_checkpoint(tmp_path / "base1", b), write_checkpoint(tmp_path / "up", up), rank=False)
    tiny = r.tensor("model.layers.2.mlp.up_proj.weight")
    assert r.summary.verdict == "cast_only" and tiny.status == "rounding" and tiny.quant is None, (tiny.status, tiny.quant)
    e = dict(t)
    e[NAMES[1]] = ("F16", onnx_int8_roundtrip(base[NAMES[1]]).astype(np.float16))
    r = compare(write_checkpoint(tmp_path / "base2", b), write_checkpoint(tmp_path / "export", e), rank=False)
    assert r.tensor(NAMES[1]).quant["format"] == "dequantized" and r.tensor("model.layers.2.mlp.up_proj.weight").quant is None
