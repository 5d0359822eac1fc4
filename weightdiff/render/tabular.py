"""CSV rendering for spreadsheets: one row per tensor of a compare result, per candidate of a
provenance result, per step of a lineage result. Full-precision numbers, missing values empty.

Text cells are made safe for spreadsheets and terminals: a cell starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return gets a leading ``'`` so no spreadsheet runs it as a
formula (OWASP's advice against CSV injection), and control characters and bidi overrides
are written as escapes as the terminal output does (``\\x1b``, ``\\u202e``). Numbers stay numbers.

>>> text_cell("=cmd|' /C calc'!A0"), text_cell("-2+3"), text_cell("a\x1bb")
("'=cmd|' /C calc'!A0", "'-2+3", 'a\\\\x1bb')

A rank that is a bound (a partial spectrum) is written with its sign (``≥ 64``,
``render.formats.rank_text``), never as a bare number; the JSON keeps the bracket.
"""

from __future__ import annotations

import csv
import io

from ..errors import escape_name
from .formats import rank_text

COLUMNS = ("name", "base_name", "status", "block", "module", "shape", "dtype_base", "dtype_tuned", "numel",
           "norm_base", "norm_tuned", "norm_delta", "rel_change", "cosine", "frac_changed",
           "frac_beyond_rounding", "max_abs_delta", "nonfinite", "sign_flips", "stable_rank",
           "effective_rank", "energy_rank_90", "energy_rank_99", "numerical_rank", "noise_floor", "note")
RANK_COLUMNS = ("stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99", "numerical_rank", "noise_floor")


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: str) -> str:
    """A text cell no spreadsheet evaluates and no terminal interprets."""
    if value.startswith(_FORMULA):
        value = "'" + value
    return escape_name(value)


def _table(header: tuple[str, ...], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else text_cell(v) if isinstance(v, str) else v for v in r])
    return buf.getvalue()


PROVENANCE_COLUMNS = ("rank", "path", "verdict", "relative_change_large", "cosine_large", "identical_share",
                      "coverage", "compared")
LINEAGE_COLUMNS = ("step", "from", "to", "verdict", "relative_change", "one_minus_cosine", "norm_delta",
                   "blocks_changed", "blocks_total", "delta_params", "delta_params_lower", "share_of_path",
                   "blocks_reshaped", "params_compared")


def provenance_csv(result: dict) -> str:
    """One row per compared candidate of a provenance result."""
    return _table(PROVENANCE_COLUMNS, ([c.get(k) for k in PROVENANCE_COLUMNS] for c in result.get("candidates", [])))


def lineage_csv(result: dict) -> str:
    """One row per step of a lineage chain, then the end-to-end row (``share_of_path``: its straightness)."""
    steps = [dict(s, step=str(i)) for i, s in enumerate(result.get("steps", []), 1)]
    end = dict(result.get("end_to_end") or {}, step="end to end")
    end["share_of_path"] = end.get("straightness")
    return _table(LINEAGE_COLUMNS, ([s.get(k) for k in LINEAGE_COLUMNS] for s in steps + [end]))


def to_csv(result: dict) -> str:
    """The tensors table as CSV text (shape as ``4096x4096``, missing values empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for t in result.get("tensors", []):
        rank = t.get("rank") or {}
        row = []
        for c in COLUMNS:
            v = rank.get(c) if c in RANK_COLUMNS else t.get(c)
            if c in RANK_COLUMNS and v is not None and c in (rank.get("bounds") or {}):
                v = rank_text(rank, c)
            if c == "shape" and v is not None:
                v = "x".join(str(x) for x in v)
            row.append("" if v is None else text_cell(v) if isinstance(v, str) else v)
        w.writerow(row)
    return buf.getvalue()
