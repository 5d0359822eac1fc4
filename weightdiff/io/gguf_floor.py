"""The quantization scheme and noise floor of GGUF tensors (the QuantScheme contract).

For each GGML block type: ``scheme_of`` describes it for the judge (bits, group, whether the
quantizer is calibrated), and ``floor`` gives, per element, a bound on ``|x - value|`` for any float
``x`` that ggml's reference encoder (``quantize_row_q8_0_ref`` ... ``quantize_row_q6_K_ref`` in
ggml-quants.c) could have stored as this value, in the rule of ``kernels/quant.py``:

    floor = (0.5 + edge) * |s| * (1 + tol) + (|value| + |offset|) * tol + scale rounding

``s`` is the step the element was rounded with (d for Q8_0..Q5_1; d * sc[j] for the j-th
sub-block of Q4_K/Q5_K; d * scale[j] for Q6_K), ``offset`` the block's additive term (m for
Q4_1/Q5_1, dmin * m[j] for Q4_K/Q5_K), ``edge`` 1 for the lowest and highest code of Q4_0..Q5_1,
``tol = 2^-10 + 2^-24``. The codes are recovered from the dequantized values (``value = s * code +
offset``, exact for these small integers). The scale rounding term:

- Q8_0..Q5_1 pick the codes with the float32 scale and store it as fp16 afterwards, so each value
  is off by ``|code|`` times the scale's fp16 rounding: 2^-11 relative while d is a normal fp16,
  but 2^-25 absolute once d is subnormal (a block whose largest magnitude is below ~127 * 2^-14
  for Q8_0), where the relative error reaches several percent. ``_rounding16`` is that bound (the
  relative part with tol's margin). A d that rounded to 0 hides the codes: the largest is assumed.
- The K-quants round with the stored scales (no fp16 error inside the block), but the codes come
  from a search (``make_qkx2_quants`` for Q4_K/Q5_K, ``make_qx_quants`` for Q6_K) whose per
  sub-block scale is then rounded to 6 bits (int8 for Q6_K) against the super-block's largest. Next
  to an outlier a sub-block gets sc = 3 of 63, a step up to 1/6 too small, and its extremes
  overrun the code range by several steps; with sc = 0 (ggml's ``if (!d) continue;``) every element
  decodes to the same value. ``_k_floor`` bounds both from the encoder (see there): at an end code,
  ``(R - nmax) * s' + |code| * sigma + mu``, and in a sub-block whose step is 0, ``R * s' + mu``,
  where ``sigma`` bounds |searched scale - stored step|, ``s'`` the searched scale, ``mu`` the
  rounding of the min, and ``R`` (``_REACH``) how far from the searched min (Q6_K: from 0) an element
  can lie, in searched scales. Interior codes are a plain round-to-nearest: half a step.

With an importance matrix (``quantize.imatrix.*`` metadata) the legacy types Q4_0..Q5_1 keep the
search's codes under a refitted scale, so they are marked ``calibrated``. So are the K-quants:
llama-quantize then calls ``quantize_row_q*_K_impl`` with the importance weights, whose searches
(``make_qkx3_quants``, ``make_qp_quants``, ``make_qx_quants``) weigh each element by its column's
importance and may clip a low-importance element any number of steps past the end of its grid (33
steps measured), beyond the reach ``R`` the reference search allows. Their last pass is still a
round-to-nearest with the stored scales, clamped to the code range (``l = MAX(0, MIN(15, l))``), so
an interior code stays within half a step and only an end code can be clipped, toward its own end:
``ends`` marks those codes, and the floor test counts an element past the floor at an end code, with
the plain value past that end of the grid, as clipped (``measure.quant_floor``). Q2_K, Q3_K and the
IQ/TQ/FP4 types get no floor (``floor`` returns None): the judge reads them as quantized with an
unknown floor.

>>> scheme_of("Q4_K", 256, 144, 1000, "blk.0.attn_q.weight", {}).group
'32'
"""

from __future__ import annotations

import numpy as np

