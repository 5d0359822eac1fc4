"""The house style of every figure: palette, rc settings, axes helpers and byte-stable encoding.

Shared by the figure families (``figures_blocks``: depth profile, block x module heatmap,
experts; ``figures_change``: parameter share, rank, cosine; ``figures_reference``: the
reference scale; ``provenance``: the candidate chart). No pyplot: figures are plain
``Figure`` objects on an Agg canvas, so nothing touches a user's interactive backend or
pyplot's global figure list, and nothing needs a display. Colours: the Okabe-Ito palette
for categories and a greyscale-safe sequential map (cividis, reversed and cut before its
lightest end, so the largest change prints darkest) for the heatmaps; hatching and marker
shapes repeat what colour says, so a greyscale print keeps every distinction.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import escape_name

#: Okabe & Ito (2008), "Color Universal Design"
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7"}
GREY = "#8C8C8C"
STATUS_STYLE = {  # colour, hatch: distinct in colour and in greyscale
    "unchanged": ("#DDDDDD", ""), "rounding": (OKABE_ITO["sky"], ".."),
    "quantized": (OKABE_ITO["green"], "\\\\"), "changed": (OKABE_ITO["blue"], ""),
    "resized": (OKABE_ITO["purple"], "//"), "added": (OKABE_ITO["orange"], "xx"), "removed": ("#000000", "")}
CYCLE = [OKABE_ITO[k] for k in ("blue", "orange", "green", "vermillion", "purple", "sky", "black", "yellow")]

STYLE = {
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
    "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "axes.prop_cycle": __import__("cycler").cycler(color=CYCLE),
    "svg.hashsalt": "weightdiff", "svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42,
    "savefig.dpi": 300, "figure.dpi": 100, "hatch.linewidth": 0.6, "image.cmap": "cividis",
}
WIDTH = 6.4      # inches: a memo's text column; fonts of 8-10 pt stay legible printed at this width
FORMATS = ("png", "svg", "pdf")
#: metadata that would make the bytes depend on the clock or the matplotlib build
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
             "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}}
ZERO_LABEL = "0 (no change)"


def text(s: object) -> str:
    """A name from the JSON made safe for matplotlib: control characters escaped, ``$`` not mathtext."""
    return escape_name(str(s)).replace("$", r"\$")


def _figure(height: float) -> Figure:
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log_floor(values: list[float]) -> tuple[float, float]:
    """(zero line, top) of a log axis: the zero line a decade under the smallest positive value."""
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not pos:
        return 1e-4, 1.0
    lo, hi = min(pos), max(pos)
    floor = 10.0 ** (math.floor(math.log10(lo)) - 1)
    top = 10.0 ** math.ceil(math.log10(hi * 2.0))    # headroom: the largest marker never touches the top
    return floor, max(top, floor * 100)


def _zero_line(ax, floor: float) -> None:
    ax.axhline(floor, color=GREY, lw=0.8, ls=(0, (4, 3)), zorder=1)
    lo, hi = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if floor * 1.5 < t <= hi * 1.0001]
    ax.set_yticks([floor] + ticks)
    labels = [ZERO_LABEL] + [_pow10(t) for t in ticks]
    ax.set_yticklabels(labels)


def _pow10(v: float) -> str:
    e = math.log10(v)
    if abs(e - round(e)) < 1e-9:
        e = int(round(e))
        return {0: "1", 1: "10", -1: "0.1"}.get(e, f"$10^{{{e}}}$")
    return f"{v:g}"


def _integer_log_ticks(axis, lo: float, hi: float) -> None:
    """Plain integer labels (1, 2, 5, 10, 20, 50, ...) on a log axis instead of powers of ten."""
    cands = [m * 10 ** e for e in range(0, 8) for m in (1, 2, 5)]
    ticks = [c for c in cands if lo <= c <= hi]
    if len(ticks) > 7:
        ticks = [c for c in ticks if str(c)[0] in "15"]
    if len(ticks) > 7:
        ticks = [c for c in ticks if str(c)[0] == "1"]
    axis.set_ticks(ticks)
    axis.set_ticklabels([f"{c:,}" for c in ticks])
    axis.set_minor_formatter(lambda v, _: "")


def _block_ticks(ax, xs: list[int], labels: list[str]) -> None:
    n = len(xs)
    step = 1 if n <= 24 else max(1, int(math.ceil(n / 16)))
    ax.set_xticks(xs[::step])
    ax.set_xticklabels(labels[::step])


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=GREY)
    ax.set_xticks([])
    ax.set_yticks([])






#: the heatmaps' map: cividis reversed and cut before its lightest end, so the largest change
#: is the darkest cell and the smallest stays darker than the white "unchanged" cells in greyscale
HEAT = mcolors.ListedColormap(colormaps["cividis_r"](np.linspace(0.18, 1.0, 256)), name="weightdiff_heat")
#: the smallest span of a heatmap's colour scale, in decades: a narrow range of values
#: (0.497 to 0.502) gets nearly one colour instead of the whole map
MIN_DECADES = 1.0


def log_limits(lo: float, hi: float, min_decades: float = MIN_DECADES) -> tuple[float, float]:
    """Colour limits from the data, widened about their geometric middle to span at least
    ``min_decades`` decades.

    >>> [round(v, 4) for v in log_limits(0.497, 0.502)]
    [0.158, 1.5795]
    >>> log_limits(1e-4, 1e-1)
    (0.0001, 0.1)
    >>> all(0 < v < float("inf") for v in log_limits(5e-324, 5e-324) + log_limits(1e308, float("inf")))
    True
    """
    lo = min(max(lo, 1e-100), 1e100)                 # finite, positive limits LogNorm accepts,
    hi = min(max(hi, lo), 1e100)                     # whatever a hostile or extreme result holds
    if hi / lo >= 10 ** min_decades:
        return lo, hi
    mid = math.sqrt(lo) * math.sqrt(hi)
    half = 10 ** (min_decades / 2)
    return max(mid / half, 1e-100), min(mid * half, 1e100)


def distinct_ticks(lo: float, hi: float, fmt: Callable[[float, int], str]) -> tuple[list[float], list[str]]:
    """Ticks at 1, 2 and 5 times powers of ten inside [lo, hi] (at least two, the ends when
    fewer fall inside), labelled with as many digits as it takes for every label to differ."""
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    if len(ticks) > 6:
        ticks = [t for t in ticks if f"{t:e}"[0] in "15"]
    if len(ticks) < 2:
        ticks = sorted(set(ticks) | {lo, hi})
    for digits in range(2, 8):
        labels = [fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return ticks, labels
    return ticks, [f"{t:.6g}" for t in ticks]


def _styled(draw: Callable[[dict], Figure]) -> Callable[[dict], Figure]:
    """Draw under the house style, so ``draw_x(data)`` alone gives the figure ``save_figures`` saves."""
    @functools.wraps(draw)
    def wrapper(data: dict, *args, **kwargs) -> Figure:
        with rc_context(STYLE):
            return draw(data, *args, **kwargs)
    return wrapper


def figure_bytes(fig: Figure, fmt: str, dpi: int | None = None) -> bytes:
    """The figure encoded as ``fmt`` with no clock or build stamp in it (same figure, same bytes);
    PNG at 300 dpi unless ``dpi`` says otherwise."""
    buf = io.BytesIO()
    with rc_context(STYLE):
        fig.savefig(buf, format=fmt, dpi=dpi or (300 if fmt == "png" else 72), metadata=_METADATA[fmt])
    return buf.getvalue()
