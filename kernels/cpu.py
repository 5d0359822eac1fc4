"""The delta kernels on CPU: numba versions of ``kernels.reference``, same names and outputs.

One fused pass over both raw windows decodes each element inside the loop (bf16 as
``uint32(x) << 16`` viewed as float32, fp16 through a 65,536-entry table, fp8 through
``dtypes.FP8_STACK``), so no float copy of a tensor is ever made. Every input is viewed
as unsigned integers of its own width and the dtype travels as an integer code, so a
kernel is compiled once per pair of widths (bf16 vs bf16 is ``(uint16, uint16)``), not
once per dtype pair: the cold start stays short and ``cache=True`` keeps it on disk.

Determinism: the window is cut into fixed chunks of ``CHUNK`` elements; ``prange``
fills one row of a partials array per chunk (inside a chunk, per sub-block, ``LANES``
interleaved accumulators in explicit LLVM vectors, folded in a fixed order), and the
rows are summed serially in chunk order. The result depends on the bytes and the window, never on the thread count.
Differences from the reference are summation order only (compare with rtol).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import reference
from .cpu_vec import LANES, _fused, _vsums
from .dtypes import DTYPES, FP8_STACK
from .numba_cache import ensure as _ensure_numba_cache
from .reference import IDX, NSTATS, STAT_FIELDS, combine, finalize  # noqa: F401  (same API)

_ensure_numba_cache()     # before the first cache=True decorator: numba places its cache when it decorates

__all__ = ["STAT_FIELDS", "NSTATS", "CHUNK", "delta_stats", "delta_stats_many", "bytes_stats", "combine", "finalize",
           "decode_delta_f32", "decode_delta_f64", "noise_scatter", "recast_counts", "twin_counts", "set_threads",
           "get_threads",
           "precompile"]

#: elements per chunk: the unit of parallel work and of deterministic summation
CHUNK = 1 << 16
#: elements decoded at a time into float64 scratch (fits in L1)
SUB = 1024

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_F16_TABLE.setflags(write=False)
_FP8 = np.ascontiguousarray(FP8_STACK)
_I_COUNT, _I_B2, _I_T2, _I_D2, _I_DOT = (IDX[k] for k in ("count", "sum_b2", "sum_t2", "sum_d2", "dot"))
_I_CH, _I_BEY, _I_MAX, _I_NFB, _I_NFT, _I_FLIP = (
    IDX[k] for k in ("n_changed", "n_beyond", "max_abs", "nonfinite_b", "nonfinite_t", "sign_flips"))
_C = {name: d.code for name, d in DTYPES.items()}
_BF16, _F16, _F32, _F64 = _C["BF16"], _C["F16"], _C["F32"], _C["F64"]
_I8, _I16, _I32, _I64 = _C["I8"], _C["I16"], _C["I32"], _C["I64"]
_FP8_FIRST, _FP8_LAST = _C["F8_E4M3"], _C["F8_E8M0"]
_EXACT_M, _EXACT_E = 5000, -5000   # (mant, emin) of exact (integer, bool) dtypes: never the coarser
_ABS_MASK = np.int64(0x7FFFFFFFFFFFFFFF)
_EXP_MASK = np.int64(0x7FF0000000000000)


def _bitcast_codegen(width: int, to_float):
    def codegen(context, builder, sig, args):
        (v,) = args
        src = v.type.width
        if src > width:
            v = builder.trunc(v, ir.IntType(width))
        elif src < width:
            v = builder.zext(v, ir.IntType(width))
        return builder.bitcast(v, to_float)
    return codegen


@intrinsic
def _as_f32(typingctx, x):
    """The low 32 bits of an integer reinterpreted as float32."""
    if isinstance(x, types.Integer):
        return types.float32(x), _bitcast_codegen(32, ir.FloatType())


@intrinsic
def _as_f64(typingctx, x):
    """The low 64 bits of an integer reinterpreted as float64."""
    if isinstance(x, types.Integer):
        return types.float64(x), _bitcast_codegen(64, ir.DoubleType())


@intrinsic
def _f64_bits(typingctx, x):
    """The bits of a float64 as int64."""
    if isinstance(x, types.Float) and x.bitwidth == 64:
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64))
        return types.int64(x), codegen


_jit = numba.njit(cache=True, nogil=True)


@_jit
def _decode_into(raw, code, f16, fp8, out):
    """out[:] = float64 value of ``raw`` stored as dtype ``code`` (same lengths).

    Callers pass slices, indexed from 0 by a range: numba then drops the negative-index
    wraparound and LLVM vectorizes the loops (5-7x faster than ``raw[start + i]``).
    """
    n = raw.size
    if code == _BF16:
        for i in range(n):
            out[i] = _as_f32(np.uint32(raw[i]) << np.uint32(16))
    elif code == _F32:
        for i in range(n):
            out[i] = _as_f32(raw[i])
    elif code == _F64:
        for i in range(n):
            out[i] = _as_f64(raw[i])
    elif code == _F16:
        for i in range(n):
            out[i] = f16[raw[i] & 0xFFFF]
    elif _FP8_FIRST <= code <= _FP8_LAST:
        tab = fp8[code - _FP8_FIRST]
        for i in range(n):
            out[i] = tab[raw[i] & 0xFF]
    elif code == _I8:
        for i in range(n):
            out[i] = np.int8(raw[i])
    elif code == _I16:
        for i in range(n):
            out[i] = np.int16(raw[i])
    elif code == _I32:
        for i in range(n):
            out[i] = np.int32(raw[i])
    elif code == _I64:
        for i in range(n):
            out[i] = np.int64(raw[i])
    else:   # BOOL and unsigned integers
        for i in range(n):
            out[i] = raw[i]


@_jit
def _half_ulp_bits(ab_bits, mb, eb, mt, et):
    """Bits of half an ulp of the coarser dtype at the magnitude whose float64 bits are ``ab_bits``.

    Half an ulp is ``2 ** k``, ``k = max(max(e, eb) - mb, max(e, et) - mt) - 1`` with ``e`` the
    binary exponent; exact dtypes come with ``(mb, eb) = (_EXACT_M, _EXACT_E)`` so they never
    win the max, and a result below the float64 range is 0 (any change counts). Non-negative
    floats order like their bits, so ``abs(d) > h`` is ``bits(abs(d)) > _half_ulp_bits(...)``.
    """
    e = (ab_bits >> 52) - 1023
    k = max(max(e, eb) - mb, max(e, et) - mt) - 1
    if k >= -1022:
        return (k + 1023) << 52
    return np.int64(1) << max(k + 1074, 0) if k >= -1074 else np.int64(0)


@_jit
def _finite(v):
    return (v - v) == 0.0


@_jit
def _chunk_stats(b, t, start, stop, cb, ct, same, mb, eb, mt, et, f16, fp8, row):
    """Stats of b[start:stop], t[start:stop] into ``row`` (float64[NSTATS]), deterministic.

    Per sub-block of ``SUB`` elements. Fast path (bf16/f32 sides, a normal-float64 bound,
    a whole sub-block): ``_fused`` straight from the raw bits. Otherwise decode both sides
    to float64 scratch (zero-padded to whole lane groups) and run ``_fused`` on it. Either
    way, a NaN or Inf makes that side's sum of squares non-finite (squares never cancel),
    so finite sums prove the sub-block finite; if not, the non-finite pairs are counted,
    zeroed in the scratch (zeros add nothing to any field) and the pass rerun. Dtype pairs
    whose bound can be subnormal (F64) take the general loop with ``_half_ulp_bits``.
    """
    # the smallest half-ulp exponent this dtype pair can produce; F64 can go subnormal
    normal_bound = max(eb - mb, et - mt) - 1 >= -1022
    raw_ok = normal_bound and (cb == _BF16 or cb == _F32) and (ct == _BF16 or ct == _F32)
    # bound as bits when normal: max(max(e, eb) - mb, max(e, et) - mt) = max(e - min(mb, mt), c),
    # e from the exponent field (0 for zero and subnormals, then c wins), shifted into place
    dk = np.int64(min(mb, mt) + 1) << 52
    ck = np.int64(max(eb - mb, et - mt) + 1022) << 52
    fbuf = np.empty(SUB)
    tbuf = np.empty(SUB)
    s_b2 = s_t2 = s_d2 = s_dot = 0.0
    mx = np.int64(0)
    n_ch = n_bey = n_flip = n_nfb = n_nft = np.int64(0)
    for s0 in range(start, stop, SUB):
        n = min(SUB, stop - s0)
        rb = b[s0:s0 + n]
        rt = t[s0:s0 + n]
        if same:   # bits differ (a NaN payload or -0 -> +0 counts)
            for i in range(n):
                n_ch += rb[i] != rt[i]
        if raw_ok and n == SUB:
            p_b2, p_t2, p_d2, p_dot, p_mx, p_ne, p_bey, p_flip = _fused(rb, rt, dk, ck)
            if _finite(p_b2) and _finite(p_t2):
                s_b2 += p_b2
                s_t2 += p_t2
                s_d2 += p_d2
                s_dot += p_dot
                mx = max(mx, p_mx)
                n_bey += p_bey
                n_flip += p_flip
                if not same:
                    n_ch += p_ne
                continue
        fb = fbuf[:n]
        ft = tbuf[:n]
        _decode_into(rb, cb, f16, fp8, fb)
        _decode_into(rt, ct, f16, fp8, ft)
        padded = n + (-n) % LANES   # the sums run over whole lane groups; zeros add nothing
        fbuf[n:padded] = 0.0
        tbuf[n:padded] = 0.0
        if normal_bound:
            p_b2, p_t2, p_d2, p_dot, p_mx, p_ne, p_bey, p_flip = _fused(fbuf[:padded], tbuf[:padded], dk, ck)
        else:
            p_b2, p_t2, p_d2, p_dot = _vsums(fbuf[:padded], tbuf[:padded])
        if not (_finite(p_b2) and _finite(p_t2)):
            nf_diff = np.int64(0)   # non-finite pairs whose values differ: changed, and beyond
            for i in range(n):
                x = fb[i]
                y = ft[i]
                fx = _finite(x)
                fy = _finite(y)
                n_nfb += not fx
                n_nft += not fy
                if not (fx and fy):
                    nf_diff += not (x == y or (x != x and y != y))
                    fb[i] = 0.0
                    ft[i] = 0.0
            n_bey += nf_diff
            if not same:
                n_ch += nf_diff
            if normal_bound:
                p_b2, p_t2, p_d2, p_dot, p_mx, p_ne, p_bey, p_flip = _fused(fbuf[:padded], tbuf[:padded], dk, ck)
            else:
                p_b2, p_t2, p_d2, p_dot = _vsums(fbuf[:padded], tbuf[:padded])
        s_b2 += p_b2
        s_t2 += p_t2
        s_d2 += p_d2
        s_dot += p_dot
        if normal_bound:
            mx = max(mx, p_mx)
            n_bey += p_bey
            n_flip += p_flip
            if not same:
                n_ch += p_ne
        else:
            if not same:   # the pairs zeroed above are equal now; their change was counted
                for i in range(n):
                    n_ch += fb[i] != ft[i]
            for i in range(n):
                x = fb[i]
                y = ft[i]
                ad = _f64_bits(y - x) & _ABS_MASK
                mx = max(mx, ad)
                n_bey += ad > _half_ulp_bits(min(_f64_bits(x) & _ABS_MASK, _f64_bits(y) & _ABS_MASK), mb, eb, mt, et)
                n_flip += ((x < 0.0) & (y > 0.0)) | ((x > 0.0) & (y < 0.0))
    row[_I_COUNT] = stop - start
    row[_I_B2] = s_b2
    row[_I_T2] = s_t2
    row[_I_D2] = s_d2
    row[_I_DOT] = s_dot
    row[_I_MAX] = _as_f64(mx)
    row[_I_BEY] = n_bey
    row[_I_FLIP] = n_flip
    row[_I_NFB] = n_nfb
    row[_I_NFT] = n_nft
    row[_I_CH] = n_ch


@numba.njit(cache=True, nogil=True, parallel=True)
def _stats_driver(b, t, cb, ct, same, mb, eb, mt, et, f16, fp8):
    n = b.size
    nchunks = (n + CHUNK - 1) // CHUNK
    parts = np.zeros((nchunks, NSTATS))
    for c in prange(nchunks):
        _chunk_stats(b, t, c * CHUNK, min(n, (c + 1) * CHUNK), cb, ct, same, mb, eb, mt, et,
                     f16, fp8, parts[c])
    out = np.zeros(NSTATS)
    for c in range(nchunks):
        for j in range(NSTATS):
            if j == _I_MAX:
                out[j] = max(out[j], parts[c, j])
            else:
                out[j] += parts[c, j]
    return out


def _bits(raw, dtype: str) -> np.ndarray:
    """Flat contiguous unsigned-int view of a raw window (copies only a non-contiguous input)."""
    arr = reference.as_storage(raw, dtype)
    v = np.ascontiguousarray(arr).view(_BITS[arr.dtype.itemsize])
    # read-only whatever the input: numba compiles a kernel apart for each read-only/writable combination of
    # its arguments (a mapped window is read-only, a decoded or rotated array is not), each ~100 MB of LLVM
    # memory kept by the process and seconds the first time; the kernels only read these
    v.flags.writeable = False
    return v


def _ulp_params(dtype: str) -> tuple[int, int]:
    d = DTYPES[dtype]
    return (_EXACT_M, _EXACT_E) if d.kind in ("int", "bool") else (d.mant_bits, d.emin)


def _check_decodable(*names: str) -> None:
    for name in names:
        if not DTYPES[name].decodable:
            raise ValueError(f"dtype {name} has no float decoding; use bytes_stats")


def delta_stats(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str) -> np.ndarray:
    """One window of a tensor pair -> float64[NSTATS]; see ``kernels.reference.delta_stats``."""
    _check_decodable(dtype_base, dtype_tuned)
    b, t = _bits(base_raw, dtype_base), _bits(tuned_raw, dtype_tuned)
    if b.size != t.size:
        raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
    mb, eb = _ulp_params(dtype_base)
    mt, et = _ulp_params(dtype_tuned)
    args = (DTYPES[dtype_base].code, DTYPES[dtype_tuned].code, dtype_base == dtype_tuned, mb, eb, mt, et)
    if b.size <= CHUNK:
        # one chunk: skip the thread-pool launch (it costs milliseconds when a neighbour
        # holds a core); the result is bitwise the driver's, which adds this row to zeros
        row = np.zeros(NSTATS)
        _chunk_stats(b, t, 0, b.size, *args, _F16_TABLE, _FP8, row)
        return row
    return _stats_driver(b, t, *args, _F16_TABLE, _FP8)


@_jit
def _many_driver(b, t, offsets, cb, ct, same, mb, eb, mt, et, f16, fp8, out):
    # serial: the pairs are small (a batch is at most 32 MB a side), and a parallel loop costs
    # seconds more to compile for every width pair
    for i in range(offsets.size - 1):
        _chunk_stats(b, t, offsets[i], offsets[i + 1], cb, ct, same, mb, eb, mt, et, f16, fp8, out[i])


def delta_stats_many(base_raw, tuned_raw, offsets, dtype_base: str, dtype_tuned: str) -> np.ndarray:
    """Many small pairs at once -> float64[len(offsets) - 1, NSTATS]: row i is
    ``delta_stats(base_raw[offsets[i]:offsets[i + 1]], tuned_raw[...], ...)``, the same bits
    (each pair is one chunk of that kernel, so at most ``CHUNK`` elements). The pairs are laid
    end to end in ``base_raw`` and ``tuned_raw``; one call instead of one per pair."""
    _check_decodable(dtype_base, dtype_tuned)
    b, t = _bits(base_raw, dtype_base), _bits(tuned_raw, dtype_tuned)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    _check_offsets(offsets, b.size, t.size)
    mb, eb = _ulp_params(dtype_base)
    mt, et = _ulp_params(dtype_tuned)
    out = np.zeros((offsets.size - 1, NSTATS))
    _many_driver(b, t, offsets, DTYPES[dtype_base].code, DTYPES[dtype_tuned].code, dtype_base == dtype_tuned,
                 mb, eb, mt, et, _F16_TABLE, _FP8, out)
    return out


def _check_offsets(offsets: np.ndarray, nb: int, nt: int) -> None:
    if nb != nt:
        raise ValueError(f"base windows have {nb} elements, tuned windows {nt}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != nb:
        raise ValueError(f"offsets must run from 0 to {nb}")
    steps = np.diff(offsets)
    if steps.size and (steps.min() < 0 or steps.max() > CHUNK):
        raise ValueError(f"each pair must hold 0 to {CHUNK} elements")


@numba.njit(cache=True, nogil=True, inline="always")   # inlined in the parallel driver: its speed
def _count_chunk(b, t, lo, hi):
    acc = 0
    for i in range(lo, hi):
        acc += b[i] != t[i]
    return acc


@numba.njit(cache=True, nogil=True, parallel=True)
def _count_diff(b, t):
    n = b.size
    nchunks = (n + CHUNK - 1) // CHUNK
    parts = np.zeros(nchunks, dtype=np.int64)
    for c in prange(nchunks):
        parts[c] = _count_chunk(b, t, c * CHUNK, min(n, (c + 1) * CHUNK))
    return parts.sum()


def bytes_stats(base_raw, tuned_raw) -> np.ndarray:
    """Unit-by-unit comparison for C64/F4/F6; see ``kernels.reference.bytes_stats``."""
    b, t = reference.as_bits(base_raw), reference.as_bits(tuned_raw)
    if b.dtype != t.dtype:
        b, t = b.view(np.uint8), t.view(np.uint8)
    b, t = b.view(), t.view()
    b.flags.writeable = t.flags.writeable = False      # one compiled specialization (see ``_bits``)
    if b.shape != t.shape:
        raise ValueError(f"base window has {b.nbytes} bytes, tuned window {t.nbytes}")
    out = np.zeros(NSTATS)
    out[_I_COUNT] = b.size
    # one chunk: no thread-pool launch (see ``delta_stats``)
    out[_I_CH] = out[_I_BEY] = _count_chunk(b, t, 0, b.size) if b.size <= CHUNK else _count_diff(b, t)
    return out


@numba.njit(cache=True, nogil=True, inline="always")   # inlined in the parallel driver: its speed
def _delta_chunk(b, t, cb, ct, f16, fp8, out, lo, hi):
    """Elements [lo, hi) of ``_delta_driver``: (how many ``out`` could not hold, their squared errors)."""
    fb = np.empty(SUB)
    ft = np.empty(SUB)
    bad = 0
    err2 = 0.0
    for s0 in range(lo, hi, SUB):
        m = min(SUB, hi - s0)
        xb = fb[:m]
        xt = ft[:m]
        _decode_into(b[s0:s0 + m], cb, f16, fp8, xb)
        _decode_into(t[s0:s0 + m], ct, f16, fp8, xt)
        o = out[s0:s0 + m]
        for i in range(m):
            x = xb[i]
            y = xt[i]
            fin = (x - x) == 0.0 and (y - y) == 0.0
            d = (y - x) if fin else 0.0
            o[i] = d                            # rounded to out's dtype on the store
            if o[i] != d:
                bad += 1
                e = o[i] - d
                err2 += e * e
    return bad, err2


@numba.njit(cache=True, nogil=True, parallel=True)
def _delta_driver(b, t, cb, ct, f16, fp8, out):
    n = b.size
    nchunks = (n + CHUNK - 1) // CHUNK
    parts = np.zeros(nchunks, dtype=np.int64)
    errs = np.zeros(nchunks)
    for c in prange(nchunks):
        bad, err2 = _delta_chunk(b, t, cb, ct, f16, fp8, out, c * CHUNK, min(n, (c + 1) * CHUNK))
        parts[c] = bad
        errs[c] = err2
    total = 0.0
    for c in range(nchunks):       # in chunk order: the same sum on any thread count
        total += errs[c]
    return parts.sum(), total


def decode_delta_f32(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray) -> tuple[int, float]:
    """``out[:] = float32(T - B)`` (0 where a side is non-finite); returns how many elements
    float32 could not hold exactly and the sum of their squared errors; see the reference."""
    return _decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, out, np.float32)


def decode_delta_f64(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray) -> tuple[int, float]:
    """``out[:] = T - B`` in float64 (0 where a side is non-finite); returns (0, 0.0)."""
    return _decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, out, np.float64)


def _decode_delta(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out: np.ndarray,
                  want) -> tuple[int, float]:
    _check_decodable(dtype_base, dtype_tuned)
    b, t = _bits(base_raw, dtype_base), _bits(tuned_raw, dtype_tuned)
    if out.dtype != want or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {np.dtype(want).name} array")
    flat = out.reshape(-1)
    if flat.size != b.size or b.size != t.size:
        raise ValueError(f"out has {flat.size} elements, the windows {b.size} and {t.size}")
    args = (b, t, DTYPES[dtype_base].code, DTYPES[dtype_tuned].code, _F16_TABLE, _FP8, flat)
    # one chunk: no thread-pool launch, which waits for every worker to be scheduled (4 ms a call for a 16 x 16
    # matrix beside a busy neighbour: 72 s for 16,667 FP8 experts); 0.0 + err2 is err2, so the same bits
    bad, err2 = _delta_chunk(*args, 0, b.size) if b.size <= CHUNK else _delta_driver(*args)
    return int(bad), float(err2)


@_jit
def _round_to(x, mant, emin, top):
    """``reference.round_to`` of one float64 (``mant < 0``: float64 itself, nothing to round).

    ``x / q`` (a product with 1 / q) lies below 2**(mant + 1) <= 2**24 (q = 2**(max(e, emin) - mant), the spacing at x),
    so ``(y + 2**52) - 2**52`` is y rounded to an integer, ties to even (no fast-math anywhere),
    and the product with q is exact; a float64 subnormal x has e below every emin.
    """
    if mant < 0 or x == 0.0 or not ((x - x) == 0.0):
        return x
    ax = abs(x)
    e = ((_f64_bits(ax) >> 52) & 0x7FF) - 1023
    if e < emin:
        e = emin
    q = _as_f64(np.int64(e - mant + 1023) << 52)
    iq = _as_f64(np.int64(mant - e + 1023) << 52)       # 1 / q, exactly
    r = ((ax * iq + 4503599627370496.0) - 4503599627370496.0) * q
    if r > top:
        r = np.inf
    return r if x > 0.0 else -r


@numba.njit(cache=True, nogil=True, inline="always")   # inlined in the parallel driver: its speed
def _recast_chunk(b, t, cb, ct, mb, eb, mt, et, vm, ve, vtop, tm, te, ttop, lim, f16, fp8, lo, hi, counts):
    """Elements [lo, hi) of ``_recast_driver``, added into ``counts`` (``nv x 3``)."""
    nv = vm.size
    fb = np.empty(SUB)
    ft = np.empty(SUB)
    for s0 in range(lo, hi, SUB):
        m = min(SUB, hi - s0)
        xb = fb[:m]
        xt = ft[:m]
        _decode_into(b[s0:s0 + m], cb, f16, fp8, xb)
        _decode_into(t[s0:s0 + m], ct, f16, fp8, xt)
        for i in range(m):
            x = xb[i]
            y = xt[i]
            finx = (x - x) == 0.0
            within = x == y or (x != x and y != y)
            if finx and (y - y) == 0.0 and not within:
                d = abs(y - x)
                within = _f64_bits(d) <= _half_ulp_bits(min(_f64_bits(abs(x)), _f64_bits(abs(y))), mb, eb, mt, et)
            if within and abs(x) < lim:
                continue
            for v in range(nv):
                cv = _round_to(_round_to(x, vm[v], ve[v], vtop[v]), tm, te, ttop)
                ovf = finx and not ((cv - cv) == 0.0)
                eq = cv == y or (cv != cv and y != y)
                sat = ovf and y == (ttop if cv > 0.0 else -ttop)
                if not (within or eq or sat):
                    counts[v, 0] += 1
                if ovf and eq:
                    counts[v, 1] += 1
                if sat:
                    counts[v, 2] += 1


@numba.njit(cache=True, nogil=True, parallel=True)
def _recast_driver(b, t, cb, ct, mb, eb, mt, et, vm, ve, vtop, tm, te, ttop, lim, f16, fp8):
    """``lim``: below it no step of any chain can overflow, so a pair not beyond rounding adds
    nothing to any count and its chains are not evaluated."""
    n = b.size
    nv = vm.size
    nchunks = (n + CHUNK - 1) // CHUNK
    parts = np.zeros((nchunks, nv, 3), dtype=np.int64)
    for c in prange(nchunks):
        _recast_chunk(b, t, cb, ct, mb, eb, mt, et, vm, ve, vtop, tm, te, ttop, lim, f16, fp8,
                      c * CHUNK, min(n, (c + 1) * CHUNK), parts[c])
    out = np.zeros((nv, 3), dtype=np.int64)
    for c in range(nchunks):
        out += parts[c]
    return out


def _recast_params(dtype: str | None) -> tuple[int, int, float]:
    """(mant, emin, largest finite) of a chain step; mant -1 for no rounding (None, F64)."""
    if dtype is None:
        return -1, 0, np.inf
    d = DTYPES[dtype]
    return -1 if dtype == "F64" else d.mant_bits, d.emin, reference.max_finite(dtype)


def _counts(chunk, driver, args, rows: int, cols: int) -> np.ndarray:
    """The integer counts of a chunk kernel over the window ``args[0]`` (float64[rows, cols]): one chunk called alone
    (no thread-pool launch, see ``delta_stats``), more through its parallel driver; the same numbers either way."""
    n = args[0].size
    if n <= CHUNK:
        out = np.zeros((rows, cols), dtype=np.int64)
        chunk(*args, 0, n, out)
    else:
        out = driver(*args)
    return out.astype(np.float64)


def _threaded_counts(chunk, args, rows: int, cols: int) -> np.ndarray:
    """``_counts`` without a parallel driver: the ``CHUNK``-element pieces of the window ``args[0]`` through the
    nogil chunk kernel on as many Python threads as this thread's numba threads. For a chunk whose work per element
    is heavy (``twin_counts``: 20-30 ns of CPU an element, 1-2 ms a chunk) the threads cost nothing measurable, and
    the parallel driver's compile (about 4 s a signature, the chunk compiled again inside it) is saved, in
    ``precompile`` and in a first run alike. Integer counts: the same numbers on any thread count."""
    n = args[0].size
    spans = [(lo, min(n, lo + CHUNK)) for lo in range(0, n, CHUNK)] or [(0, 0)]

    def one(span):
        out = np.zeros((rows, cols), dtype=np.int64)
        chunk(*args, span[0], span[1], out)
        return out

    workers = min(numba.get_num_threads(), len(spans))
    if workers <= 1:
        parts = [one(s) for s in spans]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, spans))
    return np.sum(parts, axis=0).astype(np.float64)


def _recast_bits(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, vias) -> tuple[np.ndarray, np.ndarray]:
    """Both windows' bits for ``recast_counts`` and ``twin_counts``, the sides and intermediates checked to be
    IEEE formats a cast is modelled for and the windows of one length."""
    for name in (dtype_base, dtype_tuned, *vias):
        if name not in reference.RECAST_DTYPES:
            raise ValueError(f"dtype {name} is not one a cast chain is modelled for "
                             f"({', '.join(reference.RECAST_DTYPES)})")
    b, t = _bits(base_raw, dtype_base), _bits(tuned_raw, dtype_tuned)
    if b.size != t.size:
        raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
    return b, t


def recast_counts(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str,
                  vias=reference.RECAST_VIAS) -> np.ndarray:
    """Which elements each cast chain explains -> float64[len(vias), 3]; see
    ``kernels.reference.recast_counts`` (integer counts: equal to it exactly, on any thread count)."""
    b, t = _recast_bits(base_raw, tuned_raw, dtype_base, dtype_tuned, [v for v in vias if v is not None])
    steps = [_recast_params(v) for v in vias]
    vm = np.array([s[0] for s in steps], dtype=np.int64)
    ve = np.array([s[1] for s in steps], dtype=np.int64)
    vtop = np.array([s[2] for s in steps], dtype=np.float64)
    tm, te, ttop = _recast_params(dtype_tuned)
    mb, eb = _ulp_params(dtype_base)
    mt, et = _ulp_params(dtype_tuned)
    lim = 0.5 * min([ttop, *vtop.tolist()])
    args = (b, t, DTYPES[dtype_base].code, DTYPES[dtype_tuned].code, mb, eb, mt, et, vm, ve, vtop, tm, te, ttop,
            lim, _F16_TABLE, _FP8)
    return _counts(_recast_chunk, _recast_driver, args, vm.size, 3)


@numba.njit(cache=True, nogil=True, inline="always")
def _decode_pair(b, t, cb, ct, f16, fp8, s0, m, fb, ft):
    """Elements [s0, s0 + m) of both raw windows decoded into the scratch ``fb``, ``ft``: their first m."""
    _decode_into(b[s0:s0 + m], cb, f16, fp8, fb[:m])
    _decode_into(t[s0:s0 + m], ct, f16, fp8, ft[:m])
    return fb[:m], ft[:m]


@_jit
def _spacing(a, mant, emin):
    """``reference._spacing`` of one finite magnitude: (spacing above, spacing below)."""
    bits = _f64_bits(a)
    e = ((bits >> 52) & 0x7FF) - 1023
    if e < emin:
        e = emin
    up = _as_f64(np.int64(e - mant + 1023) << 52)
    if e > emin and a != 0.0 and (bits & 0xFFFFFFFFFFFFF) == 0:
        return up, 0.5 * up
    return up, up


@_jit
def _rounds_from(v, mant, emin, top, ovf):
    """``reference.rounds_from`` of one value: (lo, hi, lo_closed, hi_closed); ``mant < 0``: F64."""
    if v != v:
        return np.inf, -np.inf, True, True
    if mant < 0:
        return v, v, True, True
    a = abs(v)
    if a == np.inf:
        lo_m, hi_m, loc, hic = ovf, np.inf, True, True
    else:
        up, down = _spacing(a, mant, emin)
        even = (np.int64(a / up) & 1) == 0          # a / up: an integer below 2 ** 25
        hi_m = ovf if a == top else a + 0.5 * up
        hic = even and a != top
        lo_m = a - 0.5 * down
        loc = even
    if v < 0.0:
        return -hi_m, -lo_m, hic, loc
    return lo_m, hi_m, loc, hic


@_jit
def _next_up(r, mant, emin, top):
    """``reference._next_up`` of one value."""
    if r == -np.inf:
        return -top
    if r == np.inf:
        return np.inf
    a = abs(r)
    up, down = _spacing(a, mant, emin)
    out = -(a - down) if r < 0.0 else a + up
    return np.inf if out > top else out


@_jit
def _clamp_low(a, ac, lo, hi):
    """``reference._clamp_low`` of one end: (x, included)."""
    if a < -hi or (a == -hi and ac):
        return -np.inf, True
    if a < -lo or (a == -lo and ac):
        return a, ac
    if a < 0.0 or (a == 0.0 and ac):
        return 0.0, True
    if a < lo or (a == lo and ac):
        return 0.0, False
    if a < hi or (a == hi and ac):
        return a, ac
    return np.inf, True


@_jit
def _chain_from(v, row, pm, pe, ptop, povf):
    """``reference.chain_from`` of one value; ``row``: [stored dtype, last via, first via] (indices into the
    parameter arrays, -1 for none; a step of mantissa -2 is a clamp to magnitudes [povf, ptop])."""
    s = row[0]
    lo, hi, lc, hc = _rounds_from(v, pm[s], pe[s], ptop[s], povf[s])
    for j in range(1, row.size):
        d = row[j]
        if d < 0:
            break
        m, e, top, ovf = pm[d], pe[d], ptop[d], povf[d]
        if m == -2:
            p, pc = _clamp_low(lo, lc, ovf, top)
            q, qc = _clamp_low(-hi, hc, ovf, top)
            q = -q
            if p > q or (p == q and not (pc and qc)):
                return np.inf, -np.inf, True, True
            lo, hi, lc, hc = p, q, pc, qc
            continue
        u = _round_to(lo, m, e, top)
        if u < lo or (u == lo and not lc):
            u = _next_up(u, m, e, top)
        w = -_round_to(-hi, m, e, top)
        if w > hi or (w == hi and not hc):
            w = -_next_up(-w, m, e, top)
        ok = u <= w and not (u == np.inf and (lo > u or (lo == u and not lc))) \
            and not (w == -np.inf and (hi < w or (hi == w and not hc)))
        if not ok:
            return np.inf, -np.inf, True, True
        if u == w:
            lo, hi, lc, hc = _rounds_from(u, m, e, top, ovf)
        else:
            lo, _, lc, _ = _rounds_from(u, m, e, top, ovf)
            _, hi, _, hc = _rounds_from(w, m, e, top, ovf)
    return lo, hi, lc, hc


@_jit
def _chain_apply(x, row, pm, pe, ptop, povf):
    """``reference.chain_apply`` of one float64: the steps of ``row`` (``_chain_from``'s: stored dtype, last via,
    first via) from the first via to the stored dtype."""
    for j in range(row.size - 1, -1, -1):
        d = row[j]
        if d < 0:
            continue
        if pm[d] == -2:                                  # a clamp of the magnitudes to [povf, ptop]
            a = abs(x)
            if 0.0 < a < povf[d]:
                x = povf[d] if x > 0.0 else -povf[d]
            elif ptop[d] < a < np.inf:
                x = ptop[d] if x > 0.0 else -ptop[d]
        else:
            x = _round_to(x, pm[d], pe[d], ptop[d])
    return x


#: candidate originals ``_twin_chunk`` tries before the intervals
NCAND = 4


@_jit
def _toward(v, w):
    """The float64 next to ``v`` in the direction of ``w`` (``v`` where they are equal or either is NaN)."""
    if v == w or v != v or w != w:
        return v
    if v == 0.0:
        return 5e-324 if w > 0.0 else -5e-324
    bits = _f64_bits(v)
    step = np.int64(1) if (w > v) == (v > 0.0) else np.int64(-1)    # away from zero: the magnitude's bits up
    return _as_f64(bits + step)


@_jit
def _twin_chunk(b, t, cb, ct, chb, cht, keys, pm, pe, ptop, povf, f16, fp8, lo, hi, counts):
    """Elements [lo, hi) of ``twin_counts``, added into ``counts`` (``nk x 2``). ``chb``, ``cht``: each side's
    chains (rows of ``_chain_from``); ``keys``: (base chain, tuned chain) index pairs."""
    nb = chb.shape[0]
    nt = cht.shape[0]
    nk = keys.shape[0]
    fb = np.empty(SUB)
    ft = np.empty(SUB)
    ib = np.empty((nb, 2))
    it = np.empty((nt, 2))
    cbf = np.empty((nb, 2), dtype=np.bool_)
    ctf = np.empty((nt, 2), dtype=np.bool_)
    gb = np.empty((nb, NCAND), dtype=np.bool_)
    gt = np.empty((nt, NCAND), dtype=np.bool_)
    cand = np.empty(NCAND)
    done = np.empty(NCAND, dtype=np.bool_)
    pref = 0
    for s0 in range(lo, hi, SUB):
        xb, xt = _decode_pair(b, t, cb, ct, f16, fp8, s0, min(SUB, hi - s0), fb, ft)
        for i in range(xb.size):
            x = xb[i]
            y = xt[i]
            if x == y or (x != x and y != y):
                continue
            one_inf = (abs(x) == np.inf) != (abs(y) == np.inf)
            # a fast exact accept: a candidate original (either stored value, or either one float64 step towards the
            # other: where one side's rounding put the original on a tie of the next, the original was just beside
            # it) that goes through both chains to the two stored values is a witness that the intervals meet. The
            # candidate that was one last time is tried first, each computed once an element; only elements no
            # candidate explains get the intervals
            cand[0] = x
            cand[1] = y
            cand[2] = _toward(x, y)
            cand[3] = _toward(y, x)
            done[:] = False
            exact = False
            for k in range(nk):
                p = keys[k, 0]
                q = keys[k, 1]
                hit = False
                for r in range(NCAND):
                    c = (pref + r) % NCAND
                    if not done[c]:
                        done[c] = True
                        for j in range(nb):
                            gb[j, c] = _chain_apply(cand[c], chb[j], pm, pe, ptop, povf) == x
                        for j in range(nt):
                            gt[j, c] = _chain_apply(cand[c], cht[j], pm, pe, ptop, povf) == y
                    if gb[p, c] and gt[q, c]:
                        hit = True
                        pref = c
                        break
                if hit:
                    if one_inf:
                        counts[k, 1] += 1
                    continue
                if not exact:
                    exact = True
                    for j in range(nb):
                        ib[j, 0], ib[j, 1], cbf[j, 0], cbf[j, 1] = _chain_from(x, chb[j], pm, pe, ptop, povf)
                    for j in range(nt):
                        it[j, 0], it[j, 1], ctf[j, 0], ctf[j, 1] = _chain_from(y, cht[j], pm, pe, ptop, povf)
                l1, h1, l2, h2 = ib[p, 0], ib[p, 1], it[q, 0], it[q, 1]
                if l1 > l2:
                    lo_, lc = l1, cbf[p, 0]
                elif l2 > l1:
                    lo_, lc = l2, ctf[q, 0]
                else:
                    lo_, lc = l1, cbf[p, 0] and ctf[q, 0]
                if h1 < h2:
                    hi_, hc = h1, cbf[p, 1]
                elif h2 < h1:
                    hi_, hc = h2, ctf[q, 1]
                else:
                    hi_, hc = h1, cbf[p, 1] and ctf[q, 1]
                if lo_ < hi_ or (lo_ == hi_ and lc and hc):
                    if one_inf:
                        counts[k, 1] += 1
                else:
                    counts[k, 0] += 1


def _step_params(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The steps ``names`` (dtypes, ``reference.CLAMPS``) as ``_chain_from``'s parameter arrays: mantissa bits (-1:
    F64, -2: a clamp), least exponent, largest finite value (a clamp's upper end), overflow threshold (its lower)."""
    clamp = [d in reference.CLAMPS for d in names]
    pm = np.array([-2 if c else -1 if d == "F64" else DTYPES[d].mant_bits for d, c in zip(names, clamp)],
                  dtype=np.int64)
    pe = np.array([0 if c else DTYPES[d].emin for d, c in zip(names, clamp)], dtype=np.int64)
    ptop = np.array([reference.CLAMPS[d][1] if c else np.inf if d == "F64" else reference.max_finite(d)
                     for d, c in zip(names, clamp)], dtype=np.float64)
    povf = np.array([reference.CLAMPS[d][0] if c else reference.overflow_at(d) for d, c in zip(names, clamp)],
                    dtype=np.float64)
    return pm, pe, ptop, povf


