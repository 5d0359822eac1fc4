"""The population of a survey: the surveyed fine-tunes of one base, and one model among them.

Reads survey rows (dicts with the columns of ``weightdiff survey``'s table: ``tuned``,
``status``, ``relative_change``, ``one_minus_cosine``, ``delta_params_share``, ...),
never checkpoints. ``fine_tunes`` picks the rows that count as fine-tunes of the base
(the population of both the figure and the sentences); ``draw_population`` plots the
three depth measures, one dot per fine-tune, with outliers labelled; ``save_population``
writes it as PNG and SVG with the byte-stable settings of ``render.plots``;
``population_sentences`` places one compare result among the rows for the memo ("deeper than 34 of the 40 surveyed fine-tunes").

>>> rows = [{"tuned": f"/m{i}", "status": "ok", "relative_change": v} for i, v in enumerate([0.1, 0.2, 0.3])]
>>> standing(0.25, [r["relative_change"] for r in rows])
(2, 0, 3)
"""

from __future__ import annotations

import math
from collections import Counter
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

from ..fsutil import write_bytes
from ..records import share_lower
from .formats import sci, share
from .figstyle import GREY, OKABE_ITO, STYLE, _figure, figure_bytes, text

#: (column, axis label, name in sentences, comparison in sentences)
METRICS = [("relative_change", "relative change ‖ΔW‖ / ‖W‖", "relative change", "deeper than"),
           ("one_minus_cosine", "1 − cosine (large matrices)", "1 − cosine", "further from the base than"),
           ("delta_params_share", "delta parameters (share of the model)", "delta parameters", "larger than")]
