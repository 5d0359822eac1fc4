"""The one writer of headline sentences: the verdict's title, its reason and the headline.

Everything here reads the compare result as a plain dict (``schema: weightdiff.compare/1``)
and returns English; numbers go through ``render.formats``. The compare command fills
``summary.verdict_reason`` and ``summary.headline`` from here once, when the result is
made, and every renderer (terminal, memo, captions, report) prints those same strings,
so a sentence is written in one place only. The judge stage decides the verdict and its
numbers and writes no prose.
"""

from __future__ import annotations

from typing import Any

from .formats import count, num, sci, share

__all__ = ["verdict_title", "verdict_reason", "headline", "is_tied_row", "PAIRED"]

#: statuses of a tensor that has a counterpart on the other side (``judge.status.PAIRED``)
PAIRED = ("unchanged", "rounding", "quantized", "changed", "resized")

_TITLES = {
    "identical": "IDENTICAL: every tensor is bitwise equal to the base.",
    "cast_only": "CAST ONLY: every difference is explained by a change of storage dtype.",
    "quantized_only": "QUANTIZED ONLY: every difference is explained by quantizing the base.",
    "derived": "DERIVED: a fine-tune of this base.",
    "unrelated": "UNRELATED: not derived from this base (large matrices are near-orthogonal).",
}


def verdict_title(summary: dict) -> str:
    """The verdict in capitals with its one-line meaning, as the terminal prints it first."""
    v = summary.get("verdict")
    return _TITLES.get(v, str(v))


def is_tied_row(t: dict) -> bool:
    """A tied LM head row (the tuned embedding again, shown against the base head)."""
    return bool(t.get("tied")) or str(t.get("note") or "").startswith("tied:")


def _counted(data: dict) -> list[dict]:
    return [t for t in data.get("tensors") or [] if not is_tied_row(t)]


def _mismatch(t: dict) -> bool:
    return t.get("status") == "resized" and t.get("compared") == "none"




def verdict_reason(data: dict) -> str:
    """One sentence saying why the verdict is what it is, from the numbers behind it."""
    s = data.get("summary") or {}
    counted = _counted(data)
    tbs = s.get("tensors_by_status") or {}
    scope = s.get("scope") or {}
    cos, rel = s.get("relatedness_cosine"), s.get("relatedness_rel_change")
    v = s.get("verdict")
    if not counted:
        return "No tensors were compared (check the include and exclude filters)."
    if v == "unrelated":
        if not any(t.get("status") in PAIRED for t in counted):
            return "No tensor of the tuned model has a counterpart in the base, even after prefix alignment."
        return (f"The large matrices are near-orthogonal to the base (weighted cosine {num(cos)}) and the "
                f"relative change of those matrices is {sci(rel)}, as between independently initialised models.")
    if v == "identical":
        return f"All {count(tbs.get('unchanged', 0))} tensors are bitwise identical to the base."
    if v == "cast_only":
        casts = sorted({f"{t.get('dtype_base')} -> {t.get('dtype_tuned')}" for t in counted
                        if t.get("status") == "rounding"})
        return (f"{count(tbs.get('rounding', 0))} tensors differ only within the rounding of a dtype cast "
                f"({', '.join(casts)}); no weight moved beyond it.")
    q = s.get("quantization") or {}
    if v == "quantized_only":
        unknown = (q.get("tensors") or 0) - (q.get("tensors_judged") or 0)
        return (f"Quantized from this base: all {count(tbs.get('quantized', 0))} quantized tensors differ from it "
                f"only within their own quantization noise floor {_quant_how(q)}, and every other tensor is "
                "unchanged or within rounding"
                + (f" ({count(unknown)} quantized tensors had no floor to test)" if unknown else "") + ".")
    parts = [f"{count(scope.get('tensors_changed'))} of {count(scope.get('tensors_total'))} tensors changed"]
    if scope.get("blocks_total"):
        parts.append(f"{scope.get('blocks_changed')} of {scope.get('blocks_total')} blocks")
    text = "Derived from this base: " + ", in ".join(parts)
    if cos is not None:
        text += f"; the large matrices keep 1 - cosine = {sci(max(0.0, 1 - cos))} with the base"
    elif not scope.get("tensors_changed"):
        text += "; every shared tensor is bitwise equal or within rounding"
    if q.get("tensors_beyond"):
        text += (f"; {count(q['tensors_beyond'])} of {count(q.get('tensors_judged'))} quantized tensors "
                 f"({share(q.get('share_beyond'))}) stand beyond the quantization noise floor {_quant_how(q)}, "
                 "so this is a fine-tune that was then quantized")
    return text + "."


