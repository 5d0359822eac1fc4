"""Documented packers and reference dequantizers for the formats whose own tools do not run
here (AutoGPTQ/GPTQModel and AutoAWQ need CUDA builds; bitsandbytes is not installed).

Each function is a line-by-line transcription, in torch/numpy, of the named reference
function; weightdiff's own dequantizers (kernels/quant.py) are written independently and
tested against these:

- ``gptq_pack``: AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack``
  with the quantizer of ``quantization/quantizer.py`` (``Quantizer.find_params``/``quantize``)
- ``gptq_reference``: the same file's ``forward`` dequantization (``zeros + 1`` for the v1
  format; GPTQModel's v2 format drops the ``+ 1``)
- ``awq_pack``: AutoAWQ ``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear`` and
  ``awq/quantize/quantizer.py`` ``pseudo_quantize_tensor`` (zero point, group-wise)
- ``awq_reference``: AutoAWQ ``awq/utils/packing_utils.py`` ``dequantize_gemm``
- ``bnb4_quantize``/``bnb4_reference``: bitsandbytes ``backends/default/ops.py``
  ``quantize_4bit``/``_dequantize_4bit_impl`` and ``functional.py`` ``quantize_4bit``
  (``compress_statistics``), ``quantize_blockwise``, ``dequantize_blockwise``,
  ``create_dynamic_map``, ``get_4bit_type``
"""

from __future__ import annotations

import json

import numpy as np
import torch


def rtn_int(x, scale, zero, qmin, qmax):
    q = np.clip(np.round(x / scale) + zero, qmin, qmax).astype(np.int32)
    return q, scale, zero


# -- GPTQ ------------------------------------------------------------------------------

