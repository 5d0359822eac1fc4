"""Cast-rounding floors of a base tensor: how much a cast to bf16 or fp16 would change it.

Rounding a value ``x`` to a float format with ``p`` explicit mantissa bits moves it by at
most half a step (ulp) of that format at ``|x|``; for values that are not already on the
format's grid the error is close to uniform on that interval, so its mean square is
``ulp(|x|)^2 / 12`` (the same model as the rank stage's noise floor, weightdiff.measure.rank).
The floor of a tensor is ``sqrt(sum_ij ulp(|B_ij|)^2 / 12)``: the Frobenius norm of the
change a cast of weights of exactly these magnitudes would make. Divided by ``norm_base``
it is the relative change a cast alone reads; it needs only the binary exponent of each
weight, so it is kept as a histogram of exponents while the stats pass streams the base.

Each window contributes a fixed, evenly strided sample of at least ``SAMPLE`` elements
(every element of a smaller window), scaled to the window's size: deterministic, and a
negligible cost next to the stats kernel. Zeros and subnormals contribute nothing (a zero
casts exactly); values above the fp16 range are counted as ``F16_overflow`` (they become
infinite in fp16) and left out of its floor.

>>> acc = FloorAccumulator()
>>> acc.add(np.array([1.0, -1.5, 0.0], dtype=np.float32), "F32")
>>> r = acc.result()
>>> round(r["BF16"] ** 2 * 12 / 2 ** -14, 6), round(r["F16"] ** 2 * 12 / 2 ** -20, 6), r["F16_overflow"]
(2.0, 2.0, 0)
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels.dtypes import DTYPES, decode

__all__ = ["FloorAccumulator", "small_floors", "small_floors_flat", "SAMPLE", "TARGETS"]

#: elements sampled per window at least (all of a smaller window)
SAMPLE = 1 << 18
#: formats a floor is computed for: name -> (explicit mantissa bits, exponent of the smallest normal, largest exponent)
TARGETS = {"BF16": (7, -126, 127), "F16": (10, -14, 15)}

_OFFSET = 1100           # exponents of float64 range from -1074 to 1023
_BINS = 2 * _OFFSET


def _exponents(raw: np.ndarray, dtype: str) -> np.ndarray:
    """floor(log2 |x|) + _OFFSET of every element (0 for zeros, subnormals and non-finite values)."""
    if dtype == "BF16":
        e = (raw.view(np.uint16) >> 7).astype(np.int32) & 0xFF
        return np.where((e == 0) | (e == 0xFF), 0, e - 127 + _OFFSET)
    if dtype == "F32":
        e = (raw.view(np.uint32) >> 23).astype(np.int32) & 0xFF
        return np.where((e == 0) | (e == 0xFF), 0, e - 127 + _OFFSET)
    if dtype == "F16":
        e = (raw.view(np.uint16) >> 10).astype(np.int32) & 0x1F
        return np.where((e == 0) | (e == 0x1F), 0, e - 15 + _OFFSET)
    x = np.abs(decode(raw, dtype))
    ok = np.isfinite(x) & (x > 0)
    _, e = np.frexp(np.where(ok, x, 1.0))
    return np.where(ok, e - 1 + _OFFSET, 0)


class FloorAccumulator:
    """Sums the exponent histogram of a base tensor window by window; ``result()`` gives
    the floor norms ``{"BF16": ..., "F16": ..., "F16_overflow": count}``."""

    def __init__(self) -> None:
        self.hist = np.zeros(_BINS, dtype=np.float64)

    def add(self, raw: np.ndarray, dtype: str) -> None:
        if not DTYPES[dtype].decodable or DTYPES[dtype].kind != "float" or raw.size == 0:
            return
        flat = raw.reshape(-1)
        stride = max(1, flat.size // SAMPLE)
        sample = flat[::stride]
        counts = np.bincount(_exponents(sample, dtype).ravel(), minlength=_BINS)
        self.hist += counts * (flat.size / sample.size)

    def result(self) -> dict:
        return _floors(self.hist)


def _floors(hist: np.ndarray) -> dict:
    """The floor norms of one exponent histogram. The sums are exactly rounded (``math.fsum``),
    so they do not depend on the order of the bins: ``small_floors`` gets the same bits from
    the nonzero bins alone."""
    n = hist.copy()
    n[0] = 0.0                                  # zeros, subnormals, non-finite
    nz = np.flatnonzero(n)
    if nz.size == 0:                            # integers, zeros: nothing a cast would move
        return dict(_ZERO)
    return _row(*(t.tolist() for t in _terms(nz, n[nz])))


def _terms(bins: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per nonzero bin: its share of the BF16 and F16 sums and of the F16 overflow count (0 where it
    has none); a tensor's floors are exactly rounded sums of these (``_row``)."""
    (fits_b, ulp2_b), (fits_f, ulp2_f) = _TABLES["BF16"], _TABLES["F16"]
    ok_b, ok_f = fits_b[bins], fits_f[bins]
    return (np.where(ok_b, counts * ulp2_b[bins], 0.0), np.where(ok_f, counts * ulp2_f[bins], 0.0),
            np.where(ok_f, 0.0, counts))


