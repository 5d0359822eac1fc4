"""The one loop over tensor pairs: Pair -> backend kernels -> TensorRecord.

For every pair of the plan (weightdiff.pairing.plan) this module streams both tensors
in aligned windows through the backend's ``delta_stats`` (one pass, float64
accumulation, windows combined in a fixed order so the numbers do not depend on
thread count or window placement), classifies the tensor, and, for changed
matrices (and the shared rows of a resized one that changed), takes the rank of the
change: from the streamed windows, or by handing the tensors to weightdiff.measure.rank. Only one pair's data is ever
held, so memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import CheckpointError, escape_name
from ..io.checkpoint import Checkpoint
from ..io.peft_ln import SEGMENT as LN_SEGMENT
from ..io.safetensors_read import storage_of
from ..kernels import reference
from ..kernels.dtypes import DTYPES, decode
from ..options import CompareOptions, Thresholds
from ..pairing.names import is_router
from ..pairing.plan import Pair, Plan
from ..records import IA3_NOTE, LN_NOTE, RELABEL_NOTE, RankRecord, TensorRecord
from . import precompile
from .backend import Backend
from .floors import FloorAccumulator
from .awq_fold import _awq_norm_both, bias_fold, norm_fold
from .quant_floor import FOLD_REL, floor_pass, floor_test
from .recast import cast_test, clamp_test, twin_route, twin_test
from .rank_stream import float_matrix, streamed_rank_sink

#: elements per streamed window; fixed (not derived from the machine) so results are reproducible
WINDOW_ELEMENTS = 1 << 24

#: the largest relative change (Frobenius) of a tensor rounded, element by element, through a narrower float dtype
#: and back into its own: half a bf16 ulp at the bottom of a binade (fp16's is smaller)
SAME_DTYPE_CAST_REL = 2.0 ** -8
#: a same-dtype tensor whose root mean square is below this is tried too: float16's subnormals (spacing 2^-24)
#: round values near 2^-17 by 2^-8 of themselves (a zero-initialised projection trained a little, std 1e-6)
SMALL_RMS = 2.0 ** -12


def window_elements(dtype_base: str, dtype_tuned: str) -> int:
    """Elements per window of a pair: ``WINDOW_ELEMENTS`` (32 MB of bfloat16, 64 MB of float32), a quarter of it
    when a side is 8 bytes an element (the float64 values of a base seen beneath a rotation, a fold or a rescale,
    ``measure.rotation.RotatedSide``; a float64 checkpoint), so that no window passes 32 MB a side: windows of
    128 MB there, two held at once while the next is computed, took a rotated 7B-shaped pair's remeasure past 1 GB."""
    wide = max(DTYPES[d].bits if d in DTYPES else 0 for d in (dtype_base, dtype_tuned))
    return WINDOW_ELEMENTS // 4 if wide > 32 else WINDOW_ELEMENTS

Progress = Callable[[int, int, str], None]   # (elements done, elements total, current tensor name)


#: the judge stage's rule for one tensor's statistics -> "unchanged" | "rounding" | "changed"
#: (``weightdiff.judge.status.classify``), handed in by the caller so measuring never
#: decides what counts as a change
Classify = Callable[[dict, "str | None", "str | None", Thresholds], str]


def _elements(pair: Pair, shape: Sequence[int] | None) -> int:
    if shape is None:
        return 0
    n = math.prod(shape)
    return n if type(n) is int else math.prod(int(d) for d in shape)


def _stream_stats(backend: Backend, base: Checkpoint, bname: str, dtype_b: str,
                  tuned: Checkpoint, tname: str, dtype_t: str, stop: int | None,
                  on_window: Callable[[int], None], floors: FloorAccumulator | None = None,
                  sink=None, device_sink=None, window: int | None = None, floor_pass=None) -> np.ndarray:
    """The statistics of a pair, streamed in windows of ``window`` elements, each window also handed to the
    cast floors (``floors``), the Gram matrix of a streamed rank (``sink``), a device's copy of the delta
    (``device_sink``) and a quantized pair's floor test (``floor_pass``, ``quant_floor.FloorPass``: not on a
    CUDA backend, whose kernel takes the windows), so each is read once."""
    k = backend.module
    window = WINDOW_ELEMENTS if window is None else int(window)
    opaque = not (DTYPES[dtype_b].decodable and DTYPES[dtype_t].decodable)
    acc = None
    base_windows = base.windows(bname, window, 0, stop)
    if floors is not None and not opaque:   # the cast-rounding floors see every base window
        base_windows = (floors.add(w, dtype_b) or w for w in base_windows)
    windows = zip(base_windows, tuned.windows(tname, window, 0, stop))
    if backend.name == "cuda" and not opaque:
        # pinned buffers, the copy of window k+1 overlapping the compute of window k
        sizes: list[int] = []

        def feed():
            for wb, wt in windows:
                sizes.append(len(wt))
                yield wb, wt, dtype_b, dtype_t

        for i, part in enumerate(k.stream_delta_stats(feed(), device=backend.device or "cuda",
                                                      on_device=device_sink.add if device_sink else None)):
            acc = part if acc is None else k.combine(acc, part)
            on_window(sizes[i])
        windows = iter(())
    for wb, wt in windows:
        part = k.bytes_stats(wb, wt) if opaque else k.delta_stats(wb, wt, dtype_b, dtype_t)
        if floor_pass is not None:          # first: what it found so far may hold the Gram matrix back (its gate)
            floor_pass.feed(wb, wt, part[_N_CHANGED] > 0)
        if sink is not None:
            sink.window(wb, wt, part, base, bname, tuned, tname)
        acc = part if acc is None else k.combine(acc, part)
        on_window(len(wt))
    if acc is None:   # zero-size tensor
        from ..kernels import reference

        acc = reference.bytes_stats(np.zeros(0, np.uint8), np.zeros(0, np.uint8)) if opaque else \
            reference.delta_stats(np.zeros(0, np.float32), np.zeros(0, np.float32), "F32", "F32")
    return acc


class _HeldSide:
    """One tuned tensor held in memory as a flat array in its logical shape: ``windows``, ``read`` and
    ``read_rows`` as a Checkpoint gives them; no quantization (``quant`` empty)."""

    def __init__(self, ck: Checkpoint, name: str, info, values: np.ndarray):
        self.path, self._ck = ck.path, ck
        self._values = np.ascontiguousarray(values).reshape(-1)
        self._shape = tuple(int(d) for d in info.shape)
        self.tensors = {name: info}
        self.quant: dict = {}

    def windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None):
        from ..io.safetensors_read import array_windows, check_range

        start, stop, step = check_range(self.tensors[name], max_elements, start, stop, self._values.itemsize)
        return array_windows(self._values, start, stop, step)

    def read(self, name: str) -> np.ndarray:
        return self._values.reshape(self._shape).copy()

    def read_rows(self, name: str, rows) -> np.ndarray:
        return self._values.reshape(self._shape)[np.asarray(rows, dtype=np.int64)].copy()


class TransposedSide(_HeldSide):
    """One tuned matrix stored transposed (paired by content or by name: an ONNX ``MatMul`` weight, a
    quantized ``MatMulNBits`` one, GPT-2's Conv1D), seen in the base's orientation by the floor test and the quantization noise
    of the rank: its values (``values``, already transposed) and its floor are read whole, as the
    transposed comparison reads the values. Its first-group columns are not known in this
    orientation (``quant`` is empty), so a calibrated format falls back to the bound."""

    def __init__(self, ck: Checkpoint, name: str, shape_b: tuple, values: np.ndarray):
        from dataclasses import replace

        super().__init__(ck, name, replace(ck.tensors[name], shape=tuple(int(d) for d in shape_b)), values)

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        from ..io.safetensors_read import array_windows, check_range

        it = self._ck.floor_windows(name, max_elements, 0, None, noise)
        if it is None:
            return None
        stored = self._shape[::-1]
        whole = np.concatenate([np.asarray(w, np.float32).reshape(-1) for w in it] or [np.zeros(0, np.float32)])
        flat = np.ascontiguousarray(whole.reshape(stored[0], math.prod(stored[1:])).T).reshape(-1)
        start, stop, step = check_range(self.tensors[name], max_elements, start, stop, 4)
        return array_windows(flat, start, stop, step)


class MergedSide(_HeldSide):
    """The tuned side of one adapter module whose base layer the adapter saves (PEFT's
    ``save_embedding_layers``, a resized vocabulary): its merged weight held in memory, in the
    saved layer's dtype, as PEFT's ``merge_and_unload`` gives it. No quantization, no floor."""

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        return None


class RowMergedSide:
    """The tuned side of an adapter module measured merged (OFT, BOFT, IA3, a LoRA merged into a base layer its
    adapter saves), never held whole: each window, read and set of rows is merged when asked for, from the
    base's rows, by ``rows(r0, r1)`` (the stored values of merged rows r0 to r1, [r1 - r0, row] in ``info``'s
    dtype). Each merged row depends on that base row alone, so a window is the same values whichever run of rows
    it was merged in. No quantization, no floor (``MergedSide``'s)."""

    def __init__(self, ck: Checkpoint, name: str, info, rows: Callable[[int, int], np.ndarray]):
        self.path, self._ck = ck.path, ck
        self.tensors = {name: info}
        self.quant: dict = {}
        self._shape = tuple(int(d) for d in info.shape)
        self._row = math.prod(self._shape[1:])
        self._rows = rows

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        return None

    def _flat(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, storage_of(self.tensors[next(iter(self.tensors))].dtype))
        r0, r1 = start // self._row, -(-stop // self._row)
        flat = np.ascontiguousarray(self._rows(r0, r1)).reshape(-1)
        return flat[start - r0 * self._row:stop - r0 * self._row]

    def windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None):
        from ..io.safetensors_read import check_range

        info = self.tensors[name]
        start, stop, step = check_range(info, max_elements, start, stop, np.dtype(storage_of(info.dtype)).itemsize)
        for pos in range(start, stop, step):
            view = self._flat(pos, min(pos + step, stop))
            view.flags.writeable = False
            yield view

    def read(self, name: str) -> np.ndarray:
        return self._flat(0, math.prod(self._shape)).reshape(self._shape).copy()

    def read_rows(self, name: str, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self._row), storage_of(self.tensors[name].dtype))
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        i = 0
        while i < len(ranked):        # runs of consecutive rows, each merged once
            j = i + 1
            while j < len(ranked) and ranked[j] - ranked[j - 1] <= 1:
                j += 1
            lo, hi = int(ranked[i]), int(ranked[j - 1]) + 1
            block = np.asarray(self._rows(lo, hi)).reshape(hi - lo, self._row)
            out[order[i:j]] = block[ranked[i:j] - lo]
            i = j
        return out.reshape((len(rows), *self._shape[1:]))


