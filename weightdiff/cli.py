"""The ``weightdiff`` command line: click parsing over one library call per command.

Results go to stdout, progress and diagnostics to stderr. Exit codes: 0 when the
work is done (differences are a result, not a failure), 2 for bad input or usage,
1 for an unexpected error, 130 when interrupted.
"""

from __future__ import annotations

import os
import sys

import click

from ._version import __version__
from .cli_options import (_checked, _claim_outputs, _measure_progress, _cluster_options, _command_line, _document, _hub_options, _listed, _memo_path,
                          _provenance_options, _say, _write_json, _write_output, output_options)
from .errors import OptionsError, UsageProblem, WeightdiffError, escape_name
from .options import CompareOptions, HubOptions, click_options, flag_of


def _in_cli_words(exc: WeightdiffError) -> str:
    """The one line of an error, with a library option name turned into its flag."""
    line = exc.one_line()
    if isinstance(exc, OptionsError) and exc.option:
        from .options import ProvenanceOptions

        flag = flag_of(exc.option, CompareOptions, ProvenanceOptions) or "--" + exc.option.replace("_", "-")
        if line.startswith(exc.option):
            line = flag + line[len(exc.option):]
    return line


class _Group(click.Group):
    """Turns WeightdiffError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        from .fsutil import Interrupted, OutputSet

        _map_large_arrays()
        try:
            with OutputSet():                   # every file a command writes: all at the end, or none
                return super().invoke(ctx)
        except Interrupted as exc:
            click.echo("interrupted", err=True)
            sys.exit(exc.exit_code)
        except WeightdiffError as exc:
            click.echo(f"error: {_in_cli_words(exc)}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)
        except Exception as exc:  # a bug: say so in one line, traceback only on request
            if os.environ.get("WEIGHTDIFF_DEBUG"):
                raise
            click.echo(f"error: internal error: {type(exc).__name__}: {escape_name(str(exc))} "
                       "(please report it; set WEIGHTDIFF_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)


def _map_large_arrays() -> None:
    """Large arrays mapped one by one and given back when freed (``measure.heap.map_large_arrays``), before a
    command runs (glibc's malloc; a no-op elsewhere)."""
    from .measure.heap import map_large_arrays

    map_large_arrays()


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="weightdiff")
def main() -> None:
    """Measure how deep a fine-tune is: weightdiff pairs a base checkpoint with a
    fine-tuned one and reports, tensor by tensor and block by block, how much the
    weights changed and the rank of each change.

    It answers "how slight is this fine-tune?" with numbers, a verdict (identical,
    cast_only, derived, unrelated), plots and a memo, read straight from safetensors
    files without loading whole models.

    Exit codes: 0 done (whatever was found), 1 internal error (WEIGHTDIFF_DEBUG=1
    shows the traceback), 2 bad input or usage, 130 interrupted.
    """


# --- inspect -----------------------------------------------------------------

@main.command("inspect")
@click.argument("ckpt", metavar="CKPT")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (schema weightdiff.inspect/1).")
@click.option("--tensors", "list_tensors", is_flag=True,
              help="Also list every tensor as compare names it (name, dtype, shape): the names --include, "
                   "--exclude and --rename match (fused experts split, GGUF names mapped, quantized weights "
                   "folded).")