from .safetensors_read import QuantScheme

__all__ = ["scheme_of", "floor", "ends", "claims", "FLOORS", "K_QUANTS", "SCALE_SLACK"]

TOL = np.float32(2.0 ** -10 + 2.0 ** -24)
#: half the spacing of fp16 subnormals: the absolute rounding error of a scale stored as fp16 near 0
SUB16 = np.float32(2.0 ** -25)
_SUB = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16, "Q4_K": 32, "Q5_K": 32}
_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4,
         "Q5_K": 5, "Q6_K": 6, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4, "IQ4_NL": 4, "IQ4_XS": 4}
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
#: types with a floor, and their top code (the bottom code is 0, -32 for Q6_K)
FLOORS = {"Q8_0": 127, "Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q4_K": 15, "Q5_K": 31, "Q6_K": 31}
#: K-quants: how far, in units of the sub-block's searched scale, an element can lie from the
#: searched min (Q4_K/Q5_K) or from 0 (Q6_K); proved in _k_floor
_REACH = {"Q4_K": np.float32(24), "Q5_K": np.float32(37), "Q6_K": np.float32(37)}


#: the K-quants whose floor ``_k_floor`` gives; ``ends`` marks their end codes
K_QUANTS = tuple(_REACH)


def scheme_of(tname: str, block: int, tsize: int, nbytes: int, gguf_name: str, meta: dict) -> QuantScheme:
    """The QuantScheme of a tensor stored as GGML type ``tname``; ``calibrated`` when the file says an
    importance matrix steered the quantizer (``quantize.imatrix.*``) and the type's encoder reads one."""
    imatrix = any(k.startswith("quantize.imatrix") for k in meta)
    calibrated = imatrix and (tname in _LEGACY or tname.startswith("IQ") or tname.endswith("_K"))
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


def _rounding16(h: np.ndarray) -> np.ndarray:
    """Bound on ``|true - h|`` for a scale the encoder computed in float32 and stored as the fp16
    ``h``: half an fp16 ulp, 2^-11 relative while ``h`` is normal and 2^-25 absolute among the
    subnormals (and for a scale that underflowed to 0), with TOL's margin on the relative part."""
    return np.abs(h) * TOL + SUB16


def floor(raw: np.ndarray, values: np.ndarray, tname: str, block: int,
          noise: bool = False) -> np.ndarray | None:
    """Per-element floor of blocks ``raw`` (n, block bytes) whose dequantized values are
    ``values`` (n, block); None for a type without one.

    ``noise``: the half-width ``h`` of the noise *model* instead (the rank analysis takes the error
    as uniform within it, variance ``h^2 / 3``). It differs from the bound for the K-quants only:
    their end codes may be several steps off in the worst case the bound covers, but ggml re-rounds
    every element with the stored scales, so the error is half a step almost everywhere. Measured on
    ggml's encoders (tests/test_gguf_floor.py), the real error energy is 0.8-0.9 of this model's,
    against 0.01-0.1 of the bound's."""
    if tname not in FLOORS:
        return None
    if tname in _REACH:
        return _k_floor(raw, values, tname, noise)
    n = raw.shape[0]
    d = _f16(raw, 0)
    step = np.broadcast_to(d[:, None], (n, block))
    offset = np.zeros((n, 1), np.float32)
    d_offset = np.zeros((n, 1), np.float32)
    if tname in ("Q4_1", "Q5_1"):
        offset = _f16(raw, 2)[:, None]
        d_offset = _rounding16(offset)
    low = {"Q8_0": -127, "Q4_0": -8, "Q5_0": -16}.get(tname, 0)
    top = FLOORS[tname] + (low if tname in ("Q4_0", "Q5_0") else 0)
    with np.errstate(all="ignore"):
        code = np.rint((values - offset) / step)
        # a scale that rounded to fp16 0 hides the codes: any of them, the largest included
        code = np.where(np.isfinite(code) & (step != 0), code, max(-low, top))
        edge = ((code <= low) | (code >= top)) & (step != 0) & (tname != "Q8_0") & (not noise)
        # The legacy encoders pick the codes with the float32 scale and store it as fp16 after:
        # each stored value is off by |code| times the scale's rounding, plus the offset's.
        half = np.float32(0.5) + edge.astype(np.float32)
        out = half * np.abs(step) * (1 + TOL) + (np.abs(values) + np.abs(offset)) * TOL \
            + (half + np.abs(code)) * SUB16 + d_offset
    return out.astype(np.float32)