@_jit
def _chain_apply_all(x, row, pm, pe, ptop, povf, out):
    for i in range(x.size):
        out[i] = _chain_apply(x[i], row, pm, pe, ptop, povf)


def chain_apply(x, dtype: str, vias=()) -> np.ndarray:
    """``reference.chain_apply`` through the scalar step ``twin_counts``' fast accept uses: float64 originals rounded
    through ``vias`` (at most two roundings, clamps besides) and then to ``dtype``."""
    names = list(dict.fromkeys([dtype, *vias]))
    row = np.array([names.index(dtype)] + [names.index(v) for v in reversed(list(vias))], dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    out = np.empty_like(x)
    _chain_apply_all(x, row, *_step_params(names), out)
    return out


def twin_counts(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, keys) -> np.ndarray:
    """Which elements two roundings of one original explain -> float64[len(keys), 2]; see
    ``kernels.reference.twin_counts`` (integer counts: equal to it exactly, on any thread count)."""
    keys = [(tuple(vb), tuple(vt)) for vb, vt in keys]
    steps = [v for k in keys for s in k for v in s]
    b, t = _recast_bits(base_raw, tuned_raw, dtype_base, dtype_tuned, [v for v in steps if v not in reference.CLAMPS])
    names = list(dict.fromkeys([dtype_base, dtype_tuned] + steps))
    pm, pe, ptop, povf = _step_params(names)
    sides = []
    for stored, chains in ((dtype_base, [k[0] for k in keys]), (dtype_tuned, [k[1] for k in keys])):
        uniq = list(dict.fromkeys(chains))
        rows = np.full((max(len(uniq), 1), 3), -1, dtype=np.int64)
        for i, vias in enumerate(uniq):
            if len(vias) > 2:
                raise ValueError(f"at most two roundings before the stored dtype, not {len(vias)}")
            rows[i, :1 + len(vias)] = [names.index(stored)] + [names.index(v) for v in reversed(vias)]
        sides.append((uniq, rows))
    (ub, chb), (ut, cht) = sides
    kix = np.array([[ub.index(vb), ut.index(vt)] for vb, vt in keys], dtype=np.int64).reshape(-1, 2)
    args = (b, t, DTYPES[dtype_base].code, DTYPES[dtype_tuned].code, chb, cht, kix, pm, pe, ptop, povf,
            _F16_TABLE, _FP8)
    return _threaded_counts(_twin_chunk, args, len(keys), 2)


@_jit
def _noise_scatter(u, shift, mask, table, p0, n, rows, cols):
    r, c = p0 // n, p0 % n
    acc = rows[r]
    for k in range(u.size):
        # through int64: a uint64 mixed with an int64 would be float64 in numba; an F64 word
        # with its sign bit set turns negative, and the mask keeps only the exponent's bits
        v = table[(np.int64(u[k]) >> shift) & mask]
        acc += v
        cols[c] += v
        c += 1
        if c == n:
            rows[r] = acc
            c = 0
            r += 1
            if r < rows.size:
                acc = rows[r]
    if c:
        rows[r] = acc


def noise_scatter(bits, shift: int, mask: int, table, p0: int, n: int, rows, cols) -> None:
    """``reference.noise_scatter`` (storage-rounding variance summed per row and per column of
    one window), in one pass: the same sums in the same order, so the same bits."""
    u = np.asarray(bits).reshape(-1)
    if u.size == 0:
        return
    if u.dtype.kind != "u":
        raise ValueError(f"bits must be unsigned integers, got {u.dtype}")
    if n < 1 or p0 < 0 or (p0 + u.size + n - 1) // n > rows.size or n > cols.size:
        raise ValueError(f"elements {p0}..{p0 + u.size} do not fit a {rows.size} x {n} matrix "
                         f"({cols.size} column sums)")
    if rows.dtype != np.float64 or cols.dtype != np.float64:
        raise ValueError("rows and cols must be float64")
    table = np.ascontiguousarray(table, np.float64).reshape(-1)
    if not (0 <= shift < 8 * u.dtype.itemsize and 0 <= mask < table.size):   # numba checks no index
        raise ValueError(f"shift {shift} and mask {mask} do not index a table of {table.size} "
                         f"from {u.dtype} words")
    u, table = u.view(), table.view()
    u.flags.writeable = table.flags.writeable = False       # one compiled specialization (see ``_bits``)
    _noise_scatter(u, np.int64(shift), np.int64(mask), table, np.int64(p0), np.int64(n), rows, cols)


def set_threads(n: int | None) -> None:
    """Use ``n`` numba threads in this thread's kernel calls (None: all that numba started)."""
    top = numba.config.NUMBA_NUM_THREADS
    if n is not None and n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    numba.set_num_threads(top if n is None else min(int(n), top))


def get_threads() -> int:
    return numba.get_num_threads()


def precompile(dtype_pairs) -> None:
    """Compile, or load from numba's cache, every kernel a comparison of these ``(base, tuned)`` dtype pairs
    calls: statistics (one chunk and the parallel driver), the batched small pairs, the float32 and float64
    deltas, the cast-chain and two-roundings counts, the rank floor's rounding variance, the byte comparison of
    undecodable dtypes. Each is called through its wrapper on a few zeros, so it meets the argument types the comparison's calls have (read-only windows,
    the same scalar types) and compiles the same specializations.

    ``weightdiff.measure.precompile`` runs it in a child process before a comparison: the LLVM state of a
    compile (about 100 MB per parallel kernel) stays with the process that compiled, and this way that is
    the child; the comparison loads the machine code from the cache."""
    for db, dt in dtype_pairs:
        sb, st = np.dtype(DTYPES[db].storage), np.dtype(DTYPES[dt].storage)
        decodable = DTYPES[db].decodable and DTYPES[dt].decodable
        for n in (1, CHUNK + 1):            # one chunk: the chunk functions alone; more: the parallel drivers
            b, t = np.zeros(n, sb), np.zeros(n, st)
            b.flags.writeable = t.flags.writeable = False       # as a mapped window is
            if not decodable:
                if db == dt:                # undecodable and unlike dtypes are not compared at all
                    bytes_stats(b, t)
                continue
            delta_stats(b, t, db, dt)
            decode_delta_f32(b, t, db, dt, np.empty(n, np.float32))
            decode_delta_f64(b, t, db, dt, np.empty(n, np.float64))
            if db in reference.RECAST_DTYPES and dt in reference.RECAST_DTYPES:
                recast_counts(b, t, db, dt)
                twin_counts(b, t, db, dt, [((), ("F16",))])      # two roundings of one original
        if decodable:
            delta_stats_many(np.zeros(2, sb), np.zeros(2, st), np.array([0, 1, 2], np.int64), db, dt)
        for name, s in ((db, sb), (dt, st)):   # the rank floor's storage-rounding variance of each side
            if DTYPES[name].kind == "float" and DTYPES[name].decodable:
                noise_scatter(np.zeros(2, _BITS[s.itemsize]), 0, 0, np.zeros(1), 0, 2, np.zeros(1), np.zeros(2))