#: how each noise-floor test is named in sentences (docs/methodology.md)
TEST_WORDS = {"bound": "the per-element bound of round-to-nearest",
              "first-group": "the first-group test for error-compensating quantizers",
              "statistical": "the share test for scale-searching quantizers",
              "none": "no test (the reader gives no floor)"}


def _quant_how(q: dict) -> str:
    tests = ", ".join(TEST_WORDS.get(t, t) for t in q.get("tests") or {})
    return f"({', '.join(q.get('formats') or [])}; decided by {tests})"


def headline(data: dict) -> list[str]:
    """The verdict's reason, then the sentences a reader can quote, each from the numbers."""
    s: dict[str, Any] = data.get("summary") or {}
    counted = _counted(data)
    by = s.get("params_by_status") or {}
    total = s.get("params_total")
    out = [s.get("verdict_reason") or verdict_reason(data)]
    if total:
        unchanged = by.get("unchanged", 0)
        same_rows = sum(t.get("numel_compared") or 0 for t in counted if t.get("status") == "resized"
                        and t.get("compared") in ("float", "bytes") and t.get("frac_changed") == 0)
        if same_rows:
            out.append(f"{share(unchanged / total)} of parameters are bitwise unchanged, "
                       f"{share((unchanged + same_rows) / total)} counting the shared rows of resized "
                       "tensors, which are bitwise unchanged too.")
        else:
            out.append(f"{share(unchanged / total)} of parameters are bitwise unchanged.")
        if by.get("rounding"):
            out.append(f"{share(by['rounding'] / total)} differ only within dtype rounding.")
        if by.get("quantized"):
            out.append(f"{share(by['quantized'] / total)} differ only within their quantization noise floor.")
    if s.get("blocks_total"):
        out.append(f"{s.get('blocks_changed')} of {s['blocks_total']} blocks changed.")
    if s.get("verdict") in ("derived", "unrelated") and s.get("relative_change") is not None:
        out.append(f"Relative change {sci(s['relative_change'])} (norm of all deltas over norm of the base).")
    f = s.get("form") or {}
    if f.get("kind") == "low_rank":
        out.append(f"The change is low-rank: at most rank {count(f.get('max_numerical_rank'))} per matrix.")
    elif f.get("kind") == "sparse":
        out.append(f"The change is sparse: {share(f.get('changed_element_share'))} of the elements of the "
                   "changed tensors differ.")
    elif f.get("kind") == "dense" and f.get("max_energy_rank_99") is not None:
        out.append(f"The change is dense: up to {count(f['max_energy_rank_99'])} directions per matrix hold 99% "
                   "of its energy.")
    elif f.get("kind") == "dense":
        out.append(f"The change is dense: {share(f.get('changed_element_share'))} of the elements of the "
                   "changed tensors differ (no rank analysis).")
    if s.get("delta_params"):
        out.append(f"Writing the change down takes {count(s['delta_params'])} parameters "
                   f"({share(s.get('delta_params_share'))} of the model).")
    for status, verb in (("added", ("were added", "was added")), ("removed", ("are missing", "is missing"))):
        rows = [t for t in counted if t.get("status") == status]
        if rows:
            n = len(rows)
            what = "tensor" if status == "added" else "base tensor"
            out.append(f"{count(n)} {what}{'s' if n != 1 else ''} {verb[0] if n != 1 else verb[1]} "
                       f"({count(sum(t.get('numel') or 0 for t in rows))} parameters).")
    for t in counted:
        if t.get("status") == "resized" and not _mismatch(t) and t.get("module") == "embed" and t.get("base_shape"):
            out.append(f"The vocabulary was resized from {count(t['base_shape'][0])} to {count(t['shape'][0])} rows.")
            break
    if "composite_base" in (s.get("flags") or []):
        n = len({t.get("base_index") for t in counted if t.get("base_name") is not None})
        out.append(f"The tuned model is assembled from {n} bases.")
    bad = sum(t.get("nonfinite") or 0 for t in counted)
    if bad:
        out.append(f"{count(bad)} non-finite values (NaN or Inf) were found.")
    return out
