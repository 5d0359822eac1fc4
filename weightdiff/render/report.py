"""``weightdiff report``: figures and memo redrawn from a saved compare JSON, no checkpoints needed.

``load_result(path)`` reads and checks a ``weightdiff compare --json`` file (schema
``weightdiff.compare/2``, or /1 from older versions) and raises a one-line ``WeightdiffError`` naming the file and
the offending key when it is not one; ``write_report(data, ...)`` draws the figures and
writes the memo for an already loaded dict (``render_outputs`` is its form for
``weightdiff compare --report FILE --plots DIR``);
``report(path, ...)`` does both. Every file is written atomically.

>>> out = report("out.json", html="memo.html", plots="figures/")   # doctest: +SKIP
>>> [p.name for p in out.files]                                    # doctest: +SKIP
['depth_profile.png', 'depth_profile.svg', ..., 'figures.json', 'memo.html']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, OptionsError, WeightdiffError, escape_name
from ..fsutil import OutputSet, active_outputs, write_bytes, write_text
from ..io.files import open_regular, read_small
from . import memo as memo_mod
from .captions import headline_sentences
from .plots import FIGURES, FigureOutput, render_figures, save_figures
from .population import population_sentences
from .validate import check_result
from .validate_kinds import check_kind
from .document import MEMO_FORMATS, Block, memo_format, write_memo

#: largest compare JSON read
RESULT_CAP = 4 << 30
#: the largest survey table ``load_population`` reads (a million models' rows)
TABLE_CAP = 1 << 30


@dataclass
class ReportOutputs:
    """What ``report``/``write_report`` wrote: the figures (with captions) and every file path."""

    figures: list[FigureOutput]
    html: Path | None = None
    markdown: Path | None = None
    plots: Path | None = None
    headline: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    population: list[str] = field(default_factory=list)


# --- reading and checking --------------------------------------------------------------------

def validate_result(data: Any, where: str = "result") -> dict:
    """Check every key and value type the renderers read (``render.validate``); return ``data``."""
    return check_result(data, where)


def load_result(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and check a compare JSON file; returns (the dict, the sha256 of the file's bytes)."""
    data, raw = _read_json(Path(path))
    return validate_result(data, str(path)), hashlib.sha256(raw).hexdigest()


def _finite_or_none(text: str) -> float | None:
    v = float(text)
    return v if math.isfinite(v) else None


def _read_json(p: Path) -> tuple[Any, bytes]:
    """The parsed JSON of a saved result and its bytes; one-line errors naming the file."""
    if not os.path.lexists(p):
        raise WeightdiffError(f"{p}: no such file", "save a comparison result as JSON first")
    if p.is_dir():
        raise WeightdiffError(f"{p}: is a directory, expected a comparison result saved as JSON")
    raw = read_small(p, RESULT_CAP)             # a regular file only: no FIFO or device can hang it
    try:
        # utf-8-sig: a result re-saved by an editor that writes a byte order mark (Notepad) is the same JSON;
        # RFC 8259 lets a parser ignore it
        # NaN and Infinity (not JSON, Python writes them) read as null, as weightdiff writes a non-finite value; a
        # number past float64's range (1e999) is the same infinity spelled as JSON, so it reads as null too
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=lambda c: None, parse_float=_finite_or_none)
    except UnicodeDecodeError:
        raise WeightdiffError(f"{p}: not UTF-8 text, expected a comparison result saved as JSON") from None
    except json.JSONDecodeError as exc:
        raise WeightdiffError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                              "was the file cut short?") from None
    except RecursionError:
        raise WeightdiffError(f"{p}: JSON nested too deeply to be a weightdiff comparison result") from None
    except ValueError as exc:           # e.g. an integer over Python's int-string digit limit
        raise WeightdiffError(f"{p}: not a usable JSON file ({escape_name(str(exc))[:120]})") from None
    return data, raw


# --- writing -----------------------------------------------------------------------------------