#: at most this many labelled outliers per panel
LABELS = 4
#: the least interquartile range (of log10 values) the outlier fences are drawn from: a factor of 2. With
#: the middle half of the models (nearly) equal, every other dot was an outlier, one 0.07% away included
SPREAD_FLOOR = math.log10(2.0)
#: the verdicts of the rows that count as fine-tunes of the base, in the figure and in the memo's sentences
FINE_TUNE_VERDICTS = ("derived", "partial")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ok_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows with a result, sorted by tuned path (error rows left out)."""
    return sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: str(r.get("tuned")))


def fine_tunes(rows: Sequence[dict]) -> tuple[list[dict], Counter]:
    """The ``ok`` rows that count as fine-tunes of the base (the survey judged them ``derived`` or
    ``partial``; a row without a verdict is kept), and a Counter of the verdicts of the others: a bitwise
    copy, a cast or an unrelated model is not a fine-tune, and would move the medians.

    >>> good, left = fine_tunes([{"tuned": "/a", "status": "ok", "verdict": "derived"},
    ...                          {"tuned": "/b", "status": "ok", "verdict": "identical"}])
    >>> [r["tuned"] for r in good], dict(left)
    (['/a'], {'identical': 1})
    """
    good = [r for r in ok_rows(rows) if not r.get("verdict") or r["verdict"] in FINE_TUNE_VERDICTS]
    left = Counter(str(r["verdict"]) for r in ok_rows(rows)
                   if r.get("verdict") and r["verdict"] not in FINE_TUNE_VERDICTS)
    return good, left


def left_out(left: Counter) -> str:
    """How many rows ``fine_tunes`` left out, and why, in words: ``1 cast_only, 2 identical``."""
    return ", ".join(f"{v} {k}" for k, v in sorted(left.items()))


def interval(row: dict, col: str) -> tuple[float, float] | None:
    """A row's value of ``col`` as [lo, hi]: the delta-parameter share is a bracket when its row has a
    lower end (``delta_params_share_lower``: some energy ranks were brackets), else lo == hi."""
    v = row.get(col)
    if not _finite(v):
        return None
    lo = row.get("delta_params_share_lower") if col == "delta_params_share" else None
    return (lo, v) if _finite(lo) and lo < v else (v, v)


def standing_bracket(mine: tuple[float, float], others: Sequence[tuple[float, float] | None]) -> tuple[int, int, int, int]:
    """(how many of ``others`` lie wholly below ``mine``, how many equal it exactly, how many overlap it
    so that neither is established to be larger, how many have a value).

    >>> standing_bracket((0.09, 0.85), [(0.02, 0.15), (0.01, 0.01), (0.9, 0.9)])
    (1, 0, 1, 3)
    """
    vals = [o for o in others if o is not None]
    below = sum(o[1] < mine[0] for o in vals)
    equal = sum(o == mine and o[0] == o[1] for o in vals)
    above = sum(o[0] > mine[1] for o in vals)
    return below, equal, len(vals) - below - equal - above, len(vals)


def standing(value: float, others: Sequence[float | None]) -> tuple[int, int, int]:
    """(how many of ``others`` are below ``value``, how many equal it, how many have a value)."""
    vals = [v for v in others if _finite(v)]
    return sum(v < value for v in vals), sum(v == value for v in vals), len(vals)


def model_label(row: dict) -> str:
    """A short name for a dot: the last part of the tuned path."""
    return os.path.basename(str(row.get("tuned") or "").rstrip("/")) or "?"


def outliers(rows: Sequence[dict], column: str, limit: int = LABELS) -> list[dict]:
    """Rows whose value lies beyond 1.5 interquartile ranges of the others (on log10 of the
    positive values; a range narrower than a factor of 2 counts as a factor of 2, ``SPREAD_FLOOR``),
    the most extreme first, at most ``limit``; none with fewer than 5 values.

    >>> outliers([{"tuned": f"/m{i}", "x": v} for i, v in enumerate([0.9984] * 4 + [1.0])], "x")
    []
    >>> [r["tuned"] for r in outliers([{"tuned": f"/m{i}", "x": v} for i, v in enumerate([0.9984] * 4 + [1e-3])], "x")]
    ['/m4']
    """
    pts = [(math.log10(r[column]), r) for r in rows if _finite(r.get(column)) and r[column] > 0]
    if len(pts) < 5:
        return []
    logs = np.array([p[0] for p in pts])
    q1, q3 = np.percentile(logs, [25, 75])
    spread = max(float(q3 - q1), SPREAD_FLOOR)
    lo, hi = q1 - 1.5 * spread, q3 + 1.5 * spread
    mid = float(np.median(logs))
    out = [(abs(x - mid), str(r.get("tuned")), r) for x, r in pts if x < lo or x > hi]
    return [r for _, _, r in sorted(out, key=lambda t: (-t[0], t[1]))[:limit]]


def _jitter(n: int) -> np.ndarray:
    """Deterministic vertical spread for n dots (golden-ratio sequence in [-0.35, 0.35])."""
    return (((np.arange(n) * 0.6180339887498949) % 1.0) - 0.5) * 0.7


def draw_population(rows: Sequence[dict]) -> Figure:
    """Three strips (relative change, 1 - cosine, delta-parameter share), one dot per fine-tune of the
    base (``fine_tunes``: the population of the memo's sentences; the title says how many rows are left
    out and why), log axes with bitwise-unchanged models on a marked zero line, outliers labelled."""
    with rc_context(STYLE):
        return _draw(rows)


def _draw(rows: Sequence[dict]) -> Figure:
    good, left = fine_tunes(rows)
    fig = _figure(1.0 + 1.35 * len(METRICS))
    axes = fig.subplots(len(METRICS), 1)
    title = f"Population: {len(good)} surveyed fine-tune{'' if len(good) == 1 else 's'} of one base"
    if left:
        n = sum(left.values())
        # wrapped to the figure's width (one line ran past both edges), the verdicts in words
        import textwrap

        words = left_out(left).replace("cast_only", "cast only").replace("quantized_only", "quantized only")
        title += "\n" + textwrap.fill(f"({n} other surveyed {'model' if n == 1 else 'models'} left out, by their "
                                      f"verdicts not fine-tunes of the base: {words})", width=80)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    for ax, (col, label, _, _) in zip(axes, METRICS):
        vals = [r.get(col) for r in good]
        have = [(r, v) for r, v in zip(good, vals) if _finite(v)]
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        ax.set_xlabel(label + " (log)", fontsize=8)
        if not have:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color=GREY)
            ax.set_xticks([])
            continue
        pos = [v for _, v in have if v > 0]
        lo = min(pos) if pos else 1e-4
        hi = max(pos) if pos else 1.0
        zeros = len(pos) < len(have)      # the zero line only when some model changed nothing
        floor = 10.0 ** (math.floor(math.log10(lo)) - (1 if zeros else 0))
        if lo < floor * 1.2:              # on a decade (every model's delta share 1.0): not on the axis's edge
            floor /= 10.0
        top = 10.0 ** math.ceil(math.log10(hi * 2.0))
        ax.set_xscale("log")
        ax.set_xlim(floor / 2.5 if zeros else floor, max(top, floor * 100))
        ax.set_ylim(-0.6, 0.6)
        ys = _jitter(len(have))
        xs = np.array([v if v > 0 else floor for _, v in have])   # zeros sit on the zero line
        zero = np.array([v <= 0 for _, v in have])
        spans = [interval(r, col) for r, _ in have]
        ranged = np.array([sp is not None and sp[0] < sp[1] for sp in spans])
        dots = ~zero & ~ranged
        if dots.any():
            ax.plot(xs[dots], ys[dots], "o", ms=4.5, color=OKABE_ITO["blue"], alpha=0.8, zorder=3)
        for i in np.flatnonzero(ranged):      # a bracket is drawn as its range, never as a point
            ax.plot([max(spans[i][0], floor), spans[i][1]], [ys[i], ys[i]], "-", marker="|", ms=6, lw=1.2,
                    color=OKABE_ITO["blue"], alpha=0.8, zorder=3)
        if zero.any():
            ax.plot(xs[zero], ys[zero], "o", ms=4.5, mfc="white", mec=GREY, zorder=3)
        if zeros:
            ax.axvline(floor, color=GREY, lw=0.8, ls=(0, (4, 3)), zorder=1)
        med = float(np.median([v for _, v in have]))
        if med > 0:
            ax.axvline(med, color=OKABE_ITO["orange"], lw=1.0, zorder=2)
            ax.text(med, 0.58, " median", color=OKABE_ITO["orange"], fontsize=7, va="top")
        first = floor * 1.5 if zeros else floor / 1.0001
        ticks = [t for t in ax.get_xticks() if first < t <= ax.get_xlim()[1] * 1.0001]
        ax.set_xticks(([floor] if zeros else []) + ticks)
        ax.set_xticklabels((["0"] if zeros else []) + [f"$10^{{{int(round(math.log10(t)))}}}$" for t in ticks])
        ax.minorticks_off()
        index = {id(r): i for i, (r, _) in enumerate(have)}
        for r in outliers(good, col):
            i = index[id(r)]
            ax.annotate(text(model_label(r)), (xs[i], ys[i]), xytext=(4, 4), textcoords="offset points",
                        fontsize=7, color=OKABE_ITO["vermillion"])
    return fig


def save_population(rows: Sequence[dict], directory: str | os.PathLike,
                    formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``population.<fmt>`` into ``directory`` (each format from a fresh figure, atomically)."""
    return [write_bytes(Path(directory) / f"population.{fmt}", figure_bytes(draw_population(rows), fmt))
            for fmt in formats]


