"""The rank of a float64 pair's change counts directions above the noise of the numbers its spectrum is taken of.

Every rank path takes the spectrum of a float32 copy of the delta (the streamed Gram of a tall matrix aside). The
difference of two 16-bit or float32 weights of similar size is exact in float32, but of two float64 weights it is
rounded, by 2^-24 of each difference, where the stored values' own rounding, the noise floor, is 2^-53 of each
value: a rank-2 update merged into a float64 matrix read numerical rank min(m, n), form "dense". The copy's rounding
is now in the floor (``rank.copy_noise``, ``extra.note_copy``) on the direct path, the streamed wide Gram and the
device's float32 delta."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_checkpoint
from test_rank import low_rank
from weightdiff.measure import rank
from weightdiff.measure.rank_stream import DeltaGram


def f64_pair(rng, m: int, n: int, r: int, share: float = 0.1):
    """(base, tuned, norm_delta_sq): float64 N(0, 0.02) and the base plus a rank-r update, merged in float64."""
    w = rng.normal(0.0, 0.02, (m, n))
    t = w + low_rank(rng, m, n, r, share * np.linalg.norm(w))
    d = t - w
    return w, t, float(np.sum(d * d))


@pytest.mark.parametrize("exact_max", [4096, 0])        # the full spectrum, or the randomized top k
def test_a_rank_8_update_of_a_float64_matrix_reads_8(rng, exact_max):
    b, t, nd2 = f64_pair(rng, 512, 384, 8)
    rec = rank.analyze_delta(b, t, "F64", "F64", (512, 384), nd2, exact_max=exact_max)
    assert rec.numerical_rank == 8 and "numerical_rank" not in rec.bounds, (rec.numerical_rank, rec.bounds)
    assert rec.extra["note_copy"] == rank.COPY_NOTE
    assert rec.spectrum[7] > 1.5 * rec.noise_floor > rec.spectrum[8]
    # the floor is the copy's rounding, far above the float64 values' own (2^-53 of 0.02-sized weights)
    rb, cb = rank.noise_profile(b, "F64", (512, 384))
    rt, ct = rank.noise_profile(t, "F64", (512, 384))
    assert rec.noise_floor > 1e6 * rank.noise_floor(rb + rt, cb + ct)[0]


@pytest.mark.parametrize("dtypes", [("F32", "F32"), ("BF16", "BF16"), ("F16", "F32")])
def test_pairs_whose_float32_delta_is_exact_keep_their_floor(rng, dtypes):
    """16-bit and float32 sides: the floor is the stored values' rounding alone, as before."""
    from weightdiff.io.safetensors_write import to_storage

    w = rng.normal(0.0, 0.02, (96, 80)).astype(np.float32)
    b = to_storage(w, dtypes[0])
    t = to_storage(w + low_rank(rng, 96, 80, 3, 0.05 * np.linalg.norm(w)).astype(np.float32), dtypes[1])
    rec = rank.analyze_delta(b, t, *dtypes, (96, 80), float("nan"))
    rb, cb = rank.noise_profile(b, dtypes[0], (96, 80))
    rt, ct = rank.noise_profile(t, dtypes[1], (96, 80))
    assert rec.noise_floor == rank.noise_floor(rb + rt, cb + ct)[0]
    assert "note_copy" not in rec.extra and rec.numerical_rank == 3


