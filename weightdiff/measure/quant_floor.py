"""The quantization noise-floor test of one tensor pair where a side is quantized.

Unlike the stats pass (which measures how far the tuned tensor moved), this asks whether
every difference is explained by quantizing the base: it streams both sides' values and
the quantized side's per-element floor (``Checkpoint.floor_windows``: half a step of its
own grid, plus a step for clipped codes, plus the rounding of its scales), through
``kernels.quant.floor_stats``. Which test decides (docs/methodology.md, "Quantization is
not fine-tuning"):

* ``bound`` (round-to-nearest formats: FP8, bitsandbytes, MXFP4, GGUF): within the floor
  when no element lies beyond it;
* ``first-group`` (GPTQ and compressed-tensors integer weights, whose quantizer may have
  compensated errors): those quantizers round the first group of columns they process
  (``g_idx == 0``) before any compensation reaches it, and each row's compensation only
  moves columns after its first; so at least one column of that group must be within the
  bound in every row. Within the floor when some first-group column has no element beyond it
  (or when every element is within the bound, as plain rounding gives);
* ``statistical`` (AWQ, whose scale search and clipping move whole columns and groups):
  within the floor when at most ``AWQ_BEYOND_SHARE`` of the elements lie beyond it.

>>> ratio_share(3, 1000)
0.003
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..kernels import quant as K
from ..kernels.reference import decode

__all__ = ["floor_test", "AWQ_BEYOND_SHARE", "ratio_share"]

#: AWQ: share of elements beyond the floor a quantization of the base may leave (clipped groups)
AWQ_BEYOND_SHARE = 0.01
#: half an ulp of bf16, relative: a float32 base may have been cast to bf16 before quantizing
CAST_REL = 2.0 ** -9


def ratio_share(n: float, total: float) -> float | None:
    return n / total if total else None


def _test_of(schemes: list) -> str:
    if any(s.format == "awq" for s in schemes):
        return "statistical"
    if any(s.calibrated for s in schemes):
        return "first-group"
    return "bound"


def floor_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple,
               window: int, stop: int | None = None) -> dict[str, Any] | None:
    """The floor test of one pair (``base``/``tuned`` are Checkpoints), or None when neither
    side is quantized or its reader gives no floor."""
    qb, qt = base.tensors[bname].quant, tuned.tensors[tname].quant
    if qb is None and qt is None:
        return None
    fb = base.floor_windows(bname, window, 0, stop) if qb is not None else None
    ft = tuned.floor_windows(tname, window, 0, stop) if qt is not None else None
    schemes = [q for q in (qb, qt) if q is not None]
    side = "both" if qb is not None and qt is not None else ("base" if qb is not None else "tuned")
    info: dict[str, Any] = {"side": side, "format": "+".join(dict.fromkeys(q.format for q in schemes)),
                            "scheme": "; ".join(dict.fromkeys(q.scheme for q in schemes))}
    if (qb is not None and fb is None) or (qt is not None and ft is None):
        info.update(test="none", within=None, note="the reader gives no noise floor for this tensor")
        return info
    ncols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    plain = dtype_t if qt is None else dtype_b
    cast_rel = CAST_REL if side != "both" and plain in ("F32", "F64") else 0.0
    acc = np.zeros(len(K.FLOOR_FIELDS))
    cols = np.zeros(max(ncols, 1), dtype=np.int64)
    pos = 0
    wb_it = base.windows(bname, window, 0, stop)
    wt_it = tuned.windows(tname, window, 0, stop)
    fl_b = fb if fb is not None else iter(())
    fl_t = ft if ft is not None else iter(())
    for wb, wt in zip(wb_it, wt_it):
        vb = decode(wb, dtype_b)
        vt = decode(wt, dtype_t)
        floor = np.zeros(len(vt), np.float64)
        if fb is not None:
            floor += next(fl_b)
        if ft is not None:
            floor += next(fl_t)
        part, c = K.floor_stats(vb, vt, floor, pos % max(ncols, 1), max(ncols, 1), cast_rel)
        mx = max(acc[3], part[3])
        acc += part
        acc[3] = mx                              # max_u combines with max, the rest with +
        cols += c
        pos += len(vt)
    n, beyond = int(acc[0]), int(acc[1])
    test = _test_of(schemes)
    info.update(test=test, elements=n, beyond=beyond, beyond_share=ratio_share(beyond, n),
                max_ratio=float(acc[3]), rms_ratio=math.sqrt(acc[2] / n) if n else None,
                norm_above_floor=math.sqrt(acc[4]))
    if test == "bound":
        info["within"] = beyond == 0
    elif test == "statistical":
        info["within"] = (beyond / n if n else 0.0) <= AWQ_BEYOND_SHARE
    else:
        first = _first_group(base, bname, tuned, tname, side, ncols)
        best = int(cols[first].min()) if first is not None and first.size else None
        info["first_group_min_beyond"] = best
        info["within"] = beyond == 0 or best == 0
        if best is None:
            info.update(test="bound", within=beyond == 0)
    return info


def _first_group(base, bname: str, tuned, tname: str, side: str, ncols: int) -> np.ndarray | None:
    """Columns of the first group the calibrated side's quantizer processed (g_idx == 0)."""
    ck, name = (tuned, tname) if side in ("tuned", "both") else (base, bname)
    src = getattr(ck, "quant", {}).get(name)
    if src is None or not hasattr(src, "first_group"):
        return None
    return src.first_group(ck._stored_read, ncols)


def above_floor_pair(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str,
                     cast_rel: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Whole-tensor (base values, base + the part of the change above the floor), float32,
    for the rank analysis of a pair that failed the bound test."""
    b = decode(base.read(bname), dtype_b)
    t = decode(tuned.read(tname), dtype_t)
    floor = np.zeros(b.size, np.float64)
    for ck, name in ((base, bname), (tuned, tname)):
        fw = ck.floor_windows(name) if ck.tensors[name].quant is not None else None
        if fw is not None:
            floor += np.concatenate([np.asarray(w, np.float64) for w in fw]) if b.size else 0.0
    excess = K.above_floor(b, t, floor, cast_rel)
    return b.astype(np.float32), (b + excess).astype(np.float32)