def population_sentences(data: dict, rows: Sequence[dict]) -> list[str]:
    """Where the model of ``data`` (a compare JSON dict) stands among the surveyed ``rows``.

    The model's own row, if the survey holds it, is left out of the comparison.
    """
    s = data.get("summary") or {}
    tuned = (data.get("tuned") or {}).get("path")
    own = {tuned, os.path.abspath(tuned)} if tuned else set()    # a local path made absolute, or a repo id
    mine_rows = [r for r in ok_rows(rows) if r.get("tuned") not in own]
    others = "other " if len(mine_rows) < len(ok_rows(rows)) else ""
    good, left = fine_tunes(mine_rows)
    bases = sorted({str(r.get("base")) for r in good if r.get("base")})
    mine = [os.path.abspath(str(b.get("path"))) for b in data.get("base") or [] if b.get("path")]
    of = "this base" if bases and set(bases) <= set(mine) else \
        ("the base " + ", ".join(f"`{b}`" for b in bases) if bases else "the surveyed base")
    cos = s.get("relatedness_cosine")
    values = {"relative_change": s.get("relative_change"),
              "one_minus_cosine": None if cos is None else max(0.0, 1.0 - cos),
              "delta_params_share": s.get("delta_params_share")}
    mine_lo = share_lower(s)                            # delta_params is then an upper bound
    fmt = {"relative_change": sci, "one_minus_cosine": sci, "delta_params_share": share}
    subject = "this fine-tune" if s.get("verdict") in (None, *FINE_TUNE_VERDICTS) else "this model"
    out = []
    for col, _, words, than in METRICS:
        v = values[col]
        if not _finite(v):
            continue
        bracketed = col == "delta_params_share" and mine_lo is not None and mine_lo < v
        spans = [interval(r, col) for r in good]
        below, equal, undecided, n = standing_bracket((mine_lo, v) if bracketed else (v, v), spans)
        if not n:
            continue
        los, his = [x[0] for x in spans if x], [x[1] for x in spans if x]
        med_lo, med_hi = float(np.median(los)), float(np.median(his))
        med = fmt[col](med_hi) if med_lo == med_hi else f"between {fmt[col](med_lo)} and {fmt[col](med_hi)}"
        tie = f"; {equal} exactly as deep" if equal else ""
        if undecided:           # brackets that overlap: neither is established to be the larger
            tie += f"; {undecided} undecided (the ranges overlap)"
        shown = f"between {share(mine_lo)} and {share(v)}" if bracketed else fmt[col](v)
        if not out:
            out.append(f"By {words} ({shown}), {subject} is deeper than {below} of the {n} "
                       f"{others}surveyed fine-tunes of {of} (median {med}{tie}).")
        else:
            out.append(f"By {words} ({shown}) it is {than} {below} of {n} "
                       f"(median {med}{tie}).")
    if not out:
        out.append(f"The survey holds no {others}fine-tune of {of} with a result to compare this one with.")
    if left:
        n = sum(left.values())
        out.append(f"{n} {others}surveyed {'model is' if n == 1 else 'models are'} left out: by the survey's own "
                   f"verdicts, not fine-tunes of the base ({left_out(left)}).")
    return out