@click_options(HubOptions)
def inspect_cmd(ckpt: str, as_json: bool, list_tensors: bool, **hub_opts) -> None:
    """Describe a checkpoint from its headers: format, files and shards, tensor count,
    parameters by dtype and by block, metadata, and the settings of a PEFT adapter (LoRA, AdaLoRA,
    LoHa, LoKr, VeRA, VBLoRA, FourierFT, DeLoRA, OFT, BOFT, HRA, IA3, trainable tokens, LN tuning), an mlx-lm
    adapter (LoRA, DoRA, full) or a llama.cpp LoRA adapter GGUF.

    CKPT is a .safetensors file, a GGUF file, a checkpoint folder (single, sharded or PEFT adapter),
    a Hugging Face cache folder, a legacy .bin/.pt (needs the torch extra), or a Hub
    repo id (org/name[@revision], hf://org/name@revision/subfolder or /file; the hub extra),
    whose headers are read by range requests without downloading the weights (a revision
    with a slash, org/name@feature/x, is read as compare --help says).

    \b
    Example:
      weightdiff inspect ./Llama-3.2-1B/
      weightdiff inspect adapter/ --json | jq .adapter
      weightdiff inspect meta-llama/Llama-3.2-1B --stream
      weightdiff inspect gpt-oss-20b/ --tensors | grep experts.3
    """
    import json

    from .inspect import describe, render_text

    hub = HubOptions.pop_from(hub_opts)
    if hub.download is None:                # headers only: the cache if it has them, else range requests
        hub = HubOptions(offline=hub.offline, stream_above=0.0)
    summary = describe(ckpt, hub=hub, tensors=list_tensors)
    click.echo(json.dumps(summary, indent=2) if as_json else render_text(summary))


def _own_checked(kind: str, text: str) -> None:
    """A provenance or lineage result this process just computed, held to the rules ``report`` holds a saved one
    to before its memo is drawn (``render.validate_kinds``): a rule it breaks is weightdiff's bug, an internal
    error (exit 1), never a memo that states it (a straightness of 71.6 was drawn as "7160.6%" of the path)."""
    import json

    from .render.validate_kinds import check_kind

    try:
        check_kind(kind, json.loads(text), "result")
    except WeightdiffError as exc:
        raise RuntimeError(f"the {kind} result breaks a consistency rule before its memo is drawn ({exc})") from None


def _freeze_heap() -> None:
    """Keep the cycle collector off what a command has built (the result, its records) for the rest
    of the process: rendering 100,000 rows allocates a view and a row each, and every full collection
    those allocations trigger walked the millions of live objects again (0.5 s of CPU for a
    100,000-tensor compare). Frozen objects are still freed by reference counting; the command's
    process ends after it renders, so nothing frozen outlives it."""
    import gc

    gc.freeze()


# --- compare -----------------------------------------------------------------

@main.command("compare", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", "bases", multiple=True, type=click.Path(path_type=str),
              help="A base checkpoint; repeat for a model built from several bases (then give only TUNED).")
@output_options
@click.option("--base-label", "base_labels", multiple=True, metavar="TEXT",
              help="Name of the base in the memo (repeat for each --base; default, or when TEXT is blank: its path or Hub id).")
@click.option("--tuned-label", metavar="TEXT", help="Name of the tuned model in the memo (default, or when TEXT is blank: its path or Hub id).")
@click.option("--hash/--no-hash", "hash_files", default=None,
              help="Record the sha256 of every input file (default: on with --report); a Hub file on disk is hashed and checked against the sha256 the Hub lists (offline, against the name of its cached blob); a streamed file is not hashed.")
