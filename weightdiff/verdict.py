"""The model-level summary: per-record accounting, the verdict, its form, flags and headline.

Pure Python over ``TensorRecord``s and the block roll-up of ``weightdiff.aggregate``
(which calls ``summarise``). Every number follows DESIGN.md:

* ``relative_change`` = sqrt(sum norm_delta^2) / sqrt(sum norm_base^2) over paired tensors;
* ``delta_params``: per changed matrix m x n, min(m n, energy_rank_99 (m + n)) (m n without
  a rank record); changed vectors whole; added tensors and new vocabulary rows whole
  (they must be shipped to rebuild the tuned model); rounding-only changes cost nothing;
* ``compressed_bytes``: that low-rank form in the tuned dtype, and a 1-bit sign form
  (BitDelta: one sign bit per element and one scale per changed matrix; vectors and
  added tensors kept whole), as shares of the tuned model's bytes;
* ``relatedness_cosine``: cosine weighted by elements compared, over matrices of at least
  ``large_matrix_numel`` elements, norm gains and biases left out.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .kernels.dtypes import DTYPES
from .options import Thresholds
from .records import STATUSES, BlockRecord, Summary, TensorRecord

_PAIRED = ("unchanged", "rounding", "changed", "resized")


# ---------------------------------------------------------------- per-record helpers

def is_tied(rec: TensorRecord) -> bool:
    """A tied LM head row: the tuned embedding again, shown against the base head, counted once."""
    return bool(getattr(rec, "tied", False)) or (rec.note or "").startswith("tied:")


def is_mismatch(rec: TensorRecord) -> bool:
    return rec.status == "resized" and rec.compared == "none"


def is_changed(rec: TensorRecord, thresholds: Thresholds) -> bool:
    """The record carries a change beyond rounding (a resized tensor: in its shared rows)."""
    if rec.status == "changed":
        return True
    if rec.status != "resized":
        return False
    if is_mismatch(rec):
        return True
    if rec.frac_beyond_rounding is not None:
        return rec.frac_beyond_rounding > thresholds.rounding_frac
    return rec.frac_changed is None or rec.frac_changed > 0


def _dims(rec: TensorRecord) -> tuple[int, int] | None:
    """(m, n) of the compared part of a matrix (rows x rest), None for vectors."""
    if rec.rank is not None and rec.rank.shape_2d and min(rec.rank.shape_2d) > 0:
        return int(rec.rank.shape_2d[0]), int(rec.rank.shape_2d[1])
    shape = rec.shape or []
    if len(shape) < 2:
        return None
    rest = math.prod(shape[1:])
    rows = rec.numel_compared // rest if rec.status == "resized" and rest and rec.numel_compared else shape[0]
    return int(rows), int(rest)


def _extra_rows(rec: TensorRecord) -> int:
    """Elements of a resized tensor beyond the compared rows (new vocabulary rows)."""
    if rec.status != "resized" or is_mismatch(rec):
        return 0
    return max(0, rec.numel - rec.numel_compared)


def delta_params_of(rec: TensorRecord, thresholds: Thresholds) -> tuple[int, int]:
    """(changed, added) parameters needed to write this record's change down.

    A changed matrix m x n costs min(m n, energy_rank_99 (m + n)), or m n without a rank
    record; a changed vector costs its elements; added tensors and new rows cost their
    elements; a mismatched shape costs the whole tuned tensor; rounding costs nothing.

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
    added = _extra_rows(rec)
    if not is_changed(rec, thresholds):
        return 0, added
    dims = _dims(rec)
    if dims is None:
        return (rec.numel_compared if rec.status == "resized" else rec.numel), added
    m, n = dims
    r99 = rank_upper(rec, "energy_rank_99")
    cost = m * n if r99 is None else min(m * n, int(r99) * (m + n))
    return cost, added


def _bytes_per(dtype: str | None) -> float:
    return DTYPES[dtype].bits / 8 if dtype in DTYPES else 4.0


