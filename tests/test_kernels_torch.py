"""The torch backend on device "cpu": parity with the numba kernels and the reference.

The same code runs on CUDA; benchmarks/gpu_check.py repeats these checks on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from weightdiff.kernels import cpu, cuda, reference as ref  # noqa: E402
from weightdiff.kernels.reference import IDX  # noqa: E402

from kernel_cases import PAIRS, assert_stats_close, make_pair  # noqa: E402

LENGTHS = [0, 1, cpu.CHUNK + 1, 3 * cpu.CHUNK]


@pytest.mark.parametrize("db,dt", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_torch_matches_numba_and_reference(db, dt):
    rng = np.random.default_rng(abs(hash((dt, db))) % 2**32)
    for n in LENGTHS:
        b, t = make_pair(rng, n, db, dt)
        got = cuda.delta_stats(b, t, db, dt, device="cpu")
        assert_stats_close(got, ref.delta_stats(b, t, db, dt))
        assert_stats_close(got, cpu.delta_stats(b, t, db, dt))


def test_pieces_and_tensor_inputs(rng, monkeypatch):
    b, t = make_pair(rng, 10_000, "BF16", "BF16")
    want = cuda.delta_stats(b, t, "BF16", "BF16", device="cpu")
    monkeypatch.setattr(cuda, "PIECE", 999)          # many pieces, combined in order
    assert_stats_close(cuda.delta_stats(b, t, "BF16", "BF16", device="cpu"), want)
    tb = torch.from_numpy(b.view(np.int16).copy())
    tt = torch.from_numpy(t.view(np.int16).copy())
    assert_stats_close(cuda.delta_stats(tb, tt, "BF16", "BF16", device="cpu"), want)
    assert_stats_close(cuda.delta_stats(tb.view(torch.bfloat16), tt.view(torch.bfloat16), "BF16", "BF16",
                                        device="cpu"), want)


def test_unsigned_and_bool_decode(rng):
    for dtype in ("U16", "U32", "U64", "BOOL", "I8"):
        b, t = make_pair(rng, 5000, dtype, dtype)
        assert_stats_close(cuda.delta_stats(b, t, dtype, dtype, device="cpu"), ref.delta_stats(b, t, dtype, dtype))


@pytest.mark.parametrize("db,dt", [("BF16", "BF16"), ("F32", "BF16"), ("F16", "F8_E4M3"), ("F64", "F64")])
def test_delta_and_sigma(db, dt, rng):
    b, t = make_pair(rng, 7000, db, dt)
    want = np.empty(7000, np.float32)
    ref.decode_delta_f32(b, t, db, dt, want)
    got = np.empty(7000, np.float32)
    cuda.decode_delta_f32(b, t, db, dt, got, device="cpu")
    np.testing.assert_array_equal(got, want)
    gt = torch.empty(7000)
    cuda.decode_delta_f32(b, t, db, dt, gt, device="cpu")
    np.testing.assert_array_equal(gt.numpy(), want)
    np.testing.assert_allclose(cuda.rounding_sigma2(t, dt, device="cpu"), ref.rounding_sigma2(t, dt), rtol=1e-12)


def test_stream_helper_on_cpu(rng):
    wins = [make_pair(rng, n, "BF16", "F32") for n in (0, 5, 70_000)]
    got = list(cuda.stream_delta_stats(((b, t, "BF16", "F32") for b, t in wins), device="cpu"))
    assert len(got) == 3
    for (b, t), g in zip(wins, got):
        assert_stats_close(g, ref.delta_stats(b, t, "BF16", "F32"))


def test_bytes_stats_and_errors(rng):
    c = rng.integers(0, 256, 100, dtype=np.uint8)
    d = c.copy()
    d[5] ^= 4
    assert cuda.bytes_stats(torch.from_numpy(c), d)[IDX["n_changed"]] == 1
    with pytest.raises(ValueError, match="elements"):
        cuda.delta_stats(np.zeros(2, np.float32), np.zeros(3, np.float32), "F32", "F32", device="cpu")
    with pytest.raises(ValueError, match="bytes_stats"):
        cuda.delta_stats(np.zeros(2, np.uint8), np.zeros(2, np.uint8), "F4", "F4", device="cpu")


def test_require_device():
    from weightdiff.errors import OptionsError

    cuda.require_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionsError, match="sees no CUDA device"):
            cuda.require_device("cuda")