@click.option("-q", "--quiet", is_flag=True, help="No plan or progress on stderr.")
@_cluster_options
@click_options(CompareOptions)
@click_options(HubOptions)
def compare_cmd(paths, bases, json_out, csv_out, report_out, plots_dir, base_labels, tuned_label, hash_files, quiet,
                scheduler, workers, worker_memory, **opts):
    """Compare a fine-tuned checkpoint TUNED against its BASE.

    PATHS is BASE TUNED, or only TUNED when --base is given (repeat --base for a
    composite model, such as a ViT encoder plus a GPT-2 decoder). A checkpoint is a
    .safetensors file, a folder with model.safetensors or a sharded index, a PEFT
    adapter folder or an mlx-lm one (adapters.safetensors), a GGUF file (a llama.cpp LoRA
    adapter GGUF as TUNED too), a
    Hugging Face cache snapshot, or a Hub repo id (org/name,
    org/name@revision, hf://org/name@revision/subfolder or /file; needs the hub extra). A local
    path always wins over a repo id of the same spelling; the plan says which was read. A
    revision is a branch, a tag or a commit sha (7 digits or more, offline too); a name with a
    slash is spelled as it is (org/name@feature/x reads the longest branch or tag the spelling
    starts with, the rest a subfolder), or refs/heads/feature/x, refs/tags/v1 or feature%2Fx.

    The summary goes to stdout (or only JSON with --json -); the pairing plan and a
    progress line go to stderr. With --workers or --scheduler the tensor pairs are
    measured on Dask workers (reading the same paths) and the result is the same.
    Exit code 0 when the comparison ran, whatever it found; 2 for bad input.

    \b
    Example:
      weightdiff compare meta-llama/base/ my-finetune/ --json result.json
      weightdiff compare --base vit/ --base gpt2/ captioner/ --report memo.html
      weightdiff compare mistralai/Mistral-7B-v0.1 Intel/neural-chat-7b-v3-1 --stream
    """
    from .comparison import compare
    from .render.terminal import ProgressLine, plan_text, render_text

    hub = _hub_options(opts, quiet)
    if bases:
        if len(paths) != 1:
            raise UsageProblem(f"with --base give exactly one TUNED path (got {len(paths)})")
        base_list, tuned = list(bases), paths[0]
    else:
        if len(paths) != 2:
            raise UsageProblem(f"expected BASE TUNED (got {len(paths)} paths)",
                               "for several bases use --base A --base B TUNED")
        base_list, tuned = [paths[0]], paths[1]
    if opts.get("cache"):       # the parent's folder, not each Dask worker's current one
        opts["cache"] = os.path.abspath(opts["cache"])
    options = CompareOptions(**opts)
    figures = ()
    if plots_dir or (report_out and str(report_out).lower().endswith(".md")):
        from .render.plots import FIGURES

        figures = tuple(FIGURES)
    _claim_outputs([*base_list, tuned], figures=figures, figure_index=True, cache=options.cache, json_out=json_out,
                   csv_out=csv_out, report_out=report_out, plots_dir=plots_dir)
    show = not quiet
    progress = ProgressLine(enabled=None if show else False)

    def on_plan(plan) -> None:
        from .kernels.dtypes import byte_length
        from .measure.compute import streamed

        # the bytes read per element streamed, from the plan's own dtypes (fp32 reads 4 per side, fp8 1)
        n = sum(streamed(p) for p in plan.pairs)
        read = sum(byte_length(p.dtype_base, k) + byte_length(p.dtype_tuned or p.dtype_base, k)
                   for p in plan.pairs if (k := streamed(p)))
        progress.bpe = read / (2 * n) if n else progress.bpe
        if show:
            click.echo(plan_text(plan), err=True)

    if hash_files is None:
        hash_files = report_out is not None
    run_compare = compare
    if (scheduler, workers, worker_memory) != (None, None, None):   # split by tensor over Dask workers: same JSON
        from functools import partial

        from .split import compare as split_compare

        run_compare = partial(split_compare, scheduler=scheduler, workers=workers, memory_limit=worker_memory,
                              say=_say(quiet))
    try:
        result = run_compare(base_list, tuned, options=options, progress=_checked(progress), on_plan=on_plan,
                             hash_files=hash_files, command=_command_line(), hub=hub,
                             base_label=list(base_labels) or None, tuned_label=tuned_label)
    finally:
        progress.stage(None)            # no line of a step after the error's or the interruption's
    progress.close()
    _freeze_heap()
    # the tensors as views of their records: the JSON is written from the records and no dict per
    # tensor is built unless CSV, the memo or figures need one (plain_rows)
    data = result.to_dict(_views=True)
    del result
    if json_out:
        _write_json(json_out, data)
    if csv_out or report_out or plots_dir:
        from .records import plain_rows

        plain_rows(data)
    if csv_out:
        from .render.tabular import to_csv

        _write_output(csv_out, to_csv(data))
    if report_out or plots_dir:
        from .render.report import render_outputs

        _listed(render_outputs(data, report=report_out, plots_dir=plots_dir), quiet)
    if json_out != "-" and csv_out != "-":
        click.echo(render_text(data), nl=False)


