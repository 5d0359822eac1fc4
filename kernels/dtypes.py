"""The safetensors dtype table: storage, decoding and rounding constants.

One row per dtype name of the safetensors format. Everything else in weightdiff
refers to dtypes by these names ("BF16", "F8_E4M3", ...) and, inside numba code, by
the integer ``code`` of the row. This module is numpy only, so it can be imported
by the reader and by the kernels alike.

Decoding: bf16 is stored as uint16 bits (``uint32(x) << 16`` viewed as float32),
fp16 as float16, the fp8 variants as uint8 bits decoded through a 256-entry table
(``FP8_TABLES``). F4/F6 (packed sub-byte) and C64 (complex) have no float decoding:
they are compared byte for byte and reported as such.

Rounding: ``mant_bits`` is the number of explicit mantissa bits and ``emin`` the
exponent of the smallest normal number, so that the spacing of representable
values (one ulp) at magnitude ``x`` is ``2 ** (max(floor(log2 x), emin) - mant_bits)``.

>>> DTYPES["BF16"].storage, DTYPES["BF16"].mant_bits
('uint16', 7)
>>> float(decode(np.array([0x3F80], dtype=np.uint16), "BF16")[0])
1.0
>>> ulp(1.0, "BF16")
0.0078125
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str          # safetensors name
    code: int          # stable small integer for numba code
    bits: int          # bits per element (4 and 6 for the packed formats)
    storage: str       # numpy dtype the raw data is handed out as
    kind: str          # "float" | "int" | "bool" | "opaque" (compared bytewise)
    mant_bits: int     # explicit mantissa bits (0 for ints/bool/opaque)
    emin: int          # exponent of the smallest normal (0 for non-float)

    @property
    def decodable(self) -> bool:
        return self.kind != "opaque"


_ROWS = [
    # name, code, bits, storage, kind, mant_bits, emin
    ("BOOL", 0, 8, "bool", "bool", 0, 0),
    ("U8", 1, 8, "uint8", "int", 0, 0),
    ("I8", 2, 8, "int8", "int", 0, 0),
    ("U16", 3, 16, "uint16", "int", 0, 0),
    ("I16", 4, 16, "int16", "int", 0, 0),
    ("U32", 5, 32, "uint32", "int", 0, 0),
    ("I32", 6, 32, "int32", "int", 0, 0),
    ("U64", 7, 64, "uint64", "int", 0, 0),
    ("I64", 8, 64, "int64", "int", 0, 0),
    ("F16", 9, 16, "float16", "float", 10, -14),
    ("BF16", 10, 16, "uint16", "float", 7, -126),
    ("F32", 11, 32, "float32", "float", 23, -126),
    ("F64", 12, 64, "float64", "float", 52, -1022),
    ("C64", 13, 64, "complex64", "opaque", 0, 0),
    ("F8_E4M3", 14, 8, "uint8", "float", 3, -6),
    ("F8_E5M2", 15, 8, "uint8", "float", 2, -14),
    ("F8_E4M3FNUZ", 16, 8, "uint8", "float", 3, -7),
    ("F8_E5M2FNUZ", 17, 8, "uint8", "float", 2, -15),
    ("F8_E8M0", 18, 8, "uint8", "float", 0, -127),
    ("F4", 19, 4, "uint8", "opaque", 0, 0),
    ("F6_E2M3", 20, 6, "uint8", "opaque", 0, 0),
    ("F6_E3M2", 21, 6, "uint8", "opaque", 0, 0),
]

DTYPES: dict[str, DType] = {r[0]: DType(*r) for r in _ROWS}
BY_CODE: dict[int, DType] = {d.code: d for d in DTYPES.values()}
FP8_NAMES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")


def byte_length(dtype: str, numel: int) -> int:
    """Bytes that ``numel`` elements of ``dtype`` occupy (packed formats round up).

    >>> byte_length("BF16", 3), byte_length("F4", 3)
    (6, 2)
    """
    return (DTYPES[dtype].bits * numel + 7) // 8


def _fp8_table(exp_bits: int, mant_bits: int, bias: int, variant: str) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of one fp8 format."""
    out = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> mant_bits) & ((1 << exp_bits) - 1)
        m = b & ((1 << mant_bits) - 1)
        emax_field = (1 << exp_bits) - 1
        if variant == "fnuz" and b == 0x80:
            v = math.nan
        elif variant == "fn" and e == emax_field and m == (1 << mant_bits) - 1:
            v = math.nan
        elif variant == "ieee" and e == emax_field:
            v = sign * math.inf if m == 0 else math.nan
        elif e == 0:
            v = sign * (m / (1 << mant_bits)) * 2.0 ** (1 - bias)
        else:
            v = sign * (1 + m / (1 << mant_bits)) * 2.0 ** (e - bias)
        out[b] = v
    return out


def _e8m0_table() -> np.ndarray:
    vals = [2.0 ** (b - 127) for b in range(255)] + [math.nan]   # 0xFF is NaN
    return np.array(vals, dtype=np.float32)


FP8_TABLES: dict[str, np.ndarray] = {
    "F8_E4M3": _fp8_table(4, 3, 7, "fn"),
    "F8_E5M2": _fp8_table(5, 2, 15, "ieee"),
    "F8_E4M3FNUZ": _fp8_table(4, 3, 8, "fnuz"),
    "F8_E5M2FNUZ": _fp8_table(5, 2, 16, "fnuz"),
    "F8_E8M0": _e8m0_table(),
}
for _t in FP8_TABLES.values():
    _t.setflags(write=False)

#: All fp8 tables stacked as float32[5, 256], indexed by ``code - 14``, for numba.
FP8_STACK = np.stack([FP8_TABLES[n] for n in FP8_NAMES])
FP8_STACK.setflags(write=False)


def storage_dtype(dtype: str) -> np.dtype:
    return np.dtype(DTYPES[dtype].storage)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float64 (the slow, obvious reference decoding).

    Raises ValueError for the opaque (byte-compared) dtypes.
    """
    d = DTYPES[dtype]
    raw = np.asarray(raw)
    if d.kind == "opaque":
        raise ValueError(f"dtype {dtype} has no float decoding; compare it byte for byte")
    # a signaling NaN's bits widen to a quiet NaN with numpy's "invalid value encountered in cast" warning:
    # NaN is what every caller expects (and counts) there, so the warning only added lines to stderr
    with np.errstate(invalid="ignore"):
        if dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if dtype in FP8_TABLES:
            return FP8_TABLES[dtype][raw.astype(np.uint8)].astype(np.float64)
        return raw.astype(np.float64)


def ulp(x: float, dtype: str) -> float:
    """Spacing of representable values of ``dtype`` at magnitude ``abs(x)``.

    Integers and bool have spacing 1. For F8_E8M0 (powers of two) the spacing is ``abs(x)``.

    >>> ulp(1.0, "F32") == 2.0 ** -23, ulp(0.0, "F16") == 2.0 ** -24, ulp(3.0, "I8")
    (True, True, 1.0)
    """
    d = DTYPES[dtype]
    if d.kind in ("int", "bool"):
        return 1.0
    if d.kind == "opaque":
        raise ValueError(f"dtype {dtype} has no float decoding")
    ax = abs(float(x))
    e = d.emin if (ax == 0.0 or not math.isfinite(ax)) else max(math.frexp(ax)[1] - 1, d.emin)
    return 2.0 ** (e - d.mant_bits)
