"""Figures drawn from the compare JSON alone: depth profile, heatmap, parameter share, rank, cosine.

Each ``draw_*`` function takes the result dict (``schema: weightdiff.compare/1``) and
returns a matplotlib ``Figure``; ``save_figures`` draws them all and writes PNG (300 dpi),
SVG and, on request, PDF files whose bytes depend only on the JSON (no timestamps, a fixed
SVG hash salt), with a caption for each from ``render.captions``.

No pyplot: figures are plain ``Figure`` objects on an Agg canvas, so nothing touches a
user's interactive backend or pyplot's global figure list, and nothing needs a display.
Colours: the Okabe-Ito palette for categories and cividis for the heatmap (both readable
with colour-vision deficiencies); hatching and marker shapes repeat what colour says, so
a greyscale print keeps every distinction.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..errors import escape_name
from ..fsutil import write_bytes
from . import captions as cap
from . import formats as fmt

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


# --- the five figures --------------------------------------------------------------------

def _styled(draw: Callable[[dict], Figure]) -> Callable[[dict], Figure]:
    """Draw under the house style, so ``draw_x(data)`` alone gives the figure ``save_figures`` saves."""
    @functools.wraps(draw)
    def wrapper(data: dict) -> Figure:
        with rc_context(STYLE):
            return draw(data)
    return wrapper


@_styled
def draw_depth(data: dict) -> Figure:
    """Relative change per block, input to top; unchanged blocks hollow on a marked zero line."""
    fig = _figure(3.2)
    ax = fig.add_subplot()
    ax.set_title("Depth profile: how much each block changed")
    blocks = cap.layered_blocks(data)
    if not blocks:
        _empty(ax, "no numbered blocks in this checkpoint")
        return fig
    xs = [b["index"] for b in blocks]
    vals = [b.get("rel_change") for b in blocks]
    states = [cap.block_state(b) for b in blocks]
    floor, top = _log_floor([v for v, s in zip(vals, states) if s != "unchanged"])
    ax.set_yscale("log")
    ax.set_ylim(floor / 2.5, top)
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ch = [(x, v) for x, v, s in zip(xs, vals, states) if s == "changed" and v]
    zero_changed = [x for x, v, s in zip(xs, vals, states) if s == "changed" and not v]
    rd = [(x, v) for x, v, s in zip(xs, vals, states) if s == "rounding"]
    un = [x for x, s in zip(xs, states) if s == "unchanged"]
    handles = []
    ms = 6.0 if len(xs) <= 24 else max(3.0, 6.0 * math.sqrt(24 / len(xs)))
    if ch:
        ax.vlines([x for x, _ in ch], floor, [v for _, v in ch], color=OKABE_ITO["blue"], lw=1.2, zorder=2)
        ax.plot([x for x, _ in ch], [v for _, v in ch], "o", ms=ms, color=OKABE_ITO["blue"], zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", color=OKABE_ITO["blue"], label="changed"))
    if rd:
        ax.plot([x for x, _ in rd], [v for _, v in rd], "D", ms=ms * 0.85, mfc="white", mec=OKABE_ITO["sky"], mew=1.3,
                zorder=3)
        handles.append(Line2D([], [], marker="D", ls="", mfc="white", mec=OKABE_ITO["sky"], label="rounding only"))
    if zero_changed:
        ax.plot(zero_changed, [floor] * len(zero_changed), "^", ms=ms * 1.15, color=OKABE_ITO["orange"], zorder=3)
        handles.append(Line2D([], [], marker="^", ls="", color=OKABE_ITO["orange"],
                              label="new or resized tensors only"))
    if un:
        ax.plot(un, [floor] * len(un), "o", ms=ms, mfc="white", mec=GREY, mew=1.2, zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec=GREY, label="unchanged (bitwise)"))
    _zero_line(ax, floor)
    _block_ticks(ax, xs, [str(x) for x in xs])
    ax.set_xlabel("block (0 = nearest the input)")
    ax.set_ylabel("relative change ‖ΔW‖ / ‖W‖\n(Frobenius, log scale)")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7.5, handletextpad=0.3,
               columnspacing=1.2)
    ax.grid(axis="y", which="major", color="#EEEEEE", lw=0.6, zorder=0)
    return fig


def _module_order(kinds: set[str]) -> list[str]:
    pref = ["attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.fc", "mlp.down",
            "mlp.proj", "norm"]
    return [k for k in pref if k in kinds] + sorted(kinds - set(pref))


@_styled
def draw_heatmap(data: dict) -> Figure:
    """Block x module kind grid of relative change; log colour scale, grey where nothing changed."""
    blocks = cap.layered_blocks(data)
    kinds = _module_order({k for b in blocks for k in (b.get("modules") or {})})
    fig = _figure(max(2.4, 1.1 + 0.24 * len(kinds)))
    ax = fig.add_subplot()
    ax.set_title("Where the change sits: block x module kind")
    if not blocks or not kinds:
        _empty(ax, "no numbered blocks in this checkpoint")
        return fig
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for j, b in enumerate(blocks):
        for i, k in enumerate(kinds):
            v = (b.get("modules") or {}).get(k, None)
            grid[i, j] = np.nan if v is None else v
    xs = np.arange(len(blocks) + 1) - 0.5
    ys = np.arange(len(kinds) + 1) - 0.5
    ax.set_facecolor("#F2F2F2")           # kinds a block lacks: hatched grey background
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor("#C8C8C8")
    zero = np.where(grid == 0, 1.0, np.nan)
    ax.pcolormesh(xs, ys, np.ma.masked_invalid(zero), cmap=mcolors.ListedColormap(["white"]),
                  edgecolors="#C8C8C8", linewidth=0.5)
    pos = np.where(grid > 0, grid, np.nan)
    handles = [Patch(facecolor="white", edgecolor="#A0A0A0", lw=0.6, label="unchanged (0)")]
    if np.isfinite(pos).any():
        lo, hi = np.nanmin(pos), np.nanmax(pos)
        if hi <= lo * 1.0001:
            lo, hi = lo / 3.0, hi * 3.0
        mesh = ax.pcolormesh(xs, ys, np.ma.masked_invalid(pos), cmap="cividis",
                             norm=mcolors.LogNorm(vmin=lo, vmax=hi), edgecolors="#C8C8C8", linewidth=0.5)
        cb = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.05, aspect=max(8, 3 * len(kinds)))
        cb.set_label("relative change\n‖ΔW‖ / ‖W‖ (log)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        if hi / lo < 100:   # under 2 decades a log bar gets one or two labels: label 4 values
            ticks = np.geomspace(lo, hi, 4)
            cb.set_ticks(ticks, labels=[fmt.num(float(t), 2) for t in ticks])
            cb.ax.minorticks_off()
    if np.isnan(grid).any():
        handles.append(Patch(facecolor="#F2F2F2", edgecolor="#C8C8C8", hatch="////", lw=0.5,
                             label="kind absent from block"))
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[-1], ys[0])   # first kind (attn.q) on top: reading order
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([text(k) for k in kinds])
    _block_ticks(ax, list(range(len(blocks))), [str(b["index"]) for b in blocks])
    ax.set_xlabel("block (0 = nearest the input)")
    ax.set_ylabel("module kind")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    fig.legend(handles=handles, loc="outside lower left", ncols=len(handles), fontsize=7.5, handlelength=1.2)
    return fig


@_styled
def draw_params(data: dict) -> Figure:
    """One horizontal bar: the tuned model's parameters split by status, percentages printed."""
    fig = _figure(2.1)
    ax = fig.add_subplot()
    ax.set_title("Share of parameters by status")
    s = data.get("summary") or {}
    by, total = s.get("params_by_status") or {}, s.get("params_total") or 0
    if not total:
        _empty(ax, "no parameters")
        return fig
    left = 0.0
    handles = []
    for k in cap.STATUS_ORDER[:-1]:
        n = by.get(k, 0)
        if not n:
            continue
        w = 100.0 * n / total
        color, hatch = STATUS_STYLE[k]
        ax.barh(0, w, left=left, height=0.6, color=color, hatch=hatch, edgecolor="white" if not hatch else "#333333",
                lw=0.4)
        label = f"{cap.STATUS_LABEL[k]}: {fmt.share(n / total)} ({fmt.count(n)})"
        handles.append(Patch(facecolor=color, hatch=hatch, edgecolor="#333333", lw=0.4, label=label))
        if w >= 9:
            dark = k in ("changed", "removed")
            ax.text(left + w / 2, 0, fmt.share(n / total), ha="center", va="center", fontsize=8.5,
                    color="white" if dark else "black", fontweight="bold",
                    bbox=None if not hatch else {"facecolor": "white", "edgecolor": "none", "pad": 1.0})
        left += w
    ax.set_xlim(0, 100)
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([])
    ax.spines["left"].set_visible(False)
    ax.set_xlabel(f"share of the tuned model's {fmt.count(total)} parameters (%)")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=7.5,
               handlelength=1.4)
    return fig