# --- report ------------------------------------------------------------------

@main.command("report", context_settings=CONTEXT)
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--report", "--memo", "memo_out", metavar="FILE", callback=_memo_path,
              help="Write the memo; the extension picks the format: FILE.html, FILE.md or FILE.docx.")
@click.option("--html", "html_out", metavar="FILE", help="Write the self-contained HTML memo (figures embedded).")
@click.option("--markdown", "md_out", metavar="FILE",
              help="Write the Markdown memo; its PNG figures go to --plots DIR, or FILE_figures/ beside it.")
@click.option("--plots", "plots_dir", metavar="DIR",
              help="Write the figures (PNG 300 dpi and SVG) and figures.json with their captions into DIR.")
@click.option("--pdf", is_flag=True, help="Also write each figure as PDF (with --plots or --markdown).")
@click.option("--population", metavar="SURVEY", type=click.Path(path_type=str),
              help="Place the model among the fine-tunes of a `weightdiff survey` (survey.parquet or .csv).")
@click.option("-q", "--quiet", is_flag=True, help="Do not list the files written on stderr.")
def report_cmd(results, memo_out, html_out, md_out, plots_dir, pdf, population, quiet):
    """Redraw the figures and the memo from saved results, without the checkpoints.

    RESULTS are JSON files written by `weightdiff compare --json`, `provenance --json`
    or `lineage --json`; several make one document with a section each, in the order
    given (a question such as "is this model derived from A, and how deeply?").
    With no output option the HTML memo is written beside the first RESULT
    (result.json -> result.html). The headline sentences go to stdout, the files
    written to stderr. One provenance or lineage RESULT alone gives the document its
    own --report wrote. Exit code 0 when the memo was written, 2 when a RESULT is not a
    weightdiff result (a key of the wrong type, or a value no run writes, such as more
    blocks changed than there are) or an output's extension is not .html, .md or .docx.

    \b
    Example:
      weightdiff compare base/ tuned/ --json result.json
      weightdiff report result.json --html memo.html --markdown memo.md --plots figures/
      weightdiff report cmp.json prov.json chain.json --memo memo.docx
    """
    from .render.report import report_many

    out = report_many(list(results), html=html_out, markdown=md_out, memo=memo_out, plots=plots_dir, pdf=pdf,
                      command=_command_line(), population=population)
    for sentence in out.headline + out.population:
        click.echo(escape_name(sentence))
    _listed(out.files, quiet)


# --- demo --------------------------------------------------------------------

@main.command("demo", context_settings=CONTEXT)
@click.argument("directory", required=False, default="weightdiff-demo", type=click.Path(path_type=str))
@click.option("-q", "--quiet", is_flag=True, help="Print only where the files are, not the summary.")
def demo_cmd(directory, quiet):
    """Build a small model and a fine-tune of it with a known answer, compare them, and
    write the JSON, the figures and the memo into DIRECTORY (default ./weightdiff-demo).

    The pair is Llama-shaped (8 blocks, hidden 256, bfloat16, about 7 million
    parameters), built in seconds from a fixed seed with no network. The fine-tune: a
    rank-8 update on q and v of blocks 6 and 7, block 3 fully retrained, a new
    classification head, and 8 tokens added to the vocabulary; everything else is bit
    for bit the base. DIRECTORY/ground_truth.json records this, to check the report by.

    \b
    Example:
      weightdiff demo
      weightdiff demo /tmp/wd-demo && xdg-open /tmp/wd-demo/memo.html
    """
    from .demo import run_demo
    from .render.terminal import render_text

    out = run_demo(directory, command=_command_line())
    if not quiet:
        click.echo(render_text(out.data), nl=False)
        click.echo("")
    for label, path in (("memo (HTML)", out.html), ("memo (Markdown)", out.markdown), ("figures", out.plots),
                        ("JSON", out.json), ("ground truth", out.directory / "ground_truth.json")):
        click.echo(f"{label + ':':17} {escape_name(str(path))}")