def _ratio(num_sq: float, den_sq: float) -> float | None:
    return math.sqrt(num_sq) / math.sqrt(den_sq) if den_sq > 0 else None


def _norms(rec: TensorRecord) -> tuple[float, float] | None:
    """(norm_base^2, norm_delta^2) of a paired record with finite norms, else None."""
    if rec.status not in _PAIRED or rec.norm_base is None or rec.norm_delta is None:
        return None
    nb, nd = float(rec.norm_base), float(rec.norm_delta)
    if not (math.isfinite(nb) and math.isfinite(nd)):
        return None
    return nb * nb, nd * nd




# ---------------------------------------------------------------- formatting for sentences

def fmt_pct(x: float | None) -> str:
    """A share as a percentage that never rounds a partial share to 0% or 100%.

    >>> fmt_pct(0.9213), fmt_pct(0.99996), fmt_pct(1.0), fmt_pct(3e-7)
    ('92.1%', '99.996%', '100.0%', '0.00003%')
    """
    if x is None or not math.isfinite(x):
        return "n/a"
    v = 100.0 * x
    text = f"{v:.1f}"
    for d in range(1, 8):
        text = f"{v:.{d}f}"
        if (float(text) != 100.0 or x >= 1.0) and (float(text) != 0.0 or x == 0.0):
            break
    return text + "%"


def fmt_count(n: int | float) -> str:
    """A parameter count in words: ``4,096``, ``12.3K``, ``4.1M``, ``7.0B``.

    >>> fmt_count(4096), fmt_count(12345), fmt_count(4_100_000), fmt_count(7_000_000_000)
    ('4,096', '12.3K', '4.1M', '7.0B')
    """
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e4, "K")):
        if abs(n) >= div:
            return f"{n / (div if unit != 'K' else 1e3):.1f}{unit}"
    return f"{int(n):,}"


# ---------------------------------------------------------------- the summary

def _is_matrix_for_relatedness(rec: TensorRecord, large: int | None) -> bool:
    if rec.status not in _PAIRED or rec.cosine is None or not math.isfinite(rec.cosine) or is_mismatch(rec):
        return False
    if rec.module in ("norm", "bias") or len(rec.shape or []) < 2:
        return False
    return large is None or (rec.numel_compared or rec.numel) >= large


def _relatedness(counted: list[TensorRecord], thresholds: Thresholds) -> tuple[float | None, float | None, int]:
    """(element-weighted cosine, relative change, matrices) over the large matrices
    (over all matrices when none is large); norm gains and biases never count."""
    for large in (thresholds.large_matrix_numel, None):
        rows = [r for r in counted if _is_matrix_for_relatedness(r, large)]
        if rows:
            w = [float(r.numel_compared or r.numel) for r in rows]
            cos = sum(wi * r.cosine for wi, r in zip(w, rows)) / sum(w)
            sq = [q for q in (_norms(r) for r in rows) if q is not None]
            rel = _ratio(sum(q[1] for q in sq), sum(q[0] for q in sq)) if sq else None
            return cos, rel, len(rows)
    return None, None, 0


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


def _low_rank_k(rec: TensorRecord) -> int | None:
    ks = [k for k in (rank_upper(rec, "energy_rank_99"), rank_upper(rec, "numerical_rank")) if k is not None]
    return min(ks) if ks else None


