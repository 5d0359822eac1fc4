"""Figures along the depth of the model: depth profile, block x module heatmap, experts x blocks.

Each ``draw_*`` takes the compare JSON dict and returns a matplotlib ``Figure`` in the house
style (``render.figstyle``); the numbers they place come from ``render.captions`` so a
caption and its figure cannot disagree (tests/test_plots.py checks them against each other).
Unlike ``figures_change`` (whole-model views: parameter share, rank, cosine), every figure
here has the model's blocks, input to top, on its x axis.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import captions as cap
from . import formats as fmt
from .figstyle import (GREY, HEAT, OKABE_ITO, _block_ticks, _empty, _figure, _log_floor, _styled, _zero_line,
                       distinct_ticks, log_limits, text)

__all__ = ["draw_depth", "draw_heatmap", "draw_experts", "UNCHANGED_HATCH", "ABSENT_HATCH"]

#: hatches of the heatmaps' cells without a colour: no change at all, and a kind the block lacks
UNCHANGED_HATCH, ABSENT_HATCH = "///", "xxx"


def _markers(ax, xs, vals, states, floor: float, ms: float, rd_label: str = "rounding only") -> list:
    ch = [(x, v) for x, v, s in zip(xs, vals, states) if s == "changed" and v]
    zero_changed = [x for x, v, s in zip(xs, vals, states) if s == "changed" and not v]
    rd = [(x, v) for x, v, s in zip(xs, vals, states) if s == "rounding"]
    un = [x for x, s in zip(xs, states) if s == "unchanged"]
    nan = [x for x, s in zip(xs, states) if s == "nonfinite"]
    handles = []
    if ch:
        ax.vlines([x for x, _ in ch], floor, [v for _, v in ch], color=OKABE_ITO["blue"], lw=1.2, zorder=2)
        ax.plot([x for x, _ in ch], [v for _, v in ch], "o", ms=ms, color=OKABE_ITO["blue"], zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", color=OKABE_ITO["blue"], label="changed"))
    if rd:
        ax.plot([x for x, _ in rd], [v for _, v in rd], "D", ms=ms * 0.85, mfc="white", mec=OKABE_ITO["sky"], mew=1.3,
                zorder=3)
        handles.append(Line2D([], [], marker="D", ls="", mfc="white", mec=OKABE_ITO["sky"], label=rd_label))
    if zero_changed:
        ax.plot(zero_changed, [floor] * len(zero_changed), "^", ms=ms * 1.15, color=OKABE_ITO["orange"], zorder=3)
        handles.append(Line2D([], [], marker="^", ls="", color=OKABE_ITO["orange"],
                              label="new or resized rows only"))
    if nan:
        ax.plot(nan, [floor] * len(nan), "X", ms=ms * 1.1, color=OKABE_ITO["vermillion"], zorder=3)
        handles.append(Line2D([], [], marker="X", ls="", color=OKABE_ITO["vermillion"],
                              label="NaN/Inf only (not measured)"))
    if un:
        ax.plot(un, [floor] * len(un), "o", ms=ms, mfc="white", mec=GREY, mew=1.2, zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec=GREY, label="unchanged (bitwise)"))
    return handles


@_styled
def draw_depth(data: dict, height: float = 3.2) -> Figure:
    """Relative change per block, input to top, with the embeddings before the first block and
    the head after the last; unchanged blocks hollow on a marked zero line."""
    fig = _figure(height)
    ax = fig.add_subplot()
    ax.set_title("Depth profile: how much each block changed")
    points = cap.depth_points(data)
    if not points:
        _empty(ax, "no numbered blocks in this checkpoint")
        return fig
    xs = [p["x"] for p in points]
    vals = [p["rel_change"] for p in points]
    states = [p["state"] for p in points]
    floor, top = _log_floor([v for v, s in zip(vals, states) if s not in ("unchanged", "nonfinite")])
    ax.set_yscale("log")
    ax.set_ylim(floor / 2.5, top)
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ms = 6.0 if len(xs) <= 26 else max(3.0, 6.0 * math.sqrt(26 / len(xs)))
    words = cap.within_words(data)
    label = {"by dtype rounding": "rounding only", "within their quantization noise floor": "within quantization noise"
             }.get(words, "within rounding or quantization noise")
    handles = _markers(ax, xs, vals, states, floor, ms, label)
    inner = [p["x"] for p in points if p["group"] is None]
    for p in points:          # the groups outside the blocks are set apart by a thin line
        if p["group"] is not None and p["x"] in (min(inner) - 1, max(inner) + 1):
            ax.axvline((p["x"] + (min(inner) if p["x"] < min(inner) else max(inner))) / 2, color="#CCCCCC",
                       lw=0.6, zorder=0)
    _zero_line(ax, floor)
    labels = [p["label"] for p in points]
    if len(points) <= 26:
        ax.set_xticks(xs, [text(x) for x in labels])
    else:
        inner = [p for p in points if p["group"] is None]
        _block_ticks(ax, [p["x"] for p in inner], [p["label"] for p in inner])
        ends = [p for p in points if p["group"] is not None]
        ax.set_xticks(list(ax.get_xticks()) + [p["x"] for p in ends],
                      [t.get_text() for t in ax.get_xticklabels()] + [p["label"] for p in ends])
    ax.set_xlabel("embeddings, then block 0 (nearest the input) to the last block, then the head")
    ax.set_ylabel("relative change ‖ΔW‖ / ‖W‖\n(Frobenius, log scale)")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7.5, handletextpad=0.3,
               columnspacing=1.2)
    ax.grid(axis="y", which="major", color="#EEEEEE", lw=0.6, zorder=0)
    return fig


def _module_order(kinds: set[str]) -> list[str]:
    pref = ["attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.fc", "mlp.down",
            "mlp.proj", "norm"]
    return [k for k in pref if k in kinds] + sorted(kinds - set(pref))


def _grid_figure(title: str, rows: list[str], cols: list[str], grid: np.ndarray, ylabel: str,
                 xlabel: str = "block (0 = nearest the input)") -> Figure:
    """A heatmap of relative change: ``grid[i, j]`` for row ``rows[i]`` and column ``cols[j]``,
    NaN where the cell does not exist, 0 where nothing changed, +inf where only NaN/Inf values differ."""
    fig = _figure(max(2.4, 1.1 + 0.24 * len(rows)))
    ax = fig.add_subplot()
    ax.set_title(title)
    xs = np.arange(len(cols) + 1) - 0.5
    ys = np.arange(len(rows) + 1) - 0.5
    ax.set_facecolor("#E4E4E4")           # cells that do not exist: grey, cross-hatched
    ax.patch.set_hatch(ABSENT_HATCH)
    ax.patch.set_edgecolor("#B0B0B0")
    zero = np.where(grid == 0, 1.0, np.nan)
    handles = []
    if np.isfinite(zero).any():
        ax.pcolormesh(xs, ys, np.ma.masked_invalid(zero), cmap=mcolors.ListedColormap(["white"]),
                      edgecolors="#C8C8C8", linewidth=0.5)
        for i, j in zip(*np.nonzero(grid == 0)):   # hatched, so "no change" never reads as a light colour
            ax.add_patch(_cell(j, i))
        handles.append(Patch(facecolor="white", edgecolor="#9A9A9A", hatch=UNCHANGED_HATCH, lw=0.6,
                             label="unchanged (0)"))
    pos = np.where(np.isfinite(grid) & (grid > 0), grid, np.nan)
    if np.isfinite(pos).any():
        lo, hi = log_limits(float(np.nanmin(pos)), float(np.nanmax(pos)))
        mesh = ax.pcolormesh(xs, ys, np.ma.masked_invalid(pos), cmap=HEAT, norm=mcolors.LogNorm(vmin=lo, vmax=hi),
                             edgecolors="#C8C8C8", linewidth=0.5)
        cb = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.05, aspect=max(8, 3 * len(rows)))
        cb.set_label("relative change\n‖ΔW‖ / ‖W‖ (log)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        ticks, labels = distinct_ticks(lo, hi, lambda v, d: fmt.num(v, d))
        cb.set_ticks(ticks, labels=labels)
        cb.ax.minorticks_off()
    if np.isposinf(grid).any():     # changed only by NaN/Inf: white with a cross, never a colour or "unchanged"
        ax.pcolormesh(xs, ys, np.ma.masked_invalid(np.where(np.isposinf(grid), 1.0, np.nan)),
                      cmap=mcolors.ListedColormap(["white"]), edgecolors="#C8C8C8", linewidth=0.5)
        ii, jj = np.nonzero(np.isposinf(grid))
        ax.plot(jj, ii, "X", ms=7, color=OKABE_ITO["vermillion"], ls="", zorder=3)
        handles.append(Line2D([], [], marker="X", ls="", color=OKABE_ITO["vermillion"],
                              label="NaN/Inf only (not measured)"))
    if np.isnan(grid).any():
        handles.append(Patch(facecolor="#E4E4E4", edgecolor="#B0B0B0", hatch=ABSENT_HATCH, lw=0.5,
                             label="does not exist in this block"))
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[-1], ys[0])   # first row on top: reading order
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([text(k) for k in rows])
    _block_ticks(ax, list(range(len(cols))), cols)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    if handles:
        fig.legend(handles=handles, loc="outside lower left", ncols=len(handles), fontsize=7.5, handlelength=1.6)
    return fig


def _cell(j: int, i: int) -> Patch:
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, facecolor="none", edgecolor="#9A9A9A", hatch=UNCHANGED_HATCH,
                     lw=0, zorder=2)


@_styled
def draw_heatmap(data: dict) -> Figure:
    """Block x module kind grid of relative change; log colour scale over at least a decade,
    hatched white where nothing changed, cross-hatched grey where a block lacks the kind."""
    blocks = cap.layered_blocks(data)
    kinds = _module_order({k for b in blocks for k in (b.get("modules") or {})})
    if not blocks or not kinds:
        fig = _figure(2.4)
        ax = fig.add_subplot()
        ax.set_title("Where the change sits: block x module kind")
        _empty(ax, "no numbered blocks in this checkpoint")
        return fig
    grid = np.full((len(kinds), len(blocks)), np.nan)
    nan_only = cap.nonfinite_cells(data)
    for j, b in enumerate(blocks):
        for i, k in enumerate(kinds):
            v = (b.get("modules") or {}).get(k, None)
            # +inf marks a cell changed only by NaN/Inf: not a measurement, drawn as a cross
            grid[i, j] = np.nan if v is None else np.inf if (b.get("block"), k) in nan_only else v
    return _grid_figure("Where the change sits: block x module kind", kinds, [str(b["index"]) for b in blocks],
                        grid, "module kind")


@_styled
def draw_experts(data: dict) -> Figure:
    """Expert x block grid of relative change, for a mixture-of-experts model."""
    ex = cap.expert_grid(data)
    grid = np.array([[np.nan if v is None else v for v in row] for row in ex["grid"]], dtype=float)
    return _grid_figure("Experts: how much each expert changed, block by block",
                        [f"expert {e}" for e in ex["experts"]], [str(b) for b in ex["blocks"]], grid, "expert")
