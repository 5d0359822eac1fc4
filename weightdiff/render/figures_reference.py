"""The reference scale: this model on one log axis between a cast's rounding and an unrelated model.

Two rows, relative change and 1 - cosine of the large matrices, each with the points of
``render.reference.reference_scale`` (the JSON's ``reference`` when it has one): the change a
cast of this base to float16 and to bfloat16 would make, this model, and an unrelated
model of this shape. Every number is computed from this base's own weights and norms.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from . import formats as fmt
from .figstyle import GREY, OKABE_ITO, _empty, _figure, _pow10, _styled, text
from .reference import reference_of

__all__ = ["draw_reference", "POINT_STYLE"]

#: key -> (marker, face colour, edge colour)
POINT_STYLE = {"F16": ("s", "white", GREY), "BF16": ("D", "white", "#555555"),
               "model": ("o", OKABE_ITO["blue"], OKABE_ITO["blue"]),
               "unrelated": ("X", OKABE_ITO["vermillion"], OKABE_ITO["vermillion"])}
ROWS = (("rel_change", "relative change\n‖ΔW‖ / ‖W‖"), ("one_minus_cosine", "1 − cosine"))


@_styled
def draw_reference(data: dict, height: float = 2.5) -> Figure:
    """The reference points and this model on two log axes."""
    fig = _figure(height)
    axes = fig.subplots(2, 1)
    fig.suptitle("Reference scale: this model between rounding and an unrelated model", fontsize=10,
                 fontweight="bold")
    points = reference_of(data)["points"]
    if not points:
        for ax in axes:
            _empty(ax, "no matrix compared as floats")
        return fig
    for ax, (key, label) in zip(axes, ROWS):
        vals = [p[key] for p in points if p[key] is not None and p[key] > 0]
        if not vals:
            _empty(ax, "nothing to place")
            continue
        lo = 10.0 ** (math.floor(math.log10(min(vals))) - 0.3)
        hi = 10.0 ** (math.ceil(math.log10(max(vals))) + 0.3)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(-2.4, 1.6)
        ax.axhline(0, color="#BBBBBB", lw=0.8, zorder=0)
        for i, p in enumerate(points):
            v = p[key]
            big = p["key"] == "model"
            # a log axis has no zero: a model that reads 0 (only tensors or rows added) sits on the axis's left
            # end, labelled 0, as the depth profile's "0 (no change)" line; left out, the figure lost the model
            at_zero = big and v is not None and v <= 0
            if v is None or (v <= 0 and not at_zero):
                continue
            marker, face, edge = POINT_STYLE[p["key"]]
            x = lo if at_zero else v
            ax.plot([x], [0], marker, ms=9 if big else 7, mfc="white" if at_zero else face, mec=edge, mew=1.3,
                    zorder=3, clip_on=False)
            up = i % 2 == 0 and not at_zero          # below, clear of the float16 label above the left end
            value = "0 (no change)" if at_zero else fmt.sci(v)
            ax.annotate(f"{text(p['label'])}\n{value}", (x, 0), xytext=(0, 8 if up else -9),
                        textcoords="offset points", ha="left" if at_zero else "center",
                        va="bottom" if up else "top",
                        fontsize=7.5, fontweight="bold" if big else "normal",
                        color=OKABE_ITO["blue"] if big else "#222222")
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ticks = [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
        if len(ticks) > 8:
            ticks = ticks[::2]
        ax.set_xticks(ticks, [_pow10(t) for t in ticks])
        ax.xaxis.set_minor_formatter(lambda v, _: "")
    axes[-1].set_xlabel("log scale; large matrices of the model", fontsize=8)
    return fig
