"""Input pairs for the kernel tests: every dtype, adversarial values, known answers.

Shared by tests/test_kernels_*.py (numba against the reference, torch against both).
``make_pair`` mixes realistic values (one side a small update or a cast of the other),
raw random bit patterns (NaN payloads, Inf, subnormals, huge values for free) and
the named specials at fixed places, so every branch of a kernel sees data.
"""

from __future__ import annotations

import numpy as np

from weightdiff.kernels.dtypes import DTYPES, FP8_TABLES
from weightdiff.io.safetensors_write import to_storage

DECODABLE = [n for n, d in DTYPES.items() if d.decodable]
FLOATS = [n for n, d in DTYPES.items() if d.kind == "float"]
#: mixed pairs that cover every width combination the CLI meets (and a few it should not)
MIXED = [("BF16", "F32"), ("F32", "BF16"), ("F16", "F32"), ("F32", "F16"), ("F64", "F32"),
         ("F32", "F64"), ("BF16", "F16"), ("BF16", "F8_E4M3"), ("F8_E5M2", "BF16"),
         ("BF16", "F8_E4M3FNUZ"), ("F16", "F8_E8M0"), ("I64", "F32"), ("U8", "F16"),
         ("BOOL", "I8"), ("I64", "F64"), ("U16", "BF16"), ("F8_E4M3", "F8_E5M2FNUZ")]
PAIRS = [(d, d) for d in DECODABLE] + MIXED


def _finite_max(dtype: str) -> float:
    d = DTYPES[dtype]
    if dtype in FP8_TABLES:
        t = FP8_TABLES[dtype].astype(np.float64)
        return float(np.max(t[np.isfinite(t)]))
    if dtype == "BF16":
        return float(np.float32(3.3895313892515355e38))
    return float(np.finfo(np.dtype(d.storage)).max)


def specials(dtype: str) -> np.ndarray:
    """+-0, NaN, +-Inf, the smallest subnormal, a huge value, as raw values of ``dtype``."""
    d = DTYPES[dtype]
    if d.kind == "bool":
        return np.array([0, 1, 1, 0], dtype=np.bool_)
    if d.kind == "int":
        info = np.iinfo(np.dtype(d.storage))
        return np.array([0, info.max, info.min, 1, info.max - 1], dtype=d.storage)
    sub = 2.0 ** (d.emin - d.mant_bits)
    big = _finite_max(dtype)
    vals = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, sub, -sub, big, -big, 1.0])
    with np.errstate(over="ignore", invalid="ignore"):
        return to_storage(vals, dtype)


def random_bits(rng: np.random.Generator, dtype: str, n: int) -> np.ndarray:
    d = DTYPES[dtype]
    st = np.dtype(d.storage)
    if d.kind == "bool":
        return rng.integers(0, 2, n).astype(np.bool_)
    raw = rng.integers(0, 256, n * st.itemsize, dtype=np.uint8)
    return raw.view(st).copy()


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    d = DTYPES[dtype]
    if d.kind == "bool":
        return values > 0
    if d.kind == "int":
        info = np.iinfo(np.dtype(d.storage))
        return np.clip(np.round(values * 50), info.min, info.max).astype(d.storage)
    with np.errstate(over="ignore", invalid="ignore"):
        return to_storage(values, dtype)


def make_pair(rng: np.random.Generator, n: int, db: str, dt: str, junk: float = 0.05):
    """(base_raw, tuned_raw) of length ``n``: an update on ~30%, casts, junk bits and specials."""
    v = rng.standard_normal(n) * 0.05
    w = v + np.where(rng.random(n) < 0.3, rng.standard_normal(n) * 0.01, 0.0)
    b, t = encode(v, db), encode(w, dt)
    for raw, dtype in ((b, db), (t, dt)):
        k = int(n * junk)
        if k:
            idx = rng.choice(n, k, replace=False)
            raw[idx] = random_bits(rng, dtype, k)
        sp = specials(dtype)
        m = min(n, len(sp) * 3)
        if m:
            raw[rng.choice(n, m, replace=False)] = np.resize(sp, m)
    # a few positions identical across the pair (same bits when the dtypes match)
    if db == dt and n:
        same = rng.choice(n, max(1, n // 10), replace=False)
        t[same] = b[same]
    return b, t


def assert_stats_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-9) -> None:
    """Counts and max exactly; float sums to ``rtol`` (summation order differs by design)."""
    from weightdiff.kernels.reference import IDX

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    exact = [IDX[k] for k in ("count", "n_changed", "n_beyond", "max_abs", "nonfinite_b",
                               "nonfinite_t", "sign_flips")]
    np.testing.assert_array_equal(got[exact], want[exact])
    for k in ("sum_b2", "sum_t2", "sum_d2"):
        np.testing.assert_allclose(got[IDX[k]], want[IDX[k]], rtol=rtol, atol=0)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.sqrt(want[IDX["sum_b2"]]) * np.sqrt(want[IDX["sum_t2"]])
    atol = rtol * scale if np.isfinite(scale) else 0.0
    np.testing.assert_allclose(got[IDX["dot"]], want[IDX["dot"]], rtol=rtol, atol=atol)
