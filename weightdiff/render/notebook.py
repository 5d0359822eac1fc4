"""The notebook face of a comparison: a short repr, an HTML card, pandas tables.

``card_html(data)`` is what Jupyter shows for a ``Comparison`` (``_repr_html_``): the
verdict, the key figures of the memo's first page and the depth profile as a small inline
PNG, well under 50 KB, with no raw per-tensor data. ``tables(data)`` gives the rows that
``Comparison.to_pandas`` turns into DataFrames: one row per tensor (the JSON's ``tensors``,
rank fields flattened as ``rank.<field>``, the spectrum left out) or per block.
"""

from __future__ import annotations

import base64
import html

from ..errors import escape_name
from . import formats as fmt
from . import sentences
from .figstyle import figure_bytes
from .reference import only_nonfinite

__all__ = ["short_repr", "card_html", "rows", "TABLES"]

TABLES = ("tensors", "blocks")


def _h(x: object) -> str:
    return html.escape(escape_name(str(x)), quote=True)


def short_repr(data: dict) -> str:
    """One line: ``<Comparison derived: base -> tuned, 16 of 76 tensors changed or added, relative change 6.1e-2>``."""
    s = data.get("summary") or {}
    scope = s.get("scope") or {}
    base = ", ".join(sentences.model_label(b) for b in data.get("base") or [])
    return (f"<Comparison {s.get('verdict')}: {escape_name(base)} -> {escape_name(sentences.model_label(data.get('tuned')))}, "
            f"{fmt.at_least(s)}{fmt.count(scope.get('tensors_changed'))} of {fmt.count(scope.get('tensors_total'))} tensors "
            f"{'changed or added' if (s.get('tensors_by_status') or {}).get('added') else 'changed'}, "
            f"relative change {'n/a' if only_nonfinite(data) else fmt.sci(s.get('relative_change'))}>")


def card_html(data: dict) -> str:
    """The Jupyter card: verdict, reason, key figures, the depth profile inline."""
    from .figures_blocks import draw_depth
    from .memo import key_figures

    s = data.get("summary") or {}
    png = figure_bytes(draw_depth(data, height=2.6), "png", dpi=90)
    rows = "".join(f"<tr><th style='text-align:left'>{_h(k)}</th><td style='text-align:right'>{_h(v)}</td></tr>"
                   for k, v, _ in key_figures(data))
    base = ", ".join(sentences.model_label(b) for b in data.get("base") or [])
    return ("<div class='weightdiff-card' style='max-width:46rem;font-family:sans-serif'>"
            f"<div style='font-size:.85em;color:#555'>weightdiff: {_h(base)} &rarr; "
            f"{_h(sentences.model_label(data.get('tuned')))}</div>"
            f"<div style='font-size:1.1em;margin:.3em 0;padding:.3em .6em;border-left:4px solid #0072B2;"
            f"background:#eef5fb'><b>{_h(sentences.verdict_title(s))}</b><br>{_h(s.get('verdict_reason') or '')}</div>"
            f"<table style='border-collapse:collapse;font-size:.9em'>{rows}</table>"
            f"<img alt='depth profile' style='max-width:100%' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode('ascii')}'></div>")


def rows(data: dict, table: str) -> list[dict]:
    """Flat rows of ``table`` ("tensors" or "blocks") for a DataFrame."""
    if table == "blocks":
        out = []
        for b in data.get("blocks") or []:
            r = {k: v for k, v in b.items() if k != "modules"}
            r.update({f"module.{k}": v for k, v in (b.get("modules") or {}).items()})
            out.append(r)
        return out
    out = []
    for t in data.get("tensors") or []:
        r = {k: v for k, v in t.items() if k not in ("rank", "rounding_floor")}
        for k, v in (t.get("rank") or {}).items():
            if k not in ("spectrum", "extra", "bounds"):
                r[f"rank.{k}"] = v
        out.append(r)
    return out
