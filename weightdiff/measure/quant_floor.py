"""The quantization noise-floor test of one tensor pair where a side is quantized.

Unlike the stats pass (which measures how far the tuned tensor moved), this asks whether
every difference is explained by quantizing the base: it streams both sides' values and
the quantized side's per-element floor (``Checkpoint.floor_windows``: half a step of its
own grid, plus a step for clipped codes, plus the rounding of its scales), through
``kernels.quant_floor.floor_stats``. Which test decides (docs/methodology.md, "Quantization is
not fine-tuning"):

* ``bound`` (round-to-nearest formats: FP8, bitsandbytes, MXFP4, GGUF): within the floor
  when no element lies beyond it; a GGUF K-quant made with an importance matrix sets apart the
  elements its clamp explains (``clamped_beyond``: at an end code, the plain value past that end),
  which its weighted search may leave any number of steps off (``beyond_clamped``);
* ``first-group`` (GPTQ and compressed-tensors integer weights, whose quantizer may have
  compensated errors): those quantizers round the first group of columns they process
  (``g_idx == 0``) before any compensation reaches it, and each row's compensation only
  moves columns after its first; so at least one column of that group must be within the
  bound in every row. Within the floor when some first-group column has no element beyond it
  (or when every element is within the bound, as plain rounding gives);
* ``statistical`` (AWQ, whose scale search and clipping move whole columns and groups):
  within the floor when at most ``AWQ_BEYOND_SHARE`` of the elements lie beyond it, not counting
  group extremes its clipping moved (AWQ's searched scales fit back first, weightdiff.measure.awq_fold).

>>> ratio_share(3, 1000)
0.003
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..io.safetensors_read import QuantScheme
from ..kernels import quant_floor as QF
from ..kernels.dtypes import DTYPES
from ..kernels.quant import round_to
from ..kernels.reference import RECAST_DTYPES, decode
from ..kernels.reference import round_to as cast_to

__all__ = ["floor_test", "floor_pass", "FloorPass", "clamped_beyond", "scales_beyond", "scale_excess", "SCALE_SLACK", "scales_unchecked", "quant_noise_var", "near_grid", "dequant_rounding_var", "row_col_sums", "DEQUANT_REL", "AWQ_BEYOND_SHARE", "CODES_MOVED_SHARE", "same_scheme", "extremes_differ", "extreme_rounding", "EXTREMES_SHARE", "NEAR_GRID_SHARE", "ratio_share"]

#: AWQ: share of elements beyond the floor a quantization of the base may leave, beside the group
#: extremes its clipping search moved (``kernels.quant_floor.clipped_beyond``); AutoAWQ 0.2.9 on a
#: 256-wide model of an unchanged base: at most 0.17% once those are set apart and ``FOLD_REL`` allowed,
#: where a rank-4 fine-tune of relative size 1e-2 put q_proj at 0.52%, a dense one of a layer 0.7-0.84%
AWQ_BEYOND_SHARE = 0.004
#: relative error allowed each element of a base scaled by AWQ scales fit back (awq_fold): on AutoAWQ
#: 0.2.9's files of an unchanged 256-wide base, 0.27-1.1% of elements lie past the floor with half a bf16
#: ulp (2^-8), 0.08-0.17% with 2%; a rank-4 fine-tune of relative size 1e-2 leaves 0.52% of q_proj past it
FOLD_REL = 0.02


#: half an ulp of bf16, relative (at the bottom of a binade; it was 2^-9, the top's): a float32 base may
#: have been cast to bf16 before quantizing, and a bf16 or f16 one may be the rounding of what the
#: quantizer read
CAST_REL = 2.0 ** -8          # bf16 keeps 8 significant bits: half an ulp is up to 2^-8 of |x|

#: both sides quantized by one scheme: the share of elements whose value moved by a quarter of the two floors or
#: more (a code moved) above which the pair is not "the same weights quantized twice". One quantizer given the same
#: weights stores the same codes; this allows ties broken another way (another rounding mode, a scale computed in
#: another precision), which move a few codes in a million. A dense fine-tune of relative size 1e-3 moves ~0.3% of
#: int4 g128 codes, 1e-2 ~2%; quantizing a bf16 copy of the same float32 weights moves ~0.5% (int8 per channel: 7%)
CODES_MOVED_SHARE = 1e-4

#: quantizers that store each block's largest magnitude exactly but for the rounding of a scale, so that their
#: dequantized block holds it (the element at an end code): llama.cpp's reference encoders of the legacy types
#: (``quantize_row_q*_ref``: d = amax / 127, max / -8, max / -16; Q4_1 / Q5_1 keep min and min + 15 or 31 d, each
#: within fp16 rounding: relative 2^-11 of d, of m and d for the _1 types, 2^-25 absolute where d is subnormal,
#: times the levels) and bitsandbytes' nf4 and fp4 (float32 absmax times a code of 1; 2^-8 allows a dequantization
#: in bf16). (relative, absolute) per scheme; a calibrated encoder (an importance matrix) refits its scales
EXTREME_ROUNDING = {("gguf", "Q8_0"): (2.0 ** -11, 127 * 2.0 ** -25), ("gguf", "Q4_0"): (2.0 ** -11, 8 * 2.0 ** -25),
                    ("gguf", "Q5_0"): (2.0 ** -11, 16 * 2.0 ** -25), ("gguf", "Q4_1"): (3 * 2.0 ** -11, 16 * 2.0 ** -25),
                    ("gguf", "Q5_1"): (3 * 2.0 ** -11, 32 * 2.0 ** -25), ("bitsandbytes", "nf4"): (2.0 ** -8, 0.0),
                    ("bitsandbytes", "fp4"): (2.0 ** -8, 0.0)}
#: blocks whose largest magnitudes differ beyond the roundings, above which two such quantizations are not of the
#: same weights (measured: none in 2,048-4,096 blocks for two schemes of the same weights, from one source or from a
#: float32 original and its bf16 copy; 11-20% for a dense 1e-2 fine-tune of the linears)
EXTREMES_SHARE = 1e-3


def extreme_rounding(q: QuantScheme | None, ck, name: str) -> tuple[float, float, int] | None:
    """(relative, absolute rounding, block length) of a quantized side whose dequantized blocks hold each block's
    largest magnitude (``EXTREME_ROUNDING``), its blocks runs of the flat order; else None."""
    if q is None or q.calibrated or not str(q.group).isdigit() or "nested" in q.scheme:
        return None
    r = EXTREME_ROUNDING.get((q.format, q.scheme.split(" ")[0]))
    if r is None or (hasattr(ck, "claim_order") and ck.claim_order(name) != "rows"):
        return None
    return r[0], r[1], int(q.group)


def extremes_differ(vb: np.ndarray, vt: np.ndarray, eb: tuple, et: tuple, block: int) -> tuple[int, int]:
    """(blocks whose largest magnitudes differ beyond both sides' roundings and half a bf16 ulp, blocks) of one
    window of two quantized sides (``extreme_rounding``: ``eb``, ``et``), in runs of ``block`` (a partial last
    run counts as one). A quantizer of this kind given the same weights, or their bf16 rounding, stores the same
    largest magnitudes, whatever its levels; a change of the weights moves them.

    >>> extremes_differ(np.array([1.0, -0.5, 0.25, 0.0]), np.array([1.0, 0.5, 0.26, 0.3]), (2.0 ** -11, 0.0), (2.0 ** -11, 0.0), 2)
    (1, 2)
    """
    n = min(len(vb), len(vt))
    if not n or block < 1:
        return 0, 0
    whole = n - n % block
    def amax(v):
        a = np.abs(np.asarray(v[:n], np.float64))
        out = a[:whole].reshape(-1, block).max(axis=1) if whole else np.zeros(0)
        return np.concatenate([out, [a[whole:].max()]]) if whole < n else out
    with np.errstate(invalid="ignore"):
        ab, at = amax(vb), amax(vt)
        tol = eb[0] * ab + eb[1] + et[0] * at + et[1] + CAST_REL * np.maximum(ab, at)
        off = np.abs(ab - at) > tol
    return int(np.count_nonzero(off)), len(ab)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def ratio_share(n: float, total: float) -> float | None:
    return n / total if total else None


def _test_of(schemes: list) -> str:
    if any(s.format == "awq" for s in schemes):
        return "statistical"
    if any(s.calibrated and s.format != "gguf" for s in schemes):    # llama.cpp's quantizers have no first group
        return "first-group"
    return "bound"


#: elements per window of the floor test (at most): each window holds about ten float64 arrays of its length at
#: once (both sides decoded, the floors, ``floor_stats``' temporaries), so the pass's 16M-element windows held
#: ~0.7 GB above the rest and an FP8 or int8 layer of a 7B model peaked at 1.1 GB with --no-rank
FLOOR_WINDOW = 1 << 21


def floor_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple,
               window: int, stop: int | None = None, noise: dict | None = None) -> dict[str, Any] | None:
    """The floor test of one pair (``base``/``tuned`` are Checkpoints), or None when neither
    side is quantized or its reader gives no floor. ``window``: elements per window, at most ``FLOOR_WINDOW``.

    ``noise``: a dict to receive what ``quant_noise_var`` would give for the same window (key ``sums``: its
    (row sums, column sums), or None where it gives None; ``window``: the window they were summed in), summed in
    this test's own pass from its first window with an element beyond the floor on (the windows before it read
    once more then): a pair whose change is ranked above its quantization noise is not read a third time for
    its noise. Left without ``sums`` when no element was beyond (a pair within its floor is not ranked so)."""
    window = max(1, min(int(window), FLOOR_WINDOW))
    lazy = _lazy_noise(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop) if noise is not None else None
    info = _floor_test(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, lazy)
    _noise_result(lazy, noise, window)
    return info


def _floor_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple,
                window: int, stop: int | None, lazy: "_LazyNoise | None") -> dict[str, Any] | None:
    qb, qt = base.tensors[bname].quant, tuned.tensors[tname].quant
    if qb is None and qt is None:
        grid = detect_export(tuned, tname, dtype_t, shape)
        if grid is None:
            rt = detect_roundtrip(base, bname, dtype_b, tuned, tname, dtype_t, shape)
            if rt is None:
                return None
            qt = QuantScheme("dequantized", rt["label"], rt["bits"], str(rt["group"] or "row"), False, (tname,), 0)
            ft = roundtrip_floor_windows(base, bname, dtype_b, tuned, tname, shape, window, stop, rt)
            return _stream(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, None, qt, None, ft,
                           lazy=lazy)
        if detect_export(base, bname, dtype_b, shape) is not None:
            return None                 # a base on a grid too is structured data, not an export of it
        qt = QuantScheme("dequantized", f"int{grid['bits']} grid per row (up to {grid['levels']} levels in "
                         f"sampled rows)", grid["bits"], "row", False, (tname,), 0)
        ft = export_floor_windows(tuned, tname, dtype_t, shape, window, stop)
        return _stream(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, qb, qt, None, ft,
                       lazy=lazy)
    return _stream(*_quant_args(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop), lazy)


def _quant_args(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple, window: int,
                stop: int | None) -> tuple:
    """``_stream``'s arguments for a pair with a quantized side, up to ``lazy``."""
    qb, qt = base.tensors[bname].quant, tuned.tensors[tname].quant
    fb = base.floor_windows(bname, window, 0, stop) if qb is not None else None
    ft = tuned.floor_windows(tname, window, 0, stop) if qt is not None else None
    folded = None
    if (qb is None) != (qt is None) and (qb or qt).format == "awq" and bname == tname:
        from .awq_fold import fold         # AWQ's searched scales, fit back (weightdiff.measure.awq_fold)

        folded = fold(base, tuned, tname) if qt is not None else fold(tuned, base, bname)
    return base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, qb, qt, fb, ft, folded


def _lazy_noise(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple, window: int,
                stop: int | None) -> "_LazyNoise":
    return _LazyNoise(lambda: _noise_windows(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop),
                      _rows_of(shape, stop), int(math.prod(shape[1:])))


def _noise_result(lazy: "_LazyNoise | None", noise: dict | None, window: int) -> None:
    if lazy is not None and lazy.started:
        try:
            noise.update(window=window, sums=lazy.result())
        except ValueError:          # fewer elements than the matrix holds: left to ``quant_noise_var``'s own pass
            pass


