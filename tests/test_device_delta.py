"""The torch backend keeps a changed matrix's delta on the device during the stats pass
(``kernels.cuda.DeviceDelta``) and takes its rank there: no second read of the checkpoint, no
host copy of the delta. Run here on torch's cpu device against the numpy references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_checkpoint
from weightdiff.io.safetensors_write import to_storage
from weightdiff.measure import rank

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtypes", [("BF16", "BF16"), ("F16", "F32"), ("F32", "BF16"), ("F64", "F64"),
                                     ("F8_E4M3", "BF16")])
@pytest.mark.parametrize("float64", [True, False])
def test_device_delta_matches_the_host_decode_and_noise_profile(dtypes, float64, monkeypatch):
    """Windows of odd sizes (rows split across windows, a window inside one row, pieces smaller than a
    window) give the host's float32 delta (float64: the exact difference) and its noise profile."""
    from weightdiff.kernels import cuda
    from weightdiff.measure.rank_stream import _decoder

    monkeypatch.setattr(cuda, "PIECE", 37)
    rng = np.random.default_rng(1)
    m, n = 23, 19
    db, dt = dtypes
    x = rng.normal(0, 0.05, (m, n))
    y = x + rng.normal(0, 1e-3, (m, n))
    x[3, 4], y[5, 6] = np.nan, np.inf            # non-finite on one side: 0 in the delta
    b, t = to_storage(x.astype(np.float32), db), to_storage(y.astype(np.float32), dt)
    tables = [rank._variance_table(d) for d in dtypes]
    dd = cuda.DeviceDelta((m, n), db, dt, tables, "cpu", float64=float64)
    flat_b, flat_t = b.reshape(-1), t.reshape(-1)
    pos = 0
    for size in (5, 19, 1, 40, 100, m * n):      # the last one is cut at the end
        dd.add(flat_b[pos:pos + size], flat_t[pos:pos + size])
        pos = min(pos + size, m * n)
        if pos == m * n:
            break
    got = dd.matrix().numpy()
    dec64, dec32 = _decoder()
    want = np.empty(m * n, np.float64 if float64 else np.float32)
    (dec64 if float64 else dec32)(flat_b, flat_t, db, dt, want)
    np.testing.assert_array_equal(got.reshape(-1), want)
    rows, cols = dd.profile()
    rb, cb = rank.noise_profile(b, db, (m, n))
    rt, ct = rank.noise_profile(t, dt, (m, n))
    np.testing.assert_allclose(rows, rb + rt, rtol=1e-13)
    np.testing.assert_allclose(cols, cb + ct, rtol=1e-13)
    with pytest.raises(ValueError, match="past the matrix"):
        dd.add(flat_b[:1], flat_t[:1])


def test_device_delta_refuses_a_short_feed():
    from weightdiff.kernels import cuda

    dd = cuda.DeviceDelta((4, 4), "F32", "F32", [None, None], "cpu")
    dd.add(np.zeros(5, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="fed 5 of 16"):
        dd.matrix()


def _pair(tmp_path, rng):
    """A bf16 pair: a rank-6 change, a dense one, a wide matrix, a bias, an unchanged matrix."""
    base = {"a.weight": rng.normal(0, 0.02, (300, 160)), "b.weight": rng.normal(0, 0.02, (96, 700)),
            "c.weight": rng.normal(0, 0.02, (64, 64)), "d.bias": rng.normal(0, 0.02, (300,)),
            "e.weight": rng.normal(0, 0.02, (120, 90))}
    tuned = dict(base)
    tuned["a.weight"] = base["a.weight"] + rng.normal(0, 1e-2, (300, 6)) @ rng.normal(0, 1e-2, (6, 160))
    tuned["b.weight"] = base["b.weight"] + rng.normal(0, 3e-3, (96, 700))
    tuned["c.weight"] = base["c.weight"] + rng.normal(0, 3e-3, (64, 64))
    tuned["d.bias"] = base["d.bias"] + 1e-2
    f32 = lambda d: {k: v.astype(np.float32) for k, v in d.items()}
    write_checkpoint(tmp_path / "b", f32(base), dtype="BF16")
    write_checkpoint(tmp_path / "t", f32(tuned), dtype="BF16")
    return tmp_path / "b", tmp_path / "t"


def _torch_on_cpu(monkeypatch):
    from weightdiff.kernels import cuda
    from weightdiff.measure import backend

    monkeypatch.setitem(backend.BACKENDS, "cuda", lambda threads: backend.Backend("cuda", cuda, "cpu"))


def test_torch_backend_ranks_from_the_kept_delta_without_a_second_read(tmp_path, monkeypatch):
    """Every changed matrix's rank comes from the delta kept during the stats pass (the rank pass never
    reads it again) and agrees with the numba path: same numerical ranks, spectra within float32."""
    from weightdiff import compare
    from weightdiff.measure import compute

    rng = np.random.default_rng(2)
    b, t = _pair(tmp_path, rng)
    cpu = json.loads(compare(b, t, seed=3).to_json(include_run=False))
    _torch_on_cpu(monkeypatch)
    monkeypatch.setattr(compute, "_analyze", lambda *a, **k: pytest.fail("the rank pass read the matrix again"))
    got = json.loads(compare(b, t, device="cuda", seed=3).to_json(include_run=False))
    ranked = 0
    for x, y in zip(got["tensors"], cpu["tensors"]):
        assert (x["name"], x["status"]) == (y["name"], y["status"])
        if y.get("rank"):
            ranked += 1
            rx, ry = x["rank"], y["rank"]
            assert rx["numerical_rank"] == ry["numerical_rank"] and rx["method"] == ry["method"]
            np.testing.assert_allclose(rx["spectrum"], ry["spectrum"], rtol=1e-5)
            assert rx["noise_floor"] == pytest.approx(ry["noise_floor"], rel=1e-12)
            assert not rx["bounds"]
    assert ranked == 3
    assert got["summary"]["verdict"] == cpu["summary"]["verdict"]
    by = {x["name"]: x for x in got["tensors"]}
    assert by["a.weight"]["rank"]["numerical_rank"] == 6


def test_the_kept_delta_is_dropped_when_the_device_lacks_room(tmp_path, monkeypatch):
    """No room on the device: the matrix is read again for its rank, with the same result."""
    from weightdiff import compare
    from weightdiff.measure import compute

    rng = np.random.default_rng(4)
    b, t = _pair(tmp_path, rng)
    _torch_on_cpu(monkeypatch)
    kept = json.loads(compare(b, t, device="cuda").to_json(include_run=False))
    calls = []
    real = compute._analyze
    monkeypatch.setattr(compute, "_analyze", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(compute, "DEVICE_KEEP_CPU_BYTES", 0)
    reread = json.loads(compare(b, t, device="cuda").to_json(include_run=False))
    assert len(calls) == 3
    for x, y in zip(kept["tensors"], reread["tensors"]):
        if y.get("rank"):
            assert x["rank"]["numerical_rank"] == y["rank"]["numerical_rank"]
            np.testing.assert_allclose(x["rank"]["spectrum"], y["rank"]["spectrum"], rtol=1e-5)