def _k_floor(raw: np.ndarray, values: np.ndarray, tname: str, noise: bool = False) -> np.ndarray:
    """The floor of the K-quants (no importance matrix: ``quantize_row_q*_K_ref``).

    ``R`` (``_REACH``), proved from the search: Q4_K/Q5_K's ``make_qkx2_quants`` keeps a fit only
    when its weighted squared error is below the plain min-max rounding's (each term <= (s0/2)^2,
    s0 = range / nmax); with weights ``av_x + |x|`` (sum <= 64 av_x, each >= av_x) no element is
    then more than 4 s0 off its fitted grid point, which gives range <= 32.1 s (Q4_K; 41.8 s for
    Q5_K) and every element within (nmax + 4 s0 / s) s = 23.6 s (36.4 s) of the searched min.
    Q6_K's ``make_qx_quants`` (weights x^2) keeps the scale maximising the fit; its first
    candidate leaves each element within a unit of 1 / iscale = amax / 32, so the largest element
    is within amax / 8 of its grid point: amax <= 36.6 |s|. The scale rounding: sc is within half a
    unit of s / d_true (one unit for Q6_K, clamped at 127), and d_true within ``_rounding16(d)``
    of the stored d, so sigma = h * (|d| + dd) + |sc| * dd; the min likewise (mu)."""
    n = raw.shape[0]
    d = _f16(raw, 208 if tname == "Q6_K" else 0)[:, None]
    dd = _rounding16(d)
    if tname == "Q6_K":
        sc = np.repeat(raw[:, 192:208].view(np.int8).astype(np.float32), 16, axis=1)
        offset = np.zeros((n, 1), np.float32)
        mu = np.zeros((n, 1), np.float32)
        low, top, nmax, half_sc = -32, 31, 31, np.float32(1)     # sc is clamped at 127 (-128 fits)
    else:
        sc6, mn6 = _k_scales(raw)
        sc, mn6 = np.repeat(sc6, 32, axis=1), np.repeat(mn6, 32, axis=1)
        dmin = _f16(raw, 2)[:, None]
        ddmin = _rounding16(dmin)
        offset = dmin * mn6
        mu = np.float32(0.5) * (np.abs(dmin) + ddmin) + mn6 * ddmin    # |searched min - stored min|
        low, top, nmax, half_sc = 0, FLOORS[tname], FLOORS[tname], np.float32(0.5)
    step = d * sc
    # |searched scale - stored step| (6-bit / int8 rounding against the super-block scale, which
    # itself carries the fp16 rounding), and a bound on the searched scale itself
    sigma = half_sc * (np.abs(d) + dd) + np.abs(sc) * dd
    s_hi = np.abs(step) + sigma
    beyond, whole = _REACH[tname] - nmax, _REACH[tname]
    with np.errstate(all="ignore"):
        if tname == "Q6_K":
            code = np.rint(values / step)
        else:
            code = np.rint((values + offset) / step)
        code = np.where(np.isfinite(code) & (step != 0), code, 0)
        edge = ((code <= low) | (code >= top)).astype(np.float32)
        inner = np.float32(0.5) * np.abs(step) * (1 + TOL) + (np.abs(values) + np.abs(offset)) * TOL
        # an end code: the element may lie beyond the searched grid's end (make_q*_quants' own
        # slack) and the stored grid's end moved by the scale's and the min's rounding
        ends = inner + beyond * s_hi + np.abs(code) * sigma + mu
        # a sub-block whose step is 0 (ggml's `if (!d) continue;`): every element decodes to the
        # same value, which may sit anywhere the search's grid reached
        flat = whole * s_hi + mu + (np.abs(values) + np.abs(offset)) * TOL
        out = np.where(step == 0, flat, inner if noise else np.where(edge > 0, ends, inner))
    return out.astype(np.float32)