def _form(changed: list[TensorRecord], thresholds: Thresholds) -> dict[str, Any]:
    """low_rank / sparse / dense, with the numbers behind it (see docs/pairing.md)."""
    mats = [r for r in changed if not is_mismatch(r) and _dims(r) is not None]
    vecs = [r for r in changed if not is_mismatch(r) and _dims(r) is None]
    ranked = [r for r in mats if r.rank is not None]
    compared = [r for r in changed if not is_mismatch(r) and r.compared in ("float", "bytes")]
    n_el = sum(r.numel_compared for r in compared)
    n_diff = sum((r.frac_beyond_rounding if r.frac_beyond_rounding is not None else (r.frac_changed or 0.0))
                 * r.numel_compared for r in compared)
    share = n_diff / n_el if n_el else None
    low = []
    for r in ranked:
        m, n = _dims(r)
        k = _low_rank_k(r)
        low.append(k is not None and k <= max(1.0, thresholds.low_rank_share * min(m, n))
                   and rank_upper(r, "numerical_rank") <= thresholds.low_rank_max)
    form: dict[str, Any] = {
        "kind": None,
        "max_numerical_rank": max((int(r.rank.numerical_rank) for r in ranked), default=None),
        "max_energy_rank_99": max((int(r.rank.energy_rank_99) for r in ranked
                                   if r.rank.energy_rank_99 is not None), default=None),
        "max_rank_share": max(((_low_rank_k(r) or 0) / min(_dims(r)) for r in ranked), default=None),
        "matrices_changed": len(mats), "matrices_low_rank": sum(low), "matrices_without_rank": len(mats) - len(ranked),
        "vectors_changed": len(vecs), "changed_element_share": share,
        "basis": "spectrum" if ranked else "elements",
    }
    if not mats and not vecs:
        return form
    if ranked and all(low) and len(ranked) == len(mats):
        form["kind"] = "low_rank"
    elif share is not None and share <= thresholds.sparse_frac:
        form["kind"] = "sparse"
    else:
        form["kind"] = "dense"
    return form


def _flags(counted: list[TensorRecord], records: list[TensorRecord]) -> list[str]:
    st = Counter(r.status for r in counted)
    checks = [
        ("added_tensors", st["added"] > 0),
        ("removed_tensors", st["removed"] > 0),
        ("resized_embeddings", any(r.status == "resized" and not is_mismatch(r) for r in counted)),
        ("shape_mismatch", any(is_mismatch(r) for r in counted)),
        ("composite_base", len({r.base_index for r in counted if r.base_name is not None}) > 1),
        ("adapter", any(r.compared == "factors" for r in counted)),
        ("tied_lm_head", any(is_tied(r) for r in records)),
        ("dtype_changed", any(r.dtype_base and r.dtype_tuned and r.dtype_base != r.dtype_tuned
                              and r.compared != "factors" for r in counted)),
        ("nonfinite", any((r.nonfinite or 0) > 0 for r in records)),
        ("bytes_compared", any(r.compared == "bytes" for r in counted)),
        ("partial_spectrum", any(r.rank is not None and not r.rank.exact for r in counted)),
    ]
    return [name for name, on in checks if on]


