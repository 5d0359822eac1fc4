"""Memo sections for provenance and lineage results, as the memo's neutral blocks.

``render.memo`` lays out a comparison; this module lays out the other two JSON kinds
(``weightdiff.provenance/1``, ``weightdiff.lineage/1``) with the same blocks, so one
document (HTML, Markdown or Word) can hold a section for each result that
``weightdiff report`` is given, and ``provenance --report`` writes a complete document.
"""

from __future__ import annotations

from typing import Sequence

from . import formats as fmt
from .memo import Block, CAVEATS, _c, run_date
from .sentences import parts_text

__all__ = ["provenance_blocks", "lineage_blocks"]


def _spans(text: str) -> list[tuple[str, str]]:
    """A finding's text as memo segments: its `...` spans (paths, tensor names) as code, so no format
    prints the backticks themselves; text with an odd number of backticks stays plain."""
    parts = text.split("`")
    if len(parts) % 2 == 0:
        return [("", text)]
    return [("code" if i % 2 else "", part) for i, part in enumerate(parts) if part]


def _omc(c: dict) -> float | None:
    cos = c.get("cosine_large")
    return None if cos is None else max(0.0, 1.0 - cos)


_WEAK_WORDS = {"relative_change": "relative change", "cosine": "cosine"}


def provenance_blocks(d: dict, figures: Sequence = (), first: int = 1) -> list[Block]:
    """A provenance result: the question, the leading candidate with caveats, the ranking
    table, the chart, findings and limits."""
    tuned = d.get("tuned") or {}
    label = str(tuned.get("label") or "").strip() and tuned["label"] or tuned.get("path", "?")
    out = [Block("h1", f"Which base was {label} derived from?"),
           Block("ident", [("b", "Tuned: "), ("code", tuned.get("path", "?"))]),
           Block("ident", [("b", "Run: "), ("", run_date(d))])]
    lead = d.get("leading")
    cands = d.get("candidates") or []
    derived = [c for c in cands if c.get("verdict") == "derived"]
    ans = d.get("answer") or {"kind": "derived" if lead else "none", "leading": lead, "tied": []}
    direction = ("Derived means related by a fine-tune in one direction or the other: the weights do not say "
                 "which came first.")
    margin = (d.get("margins") or {}).get("near_tie_ratio", 1.2)
    others = ", ".join(str(p) for p in ans.get("tied") or [])
    if ans["kind"] == "identical" and lead:
        title = f"IDENTICAL to {lead}" + (f" and {others}" if others else "") + ": the same weights"
        reason = (f"Every compared tensor of this model is bitwise equal to {lead}'s: the same weights, "
                  "not a fine-tune.")
    elif ans["kind"] == "cast_only" and lead:
        title = f"CAST of {lead}" + (f" and {others}" if others else "") + ": the same weights at another precision"
        reason = (f"Every difference from {lead} is within the rounding of a cast: the same weights stored at "
                  "another precision (either may be the cast of the other), not a fine-tune.")
    elif ans["kind"] == "tie":
        tied = ", ".join(str(p) for p in ans.get("tied") or [])
        title = f"DERIVED from {lead} or {tied}: the weights cannot tell them apart"
        reason = (f"{fmt.count(len(derived))} of {fmt.count(len(cands))} candidates read derived; {tied} "
                  f"{'is' if len(ans.get('tied') or []) == 1 else 'are'} within {margin}x of {lead}, too close "
                  f"to name one. {direction}")
    elif ans["kind"] == "weak" and lead:
        title = f"WEAK EVIDENCE: closest to {lead}, near the unrelated reference"
        by = ans.get("weak_by") or ["relative_change", "cosine"]
        numbers = (" and ".join(_WEAK_WORDS[k] for k in by) + (" are" if len(by) > 1 else " is"))
        reason = (f"{lead} reads derived, but its {numbers} nearer two independent models than a fine-tune: "
                  f"the weights are not independent, and little more can be said. {direction}")
    elif ans["kind"] == "partial":
        title = (f"PARTIALLY DERIVED from {ans['leading']}: shares {parts_text(ans.get('shared') or [])} "
                 f"with it; {parts_text(ans.get('unrelated') or [])} unrelated")
        reason = ("No candidate is a base of the whole model; some of its components come from "
                  f"{ans['leading']} and the others do not. {direction}")
    elif lead:
        title = f"DERIVED from {lead}"
        apart = [str(x.get("path")) for x in ans.get("separated") or []]
        reason = (f"{fmt.count(len(derived))} of {fmt.count(len(cands))} candidates read derived; "
                  f"{lead} is the closest"
                  + (f"; {', '.join(apart)} {'is' if len(apart) == 1 else 'are'} within {margin}x of it on the pooled "
                     f"change, but the weights single out {lead} (bitwise equal, or closer block by block: see the "
                     "findings)" if apart else "") + f". {direction}")
    elif cands:
        skipped = len(d.get("incompatible") or [])
        title = "NO CANDIDATE: none of the compared candidates is a base of this model."
        reason = "Every candidate compared reads unrelated." + (
            f" {fmt.count(skipped)} could not be compared and {'is' if skipped == 1 else 'are'} not judged "
            "(listed under Not compared)." if skipped else "")
    else:
        why = "; ".join(f"{c.get('path', '?')}: {c.get('reason', '')}" for c in d.get("incompatible") or [])
        title = "INCONCLUSIVE: no candidate could be compared with this model."
        reason = ("Nothing was compared, so this says nothing about whether any candidate is its base"
                  + (f" ({why})." if why else "."))
    out.append(Block("verdict", title, [reason, CAVEATS]))
    out.append(Block("p", str(d.get("relatedness") or "") + "."))
    rows = [[fmt.count(c.get("rank")), _c(c.get("path")), _c(c.get("verdict")),
             fmt.sci(c.get("relative_change_large")), fmt.sci(_omc(c)), fmt.share(c.get("identical_share")),
             fmt.share(c.get("coverage")), c.get("compared", "")] for c in d.get("candidates") or []]
    ref = d.get("reference") or {}
    rows.append(["", f"reference: {ref.get('what', 'unrelated models')}", _c("unrelated"),
                 fmt.sci(ref.get("relative_change")),
                 fmt.sci(None if ref.get("cosine") is None else 1.0 - ref["cosine"]), "", "", ""])
    out.append(Block("table", ["#", "candidate", "verdict", "relative change", "1 − cosine", "identical tensors",
                               "coverage", "compared"], rows))
    for i, fo in enumerate(figures, start=first):
        out.append(Block("figure", fo, i))
    if d.get("incompatible"):
        out.append(Block("h3", "Not compared"))
        out.append(Block("ul", [[("code", c.get("path", "?")), ("", ": " + str(c.get("reason", "")))]
                                for c in d["incompatible"]]))
    out.append(Block("h3", "Findings"))
    out.append(Block("ul", [_spans(str(f)) for f in d.get("findings") or []]))
    out.append(Block("h3", "What this method cannot see"))
    out.append(Block("ul", [str(x) for x in d.get("limits") or []]))
    return out