def floor_pass(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple, window: int,
               stop: int | None = None, noise: dict | None = None) -> "FloorPass | None":
    """``floor_test`` of a pair with a quantized side, taken in another pass's windows (the statistics pass
    of ``measure.compute``, ``window`` elements each: a multiple of the test's own window, which is
    ``min(window, FLOOR_WINDOW)``), so that the pair is read once for both; None when neither side is
    quantized (the export and round-trip tests sample the tensor first). Same arguments as ``floor_test``."""
    if base.tensors[bname].quant is None and tuned.tensors[tname].quant is None:
        return None
    fw = max(1, min(int(window), FLOOR_WINDOW))
    if int(window) % fw:
        return None
    lazy = _lazy_noise(base, bname, dtype_b, tuned, tname, dtype_t, shape, fw, stop) if noise is not None else None
    return FloorPass(_quant_args(base, bname, dtype_b, tuned, tname, dtype_t, shape, fw, stop), lazy, noise)


class FloorPass:
    """The floor test fed with another pass's windows (``floor_pass``): ``feed(wb, wt, changed)`` each pair of
    windows of that pass in order (as ``Checkpoint.windows`` gives them, any multiple of the test's window long),
    ``changed`` when the window holds an element that differs; then ``result()``, or ``close()`` when the test is
    not wanted. Nothing is computed until a window that differs (a pair read as unchanged takes no floor test):
    then the windows before it are read once more, in order, and the test goes on in the fed windows, cut into
    its own, so its numbers are bit for bit those of ``floor_test``'s own pass. ``result()`` is None where the
    test could not follow the pass (no window differed, windows that do not line up): call ``floor_test``."""

    def __init__(self, args: tuple, lazy: "_LazyNoise | None", noise: dict | None):
        self._args, self._lazy, self._noise = args, lazy, noise
        self.window = args[7]
        shape, stop = args[6], args[8]
        self.total = int(math.prod(shape)) if stop is None else int(stop)     # the elements the pass runs over
        self._co = None
        self._info = None            # the test's result once it returned
        self.seen = 0                # elements the pass has fed
        self.started = False
        self.failed = False
        self._needed = None          # what the test's windows so far say of the rank (``wants_rank``)

    def _send(self, w) -> None:
        try:
            self._needed = self._co.send(w)
        except StopIteration as done:
            self._info, self._co = done.value, None

    def wants_rank(self) -> bool:
        """Whether the windows fed so far make it likely that the pair ends beyond its floor, so that the rank of its
        change is taken (``_RankHint``): a hint for when a streamed Gram matrix starts (``rank_stream.RankSink``'s
        ``gate``), never part of a result. True when nothing tells (no window tested yet, windows that do not line
        up); after the last window the result's own ``within``."""
        if self.failed or not self.started:
            return True
        if self._co is None:
            return self._info is None or self._info.get("within") is False
        return self._needed is not False

    def feed(self, wb, wt, changed: bool) -> None:
        n, start = len(wt), self.seen
        self.seen += n
        if self.failed or (not self.started and not changed) or (self.started and self._co is None):
            return
        if len(wb) != n or start % self.window or (n % self.window and start + n != self.total):
            self.failed = True       # elements not one per item, or windows that do not line up: its own pass
            return
        if not self.started:
            self.started = True
            base, bname, _, tuned, tname = self._args[:5]
            self._co = _stream_co(*self._args, self._lazy)
            try:
                next(self._co)
            except StopIteration as done:          # a side gives no floor: no window needed
                self._info, self._co = done.value, None
                return
            if start:                # the windows before this one, read once more
                for w in zip(base.windows(bname, self.window, 0, start), tuned.windows(tname, self.window, 0, start)):
                    self._send(w)
        for a in range(0, n, self.window):
            if self._co is not None:
                self._send((wb[a:a + self.window], wt[a:a + self.window]))

    def result(self) -> dict[str, Any] | None:
        if self.failed or not self.started:
            self.close()
            return None
        if self._co is not None:
            self._send(None)
        info = self._info
        _noise_result(self._lazy, self._noise, self.window)
        return info

    def close(self) -> None:
        if self._co is not None:
            self._co.close()
            self._co = None


class _RankHint:
    """What the floor test's sums so far say of the rank (``FloorPass.wants_rank``): whether the pair is likely to end
    with ``within`` False, the one outcome whose change is ranked (within, untested or AWQ's fitted scales take no
    rank). The end-of-pass rules of ``_stream_co`` that running sums can follow: elements beyond the floor (the
    clamped or clipped ones aside; a bound test's), AWQ's beyond share, GPTQ's first-group columns each with an
    element beyond, the quantized side all zero, a near-grid float side, the blocks' extremes moved; the rules that
    only the whole tensor decides (the stored scales' tests, ``scale_excess``) are not guessed, so a pair they alone
    put beyond its floor starts its Gram matrix after the pass (read once more). A guess either way costs a read,
    never a number: the Gram matrix is the same sums in the same order whenever it starts."""

    def __init__(self, side: str, test: str, cast_rel: float, folded: bool, clamps: bool, awq_group: int,
                 ext_block: int, first: Callable[[], "np.ndarray | None"]):
        self.side, self.test, self.cast_rel, self.folded, self.clamps = side, test, cast_rel, folded, clamps
        self.awq_group, self.ext_block, self._first_of, self._first = awq_group, ext_block, first, False

    def __call__(self, acc: np.ndarray, clipped: int, cols: np.ndarray, nonzero: list, ext_off: int,
                 ext_blocks: int) -> bool:
        n, beyond = int(acc[0]), int(acc[1])
        if self.folded or not n:
            return False                    # AWQ's scales fit back: its change is not ranked
        if self.side == "base" and self.cast_rel and int(acc[8]) == 0:
            return False                    # so far a dequantized copy of the base (within, whatever else says)
        if self.side != "both" and nonzero[0] and not nonzero[1]:
            return True                     # the quantized side all zero so far
        if near_grid(self.side, acc) is not None:
            return True
        if self.side == "both":
            return (self.test == "bound" and beyond - (clipped if self.clamps else 0) > 0) or \
                (bool(self.ext_block) and ext_off > EXTREMES_SHARE * ext_blocks)
        if self.test == "bound":
            return beyond - (clipped if self.clamps else 0) > 0
        if self.test == "statistical":
            return (beyond - clipped) / n > AWQ_BEYOND_SHARE
        if beyond == 0:
            return False
        if self._first is False:
            self._first = self._first_of()
        first = self._first
        return first is None or not first.size or int(cols[first].min()) > 0


def _stream(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, qb, qt, fb, ft,
            folded=None, lazy: "_LazyNoise | None" = None) -> dict[str, Any]:
    """The floor test's pass over the pair's own windows (``_stream_co`` fed by them)."""
    co = _stream_co(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, qb, qt, fb, ft, folded, lazy)
    try:
        next(co)
        for w in zip(base.windows(bname, window, 0, stop), tuned.windows(tname, window, 0, stop)):
            co.send(w)
        co.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the floor test did not finish")        # pragma: no cover - _stream_co returns on None