def summarise(records: list[TensorRecord], counted: list[TensorRecord], blocks: list[BlockRecord],
              thresholds: Thresholds) -> Summary:
    """The model-level ``Summary`` of DESIGN.md from the records and their block roll-up."""
    by_status = {s: 0 for s in STATUSES}
    for r in counted:
        if r.status == "resized" and not is_mismatch(r):
            by_status["resized"] += r.numel_compared
            by_status["added"] += _extra_rows(r)
            by_status["removed"] += max(0, math.prod(r.base_shape or [0]) - r.numel_compared)
        else:
            by_status[r.status] = by_status.get(r.status, 0) + r.numel
    tensors_by_status = {s: 0 for s in STATUSES}
    tensors_by_status.update(Counter(r.status for r in counted))
    params_total = sum(by_status.values())
    live = [r for r in counted if r.status != "removed"]

    nb2 = nd2 = 0.0
    n_paired = 0
    for r in counted:
        if r.status in _PAIRED:
            n_paired += 1
        sq = _norms(r)
        if sq is not None:
            nb2, nd2 = nb2 + sq[0], nd2 + sq[1]
    rel = _ratio(nd2, nb2) if n_paired else None
    if rel is None and n_paired and nb2 == 0 and nd2 == 0 and any(_norms(r) for r in counted):
        rel = 0.0
    cos, rel_m, n_cos = _relatedness(counted, thresholds)

    changed = [r for r in live if is_changed(r, thresholds)]
    dp_changed = dp_added = 0
    lr_bytes = sign_bytes = model_bytes = 0.0
    for r in live:
        c, a = delta_params_of(r, thresholds)
        dp_changed, dp_added = dp_changed + c, dp_added + a
        bpe = _bytes_per(r.dtype_tuned or r.dtype_base)
        model_bytes += r.numel * bpe
        lr_bytes += (c + a) * bpe
        dims = _dims(r)
        if c and dims is not None and not is_mismatch(r):
            sign_bytes += math.ceil(dims[0] * dims[1] / 8) + bpe
        else:
            sign_bytes += c * bpe
        sign_bytes += a * bpe
    delta = dp_changed + dp_added

    numbered = [b for b in blocks if b.index is not None]
    blocks_changed = sum(1 for b in numbered if b.params_changed > 0)
    tensors_changed = sum(1 for r in live if is_changed(r, thresholds) or r.status == "added" or _extra_rows(r))
    params_changed = sum(b.params_changed for b in blocks)
    scope = {
        "blocks_changed": blocks_changed, "blocks_total": len(numbered),
        "tensors_changed": tensors_changed, "tensors_total": len(live),
        "params_changed": params_changed, "params_changed_share": params_changed / params_total if params_total else None,
        "changed_blocks": [b.block for b in blocks if b.params_changed > 0],
        "modules_changed": sorted({r.module for r in changed if r.module}),
        "delta_params_changed": dp_changed, "delta_params_added": dp_added,
    }
    flags = _flags(counted, records)
    verdict, reason = _verdict(counted, tensors_by_status, rel_m, cos, changed, scope, thresholds, n_paired)
    form = _form(changed, thresholds) if verdict == "derived" else {"kind": None}
    summary = Summary(
        verdict=verdict, verdict_reason=reason, scope=scope, form=form, flags=flags, params_total=params_total,
        params_by_status=by_status, tensors_by_status=tensors_by_status, relative_change=rel,
        relatedness_cosine=cos, relatedness_rel_change=rel_m, blocks_total=len(numbered), blocks_changed=blocks_changed, delta_params=delta,
        delta_params_share=delta / params_total if params_total else None,
        compressed_bytes={"model_bytes": int(model_bytes), "low_rank_bytes": int(math.ceil(lr_bytes)),
                          "low_rank_share": lr_bytes / model_bytes if model_bytes else None,
                          "sign_bytes": int(math.ceil(sign_bytes)),
                          "sign_share": sign_bytes / model_bytes if model_bytes else None,
                          "rank_basis": "energy_rank_99"})
    summary.headline = _headline(summary, counted, n_cos)
    return summary


def _fmt_cos(c: float) -> str:
    return f"{c:.1e}" if abs(c) < 1e-3 and c != 0 else f"{c:.3f}"


def _verdict(counted, tbs, rel, cos, changed, scope, thr: Thresholds, n_paired: int) -> tuple[str, str]:
    """``rel`` and ``cos`` are over the relatedness matrices (norm gains and biases left out)."""
    structural = tbs["added"] + tbs["removed"] + tbs["resized"]
    if not counted:
        return "identical", "No tensors were compared (check --include/--exclude)."
    if not n_paired:
        return "unrelated", ("No tensor of the tuned model has a counterpart in the base, even after prefix "
                             "alignment.")
    if cos is not None and rel is not None and cos < thr.unrelated_cosine and rel > thr.unrelated_rel_change:
        return "unrelated", (f"The large matrices are near-orthogonal to the base (weighted cosine {_fmt_cos(cos)}) and the "
                             f"relative change of those matrices is {rel:.2f}, as between independently initialised models.")
    if not changed and not structural:
        if tbs["rounding"] == 0:
            return "identical", f"All {tbs['unchanged']:,} tensors are bitwise identical to the base."
        casts = sorted({f"{r.dtype_base} -> {r.dtype_tuned}" for r in counted if r.status == "rounding"})
        return "cast_only", (f"{tbs['rounding']:,} tensors differ only within the rounding of a dtype cast "
                             f"({', '.join(casts)}); no weight moved beyond it.")
    parts = [f"{scope['tensors_changed']:,} of {scope['tensors_total']:,} tensors changed"]
    if scope["blocks_total"]:
        parts.append(f"{scope['blocks_changed']} of {scope['blocks_total']} blocks")
    text = "Derived from this base: " + ", in ".join(parts)
    if cos is not None:
        text += f"; the large matrices keep 1 - cosine = {max(0.0, 1 - cos):.1e} with the base"
    elif not changed:
        text += "; every shared tensor is bitwise equal or within rounding"
    return "derived", text + "."


