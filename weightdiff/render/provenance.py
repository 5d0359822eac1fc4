"""Rendering of provenance and lineage results: terminal text, a bar chart, a memo section.

Reads only the JSON dicts (``weightdiff.provenance/1``, ``weightdiff.lineage/1``), so
a saved result redraws without the checkpoints. The chart puts every candidate's
large-matrix relative change and 1 - cosine next to the unrelated reference (two
independently initialized models: sqrt(2) and 1) and the thresholds of the verdict.
Figures are plain ``Figure`` objects on Agg whose bytes depend only on the dict
(``plots.figure_bytes``).
"""

from __future__ import annotations

from matplotlib import rc_context
from matplotlib.figure import Figure

from ..errors import escape_name
from .formats import MISSING, count, num, sci, share, step_compared
from .figstyle import GREY, OKABE_ITO, STYLE, _figure, figure_bytes, text
from .plots import FigureOutput

__all__ = ["ranking_text", "lineage_text", "draw_provenance", "caption_provenance", "provenance_figure",
           "provenance_png"]

_VERDICT_COLOUR = {"derived": OKABE_ITO["blue"], "partial": OKABE_ITO["orange"], "unrelated": OKABE_ITO["vermillion"]}


def _omc(c: dict) -> float | None:
    cos = c.get("cosine_large")
    return None if cos is None else 1.0 - cos


def _perm(c: dict) -> str:
    p = c.get("permutation")
    if not p:
        return "-" if c.get("compared") == "full" else "n/a"
    if not p["groups_permuted"]:
        return "none"
    return f"{p['groups_permuted']}/{p['groups_examined']} MLPs, {share(p['moved_share'])} moved"


def ranking_text(d: dict) -> str:
    """The ranking as fixed-width plain text (names escaped, no colour)."""
    t = d["tuned"]
    lines = [f"weightdiff provenance: {escape_name(t['path'])} ({t['params']:,} parameters)",
             f"note: {d['relatedness']}", ""]
    head = f"{'#':>2}  {'candidate':<28} {'verdict':<9} {'rel.change':>10} {'1-cosine':>9} " \
           f"{'identical':>9} {'coverage':>8}  {'compared':<8} permutation"
    lines += [head, "-" * len(head)]
    for c in d["candidates"]:
        name = escape_name(c["path"])
        name = name if len(name) <= 28 else "..." + name[-25:]
        lines.append(f"{c['rank']:>2}  {name:<28} {c['verdict']:<9} {sci(c['relative_change_large']):>10} "
                     f"{sci(_omc(c)):>9} {share(c.get('identical_share')):>9} "
                     f"{share(c.get('coverage')):>8}  {c['compared']:<8} {_perm(c)}")
    ref = d["reference"]
    lines.append(f"{'':>2}  {'(reference: unrelated)':<28} {'':<9} {sci(ref['relative_change']):>10} "
                 f"{sci(1 - ref['cosine']):>9}")
    lines += ["", "rel.change and 1-cosine are over large matrices; identical = share of tensors bitwise equal."]
    if d["incompatible"]:
        lines += ["", "not compared:"]
        lines += [f"  {escape_name(c['path'])}: {escape_name(c['reason'])}" for c in d["incompatible"]]
    if d.get("screening"):
        s = d["screening"]
        lines += ["", f"screening: {s['rows']:,} rows of {s['tensors']} matrices, "
                      f"{_size(s['bytes_per_checkpoint'])} per checkpoint (seed {s['seed']})"]
    lines += ["", "findings:"] + [f"  - {escape_name(f)}" for f in d["findings"]]
    lines += ["", "what this cannot see:"] + [f"  - {x}" for x in d["limits"]]
    return "\n".join(lines) + "\n"


def lineage_text(d: dict) -> str:
    """Each step of a chain, the end-to-end change, and relative change per block and step."""
    rows = [*[(f"step {i}", s) for i, s in enumerate(d["steps"], 1)], ("end to end", d["end_to_end"])]
    lines = ["weightdiff lineage: " + " -> ".join(escape_name(p) for p in d["paths"]), ""]
    head = f"{'':<11} {'verdict':<10} {'rel.change':>10} {'1-cosine':>9} {'blocks':>9} {'path share':>10}"
    lines += [head, "-" * len(head)]
    for label, s in rows:
        path_share = s.get("share_of_path", s.get("straightness"))
        # (no element compared: no block is said to have changed; the findings say why)
        blocks = f"{s['blocks_changed']}/{s['blocks_total']}" if step_compared(s) else MISSING
        lines.append(f"{label:<11} {s['verdict']:<10} {sci(s['relative_change']):>10} "
                     f"{sci(s['one_minus_cosine']):>9} "
                     f"{blocks:>9} {share(path_share):>10}")
    lines += ["", "path share: each step's delta norm over the summed step norms; on the end-to-end row, "
                  "end-to-end norm over that sum (straightness)", "",
              "relative change per block:",
              f"{'block':<24}" + "".join(f"{'step ' + str(i):>11}" for i in range(1, len(d["steps"]) + 1))
              + f"{'end to end':>11}"]
    for b in d["blocks"]:
        lines.append(f"{escape_name(b['block'])[:24]:<24}" + "".join(f"{sci(v):>11}" for v in b["steps"])
                     + f"{sci(b['end_to_end']):>11}")
    lines += ["", "findings:"] + [f"  - {escape_name(f)}" for f in d["findings"]]
    return "\n".join(lines) + "\n"


