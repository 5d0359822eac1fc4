"""What counts as a change: the one home of per-tensor accounting.

``classify`` turns one tensor's kernel statistics into a status (``unchanged``,
``rounding``, ``changed``); ``is_changed`` says whether a record carries a change beyond
rounding; ``delta_params_of`` how many parameters it takes to write that change down;
``rank_upper`` which end of a rank bracket a claim must use. The measure stage receives
``classify`` from the caller (it decides whether the rank pass runs) and never judges on
its own; ``judge.aggregate`` and ``judge.verdict`` build on these rules. Definitions
follow DESIGN.md; docs/pairing.md has worked examples.
"""

from __future__ import annotations

import math
from typing import Any

from ..kernels.dtypes import DTYPES
from ..pairing.names import block_slot
from ..options import Thresholds
from ..records import TensorRecord

__all__ = ["classify", "cast_explains", "is_changed", "only_resized", "is_mismatch", "zero_side", "is_tied", "delta_params_of", "rank_upper", "matrix_dims",
           "extra_rows", "norms_sq", "ratio", "bytes_per", "PAIRED", "placements", "moved_blocks"]


PAIRED = ("unchanged", "rounding", "quantized", "changed", "resized")
#: statuses that carry no change (``is_changed`` False) and no extra rows (``extra_rows`` 0), whatever else
#: the record holds: their ``delta_params_of`` is (0, 0) at either end of a rank bracket
_NOT_CHANGED = ("unchanged", "rounding", "quantized")


def placements(records) -> list[str]:
    """The name that places each record in a block and a module kind (docs/pairing.md).

    Its own (tuned) name; the base name for a ``removed`` one; for a pair made by content
    (``onnx::MatMul_146``, says nothing) its base partner's name, moved into the tuned
    namespace by the prefix the name-paired records of that base show (``model.`` ->
    ``m.model.``), so it lands in the same block as the tensors paired by name.

    >>> from types import SimpleNamespace as R
    >>> recs = [R(name="m.layers.0.norm.weight", base_name="layers.0.norm.weight", status="unchanged",
    ...           paired_by="prefix", base_index=0),
    ...         R(name="onnx::MatMul_7", base_name="layers.0.q_proj.weight", status="changed",
    ...           paired_by="content", base_index=0)]
    >>> placements(recs)
    ['m.layers.0.norm.weight', 'm.layers.0.q_proj.weight']
    """
    prefixes: dict[int, dict[tuple[str, str], int]] = {}
    if any(getattr(r, "paired_by", None) == "content" for r in records):
        for r in records:
            if getattr(r, "paired_by", None) not in ("name", "prefix") or not r.base_name:
                continue
            t, b = r.name.split("."), r.base_name.split(".")
            k = 0
            while k < min(len(t), len(b)) and t[-1 - k] == b[-1 - k]:
                k += 1
            if k:
                key = (".".join(t[:-k]) + "." if len(t) > k else "", ".".join(b[:-k]) + "." if len(b) > k else "")
                counts = prefixes.setdefault(getattr(r, "base_index", 0), {})
                counts[key] = counts.get(key, 0) + 1
    out = []
    for r in records:
        if r.status == "removed" and r.base_name is not None:
            out.append(r.base_name)
        elif getattr(r, "paired_by", None) == "content" and r.base_name:
            counts = prefixes.get(getattr(r, "base_index", 0))
            tp, bp = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else ("", "")
            placed = tp + r.base_name[len(bp):] if r.base_name.startswith(bp) else r.base_name
            # a block paired with another base block (reordered, repeated): its own name places it
            out.append(r.name if _moved(r.name, placed) else placed)
        else:
            out.append(r.name)
    return out


def _moved(name: str | None, placed: str | None) -> bool:
    """The same slot of another block: ``layers.3.mlp.w`` placed as ``layers.1.mlp.w``."""
    if not name or not placed:
        return False
    (ts, tk), (bs, bk) = block_slot(name), block_slot(placed)
    return ts is not None and ts == bs and tk != bk


def moved_blocks(records) -> list:
    """Records paired by content with the same slot of another base block (blocks reordered or
    repeated, layers dropped): a structural change even when every tensor is bitwise a base tensor."""
    if not any(getattr(r, "paired_by", None) == "content" for r in records):
        return []
    return [r for r, placed in zip(records, placements(records))
            if getattr(r, "paired_by", None) == "content" and r.base_name and r.status in PAIRED
            and placed == r.name and block_slot(r.name)[1] is not None
            and block_slot(r.name)[1] != block_slot(r.base_name)[1]]


def is_tied(rec: TensorRecord) -> bool:
    """A tied LM head row: the tuned embedding again, shown against the base head, counted once."""
    if getattr(rec, "tied", False):
        return True
    note = rec.note
    return note is not None and note.startswith("tied:")