def _headline(s: Summary, counted: list[TensorRecord], n_cos: int) -> list[str]:
    total = s.params_total
    out = [s.verdict_reason]
    if total:
        unchanged = s.params_by_status["unchanged"]
        same_rows = sum(r.numel_compared for r in counted if r.status == "resized"
                        and r.compared in ("float", "bytes") and r.frac_changed == 0)
        if same_rows:
            out.append(f"{fmt_pct(unchanged / total)} of parameters are bitwise unchanged, "
                       f"{fmt_pct((unchanged + same_rows) / total)} counting the shared rows of resized "
                       "tensors, which are bitwise unchanged too.")
        else:
            out.append(f"{fmt_pct(unchanged / total)} of parameters are bitwise unchanged.")
        if s.params_by_status["rounding"]:
            out.append(f"{fmt_pct(s.params_by_status['rounding'] / total)} differ only within dtype rounding.")
    if s.blocks_total:
        out.append(f"{s.blocks_changed} of {s.blocks_total} blocks changed.")
    if s.verdict in ("derived", "unrelated") and s.relative_change is not None:
        out.append(f"Relative change {s.relative_change:.2e} (norm of all deltas over norm of the base).")
    f = s.form
    if f.get("kind") == "low_rank":
        out.append(f"The change is low-rank: at most rank {f['max_numerical_rank']} per matrix.")
    elif f.get("kind") == "sparse":
        out.append(f"The change is sparse: {fmt_pct(f['changed_element_share'])} of the elements of the changed "
                   "tensors differ.")
    elif f.get("kind") == "dense" and f.get("max_energy_rank_99") is not None:
        out.append(f"The change is dense: up to {f['max_energy_rank_99']:,} directions per matrix hold 99% of "
                   "its energy.")
    elif f.get("kind") == "dense":
        out.append(f"The change is dense: {fmt_pct(f['changed_element_share'])} of the elements of the changed "
                   "tensors differ (no rank analysis).")
    if s.delta_params:
        out.append(f"Writing the change down takes {fmt_count(s.delta_params)} parameters "
                   f"({fmt_pct(s.delta_params_share)} of the model).")
    added = [r for r in counted if r.status == "added"]
    if added:
        n = len(added)
        out.append(f"{n} tensor{'s were' if n != 1 else ' was'} added ({fmt_count(sum(r.numel for r in added))} "
                   "parameters).")
    removed = [r for r in counted if r.status == "removed"]
    if removed:
        n = len(removed)
        out.append(f"{n} base tensor{'s are' if n != 1 else ' is'} missing "
                   f"({fmt_count(sum(r.numel for r in removed))} parameters).")
    for r in counted:
        if r.status == "resized" and not is_mismatch(r) and r.module == "embed" and r.base_shape:
            out.append(f"The vocabulary was resized from {r.base_shape[0]:,} to {r.shape[0]:,} rows.")
            break
    if "composite_base" in s.flags:
        n = len({r.base_index for r in counted if r.base_name is not None})
        out.append(f"The tuned model is assembled from {n} bases.")
    bad = sum(r.nonfinite or 0 for r in counted)
    if bad:
        out.append(f"{bad:,} non-finite values (NaN or Inf) were found.")
    return out
