"""``weightdiff report``: figures and memo redrawn from a saved compare JSON, no checkpoints needed.

``load_result(path)`` reads and checks a ``weightdiff compare --json`` file (schema
``weightdiff.compare/1``) and raises a one-line ``WeightdiffError`` naming the file and
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
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OptionsError, WeightdiffError, escape_name
from ..fsutil import write_text
from . import memo as memo_mod
from .captions import headline_sentences
from .plots import FigureOutput, render_figures, save_figures
from .population import population_sentences

SCHEMA = "weightdiff.compare/1"


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

_NUM = (int, float)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, _NUM) else type(v).__name__)


def _check(where: str, key: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise WeightdiffError(f"{where}: `{key}` should be {what} (found {_kind(value)})",
                              "was it written by weightdiff?")


def validate_result(data: Any, where: str = "result") -> dict:
    """Check the keys and value types the renderers read; return ``data`` unchanged."""
    if not isinstance(data, dict):
        raise WeightdiffError(f"{where}: expected a JSON object written by weightdiff (a comparison result), found {_kind(data)}")
    schema = data.get("schema")
    if schema != SCHEMA:
        found = "no `schema` key" if schema is None else f"schema `{escape_name(str(schema))[:80]}`"
        raise WeightdiffError(f"{where}: expected schema `{SCHEMA}`, found {found}",
                              "use the weightdiff version that wrote it")
    num, opt_num, opt_int = _NUM, _NUM + (type(None),), (int, type(None))
    s = data.get("summary")
    _check(where, "summary", s, (dict,), "an object")
    _check(where, "summary.verdict", s.get("verdict"), (str,), "a string")
    _check(where, "summary.params_total", s.get("params_total", 0), (int,), "an integer")
    by = s.get("params_by_status", {})
    _check(where, "summary.params_by_status", by, (dict,), "an object")
    for k, v in by.items():
        _check(where, f"summary.params_by_status.{k}", v, (int,), "an integer")
    for k in ("relative_change", "delta_params_share", "relatedness_cosine"):
        _check(where, f"summary.{k}", s.get(k), opt_num, "a number or null")
    _check(where, "summary.headline", s.get("headline", []), (list,), "a list")
    _check(where, "blocks", data.get("blocks"), (list,), "a list")
    for i, b in enumerate(data["blocks"]):
        key = f"blocks[{i}]"
        _check(where, key, b, (dict,), "an object")
        _check(where, f"{key}.index", b.get("index"), opt_int, "an integer or null")
        for k in ("rel_change", "params", "params_changed", "tensors_changed", "delta_params"):
            _check(where, f"{key}.{k}", b.get(k), opt_num, "a number or null")
        _check(where, f"{key}.modules", b.get("modules", {}), (dict,), "an object")
        for k, v in b.get("modules", {}).items():
            _check(where, f"{key}.modules.{k}", v, opt_num, "a number or null")
    _check(where, "tensors", data.get("tensors"), (list,), "a list")
    for i, t in enumerate(data["tensors"]):
        key = f"tensors[{i}]"
        _check(where, key, t, (dict,), "an object")
        _check(where, f"{key}.name", t.get("name"), (str,), "a string")
        _check(where, f"{key}.status", t.get("status"), (str,), "a string")
        _check(where, f"{key}.shape", t.get("shape"), (list,), "a list")
        for j, v in enumerate(t["shape"]):
            _check(where, f"{key}.shape[{j}]", v, (int,), "an integer")
        for k in ("norm_base", "norm_tuned", "norm_delta", "rel_change", "cosine"):
            _check(where, f"{key}.{k}", t.get(k), opt_num, "a number or null")
        r = t.get("rank")
        _check(where, f"{key}.rank", r, (dict, type(None)), "an object or null")
        if r is not None:
            _check(where, f"{key}.rank.spectrum", r.get("spectrum", []), (list,), "a list")
            for j, v in enumerate(r.get("spectrum", [])):
                _check(where, f"{key}.rank.spectrum[{j}]", v, num, "a number")
            for k in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
                _check(where, f"{key}.rank.{k}", r.get(k), opt_int, "an integer or null")
            _check(where, f"{key}.rank.shape_2d", r.get("shape_2d", [1, 1]), (list,), "a list")
    for k in ("base",):
        _check(where, k, data.get(k, []), (list,), "a list")
    _check(where, "tuned", data.get("tuned", {}), (dict,), "an object")
    _check(where, "settings", data.get("settings", {}), (dict,), "an object")
    return data


def load_result(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and check a compare JSON file; returns (the dict, the sha256 of the file's bytes)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise WeightdiffError(f"{p}: no such file", "save a comparison result as JSON first") from None
    except IsADirectoryError:
        raise WeightdiffError(f"{p}: is a directory, expected a comparison result saved as JSON") from None
    except OSError as exc:
        raise WeightdiffError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda c: None)
    except UnicodeDecodeError:
        raise WeightdiffError(f"{p}: not UTF-8 text, expected a comparison result saved as JSON") from None
    except json.JSONDecodeError as exc:
        raise WeightdiffError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                              "was the file cut short?") from None
    return validate_result(data, str(p)), hashlib.sha256(raw).hexdigest()


# --- writing -----------------------------------------------------------------------------------

def _rel(target: Path, start: Path) -> str:
    return posixpath.join(*Path(os.path.relpath(target, start)).parts)


def load_population(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``weightdiff survey`` table: ``survey.parquet`` (needs pyarrow) or ``survey.csv``."""
    p = Path(path)
    need = ("tuned", "status", "base", "relative_change", "one_minus_cosine", "delta_params_share")
    try:
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise WeightdiffError(f"{p}: reading a Parquet survey needs pyarrow",
                                      "pip install 'weightdiff[pandas]', or give survey.csv") from None
            try:
                rows = pq.read_table(p, columns=list(need)).to_pylist()
            except (KeyError, ValueError) as exc:   # pyarrow's errors for a bad file or a missing column
                raise WeightdiffError(f"{p}: not a weightdiff survey table ({escape_name(str(exc))[:120]})",
                                      "write one with weightdiff survey BASE TUNED... --out DIR") from None
        else:
            import csv

            with open(p, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            if rows and not set(need) <= set(rows[0]):
                raise WeightdiffError(f"{p}: not a weightdiff survey table (missing columns)",
                                      "write one with weightdiff survey BASE TUNED... --out DIR")
            for r in rows:
                for k in need[3:]:
                    r[k] = float(r[k]) if r.get(k) else None
    except FileNotFoundError:
        raise WeightdiffError(f"{p}: no such file", "write one with weightdiff survey BASE TUNED... --out DIR") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightdiffError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    return rows


def write_report(data: dict, *, html: str | os.PathLike | None = None, markdown: str | os.PathLike | None = None,
                 plots: str | os.PathLike | None = None, pdf: bool = False,
                 source: dict | None = None, population: list[dict] | None = None) -> ReportOutputs:
    """Draw the figures and write the memo(s) for a loaded compare dict.

    ``plots``: a folder for the figures (PNG 300 dpi and SVG, plus PDF when ``pdf``) and a
    ``figures.json`` with their titles and captions. ``markdown`` needs image files: without
    ``plots`` they go to ``<markdown stem>_figures/`` beside it. ``html`` embeds its figures
    and needs no folder. ``source`` (path, sha256, command of the JSON) goes into the memo's
    reproducibility block. ``population``: survey rows (``load_population``) to place the
    model among, in a sentence of the memo's summary.
    """
    validate_result(data)
    html_p = Path(html) if html is not None else None
    md_p = Path(markdown) if markdown is not None else None
    plot_dir = Path(plots) if plots is not None else None
    if plot_dir is None and md_p is not None:
        plot_dir = md_p.parent / f"{md_p.stem}_figures"
    if pdf and plot_dir is None:
        raise OptionsError("pdf figures are written as files: give a plots folder (or a Markdown memo) as well",
                           option="pdf")
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
    title = f"weightdiff memo: {(data.get('tuned') or {}).get('path', '?')}"
    if html_p is not None:
        out.html = write_text(html_p, memo_mod.to_html(blocks, title))
        out.files.append(out.html)
    if md_p is not None:
        images = {f.name: _rel(Path(os.path.abspath(f.files["png"])), Path(os.path.abspath(md_p.parent)))
                  for f in out.figures if f.files.get("png")}
        out.markdown = write_text(md_p, memo_mod.to_markdown(blocks, images))
        out.files.append(out.markdown)
    return out


def render_outputs(data: dict, *, report: str | os.PathLike | None = None,
                   plots_dir: str | os.PathLike | None = None, pdf: bool = False,
                   source: dict | None = None) -> list[Path]:
    """For ``weightdiff compare --report FILE --plots DIR``: ``FILE.md`` gives the Markdown memo
    (its figures in DIR, or beside it), any other name the self-contained HTML memo.
    Returns the paths written."""
    is_md = report is not None and str(report).lower().endswith((".md", ".markdown"))
    out = write_report(data, html=None if is_md else report, markdown=report if is_md else None,
                       plots=plots_dir, pdf=pdf, source=source)
    return out.files


def report(path: str | os.PathLike, *, html: str | os.PathLike | None = None,
           markdown: str | os.PathLike | None = None, plots: str | os.PathLike | None = None,
           pdf: bool = False, command: str | None = None,
           population: str | os.PathLike | None = None) -> ReportOutputs:
    """Load ``path`` (a compare JSON) and write what was asked; with nothing asked, an HTML
    memo beside the JSON (``result.json`` -> ``result.html``). ``population``: a survey table
    to place the model within."""
    data, digest = load_result(path)
    rows = load_population(population) if population is not None else None
    if html is None and markdown is None and plots is None:
        html = Path(path).with_suffix(".html")
    source = {"path": os.fspath(path), "sha256": digest, "command": command or "weightdiff report"}
    return write_report(data, html=html, markdown=markdown, plots=plots, pdf=pdf, source=source, population=rows)
