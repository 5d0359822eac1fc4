"""One memo document from the memo's blocks: the format chosen by the file's extension, and
several results (compare, provenance, lineage) as sections of one document.

``memo_format(path)`` is the one rule every command uses: ``.html``/``.htm`` a
self-contained HTML file, ``.md``/``.markdown`` Markdown with its PNG figures beside it,
``.docx`` a Word document (python-docx, the ``docx`` extra); anything else is bad input,
refused before any work is done. There is no ``.pdf``: the HTML memo prints to PDF from
any browser (A4, first page kept whole), which no light dependency matches.
``write_memo(path, blocks, figures)`` writes blocks in that format; ``combine`` joins the
sections of several results into one list of blocks with figures numbered through.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Sequence

from ..errors import OptionsError, WeightdiffError
from ..fsutil import write_bytes, write_text
from .memo import Block
from .memo_html import to_html
from .memo_md import to_markdown

__all__ = ["MEMO_FORMATS", "memo_format", "write_memo", "combine"]

MEMO_FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md", ".docx": "docx"}


def memo_format(path: str | os.PathLike) -> str:
    """``"html"``, ``"md"`` or ``"docx"`` from the extension of ``path``; raises OptionsError
    (option ``report``) for any other, and WeightdiffError for .docx without python-docx.

    >>> memo_format("memo.HTML"), memo_format("out/memo.md"), memo_format("memo.docx")
    ('html', 'md', 'docx')
    """
    ext = Path(path).suffix.lower()
    kind = MEMO_FORMATS.get(ext)
    if kind is None:
        what = f"`{ext}`" if ext else "no extension"
        hint = "use FILE.html, FILE.md or FILE.docx"
        if ext == ".pdf":
            hint += " (for a PDF, print the HTML memo from a browser: it is laid out for A4)"
        raise OptionsError(f"report {os.fspath(path)}: cannot tell the memo's format from {what}", hint,
                           option="report")
    if kind == "docx":
        try:
            import docx  # noqa: F401
        except ImportError:
            raise WeightdiffError(f"{os.fspath(path)}: writing a Word memo needs python-docx",
                                  "pip install 'weightdiff[docx]', or write FILE.html or FILE.md") from None
    return kind


def _rel(target: Path, start: Path) -> str:
    return posixpath.join(*Path(os.path.relpath(target, start)).parts)


def write_memo(path: str | os.PathLike, blocks: list[Block], figures: Sequence, title: str,
               figure_dir: str | os.PathLike | None = None, date: str | None = None) -> list[Path]:
    """Write ``blocks`` to ``path`` in the format of its extension; returns the files written.

    Markdown links PNG files: a figure already saved (``files["png"]``) is linked where it
    is, the others are written into ``figure_dir`` (default ``<stem>_figures/`` beside it)."""
    p = Path(path)
    kind = memo_format(p)
    written: list[Path] = []
    if kind == "html":
        written.append(write_text(p, to_html(blocks, title)))
    elif kind == "docx":
        from .memo_docx import to_docx

        written.append(write_bytes(p, to_docx(blocks, title, date=date)))
    else:
        folder = Path(figure_dir) if figure_dir is not None else p.parent / f"{p.stem}_figures"
        images = {}
        for fo in figures:
            png = fo.files.get("png")
            if png is None and fo.png:
                png = write_bytes(folder / f"{fo.name}.png", fo.png)
                fo.files["png"] = png
                written.append(png)
            if png is not None:
                images[fo.name] = _rel(Path(os.path.abspath(png)), Path(os.path.abspath(p.parent)))
        written.append(write_text(p, to_markdown(blocks, images)))
    return written


def combine(sections: Sequence[list[Block]]) -> list[Block]:
    """Sections one after another, each from a new page, figures numbered through."""
    out: list[Block] = []
    for i, blocks in enumerate(sections):
        if i and (not out or out[-1].kind != "pagebreak"):
            out.append(Block("pagebreak", None))
        out += blocks
    n = 0
    for b in out:
        if b.kind == "figure":
            n += 1
            b.extra = n
    return out
