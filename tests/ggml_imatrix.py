"""Q4_K as ``llama-quantize --imatrix`` writes it: ggml's ``quantize_row_q4_K_impl`` with importance weights.

Unlike ``ggml_kquants`` (the reference encoders, ``quantize_row_q4_K_ref``, no importance matrix), this is
the path llama-quantize takes when given an importance matrix (most GGUFs on the Hub: "imatrix" or "i1"
quants): each element weighted by its column's importance, ``qw[l] * sqrt(sigma2 + x[l]^2)``, the sub-block
fit by ``make_qkx3_quants`` (rmin -0.9, rdelta 0.05, 36 steps) and the sub-block scales and mins by
``make_qp_quants`` weighted by the sub-blocks' summed weights, then a last round-to-nearest with the
stored scales, clamped to 0..15. A low-importance element may so be clamped many steps past its grid.

Transcribed from ggml/src/ggml-quants.c in float32, with ``weightdiff.kernels.ggml_encode``'s helpers
(fp16 rounding, ``nearest_int``); held byte for byte to ggml's own C compiled without floating-point
contraction (``tests/data/ggml_q4k_imatrix.npz``, tests/test_gguf_floor.py). A build of llama.cpp
that contracts to FMA may differ in the last bit of a scale, hence in a code at a rounding tie, which
the noise floor allows for.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from weightdiff.kernels.ggml_encode import _f16, _f16_bytes, _nearest_int

F = np.float32


@nb.njit(cache=True)
def _make_qkx3_quants(n, nmax, x, w, L, Laux, rmin, rdelta, nstep):
    """ggml's make_qkx3_quants with weights and use_mad false: returns (scale, -min)."""
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = F(0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        L[i] = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
        diff = scale * F(L[i]) + mn - x[i]
        best += w[i] * (diff * diff)
    for st in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(st) + F(nmax)) / (mx - mn)
        sl = F(0)
        sl2 = F(0)
        sxl = F(0)
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            sl += w[i] * F(l)
            sl2 += w[i] * F(l) * F(l)
            sxl += w[i] * F(l) * x[i]
        D = sum_w * sl2 - sl * sl
        if D > 0:
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            if tm > 0:
                tm = F(0)
                ts = sxl / sl2
            mad = F(0)
            for i in range(n):
                diff = ts * F(Laux[i]) + tm - x[i]
                mad += w[i] * (diff * diff)
            if mad < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = mad
                scale = ts
                mn = tm
    return scale, -mn


@nb.njit(cache=True)
def _make_qp_quants(n, nmax, x, L, qw):
    """ggml's make_qp_quants: non-negative ``x`` on a weighted grid of ``nmax`` steps from 0."""
    mx = F(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx == 0:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i])
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = (F(0.1) * F(s) + F(nmax)) / mx
        sc = F(1) / isc
        mse = F(0)
        for i in range(n):
            l = min(nmax, _nearest_int(isc * x[i]))
            diff = x[i] - sc * F(l)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = isc
    slx = F(0)
    sl2 = F(0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l
        slx += qw[i] * x[i] * F(l)
        sl2 += qw[i] * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            a = slx - qw[i] * x[i] * F(L[i])
            b = sl2 - qw[i] * F(L[i]) * F(L[i])
            if a > 0 and b > 0:
                nl = min(nmax, _nearest_int(x[i] * b / a))
                if nl != L[i]:
                    a += qw[i] * x[i] * F(nl)
                    b += qw[i] * F(nl) * F(nl)
                    if a * a * sl2 > slx * slx * b:
                        L[i] = nl
                        slx = a
                        sl2 = b
                        changed += 1
        if changed == 0:
            break
    return slx / sl2


@nb.njit(cache=True)
def _q4_k_rows(x, qw, out):
    nbk = x.shape[1] // 256
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    mins = np.zeros(8, np.float32)
    sw = np.zeros(8, np.float32)
    Ls = np.zeros(8, np.int64)
    Lm = np.zeros(8, np.int64)
    for r in range(x.shape[0]):
        for i in range(nbk):
            xb = x[r, i * 256:(i + 1) * 256]
            q = qw[i * 256:(i + 1) * 256]
            sx2 = F(0)
            for l in range(256):
                sx2 += xb[l] * xb[l]
            sigma2 = F(2) * sx2 / F(256)
            for j in range(8):
                for l in range(32):
                    w[l] = q[32 * j + l] * F(np.sqrt(sigma2 + xb[32 * j + l] * xb[32 * j + l]))
                s = F(0)
                for l in range(32):
                    s += w[l]
                sw[j] = s
                scales[j], mins[j] = _make_qkx3_quants(32, 15, xb[32 * j:32 * j + 32], w, L[32 * j:32 * j + 32],
                                                       Laux, F(-0.9), F(0.05), 36)
            db = _make_qp_quants(8, 63, scales, Ls, sw)
            mb = _make_qp_quants(8, 63, mins, Lm, sw)
            sc = np.zeros(12, np.uint8)
            for j in range(8):
                ls = Ls[j]
                lm = Lm[j]
                if j < 4:
                    sc[j] = ls
                    sc[j + 4] = lm
                else:
                    sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                    sc[j - 4] |= (ls >> 4) << 6
                    sc[j] |= (lm >> 4) << 6
            df = _f16(db)
            dmf = _f16(mb)
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
                    L[32 * j + ii] = max(0, min(15, _nearest_int((xb[32 * j + ii] + dm) / d)))
            o = r * nbk + i
            out[o, 0:4] = _f16_bytes(np.array([df, dmf], np.float32))
            out[o, 4:16] = sc
            qq = 16
            for j in range(0, 256, 64):
                for l in range(32):
                    out[o, qq + l] = L[j + l] | (L[j + l + 32] << 4)
                qq += 32


def quantize(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (a multiple of 256 wide) as Q4_K blocks quantized with per-column importance ``qw``
    (what an imatrix file holds for the tensor: mean squared activations); raw bytes per row."""
    x = np.ascontiguousarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros((rows.shape[0] * (rows.shape[1] // 256), 144), np.uint8)
    _q4_k_rows(rows, np.ascontiguousarray(qw, np.float32).reshape(-1), out)
    return out.reshape(rows.shape[0], -1)


def importance(cols: int, seed: int, spread: float = 2.5, zero: float = 0.0) -> np.ndarray:
    """A synthetic imatrix of ``cols`` columns as LLMs give: lognormal importance, 1/64 of the columns
    "massive activations" (x1000), and a share ``zero`` of columns never activated (importance 0)."""
    rng = np.random.default_rng(seed)
    qw = rng.lognormal(0.0, spread, cols).astype(np.float32)
    qw[rng.choice(cols, max(1, cols // 64), replace=False)] *= 1000
    if zero:
        qw[rng.choice(cols, int(cols * zero), replace=False)] = 0
    return qw