def is_mismatch(rec: TensorRecord) -> bool:
    return rec.status == "resized" and rec.compared == "none"


def zero_side(rec) -> str | None:
    """``tuned`` for a changed matrix that is all zero in the tuned model (erased: set to zero), ``base``
    for one that is all zero in the base (trained from zero), else None: its cosine is undefined, so
    no relatedness number covers it, which a sentence must say. Records and JSON rows alike."""
    if (rec.get("status") if isinstance(rec, dict) else rec.status) != "changed":
        return None                      # (most records: one lookup)
    get = rec.get if isinstance(rec, dict) else (lambda k: getattr(rec, k, None))
    if len(get("shape") or ()) < 2 or get("compared") != "float":
        return None
    nb, nt = get("norm_base"), get("norm_tuned")
    if nb is None or nt is None:
        return None
    return "tuned" if nt == 0 and nb > 0 else "base" if nb == 0 and nt > 0 else None


def is_changed(rec: TensorRecord, thresholds: Thresholds) -> bool:
    """The record carries a change beyond rounding (a resized tensor: in its shared rows)."""
    if rec.status == "changed":
        return True
    if rec.status != "resized":
        return False
    if is_mismatch(rec):
        return True
    if (rec.quant or {}).get("within"):
        # shared rows within the quantization noise floor (a GGUF Q8_0 of a base with tokens added): what a
        # quantized tensor of the same shape reads as ``quantized``, not a change (the new rows are ``extra_rows``)
        return False
    if rec.frac_beyond_rounding is not None:
        return rec.frac_beyond_rounding > thresholds.rounding_frac and not cast_explains(rec.cast, thresholds)
    return rec.frac_changed is None or rec.frac_changed > 0


def only_resized(rec: TensorRecord, thresholds: Thresholds) -> bool:
    """A resized tensor (new or dropped vocabulary rows, a router's experts) whose shared rows carry no
    change: bitwise the base's, within rounding or a cast of it, or within the quantization noise floor."""
    return rec.status == "resized" and not is_mismatch(rec) and not is_changed(rec, thresholds)


def matrix_dims(rec: TensorRecord) -> tuple[int, int] | None:
    """(m, n) of the compared part of a matrix (rows x rest), None for vectors."""
    if rec.rank is not None and rec.rank.shape_2d and min(rec.rank.shape_2d) > 0:
        return int(rec.rank.shape_2d[0]), int(rec.rank.shape_2d[1])
    shape = rec.shape or []
    if len(shape) < 2:
        return None
    rest = math.prod(shape[1:])
    rows = rec.numel_compared // rest if rec.status == "resized" and rest and rec.numel_compared else shape[0]
    return int(rows), int(rest)


def extra_rows(rec: TensorRecord) -> int:
    """Elements of a resized tensor beyond the compared rows (new vocabulary rows)."""
    if rec.status != "resized" or is_mismatch(rec):
        return 0
    return max(0, rec.numel - rec.numel_compared)


def delta_params_of(rec: TensorRecord, thresholds: Thresholds, lower: bool = False) -> tuple[int, int]:
    """(changed, added) parameters needed to write this record's change down.

    A changed matrix m x n costs min(m n, energy_rank_99 (m + n)), or m n without a rank
    record, and never more than two numbers (position, value) per element that differs beyond
    rounding (a sparse change; ``_sparse_cost``); a changed vector costs its elements, or that; added tensors and new rows cost their
    elements; a mismatched shape costs the whole tuned tensor; rounding costs nothing.
    A bracketed energy rank counts with its upper end (the cost is then at most this), or with
    its lower end when ``lower`` (the least it could be). A rank whose noise floor models the
    quantization noise (``rank.extra["noise_model"] == "quantization"``, a quantized pair beyond its
    floor) is priced at min(energy_rank_99, numerical_rank): the energy of the whole delta holds the
    quantization noise too, and the part above that noise is what the fine-tune put there; only
    when that noise explains the rest of the change (``above_quant_noise``).

    >>> from weightdiff.records import RankRecord
    >>> r = TensorRecord("w", "w", "changed", [100, 50], [100, 50], "F32", "F32", 5000, 5000)
    >>> r.rank = RankRecord(1.0, 1.0, 2, 4, 4, 0.0, [], 1.0, shape_2d=(100, 50))
    >>> delta_params_of(r, Thresholds())
    (600, 0)
    """
    if rec.status == "added":
        return 0, rec.numel
    if rec.status == "removed" or is_tied(rec):
        return 0, 0
    if is_mismatch(rec):
        return rec.numel, 0
    added = extra_rows(rec)
    if not is_changed(rec, thresholds):
        return 0, added
    dims = matrix_dims(rec)
    sparse = _sparse_cost(rec)
    if dims is None:
        return min(rec.numel_compared if rec.status == "resized" else rec.numel, sparse), added
    m, n = dims
    r99 = _priced_rank(rec, "energy_rank_99", lower)
    if r99 is not None and above_quant_noise(rec):
        nr = _priced_rank(rec, "numerical_rank", lower)
        r99 = r99 if nr is None else min(r99, nr)
    cost = m * n if r99 is None else min(m * n, int(r99) * (m + n))
    return min(cost, sparse), added


