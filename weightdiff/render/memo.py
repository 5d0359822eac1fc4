"""The memo: one document, two outputs, a self-contained HTML file and a Markdown file.

``build(data, figures)`` lays the memo out once as a list of neutral blocks (headings,
paragraphs, lists, tables, figures); ``to_html`` and ``to_markdown`` write those blocks
out. Every string that comes from the JSON (paths, tensor names, notes) is escaped for
the output it lands in: HTML entities in HTML, backslash escapes and entities in
Markdown, and control or bidirectional characters made visible in both, so a hostile
tensor name can neither inject markup nor reorder what the reader sees.

The HTML embeds its figures as SVG data URIs and its style inline: it opens with no
network and prints to PDF from a browser with figures kept whole on a page.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from typing import Sequence, Union
from urllib.parse import quote

from ..errors import escape_name
from . import captions as cap
from . import formats as fmt
from . import memo_text as txt
from .plots import FigureOutput

Seg = tuple[str, str]                    # (style, text): style "" | "code" | "b"
Inline = Union[str, list[Seg]]


@dataclass
class Block:
    kind: str                            # h1 h2 h3 p ul table pre figure verdict
    content: object
    extra: object = None


def _c(text: object) -> list[Seg]:
    return [("code", str(text))]


def _short(t: dict) -> str:
    return "×".join(str(x) for x in t.get("shape") or [])


def top_blocks(data: dict, n: int = 10) -> list[dict]:
    bs = [b for b in data.get("blocks", []) if cap.block_changed(b) or (b.get("rel_change") or 0) > 0]
    return sorted(bs, key=lambda b: (-(b.get("rel_change") or 0.0), str(b.get("block"))))[:n]


def top_tensors(data: dict, n: int = 15) -> list[dict]:
    ts = [t for t in data.get("tensors", []) if t.get("status") in ("changed", "rounding", "resized")
          and (t.get("rel_change") or 0) > 0]
    return sorted(ts, key=lambda t: (-(t.get("rel_change") or 0.0), str(t.get("name"))))[:n]


def structural(data: dict, n: int = 30) -> list[dict]:
    return [t for t in data.get("tensors", []) if t.get("status") in ("added", "removed", "resized")][:n]


def build(data: dict, figures: Sequence[FigureOutput], source: dict | None = None,
          population: Sequence[str] = ()) -> list[Block]:
    """The memo as neutral blocks, from the JSON dict, its figures and where the JSON came from;
    ``population``: sentences placing the model within a survey (render.population)."""
    s = data.get("summary") or {}
    base = ", ".join(str(b.get("path")) for b in data.get("base", [])) or "?"
    tuned = (data.get("tuned") or {}).get("path", "?")
    out = [Block("h1", "How far is the fine-tune from its base?"),
           Block("p", [("b", "Tuned: "), ("code", tuned), ("", "   "), ("b", "Base: "), ("code", base)]),
           Block("h2", "Summary"), Block("ul", cap.headline_sentences(data))]
    if population:
        out.append(Block("p", " ".join(population)))

    out.append(Block("h2", "Verdict"))
    out.append(Block("verdict", s.get("verdict", "?"), s.get("verdict_reason") or ""))
    scope, form = s.get("scope") or {}, s.get("form") or {}
    rows = [["verdict", _c(s.get("verdict"))],
            ["blocks changed", f"{fmt.count(scope.get('blocks_changed', s.get('blocks_changed')))} of "
                               f"{fmt.count(scope.get('blocks_total', s.get('blocks_total')))}"],
            ["tensors changed", f"{fmt.count(scope.get('tensors_changed'))} of {fmt.count(scope.get('tensors_total'))}"],
            ["form of the change", _c(form.get("kind") or "none")],
            ["largest numerical rank", fmt.count(form.get("max_numerical_rank"))],
            ["delta parameters", f"{fmt.count(s.get('delta_params'))} ({fmt.share(s.get('delta_params_share'))} of the model)"],
            ["model relative change", fmt.sci(s.get("relative_change"))],
            ["1 − cosine (large matrices)", fmt.sci(None if s.get("relatedness_cosine") is None
                                                        else max(0.0, 1.0 - s["relatedness_cosine"]))],
            ["flags", _c(", ".join(s.get("flags") or []) or "none")]]
    out.append(Block("table", ["", "value"], rows))
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

    out.append(Block("h2", "Figures"))
    for i, fo in enumerate(figures, start=1):
        out.append(Block("figure", fo, i))

    out.append(Block("h2", "Most changed blocks"))
    tb = top_blocks(data)
    if tb:
        out.append(Block("table", ["block", "parameters", "changed", "relative change", "largest numerical rank",
                                   "delta parameters"],
                         [[_c(b.get("block")), fmt.count(b.get("params")), fmt.count(b.get("params_changed")),
                           fmt.sci(b.get("rel_change")), fmt.count(b.get("max_numerical_rank")),
                           fmt.count(b.get("delta_params"))] for b in tb]))
    else:
        out.append(Block("p", "No block changed."))
    out.append(Block("h2", "Most changed tensors"))
    tt = top_tensors(data)
    if tt:
        rows = []
        for t in tt:
            r = t.get("rank") or {}
            rows.append([_c(t.get("name")), t.get("status", ""), _short(t), fmt.sci(t.get("rel_change")),
                         fmt.sci(cap.one_minus_cosine(t)), fmt.count(r.get("energy_rank_90")),
                         fmt.count(r.get("energy_rank_99")), fmt.count(r.get("numerical_rank")),
                         fmt.num(r.get("stable_rank"))])
        out.append(Block("table", ["tensor", "status", "shape", "relative change", "1 − cosine", "energy rank 90%",
                                   "energy rank 99%", "numerical rank", "stable rank"], rows))
    else:
        out.append(Block("p", "No tensor changed beyond its storage format."))
    st = structural(data)
    if st:
        out.append(Block("h3", "Added, removed and resized tensors"))
        out.append(Block("table", ["tensor", "status", "shape", "base shape", "note"],
                         [[_c(t.get("name")), t.get("status", ""), _short(t),
                           "×".join(str(x) for x in t.get("base_shape") or []) or "-", t.get("note") or ""]
                          for t in st]))

    out.append(Block("h2", "How the numbers are computed"))
    out.append(Block("p", "For each tensor of the tuned model paired with the base: B is the base tensor, T the "
                          "tuned tensor, D = T − B their difference, decoded from the stored format and summed in "
                          "64-bit floating point; s1 ≥ s2 ≥ ... are the singular values of D (tensors with more "
                          "than two dimensions are read as rows × the rest)."))
    out.append(Block("table", ["measure", "in plain words", "formula"],
                     [[[("b", m)], w, _c(f)] for m, w, f in txt.METRICS]))
    out.append(Block("p", txt.SPECTRUM_NOTE))
    out.append(Block("h2", "What these numbers show, and what they do not"))
    out.append(Block("p", [("b", "They show:")]))
    out.append(Block("ul", txt.SHOWS))
    out.append(Block("p", [("b", "They do not show:")]))
    out.append(Block("ul", txt.DOES_NOT_SHOW))
    out.append(Block("h3", "Sources"))
    out.append(Block("ul", txt.SOURCES))

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
    for role, entry in [("base", b) for b in data.get("base", [])] + [("tuned", data.get("tuned") or {})]:
        for f in entry.get("files") or [{"name": entry.get("path"), "bytes": entry.get("bytes"), "sha256": None}]:
            rows.append([role, _c(entry.get("path")), _c(f.get("name")), fmt.count(f.get("bytes")),
                         _c(f.get("sha256")) if f.get("sha256") else "not hashed"])
    out.append(Block("p", "Input files:"))
    out.append(Block("table", ["role", "checkpoint", "file", "bytes", "sha256"], rows))
    hub_rows = [[role, _c(entry.get("path")), _c(h.get("repo_id")), _c(h.get("revision") or "(default branch)"),
                 _c(h.get("commit"))]
                for role, entry in [("base", b) for b in data.get("base", [])] + [("tuned", data.get("tuned") or {})]
                for h in [entry.get("hub")] if h]
    if hub_rows:
        out.append(Block("p", "Models read from the Hugging Face Hub (sha256 as the Hub lists the files):"))
        out.append(Block("table", ["role", "checkpoint", "repo", "revision", "commit"], hub_rows))
    if run.get("date"):
        out.append(Block("p", [("", "Run on "), ("code", str(run["date"])), ("", " (UTC).")]))
    return out


# --- HTML ------------------------------------------------------------------------------------

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1a1a1a;
       max-width: 52rem; margin: 2rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2rem;
  border-bottom: 1px solid #ccc; padding-bottom: .2rem; } h3 { font-size: 1.05rem; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .85em;
  overflow-wrap: break-word; }
pre { background: #f4f4f4; padding: .6rem .8rem; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1.2rem 0; break-inside: avoid; page-break-inside: avoid; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: .88rem; color: #333; margin-top: .3rem; }
.verdict { font-size: 1.15rem; padding: .5rem .8rem; border-left: 5px solid #0072B2; background: #eef5fb; }
.note { color: #555; font-size: .85rem; }
@page { size: A4; margin: 16mm; }
@media print { body { margin: 0; max-width: none; font-size: 11pt; } h2 { break-after: avoid; }
  tr, pre { break-inside: avoid; } a { color: inherit; text-decoration: none; } }
"""

