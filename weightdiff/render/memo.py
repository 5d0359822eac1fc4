"""The memo: one document laid out once as neutral blocks, written as HTML, Markdown or Word.

``build(data, figures)`` lays a comparison out as a list of blocks (headings, paragraphs,
lists, tables, figures, the verdict with its caveats, a page break); ``memo_html``,
``memo_md`` and ``memo_docx`` write those blocks out, each escaping every string from the
JSON for the output it lands in. Page one is for a reader who stops there: the two
models by label, the verdict in one sentence beside what weights cannot show, a paragraph
in plain words, five key figures, the depth profile and the reference scale. Methodology,
rules, thresholds and the per-tensor tables follow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence, Union

from . import captions as cap
from . import formats as fmt
from . import memo_text as txt
from . import sentences
from .memo_html import to_html
from .memo_md import md_escape, to_markdown
from .plots import FigureOutput
from .reference import nonfinite_only, one_minus_cosine_of, only_nonfinite, quantization_noise, reference_of, unmeasured_blocks

__all__ = ["Block", "build", "first_page", "key_figures", "to_html", "to_markdown", "md_escape", "CAVEATS"]

Seg = tuple[str, str]                    # (style, text): style "" | "code" | "b"
Inline = Union[str, list[Seg]]


@dataclass
class Block:
    kind: str                            # h1 h2 h3 p ident ul table pre figure verdict pagebreak
    content: object
    extra: object = None                 # heading: its anchor; table: rows; figure: number; verdict: [reason, caveats]
    style: str = ""                      # a class name the HTML writer gives the block (a style hook)


def _c(text: object) -> list[Seg]:
    return [("code", str(text))]


#: plan notes listed in the memo's Notes (the rest are in the JSON; a model with thousands of renamed tensors
#: would otherwise fill pages)
MAX_NOTES = 40


def _code_spans(text: str) -> list[Seg]:
    """A note as inline segments, its backticked names as code: ``a `x` b`` -> [("", "a "), ("code", "x"),
    ("", " b")]. The notes name tensors in backticks (``errors.escape_name``), which each writer escapes."""
    parts = text.split("`")
    if len(parts) % 2 == 0:                 # an unpaired backtick: the text as it is
        return [("", text)]
    return [("code" if i % 2 else "", p) for i, p in enumerate(parts) if p]


def _short(t: dict, key: str = "shape") -> str:
    """A shape as the memo prints it: ``4096×14336``; ``scalar`` for a 0-d tensor (an empty cell read as
    missing), ``-`` where the record has none (an added tensor has no base shape)."""
    shape = t.get(key)
    if shape is None:
        return "-"
    return "×".join(str(x) for x in shape) or "scalar"


def top_blocks(data: dict, n: int = 10) -> list[dict]:
    bs = [b for b in data.get("blocks", []) if cap.block_changed(b) or (b.get("rel_change") or 0) > 0]
    return sorted(bs, key=lambda b: (-(b.get("rel_change") or 0.0), str(b.get("block"))))[:n]


def top_tensors(data: dict, n: int = 15) -> list[dict]:
    ts = [t for t in data.get("tensors", []) if t.get("status") in ("changed", "rounding", "resized")
          and (t.get("rel_change") or 0) > 0]
    return sorted(ts, key=lambda t: (-(t.get("rel_change") or 0.0), str(t.get("name"))))[:n]


def structural(data: dict, n: int = 30) -> list[dict]:
    return [t for t in data.get("tensors", []) if t.get("status") in ("added", "removed", "resized")][:n]


CAVEATS = [
    "Weights only: not the training data, nor how a model behaves.",
    "Distillation or retraining from scratch leaves no trace in the weights.",
    "No legal conclusion: the numbers inform a judgement, they do not settle it.",
]


def identity(entry: dict) -> list[Seg]:
    """How a model is named on the first page: its label, then where it came from (path or
    Hub repo id, revision and commit)."""
    label = sentences.model_label(entry)
    hub = entry.get("hub") or {}
    where = []
    if hub.get("repo_id"):
        where.append(("code", hub["repo_id"] + (f"@{hub['revision']}" if hub.get("revision") else "")))
        if hub.get("commit"):
            where += [("", ", commit "), ("code", str(hub["commit"])[:12])]
    else:
        where.append(("code", entry.get("path", "?")))
    if label == str(entry.get("path")):
        return where
    return [("b", label), ("", " (")] + where + [("", ")")]


def run_date(data: dict) -> str:
    """The date of the run (``run.date``, UTC), or a note that it was not recorded."""
    date = (data.get("run") or {}).get("date")
    if not date:
        return "not recorded in this result"
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(:\d\d)?Z", str(date))
    return f"{m.group(1)} {m.group(2)} UTC" if m else str(date)


def key_figures(data: dict) -> list[list[Inline]]:
    """The five rows of the first page's key-figures table: figure, value, what it means."""
    s = data.get("summary") or {}
    total = fmt.tuned_params(s)
    ref = reference_of(data)
    same, aside = sentences.unchanged_words(data, total) if total else (fmt.MISSING, "")
    points = {p["key"]: p for p in ref.get("points") or []}
    model = points.get("model") or {}
    bf16 = (points.get("BF16") or {}).get("rel_change")
    rel_note = "size of the change over size of the weights"
    nan_only = only_nonfinite(data)     # 0 over the finite values, which are the base's: not a measurement
    quantized, noise = quantization_noise(data)
    if quantized:
        # the quantization's own noise is in the figure: never read as the size of the change
        rel_note = ("size of the difference over size of the weights, the quantization noise included"
                    + (f" (matrices within their quantization noise floor: {fmt.sci(noise)})" if noise is not None
                       else ""))
    elif bf16:
        rel_note += f" (bfloat16 rounding alone: {fmt.sci(bf16)})"
    return [
        ["parameters bit for bit unchanged", f"{same} of {fmt.count(total)}{aside}",
         # counted beneath a reordering, rotation or rescale, as the headline says: as stored, those numbers moved
         (f"numbers not touched, once {' and '.join(undone)}" if (undone := sentences.undone_words(s))
          else "numbers not touched at all")
         + (f"; a further {same_bytes}" if (same_bytes := sentences.same_bytes_words(s, total)) else "")],
        ["blocks changed", fmt.summary_blocks_text(s, short=True),
         "layers of the stack with any change" + fmt.floor_blocks(s)],
        ["relative change (large matrices)", fmt.MISSING if nan_only else fmt.sci(model.get("rel_change")),
         "not measured: the models differ only by NaN or infinite values" if nan_only else rel_note],
        ["1 − cosine (large matrices)", fmt.MISSING if nan_only else fmt.sci(model.get("one_minus_cosine")),
         "turn of direction: 0 none, 1 unrelated models"],
        ["parameters to write the change down", fmt.delta_params_text(s),
         # beneath a reordering, rotation or rescale the count leaves the transformation out: "0, how much was
         # injected" was said of a rotated model, whose rotation alone takes a matrix of numbers to write down
         f"how much differs once {' and '.join(undone)}, written compactly (what was undone is not counted in "
         "it)" if undone else
         # "injected" says this base was changed: not for an unrelated, inconclusive or identical model
         "how much was injected, written compactly" if s.get("verdict") in ("derived", "partial")
         else "how much differs from this base, written compactly"],
    ]


