"""The figures of a comparison: the registry, drawing them all, and saving byte-stable files.

``FIGURES`` names every figure with its title, its ``draw_*`` function and its caption
(``render.captions``); the figures themselves live in two families, ``figures_blocks``
(depth profile, block x module heatmap, experts x blocks) and ``figures_change``
(parameter share, rank, cosine), plus ``figures_reference`` (the reference scale), all in
the house style of ``figstyle``. ``save_figures`` writes PNG (300 dpi), SVG and, on
request, PDF files whose bytes depend only on the JSON (no timestamps, a fixed SVG hash
salt). The experts figure is drawn only for a mixture-of-experts model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from matplotlib import rc_context
from matplotlib.figure import Figure

from ..fsutil import write_bytes
from . import captions as cap
from .figstyle import (CYCLE, FORMATS, GREY, OKABE_ITO, STATUS_STYLE, STYLE, WIDTH, ZERO_LABEL, figure_bytes,
                       text)
from .figures_blocks import draw_depth, draw_experts, draw_heatmap
from .figures_change import RANK_SHOWN, draw_cosine, draw_params, draw_rank, pick_rank_matrices
from .figures_reference import draw_reference

__all__ = ["FIGURES", "FigureOutput", "render_figures", "save_figures", "figure_bytes", "draw_depth",
           "draw_heatmap", "draw_experts", "draw_params", "draw_rank", "draw_cosine", "draw_reference",
           "pick_rank_matrices", "RANK_SHOWN", "CYCLE", "GREY", "OKABE_ITO", "STATUS_STYLE", "STYLE", "WIDTH",
           "ZERO_LABEL", "FORMATS", "text"]


@dataclass
class FigureOutput:
    """One figure: its name, title, caption, the files written (format -> path) and its
    encoded bytes (SVG for the HTML memo, PNG for the Word memo)."""

    name: str
    title: str
    caption: str
    files: dict[str, Path] = field(default_factory=dict)
    svg: bytes = b""
    png: bytes = b""

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "caption": self.caption,
                "files": {k: os.fspath(v) for k, v in self.files.items()}}


#: name -> (title, draw, caption, drawn when): the memo's first page shows the first two
FIGURES: dict[str, tuple[str, Callable[[dict], Figure], Callable[[dict], str], Callable[[dict], bool]]] = {
    "depth_profile": ("Depth profile", lambda d: draw_depth(d, height=2.9), cap.caption_depth, lambda d: True),
    "reference_scale": ("Reference scale", draw_reference, cap.caption_reference, lambda d: True),
    "heatmap": ("Block x module heatmap", draw_heatmap, cap.caption_heatmap, lambda d: True),
    "experts": ("Experts x blocks", draw_experts, cap.caption_experts, lambda d: bool(cap.expert_grid(d)["experts"])),
    "param_share": ("Parameter share", draw_params, cap.caption_params, lambda d: True),
    "rank": ("Rank of the change", draw_rank,
             lambda d: cap.caption_rank(d, pick_rank_matrices(cap.changed_matrices(d))), lambda d: True),
    "cosine": ("1 - cosine per matrix", draw_cosine, cap.caption_cosine, lambda d: True),
}


def render_figures(data: dict, formats: tuple[str, ...] = ("png", "svg"),
                   only: tuple[str, ...] | None = None) -> list[tuple[FigureOutput, dict[str, bytes]]]:
    """Draw every figure (or those named in ``only``) and encode it in ``formats``; write nothing.
    SVG and PNG are always encoded, for the HTML and the Word memo."""
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown figure format {f!r}")
    out = []
    with rc_context(STYLE):
        for name, (title, draw, caption, wanted) in FIGURES.items():
            if (only is not None and name not in only) or not wanted(data):
                continue
            # a fresh figure per format: constrained layout runs at each save's dpi, so a figure
            # saved as PNG first would give a slightly different SVG than one saved as SVG alone
            blobs = {f: figure_bytes(draw(data), f) for f in dict.fromkeys(list(formats) + ["svg", "png"])}
            fo = FigureOutput(name, title, caption(data), svg=blobs["svg"], png=blobs["png"])
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