def draw_provenance(d: dict) -> Figure:
    """Two bar panels, one row per candidate: relative change and 1 - cosine of the large
    matrices, log scale, with the unrelated reference and the verdict's thresholds."""
    cands = [c for c in d["candidates"]]
    thr = d["settings"]["thresholds"]
    ref = d["reference"]
    with rc_context(STYLE):
        fig = _figure(1.9 + 0.32 * max(1, len(cands)))
        ax1, ax2 = fig.subplots(1, 2, sharey=True)
        fig.suptitle("Candidate bases against an unrelated model", fontsize=10, fontweight="bold")
        ys = list(range(len(cands)))
        labels = [text(f"{c['rank']}. {c['path'][-30:]}" + (" (sampled)" if c["compared"] == "sample" else ""))
                  for c in cands]
        handles = {}
        for ax, key, ref_v, thr_v, title, xlabel in (
                (ax1, "relative_change_large", ref["relative_change"], thr["unrelated_rel_change"],
                 "Relative change", "‖ΔW‖ / ‖W‖, large matrices (log)"),
                (ax2, "one_minus", 1.0 - ref["cosine"], 1.0 - thr["unrelated_cosine"], "1 − cosine",
                 "1 − cosine, large matrices (log)")):
            vals = [(_omc(c) if key == "one_minus" else c.get(key)) for c in cands]
            pos = [v for v in vals if v is not None and v > 0]
            floor = min(pos + [ref_v]) / 3 if pos else ref_v / 1e3
            for y, v, c in zip(ys, vals, cands):
                if v is None:
                    continue
                bar = ax.barh(y, max(v, floor), color=_VERDICT_COLOUR[c["verdict"]],
                              hatch="//" if c["verdict"] == "unrelated" else ".." if c["verdict"] == "partial" else "", edgecolor="white", linewidth=0.5)
                handles.setdefault(c["verdict"], bar)
            line = ax.axvline(ref_v, color=OKABE_ITO["black"], linestyle="--", linewidth=1.0)
            handles.setdefault("unrelated reference (independent inits)", line)
            thr_line = ax.axvline(thr_v, color=GREY, linestyle=":", linewidth=1.0)
            handles.setdefault("threshold of the unrelated rule", thr_line)
            ax.set_xscale("log")
            ax.set_xlim(floor, max(pos + [ref_v]) * 3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
        ax1.set_yticks(ys, labels)
        ax1.set_ylabel("candidate base (rank)")
        ax1.invert_yaxis()
        fig.legend(list(handles.values()), [f"candidate reads {k}" if k in _VERDICT_COLOUR else k for k in handles],
                   loc="outside lower center", ncols=2, fontsize=7.5)
        if not cands:
            ax1.text(0.5, 0.5, "no candidate compared", transform=ax1.transAxes, ha="center")
    return fig


def caption_provenance(d: dict) -> str:
    """The chart's caption, with the numbers it draws."""
    thr, ref = d["settings"]["thresholds"], d["reference"]
    cands = d["candidates"]
    which = f"Each of the {len(cands)} compared candidates (rows, closest first)" if len(cands) != 1 else \
        "The 1 compared candidate"
    text = (f"{which} against the tuned model: relative "
            f"change (left) and 1 − cosine (right) of the large matrices, log scale; filled bars read derived, "
            f"hatched bars unrelated. Dashed lines: {ref.get('what', 'two independently initialised models')} "
            f"({sci(ref['relative_change'])} and {sci(1.0 - ref['cosine'])}); dotted lines: the unrelated rule's "
            f"thresholds ({sci(thr['unrelated_rel_change'])} and {sci(1.0 - thr['unrelated_cosine'])}).")
    if cands:
        c = cands[0]
        text += (f" The closest, {escape_name(c['path'])}, reads {sci(c.get('relative_change_large'))} and "
                 f"{sci(_omc(c))}.")
    return text


def provenance_figure(d: dict, formats: tuple[str, ...] = ("png", "svg")) -> tuple[FigureOutput, dict[str, bytes]]:
    """The chart as a memo figure (SVG and PNG kept for the HTML and Word memo) and its
    bytes in ``formats``."""
    blobs = {f: figure_bytes(draw_provenance(d), f) for f in dict.fromkeys(list(formats) + ["svg", "png"])}
    fo = FigureOutput("provenance", "Candidate bases", caption_provenance(d), svg=blobs["svg"], png=blobs["png"])
    return fo, {f: blobs[f] for f in formats}


def provenance_png(d: dict) -> bytes:
    """The chart as PNG bytes that depend only on ``d``."""
    return figure_bytes(draw_provenance(d), "png")


def _size(n: int) -> str:
    """Bytes in KiB or MiB: ``_size(12288) -> '12.0 KiB'``."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
