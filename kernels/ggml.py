"""Numba dequantizers for the GGML block types llama.cpp files use most.

The reference is the ``gguf`` package's numpy dequantizers (``gguf.quants``, the ``...
dequantize_blocks`` of each type); these loops compute the same float32 operations in the
same order per element, so their output is bitwise the same (the tests check every type
on random blocks, NaN and Inf scales included), about ten times faster and without numpy's
whole-array temporaries. Types without a kernel here are dequantized by ``gguf`` itself.

Per element, with d and dmin the block's fp16 scales widened to float32:

    Q8_0  d * q                          q int8, 32 per 34-byte block
    Q4_0  d * (q - 8)                    q 4-bit, 32 per 18-byte block
    Q4_K  (d * sc[j]) * q - (dmin * m[j]) q 4-bit, sc/m 6-bit per 32-element sub-block j
    Q5_K  (d * sc[j]) * q - (dmin * m[j]) q 5-bit (4 low bits + 1 high bit)
    Q6_K  (d * s[j]) * (q - 32)          q 6-bit, s int8 per 16-element sub-block j

>>> raw = np.zeros((1, 34), np.uint8); raw[0, :2] = np.array([1.5], np.float16).view(np.uint8)
>>> raw[0, 2:] = np.arange(32).astype(np.int8).view(np.uint8)
>>> dequantize(raw, "Q8_0")[0, :4].tolist()
[0.0, 1.5, 3.0, 4.5]
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .numba_cache import ensure as _ensure_numba_cache

_ensure_numba_cache()     # before the first cache=True decorator: numba places its cache when it decorates

__all__ = ["BLOCKS", "dequantize", "precompile"]

#: type name -> (elements per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}

_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_F16.setflags(write=False)


@numba.njit(cache=True, nogil=True, inline="always")
def _h(b, i, f16):
    return f16[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@numba.njit(cache=True, nogil=True, parallel=True)
def _q8_0(raw, f16, out):
    for n in prange(raw.shape[0]):
        b = raw[n]
        d = _h(b, 0, f16)
        for i in range(32):
            out[n, i] = np.float32(np.int8(b[2 + i])) * d


@numba.njit(cache=True, nogil=True, parallel=True)
def _q4_0(raw, f16, out):
    for n in prange(raw.shape[0]):
        b = raw[n]
        d = _h(b, 0, f16)
        for i in range(16):
            out[n, i] = d * np.float32(np.int8(b[2 + i] & 15) - np.int8(8))
            out[n, 16 + i] = d * np.float32(np.int8(b[2 + i] >> 4) - np.int8(8))


@numba.njit(cache=True, nogil=True, inline="always")
def _scale_min(s, j):
    """Q4_K/Q5_K 6-bit scale and min of sub-block j from the 12 scale bytes at s[0:12]."""
    if j < 4:
        return s[j] & 63, s[4 + j] & 63
    return (s[8 + j - 4] & 15) | ((s[j - 4] >> 6) << 4), (s[8 + j - 4] >> 4) | ((s[4 + j - 4] >> 6) << 4)


@numba.njit(cache=True, nogil=True, parallel=True)
def _q4_k(raw, f16, out):
    for n in prange(raw.shape[0]):
        b = raw[n]
        d = _h(b, 0, f16)
        dmin = _h(b, 2, f16)
        for j in range(8):
            sc, m = _scale_min(b[4:16], j)
            ds = d * np.float32(sc)
            dm = dmin * np.float32(m)
            g, shift = j // 2, 4 * (j % 2)
            for i in range(32):
                q = (b[16 + 32 * g + i] >> shift) & 15
                out[n, 32 * j + i] = ds * np.float32(q) - dm


@numba.njit(cache=True, nogil=True, parallel=True)
def _q5_k(raw, f16, out):
    for n in prange(raw.shape[0]):
        b = raw[n]
        d = _h(b, 0, f16)
        dmin = _h(b, 2, f16)
        for j in range(8):
            sc, m = _scale_min(b[4:16], j)
            ds = d * np.float32(sc)
            dm = dmin * np.float32(m)
            g, shift = j // 2, 4 * (j % 2)
            for i in range(32):
                lo = (b[48 + 32 * g + i] >> shift) & 15
                hi = (b[16 + i] >> j) & 1
                out[n, 32 * j + i] = ds * np.float32(lo | (hi << 4)) - dm


@numba.njit(cache=True, nogil=True, parallel=True)
def _q6_k(raw, f16, out):
    for n in prange(raw.shape[0]):
        b = raw[n]
        d = _h(b, 208, f16)
        for v in range(256):
            h, r = v // 128, v % 128
            lo = (b[64 * h + r % 64] >> (4 * (r // 64))) & 15
            hi = (b[128 + 32 * h + r % 32] >> (2 * (r // 32))) & 3
            q = np.int8(lo | (hi << 4)) - np.int8(32)
            s = d * np.float32(np.int8(b[192 + v // 16]))
            out[n, v] = s * np.float32(q)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: np.ndarray, qtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Raw blocks ``(rows, k * block bytes)`` uint8 -> float32 ``(rows, k * block elements)``,
    written into ``out`` (C-contiguous, that shape) when given."""
    bs, ts = BLOCKS[qtype]
    rows = raw.shape[0]
    shape = (rows, raw.shape[1] // ts * bs)
    blocks = np.ascontiguousarray(raw).reshape(-1, ts).view()
    blocks.flags.writeable = False      # a mapped file or a downloaded buffer alike: one compiled specialization
    if out is None:
        out = np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    _KERNELS[qtype](blocks, _F16, out.reshape(-1, bs))
    return out


def precompile(qtypes) -> None:
    """Compile, or load from numba's cache, the kernels of these block types (``dequantize`` on one zero block
    each: its argument types); see ``kernels.cpu.precompile``."""
    for qtype in qtypes:
        dequantize(np.zeros((1, BLOCKS[qtype][1]), np.uint8), qtype)