# --- provenance --------------------------------------------------------------

@main.command("provenance", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--candidates", "candidates_flag", is_flag=True,
              help="Marks where the candidate list starts (optional): TUNED --candidates A B ...")
@output_options
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@_provenance_options
@click_options(HubOptions)
def provenance_cmd(paths, candidates_flag, json_out, csv_out, report_out, plots_dir, quiet, **opts):
    """Rank candidate bases of TUNED by weight-space evidence of derivation.

    Each candidate gets `derived` or `unrelated` with its evidence: relative change
    and parameter-weighted cosine over large matrices (norm gains and biases left
    out), the share of tensors bitwise identical, per-block change and coverage.
    Candidates sharing no large matrix are listed with the reason (none compared:
    inconclusive). A near tie on the pooled change is broken only by what singles
    one out (bitwise-equal matrices, closer in most blocks). TUNED itself and repeats among the
    candidates are ranked once or left out. With more candidates than --full-top,
    a seeded sample of rows ranks them first. Permuted MLP neurons are found and
    undone. An adapter (PEFT, or llama.cpp LoRA GGUF) as TUNED is refused: compare it with its base. Exit
    code 0 when the ranking ran, 2 for bad input.

    \b
    Example:
      weightdiff provenance my-model/ --candidates llama-3-8b/ mistral-7b/ qwen2-7b/
      weightdiff provenance my-model/ --candidates a/ b/ --json - | jq .leading
      weightdiff provenance org/tuned --candidates org/a org/b org/c org/d --stream
    """
    from .provenance import ProvenanceOptions, provenance
    from .render.provenance import provenance_figure, ranking_text

    if len(paths) < 2:
        raise UsageProblem(f"expected TUNED --candidates A [B ...] (got {len(paths)} paths)")
    _claim_outputs(paths, figures=("provenance",), json_out=json_out, csv_out=csv_out, report_out=report_out,
                   plots_dir=plots_dir)
    hub = _hub_options(opts, quiet)
    result = provenance(paths[0], list(paths[1:]), options=ProvenanceOptions(**opts), progress=_say(quiet),
                        measure_progress=_measure_progress(quiet),
                        command=_command_line(), hub=hub)
    data = result.to_dict()
    if json_out:
        _write_output(json_out, result.to_json())
    if csv_out:
        from .render.tabular import provenance_csv

        _write_output(csv_out, provenance_csv(data))
    if report_out or plots_dir:
        from .fsutil import write_bytes
        from .render.sections import provenance_blocks

        _own_checked("provenance", result.to_json())

        fo, blobs = provenance_figure(data)
        if plots_dir:
            fo.files = {f: write_bytes(os.path.join(plots_dir, f"provenance.{f}"), b) for f, b in blobs.items()}
            _listed(fo.files.values(), quiet)
        if report_out:
            from .render.report import result_date, section_title

            _document(report_out, provenance_blocks(data, [fo]), [fo], section_title("provenance", data), plots_dir,
                      quiet, date=result_date(data))
    if json_out != "-" and csv_out != "-":
        click.echo(ranking_text(data), nl=False)