def above_quant_noise(rec: TensorRecord) -> bool:
    """A rank counted above modelled quantization noise that explains the rest of the change
    (``measure.rank._explained``): its numerical rank, not its energy ranks, is the fine-tune's."""
    extra = getattr(rec.rank, "extra", None) or {}
    return extra.get("noise_model") == "quantization" and bool(extra.get("noise_explains_rest"))


def unresolved_quant_noise(rec: TensorRecord) -> bool:
    """A rank counted above modelled quantization noise that does not explain the rest of the change
    (nothing resolved above it, or energy left over): its numerical rank says nothing of the form."""
    extra = getattr(rec.rank, "extra", None) or {}
    return extra.get("noise_model") == "quantization" and not extra.get("noise_explains_rest")


def _priced_rank(rec: TensorRecord, field: str, lower: bool) -> int | None:
    """A rank field as priced: its upper end, or its lower end (the field itself) when ``lower``."""
    if not lower:
        return rank_upper(rec, field)
    v = None if rec.rank is None else getattr(rec.rank, field, None)
    return None if v is None else int(v)


def _sparse_cost(rec: TensorRecord) -> int:
    """Two numbers (position and value) per element that differs beyond rounding: what a sparse change
    costs written down exactly; no bound when the share of changed elements is unknown.

    Beyond rounding, not at all: across a cast (an fp32 base, a bf16 release) every element differs by the
    rounding, which the cast of the base reproduces at no cost (an element within half an ulp of the coarser
    dtype is the base rounded to it), so a 1% edit read 84% of the model in bf16 and 1.7% in fp32. Within one
    dtype the two counts agree (a change is at least one ulp)."""
    fracs = [f for f in (rec.frac_beyond_rounding, rec.frac_changed) if f is not None]
    frac = min(fracs) if fracs else None        # beyond rounding is a subset of "differs at all"
    count = rec.numel_compared
    if frac is None or not count or not math.isfinite(frac):
        return 1 << 62
    return 2 * int(round(frac * count))


def delta_params_range(rec: TensorRecord, thresholds: Thresholds) -> tuple[int, int, int]:
    """``delta_params_of`` and the least its changed part could be: (changed, added, changed at the
    lower end of a bracketed energy rank; equal to changed when the rank is not a bracket)."""
    if rec.status in _NOT_CHANGED:      # (most records) no change, no new rows: nothing to write down
        return 0, 0, 0
    c, a = delta_params_of(rec, thresholds)
    lo = c if rec.rank is None or not rec.rank.bounds else delta_params_of(rec, thresholds, lower=True)[0]
    if rec.rank is None and c and not is_mismatch(rec) and (dims := matrix_dims(rec)) is not None:
        # no rank analysis (--no-rank, or a change none is taken of: NaN, infinity, fused experts...): m x n is only what it costs at most;
        # a change of rank 1 costs m + n, so that is all that can be said of the least
        lo = min(lo, dims[0] + dims[1])
    if unresolved_quant_noise(rec) and is_changed(rec, thresholds) and (dims := matrix_dims(rec)) is not None:
        # a quantized pair beyond its floor whose rank above the modelled noise does not explain the change:
        # the energy ranks price the quantization noise too (a rank-4 fine-tune in NF4 read 262,144 where
        # FP8 read 8,192), so the least it could be is the part above the noise
        nr = int(getattr(rec.rank, "numerical_rank", 0) or 0)
        m, n = dims
        lo = min(lo, m * n, nr * (m + n), _sparse_cost(rec))
    return c, a, lo


def bytes_per(dtype: str | None) -> float:
    return DTYPES[dtype].bits / 8 if dtype in DTYPES else 4.0


def ratio(num_sq: float, den_sq: float) -> float | None:
    return math.sqrt(num_sq) / math.sqrt(den_sq) if den_sq > 0 else None


def norms_sq(rec: TensorRecord) -> tuple[float, float] | None:
    """(norm_base^2, norm_delta^2) of a paired record with finite norms, else None."""
    if rec.status not in PAIRED or rec.norm_base is None or rec.norm_delta is None:
        return None
    nb, nd = float(rec.norm_base), float(rec.norm_delta)
    if not (math.isfinite(nb) and math.isfinite(nd)):
        return None
    return nb * nb, nd * nd