def _row(bf16: list, f16: list, over: list) -> dict:
    return {"BF16": math.sqrt(math.fsum(bf16) / 12.0), "F16": math.sqrt(math.fsum(f16) / 12.0),
            "F16_overflow": int(round(math.fsum(over)))}


#: the ``result()`` of a tensor with nothing a cast would move
_ZERO = {"BF16": 0.0, "F16": 0.0, "F16_overflow": 0}


def small_floors(arrays: list[np.ndarray], dtype: str) -> list[dict]:
    """``FloorAccumulator().add(a, dtype); .result()`` for each of many small arrays (at most
    ``SAMPLE`` elements each, so every element is sampled), the same numbers, in one pass:
    the 100,000 small tensors of a mixture-of-experts checkpoint cost one histogram, not one each."""
    sizes = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    floats = DTYPES[dtype].decodable and DTYPES[dtype].kind == "float"
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if floats and sizes.any() else None
    return small_floors_flat(flat, sizes, dtype)


def small_floors_flat(flat: np.ndarray | None, sizes: np.ndarray, dtype: str) -> list[dict]:
    """``small_floors`` of arrays given end to end: ``flat`` holds them one after the other, ``sizes``
    their element counts (``flat`` may be None when ``dtype`` is not a float: nothing is read)."""
    if (sizes > SAMPLE).any():
        raise ValueError(f"small_floors takes arrays of at most {SAMPLE} elements")
    n = len(sizes)
    zero = dict(_ZERO)              # one dict for every tensor with nothing to cast (records are read-only)
    if not DTYPES[dtype].decodable or DTYPES[dtype].kind != "float":
        return [zero] * n
    if not sizes.any():
        return [zero] * n
    e = _exponents(flat, dtype).astype(np.int64).ravel()
    key = np.repeat(np.arange(n, dtype=np.int64), sizes) * _BINS + e
    key = key[e != 0]                           # zeros, subnormals, non-finite: bin 0, left out
    keys, counts = np.unique(key, return_counts=True)
    rows, bins = np.divmod(keys, _BINS)
    cuts = np.searchsorted(rows, np.arange(n + 1)).tolist()
    bf16, f16, over = (t.tolist() for t in _terms(bins, counts.astype(np.float64)))
    return [zero if cuts[i] == cuts[i + 1] else
            _row(bf16[cuts[i]:cuts[i + 1]], f16[cuts[i]:cuts[i + 1]], over[cuts[i]:cuts[i + 1]])
            for i in range(n)]


def _tables() -> dict:
    """Per target format: which exponent bins fit it, and the squared ulp of each bin."""
    e = np.arange(_BINS) - _OFFSET
    return {name: (e <= emax, np.exp2(2.0 * (np.clip(e, emin, emax) - mant)))
            for name, (mant, emin, emax) in TARGETS.items()}


_TABLES = _tables()