@main.command("lineage", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@output_options(plots=False)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click_options(CompareOptions)
@click_options(HubOptions)
def lineage_cmd(paths, json_out, csv_out, report_out, quiet, **opts):
    """Report each step of a chain of checkpoints and the end-to-end change.

    PATHS are two or more checkpoints, oldest first (base -> SFT -> DPO). Every
    consecutive pair and the first against the last are compared; the relative
    change per block and step shows which step injected what. A checkpoint listed twice
    gets a finding (and one listed twice in a row is refused: that step measures
    nothing). Exit code 0 when the comparisons ran, 2 for bad input.

    \b
    Example:
      weightdiff lineage llama-3-8b/ llama-3-8b-sft/ llama-3-8b-dpo/
      weightdiff lineage base/ sft/ dpo/ --no-rank --json chain.json
    """
    from .lineage import lineage
    from .render.provenance import lineage_text

    if opts.get("cache"):
        opts["cache"] = os.path.abspath(opts["cache"])
    _claim_outputs(paths, cache=opts.get("cache"), json_out=json_out, csv_out=csv_out, report_out=report_out)
    hub = _hub_options(opts, quiet)
    result = lineage(list(paths), options=CompareOptions(**opts), progress=_say(quiet), command=_command_line(),
                     measure_progress=_measure_progress(quiet),
                     hub=hub)
    data = result.to_dict()
    if json_out:
        _write_output(json_out, result.to_json())
    if csv_out:
        from .render.tabular import lineage_csv

        _write_output(csv_out, lineage_csv(data))
    if report_out:
        from .render.sections import lineage_blocks

        from .render.report import result_date, section_title

        _own_checked("lineage", result.to_json())

        _document(report_out, lineage_blocks(data), [], section_title("lineage", data), None, quiet,
                  date=result_date(data))
    if json_out != "-" and csv_out != "-":
        click.echo(lineage_text(data), nl=False)


# --- survey ------------------------------------------------------------------

@main.command("survey", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--from-file", "list_file", metavar="FILE", help="Read more TUNED paths from FILE (one per line).")
@click.option("--out", "out_dir", metavar="DIR", required=True,
              help="Write survey.csv, survey.parquet and models/<name>.json into DIR (rerun to resume).")
@click.option("--plot", is_flag=True, help="Also draw the population figure (DIR/population.png and .svg).")
@click.option("--hash/--no-hash", "hash_files", default=False,
              help="Record the sha256 of every input file in the rows (each comparison reads its files, "
                   "the base's included, once more; a rerun hashes a done model's files again to check "
                   "them before skipping it).")
@_cluster_options
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click_options(CompareOptions)
def survey_cmd(paths, list_file, out_dir, plot, hash_files, scheduler, workers, worker_memory, quiet, **opts):
    """Compare many fine-tunes of one BASE and write one row per model.

    PATHS is BASE TUNED [TUNED ...]; --from-file adds TUNED paths from a list. Each row:
    verdict, relative change, 1 - cosine, blocks changed, delta_params share, form,
    largest rank, flags and the inputs' identity; each model's full compare JSON goes
    to DIR/models/. A model that fails gets an error row and the others go on; a rerun
    skips the models already done with the same inputs and options. One checkpoint
    given twice (its folder and its model.safetensors, a symlink) is surveyed once,
    and BASE given again as a TUNED model is left out, each with a notice. With
    --scheduler or --workers the comparisons run on Dask with the same result. Exit
    code 0 when the survey ran (even with error rows); 2 for a bad BASE or DIR or an
    unreachable scheduler (nothing written), or a scheduler lost during the run (the
    rows done are kept; rerun to compare the others).

    \b
    Example:
      weightdiff survey llama-3-8b/ ft-a/ ft-b/ ft-c/ --out survey/ --plot
      weightdiff survey llama-3-8b/ --from-file finetunes.txt --out survey/ --scheduler tcp://head:8786
    """
    from .survey import read_list, survey

    tuned = list(paths[1:]) + (read_list(list_file) if list_file else [])
    if not paths or not tuned:
        raise UsageProblem("expected BASE TUNED [TUNED ...] (or BASE --from-file FILE)")
    from .fsutil import immediate_writes

    with immediate_writes():    # a survey writes as it goes, so an interrupted one can resume
        result = survey(paths[0], tuned, out_dir, options=CompareOptions(**opts), hash_files=hash_files,
                        scheduler=scheduler, workers=workers, memory_limit=worker_memory, say=_say(quiet),
                        plot=plot, inputs=[list_file] if list_file else [])
    for path in result.files:
        if not quiet:
            click.echo(f"wrote {escape_name(str(path))}", err=True)
    click.echo(f"{len(result.rows)} models: {result.computed} compared, {result.skipped} already done, "
               f"{result.failed} failed ({escape_name(str(result.directory / 'survey.csv'))})")


if __name__ == "__main__":  # pragma: no cover
    main()