def lineage_blocks(d: dict) -> list[Block]:
    """A lineage chain: each step's change, the end-to-end change, per-block change by step."""
    paths = d.get("paths") or []
    out = [Block("h1", "How did the weights move along " + " → ".join(str(p) for p in paths) + "?"),
           Block("ident", [("b", "Run: "), ("", run_date(d))])]
    steps = list(d.get("steps") or [])
    rows = []
    for i, s in enumerate([*steps, d.get("end_to_end") or {}], 1):
        label = "end to end" if i > len(steps) else f"step {i}"
        share = s.get("share_of_path", s.get("straightness"))
        rows.append([label, _c(s.get("from")), _c(s.get("to")), _c(s.get("verdict")), fmt.sci(s.get("relative_change")),
                     fmt.sci(s.get("one_minus_cosine")),
                     fmt.step_blocks_text(s, short=True), fmt.share(share)])
    out.append(Block("table", ["", "from", "to", "verdict", "relative change", "1 − cosine", "blocks changed",
                               "share of path"], rows))
    out.append(Block("p", "Share of path: each step's delta norm over the summed step norms; on the end-to-end row, "
                          "the end-to-end norm over that sum (1 when every step moved the weights the same way)."))
    blocks = d.get("blocks") or []
    if blocks:
        out.append(Block("h3", "Relative change per block and step"))
        out.append(Block("table", ["block"] + [f"step {i}" for i in range(1, len(steps) + 1)] + ["end to end"],
                         [[_c(b.get("block"))] + [fmt.sci(v) for v in b.get("steps") or []] + [fmt.sci(b.get("end_to_end"))]
                          for b in blocks]))
    out.append(Block("h3", "Findings"))
    out.append(Block("ul", [_spans(str(f)) for f in d.get("findings") or []]))
    return out
