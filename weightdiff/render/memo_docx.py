"""The memo as a Word document (.docx), from the same neutral blocks as the HTML and Markdown memo.

Needs python-docx (``pip install 'weightdiff[docx]'``). Headings are Word's "Heading 1-3"
styles, tables use "Table Grid" with a header row, lists "List Bullet", figures are
embedded PNGs followed by a "Caption" paragraph, code and paths use two styles of their
own ("Code" for runs, "Code Block" for paragraphs), and the verdict and caveats use
"Intense Quote" and "Quote" (the caveats beside the verdict): a law office can restyle the whole document from Word's
style pane without touching a paragraph. The first page (verdict, paragraph, key
figures, depth profile, reference scale) ends with a page break, as in print.
"""

from __future__ import annotations

import re

import io
from typing import Sequence

from ..errors import WeightdiffError, escape_name

__all__ = ["to_docx"]


def _require():
    try:
        import docx  # noqa: F401
    except ImportError:
        raise WeightdiffError("writing a Word memo (.docx) needs python-docx",
                              "pip install 'weightdiff[docx]', or write FILE.html or FILE.md") from None
    return docx


def _styles(doc) -> None:
    from docx.enum.style import WD_STYLE_TYPE
    from docx.shared import Pt

    styles = doc.styles
    if "Code" not in [s.name for s in styles]:
        code = styles.add_style("Code", WD_STYLE_TYPE.CHARACTER)
        code.font.name = "Consolas"
        code.font.size = Pt(9)
    if "Code Block" not in [s.name for s in styles]:
        block = styles.add_style("Code Block", WD_STYLE_TYPE.PARAGRAPH)
        block.base_style = styles["Normal"]
        block.font.name = "Consolas"
        block.font.size = Pt(8)


def _runs(par, content) -> None:
    if isinstance(content, str):
        par.add_run(escape_name(content))
        return
    for style, text in content:
        run = par.add_run(escape_name(str(text)))
        if style == "code":
            run.style = "Code"
        elif style == "b":
            run.bold = True


def to_docx(blocks: Sequence, title: str, core: dict | None = None, date: str | None = None) -> bytes:
    """The memo's blocks as the bytes of a .docx file, on A4 as the HTML memo; ``core``: document
    properties (title, author, subject) for Word's File > Info; ``date``: the run's ``run.date``
    (ISO, UTC), the document's created and modified dates (python-docx's template says 2013 otherwise;
    none recorded: 1980-01-01, the zip entries' date, so the bytes stay a function of the JSON)."""
    _require()
    import datetime

    import docx
    from docx.shared import Cm, Inches

    doc = docx.Document()
    _styles(doc)
    for section in doc.sections:
        section.page_width, section.page_height = Cm(21.0), Cm(29.7)
        section.left_margin = section.right_margin = Cm(2.2)
    props = doc.core_properties
    props.title = escape_name(title)[:250]
    props.author = "weightdiff"
    when = datetime.datetime(1980, 1, 1)
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d)(?::(\d\d))?Z", str(date or ""))
    if m:
        try:
            when = datetime.datetime(*(int(x or 0) for x in m.groups()))
        except ValueError:
            pass
    props.created = props.modified = when
    props.last_modified_by = "weightdiff"
    for k, v in (core or {}).items():
        setattr(props, k, v)
    for b in blocks:
        kind = b.kind
        if kind in ("h1", "h2", "h3"):
            par = doc.add_heading(level=int(kind[1]))
            _runs(par, b.content)
        elif kind in ("p", "ident"):
            _runs(doc.add_paragraph(), b.content)
        elif kind == "ul":
            for item in b.content:
                _runs(doc.add_paragraph(style="List Bullet"), item)
        elif kind == "pre":
            doc.add_paragraph("\n".join(escape_name(line) for line in str(b.content).split("\n")), style="Code Block")
        elif kind == "verdict":
            reason, caveats = b.extra if isinstance(b.extra, (list, tuple)) else (b.extra, None)
            par = doc.add_paragraph(style="Intense Quote")
            par.add_run(escape_name(str(b.content))).bold = True
            if reason:
                par.add_run(" " + escape_name(str(reason)))
            if caveats:
                head = doc.add_paragraph(style="Quote")
                head.add_run("What this cannot show").bold = True
                for c in caveats:
                    _runs(doc.add_paragraph(style="Quote"), c)
                if any(x.kind == "h2" and x.extra == "limits" for x in blocks):
                    doc.add_paragraph("More in “What these numbers show, and what they do not”.", style="Quote")
        elif kind == "table":
            rows = list(b.extra)
            table = doc.add_table(rows=1 + len(rows), cols=len(b.content))
            table.style = "Table Grid"
            for j, h in enumerate(b.content):
                cell = table.rows[0].cells[j]
                cell.paragraphs[0].text = ""
                _runs(cell.paragraphs[0], h if not isinstance(h, str) else [("b", h)])
            for i, r in enumerate(rows, start=1):
                for j, c in enumerate(r):
                    _runs(table.rows[i].cells[j].paragraphs[0], c)
        elif kind == "figure":
            fo = b.content
            if fo.png:
                doc.add_picture(io.BytesIO(fo.png), width=Inches(6.2))
            cap = doc.add_paragraph(style="Caption")
            cap.add_run(f"Figure {b.extra}. {escape_name(fo.title)}. ").bold = True
            cap.add_run(escape_name(fo.caption))
        elif kind == "pagebreak":
            doc.add_page_break()
    buf = io.BytesIO()
    doc.save(buf)
    return _fixed_zip(buf.getvalue())


def _fixed_zip(raw: bytes) -> bytes:
    """The same zip with every entry's time set to 1980-01-01 (zip's epoch): python-docx stamps the time
    of writing, and the same inputs must give the same file, byte for byte."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()