def test_copy_noise_is_each_elements_float32_ulp_squared_over_12(rng):
    d = (rng.standard_normal((37, 11)) * np.geomspace(1e-6, 1.0, 11)).astype(np.float32)
    d[3, 4] = 0.0
    rows, cols = rank.copy_noise(d)
    v = np.array([[float(np.spacing(np.float32(abs(x)))) ** 2 / 12 for x in row] for row in d])
    np.testing.assert_allclose(rows, v.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(cols, v.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("keep", [1 << 30, 0])          # the wide float32 delta in memory, or spilled
def test_the_streamed_wide_gram_of_a_float64_pair_agrees_with_the_whole_matrix(rng, keep):
    m, n = 300, 700
    b, t, nd2 = f64_pair(rng, m, n, 8)
    want = rank.analyze_delta(b, t, "F64", "F64", (m, n), nd2, exact_max=4096)
    g = DeltaGram((m, n), "F64", "F64", keep_bytes=keep)
    g.activate()
    fb, ft = b.reshape(-1), t.reshape(-1)
    for p in range(0, fb.size, 50_001):                  # windows that cut rows anywhere
        g.feed(fb[p:p + 50_001], ft[p:p + 50_001], True)
    got = g.finish(nd2, 1.5, 64)
    assert want.numerical_rank == 8 and not want.bounds
    # the copy's rounding is under the floor, so 8 directions are certain; the certificate's error bound (the whole
    # copy error, in Frobenius norm) leaves the rest open, and compute.refine_rank takes the direct path for that
    # (it read a certified 300, "dense", with the float64 values' floor)
    assert got.numerical_rank == 8 and got.bounds["numerical_rank"][0] == 8, got.bounds
    assert got.noise_floor == pytest.approx(want.noise_floor, rel=1e-12)
    assert got.extra["note_copy"] == rank.COPY_NOTE


def test_the_devices_float32_delta_of_a_float64_pair_reads_the_same_rank(rng):
    torch = pytest.importorskip("torch")
    from weightdiff.kernels import cuda
    from weightdiff.measure import backend

    m, n = 200, 150
    b, t, nd2 = f64_pair(rng, m, n, 5)
    tables = [rank._variance_table("F64")] * 2
    want = rank.analyze_delta(b, t, "F64", "F64", (m, n), nd2)
    be = backend.Backend("cuda", cuda, "cpu")
    for float64 in (False, True):
        dd = cuda.DeviceDelta((m, n), "F64", "F64", tables, "cpu", float64=float64)
        dd.add(b.reshape(-1), t.reshape(-1))
        got = rank.analyze_device_delta(dd, nd2, backend=be)
        # float64 on the device: the SVD's own error (2^-53 of the largest value) read rank 12 above the stored
        # values' floor; at float32's resolution of the delta, as on the host, it reads 5 with the host's floor
        assert got.numerical_rank == 5, (float64, got.numerical_rank)
        assert got.extra["note_copy"] == rank.COPY_NOTE
        assert got.noise_floor == pytest.approx(want.noise_floor, rel=1e-9)
    assert torch is not None


def test_a_wide_float64_matrix_streamed_reads_its_rank_after_refining(tmp_path, rng):
    """300 x 1,000 (past the direct path's 2^18 elements, so its Gram streams): rank 8, exact, not 300."""
    from weightdiff import compare

    w, t, _ = f64_pair(rng, 300, 1000, 8)
    name = "model.layers.0.mlp.up_proj.weight"
    other = rng.normal(0, 0.02, (1000, 300))
    d = json.loads(compare(write_checkpoint(tmp_path / "b", {name: w, "model.layers.0.mlp.down_proj.weight": other}),
                           write_checkpoint(tmp_path / "t", {name: t, "model.layers.0.mlp.down_proj.weight": other}))
                   .to_json(include_run=False))
    (row,) = [x for x in d["tensors"] if x["name"] == name]
    assert row["rank"]["numerical_rank"] == 8 and not row["rank"]["bounds"], row["rank"]["bounds"]
    assert d["summary"]["form"]["kind"] == "low_rank"


def test_a_low_rank_update_merged_into_a_float64_model_is_not_dense(tmp_path, rng):
    """The whole run: a rank-2 update merged into two float64 matrices read form "dense", ranks 64 and 96."""
    from weightdiff import compare

    base, tuned = {}, {}
    for name, shape in (("model.layers.0.mlp.up_proj.weight", (96, 64)),
                        ("model.layers.0.mlp.down_proj.weight", (64, 96)),
                        ("model.layers.1.mlp.up_proj.weight", (96, 64))):
        w, t, _ = f64_pair(rng, *shape, 2)
        base[name], tuned[name] = w, (t if "layers.0" in name else w)
    d = json.loads(compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
                   .to_json(include_run=False))
    ranks = {x["name"]: x["rank"]["numerical_rank"] for x in d["tensors"] if x.get("rank")}
    assert ranks == {"model.layers.0.mlp.up_proj.weight": 2, "model.layers.0.mlp.down_proj.weight": 2}
    assert d["summary"]["verdict"] == "derived" and d["summary"]["form"]["kind"] == "low_rank"
