"""llama.cpp's reference K-quant encoders (numba): what ``llama-quantize`` writes without an importance matrix.

``encode(x, "Q4_K" | "Q5_K" | "Q6_K")`` turns float32 values (a multiple of 256, blocks along the flat
array) into GGUF block bytes, the float32 operations of ggml's ``quantize_row_q4_K_ref``,
``quantize_row_q5_K_ref`` and ``quantize_row_q6_K_ref`` in their order (``make_qkx2_quants`` with its
scale and minimum search; ``make_qx_quants`` with rmse type 1; ``nearest_int`` rounding half to even
as the C's magic-number trick; fp16 scales rounded to nearest even as ``GGML_FP32_TO_FP16``); the
tests compare the bytes with the C compiled without floating-point contraction. ``kernels.ggml
.dequantize`` decodes them. With an importance matrix llama.cpp weighs the search by it, which no
one can redo without the matrix: such files are not reproduced.

What it is for: a float copy of a GGUF (a "dequantized from GGUF" release) is tested against the
base's own round trip (``measure.quant_floor.detect_roundtrip``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .numba_cache import ensure as _ensure_numba_cache

_ensure_numba_cache()     # before the first cache=True decorator: numba places its cache when it decorates

__all__ = ["KQUANTS", "encode", "round_trip"]

F = np.float32
#: the K-quant types encoded here: name -> (bytes per 256-element block, elements per sub-block scale)
KQUANTS = {"Q4_K": (144, 32), "Q5_K": (176, 32), "Q6_K": (210, 16)}


@nb.njit(cache=True, nogil=True)
def _nearest_int(v):
    return int(np.rint(v))


@nb.njit(cache=True, nogil=True)
def _f16(x):
    """``x`` (float32) rounded to the nearest fp16, ties to even, as a float32 (inf past fp16's range)."""
    x = F(x)
    if x == 0 or not math.isfinite(x):
        return x
    ax = abs(np.float64(x))
    if ax < 2.0 ** -14:                                   # fp16 subnormals: steps of 2^-24
        r = np.rint(ax * 2.0 ** 24) / 2.0 ** 24
    else:
        e = math.frexp(ax)[1] - 1                         # floor(log2(ax)), exactly
        p = 2.0 ** (e - 10)
        r = np.rint(ax / p) * p
        if r >= 65520.0:
            r = np.inf
    return F(r) if x > 0 else F(-r)


@nb.njit(cache=True, nogil=True)
def _make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep):
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        lv = _nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, lv))
        diff = scale * F(L[i]) + mn - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            lv = _nearest_int(iscale * (x[i] - mn))
            lv = max(0, min(nmax, lv))
            Laux[i] = lv
            w = weights[i]
            sum_l += w * F(lv)
            sum_l2 += w * F(lv) * F(lv)
            sum_xl += w * F(lv) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                cur += weights[i] * (diff * diff)
            if cur < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@nb.njit(cache=True, nogil=True)