def _stream_co(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop, qb, qt, fb, ft,
               folded=None, lazy: "_LazyNoise | None" = None):
    """The floor test's pass as a generator: sent each (base window, tuned window) in the pair's windows of
    ``window`` elements from the start (``Checkpoint.windows``), then None; returns the ``quant`` dict (the
    ``StopIteration``'s value). Returns at once, before any window, when a side gives no floor."""
    schemes = [q for q in (qb, qt) if q is not None]
    side = "both" if qb is not None and qt is not None else ("base" if qb is not None else "tuned")
    info: dict[str, Any] = {"side": side, "format": "+".join(dict.fromkeys(q.format for q in schemes)),
                            "scheme": "; ".join(dict.fromkeys(q.scheme for q in schemes))}
    if folded is not None:
        info["awq_scales"] = ("inputs" if folded[1] is None else "outputs" if folded[0] is None
                              else "inputs and outputs")
    if (qb is not None and fb is None) or (qt is not None and ft is None):
        info.update(test="none", within=None, note="the reader gives no noise floor for this tensor")
        return info
    ncols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    plain = dtype_t if qt is None else dtype_b
    # the plain side may hold the weights the quantizer read rounded to bf16 (a BF16 GGUF beside the
    # Q8_0 made from the same f16/f32 original), or wider than it read them (an F32 base quantized
    # from its bf16 copy): half a bf16 ulp either way, which a quantization floor alone does not cover
    cast_rel = CAST_REL if side != "both" and plain in ("F32", "F64", "BF16", "F16") else 0.0
    if folded is not None:
        cast_rel = max(cast_rel, FOLD_REL)       # the scales are fit, not read: allow their error
    acc = np.zeros(len(QF.FLOOR_FIELDS))
    # AWQ's clipping search moves its groups' extremes past the floor: counted apart (``clipped_beyond``)
    groups = [int(q.group) for q in schemes if q.format == "awq" and str(q.group).isdigit()]
    awq_group = groups[0] if len(groups) == 1 and side != "both" and ncols % groups[0] == 0 else 0
    clipped = 0
    # an importance-matrix K-quant (llama-quantize --imatrix) clamps low-importance elements to the end codes
    # any number of steps past the grid: counted apart where the code is an end one and the plain value lies
    # past that end (``gguf_floor.ends``)
    ends_it = None
    both_ends = []                           # with both sides quantized: the calibrated GGUF sides' end codes
    if side != "both":
        qs, qck, qname = (qt, tuned, tname) if qt is not None else (qb, base, bname)
        if qs.format == "gguf" and qs.calibrated and hasattr(qck, "end_windows"):
            ends_it = qck.end_windows(qname, window, 0, stop)
    else:
        for q, ck, name in ((qb, base, bname), (qt, tuned, tname)):
            if q.format == "gguf" and q.calibrated and hasattr(ck, "end_windows"):
                it = ck.end_windows(name, window, 0, stop)
                if it is not None:
                    both_ends.append(it)
    # what a GGUF side's block scales say of the weights they quantized (``gguf_floor.claims``), checked against
    # the other side's values: a block whose scales no quantizer of those values could have chosen vouches for
    # nothing (floor 0 there, and no clamp)
    claim_its = []
    claims_unchecked = False
    columns = False                          # a GGUF side stored transposed: its blocks run down the columns
    for q, ck, name, of_tuned in ((qb, base, bname, False), (qt, tuned, tname, True)):
        other = qb if of_tuned else qt
        if q is not None and q.format == "gguf" and str(q.group).isdigit() and other is not None \
                and other.format == "gguf" and other.calibrated:
            # the other side's values are an importance-matrix quantization, whose clamp pulls low-importance
            # extremes inside the weights' range: a range they lack says nothing of this side's scales (a plain
            # Q4_K of the same weights read "scales beyond the base" there, floor 0, and DERIVED)
            claims_unchecked = "the other side is an importance-matrix quantization, whose clamp pulls values inside " \
                               "the weights' range"
            continue
        if q is not None and q.format == "gguf" and str(q.group).isdigit() and hasattr(ck, "claim_windows"):
            a, b = ck.claim_windows(name, 0, window, 0, stop), ck.claim_windows(name, 1, window, 0, stop)
            if a is None:
                continue
            down = None
            if hasattr(ck, "claim_order") and ck.claim_order(name) == "cols":
                # the other side's range per block of ``sub`` rows of a column (and per 256), one pass first
                down = column_ranges(tuned if not of_tuned else base, bname if of_tuned else tname,
                                     dtype_b if of_tuned else dtype_t, shape, int(q.group), stop)
                columns = True
                if down is None:             # (not cut at whole blocks: the scales cannot be checked)
                    claims_unchecked = True
                    continue
            claim_its.append((a, b, int(q.group), of_tuned, down))
    # both sides quantized by encoders that keep each block's largest magnitude: those must agree (blocks of the
    # larger length; GGUF's 32 divide bitsandbytes' 64)
    ext_b = extreme_rounding(qb, base, bname) if side == "both" else None
    ext_t = extreme_rounding(qt, tuned, tname) if side == "both" else None
    ext_block = max(ext_b[2], ext_t[2]) if ext_b and ext_t and max(ext_b[2], ext_t[2]) % min(ext_b[2], ext_t[2]) == 0 \
        and window % max(ext_b[2], ext_t[2]) == 0 else 0
    ext_off = ext_blocks = 0
    implausible = 0
    nonzero = [False, False]                 # (plain side, quantized side) hold a non-zero value
    cols = np.zeros(max(ncols, 1), dtype=np.int64)
    pos = 0
    fl_b = fb if fb is not None else iter(())
    fl_t = ft if ft is not None else iter(())
    # the first-group test's rows of the plain side, counted from this pass's windows (not read once more after it)
    fg = _FirstGroups.of(base, bname, dtype_b, tuned, tname, dtype_t, side, shape) \
        if stop is None and _test_of(schemes) == "first-group" else None
    hint = _RankHint(side, _test_of(schemes), cast_rel, folded is not None, bool(ends_it is not None or both_ends),
                     awq_group, ext_block, (lambda: _first_group(base, bname, tuned, tname, side, ncols)))
    needed = None
    # the stored scales' test (``scale_excess``, taken when the pair ends within) fed this pass's plain rows while the
    # pair looks within, not a pass of its own over the plain side after it; let go once it looks beyond
    sc = ScaleCheck.of(base, bname, dtype_b, tuned, tname, dtype_t, side, shape, folded) \
        if stop is None and side != "both" and len(shape) >= 2 else None
    if sc is not None and sc.prows * sc.prow != math.prod(shape):
        sc = None
    sc_rest = np.zeros(0)                    # the plain magnitudes of a row a window cut, until the next
    while True:
        w = yield needed
        if w is None:
            break
        wb, wt = w
        vb = decode(wb, dtype_b)
        vt = decode(wt, dtype_t)
        if fg is not None:
            fg.window(vb if side == "tuned" else vt)
        floor = np.zeros(len(vt), np.float64)
        if fb is not None:
            floor += next(fl_b)
        if ft is not None:
            floor += next(fl_t)
        if side == "both":
            # each quantizer may have read its own rounding of the weights, and computed in it (a Q8_0 of a float32
            # original and one of its bf16 copy, LLM.int8 dividing in the weights' bf16: DERIVED): half a bf16 ulp
            # of the larger value (a code 0 beside a code 1 of a weight at the boundary). Once, not per side: twice
            # made two schemes of a dense 1e-3 fine-tune (Q8_0 and Q4_0, Q4_K and Q6_K) read quantized only
            floor += CAST_REL * np.maximum(np.abs(vb), np.abs(vt))
        # cast_rel scales with the first argument's magnitude: the plain side's (the quantized one
        # may be the base)
        plain_v, quant_v = (vb, vt) if qb is None else (vt, vb)
        if sc is not None:
            if needed:
                sc = sc_rest = None
            else:
                sc_rest = _scale_rows(sc, sc_rest, plain_v)
        bad = None
        for a, b, sub, of_tuned, down in claim_its:
            ca, cb = next(a), (next(b) if b is not None else None)
            off = scales_beyond(vb if of_tuned else vt, ca, cb, sub) if down is None else \
                columns_beyond(pos, ca, cb, *down)
            if off is not None:
                bad = off if bad is None else bad | off
        if bad is not None and bad.any():
            floor[bad] = 0.0
            implausible += int(np.count_nonzero(bad))
        if not nonzero[0] and np.any(plain_v != 0):
            nonzero[0] = True
        if not nonzero[1] and np.any(quant_v != 0):
            nonzero[1] = True
        if folded is not None:
            plain_v = _scaled(plain_v, folded, pos, ncols)
        part, c = QF.floor_stats(plain_v, quant_v, floor, pos % max(ncols, 1), max(ncols, 1), cast_rel,
                                 DEQUANT_REL if cast_rel else 0.0)
        if awq_group and len(plain_v) % awq_group == 0 and pos % awq_group == 0:
            clipped += QF.clipped_beyond(plain_v, quant_v, floor, awq_group, cast_rel)
        if both_ends:
            # a side's clamp put its value at an end code any number of steps from the weight; every other value
            # of either side lies within its own floor of the weight: beyond the two floors only where a side's
            # code is an end one, the pair can be two quantizations of one number
            at_end = np.zeros(len(vt), bool)
            for it in both_ends:
                at_end |= np.asarray(next(it)) != 0
            if bad is not None and bad.any():
                at_end &= ~bad
            with np.errstate(invalid="ignore"):
                d = np.abs(vb.astype(np.float64) - vt)
            clipped += int(np.count_nonzero(at_end & np.isfinite(d) & (d > floor)))
        if ends_it is not None:
            end = np.asarray(next(ends_it), np.float32)
            if bad is not None and bad.any():
                end = np.where(bad, np.float32(0), end)
            # (a transposed tensor's sub-blocks run down its columns, not along a window: no step-0 element counts)
            clipped += clamped_beyond(plain_v, quant_v, floor, end, cast_rel,
                                      int(qs.group) if str(qs.group).isdigit() and not columns else 0)
        if ext_block:
            o, k = extremes_differ(vb, vt, ext_b, ext_t, ext_block)
            ext_off += o
            ext_blocks += k
        mx = max(acc[3], part[3])
        acc += part
        acc[3] = mx                              # max_u combines with max, the rest with +
        cols += c
        pos += len(vt)
        needed = hint(acc, clipped, cols, nonzero, ext_off, ext_blocks)
        if lazy is not None:
            # the noise a rank is counted above: summed once the change is likely to be ranked (a GPTQ release's
            # error compensation puts elements beyond from its first window; its first-group columns say within)
            lazy.window(acc[1] > 0 and needed)
        # nothing of this window kept while the next is awaited: fed by the stats pass, this frame lives through
        # the next window's Gram product (70B-width FP8 and GPTQ pairs peaked 56 MB higher with them kept)
        w = wb = wt = vb = vt = floor = plain_v = quant_v = bad = part = c = None
        ca = cb = off = at_end = d = end = None
    n, beyond = int(acc[0]), int(acc[1])
    test = _test_of(schemes)
    info.update(test=test, elements=n, beyond=beyond, beyond_share=ratio_share(beyond, n),
                # a NaN scale or value makes the ratios NaN: no number (the JSON would write null, and the
                # memo, which re-reads the result, refused the run); the nonfinite counts tell the story
                max_ratio=_finite(float(acc[3])), rms_ratio=_finite(math.sqrt(acc[2] / n)) if n else None,
                norm_above_floor=_finite(math.sqrt(acc[4])))
    if test == "bound" and (ends_it is not None or both_ends):
        info["beyond_clamped"] = clipped
        info["within"] = beyond == clipped
    elif test == "bound":
        info["within"] = beyond == 0
    elif test == "statistical":
        if awq_group:
            info["beyond_clipped"] = clipped
        info["within"] = ((beyond - clipped) / n if n else 0.0) <= AWQ_BEYOND_SHARE
    else:
        first = _first_group(base, bname, tuned, tname, side, ncols)
        best = int(cols[first].min()) if first is not None and first.size else None
        info["first_group_min_beyond"] = best
        # the first group is rounded before any compensation, so against plain weights it stays within the floor;
        # with both sides quantized each side's first group is its own weights rounded, and two roundings of
        # different weights (a dense 1e-2 fine-tune) stay within the two floors there too: no evidence either way
        # (two GPTQ builds of a base and of its fine-tune read "quantized only")
        info["within"] = beyond == 0 or (best == 0 and side != "both")
        if best is None:
            info.update(test="bound", within=beyond == 0)
        scales = fg.result() if fg is not None else None
        if scales is None:
            scales = first_group_scales(base, bname, dtype_b, tuned, tname, dtype_t, side, shape)
        if scales is not None:
            # the quantizer's first group was set up from the weights it read, before any compensation:
            # its scales come back from the base's weights, or the base is not what it read
            info["first_group_scales"] = scales
            info["within"] = bool(info["within"]) and scales >= SCALE_MATCH_SHARE
    if claims_unchecked and info.get("within"):
        why = claims_unchecked if isinstance(claims_unchecked, str) else \
            "the tensor is stored transposed and not cut at whole blocks"
        info.update(within=None, note=f"the GGUF block scales could not be checked against the other side's "
                                      f"weights, as {why}: a floor they make may hold a change")
    if implausible:
        # blocks whose stored scales are far larger than any quantizer of the other side's weights picks: their
        # floor was taken as 0 (their elements count beyond it wherever they differ)
        info["scales_beyond_base"] = implausible
    nz_b, nz_t = (nonzero[0], nonzero[1]) if qb is None else (nonzero[1], nonzero[0])
    if n and ((nz_b and not nz_t) if side != "base" else (nz_t and not nz_b)):
        # every quantized value is 0 (the tuned side's, when both are quantized) while the other side's are not:
        # no quantizer of those weights stores that (each group's largest weight takes an end code), whatever
        # scale is stored beside the zeros; a tuned tensor of zeros is pruning, not quantization
        info.update(within=False, all_zero=True)
    elif info.get("within"):
        excess = sc.result() if sc is not None and sc.fed == sc.prows else \
            scale_excess(base, bname, dtype_b, tuned, tname, dtype_t, side, shape, folded)
        if excess:
            info.update(within=False, scales_beyond_base=info.get("scales_beyond_base", 0) + excess)
        elif excess is None and scales_unchecked(base, bname, tuned, tname, side, shape):
            # the floor rests on stored scales nothing here tested: no quantizer of the plain weights may have
            # chosen them, and a floor from larger ones holds a change. Untested, not within
            info.update(within=None, scales_unchecked=True,
                        note="the stored scales could not be checked against the other side's weights (this "
                             "layout has no check): a floor from scales no quantizer of them picks may hold a change")
    if side == "base" and cast_rel and n and int(acc[8]) == 0 and not info.get("within"):
        # every value is the base's dequantized one up to the rounding of a dequantization done in bf16
        # (GPTQModel casts fp16 scales to bf16): not a fine-tune, whatever the first-group scales say (the
        # plain side is not the weights the quantizer read, so its min/max do not give them back)
        info.update(within=True, dequantized=True)
    near = None if info.get("dequantized") else near_grid(side, acc)
    if near is not None:
        # a float model that starts from the quantized values (gpt-oss as released in MXFP4, a QLoRA merge
        # over its NF4 base, DeepSeek's FP8 release) and moved most by a small part of a step: not spread
        # over the floor as quantizing its weights would leave them. Not within, even when no element is
        # beyond; and the difference is the change itself (no quantization noise in it, for the rank)
        info.update(within=False, near_grid=near)
    if side == "both" and test != "bound" and not info.get("within"):
        # GPTQ's compensation (AWQ's scaling) moves values by several steps, each side in its own order:
        # two such quantizations of the same weights differ beyond the two floors, as a fine-tune does
        info.update(within=None, note="both sides quantized, one by an error-compensating quantizer (GPTQ, AWQ): "
                                      "their floors do not bound the difference of two quantizations")
    if ext_block and info.get("within") and ext_off > EXTREMES_SHARE * ext_blocks:
        # each value within the two floors, but the blocks' largest magnitudes, which both encoders keep but for a
        # scale's rounding, moved: no two such quantizations of the same weights (or of their bf16 rounding) leave
        # that. Q4_0 of a base and Q5_0 of a dense 1e-2 fine-tune read "quantized only": a fine-tune's change is
        # far below a 4-bit step, not below the rounding of a block's largest value
        info.update(within=False, extremes_differ=ext_off, blocks=ext_blocks,
                    note=f"both encoders keep each block's largest magnitude, and in {ext_off} of {ext_blocks} blocks "
                         "those differ beyond their scales' rounding: no two quantizations of the same weights do that")
    elif ext_block:
        info["extremes_checked"] = ext_blocks
    if side == "both" and info.get("within") and n and same_scheme(qb, qt):
        # within the two floors says the values can be two quantizations of one number each, not that they are of
        # the same weights: one quantizer given the same weights stores the same codes, and a third of them moved by
        # a step in two round-to-nearest builds of a base and of a dense 1e-2 fine-tune of its linears (bf16), which
        # read "explained by quantizing the same weights twice". Codes moved mean weights that differ by less than a
        # step (a fine-tune, or another rounding of the same weights) or a quantizer that depends on calibration
        # data: the pair cannot tell those apart. Untested, not within (moved elements on a zero base code are not
        # counted: a lower bound)
        steps = int(acc[6]) - int(acc[7])
        if steps > CODES_MOVED_SHARE * n:
            info.update(within=None, codes_moved=steps,
                        note=f"both sides quantized by one scheme, and {steps} of {n} values moved by a step: the same "
                             "weights quantized twice by one quantizer keep their codes")
    return info