def ends(raw: np.ndarray, values: np.ndarray, tname: str) -> np.ndarray | None:
    """Per element of K-quant blocks ``raw`` (n, block bytes) dequantized as ``values`` (n, 256): 1 at
    the top code of its sub-block's range (15 for Q4_K, 31 for Q5_K and Q6_K), -1 at the bottom one (0;
    -32 for Q6_K), 0 between, and 2 in a sub-block whose step is 0 (every element decodes to one value,
    which tells no code). None for another type. Where ggml's last pass clamps a code
    (``quantize_row_q*_K_impl``), the element lies past that end of the grid; anywhere else it was
    rounded to the nearest code.

    >>> raw = np.zeros((1, 144), np.uint8); raw[0, 0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    >>> raw[0, 4:6] = 1                        # sub-blocks 0 and 1: step 0.5, no min; the rest step 0
    >>> vals = np.zeros((1, 256), np.float32); vals[0, 0] = 0.5; vals[0, 32] = 7.5
    >>> ends(raw, vals, "Q4_K")[0, [0, 1, 32, 64]].tolist()
    [0.0, -1.0, 1.0, 2.0]
    """
    if tname not in _REACH:
        return None
    d = _f16(raw, 208 if tname == "Q6_K" else 0)[:, None]
    if tname == "Q6_K":
        step = d * np.repeat(raw[:, 192:208].view(np.int8).astype(np.float32), 16, axis=1)
        offset = np.zeros_like(step)
        low, top = -32, 31
    else:
        sc6, mn6 = _k_scales(raw)
        step = d * np.repeat(sc6, 32, axis=1)
        offset = _f16(raw, 2)[:, None] * np.repeat(mn6, 32, axis=1)
        low, top = 0, FLOORS[tname]
    with np.errstate(all="ignore"):
        code = np.rint((values + offset) / step)
    out = np.where(code >= top, 1, np.where(code <= low, -1, 0)).astype(np.float32)
    return np.where((step == 0) | ~np.isfinite(code), np.float32(2), out).astype(np.float32)


#: how much larger than the range of the weights it quantized (over the levels) a scale that a real
#: quantizer chose may be: llama.cpp's searches (``make_qkx2_quants``, ``make_qkx3_quants``, ``make_qx_quants``
#: with or without importance weights) refit a sub-block's scale by least squares, which moves it from
#: range / levels by a fraction of a step; 2.5 leaves room for that and for the fp16 / 6-bit roundings
SCALE_SLACK = np.float32(2.5)
#: the least searched scale of the super-block's largest sub-block scale, in units of d: ggml stores
#: d = largest / 63 (``make_qp_quants`` with an importance matrix: largest / 62.6 at the least), Q6_K
#: d = largest / -128 (clamped to 127)
_TOP = {"Q4_K": np.float32(62), "Q5_K": np.float32(62), "Q6_K": np.float32(127)}
#: levels a sub-block's range spans at a scale of one (Q6_K: make_qx_quants' nmax 32, the range up to twice
#: the largest magnitude)
_LEVELS = {"Q4_K": np.float32(15), "Q5_K": np.float32(31), "Q6_K": np.float32(32)}
#: legacy types: the range of a block (its largest magnitude at the least) in units of d; ``quantize_row_q*_ref``
#: sets d = amax / 127 (Q8_0), max / -8 (Q4_0), max / -16 (Q5_0), (max - min) / 15 or 31 (Q4_1, Q5_1)
_LEGACY_RANGE = {"Q8_0": np.float32(127), "Q4_0": np.float32(8), "Q5_0": np.float32(16),
                 "Q4_1": np.float32(15), "Q5_1": np.float32(31)}