def _rel(target: Path, start: Path) -> str:
    return posixpath.join(*Path(os.path.relpath(target, start)).parts)


#: survey columns read when the table has them (a bracket's lower end: tables of older surveys lack it)
OPTIONAL = ("delta_params_share_lower",)


def load_population(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``weightdiff survey`` table: ``survey.parquet`` (needs pyarrow) or ``survey.csv``."""
    p = Path(path)
    need = ("tuned", "status", "base", "verdict", "relative_change", "one_minus_cosine", "delta_params_share")
    try:
        if p.suffix == ".parquet":
            os.close(open_regular(p)[0])         # a regular file: pyarrow would block on a FIFO
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise WeightdiffError(f"{p}: reading a Parquet survey needs pyarrow",
                                      "pip install 'weightdiff[pandas]', or give survey.csv") from None
            try:
                have = set(pq.read_schema(p).names)
                rows = pq.read_table(p, columns=list(need) + [c for c in OPTIONAL if c in have]).to_pylist()
            except (KeyError, ValueError) as exc:   # pyarrow's errors for a bad file or a missing column
                raise WeightdiffError(f"{p}: not a weightdiff survey table ({escape_name(str(exc))[:120]})",
                                      "write one with weightdiff survey BASE TUNED... --out DIR") from None
        else:
            import csv
            import io

            # a regular file under TABLE_CAP (a FIFO hung, /dev/zero filled the memory)
            text = read_small(p, TABLE_CAP).decode("utf-8-sig")     # a byte order mark (Excel) is not a column name
            try:
                rows = list(csv.DictReader(io.StringIO(text, newline="")))
                if rows and not set(need) <= set(rows[0]):
                    raise WeightdiffError(f"{p}: not a weightdiff survey table (missing columns)",
                                          "write one with weightdiff survey BASE TUNED... --out DIR")
                for r in rows:
                    for k in (*need[4:], *OPTIONAL):
                        r[k] = float(r[k]) if r.get(k) else None
            except (csv.Error, ValueError, TypeError) as exc:     # a field over csv's limit, a number that is not
                raise WeightdiffError(f"{p}: not a weightdiff survey table ({escape_name(str(exc))[:120]})",
                                      "write one with weightdiff survey BASE TUNED... --out DIR") from None
    except FileNotFoundError:
        raise WeightdiffError(f"{p}: no such file", "write one with weightdiff survey BASE TUNED... --out DIR") from None
    except CheckpointError:
        if not os.path.lexists(p):
            raise WeightdiffError(f"{p}: no such file", "write one with weightdiff survey BASE TUNED... --out DIR") \
                from None
        raise                                   # "PATH: is a FIFO, not a regular file", the cap: one line, exit 2
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightdiffError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    return rows


def write_report(data: dict, *, html: str | os.PathLike | None = None, markdown: str | os.PathLike | None = None,
                 plots: str | os.PathLike | None = None, pdf: bool = False,
                 source: dict | None = None, population: list[dict] | None = None,
                 memo: str | os.PathLike | None = None, own: bool = False) -> ReportOutputs:
    """Draw the figures and write the memo(s) for a loaded compare dict.

    ``plots``: a folder for the figures (PNG 300 dpi and SVG, plus PDF when ``pdf``) and a
    ``figures.json`` with their titles and captions. ``markdown`` needs image files: without
    ``plots`` they go to ``<markdown stem>_figures/`` beside it. ``html`` embeds its figures
    and needs no folder. ``memo``: a memo in the format of its extension (.html, .md, .docx;
    ``render.document.memo_format``). ``source`` (path, sha256, command of the JSON) goes into
    the memo's reproducibility block. ``population``: survey rows (``load_population``) to place the
    model among, in a sentence of the memo's summary. ``own``: ``data`` is the result this process just
    computed (compare's --report), so a rule it breaks is weightdiff's bug (an internal error, exit 1), not
    a file to blame (exit 2, "was it written by weightdiff?").
    """
    try:
        validate_result(data)
    except WeightdiffError as exc:
        if not own:
            raise
        raise RuntimeError(f"the comparison's own result breaks a consistency rule before its memo is drawn "
                           f"({exc})") from None
    targets = [Path(t) for t in (html, markdown, memo) if t is not None]
    for t in targets:
        memo_format(t)                       # bad input before any drawing
    html_p = Path(html) if html is not None else None
    md_p = Path(markdown) if markdown is not None else None
    plot_dir = Path(plots) if plots is not None else None
    if plot_dir is None and md_p is not None:
        plot_dir = md_p.parent / f"{md_p.stem}_figures"
    if pdf and plot_dir is None:
        raise OptionsError("pdf figures are written as files: give a plots folder (or a Markdown memo) as well",
                           option="pdf")
    outs = active_outputs() or OutputSet()
    with outs, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")        # matplotlib/numpy chatter is not the user's business
        claim_report_outputs(outs, html_p, md_p, plot_dir, confirm=True, pdf=pdf)
        if memo is not None:
            outs.claim(memo, None)
        return _write_report(data, targets, plot_dir, pdf, source, population)


def claim_report_outputs(outs: OutputSet, html: Path | None, markdown: Path | None, plots: Path | None,
                         confirm: bool = False, pdf: bool = False) -> None:
    """Check every path a report will write before drawing anything (``confirm``: the caller
    has claimed them already under its own option names)."""
    if plots is not None:
        outs.claim(plots, None if confirm else "--plots", folder=True)
    for path, what in ((html, "--html"), (markdown, "--markdown")):
        if path is not None:
            outs.claim(path, None if confirm else what)
    folder = plots if plots is not None else None if markdown is None else markdown.parent / f"{markdown.stem}_figures"
    if folder is not None:          # every file a figure may take: no other output may be one of them
        for name in FIGURES:
            for ext in ("png", "svg", "pdf") if pdf else ("png", "svg"):
                outs.claim(folder / f"{name}.{ext}", "a figure")
        outs.claim(folder / "figures.json", "the figures' captions")


def _write_report(data: dict, targets: list[Path], plot_dir: Path | None, pdf: bool,
                  source: dict | None, population: list[dict] | None) -> ReportOutputs:
    formats = ("png", "svg", "pdf") if pdf else ("png", "svg")
    out = ReportOutputs(figures=[], headline=headline_sentences(data), plots=plot_dir)
    if population is not None:
        out.population = population_sentences(data, population)
    if plot_dir is not None:
        out.figures = save_figures(data, plot_dir, formats)
        index = [dict(f.to_dict(), files={k: Path(v).name for k, v in f.files.items()}) for f in out.figures]
        out.files += [p for f in out.figures for p in f.files.values()]
        out.files.append(write_text(plot_dir / "figures.json", json.dumps(index, indent=1, ensure_ascii=False) + "\n"))
    else:
        out.figures = [fo for fo, _ in render_figures(data, ())]
    blocks = memo_mod.build(data, out.figures, source, out.population)
    _write_memos(out, targets, blocks, memo_title(data), date=(data.get("run") or {}).get("date"))
    return out


def memo_title(data: dict) -> str:
    from .sentences import model_label

    bases = " and ".join(model_label(b) for b in data.get("base") or []) or "?"
    return f"weightdiff memo: {model_label(data.get('tuned'))} against {bases}"


def render_outputs(data: dict, *, report: str | os.PathLike | None = None,
                   plots_dir: str | os.PathLike | None = None, pdf: bool = False,
                   source: dict | None = None) -> list[Path]:
    """For ``weightdiff compare --report FILE --plots DIR``: the memo in the format of FILE's
    extension (its Markdown figures in DIR, or beside it) and the figures. Returns the paths written."""
    out = write_report(data, memo=report, plots=plots_dir, pdf=pdf, source=source, own=True)
    return out.files


def report(path: str | os.PathLike, *, html: str | os.PathLike | None = None,
           markdown: str | os.PathLike | None = None, plots: str | os.PathLike | None = None,
           pdf: bool = False, command: str | None = None,
           population: str | os.PathLike | None = None, memo: str | os.PathLike | None = None) -> ReportOutputs:
    """Load ``path`` (a compare JSON) and write what was asked; with nothing asked, an HTML
    memo beside the JSON (``result.json`` -> ``result.html``). ``population``: a survey table
    to place the model within."""
    if html is None and markdown is None and plots is None and memo is None:
        html = Path(path).with_suffix(".html")
    outs = active_outputs() or OutputSet()
    with outs:
        outs.protect(path)                     # the memo may never overwrite its own input
        if population is not None:             # nor the survey table it places the model in
            outs.protect(population, "is the survey table this command reads (--population)")
        claim_report_outputs(outs, None if html is None else Path(html), None if markdown is None else Path(markdown),
                             None if plots is None else Path(plots), pdf=pdf)
        if memo is not None:
            outs.claim(memo, "--report")
        data, digest = load_result(path)
        rows = load_population(population) if population is not None else None
        source = {"path": os.fspath(path), "sha256": digest, "command": command or "weightdiff report"}
        return write_report(data, html=html, markdown=markdown, plots=plots, pdf=pdf, source=source,
                            population=rows, memo=memo)


# --- several results, one document -------------------------------------------------------------

KINDS = {"weightdiff.compare/1": "compare", "weightdiff.provenance/1": "provenance",
         "weightdiff.lineage/1": "lineage"}
#: the schemas checked by ``validate_kinds.check_kind`` (every other file is checked as a comparison)
_NEEDS_BY_SCHEMA = {s for s, k in KINDS.items() if k != "compare"}


def load_any(path: str | os.PathLike) -> tuple[str, dict, str]:
    """(kind, dict, sha256) of a saved compare, provenance or lineage JSON; one-line errors."""
    p = Path(path)
    data, raw = _read_json(p)
    # (a schema that is a list or an object is unhashable: checked as a comparison, whose validator names it)
    if not isinstance(data, dict) or not isinstance(data.get("schema"), str) or data.get("schema") not in _NEEDS_BY_SCHEMA:
        return "compare", validate_result(data, str(p)), hashlib.sha256(raw).hexdigest()
    kind = KINDS[data["schema"]]
    return kind, check_kind(kind, data, str(p)), hashlib.sha256(raw).hexdigest()


def report_many(paths: list[str | os.PathLike], *, html: str | os.PathLike | None = None,
                markdown: str | os.PathLike | None = None, memo: str | os.PathLike | None = None,
                plots: str | os.PathLike | None = None, pdf: bool = False, command: str | None = None,
                population: str | os.PathLike | None = None) -> ReportOutputs:
    """One document from several saved results (compare, provenance, lineage), a section each,
    in the order given; a single compare JSON is ``report()``. With no output asked, an HTML
    memo beside the first JSON."""
    names = {"html": "an HTML", "md": "a Markdown", "docx": "a Word"}
    for t, flag, want in ((html, "html", "html"), (markdown, "markdown", "md"), (memo, None, None)):
        if t is not None and want is not None and Path(t).suffix.lower() not in MEMO_FORMATS:
            # --html x.txt said "--report x.txt: cannot tell the memo's format", naming a flag not given
            ext = Path(t).suffix.lower()
            raise OptionsError(f"{flag} {os.fspath(t)}: {names[want]} memo is written to a .{want} path, not to "
                               f"{f'`{ext}`' if ext else 'one with no extension'}", f"give --{flag} a FILE.{want} path",
                               option=flag)
        if t is not None and memo_format(t) != want and want is not None:
            # the flag says one format, the extension another: which one the user meant cannot be told
            raise OptionsError(f"--{flag} {os.fspath(t)}: the extension says {names[memo_format(t)]} memo, the "
                               f"flag {names[want]} one",
                               f"give --{flag} a .{want} path, or use --memo FILE (its format from the extension)",
                               option=flag)
    items = [(p, *load_any(p)) for p in paths]
    if len(items) == 1 and items[0][1] == "compare":
        return report(paths[0], html=html, markdown=markdown, plots=plots, pdf=pdf, command=command,
                      population=population, memo=memo)
    if pdf and plots is None:
        raise OptionsError("pdf figures are written as files: give a plots folder as well", option="pdf")
    rows = load_population(population) if population is not None else None
    if html is None and markdown is None and memo is None and plots is None:
        html = Path(paths[0]).with_suffix(".html")
    outs = active_outputs() or OutputSet()
    with outs, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for p in paths:
            outs.protect(p)                    # the memo may never overwrite one of its inputs
        if population is not None:
            outs.protect(population, "is the survey table this command reads (--population)")
        claim_report_outputs(outs, None if html is None else Path(html), None if markdown is None else Path(markdown),
                             None if plots is None else Path(plots), pdf=pdf)
        if memo is not None:
            outs.claim(memo, "--report")
        return _sections_document(items, html, markdown, memo, plots, pdf, command, rows)


def _subject(path: object) -> str:
    """A model's path as results recorded it, normalised (``./tuned`` is ``tuned``) and never resolved on this
    machine: a relative path was relative to where the result was made, and a memo's bytes may not depend on
    the folder or machine where ``report`` runs (nor print a home directory nobody typed)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    return posixpath.normpath(text) if text else text


def _fingerprint(entry: dict) -> tuple:
    """What tells two checkpoints apart beyond their spelling: the sha256 of every file when the result
    recorded them, else the files' names and sizes (a result made elsewhere may spell another model alike)."""
    files = [f for f in entry.get("files") or [] if isinstance(f, dict)]
    shas = tuple(sorted(str(f["sha256"]) for f in files)) if files and all(f.get("sha256") for f in files) else None
    return (shas, tuple(sorted((os.path.basename(str(f.get("name") or f.get("path") or "")), f.get("bytes"))
                               for f in files)))


def _same_model(a: tuple[str, tuple | None], b: tuple[str, tuple | None]) -> bool:
    """(spelling, fingerprint or None) pairs: the same checkpoint when their hashes agree (whatever the
    spelling), else when the spellings agree and no recorded file differs."""
    (pa, fa), (pb, fb) = a, b
    if fa is not None and fb is not None and fa[0] is not None and fb[0] is not None:
        return fa[0] == fb[0]
    if pa != pb:
        return False
    return fa is None or fb is None or not fa[1] or not fb[1] or fa[1] == fb[1]


def _mixed_subjects(items: list) -> str | None:
    """A sentence when the results combined are not about one model: the tuned model of each compare
    and provenance result, and the last model of each lineage chain, which must include it. A memo
    that merged results about different models silently read as one story about one model."""
    from .sentences import model_label

    about: list[tuple[str, str, tuple[str, tuple | None]]] = []   # (which result, the model's name, identity)
    chains: list[list[tuple[str, tuple | None]]] = []
    for path, kind, data, _ in items:
        if kind in ("compare", "provenance"):
            entry = data.get("tuned") or {}
            t = entry.get("path") if isinstance(entry, dict) else None
            if t is not None:
                about.append((f"{kind} {Path(path).name}", model_label(entry), (_subject(t), _fingerprint(entry))))
        elif kind == "lineage" and data.get("paths"):
            chains.append([(_subject(p), None) for p in data["paths"]])
            about.append((f"lineage {Path(path).name} (its last model)", str(data["paths"][-1]), chains[-1][-1]))
    subjects = [s for *_, s in about]
    one = all(_same_model(subjects[0], s) for s in subjects[1:]) if subjects else True
    if one and all(any(_same_model(s, c) for c in chain) for s in subjects for chain in chains):
        return None
    return ("these results are not about one model: " + "; ".join(f"{w}: {name}" for w, name, _ in about)
            + ". Read each section for its own model.")


def _sections_document(items: list, html, markdown, memo, plots, pdf: bool, command: str | None,
                       rows: list[dict] | None) -> ReportOutputs:
    from .document import combine
    from .provenance import provenance_figure
    from .sections import lineage_blocks, provenance_blocks

    out = ReportOutputs(figures=[], plots=Path(plots) if plots is not None else None)
    sections = []
    formats = ("png", "svg", "pdf") if pdf else ("png", "svg")
    for i, (path, kind, data, digest) in enumerate(items, start=1):
        source = {"path": os.fspath(path), "sha256": digest, "command": command or "weightdiff report"}
        if kind == "compare":
            pairs = render_figures(data, formats)
            figs = [fo for fo, _ in pairs]
            out.headline += headline_sentences(data)
            pop = population_sentences(data, rows) if rows is not None else []
            out.population += pop
        elif kind == "provenance":
            fo, blobs = provenance_figure(data, formats)
            pairs, figs = [(fo, blobs)], [fo]
            out.headline += [str(f) for f in data["findings"]]
        else:
            pairs, figs = [], []
            out.headline += [str(f) for f in data["findings"]]
        for fo, blobs in pairs:
            if len(items) > 1:              # one result alone keeps the names its own command gives its figures
                fo.name = f"{i}-{fo.name}"
            if plots is not None:
                for fmt, blob in blobs.items():
                    fo.files[fmt] = write_bytes(Path(plots) / f"{fo.name}.{fmt}", blob)
                out.files += list(fo.files.values())
        if kind == "compare":
            sections.append(memo_mod.build(data, figs, source, pop))
        elif kind == "provenance":
            sections.append(provenance_blocks(data, figs))
        else:
            sections.append(lineage_blocks(data))
        out.figures += figs
    mixed = _mixed_subjects(items)
    if mixed:
        out.headline.insert(0, mixed)
        # under the first section's title and the lines naming its model, before its verdict: the document
        # still opens with its title, and the caution is read before any finding
        at = next((i for i, b in enumerate(sections[0]) if i and b.kind not in ("ident",)), len(sections[0]))
        sections[0].insert(at, Block("p", "Caution: " + mixed))
    doc = combine(sections)
    title = section_title(items[0][1], items[0][2]) if len(items) == 1 else \
        "weightdiff memo: " + ", ".join(Path(p).name for p, *_ in items)
    date = next((dt for _, _, d, _ in items if (dt := result_date(d))), None)
    _write_memos(out, [t for t in (html, markdown, memo) if t is not None], doc, title, figure_dir=plots, date=date)
    return out


def section_title(kind: str, data: dict) -> str:
    """The document title ``provenance --report`` and ``lineage --report`` give their memo, so that ``report``
    on the saved result writes the same document."""
    if kind == "provenance":
        return f"weightdiff provenance: {data['tuned']['path']}"
    return "weightdiff lineage: " + " -> ".join(str(p) for p in data["paths"])


def result_date(data: dict) -> str | None:
    """``run.date`` of a saved result, the date a Word memo's properties carry; None when not recorded."""
    date = (data.get("run") or {}).get("date") if isinstance(data.get("run"), dict) else None
    return str(date) if date else None


def _write_memos(out, targets, blocks, title: str, figure_dir=None, date: str | None = None) -> None:
    """Write one document to each target (its extension picks the format); note the files and
    the first HTML and Markdown memo in ``out``."""
    for t in targets:
        written = write_memo(t, blocks, out.figures, title, figure_dir=figure_dir, date=date)
        out.files += written
        kind = memo_format(t)
        if kind == "html" and out.html is None:
            out.html = written[-1]
        elif kind == "md" and out.markdown is None:
            out.markdown = written[-1]
