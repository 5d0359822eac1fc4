"""The torch backend on device "cpu": parity with the numba kernels and the reference.

The same code runs on CUDA; benchmarks/gpu_check.py repeats these checks on a GPU.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from weightdiff.kernels import cpu, cuda, cuda_stream, reference as ref  # noqa: E402
from weightdiff.kernels.reference import IDX  # noqa: E402

from kernel_cases import PAIRS, assert_stats_close, make_pair  # noqa: E402

LENGTHS = [0, 1, cpu.CHUNK + 1, 3 * cpu.CHUNK]


@pytest.mark.parametrize("db,dt", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_torch_matches_numba_and_reference(db, dt):
    rng = np.random.default_rng(zlib.crc32(f"{db}-{dt}".encode()))   # str hash() is salted per process
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
    cuda.require_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(cuda.DeviceUnavailable, match="sees no CUDA device"):
            cuda.require_device("cuda")


def test_backend_for_translates_a_missing_device_into_an_options_error():
    from weightdiff.errors import OptionsError
    from weightdiff.measure.backend import backend_for

    if not torch.cuda.is_available():
        with pytest.raises(OptionsError, match="sees no CUDA device") as info:
            backend_for("cuda")
        assert info.value.option == "device"
    with pytest.raises(OptionsError, match="device must be one of cpu, cuda"):
        backend_for("tpu")


def _storage_int(dtype: str):
    from weightdiff.kernels.dtypes import DTYPES

    size = np.dtype(DTYPES[dtype].storage).itemsize
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def test_pieces_never_wait_for_the_host(monkeypatch):
    """On the meta device (no data) every op of a piece must run: no .item(), no tensor
    built from host values (a blocking host-to-device copy that syncs the stream)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    bad = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            devs = {a.device.type for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
            if func.overloadpacket.__name__ == "_local_scalar_dense" or ("cpu" in devs and "meta" in devs):
                bad.append(func.overloadpacket.__name__)
            return func(*args, **kwargs)

    for db, dt in PAIRS:   # the fp8 tables are built once per device, outside the watch
        cuda._stats_tensor(torch.empty(3, dtype=_storage_int(db), device="meta"),
                           torch.empty(3, dtype=_storage_int(dt), device="meta"), db, dt)

    def host_tensor(real):
        def make(*a, **k):
            if torch.device(k.get("device") or "cpu").type != "cpu":
                bad.append(real.__name__)
            return real(*a, **k)
        return make

    monkeypatch.setattr(torch, "tensor", host_tensor(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", host_tensor(torch.as_tensor))
    monkeypatch.setattr(cuda, "PIECE", 1000)
    for db, dt in PAIRS:
        with Watch():
            out = cuda._stats_tensor(torch.empty(2500, dtype=_storage_int(db), device="meta"),
                                     torch.empty(2500, dtype=_storage_int(dt), device="meta"), db, dt)
        assert out.shape == (ref.NSTATS,) and out.dtype == torch.float64
    assert bad == []


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 255 * 128 + 77, 70_001])
def test_count_reads_bytes_exactly(n, rng):
    m = rng.random(n) < 0.9
    assert int(cuda._count(torch, torch.from_numpy(m))) == int(m.sum())
    assert int(cuda._count(torch, torch.ones(n, dtype=torch.bool))) == n


def _neighbours(dtype: str, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pattern next to ``bits`` (+-1, +-2 in the last place), as (base, tuned) raws."""
    from weightdiff.kernels.dtypes import DTYPES

    st = np.dtype(DTYPES[dtype].storage)
    u = np.dtype(f"u{st.itemsize}")
    base = np.repeat(bits.astype(u), 5)
    tuned = base + np.tile(np.array([0, 1, 2, -1, -2]).astype(u), bits.size)
    return base.view(st), tuned.view(st)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F8_E4M3", "F8_E8M0"])
def test_beyond_at_every_binade_edge(dtype):
    """n_beyond hinges on abs(D) == h exactly (a power of two's lower neighbour) and on the
    smallest normals, where the float32-staged bound rounds: check every binade edge."""
    from weightdiff.kernels.dtypes import DTYPES

    d = DTYPES[dtype]
    nbits = 8 * np.dtype(d.storage).itemsize
    if nbits <= 16:
        bits = np.arange(1 << nbits, dtype=np.uint64)
    else:   # every exponent, mantissa 0, 1, 2 and all ones, both signs
        e = np.arange(256, dtype=np.uint64) << np.uint64(23)
        m = np.array([0, 1, 2, (1 << 23) - 1], dtype=np.uint64)
        bits = (e[:, None] | m[None, :]).reshape(-1)
        bits = np.concatenate([bits, bits | np.uint64(1 << 31)])
    b, t = _neighbours(dtype, bits & np.uint64((1 << nbits) - 1))
    for db, dt, bb, tt in ((dtype, dtype, b, t), (dtype, dtype, t, b)):
        assert_stats_close(cuda.delta_stats(bb, tt, db, dt, device="cpu"), ref.delta_stats(bb, tt, db, dt))
    if dtype in ("BF16", "F16"):   # the same values against a wider and a narrower dtype
        with np.errstate(all="ignore"):
            wide = ref.decode(b, dtype).astype(np.float32)
            assert_stats_close(cuda.delta_stats(wide, t, "F32", dtype, device="cpu"),
                               ref.delta_stats(wide, t, "F32", dtype))
            assert_stats_close(cuda.delta_stats(t, wide, dtype, "F32", device="cpu"),
                               ref.delta_stats(t, wide, dtype, "F32"))


def test_host_copy_in_slices(rng, monkeypatch):
    monkeypatch.setattr(cuda_stream, "PARALLEL_COPY_BYTES", 1000)
    monkeypatch.setattr(cuda_stream, "_copy_workers", lambda: 3)
    for n in (0, 999, 1000, 100_003):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n, np.uint8)
        cuda_stream.host_copy(dst, src)
        np.testing.assert_array_equal(dst, src)
    with pytest.raises(ValueError, match="host_copy"):
        cuda_stream.host_copy(np.zeros(3, np.uint8), np.zeros(4, np.uint8))
