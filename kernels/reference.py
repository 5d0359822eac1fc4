"""The float64 numpy specification of every delta kernel: slow, obvious, and the judge.

``kernels.cpu`` (numba) and ``kernels.cuda`` (torch) implement the same names with the
same arguments and outputs; their tests compare against this module. Inputs are the
raw stored arrays of one window of a tensor pair (bf16 as uint16 bits, fp8 as uint8
bits; F16/F32/F64 may come as floats or as unsigned bits of the same width), of any
shape (they are flattened), plus the safetensors dtype names.

Per element pair, with B and T decoded exactly to float64 and D = T - B:

* a pair is *finite* when both B and T are finite. Only finite pairs enter the sums
  (``sum_b2`` = sum B^2, ``sum_t2`` = sum T^2, ``sum_d2`` = sum D^2, ``dot`` = sum B*T),
  ``max_abs`` = max abs(D) and ``sign_flips`` (B < 0 < T or T < 0 < B; zeros of either
  sign never flip). Non-finite values are counted per side in ``nonfinite_b`` and
  ``nonfinite_t``.
* ``n_changed``: same dtype name, the stored bits differ (so -0 -> +0 and a NaN payload
  change count); different dtypes, the values differ (NaN equals NaN, -0 equals +0).
* ``n_beyond``: a finite pair with abs(D) > h, where h is half an ulp of the coarser dtype at the
  lesser magnitude, ``m = min(abs(B), abs(T))``, ``h = max(half_ulp(m, dtype_base), half_ulp(m, dtype_tuned))``
  (a rounding moves a value by at most half the spacing of the binade below the larger of the two: at
  abs(B), a bf16 step down from a power of two, 1.0 to 1 - 2^-8, read as rounding),
  ``half_ulp(x, f) = 2 ** (max(floor(log2 x), emin_f) - mant_f - 1)`` and 0 for integer
  and bool dtypes (they store exactly: any change counts). A non-finite pair is beyond
  rounding when its values differ (NaN equals NaN). A fp32 -> bf16 cast therefore gives
  0 and an update of one ulp or more of the coarser dtype always counts.
* ``count`` counts every pair, finite or not: it is the denominator of the fractions.

>>> s = delta_stats(np.array([1.0, 2.0], np.float32), np.array([1.0, 2.5], np.float32), "F32", "F32")
>>> f = finalize(s); f["norm_delta"], f["frac_changed"], f["frac_beyond_rounding"]
(0.5, 0.5, 0.5)
"""

from __future__ import annotations

import math

import numpy as np

from .dtypes import DTYPES

STAT_FIELDS = ("count", "sum_b2", "sum_t2", "sum_d2", "dot", "n_changed", "n_beyond", "max_abs",
               "nonfinite_b", "nonfinite_t", "sign_flips")
NSTATS = len(STAT_FIELDS)
#: index of each field in a stats vector
IDX = {name: i for i, name in enumerate(STAT_FIELDS)}
MAX_FIELDS = (IDX["max_abs"],)   # combined with max; every other field with +

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def as_storage(raw, dtype: str) -> np.ndarray:
    """Flatten ``raw`` and view it as the storage dtype of ``dtype`` (no copy when contiguous).

    Accepts the storage dtype itself or any numpy array of the same item size, so fp16 may
    arrive as uint16 bits and fp32 as uint32 bits.
    """
    raw = np.asarray(raw).reshape(-1)
    want = np.dtype(DTYPES[dtype].storage)
    if raw.dtype == want:
        return raw
    if raw.dtype.itemsize != want.itemsize:
        raise ValueError(f"raw array of {raw.dtype} cannot hold {dtype} (storage {want})")
    return np.ascontiguousarray(raw).view(want)


def as_bits(raw) -> np.ndarray:
    """Flatten ``raw`` and view it as unsigned integers of its item size."""
    raw = np.ascontiguousarray(np.asarray(raw).reshape(-1))
    return raw.view(_BITS[raw.dtype.itemsize])


def decode(raw, dtype: str) -> np.ndarray:
    """Stored values -> float64, flattened (bf16 bits shifted, fp8 through its table)."""
    from .dtypes import decode as _decode
    with np.errstate(invalid="ignore", over="ignore"):
        return _decode(as_storage(raw, dtype), dtype)


