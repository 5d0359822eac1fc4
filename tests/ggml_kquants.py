"""ggml's reference K-quant encoders, transcribed line by line from ggml/src/ggml-quants.c:
``quantize_row_q4_K_ref`` (``make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1.f, 0.1f, 20,
false)``, weights ``av_x + |x|``) and ``quantize_row_q6_K_ref`` (``make_qx_quants(16, 32, x, L, 1,
NULL)``), the path llama-quantize takes without an importance matrix. Float32 throughout like the C,
``nearest_int`` rounds half to even like the C's magic-number trick, and ``f16`` rounds to fp16
(subnormals included) like GGML_FP32_TO_FP16. ``quantize(x, "Q4_K")`` returns raw GGUF block bytes
that ``gguf.quants.dequantize`` decodes (a test checks it). The repository's own ``q4_k_quantize``
(benchmarks/bench_gguf.py) is a plain round-to-nearest encoder and misses the scale search."""
import numpy as np
import numba as nb

F = np.float32

@nb.njit(cache=True)
def nearest_int(v):
    return int(np.rint(v))

@nb.njit(cache=True)
def f16(x):
    x = F(x)
    if x == 0: return F(0)
    ax = abs(x)
    if ax < F(2.0 ** -14):
        return F(np.rint(np.float64(x) * 2.0 ** 24) / 2.0 ** 24)
    e = np.floor(np.log2(np.float64(ax)))
    p = 2.0 ** (e - 10)
    r = np.rint(np.float64(ax) / p) * p
    return F(r if x > 0 else -r)

@nb.njit(cache=True)
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep):
    mn = x[0]; mx = x[0]
    sum_w = weights[0]; sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn: mn = x[i]
        if x[i] > mx: mx = x[i]
        w = weights[i]; sum_w += w; sum_x += w * x[i]
    if mn > 0: mn = F(0)
    if mx == mn:
        for i in range(n): L[i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + mn - x[i]
        best_error += weights[i] * diff * diff
    for is_ in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(is_) + F(nmax)) / (mx - mn)
        sum_l = F(0); sum_l2 = F(0); sum_xl = F(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l += w * F(l); sum_l2 += w * F(l) * F(l); sum_xl += w * F(l) * x[i]
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
                cur += weights[i] * diff * diff
            if cur < best_error:
                for i in range(n): L[i] = Laux[i]
                best_error = cur; scale = this_scale; mn = this_min
    return scale, -mn

@nb.njit(cache=True)
def q4_k_blocks(x):
    nbk = x.size // 256
    out = np.zeros((nbk, 144), np.uint8)
    dd = np.zeros((nbk, 2), np.float32)
    L = np.zeros(256, np.int64); Laux = np.zeros(32, np.int64)
    weights = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32); mins = np.zeros(8, np.float32)
    for i in range(nbk):
        xb = x[i * 256:(i + 1) * 256]
        max_scale = F(0); max_min = F(0)
        for j in range(8):
            sub = xb[32 * j:32 * j + 32]
            sum_x2 = F(0)
            for l in range(32): sum_x2 += sub[l] * sub[l]
            av_x = np.sqrt(sum_x2 / F(32))
            for l in range(32): weights[l] = av_x + abs(sub[l])
            s, m = make_qkx2_quants(32, 15, sub, weights, L[32 * j:32 * j + 32], Laux, F(-1.0), F(0.1), 20)
            scales[j] = s; mins[j] = m
            if s > max_scale: max_scale = s
            if m > max_min: max_min = m
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        sc = np.zeros(12, np.uint8)
        for j in range(8):
            ls = min(63, nearest_int(inv_scale * scales[j]))
            lm = min(63, nearest_int(inv_min * mins[j]))
            if j < 4:
                sc[j] = ls; sc[j + 4] = lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= ((ls >> 4) << 6)
                sc[j] |= ((lm >> 4) << 6)
        df = f16(max_scale / F(63)); dmf = f16(max_min / F(63))
        dd[i, 0] = df; dd[i, 1] = dmf
        for j in range(8):
            if j < 4:
                s6 = sc[j] & 63; m6 = sc[j + 4] & 63
            else:
                s6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
                m6 = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
            d = df * F(s6)
            if d == 0: continue
            dm = dmf * F(m6)
            for ii in range(32):
                l = nearest_int((xb[32 * j + ii] + dm) / d)
                L[32 * j + ii] = max(0, min(15, l))
        out[i, 4:16] = sc
        q = 16
        for j in range(0, 256, 64):
            for l in range(32):
                out[i, q + l] = L[j + l] | (L[j + l + 32] << 4)
            q += 32
    return out, dd

@nb.njit(cache=True)
def make_qx_quants(n, nmax, x, L):   # rmse_type 1, qw NULL
    mx = F(0); amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax: amax = ax; mx = x[i]
    if amax < F(1e-15):
        for i in range(n): L[i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i]); l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * F(l); suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0: continue
        iscale = -(F(nmax) + F(0.1) * F(is_)) / mx
        sumlx = F(0); suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i]); l = max(-nmax, min(nmax - 1, l))
            w = x[i] * x[i]
            sumlx += w * x[i] * F(l); suml2 += w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2; best = scale * sumlx
    return scale

@nb.njit(cache=True)
def q6_k_blocks(x):
    nbk = x.size // 256
    out = np.zeros((nbk, 210), np.uint8)
    dd = np.zeros((nbk, 1), np.float32)
    L = np.zeros(256, np.int64)
    scales = np.zeros(16, np.float32)
    for i in range(nbk):
        xb = x[i * 256:(i + 1) * 256]
        max_scale = F(0); max_abs = F(0)
        for ib in range(16):
            s = make_qx_quants(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
            scales[ib] = s
            if abs(s) > max_abs: max_abs = abs(s); max_scale = s
        if max_abs < F(1e-15):
            continue
        iscale = F(-128) / max_scale
        d16 = f16(F(1) / iscale)
        dd[i, 0] = d16
        sc = np.zeros(16, np.int8)
        for ib in range(16):
            sc[ib] = min(127, nearest_int(iscale * scales[ib]))
        for j in range(16):
            d = F(d16) * F(sc[j])
            if d == 0: continue
            for ii in range(16):
                l = nearest_int(xb[16 * j + ii] / d); l = max(-32, min(31, l))
                L[16 * j + ii] = l + 32
        ql = np.zeros(128, np.uint8); qh = np.zeros(64, np.uint8)
        for jj in range(2):
            j = jj * 128
            for l in range(32):
                q1 = L[j + l] & 0xF; q2 = L[j + l + 32] & 0xF; q3 = L[j + l + 64] & 0xF; q4 = L[j + l + 96] & 0xF
                ql[jj * 64 + l] = q1 | (q3 << 4)
                ql[jj * 64 + l + 32] = q2 | (q4 << 4)
                qh[jj * 32 + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)
        out[i, 0:128] = ql; out[i, 128:192] = qh
        out[i, 192:208] = sc.view(np.uint8)
    return out, dd

def quantize(x, name):
    x = np.ascontiguousarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    flat = rows.reshape(-1)
    blk, dd = {"Q4_K": q4_k_blocks, "Q6_K": q6_k_blocks}[name](flat)
    h = dd.astype(np.float16).view(np.uint8)
    if name == "Q4_K":
        blk[:, 0:4] = h
    else:
        blk[:, 208:210] = h
    return blk.reshape(rows.shape[0], -1)