def gptq_pack(w: np.ndarray, g_idx: np.ndarray, bits: int, v1: bool = True, sym: bool = False):
    """w [out, in] float32 -> (qweight [in*bits/32, out] int32, qzeros [G, out*bits/32] int32,
    scales [G, out] float16, codes [in, out])."""
    maxq = 2 ** bits - 1
    groups = int(g_idx.max()) + 1
    out_f, in_f = w.shape
    scales = np.zeros((groups, out_f), np.float32)
    zeros = np.zeros((groups, out_f), np.float32)
    for g in range(groups):
        x = w[:, g_idx == g]
        xmin = np.minimum(x.min(1), 0)
        xmax = np.maximum(x.max(1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0], xmax[both0] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
        scales[g], zeros[g] = scale, zero
    # Quantizer.quantize: q = clamp(round(x / scale) + zero, 0, maxq), with the float32 scale
    codes = np.clip(np.round(w.T / scales[g_idx]) + zeros[g_idx], 0, maxq).astype(np.uint32)   # [in, out]
    z = zeros.astype(np.int64) - (1 if v1 else 0)
    z = (z & maxq).astype(np.uint32)      # AutoGPTQ writes (z - 1) as uint32; masked so z = 0 cannot spill
    qweight, qzeros = pack_words(codes, bits), pack_words(z.T, bits).T
    return qweight.view(np.int32), np.ascontiguousarray(qzeros).view(np.int32), scales.astype(np.float16), codes


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop (qlinear_cuda_old) down axis 0: codes [n, m] -> uint32 words
    [n * bits / 32, m]; 32/bits codes a word at 2, 4 and 8 bits, and at 3 bits its three-word pattern: ten codes,
    the eleventh split 2 + 1 bits over two words, ten more shifted by one, the 22nd split 1 + 2, ten shifted by two
    (``qzeros``: the same along axis 1, called on the transpose)."""
    codes = codes.astype(np.uint32)
    n = codes.shape[0]
    out = np.zeros((n // 32 * 3 if bits == 3 else n * bits // 32, codes.shape[1]), np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= codes[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for k in range(3):          # word k: ten codes at bit 3j + k, then (k < 2) the code split with the next
                for j in range(10):
                    out[row] |= codes[i + j] << np.uint32(3 * j + k)
                i += 10
                if k < 2:
                    out[row] |= codes[i] << np.uint32(30 + k)
                    out[row + 1] |= (codes[i] >> np.uint32(2 - k)) & np.uint32((1 << (k + 1)) - 1)
                    i += 1
                row += 1
    return out


def gptq_reference(qweight, qzeros, scales, g_idx, bits, v1=True) -> np.ndarray:
    """AutoGPTQ's dequantization, in torch: returns [in, out] float16 as float32."""
    qweight, qzeros = torch.from_numpy(qweight), torch.from_numpy(qzeros)
    scales, g = torch.from_numpy(scales), torch.from_numpy(g_idx).long()
    if bits == 3:
        return _gptq_reference3(qweight, qzeros, scales, g, v1)
    pf = 32 // bits
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, pf), wf.unsqueeze(0)).to(
        torch.int16 if bits == 8 else torch.int8)
    if v1:
        zeros = zeros + 1
    zeros = torch.bitwise_and(zeros, (2 ** bits) - 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, pf, -1), wf.unsqueeze(-1)).to(
        torch.int16 if bits == 8 else torch.int8)
    weight = torch.bitwise_and(weight, (2 ** bits) - 1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return (scales[g] * (weight - zeros[g])).float().numpy()


def _gptq_reference3(qweight, qzeros, scales, g, v1) -> np.ndarray:
    """AutoGPTQ's 3-bit unpacking in ``forward`` (qlinear_cuda_old: twelve shifts of each of three words, the two
    straddling codes put together, 11 + 10 + 11 codes kept), then ``scales * (weight - zeros)``."""
    wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                       [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
    zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
    zeros = zeros >> wf.unsqueeze(0)
    zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
    zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
    zeros = zeros & 0x7
    zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
    if v1:
        zeros = (zeros + 1) & 0x7
    zeros = zeros.reshape(scales.shape)
    weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
    weight = (weight >> wf.unsqueeze(-1)) & 0x7
    weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
    weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
    weight = weight & 0x7
    weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return (scales[g] * (weight - zeros[g])).float().numpy()


# -- AWQ ---------------------------------------------------------------------------------

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def awq_pack(w: np.ndarray, group: int, bits: int = 4):
    """w [out, in] float32 -> (qweight [in, out/8], qzeros [in/group, out/8], scales [in/group, out] f16)."""
    max_int, min_int = 2 ** bits - 1, 0
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    mx, mn = g.max(-1), g.min(-1)
    scales = np.maximum(mx - mn, 1e-5) / max_int
    zeros = np.clip(-np.round(mn / scales), min_int, max_int)
    return awq_pack_params(w, scales, zeros, group, bits)


def awq_pack_params(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, bits: int = 4):
    """``awq_pack``'s packing of ``w`` [out, in] with the given scales and zero points [out, in/group]
    (``WQLinear_GEMM.from_linear``: codes rounded with the fp16 scales)."""
    max_int, min_int = 2 ** bits - 1, 0
    out_f, in_f = w.shape
    scales16 = np.asarray(scales).astype(np.float16).T.copy()     # [in/group, out]
    zeros_t = np.asarray(zeros).T.astype(np.int32)
    s_el = scales16.astype(np.float32)[np.arange(in_f) // group]  # WQLinear_GEMM packs with the fp16 scales
    intweight = np.clip(np.round((w.T + zeros_t[np.arange(in_f) // group] * s_el) / s_el), min_int, max_int)
    intweight = intweight.astype(np.uint32)                        # [in, out]
    pf = 32 // bits
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = np.zeros((in_f, out_f // pf), np.uint32)
    for col in range(out_f // pf):
        for i in range(pf):
            qweight[:, col] |= intweight[:, col * pf + order[i]] << np.uint32(i * bits)
    qzeros = np.zeros((in_f // group, out_f // pf), np.uint32)
    zu = zeros_t.astype(np.uint32)
    for col in range(out_f // pf):
        for i in range(pf):
            qzeros[:, col] |= zu[:, col * pf + order[i]] << np.uint32(i * bits)
    return qweight.view(np.int32), qzeros.view(np.int32), scales16


def awq_reference(qweight, qzeros, scales, bits, group) -> np.ndarray:
    qweight, qzeros, scales = torch.from_numpy(qweight), torch.from_numpy(qzeros), torch.from_numpy(scales)
    shifts = torch.arange(0, 32, bits)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    rev = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 32 // bits)[:, AWQ_REVERSE_ORDER].view(-1)
    izeros, iweights = izeros[:, rev], iweights[:, rev]
    iweights = torch.bitwise_and(iweights, (2 ** bits) - 1)
    izeros = torch.bitwise_and(izeros, (2 ** bits) - 1)
    scales = scales.repeat_interleave(group, dim=0)
    izeros = izeros.repeat_interleave(group, dim=0)
    return ((iweights - izeros) * scales).float().numpy()


# -- bitsandbytes 4-bit -------------------------------------------------------------------

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def get_4bit_type(name):
    data = torch.tensor(NF4 if name == "nf4" else FP4)
    return data / data.abs().max()


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = a.numel()
    rem = n % blocksize
    blocks = n // blocksize + (rem > 0)
    flat = a.reshape(n)
    absmax = torch.zeros(blocks, dtype=torch.float32)
    pad = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax[:] = pad.abs().max(-1)[0]
    scaled = torch.clamp(pad * (1 / absmax.view(-1, 1)), -1, 1).reshape(-1)[:n]
    out = torch.argmin(torch.abs(scaled.unsqueeze(-1) - code), dim=-1).to(torch.uint8)
    return out, absmax


def bnb4_quantize(a: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> dict:
    """Params4bit's state as saved in a checkpoint: packed bytes, absmax (uint8 codes when
    nested), quant_map, nested_* and the JSON of ``quant_state.bitsandbytes__<type>``."""
    n = a.numel()
    full, rem = n // blocksize, n % blocksize
    blocks = full + (1 if rem else 0)
    absmax = torch.zeros(blocks, dtype=torch.float32)
    flat = a.reshape(n)
    fb = flat[: n - rem].reshape(full, blocksize)
    absmax[:full] = torch.abs(fb).max(dim=-1)[0]
    scaled = torch.clamp(fb * (1 / absmax[:full].view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        absmax[-1] = torch.abs(flat[-rem:]).max()
        scaled = torch.cat([scaled, torch.clamp(flat[-rem:] * (1 / absmax[-1]), -1, 1)])
    code = get_4bit_type(quant_type).to(scaled.dtype)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1), value=0.0)
    q = torch.argmin(torch.abs(scaled.view(-1, 1) - code), dim=-1, keepdim=True).to(torch.uint8)
    packed = q[::2] << 4 | q[1::2]
    dtype = str(a.dtype).replace("torch.", "")
    st = {"packed": packed.numpy(), "quant_map": get_4bit_type(quant_type).numpy(), "blocksize": blocksize,
          "quant_type": quant_type, "dtype": dtype, "shape": list(a.shape)}
    if nested:
        offset = absmax.mean()
        dyn = create_dynamic_map()
        qabs, absmax2 = _quantize_blockwise(absmax - offset, dyn, 256)
        st.update(absmax=qabs.numpy(), nested_absmax=absmax2.numpy(), nested_quant_map=dyn.numpy(),
                  nested_blocksize=256, nested_offset=float(offset.item()), nested_dtype="float32")
    else:
        st["absmax"] = absmax.numpy()
    return st


def bnb4_reference(st: dict) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization with the code in float32 (the CUDA kernel's arithmetic:
    code * absmax in float32, cast to the quant_state dtype)."""
    absmax = torch.from_numpy(np.asarray(st["absmax"]))
    if "nested_absmax" in st:
        code2 = torch.from_numpy(st["nested_quant_map"])
        a2 = torch.from_numpy(st["nested_absmax"])
        out = code2[absmax.reshape(-1).int()]
        nb2 = st["nested_blocksize"]
        res = out.shape[-1] % nb2
        if res:
            out = torch.nn.functional.pad(out, (0, nb2 - res))
        absmax = (out.view(-1, nb2) * a2.view(-1, 1)).reshape(-1)[: absmax.numel()] + st["nested_offset"]
    A = torch.from_numpy(st["packed"]).reshape(-1)
    dq = torch.empty(A.size(0) * 2, dtype=torch.int32)
    dq[1::2], dq[::2] = A & 0xF, A >> 4
    code = torch.from_numpy(np.asarray(st["quant_map"], dtype=np.float32))
    shape = st["shape"]
    n = int(np.prod(shape))
    vals = code[dq][:n]
    bs = st["blocksize"]
    blk = torch.arange(n) // bs
    return (vals * absmax[blk]).to(getattr(torch, st["dtype"])).reshape(shape)


def bnb4_state_tensors(prefix: str, st: dict) -> dict:
    """The tensors Params4bit writes to a state dict (``QuantState.as_dict(packed=True)``)."""
    out = {prefix: st["packed"], f"{prefix}.absmax": np.asarray(st["absmax"]),
           f"{prefix}.quant_map": np.asarray(st["quant_map"], np.float32)}
    meta = {k: st[k] for k in ("quant_type", "blocksize", "dtype", "shape")}
    if "nested_absmax" in st:
        out[f"{prefix}.nested_absmax"] = st["nested_absmax"]
        out[f"{prefix}.nested_quant_map"] = st["nested_quant_map"]
        meta.update({k: st[k] for k in ("nested_blocksize", "nested_offset", "nested_dtype")})
    out[f"{prefix}.quant_state.bitsandbytes__{st['quant_type']}"] = \
        np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return out


# -- GPTQ with error compensation ----------------------------------------------------------

def gptq_quantize(w: np.ndarray, x: np.ndarray, bits: int = 4, group: int = 64, actorder: bool | str = False,
                  damp: float = 0.01, block: int = 0, dtype=np.float64):
    """GPTQ's ``fasterquant`` (AutoGPTQ ``quantization/gptq.py``, one block of all columns, which
    gives the same codes as its lazy batches up to float summation order): columns quantized
    in order (by descending Hessian diagonal with ``actorder``), each group's scale and zero
    found when the group starts, on the weights as compensated so far; the rounding error of
    each column pushed onto the columns not yet quantized through the inverse Hessian's
    Cholesky factor. Returns (qweight, qzeros, scales, g_idx) packed as ``gptq_pack`` packs
    (v1 zeros). ``actorder="gar"``: GPTQModel's ``act_group_aware`` (its default): the groups stay
    the plain ``arange // group`` (as stored), processed in the order of their summed Hessian
    diagonal, the columns within each by their own, descending.

    ``block``: AutoGPTQ's lazy batches of that many columns (a multiple of ``group``, no activation order): each
    column's error is pushed onto the rest of its batch at once and onto the columns after it by one product per
    batch, the same codes up to the order of the float sums and fast enough for 70B widths (AutoGPTQ's own
    ``dtype=np.float32``: a 28672 x 8192 matrix in about two minutes on two cores)."""
    maxq = 2 ** bits - 1
    if block:
        if actorder or block % group:
            raise ValueError("lazy batches: a multiple of the group, columns in order")
        return _gptq_batches(w, x, bits, group, damp, block, dtype)
    W = w.astype(np.float64).copy()
    m, n = W.shape
    H = x.T.astype(np.float64) @ x.astype(np.float64)
    d = np.diag(H)
    if actorder == "gar":
        groups = np.argsort(-d.reshape(-1, group).sum(1), kind="stable")
        perm = np.concatenate([g * group + np.argsort(-d[g * group:(g + 1) * group], kind="stable") for g in groups])
    else:
        perm = np.argsort(-d, kind="stable") if actorder else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((m, n), np.uint32)
    scales, zeros = [], []
    for i in range(n):
        if i % group == 0:
            s, z = _minmax_qparams(W[:, i:i + group], maxq)
            scales.append(s)
            zeros.append(z)
        q = np.clip(np.round(W[:, i] / s) + z, 0, maxq)
        codes[:, i] = q
        err = (W[:, i] - (q - z) * s) / hinv[i, i]
        W[:, i + 1:] -= np.outer(err, hinv[i, i + 1:])
    inv = np.argsort(perm)
    codes = codes[:, inv].T.copy()                          # [in, out] in the original column order
    g_idx = (np.arange(n) // group)[inv].astype(np.int32)
    S = np.stack(scales)                                    # [groups, out]
    Z = np.stack(zeros).astype(np.int64)
    if actorder == "gar":                                   # plain g_idx; scales by the static group
        g_idx = (np.arange(n) // group).astype(np.int32)
        S[groups], Z[groups] = S.copy(), Z.copy()
    return _gptq_packed(codes, S, Z, g_idx, bits)


def _minmax_qparams(g: np.ndarray, maxq: int):
    """GPTQ's asymmetric (scale, zero) per row of a group's columns: min/max with 0 inside, a row of zeros -1..1."""
    xmin, xmax = np.minimum(g.min(1), 0), np.maximum(g.max(1), 0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1, 1
    s = ((xmax - xmin) / maxq).astype(np.float32)
    return s, np.round(-xmin / s)


def _gptq_batches(w, x, bits, group, damp, block, dtype):
    """``gptq_quantize`` in lazy batches of ``block`` columns (AutoGPTQ's ``fasterquant``), in ``dtype``."""
    maxq = 2 ** bits - 1
    W = np.array(w, dtype, copy=True)
    m, n = W.shape
    xd = np.asarray(x, dtype)
    H = xd.T @ xd
    H += dtype(damp) * np.mean(np.diag(H)) * np.eye(n, dtype=dtype)
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(dtype)
    del H
    codes = np.zeros((n, m), np.uint32)                 # [in, out]
    S = np.zeros((n // group + (n % group > 0), m), np.float32)
    Z = np.zeros(S.shape, np.int64)
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        W1 = W[:, i1:i2].copy()
        err = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:                        # the group's scale on its columns as compensated so far
                sc, z = _minmax_qparams(W1[:, i:i + group], maxq)
                S[col // group], Z[col // group] = sc, z
            q = np.clip(np.round(W1[:, i] / sc) + z, 0, maxq)
            codes[col] = q
            e = (W1[:, i] - (q - z) * sc) / hinv[col, col]
            W1[:, i + 1:] -= np.outer(e, hinv[col, col + 1:i2])
            err[:, i] = e
        if i2 < n:
            W[:, i2:] -= err @ hinv[i1:i2, i2:]
    g_idx = (np.arange(n) // group).astype(np.int32)
    return _gptq_packed(codes, S, Z, g_idx, bits)


def _gptq_packed(codes, S, Z, g_idx, bits):
    """(qweight, qzeros, scales, g_idx) of codes [in, out], scales and integer zeros [groups, out] (v1 zeros)."""
    maxq = 2 ** bits - 1
    zq = ((Z - 1) & maxq).astype(np.uint32)
    qweight, qzeros = pack_words(codes, bits), np.ascontiguousarray(pack_words(zq.T, bits).T)
    return qweight.view(np.int32), qzeros.view(np.int32), S.astype(np.float16), g_idx