def half_ulp(absb: np.ndarray, dtype: str) -> np.ndarray:
    """Half the spacing of ``dtype`` at each magnitude: ``2 ** (max(floor(log2 x), emin) - mant - 1)``.

    0 for integer and bool dtypes. ``absb`` must be finite and >= 0.

    >>> half_ulp(np.array([1.0, 0.0]), "BF16").tolist() == [2.0 ** -8, 2.0 ** -134]
    True
    """
    d = DTYPES[dtype]
    absb = np.asarray(absb, dtype=np.float64)
    if d.kind in ("int", "bool"):
        return np.zeros_like(absb)
    if d.kind == "opaque":
        raise ValueError(f"dtype {dtype} has no float decoding")
    e = np.frexp(absb)[1].astype(np.int64) - 1
    e = np.where(absb == 0, d.emin, np.maximum(e, d.emin))
    return np.ldexp(1.0, e - d.mant_bits - 1)


def delta_stats(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str) -> np.ndarray:
    """One window of a tensor pair -> float64[NSTATS] (fields in ``STAT_FIELDS`` order).

    See the module docstring for the definition of every field.
    """
    b = decode(base_raw, dtype_base)
    t = decode(tuned_raw, dtype_tuned)
    if b.shape != t.shape:
        raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
    fin_b, fin_t = np.isfinite(b), np.isfinite(t)
    fin = fin_b & fin_t
    value_equal = (b == t) | (np.isnan(b) & np.isnan(t))
    if dtype_base == dtype_tuned:
        changed = as_bits(as_storage(base_raw, dtype_base)) != as_bits(as_storage(tuned_raw, dtype_tuned))
    else:
        changed = ~value_equal
    bf, tf = b[fin], t[fin]
    out = np.zeros(NSTATS)
    with np.errstate(over="ignore", invalid="ignore"):   # float64 overflow of F64 data is data
        d = tf - bf
        ad = np.abs(d)
        out[IDX["sum_b2"]] = np.sum(bf * bf)
        out[IDX["sum_t2"]] = np.sum(tf * tf)
        out[IDX["sum_d2"]] = np.sum(d * d)
        out[IDX["dot"]] = np.sum(bf * tf)
    mag = np.minimum(np.abs(bf), np.abs(tf))
    h = np.maximum(half_ulp(mag, dtype_base), half_ulp(mag, dtype_tuned))
    out[IDX["count"]] = b.size
    out[IDX["n_changed"]] = np.count_nonzero(changed)
    out[IDX["n_beyond"]] = np.count_nonzero(ad > h) + np.count_nonzero(~fin & ~value_equal)
    out[IDX["max_abs"]] = ad.max() if ad.size else 0.0
    out[IDX["nonfinite_b"]] = np.count_nonzero(~fin_b)
    out[IDX["nonfinite_t"]] = np.count_nonzero(~fin_t)
    out[IDX["sign_flips"]] = np.count_nonzero(((bf < 0) & (tf > 0)) | ((bf > 0) & (tf < 0)))
    return out


def delta_stats_many(base_raw, tuned_raw, offsets, dtype_base: str, dtype_tuned: str) -> np.ndarray:
    """Many pairs laid end to end -> float64[len(offsets) - 1, NSTATS]: row i is ``delta_stats``
    of ``base_raw[offsets[i]:offsets[i + 1]]`` against the same slice of ``tuned_raw``."""
    b, t = as_storage(base_raw, dtype_base).reshape(-1), as_storage(tuned_raw, dtype_tuned).reshape(-1)
    if b.size != t.size or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != b.size:
        raise ValueError(f"offsets must run from 0 to {b.size} on both sides")
    return np.array([delta_stats(b[lo:hi], t[lo:hi], dtype_base, dtype_tuned)
                     for lo, hi in zip(offsets[:-1], offsets[1:])]).reshape(-1, NSTATS)