def first_page(data: dict, figures: dict[str, FigureOutput]) -> list[Block]:
    """Page one: who was compared, the verdict with its caveats, the paragraph in plain words,
    the key figures, the depth profile and the reference scale."""
    s = data.get("summary") or {}
    bases = data.get("base") or []
    tuned = data.get("tuned") or {}
    base_names = " and ".join(sentences.model_label(b) for b in bases) or "?"
    out = [Block("h1", f"How far is {sentences.model_label(tuned)} from {base_names}?")]
    for b in bases:
        out.append(Block("ident", [("b", "Base: ")] + identity(b)))
    out.append(Block("ident", [("b", "Tuned: ")] + identity(tuned)))
    out.append(Block("ident", [("b", "Run: "), ("", run_date(data) + f"; weightdiff "
                                                + str((data.get('tool') or {}).get('version', '?')))]))
    out.append(Block("verdict", sentences.verdict_title(s), [s.get("verdict_reason") or "", CAVEATS]))
    out.append(Block("h2", "In plain words"))
    out.append(Block("p", " ".join(sentences.plain_language(data))))
    out.append(Block("table", ["key figure", "value", "what it means"], key_figures(data), "keyfigs"))
    n = 0
    for name in ("depth_profile", "reference_scale"):
        if name in figures:
            n += 1
            out.append(Block("figure", figures[name], n))
    out.append(Block("pagebreak", None))
    return out


