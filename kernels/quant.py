"""Dequantizers of quantized checkpoint formats, each with its per-element noise floor.

Unlike ``reference``/``cpu`` (which compare two stored tensors), these turn one stored,
quantized tensor plus its companions (scales, zero points, group index, absmax) into
float32 values, in the arithmetic of the reference implementation, so that values
equal the reference's bit for bit where the reference is deterministic (the product is
rounded to the scale's dtype, as torch does when it multiplies in that dtype). Each
dequantizer also returns ``floor``: the largest ``|x - value|`` that a faithful
round-to-nearest quantization of some float ``x`` into this code with these scales
could leave (see docs/methodology.md, "Quantization noise floors"):

    floor = (h(code) * |s| + |value|) * (2**-m_s + 2**-(m_out + 1))  +  h(code) * |s|

``h(code)`` is half the larger gap to the neighbouring codes in grid units (0.5 on a
uniform integer grid) plus one whole gap for the two extreme codes (a value clipped at
the edge of the range lands there from anywhere beyond it); ``m_s`` is the mantissa
width of the scale's dtype (the scale, and the division by it, were rounded to that
dtype) and ``m_out`` that of the dequantized output.

Pure numpy; no file, model or name knowledge. Packed layouts follow, in order:
compressed-tensors ``pack_to_int32`` (dense LSB-first bit stream per row),
GPTQ/AutoGPTQ (32/bits codes per int32 along the input dimension, ``qzeros`` along the
output dimension, stored zero minus one in the v1 format; 3 bits: 32 codes in a bit stream of three words), AWQ GEMM (the interleaved
order ``AWQ_ORDER``), bitsandbytes 4-bit (two codes per byte, high nibble first) and
MXFP4 (two e2m1 codes per byte, low nibble first, e8m0 block exponents) and MLX (``mlx.core.quantize``: one
LSB-first bit stream of codes per row in uint32 words, as compressed-tensors packs them).

>>> q = np.array([[0x76543210]], dtype=np.int32)          # eight 4-bit codes 0..7
>>> unpack_cols(q, 4).tolist()
[[0, 1, 2, 3, 4, 5, 6, 7]]
>>> unpack_cols(q, 4, AWQ_ORDER).tolist()                 # AWQ stores 0,2,4,6,1,3,5,7
[[0, 4, 1, 5, 2, 6, 3, 7]]
"""

from __future__ import annotations

import numpy as np

from .dtypes import FP8_TABLES

__all__ = [
    "AWQ_ORDER", "FP4_E2M1", "MANT", "round_to", "codebook_halfwidth", "unpack_dense_int32",
    "gptq_unit", "unpack_rows", "unpack_cols", "dequant_int", "dequant_codebook", "dequant_fp8",
    "gptq_rows", "gptq_rows_numpy", "fp8_rows", "awq_rows", "awq_rows_numpy", "bnb4_flat", "bnb4_gather", "BNB4_ORT_TABLES",
    "bnb_nested_absmax", "bnb_int8_rows", "mxfp4_rows", "mlx_affine_rows", "mlx_fp_rows",
    "MLX_FP_MODES", "ct_fp4_rows", "int_grid_rows", "int_grid_rows_numpy",
]

#: AutoAWQ's pack order: the code of output column 8k+AWQ_ORDER[i] sits in nibble i of word k
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: ONNX Runtime's MatMulBnb4 code values (contrib_ops blockwise_quant_block_bnb4.h: fp4_qaunt_map,
#: nf4_qaunt_map), by its quant_type attribute: 0 FP4, 1 NF4 (the bitsandbytes tables)
BNB4_ORT_TABLES = {
    0: np.array([0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
                 -0.0, -5.208333333e-03, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25], np.float32),
    1: np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0], np.float32)}
for _t in BNB4_ORT_TABLES.values():
    _t.setflags(write=False)

#: e2m1 (MXFP4) values of the 16 codes, as transformers' mxfp4.FP4_VALUES
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
FP4_E2M1.setflags(write=False)
#: explicit mantissa bits of the dtypes a scale or an output may have
MANT = {"F32": 23, "F16": 10, "BF16": 7, "F64": 52}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to nearest-even in ``dtype`` (F32, F16, BF16), as float32.

    >>> round_to(np.array([1.00390625], np.float32), "BF16").tolist()   # 1 + 2**-8: a tie, to even
    [1.0]
    """
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        u = x.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
        r = np.where(np.isnan(x), u | np.uint32(0x00400000), r).astype(np.uint32)
        return (r & np.uint32(0xFFFF0000)).view(np.float32)
    raise ValueError(f"cannot round to {dtype}")


def _rel_tol(scale_dtype: str, out_dtype: str) -> float:
    return 2.0 ** -MANT[scale_dtype] + 2.0 ** -(MANT[out_dtype] + 1)


def codebook_halfwidth(values: np.ndarray) -> np.ndarray:
    """Per code: half the larger gap to its neighbours among the finite code values, plus
    one whole gap for the smallest and largest (clipping); NaN codes get 0.

    >>> codebook_halfwidth(np.array([-1.0, 0.0, 0.5, 1.0], np.float32)).tolist()
    [1.5, 0.5, 0.25, 0.75]
    """
    v = np.asarray(values, dtype=np.float64)
    fin = np.unique(v[np.isfinite(v)])
    out = np.zeros(v.shape, dtype=np.float64)
    if fin.size < 2:
        return out.astype(np.float32)
    for i, x in enumerate(v):
        if not np.isfinite(x):
            continue
        k = int(np.searchsorted(fin, x))
        lo = x - fin[k - 1] if k > 0 else None
        hi = fin[k + 1] - x if k + 1 < fin.size else None
        if lo is None:
            out[i] = hi * 1.5
        elif hi is None:
            out[i] = lo * 1.5
        else:
            out[i] = max(lo, hi) / 2
    return out.astype(np.float32)


# -- unpacking ---------------------------------------------------------------------

def unpack_dense_int32(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """compressed-tensors ``unpack_from_int32`` without the offset: the unsigned codes of a
    [rows, ceil(cols * bits / 32)] int32 array packed as one LSB-first bit stream per row.

    >>> unpack_dense_int32(np.array([[0x76543210]], np.int32), 4, 8).tolist()
    [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"{bits}-bit codes cannot be packed densely into int32")
    w = np.ascontiguousarray(words).astype(np.int64) & 0xFFFFFFFF
    rows = w.shape[0]
    pos = np.arange(cols, dtype=np.int64) * bits
    word, off = pos // 32, pos % 32
    if word.size and word[-1] >= w.shape[1]:
        raise ValueError(f"{w.shape[1]} int32 words per row hold fewer than {cols} {bits}-bit codes")
    lo = w[:, word] >> off
    spill = off + bits > 32
    if spill.any():
        nxt = np.minimum(word + 1, w.shape[1] - 1)
        lo = lo | np.where(spill, w[:, nxt] << (32 - off), 0)
    return (lo & ((1 << bits) - 1)).astype(np.uint8).reshape(rows, cols)