def _merged_base_layer(pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple | None:
    """``(info, rows)`` of the merged weight of a LoRA pair whose adapter saves its own base layer that is not the
    base's weight (another shape, dtype or values): PEFT loads that copy and merges the factors into it, so that
    merged weight is what the adapter makes of the module. None when there is no copy, or it is the base's weight to
    the bit (the factors alone are then the change). ``rows(r0, r1)``: the stored values of merged rows r0 to r1,
    merged from the saved layer's rows when asked for (``RowMergedSide``: a resized 128,256-row embedding is never
    decoded whole); a DoRA on a layer stored transposed (GPT-2's Conv1D), whose norms run along the stored rows'
    columns, gives the stored values of the whole merged weight instead (``MergedSide``)."""
    from dataclasses import replace

    from .rank import merged_factor_weight

    lf = pair.lora
    saved = getattr(lf, "base_layer_name", None)
    if saved is None:
        return None
    info = tuned.tensors[saved]
    shape = tuple(int(d) for d in info.shape)
    if shape == tuple(pair.shape_base) and info.dtype == pair.dtype_base and \
            _same_bytes(base, pair.base_name, tuned, saved, None, WINDOW_ELEMENTS):
        return None
    row = math.prod(shape[1:])
    if lf.kind == "TOKENS":         # PEFT's trainable tokens: the copy with the trained rows in place of its own
        tokens = np.asarray(lf.tokens, dtype=np.int64)
        trained = _stored(_token_rows(lf, tuned, info.dtype), info.dtype).reshape(len(tokens), row)

        def token_rows(first: int, last: int) -> np.ndarray:
            out = np.empty((last - first, row), storage_of(info.dtype))
            at = 0
            for w in tuned.windows(saved, max(1, WINDOW_ELEMENTS // max(row, 1)) * max(row, 1), first * row,
                                last * row):
                w = np.asarray(w).reshape(-1, row)
                out[at:at + len(w)] = w
                at += len(w)
            for i, t in enumerate(tokens.tolist()):     # later entries win, as numpy's fancy assignment
                if first <= t < last:
                    out[t - first] = trained[i]
            return out

        return replace(info, name=pair.tuned_name, start=None, end=None, quant=None), token_rows
    a, b, magnitude, dt_m = _factors(pair, tuned)
    dtype = info.dtype if info.dtype in ("F16", "BF16", "F32", "F64") else "F32"
    dt_a = tuned.tensors[lf.a_name].dtype
    flat = replace(info, name=pair.tuned_name, dtype=dtype, start=None, end=None, quant=None)
    if getattr(lf, "transposed", False):
        if magnitude is not None:        # DoRA's norms are the stored columns': merged whole
            w = np.ascontiguousarray(decode(np.asarray(tuned.read(saved)), info.dtype).reshape(shape[0], row).T)
            merged = np.ascontiguousarray(merged_factor_weight(w, a, b, lf.scale, magnitude, info.dtype, dt_m, dt_a).T)
            return flat, _stored(reference.round_to(merged, dtype).reshape(shape), dtype)

        def merge(w: np.ndarray, r0: int, r1: int) -> np.ndarray:     # stored rows r0..r1: columns of W + s B A
            return merged_factor_weight(np.ascontiguousarray(w.T), a[:, r0:r1], b, lf.scale, None, info.dtype,
                                        dt_m, dt_a).T
    else:
        def merge(w: np.ndarray, r0: int, r1: int) -> np.ndarray:     # DoRA's row norms: each row's own
            return merged_factor_weight(w, a, b[r0:r1], lf.scale, None if magnitude is None else magnitude[r0:r1],
                                        info.dtype, dt_m, dt_a)

    return flat, _merged_rows(tuned, saved, shape, info.dtype, row, dtype,
                              lambda w, r0, r1: reference.round_to(merge(w, r0, r1), dtype))


def _token_rows(lf, tuned: Checkpoint, dtype: str) -> np.ndarray:
    """A trainable-tokens module's trained rows (float64 [tokens, dim]) as PEFT applies them: cast to the table's
    dtype ``dtype`` (``delta.to(W)`` in ``TrainableTokensLayer.get_merged_weights``, in its forward as in its merge)."""
    name = lf.parts["rows"]
    dt = tuned.tensors[name].dtype
    rows = decode(np.asarray(tuned.read(name)), dt)
    return _cast_chain(rows, dt, dtype).reshape(len(lf.tokens), -1)


def _hra_pair(lf, pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) with W (H - I) = B @ A for an HRA module (``io.peft_hra``): P = W A^T from the base
    weight read in row blocks (a Conv2d's viewed [out, in x k x k]), never held whole."""
    from ..io.peft_hra import factor_b, reflections

    name = lf.parts["hra_u"]
    u = decode(np.asarray(tuned.read(name)), tuned.tensors[name].dtype).reshape(tuned.tensors[name].shape)
    a = reflections(u, lf.apply_gs)
    shape = tuple(int(d) for d in pair.shape_base)
    p = np.empty((shape[0], a.shape[0]))
    for r0, r1, w in _row_runs(base, pair.base_name, shape, pair.dtype_base, math.prod(shape[1:])):
        p[r0:r1] = w @ a.T
    return a, factor_b(p, a, lf.apply_gs)


def _part_values(lf, tuned: Checkpoint) -> dict:
    """A LoHa/LoKr/VeRA module's tensors decoded to float64 in their saved shapes (role -> values)."""
    return {role: decode(tuned.read(n), tuned.tensors[n].dtype).reshape(tuned.tensors[n].shape)
            for role, n in lf.parts.items()}


def _factors(pair: Pair, tuned: Checkpoint) -> tuple:
    """A, B as float64 [r, in] and [out, r] (embedding factors turned so; AdaLoRA's A times its E), the DoRA
    magnitude and its dtype."""
    lf = pair.lora
    held = getattr(tuned, "_expert_factors", None) if getattr(lf, "expert", None) is not None else None
    if held is not None and held[0] == (lf.a_name, lf.b_name):
        a64, b64 = held[1]                  # the experts of one fused parameter share its factors: decoded once
    else:
        a = tuned.read(lf.a_name)
        b = tuned.read(lf.b_name)
        a64 = decode(a, tuned.tensors[lf.a_name].dtype).reshape(a.shape[0], -1)
        b64 = decode(b, tuned.tensors[lf.b_name].dtype).reshape(b.shape[0], -1)
        if getattr(lf, "expert", None) is not None:
            tuned._expert_factors = ((lf.a_name, lf.b_name), (a64, b64))
    if getattr(lf, "e_name", None):         # AdaLoRA: B @ (A * E), E one singular value per rank
        a64 = a64 * decode(tuned.read(lf.e_name), tuned.tensors[lf.e_name].dtype).reshape(-1, 1)
    magnitude, dt_m = None, None
    if lf.magnitude_name:
        dt_m = tuned.tensors[lf.magnitude_name].dtype
        magnitude = decode(tuned.read(lf.magnitude_name), dt_m).ravel()
    if getattr(lf, "mlx", None) is not None:       # mlx-lm's lora_a / lora_b as the stored weight's A and B
        from ..io.mlx_adapter import mlx_pair

        a64, b64 = mlx_pair(lf, a64, b64)
    if getattr(lf, "embedding", False):
        a64, b64 = b64.T.copy(), a64.T.copy()
    if getattr(lf, "expert", None) is not None and getattr(lf, "mlx", None) is None:   # a fused parameter's expert
        from ..io.peft_params import expert_pair

        a64, b64 = expert_pair(lf, a64, b64)
    return a64, b64, magnitude, dt_m


def _compute_merged(pair: Pair, merged: tuple, bases: Sequence[Checkpoint], tuned: Checkpoint,
                    options: CompareOptions, backend: Backend, classify: Classify,
                    on_window: Callable[[int], None]) -> TensorRecord:
    """The record of a LoRA module whose adapter saves its own base layer: its merged weight against the
    base's, as a plain pair (a resized table is a resize, as the merged model reads)."""
    from dataclasses import replace

    from ..io.peft_adapter import check_factor_values

    lf = pair.lora
    if lf.kind != "TOKENS":             # (trainable tokens' rows: checked with the plan, no factors)
        a64, b64, magnitude, _ = _factors(pair, tuned)
        values = {lf.a_name: a64, lf.b_name: b64, **({lf.magnitude_name: magnitude} if magnitude is not None else {})}
        check_factor_values(lf, values, tuned.files[0])
    info, values = merged
    side = RowMergedSide(tuned, pair.tuned_name, info, values) if callable(values) else \
        MergedSide(tuned, pair.tuned_name, info, values)
    st, sb = tuple(info.shape), tuple(pair.shape_base)
    kind, overlap = ("paired", None) if st == sb else ("resized", min(st[0], sb[0]))
    flat = replace(pair, kind=kind, shape_tuned=st, dtype_tuned=info.dtype, overlap_rows=overlap, lora=None,
                   tuned_source=None, transposed=False)
    precompile.ensure([flat])       # the merged weight's dtype: a pair the plan did not have
    rec = compute_pair(flat, bases, side, options, backend, classify, on_window)
    what = (f"LoRA adapter (r={lf.r}, scale={lf.scale:g}{', DoRA' if lf.magnitude_name else ''}) merged into "
            f"the base layer the adapter saves, `{lf.base_layer_name}` ({list(st)}, {info.dtype}), which is not "
            "this base's weight: PEFT loads that copy, so the merged weight is compared")
    if lf.kind == "TOKENS":
        from ..io.peft_tokens import tokens_note

        what = tokens_note(lf, info.dtype, lf.base_layer_name, list(st))
    rec.note = what + (f"; {rec.note}" if rec.note else "")
    return rec


def _compute_lora_bias(pair: Pair, base: Checkpoint, bases: Sequence[Checkpoint], tuned: Checkpoint,
                       options: CompareOptions, backend: Backend, classify: Classify,
                       on_window: Callable[[int], None]) -> TensorRecord:
    """The record of a base bias an adapter's ``lora_B.bias`` changes (``lora_bias: true``): the merged bias
    against the base's, as a plain pair, so the adapter reads as its merged model does (read as a tensor of
    its own, the adapter showed 4 changed and 4 added tensors where the merged model showed 8 changed).
    PEFT merges ``base.bias + lora_B.bias * scaling`` in torch: the product and the sum in float32 (float64
    when either side is), then the result in the base bias's dtype; the same roundings are made here."""
    from dataclasses import replace

    lf = pair.lora_bias
    info_b, info_l = base.tensors[pair.base_name], tuned.tensors[lf.bias_name]
    if DTYPES[info_b.dtype].kind != "float" or pair.base_name in (getattr(base, "quant", None) or {}):
        raise CheckpointError(tuned.files[0], f"LoRA bias `{escape_name(lf.bias_name)}` adds to the base's "
                                              f"`{escape_name(pair.base_name)}`, which is {info_b.dtype}"
                                              f"{' (quantized)' if DTYPES[info_b.dtype].kind == 'float' else ''}, "
                                              "not a float bias PEFT can merge into",
                              "merge the adapter (merge_and_unload) and compare the merged model")
    b64 = decode(np.asarray(base.read(pair.base_name)), info_b.dtype).reshape(-1)
    l64 = decode(np.asarray(tuned.read(lf.bias_name)), info_l.dtype).reshape(-1)
    if not np.isfinite(l64).all():
        raise CheckpointError(tuned.files[0], f"LoRA bias `{escape_name(lf.bias_name)}` holds NaN or Inf values, so "
                                              f"the change of `{escape_name(lf.bias_target)}` cannot be measured")
    wide = "F64" if "F64" in (info_b.dtype, info_l.dtype) else "F32"
    # a float8 bias is held as the float32 sum (weightdiff writes no float8 values of its own)
    dtype = info_b.dtype if info_b.dtype in ("F16", "BF16", "F32", "F64") else "F32"
    with np.errstate(all="ignore"):
        step = reference.round_to(l64 * float(reference.round_to(np.array([lf.scale]), wide)[0]), wide)
        merged = reference.round_to(reference.round_to(b64 + step, wide), dtype)
    values = _stored(merged, dtype)
    info = replace(info_b, name=pair.tuned_name, dtype=dtype, start=None, end=None, quant=None)
    side = MergedSide(tuned, pair.tuned_name, info, values)
    flat = replace(pair, dtype_tuned=dtype, tuned_source=None, lora_bias=None)
    precompile.ensure([flat])
    rec = compute_pair(flat, bases, side, options, backend, classify, on_window)
    what = (f"LoRA bias `{lf.bias_name}` (lora_bias, scale={lf.scale:g}) merged into the base's bias, as PEFT "
            "merges it")
    rec.note = what + (f"; {rec.note}" if rec.note else "")
    return rec


#: torch's type promotion among the float dtypes an IA3 merge meets (``torch.mul(weight, ia3_l)``)
_FLOAT_RANK = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


def _promoted(a: str, b: str) -> str:
    """``torch.promote_types`` of two of F16, BF16, F32, F64: the wider; float16 with bfloat16 is float32."""
    if a == b:
        return a
    ra, rb = _FLOAT_RANK[a], _FLOAT_RANK[b]
    return a if ra > rb else b if rb > ra else "F32"


def _cast_chain(x: np.ndarray, computed: str, dtype: str) -> np.ndarray:
    """float64 values ``x`` rounded to ``computed`` (the product's dtype in torch), then cast to ``dtype`` as torch
    casts (float64 to float16 or bfloat16 through float32)."""
    x = reference.round_to(x, computed)
    if computed == "F64" and dtype in ("F16", "BF16"):
        x = reference.round_to(x, "F32")
    return reference.round_to(x, dtype)


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values already on ``dtype``'s grid as that dtype's stored array."""
    from ..io.safetensors_write import to_bf16_bits

    return to_bf16_bits(values.astype(np.float32)) if dtype == "BF16" else values.astype(storage_of(dtype))


def ia3_factor(v, shape: tuple, values: np.ndarray) -> np.ndarray:
    """The IA3 vector ``values`` (float64) shaped to multiply a base weight of ``shape`` as PEFT's merge does:
    a linear layer [out, in] by columns (inputs) or rows (outputs), GPT-2's Conv1D [in, out] the other way, a
    convolution [out, in / groups, k...] by input channel (each group's own) or output channel.

    >>> from types import SimpleNamespace as NS
    >>> ia3_factor(NS(feedforward=True, transposed=False, conv=0, groups=1), (2, 3), np.arange(3.0)).shape
    (1, 3)
    >>> ia3_factor(NS(feedforward=True, transposed=False, conv=4, groups=2), (4, 1, 1, 1), np.array([5.0, 7.0])).ravel().tolist()
    [5.0, 5.0, 7.0, 7.0]
    """
    l = np.asarray(values, np.float64).reshape(-1)
    if not v.conv:
        along_columns = v.feedforward != v.transposed      # a linear layer's inputs; a Conv1D's outputs
        return l.reshape(1, -1) if along_columns else l.reshape(-1, 1)
    tail = (1,) * (len(shape) - 2)
    if not v.feedforward:
        return l.reshape(-1, 1, *tail)
    if v.groups == 1:
        return l.reshape(1, -1, *tail)
    out, in_pg = int(shape[0]), int(shape[1])
    per = np.broadcast_to(l.reshape(v.groups, 1, in_pg), (v.groups, out // v.groups, in_pg))
    return per.reshape(out, in_pg, *tail)


#: elements merged at once (float64 temporaries of an IA3 merge: 8 bytes each, a few at a time)
_MERGE_CHUNK = 1 << 20


def _ia3_merged(pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple:
    """``(info, rows)`` of the weight PEFT's IA3 merge gives: ``torch.mul(W, l)`` in the promoted dtype, cast back to
    W's (``IA3Layer.merge``), in the base's shape and dtype; ``rows(r0, r1)`` the stored values of rows r0 to r1,
    read from the base and merged in runs of rows when asked for (``RowMergedSide``)."""
    from dataclasses import replace

    v = pair.ia3
    # the weight PEFT scales: the base's, or the copy the adapter saves of it (loaded over the base's)
    src, name = (tuned, v.base_layer_name) if v.base_layer_name else (base, pair.base_name)
    info = src.tensors[name]
    shape, dtype = tuple(int(d) for d in info.shape), info.dtype
    ldt = tuned.tensors[v.name].dtype
    computed = _promoted(dtype, ldt)
    factor = ia3_factor(v, shape, decode(np.asarray(tuned.read(v.name)), ldt))
    rows = _merged_rows(src, name, shape, dtype, math.prod(shape[1:]), dtype, lambda w, r0, r1: _cast_chain(
        w.reshape((r1 - r0, *shape[1:])) * (factor[r0:r1] if factor.shape[0] != 1 else factor), computed, dtype))
    return replace(info, name=pair.tuned_name, start=None, end=None, quant=None), rows


def _ia3_bias(pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple:
    """``(info, stored values)`` of a bias PEFT's IA3 merge scales (a layer whose outputs its vector scales):
    ``torch.mul(b, l)`` cast to the bias's dtype for a linear layer, to the weight's for a convolution (as
    ``_ConvNd.merge`` does)."""
    from dataclasses import replace

    v = pair.ia3_bias
    info = base.tensors[pair.base_name]
    ldt = tuned.tensors[v.name].dtype
    target = info.dtype
    if v.conv:
        weight = base.tensors.get(pair.base_name.removesuffix(".bias") + ".weight")
        if weight is not None and weight.dtype in _FLOAT_RANK:
            target = weight.dtype
    b = decode(np.asarray(base.read(pair.base_name)), info.dtype).reshape(-1)
    l = decode(np.asarray(tuned.read(v.name)), ldt).reshape(-1)
    with np.errstate(all="ignore"):
        merged = _cast_chain(b * l, _promoted(info.dtype, ldt), target)
    return replace(info, name=pair.tuned_name, dtype=target, start=None, end=None, quant=None), \
        _stored(merged, target).reshape(tuple(int(d) for d in info.shape))


def _compute_ia3(pair: Pair, base: Checkpoint, bases: Sequence[Checkpoint], tuned: Checkpoint,
                 options: CompareOptions, backend: Backend, classify: Classify,
                 on_window: Callable[[int], None]) -> TensorRecord:
    """The record of a base weight (or bias) an IA3 vector scales: the merged tensor against the base's, as a
    plain pair, so the adapter reads as the model ``merge_and_unload`` gives."""
    from dataclasses import replace

    bias = pair.ia3_bias is not None
    v = pair.ia3_bias if bias else pair.ia3
    if bias:
        info, values = _ia3_bias(pair, base, tuned)
        side = MergedSide(tuned, pair.tuned_name, info, values)
    else:
        info, rows = _ia3_merged(pair, base, tuned)
        side = RowMergedSide(tuned, pair.tuned_name, info, rows)
    flat = replace(pair, dtype_tuned=info.dtype, tuned_source=None, ia3=None, ia3_bias=None)
    precompile.ensure([flat])
    rec = compute_pair(flat, bases, side, options, backend, classify, on_window)
    what = (f"{IA3_NOTE} `{v.name}` " + ("merged into the base's bias (b x l" if bias else
                                         f"({v.size} values) merged into the base's weight (W x l")
            + f", l scaling the layer's {v.scales}), as PEFT merges it")
    rec.note = what + (f"; {rec.note}" if rec.note else "")
    return rec


def _oft_merged(pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple:
    """``(info, rows)`` of the weight PEFT's OFT merge gives: the base weight (or the copy the adapter
    saves of it) cast to the adapter's dtype, times the block-diagonal rotation (R^T for a Linear or a Conv2d viewed
    [out, in x k x k], R for an embedding) in that dtype, stored in the weight's (``Linear.merge``:
    ``weight.copy_(torch.mm(R, weight.t().to(R.dtype)).t())``); ``rows(r0, r1)`` merges rows r0 to r1 when asked
    for (``_merge_in_rows``)."""
    from dataclasses import replace

    from ..io.peft_oft import block_rotation, in_features, merge_rows

    lf = pair.lora
    src, name = (tuned, lf.base_layer_name) if lf.base_layer_name else (base, pair.base_name)
    info = src.tensors[name]
    shape, dtype = tuple(int(d) for d in info.shape), info.dtype
    rdt = tuned.tensors[lf.a_name].dtype
    computed = rdt if rdt in _FLOAT_RANK else "F32"
    features = in_features(lf, shape)
    vec = decode(np.asarray(tuned.read(lf.a_name)), rdt).reshape(tuned.tensors[lf.a_name].shape)
    # PEFT computes the rotation in float32 (a half-precision adapter on the CPU too), then casts it to the
    # adapter's dtype
    exact = block_rotation(tuned.adapter, vec, lf.r, lf.cols)
    rot = reference.round_to(reference.round_to(exact, "F32"), computed).reshape(exact.shape)
    rows = _merge_in_rows(src, name, shape, dtype, computed, features,
                          lambda w, r0, r1: merge_rows(w, rot, lf.embedding))
    return replace(info, name=pair.tuned_name, start=None, end=None, quant=None), rows


def _merged_rows(src, name: str, shape: tuple, dtype: str, width: int, out_dtype: str, merge):
    """``rows(first, last)`` for ``RowMergedSide``: rows ``first`` to ``last`` of weight ``name`` of checkpoint ``src``
    (of ``shape`` and ``dtype``) read and merged in runs of rows (the weight is never mapped or merged whole):
    ``merge(rows [n, width] float64, r0, r1)`` gives their merged values on ``out_dtype``'s grid; the stored values
    [last - first, row] of the merged rows."""
    row = math.prod(shape[1:])

    def rows(first: int, last: int) -> np.ndarray:
        out = np.empty((last - first, row), storage_of(out_dtype))
        for r0, r1, w in _row_runs(src, name, shape, dtype, width, first, last):
            with np.errstate(all="ignore"):
                merged = merge(w, r0, r1)
            out[r0 - first:r1 - first] = _stored(merged, out_dtype).reshape(r1 - r0, row)
        return out

    return rows


def _merge_in_rows(src, name: str, shape: tuple, dtype: str, computed: str, features: int, merge):
    """``_merged_rows`` of a weight merged with a rotation as PEFT merges one: each run cast to the adapter's dtype
    ``computed``, ``merge(rows [n, features] float64, r0, r1)`` on it, rounded to ``computed`` and cast to ``dtype``
    (torch's casts)."""
    return _merged_rows(src, name, shape, dtype, features, dtype, lambda w, r0, r1: _cast_chain(
        merge(reference.round_to(w, computed).reshape(r1 - r0, features), r0, r1), computed, dtype))


def _row_runs(src, name: str, shape: tuple, dtype: str, width: int, first: int = 0, last: int | None = None):
    """``(r0, r1, rows)`` of weight ``name`` of checkpoint ``src`` (of ``shape`` and ``dtype``) from row ``first``
    to ``last`` (the end), read in runs of rows of about ``_MERGE_CHUNK`` values, never mapped whole: each run
    decoded to float64 [r1 - r0, ``width``]."""
    last = shape[0] if last is None else last
    rows = max(1, _MERGE_CHUNK // max(1, width))
    row = math.prod(shape[1:])
    windows = src.windows(name, rows * row, first * row, last * row)
    for r0 in range(first, last, rows):
        r1 = min(last, r0 + rows)
        yield r0, r1, decode(np.asarray(next(windows)), dtype).reshape(r1 - r0, width)


def _boft_merged(pair: Pair, base: Checkpoint, tuned: Checkpoint) -> tuple:
    """``(info, rows)`` of the weight PEFT's BOFT merge gives: the base weight cast to the adapter's dtype,
    times M^T (the butterfly rotation of its inputs, its blocks Cayley rotations rounded to that dtype), then times
    the output scales, each product rounded to that dtype, stored in the weight's (``Linear.merge``:
    ``torch.mm(M, W.t().to(M.dtype)).t() * boft_s``)."""
    from dataclasses import replace

    from ..io.peft_boft import features_of, merge_boft_rows, rotations_of

    lf = pair.lora
    info = base.tensors[pair.base_name]
    shape, dtype = tuple(int(d) for d in info.shape), info.dtype
    rname, sname = lf.parts["boft_R"], lf.parts["boft_s"]
    computed = tuned.tensors[rname].dtype
    features = features_of(shape)
    values = decode(np.asarray(tuned.read(rname)), computed).reshape(tuned.tensors[rname].shape)
    rots, perms = rotations_of(lf, values, features, tuned.adapter)
    rots = reference.round_to(rots, computed).reshape(rots.shape)          # cayley_batch(...).to(data.dtype)
    dt_s = tuned.tensors[sname].dtype
    scale = reference.round_to(decode(np.asarray(tuned.read(sname)), dt_s), _promoted(computed, dt_s)).reshape(-1)

    def merge(w, r0, r1):
        x = reference.round_to(merge_boft_rows(w, rots, perms), computed).reshape(w.shape)
        return x * scale[r0:r1, None]

    rows = _merge_in_rows(base, pair.base_name, shape, dtype, _promoted(computed, dt_s), features, merge)
    return replace(info, name=pair.tuned_name, start=None, end=None, quant=None), rows


def _compute_oft(pair: Pair, base: Checkpoint, bases: Sequence[Checkpoint], tuned: Checkpoint,
                 options: CompareOptions, backend: Backend, classify: Classify,
                 on_window: Callable[[int], None]) -> TensorRecord:
    """The record of a base weight an OFT adapter rotates: the merged weight against the base's, as a plain pair
    (its change W (R^T - I) is dense), so the adapter reads as the model ``merge_and_unload`` gives."""
    from dataclasses import replace

    from ..io.peft_oft import OFT_NOTE, old_peft

    lf = pair.lora
    info, rows = (_boft_merged if lf.kind == "BOFT" else _oft_merged)(pair, base, tuned)
    side = RowMergedSide(tuned, pair.tuned_name, info, rows)
    st, sb = tuple(info.shape), tuple(pair.shape_base)
    kind, overlap = ("paired", None) if st == sb else ("resized", min(st[0], sb[0]))
    flat = replace(pair, kind=kind, shape_tuned=st, dtype_tuned=info.dtype, overlap_rows=overlap, lora=None,
                   tuned_source=None, transposed=False)
    precompile.ensure([flat])
    rec = compute_pair(flat, bases, side, options, backend, classify, on_window)
    if lf.kind == "BOFT":
        from ..io.peft_boft import boft_note

        n = sum(int(np.prod(tuned.tensors[x].shape)) for x in lf.parts.values())
        rec.note = boft_note(lf, n) + (f"; {rec.note}" if rec.note else "")
        return rec
    raw = tuned.adapter.raw
    how = (f"Cayley-Neumann, {raw.get('num_cayley_neumann_terms')} terms" if raw.get("use_cayley_neumann")
           else "Cayley") + (", coft" if raw.get("coft") else "") + (", one block shared" if raw.get("block_share") else "")
    n = int(np.prod(tuned.tensors[lf.a_name].shape))       # the adapter's own parameters (scope.oft)
    what = (f"{OFT_NOTE} `{lf.a_name}` ({n} value{'s' if n != 1 else ''}; {lf.r} block"
            f"{'s' if lf.r != 1 else ''} of {lf.cols}, {how}) merged into the "
            + (f"base layer the adapter saves, `{lf.base_layer_name}`" if lf.base_layer_name else "base's weight")
            + f" ({'W R' if lf.embedding else 'W R^T'}), as PEFT merges it")
    if old_peft(tuned.adapter):
        what += ("; saved by a PEFT before 0.18, whose Cayley-Neumann series differed: this is the weight PEFT 0.18 "
                 "and later compute from it")
    rec.note = what + (f"; {rec.note}" if rec.note else "")
    return rec


#: a base tensor a reordering is undone against is read whole up to this size, else row by row per window
#: (local files: a gathered window's rows are one pread each, cheap; a 32,000 x 4,096 bf16 table held whole was
#: a quarter of the 1 GB bound)
GATHER_WHOLE_BYTES = 32 << 20
#: the same for a checkpoint streamed from the Hub, where each run of rows in another order is one HTTP request
GATHER_WHOLE_BYTES_STREAMED = 256 << 20


#: float formats whose values ``negated`` multiplies by -1 exactly (E8M0 has no sign bit)
NEGATABLE = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")


def negated(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of ``dtype`` times -1, as stored values: the sign bit flipped (what ``-x`` does in
    torch, zeros included), except that the FNUZ formats have no negative zero (its pattern is their
    NaN), so a zero stays zero there.

    >>> negated(np.array([0x3F80, 0x0000], np.uint16), "BF16").tolist()       # 1.0, +0.0
    [49024, 32768]
    >>> negated(np.array([0x00, 0x80, 0x38], np.uint8), "F8_E4M3FNUZ").tolist()
    [0, 128, 184]
    """
    if stored.dtype.kind == "f":
        return -stored
    bit = stored.dtype.type(1 << (8 * stored.dtype.itemsize - 1))
    out = stored ^ bit
    if dtype.endswith("FNUZ"):
        out[stored == 0] = 0
        out[stored == bit] = bit            # NaN stays NaN
    return out


class GatheredSide:
    """One base tensor seen in the tuned model's order: row (``axis`` 0) or column (``axis`` 1) i of
    what it shows is row or column ``index[i]`` of the base's ``source`` tensor (another expert's, for
    experts reordered), so that a reordered tuned tensor is measured against the units it holds rather
    than against others (``remeasure``). A source up to ``GATHER_WHOLE_BYTES`` (``_STREAMED`` from the Hub) is
    read once, whole (as the rank pass reads a matrix), and let go by ``release``; a larger one window by window
    from the stored rows each window covers (memory bounded by the window). Float tensors only (no floor).
    ``negate``: the values times -1 (the sign bit flipped, exact in every float format; ``NEGATABLE``), for a
    matrix stored with its sign flipped."""

    def __init__(self, ck: Checkpoint, name: str, source: str, axis: int | None = None,
                 index: np.ndarray | None = None, negate: bool = False):
        from dataclasses import replace

        info = ck.tensors[source]
        if negate and info.dtype not in NEGATABLE:
            raise ValueError(f"cannot negate {info.dtype} values")
        self._negate = info.dtype if negate else None
        shape = [int(d) for d in info.shape]
        if axis is not None:
            shape[axis] = len(index)
        self.path, self._ck, self._source, self._axis = ck.path, ck, source, axis
        self._index = None if index is None else np.asarray(index, np.int64)
        self._shape = tuple(shape)
        self._whole: np.ndarray | None = None
        self.tensors = {name: replace(info, name=name, shape=self._shape, start=None, end=None)}
        self.quant: dict = {}

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the gathered tensor as stored values, [hi - lo, row]."""
        ck, src = self._ck, self._source
        info = ck.tensors[src]
        limit = GATHER_WHOLE_BYTES_STREAMED if getattr(ck, "streamed", False) else GATHER_WHOLE_BYTES
        if len(self._shape) < 2 or (self._whole is None and info.nbytes <= limit):
            # small enough to hold: read once (rows in another order would be one request each on the Hub)
            if self._whole is None:
                self._whole = np.asarray(ck.read(src)).reshape(tuple(int(d) for d in info.shape))
            if len(self._shape) < 2:
                got = self._whole.reshape(-1)[self._index[lo:hi] if self._axis == 0 else slice(lo, hi)][:, None]
                return negated(got, self._negate) if self._negate else got
        rows = np.arange(lo, hi) if self._axis != 0 else self._index[lo:hi]
        got = self._whole[rows] if self._whole is not None else ck.read_rows(src, rows)
        got = np.asarray(got).reshape(hi - lo, -1)
        if self._axis == 1:
            got = got.reshape((hi - lo,) + tuple(int(d) for d in ck.tensors[src].shape[1:]))
            got = np.take(got, self._index, axis=1).reshape(hi - lo, -1)
        return negated(got, self._negate) if self._negate else got

    def release(self) -> None:
        """Let go of the source held whole (the tensor is measured)."""
        self._whole = None

    def windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None):
        from ..io.safetensors_read import check_range

        start, stop, step = check_range(self.tensors[name], max_elements, start, stop,
                                        np.dtype(storage_of(self.tensors[name].dtype)).itemsize)
        row = max(1, math.prod(self._shape[1:]))
        for pos in range(start, stop, step):
            end = min(pos + step, stop)
            lo, hi = pos // row, -(-end // row)
            view = np.ascontiguousarray(self._rows(lo, hi).reshape(-1)[pos - lo * row:end - lo * row])
            view.flags.writeable = False
            yield view

    def read(self, name: str) -> np.ndarray:
        return self._rows(0, self._shape[0]).reshape(self._shape)

    def read_rows(self, name: str, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return np.concatenate([self._rows(int(i), int(i) + 1) for i in rows]) if rows.size else \
            self._rows(0, 0)

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        return None


def remeasured_pair(pair: Pair, side: GatheredSide) -> Pair:
    """The pair ``remeasure`` measures: ``pair`` against ``side`` (a plain ``paired`` one, or a resized token table
    still resized at the base's height), with the side's shape and dtype for the base's. What a record measured
    again is checked against when it is read back from a cache (``measure.cache.check_pair``)."""
    from dataclasses import replace

    info = side.tensors[pair.base_name]
    # (a rotated base tensor is float64 values, whatever the base stored: ``measure.rotation.RotatedSide``)
    # a resized token table seen at the base's height (rotated) stays resized: its shared rows are compared
    keep = pair.kind == "resized" and tuple(info.shape) != tuple(pair.shape_tuned or ())
    return replace(pair, kind="resized" if keep else "paired", shape_base=info.shape,
                   dtype_base=info.dtype, overlap_rows=pair.overlap_rows if keep else None)


def remeasure(pair: Pair, side: GatheredSide, bases: Sequence[Checkpoint], tuned: Checkpoint,
              options: CompareOptions, backend: Backend, classify: Classify,
              on_window: Callable[[int], None] = lambda n: None) -> TensorRecord:
    """The record of ``pair`` measured against ``side`` (its base tensor in the tuned model's order, the
    tuned tensor's shape) instead of the base tensor as stored: a reordering undone before measuring, so
    the numbers are of what changed beneath it. Statistics, status and rank as ``compute_pair`` gives
    them; the pair becomes a plain ``paired`` one (a trimmed table's base rows are the ones the tuned
    rows are). ``on_window(n)``: the elements of each window as it streams (progress)."""
    sides = list(bases)
    sides[pair.base_index] = side
    flat = remeasured_pair(pair, side)
    precompile.ensure([flat])       # float64 values against the stored dtype: a pair the pass may not have had
    return compute_pair(flat, sides, tuned, options, backend, classify, on_window)


def _array_stats(backend: Backend, base: Checkpoint, bname: str, dtype_b: str, tuned_raw: np.ndarray,
                 dtype_t: str, on_window: Callable[[int], None]) -> np.ndarray:
    """``_stream_stats`` against a tuned array held in memory, in the same windows."""
    flat = tuned_raw.reshape(-1)
    acc, at = None, 0
    for wb in base.windows(bname, WINDOW_ELEMENTS):
        wt = flat[at:at + len(wb)]
        at += len(wb)
        part = backend.module.delta_stats(wb, wt, dtype_b, dtype_t)
        acc = part if acc is None else backend.module.combine(acc, part)
        on_window(len(wt))
    if acc is None:
        from ..kernels import reference

        acc = reference.delta_stats(np.zeros(0, np.float32), np.zeros(0, np.float32), "F32", "F32")
    return acc


_N_BEYOND = reference.IDX["n_beyond"]
_N_CHANGED = reference.IDX["n_changed"]
#: (base dtype, tuned dtype) -> whether both decode to floats (``_compute_pair``'s shortcut for an unchanged pair)
_UNCHANGED_OK = {(a, b): DTYPES[a].decodable and DTYPES[b].decodable for a in DTYPES for b in DTYPES}
_FILLED = ("norm_base", "norm_tuned", "norm_delta", "rel_change", "cosine", "frac_changed",
           "frac_beyond_rounding", "max_abs_delta")


def _fill(record: TensorRecord, fields: dict) -> None:
    d = record.__dict__
    for key in _FILLED:
        if key in fields:
            d[key] = fields[key]
    record.nonfinite = int(fields.get("nonfinite", 0) or 0)
    record.sign_flips = int(fields.get("sign_flips", 0) or 0)


def compute_pair(pair: Pair, bases: Sequence[Checkpoint], tuned: Checkpoint, options: CompareOptions,
                 backend: Backend, classify: Classify,
                 on_window: Callable[[int], None] = lambda n: None,
                 solver: "Solver | None" = None, pre: "tuple[np.ndarray, dict, dict] | None" = None) -> TensorRecord:
    """Measure one pair of the plan and return its record (status, stats, rank).

    ``pre``: a small pair's statistics, cast floors and finalized fields, computed with its batch
    (``_small_batch``); the same record again. ``solver``: the eigen-solve of a streamed Gram
    matrix may run there while the caller goes on; ``rec.rank`` is then a ``Deferred``
    (``Solver.resolve``)."""
    rec = _compute_pair(pair, bases, tuned, options, backend, classify, on_window, solver, pre)
    if pair.tuned_source is not None and LN_SEGMENT in pair.tuned_source and \
            getattr(getattr(tuned, "adapter", None), "peft_type", None) == "LN_TUNING":
        # an LN tuning adapter's trained copy of a layer, compared with the base's tensor it replaces
        rec.note = f"{LN_NOTE} `{pair.tuned_source}`, which PEFT's merge swaps in for the base's layer" + \
            (f"; {rec.note}" if rec.note else "")
    return rec


def _compute_pair(pair: Pair, bases: Sequence[Checkpoint], tuned: Checkpoint, options: CompareOptions,
                  backend: Backend, classify: Classify, on_window: Callable[[int], None],
                  solver: "Solver | None", pre: "tuple[np.ndarray, dict, dict] | None") -> TensorRecord:
    shape_t = list(pair.shape_tuned) if pair.shape_tuned is not None else None
    # one list for both sides when the shapes agree (records are read, never edited in place)
    shape_b = shape_t if shape_t is not None and pair.shape_base == pair.shape_tuned else \
        list(pair.shape_base) if pair.shape_base is not None else None
    rec = TensorRecord(
        name=pair.tuned_name if pair.tuned_name is not None else pair.base_name,
        base_name=pair.base_name, status=pair.kind, shape=shape_t if shape_t is not None else shape_b,
        base_shape=shape_b, dtype_base=pair.dtype_base, dtype_tuned=pair.dtype_tuned,
        numel=_elements(pair, shape_t if shape_t is not None else shape_b), base_index=pair.base_index,
        compared="none")
    rec.tied = pair.tied
    rec.paired_by = pair.paired_by
    if pair.tied:
        rec.note = f"tied: the tuned model has no `{pair.tuned_name}`; it shares `{pair.base_name}`"
    if pair.kind in ("added", "removed"):
        f = getattr(pair, "folded", None)
        if f is not None:
            rows = f.get("rows")
            rec.note = (f"folded by the exporter into `{f.get('into')}`" +
                        (f", which holds rows {rows[0]}-{rows[1] - 1} bitwise" if rows else
                         ", whose values are not rows of the base's" if f.get("known") else " (may be)"))
        return rec
    base = bases[pair.base_index]
    if pre is not None and pair.kind == "paired" and _UNCHANGED_OK.get((pair.dtype_base, pair.dtype_tuned)) and \
            not pre[0][_N_BEYOND] and not pair.transposed and pair.lora_bias is None and pair.ia3 is None and \
            pair.ia3_bias is None and classify(pre[2], pair.dtype_base, pair.dtype_tuned, options.thresholds) == "unchanged":
        # a small pair its batch found bitwise unchanged (most tensors of a 100,000-tensor model): what the path
        # below gives such a pair (no cast, floor or rank test is taken of an unchanged one), without its tests
        stats, rec.rounding_floor, fields = pre
        on_window(int(stats[0]))
        _fill(rec, fields)
        rec.numel_compared = int(stats[0])
        rec.compared = "float"
        rec.status = "unchanged"
        release = getattr(base, "release", None)
        if release is not None:
            release()
        return rec
    if pair.kind == "inherited":
        # the adapter leaves it alone; its base norm still counts in the model-level relative
        # change, so an adapter reads the same as the merged model it stands for
        rec.status = "unchanged"
        rec.note = "not in the adapter: the base tensor is used as it is"
        if DTYPES[pair.dtype_base].decodable:
            floors = FloorAccumulator()
            stats = _stream_stats(backend, base, pair.base_name, pair.dtype_base, base, pair.base_name,
                                  pair.dtype_base, None, on_window, floors)
            rec.rounding_floor = floors.result()
            _fill(rec, reference.finalize(stats))
            rec.numel_compared = int(stats[0])
            rec.compared = "float"
        return rec
    thr = options.thresholds

    if getattr(pair, "lora_bias", None) is not None and pair.kind == "paired":
        return _compute_lora_bias(pair, base, bases, tuned, options, backend, classify, on_window)
    if (pair.ia3 is not None or pair.ia3_bias is not None) and pair.kind == "paired":
        return _compute_ia3(pair, base, bases, tuned, options, backend, classify, on_window)
    if pair.kind == "lora" and getattr(pair.lora, "kind", "LORA") in ("OFT", "BOFT"):
        return _compute_oft(pair, base, bases, tuned, options, backend, classify, on_window)
    if pair.kind == "lora":
        merged = _merged_base_layer(pair, base, tuned)
        if merged is not None:
            return _compute_merged(pair, merged, bases, tuned, options, backend, classify, on_window)
        return _compute_lora(rec, pair, base, tuned, options)

    if pair.kind == "mismatch":
        rec.status = "resized"
        rec.note = (f"shape {shape_b} in the base, {shape_t} in the tuned model; "
                    "not a vocabulary resize, so not compared element by element")
        return rec

    tuned_name = pair.tuned_source if getattr(pair, "tuned_source", None) else pair.tuned_name
    stop = None
    if pair.kind == "resized":
        row = int(np.prod(shape_t[1:], dtype=np.int64)) if len(shape_t) > 1 else 1
        stop = int(pair.overlap_rows) * row
    opaque = not (DTYPES[pair.dtype_base].decodable and DTYPES[pair.dtype_tuned].decodable)
    if opaque and pair.dtype_base != pair.dtype_tuned:
        rec.note = (f"dtypes {pair.dtype_base} and {pair.dtype_tuned} cannot be decoded to floats "
                    "and differ, so the values were not compared")
        rec.status = "changed"
        return rec
    tuned_t = sink = dsink = fpass = noise = None
    win = window_elements(pair.dtype_base, pair.dtype_tuned)
    if pair.base_name in (getattr(base, "quant", None) or ()) or tuned_name in (getattr(tuned, "quant", None) or ()) \
            or _quantized(base, pair.base_name) or _quantized(tuned, tuned_name):
        # a quantized side comes out as float32 values and floors, a block of rows dequantized with its
        # temporaries: an eighth of the window (2M elements), small beside the Gram matrix at 70B widths. A GGUF
        # tensor too (its scheme on the tensor, no Source): two GGUF sides' 16M-element windows, each side's
        # current and next held, took a 70B-width pair of Q8_0 builds to 1,086 MB
        win //= 8
    floors = FloorAccumulator() if pre is None else None
    if pair.transposed:
        # content pairing found the tuned matrix stored transposed (ONNX MatMul initializers):
        # compare its transpose, read whole (bounded by the tensor, as the rank pass is)
        raw = np.asarray(tuned.read(tuned_name))
        # the row length spelled out: reshape(0, -1) of an empty matrix ([0, n] against [n, 0]) is ambiguous
        tuned_t = np.ascontiguousarray(raw.reshape(shape_t[0], math.prod(shape_t[1:])).T).reshape(shape_b)
        stats = _array_stats(backend, base, pair.base_name, pair.dtype_base, tuned_t, pair.dtype_tuned, on_window)
        rec.note = "paired by content: the tuned matrix is stored transposed; its transpose is compared"
    else:
        if not opaque and pre is None and not fused_experts(pair):   # a small pair never streams its Gram;
            sink = streamed_rank_sink(pair, options, backend.name, win)   # a resized one: its shared rows
            dsink = device_rank_sink(pair, options, backend)
        if pre is not None and not opaque:
            stats, rec.rounding_floor, fields = pre
            on_window(int(stats[0]))
        else:
            # the sums of the quantization noise the streamed rank counts above, taken with the floor test when a
            # Gram matrix is streamed (``_quant_var``), and the floor test of a quantized pair in this pass's windows
            noise = {} if options.rank and sink is not None else None
            if not opaque and shape_t is not None and backend.name != "cuda":
                fpass = floor_pass(base, pair.base_name, pair.dtype_base, tuned, tuned_name, pair.dtype_tuned,
                                   tuple(shape_t), win, stop, noise)
                if fpass is not None and sink is not None and GATE_GRAM:
                    sink.gate = fpass.wants_rank    # a change within its floor is not ranked: no Gram summed for it
            stats = _stream_stats(backend, base, pair.base_name, pair.dtype_base, tuned, tuned_name,
                                  pair.dtype_tuned, stop, on_window, floors, sink, dsink, win, fpass)
            if sink is not None:
                sink.gram.end_of_stream()
            if not opaque:
                rec.rounding_floor = floors.result()
    if pre is None or opaque:
        fields = reference.finalize(stats)
    _fill(rec, fields)
    rec.numel_compared = int(stats[0])
    rec.compared = "bytes" if opaque else "float"
    if opaque:
        rec.note = f"dtype {pair.dtype_tuned} has no float decoding: compared byte for byte"
    # a transposed pair is tested in the base's orientation (its values and floor read whole, transposed)
    t_side, t_shape = (tuned, shape_t) if tuned_t is None else (TransposedSide(tuned, tuned_name, shape_b, tuned_t),
                                                                shape_b)
    if not opaque and stats[_N_BEYOND] > 0 and (
            pair.dtype_base != pair.dtype_tuned or _offset_stored(base, pair.base_name, tuned, tuned_name)
            # the same dtype rounded through a narrower one: tried on vectors (cheap) and beside quantized
            # weights (a quantizer that loaded the model as bf16 writes its float tensors back so)
            or (shape_t is not None and len(shape_t) <= 1) or bool(getattr(base, "quant", None))
            or bool(getattr(tuned, "quant", None))
            # a matrix too, when it moved no more than such a rounding can (a float32 model loaded as bf16 and saved
            # back as float32 read "DERIVED: a fine-tune", its vectors alone found rounded): the probe of cast_test
            # rejects a fine-tune at once, and above 2^-8 relative no rounding through bf16 or fp16 explains it
            or (pair.dtype_base == pair.dtype_tuned and 0 < (fields.get("rel_change") or 0.0) <= SAME_DTYPE_CAST_REL)
            # ... or whose values are small enough that float16's subnormals round them by more than 2^-8 of themselves
            or (pair.dtype_base == pair.dtype_tuned and rec.numel_compared
                and (fields.get("norm_base") or 0.0) < SMALL_RMS * math.sqrt(rec.numel_compared))):
        # beyond half an ulp of a cast: is it still exactly a cast (through fp16, past the range)?
        cast = cast_test(base, pair.base_name, pair.dtype_base, t_side, tuned_name, pair.dtype_tuned,
                         rec.numel_compared, stop, win, thr.rounding_frac) or \
            clamp_test(base, pair.base_name, pair.dtype_base, t_side, tuned_name, pair.dtype_tuned,
                       rec.numel_compared, stop, win, thr.rounding_frac) or \
            twin_test(base, pair.base_name, pair.dtype_base, t_side, tuned_name, pair.dtype_tuned,
                      rec.numel_compared, stop, win, thr.rounding_frac)
        if cast is not None:
            # set only when found: a `cast = None` of its own is a 30th attribute, which ends the key
            # sharing of the record's __dict__ (1.2 KB more each) and sends its JSON row and its
            # TensorRow view down their slow paths (every changed vector of a 100,000-tensor model)
            rec.cast = cast
            fields = {**fields, "cast": cast}
    relabel = None
    if (rec.cast is None and not opaque and tuned_t is None and pair.dtype_base != pair.dtype_tuned
            and DTYPES[pair.dtype_base].bits == DTYPES[pair.dtype_tuned].bits and stats[_N_BEYOND] > 0
            and not getattr(base, "quant", None) and not getattr(tuned, "quant", None)
            and _same_bytes(base, pair.base_name, tuned, tuned_name, stop, win)):
        # no cast gives these values, but the bytes are the base's: a header that names the wrong dtype (bf16
        # bits labelled F16 read as a model "far from the base", and may read unrelated)
        relabel = (f"{RELABEL_NOTE}: its bytes are the base's {pair.dtype_base} values, labelled "
                   f"{pair.dtype_tuned}; read as labelled they are other numbers (a header written with the wrong "
                   "dtype, not training), so they are not evidence of relatedness")
    if pair.kind == "resized":
        rec.status = "resized"
        rec.note = (f"{'router of' if is_router(pair.tuned_name) else 'vocabulary resized from'} {shape_b[0]} "
                    f"{'experts, now' if is_router(pair.tuned_name) else 'to'} {shape_t[0]} rows; "
                    f"the {pair.overlap_rows} shared rows are compared")
    else:
        rec.status = classify(fields, pair.dtype_base, pair.dtype_tuned, thr)
    # a resized tensor whose shared rows changed beyond rounding (the judge's rule, as for any pair):
    # those rows (overlap_rows x the rest, what the stats pass compared) are ranked as a changed matrix
    shared = (pair.kind == "resized" and not opaque and tuned_t is None and shape_t is not None
              and len(shape_t) >= 2 and classify(fields, pair.dtype_base, pair.dtype_tuned, thr) == "changed")
    if rec.cast is not None:
        rec.note = _cast_note(rec.cast) + (f"; {rec.note}" if rec.note else "")
    above = None
    if rec.status in ("changed", "rounding") and not opaque and shape_t is not None and len(shape_t) == 1 \
            and tuned_t is None and pair.base_name == tuned_name:
        rec.quant = _awq_folded(base, tuned, tuned_name)
        if rec.quant is not None:
            rec.status = "quantized"
            rec.note = ("AWQ divided this tensor by the activation scales it multiplied the next linears' inputs "
                        "by; the floor test of those linears uses the same scales")
    if not opaque and shape_t is not None and rec.status != "unchanged" and rec.quant is None:
        # taken in the stats pass's windows when it could follow them (``fpass``), else in a pass of its own
        rec.quant = fpass.result() if fpass is not None else None
        if rec.quant is None:
            rec.quant = floor_test(base, pair.base_name, pair.dtype_base, t_side, tuned_name, pair.dtype_tuned,
                                   tuple(t_shape), win, stop, noise)
        if rec.quant is not None and rec.quant.get("within") and rec.status in ("changed", "rounding"):
            rec.status = "quantized"
        elif rec.quant is not None and rec.quant.get("within") is None and rec.status in ("changed", "rounding"):
            # untested: a format with no floor (GGUF TQ/IQ), or two quantizations one of which compensates
            rec.status = "quantized"
        elif rec.quant is not None and rec.quant.get("within") is None and shared:
            # a resized tensor keeps its status: its shared rows' change is untested against the quantization
            rec.note = ("the shared rows differ by more than a floor that cannot be tested here (see quant): the rank "
                        "of their change is not computed" + (f"; {rec.note}" if rec.note else ""))
            above = False
        elif rec.quant is not None and rec.quant.get("awq_scales") and (rec.status == "changed" or shared):
            # the base had to be scaled by fitted AWQ scales to be compared: the raw delta is mostly that
            # scaling (full rank), so its rank says nothing of a fine-tune
            rec.note = ("AWQ's activation scales fit back for the floor test; the rank of the change is not "
                        "computed" + (f"; {rec.note}" if rec.note else ""))
            above = False
        elif rec.quant is not None and rec.quant.get("near_grid") is not None and (rec.status == "changed" or shared):
            # the float side is the base's quantized values, moved: the difference is the change itself,
            # with no quantization noise in it (the rank's floor is the stored dtypes' rounding)
            rec.note = ("most of the elements that moved lie within a quarter of the base's quantization floor of "
                        "its quantized values (quant.near_grid; a quantization of float weights leaves about a quarter "
                        "that near): the quantized values, changed; the rank is of the difference itself"
                        + (f"; {rec.note}" if rec.note else ""))
            if rec.quant.get("side") == "base" and pair.dtype_tuned in ("F16", "F32", "F64"):
                above = "rounding"                 # the copy may have been dequantized in bf16: that noise too
        elif rec.quant is not None and rec.quant.get("test") not in (None, "none") and (rec.status == "changed" or shared):
            above = True                           # rank the whole change above the quantization noise
    elif fpass is not None:
        fpass.close()                              # no floor test wanted: what the stats pass fed it is dropped

    ranked = rec.status == "changed" or shared     # a change whose rank is taken, unless one of these says no
    nd = rec.norm_delta
    release = getattr(base, "release", None)
    if release is not None:     # a side measured again: its last block (or its source) not kept through the rank
        release()               # solve (an 8,192-wide Gram's 537 MB beside it at 70B widths)
    nf_b, nf_t = int(fields.get("nonfinite_base", 0) or 0), int(fields.get("nonfinite_tuned", 0) or 0)
    try:
        range_note = _f32_range(rec, pair)
    except BadValues as exc:
        ck, nm = (tuned, tuned_name) if exc.side == "tuned" else (base, pair.base_name)
        info = ck.tensors.get(nm)
        raise CheckpointError(getattr(info, "path", None) or ck.path, exc.problem) from None
    if relabel is not None:
        # what the mislabelled values read as has no rank worth reporting: the bytes are the base's
        range_note = relabel + ("; the rank of the change is not computed" if options.rank and ranked else "")
        if not (options.rank and ranked):
            rec.note = range_note + (f"; {rec.note}" if rec.note else "")
    if options.rank and ranked and range_note:
        # float64 weights past float32's range, or changes below its normals (valid doubles no model holds):
        # the rank pass works in float32 where its error analysis allows, so their spectrum would be
        # infinities read as "no rank", or zeros read as "rounding only"
        rec.note = range_note + (f"; {rec.note}" if rec.note else "")
    elif options.rank and ranked and nf_b != nf_t:
        # values that became NaN or Inf (or stopped being): the change has no spectrum to count, and
        # the rank of its finite part would call a broken matrix low-rank (rank 0 when that is all)
        rec.note = (f"{nf_t} non-finite values in the tuned tensor, {nf_b} in the base: the change has no "
                    "rank" + (f"; {rec.note}" if rec.note else ""))
    elif sink is not None and ranked and above is not False and (
            sink.gram.active or sink.catch_up(base, pair.base_name, tuned, tuned_name)):
        # (above False: a quantized pair whose change has no rank worth taking, as its note says)
        extra_var = None
        if above:
            # a quantized side: the Gram matrix the stats pass summed, with the floor raised by the modelled
            # quantization noise, summed per row and column in one more pass over the floors in windows of at most
            # 2M elements (a GGUF's too), beside the Gram's 537 MB at 70B widths; no matrix read whole (both sides
            # and the noise held whole took an 8192 x 28672 FP8 or GGUF pair to 7.7 GB)
            extra_var = _quant_var(above, base, pair, t_side, tuned_name, t_shape, min(win, _VAR_WINDOW), stop,
                                   noise)
            if extra_var is not None and above is True:
                rec.note = _quant_rank_note(rec) + (f"; {rec.note}" if rec.note else "")
        args = (float(nd) ** 2 if nd is not None and math.isfinite(nd) else float("nan"),
                thr.noise_floor_factor, options.rank_k)
        kw = {"extra_var": extra_var} if extra_var is not None else {}
        if solver is not None and min(sink.gram.shape2) <= OVERLAP_MAX:
            gram = sink.gram
            rec.rank = Deferred(solver.submit(lambda: gram.finish(*args, **kw)))   # finish frees the Gram
            return rec
        rec.rank = sink.gram.finish(*args, **kw)
    elif options.rank and ranked and fused_experts(pair):
        e, m, n = (int(x) for x in shape_t)
        rec.note = (f"{e} experts of {m} x {n} fused in one tensor: the rank of each expert's change is not "
                    "computed (the tensor read as one matrix would cap every rank at the number of experts); "
                    "form and delta_params count it whole" + (f"; {rec.note}" if rec.note else ""))
    elif dsink is not None and ranked and above is None:
        # the delta the stats pass kept on the device (--device cuda): not read a second time
        solve = _device_solve(dsink, float(nd) ** 2 if nd is not None and math.isfinite(nd) else float("nan"),
                              options, backend)
        if solver is not None and dsink.fdtype == dsink.torch.float64:
            # solved on the solver's thread (its own CUDA stream) while the next matrix streams; compute_some
            # resolves it and refines a wide bracket there, as for the CPU's streamed Gram matrices
            rec.rank = Deferred(solver.submit(solve))
            return rec
        rec.rank = solve()
    elif (options.rank and ranked and not opaque and len(shape_t) >= 2 and above is not False
            and min(shape_t[0] if stop is None else int(pair.overlap_rows), rec.numel // max(shape_t[0], 1)) >= 2):
        # a resized tensor: its shared rows only (the first `stop` elements of each side)
        raw_b, dt_b, dt_t = _read_part(base, pair.base_name, stop), pair.dtype_base, pair.dtype_tuned
        raw_t = _read_part(tuned, tuned_name, stop) if tuned_t is None else tuned_t
        extra_var = _quant_var(above, base, pair, t_side, tuned_name, t_shape, win, stop) if above else None
        if extra_var is not None and above is True:
            rec.note = _quant_rank_note(rec) + (f"; {rec.note}" if rec.note else "")
        rec.rank = _analyze(raw_b, raw_t, dt_b, dt_t, _ranked_shape(pair, shape_t if tuned_t is None else shape_b),
                            nd, options, backend, extra_var=extra_var)
    if sink is not None:
        sink.gram.close()
    if dsink is not None:
        dsink.close()
    refine_rank(rec, pair, bases, tuned, options, backend)
    return rec


def _quantized(ck, name: str) -> bool:
    """Whether ``name`` is stored quantized in ``ck`` (a scheme on its tensor entry: GGUF's, and every reader's
    quantized tensors)."""
    info = getattr(ck, "tensors", {}).get(name)
    return getattr(info, "quant", None) is not None


#: a quantized pair's streamed Gram matrix waits for its floor test's windows to say that its change is likely to be
#: ranked (``rank_stream.RankSink.gate``); off (tests), it starts with the first window beyond rounding, as any pair's
GATE_GRAM = True
#: elements per window of the pass that sums a quantized pair's noise beside its Gram matrix
_VAR_WINDOW = 1 << 21
#: the note of a quantized pair's change ranked above the modelled quantization noise
QUANT_RANK_NOTE = ("rank of the whole change; numerical rank counted above the quantization noise (modelled as "
                   "uniform within each element's floor)")
#: ... and for a side quantized with error compensation (the first-group test: GPTQ, GPTQModifier)
COMPENSATED_NOTE = ("GPTQ's error compensation makes its noise correlated across columns and larger than that model: "
                    "the count may include the compensation's own directions (docs/rank.md)")


def _quant_rank_note(rec: TensorRecord) -> str:
    """The note of a change ranked above its quantization noise."""
    if (rec.quant or {}).get("test") == "first-group":
        return f"{QUANT_RANK_NOTE}; {COMPENSATED_NOTE}"
    return QUANT_RANK_NOTE


def _quant_var(above, base: Checkpoint, pair: Pair, t_side, tuned_name: str, t_shape, win: int,
               stop: int | None, noise: dict | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The noise a quantized pair's rank is counted above, beyond the stored dtypes' rounding, summed per row
    and column: the rounding of a bf16 dequantization (``above`` "rounding": a near-grid change stored wider);
    else the whole change's quantization noise (the elementwise part above the floor is not low rank even when
    the change is, and float32 rounding is far below that noise); None when no side gives a floor."""
    if above == "rounding":
        from .quant_floor import dequant_rounding_var

        return dequant_rounding_var(base, pair.base_name, win, stop)
    if noise and "sums" in noise and noise.get("window") == win:
        return noise["sums"]            # summed in the floor test's pass, in these windows (``floor_test(noise=)``)
    from .quant_floor import quant_noise_var

    return quant_noise_var(base, pair.base_name, pair.dtype_base, t_side, tuned_name, pair.dtype_tuned,
                           tuple(t_shape), win, stop)


def _device_solve(dsink, norm_delta_sq: float, options: CompareOptions, backend: Backend) -> Callable[[], RankRecord]:
    """The rank of a delta kept on the device, as a call that may run on another thread: there it
    runs on a CUDA stream of its own, after everything the current stream has queued (the delta's
    last windows), and frees the delta when done."""
    from .rank import analyze_device_delta

    torch = dsink.torch
    cuda = dsink.dev.type == "cuda"
    after = None
    if cuda:                      # the point of the current stream the delta is complete at
        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(dsink.dev))

    def solve() -> RankRecord:
        try:
            if not cuda:
                return _solve(dsink)
            side = torch.cuda.Stream(device=dsink.dev)
            side.wait_event(after)
            with torch.cuda.stream(side):
                return _solve(dsink)
        finally:
            dsink.close()

    def _solve(dd) -> RankRecord:
        return analyze_device_delta(dd, norm_delta_sq, k=options.rank_k, seed=options.seed,
                                    exact_max=options.exact_svd_max, backend=backend,
                                    noise_factor=options.thresholds.noise_floor_factor)
    return solve


#: a changed matrix's delta is kept on the device during the stats pass (``device_rank_sink``) when
#: it and the rank's work space (about twice its size, the Gram matrix and the solver's) fit in this
#: share of the device memory free at the time
DEVICE_KEEP_SHARE = 0.5


def device_rank_sink(pair: Pair, options: CompareOptions, backend: Backend):
    """A ``kernels.cuda.DeviceDelta`` when this pair's rank is taken of a delta the stats pass keeps
    on the device: the torch backend, rank on, no ``--subspace``, a float matrix of at least 2 x 2
    (a resized one's shared rows, where the stats pass stops) whose float64 (else float32) delta and work space fit ``DEVICE_KEEP_SHARE`` of the free device
    memory; else None (``analyze_delta`` then reads the matrix again)."""
    from ..kernels.cuda import DeviceDelta
    from .rank import _variance_table

    if (not options.rank or options.subspace or not backend.torch or pair.kind not in ("paired", "resized")
            or pair.transposed):
        return None
    mn = float_matrix(pair)
    if mn is None:
        return None
    m, n = mn
    import torch

    dev = torch.device(backend.device or "cuda")
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else DEVICE_KEEP_CPU_BYTES
    r = min(m, n)
    for itemsize, f64 in ((8, True), (4, False)):
        need = 3 * m * n * itemsize + 3 * r * r * 8
        if need <= DEVICE_KEEP_SHARE * free:
            tables = [_variance_table(dt) if DTYPES[dt].kind == "float" else None
                      for dt in (pair.dtype_base, pair.dtype_tuned)]
            return DeviceDelta((m, n), pair.dtype_base, pair.dtype_tuned, tables, dev, float64=f64)
    return None


#: the "free memory" of the torch backend on the cpu device (the tests'): deltas up to a sixth of it kept
DEVICE_KEEP_CPU_BYTES = 1 << 30


def _same_bytes(base: Checkpoint, bname: str, tuned, tname: str, stop: int | None, window: int) -> bool:
    """Whether two tensors of one storage width hold the same bytes (up to ``stop`` elements), window by window;
    False at the first window that differs, so a real change costs one window."""
    for wb, wt in zip(base.windows(bname, window, 0, stop), tuned.windows(tname, window, 0, stop)):
        a, b = np.ascontiguousarray(wb).reshape(-1).view(np.uint8), np.ascontiguousarray(wt).reshape(-1).view(np.uint8)
        if a.size != b.size or not np.array_equal(a, b):
            return False
    return True


#: the largest finite float32
F32_MAX = float(np.finfo(np.float32).max)


#: a norm below this has a sum of squares under float64's smallest normal (2^-1022): subnormal or zero
SQ_NORMAL_MIN = 2.0 ** -511

#: a changed float64 tensor is not ranked when its delta's root mean square is below the first and its
#: values' below the second: the rank pass's float32 copy of the delta holds its smaller elements as subnormals
#: or zeros (float32's normals start at 2^-126), each off by up to 2^-150 where its error bound assumes a
#: relative rounding. Above the first, all of them together are under 2^-40 of the delta's norm (2^-16 of the
#: float32 rounding the bound counts); above the second, under 2^-16 of the values' own rounding noise (about
#: 2^-54 of a float64 value), the floor the rank is counted above
F64_RANK_MIN_RMS = (2.0 ** -110, 2.0 ** -80)


def _f32_range(rec: TensorRecord, pair: Pair) -> str | None:
    """Why a changed pair's change has no rank (values the rank pass's float32 copy of the delta cannot hold:
    past float32's range, differences past it too, or float64 values and a delta both too small for its
    normals), else None.

    Raises BadValues when no figure of the change can be formed in float64 at all: values of 1e154 or more
    (a norm overflowed, with the tensor changed; a bitwise unchanged one needs no measure), or a tensor whose
    values and differences are so small that their squares underflow (both norms below 2^-450 and the delta's
    below 2^-511 while its largest difference is not zero: every figure would read 0, a change of the whole
    tensor reported as rounding). A delta that underflows beside values of a normal size is kept: its
    relative change is under 2^-61, below the rounding of the tensor's own norm."""
    if rec.compared != "float":
        return None
    nd, big = rec.norm_delta, rec.max_abs_delta
    wide = big is not None and math.isfinite(big) and big > F32_MAX
    if "F64" not in (pair.dtype_base, pair.dtype_tuned):
        # float32 or bf16 values near their largest (3.4e38) whose difference is past it: the float32 copy of the
        # delta would hold infinities (its Gram, "no rank"; read as rank 0, "no change above the noise floor")
        return (f"differences up to {big:.3g}, beyond float32's range (3.4e38): the rank of the change is not "
                "computed") if wide else None
    for side, x in (("base", rec.norm_base), ("tuned", rec.norm_tuned)):
        # NaN and infinity never enter the sums (kernels.reference): an infinite norm is an overflow,
        # with or without non-finite values beside it
        if x is not None and not math.isfinite(x) and rec.status != "unchanged":
            raise BadValues(side, f"tensor `{escape_name(rec.name if side == 'tuned' else str(rec.base_name))}` "
                                  "holds values too large to measure: the sum of their squares overflows float64 "
                                  "(values of 1e154 or more)")
    top = max((x for x in (rec.norm_base, rec.norm_tuned) if x is not None), default=0.0)
    if (rec.status != "unchanged" and nd is not None and nd < SQ_NORMAL_MIN and top < 2.0 ** -450
            and big is not None and math.isfinite(big) and big > 0):
        raise BadValues("tuned", f"tensor `{escape_name(rec.name)}` holds values too small to measure: the sums "
                                 "of the squares of its values and of its changes underflow float64 (values near "
                                 "1e-136 or less)")
    if top > F32_MAX or wide:
        return (f"values up to {max(top, big or 0.0):.3g} in magnitude, beyond float32's range (3.4e38): the rank of "
                "the change is not computed")
    n = math.sqrt(rec.numel_compared or rec.numel or 1)
    if nd is not None and nd > 0 and nd / n < F64_RANK_MIN_RMS[0] and top / n < F64_RANK_MIN_RMS[1]:
        return (f"values of root mean square {top / n:.3g} and a change of {nd / n:.3g}, too small for float32 to "
                "hold to their precision (its normals start at 1.2e-38): the rank of the change is not computed")
    return None


class BadValues(ValueError):
    """A tensor whose finite values are too large for any measure: ``side`` (base, tuned), the problem."""

    def __init__(self, side: str, problem: str):
        super().__init__(problem)
        self.side, self.problem = side, problem


def _awq_folded(base, tuned, name: str) -> dict | None:
    """The record's ``quant`` when norm or bias ``name`` holds AWQ's folded scales (weightdiff.measure.awq_fold):
    the side whose linears after it are AWQ-quantized, and the scales' range; else None."""
    if _awq_norm_both(base, tuned, name):
        # both sides AWQ with searched scales: each file folded its own scales into this norm, so the two
        # differ by the ratio of two searches, which no floor bounds (untested, as two compensated quantizations)
        return {"side": "both", "format": "awq", "scheme": "activation scales folded in (AWQ's scale search)",
                "test": "awq-fold", "within": None,
                "note": "both sides fold their own AWQ scales into this norm: their difference is not tested"}
    for side, plain, quant in (("tuned", base, tuned), ("base", tuned, base)):
        if not getattr(quant, "quant", None):
            continue
        s = norm_fold(plain, quant, name)
        if s is None:
            s = bias_fold(plain, quant, name, FOLD_REL)
        if s is not None:
            return {"side": side, "format": "awq", "scheme": "activation scales folded in (AWQ's scale search)",
                    "test": "awq-fold", "within": True, "elements": int(s.size), "beyond": 0,
                    "scale_min": float(s.min()), "scale_max": float(s.max())}
    return None


def _offset_stored(base, bname: str, tuned, tname: str) -> bool:
    """Whether a side stores this tensor as 1 + w (a GGUF Gemma norm): its values are a cast of the
    other's even in the same dtype (``recast.offset_test``)."""
    return any(getattr(ck, "offset_storage", lambda n: None)(n) for ck, n in ((base, bname), (tuned, tname)))


def _cast_note(cast: dict) -> str:
    """The record's note when a cast chain explains what the half-ulp test did not."""
    if cast.get("rounded"):
        parts = ["every value and the base's are two roundings of one original, " + twin_route(cast)]
    else:
        parts = [f"every value is a cast {' -> '.join(cast['chain'])} of the base"]
    if cast.get("through") and not cast.get("rounded"):
        parts.append("rounded twice, beyond half an ulp of a direct cast in places")
    n, s = int(cast.get("overflow") or 0), int(cast.get("saturated") or 0)
    if n and cast.get("rounded"):
        parts.append(f"{n} value{'s' if n != 1 else ''} infinite on one side only, past that side's range")
    elif n:
        parts.append(f"{n} base value{'s' if n != 1 else ''} beyond the {cast['chain'][-1]} range became infinite")
    if s:
        parts.append(f"{s} beyond the range stored as the largest {cast['chain'][-1]} value")
    c = int(cast.get("clamped") or 0)
    if c and cast.get("clamp"):
        lo, hi = cast["clamp"]
        parts.append(f"{c} value{'s' if c != 1 else ''} first clamped to magnitudes in [{lo:g}, {hi:g}] "
                     "(ONNX Runtime's float16 conversion)")
    elif c:
        parts.append(f"{c} value{'s' if c != 1 else ''} first clamped to magnitudes in [1e-7, 1e4] "
                     "(onnxconverter-common's float16 conversion)")
    u = int(cast.get("unexplained") or 0)
    if u:
        parts.append(f"{u} element{'s' if u != 1 else ''} unexplained (within rounding_frac)")
    return ", ".join(parts)


def fused_experts(pair: Pair) -> bool:
    """A mixture-of-experts tensor that stores its experts' matrices side by side, ``[experts, m,
    n]`` (gpt-oss, Llama 4: ``mlp.experts.gate_up_proj``): read as one ``experts x (m n)`` matrix
    its spectrum says nothing about any expert's change (every rank is capped at the number of
    experts), so its rank is not computed."""
    shape = pair.shape_tuned if pair.shape_tuned is not None else pair.shape_base
    name = (pair.tuned_name or pair.base_name or "").lower()
    # llama.cpp stacks experts as `blk.N.ffn_{gate,up,down}_exps` (a GGUF of an architecture it maps
    # no names for keeps them): a dense change of one expert read "low-rank: at most rank 1"
    return shape is not None and len(shape) == 3 and int(shape[0]) >= 2 and ("expert" in name or "_exps" in name)


def _ranked_shape(pair: Pair, shape) -> list:
    """The shape whose rank is taken: a resized tensor's shared rows (``overlap_rows`` x the rest), else ``shape``."""
    return [int(pair.overlap_rows), *shape[1:]] if pair.kind == "resized" else list(shape)


def _read_part(ck: Checkpoint, name: str, stop: int | None) -> np.ndarray:
    """Tensor ``name`` whole (``stop`` None), or its first ``stop`` elements, flat (a resized tensor's
    shared rows: read window by window up to there, never the rest of the table)."""
    if stop is None:
        return ck.read(name)
    parts = [np.asarray(w).reshape(-1) for w in ck.windows(name, WINDOW_ELEMENTS, 0, stop)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()


def _analyze(raw_b, raw_t, dt_b: str, dt_t: str, shape, norm_delta, options: CompareOptions, backend: Backend,
             **kw) -> RankRecord:
    """``rank.analyze_delta`` of one whole pair with the options' rank settings (``kw``: ``direct``,
    ``extra_var``); ``norm_delta`` from the stats pass (None or non-finite: recomputed there)."""
    from .rank import analyze_delta

    nd_sq = float(norm_delta) ** 2 if norm_delta is not None and math.isfinite(norm_delta) else float("nan")
    return analyze_delta(raw_b, raw_t, dt_b, dt_t, tuple(shape), nd_sq,
                         k=options.rank_k, seed=options.seed, exact_max=options.exact_svd_max, backend=backend,
                         noise_factor=options.thresholds.noise_floor_factor, subspace=options.subspace, **kw)


#: a changed matrix of at most this many elements whose numerical rank the Gram matrix left
#: bracketed wide is read again and its spectrum taken by an SVD of the delta itself (float64
#: LAPACK): the Gram matrix squares the singular values, so its eigenvalues' error bound, about
#: n u s_1^2, can exceed the squared noise floor of a float32 or float16 delta whose top singular
#: value stands far above it (an F32 rank-1 fine-tune read "rank 1-1,200", hence "dense"); the
#: SVD's error is about u s_1. 1500 x 1200 in ~1 s, 4M elements (1024 x 4096) in a few seconds.
REFINE_MAX_ELEMENTS = 1 << 22


def _wide_bracket(rank) -> bool:
    b = rank.bounds.get("numerical_rank") if isinstance(rank, RankRecord) and rank.method in ("gram", "inertia") \
        else None
    return b is not None and b[1] - b[0] > max(1, 0.1 * b[1])


def refine_rank(rec: TensorRecord, pair: Pair, bases: Sequence[Checkpoint], tuned: Checkpoint,
                options: CompareOptions, backend: Backend) -> None:
    """Replace a Gram-matrix rank whose ``numerical_rank`` bracket is wide (more than 10% of its
    upper end) by the full spectrum of an SVD of the delta, for a plain paired matrix (or a resized one's
    shared rows) of at most ``REFINE_MAX_ELEMENTS``; larger ones keep their bracket (read once more: the one exception to one
    read per byte, for small matrices only)."""
    if (not _wide_bracket(rec.rank) or pair.kind not in ("paired", "resized")
            or (rec.numel_compared if pair.kind == "resized" else rec.numel) > REFINE_MAX_ELEMENTS
            or pair.transposed or rec.quant is not None):
        return
    lo, hi = rec.rank.bounds["numerical_rank"]
    tuned_name = pair.tuned_source if getattr(pair, "tuned_source", None) else pair.tuned_name
    shape = _ranked_shape(pair, rec.shape)
    stop = math.prod(shape) if pair.kind == "resized" else None     # a resized tensor: its shared rows
    rank = _analyze(_read_part(bases[pair.base_index], pair.base_name, stop), _read_part(tuned, tuned_name, stop),
                    pair.dtype_base, pair.dtype_tuned, shape, rec.norm_delta, options, backend, direct=True)
    rank.extra["note_refined"] = (f"the Gram matrix could only bracket numerical_rank in [{lo}, {hi}] (its error "
                                  "bound exceeds the squared noise floor): the spectrum is from an SVD of the delta")
    rec.rank = rank


def _compute_lora(rec: TensorRecord, pair: Pair, base: Checkpoint, tuned: Checkpoint,
                  options: CompareOptions) -> TensorRecord:
    from ..io.peft_adapter import check_factor_values
    from .rank import analyze_factors

    lf = pair.lora
    dt_a = tuned.tensors[lf.a_name].dtype
    rows = None
    if lf.kind == "TOKENS":     # trainable tokens: the trained rows less the base's, in those rows only
        rows = np.asarray(lf.tokens, dtype=np.int64)
        a64 = _token_rows(lf, tuned, pair.dtype_base) - decode(
            np.asarray(base.read_rows(pair.base_name, rows)), pair.dtype_base).reshape(rows.size, -1)
        b64 = magnitude = dt_m = None
        values = {}             # (the rows' values were checked with the plan)
        dt_a = pair.dtype_base
    elif lf.kind == "HRA":      # Householder reflections: W (H - I) = B @ A, B from one pass over W's rows
        a64, b64 = _hra_pair(lf, pair, base, tuned)
        magnitude = dt_m = None
        values = {lf.parts["hra_u"]: decode(np.asarray(tuned.read(lf.parts["hra_u"])), dt_a).reshape(
            tuned.tensors[lf.parts["hra_u"]].shape)}
    elif getattr(lf, "parts", None):          # LoHa / LoKr / VeRA: their tensors, then the pair they make
        from ..io.peft_adapter import factor_pair

        decoded = _part_values(lf, tuned)
        a64, b64 = factor_pair(lf, decoded)
        magnitude = dt_m = None
        values = dict(zip(lf.parts.values(), decoded.values()))
    else:
        # PEFT embedding adapters store A as [r, vocab] and B as [dim, r]; the delta is (B @ A).T
        a64, b64, magnitude, dt_m = _factors(pair, tuned)
        values = {lf.a_name: a64, lf.b_name: b64}
    if magnitude is not None:
        values[lf.magnitude_name] = magnitude
    if rows is None:
        check_factor_values(lf, values, tuned.files[0], (a64, b64))   # before LAPACK sees them
    shape = tuple(pair.shape_base)
    base_raw = windows = None
    if getattr(lf, "transposed", False):
        # GPT-2 Conv1D stores the weight [in, out]: measure its transpose [out, in] = W.T + scale B @ A;
        # every statistic and the spectrum are the same for a matrix and its transpose
        base_raw = np.ascontiguousarray(base.read(pair.base_name).reshape(shape).T)
        shape = shape[::-1]
    else:
        # read in row blocks, never held whole: an embedding's LoRA or trainable tokens on a 128,256-row table
        # held 1 GB (bfloat16) mapped beside the rest; a quantized base weight comes out dequantized, a block of
        # rows at a time (held whole, a Llama-2-70B MLP matrix under a QLoRA adapter was 940 MB of float32)
        windows = lambda k: base.windows(pair.base_name, k)       # noqa: E731
    fields, rank = analyze_factors(a64, b64, lf.scale, base_raw, pair.dtype_base, shape,
                                   k=options.rank_k, noise_factor=options.thresholds.noise_floor_factor,
                                   dtype_adapter=dt_a, magnitude=magnitude, dtype_magnitude=dt_m, rows=rows,
                                   base_windows=windows,
                                   dora_whole={"seed": options.seed, "count": options.spectrum == "count",
                                               "exact_max": options.exact_svd_max} if options.rank else None)
    if getattr(lf, "transposed", False):
        rank.shape_2d = tuple(pair.shape_base)        # as stored, like every other record
    _fill(rec, fields)
    rec.shape = list(pair.shape_base)
    rec.numel = _elements(pair, pair.shape_base)
    rec.numel_compared = rec.numel
    rec.compared = "factors"
    rec.status = "changed" if (rec.norm_delta or 0) > 0 else "unchanged"
    rec.rank = rank if options.rank else None
    if rows is not None:
        from ..io.peft_tokens import tokens_note

        rec.note = tokens_note(lf, pair.dtype_base)
    elif lf.kind == "HRA":
        from ..io.peft_hra import hra_note

        rec.note = hra_note(lf, lf.apply_gs)
    elif getattr(lf, "parts", None):
        from ..io.peft_adapter import factor_note

        rec.note = factor_note(lf, a64, b64)
    elif getattr(lf, "param", None) is not None:
        from ..io.peft_params import param_note

        rec.note = param_note(lf)
    elif getattr(lf, "mlx", None) is not None:
        rec.note = (f"mlx-lm LoRA adapter (r={lf.r}, scale={lf.scale:g}) analysed exactly from its factors `{lf.b_name}` "
                    f"and `{lf.a_name}` as mlx-lm's fuse adds them (" +
                    ("scale x lora_a @ lora_b, an embedding table's)" if lf.mlx == "embedding"
                     else "scale x lora_b^T @ lora_a^T)"))
    else:
        rec.note = (f"LoRA adapter (r={lf.r}, scale={lf.scale:g}) analysed exactly from its factors "
                    f"`{lf.b_name}` @ `{lf.a_name}`")
    if lf.magnitude_name:
        whole = "spectrum and ranks describe the whole change" in rank.extra.get("dora", {}).get("note", "")
        rec.note += ("; DoRA: the statistics are those of the merged weight, " +
                     ("the spectrum is the whole change's, the row rescaling with the direction term (see docs/rank.md)"
                      if whole else "the spectrum covers the low-rank direction term only (see docs/rank.md)"))
        near = rank.extra.get("dora", {}).get("rows_within_rounding", 0)
        if near:
            rec.note += (f"; {near:,} rows whose factor magnitude / ||W + scale B A|| is within rounding of 1 "
                         f"(|c - 1| <= {rank.extra['dora']['rounding_tolerance']:.2g}) are taken as not rescaled")
    return rec


#: Gram matrices up to this side are solved on a background thread while the next matrix streams
#: (two of them in memory at once, 134 MB each at 4096); larger ones are solved in place, in turn
OVERLAP_MAX = 4096


class Deferred:
    """A rank block still being computed (``Solver``)."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future


class Solver:
    """Eigen-solves of streamed Gram matrices on one background thread, one at a time: the
    solve of matrix i (LAPACK on one BLAS thread, the bulk of an exact rank) overlaps the
    streaming and Gram products of matrix i+1 instead of leaving a core idle. A submit waits
    for the previous solve, so at most two Gram matrices exist at once. The results are the
    same bits as solving in turn (the same calls on the same data)."""

    def __init__(self) -> None:
        self._pool = None
        self._last = None

    def submit(self, fn: Callable[[], object]):
        if self._last is not None:
            self._last.result()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightdiff-eig")
        self._last = self._pool.submit(fn)
        return self._last

    @staticmethod
    def resolve(rec: TensorRecord) -> TensorRecord:
        if isinstance(rec.rank, Deferred):
            rec.rank = rec.rank.future.result()
        return rec

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._last = None


def streamed(pair: Pair) -> int:
    """Elements of ``pair`` the stats pass streams (what progress counts)."""
    return pair.params if pair.kind not in ("added", "removed", "mismatch", "lora") else 0


#: pairs of at most this many elements, stored plainly in safetensors files (local, or streamed from the Hub),
#: are read in batches (one read per run of neighbouring tensors) instead of window by window: the 100,000
#: small tensors of a mixture-of-experts checkpoint cost a read each, not a mapping per window (streamed, a
#: range request each: 3.3 requests a tensor for 2,000 tensors of 4 values, a round trip to the Hub each)
SMALL_ELEMENTS = 1 << 16
#: never more: a small pair is one chunk of the CPU stats kernel (``kernels.cpu.delta_stats_many``)
#: and small enough for the direct rank path (``backend.LAPACK_MAX_ELEMENTS``), so it streams nothing
SMALL_MAX = 1 << 16
#: bytes read per batch and side at most (and per single read, gaps included), and pairs per batch
SMALL_BATCH_BYTES = 32 << 20
SMALL_BATCH_PAIRS = 4096
_SMALL_KINDS = ("paired",)

#: (base index, base file, start, end, base storage dtype, tuned file, start, end, tuned storage dtype)
Span = tuple


def _small_spans_all(pairs: Sequence[Pair], bases: Sequence[Checkpoint], tuned: Checkpoint) -> list[Span | None]:
    """Where each small plain pair's bytes are, or None for a pair that takes the windowed path (with
    what depends only on a dtype or a shape worked out once per dtype and shape, not per pair)."""
    plain: dict = {}            # dtype -> its storage dtype when decodable, else None
    small: dict = {}            # shape -> whether it is a small pair's
    limit = min(SMALL_ELEMENTS, SMALL_MAX)
    out: list[Span | None] = []
    for pair in pairs:
        if (pair.kind not in _SMALL_KINDS or pair.transposed or pair.tied or pair.tuned_source
                or pair.shape_tuned is None or pair.dtype_base is None or pair.dtype_tuned is None):
            out.append(None)
            continue
        db, dt = pair.dtype_base, pair.dtype_tuned
        if db not in plain:
            plain[db] = storage_of(db) if DTYPES[db].decodable else None
        if dt not in plain:
            plain[dt] = storage_of(dt) if DTYPES[dt].decodable else None
        sb_dtype, st_dtype = plain[db], plain[dt]
        if sb_dtype is None or st_dtype is None:
            out.append(None)
            continue
        shape = pair.shape_tuned if type(pair.shape_tuned) is tuple else tuple(pair.shape_tuned)
        ok = small.get(shape)
        if ok is None:
            ok = small[shape] = 0 < _elements(pair, shape) <= limit
        if not ok:
            out.append(None)
            continue
        sb = bases[pair.base_index].plain_span(pair.base_name)
        st = tuned.plain_span(pair.tuned_name)
        out.append(None if sb is None or st is None else (pair.base_index, *sb, sb_dtype, *st, st_dtype))
    return out


def _read_small(spans: list[Span | None], first: int, bases: Sequence[Checkpoint],
                tuned: Checkpoint) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Both sides of the run of small pairs from ``first`` on (at most ``SMALL_BATCH_BYTES`` a
    side), each side read in runs of neighbouring bytes of one file: (the batch's pair indices, and
    per side (base, tuned) the bytes of every pair of the batch one after the other, where pair
    ``batch[k]``'s begin and how many there are). No array per pair: 100,000 tiny tensors made
    200,000 numpy views."""
    batch, used = [], [0, 0]
    for i in range(first, len(spans)):
        s = spans[i]
        if s is None:
            break
        if batch and (len(batch) >= SMALL_BATCH_PAIRS or used[0] + s[3] - s[2] > SMALL_BATCH_BYTES
                      or used[1] + s[7] - s[6] > SMALL_BATCH_BYTES):
            break
        batch.append(i)
        used[0] += s[3] - s[2]
        used[1] += s[7] - s[6]
    packed, begins, lengths = [], [], []
    for side in (0, 1):
        buf, begin, length = _read_side(spans, batch, side, bases, tuned)
        packed.append(buf)
        begins.append(begin)
        lengths.append(length)
    return batch, packed, begins, lengths


#: file offsets are below 2^50 (a petabyte): a file's rank times this keeps the files' offsets apart
_FILE_STRIDE = 1 << 50


def _read_side(spans: list[Span], batch: list[int], side: int, bases: Sequence[Checkpoint],
               tuned: Checkpoint) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side of ``_read_small``: (bytes of every pair of the batch, end to end in read order;
    where pair ``batch[k]``'s begin in them; how many). The reads: the pairs sorted by (base, file,
    offset); a run goes on while the next pair is in the same file, starts at most 64 KB after the
    run's end and keeps the run within ``SMALL_BATCH_BYTES`` (gaps count: one read stays bounded)."""
    at = 1 + 4 * side
    n = len(batch)
    rows = [spans[i] for i in batch]
    begin = np.fromiter((s[at + 1] for s in rows), dtype=np.int64, count=n)
    end = np.fromiter((s[at + 2] for s in rows), dtype=np.int64, count=n)
    files: dict = {}                          # (base index, path) -> file rank, in (base, name) order
    keys = [(s[0] if side == 0 else 0, s[at]) for s in rows]
    for key in keys:
        files.setdefault(key, None)
    ranked = sorted(files, key=lambda k: (k[0], str(k[1])))
    for r, key in enumerate(ranked):
        files[key] = r
    fid = np.fromiter((files[k] for k in keys), dtype=np.int64, count=n) if len(files) > 1 else np.zeros(n, np.int64)
    order = np.lexsort((np.arange(n), begin, fid))          # a stable sort by (file, offset)
    b, e, f = begin[order], end[order], fid[order]
    if n and (int(e.max()) >= _FILE_STRIDE or len(files) >= (1 << 12)):
        runs = _runs_one_by_one(b, e, f)
    else:
        key_b, key_e = f * _FILE_STRIDE + b, f * _FILE_STRIDE + e
        reach = np.maximum.accumulate(key_e)                  # the running end of the bytes so far
        cut = np.flatnonzero(key_b[1:] - reach[:-1] > (1 << 16)) + 1      # a new file, or a gap over 64 KB
        firsts = np.concatenate(([0], cut)).astype(np.int64) if n else np.zeros(0, np.int64)
        lasts = np.concatenate((cut - 1, [n - 1])).astype(np.int64) if n else np.zeros(0, np.int64)
        if n and int((reach[lasts] - key_b[firsts]).max()) > SMALL_BATCH_BYTES:
            runs = _runs_one_by_one(b, e, f)                  # a run to split by size: as the loop does
        else:
            runs = [(int(j), int(k) + 1, int(b[j]), int(reach[k] - f[k] * _FILE_STRIDE)) for j, k in zip(firsts, lasts)]
    sizes = e - b
    out_begin = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes[:-1], out=out_begin[1:])
    parts = []
    for j, k, lo, hi in runs:
        key = ranked[int(f[j])]
        ckpt = bases[key[0]] if side == 0 else tuned
        buf = ckpt.read_span(key[1], lo, hi)
        rel, size = b[j:k] - lo, sizes[j:k]
        tiled = int(rel[0]) == 0 and int(size.sum()) == hi - lo and bool(np.all(rel[1:] == np.cumsum(size)[:-1]))
        parts.append(buf if tiled else _gather(buf, rel, size))
    packed = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    where = np.empty(n, dtype=np.int64)
    where[order] = out_begin
    length = np.empty(n, dtype=np.int64)
    length[order] = sizes
    return packed, where, length


def _runs_one_by_one(b: np.ndarray, e: np.ndarray, f: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The runs of ``_read_side`` (first, past the last, first byte, end byte), pair by pair."""
    runs, j, n = [], 0, len(b)
    bl, el, fl = b.tolist(), e.tolist(), f.tolist()
    while j < n:
        lo, hi, k = bl[j], el[j], j + 1
        while k < n and fl[k] == fl[j] and bl[k] - hi <= (1 << 16) and max(hi, el[k]) - lo <= SMALL_BATCH_BYTES:
            hi = max(hi, el[k])
            k += 1
        runs.append((j, k, lo, hi))
        j = k
    return runs


def _gather(buf: np.ndarray, begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The bytes ``buf[begin[k]:begin[k] + length[k]]`` of every k, end to end, as a new array."""
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, dtype=buf.dtype)
    if len(begin) and bool(np.all(begin[1:] == begin[:-1] + length[:-1])):   # already end to end
        return buf[int(begin[0]):int(begin[0]) + total].copy()
    skip = np.repeat(begin - (np.cumsum(length) - length), length)
    return buf[skip + np.arange(total, dtype=np.int64)]


def _small_batch(pairs: Sequence[Pair], spans: list[Span | None], first: int, bases: Sequence[Checkpoint],
                 tuned: Checkpoint, backend: Backend) -> dict[int, tuple[np.ndarray, dict, dict]]:
    """The statistics and cast floors of the run of small pairs from ``first`` on (``_read_small``),
    computed together: one kernel call per dtype pair and one histogram per base dtype instead of
    a few calls per pair, the same numbers as ``compute_pair`` gets pair by pair."""
    from .floors import small_floors_flat

    batch, packed, begins, lengths = _read_small(spans, first, bases, tuned)
    out: dict[int, list] = {i: [None, None, None] for i in batch}
    groups: dict[tuple[str, str], list[int]] = {}
    for k, i in enumerate(batch):
        groups.setdefault((pairs[i].dtype_base, pairs[i].dtype_tuned), []).append(k)
    many = getattr(backend.module, "delta_stats_many", reference.delta_stats_many)

    def side(s: int, ks: np.ndarray, dtype: str) -> np.ndarray:
        return _gather(packed[s], begins[s][ks], lengths[s][ks]).view(storage_of(dtype))

    for (db, dt), ks in groups.items():
        ks = np.asarray(ks, dtype=np.int64)
        base_flat, tuned_flat = side(0, ks, db), side(1, ks, dt)
        offsets = np.zeros(len(ks) + 1, dtype=np.int64)
        np.cumsum(lengths[0][ks] // storage_of(db).itemsize, out=offsets[1:])
        rows = many(base_flat, tuned_flat, offsets, db, dt)
        for k, row, fields in zip(ks.tolist(), rows, reference.finalize_many(rows)):
            o = out[batch[k]]
            o[0] = row
            o[2] = fields
    by_base: dict[str, list[int]] = {}
    for k, i in enumerate(batch):
        by_base.setdefault(pairs[i].dtype_base, []).append(k)
    for db, ks in by_base.items():
        ks = np.asarray(ks, dtype=np.int64)
        sizes = lengths[0][ks] // storage_of(db).itemsize
        flat = side(0, ks, db) if DTYPES[db].decodable and DTYPES[db].kind == "float" else None
        for k, fl in zip(ks.tolist(), small_floors_flat(flat, sizes, db)):
            out[batch[k]][1] = fl
    return {i: (row, fl, fields) for i, (row, fl, fields) in out.items()}


def compute_some(plan: Plan, indices: Sequence[int], bases: Sequence[Checkpoint], tuned: Checkpoint,
                 options: CompareOptions, backend: Backend, classify: Classify,
                 progress: Progress | None = None) -> list[TensorRecord]:
    """The records of ``plan.pairs[i]`` for each ``i`` in ``indices``, in that order.

    The whole comparison is ``indices = range(len(plan.pairs))``; a split comparison gives
    each worker a share and puts the records back in plan order (weightdiff.split). A
    record depends only on its pair and the options, so the shares give the same records.
    With ``options.cache`` a record is stored once it is complete (its rank solved).
    """
    pairs = [plan.pairs[i] for i in indices]
    total = sum(streamed(p) for p in pairs)
    stage = getattr(progress, "stage", None)
    # a large comparison's first run compiles in a child (measured pairs only: added/removed ones read nothing)
    precompile.note_size(total, precompile.gram_side(p.shape for p in pairs if streamed(p)))
    if precompile.ensure(pairs, stage, (*bases, tuned)) and stage is not None:
        stage(None)
    done = 0
    records: list[TensorRecord] = []
    cache = None
    if options.cache:
        from .cache import RecordCache

        cache = RecordCache(options.cache, options.settings())
    spans = _small_spans_all(pairs, bases, tuned) if backend.name == "cpu" else [None] * len(pairs)
    pres: dict[int, tuple[np.ndarray, dict, dict]] = {}
    solver = Solver()
    pending: list[tuple[TensorRecord, object, Pair]] = []   # computed, not yet cached (rank maybe still solving)

    def settle(wait: bool) -> None:
        while pending and (wait or not isinstance(pending[0][0].rank, Deferred)
                           or pending[0][0].rank.future.done()):
            rec, key, pair = pending.pop(0)
            if isinstance(rec.rank, Deferred):
                if wait and progress is not None:       # the stream is done: say which solve is awaited
                    progress(done, total, pair.tuned_name or pair.base_name or "rank")
                Solver.resolve(rec)
                refine_rank(rec, pair, bases, tuned, options, backend)
            if cache is not None:
                cache.put(key, rec)

    try:
        for i, pair in enumerate(pairs):
            name = pair.tuned_name or pair.base_name or ""

            def on_window(n: int, _name: str = name) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total, _name)

            key = cache.key(pair, bases, tuned) if cache is not None else None
            rec = cache.get(key, pair, bases) if cache is not None else None   # one that fits this pair only
            if rec is None:
                if spans[i] is not None and i not in pres:
                    pres = _small_batch(pairs, spans, i, bases, tuned, backend)
                rec = compute_pair(pair, bases, tuned, options, backend, classify, on_window, solver,
                                   pres.pop(i, None))
                pending.append((rec, key, pair))
            else:
                skip = getattr(progress, "skip", None)
                if skip is not None:        # done, but taken from the cache: not the pass's rate
                    skip(streamed(pair))
                on_window(streamed(pair))
            records.append(rec)
            settle(wait=False)
        settle(wait=True)
    finally:
        solver.close()
        if cache is not None:
            cache.warn_unwritten()
    if progress is not None:
        progress(total, total, "")
    return records


def compute_all(plan: Plan, bases: Sequence[Checkpoint], tuned: Checkpoint, options: CompareOptions,
                backend: Backend, classify: Classify,
                progress: Progress | None = None) -> tuple[list[TensorRecord], float]:
    """Run every pair of the plan in order; returns the records and the seconds spent."""
    t0 = time.perf_counter()
    records = compute_some(plan, range(len(plan.pairs)), bases, tuned, options, backend, classify, progress)
    return records, time.perf_counter() - t0
