"""The memo as one self-contained HTML file: figures as SVG data URIs, style inline, print-ready.

Writes the neutral blocks of ``render.memo`` (its sibling ``memo_md`` writes Markdown, and
``memo_docx`` Word). Every string from the JSON is escaped with HTML entities and control
or bidirectional characters are made visible, so a hostile tensor name can neither inject
markup nor reorder what the reader sees. The file opens with no network; printed from a
browser (A4), the first page holds the verdict, the paragraph in plain words, the key
figures, the depth profile and the reference scale, and figures are never split.
"""

from __future__ import annotations

import base64
import html
import re
from typing import TYPE_CHECKING

from ..errors import escape_name

if TYPE_CHECKING:
    from .memo import Inline

__all__ = ["to_html", "CSS"]

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
.verdict { font-size: 1.15rem; padding: .5rem .8rem; border-left: 5px solid #0072B2; background: #eef5fb;
  margin: 0; }
.verdict-row { display: flex; gap: .8rem; align-items: stretch; margin: .8rem 0; }
.verdict-row .verdict { flex: 3; }
.caveats { flex: 2; font-size: .8rem; padding: .4rem .7rem; border: 1px solid #bbb; background: #fafafa; }
.caveats ul { margin: .2rem 0 .2rem 1rem; padding: 0; } .caveats p { margin: 0; }
.ident { margin: .1rem 0; font-size: .9rem; }
.note { color: #555; font-size: .85rem; }
.page1 table { margin: .4rem 0; } .page1 figure { margin: .6rem 0; }
.keyfigs td:nth-child(2) { text-align: left; white-space: nowrap; font-weight: 600; }
.keyfigs td:first-child { width: 30%; }
@page { size: A4; margin: 14mm 16mm; }
@media print { body { margin: 0; max-width: none; font-size: 10pt; } h1 { font-size: 1.25rem; margin-top: 0; }
  h2 { break-after: avoid; } tr, pre { break-inside: avoid; } a { color: inherit; text-decoration: none; }
  .page1 { font-size: 9.5pt; line-height: 1.35; } .page1 h2 { margin: .5rem 0 .2rem; font-size: 1rem; }
  .page1 .verdict { font-size: 1rem; padding: .35rem .6rem; } .page1 .caveats { font-size: .72rem; }
  .page1 .verdict-row { margin: .5rem 0; } .page1 p { margin: .3rem 0; }
  .page1 table { font-size: .78rem; } .page1 th, .page1 td { padding: .12rem .4rem; }
  .page1 figure { margin: .35rem 0; } .page1 figcaption { font-size: .7rem; line-height: 1.3; }
  .page1 figure img { max-height: 50mm; width: auto; max-width: 100%; margin: 0 auto; }
  .page1 figure.small img { max-height: 40mm; }
  .pagebreak { break-after: page; } }
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
        elif style.startswith("a:#"):
            out.append(f'<a href="#{_h(style[3:])}">{_h(t)}</a>')
        else:
            out.append(_h(t))
    return "".join(out)


def _cell_html(cell: Inline, tag: str) -> str:
    num = tag == "td" and isinstance(cell, str) and _NUM.match(cell) is not None
    attr = ' class="num"' if num else ""
    return f"<{tag}{attr}>{_inline_html(cell)}</{tag}>"


def _figure_html(fo, n: int, small: bool = False) -> str:
    uri = "data:image/svg+xml;base64," + base64.b64encode(fo.svg).decode("ascii")
    cls = ' class="small"' if small else ""
    return (f'<figure id="fig-{_h(fo.name)}"{cls}><img src="{uri}" alt="{_h(fo.title)}">'
            f"<figcaption><strong>Figure {n}. {_h(fo.title)}.</strong> {_h(fo.caption)}</figcaption></figure>")


def _block_html(b, limits: bool = True) -> str:
    if b.kind in ("h1", "h2", "h3"):
        anchor = f' id="{_h(b.extra)}"' if b.extra else ""
        return f"<{b.kind}{anchor}>{_inline_html(b.content)}</{b.kind}>"
    if b.kind == "p":
        return f"<p>{_inline_html(b.content)}</p>"
    if b.kind == "ident":
        return f'<p class="ident">{_inline_html(b.content)}</p>'
    if b.kind == "ul":
        return "<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b.content) + "</ul>"
    if b.kind == "pre":
        return f"<pre>{html.escape(_lines(b.content), quote=True)}</pre>"
    if b.kind == "verdict":
        reason, caveats = b.extra if isinstance(b.extra, (list, tuple)) else (b.extra, None)
        text = (f'<p class="verdict"><strong>{_h(b.content)}</strong>'
                + (f" {_h(reason)}" if reason else "") + "</p>")
        if not caveats:
            return text
        items = "".join(f"<li>{_inline_html(c)}</li>" for c in caveats)
        more = ('<p><a href="#limits">More in “What these numbers show, and what they do not”</a>.</p>'
                if limits else "")            # (a memo without that section, provenance's, links nowhere)
        return (f'<div class="verdict-row">{text}<aside class="caveats"><p><strong>What this cannot show</strong></p>'
                f'<ul>{items}</ul>{more}</aside></div>')
    if b.kind == "table":
        head = "".join(_cell_html(x, "th") for x in b.content)
        rows = "".join("<tr>" + "".join(_cell_html(c, "td") for c in r) + "</tr>" for r in b.extra)
        cls = f' class="{_h(b.style)}"' if b.style else ""
        return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if b.kind == "figure":
        return _figure_html(b.content, b.extra, small=b.content.name == "reference_scale")
    if b.kind == "pagebreak":
        return '<div class="pagebreak"></div>'
    raise ValueError(f"unknown memo block {b.kind!r}")


def to_html(blocks: list, title: str = "weightdiff memo") -> str:
    """A complete, self-contained HTML document; the blocks before the first page break
    form the first page."""
    body, page1 = [], any(b.kind == "pagebreak" for b in blocks)
    limits = any(b.kind == "h2" and b.extra == "limits" for b in blocks)
    if page1:
        body.append('<section class="page1">')
    for b in blocks:
        if b.kind == "pagebreak" and page1:
            body.append("</section>")
            page1 = False
        body.append(_block_html(b, limits))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_h(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n<p class=\"note\">Made with weightdiff. The numbers describe weights only"
            # the footer points to the limits section only where the memo has one (the lineage memo does not)
            + ("; see “What these numbers show, and what they do not”." if any(b.kind == "h2" and b.extra == "limits"
                                                                              for b in blocks) else ".")
            + "</p>\n</body>\n</html>\n")