def bytes_stats(base_raw, tuned_raw) -> np.ndarray:
    """Stats for dtypes without float decoding (C64, F4, F6_*): float64[NSTATS].

    Both arrays are flattened and viewed as unsigned integers of their item size, so C64
    (complex64) is compared element by element (8 bytes each) and the packed F4/F6
    formats, which arrive as uint8, byte by byte. ``count`` is the number of such units,
    ``n_changed`` and ``n_beyond`` the number that differ (no rounding can be told apart
    from a change); every sum, ``max_abs`` and the non-finite counts stay 0, so callers
    must report the norms of such a tensor as unknown, not as 0.
    """
    b, t = as_bits(base_raw), as_bits(tuned_raw)
    if b.dtype != t.dtype:
        b, t = b.view(np.uint8), t.view(np.uint8)
    if b.shape != t.shape:
        raise ValueError(f"base window has {b.nbytes} bytes, tuned window {t.nbytes}")
    out = np.zeros(NSTATS)
    out[IDX["count"]] = b.size
    out[IDX["n_changed"]] = out[IDX["n_beyond"]] = np.count_nonzero(b != t)
    return out


def combine(acc: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Stats of two consecutive windows -> stats of both (sums add, ``max_abs`` takes the max).

    Windows are combined in order, ``combine(combine(w0, w1), w2)``, so results do not
    depend on how the work was scheduled.
    """
    out = np.asarray(acc, dtype=np.float64) + np.asarray(part, dtype=np.float64)
    for i in MAX_FIELDS:
        out[i] = max(acc[i], part[i])
    return out


def finalize(stats: np.ndarray) -> dict:
    """Stats vector -> the per-tensor fields of DESIGN.md.

    ``norm_*`` = sqrt of the sums; ``rel_change`` = norm_delta / norm_base (None when
    norm_base is 0); ``cosine`` = dot / (norm_base norm_tuned), clipped to [-1, 1] (None
    when either norm is 0). Both are None too where the quotient is NaN (norms that overflowed
    float64, inf / inf): not measured, never clipped to -1 as ``max(-1.0, nan)`` would;
    ``frac_changed``, ``frac_beyond_rounding`` and ``frac_sign_flips`` = counts / count (None
    when count is 0); ``nonfinite`` = non-finite values on both sides.

    >>> f = finalize(np.array([4, 4.0, 9.0, 1.0, 6.0, 1, 1, 1.0, 0, 0, 0]))
    >>> f["norm_base"], f["norm_tuned"], f["rel_change"], f["cosine"], f["frac_changed"]
    (2.0, 3.0, 0.5, 1.0, 0.25)
    """
    s = np.asarray(stats, dtype=np.float64)
    count = int(s[IDX["count"]])
    nb, nt, nd = (math.sqrt(s[IDX[k]]) for k in ("sum_b2", "sum_t2", "sum_d2"))
    cos = rel = None
    den = nb * nt
    if nb > 0 and nt > 0 and den > 0:
        x = float(s[IDX["dot"]]) / den          # Python floats: inf / inf is NaN without a warning
        cos = None if math.isnan(x) else min(1.0, max(-1.0, x))
    if nb > 0 and not math.isnan(nd / nb):
        rel = nd / nb

    def frac(key: str):
        return None if count == 0 else float(s[IDX[key]]) / count

    return {
        "numel": count,
        "norm_base": nb,
        "norm_tuned": nt,
        "norm_delta": nd,
        "rel_change": rel,
        "cosine": cos,
        "frac_changed": frac("n_changed"),
        "frac_beyond_rounding": frac("n_beyond"),
        "frac_sign_flips": frac("sign_flips"),
        "max_abs_delta": float(s[IDX["max_abs"]]),
        "nonfinite": int(s[IDX["nonfinite_b"]] + s[IDX["nonfinite_t"]]),
        "nonfinite_base": int(s[IDX["nonfinite_b"]]),
        "nonfinite_tuned": int(s[IDX["nonfinite_t"]]),
        "sign_flips": int(s[IDX["sign_flips"]]),
    }


def finalize_many(stats: np.ndarray) -> list[dict]:
    """``[finalize(row) for row in stats]``, the same values, computed column-wise: the fields of
    many small tensors at once (``stats`` is float64[m, NSTATS])."""
    s = np.asarray(stats, dtype=np.float64).reshape(-1, NSTATS)
    if s.shape[0] == 0:
        return []
    col = {k: s[:, i] for k, i in IDX.items()}
    count = col["count"]
    nb, nt, nd = (np.sqrt(col[k]) for k in ("sum_b2", "sum_t2", "sum_d2"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = nb * nt
        x = col["dot"] / den
        cos = np.clip(x, -1.0, 1.0)              # as min(1.0, max(-1.0, x)); NaN stays NaN (not measured)
        rel = nd / nb
        fracs = [col[k] / count for k in ("n_changed", "n_beyond", "sign_flips")]
    has_cos = ((nb > 0) & (nt > 0) & (den > 0) & ~np.isnan(x)).tolist()
    has_rel = ((nb > 0) & ~np.isnan(rel)).tolist()
    counted = (count != 0).tolist()
    ints = [col[k].astype(np.int64).tolist() for k in ("count", "nonfinite_b", "nonfinite_t", "sign_flips")]
    nonfinite = (col["nonfinite_b"] + col["nonfinite_t"]).astype(np.int64).tolist()
    cols = [c.tolist() for c in (nb, nt, nd, rel, cos, *fracs, col["max_abs"])]
    out = []
    for i, (n, b, t, d, r, c, fc, fb, ff, mx) in enumerate(zip(ints[0], *cols)):
        ok = counted[i]
        out.append({"numel": n, "norm_base": b, "norm_tuned": t, "norm_delta": d,
                    "rel_change": r if has_rel[i] else None, "cosine": c if has_cos[i] else None,
                    "frac_changed": fc if ok else None, "frac_beyond_rounding": fb if ok else None,
                    "frac_sign_flips": ff if ok else None, "max_abs_delta": mx, "nonfinite": nonfinite[i],
                    "nonfinite_base": ints[1][i], "nonfinite_tuned": ints[2][i], "sign_flips": ints[3][i]})
    return out


def decode_delta_f32(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray) -> tuple[int, float]:
    """``out[:] = float32(T - B)``, the difference taken in float64, for the rank analysis.

    Pairs where either side is non-finite give 0, matching the sums of ``delta_stats``
    (so sum(out**2) ~ sum_d2). ``out`` is a float32 array with as many elements. Returns how
    many differences float32 could not hold exactly and the sum of their squared errors (the
    difference of two bf16 weights of similar size is exact in float32, so for a bf16 pair this
    is a handful of elements near zero: the rank bound charges only what the copy rounded).
    """
    return _decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, out, np.float32)


def decode_delta_f64(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray) -> tuple[int, float]:
    """``out[:] = T - B`` in float64 (the streamed Gram of the rank analysis); 0 where a side is
    non-finite, as in ``decode_delta_f32``. Returns (0, 0.0): the float64 difference is the
    delta every statistic is defined on."""
    return _decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, out, np.float64)


def _decode_delta(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray,
                  want) -> tuple[int, float]:
    b = decode(base_raw, dtype_base)
    t = decode(tuned_raw, dtype_tuned)
    if out.dtype != want or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {np.dtype(want).name} array")
    flat = out.reshape(-1)
    if flat.size != b.size or b.size != t.size:
        raise ValueError(f"out has {flat.size} elements, the windows {b.size} and {t.size}")
    fin = np.isfinite(b) & np.isfinite(t)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(fin, t - np.where(fin, b, 0.0), 0.0)
    flat[:] = d.astype(want)
    bad = flat != d
    e = flat[bad].astype(np.float64) - d[bad]
    return int(np.count_nonzero(bad)), float(np.sum(e * e))


def rounding_sigma2(raw, dtype: str) -> float:
    """Storage-rounding variance summed over the elements: sum of ``ulp(abs(x)) ** 2 / 12``.

    Rounding to the nearest representable value leaves an error uniform on half an ulp
    either side, of variance ulp^2 / 12. Non-finite elements add nothing; integer and
    bool dtypes store exactly and give 0.
    """
    d = DTYPES[dtype]
    if d.kind == "opaque":
        raise ValueError(f"dtype {dtype} has no float decoding")
    if d.kind in ("int", "bool"):
        return 0.0
    x = decode(raw, dtype)
    x = np.abs(x[np.isfinite(x)])
    u = 2.0 * half_ulp(x, dtype)
    with np.errstate(over="ignore"):
        return float(np.sum(u * u) / 12.0)


def noise_scatter(bits, shift: int, mask: int, table, p0: int, n: int, rows, cols) -> None:
    """Add ``table[(bits >> shift) & mask]`` of each flat element of ``bits`` (unsigned
    integers: the storage bits of one window) to the sums of its row and its column, the
    window starting at flat position ``p0`` of a matrix ``n`` wide: ``rows`` and ``cols``
    (float64) are updated in place.

    Every sum takes its terms one at a time in flat order (``np.add.at`` is unbuffered and
    in order), so the result does not depend on where a stream is cut into windows: a whole
    matrix and the same matrix in windows give the same bits. ``kernels.cpu.noise_scatter``
    gives the same bits, about ten times faster (the numpy table lookups it replaced: three times).
    """
    u = np.asarray(bits).reshape(-1)
    if u.size == 0:
        return
    if u.dtype.kind != "u":
        raise ValueError(f"bits must be unsigned integers, got {u.dtype}")
    idx = (u >> np.array(shift, u.dtype)) & np.array(mask, u.dtype)
    v = np.asarray(table, np.float64)[idx]
    pos = np.arange(p0, p0 + u.size, dtype=np.int64)
    np.add.at(rows, pos // n, v)
    np.add.at(cols, pos % n, v)


#: dtypes a cast chain is modelled for (sides and intermediates): IEEE binary formats with infinities
RECAST_DTYPES = ("F16", "BF16", "F32", "F64")
#: the intermediate dtypes a chain base -> via -> tuned may pass through (None: the direct cast)
RECAST_VIAS = (None, "F16", "BF16", "F32")
#: the columns of ``recast_counts``, one row per chain
RECAST_FIELDS = ("unexplained", "overflow", "saturated")


def max_finite(dtype: str) -> float:
    """The largest finite value of an IEEE binary format: ``(2 - 2**-mant) * 2**(1 - emin)``.

    >>> max_finite("F16"), max_finite("BF16") == float(np.finfo(np.float32).max) * (1 - 2.0 ** -8) / (1 - 2.0 ** -24)
    (65504.0, True)
    """
    d = DTYPES[dtype]
    if dtype not in RECAST_DTYPES:
        raise ValueError(f"dtype {dtype} is not an IEEE binary format with infinities")
    return math.ldexp(2.0 - math.ldexp(1.0, -d.mant_bits), 1 - d.emin)


def round_to(x, dtype: str) -> np.ndarray:
    """float64 values -> the nearest ``dtype`` values (as float64): round to nearest, ties to even,
    subnormals at ``emin``, a result beyond the largest finite value is an infinity of the same
    sign (IEEE 754, what numpy's and torch's casts do); NaN, infinities and signed zeros pass.
    (torch casts float64 to bfloat16 and float16 through float32: the chain via ``F32``.)

    >>> round_to(np.array([1 + 2.0 ** -11, 65519.0, 65520.0, 2.0 ** -26]), "F16").tolist()
    [1.0, 65504.0, inf, 0.0]
    """
    x = np.array(x, dtype=np.float64).reshape(-1)
    if dtype == "F64":
        return x
    d = DTYPES[dtype]
    top = max_finite(dtype)
    fin = np.isfinite(x) & (x != 0)
    v = x[fin]
    e = np.maximum(np.frexp(np.abs(v))[1].astype(np.int64) - 1, d.emin)
    q = np.ldexp(1.0, e - d.mant_bits)
    with np.errstate(over="ignore"):
        r = np.rint(v / q) * q          # v / q and the product are exact: q is a power of two
    r[np.abs(r) > top] = np.inf
    x[fin] = np.copysign(r, v)
    return x


#: the columns of ``twin_counts``, one row per pair of chains (base side's, tuned side's)
TWIN_FIELDS = ("unexplained", "overflow")


def overflow_at(dtype: str) -> float:
    """The smallest magnitude that rounds to infinity in ``dtype``: its largest finite value plus half an ulp.

    >>> overflow_at("F16"), overflow_at("F64")
    (65520.0, inf)
    """
    if dtype == "F64":
        return math.inf
    top = max_finite(dtype)
    return top + math.ldexp(1.0, math.frexp(top)[1] - 2 - DTYPES[dtype].mant_bits)


def _spacing(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(spacing above, spacing below) of ``dtype`` at each of its finite magnitudes ``a`` >= 0: below a power of
    two in the normal range, half the spacing above (the binade below is twice as fine); 0 has the least
    subnormal's spacing on both sides."""
    d = DTYPES[dtype]
    m, e = np.frexp(a)
    e = np.where(a == 0, d.emin, np.maximum(e.astype(np.int64) - 1, d.emin))
    q = np.ldexp(1.0, (e - d.mant_bits).astype(np.int32))
    return q, np.where((m == 0.5) & (e > d.emin), 0.5 * q, q)


def rounds_from(v, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reals that round to each ``dtype`` value ``v`` (ties to even, past the range an infinity): ``(lo, hi,
    lo_closed, hi_closed)``, float64 and bool arrays. An end is closed where ``v`` is even (its last mantissa bit 0:
    a tie goes to it), the largest finite value's top end open (its tie goes to the infinity), an infinity's
    interval ``[overflow_at, inf]``; F64 values round from themselves alone; NaN from nothing (``lo > hi``).

    >>> [x.tolist() for x in rounds_from(np.array([1.0, 65504.0]), "F16")]
    [[0.999755859375, 65488.0], [1.00048828125, 65520.0], [True, False], [True, False]]
    """
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if dtype == "F64":
        nan = np.isnan(v)
        ones = np.ones(v.shape, bool)
        return np.where(nan, np.inf, v), np.where(nan, -np.inf, v), ones, ones
    a = np.abs(v)
    fin = np.isfinite(a)
    af = np.where(fin, a, 0.0)
    up, down = _spacing(af, dtype)
    even = np.fmod(af / up, 2.0) == 0
    top = max_finite(dtype)
    ovf = overflow_at(dtype)
    hi_m = np.where(af == top, ovf, af + 0.5 * up)
    lo_m = af - 0.5 * down
    hic = even & (af != top)
    loc = even.copy()
    inf = a == np.inf
    lo_m, hi_m = np.where(inf, ovf, lo_m), np.where(inf, np.inf, hi_m)
    loc, hic = loc | inf, hic | inf
    neg = np.signbit(v) & (a != 0)
    lo = np.where(neg, -hi_m, lo_m)
    hi = np.where(neg, -lo_m, hi_m)
    lc, hc = np.where(neg, hic, loc), np.where(neg, loc, hic)
    nan = np.isnan(v)
    return np.where(nan, np.inf, lo), np.where(nan, -np.inf, hi), lc, hc


def _next_up(r: np.ndarray, dtype: str) -> np.ndarray:
    """The next ``dtype`` value above each ``dtype`` value ``r`` (-inf: minus the largest; +inf: +inf)."""
    top = max_finite(dtype)
    a = np.abs(r)
    af = np.where(np.isfinite(a), a, 0.0)
    up, down = _spacing(af, dtype)
    out = np.where(np.signbit(r) & (a != 0), -(af - down), af + up)
    out = np.where(out > top, np.inf, out)
    return np.where(r == -np.inf, -top, np.where(r == np.inf, np.inf, out))


def _restrict(lo, hi, lc, hc, dtype: str):
    """The least and greatest ``dtype`` values (infinities included) in each interval, and whether it holds any."""
    with np.errstate(invalid="ignore"):
        u = round_to(np.where(np.isnan(lo), 0.0, lo), dtype)
        u = np.where((u < lo) | ((u == lo) & ~lc), _next_up(u, dtype), u)
        w = -round_to(np.where(np.isnan(hi), 0.0, -hi), dtype)
        w = np.where((w > hi) | ((w == hi) & ~hc), -_next_up(-w, dtype), w)
        ok = (u <= w) & ~((u == np.inf) & ((lo > u) | ((lo == u) & ~lc))) \
            & ~((w == -np.inf) & ((hi < w) | ((hi == w) & ~hc)))
    return u, w, ok


#: the clamps an fp16 converter applies before its cast, as chain steps (``chain_from``): magnitudes in (0, lo)
#: raised to lo and those above hi lowered to it, in float32 (onnxconverter-common's ``convert_float_to_float16``
#: defaults, and ONNX Runtime's own converter's)
CLAMPS = {"CLAMP": (float(np.float32(1e-7)), 1e4), "CLAMP_ORT": (float(np.float32(5.96e-08)), 65504.0)}


def _clamp_low(a, ac, lo: float, hi: float):
    """The least x (and whether it is included) whose clamp is at least ``a`` (more than ``a`` where ``ac`` is
    False); +inf where none is."""
    a = np.asarray(a, np.float64)
    ac = np.asarray(ac, bool)
    conds = [(a < -hi) | ((a == -hi) & ac), (a < -lo) | ((a == -lo) & ac), (a < 0) | ((a == 0) & ac),
             (a < lo) | ((a == lo) & ac), (a < hi) | ((a == hi) & ac)]
    x = np.select(conds, [-np.inf, a, 0.0, 0.0, a], np.inf)
    c = np.select(conds, [True, ac, True, False, ac], True)
    return x, c


def clamp_from(lo, hi, lc, hc, clamp: str):
    """The reals the clamp ``clamp`` (``CLAMPS``) takes into each interval (``lo > hi``: none)."""
    cl, ch = CLAMPS[clamp]
    p, pc = _clamp_low(lo, lc, cl, ch)
    q, qc = _clamp_low(-np.asarray(hi, np.float64), hc, cl, ch)
    q = -q
    empty = (p > q) | ((p == q) & ~(pc & qc))
    return np.where(empty, np.inf, p), np.where(empty, -np.inf, q), pc, qc


def chain_apply(x, dtype: str, vias=()) -> np.ndarray:
    """float64 originals -> what rounding through ``vias`` (in that order) and then to ``dtype`` gives: the forward
    direction of ``chain_from``; a step in ``CLAMPS`` raises magnitudes in (0, lo) to lo and lowers those in
    (hi, inf) to hi (infinities, zeros and NaN pass).

    >>> chain_apply(np.array([1 - 2.0 ** -9, 3e-8]), "F16", ["BF16", "CLAMP"]).tolist()
    [1.0, 1.1920928955078125e-07]
    """
    v = np.array(x, dtype=np.float64).reshape(-1)
    for via in vias:
        if via in CLAMPS:
            lo, hi = CLAMPS[via]
            a = np.abs(v)
            v = np.copysign(np.where((a > 0) & (a < lo), lo, np.where((a > hi) & (a < np.inf), hi, a)), v)
        else:
            v = round_to(v, via)
    return round_to(v, dtype)


def chain_from(v, dtype: str, vias=()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reals x that rounding through ``vias`` (in that order) and then to ``dtype`` takes to each ``dtype``
    value ``v``: ``rounds_from`` of the last step, its ``via`` values in it, the reals those round from, and so
    back to the first (each rounding is monotone, so each set is an interval); a step in ``CLAMPS`` is an fp16
    converter's clamp (``clamp_from``). Empty (``lo > hi``) where no x gives ``v`` so.

    >>> lo, hi, lc, hc = chain_from(np.array([1.0]), "F16", ["BF16"]); float(lo[0]), float(hi[0])
    (0.998046875, 1.00390625)
    """
    lo, hi, lc, hc = rounds_from(v, dtype)
    for via in reversed(list(vias)):
        if via in CLAMPS:
            lo, hi, lc, hc = clamp_from(lo, hi, lc, hc, via)
            continue
        u, w, ok = _restrict(lo, hi, lc, hc, via)
        lo, _, lc, _ = rounds_from(u, via)
        _, hi, _, hc = rounds_from(w, via)
        lo = np.where(ok, lo, np.inf)
        hi = np.where(ok, hi, -np.inf)
    return lo, hi, lc, hc


def twin_explained(b, dt_b: str, vias_b, t, dt_t: str, vias_t) -> np.ndarray:
    """Elements (float64 values) where ``b`` (stored in ``dt_b``) and ``t`` (in ``dt_t``) can be two roundings of one
    original: equal (NaN equal to NaN), or some real x that rounding through ``vias_b`` and then to ``dt_b`` takes to
    ``b`` and through ``vias_t`` then to ``dt_t`` to ``t`` (the two ``chain_from`` intervals meet). Exact for every
    magnitude, subnormals and the ranges' ends included: a float16 norm gain of 0.99756 is no rounding of the
    original a bf16 1.0 rounds from, and bf16(x) and bf16(f16(x)) differ only where float16 puts x on a bf16 tie.

    >>> fine, coarse = np.array([1.0009765625, 0.99755859375]), np.array([1.0, 1.0])
    >>> twin_explained(fine, "F16", (), coarse, "F16", ["BF16"]).tolist()
    [True, False]
    """
    b = np.asarray(b, np.float64).reshape(-1)
    t = np.asarray(t, np.float64).reshape(-1)
    same = (b == t) | (np.isnan(b) & np.isnan(t))
    lo1, hi1, lc1, hc1 = chain_from(b, dt_b, vias_b)
    lo2, hi2, lc2, hc2 = chain_from(t, dt_t, vias_t)
    lo, hi = np.maximum(lo1, lo2), np.minimum(hi1, hi2)
    lc = np.where(lo1 > lo2, lc1, np.where(lo2 > lo1, lc2, lc1 & lc2))
    hc = np.where(hi1 < hi2, hc1, np.where(hi2 < hi1, hc2, hc1 & hc2))
    return same | (lo < hi) | ((lo == hi) & lc & hc)


def twin_counts(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, keys) -> np.ndarray:
    """Which elements two roundings of one original explain -> float64[len(keys), 2] (columns ``TWIN_FIELDS``).

    ``keys``: (vias of the base side, vias of the tuned side), the roundings each side went through before its
    stored dtype (``twin_explained``). ``unexplained`` counts the elements ``twin_explained`` does not explain;
    ``overflow`` the explained ones where exactly one side is an infinity. Counts are integers, so windows add.
    """
    b = decode(base_raw, dtype_base)
    t = decode(tuned_raw, dtype_tuned)
    if b.shape != t.shape:
        raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
    out = np.zeros((len(keys), len(TWIN_FIELDS)))
    for i, (vb, vt) in enumerate(keys):
        ex = twin_explained(b, dtype_base, vb, t, dtype_tuned, vt)
        out[i] = (ex.size - np.count_nonzero(ex), np.count_nonzero(ex & (np.isinf(b) != np.isinf(t))))
    return out


def recast_counts(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, vias=RECAST_VIAS) -> np.ndarray:
    """Which elements a cast chain explains -> float64[len(vias), 3] (columns ``RECAST_FIELDS``).

    Row i is the chain base -> ``vias[i]`` -> tuned (``None``: base -> tuned), every step a
    ``round_to``; C its value for the base element B. An element pair (B, T) is *explained*
    by the chain when T equals C (NaN equals NaN, -0 equals +0), or when the pair is not beyond
    rounding in ``delta_stats`` (finite and abs(T - B) <= h, or T equals B), or when C overflowed
    to an infinity and T is the tuned dtype's largest finite value of that sign (a saturating
    cast). ``unexplained`` counts the others; ``overflow`` the finite B whose C is an infinity
    that T equals; ``saturated`` those that T holds as the largest finite value instead.
    Counts are integers (exact in float64 below 2**53), so windows add.

    Base and tuned dtypes, and every intermediate, are in ``RECAST_DTYPES``.

    >>> b = np.array([1.0 + 2.0 ** -9 + 2.0 ** -20, 1e5, 3e-9], np.float32)
    >>> t = round_to(round_to(b, "F16"), "BF16").astype(np.float32).view(np.uint32) >> 16
    >>> recast_counts(b, t.astype(np.uint16), "F32", "BF16", (None, "F16")).tolist()
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    for name in (dtype_base, dtype_tuned, *(v for v in vias if v is not None)):
        if name not in RECAST_DTYPES:
            raise ValueError(f"dtype {name} is not one a cast chain is modelled for ({', '.join(RECAST_DTYPES)})")
    b = decode(base_raw, dtype_base)
    t = decode(tuned_raw, dtype_tuned)
    if b.shape != t.shape:
        raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
    fin = np.isfinite(b) & np.isfinite(t)
    with np.errstate(over="ignore", invalid="ignore"):
        ad = np.abs(np.where(fin, t - np.where(fin, b, 0.0), 0.0))
    h = np.zeros_like(b)
    mag = np.minimum(np.abs(b[fin]), np.abs(t[fin]))
    h[fin] = np.maximum(half_ulp(mag, dtype_base), half_ulp(mag, dtype_tuned))
    within = (fin & (ad <= h)) | (b == t) | (np.isnan(b) & np.isnan(t))
    top = max_finite(dtype_tuned)
    out = np.zeros((len(vias), len(RECAST_FIELDS)))
    for i, via in enumerate(vias):
        c = round_to(b if via is None else round_to(b, via), dtype_tuned)
        ovf = np.isfinite(b) & np.isinf(c)
        equal = (c == t) | (np.isnan(c) & np.isnan(t))
        sat = ovf & (t == np.copysign(top, c))
        out[i] = (np.count_nonzero(~(within | equal | sat)), np.count_nonzero(ovf & equal),
                  np.count_nonzero(sat))
    return out
