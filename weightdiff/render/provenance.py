"""Rendering of provenance and lineage results: terminal text, a bar chart, a memo section.

Reads only the JSON dicts (``weightdiff.provenance/1``, ``weightdiff.lineage/1``), so
a saved result redraws without the checkpoints. The chart puts every candidate's
large-matrix relative change and 1 - cosine next to the unrelated reference (two
independently initialized models: sqrt(2) and 1) and the thresholds of the verdict.
Figures are plain ``Figure`` objects on Agg whose bytes depend only on the dict
(``plots.figure_bytes``).
"""

from __future__ import annotations

import html

from matplotlib import rc_context
from matplotlib.figure import Figure

from ..errors import escape_name
from .formats import count, num, sci, share
from .memo import md_escape
from .plots import GREY, OKABE_ITO, STYLE, _figure, figure_bytes, text

__all__ = ["ranking_text", "lineage_text", "draw_provenance", "provenance_png", "provenance_markdown",
           "provenance_html", "lineage_markdown"]

_VERDICT_COLOUR = {"derived": OKABE_ITO["blue"], "unrelated": OKABE_ITO["vermillion"]}


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
        lines.append(f"{label:<11} {s['verdict']:<10} {sci(s['relative_change']):>10} "
                     f"{sci(s['one_minus_cosine']):>9} "
                     f"{str(s['blocks_changed']) + '/' + str(s['blocks_total']):>9} {share(path_share):>10}")
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
    """Two bar panels per candidate (relative change; 1 - cosine) with the unrelated reference."""
    cands = [c for c in d["candidates"]]
    thr = d["settings"]["thresholds"]
    ref = d["reference"]
    with rc_context(STYLE):
        fig = _figure(1.2 + 0.32 * max(1, len(cands)))
        ax1, ax2 = fig.subplots(1, 2, sharey=True)
        ys = list(range(len(cands)))
        labels = [text(f"{c['rank']}. {c['path'][-30:]}" + (" (sampled)" if c["compared"] == "sample" else ""))
                  for c in cands]
        for ax, key, ref_v, thr_v, title in (
                (ax1, "relative_change_large", ref["relative_change"], thr["unrelated_rel_change"],
                 "Relative change (large matrices)"),
                (ax2, "one_minus", 1.0 - ref["cosine"], 1.0 - thr["unrelated_cosine"], "1 - cosine (large matrices)")):
            vals = [(_omc(c) if key == "one_minus" else c.get(key)) for c in cands]
            pos = [v for v in vals if v is not None and v > 0]
            floor = min(pos + [ref_v]) / 3 if pos else ref_v / 1e3
            for y, v, c in zip(ys, vals, cands):
                if v is None:
                    continue
                ax.barh(y, max(v, floor), color=_VERDICT_COLOUR[c["verdict"]],
                        hatch="//" if c["verdict"] == "unrelated" else "", edgecolor="white", linewidth=0.5)
            ax.axvline(ref_v, color=OKABE_ITO["black"], linestyle="--", linewidth=1.0,
                       label=f"unrelated reference ({ref_v:.3g})")
            ax.axvline(thr_v, color=GREY, linestyle=":", linewidth=1.0, label=f"threshold ({thr_v:.3g})")
            ax.set_xscale("log")
            ax.set_xlim(floor, max(pos + [ref_v]) * 3)
            ax.set_title(title)
        ax1.set_yticks(ys, labels)
        ax1.invert_yaxis()
        ax2.legend(loc="lower right")
        if not cands:
            ax1.text(0.5, 0.5, "no candidate compared", transform=ax1.transAxes, ha="center")
    return fig


def provenance_png(d: dict) -> bytes:
    """The chart as PNG bytes that depend only on ``d``."""
    return figure_bytes(draw_provenance(d), "png")


def provenance_markdown(d: dict, image: str | None = None) -> str:
    """A memo section in Markdown (``image``: a relative path of the saved chart, optional)."""
    out = ["## Provenance", "", f"Tuned model: `{escape_name(d['tuned']['path'])}`. {md_escape(d['relatedness'])}.", ""]
    if image:
        out += [f"![candidate bases against the unrelated reference]({image})", ""]
    out += ["| # | candidate | verdict | relative change | 1 - cosine | identical tensors | coverage | compared |",
            "|---|---|---|---|---|---|---|---|"]
    for c in d["candidates"]:
        out.append(f"| {c['rank']} | {md_escape(c['path'])} | {c['verdict']} | {sci(c['relative_change_large'])} "
                   f"| {sci(_omc(c))} | {share(c.get('identical_share'))} | {share(c.get('coverage'))} "
                   f"| {c['compared']} |")
    ref = d["reference"]
    out.append(f"| | reference: {md_escape(ref['what'])} | unrelated | {sci(ref['relative_change'])} "
               f"| {sci(1 - ref['cosine'])} | | | |")
    out += ["", "Findings:", ""] + [f"- {md_escape(f)}" for f in d["findings"]]
    out += ["", "What this method cannot see:", ""] + [f"- {md_escape(x)}" for x in d["limits"]]
    return "\n".join(out) + "\n"


def provenance_html(d: dict, image: str | None = None) -> str:
    """The same section as an HTML fragment (every name escaped)."""
    h = lambda s: html.escape(escape_name(str(s)), quote=True)  # noqa: E731
    out = ["<section class=\"provenance\">", "<h2>Provenance</h2>",
           f"<p>Tuned model: <code>{h(d['tuned']['path'])}</code>. {h(d['relatedness'])}.</p>"]
    if image:
        out.append(f"<img src=\"{h(image)}\" alt=\"candidate bases against the unrelated reference\">")
    out.append("<table><tr><th>#</th><th>candidate</th><th>verdict</th><th>relative change</th>"
               "<th>1 - cosine</th><th>identical tensors</th><th>coverage</th><th>compared</th></tr>")
    for c in d["candidates"]:
        cells = [c["rank"], c["path"], c["verdict"], sci(c["relative_change_large"]), sci(_omc(c)),
                 share(c.get("identical_share")), share(c.get("coverage")), c["compared"]]
        out.append("<tr>" + "".join(f"<td>{h(x)}</td>" for x in cells) + "</tr>")
    out.append("</table>")
    for title, items in (("Findings", d["findings"]), ("What this method cannot see", d["limits"])):
        out.append(f"<h3>{title}</h3><ul>" + "".join(f"<li>{h(x)}</li>" for x in items) + "</ul>")
    out.append("</section>")
    return "\n".join(out) + "\n"


def lineage_markdown(d: dict) -> str:
    """A memo section for a lineage chain."""
    out = ["## Lineage", "", " -> ".join(f"`{escape_name(p)}`" for p in d["paths"]), "",
           "| step | verdict | relative change | 1 - cosine | blocks changed | share of path |", "|---|---|---|---|---|---|"]
    for i, s in enumerate([*d["steps"], d["end_to_end"]], 1):
        label = "end to end" if i > len(d["steps"]) else f"{i}"
        path_share = s.get("share_of_path", s.get("straightness"))
        out.append(f"| {label} | {s['verdict']} | {sci(s['relative_change'])} | {sci(s['one_minus_cosine'])} "
                   f"| {s['blocks_changed']}/{s['blocks_total']} | {share(path_share)} |")
    out += ["", "Findings:", ""] + [f"- {md_escape(f)}" for f in d["findings"]]
    return "\n".join(out) + "\n"


def _size(n: int) -> str:
    """Bytes in KiB or MiB: ``_size(12288) -> '12.0 KiB'``."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
