"""The quantization scheme and noise floor of GGUF tensors (the QuantScheme contract).

For each GGML block type: ``scheme_of`` describes it for the judge (bits, group, whether the
quantizer is calibrated), and ``floor`` gives, per element, the largest ``|x - value|`` a
faithful round-to-nearest quantization of some float ``x`` into the stored code with the
block's own scales could leave, in the rule of ``kernels/quant.py``:

    floor = (0.5 + edge) * |s| * (1 + tol) + (|value| + |offset|) * tol,   tol = 2**-10 + 2**-24

``s`` is the step the element was rounded with (d for Q8_0..Q5_1; d * sc[j] for the j-th
sub-block of Q4_K/Q5_K; d * scale[j] for Q6_K), ``offset`` the block's additive term (m for
Q4_1/Q5_1, dmin * m[j] for Q4_K/Q5_K), ``edge`` 1 for the lowest and highest code (a value
clipped at the end of the range lands there from anywhere beyond it), and ``tol`` covers the
fp16 rounding of the scales (ggml rounds with the float32 scale, then stores it as fp16).
The codes are recovered from the dequantized values (``value = s * code + offset``, exact
for these small integers). ggml's reference quantizers (``quantize_row_q8_0_ref`` ...
``quantize_row_q6_K_ref`` in ggml-quants.c) end with exactly this round-to-nearest pass with
the final scales, the K-quants included (their scale search happens before it). With an
importance matrix (``quantize.imatrix.*`` metadata) the legacy types Q4_0..Q5_1 keep the
search's codes under a refitted scale, so they are marked ``calibrated``. Q2_K, Q3_K and the
IQ/TQ/FP4 types get no floor (``floor`` returns None): the judge reads them as quantized with
an unknown floor.

>>> scheme_of("Q4_K", 256, 144, 1000, "blk.0.attn_q.weight", {}).group
'32'
"""

from __future__ import annotations

import numpy as np

from .safetensors_read import QuantScheme

__all__ = ["scheme_of", "floor", "FLOORS"]

TOL = np.float32(2.0 ** -10 + 2.0 ** -24)
_SUB = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16, "Q4_K": 32, "Q5_K": 32}
_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4,
         "Q5_K": 5, "Q6_K": 6, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4, "IQ4_NL": 4, "IQ4_XS": 4}
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
#: types with a floor, and their top code (the bottom code is 0, -32 for Q6_K)
FLOORS = {"Q8_0": 127, "Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q4_K": 15, "Q5_K": 31, "Q6_K": 31}


def scheme_of(tname: str, block: int, tsize: int, nbytes: int, gguf_name: str, meta: dict) -> QuantScheme:
    """The QuantScheme of a tensor stored as GGML type ``tname``."""
    imatrix = any(k.startswith("quantize.imatrix") for k in meta)
    calibrated = imatrix and (tname in _LEGACY or tname.startswith("IQ"))
    bits = _BITS.get(tname, max(1, int(tsize * 8 / block)))
    group = str(_SUB.get(tname, block))
    return QuantScheme("gguf", tname, bits, group, calibrated, (gguf_name,), nbytes)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, at:at + 2]).view(np.float16).astype(np.float32)[:, 0]


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit scales and mins (n, 8) from bytes 4:16 (as gguf's Q4_K.get_scale_min)."""
    s = raw[:, 4:16].astype(np.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def floor(raw: np.ndarray, values: np.ndarray, tname: str, block: int) -> np.ndarray | None:
    """Per-element floor of blocks ``raw`` (n, block bytes) whose dequantized values are
    ``values`` (n, block); None for a type without one."""
    if tname not in FLOORS:
        return None
    n = raw.shape[0]
    d = _f16(raw, 208 if tname == "Q6_K" else 0)
    offset = np.zeros((n, 1), np.float32)
    if tname in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales(raw)
        step = np.repeat(d[:, None] * sc, 32, axis=1)
        offset = np.repeat(_f16(raw, 2)[:, None] * mn, 32, axis=1)
        low = 0
    elif tname == "Q6_K":
        scales = raw[:, 192:208].view(np.int8).astype(np.float32)
        step = np.repeat(d[:, None] * scales, 16, axis=1)
        low = -32
    else:
        step = np.broadcast_to(d[:, None], (n, block))
        if tname in ("Q4_1", "Q5_1"):
            offset = _f16(raw, 2)[:, None]
        low = {"Q8_0": -127, "Q4_0": -8, "Q5_0": -16}.get(tname, 0)
    top = FLOORS[tname] + (low if tname in ("Q4_0", "Q5_0") else 0)
    with np.errstate(all="ignore"):
        if tname in ("Q4_K", "Q5_K"):
            code = np.rint((values + offset) / step)
        else:
            code = np.rint((values - offset) / step)
        edge = ((code <= low) | (code >= top)) & (step != 0) & (tname != "Q8_0")
        out = (np.float32(0.5) + edge.astype(np.float32)) * np.abs(step) * (1 + TOL) \
            + (np.abs(values) + np.abs(offset)) * TOL
    return out.astype(np.float32)