def claims(raw: np.ndarray, values: np.ndarray, tname: str, which: int | None = None) -> np.ndarray | None:
    """What the stored scales of blocks ``raw`` (n, block bytes) say of the weights they quantized, per
    element (n, 2, block): ``[:, 0]`` the least range (``max(x, 0) - min(x, 0)``) the element's block or
    sub-block of the quantized weights must have had, ``[:, 1]`` the least largest such range over its
    super-block (K-quants; 0 for the legacy types), for any of llama.cpp's quantizers (``SCALE_SLACK``);
    ``which`` 0 or 1: that one alone (n, block). ``values`` gives the block length only. A
    block whose plain counterpart has a smaller range is no quantization of it: its stored step (and the
    floor built on it) vouches for nothing there. None for a type without a floor.

    The K-quants: a sub-block's searched scale is at least ``(sc - 1/2) (|d| - dd)`` (the 6-bit rounding;
    ``sc - 1`` for Q6_K's int8), at most ``SCALE_SLACK`` times its range over the levels; the super-block's
    largest is ``_TOP`` times d, and its largest min ``63 dmin`` lies within its range plus the search's
    reach (``_REACH``) of scales of it. A sub-block of scale 0 says nothing of its own range (its searched
    scale rounded to 0 against the largest), but the super-block's d still does.

    >>> raw = np.zeros((1, 144), np.uint8); raw[0, 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    >>> c = claims(raw, np.zeros((1, 256), np.float32), "Q4_K")     # d = 1 with every sub-block scale 0
    >>> float(c[0, 0, 0]), round(float(c[0, 1, 0]), 1)
    (0.0, 371.6)
    """
    if tname not in FLOORS:
        return None
    if which is not None:
        return _claims(raw, values.shape[1], tname, which)
    n, block = raw.shape[0], values.shape[1]
    out = np.empty((n, 2, block), np.float32)
    out[:, 0], out[:, 1] = _claims(raw, block, tname, 0), _claims(raw, block, tname, 1)
    return out


def _claims(raw: np.ndarray, block: int, tname: str, which: int) -> np.ndarray:
    n = raw.shape[0]
    if tname in _LEGACY_RANGE:
        if which == 1:
            return np.zeros((n, block), np.float32)
        d = np.abs(_f16(raw, 0))[:, None]
        least = _LEGACY_RANGE[tname] * np.maximum(d - _rounding16(d), 0)
        if tname in ("Q4_1", "Q5_1"):
            m = np.abs(_f16(raw, 2))[:, None]          # the block's min: within its range of 0
            least = np.maximum(least, np.maximum(m - _rounding16(m), 0))
        # (an importance matrix refits the scale by weighted least squares: the slack as for the K-quants)
        return np.repeat((least / SCALE_SLACK).astype(np.float32), block, axis=1)
    d = np.abs(_f16(raw, 208 if tname == "Q6_K" else 0))[:, None]
    dlow = np.maximum(d - _rounding16(d), 0)
    levels, slack = _LEVELS[tname], SCALE_SLACK
    # searched scales at least this (sub-block; the super-block's largest), as ranges: times levels / slack
    if which == 0:
        if tname == "Q6_K":
            least_s = np.maximum(np.abs(raw[:, 192:208].view(np.int8).astype(np.float32)) - 1, 0) * dlow
        else:
            least_s = np.maximum(_k_scales(raw)[0] - np.float32(0.5), 0) * dlow
        return np.repeat((least_s * levels / slack).astype(np.float32), block // least_s.shape[1], axis=1)
    top = _TOP[tname] * dlow * levels / slack
    if tname != "Q6_K":
        dmin = np.abs(_f16(raw, 2))[:, None]
        # the largest searched min (63 dmin, rounded) lies within the range plus the reach of its scale
        mins = np.float32(62) * np.maximum(dmin - _rounding16(dmin), 0) / (1 + _REACH[tname] * slack / levels)
        top = np.maximum(top, mins)
    return np.repeat(top.astype(np.float32), block, axis=1)