def _check_pack(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit codes are not packed whole into int32 (2, 4 or 8 bits)")
    return 32 // bits


def gptq_unit(bits: int) -> tuple[int, int]:
    """(codes, int32 words) of one unit of GPTQ's packing: 32/bits codes in a word at 2, 4 and 8 bits; 32 codes in
    three words at 3 bits (AutoGPTQ's ``pack``: one LSB-first bit stream, codes 10 and 21 straddling two words)."""
    return (32, 3) if bits == 3 else (_check_pack(bits), 1)


def _unpack_stream3(w: np.ndarray) -> np.ndarray:
    """uint32 words [3k, C], 3-bit codes in a bit stream down each column (three words per 32 codes, LSB first)
    -> codes [32k, C] uint8."""
    if w.shape[0] % 3:
        raise ValueError(f"3-bit codes come in units of three int32 words, not {w.shape[0]}")
    x = w.reshape(w.shape[0] // 3, 3, *w.shape[1:]).astype(np.uint64)
    lo, hi = x[:, 0] | (x[:, 1] << np.uint64(32)), x[:, 2]          # bits 0-63 and 64-95 of each unit
    out = np.empty((x.shape[0], 32, *w.shape[1:]), np.uint8)
    for j in range(32):
        b = 3 * j
        v = lo >> np.uint64(b) if b <= 61 else hi >> np.uint64(b - 64) if b >= 64 else \
            (lo >> np.uint64(b)) | (hi << np.uint64(64 - b))
        out[:, j] = v & np.uint64(7)
    return out.reshape(x.shape[0] * 32, *w.shape[1:])


def unpack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ ``qweight`` [R, C] int32 -> codes [R * 32/bits, C]: code i of a column sits at
    bit ``bits * (i % (32/bits))`` of word ``i // (32/bits)``; at 3 bits, bit ``3 i`` of the stream of three
    words per 32 codes (``gptq_unit``)."""
    if bits == 3:
        return _unpack_stream3(np.ascontiguousarray(q).view(np.uint32))
    pf = _check_pack(bits)
    w = np.ascontiguousarray(q).view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, :, None]
    out = (w[:, None, :] >> shifts) & np.uint32((1 << bits) - 1)
    return out.astype(np.uint8).reshape(w.shape[0] * pf, w.shape[1])


def unpack_cols(q: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """[R, C] int32 -> codes [R, C * 32/bits], code j of word k at bit ``bits * (j % pf)``;
    with ``order`` (AWQ), nibble i of word k holds column ``pf*k + order[i]``. At 3 bits (GPTQ's ``qzeros``),
    a stream of three words per 32 codes along each row, as ``unpack_rows``."""
    if bits == 3 and order is None:
        return np.ascontiguousarray(_unpack_stream3(np.ascontiguousarray(q).view(np.uint32).T).T)
    pf = _check_pack(bits)
    w = np.ascontiguousarray(q).view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, None, :]
    out = ((w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)
    if order is not None:
        if sorted(order) != list(range(pf)):
            raise ValueError(f"pack order {order} is not a permutation of 0..{pf - 1}")
        dst = np.empty_like(out)
        dst[:, :, list(order)] = out
        out = dst
    return out.reshape(w.shape[0], w.shape[1] * pf)


# -- the two dequantization rules ------------------------------------------------------

def dequant_int(q: np.ndarray, zero: np.ndarray | float, scale: np.ndarray, scale_dtype: str,
                qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform grid: ``value = round_{scale dtype}((q - zero) * scale)``; broadcasting arrays.

    ``q`` are the integer codes as the quantizer clamped them to [qmin, qmax] (codes at
    either end may be clipped and get one more step in the floor).

    >>> v, f = dequant_int(np.array([3, 7]), 0, np.array([0.5], np.float32), "F32", -8, 7)
    >>> v.tolist(), [round(float(e), 5) for e in f]     # 7 is the top code: one more step
    ([1.5, 3.5], [0.25, 0.75])
    """
    qi = np.asarray(q).astype(np.int32)
    diff = (qi - np.asarray(zero).astype(np.int32)).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32)
    value = round_to(diff * s, scale_dtype)
    edge = (qi <= qmin) | (qi >= qmax)
    tol = np.float32(_rel_tol(scale_dtype, scale_dtype))
    floor = (np.float32(0.5) + edge.astype(np.float32)) * np.abs(s) * (1 + tol) + np.abs(value) * tol
    return np.atleast_1d(value), np.atleast_1d(floor.astype(np.float32))


def dequant_codebook(codes: np.ndarray, table: np.ndarray, scale: np.ndarray, scale_dtype: str,
                     out_dtype: str, halfwidth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codebook grid (NF4, FP4, e2m1, fp8): ``value = round_{out}(table[code] * scale)``."""
    table = np.asarray(table, dtype=np.float32)
    hw = codebook_halfwidth(table) if halfwidth is None else halfwidth
    c = np.asarray(codes).astype(np.intp)
    s = np.asarray(scale, dtype=np.float32)
    value = round_to(table[c] * s, out_dtype)
    tol = np.float32(_rel_tol(scale_dtype, out_dtype))
    floor = hw[c] * np.abs(s) * (1 + tol) + np.abs(value) * tol
    return value, floor.astype(np.float32)


_FP8_HW = {name: codebook_halfwidth(t) for name, t in FP8_TABLES.items() if name != "F8_E8M0"}


def dequant_fp8(raw: np.ndarray, fp8: str, scale: np.ndarray, scale_dtype: str,
                out_dtype: str = "F32") -> tuple[np.ndarray, np.ndarray]:
    """fp8 bits (uint8) times a broadcast scale: DeepSeek-V3 ``weight_scale_inv`` blocks,
    FBGEMM and compressed-tensors ``weight_scale`` (both multiply)."""
    return dequant_codebook(np.asarray(raw, dtype=np.uint8), FP8_TABLES[fp8], scale, scale_dtype,
                            out_dtype, _FP8_HW[fp8])


# -- formats ---------------------------------------------------------------------------

_NUMBA_GPTQ = None
_ROUND_MODE = {"F32": 0, "F16": 1, "BF16": 2}
#: output features GPTQ's and AWQ's kernels dequantize side by side (each a row of the [out, in] output written
#: down the input features): 8 streams of values and 8 of floors, where 16 of each ran 10.7 against 7.2 ns an
#: element for AWQ (8.5 against 7.3 for GPTQ) on this machine; the values do not depend on it
_OUT_BLOCK = 8


def _gptq_numba():
    """The numba twin of ``gptq_rows_numpy``: one pass, no temporaries, output in [out, in] order,
    ``_OUT_BLOCK`` output features at a time so qweight is read and the output written in cache lines."""
    global _NUMBA_GPTQ
    if _NUMBA_GPTQ is None:
        import numba

        from .numba_cache import ensure

        ensure()     # numba places its cache when it decorates

        @numba.njit(cache=True, nogil=True, inline="always")
        def rnd(v, mode):
            if mode == 0 or not np.isfinite(v):
                return v
            u = np.int64(np.float32(v).view(np.uint32))
            if mode == 2:
                u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
                return np.uint32(u).view(np.float32)
            a = abs(v)
            if a < 6.103515625e-05:                 # fp16 subnormal: multiples of 2**-24
                return np.float32(np.round(np.float64(v) * 16777216.0) / 16777216.0)
            if a >= 65520.0:
                return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
            u = (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000
            return np.uint32(u).view(np.float32)

        @numba.njit(cache=True, nogil=True)
        def kernel(qweight, qzeros, scales, g_idx, bits, v1, r0, r1, col0, tol, mode, val, flo):
            # qweight holds output columns col0 on (a band of them)
            pf = 32 // bits
            mask = (1 << bits) - 1
            for j0 in range(r0, r1, _OUT_BLOCK):
                j1 = min(j0 + _OUT_BLOCK, r1)
                for k in range(qweight.shape[0]):
                    for j in range(j0, j1):
                        word = np.int64(qweight[k, j - col0]) & 0xFFFFFFFF
                        zshift = bits * (j % pf)
                        for b in range(pf):
                            i = k * pf + b
                            q = (word >> (bits * b)) & mask
                            g = g_idx[i]
                            z = ((np.int64(qzeros[g, j // pf]) & 0xFFFFFFFF) >> zshift) & mask
                            if v1:
                                z = (z + 1) & mask
                            sc = scales[g, j]
                            v = rnd(np.float32(q - z) * sc, mode)
                            val[j - r0, i] = v
                            edge = 1.5 if (q == 0 or q == mask) else 0.5
                            flo[j - r0, i] = np.float32(edge * abs(sc) * (1.0 + tol) + abs(v) * tol)

        @numba.njit(cache=True, nogil=True)
        def codebook(codes, table, hw, srow, bw, tol, mode, val, flo):
            for r in range(codes.shape[0]):
                for c in range(codes.shape[1]):
                    code = codes[r, c]
                    sc = srow[r, c // bw]
                    v = rnd(table[code] * sc, mode)
                    val[r, c] = v
                    flo[r, c] = np.float32(hw[code] * abs(sc) * (1.0 + tol) + abs(v) * tol)

        @numba.njit(cache=True, nogil=True)
        def stream(qweight, zeros, scales, g_idx, bits, codes, words, r0, r1, col0, tol, mode, val, flo):
            # ``kernel`` for codes in a bit stream of ``words`` words per ``codes`` codes (3 bits: 3 per 32), a
            # code split over two words where its bits cross one (codes 10 and 21 of each unit); ``zeros`` the
            # zero points of columns r0..r1, unpacked
            mask = (1 << bits) - 1
            n_in = qweight.shape[0] // words * codes
            for j0 in range(r0, r1, _OUT_BLOCK):
                j1 = min(j0 + _OUT_BLOCK, r1)
                for i in range(n_in):
                    pos = bits * (i % codes)
                    k = (i // codes) * words + (pos >> 5)
                    off = pos & 31
                    g = g_idx[i]
                    for j in range(j0, j1):
                        x = (np.int64(qweight[k, j - col0]) & 0xFFFFFFFF) >> off
                        if off + bits > 32:
                            x |= (np.int64(qweight[k + 1, j - col0]) & 0xFFFFFFFF) << (32 - off)
                        q = x & mask
                        z = zeros[g, j - r0]
                        sc = scales[g, j]
                        v = rnd(np.float32(q - z) * sc, mode)
                        val[j - r0, i] = v
                        edge = 1.5 if (q == 0 or q == mask) else 0.5
                        flo[j - r0, i] = np.float32(edge * abs(sc) * (1.0 + tol) + abs(v) * tol)

        _NUMBA_GPTQ = (kernel, codebook, rnd, stream)
    return _NUMBA_GPTQ


def fp8_rows(raw: np.ndarray, fp8: str, srow: np.ndarray, bw: int, scale_dtype: str,
             out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``dequant_fp8`` in one numba pass for rows whose scale varies by column block:
    ``srow[r, c // bw]`` is the scale of element (r, c) (bw = row length for one scale per row)."""
    codes = np.ascontiguousarray(raw, dtype=np.uint8)
    val = np.empty(codes.shape, np.float32)
    flo = np.empty(codes.shape, np.float32)
    _gptq_numba()[1](codes, FP8_TABLES[fp8], _FP8_HW[fp8], np.ascontiguousarray(srow, dtype=np.float32),
                     max(1, int(bw)), _rel_tol(scale_dtype, out_dtype), _ROUND_MODE[out_dtype], val, flo)
    return val, flo


def gptq_rows(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
              bits: int, v1: bool, scale_dtype: str, r0: int, r1: int, col0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (AutoGPTQ/GPTQModel ``dequantize_weight``) for output features [r0, r1): returns
    [r1-r0, in] (the transpose of the [in, out] layout GPTQ dequantizes to).

    ``W[i, j] = scales[g, j] * (q[i, j] - z[g, j])`` with ``g = g_idx[i]``; the v1 format
    stores ``z - 1`` (``z = (stored + 1) & mask``). numba when available (the product is exact
    in float32 and rounded to the scale's dtype after); ``gptq_rows_numpy`` is its specification. 3-bit packing
    (three words per 32 codes: TheBloke's ``gptq-3bit-*`` branches) has a kernel of its own, each code found in
    the bit stream. ``col0``: ``qweight`` holds output features ``col0`` on (a band of its columns)."""
    codes, words = gptq_unit(bits)
    in_f = qweight.shape[0] * codes // words
    g = np.ascontiguousarray(g_idx, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() >= scales.shape[0]):
        raise ValueError("g_idx points outside the scale groups")
    val = np.empty((r1 - r0, in_f), np.float32)
    flo = np.empty((r1 - r0, in_f), np.float32)
    args = (np.ascontiguousarray(qweight, dtype=np.int32), np.ascontiguousarray(qzeros, dtype=np.int32),
            np.ascontiguousarray(scales, dtype=np.float32), g)
    tol, mode = _rel_tol(scale_dtype, scale_dtype), _ROUND_MODE[scale_dtype]
    if qweight.shape[0] % words or g.size != in_f or not 0 <= r0 <= r1 <= scales.shape[1] or \
            qzeros.shape[1] * codes // words < r1 or (r1 > r0 and not col0 <= r0 <= r1 <= col0 + qweight.shape[1]):
        # what the kernels do not check (numpy's indexing would raise)
        raise ValueError(f"{bits}-bit GPTQ: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales "
                         f"{list(scales.shape)} and g_idx [{g.size}] do not hold rows {r0}-{r1} of {in_f} codes")
    if words > 1:
        u0, u1 = r0 // codes, -(-r1 // codes)          # the units of zeros that hold columns r0..r1
        z = unpack_cols(qzeros[:, u0 * words:u1 * words], bits)[:, r0 - u0 * codes: r1 - u0 * codes].astype(np.int64)
        if v1:
            z = (z + 1) & ((1 << bits) - 1)
        _gptq_numba()[3](args[0], np.ascontiguousarray(z), *args[2:], bits, codes, words, r0, r1, col0, tol, mode,
                         val, flo)
    else:
        _gptq_numba()[0](*args, bits, v1, r0, r1, col0, tol, mode, val, flo)
    return val, flo


def gptq_rows_numpy(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                    bits: int, v1: bool, scale_dtype: str, r0: int, r1: int,
                    col0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``gptq_rows`` in plain numpy (the specification the numba kernel is tested against)."""
    codes, words = gptq_unit(bits)
    q = unpack_rows(qweight[:, r0 - col0:r1 - col0], bits)         # [in, r1-r0]
    u0, u1 = r0 // codes, -(-r1 // codes)                          # the units of zeros that hold columns r0..r1
    z = unpack_cols(qzeros[:, u0 * words:u1 * words], bits)[:, r0 - u0 * codes: r1 - u0 * codes].astype(np.int32)
    if v1:
        z = (z + 1) & ((1 << bits) - 1)
    g = np.asarray(g_idx).astype(np.intp)
    value, floor = dequant_int(q, z[g], np.asarray(scales)[g, r0:r1], scale_dtype, 0, (1 << bits) - 1)
    return np.ascontiguousarray(value.T), np.ascontiguousarray(floor.T)


def awq_rows(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int, group: int,
             scale_dtype: str, r0: int, r1: int, w0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """AWQ GEMM (AutoAWQ ``dequantize_gemm``) for output features [r0, r1), as [r1-r0, in]:
    ``W[i, j] = (q[i, j] - z[i // group, j]) * scales[i // group, j]``. One numba pass (the numpy form unpacked
    every code and built a dozen window-sized temporaries: a third of a 70B-width AWQ release's time); values and
    floors bit for bit those of ``awq_rows_numpy``, its specification (the floor in float32 arithmetic, as there).
    ``w0``: ``qweight`` holds words ``w0`` on of each row (a band of its columns)."""
    pf = _check_pack(bits)
    in_f, out_f = qweight.shape[0], (w0 + qweight.shape[1]) * pf
    if not 0 <= r0 <= r1 <= out_f or group < 1 or (r1 > r0 and r0 < w0 * pf):
        raise ValueError(f"awq_rows: rows {r0}-{r1} of {out_f} (words {w0} on), group {group}")
    groups = -(-in_f // group)
    if qzeros.shape[0] < groups or scales.shape[0] < groups or scales.shape[1] < r1 or qzeros.shape[1] * pf < r1:
        raise ValueError("awq_rows: zeros or scales do not cover the groups")
    order = AWQ_ORDER if bits == 4 else tuple(range(pf))
    inv = np.empty(pf, np.int64)
    inv[list(order)] = np.arange(pf)                  # the nibble that holds column pf * k + m is inv[m]
    val = np.empty((r1 - r0, in_f), np.float32)
    flo = np.empty((r1 - r0, in_f), np.float32)
    tol = np.float32(_rel_tol(scale_dtype, scale_dtype))
    _awq_numba()(np.ascontiguousarray(qweight, dtype=np.int32), np.ascontiguousarray(qzeros, dtype=np.int32),
                 np.ascontiguousarray(scales, dtype=np.float32), bits, int(group), inv, r0, r1, int(w0), tol,
                 np.float32(1 + tol), _ROUND_MODE[scale_dtype], val, flo)
    return val, flo


_NUMBA_AWQ = None


def _awq_numba():
    """The numba twin of ``awq_rows_numpy``, ``_OUT_BLOCK`` output features at a time (as ``_gptq_numba``'s kernel), its
    rounding of the product that kernel's, the floor summed in float32 as numpy sums it."""
    global _NUMBA_AWQ
    if _NUMBA_AWQ is None:
        import numba

        rnd = _gptq_numba()[2]

        @numba.njit(cache=True, nogil=True)
        def kernel(qweight, qzeros, scales, bits, group, inv, r0, r1, w0, tol, one_tol, mode, val, flo):
            pf = 32 // bits
            mask = (1 << bits) - 1
            half = np.float32(0.5)
            for j0 in range(r0, r1, _OUT_BLOCK):
                j1 = min(j0 + _OUT_BLOCK, r1)
                for i in range(qweight.shape[0]):
                    g = i // group
                    for j in range(j0, j1):
                        shift = bits * inv[j % pf]
                        q = ((np.int64(qweight[i, j // pf - w0]) & 0xFFFFFFFF) >> shift) & mask
                        z = ((np.int64(qzeros[g, j // pf]) & 0xFFFFFFFF) >> shift) & mask
                        sc = scales[g, j]
                        v = rnd(np.float32(q - z) * sc, mode)
                        val[j - r0, i] = v
                        edge = np.float32(1.0) if (q == 0 or q == mask) else np.float32(0.0)
                        flo[j - r0, i] = (half + edge) * abs(sc) * one_tol + abs(v) * tol

        _NUMBA_AWQ = kernel
    return _NUMBA_AWQ


def awq_rows_numpy(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int, group: int,
             scale_dtype: str, r0: int, r1: int, w0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``awq_rows`` in plain numpy (the specification the numba kernel is tested against)."""
    pf = 32 // bits
    u0, u1 = r0 // pf, -(-r1 // pf)
    sl = slice(r0 - u0 * pf, r1 - u0 * pf)
    q = unpack_cols(qweight[:, u0 - w0:u1 - w0], bits, AWQ_ORDER if bits == 4 else None)[:, sl]
    z = unpack_cols(qzeros[:, u0:u1], bits, AWQ_ORDER if bits == 4 else None)[:, sl]
    g = np.arange(q.shape[0]) // group
    value, floor = dequant_int(q, z[g], np.asarray(scales)[g, r0:r1], scale_dtype, 0, (1 << bits) - 1)
    return np.ascontiguousarray(value.T), np.ascontiguousarray(floor.T)


def int_grid_rows(src: np.ndarray, bits: int, cols: int, rmap: np.ndarray, cmap: np.ndarray, scales: np.ndarray,
                  zeros: np.ndarray | None, offset: int, qmin: int, qmax: int, scale_dtype: str,
                  half_ulp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' integer weights (``IntGrid``) for the rows ``src`` holds, in one numba pass:
    ``src`` is [n, words] int32 of ``bits``-bit codes, one LSB-first bit stream a row (``pack-quantized``), or
    with ``bits`` 0 the [n, cols] codes themselves (``int-quantized``); ``q = code - offset``; the scale (and
    zero point) of element (r, c) is ``scales[rmap[r], cmap[c]]`` (a group, channel, block or tensor layout
    as two index maps). ``value = round_{scale dtype}((q - z) * s)``, the floor ``dequant_int``'s plus
    ``half_ulp * (|q| + 1)`` steps (a quantizer that rounded ``x / s + z`` in bf16 or f16). Values and floors
    bit for bit those of ``int_grid_rows_numpy``, its specification (the unpacking, the gathers and
    ``dequant_int``'s dozen temporaries were half of a 70B-width compressed-tensors release's time)."""
    src = np.ascontiguousarray(src, dtype=np.int32)
    rmap = np.ascontiguousarray(rmap, dtype=np.int64)
    cmap = np.ascontiguousarray(cmap, dtype=np.int64)
    s = np.ascontiguousarray(scales, dtype=np.float32)
    z = np.zeros((1, 1), np.int32) if zeros is None else np.ascontiguousarray(zeros, dtype=np.int32)
    _check_grid(src, bits, cols, rmap, cmap, s, z if zeros is not None else None)
    n = src.shape[0]
    val = np.empty((n, cols), np.float32)
    flo = np.empty((n, cols), np.float32)
    tol = np.float32(_rel_tol(scale_dtype, scale_dtype))
    _int_grid_numba()(src, int(bits), int(cols), rmap, cmap, s, z, zeros is not None, int(offset), int(qmin),
                      int(qmax), float(half_ulp), tol, np.float32(1 + tol), _ROUND_MODE[scale_dtype], val, flo)
    return val, flo


def _check_grid(src, bits, cols, rmap, cmap, s, z) -> None:
    """The bounds the numba kernel does not check: every code inside ``src``, every index inside the scales
    (and zero points), as numpy's own indexing would raise."""
    if not 0 <= bits <= 8 or src.ndim != 2 or rmap.shape != (src.shape[0],) or cmap.shape != (cols,):
        raise ValueError(f"int_grid_rows: {bits}-bit codes, rows {src.shape}, maps {rmap.shape} {cmap.shape}")
    if bits and src.shape[1] * 32 < cols * bits:
        raise ValueError(f"{src.shape[1]} int32 words per row hold fewer than {cols} {bits}-bit codes")
    if not bits and src.shape[1] != cols:
        raise ValueError(f"rows of {src.shape[1]} codes, expected {cols} codes")
    for a in (s,) if z is None else (s, z):
        if a.ndim != 2 or (rmap.size and not 0 <= rmap.min() <= rmap.max() < a.shape[0]) or \
                (cmap.size and not 0 <= cmap.min() <= cmap.max() < a.shape[1]):
            raise ValueError(f"int_grid_rows: an index outside the scales or zero points {list(a.shape)}")


def int_grid_rows_numpy(src: np.ndarray, bits: int, cols: int, rmap: np.ndarray, cmap: np.ndarray,
                        scales: np.ndarray, zeros: np.ndarray | None, offset: int, qmin: int, qmax: int,
                        scale_dtype: str, half_ulp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``int_grid_rows`` in plain numpy (the specification the numba kernel is tested against)."""
    if bits:
        q = unpack_dense_int32(src, bits, cols).astype(np.int32)
    else:
        q = np.asarray(src).astype(np.int32)
    q -= offset
    rm, cm = np.asarray(rmap, np.intp), np.asarray(cmap, np.intp)
    s_el = np.asarray(scales, np.float32)[rm][:, cm]
    z_el = np.asarray(zeros).astype(np.int32)[rm][:, cm] if zeros is not None else 0
    value, floor = dequant_int(q, z_el, s_el, scale_dtype, qmin, qmax)
    if half_ulp:
        floor = floor + (np.abs(s_el) * (half_ulp * (np.abs(q) + 1.0))).astype(np.float32)
    return value.reshape(q.shape), floor.reshape(q.shape)


_NUMBA_INT_GRID = None


def _int_grid_numba():
    """The numba twin of ``int_grid_rows_numpy``: unpacking, gathers, product, rounding and floor per element,
    the product's rounding ``_gptq_numba``'s, the floor in float32 as numpy sums it (the half-ulp term in
    float64, rounded, as there)."""
    global _NUMBA_INT_GRID
    if _NUMBA_INT_GRID is None:
        import numba

        rnd = _gptq_numba()[2]

        @numba.njit(cache=True, nogil=True)
        def kernel(src, bits, cols, rmap, cmap, s, z, has_z, offset, qmin, qmax, hu, tol, one_tol, mode, val, flo):
            words = src.shape[1]
            mask = (1 << bits) - 1
            half = np.float32(0.5)
            for r in range(src.shape[0]):
                sr = rmap[r]
                for c in range(cols):
                    if bits:
                        pos = c * bits
                        w = pos >> 5
                        off = pos & 31
                        x = (np.int64(src[r, w]) & 0xFFFFFFFF) >> off
                        if off + bits > 32:
                            x |= (np.int64(src[r, min(w + 1, words - 1)]) & 0xFFFFFFFF) << (32 - off)
                        q = np.int32((x & mask) - offset)
                    else:
                        q = np.int32(np.int64(src[r, c]) - offset)
                    sc = s[sr, cmap[c]]
                    zz = z[sr, cmap[c]] if has_z else np.int32(0)
                    v = rnd(np.float32(np.int32(q - zz)) * sc, mode)
                    val[r, c] = v
                    edge = np.float32(1.0) if (q <= qmin or q >= qmax) else np.float32(0.0)
                    f = (half + edge) * abs(sc) * one_tol + abs(v) * tol
                    if hu != 0.0:
                        f = f + np.float32(np.float64(abs(sc)) * (hu * (np.float64(abs(np.int64(q))) + 1.0)))
                    flo[r, c] = f

        _NUMBA_INT_GRID = kernel
    return _NUMBA_INT_GRID


def bnb_nested_absmax(qabsmax: np.ndarray, nested_map: np.ndarray, nested_absmax: np.ndarray,
                      nested_blocksize: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Double quantization: ``absmax = nested_map[q] * nested_absmax[i // nbs] + offset``
    (bitsandbytes ``dequantize_blockwise`` + offset), with its own error bound per block."""
    q = np.asarray(qabsmax).astype(np.intp)
    a2 = np.asarray(nested_absmax, dtype=np.float32)[np.arange(q.size) // nested_blocksize]
    table = np.asarray(nested_map, dtype=np.float32)
    absmax = table[q] * a2 + np.float32(offset)
    err = codebook_halfwidth(table)[q] * np.abs(a2)
    return absmax.astype(np.float32), err.astype(np.float32)


def bnb4_flat(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, out_dtype: str,
              start: int, stop: int, absmax_err: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes NF4/FP4 (``dequantize_4bit``) for flat elements [start, stop): element
    2k is the high nibble of byte k, 2k+1 the low one; ``value = code[c] * absmax[i // bs]``
    (float32, then cast to the quant_state dtype)."""
    b = np.asarray(packed).reshape(-1).view(np.uint8)[start // 2: -(-stop // 2)]
    codes = np.empty(b.size * 2, dtype=np.uint8)
    codes[0::2], codes[1::2] = b >> 4, b & 0x0F
    codes = codes[start % 2: start % 2 + stop - start]
    return _bnb4_values(codes, np.arange(start, stop) // blocksize, absmax, code, out_dtype, absmax_err)


def bnb4_gather(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, out_dtype: str,
                idx: np.ndarray, absmax_err: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``bnb4_flat`` at any flat element indices ``idx`` (the same nibble order: ONNX Runtime's
    ``MatMulBnb4`` packs its blocks as bitsandbytes does), for layouts whose rows are not runs of
    the flat order."""
    i = np.asarray(idx, dtype=np.int64)
    b = np.asarray(packed).reshape(-1).view(np.uint8)[i >> 1]
    codes = np.where(i & 1, b & 0x0F, b >> 4).astype(np.uint8)
    return _bnb4_values(codes, i // blocksize, absmax, code, out_dtype, absmax_err)


def _bnb4_values(codes: np.ndarray, blk: np.ndarray, absmax: np.ndarray, code: np.ndarray, out_dtype: str,
                 absmax_err: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(absmax, dtype=np.float32)[blk]
    value, floor = dequant_codebook(codes, code, a, "F32", out_dtype)
    if absmax_err is not None:               # the absmax itself was rounded or quantized (nested)
        table = np.asarray(code, dtype=np.float32)
        e = np.asarray(absmax_err, dtype=np.float32)[blk]
        floor = floor + (codebook_halfwidth(table)[codes] + np.abs(table[codes])) * e
    return value, floor.astype(np.float32)


def bnb_int8_rows(cb: np.ndarray, scb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LLM.int8 row-wise: ``CB * SCB[:, None] * 7.874015718698502e-3`` in float32
    (bitsandbytes ``int8_vectorwise_dequant``); step = SCB / 127."""
    s = np.asarray(scb, dtype=np.float32).reshape(-1, 1)
    q = np.asarray(cb).astype(np.int8)
    value = (q.astype(np.float32) * s) * np.float32(7.874015718698502e-3)
    edge = (q <= -127) | (q >= 127)
    floor = (np.float32(0.5) + edge) * np.abs(s) / np.float32(127.0) + np.abs(value) * np.float32(2.0 ** -22)
    return value, floor.astype(np.float32)


def _nibbles_low_first(packed: np.ndarray) -> np.ndarray:
    """Two 4-bit codes a byte, the low nibble first: [..., n] uint8 -> [..., 2n]."""
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = packed & 0x0F, packed >> 4
    return codes


def mxfp4_rows(blocks: np.ndarray, scales: np.ndarray, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 (transformers ``convert_moe_packed_tensors``): blocks [..., G, 16] uint8 (code 2k in
    the low nibble), scales [..., G] e8m0 -> [..., G * 32] = e2m1[code] * 2**(scale - 127)."""
    b = np.asarray(blocks, dtype=np.uint8)
    codes = _nibbles_low_first(b)
    e = np.asarray(scales, dtype=np.uint8).astype(np.int32) - 127
    s = np.ldexp(np.float32(1.0), e).astype(np.float32)[..., None]
    value, floor = dequant_codebook(codes, FP4_E2M1, s, "F32", out_dtype)
    shape = (*b.shape[:-2], b.shape[-2] * b.shape[-1] * 2)
    return value.reshape(shape), floor.reshape(shape)


# -- MLX (mlx.core.quantize / mlx-lm) -------------------------------------------------------

#: MLX's floating-point modes: (group size, code bits, code table, scale format)
MLX_FP_MODES = {"mxfp4": (32, 4, "e2m1", "e8m0"), "mxfp8": (32, 8, "e4m3", "e8m0"), "nvfp4": (16, 4, "e2m1", "e4m3")}


def mlx_affine_rows(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int,
                    scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """MLX's affine mode (``mx.quantize(w, group_size, bits)``, mlx-lm's default): ``words`` [R, C * bits / 32]
    uint32, the codes of a row one LSB-first bit stream (any of 2, 3, 4, 5, 6, 8 bits); ``scales`` and
    ``biases`` [R, C / group] as float32 holding ``scale_dtype`` values. ``value = round(round(s * q) + b)`` in
    ``scale_dtype``, as ``mx.dequantize`` computes it (bit for bit).

    The floor: MLX picks each group's scale and bias from its extremes (``affine_quantize``: the bias is the
    extreme of larger magnitude, on the grid at code 0, and the scale is stretched or shrunk so that zero is on
    the grid too: the far extreme may then be clipped at the top code by up to one step), rounds each weight
    to nearest, and stores the scale and bias rounded to ``scale_dtype`` (u = half its ulp, relative): h(q)
    steps (1/2, 3/2 at the two extreme codes) plus u times 2 h |s| + 2 |s q| + |b| (the stored scale and bias
    against those the codes were rounded with) + |value| (the two roundings of the dequantization).

    >>> v, f = mlx_affine_rows(np.array([[0x76543210]], np.uint32), np.array([[0.5]], np.float32),
    ...                        np.array([[-1.0]], np.float32), 4, 8, "F32")
    >>> v.tolist()
    [[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]]
    """
    w = np.ascontiguousarray(words)
    cols = w.shape[1] * 32 // bits
    q = unpack_dense_int32(w, bits, cols).astype(np.float32)
    s = np.repeat(np.asarray(scales, np.float32), group, axis=1)[:, :cols]
    b = np.repeat(np.asarray(biases, np.float32), group, axis=1)[:, :cols]
    with np.errstate(over="ignore", invalid="ignore"):
        sq = round_to(s * q, scale_dtype)
        value = round_to(sq + b, scale_dtype)
        top = np.float32((1 << bits) - 1)
        h = np.where((q <= 0) | (q >= top), np.float32(1.5), np.float32(0.5))
        u = np.float32(2.0 ** -(MANT[scale_dtype] + 1) * (1 + 2.0 ** -6))
        a = np.abs(s)
        floor = h * a + u * (2 * h * a + 2 * np.abs(sq) + np.abs(b) + np.abs(value))
    return value, floor.astype(np.float32)


def mlx_fp_rows(words: np.ndarray, scales: np.ndarray, mode: str, out_dtype: str = "BF16"
                ) -> tuple[np.ndarray, np.ndarray]:
    """MLX's floating-point modes (``MLX_FP_MODES``): ``words`` [R, C * bits / 32] uint32 of e2m1 (4-bit) or
    e4m3 (8-bit) codes, LSB first; ``scales`` [R, C / group] uint8, a power of two (e8m0: 2^(e - 127)) or an
    e4m3 number (nvfp4). ``value = table[code] * scale`` (exact in ``out_dtype``, bfloat16 as
    ``mx.dequantize`` hands it out). The floor is the codebook's (half the larger gap to a neighbouring code,
    1.5 gaps at the extremes) times the scale; MLX rounds a group's scale to the nearest power of two of
    amax / 448 (mxfp8), so a weight up to sqrt(2) times the top code is clipped there: the top codes of e4m3
    get that much more."""
    group, bits, table, scale_format = MLX_FP_MODES[mode]
    w = np.ascontiguousarray(words)
    cols = w.shape[1] * 32 // bits
    codes = unpack_dense_int32(w, bits, cols)
    sc = np.asarray(scales, dtype=np.uint8)
    s = FP8_TABLES["F8_E8M0" if scale_format == "e8m0" else "F8_E4M3"][sc]
    s = np.repeat(s.astype(np.float32), group, axis=1)[:, :cols]
    if table == "e2m1":
        return dequant_codebook(codes, FP4_E2M1, s, "F32", out_dtype)
    hw = _FP8_HW["F8_E4M3"].copy()
    top = np.abs(FP8_TABLES["F8_E4M3"]) == 448
    hw[top] = np.maximum(hw[top], np.float32(448 * (2 ** 0.5 - 1) * (1 + 2.0 ** -6)))
    return dequant_codebook(codes, FP8_TABLES["F8_E4M3"], s, "F32", out_dtype, hw)


# -- compressed-tensors fp4 (nvfp4-pack-quantized, mxfp4-pack-quantized) ---------------------------------

def ct_fp4_rows(packed: np.ndarray, scales: np.ndarray, group: int, global_scale: float | None,
                multiply: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' packed fp4 weights: ``packed`` U8 [R, C / 2] (two e2m1 codes a byte, low nibble
    first: ``unpack_fp4_from_uint8``), ``scales`` [R, C / group] float32 (nvfp4: the e4m3 group scales, with the
    tensor's ``global_scale``; mxfp4: the e8m0 powers of two, no global scale). As its decompressor computes
    it: ``value = bf16(e2m1[code] * f32(scale / global_scale))``.

    The floor: the codebook's (``dequant_codebook``: half the larger gap to a neighbouring code, 1.5 gaps at
    +-6, which holds the clipping of a scale rounded down) times the group's scale, plus for nvfp4 what an e4m3
    scale rounded to its subnormal grid (or to zero, for a group far smaller than the tensor's largest) leaves:
    6 x 2^-10 / global_scale, the largest error of a group whose scale rounded by half its smallest step.
    ``multiply``: NVIDIA ModelOpt's NVFP4, whose tensor scale (``weight_scale_2``) multiplies the block scales:
    ``bf16(e2m1[code] * f32(scale * scale_2))`` (``NVFP4QTensor.dequantize``), the subnormal term 6 x 2^-10 x
    scale_2."""
    codes = _nibbles_low_first(np.asarray(packed, dtype=np.uint8))
    cols = codes.shape[1]
    s = np.asarray(scales, dtype=np.float32)
    if global_scale is not None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = s * np.float32(global_scale) if multiply else s / np.float32(global_scale)
    s = np.repeat(s, group, axis=1)[:, :cols]
    value, floor = dequant_codebook(codes, FP4_E2M1, s, "F32", "BF16")
    if global_scale is not None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            g = np.float32(abs(global_scale))
            extra = np.float32(6 * 2.0 ** -10) * g if multiply else np.float32(6 * 2.0 ** -10) / g
            floor = (floor + extra).astype(np.float32)
    return value, floor