RANK_SHOWN = 6


def pick_rank_matrices(mats: list[dict], n: int = RANK_SHOWN) -> list[dict]:
    """Up to ``n`` matrices for the energy curves: the most changed matrix of each changed
    block first (so a LoRA-edited block is not crowded out by one dense block), then the
    next most changed overall. ``mats`` comes most changed first."""
    picked, seen = [], set()
    for t in mats:
        if t.get("block") not in seen:
            seen.add(t.get("block"))
            picked.append(t)
    for t in mats:
        if t not in picked:
            picked.append(t)
    return sorted(picked[:n], key=lambda t: mats.index(t))


@_styled
def draw_rank(data: dict) -> Figure:
    """Left: cumulative energy of the delta spectrum; right: energy rank 90% vs matrix side."""
    fig = _figure(3.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.15, 1])
    fig.suptitle("Rank of the change", fontsize=10, fontweight="bold")
    mats = cap.changed_matrices(data)
    if not mats:
        _empty(ax1, "no spectrum: nothing changed, or --no-rank")
        _empty(ax2, "")
        return fig
    shown = pick_rank_matrices(mats)
    kmax = 1
    truncated = False
    for i, t in enumerate(shown):
        s = np.asarray(t["rank"].get("spectrum") or [], dtype=float)
        nd = t.get("norm_delta") or 0.0
        if not len(s) or nd <= 0:
            continue
        cum = np.cumsum(s * s) / (nd * nd)
        k = np.arange(1, len(s) + 1)
        kmax = max(kmax, len(s))
        color = CYCLE[i % len(CYCLE)]
        ax1.step(k, np.minimum(cum, 1.0), where="post", lw=1.4, color=color,
                 ls=["-", "--", "-.", ":"][i % 4], label=text(cap.tensor_label(t)))
        if cum[-1] < 0.985:   # the reported spectrum stops before the energy is all counted
            ax1.plot([k[-1]], [cum[-1]], ">", ms=4, color=color)
            truncated = True
    for y in (0.9, 0.99):
        ax1.axhline(y, color=GREY, lw=0.6, ls=":")
        ax1.text(1.0, y, f" {y:.0%}", transform=ax1.get_yaxis_transform(), va="center", fontsize=7, color=GREY)
    ax1.set_xscale("log")
    ax1.set_xlim(0.8, max(kmax, 10) * 1.25)
    _integer_log_ticks(ax1.xaxis, 1, max(kmax, 10) * 1.25)
    ax1.set_ylim(0, 1.04)
    ax1.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax1.set_xlabel("number of singular directions k (log)")
    ax1.set_ylabel("share of ‖ΔW‖² captured")
    handles, labels = ax1.get_legend_handles_labels()
    if truncated:
        handles.append(Line2D([], [], marker=">", ls="", color=GREY, ms=4))
        labels.append(f"end of reported spectrum (top {kmax})")
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7, handlelength=2.4)
    pts = [(min(t["rank"].get("shape_2d") or t["shape"][:2]), t["rank"].get("energy_rank_90"), t["rank"].get("exact", True))
           for t in mats if t["rank"].get("energy_rank_90")]
    if pts:
        dims = np.array([p[0] for p in pts], dtype=float)
        # spread stacked points of equal side a little so each stays visible (deterministic)
        jitter = 1.0 + 0.06 * ((np.arange(len(pts)) % 7) - 3) / 3
        xs = dims * jitter
        r = np.array([p[1] for p in pts], dtype=float)
        exact = np.array([p[2] for p in pts], dtype=bool)
        lo, hi = dims.min() / 2.5, dims.max() * 2.5
        line = np.array([lo, hi])
        ax2.plot(line, line, color="black", lw=0.8, label="full rank (k = side)")
        ax2.plot(line, 0.51 * line, color=OKABE_ITO["vermillion"], lw=0.8, ls="--",
                 label="pure random noise (~0.51 side)")
        ax2.plot(xs[exact], r[exact], "o", ms=4.5, color=OKABE_ITO["blue"], alpha=0.8, label="changed matrix")
        if (~exact).any():
            ax2.plot(xs[~exact], r[~exact], "^", ms=5, mfc="white", mec=OKABE_ITO["blue"], label="lower bound")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlim(lo, hi)
        ax2.set_ylim(0.7, hi * 1.1)
        _integer_log_ticks(ax2.xaxis, lo, hi)
        _integer_log_ticks(ax2.yaxis, 1, hi * 1.1)
        ax2.set_xlabel("matrix smaller side min(m, n) (log)")
        ax2.set_ylabel("rank for 90% of ‖ΔW‖² (log)")
        ax2.legend(loc="upper left", fontsize=6.5)
    else:
        _empty(ax2, "no energy ranks")
    return fig