def rank_upper(rec: TensorRecord, field: str) -> int | None:
    """A rank field, or its upper bound when only the top k singular values are known.

    With a partial spectrum (``rank.exact`` False) the field holds a lower bound and
    ``rank.bounds[field]`` the range; claims such as "low-rank" and the cost of writing
    the change down must hold for the whole range, so they use the upper end.
    """
    r = rec.rank
    if r is None:
        return None
    bounds = getattr(r, "bounds", None) or {}
    if field in bounds and bounds[field] and bounds[field][-1] is not None:
        return int(math.ceil(bounds[field][-1]))
    value = getattr(r, field, None)
    return None if value is None else int(value)


def max_rank_fields(ranked: list[TensorRecord], field: str = "numerical_rank",
                    name: str = "max_numerical_rank") -> dict:
    """``max_numerical_rank`` (or ``name`` for another rank ``field``): the largest value when no
    bracketed matrix could exceed it, else None with ``<name>_bounds`` = [largest lower end, largest
    upper end]: a lower bound is never presented as the value (docs/rank.md)."""
    have = [r for r in ranked if getattr(r.rank, field) is not None]
    if not have:
        return {name: None, f"{name}_bounds": None}
    lo = max(int(getattr(r.rank, field)) for r in have)
    hi = max(max(int(getattr(r.rank, field)), rank_upper(r, field) or 0) for r in have)
    return {name: lo if lo == hi else None, f"{name}_bounds": None if lo == hi else [lo, hi]}


def classify(stats: dict, dtype_base: str | None, dtype_tuned: str | None, thresholds: Thresholds) -> str:
    """``unchanged`` | ``rounding`` | ``changed`` from one tensor's kernel statistics.

    No stored value differs -> unchanged; every difference within half an ulp of the
    coarser dtype (share beyond rounding at most ``thresholds.rounding_frac``) and the
    values are floats -> rounding; otherwise changed. Accepts counts (``n_changed``,
    ``n_beyond``, ``count``) or the finalized shares (``frac_changed``,
    ``frac_beyond_rounding``). A NaN that appears where the base had a number is a change.
    ``stats["cast"]``, when a cast chain gives every tuned value from the base (``cast_explains``:
    rounded twice through fp16, or an overflow to infinity in the cast), also means rounding.

    >>> classify({"frac_changed": 0.5, "frac_beyond_rounding": 0.0}, "F32", "BF16", Thresholds())
    'rounding'
    >>> classify({"numel": 0, "frac_changed": None, "frac_beyond_rounding": None}, "F32", "F32", Thresholds())
    'unchanged'
    """
    count = stats.get("count", stats.get("numel"))
    changed = _share(stats, "n_changed", "frac_changed", count)
    beyond = _share(stats, "n_beyond", "frac_beyond_rounding", count)
    if changed is None and count == 0 and not stats.get("n_changed"):
        return "unchanged"          # an empty tensor (shape [0]) has nothing that could differ
    if changed is None:
        return "changed"
    if changed == 0:
        return "unchanged"
    floats = _IS_FLOAT.get(dtype_base, False) and _IS_FLOAT.get(dtype_tuned, False)
    if floats and cast_explains(stats.get("cast"), thresholds):
        return "rounding"        # bitwise a cast chain of the base (through fp16, past the range)
    new_nonfinite = int(stats.get("nonfinite_tuned", 0) or 0) > int(stats.get("nonfinite_base", 0) or 0)
    if floats and beyond is not None and beyond <= thresholds.rounding_frac and not new_nonfinite:
        return "rounding"
    return "changed"


#: dtype name -> whether it is a float format (``classify``: one lookup a side)
_IS_FLOAT = {name: d.kind == "float" for name, d in DTYPES.items()}


def cast_explains(cast: dict | None, thresholds: Thresholds) -> bool:
    """A cast chain (``TensorRecord.cast``, weightdiff.measure.recast) gives every tuned value from
    the base, but at most ``rounding_frac`` of the elements: a proof that the tensor is a cast.

    >>> cast_explains({"chain": ["F32", "F16", "BF16"], "elements": 10, "unexplained": 0}, Thresholds())
    True
    """
    if not cast or not cast.get("elements"):
        return False
    return int(cast.get("unexplained") or 0) / int(cast["elements"]) <= thresholds.rounding_frac


def _share(stats: dict, count_key: str, frac_key: str, count: Any) -> float | None:
    v = stats.get(frac_key)
    if v is None and stats.get(count_key) is not None:
        n = float(stats[count_key])
        v = n / float(count) if count else (0.0 if n == 0 else None)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)
