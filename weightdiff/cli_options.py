"""The command line's shared pieces: the one output-option group (``--json``, ``--csv``,
``--report``/``--memo``, ``--plots``) with its up-front claim of every output path, the
cluster and provenance option groups, progress that notices swallowed signals, and the
small writers every command uses. ``cli.py`` holds the commands themselves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import UsageProblem, escape_name, terminal_safe
from .options import HubOptions, click_options

__all__ = ['_write_output', '_cluster_options', '_stdout_is_terminal', '_claim_outputs', '_memo_path', 'output_options', '_listed', '_checked', '_hub_options', '_command_line', '_provenance_options', '_say', '_document']


def _write_output(target: str, text: str) -> None:
    """Stage ``text`` for ``target`` (written with the command's other outputs), or print it for ``-``
    (on a terminal, with bidi overrides and C1 controls as \\u escapes: still valid JSON or CSV)."""
    from .fsutil import write_text

    if target == "-":
        click.echo(terminal_safe(text) if _stdout_is_terminal() else text, nl=False)
    else:
        write_text(target, text)


def _write_json(target: str, data: dict) -> None:
    """``_write_output(target, dumps(data))``, a file written in pieces (a 100,000-tensor result is
    64 MB of text: never held whole, nor beside its bytes)."""
    from .fsutil import write_text_pieces
    from .records import dump_chunks, dumps

    if target == "-":
        _write_output(target, dumps(data))
    else:
        write_text_pieces(target, lambda write: dump_chunks(data, write))


def _cluster_options(fn):
    """--scheduler / --workers / --worker-memory: where the tasks run (survey, split compare)."""
    for opt in reversed([
        click.option("--scheduler", metavar="ADDRESS",
                     help="Run the tasks on an existing Dask cluster (tcp://HOST:8786); its workers must "
                          "read the checkpoints at the same paths."),
        click.option("--workers", type=int, metavar="N",
                     help="Run the tasks on a local Dask cluster of N worker processes (one thread each; "
                          "in this process when Dask is not installed)."),
        click.option("--worker-memory", metavar="SIZE",
                     help="Memory limit of each local worker (4GB; default: an equal share of the machine)."),
    ]):
        fn = opt(fn)
    return fn


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _claim_outputs(inputs=(), figures: tuple[str, ...] = (), figure_index: bool = False, cache: str | None = None,
                   **targets) -> None:
    """Check every output path before any work (same path twice, a parent that is a file, an
    input overwritten, one output inside another that is a file): ``name=path``;
    ``plots``/``plots_dir`` are folders. ``figures``: the names of the figures the command may draw,
    claimed as ``<name>.png``/``.svg`` in the plots folder (``.png`` in a Markdown memo's figure
    folder), with ``figures.json`` when ``figure_index``; ``cache``: the ``--cache`` folder."""
    from .fsutil import active_outputs

    outs = active_outputs()
    if outs is None:
        return
    for p in inputs:
        if os.path.isfile(p):
            outs.protect(p)
    for name, target in targets.items():
        flag = f"--{name.removesuffix('_dir').removesuffix('_out')}"
        if target == "-" and name != "json_out" and name != "csv_out":
            raise UsageProblem(f"{flag} writes files; - (stdout) is only for --json and --csv")
        if target is not None and not str(target).strip():
            raise UsageProblem(f"{flag} was given an empty path", "give a file name, or leave the option out")
        if target and name != "plots_dir" and name != "plots" and str(target).endswith(("/", os.sep)):
            raise UsageProblem(f"{flag} {escape_name(str(target))} ends with a path separator, so it names a "
                               "folder; give a file name")
        if target:
            outs.claim(target, flag, folder=name.startswith("plots"))
    memo = targets.get("report_out")
    if memo and str(memo).lower().endswith(".md") and not (targets.get("plots_dir") or targets.get("plots")):
        # a Markdown memo's figures go to <stem>_figures/ beside it: claimed now, so that another output naming
        # that folder fails before any work (it failed after the JSON was written)
        p = Path(memo)
        outs.claim(p.parent / f"{p.stem}_figures", "--memo's figures", folder=True)
        for name in figures:
            outs.claim(p.parent / f"{p.stem}_figures" / f"{name}.png", "a figure")
    plots = targets.get("plots_dir") or targets.get("plots")
    if plots:
        for name in figures:
            for ext in ("png", "svg"):
                outs.claim(Path(plots) / f"{name}.{ext}", "a figure")
        if figure_index:
            outs.claim(Path(plots) / "figures.json", "the figures' captions")
    if cache:
        outs.claim(cache, "--cache", folder=True)


def _memo_path(ctx, param, value):
    """The memo's extension is checked when the flag is parsed, before any checkpoint is read."""
    if value is not None:
        from .render.document import memo_format

        memo_format(value)
    return value


def output_options(fn=None, *, plots: bool = True):
    """The output flags of every command that writes results (compare, provenance, lineage):
    the same names and meaning everywhere, one rule for the memo's format (its extension).
    ``plots=False`` for a command that draws no figure (lineage)."""
    if fn is None:
        return lambda f: output_options(f, plots=plots)
    for opt in reversed([
        click.option("--json", "json_out", metavar="FILE|-", help="Write the result as JSON (- for stdout only)."),
        click.option("--csv", "csv_out", metavar="FILE|-", help="Write the result's table as CSV (- for stdout only)."),
        click.option("--report", "--memo", "report_out", metavar="FILE", callback=_memo_path,
                     help="Write the memo; the extension picks the format: FILE.html (self-contained), FILE.md "
                          "(figures beside it, or in --plots DIR) or FILE.docx (Word; needs weightdiff[docx])."),
        *([click.option("--plots", "plots_dir", metavar="DIR", help="Write the figures (PNG 300 dpi and SVG) into DIR.")]
          if plots else []),
    ]):
        fn = opt(fn)
    return fn


def _listed(paths, quiet: bool) -> None:
    """"wrote PATH" for each output, once the command's outputs are all in place (a failure at
    the end writes none of them, so it must not have announced one)."""
    if quiet:
        return
    from .fsutil import active_outputs

    lines = [f"wrote {escape_name(str(path))}" for path in paths]

    def say() -> None:
        for line in lines:
            click.echo(line, err=True)
    outs = active_outputs()
    if outs is not None:
        outs.after_commit(say)
    else:
        say()


def _checked(progress):
    """``progress``, first raising a signal whose exception numba's compiler callbacks swallowed."""
    from .fsutil import check_interrupted

    def call(*args) -> None:
        check_interrupted()
        progress(*args)
    stage = getattr(progress, "stage", None)
    if stage is not None:                   # the steps after the pass (``ProgressLine.stage``)
        call.stage = stage
    advance = getattr(progress, "advance", None)
    if advance is not None:                 # the elements measured again after the pass (``ProgressLine.advance``)
        def step(n: int, cached: bool = False) -> None:
            check_interrupted()
            advance(n, cached=cached)
        call.advance = step
    skip = getattr(progress, "skip", None)
    if skip is not None:                    # elements the pass took from --cache (``ProgressLine.skip``)
        call.skip = skip
    expect = getattr(progress, "expect", None)
    if expect is not None:                  # elements known to be measured again after the pass
        call.expect = expect
    return call


def _measure_progress(quiet: bool):
    """Makes a progress line for each comparison a command runs one after another (provenance, lineage): done/total,
    ETA and the steps after the pass, every 30 s on a log (a 70B-width provenance candidate was an hour of
    silence); None with --quiet."""
    if quiet:
        return None

    def make():
        from .render.terminal import ProgressLine

        line = ProgressLine()
        call = _checked(line)
        call.close = line.close
        return call
    return make


def _hub_options(opts: dict, quiet: bool) -> HubOptions:
    hub = HubOptions.pop_from(opts)
    return HubOptions(hub.download, hub.offline, hub.stream_above, progress=not quiet)


def _command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["weightdiff", *sys.argv[1:]])


def _provenance_options(fn):
    from .options import ProvenanceOptions

    return click_options(ProvenanceOptions)(fn)


def _say(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: click.echo(escape_name(message), err=True))


def _document(target: str, blocks: list, figures: list, title: str, plots_dir: str | None, quiet: bool,
              date: str | None = None) -> None:
    from .render.document import write_memo

    _listed(write_memo(target, blocks, figures, title, figure_dir=plots_dir, date=date), quiet)