def build(data: dict, figures: Sequence[FigureOutput], source: dict | None = None,
          population: Sequence[str] = ()) -> list[Block]:
    """The memo as neutral blocks, from the JSON dict, its figures and where the JSON came from;
    ``population``: sentences placing the model within a survey (render.population)."""
    s = data.get("summary") or {}
    base = ", ".join(str(b.get("path")) for b in (data.get("base") or [])) or "?"
    tuned = (data.get("tuned") or {}).get("path", "?")
    by_name = {f.name: f for f in figures}
    out = first_page(data, by_name)
    shown = [f for f in figures if f.name not in ("depth_profile", "reference_scale")]
    first_number = len(figures) - len(shown) + 1
    out += [Block("h2", "Summary"), Block("ul", cap.headline_sentences(data))]
    if population:
        out.append(Block("p", " ".join(population)))

    out.append(Block("h2", "The verdict in detail"))
    out.append(Block("verdict", s.get("verdict", "?"), [s.get("verdict_reason") or "", None]))
    scope, form = s.get("scope") or {}, s.get("form") or {}
    rows = [["verdict", _c(s.get("verdict"))],
            ["blocks changed", fmt.summary_blocks_text(s, short=True)],
            ["tensors changed or added" if (s.get("tensors_by_status") or {}).get("added") else "tensors changed",
             f"{fmt.MISSING} (none could be compared)" if fmt.nothing_compared(s) else
             f"{fmt.at_least(s)}{fmt.count(scope.get('tensors_changed'))} of "
                                f"{fmt.count(scope.get('tensors_total'))}"
                                + (f" ({fmt.count(fmt.within_floor(s).get('tensors'))} more within their quantization "
                                   "noise floor)" if fmt.within_floor(s) else "")
                                + (f" ({fmt.count(r)} {'other' if r == 1 else 'others'} of another shape, not compared)"
                                   if (r := (scope.get("tensors_reshaped") or {}).get("tensors")) else "")],
            ["form of the change", _c(form.get("kind") or "none")],
            ["largest numerical rank", fmt.max_rank(form)],
            ["delta parameters", fmt.delta_params_text(s)],
            ["model relative change", fmt.MISSING if only_nonfinite(data) else fmt.sci(s.get("relative_change"))],
            [f"1 − cosine ({sentences.matrices_phrase(s)})",
             fmt.MISSING if only_nonfinite(data) else fmt.sci(one_minus_cosine_of(data))],
            ["flags", _c(", ".join(s.get("flags") or []) or "none")]]
    out.append(Block("table", ["", "value"], rows))
    comps = s.get("components") or []
    if any(c.get("status") in ("unrelated", "faint", "reshaped", "base_only", "tuned_only") for c in comps):
        out.append(Block("p", "Relatedness per component (each judged on its own matrices):"))
        out.append(Block("table", ["component", "status", "1 − cosine", "relative change", "parameters"],
                         [[_c(c.get("component")), c.get("status", "").replace("_", " "),
                           fmt.sci(None if c.get("cosine") is None else max(0.0, 1.0 - c["cosine"])),
                           fmt.sci(c.get("rel_change")), fmt.count(c.get("params"))] for c in comps]))
    notes = [str(n) for n in (data.get("plan") or {}).get("notes") or []]
    if notes:
        # the reasons say "see the notes" (which base block each moved block copies, a head that loads at random):
        # the memo had no notes to see, only the JSON and stderr did
        out.append(Block("h3", "Notes", "notes"))
        out.append(Block("p", "What weightdiff noted while reading and pairing the two models (the JSON's "
                              "plan.notes):"))
        out.append(Block("ul", [_code_spans(n) for n in notes[:MAX_NOTES]]
                         + ([f"... and {fmt.count(len(notes) - MAX_NOTES)} more in the JSON."]
                            if len(notes) > MAX_NOTES else [])))
    out.append(Block("p", "The verdict follows these rules, checked in this order (the numbers are in the "
                          "thresholds table below):"))
    out.append(Block("ul", [[("b", name + ": "), ("", rule)] for name, rule in txt.VERDICTS]))
    out.append(Block("p", "A derived model's form:"))
    out.append(Block("ul", [[("b", name + ": "), ("", rule)] for name, rule in txt.FORMS]))
    th = ((data.get("settings") or {}).get("thresholds") or {})
    if th:
        out.append(Block("h3", "Thresholds used"))
        out.append(Block("table", ["threshold", "value", "meaning"],
                         [[_c(k), _c(v), txt.THRESHOLD_MEANING.get(k, "")] for k, v in th.items()]))

    if shown:
        out.append(Block("h2", "More figures"))
    for i, fo in enumerate(shown, start=first_number):
        out.append(Block("figure", fo, i))

    out.append(Block("h2", "Most changed blocks"))
    tb = top_blocks(data)
    nan_blocks = unmeasured_blocks(data)
    if tb:
        out.append(Block("table", ["block", "parameters", "changed", "relative change", "largest numerical rank",
                                   "delta parameters"],
                         [[_c(b.get("block")), fmt.count(b.get("params")), fmt.count(b.get("params_changed")),
                           fmt.MISSING if b.get("block") in nan_blocks else fmt.sci(b.get("rel_change")), fmt.max_rank(b),
                           fmt.delta_params_count(b)] for b in tb]))
    else:
        out.append(Block("p", "No block changed."))
    out.append(Block("h2", "Most changed tensors"))
    tt = top_tensors(data)
    if tt:
        rows = []
        for t in tt:
            r = t.get("rank") or {}
            nan_only = nonfinite_only(t)    # NaN/Inf only: 0 over the finite values measures nothing
            rows.append([_c(t.get("name")), t.get("status", ""), _short(t),
                         fmt.MISSING if nan_only else fmt.sci(t.get("rel_change")),
                         fmt.MISSING if nan_only else fmt.sci(cap.one_minus_cosine(t)), fmt.rank_text(r, "energy_rank_90"),
                         fmt.rank_text(r, "energy_rank_99"), fmt.rank_text(r, "numerical_rank"),
                         fmt.rank_text(r, "stable_rank", fmt.num)])
        out.append(Block("table", ["tensor", "status", "shape", "relative change", "1 − cosine", "energy rank 90%",
                                   "energy rank 99%", "numerical rank", "stable rank"], rows))
    else:
        out.append(Block("p", "No tensor changed beyond its storage format."))
    st = structural(data)
    if st:
        out.append(Block("h3", "Added, removed and resized tensors"))
        out.append(Block("table", ["tensor", "status", "shape", "base shape", "note"],
                         [[_c(t.get("name")), t.get("status", ""), _short(t),
                           _short(t, "base_shape"), t.get("note") or ""]
                          for t in st]))

    out.append(Block("h2", "How the numbers are computed", "methodology"))
    out.append(Block("p", "For each tensor of the tuned model paired with the base: B is the base tensor, T the "
                          "tuned tensor, D = T − B their difference, decoded from the stored format and summed in "
                          "64-bit floating point; s1 ≥ s2 ≥ ... are the singular values of D (tensors with more "
                          "than two dimensions are read as rows × the rest)."))
    out.append(Block("table", ["measure", "in plain words", "formula"],
                     [[[("b", m)], w, _c(f)] for m, w, f in txt.METRICS]))
    out.append(Block("p", txt.SPECTRUM_NOTE))
    fired = [f for f in txt.TRANSFORMS if f in (s.get("flags") or [])]
    if any(f != "pruned_elements" for f in fired):
        # the verdict measured some tensors against the base transformed, not against the base as stored
        out.append(Block("p", "Measured beneath a transformation: where the verdict names one, D = T − f(B), f the "
                              "transformation found (a reordering, a sign flip, a rescale, a fold or a rotation of "
                              "the base's weights), so the numbers are of what changed beneath it; as stored, those "
                              "tensors differ from the base's by the transformation itself."))
    if fired:
        out.append(Block("p", "What the changes the verdict names mean:"))
        out.append(Block("ul", [txt.TRANSFORMS[f][0] for f in fired]))
    if (data.get("settings") or {}).get("spectrum") == "count":
        out.append(Block("p", txt.COUNT_NOTE))
    out.append(Block("h2", "What these numbers show, and what they do not", "limits"))
    out.append(Block("p", [("b", "They show:")]))
    out.append(Block("ul", txt.SHOWS))
    out.append(Block("p", [("b", "They do not show:")]))
    out.append(Block("ul", txt.DOES_NOT_SHOW))
    out.append(Block("h3", "Sources"))
    out.append(Block("ul", txt.SOURCES + [src for f in fired for src in txt.TRANSFORMS[f][1]]))

    out.append(Block("h2", "Reproducibility"))
    run = data.get("run") or {}
    cmd = run.get("command") or f"weightdiff compare {base} {tuned}"
    out.append(Block("p", "Command that produced the numbers:"))
    out.append(Block("pre", str(cmd)))
    if source:
        out.append(Block("p", [("", "This memo was drawn from "), ("code", source.get("path", "?")),
                               ("", " (sha256 "), ("code", source.get("sha256", "?")), ("", ") by "),
                               ("code", source.get("command", "weightdiff report")), ("", ".")]))
    tool = data.get("tool") or {}
    vers = dict(run.get("versions") or {})
    vers.setdefault(tool.get("name", "weightdiff"), tool.get("version", "?"))
    out.append(Block("table", ["software", "version"],
                     [[_c(k), _c(v)] for k, v in sorted(vers.items(), key=lambda kv: str(kv[0]))]))
    out.append(Block("p", [("", "Schema "), ("code", data.get("schema", "?")), ("", "; settings:")]))
    out.append(Block("pre", json.dumps(data.get("settings") or {}, indent=1, sort_keys=True, ensure_ascii=False)))
    rows = []
    for role, entry in [("base", b) for b in (data.get("base") or [])] + [("tuned", data.get("tuned") or {})]:
        for f in entry.get("files") or [{"name": entry.get("path"), "bytes": entry.get("bytes"), "sha256": None}]:
            rows.append([role, _c(entry.get("path")), _c(f.get("name")), fmt.count(f.get("bytes")),
                         _c(f.get("sha256")) if f.get("sha256") else "not hashed"])
    out.append(Block("p", "Input files:"))
    out.append(Block("table", ["role", "checkpoint", "file", "bytes", "sha256"], rows))
    hub_rows = [[role, _c(entry.get("path")), _c(h.get("repo_id")), _c(h.get("revision") or "(default branch)"),
                 _c(h.get("commit"))]
                for role, entry in [("base", b) for b in (data.get("base") or [])] + [("tuned", data.get("tuned") or {})]
                for h in [entry.get("hub")] if h]
    if hub_rows:
        out.append(Block("p", "Models read from the Hugging Face Hub (sha256 as the Hub lists the files):"))
        out.append(Block("table", ["role", "checkpoint", "repo", "revision", "commit"], hub_rows))
        for note in (data.get("plan") or {}).get("notes") or []:
            if "could not be reached" in str(note) and "so the copy in the local Hugging Face cache was read" in str(note):
                out.append(Block("p", "Not checked against the Hub: " + str(note) + "."))
    if run.get("date"):
        out.append(Block("p", [("", "Run on "), ("code", str(run["date"])), ("", " (UTC).")]))
    return out


