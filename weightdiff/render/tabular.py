"""CSV rendering: one row per tensor record of a compare result dict (for spreadsheets).

Text cells are made safe for spreadsheets and terminals: a cell starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return gets a leading ``'`` so no spreadsheet runs it as a
formula (OWASP's advice against CSV injection), and control characters and bidi overrides
are written as escapes as the terminal output does (``\\x1b``, ``\\u202e``). Numbers stay numbers.

>>> text_cell("=cmd|' /C calc'!A0"), text_cell("-2+3"), text_cell("a\x1bb")
("'=cmd|' /C calc'!A0", "'-2+3", 'a\\\\x1bb')
"""

from __future__ import annotations

import csv
import io

from ..errors import escape_name

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
            if c == "shape" and v is not None:
                v = "x".join(str(x) for x in v)
            row.append("" if v is None else text_cell(v) if isinstance(v, str) else v)
        w.writerow(row)
    return buf.getvalue()