def same_scheme(qb: QuantScheme | None, qt: QuantScheme | None) -> bool:
    """Both sides quantized the same way (format, scheme, bits, group, and calibrated or not; how the scales are
    stored and which operator dequantizes aside, ``_codes_of``): two such quantizations of the same weights store
    the same codes, up to ties, unless the quantizer depends on calibration data. A round-to-nearest side beside a
    calibrated one (a GGUF Q4_K with an importance matrix and one without, llm-compressor's QuantizationModifier
    and GPTQModifier) is two quantizers: their codes differ on the same weights. Taking two quantizers for one errs
    toward inconclusive (their codes differ on the same weights), never toward quantized only."""
    return qb is not None and qt is not None and _codes_of(qb) == _codes_of(qt)


#: parts of a scheme's label that say how its scales are stored, not how its codes are chosen: bitsandbytes' nested
#: (double-quantized) absmax is the same absmax quantized again after the codes were set (an nf4 build against a
#: nested-absmax one of a 1e-2 fine-tune read "quantized only", as two schemes); an ONNX label's last parenthesis
#: (the operator that dequantizes) is set aside in ``_codes_of``
_SCALE_STORAGE = (", nested absmax",)


def _codes_of(q: QuantScheme) -> tuple:
    label = q.scheme
    for part in _SCALE_STORAGE:
        label = label.replace(part, "")
    if q.format == "onnx" and label.endswith(")"):
        # the operator that dequantizes (ONNX Runtime's dynamic MatMulInteger, a QDQ DequantizeLinear): ONNX
        # Runtime's quantizers store the same codes and scales for the same weights either way, and a dynamic
        # build of a base against a QDQ build of a fine-tune read "quantized only", as two schemes
        label = label[:label.rindex(" (")] if " (" in label else label
    return q.format, label, q.bits, str(q.group), q.calibrated


def clamped_beyond(plain: np.ndarray, quant: np.ndarray, floor: np.ndarray, end: np.ndarray,
                   cast_rel: float = 0.0, sub: int = 0) -> int:
    """Elements beyond the floor (as ``floor_stats`` counts them, finite ones) that the clamp of an
    importance-matrix K-quant explains: the quantized value is its sub-block's top code (``end`` 1) and
    the plain value lies above it, or the bottom code (-1) and the plain value lies below it, or the
    sub-block's step is 0 (2: one value, no code) and the plain values of the sub-block (runs of ``sub``
    elements) are themselves near one value: their range within twice the sub-block's largest floor (a
    step of 0 is a searched scale that rounded to 0 against the super-block's, which a sub-block far from
    constant does not have; without ``sub``, or windows not cut at sub-blocks, no step-0 element counts).
    ggml's last pass rounds every element to the nearest code and clamps it to the range, so an element past
    its floor anywhere else is no quantization of the plain value, however much the search clipped.

    >>> clamped_beyond(np.array([1.0, -3.0, 0.9, 3.0]), np.array([0.5, 0.0, 0.2, 3.0]), np.full(4, 0.1),
    ...                np.array([1.0, -1.0, 0.0, 1.0], np.float32))
    2
    >>> clamped_beyond(np.array([0.3, 0.31, 0.3, -0.5]), np.zeros(4), np.full(4, 0.1), np.full(4, 2.0), sub=2)
    2
    """
    b = np.asarray(plain, np.float64)
    o = np.asarray(quant, np.float64)
    e = np.asarray(end)
    with np.errstate(invalid="ignore"):
        d = np.abs(b - o)
        f = np.asarray(floor, np.float64)
        beyond = np.isfinite(d) & (d > f + cast_rel * np.abs(b))
        flat = e == 2
        if flat.any():
            if sub and len(b) % sub == 0:
                bs = b.reshape(-1, sub)
                near = (bs.max(axis=1) - bs.min(axis=1)) <= 2 * f.reshape(-1, sub).max(axis=1)
                flat &= np.repeat(near, sub)
            else:
                flat[:] = False
        toward = ((e == 1) & (b > o)) | ((e == -1) & (b < o)) | flat
    return int(np.count_nonzero(beyond & toward))


def scales_beyond(other: np.ndarray, least: np.ndarray, least_top: np.ndarray | None, sub: int) -> np.ndarray | None:
    """Per element of one window, whether its block's stored scales claim more of the weights they quantized
    than ``other`` (the other side's values there) has (``gguf_floor.claims``): the range (``max(x, 0) -
    min(x, 0)``) of its block or sub-block (runs of ``sub`` elements) below ``least``, or the largest such
    range over its super-block (runs of 256) below ``least_top`` (None: no such claim). None when the window is
    not cut at blocks.

    >>> scales_beyond(np.array([0.1, -0.1, 0.0, 0.05]), np.array([0.1, 0.1, 0.5, 0.5]), np.zeros(4), 2).tolist()
    [False, False, True, True]
    """
    x = np.asarray(other, np.float32)
    if not sub or len(x) % sub:
        return None
    xs = x.reshape(-1, sub)
    with np.errstate(invalid="ignore"):
        r = np.maximum(xs.max(axis=1), 0) - np.minimum(xs.min(axis=1), 0)
        out = np.asarray(least) > np.repeat(r, sub)
        top = None if least_top is None else np.asarray(least_top)
        if top is not None and top.any():
            per = 256 // sub if 256 % sub == 0 else 0
            if not per or len(x) % 256:
                return out
            out |= top > np.repeat(r.reshape(-1, per).max(axis=1), 256)
    return out


