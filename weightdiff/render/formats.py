"""The one set of number formats: every number a person reads is written here.

The terminal, the captions and figures, the memo (HTML, Markdown), the headline
sentences and the lineage and provenance texts all format numbers with these functions,
so one quantity reads the same everywhere (docs/report.md lists the conventions). The
JSON and the CSV keep full-precision numbers for machines.

* ``count``: parameter, tensor and block counts, exact with thousands separators.
* ``share``: a share of a whole as a percentage: one decimal from 1% up, three
  significant digits below, never rounding a partial share to 0% or 100%.
* ``sci``: 1 - cosine and relative change, two significant digits in scientific
  notation without exponent padding (``4.6e-3``; ``1.4`` between 1 and 10), whatever
  their size.
* ``num``: other plain measurements (norms, seconds, ranks as floats): three
  significant digits, scientific outside [0.01, 1000).
* ``bound``: a value that is a bound prints with its sign (``≥ 64``), never bare.

>>> count(6912000), share(0.1090), share(0.000731), share(0.99996), sci(0.0045512), num(12.345)
('6,912,000', '10.9%', '0.0731%', '99.996%', '4.6e-3', '12.3')
>>> bound(64, "lower"), bound(64, None)
('≥ 64', '64')
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MISSING", "count", "share", "sci", "num", "bound", "rank_text"]

#: what a missing or non-finite value prints as
MISSING = "n/a"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tuned_params(s: dict) -> int:
    """Parameters of the tuned model: ``params_total`` less the removed base parameters it counts."""
    return max(0, int(s.get("params_total") or 0) - int((s.get("params_by_status") or {}).get("removed", 0) or 0))


def count(n: Any) -> str:
    """``6912000`` -> ``'6,912,000'``."""
    return f"{int(n):,}" if _finite(n) else MISSING


def share(x: Any) -> str:
    """A share in [0, 1] as a percentage (see the module docstring).

    >>> share(0), share(1), share(0.5), share(3e-9), share(0.9999999), share(0.009996)
    ('0%', '100%', '50.0%', '0.0000003%', '99.99999%', '1.0%')
    """
    if not _finite(x):
        return MISSING
    pct = 100.0 * x
    if pct == 0:
        return "0%"
    if pct == 100:
        return "100%"
    if abs(pct) >= 1:
        decimals = 1
    else:
        decimals = max(1, 2 - math.floor(math.log10(abs(pct))))
    for d in range(decimals, 16):
        text = f"{pct:.{d}f}"
        if float(text) not in (0.0, 100.0):
            if abs(pct) < 1 and abs(float(text)) >= 1:
                text = f"{pct:.1f}"          # 0.9996% rounds up to 1: "1.0%", as the shares above 1% print
            elif abs(pct) < 1:
                text = text.rstrip("0")
            return text + "%"
    return f"{pct!r}%"


def sci(x: Any, digits: int = 2) -> str:
    """Scientific notation, no exponent padding: ``0.000123`` -> ``'1.2e-4'``; 0 -> ``'0'``."""
    if not _finite(x):
        return MISSING
    if x == 0:
        return "0"
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return mant if int(exp) == 0 else f"{mant}e{int(exp)}"


def num(x: Any, digits: int = 3) -> str:
    """A plain decimal between 0.01 and 1000 (``0.0423``, ``12.5``), scientific outside."""
    if not _finite(x):
        return MISSING
    if x == 0:
        return "0"
    if 0.01 <= abs(x) < 1000:
        text = f"{x:.{digits}g}"
        # fewer digits than the integer part has: "1.8e+02" for 180.7 with 2; a plain decimal is promised
        return text if "e" not in text else f"{x:.0f}"
    return sci(x, digits)


def bound(value: Any, kind: str | None, fmt=count) -> str:
    """A value with its bound sign: ``kind`` is ``"lower"`` (≥), ``"upper"`` (≤) or None (exact)."""
    text = fmt(value)
    if text == MISSING or kind is None:
        return text
    return {"lower": "≥ ", "upper": "≤ "}[kind] + text


def delta_params_count(d: dict) -> str:
    """``delta_params`` of a summary or a block as a count, ``≤ N`` when it is an upper bound."""
    return ("≤ " if d.get("delta_params_lower") is not None else "") + count(d.get("delta_params"))


def delta_params_text(s: dict) -> str:
    """``delta_params`` of a summary with its share: ``≤ N`` when it is an upper bound
    (``delta_params_lower`` is set: some energy ranks are brackets, or some changed matrices have no rank);
    where tensors within their quantization noise floor sit beside changed ones (``within_floor``) the figure
    covers only the tensors beyond the floor, and says so: it is no bound for the whole model."""
    if nothing_compared(s):
        return f"{MISSING} (nothing was compared: no change was measured to write down)"
    return f"{delta_params_count(s)} ({share(s.get('delta_params_share'))} of the model){floor_clause(s)}"


def nothing_compared(s: dict) -> bool:
    """No element of either model was compared (every pair of another shape, or no pair at all): a count of
    changed blocks, or a number of parameters to write "the change" down, would claim what was not measured.

    >>> nothing_compared({"coverage": {"base": {"compared": 0}, "tuned": {"compared": 0}}})
    True
    """
    cov = s.get("coverage") or {}
    b, t = cov.get("base") or {}, cov.get("tuned") or {}
    return bool(b or t) and not b.get("compared") and not t.get("compared")


def blocks_changed_text(changed: Any, total: Any, reshaped: Any = 0, compared: bool = True,
                        least: str = "", short: bool = False) -> str:
    """A count of changed blocks as every text says it; blocks whose only difference is tensors of another
    shape (never compared: ``scope.blocks_reshaped``) said apart; none claimed when nothing was compared.

    >>> blocks_changed_text(0, 4, reshaped=1)
    '0 of 4 blocks changed (1 other holds tensors of another shape than in the base, not compared)'
    >>> blocks_changed_text(4, 4, compared=False)
    'none of the 4 blocks could be compared'
    >>> blocks_changed_text(4, 4, compared=False, short=True)   # a table cell headed "blocks changed"
    'n/a (none could be compared)'
    """
    if not compared:
        if short:
            return f"{MISSING} ({'it could not be compared' if total == 1 else 'none could be compared'})"
        return "the one block could not be compared" if total == 1 else \
            f"none of the {count(total)} blocks could be compared"
    n = int(reshaped or 0)
    more = (f" ({count(n)} {'other holds' if n == 1 else 'others hold'} tensors of another shape than in the base, "
            "not compared)") if n else ""
    return f"{least}{count(changed)} of {count(total)}{'' if short else ' blocks changed'}{more}"


def summary_blocks_text(s: dict, short: bool = False) -> str:
    """``blocks_changed_text`` of a compare summary (``floor_blocks`` is the caller's); blocks with no base
    counterpart (``scope.blocks_added``) are said as added, not changed: "2 of 6 blocks changed" was printed of
    a model with 2 new blocks appended and none of the base's touched, whose Figure 1 said "0 of 6".

    >>> summary_blocks_text({"blocks_changed": 2, "blocks_total": 6, "scope": {"blocks_added": {"blocks": ["a", "b"]}}})
    '0 of 6 blocks changed, 2 added (not in the base)'
    """
    added = len(((s.get("scope") or {}).get("blocks_added") or {}).get("blocks") or ())
    text = blocks_changed_text(max(0, int(s.get("blocks_changed") or 0) - added) if added else s.get("blocks_changed"),
                               s.get("blocks_total"), (s.get("scope") or {}).get("blocks_reshaped"),
                               not nothing_compared(s), at_least(s), short)
    return text + (f", {count(added)} added (not in the base)" if added and not nothing_compared(s) else "")


def summary_tensors_text(s: dict) -> str:
    """The count of changed tensors of a compare summary's scope line; tensors of another shape (never
    compared: ``scope.tensors_reshaped``) said apart, and none claimed when nothing was compared."""
    sc = s.get("scope") or {}
    n = int((sc.get("tensors_reshaped") or {}).get("tensors") or 0)
    total = sc.get("tensors_total")
    if nothing_compared(s):
        return (("the one tensor could not be compared" if total == 1 else
                 f"none of the {count(total)} tensors could be compared")
                + (f" ({count(n)} of another shape than in the base)" if n else ""))
    added = " changed or added" if (s.get("tensors_by_status") or {}).get("added") else ""
    return (f"{at_least(s)}{count(sc.get('tensors_changed'))} of {count(total)} tensors{added}"
            + (f" ({count(n)} {'other' if n == 1 else 'others'} of another shape than in the base, not compared)" if n else ""))


def step_compared(step: dict) -> bool:
    """Some element of a lineage step's two models was compared (``params_compared``; a result written
    before that field is assumed to have compared some)."""
    return step.get("params_compared", 1) != 0


def step_blocks_text(step: dict, short: bool = False) -> str:
    """The blocks a lineage step changed, as compare says it (``blocks_changed_text``)."""
    return blocks_changed_text(step.get("blocks_changed"), step.get("blocks_total"), step.get("blocks_reshaped"),
                               step_compared(step), short=short)


def within_floor(s: dict) -> dict | None:
    """``scope.within_quant_floor`` of a summary: tensors within their quantization noise floor beside
    tensors found changed (flag ``quant_floor_lower_bounds``). A change smaller than the floor does not show
    in them, so the counts of changed tensors and blocks are lower bounds and ``delta_params`` covers only
    the tensors beyond the floor; None otherwise."""
    return (s.get("scope") or {}).get("within_quant_floor") or None


def at_least(s: dict) -> str:
    """``"at least "`` before a count of changed tensors or blocks that is a lower bound (``within_floor``)."""
    return "at least " if within_floor(s) else ""


def floor_rest(s: dict) -> str:
    """The tensors a delta-params figure leaves out where tensors within the quantization noise floor may hide a
    change (``within_floor``), as a clause; "" otherwise."""
    w = within_floor(s)
    if not w:
        return ""
    n = int(w.get("tensors") or 0)
    return (f"the {count(n)} {'tensor' if n == 1 else 'tensors'} within {'its' if n == 1 else 'their'} "
            "quantization noise floor may hold a change smaller than that noise, which no figure here bounds")


def floor_clause(s: dict) -> str:
    """What a delta-params figure covers where tensors within the quantization noise floor may hide a change."""
    rest = floor_rest(s)
    return f", for the tensors beyond the quantization noise floor only; {rest}" if rest else ""


def floor_blocks(s: dict) -> str:
    """A parenthesis after a count of changed blocks that is a lower bound: the blocks that may hide a change."""
    w = within_floor(s)
    n = int((w or {}).get("blocks") or 0)
    if not n:
        return ""
    return (f" ({count(n)} more {'holds' if n == 1 else 'hold'} tensors within their quantization noise floor, "
            "which may hide a smaller change)")


def max_rank(d: dict, missing: str = MISSING) -> str:
    """The largest numerical rank of a summary ``form`` or a block: a count when exact, ``lo-hi``
    when ``max_numerical_rank_bounds`` holds a bracket (the value is then null), else ``missing``."""
    b = d.get("max_numerical_rank_bounds")
    if b:
        return f"{count(b[0])}-{count(b[1])}"
    return missing if d.get("max_numerical_rank") is None else count(d["max_numerical_rank"])


def rank_text(rank: dict | None, field: str = "numerical_rank", fmt=count) -> str:
    """A field of a tensor's ``rank`` block: exact as ``fmt`` writes it (a count; ``num`` for
    ``stable_rank``), a bracket ``[lo, hi]`` as ``≥ lo`` (the field holds the lower end), an
    estimate as ``~value``."""
    if not rank or rank.get(field) is None:
        return MISSING
    bounds = rank.get("bounds") or {}
    if field in (rank.get("estimated") or []):
        # an estimate (effective_rank: the even-spread value, the upper end of its range) is never a bound
        return "~" + num(rank[field])
    if field in bounds and bounds[field]:
        return bound(bounds[field][0], "lower", fmt)
    return fmt(rank[field])