@_styled
def draw_cosine(data: dict) -> Figure:
    """1 - cosine per paired matrix, checkpoint order, log axis, with the 'unrelated' reference."""
    fig = _figure(3.2)
    ax = fig.add_subplot()
    ax.set_title("Direction of each matrix: 1 − cosine(base, tuned)")
    mats = cap.cosine_matrices(data)
    if not mats:
        _empty(ax, "no paired matrices")
        return fig
    vals = [cap.one_minus_cosine(t) for t in mats]
    floor, top = _log_floor(vals)
    top = max(top, 3.0)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2.5, top)
    xs = np.arange(len(mats))
    v = np.array(vals, dtype=float)
    moved = v > 0
    cut = 1.0 - (data.get("settings") or {}).get("thresholds", {}).get("unrelated_cosine", 0.2)
    ax.axhspan(cut, top, color=OKABE_ITO["vermillion"], alpha=0.08, lw=0, zorder=0)
    ax.axhline(1.0, color=OKABE_ITO["vermillion"], lw=0.9, ls="--", zorder=1)
    ax.text(0.995, 1.0, "unrelated models: cosine ~ 0 ", transform=ax.get_yaxis_transform(), ha="right",
            va="bottom", fontsize=7.5, color=OKABE_ITO["vermillion"])
    if moved.any():
        ax.plot(xs[moved], v[moved], "o", ms=3.5, color=OKABE_ITO["blue"], zorder=3, label="changed matrix")
    if (~moved).any():
        ax.plot(xs[~moved], [floor] * int((~moved).sum()), "o", ms=3.5, mfc="white", mec=GREY, mew=0.8, zorder=2,
                label="unchanged (bitwise)")
    _zero_line(ax, floor)
    ax.set_xlim(-1, len(mats))
    # tick the first matrix of each block, thinned to about 16 labels
    firsts, labels, seen = [], [], set()
    for i, t in enumerate(mats):
        b = t.get("block")
        if b not in seen:
            seen.add(b)
            firsts.append(i)
            labels.append(str(b).rsplit(".", 1)[-1] if b else str(t.get("module") or "other"))
    gap = len(mats) / 18   # labels at least 1/18 of the axis apart; numbered blocks first
    kept: dict[int, str] = {}
    for numbered in (True, False):
        for x, label in zip(firsts, labels):
            if label.isdigit() == numbered and all(abs(x - k) >= gap for k in kept):
                kept[x] = label
    ax.set_xticks(sorted(kept))
    ax.set_xticklabels([text(kept[x]) for x in sorted(kept)], fontsize=7)
    ax.set_xlabel("matrices in checkpoint order, ticked at the first matrix of each block")
    ax.set_ylabel("1 − cosine (log scale)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7.5)
    ax.grid(axis="y", color="#EEEEEE", lw=0.6, zorder=0)
    return fig


# --- saving ------------------------------------------------------------------------------

@dataclass
class FigureOutput:
    """One saved figure: its name, title, caption and the files written (format -> path)."""

    name: str
    title: str
    caption: str
    files: dict[str, Path] = field(default_factory=dict)
    svg: bytes = b""      # the SVG bytes, kept for embedding in the HTML memo

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "caption": self.caption,
                "files": {k: os.fspath(v) for k, v in self.files.items()}}