def column_ranges(ck, name: str, dtype: str, shape: tuple, sub: int, stop: int | None) -> tuple | None:
    """The range (``max(x, 0) - min(x, 0)``) of ``name``'s values per block of ``sub`` consecutive rows of a
    column (a GGUF tensor stored transposed: its blocks run down the Hugging Face columns), and the largest
    such range per 256 rows (a K-quant's super-block; None where 256 rows are not whole blocks), as
    ``columns_beyond`` takes them: (ranges [rows / sub * cols], top ranges or None, cols, sub). Reads the tensor
    once, in windows; holds one float32 per block. None when the rows are not whole blocks."""
    if len(shape) != 2 or sub < 1:
        return None
    R, C = int(shape[0]), int(shape[1])
    if R % sub or not C:
        return None
    hi = np.zeros((R // sub) * C, np.float32)
    lo = np.zeros((R // sub) * C, np.float32)
    n = R * C if stop is None else min(int(stop), R * C)
    pos = 0
    for w in ck.windows(name, max(C, (SCALE_CHUNK // C) * C), 0, n):
        x = np.asarray(decode(w, dtype), np.float32).reshape(-1)
        idx = pos + np.arange(x.size, dtype=np.int64)
        ids = (idx // C // sub) * C + idx % C
        with np.errstate(invalid="ignore"):
            np.maximum.at(hi, ids, x)
            np.minimum.at(lo, ids, x)
        pos += x.size
    with np.errstate(invalid="ignore"):
        r = hi - lo
    top = None
    if R % 256 == 0 and 256 % sub == 0:
        top = r.reshape(R // 256, 256 // sub, C).max(axis=1).reshape(-1)
    return r, top, C, sub


def columns_beyond(pos: int, least: np.ndarray, least_top: np.ndarray | None, ranges: np.ndarray,
                   top: np.ndarray | None, cols: int, sub: int) -> np.ndarray:
    """``scales_beyond`` for a window (flat elements from ``pos``) of a tensor whose blocks run down its
    columns: per element, whether its block's claim ``least`` exceeds the other side's range there
    (``column_ranges``), or its super-block's ``least_top`` the largest such range over 256 rows.

    >>> r = column_ranges_of(np.array([[0.1, 1.0], [0.1, 1.0], [0.0, 0.0], [0.0, 0.5]]), 2)
    >>> columns_beyond(0, np.array([0.1, 1.0, 0.1, 1.0, 0.2, 0.5, 0.2, 0.5]), None, *r).tolist()
    [False, False, False, False, True, False, True, False]
    """
    least = np.asarray(least)
    idx = pos + np.arange(least.size, dtype=np.int64)
    r, c = idx // cols, idx % cols
    with np.errstate(invalid="ignore"):
        out = least > ranges[(r // sub) * cols + c]
        if least_top is not None and top is not None and np.any(least_top):
            out |= np.asarray(least_top) > top[(r // 256) * cols + c]
    return out


def column_ranges_of(x: np.ndarray, sub: int) -> tuple:
    """``column_ranges`` of an array held whole (its doctest, and tests)."""
    x = np.asarray(x, np.float32)
    R, C = x.shape
    xs = x.reshape(R // sub, sub, C)
    r = (np.maximum(xs.max(axis=1), 0) - np.minimum(xs.min(axis=1), 0)).reshape(-1)
    top = None
    if R % 256 == 0 and 256 % sub == 0:
        top = r.reshape(R // 256, 256 // sub, C).max(axis=1).reshape(-1)
    return r, top, C, sub


#: the near-grid test (``near_grid``): fewest moved elements it decides on, and the share of them within
#: ``kernels.quant_floor.NEAR_U`` (a quarter) of their floor above which the float side reads "the quantized
#: values, moved": a round-to-nearest quantization of float weights spreads its errors over the floor
#: (uniform: a quarter of them that near; GPTQ's and AWQ's compensation fewer), where a fine-tune of the
#: dequantized values moves most by a small part of a step (gpt-oss's MXFP4 experts, a dense or rank-4
#: change of relative size 1e-2 over random block scales: 0.67-0.70; of 1e-3: 0.97)
NEAR_GRID_MIN = 256
NEAR_GRID_SHARE = 0.5
#: a float side whose every value is within this of the quantized one (relative) is the base's dequantized
#: values: a dequantization done in bf16 rounds the scale and the product (GPTQModel on CPU casts fp16
#: scales to bf16: errors up to 2^-7), twice that for margin. Any fine-tune moves the elements near zero
#: (and those quantized to zero) beyond it
DEQUANT_REL = 2.0 ** -6


def near_grid(side: str, acc: np.ndarray) -> float | None:
    """The share of moved elements near their quantized value (``FLOOR_FIELDS`` ``n_moved_near`` over
    ``n_moved``) when the quantized side is the base and that share says the float side is the base's
    quantized values moved by a small part of a step (not the weights they were quantized from); None
    otherwise. Elements within the plain side's cast rounding do not count as moved (a dequantized copy
    stored in bf16 rounds each value), nor do those quantized to zero (in a
    group whose scale an outlier set, a quantization leaves most elements at zero, each off by its own
    small value: near, as a fine-tune's would be)."""
    moved = int(acc[6])
    if side != "base" or moved < NEAR_GRID_MIN:
        return None
    share = float(acc[7]) / moved
    return share if share > NEAR_GRID_SHARE else None


def dequant_rounding_var(ck, name: str, window: int, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rounding a dequantization done in bf16 may leave in a float copy of quantized tensor ``name``, as a
    per-element variance summed per row and per column (``quant_noise_var``'s form): uniform within
    ``2^-8 |v|`` (the scale's rounding and the product's), for the rank of a near-grid change stored wider than
    bf16 (its dtype floor is far below). ``stop``: the first ``stop`` elements only (a resized tensor's shared
    rows). Streamed, never a per-element array."""
    h = float(CAST_REL)
    shape = tuple(ck.tensors[name].shape)
    return row_col_sums(((h * np.abs(f)) ** 2 / 3.0 for (f,) in _f64_chunks([ck.windows(name, window, 0, stop)])),
                        _rows_of(shape, stop), int(math.prod(shape[1:])))


#: elements of a window turned into float64 at a time (the noise sums' temporaries are of a chunk, not a window)
_CHUNK = 1 << 20


def _f64_chunks(its: list):
    """Float64 copies of ``_CHUNK`` elements at a time of windows that cover the same elements, one per iterator of
    ``its``, as tuples (the windows themselves may be far larger)."""
    for ws in zip(*its):
        ws = [np.asarray(w).reshape(-1) for w in ws]
        for a in range(0, ws[0].size, _CHUNK):
            yield tuple(w[a:a + _CHUNK].astype(np.float64) for w in ws)


def _scaled(values: np.ndarray, folded: tuple, pos: int, ncols: int, chunk: int = 1 << 20) -> np.ndarray:
    """A window of the plain side (flat elements from ``pos``) as AWQ scaled it before quantizing:
    columns times ``s_in``, rows divided by ``s_out``; in float64, index arrays a chunk at a time."""
    out = np.asarray(values, np.float64).copy()
    s_in, s_out = folded
    for a in range(0, len(out), chunk):
        at = np.arange(pos + a, pos + min(len(out), a + chunk), dtype=np.int64)
        if s_in is not None:
            out[a:a + len(at)] *= s_in[at % ncols]
        if s_out is not None:
            out[a:a + len(at)] /= s_out[at // ncols]
    return out


#: rows of the first scale group GPTQ set up whose scale and zero point must come back from the base
#: (min/max of the group's weights): 1.0 on GPTQModel 7.7's files of an unchanged base, 0.44-0.57 on a
#: rank-4 fine-tune of relative size 1e-2 at 256 rows, 0.996 on one of 1e-4
SCALE_MATCH_SHARE = 0.95
SCALE_ROWS = 256                  # rows of the plain side read at a time


def first_group_scales(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, side: str,
                       shape: tuple) -> float | None:
    """The share of rows whose stored scale and zero point, in the first scale group a min/max GPTQ
    quantizer set up, are what ``Quantizer.find_params`` gives from the plain side's weights: the best
    over the candidate groups (``GPTQ.first_scale_groups``) and over the dtypes the quantizer may have
    read the weights in (as stored, bf16, fp16: it quantizes the model as loaded). A source whose every
    group was set up from the weights (``all_groups``: llm-compressor's compressed-tensors files, round to
    nearest or GPTQ) gives the share of all (row, group) scales instead, a zero scale read as
    compressed-tensors stores it (the scale dtype's eps). None when not testable: both sides quantized,
    a source without min/max scales (``minmax``). Reads the plain side ``SCALE_ROWS`` rows at a time
    (``_FirstGroups`` takes it from the floor test's own windows instead)."""
    fg = _FirstGroups.of(base, bname, dtype_b, tuned, tname, dtype_t, side, shape)
    if fg is None:
        return None
    for r0 in range(0, fg.m, SCALE_ROWS):
        r1 = min(fg.m, r0 + SCALE_ROWS)
        fg.count(np.asarray(decode(fg.pck.read_rows(fg.pname, np.arange(r0, r1)), fg.pdtype), np.float32)
                 .reshape(r1 - r0, fg.n), r0)
    return fg.result()


class _FirstGroups:
    """``first_group_scales``' counts, a block of the plain side's rows at a time (``count``), or from its flat
    windows in order (``window``: whole rows counted as they complete, a row cut by a window's end kept until the
    next); ``result()`` once every row is counted (None when a window was missed). Rows are counted apart and
    the counts are integers, so any cutting gives the same share."""

    def __init__(self, src, pck, pname: str, pdtype: str, m: int, n: int, scales, zeros, groups, g):
        self.src, self.pck, self.pname, self.pdtype, self.m, self.n = src, pck, pname, pdtype, m, n
        # the candidate groups' stored parameters only (a GPTQ's every group held through the statistics pass it is
        # fed by took a 70B-width pair from 976 to 998 MB); row k of these is candidate group k
        self.scales, self.zeros = np.ascontiguousarray(scales[groups, :m]), np.ascontiguousarray(zeros[groups, :m])
        if self.zeros.size and -2 ** 31 <= self.zeros.min() and self.zeros.max() < 2 ** 31:
            # zero points are small integers: int32 halves them (29 -> 15 MB for compressed-tensors' every group at
            # 70B widths); the tests compare them with differences of at most 1, the same whatever the width
            self.zeros = self.zeros.astype(np.int32)
        self.groups = groups
        self.every = bool(getattr(src, "all_groups", False))
        # the candidate groups' columns side by side (stable: each group's in their order), and where each starts
        self.order = np.concatenate([np.flatnonzero(g == k) for k in groups])
        self.starts = np.concatenate([[0], np.cumsum([np.count_nonzero(g == k) for k in groups])[:-1]])
        # every column in its place, in groups of one size (compressed-tensors without an activation order): the
        # extremes of a [rows, groups, size] view, with no copy of the rows in group order and no reduceat
        # (those were a sixth of a 70B-width release's time)
        size = n // len(groups) if len(groups) and n % len(groups) == 0 else 0
        self.size = size if size and np.array_equal(self.order, np.arange(n)) and \
            np.array_equal(self.starts, np.arange(0, n, size)) else 0
        self.maxq = (1 << src.bits) - 1
        self.reads = ("", "BF16", "F16")
        # per read, how many rows of each candidate group have their stored scale and zero point back: counted a
        # block of rows at a time (every group's extremes of every row held at once were 350 MB at 28672 x 8192 in
        # groups of 32)
        self.counts = {r: np.zeros(len(groups), np.int64) for r in self.reads}
        self.rows_done = 0
        self._tail = np.zeros(0, np.float32)          # the start of a row a window cut

    @classmethod
    def of(cls, base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, side: str,
           shape: tuple) -> "_FirstGroups | None":
        if side == "both":
            return None
        qck, qname, pck, pname, pdtype = ((tuned, tname, base, bname, dtype_b) if side == "tuned"
                                          else (base, bname, tuned, tname, dtype_t))
        src = getattr(qck, "quant", {}).get(qname)
        if src is None or not getattr(src, "minmax", False) or not hasattr(src, "group_params") or len(shape) != 2:
            return None
        read = qck._stored_read
        scales, zeros, g = src.group_params(read)
        m, n = int(shape[0]), int(shape[1])
        if g.size != n or scales.shape[1] < m or zeros.shape[1] < m:
            return None
        groups = np.array(sorted({int(k) for k in src.first_scale_groups(read)} & {int(k) for k in np.unique(g)}),
                          np.int64)
        if not groups.size or groups.min() < 0 or groups.max() >= scales.shape[0]:
            return None
        return cls(src, pck, pname, pdtype, m, n, scales, zeros, groups, g)

    def count(self, x: np.ndarray, r0: int) -> None:
        """Rows ``r0`` on of the plain side, ``x`` [rows, n] float32 as decoded."""
        r1 = r0 + x.shape[0]
        s_st, z_st = self.scales[:, r0:r1], self.zeros[:, r0:r1]
        if self.size:
            x = x.reshape(x.shape[0], -1, self.size)
            lo0, hi0 = x.min(axis=2).T, x.max(axis=2).T
        else:
            x = x[:, self.order]
            lo0 = np.minimum.reduceat(x, self.starts, axis=1).T
            hi0 = np.maximum.reduceat(x, self.starts, axis=1).T
        for r in self.reads:
            # rounding to nearest is monotone, so the extremes of the rounded weights are the rounded extremes: a
            # group's two values rounded, not its every weight (a compressed-tensors pair's every group, each row
            # rounded twice, was a third of a 70B-width release's time)
            lo, hi = (lo0, hi0) if not r else (round_to(lo0, r), round_to(hi0, r))
            self.counts[r] += _scales_back(self.src, self.pck, lo, hi, s_st, z_st, self.maxq, self.every).sum(axis=1)
        self.rows_done += r1 - r0

    def window(self, values: np.ndarray) -> None:
        """The plain side's next flat window, decoded (the floor test's ``plain_v`` before any AWQ scaling)."""
        rows, self._tail = _whole_rows(self._tail, np.asarray(values, np.float32).reshape(-1), self.n)
        if rows is not None:
            self.count(rows, self.rows_done)

    def result(self) -> float | None:
        if self.rows_done != self.m or self._tail.size:
            return None
        m, best = self.m, 0.0
        for r in self.reads:
            if self.every and m:
                best = max(best, float(self.counts[r].sum() / (len(self.groups) * m)))
            else:
                best = max(best, float((self.counts[r] / m).max()) if m else 0.0)
        return best


def _scales_back(src, pck, lo: np.ndarray, hi: np.ndarray, s_st: np.ndarray, z_st: np.ndarray, maxq: int,
                 every: bool) -> np.ndarray:
    """``first_group_scales``' test of a block of rows: [groups, rows], whether the stored scale and zero point are
    what the quantizer gives from those rows' extremes ``lo``, ``hi`` (each way it may have computed them)."""
    if every:
        # the weights' dtype computes (bf16: two roundings), or float32 with the scale rounded once on saving
        ways = [_ct_params(lo, hi, maxq, bool(src.sym), src.sdtype)]
        if not src.sym and src.sdtype in ("BF16", "F16"):
            ways.append(_ct_params(lo, hi, maxq, False, src.sdtype, once=True))
    else:
        s, z = _minmax_params(lo, hi, maxq, bool(src.sym))
        ways = [(round_to(s, src.sdtype) if src.sdtype in ("BF16", "F16") else s, z)]
    ok = None
    for s_r, z in ways:
        # compressed-tensors divides in the weights' dtype, one rounding of the float32 quotient as here:
        # its scales come back exactly (a dense change of relative size 1e-2 moves a group's largest value
        # by a fraction of an ulp of bf16 and left 99% within two ulps, 53-60% equal)
        tol = (_ulp(s_r, src.sdtype) if getattr(pck, "reconstructed", False) else 0) if every \
            else 2 * _ulp(s_r, src.sdtype)
        this = (np.abs(s_st - s_r) <= tol) & (np.abs(z_st - z) <= 1)
        ok = this if ok is None else ok | this
    return ok


#: how much larger than a quantizer of the weights picks a stored scale may be (``scale_excess``): absmax and
#: min/max quantizers store max|w| / half the code span (GPTQ, compressed-tensors, FP8's amax / 448, ONNX
#: Runtime's symmetric int8), MSE and clipping observers less; ONNX Runtime's ``reduce_range`` uses half the
#: codes (twice the step), and the scale's dtype rounds it. A source whose scale is the block's absmax itself,
#: with no observer that could pick another (bitsandbytes 4-bit), gives its own, tighter slack
SCALE_SLACK = 2.5
#: elements of the plain side ``scale_excess`` holds at a time (float64, with an int64 group index each)
SCALE_CHUNK = 1 << 20


def scale_excess(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, side: str,
                 shape: tuple, folded: tuple | None = None) -> int | None:
    """Groups of the quantized side whose stored scale is more than ``SCALE_SLACK`` (or the source's own
    slack) times what a quantizer of the plain side's weights in that group picks (their largest magnitude
    over half the code span: the source's ``scale_groups``); a group whose plain weights are all 0 is not
    counted. Such a scale makes a floor wide enough to hold anything (a zeroed weight with a scale of 1 reads
    as within half a step of any small weight), and no quantizer of these weights chose it, whatever its
    observer (MSE and clipping only shrink the scale; GPTQ's first groups are set up before any compensation).
    ``folded``: AWQ's searched scales fit back (``awq_fold.fold``): the plain side is compared as AWQ scaled it
    before quantizing (columns times ``s_in``, rows over ``s_out``). A stacked tensor ([experts, m, n]) is
    read as its [experts * m, n] rows. None when not testable: both sides quantized, a source without
    ``scale_groups`` (or whose layout does not fit the shape). Reads the plain side once, ``SCALE_CHUNK``
    elements at a time."""
    check = ScaleCheck.of(base, bname, dtype_b, tuned, tname, dtype_t, side, shape, folded)
    if check is None:
        return None
    for p0, x in _plain_chunks(check.pck, check.pname, check.pdtype, check.prow, check.prows):
        check.rows(p0, x)
    return check.result()


class ScaleCheck:
    """``scale_excess``'s test as sums fed with the plain side's rows (``rows(first row, |rows|)``, each row once,
    in any order and runs) and then ``result()``: the largest plain magnitude of each group of the quantized side's
    scales, held as one float64 per scale. The maxima are exact whatever the runs, so the floor test's pass feeds
    it its own windows' rows (``_stream_co``) and the count is the one a pass of its own gives."""

    def __init__(self, S, layout, half, opts, ids_of, R: int, C: int, turned: bool, folded, pck, pname: str,
                 pdtype: str, prow: int, prows: int):
        self.S, self.layout, self.half, self.opts, self.ids_of = S, layout, half, opts, ids_of
        self.R, self.C, self.turned = R, C, turned
        self.s_in, self.s_out = folded if folded is not None else (None, None)
        self.pck, self.pname, self.pdtype, self.prow, self.prows = pck, pname, pdtype, prow, prows
        self.A = np.zeros(S.size, np.float64)
        self.fed = 0                          # rows fed
        self._runs = _group_runs(layout, S.shape, R, C) if not turned else None

    @classmethod
    def of(cls, base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, side: str, shape: tuple,
           folded: tuple | None = None) -> "ScaleCheck | None":
        """The test of a pair (``scale_excess``'s arguments), or None where it does not apply."""
        if side == "both" or len(shape) < 2:
            return None
        qck, qname, pck, pname, pdtype = ((tuned, tname, base, bname, dtype_b) if side == "tuned"
                                          else (base, bname, tuned, tname, dtype_t))
        from .compute import TransposedSide

        src = getattr(qck, "quant", {}).get(qname)
        read = getattr(qck, "_stored_read", None)
        turned = False
        if src is None and isinstance(qck, TransposedSide):
            # a tuned matrix stored transposed: its source is in the stored orientation (any other held side, a
            # reordered or merged one, has no stored groups to check)
            src = getattr(qck._ck, "quant", {}).get(qname)
            read, turned = getattr(qck._ck, "_stored_read", None), True
        if src is None or read is None or not hasattr(src, "scale_groups") or not hasattr(pck, "windows"):
            return None
        got = src.scale_groups(read)
        if got is None:
            return None
        S, layout, half = got[:3]
        opts = got[3] if len(got) > 3 else {}
        sshape = tuple(int(d) for d in src.shape)
        if len(sshape) < 2 or (turned and len(sshape) != 2):
            return None
        R, C = math.prod(sshape[:-1]), sshape[-1]
        if tuple(int(d) for d in shape) != ((C, R) if turned else sshape):
            return None
        S = np.asarray(S, np.float64)
        if layout[0] == "cols" and S.ndim == 2:
            S = S[:R]
        ids_of = _group_ids(layout, S.shape, R, C)
        if ids_of is None:
            return None
        pinfo = pck.tensors.get(pname)
        prow = R if turned else C                              # the plain side's row length
        if pinfo is None or not pinfo.shape or math.prod(pinfo.shape) % prow:
            return None
        prows = min(math.prod(pinfo.shape) // prow, C if turned else R)   # (a resized plain side: its shared rows)
        return cls(S, layout, half, opts, ids_of, R, C, turned, folded, pck, pname, pdtype, prow, prows)

    def rows(self, p0: int, x: np.ndarray) -> None:
        """Plain rows ``p0`` on, their magnitudes (float64 [k, prow])."""
        self.fed += len(x)
        p = np.arange(p0, p0 + len(x), dtype=np.int64)
        rs, cs = (np.arange(self.R, dtype=np.int64)[None, :], p[:, None]) if self.turned else \
            (p[:, None], np.arange(self.C, dtype=np.int64)[None, :])
        if self.s_in is not None:
            x = x * np.abs(np.asarray(self.s_in, np.float64))[cs]
        if self.s_out is not None:
            x = x / np.abs(np.asarray(self.s_out, np.float64))[rs]
        if self._runs is not None:
            with np.errstate(invalid="ignore"):
                ids, vals = self._runs(p0, x)
                self.A[ids] = np.maximum(self.A[ids], vals)      # (each group once in ``ids``)
            return
        ids = np.broadcast_to(self.ids_of(rs, cs), x.shape)
        with np.errstate(invalid="ignore"):
            np.maximum.at(self.A, ids.reshape(-1), x.reshape(-1))

    def result(self) -> int:
        S, A, layout = self.S.reshape(-1), self.A, self.layout
        R = self.R
        keep = np.ones(S.size, bool)
        if layout[0] == "cols" and layout[2] is not None:      # only the groups set up from the weights
            cols = np.zeros(S.size // R if R else 0, bool)
            checked = np.asarray(layout[2], np.int64).reshape(-1)
            cols[checked[(checked >= 0) & (checked < cols.size)]] = True
            keep = np.tile(cols, R)
        slack = float(self.opts.get("slack", SCALE_SLACK))
        least = float(self.opts.get("min_scale", 0.0))
        with np.errstate(invalid="ignore", over="ignore"):
            bad = keep & np.isfinite(S) & (A > 0) & (S * self.half > slack * A * (1 + 2.0 ** -6)) \
                & (S > least * (1 + 2.0 ** -6))
        return int(np.count_nonzero(bad))


def _scale_rows(sc: ScaleCheck, rest: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """One window of the plain side's values fed to ``sc`` as whole rows of magnitudes (float64, as
    ``_plain_chunks`` gives them); what is left of a row the window cut, returned for the next."""
    rows, rest = _whole_rows(rest, np.abs(np.asarray(plain, np.float64).reshape(-1)), sc.prow)
    if rows is not None:
        sc.rows(sc.fed, rows)
    return rest


def _whole_rows(tail: np.ndarray, v: np.ndarray, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """The whole rows of ``n`` elements in ``tail`` (a row the last window cut) then the flat window ``v``, as
    [k, n] (None when none completes), and the start of the row this window cuts, kept (a copy) for the next."""
    if tail.size:
        v = np.concatenate([tail, v])
    k = v.size // n
    return (v[:k * n].reshape(k, n) if k else None), v[k * n:].copy()


def _group_runs(layout: tuple, sshape: tuple, R: int, C: int):
    """``runs(p0, x)`` -> (group ids, their maxima in ``x``, each group once) for rows ``p0`` on of the [R, C] rows
    (``x`` [k, C], k >= 1), by reductions over runs of one group (``np.maximum.reduceat``) instead of one
    ``np.maximum.at`` per element (a 70B-width pair's 235M elements took 1.3 s so); the layouts of ``_group_ids``
    whose groups run along a row in order (column groups that never go back, blocks, the flat order's blocks).
    None for the rest (act-order columns, a transposed flat order): the element-wise path. The same maxima."""
    kind = layout[0]
    if _group_ids(layout, sshape, R, C) is None:
        return None
    if kind == "cols":
        g = np.asarray(layout[1], np.int64).reshape(-1)
        if g.size == 0 or np.any(np.diff(g) < 0):
            return None
        starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
        gids, ng = g[starts], sshape[1]

        def cols_runs(p0, x):
            vals = np.maximum.reduceat(x, starts, axis=1)
            ids = np.arange(p0, p0 + len(x), dtype=np.int64)[:, None] * ng + gids[None, :]
            return ids.reshape(-1), vals.reshape(-1)
        return cols_runs
    if kind == "block":
        bh, bw = int(layout[1]), int(layout[2])
        per = int(layout[3]) if len(layout) > 3 else R
        nbr, nbc = -(-per // bh), -(-C // bw)
        cstarts = np.arange(0, C, bw, dtype=np.int64)

        def block_runs(p0, x):
            vals = np.maximum.reduceat(x, cstarts, axis=1) if bw > 1 else x
            rs = np.arange(p0, p0 + len(x), dtype=np.int64)
            rid = (rs // per) * nbr + (rs % per) // bh
            cut = np.flatnonzero(np.concatenate(([True], rid[1:] != rid[:-1])))
            if len(cut) < len(rs):
                vals = np.maximum.reduceat(vals, cut, axis=0)
            ids = rid[cut][:, None] * nbc + np.arange(nbc, dtype=np.int64)[None, :]
            return ids.reshape(-1), vals.reshape(-1)
        return block_runs
    if kind == "flat" and not (bool(layout[2]) if len(layout) > 2 else False):
        bs = int(layout[1])

        def flat_runs(p0, x):
            o, flat = p0 * C, x.reshape(-1)
            first = (-o) % bs                      # where the first whole block starts in this run
            starts = np.concatenate(([0], np.arange(first or bs, flat.size, bs, dtype=np.int64)))
            return (o + starts) // bs, np.maximum.reduceat(flat, starts)
        return flat_runs
    return None


def scales_unchecked(base, bname: str, tuned, tname: str, side: str, shape: tuple) -> bool:
    """Whether the floor of a pair rests on a quantized ``Source``'s stored scales that ``scale_excess`` could
    not check (a layout or shape its ``scale_groups`` does not give): one side quantized, a matrix or more
    (a vector's scales, an int32 bias's input scale times the weight's, are not its own values' choice), the
    source not lossless. GGUF tensors are checked by their claims; a dequantized export has no stored scales."""
    if side == "both" or len(shape) < 2:
        return False
    from .compute import TransposedSide

    ck, name = (tuned, tname) if side == "tuned" else (base, bname)
    src = getattr(ck, "quant", {}).get(name)
    if src is None and isinstance(ck, TransposedSide):
        src = getattr(ck._ck, "quant", {}).get(name)
    return src is not None and not getattr(src, "lossless", False)


def _group_ids(layout: tuple, sshape: tuple, R: int, C: int):
    """``ids(rs, cs)``: the flat index into the scales (of shape ``sshape``) of the group each element of the
    source's [R, C] rows lies in (``rs``, ``cs`` broadcastable int64 row and column indices), for a
    ``scale_groups`` layout: ``("cols", g, checked)`` (scales [R, groups], ``g`` the group of each column),
    ``("block", bh, bw[, per])`` (scales [experts * ceil(per / bh), ceil(C / bw)], rows ``per`` to an expert,
    all of them by default), ``("flat", bs[, transposed])`` (one scale per ``bs`` elements of the flat order,
    of the rows or of their transpose). None when the scales do not fit the layout."""
    kind = layout[0]
    n = math.prod(sshape)
    if kind == "cols":
        g = np.asarray(layout[1], np.int64).reshape(-1)
        if len(sshape) != 2 or sshape[0] < R or g.size != C or (g.size and (g.min() < 0 or g.max() >= sshape[1])):
            return None
        ng = sshape[1]
        return lambda rs, cs: rs * ng + g[cs]
    if kind == "block":
        bh, bw = int(layout[1]), int(layout[2])
        per = int(layout[3]) if len(layout) > 3 else R
        if bh < 1 or bw < 1 or per < 1 or R % per:
            return None
        nbr, nbc = -(-per // bh), -(-C // bw)
        if len(sshape) != 2 or tuple(sshape) != ((R // per) * nbr, nbc):
            return None
        return lambda rs, cs: ((rs // per) * nbr + (rs % per) // bh) * nbc + cs // bw
    if kind == "flat":
        bs, tr = int(layout[1]), bool(layout[2]) if len(layout) > 2 else False
        if bs < 1 or n != -(-(R * C) // bs):
            return None
        return (lambda rs, cs: (cs * R + rs) // bs) if tr else (lambda rs, cs: (rs * C + cs) // bs)
    return None


def _plain_chunks(ck, name: str, dtype: str, rowlen: int, rows: int):
    """(first row, |rows| as float64 [k, rowlen]) of the first ``rows`` rows of ``name``, about ``SCALE_CHUNK``
    elements at a time, from its flat windows (whatever their length)."""
    per = max(1, SCALE_CHUNK // max(rowlen, 1))
    buf: list[np.ndarray] = []
    held = 0
    r0 = 0
    for w in ck.windows(name, per * rowlen, 0, rows * rowlen):
        buf.append(np.abs(np.asarray(decode(w, dtype), np.float64).reshape(-1)))
        held += buf[-1].size
        if held >= rowlen:
            flat = np.concatenate(buf)
            k = flat.size // rowlen
            yield r0, flat[:k * rowlen].reshape(k, rowlen)
            r0 += k
            buf, held = [flat[k * rowlen:]], flat.size - k * rowlen


def _ct_params(xmin: np.ndarray, xmax: np.ndarray, maxq: int, sym: bool, dtype: str,
               once: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' ``calculate_qparams`` of int weights, in the scale's dtype ``dtype`` (the weights'):
    (scale, zero point as GPTQ's unsigned one). Symmetric: ``max(|min|, |max|) / (maxq / 2)``; asymmetric:
    ``(max - min) / maxq``, the difference rounded to ``dtype`` first as torch does in bf16, and the zero
    point ``-min / scale`` rounded (its signed ``bit_min - min / scale`` plus 2^(b-1)). A zero scale (a group
    of zeros) becomes the dtype's eps. Each operation rounds its float32 result to ``dtype``; ``once``: computed in
    float32 and the scale rounded to ``dtype`` once at the end (weights held in float32 while quantizing, scales
    saved in the 16-bit dtype), which for the asymmetric scale is one bf16 step off the other in many groups."""
    def rd(v):
        return round_to(np.asarray(v, np.float32), dtype) if dtype in ("BF16", "F16") else np.asarray(v, np.float32)

    lo, hi = np.minimum(xmin, np.float32(0)), np.maximum(xmax, np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        if sym:
            s = rd(np.maximum(np.abs(lo), np.abs(hi)) / np.float32(maxq / 2))
        elif once:
            s = rd(np.asarray(hi - lo, np.float32) / np.float32(maxq))
        else:
            s = rd(rd(hi - lo) / np.float32(maxq))
        s = np.where(s == 0, np.float32(_EPS[dtype]), s)
        z = np.full(s.shape, (maxq + 1) // 2, np.int64) if sym else \
            np.clip(np.round(-rd(lo / s).astype(np.float64)), 0, maxq).astype(np.int64)
    return s, z


#: ``torch.finfo(dtype).eps`` of a scale dtype (compressed-tensors' stand-in for a zero scale)
_EPS = {"BF16": 2.0 ** -7, "F16": 2.0 ** -10, "F32": 2.0 ** -23}


def _ulp(v: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return np.spacing(np.abs(v).astype(np.float16)).astype(np.float32)
    sp = np.spacing(np.abs(v).astype(np.float32))
    return sp * np.float32(1 << 16) if dtype == "BF16" else sp


def _minmax_params(xmin: np.ndarray, xmax: np.ndarray, maxq: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's ``Quantizer.find_params`` (AutoGPTQ, GPTQModel) per row, in float32: (scale, zero)."""
    xmin = np.minimum(xmin, np.float32(0))
    xmax = np.maximum(xmax, np.float32(0))
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(both, np.float32(-1), xmin), np.where(both, np.float32(1), xmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ((xmax - xmin) / np.float32(maxq)).astype(np.float32)
        z = np.full_like(s, (maxq + 1) / 2) if sym else np.round(-xmin / s)
    return s, z


def _first_group(base, bname: str, tuned, tname: str, side: str, ncols: int) -> np.ndarray | None:
    """Columns of the first group the calibrated side's quantizer processed (g_idx == 0)."""
    ck, name = (tuned, tname) if side in ("tuned", "both") else (base, bname)
    src = getattr(ck, "quant", {}).get(name)
    if src is None or not hasattr(src, "first_group"):
        return None
    return src.first_group(ck._stored_read, ncols)


def quant_noise_var(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str,
                    shape: tuple, window: int, stop: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The quantization noise of a pair as a per-element variance, summed per row and per column
    (``rank.analyze_delta``'s ``extra_var``, the only sums its noise floor takes): each quantized side's
    error modelled as independent and uniform within its floor ``f``, variance ``f^2 / 3`` (both sides
    quantized: the variances add; a dequantized export: its grid's floor). For the rank analysis of a
    pair that failed the bound test; None when no side gives a floor. A model of the noise, not a
    bound on it. Streamed window by window: never a per-element array (at 8192 x 28672 that was 1.9 GB
    of float64, and as much again for each temporary).

    Uniform within half a step ``q / 2`` is the usual ``q^2 / 12``. ``stop``: the first ``stop``
    elements only (a resized tensor's shared rows; ``shape`` is the tuned tensor's whole shape).
    """
    its = _noise_windows(base, bname, dtype_b, tuned, tname, dtype_t, shape, window, stop)
    if its is None:
        return None
    return row_col_sums((v for ws in zip(*its) for v in _variances(ws)), _rows_of(shape, stop),
                        int(math.prod(shape[1:])))


def _noise_windows(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple, window: int,
                   stop: int | None) -> list | None:
    """The windows of the floors ``quant_noise_var`` models the noise from, one iterator per side that gives one
    (base first), or None when no side gives a floor."""
    qb, qt = base.tensors[bname].quant, tuned.tensors[tname].quant
    its = []
    if qb is None and qt is None:
        if detect_export(tuned, tname, dtype_t, shape) is not None:
            its.append(export_floor_windows(tuned, tname, dtype_t, shape, window, stop))
    else:
        its += [ck.floor_windows(name, window, 0, stop, noise=True) for ck, name, q in
                ((base, bname, qb), (tuned, tname, qt)) if q is not None]
    return None if not its or any(it is None for it in its) else its


def _variances(ws: tuple):
    """The noise variance of one window per side (the sides' floors ``f`` of the same elements), element by
    element, ``_CHUNK`` elements at a time in float64: the sum over the sides of ``f^2 / 3``."""
    for fs in _f64_chunks([(w,) for w in ws]):
        out = None
        for f in fs:                 # f is a copy of its own: squared in place, the same bits as f * f / 3.0
            # a non-finite floor (a NaN or Inf scale) goes with non-finite values, which the rank reads as 0
            finite = np.isfinite(f)
            np.multiply(f, f, out=f)
            f /= 3.0
            f[~finite] = 0.0
            if out is None:
                out = f
            else:
                out += f
        yield out


class _LazyNoise:
    """``quant_noise_var``'s sums, taken in the floor test's pass (``floor_test(noise=)``): nothing until a window
    ends with an element beyond the floor counted, then the noise floors of every window so far (read once more,
    in order, so the sums are added as ``quant_noise_var`` adds them, bit for bit) and of each window after."""

    def __init__(self, opener, m: int, n: int):
        self.opener, self.m, self.n = opener, m, n
        self.its = None
        self.sums = None
        self.windows = 0
        self.started = False
        self.failed = False          # no side gives a noise floor (``quant_noise_var`` gives None), or misaligned

    def window(self, beyond: bool) -> None:
        """One window of the floor pass is done; ``beyond``: an element beyond the floor has been counted."""
        self.windows += 1
        if self.failed or (not self.started and not beyond):
            return
        take = 1
        if not self.started:
            self.started = True
            its = self.opener()
            if its is None:
                self.failed = True
                return
            self.its, self.sums, take = [iter(it) for it in its], RowColSums(self.m, self.n), self.windows
        try:
            for _ in range(take):
                ws = tuple(next(it) for it in self.its)
                for v in _variances(ws):
                    self.sums.add(v)
        except (StopIteration, ValueError):      # windows that do not line up with the pass's: summed apart
            self.failed, self.started = True, False

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.failed or self.sums is None:
            return None
        return self.sums.result()


def _rows_of(shape: tuple, stop: int | None) -> int:
    n = int(math.prod(shape[1:]))
    return int(shape[0]) if stop is None else int(stop) // max(n, 1)


def row_col_sums(chunks, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row sums, column sums) of an ``m x n`` matrix given as flat float64 chunks in row-major order, of any
    sizes (whole rows summed a block at a time; a chunk's partial rows element by element).

    >>> r, c = row_col_sums([np.arange(5.0), np.arange(5.0, 6.0)], 2, 3)
    >>> r.tolist(), c.tolist()
    ([3.0, 12.0], [3.0, 5.0, 7.0])
    """
    acc = RowColSums(m, n)
    for v in chunks:
        acc.add(v)
    return acc.result()


class RowColSums:
    """``row_col_sums`` a chunk at a time: ``add`` each chunk in order, then ``result``."""

    def __init__(self, m: int, n: int):
        self.m, self.n = m, n
        self.rows, self.cols = np.zeros(m), np.zeros(n)
        self.pos = 0

    def add(self, v) -> None:
        m, n, rows, cols = self.m, self.n, self.rows, self.cols
        v = np.asarray(v, np.float64).reshape(-1)
        k, i, pos = v.size, 0, self.pos
        if pos + k > m * n:
            raise ValueError(f"{pos + k} elements for a {m} x {n} matrix")
        while i < k:
            r, c = divmod(pos + i, n)
            if c or k - i < n:                  # the rest of a row begun, or a row this chunk ends inside
                take = min(n - c, k - i)
                seg = v[i:i + take]
                rows[r] += seg.sum()
                cols[c:c + take] += seg
                i += take
            else:
                full = (k - i) // n
                blk = v[i:i + full * n].reshape(full, n)
                rows[r:r + full] += blk.sum(axis=1)
                cols += blk.sum(axis=0)
                i += full * n
        self.pos = pos + k

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pos != self.m * self.n:
            raise ValueError(f"{self.pos} elements for a {self.m} x {self.n} matrix")
        return self.rows, self.cols


#: rows sampled to recognise a dequantized export, and the shortest row worth testing
EXPORT_SAMPLE_ROWS = 8
EXPORT_MIN_ROW = 64


def detect_export(ck, name: str, dtype: str, shape: tuple) -> dict | None:
    """A float tensor whose sampled rows each lie on a uniform grid of at most 256 levels (an int8
    ONNX export converted back to float, some GGUF-to-safetensors conversions): its bits and the
    most levels seen; None otherwise. Reads ``EXPORT_SAMPLE_ROWS`` rows."""
    d = DTYPES.get(dtype)
    if d is None or d.kind != "float" or d.bits < 16 or len(shape) < 2:
        return None
    rows, rowlen = int(shape[0]), int(math.prod(shape[1:]))
    if rows == 0 or rowlen < EXPORT_MIN_ROW:
        return None
    idx = np.unique(np.linspace(0, rows - 1, min(rows, EXPORT_SAMPLE_ROWS)).astype(np.int64))
    vals = decode(ck.read_rows(name, idx), dtype).reshape(idx.size, rowlen)
    step, _, _, levels = QF.row_grids(vals)
    if np.isnan(step).any():
        return None
    # a float dtype's own values are a uniform grid from any magnitude up: every one at or above m is a multiple of
    # the spacing at m (float16's values below 2^-13 multiples of 2^-24, bf16's in [1, 2) of 2^-7), so a row of
    # gains near 1, or of values near 1e-6 in float16, lies on a grid of a few dozen to a hundred levels. A row whose
    # grid is no coarser than the spacing at its least nonzero magnitude, of its dtype or of float16 or bf16 (whose
    # values a wider dtype may hold), is no evidence of an export: an export's least value |k| s has a spacing of
    # at most |k| s 2^-mantissa, which its step s exceeds for every code below 2^mantissa (bf16: 128)
    with np.errstate(invalid="ignore"):
        a = np.where(np.isfinite(vals), np.abs(vals), 0.0)
    least = np.min(np.where(a > 0, a, np.inf), axis=1)
    own = np.zeros(step.shape, dtype=bool)
    for o in dict.fromkeys((d, DTYPES["F16"], DTYPES["BF16"])):
        exp = np.maximum(np.frexp(np.where(np.isfinite(least), least, 1.0))[1] - 1, o.emin)
        own |= np.isfinite(least) & (step > 0) & (step <= 1.02 * np.ldexp(1.0, exp - o.mant_bits))
    evidence = ~own & (levels >= 16)
    if not evidence.any():
        return None
    top = int(np.max(levels[evidence]))
    return {"bits": max(2, math.ceil(math.log2(top))), "levels": top}


def export_floor_windows(ck, name: str, dtype: str, shape: tuple, window: int, stop: int | None):
    """Floor windows of a dequantized export: half the row's grid step (a whole step more at the
    row's lowest and highest value), 0 on a row that lies on no grid (any change there is beyond)."""
    rows, rowlen = int(shape[0]), int(math.prod(shape[1:]))
    steps = np.zeros(rows)
    lo = np.zeros(rows)
    hi = np.zeros(rows)
    per = max(1, window // max(rowlen, 1))
    for r0 in range(0, rows, per):
        idx = np.arange(r0, min(rows, r0 + per))
        s, a, b, _ = QF.row_grids(decode(ck.read_rows(name, idx), dtype).reshape(idx.size, rowlen))
        ok = np.isfinite(s)
        steps[idx] = np.where(ok, s, 0.0)
        lo[idx], hi[idx] = np.where(ok, a, np.inf), np.where(ok, b, -np.inf)
    tol = 2.0 ** -(DTYPES[dtype].mant_bits + 1)
    stop = rows * rowlen if stop is None else stop
    pos = 0
    for w in ck.windows(name, window, 0, stop):
        v = decode(w, dtype)
        r = (pos + np.arange(v.size)) // rowlen
        st = steps[r]
        edge = (np.abs(v - lo[r]) < st / 4) | (np.abs(v - hi[r]) < st / 4)
        yield (st * (0.5 + edge) + np.abs(v) * tol).astype(np.float32)
        pos += v.size


#: round-to-nearest schemes a float copy may have been quantized and dequantized with (bitsandbytes'
#: LLM.int8 rows, the usual int4 groups): (bits, elements per scale or None for a row, symmetric)
ROUNDTRIP_SCHEMES = ((8, None, True), (4, None, True), (8, 128, True), (8, 64, True),
                     (4, 128, True), (4, 64, True), (4, 32, True), (4, 128, False), (4, 64, False), (4, 32, False))
#: llama.cpp's block quantizations without a search (GGUF Q8_0, Q4_0, Q5_0, Q4_1, Q5_1; blocks of 32 along a
#: row, fp16 scales: ``kernels/quant_floor.ggml_round_trip``): a GGUF dequantized back to 16 bits
GGML_ROUNDTRIPS = tuple(QF.GGML_LEGACY)
#: and its K-quants as ``llama-quantize`` writes them without an importance matrix (blocks of 256 with
#: 6-bit sub-block scales found by a search: ``kernels/ggml_encode``); (type, bits, sub-block, signed)
GGML_KQUANT_ROUNDTRIPS = (("Q4_K", 4, 32, False), ("Q5_K", 5, 32, False), ("Q6_K", 6, 16, True))
#: the share of sampled elements that must equal the round trip (to an ulp of the stored dtype), over all of
#: them and over those the round trip moves
ROUNDTRIP_MATCH = 0.99
#: values ``detect_roundtrip`` samples at least (rows of a narrow matrix: more than ``EXPORT_SAMPLE_ROWS``)
ROUNDTRIP_MIN_VALUES = 32 * 256
#: K-quants: the share of sampled blocks of 256 whose values (``ROUNDTRIP_MATCH`` of them) equal the round trip
ROUNDTRIP_BLOCKS = 0.9
#: the share of sampled elements the round trip must move from the base by more than an ulp of its dtype (an
#: int8 grid moves about half of bf16 weights that far, int4 nearly all; a base already on the grid, none)
ROUNDTRIP_MOVED = 0.2


def detect_roundtrip(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, shape: tuple) -> dict | None:
    """A float copy whose values are the base's quantized to nearest and dequantized (an int8 or int4
    round trip stored back as bf16, where the grid ``detect_export`` looks for is blurred by the bf16
    rounding): the first of ``ROUNDTRIP_SCHEMES`` that moves at least ``ROUNDTRIP_MOVED`` of the sampled
    base values by more than an ulp of the base's dtype and reproduces ``ROUNDTRIP_MATCH`` of the sampled
    tuned values (overall and where it moved the base) to an ulp of the tuned dtype, as {bits, group, sym,
    label}; None otherwise. A fine-tune's values do not sit on the base's grid, so they never match; a base
    already on the grid is not moved, so it is no evidence. Reads ``EXPORT_SAMPLE_ROWS`` rows a side, more of
    a narrow matrix (``ROUNDTRIP_MIN_VALUES``). llama.cpp's K-quants are tried where the tuned rows sit on a
    grid per sub-block (``_on_subgrids``; in bf16 only Q4_K's coarse grid survives the rounding), their
    match counted per block of 256."""
    db, dt = DTYPES.get(dtype_b), DTYPES.get(dtype_t)
    if db is None or dt is None or db.kind != "float" or dt.kind != "float" or len(shape) < 2 \
            or tuple(base.tensors[bname].shape) != tuple(shape) or tuple(tuned.tensors[tname].shape) != tuple(shape):
        return None                      # (a resized table, a transposed pair: not a round trip of the base)
    rows, rowlen = int(shape[0]), int(math.prod(shape[1:]))
    if rows == 0 or rowlen < EXPORT_MIN_ROW:
        return None
    # at least 32 blocks of 256 for the K-quants' per-block match (narrow rows: more of them)
    want = max(EXPORT_SAMPLE_ROWS, -(-ROUNDTRIP_MIN_VALUES // rowlen))
    idx = np.unique(np.linspace(0, rows - 1, min(rows, want)).astype(np.int64))
    vb = decode(base.read_rows(bname, idx), dtype_b).astype(np.float64).reshape(idx.size, rowlen)
    vt = decode(tuned.read_rows(tname, idx), dtype_t).astype(np.float64).reshape(idx.size, rowlen)
    if vb.size < 512 or not (np.isfinite(vb).all() and np.isfinite(vt).all()) or np.array_equal(vb, vt):
        return None
    ulp = 2.0 ** -dt.mant_bits
    schemes = [{"bits": bits, "group": group, "sym": sym} for bits, group, sym in ROUNDTRIP_SCHEMES] + \
        [{"bits": int(math.log2(QF.GGML_LEGACY[k][0] + 1)), "group": 32, "sym": QF.GGML_LEGACY[k][1], "ggml": k}
         for k in GGML_ROUNDTRIPS] + \
        [{"bits": bits, "group": 256, "sym": signed, "ggml": k, "sub": sub} for k, bits, sub, signed in GGML_KQUANT_ROUNDTRIPS]
    grids: dict[int, bool] = {}
    cast = None
    if dtype_t in RECAST_DTYPES:
        cast = cast_to(vb, dtype_t).reshape(vb.shape)
    for sc in schemes:
        group = sc["group"]
        if group is not None and rowlen % group:
            continue
        if sc.get("sub"):
            key = sc["sub"] * 1000 + 2 ** sc["bits"]
            if key not in grids:
                grids[key] = _on_subgrids(vt, sc["sub"], 2 ** sc["bits"], ulp)
            if not grids[key]:
                continue
        dq = _round_trip(vb.reshape(-1, group or rowlen), sc)[0].reshape(vt.shape)
        close = np.abs(dq - vt) <= np.abs(vt) * ulp + 1e-30
        # the round trip must move the base (most of it): a base already on that grid comes back as itself,
        # and any copy that leaves it alone would "match" (a fine-tune of a quantization-aware base read
        # QUANTIZED ONLY); matches are counted where it moved
        moved = np.abs(dq - vb) > np.abs(vb) * 2.0 ** -db.mant_bits + 1e-30   # (an ulp of the base's dtype)
        if cast is not None:
            # ... and away from the base's plain cast to the tuned dtype: where the scheme's step is no coarser than
            # that dtype's spacing (an int8 row of gains near 1 against bf16's 2^-7) the two give the same values,
            # and a cast read "int8 ..., dequantized"
            moved &= np.abs(dq - cast) > np.abs(cast) * ulp + 1e-30
        if sc.get("sub"):
            # a K-quant's search, built with fused multiply-adds, picks another scale for 1-2% of blocks: those
            # differ whole, so the match is counted per block of 256 (a fine-tune's blocks match none)
            blocks = close.reshape(-1, 256).mean(axis=1) >= ROUNDTRIP_MATCH
            matched = moved.mean() >= ROUNDTRIP_MOVED and blocks.mean() >= ROUNDTRIP_BLOCKS
        else:
            matched = moved.mean() >= ROUNDTRIP_MOVED and close[moved].mean() >= ROUNDTRIP_MATCH \
                and close.mean() >= ROUNDTRIP_MATCH
        if matched:
            where = "per row" if group is None else f"in groups of {group}"
            what = (f"GGUF {sc['ggml']} (llama.cpp's blocks of 256, {sc['sub']}-element sub-blocks with searched "
                    "scales, no importance matrix)" if sc.get("sub") else
                    f"GGUF {sc['ggml']} (llama.cpp's blocks of 32 with fp16 scales)" if "ggml" in sc else
                    f"int{sc['bits']} {'symmetric' if sc['sym'] else 'asymmetric'} {where}, round to nearest")
            return {**sc, "label": f"{what}, dequantized (the base's round trip, matched on {idx.size} sampled rows)"}
    return None


def _on_subgrids(vt: np.ndarray, sub: int, levels: int, ulp: float, sample: int = 32) -> bool:
    """Whether ``sample`` sub-blocks of ``sub`` values of the tuned rows each lie on a uniform grid of at most
    ``levels`` levels, to the stored dtype's rounding (``ulp``, relative): what a K-quant leaves in every
    sub-block and a fine-tune in none. A cheap look before the K-quant encoders are run (and compiled);
    it stops at the fourth sub-block off any grid."""
    blocks = vt.reshape(-1, sub)
    picks = np.unique(np.linspace(0, len(blocks) - 1, min(sample, len(blocks))).astype(np.int64))
    off = 0
    for row in blocks[picks]:
        u = np.unique(row[np.isfinite(row)])
        if u.size < 3:
            continue
        x = u - u[0]
        gap = np.diff(u).min()
        fits = False
        for m in range(1, 9):                      # the two closest values may be codes apart
            step = gap / m
            for _ in range(2):                     # refit the step to every value (rounding blurs the gap)
                q = np.round(x / step)
                if q[-1] >= levels:
                    break
                step = float(q @ x) / float(q @ q)
            q = np.round(x / step)
            if q[-1] >= levels:
                break
            tol = 0.02 + 2 * ulp * float(np.abs(u).max()) / step
            if np.max(np.abs(x / step - q)) <= tol:
                fits = True
                break
        off += not fits
        if off > 3:
            return False
    return off <= max(3, len(picks) // 10)


def _round_trip(v: np.ndarray, rt: dict) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized, step per unit, or per sub-block of a K-quant) of units ``v`` [units, group or row] under a
    ``detect_roundtrip`` scheme."""
    if rt.get("sub"):
        from ..kernels import ggml_encode

        dq, step = ggml_encode.round_trip(v, rt["ggml"])
        return dq.astype(np.float64), step.astype(np.float64)
    if rt.get("ggml"):
        dq, step = QF.ggml_round_trip(v, rt["ggml"])
        return dq.astype(np.float64), step.astype(np.float64)
    return QF.round_trip(v, rt["bits"], rt["sym"])


def roundtrip_floor_windows(base, bname: str, dtype_b: str, tuned, tname: str, shape: tuple, window: int,
                            stop: int | None, rt: dict):
    """Floor windows of a round trip (``detect_roundtrip``): half the step of each element's row or group
    (a whole step for an asymmetric scheme or a GGUF block), and 1/256 of a step more, the steps taken from
    the base (one pass over it first); for a K-quant, per sub-block, a step, the most the base's own round
    trip moves one of its values and 2^-8 of its largest magnitude. Windows as long as the tuned side's."""
    rowlen = int(math.prod(shape[1:]))
    unit = rt["group"] or rowlen
    sub = rt.get("sub") or unit                  # a K-quant's scales are per sub-block
    numel = int(shape[0]) * rowlen
    steps = np.empty(numel // sub)
    pos = 0
    for w in base.windows(bname, max(unit, (window // unit) * unit), 0, numel):
        v = decode(w, dtype_b).astype(np.float64).reshape(-1, unit)
        dq, st = _round_trip(v, rt)
        st = np.asarray(st).reshape(-1)
        if rt.get("sub"):
            # a K-quant's searched scale and its 6-bit scale and minimum may leave a sub-block's extremes past
            # the grid's ends (clamped), and a build of llama.cpp with fused multiply-adds rounds a few codes of
            # 1-2% of blocks the other way: a whole step, plus the most the base's own round trip moves a value of
            # the sub-block, plus 2^-8 of its largest magnitude for the 16-bit rounding of the stored copy
            err = np.abs(v - dq).reshape(-1, sub).max(axis=1)
            big = np.abs(v).reshape(-1, sub).max(axis=1)
            st = st * (1 + 2.0 ** -6) + err + big * 2.0 ** -8
        steps[pos // sub: pos // sub + st.size] = st
        pos += v.size
    # half a step, and a 256th more: a near-tie rounded the other way when the quantizer divided in float32,
    # the 16-bit rounding of a value up to half a step larger than the base's; asymmetric: a whole step (the
    # rounded zero point shifts the grid, and values past its ends are clamped)
    # (GGUF: a whole step too; its signed blocks clip the far end, its fp16 scale is not the one the codes were
    # rounded with, up to 127 x 2^-11 of a step at Q8_0's largest code, and its fp16 minimum shifts the grid)
    part = 1.0 if rt.get("sub") else (0.5 if rt["sym"] and not rt.get("ggml") else 1.0) + 2.0 ** -8
    pos = 0
    for w in tuned.windows(tname, window, 0, numel if stop is None else stop):
        yield (steps[(pos + np.arange(len(w))) // sub] * part).astype(np.float32)
        pos += len(w)
