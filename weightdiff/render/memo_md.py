"""The memo as Markdown: the same blocks as the HTML memo, figures as links to PNG files.

Sibling of ``memo_html`` (one self-contained file) and ``memo_docx`` (Word): where those
embed their figures, this one links them (``images`` maps a figure to its relative
path). Text from the JSON is made inert: the characters that open emphasis, code, links
or math are backslash-escaped, ``<`` and ``&`` become entities, and control or
bidirectional characters are made visible.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..errors import escape_name
from .memo_html import _lines

if TYPE_CHECKING:
    from .memo import Inline

__all__ = ["to_markdown", "md_escape"]

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
        elif style.startswith("a:#"):
            out.append(f"[{md_escape(t, table)}](#{slug(t)})")
        else:
            out.append(md_escape(t, table))
    return "".join(out)


def slug(heading: str) -> str:
    """The anchor GitHub and most Markdown renderers give a heading.

    >>> slug("What these numbers show, and what they do not")
    'what-these-numbers-show-and-what-they-do-not'
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def to_markdown(blocks: list, images: dict[str, str]) -> str:
    """The memo as Markdown; ``images`` maps figure name -> relative path of its PNG. A link to
    a heading's anchor points at the heading's own slug (no raw HTML in the file)."""
    anchors = {b.extra: slug(b.content) for b in blocks
               if b.kind in ("h1", "h2", "h3") and b.extra and isinstance(b.content, str)}
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + _inline_md(b.content))
        elif b.kind in ("p", "ident"):
            out.append(_inline_md(b.content))
        elif b.kind == "ul":
            out.append("\n".join(f"- {_inline_md(x)}" for x in b.content))
        elif b.kind == "pre":
            body = _lines(b.content)
            fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", body)), default=0) + 1)
            out.append(f"{fence}\n{body}\n{fence}")
        elif b.kind == "verdict":
            reason, caveats = b.extra if isinstance(b.extra, (list, tuple)) else (b.extra, None)
            out.append(f"> **{md_escape(b.content)}**" + (f" {md_escape(reason)}" if reason else ""))
            if caveats:
                out.append("> **What this cannot show:**\n" + "\n".join(f"> - {_inline_md(c)}" for c in caveats)
                           + ("\n>\n> More in [What these numbers show, and what they do not]"
                              f"(#{anchors['limits']})." if "limits" in anchors else ""))
        elif b.kind == "table":
            out.append("| " + " | ".join(_inline_md(h) for h in b.content) + " |")
            out[-1] += "\n|" + "|".join(" --- " for _ in b.content) + "|"
            for r in b.extra:
                out[-1] += "\n| " + " | ".join(_inline_md(c, table=True) for c in r) + " |"
        elif b.kind == "figure":
            fo = b.content
            src = images.get(fo.name)
            if src:
                out.append(f"![{md_escape(fo.title)}]({quote(src)})")
            out.append(f"*Figure {b.extra}. {md_escape(fo.title)}.* {md_escape(fo.caption)}")
        elif b.kind == "pagebreak":
            out.append("---")
    return "\n\n".join(out) + "\n"
