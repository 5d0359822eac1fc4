"""Whole-model figures: parameter share by status, rank of the change, 1 - cosine per matrix.

Each ``draw_*`` takes the compare JSON dict and returns a matplotlib ``Figure`` in the house
style (``render.figstyle``). Unlike ``figures_blocks`` (the model's depth on the x axis),
these show the model as a whole or matrix by matrix. Captions come from ``render.captions``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import captions as cap
from . import formats as fmt
from .figstyle import (CYCLE, GREY, OKABE_ITO, STATUS_STYLE, _empty, _figure, _integer_log_ticks, _log_floor,
                       _styled, _zero_line, text)

__all__ = ["draw_params", "draw_rank", "draw_cosine", "pick_rank_matrices", "RANK_SHOWN"]


@_styled
def draw_params(data: dict) -> Figure:
    """One horizontal bar: the tuned model's parameters split by status, percentages printed."""
    fig = _figure(2.1)
    ax = fig.add_subplot()
    ax.set_title("Share of parameters by status")
    s = data.get("summary") or {}
    by, total = s.get("params_by_status") or {}, fmt.tuned_params(s)
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
    ax.text(0.005, cut, f" unrelated rule looks above {fmt.num(cut)}", transform=ax.get_yaxis_transform(),
            ha="left", va="bottom", fontsize=7, color=OKABE_ITO["vermillion"])
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