#: name -> (title, draw, caption)
FIGURES: dict[str, tuple[str, Callable[[dict], Figure], Callable[[dict], str]]] = {
    "depth_profile": ("Depth profile", draw_depth, cap.caption_depth),
    "heatmap": ("Block x module heatmap", draw_heatmap, cap.caption_heatmap),
    "param_share": ("Parameter share", draw_params, cap.caption_params),
    "rank": ("Rank of the change", draw_rank,
             lambda d: cap.caption_rank(d, pick_rank_matrices(cap.changed_matrices(d)))),
    "cosine": ("1 - cosine per matrix", draw_cosine, cap.caption_cosine),
}


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as ``fmt`` with no clock or build stamp in it (same figure, same bytes)."""
    buf = io.BytesIO()
    with rc_context(STYLE):
        fig.savefig(buf, format=fmt, dpi=300 if fmt == "png" else 72, metadata=_METADATA[fmt])
    return buf.getvalue()


def render_figures(data: dict, formats: tuple[str, ...] = ("png", "svg")) -> list[tuple[FigureOutput, dict[str, bytes]]]:
    """Draw every figure and encode it in ``formats``; write nothing."""
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown figure format {f!r}")
    out = []
    with rc_context(STYLE):
        for name, (title, draw, caption) in FIGURES.items():
            # a fresh figure per format: constrained layout runs at each save's dpi, so a figure
            # saved as PNG first would give a slightly different SVG than one saved as SVG alone
            blobs = {f: figure_bytes(draw(data), f) for f in dict.fromkeys(list(formats) + ["svg"])}
            fo = FigureOutput(name, title, caption(data), svg=blobs["svg"])
            out.append((fo, {f: blobs[f] for f in formats}))
    return out


def save_figures(data: dict, directory: str | os.PathLike, formats: tuple[str, ...] = ("png", "svg")) -> list[FigureOutput]:
    """Draw all figures into ``directory`` as ``<name>.<fmt>``, each file written atomically.

    Returns one ``FigureOutput`` per figure with its caption and paths. Saving the same
    data twice gives byte-identical files.
    """
    directory = Path(directory)
    outputs = []
    for fo, blobs in render_figures(data, formats):
        for fmt, blob in blobs.items():
            fo.files[fmt] = write_bytes(directory / f"{fo.name}.{fmt}", blob)
        outputs.append(fo)
    return outputs