def _qk_blocks(x, nmax, rmin, nstep, out):
    """Q4_K (``nmax`` 15) and Q5_K (31): each 256-element block's 6-bit sub-block scales and minimums."""
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    weights = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    mins = np.zeros(8, np.float32)
    for i in range(out.shape[0]):
        xb = x[i * 256:(i + 1) * 256]
        max_scale = F(0)
        max_min = F(0)
        for j in range(8):
            sub = xb[32 * j:32 * j + 32]
            sum_x2 = F(0)
            for l in range(32):
                sum_x2 += sub[l] * sub[l]
            av_x = F(np.sqrt(sum_x2 / F(32)))
            for l in range(32):
                weights[l] = av_x + abs(sub[l])
            s, m = _make_qkx2_quants(32, nmax, sub, weights, L[32 * j:32 * j + 32], Laux, rmin, F(0.1), nstep)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        sc = np.zeros(12, np.uint8)
        for j in range(8):
            ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
            lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
            if j < 4:
                sc[j] = ls
                sc[j + 4] = lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= (ls >> 4) << 6
                sc[j] |= (lm >> 4) << 6
        df = _f16(max_scale / F(63))
        dmf = _f16(max_min / F(63))
        for j in range(8):
            if j < 4:
                s6 = sc[j] & 63
                m6 = sc[j + 4] & 63
            else:
                s6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
                m6 = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
            d = df * F(s6)
            if d == 0:
                continue
            dm = dmf * F(m6)
            for ii in range(32):
                lv = _nearest_int((xb[32 * j + ii] + dm) / d)
                L[32 * j + ii] = max(0, min(nmax, lv))
        h = np.array([df, dmf], np.float32)
        out[i, 0:4] = _f16_bytes(h)
        out[i, 4:16] = sc
        if nmax == 15:
            q = 16
            for j in range(0, 256, 64):
                for l in range(32):
                    out[i, q + l] = L[j + l] | (L[j + l + 32] << 4)
                q += 32
        else:
            qh = np.zeros(32, np.uint8)
            m1, m2 = 1, 2
            q = 48
            for n in range(0, 256, 64):
                for j in range(32):
                    l1 = L[n + j]
                    if l1 > 15:
                        l1 -= 16
                        qh[j] |= m1
                    l2 = L[n + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        qh[j] |= m2
                    out[i, q + j] = l1 | (l2 << 4)
                m1 <<= 2
                m2 <<= 2
                q += 32
            out[i, 16:48] = qh


@nb.njit(cache=True, nogil=True)
def _f16_bytes(vals):
    """Little-endian fp16 bytes of float32 values already on the fp16 grid."""
    out = np.zeros(2 * vals.size, np.uint8)
    for k in range(vals.size):
        v = np.float64(vals[k])
        sign = 0x8000 if (v < 0 or (v == 0 and math.copysign(1.0, v) < 0)) else 0
        a = abs(v)
        if a == 0:
            bits = 0
        elif math.isinf(a):
            bits = 0x7C00
        elif a < 2.0 ** -14:
            bits = int(np.rint(a * 2.0 ** 24))
        else:
            e = math.frexp(a)[1] - 1
            bits = ((e + 15) << 10) | (int(np.rint(a / 2.0 ** (e - 10))) - 1024)
        bits |= sign
        out[2 * k] = bits & 0xFF
        out[2 * k + 1] = bits >> 8
    return out


@nb.njit(cache=True, nogil=True)
def _make_qx_quants(n, nmax, x, L):
    """ggml's ``make_qx_quants`` with rmse type 1 and no weights (Q6_K's sub-block scales)."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < F(1e-15):
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        lv = _nearest_int(iscale * x[i])
        lv = max(-nmax, min(nmax - 1, lv))
        L[i] = lv + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * F(lv)
        suml2 += w * F(lv) * F(lv)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            lv = _nearest_int(iscale * x[i])
            lv = max(-nmax, min(nmax - 1, lv))
            w = x[i] * x[i]
            sumlx += w * x[i] * F(lv)
            suml2 += w * F(lv) * F(lv)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                lv = _nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, lv))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@nb.njit(cache=True, nogil=True)
def _q6_k_blocks(x, out):
    L = np.zeros(256, np.int64)
    scales = np.zeros(16, np.float32)
    for i in range(out.shape[0]):
        xb = x[i * 256:(i + 1) * 256]
        max_scale = F(0)
        max_abs = F(0)
        for ib in range(16):
            s = _make_qx_quants(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
            scales[ib] = s
            if abs(s) > max_abs:
                max_abs = abs(s)
                max_scale = s
        if max_abs < F(1e-15):
            continue                                     # an all-zero block (the C's memset)
        iscale = F(-128) / max_scale
        d16 = _f16(F(1) / iscale)
        sc = np.zeros(16, np.int64)
        for ib in range(16):
            sc[ib] = min(127, _nearest_int(iscale * scales[ib]))
        for j in range(16):
            d = d16 * F(sc[j])
            if d == 0:
                continue
            for ii in range(16):
                lv = _nearest_int(xb[16 * j + ii] / d)
                L[16 * j + ii] = max(-32, min(31, lv)) + 32
        for jj in range(2):
            j = jj * 128
            for l in range(32):
                q1 = L[j + l] & 0xF
                q2 = L[j + l + 32] & 0xF
                q3 = L[j + l + 64] & 0xF
                q4 = L[j + l + 96] & 0xF
                out[i, jj * 64 + l] = q1 | (q3 << 4)
                out[i, jj * 64 + l + 32] = q2 | (q4 << 4)
                out[i, 128 + jj * 32 + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                             | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))
        for ib in range(16):
            out[i, 192 + ib] = sc[ib] & 0xFF
        out[i, 208:210] = _f16_bytes(np.array([d16], np.float32))


def encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF block bytes [blocks, bytes per block] of float32 values ``x`` (a multiple of 256 elements) under
    ``qtype`` (``KQUANTS``), as llama.cpp's reference encoder writes them without an importance matrix.

    >>> from weightdiff.kernels.ggml import dequantize
    >>> x = np.linspace(-1, 1, 256, dtype=np.float32)
    >>> bool(np.abs(dequantize(encode(x, "Q6_K"), "Q6_K").reshape(-1) - x).max() < 0.02)
    True
    """
    flat = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1))
    if flat.size % 256:
        raise ValueError(f"{qtype}: {flat.size} values are not whole blocks of 256")
    nbytes = KQUANTS[qtype][0]
    out = np.zeros((flat.size // 256, nbytes), np.uint8)
    if qtype == "Q6_K":
        _q6_k_blocks(flat, out)
    else:
        _qk_blocks(flat, 15 if qtype == "Q4_K" else 31, F(-1.0) if qtype == "Q4_K" else F(-0.5),
                   20 if qtype == "Q4_K" else 15, out)
    return out


def round_trip(v: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized values [units, 256 k], step per sub-block [units, 256 k / sub]) of rows ``v`` under
    ``qtype``: ``encode`` then ``kernels.ggml.dequantize``. The step of a sub-block is its scale, the
    largest distance between two adjacent values its codes can give."""
    from .ggml import dequantize

    x = np.asarray(v, np.float32)
    raw = encode(x, qtype)
    dq = dequantize(raw, qtype).reshape(x.shape)
    return dq, _steps(raw, qtype).reshape(x.shape[0], -1)


def _steps(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Each sub-block's scale (float32, >= 0) from block bytes: ``d * sc`` (Q4_K, Q5_K), ``|d * s|`` (Q6_K)."""
    if qtype == "Q6_K":
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
        s = raw[:, 192:208].view(np.int8).astype(np.float32)
        return np.abs(d * s)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = raw[:, 4:16].astype(np.int64)
    sc = np.empty((raw.shape[0], 8), np.float32)
    sc[:, :4] = q[:, :4] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    return d * sc