_NUM = re.compile(r"^[<>]?-?[\d,.]+(e-?\d+)?%?( \(.*\))?$|^n/a$")


_LONG_RUN = re.compile(r"[0-9A-Za-z]{24,}")


def _h(text: object) -> str:
    return html.escape(escape_name(str(text)), quote=True)


def _lines(text: object) -> str:
    """Control characters made visible line by line, keeping the line breaks (for pre blocks)."""
    return "\n".join(escape_name(line) for line in str(text).split("\n"))


def _inline_html(content: Inline) -> str:
    if isinstance(content, str):
        return _h(content)
    out = []
    for style, t in content:
        if style == "code":   # long dotted names may wrap after a dot, and hashes every 16 characters
            code = _h(t).replace(".", ".<wbr>").replace("/", "/<wbr>")
            code = _LONG_RUN.sub(lambda m: "<wbr>".join(m.group(0)[i:i + 16] for i in range(0, len(m.group(0)), 16)),
                                 code)
            out.append(f"<code>{code}</code>")
        elif style == "b":
            out.append(f"<strong>{_h(t)}</strong>")
        else:
            out.append(_h(t))
    return "".join(out)


def _cell_html(cell: Inline, tag: str) -> str:
    num = tag == "td" and isinstance(cell, str) and _NUM.match(cell) is not None
    attr = ' class="num"' if num else ""
    return f"<{tag}{attr}>{_inline_html(cell)}</{tag}>"


def to_html(blocks: list[Block], title: str = "weightdiff memo") -> str:
    """A complete, self-contained HTML document."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_html(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(b.content)}</p>")
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b.content) + "</ul>")
        elif b.kind == "pre":
            body.append(f"<pre>{html.escape(_lines(b.content), quote=True)}</pre>")
        elif b.kind == "verdict":
            body.append(f'<p class="verdict"><strong>{_h(b.content)}</strong>'
                        + (f" — {_h(b.extra)}" if b.extra else "") + "</p>")
        elif b.kind == "table":
            head = "".join(_cell_html(h, "th") for h in b.content)
            rows = "".join("<tr>" + "".join(_cell_html(c, "td") for c in r) + "</tr>" for r in b.extra)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "figure":
            fo: FigureOutput = b.content
            uri = "data:image/svg+xml;base64," + base64.b64encode(fo.svg).decode("ascii")
            body.append(f'<figure id="fig-{_h(fo.name)}"><img src="{uri}" alt="{_h(fo.title)}">'
                        f"<figcaption><strong>Figure {b.extra}. {_h(fo.title)}.</strong> {_h(fo.caption)}"
                        "</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_h(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n<p class=\"note\">Made with weightdiff. The numbers describe weights only; "
            "see “What these numbers show, and what they do not”.</p>\n</body>\n</html>\n")


# --- Markdown --------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]~$])")
_MD_TABLE = re.compile(r"([\\`*_\[\]~$|])")
_MD_LEAD = re.compile(r"^(\s*)([#>+=-]|\d+(?=[.)](\s|$)))")


def md_escape(text: object, table: bool = False) -> str:
    r"""Text made inert in Markdown: the characters that open emphasis, code, links or math
    backslash-escaped (pipes too inside tables), ``<`` and ``&`` as entities, and a leading
    character that would start a heading, quote or list escaped; other punctuation is left
    alone so the raw file stays readable.

    >>> print(md_escape("a_b <x> [y](z) # 1"), md_escape("12. x"), md_escape("# x"))
    a\_b &lt;x> \[y\](z) # 1 12\. x \# x
    """
    t = escape_name(str(text)).replace("&", "&amp;").replace("<", "&lt;")
    t = (_MD_TABLE if table else _MD_SPECIAL).sub(r"\\\1", t)
    m = _MD_LEAD.match(t)
    if m:
        cut = m.end()
        t = t[:cut] + "\\" + t[cut:] if m.group(2)[0].isdigit() else t[:m.start(2)] + "\\" + t[m.start(2):]
    return t


def _md_code(text: object, table: bool = False) -> str:
    t = escape_name(str(text))
    if table:   # GFM splits cells at a pipe even inside a code span
        t = t.replace("|", "\\|")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", t)), default=0) + 1)
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def _inline_md(content: Inline, table: bool = False) -> str:
    if isinstance(content, str):
        return md_escape(content, table)
    out = []
    for style, t in content:
        if style == "code":
            out.append(_md_code(t, table))
        elif style == "b":
            out.append(f"**{md_escape(t.strip(), table)}**" + (" " if t.endswith(" ") else ""))
        else:
            out.append(md_escape(t, table))
    return "".join(out)


def to_markdown(blocks: list[Block], images: dict[str, str]) -> str:
    """The memo as Markdown; ``images`` maps figure name -> relative path of its PNG."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + _inline_md(b.content))
        elif b.kind == "p":
            out.append(_inline_md(b.content))
        elif b.kind == "ul":
            out.append("\n".join(f"- {_inline_md(x)}" for x in b.content))
        elif b.kind == "pre":
            body = _lines(b.content)
            fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", body)), default=0) + 1)
            out.append(f"{fence}\n{body}\n{fence}")
        elif b.kind == "verdict":
            out.append(f"> **{md_escape(b.content)}**" + (f": {md_escape(b.extra)}" if b.extra else ""))
        elif b.kind == "table":
            out.append("| " + " | ".join(_inline_md(h) for h in b.content) + " |")
            out[-1] += "\n|" + "|".join(" --- " for _ in b.content) + "|"
            for r in b.extra:
                out[-1] += "\n| " + " | ".join(_inline_md(c, table=True) for c in r) + " |"
        elif b.kind == "figure":
            fo: FigureOutput = b.content
            src = images.get(fo.name)
            if src:
                out.append(f"![{md_escape(fo.title)}]({quote(src)})")
            out.append(f"*Figure {b.extra}. {md_escape(fo.title)}.* {md_escape(fo.caption)}")
    return "\n\n".join(out) + "\n"
