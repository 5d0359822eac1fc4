"""``weightdiff.compare()``: the library entry point behind ``weightdiff compare``.

The pipeline reads top to bottom in ``compare()``, one visible call per stage:

    locate (io.checkpoint) -> plan (pairing.plan) -> measure (measure.compute, on the
    backend of measure.backend) -> aggregate (judge.aggregate) -> judge
    (judge.verdict.summarise) -> explain (render.sentences) -> ``Comparison``

The plan is reported through ``on_plan`` before any tensor data is read. The result's
JSON is the contract of DESIGN.md (``schema: weightdiff.compare/2``) and is byte-for-byte
reproducible: everything that varies between runs (time, command line, versions) is
under ``run``, which ``to_json(include_run=False)`` leaves out.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import platform
import sys
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from ._version import __version__
from .errors import CheckpointError, escape_name
from .fsutil import active_outputs
from .io.checkpoint import Checkpoint, locate
from .io.declared import declared
from .io.peft_adapter import check_against_base, check_factor_values
from .judge.aggregate import aggregate
from .judge.status import classify
from .judge.verdict import summarise
from .measure import precompile
from .measure.backend import backend_for
from .measure.compute import Progress, compute_all
from .options import CompareOptions, HubOptions, options_from_kwargs
from .pairing.plan import Plan, plan as make_plan
from .pairing.names import clear_name_caches, component_of
from .render import sentences
from .render.reference import reference_scale
from .errors import OptionsError, WeightdiffError
from .records import SCHEMA, BlockRecord, Summary, TensorRecord, TensorRow, dumps

PathLike = Union[str, os.PathLike]
#: (plan, bases, tuned, options, progress) -> (records in plan order, seconds): ``compute_all``'s signature
Compute = Callable[[Plan, Sequence[Checkpoint], Checkpoint, CompareOptions, Any, Any, Union[Progress, None]],
                   "tuple[list[TensorRecord], float]"]


@dataclass
class Comparison:
    """Everything ``weightdiff compare`` found; ``to_dict()`` is the JSON contract."""

    settings: dict
    base: list[dict]
    tuned: dict
    plan: dict
    summary: Summary
    modules: dict[str, dict]
    blocks: list[BlockRecord]
    tensors: list[TensorRecord]
    run: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)   # the reference scale (render.reference), set by explain()

    def to_dict(self, include_run: bool = True, _records: bool = False, _views: bool = False) -> dict[str, Any]:
        """The JSON document as plain data. (``_records``/``_views``, for this package's own
        readers: ``tensors`` as the records themselves or as read-only ``TensorRow`` views.)"""
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "tool": {"name": "weightdiff", "version": __version__},
            "settings": self.settings,
            "base": self.base,
            "tuned": self.tuned,
            "plan": self.plan,
            "summary": self.summary.to_dict(),
            "reference": self.reference,
            "modules": self.modules,
            "blocks": [b.to_dict() for b in self.blocks],
            # the records themselves for to_json: records.dumps writes each as one line
            "tensors": list(self.tensors) if _records else [TensorRow(t) for t in self.tensors] if _views
            else [t.to_dict() for t in self.tensors],
        }
        if include_run:
            d["run"] = self.run
        return d

    def to_json(self, include_run: bool = True) -> str:
        return dumps(self.to_dict(include_run, _records=True))

    def __repr__(self) -> str:
        from .render.notebook import short_repr

        return short_repr(self.to_dict(include_run=False))

    def _repr_html_(self) -> str:
        """Jupyter's view: the verdict, the key figures and the depth profile (under 50 KB)."""
        from .render.notebook import card_html

        return card_html(self.to_dict())

    def to_pandas(self, table: str = "tensors"):
        """The ``tensors`` (one row per tensor, rank fields as ``rank.<field>``) or ``blocks``
        table as a pandas DataFrame (needs pandas: ``pip install 'weightdiff[pandas]'``)."""
        from .render.notebook import TABLES, rows

        if table not in TABLES:
            raise OptionsError(f"table must be one of {', '.join(TABLES)} (got {table!r})", option="table")
        try:
            import pandas as pd
        except ImportError:
            raise WeightdiffError("to_pandas() needs pandas", "pip install 'weightdiff[pandas]'") from None
        return pd.DataFrame(rows(self.to_dict(include_run=False), table))

    def tensor(self, name: str) -> TensorRecord:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


#: files beside the weights that the readers take as input (heads, ties, the LoRA scale, modules, shards) or that
#: are part of the model as published: an output is never written over one of them
SIDECARS = ("config.json", "quantize_config.json", "hf_quant_config.json", "params.json", "adapter_config.json",
            "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
            "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
            "README.md")


def compare_with_progress(measure_progress: Callable[[], Any] | None, base, tuned, **kwargs: Any):
    """``compare(base, tuned, **kwargs)`` with a progress object from ``measure_progress`` (None: none), whose step
    line is ended and which is closed however the comparison ends. For commands that run comparisons one after
    another (lineage, provenance): a comparison at 70B widths is many minutes, which a log showed as silence."""
    line = measure_progress() if measure_progress is not None else None
    try:
        return compare(base, tuned, progress=line, **kwargs)
    finally:
        if line is not None:
            stage = getattr(line, "stage", None)
            if stage is not None:
                stage(None)
            close = getattr(line, "close", None)
            if close is not None:
                close()


def protect_folder(outs, ck: Checkpoint) -> None:
    """Protect the checkpoint's sidecar files (``SIDECARS``, present or not, and ``*.index.json``) in its folder and
    in every folder its weights are read from (a sentence-transformers module's ``0_Transformer/``). Files the user may write
    beside a model (an earlier run's ``--json``) stay writable."""
    root = Path(str(ck.path))
    folders = {root if root.is_dir() else root.parent}
    folders.update(Path(str(f)).parent for f in ck.files)
    for folder in sorted(folders):
        try:
            names = [e.name for e in os.scandir(folder) if e.is_file()]
        except OSError:
            continue
        # absent ones too: a --memo README.md written into a model without one made that folder refuse the
        # same command the next time (and put an output among the model's files)
        for name in sorted(set(names) | set(SIDECARS)):
            if name in SIDECARS or name.endswith((".index.json", ".jinja")):
                outs.protect(folder / name, f"is a file of the checkpoint `{escape_name(str(folder))}`")


@contextmanager
def hashing(progress, cks: Sequence[Checkpoint]):
    """While the local files of ``cks`` not hashed yet are hashed (``--hash``, which ``--memo`` turns on): a progress
    stage saying so with the bytes to hash (a log showed 56 to 93 s of silence for a 7B pair's). Nothing when there
    is nothing to hash or no progress line."""
    stage = getattr(progress, "stage", None)
    todo = sum(os.path.getsize(f) for ck in cks if ck.hub is None and getattr(ck, "_hashed", None) is None
               for f in ck.files if os.path.isfile(f))
    if stage is None or not todo:
        yield
        return
    stage(f"hashing the input files (sha256 of {todo / 1e9:,.2f} GB)")
    try:
        yield
    finally:
        stage(None)


def describe(ckpt: Checkpoint, digests: bool) -> dict:
    """The ``base``/``tuned`` entry of the JSON: path, format, sizes, dtypes, files (and, for a
    Hub repo, ``hub``: repo id, revision asked for, commit, subfolder; the files' sha256 are
    the Hub's, so without ``digests`` the entry is the same whether the weights were streamed or
    downloaded; with it, files on disk are hashed and checked against them: io.hub.hub_files)."""
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        # a quantized tensor counts under its stored scheme (a GGUF type, `mxfp4`, `gptq`), not under the
        # float32 its values are dequantized to
        key = (info.scheme or info.quant.format) if info.quant is not None else info.dtype
        dtypes[key] = dtypes.get(key, 0) + info.numel
    if ckpt.hub is not None:
        from .io.hub import hub_files

        files = hub_files(ckpt, digests)
        return {"path": str(ckpt.path), "format": ckpt.format, "params": ckpt.params,
                "bytes": sum(f["bytes"] or 0 for f in files), "dtypes": dict(sorted(dtypes.items())),
                "files": files, "hub": {k: v for k, v in ckpt.hub.items() if k != "files"}}
    hashes = ckpt.file_digests() if digests else {}
    files = []
    for f in ckpt.files:
        f = Path(f)
        try:
            rel = f.relative_to(ckpt.root).as_posix()
        except ValueError:
            rel = f.name
        files.append({"name": rel, "bytes": f.stat().st_size, "sha256": hashes.get(rel)})
    return {"path": str(ckpt.path), "format": ckpt.format, "params": ckpt.params,
            "bytes": sum(f["bytes"] for f in files), "dtypes": dict(sorted(dtypes.items())), "files": files}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "weightdiff": __version__}
    for dist in ("numpy", "numba", "safetensors", "matplotlib", "click", "torch"):
        if dist == "torch" and "torch" not in sys.modules:
            continue    # only when the run used it
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_date() -> str:
    """The date and time of a run, UTC, to the second (kept under ``run``: outside the
    byte-deterministic part of the JSON)."""
    from datetime import datetime, timezone

    epoch = os.environ.get("SOURCE_DATE_EPOCH")       # reproducible builds (the docs' worked example)
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def hub_run(ckpts: Sequence[Checkpoint]) -> list[dict] | None:
    """How each Hub checkpoint's bytes were read (mode, bytes fetched by range requests), for ``run``."""
    out = []
    for ck in ckpts:
        if ck.hub_run is None:
            continue
        reader = ck.hub_run.get("reader")
        out.append({"path": str(ck.path), "mode": ck.hub_run["mode"],
                    "bytes_read": sum(reader.bytes_read.values()) if reader is not None else None,
                    "requests": reader.requests if reader is not None else None})
    return out or None


def _preflight(paths: Sequence[PathLike], hub: HubOptions | None) -> None:
    """Check the Hub ids among ``paths`` before anything is read (only when there are some)."""
    from .io.checkpoint import is_hub_candidate

    if any(is_hub_candidate(p) for p in paths):
        from .io.hub import preflight

        preflight(paths, hub)


def cycle_collector_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (as it was found afterwards).

    A comparison allocates a few objects per tensor (header entries, pairs, records) that live
    until the end; with the collector on, each full collection walks all of them again, which
    cost a quarter of the run time for 100,000 tensors. Nothing in a comparison makes
    reference cycles per tensor (a test keeps it so), so its memory is freed by reference
    counting alone; the few cycles of a run are collected after it, as usual."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()
    return run


@cycle_collector_paused
def compare(base: PathLike | Sequence[PathLike], tuned: PathLike, *, options: CompareOptions | None = None,
            progress: Progress | None = None, on_plan: Callable[[Plan], None] | None = None,
            hash_files: bool = False, command: str | None = None, compute: Compute | None = None,
            hub: HubOptions | None = None,
            base_label: str | Sequence[str] | None = None, tuned_label: str | None = None,
            undo_reorderings: bool = True, **kwargs: Any) -> Comparison:
    """Compare a fine-tuned checkpoint against its base (or several bases of a composite model).

    ``base`` is one path or a list of paths; ``tuned`` one path. Options are those of
    ``CompareOptions`` (``rank``, ``rank_k``, ``device``, ``threads``, ``include``,
    ``exclude``, ...), given as keywords or as ``options=``. ``on_plan`` receives the
    pairing plan before any tensor data is read; ``progress(done, total, name)``
    receives element counts while tensors stream. ``hash_files`` adds the sha256 of
    every input file (one extra read of each file) for the memo's reproducibility block.
    ``base_label`` (one per base) and ``tuned_label`` name the models in the memo
    (``label`` of the ``base``/``tuned`` entries; the path when not given).
    ``progress=True`` shows a progress line on stderr that also works in Jupyter.
    ``compute`` replaces ``compute_all`` (same arguments, same return): a split comparison
    (weightdiff.split) measures the pairs on workers; everything else stays the same.
    ``base`` and ``tuned`` may be Hugging Face Hub repo ids (``org/name@revision``); ``hub``
    (HubOptions) says how their weights are read. Units found in another order than the base's (MLP
    neurons, attention heads, experts, token rows: ``permuted_units``) are measured against the base's
    units in the tuned model's order, so the numbers are of what changed beneath the reordering;
    ``undo_reorderings=False`` keeps them measured as stored (provenance's ``--no-permutations``).
    Raises WeightdiffError for bad input.
    """
    if options is None:
        options = options_from_kwargs(CompareOptions, **kwargs)
    elif kwargs:
        options = options_from_kwargs(CompareOptions, **{**_as_kwargs(options), **kwargs})
    backend = backend_for(options.device, options.threads)   # fails before any reading
    if options.cache:                   # a cache folder that cannot be used fails before any reading too
        from .measure.cache import check_folder

        check_folder(options.cache)
    base_paths = [base] if isinstance(base, (str, os.PathLike, Checkpoint)) else list(base)
    _preflight([*base_paths, tuned], hub)
    base_labels = _labels(base_label, len(base_paths))
    line = None
    if progress is True:
        from .render.terminal import ProgressLine

        progress = line = ProgressLine(enabled=True, delay=0.5)
    elif progress is False:
        progress = None
    with ExitStack() as stack:
        if line is not None:            # its threads (heartbeat, stages) end with the comparison, however it ends
            stack.callback(line.close)
        date = run_date()
        bases = [_opened(stack, p, hub) for p in base_paths]
        for b in bases:
            if b.format == "adapter":
                what = "a llama.cpp LoRA adapter" if b.gguf_lora is not None else "a PEFT adapter (adapter_config.json)"
                raise CheckpointError(b.path, f"is {what}, not a base model",
                                      "an adapter is the tuned side: swap the arguments (BASE first, then the adapter)")
        tuned_ck = _opened(stack, tuned, hub)
        # a GGUF side's dequantizers run from the plan on (tied heads, norms read whole): compiled in a child first
        keys = precompile.gguf_keys((*bases, tuned_ck))
        if keys:
            told = getattr(progress, "stage", None)
            cks = (*bases, tuned_ck)
            precompile.note_size(precompile.checkpoint_elements(cks), precompile.checkpoint_side(cks))
            if precompile.ensure_keys(keys, told) and told is not None:
                told(None)
        outs = active_outputs()
        if outs is not None:                # no output may overwrite a file being measured
            for ck in (*bases, tuned_ck):
                for f in ck.files:
                    outs.protect(f)
                # ... nor any file of the checkpoint's folder: its config.json, params.json or
                # adapter_config.json decide heads, ties and the LoRA scale (an --json over one replaced it
                # and exited 0), and its tokenizer or README belong to the user's model too
                protect_folder(outs, ck)
        if options.cache and hash_files:    # hashed anyway: hashed first, and the cache keys records by it
            with hashing(progress, (*bases, tuned_ck)):
                for ck in (*bases, tuned_ck):
                    if ck.hub is None:
                        ck.digests = {os.path.realpath(p): d for p, d in ck.hash_files().items()}
        the_plan = make_plan(bases, tuned_ck, include=options.include, exclude=options.exclude,
                             rename=options.rename)
        check_adapter_plan(the_plan, bases, tuned_ck)
        for ck in (*bases, tuned_ck):
            the_plan.notes.extend(getattr(ck, "notes", []))
            if hash_files and ck.hub is not None and ck.streamed:
                # --hash cannot hash what was never downloaded: say so, or a memo reads as a checked download
                the_plan.notes.append(f"{escape_name(str(ck.path))}: streamed, so --hash checks nothing: its files' "
                                      "sha256 are the Hub's listing, not a hash of the bytes read (--download "
                                      "hashes them)")
        headless = missing_head(bases, tuned_ck)
        if headless:
            the_plan.notes.append(headless)
        the_plan.sources = [ck.origin for ck in [*bases, tuned_ck] if ck.origin]
        if on_plan is not None:
            on_plan(the_plan)
        # the tensors measured again after the pass, and what the checks before them found: with --cache each
        # record stored as it finishes and the checks' outcome as they end (``Again``); progress by elements
        again = stack.enter_context(closing(Again(options, bases, tuned_ck, progress)))
        expect = getattr(progress, "expect", None)
        if expect is not None:          # a previous run's checks say how much is measured again after the pass
            later = again.expected(the_plan, undo_reorderings)
            if later:
                expect(later)
        records, seconds = (compute or compute_all)(the_plan, bases, tuned_ck, options, backend, classify, progress)
        blocks, modules = aggregate(records, options.thresholds)
        mark_fixed_tables(records, tuned_ck)
        mark_moved_tensors(records, bases, tuned_ck, options.thresholds)
        stage = getattr(progress, "stage", None) or (lambda what: None)
        stage("checking for reparametrisations (units reordered, a rotated residual stream, norms folded, units "
              "rescaled)")
        checks = again.checks(the_plan, records, undo_reorderings,
                              functools.partial(reparametrisations, records, bases, tuned_ck, options,
                                                undo_reorderings, memo=again.fit))
        found, checked, undo, rotation = checks.found, checks.checked, checks.undo, checks.rotation
        gains_folded, rows_seen = checks.gains_folded, checks.rows_seen
        undone: dict = {}
        if undo:                        # measure what changed beneath each reordering, not the reordering itself
            records, undone = measure_undone(records, undo, the_plan, bases, tuned_ck, options, backend, classify,
                                             again)
            again.measured_all()
            blocks, modules = aggregate(records, options.thresholds)
        if "rows_consistent" not in undone and any("rows" in v for v in found.values()):
            # token rows reordered and rows added: nothing undone, but whether the tables follow one remapping
            # is still known from their bitwise rows (else "computes what the base computes" went unchecked)
            consistent = grown_rows_consistent(records, found, rows_seen)
            if consistent is not None:
                undone = {**undone, "rows_consistent": consistent}
        stage("checking for matrices pruned, folded norms and settings")
        pruned = pruned_matrices(records, bases, tuned_ck, undo)
        if pruned:
            undone = {**undone, "pruned": pruned}
        if headless:
            undone = {**undone, "head_missing": headless}
        unmapped = unmapped_gguf([*bases, tuned_ck])
        if unmapped:
            undone = {**undone, "gguf_unmapped": unmapped}
        for key, settings, what in (
                ("gguf_metadata", gguf_settings(bases, tuned_ck), "GGUF metadata that llama.cpp runs the model with "
                                                                  "differs"),
                ("config_settings", config_settings(bases, tuned_ck), "config.json settings that transformers runs the "
                                                                      "model with differ")):
            if settings:
                undone = {**undone, key: settings}
                the_plan.notes.append(f"{what} from the base's: " + "; ".join(
                    f"`{escape_name(k)}` {_shown(b)} in the base, {_shown(t)} in the tuned model" for k, b, t in settings))
        if rotation and undone.get("rotated"):
            undone["rotated"].update(rotation)
            undone["rotated"]["norms_folded"] = folded_norms(records, rotation["gains"], tuned_ck)
            undone["rotated"]["norms_unfolded"] = unfolded_norms(records, tuned_ck, rotation["width"],
                                                                 set(undone["rotated"].get("names") or ()))
        if undone.get("folded"):
            ones = folded_norms(records, sorted({u.gain_name for u in gains_folded if u.gain_name}), tuned_ck)
            smoothed = smoothed_norms(records, gains_folded, set(ones), bases, tuned_ck)
            # (a LayerNorm's bias divided with its weight is measured beneath the fold, not counted as a norm)
            weights = [n for n in smoothed if not n.endswith(".bias")]
            undone["folded"]["norms_folded"] = ones + weights
            undone["folded"]["norms_smoothed"] = weights
            undone["folded"]["biases_smoothed"] = [n for n in smoothed if n.endswith(".bias")]
        explained = set((undone.get("rotated") or {}).get("norms_folded") or ()) \
            | set((undone.get("folded") or {}).get("norms_folded") or ()) \
            | set((undone.get("folded") or {}).get("biases_smoothed") or ())
        if explained:
            # a norm whose gains went into the matrices that read it is measured beneath the fold too: as stored,
            # each read as a change of relative size ~0.1, and every block of a model rotated after one block was
            # trained read changed, the untouched ones most
            records = measure_folded_norms(records, explained, the_plan, bases, tuned_ck, options, backend, classify,
                                           again)
            blocks, modules = aggregate(records, options.thresholds)
        stage(None)
        summary = summarise(records, blocks, options.thresholds, buffers=the_plan.buffers,
                            declared={"bases": [declared(b) for b in bases], "tuned": declared(tuned_ck)},
                            reordering=(found, checked, undone), folded=the_plan.folded,
                            pruned=the_plan.pruned)
        if line is not None:
            line.close()
        for ck in (*bases, tuned_ck):
            ck.check_identity()             # the numbers describe the files located, unchanged
        with hashing(progress if hash_files else None, (*bases, tuned_ck)):
            base_desc = [_labelled(describe(b, hash_files), lab) for b, lab in zip(bases, base_labels)]
            tuned_desc = _labelled(describe(tuned_ck, hash_files), tuned_label)
        run = {"date": date, "seconds": round(seconds, 3), "command": command, "versions": versions(),
               "threads": options.threads}
        hub_reads = hub_run([*bases, tuned_ck])
        if hub_reads:
            run["hub"] = hub_reads
    result = Comparison(
        settings=options.settings(), base=base_desc, tuned=tuned_desc, plan=the_plan.to_dict(),
        summary=summary, modules=modules, blocks=blocks, tensors=records,
        run=run)
    # the headers, the pairs and the name caches are not needed to explain: free them first
    # (a 100,000-tensor checkpoint holds tens of MB in each)
    del bases, tuned_ck, the_plan, records
    clear_name_caches()
    return explain(result)


@dataclass
class Checks:
    """What the checks after the pass found (``reparametrisations``): ``found``/``checked`` of ``permuted_units``
    (token rows matched beneath a rotation added), every ``Undo`` (``gains_folded``: those of ``folded_gains``,
    also in ``undo``), what ``rotated_residual`` showed (``rotation``, its ``rows_reordered`` taken into ``found``)
    and the bitwise row sources of reordered token tables (``rows_seen``)."""

    found: dict
    checked: list
    undo: list
    rotation: dict
    gains_folded: list
    rows_seen: dict


def reparametrisations(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                       options: CompareOptions, undo_reorderings: bool = True,
                       memo: Callable[[dict, Callable[[], Any]], Any] | None = None) -> Checks:
    """The checks after the pass, in order: units reordered (``permuted_units``; their undos dropped without
    ``undo_reorderings``), matrices stored times -1, a rotated residual stream, norm gains folded alone (when
    nothing is rotated), units rescaled (beneath a reordering too). ``memo``: where the rotation's fits are kept
    (``Again.fit``)."""
    undo: list[Undo] = []
    rows_seen: dict = {}
    found, checked = permuted_units(records, bases, tuned, options, undo, rows_seen)
    if not undo_reorderings:
        undo = []
    # a matrix stored times -1 is measured against the base times -1 whatever the option: as stored
    # it reads as far from the base as another model's (cosine -1), which it is not
    undo.extend(negated_matrices(records, bases, tuned, options, {id(u.record) for u in undo}))
    # a rotated residual stream likewise (QuaRot, SpinQuant, a permuted hidden dimension): as stored, every
    # matrix reads as another model's
    turned, rotation = rotated_residual(records, bases, tuned, options, {id(u.record) for u in undo}, memo)
    undo.extend(turned)
    for label, kinds in rotation.pop("rows_reordered", {}).items():     # token rows matched beneath it
        found.setdefault(label, []).extend(k for k in kinds if k not in found.get(label, []))
    # a norm's gains folded into the matrices that read it, nothing rotated (QuaRot's first step alone)
    gains_folded = [] if turned else folded_gains(records, bases, tuned, {id(u.record) for u in undo})
    undo.extend(gains_folded)
    # rows or columns each the base's times a factor (a scale moved between two matrices, units' signs flipped)
    # (after a reordering too: tools that reorder neurons also flip or rescale them)
    undo.extend(rescaled_units(records, bases, tuned, options, {id(u.record) for u in undo}, undo))
    return Checks(found, checked, undo, rotation, gains_folded, rows_seen)


def _encode_checks(checks: Checks, records: Sequence[TensorRecord]) -> tuple[dict, dict]:
    """(JSON outcome, arrays) of ``checks`` for ``RecordCache.put_outcome``: each undo's record by its position in
    ``records`` (and its name, checked when read back), each array once by a name of its own (a rotation shared by
    every matrix it turns is stored once)."""
    import numpy as np

    pos = {id(r): i for i, r in enumerate(records)}
    arrays: dict = {}
    names: dict[int, str] = {}

    def ref(a: Any) -> str | None:
        if a is None:
            return None
        k = names.get(id(a))
        if k is None:
            k = names[id(a)] = f"a{len(arrays)}"
            arrays[k] = np.asarray(a)
        return k
    folded = {id(u) for u in checks.gains_folded}
    undo = [{"record": pos[id(u.record)], "name": u.record.name, "source": u.source, "axis": u.axis,
             "index": ref(u.index), "label": u.label, "kind": u.kind, "note": u.note, "trimmed": bool(u.trimmed),
             "negate": bool(u.negate),
             "rotate": None if u.rotate is None else [u.rotate[0], ref(u.rotate[1]), ref(u.rotate[2])],
             "gain_name": u.gain_name, "outputs": u.outputs, "folded": id(u) in folded,
             "elements": int(u.record.numel or 0)} for u in checks.undo]
    return ({"found": checks.found, "checked": checks.checked, "rotation": checks.rotation, "undo": undo,
             "rows_seen": {k: ref(v) for k, v in checks.rows_seen.items()}}, arrays)


def _decode_checks(outcome: dict, arrays: dict, records: Sequence[TensorRecord], bases: Sequence[Checkpoint]) -> Checks:
    """The ``Checks`` that ``_encode_checks`` stored, bound to this run's ``records``; ValueError unless every part
    is of its type and fits: records by position with their names, sources that the base holds, orders of integers
    within the source's units, rotations square and gains vectors of floats."""
    import numpy as np

    from .measure.spill import keep

    def strs(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def arr(k: Any, kind: str, ndim: int | None = None) -> Any:
        if k is None:
            return None
        a = arrays.get(k) if isinstance(k, str) else None
        if a is None or a.dtype.kind not in kind or (ndim is not None and a.ndim != ndim):
            raise ValueError("array")
        return a
    found, checked, rotation = outcome.get("found"), outcome.get("checked"), outcome.get("rotation")
    if not isinstance(found, dict) or not all(isinstance(k, str) and strs(v) for k, v in found.items()) \
            or not strs(checked) or not isinstance(rotation, dict):
        raise ValueError("found")
    if rotation and (not isinstance(rotation.get("width"), int) or not strs(rotation.get("gains"))):
        raise ValueError("rotation")
    rows_seen = outcome.get("rows_seen")
    if not isinstance(rows_seen, dict):
        raise ValueError("rows_seen")
    rows_seen = {k: arr(v, "iu", 1) for k, v in rows_seen.items()}
    undo, folded = [], []
    spilled: dict = {}      # a rotation read back, as its fit left it: one object for the matrices it turns, and over
    #                         ``spill.SPILL_BYTES`` in a temporary file (``spill.keep``)
    for d in outcome.get("undo") or ():
        i = d["record"]
        if not isinstance(i, int) or not 0 <= i < len(records) or records[i].name != d["name"]:
            raise ValueError("record")
        r = records[i]
        if r.base_name is None or not 0 <= r.base_index < len(bases):
            raise ValueError("base")
        src = bases[r.base_index].tensors.get(d["source"]) if isinstance(d["source"], str) else None
        if src is None or d["axis"] not in (None, 0, 1) or (d["axis"] is not None and d["axis"] >= len(src.shape)):
            raise ValueError("source")
        index = arr(d["index"], "iu", 1)
        if index is not None and index.size and d["axis"] is not None \
                and (int(index.min()) < 0 or int(index.max()) >= int(src.shape[d["axis"]])):
            raise ValueError("index")
        rotate = d["rotate"]
        if rotate is not None:
            if not isinstance(rotate, list) or len(rotate) != 3 or rotate[0] not in ("in", "out", "rows"):
                raise ValueError("rotate")
            r_, g = arr(rotate[1], "f", 2), arr(rotate[2], "f", 1)
            if r_ is not None and r_.shape[0] != r_.shape[1]:
                raise ValueError("rotation")
            if r_ is not None and rotate[1] not in spilled:
                spilled[rotate[1]] = keep(np.asarray(r_, np.float64))
            rotate = (rotate[0], None if r_ is None else spilled[rotate[1]], g)
        for k in ("label", "kind", "note"):
            if not isinstance(d[k], str):
                raise ValueError(k)
        if not all(isinstance(d[k], bool) for k in ("trimmed", "negate", "folded")) \
                or not isinstance(d["gain_name"], (str, type(None))) or d["outputs"] not in (None, True, False):
            raise ValueError("flags")
        u = Undo(r, d["source"], d["axis"], index, d["label"], d["kind"], d["note"], trimmed=d["trimmed"],
                 negate=d["negate"], rotate=rotate, gain_name=d["gain_name"], outputs=d["outputs"])
        undo.append(u)
        if d["folded"]:
            folded.append(u)
    return Checks({k: list(v) for k, v in found.items()}, list(checked), undo, rotation, folded,
                  {k: np.asarray(v) for k, v in rows_seen.items()})


def permuted_units(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                   options: CompareOptions, undo: list[Undo] | None = None,
                   rows_seen: dict | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """(block -> the module kinds whose units are the base's in another order, the ``block kind`` labels
    whose attention heads were examined). A kind that looks unrelated (alone, or with the rest of its
    block) is first checked for a reordering (``measure.permutation``): MLP neurons as provenance finds
    them, each member matrix related once the order is undone; attention heads by their q/o and k/v rows;
    a layer's experts with its router rows following them. A reordering changes nothing the model
    computes, so such a block must not read as another model's. Once one block shows a reordering of a
    kind, every changed block of that kind is checked too. Reads those modules' matrices again; nothing
    when no kind is suspect (the usual case). ``undo`` receives, for each tensor of a reordering found
    whose order is known exactly, how to see its base tensor in the tuned model's order (``Undo``;
    ``measure_undone`` measures them so); ``rows_seen`` the bitwise row sources of reordered token tables
    (``_reordered``), kept for ``grown_rows_consistent``."""
    from .judge.relatedness import is_expert_name, kind_rows, split_suspects

    suspects = split_suspects(records, options.thresholds)
    if not suspects:
        return {}, []
    by_name = {r.name: r for r in records}
    found: dict[str, list[str]] = {}
    checked: list[str] = []

    def look(label: str, kind: str, rows: list) -> None:
        # dense tensors on both sides only (not an adapter's factors, not a transposed or quantized pair);
        # an embedding's or head's rows may be fewer or more than the base's (a vocabulary trimmed)
        pairs = [r for r in rows if r.base_name is not None
                 and r.status in (("changed", "unchanged", "rounding") + (("resized",) if kind == "rows" else ()))
                 and r.compared == "float" and not getattr(r, "tied", False)
                 and not (r.note or "").startswith("paired by content") and r.name in tuned.tensors
                 and r.base_name in bases[r.base_index].tensors
                 and (tuple(tuned.tensors[r.name].shape) == tuple(bases[r.base_index].tensors[r.base_name].shape)
                      or (kind == "rows" and len(tuned.tensors[r.name].shape) == 2
                          and tuple(tuned.tensors[r.name].shape)[1:] == tuple(bases[r.base_index].tensors[r.base_name].shape)[1:]))]
        for i in sorted({r.base_index for r in pairs}):
            stray: list = []
            mine: list[Undo] = []
            hit = _reordered(kind, [r for r in pairs if r.base_index == i], bases[i], tuned, stray, mine, rows_seen)
            if stray:
                found.setdefault(label, []).append("router")
            if kind == "attn" and hit is not None:
                checked.append(f"{label} attn")
            if hit:
                found.setdefault(label, []).append(kind)
                if undo is not None:
                    undo.extend(replace(u, label=label) for u in _with_biases(mine, by_name, bases[i], tuned))
                return

    for label, kinds in suspects.items():
        for kind, rows in kinds.items():
            look(label, kind, rows)
    if found:                        # a reordering in one block: the same kind elsewhere may be reordered
        seen = {(label, k) for label, kinds in suspects.items() for k in kinds}
        hit_kinds = {("mlp" if k == "experts" else k) for v in found.values() for k in v}
        for label, kinds in kind_rows(records).items():
            for kind, rows in kinds.items():
                if kind in hit_kinds and (label, kind) not in seen and (label, "experts") not in seen:
                    look(label, "experts" if any(is_expert_name(r.name) for r in rows) else kind, rows)
    return found, checked


@dataclass(frozen=True)
class Undo:
    """One tensor of a reordering found: its base tensor seen in the tuned model's order is base
    ``source``'s units ``index`` along ``axis`` (``axis`` None: ``source`` as stored, another expert's
    tensor). ``label``/``kind``: the block and module kind of ``scope.permuted_units``; ``note``: what
    the record says was done; ``trimmed``: a token table with fewer rows than the base's."""

    record: TensorRecord
    source: str
    axis: int | None
    index: object
    label: str
    kind: str
    note: str
    trimmed: bool = False
    negate: bool = False            # the tuned tensor is the base's times -1 (``negated_matrices``)
    rotate: tuple | None = None     # (form, R, gains or None): the base's in a rotated residual stream
    gain_name: str | None = None    # the base norm whose gains ``rotate`` folds in
    # the units reordered are this tensor's outputs (a q or gate row, a token row), so its bias is indexed by them;
    # False: its inputs (an o or down column), its bias by the hidden size; None: not known (``_with_biases``)
    outputs: bool | None = None


def mark_fixed_tables(records: Sequence[TensorRecord], tuned: Checkpoint) -> None:
    """Note each bitwise-unchanged position table that is a fixed sinusoid (``judge.relatedness.FIXED_NOTE``):
    Whisper's encoder, Marian's and other sinusoidal position tables are computed from a formula, the same
    in every model of that shape, trained or not, so being equal says nothing of where a model comes from
    (two independently initialised Whisper models read PARTIAL, "shared: embeddings", on that table alone).
    Reads only such tables (position embeddings, unchanged, at most 64 MB)."""
    import numpy as np

    from .judge.relatedness import FIXED_NOTE, is_sinusoid_table
    from .kernels.dtypes import decode

    for r in records:
        if r.module != "embed.pos" or r.status != "unchanged" or r.compared != "float" or len(r.shape or ()) != 2:
            continue
        info = tuned.tensors.get(r.name)
        if info is None or getattr(info, "nbytes", 1 << 62) > 64 << 20:
            continue
        table = decode(np.asarray(tuned.read(r.name)).reshape(-1), info.dtype).reshape(tuple(r.shape))
        if is_sinusoid_table(table, info.dtype):
            r.note = FIXED_NOTE + (f"; {r.note}" if r.note else "")


def mark_moved_tensors(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                       thresholds) -> None:
    """Note each changed float matrix that looks unrelated to its base counterpart (|cosine| below
    ``unrelated_cosine``) and is, bit for bit, another tensor of that base of its shape and dtype
    (``records.MOVED_NOTE``): matrices shuffled between layers or swapped (q and k) read "unrelated to it, as
    independent initialisations", a block at a time, for a model whose every weight is the base's. A candidate
    must first have the tuned norm another record gives that base tensor (the same bits give the same sums), so
    two independent models read nothing more; only such a pair is compared byte for byte, window by window."""
    cut = thresholds.unrelated_cosine
    suspects = [r for r in records if r.status == "changed" and r.compared == "float" and r.cosine is not None
                and abs(r.cosine) < cut and len(r.shape or ()) >= 2 and r.dtype_base == r.dtype_tuned
                and r.base_name is not None and r.norm_tuned and not r.tied]
    if not suspects:
        return
    from .measure.compute import _same_bytes
    from .records import MOVED_NOTE

    by_norm: dict = {}
    for r in records:
        if r.base_name is not None and r.norm_base and r.compared == "float" and r.base_shape:
            by_norm.setdefault((r.base_index, tuple(r.base_shape), r.dtype_base, r.norm_base), []).append(r.base_name)
    for r in suspects:
        base = bases[r.base_index]
        for other in by_norm.get((r.base_index, tuple(r.shape), r.dtype_tuned, r.norm_tuned), ()):
            if other != r.base_name and not getattr(base, "quant", None) and not getattr(tuned, "quant", None) \
                    and other in base.tensors and r.name in tuned.tensors \
                    and _same_bytes(base, other, tuned, r.name, None, 1 << 22):
                r.note = (f"{MOVED_NOTE}: the base's `{escape_name(other)}`, under this name (moved or swapped), so "
                          "it is no evidence against the base" + (f"; {r.note}" if r.note else ""))
                break


#: what a negated tensor's record says was done before it was measured
NEGATED_NOTE = ("stored with its sign flipped: its cosine with the base is strongly negative (below "
                "-unrelated_cosine), the base's tensor times -1 and whatever changed beside, so it is measured "
                "against the base times -1")


def negated_matrices(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                     options: CompareOptions, skip: set[int] = frozenset()) -> list[Undo]:
    """The ``Undo`` of each paired float matrix stored times -1: its cosine with the base is below
    -``unrelated_cosine`` (independent initialisations give a cosine near 0, a fine-tune near +1, so a
    strongly negative one is the base's matrix negated, and whatever changed beside), and the bias of
    such a matrix when it is negated too. Flipping the sign of a matrix and of the one that reads its
    output (v and o, up and down of a gated MLP) changes nothing the model computes; as stored, the
    matrix reads as far from the base as another model's (relative change 2, cosine -1), a verdict of
    unrelated for a model that computes exactly what its base computes. Read nothing: the cosine is the
    record's. ``skip``: records another undo already measures (a reordering)."""
    from .judge.relatedness import negation_cut
    from .measure.compute import NEGATABLE

    by_name = {r.name: r for r in records}

    def fits(r: TensorRecord) -> bool:
        return (id(r) not in skip and r.base_name is not None and r.status == "changed" and r.compared == "float"
                and r.cosine is not None and math.isfinite(r.cosine)
                and r.cosine < -negation_cut(options.thresholds, r.numel_compared)
                and not getattr(r, "tied", False) and r.paired_by in ("name", "prefix", "rename", None)
                and _same_dense(r, bases, tuned, NEGATABLE))

    out: list[Undo] = []
    for r in records:
        if len(r.shape or ()) < 2 or not fits(r):
            continue
        label, kind = r.block or component_of(r.name), str(r.module or "")
        out.append(Undo(r, r.base_name, None, None, label, kind, NEGATED_NOTE, negate=True))
        if r.name.endswith(".weight"):
            b = by_name.get(r.name[:-len("weight")] + "bias")
            if b is not None and len(b.shape or ()) == 1 and fits(b):
                out.append(Undo(b, b.base_name, None, None, label, kind, NEGATED_NOTE, negate=True))
    return out


def _vector(ck: Checkpoint, name: str):
    """A stored vector's values (float32 where that is exact), flat."""
    from .measure.rotation import values

    return values(ck, name).reshape(-1)


def _best_gain(base: Checkpoint, bname: str, tuned: Checkpoint, tname: str, r,
               candidates: Sequence[tuple[str, object]], upto: int | None = None, order=None) -> tuple[str, object] | None:
    """Of (base norm name, its gains) ``candidates``, the one whose gains folded into the base matrix's columns
    (then ``r``, None: no rotation) bring it closest to the tuned matrix, when one brings it closer than the base
    alone; else None. In row blocks (``measure.rotation.frame_sums``); ``upto``/``order``: a table's shared rows."""
    from .measure import rotation as rot

    if not candidates:
        return None
    frames = [rot.Frame(base, bname, "in", r, None, order)] + \
        [rot.Frame(base, bname, "in", r, g, order) for _, g in candidates]
    best = _closest(rot.frame_sums(frames, tuned, tname, upto=upto).cosines())
    return None if best is None else candidates[best - 1]


def _closest(cos: Sequence[float]) -> int | None:
    """The index (from 1) of the largest of ``cos[1:]`` (the first on ties) when it exceeds ``cos[0]`` (the frame
    with no candidate), else None.

    >>> _closest([0.5, 0.4, 0.9, 0.9]), _closest([0.5, 0.5])
    (2, None)
    """
    if len(cos) < 2:
        return None
    best = max(range(1, len(cos)), key=lambda i: (cos[i], -i))
    return best if cos[best] > cos[0] else None


ROTATED_NOTE = ("the residual stream is rotated: measured against the base's tensor times the orthogonal matrix "
                "fitted on the embedding and the output matrices")


#: bytes of the embedding's d x d cross sums ``rotated_residual`` keeps between the fits that use them
E_CROSS_KEPT = 128 << 20


def rotated_residual(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                     options: CompareOptions, skip: set[int] = frozenset(),
                     memo: Callable[[dict, Callable[[], Any]], Any] | None = None) -> tuple[list[Undo], dict]:
    """The ``Undo`` of every tensor of a model whose residual stream was rotated (``measure.rotation``: QuaRot,
    SpinQuant, a permuted hidden dimension), and what the fit showed (``fit``: the held-out matrices and their
    pooled cosine; ``gains``: the base norm gains folded into the matrices that read them). Tried only when the
    token embedding is no closer to the base's than a weak relation (cosine below ``weak_cosine``) and some
    output matrix is not either: the usual comparison reads nothing here. R is fitted on the embedding and the
    output matrices of every other block and must hold on the rest (pooled cosine at least ``weak_cosine``,
    each held-out matrix above chance, 6/sqrt(elements)); two independent models never pass that.

    Token tables of another height (``resized``: rows appended by ``resize_token_embeddings``, or trimmed) take
    part through their shared rows, the first ones, which the resized pair compares: R is fitted on them and they
    are measured in the rotated frame, the added rows counted as added rows (a rotated release with special tokens
    added read UNRELATED: the embedding, needed at the base's shape, disabled the test). A head the tuned model
    stores beside a base that ties it is paired with the base's embedding (``paired_by`` ``tied``): that is the
    head the base computes with, so it is measured in the rotated frame like any reader of the residual stream,
    with the final norm's gains folded in where that fits better (QuaRot unties a tied head so; measured as
    stored it read "head unrelated"). ``memo(material, fit)``: where each fit is kept (``Again.fit``)."""
    import numpy as np

    from .judge.relatedness import MARGINS
    from .measure import rotation as rot
    from .measure.compute import NEGATABLE
    from .pairing.names import parse_name

    weak = MARGINS["weak_cosine"]
    if len(bases) != 1:
        return [], {}
    base = bases[0]

    def table(r: TensorRecord) -> bool:
        """A token table of another height whose shared rows are compared (rows added or trimmed)."""
        return (r.status == "resized" and r.module in ("embed", "lm_head") and len(r.shape or ()) == 2
                and len(r.base_shape or ()) == 2 and r.shape[1:] == r.base_shape[1:])

    def dense(r: TensorRecord) -> bool:
        # (a matrix holding NaN or infinity on either side fits no rotation: its cross sums are not finite)
        return (id(r) not in skip and r.base_name is not None and r.compared == "float" and not (r.nonfinite or 0)
                and (r.status in ("changed", "unchanged", "rounding") or table(r)) and not getattr(r, "tied", False)
                and (r.paired_by in ("name", "prefix", "rename", None) or (r.paired_by == "tied" and r.module == "lm_head"))
                and _same_dense(r, bases, tuned, NEGATABLE, rows=table(r)))

    mats = [r for r in records if len(r.shape or ()) == 2 and dense(r)]
    emb = [r for r in mats if r.module == "embed"]
    if not emb or any(".c_attn." in r.name for r in mats):      # (GPT-2's Conv1D stores its linears transposed)
        return [], {}
    e = emb[0]
    d = int(e.shape[1])
    outs = [r for r in mats if r.module in rot.OUT_KINDS and int(r.shape[0]) == d]
    ins = [r for r in mats if r.module in rot.IN_KINDS and int(r.shape[1]) == d and r is not e]
    if e.cosine is None or e.cosine >= weak or not outs or all((r.cosine or 0.0) >= weak for r in outs):
        return [], {}
    # a pre-test before the d x d fit (at the 70B width 30-40 minutes and two 512 MB arrays, which every independent
    # model paid): a rotated writer's columns keep their inner products (R^T B: B's), an independent model's share
    # nothing with the base's. Up to four output matrices, spread over the blocks, 256 columns each; the fit runs when
    # any of them correlates beyond six times chance (a rotated model that a fine-tune moved far still does)
    probe = sorted(outs, key=lambda r: r.name)
    probe = probe[::max(1, len(probe) // 4)][:4]
    k = min(rot.SAMPLE_ROWS, min(int(r.shape[1]) for r in probe))
    chance = 6.0 / math.sqrt(max(1, k * (k - 1) // 2))
    if all((c := rot.column_gram_correlation(base, r.base_name, tuned, r.name)) is not None and c < chance
           for r in probe):
        return [], {}

    rows_order: dict = {}           # id(table) -> the base row of each of its first rows, matched beneath R

    def shared_rows(r: TensorRecord) -> tuple[int | None, tuple | None]:
        """(rows of the tuned tensor compared, the base's order): a resized table's shared rows only (the first ones
        on both sides), or the base's rows in the order matched beneath R against the table's first rows."""
        if id(r) in rows_order:
            idx = rows_order[id(r)]
            return len(idx), (0, idx)
        return (min(int(r.shape[0]), int(r.base_shape[0])), None) if table(r) else (None, None)

    with_e = [True]                 # the embedding's (shared) rows in the fit
    e_sums: list = []               # (B^T T, ||B||, ||T||) of the embedding's shared rows, computed once

    def e_fit(into: np.ndarray | None = None) -> tuple:
        """The embedding's ``in_cross``: kept up to ``E_CROSS_KEPT`` bytes (d = 4096), else computed again where asked
        (at d = 8192 a kept copy is 512 MB beside the fit's two d x d arrays; computing it again costs vocabulary x
        d^2 products a time, a few percent of what the fit's output matrices cost). ``into``: a fit's sums, added to
        in place when nothing is kept (no d x d array of the embedding's own)."""
        if e_sums:
            if into is not None:
                into += e_sums[0]
            return tuple(e_sums)
        upto, order = shared_rows(e)
        keep = 8 * d * d <= E_CROSS_KEPT
        got = rot.in_cross(base, e.base_name, tuned, e.name, upto, None if order is None else order[1],
                           into=None if keep else into)
        if keep:
            e_sums.extend(got)
            if into is not None:
                into += got[0]
        return got

    def out_cosine(r: TensorRecord, r_: np.ndarray) -> float:
        """Cosine of R^T B with T: trace(R^T B T^T) / (||B|| ||T||), R orthogonal, summed block by block as the
        cross sums are made (``out_inner``: no d x d array beside R)."""
        s, nb, nt = rot.out_inner(base, r.base_name, tuned, r.name, r_)
        return max(-1.0, min(1.0, s / (nb * nt))) if nb and nt else 0.0

    def e_cosine(r_: np.ndarray) -> float:
        """The embedding's cosine with the base's rotated by ``r_``: trace(R^T B^T T) / (||B|| ||T||), R orthogonal;
        from the kept sums, else from the embedding's blocks (``in_inner``: no d x d array beside R)."""
        if 8 * d * d <= E_CROSS_KEPT:
            c, nb, nt = e_fit()
            s = rot.inner(r_, c)
        else:
            upto, order = shared_rows(e)
            s, nb, nt = rot.in_inner(base, e.base_name, tuned, e.name, r_, upto, None if order is None else order[1])
        return max(-1.0, min(1.0, s / (nb * nt))) if nb and nt else 0.0

    def fitted(rows: list):
        """R fitted on the embedding (when ``with_e``) and the output matrices ``rows``: each matrix's cross sums
        added into the fit's one d x d array as they are made (``Rotation.sums``), then R in its place; callers drop
        the R they held first. At most R and the fit's sums are d x d at once, and the polar iteration's inverse beside
        them, which waits in a temporary file beyond ``spill.SPILL_BYTES`` (``spill.stash_for``: 537 MB at d = 8,192)."""
        def solve():
            fit = rot.Rotation(d)
            if with_e[0]:
                e_fit(into=fit.sums())
            for r in rows:
                rot.out_cross(base, r.base_name, tuned, r.name, into=fit.sums())
            return fit.solve()
        if memo is None:
            return solve()
        # kept by the caller (``Again.fit``: with --cache, a run killed during the checks resumes past its fits),
        # named by what it was fitted on: the pairs (the files are the checks' key's), the embedding's shared rows
        upto, order = shared_rows(e)
        material = {"width": d, "matrices": sorted([r.base_name, r.name] for r in rows),
                    "embedding": [e.base_name, e.name, upto, None if order is None else __import__("hashlib").sha256(
                        np.ascontiguousarray(order[1], np.int64).tobytes()).hexdigest()] if with_e[0] else None}
        return memo(material, solve)

    labels = sorted({r.block for r in outs}, key=lambda b: (parse_name(f"{b}.x")[1] or 0, str(b)))
    if len(labels) > 1:             # every other block fits, the rest is held out
        train = {id(r) for r in outs if r.block in set(labels[0::2])}
    else:
        # one block: its first output matrix fits beside the embedding and the others are held out (the embedding
        # alone leaves R undetermined where the vocabulary is narrower than the width: a one-block model of 16
        # tokens, 128 wide, rotated and nothing else, read UNRELATED)
        ordered = sorted(outs, key=lambda r: r.name)
        train = {id(ordered[0])} if len(ordered) > 1 else set()
    held = [r for r in outs if id(r) not in train]

    # R must explain held-out output matrices, each far better than no rotation does (a fine-tune never rotated,
    # with a new embedding, fitted an R under which its held-out matrices kept a cosine of 0.69, against 0.9998
    # as stored), on at least half of them (one block retrained after the rotation must not veto it)
    def explained(r: TensorRecord, rr) -> float | None:
        c = out_cosine(r, rr)
        n = float(r.numel_compared or r.numel or 1)
        stored = r.cosine if r.cosine is not None and math.isfinite(r.cosine) else 0.0
        return c if c >= weak and c > 6.0 / math.sqrt(n) and c > stored + 0.1 else None

    def attempt():
        r_fit = fitted([r for r in outs if id(r) in train])
        if r_fit is None or rot.small_rotation(r_fit):
            return None
        good = [(r, c) for r in held if (c := explained(r, r_fit)) is not None]
        return None if not held or 2 * len(good) < len(held) else (r_fit, good)

    got = attempt()
    if train and (got is None or e_cosine(got[0]) < weak):
        # the embedding's (first) rows are not the base's rows rotated (ids remapped, then tokens added): they fail
        # the fit or skew it (a table so remapped left every output matrix "changed" beneath R). R from the output
        # matrices alone, which no vocabulary touches, held out as ever; the embedding is then measured against
        # the rotated base as it is (its rows read changed), and the model does not read as unrelated
        with_e[0] = False
        bare = attempt()
        if bare is not None or got is None:
            got = bare
        else:
            with_e[0] = True
        del bare
    if got is None:
        return [], {}
    r_fit, good = got
    # refitted on the embedding and every output matrix R explains (not on one retrained after the rotation,
    # which would skew it: every other matrix then read 1.8% changed)
    kept = {id(g) for g, _ in good}
    fitting = [r for r in outs if id(r) in kept or (id(r) in train and explained(r, r_fit) is not None)]
    del got, r_fit                  # (d x d each: at most one R and the sums of the next are held at once)
    r_all = fitted(fitting)
    if r_all is None:               # sums that are not finite (values whose products overflow): no rotation
        return [], {}
    # and once more on those it fits best (1 - cosine within ten times the best's): two matrices fine-tuned after
    # the rotation pulled R enough that every untouched one read 1.8% changed
    gaps = {id(r): 1.0 - out_cosine(r, r_all) for r in fitting}
    floor = max(min(gaps.values()), 1e-12) if gaps else 0.0
    best = [r for r in fitting if gaps[id(r)] <= 10.0 * floor]
    # the embedding likewise: one fine-tuned after the rotation (relative 1e-2) pulled R so that every untouched
    # matrix read changed (30 of 39 tensors, in 4 of 4 blocks); left out of the fit when it fits far worse
    drop_e = with_e[0] and len(best) >= 2 and 1.0 - e_cosine(r_all) > 10.0 * floor
    if drop_e or (best and len(best) < len(fitting)):
        if drop_e:
            with_e[0] = False
        fitting = best or fitting
        r_all = None
        r_all = fitted(fitting)
        if r_all is None:
            return [], {}
    # R as the measurements beneath it read it: over ``spill.SPILL_BYTES`` (d > 5,792) in a temporary file, read back
    # in panels, so that it is not in memory beside the 8,192-wide Gram matrix of each tensor measured beneath it
    # (at the 70B width the two took the path to 1.7 GB)
    from .measure.spill import elementwise, keep, times

    r_all = keep(r_all)
    num = sum(float(r.numel_compared or r.numel or 1) * c for r, c in good)
    den = sum(float(r.numel_compared or r.numel or 1) for r, _ in good)
    # the gains a norm folded into the matrices that read it: the base's norm vectors of the hidden width
    gains: dict = {}
    for r in records:
        if r.module == "norm" and r.base_name is not None and list(r.base_shape or ()) == [d] \
                and base.tensors[r.base_name].dtype in NEGATABLE:
            gains.setdefault(r.block, []).append(r.base_name)
    out: list[Undo] = []
    used: set = set()
    by_name = {r.name: r for r in records}
    if not with_e[0]:
        # the embedding left out of the fit: its rows (and the head's) matched to the base's rows rotated by cosine,
        # every match unambiguous (``measure.rowmatch``), so that a table whose ids were remapped is measured
        # against the rows it holds (its first rows: tokens added are appended); with no such order it is measured
        # as stored, its rows read changed
        from .measure.rowmatch import RowTable, match_rows

        def rotated_rows(name: str, idx: np.ndarray) -> np.ndarray:
            # the base's rows ``idx`` in the rotated frame (rows times R), float32: never the whole table
            return times(rot.rows_of(base, name, 0, len(idx), idx), r_all).astype(np.float32)

        for r in [e, *ins]:
            if r.module in ("embed", "lm_head"):
                k = min(int(base.tensors[r.base_name].shape[0]), int(tuned.tensors[r.name].shape[0]))
                t = RowTable.stored(tuned, r.name, k)
                b = RowTable((int(base.tensors[r.base_name].shape[0]), d),
                             lambda idx, name=r.base_name: rotated_rows(name, idx), np.float32)
                m = match_rows(t, b, tuned.tensors[r.name].dtype, "F32")
                # (each row its own: no remapping, the table fine-tuned after the rotation, measured as it stands)
                if m.order is not None and not np.array_equal(np.asarray(m.order), np.arange(len(m.order))):
                    rows_order[id(r)] = np.asarray(m.order, np.int64)
    for r in [e, *outs, *ins]:
        form = "out" if r in outs else "in"
        gain = g = None
        if form == "in" and r.module not in ("embed", "embed.pos"):
            upto, order = shared_rows(r)
            found = _best_gain(base, r.base_name, tuned, r.name, r_all,
                               [(n, _vector(base, n)) for n in gains.get(r.block, []) + gains.get(None, [])],
                               upto, order)
            if found is not None:
                gain, g = found
                used.add(gain)
        label, kind = r.block or component_of(r.name), str(r.module or "")
        note = (ROTATED_NOTE if with_e[0] else ROTATED_NOTE.replace("the embedding and the output matrices",
                                                                    "the output matrices alone")) + (f", with the base's `{escape_name(gain)}` folded into its columns" if gain else "") \
            + (" (the base ties its head to this embedding: this model stores the head untied)"
               if r.paired_by == "tied" else "") \
            + (f" (its {min(r.shape[0], r.base_shape[0]):,} shared rows; rows added or removed are not compared)"
               if table(r) and id(r) not in rows_order else "")
        idx = rows_order.get(id(r))
        if idx is not None:             # its rows the base's in another order, beneath the rotation
            moved = int(np.count_nonzero(idx != np.arange(len(idx))))
            note += (f"; compared with the base's token rows in this model's order ({moved:,} of {len(idx):,} rows "
                     "from another index, matched by cosine beneath the rotation, every match unambiguous)")
            out.append(Undo(r, r.base_name, 0, idx, label, "rows", note, trimmed=len(idx) < int(r.base_shape[0]),
                            rotate=(form, r_all, g), gain_name=gain))
            continue
        out.append(Undo(r, r.base_name, None, None, label, kind, note, rotate=(form, r_all, g), gain_name=gain))
        if form == "out" and r.name.endswith(".weight"):
            bias = by_name.get(r.name[:-len("weight")] + "bias")
            if bias is not None and list(bias.shape or ()) == [d] and dense(bias):
                out.append(Undo(bias, bias.base_name, None, None, label, kind, ROTATED_NOTE, rotate=("out", r_all, None)))
    # a permuted hidden dimension (R a permutation, signs allowed) permutes every norm's gains with it: measured so

    if rot.signed_permutation(r_all):
        perm_abs = elementwise(np.abs, r_all)
        for r in records:
            if r.module == "norm" and len(r.shape or ()) == 1 and int(r.shape[0]) == d and r.base_name is not None \
                    and r.status != "unchanged" and id(r) not in skip and dense(r):
                out.append(Undo(r, r.base_name, None, None, r.block or component_of(r.name), "norm", ROTATED_NOTE,
                                rotate=("out", perm_abs, None)))
    untied = any(u.record.paired_by == "tied" for u in out)      # a head stored beside a base that ties it
    return out, {"width": d, "fit": {"matrices_held_out": len(held), "matrices_explained": len(good),
                         "cosine_held_out": num / den, "matrices_fitted": int(with_e[0]) + len(fitting),
                         "matrices_out": len(outs)}, "gains": sorted(used), **({"head_untied": True} if untied else {}),
                 **({} if with_e[0] else {"embedding_fitted": False}),
                 **({"rows_reordered": {u.label: ["rows"] for u in out if u.kind == "rows"}} if rows_order else {})}


FOLD_NOTE = "measured against the base's matrix with the gains of the base's `{}` folded into its columns"


def folded_gains(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                 skip: set[int] = frozenset()) -> list[Undo]:
    """The ``Undo`` of each matrix that reads a norm whose gains were folded into it, wholly or in part: the
    tuned norm the base's divided by a factor per channel and the matrix the base's times those factors column by
    column. All ones is QuaRot's first step (the factors are the base's gains); SmoothQuant (and llm-compressor's
    AWQ) divide each norm by a smoothing scale per channel and multiply the next matrices' columns by it before
    quantizing. Either changes nothing the model computes, and read "a fine-tune, dense" (SmoothQuant W8A8 read
    "changed far more than a fine-tune changes it"). Each changed matrix that reads the residual stream is
    measured against the base times the factors of whichever changed norm of its block (or the model's final
    norm) brings it closest, when one brings it closer than the stored base; a quantized matrix (the base stored
    whole) too, its noise floor then tested against the base so scaled. Nothing when no norm differs from the
    base's by a factor per channel."""
    import numpy as np

    from .measure import rotation as rot
    from .measure.compute import NEGATABLE

    if len(bases) != 1:
        return []
    base = bases[0]
    # Gemma applies its norms as 1 + w and stores w: the gains are 1 + w on both sides (dividing the stored w by a
    # scale is no smoothing, and read "nothing changed ... computes what the base computes")
    offset = 1.0 if all(_gemma(ck) for ck in (base, tuned)) else 0.0
    if offset == 0.0 and any(_gemma(ck) for ck in (base, tuned)):
        return []                       # one side Gemma, the other not: no gain is known on both
    ratios: dict = {}
    for r in records:
        if r.module == "norm" and r.status == "changed" and len(r.shape or ()) == 1 and r.base_name is not None \
                and not r.name.endswith(".bias") and r.name in tuned.tensors \
                and tuned.tensors[r.name].dtype in NEGATABLE and base.tensors[r.base_name].dtype in NEGATABLE:
            # (a LayerNorm's gains are its weight; its bias divided with it is checked in ``smoothed_norms``)
            t = _vector(tuned, r.name).astype(np.float64) + offset
            b = _vector(base, r.base_name).astype(np.float64) + offset
            if np.all(t == 1.0) and not offset:
                ratios.setdefault(r.block, []).append((r, b))
            elif np.all(np.isfinite(t) & np.isfinite(b) & (t != 0)):
                ratios.setdefault(r.block, []).append((r, b / t))
    if not ratios:
        return []
    out: list[Undo] = []
    for r in records:
        if id(r) in skip or r.status != "changed" or r.compared != "float" or len(r.shape or ()) != 2 \
                or r.module not in rot.IN_KINDS or r.module in ("embed", "embed.pos") or r.base_name is None \
                or getattr(r, "tied", False) or not (_same_dense(r, bases, tuned, NEGATABLE)
                                                     or _quantized_over_dense(r, base, tuned)):
            continue
        # the norms that may feed it: its block's (the final norm only the head's), of the matrix's family when
        # the norm's name says which it feeds (input_layernorm the attention, post_attention_layernorm the MLP)
        family = str(r.module).split(".")[0]
        norms = [(n, g) for n, g in ratios.get(r.block, []) if int(n.shape[0]) == int(r.shape[1])
                 and _norm_feeds(n.name) in (None, family)]
        if not norms:
            continue
        cands = [(n.base_name, g) for n, g in norms]
        frames = [rot.Frame(base, r.base_name)] + [rot.Frame(base, r.base_name, "in", None, g) for _, g in cands]
        # a sample of rows first (every row carries a fold's factors): a matrix whose change no candidate begins to
        # explain there (a full fine-tune that trained its norms: every block's) is not read again whole, which
        # doubled the bytes read and held two float64 copies of each matrix (1.6 GB for a 7B-shaped pair)
        rows = rot.sample_rows(frames[0].rows)
        if len(rows) < frames[0].rows and not _fold_may_explain(rot.frame_sums(frames, tuned, r.name, rows)):
            continue
        sums = rot.frame_sums(frames, tuned, r.name)
        cos = sums.cosines()
        best_i = _closest(cos)
        if best_i is None:
            continue
        best = cands[best_i - 1]
        # the factors must explain the difference, not nudge it: most of 1 - cosine goes (a fine-tune then
        # pruned came closer to a base scaled by any norm's ratio, its zeros costing less, and read "folded")
        # (on the kept elements when the tuned matrix holds zeros the base does not: a fold then pruned is explained
        # on them, its zeros are ``pruned_matrices``' to find beneath the fold)
        kept = sums.cosines(kept=True) if sums.zeros_tuned > sums.zeros_base else cos
        stored, folded = 1.0 - kept[0], 1.0 - kept[best_i]
        if not folded <= FOLD_EXPLAINS * stored:
            continue
        label, kind = r.block or component_of(r.name), str(r.module or "")
        out.append(Undo(r, r.base_name, None, None, label, kind, FOLD_NOTE.format(escape_name(best[0])),
                        rotate=("in", None, best[1]), gain_name=best[0]))
    return out


def _fold_may_explain(sums) -> bool:
    """Whether, on a sample of rows (``measure.rotation.frame_sums``), some candidate's factors take at least a tenth
    of 1 - cosine away (the whole matrix must lose three quarters: ``FOLD_EXPLAINS``); a sample where nothing
    changed leaves the question to the whole matrix only when no candidate moves it either."""
    kept = sums.cosines(kept=True) if sums.zeros_tuned > sums.zeros_base else sums.cosines()
    stored = 1.0 - kept[0]
    return any(1.0 - c <= 0.9 * stored for c in kept[1:])


#: a norm's factors fold into a matrix only when 1 - cosine with the base so scaled is at most this share of 1 -
#: cosine as stored: smoothing or folding leaves the rounding (or the fine-tune beneath it: 1e-3 of it at least
#: in the tests), a fine-tune pruned then scaled by some norm's ratio kept 99%
FOLD_EXPLAINS = 0.25

_FEEDS = (("attn", ("input_layernorm", "ln_1", "attention_norm", "self_attn_layer_norm", "attn_norm", "norm1",
                    "ln_attn", "input_norm")),
          ("mlp", ("post_attention_layernorm", "ln_2", "ffn_norm", "final_layer_norm", "norm2", "ln_mlp",
                   "pre_feedforward_layernorm", "post_attention_norm")))


def _norm_feeds(name: str) -> str | None:
    """The module family (``attn``, ``mlp``) a block norm feeds, from its name; None when the name does not say.

    >>> _norm_feeds("model.layers.3.input_layernorm.weight"), _norm_feeds("h.0.ln_2.weight"), _norm_feeds("x.norm.weight")
    ('attn', 'mlp', None)
    """
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    for family, names in _FEEDS:
        if leaf in names:
            return family
    return None


def _gemma(ck: Checkpoint) -> bool:
    """Whether ``ck``'s config.json names a Gemma model (its norms stored as w, applied as 1 + w)."""
    from .io.model_config import config_of

    try:
        cfg = config_of(ck)
    except (CheckpointError, OSError):
        return False
    return isinstance(cfg, dict) and str(cfg.get("model_type") or "").lower().startswith(("gemma", "recurrent_gemma"))


def _quantized_over_dense(r: TensorRecord, base: Checkpoint, tuned: Checkpoint) -> bool:
    """The tuned tensor of ``r`` quantized (dequantized by the reader, its noise floor known) and the base's stored
    whole in a float dtype, of one shape: the floor test can run against the base seen otherwise."""
    from .measure.compute import NEGATABLE

    t, b = tuned.tensors.get(r.name), base.tensors.get(r.base_name)
    return (t is not None and b is not None and getattr(t, "quant", None) is not None
            and getattr(b, "quant", None) is None and b.dtype in NEGATABLE and tuple(t.shape) == tuple(b.shape)
            and getattr(tuned, "adapter", None) is None)


RESCALED_NOTE = ("each {} the base's times its own factor (from {} to {}{}), and `{}` scaled inversely: measured "
                 "against the base so scaled")

#: (the matrix whose rows are units, the matrix whose columns read them): a factor moved from one to the other
#: changes nothing a gated MLP (or v and o) computes
_UNIT_PAIRS = (("mlp.up", "mlp.down"), ("attn.v", "attn.o"))


def rescaled_units(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                   options: CompareOptions, skip: set[int] = frozenset(), done: Sequence[Undo] = ()) -> list[Undo]:
    """The ``Undo`` of each pair of changed matrices of one block where the first's rows (up, v) are the base's each
    times its own factor and the second's columns (down, o) the base's each divided by it, within the rounding of
    the tuned dtype: a scale moved from one matrix to the next, or units' signs flipped one by one (factors of
    -1), which leaves what a gated MLP (and attention's v and o) computes unchanged (an MLP with no gate only
    when its config names ReLU and every factor is positive); as stored such a model read
    "a fine-tune, dense" (and with signs flipped, "neurons reordered"). A matrix rescaled alone is a change (a
    DoRA magnitude trained, a matrix times 1.01) and reads as one. Read only in blocks where some matrix is
    unchanged (moving a scale leaves the rest alone), for changes not certified low-rank (a merged LoRA).

    ``done``: the undos found before; a pair whose units were reordered (MLP neurons, attention heads: an ``Undo``
    gathering the base's rows or columns) is compared with the base in that order, and its ``Undo`` then does both
    (a model whose neurons were reordered and flipped read "a fine-tune" with up and down far from the base).

    Grouped-query attention (``_group_map``): o has more columns than v has rows, each query head of a group reading
    its key-value head's rows, so column j of o reads v's row ((j // head_dim) // group) head_dim + j % head_dim and
    o's column factors must be the inverse of v's row factors through that map (every current Llama, Mistral and
    Qwen is so; paired one to one only, such a rescale, AWQ's v->o scale, read "a fine-tune, dense")."""
    import numpy as np

    from .judge.relatedness import _low_rank_row
    from .kernels.dtypes import DTYPES
    from .measure import rotation as rot
    from .measure.compute import NEGATABLE

    if len(bases) != 1:
        return []
    base = bases[0]
    blocks: dict = {}
    for r in records:
        if r.block is not None and len(r.shape or ()) == 2 and r.base_name is not None and r.compared == "float" \
                and not getattr(r, "tied", False):
            blocks.setdefault(r.block, []).append(r)
    # the reorderings found: the base's units gathered in the tuned model's order, nothing else undone
    by_name = {r.name: r for r in records}
    orders = {id(u.record): u for u in done if u.axis is not None and u.index is not None and not u.negate
              and u.rotate is None and u.source == u.record.base_name and u.kind in ("mlp", "attn")}

    def factors(r: TensorRecord, axis: int):
        """The factor of each row (axis 1) or column (axis 0) when the tuned matrix is the base's so scaled within
        rounding, none of them zero (a unit set to zero is pruned, not rescaled), else None."""
        tol = 2.0 ** -((DTYPES[tuned.tensors[r.name].dtype].mant_bits or 0) + 1)
        o = orders.get(id(r))
        frame = rot.Frame(base, r.base_name, "in", order=None if o is None else (o.axis, o.index))

        def fitted(rows=None, c=None):
            """(factors, sum of squared residuals, sum of t^2) over ``rows`` (all: in blocks); ``c`` the column
            factors to take (axis 0: found in a first pass over the same rows)."""
            spans = frame.blocks() if rows is None else [(0, len(rows))]
            res = tt = 0.0
            tb = np.zeros(frame.cols) if axis == 0 else None
            bb = np.zeros(frame.cols) if axis == 0 else None
            per_row = []
            for lo, hi in spans:
                b = frame.block(lo, hi) if rows is None else frame.block(0, 0, rows)
                t = rot.rows_of(tuned, r.name, lo, hi) if rows is None else \
                    rot.rows_of(tuned, r.name, 0, len(rows), rows)
                tt += float(np.vdot(t, t))
                if axis == 1:
                    den = np.einsum("ij,ij->i", b, b)
                    cb = np.where(den > 0, np.einsum("ij,ij->i", t, b) / np.where(den > 0, den, 1.0), 1.0)
                    per_row.append(cb)
                    res += float(np.sum((t - b * cb[:, None]) ** 2))
                elif c is None:
                    tb += np.einsum("ij,ij->j", t, b)
                    bb += np.einsum("ij,ij->j", b, b)
                else:
                    res += float(np.sum((t - b * c[None, :]) ** 2))
            if axis == 1:
                return np.concatenate(per_row) if per_row else np.zeros(0), res, tt
            if c is None:
                c = np.where(bb > 0, tb / np.where(bb > 0, bb, 1.0), 1.0)
                return fitted(rows, c)
            return c, res, tt

        # a sample of rows first: every element of a rescaled matrix is the base's times its factor within rounding,
        # so a sample that is not (a fine-tune of the MLP alone: every block's up and down) ends it before the
        # whole matrices are read again (they were decoded whole in float64, several copies: GBs at 70B widths)
        rows = rot.sample_rows(frame.rows)
        if len(rows) < frame.rows:
            _, res, tt = fitted(rows)
            if not tt or math.sqrt(res) > 2.0 * tol * math.sqrt(tt):
                return None, tol
        c, res, tt = fitted()
        nt = math.sqrt(tt)
        if not nt or math.sqrt(res) > tol * nt or np.any(c == 0) or np.allclose(c, 1.0, rtol=tol):
            return None, tol
        return c, tol

    @functools.lru_cache(maxsize=1)
    def relu() -> bool:
        """Whether both models' config.json name ReLU as their MLP's activation (positively homogeneous): the base's
        too, or a config switched to relu beside a GELU base passed for a rescale of the base's GELU units."""
        from .io.model_config import config_of

        def says(ck) -> bool:
            try:
                cfg = config_of(ck)
            except (CheckpointError, OSError):
                return False
            cfg = cfg if isinstance(cfg, dict) else {}
            return any(str(cfg.get(k) or "").lower() == "relu"
                       for k in ("hidden_act", "activation_function", "hidden_activation"))

        return says(tuned) and says(base)

    out: list[Undo] = []
    for label, mats in blocks.items():
        # (or reordered: what changed beneath the reordering is not known yet, and such a block is read anyway)
        if not any(r.status in ("unchanged", "rounding") or id(r) in orders for r in mats):
            continue
        by_kind = {}
        for r in mats:
            by_kind.setdefault(r.module, []).append(r)
        for rows_kind, cols_kind in _UNIT_PAIRS:
            if len(by_kind.get(rows_kind, ())) != 1 or len(by_kind.get(cols_kind, ())) != 1:
                continue
            a, z = by_kind[rows_kind][0], by_kind[cols_kind][0]
            # (GPT-2's Conv1D stores [in, out]: its rows are not units; such a pair is not read here)
            if any((id(r) in skip and id(r) not in orders) or r.status != "changed" or _low_rank_row(r, options.thresholds)
                   or r.name.endswith(("c_fc.weight", "c_proj.weight", "c_attn.weight"))
                   or not _same_dense(r, bases, tuned, NEGATABLE) for r in (a, z)) \
                    or (int(a.shape[0]) != int(z.shape[1])
                        and not (rows_kind == "attn.v" and int(z.shape[1]) % int(a.shape[0]) == 0)):
                continue
            ca, tol_a = factors(a, 1)
            if ca is None:
                continue
            if rows_kind == "mlp.up" and "mlp.gate" not in by_kind and not (relu() and bool(np.all(ca > 0))):
                # an MLP with no gate applies its activation to up's output: GELU(c x) / c is not GELU(x), a ReLU's
                # only for c > 0; moving the scale changed what it computes
                continue
            cz, tol_z = factors(z, 0)
            if cz is None:
                continue
            # inversely: within the rounding bound itself (a pair scaled alike by 1.5%, what weight decay leaves
            # on v and o, passed a bound of eight times it in bf16); through the group map under grouped-query heads
            group = _group_map(int(a.shape[0]), int(z.shape[1]), tuned,
                               lambda idx: bool(np.allclose(ca[idx] * cz, 1.0, rtol=0.0, atol=max(tol_a, tol_z))))
            if group is None:
                continue
            # the bias of the scaled rows is scaled with them, or the units compute something else (fc1's, v's, a
            # Llama mlp_bias up's left as it was read "nothing changed", the logits 0.02-0.07 away)
            bias = _scaled_bias(a, ca, by_name, base, tuned, orders)
            if bias is False:
                continue
            for r, c, what, other, form in ((a, ca, "row", z.name, "rows"), (z, cz, "column", a.name, "in")):
                neg = int(np.count_nonzero(c < 0))
                note = RESCALED_NOTE.format(what, f"{c.min():.4g}", f"{c.max():.4g}",
                                            f"; {neg:,} negative" if neg else "", escape_name(other))
                if group[1]:
                    told = "" if group[2] else ", the only one that fits: no config.json gives it"
                    note += (f" (grouped-query heads: head size {group[0]}{told}, {group[1]} query heads reading "
                             "each key-value head's rows)")
                if id(r) in orders:         # reordered, then rescaled: gathered in that order, then scaled
                    o = orders[id(r)]
                    out.append(replace(o, note=f"{o.note}; {note}", rotate=(form, None, c)))
                else:
                    out.append(Undo(r, r.base_name, None, None, label, str(r.module or ""), note,
                                    rotate=(form, None, c)))
            if bias is not None:            # scaled with its rows: measured so (it read changed)
                note = f"scaled with the rows of `{escape_name(a.name)}`: measured against the base's so scaled"
                o = orders.get(id(bias))
                out.append(replace(o, note=f"{o.note}; {note}", rotate=("rows", None, ca)) if o is not None else
                           Undo(bias, bias.base_name, None, None, label, str(bias.module or ""), note,
                                rotate=("rows", None, ca)))
    return out


def _scaled_bias(a: TensorRecord, c, by_name: dict, base: Checkpoint, tuned: Checkpoint, orders: dict):
    """The bias record of matrix ``a`` when each of its values is the base's (in the reordered units' order, where
    they were reordered) times the factor ``c`` of its row, within the rounding of its dtype; None when ``a`` has no
    bias or it needs no measuring again (unchanged: all zero); False when it is not so scaled."""
    import numpy as np

    if not a.name.endswith(".weight"):
        return None
    rb = by_name.get(a.name[:-len("weight")] + "bias")
    if rb is None or rb.base_name is None or rb.name not in tuned.tensors or rb.base_name not in base.tensors:
        return None
    tb, bb = _vector(tuned, rb.name).astype(np.float64), _vector(base, rb.base_name).astype(np.float64)
    if id(rb) in orders:
        bb = bb[np.asarray(orders[id(rb)].index, np.int64)]
    if tb.shape != bb.shape or tb.shape != np.shape(c):
        return False
    if not _within_ulps(tb, bb * np.asarray(c, np.float64), tuned.tensors[rb.name].dtype):
        return False
    return rb if rb.status == "changed" or id(rb) in orders else None


def _within_ulps(t, want, dtype: str, ulps: float = 1.0) -> bool:
    """Whether every value of ``t`` (stored as ``dtype``) is ``want`` within ``ulps`` roundings of that dtype
    (2^-(mantissa bits + 1) relative each, of the larger of the two)."""
    import numpy as np

    from .kernels.dtypes import DTYPES

    tol = ulps * 2.0 ** -((DTYPES[dtype].mant_bits or 0) + 1)
    return bool(np.all(np.abs(t - want) <= tol * (np.abs(want) + np.abs(t)) + 1e-30))


def _group_map(rows: int, cols: int, tuned: Checkpoint, fits) -> tuple[int, int, bool] | None:
    """(head size, query heads per key-value head, whether config.json gave the head size; (0, 0, False) when one to
    one) under which column j of o reads v's row ((j // head) // group) head + j % head (transformers'
    ``repeat_kv``: query head h reads key-value head h // group) and ``fits(index)`` holds for that index of v's
    row per o column; None when none does or the head size is not known. One to one (``rows == cols``) needs no
    head size. Else the head size is the config's (``head_dim``, or ``hidden_size // num_attention_heads``) when it
    agrees with the shapes; without one, every divisor of ``rows`` is tried and taken only when exactly one fits
    (two that fit would leave the model's own map unknown; the note then says the head size was inferred).

    >>> _group_map(4, 8, None, lambda idx: list(idx) == [0, 1, 0, 1, 2, 3, 2, 3])
    (2, 2, False)
    """
    import numpy as np

    if rows == cols:
        return (0, 0, False) if fits(np.arange(cols)) else None
    group = cols // rows
    j = np.arange(cols)

    def index(head: int):
        return ((j // head) // group) * head + j % head

    head = None
    try:
        from .io.model_config import config_of

        cfg = config_of(tuned) if tuned is not None else None
    except (CheckpointError, OSError):
        cfg = None
    if isinstance(cfg, dict):
        heads = cfg.get("num_attention_heads")
        head = cfg.get("head_dim") or (cfg.get("hidden_size") // heads if isinstance(cfg.get("hidden_size"), int)
                                       and isinstance(heads, int) and heads > 0 else None)
        if not isinstance(head, int) or head <= 0 or rows % head or cols % head:
            head = None
    if head is not None:
        return (head, group, True) if fits(index(head)) else None
    found = [h for h in range(1, rows + 1) if rows % h == 0 and fits(index(h))]
    return (found[0], group, False) if len(found) == 1 else None


def pruned_matrices(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                    undo: Sequence[Undo] = ()) -> dict:
    """The changed float matrices that are the base's with some elements set to zero and every other element
    exactly the base's (magnitude or 2:4 pruning, heads zeroed in place, no training): ``names``, ``elements``
    (set to zero) and ``elements_in`` (of those matrices). As stored they read "a fine-tune, dense". Only the
    records whose norms fit it are read again: the delta is then minus the pruned values, orthogonal to the kept
    ones, so ||base||^2 = ||tuned||^2 + ||delta||^2 and cosine = ||tuned|| / ||base||; the elements decide.

    A matrix measured beneath a rotation or a fold (an ``undo`` entry with ``rotate``) is pruned when it is the base
    in that frame with elements set to exactly zero and the kept ones within the rotation's rounding bound
    (``_rotation_bound``, on their norm): the rotated base is float64 values that no stored element holds bitwise,
    so the bitwise test of the kept elements never held and a model rotated, then pruned, read "a fine-tune"; the
    norm identities are tested to that bound too. ``beneath``: how many were found so."""
    import numpy as np

    from .measure.compute import NEGATABLE
    from .measure.rotation import RotatedSide, values

    from .kernels.dtypes import DTYPES
    from .kernels.reference import round_to

    framed = {u.record.name: u for u in undo if u.rotate is not None}
    names, zeroed, total, beneath = [], 0, 0, 0
    for r in records:
        nb, nt, nd, c = r.norm_base, r.norm_tuned, r.norm_delta, r.cosine
        cast = r.dtype_base != r.dtype_tuned
        u = framed.get(r.name)
        # the base in the undone frame, float64, when the record was measured so (a rotation, a fold, a rescale)
        bound = _rotation_bound(r.dtype_tuned, None if u is None or u.rotate[1] is None
                                else int(u.rotate[1].shape[0])) if u is not None else None
        # pruned then cast (a bf16 copy of a pruned f32 model): the identities hold to the cast's rounding
        tol = 4.0 * 2.0 ** -(DTYPES[r.dtype_tuned].mant_bits or 0) if cast and r.dtype_tuned in DTYPES else 1e-7
        if u is not None:
            if bound is None:
                continue
            tol = max(tol, 4.0 * bound)           # the kept elements within the rotation's rounding, not bitwise
        if r.status != "changed" or r.compared != "float" or len(r.shape or ()) != 2 or r.base_name is None \
                or getattr(r, "tied", False) or None in (nb, nt, nd, c) \
                or not all(math.isfinite(x) for x in (nb, nt, nd, c)) or not (nb > 0 and nt > 0 and nd > 0) \
                or abs(nb * nb - nt * nt - nd * nd) > tol * nb * nb or abs(c - nt / nb) > tol \
                or not _same_dense(r, bases, tuned, NEGATABLE):
            continue
        t = values(tuned, r.name)
        if u is not None:
            side = RotatedSide(bases[r.base_index], r.base_name, u.source, *u.rotate,
                               order=None if u.axis is None else (u.axis, u.index))
            ref = side.read(r.base_name).reshape(t.shape)
            held = t != 0
            k = int(np.count_nonzero(~held & (ref != 0)))
            gap = float(np.linalg.norm(t[held].astype(np.float64) - ref[held]))
            if not k or gap > bound * float(np.linalg.norm(ref)):
                continue
            names.append(r.name)
            zeroed, total, beneath = zeroed + k, total + t.size, beneath + 1
            r.note = (f"pruned: {k:,} of {t.size:,} elements set to zero, every other element the base's "
                      f"{'in the rotated frame' if u.rotate[1] is not None else 'so scaled'}, within rounding "
                      f"(relative {gap / max(float(np.linalg.norm(ref)), 1e-300):.2g}, the bound {bound:.2g})"
                      + (f"; {r.note}" if r.note else ""))
            continue
        b = values(bases[r.base_index], r.base_name)
        if t.shape != b.shape:
            continue
        kept = np.asarray(round_to(b.astype(np.float64).ravel(), r.dtype_tuned)).reshape(b.shape) if cast else b
        if not bool(((t == kept) | (t == 0)).all()):
            continue
        k = int(np.count_nonzero((t == 0) & (kept != 0)))
        names.append(r.name)
        zeroed, total = zeroed + k, total + t.size
        r.note = (f"pruned: {k:,} of {t.size:,} elements set to zero, every other element exactly the base's"
                  + (f" cast to {r.dtype_tuned}" if cast else "") + (f"; {r.note}" if r.note else ""))
    out = {"names": names, "elements": zeroed, "elements_in": total} if names else {}
    if beneath:
        out["beneath"] = beneath
    return out


FOLDED_NOTE = "its gains folded into the matrices that read it (all ones here, the base's gains in those matrices)"


def folded_norms(records: Sequence[TensorRecord], gains: Sequence[str], tuned: Checkpoint) -> list[str]:
    """The tuned norms whose base gains ``rotated_residual`` found folded into the matrices that read them and
    that hold all ones (what folding leaves): noted on their records, named for ``scope.rotated_residual``."""
    import numpy as np

    out = []
    for r in records:
        if r.module != "norm" or r.base_name not in gains or r.status != "changed" or r.name not in tuned.tensors:
            continue
        if np.all(_vector(tuned, r.name) == 1.0):
            r.note = FOLDED_NOTE + (f"; {r.note}" if r.note else "")
            out.append(r.name)
    return out


def measure_folded_norms(records: list[TensorRecord], names: set[str], the_plan: Plan, bases: Sequence[Checkpoint],
                         tuned: Checkpoint, options: CompareOptions, backend, classify,
                         again: Again | None = None) -> list[TensorRecord]:
    """The records with each norm of ``names`` (its gains found in the matrices that read it: ``folded_norms``,
    ``smoothed_norms``) measured against the base's gains divided by the factors those matrices carry, which are
    the tuned norm's own values within the rounding of its dtype: it reads ``rounding`` (or unchanged) beneath the
    fold, its note saying why, instead of a change of the size of the gains' spread. ``again``: the cache and
    progress of these measurements (``Again``: keyed by the factors' digest and the record's note)."""
    import numpy as np

    from .measure.compute import remeasure, remeasured_pair, streamed
    from .measure.rotation import RotatedSide

    if again is None:
        again = Again(replace(options, cache=None), bases, tuned)
    pairs = {p.tuned_name: p for p in the_plan.pairs if p.tuned_name is not None}
    jobs: dict[int, tuple] = {}         # id(record) -> (pair, side, factors, the pair as measured again)
    for r in records:
        pair = pairs.get(r.name)
        if r.name not in names or pair is None or pair.base_name != r.base_name or len(bases) != 1:
            continue
        # a LayerNorm's bias divided with its weight: the weight's factors (its own would match anything)
        src = r.name[:-len("bias")] + "weight" if r.name.endswith(".bias") else r.name
        bsrc = next((x.base_name for x in records if x.name == src), None)
        if bsrc is None or src not in tuned.tensors or bsrc not in bases[0].tensors:
            continue
        t, b = _vector(tuned, src).astype(np.float64), _vector(bases[0], bsrc).astype(np.float64)
        if t.shape != b.shape or int(np.prod(r.shape or (0,))) != t.size \
                or not np.all(np.isfinite(t) & np.isfinite(b) & (b != 0)):
            continue
        factors = t / b
        side = RotatedSide(bases[0], pair.base_name, pair.base_name, "rows", None, factors)
        jobs[id(r)] = (pair, side, factors, replace(remeasured_pair(pair, side), dtype_base=r.dtype_base))
    if not jobs:
        return list(records)
    again.begin(f"measuring {len(jobs):,} norms again beneath the gains folded",
                sum(streamed(j[3]) for j in jobs.values()))

    def measured(r: TensorRecord, pair: Any, side: Any, on_window: Callable[[int], None]) -> TensorRecord:
        new = remeasure(pair, side, bases, tuned, options, backend, classify, on_window)
        new.dtype_base = r.dtype_base
        new.note = r.note
        _within_rotation_rounding(new, what="fold")
        return new

    out = []
    for r in records:
        job = jobs.pop(id(r), None)
        if job is None:
            out.append(r)
            continue
        pair, side, factors, expected = job
        out.append(again.record(
            pair, expected,
            lambda: {"undo": "measure_folded_norms", "factors": again.array_id(factors), "note": r.note,
                     "record": {"dtype_base": r.dtype_base}},
            lambda on_window: measured(r, pair, side, on_window)))
        side.release()
    return out


SMOOTHED_NOTE = ("its gains the base's divided by a factor per channel that the matrices reading it carry in their "
                 "columns (smoothing scales, as SmoothQuant and AWQ move them before quantizing): what it computes "
                 "with them is the base's")


def smoothed_norms(records: Sequence[TensorRecord], gains_folded: Sequence[Undo], skip: set = frozenset(),
                   bases: Sequence[Checkpoint] = (), tuned: Checkpoint | None = None) -> list[str]:
    """The tuned norms (not all ones: ``skip`` holds those) whose ratio to the base's gains ``folded_gains`` found
    in the columns of the matrices that read them: noted on their records and named. Every matrix of the block of
    the kinds that took the ratio (attention's q, k, v; the MLP's gate and up) must have taken it (q scaled, k and v
    left as they were, computes something else), and one of them must measure, so scaled, as the base's within
    rounding or its quantization floor (the others may have changed beneath the scaling: a fine-tune, then
    smoothed)."""
    import numpy as np

    from .kernels.dtypes import DTYPES
    from .measure import rotation as rot

    status = {r.name: r.status for r in records}
    gains = {u.gain_name: np.asarray(u.rotate[2], np.float64) for u in gains_folded if u.gain_name}
    readers: dict[str, set[str]] = {}
    for name, g in gains.items():
        # a matrix took this norm's ratio when its factors are that ratio within the norm's rounding (two norms
        # divided by one scale give ratios equal up to it, and either may have been picked)
        tol = 2.0 * 2.0 ** -(DTYPES[r_dtype].mant_bits or 0) if (r_dtype := _dtype_of(records, name)) else 0.0
        readers[name] = {u.record.name for u in gains_folded if u.gain_name and (
            u.gain_name == name or (u.rotate[2].shape == g.shape
                                    and np.allclose(np.asarray(u.rotate[2], np.float64), g, rtol=tol, atol=0.0)))}
    by_block: dict = {}
    for r in records:
        if len(r.shape or ()) == 2 and r.module in rot.IN_KINDS and r.module not in ("embed", "embed.pos") \
                and r.base_name is not None and not getattr(r, "tied", False):
            by_block.setdefault(r.block, []).append(r)
    out = []
    for r in records:
        if r.module != "norm" or r.status != "changed" or r.name in skip or r.base_name not in readers:
            continue
        took = readers[r.base_name]
        families = {str(m.module).split(".")[0] for m in by_block.get(r.block, []) if m.name in took}
        peers = [m.name for m in by_block.get(r.block, []) if str(m.module).split(".")[0] in families
                 and int(m.shape[1]) == int(r.shape[0])]
        if set(peers) <= took and any(status.get(n) in ("unchanged", "rounding", "quantized") for n in took):
            bias = _norm_bias(records, r, bases, tuned)
            if bias is False:
                continue                # a LayerNorm whose weight was divided and its bias not: something else
            r.note = SMOOTHED_NOTE + (f"; {r.note}" if r.note else "")
            out.append(r.name)
            if bias is not None:        # divided with it (SmoothQuant divides both): measured beneath the fold too
                bias.note = SMOOTHED_NOTE + (f"; {bias.note}" if bias.note else "")
                out.append(bias.name)
    return out


def _norm_bias(records: Sequence[TensorRecord], norm: TensorRecord, bases: Sequence[Checkpoint],
               tuned: Checkpoint | None):
    """The bias record beside LayerNorm weight ``norm`` when it is the base's divided by the weight's factors within
    the rounding of its dtype (SmoothQuant divides a LayerNorm's weight and bias alike: only then does the norm
    compute the base's output over the scales); None when the norm has no bias, or its bias did not change with
    none to divide (all zero); False when the bias is not so divided (left as it was: the model computes
    something else)."""
    import numpy as np

    if not norm.name.endswith(".weight") or tuned is None or len(bases) != 1:
        return None
    name = norm.name[:-len("weight")] + "bias"
    rb = next((x for x in records if x.name == name and x.base_name is not None), None)
    if rb is None or rb.name not in tuned.tensors or rb.base_name not in bases[0].tensors:
        return None
    tw, bw = _vector(tuned, norm.name).astype(np.float64), _vector(bases[0], norm.base_name).astype(np.float64)
    tb, bb = _vector(tuned, rb.name).astype(np.float64), _vector(bases[0], rb.base_name).astype(np.float64)
    if tb.shape != bb.shape or bw.shape != bb.shape or not np.all(bw != 0):
        return False
    # (two roundings: the weight's ratio and the bias itself)
    if not _within_ulps(tb, bb * (tw / bw), tuned.tensors[rb.name].dtype, 2.0):
        return False
    return rb if rb.status == "changed" else None


def _dtype_of(records: Sequence[TensorRecord], base_name: str) -> str | None:
    """The tuned dtype of the record paired with base tensor ``base_name``."""
    return next((r.dtype_tuned for r in records if r.base_name == base_name and r.dtype_tuned), None)


def unfolded_norms(records: Sequence[TensorRecord], tuned: Checkpoint, d: int, moved: set = frozenset()) -> list[str]:
    """The tuned model's norms of the residual width whose gains differ from channel to channel: in a rotated
    residual stream such a norm scales rotated coordinates, so the model does not compute what the base computes
    (QuaRot folds every gain first; a tied head cannot take the final norm's). A norm measured in the frame of a
    permuted hidden dimension (``moved``) that reads unchanged there was permuted with it, as it must be. Names."""
    import numpy as np

    out = []
    for r in records:
        if r.module != "norm" or len(r.shape or ()) != 1 or int(r.shape[0]) != d or r.name not in tuned.tensors \
                or not r.name.endswith("weight") or (r.name in moved and r.status in ("unchanged", "rounding")):
            continue
        v = _vector(tuned, r.name)
        if v.size and not np.all(v == v[0]):
            out.append(r.name)
    return out


#: transformers model classes that hold an LM head
_LM_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")


def unmapped_gguf(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """The ``general.architecture`` of each GGUF compared whose names weightdiff does not map
    (``io.gguf_names.ARCHITECTURES``), in order, once each. llama.cpp's converter may have changed such a
    file's values on the way (Q/K rows permuted for RoPE, norm weights stored as 1 + w) under names
    weightdiff keeps, so the judge does not read what differs as a change (flag ``gguf_unmapped``).
    Empty when every side is a GGUF of one architecture: the same converter wrote both, so its names pair
    and its transforms, applied alike, leave a change a change."""
    gguf = [(ck.metadata or {}).get("general.architecture") for ck in checkpoints if ck.format == "gguf"]
    if len(gguf) == len(checkpoints) and len(set(gguf)) == 1:
        return []          # GGUFs of one architecture on every side: converted alike, paired by llama.cpp's names
    out: list[str] = []
    for ck in checkpoints:
        arch = (ck.metadata or {}).get("gguf.unmapped_architecture") if ck.format == "gguf" else None
        if arch is not None and arch not in out:
            out.append(arch)
    return out


#: GGUF keys that say nothing of how llama.cpp runs the model: provenance, the quantizer's record,
#: weightdiff's own notes, the split layout
_GGUF_INERT = ("general.", "quantize.", "gguf.", "split.")


def _shown(v: str | None) -> str:
    """A metadata value for a note: absent, or its first 40 characters, escaped."""
    if v is None:
        return "absent"
    v = escape_name(str(v))
    return f"`{v}`" if len(v) <= 40 else f"`{v[:40]}...` ({len(v):,} characters)"


def gguf_settings(bases: Sequence[Checkpoint], tuned: Checkpoint) -> list[tuple[str, str | None, str | None]]:
    """The settings llama.cpp runs a GGUF with that differ between a base and the tuned model, as
    ``(key, base value, tuned value)``: every key of the architecture's hyperparameters
    (``llama.rope.freq_base``, ``llama.context_length``, ...) and of the tokenizer
    (``tokenizer.chat_template``, ...) when both are GGUFs; ``rope_theta`` and
    ``max_position_embeddings`` of a config.json against the GGUF's ``rope.freq_base`` and
    ``context_length``, which the converter copies from them. The verdict is of the weights: a
    long-context re-release that changed only the RoPE base is bitwise the base's weights, yet computes
    something else, so the judge says so beside IDENTICAL (flag ``gguf_metadata_differs``). Arrays are
    compared by the summary the reader keeps: a long one by its length and a hash of its bytes, so a
    vocabulary with tokens swapped (or other merges, token types, scores) differs."""
    from .io.model_config import config_of

    if len(bases) != 1 or "gguf" not in (bases[0].format, tuned.format):
        return []
    b, t = bases[0], tuned
    if b.format == t.format == "gguf":
        mb, mt = b.metadata or {}, t.metadata or {}
        keys = sorted(k for k in set(mb) | set(mt) if not k.startswith(_GGUF_INERT))
        return [(k, mb.get(k), mt.get(k)) for k in keys if mb.get(k) != mt.get(k)]
    g, hf = (b, t) if b.format == "gguf" else (t, b)
    arch = (g.metadata or {}).get("general.architecture")
    try:
        doc = config_of(hf)
    except (CheckpointError, OSError):
        return []
    if not isinstance(doc, dict) or not isinstance(arch, str):
        return []
    doc = {**doc, **(doc.get("text_config") if isinstance(doc.get("text_config"), dict) else {})}
    rope = doc.get("rope_theta")
    if rope is None and isinstance(doc.get("rope_parameters"), dict):      # transformers 5
        rope = doc["rope_parameters"].get("rope_theta")
    out = []
    for key, want in ((f"{arch}.rope.freq_base", rope), (f"{arch}.context_length", doc.get("max_position_embeddings"))):
        have = (g.metadata or {}).get(key)
        if have is None or type(want) not in (int, float):
            continue
        try:
            same = math.isclose(float(have), float(want), rel_tol=1e-6)
        except (ValueError, OverflowError):      # a config.json integer past a float's range (10**400)
            same = False
        if not same:
            pair = (key, str(want), have) if g is t else (key, have, str(want))
            out.append(pair)
    return out


def config_settings(bases: Sequence[Checkpoint], tuned: Checkpoint) -> list[tuple[str, str, str]]:
    """The config.json settings transformers runs a model with that differ between a base and the tuned model, both
    with a config.json and neither a GGUF (``gguf_settings`` compares those): ``model_config.settings_differ``, as
    ``(key, base value, tuned value)``. A long-context re-release that changed only ``rope_theta`` or
    ``rope_scaling`` is bitwise the base's weights, yet computes something else (flag ``config_differs``)."""
    from .io.model_config import config_of, settings_differ

    if len(bases) != 1 or "gguf" in (bases[0].format, tuned.format):
        return []
    try:
        b, t = config_of(bases[0]), config_of(tuned)
    except (CheckpointError, OSError):
        return []
    if not isinstance(b, dict) or not isinstance(t, dict):
        return []
    return settings_differ(b, t)


def missing_head(bases: Sequence[Checkpoint], tuned: Checkpoint) -> str | None:
    """The note when the tuned model's config unties its LM head but it stores none, beside a base that has one
    (stored, or tied to its embedding): transformers then initialises that head at random, so the model as loaded
    is not the base's, though every stored tensor may be (it read IDENTICAL). None otherwise."""
    from .io.model_config import config_of, ties_head
    from .pairing.names import is_embedding, is_lm_head

    names = list(tuned.tensors)
    if any(is_lm_head(n) for n in names) or not any(is_embedding(n) for n in names) or len(bases) != 1:
        return None
    if any(k in n for n in names for k in ("score.", "classifier.", "qa_outputs.", "v_head.")):
        return None                          # another head (a reward or classification model): not missing
    tie = ties_head(tuned)
    if tie.ties is not False:
        return None
    try:                                     # a language model's class (an encoder for embeddings has no head)
        doc = config_of(tuned)
    except (CheckpointError, OSError):
        return None
    archs = doc.get("architectures") if isinstance(doc, dict) else None
    if not isinstance(archs, list) or not any(isinstance(a, str) and a.endswith(_LM_CLASSES) for a in archs):
        return None
    base = bases[0]
    if not (any(is_lm_head(n) for n in base.tensors) or ties_head(base).ties is True):
        return None
    return (f"{escape_name(str(tuned.path))}: {tie.why}, but it stores no LM head: transformers initialises that head "
            "at random, so the model as loaded is not the base's whatever its stored tensors are")


def _rotation_bound(dtype: str | None, width: int | None = None) -> float | None:
    """The largest relative change (||tuned - base in the rotated frame|| / ||that base||) that the rounding of a
    rotation can leave in a tensor stored as ``dtype``; None for a dtype without a mantissa.

    Storing float64 values rounds each element once: at most 2^-(m + 1) relative (m mantissa bits), the bound
    with nothing rotated (a gain folded, units rescaled: one product per element). A rotation of width ``width``
    (= n) computes each element as a sum of n products, each product and each partial sum rounded at the
    precision the tool multiplied in: the errors, of random sign, add up to about u sqrt(n / 2) relative to the
    element for sequential summation with unit round-off u (blocked or pairwise BLAS sums leave less), so
    2 u sqrt(n) bounds it with room. A float32 (or narrower) tensor is taken as multiplied in float32 (what a
    float32 matmul does, and a bfloat16 or float16 one accumulates in): u = 2^-24; a float64 one in float64. A
    float32 rotation of width 128, stored as float32, leaves 2.1e-7 (the bound 2^-24 alone read it as a
    fine-tune, "dense"); the bound there is 7.3e-7, and 1.1e-5 at width 8192, so a real change of 1e-4 reads
    changed at every width a model has.
    """
    from .kernels.dtypes import DTYPES

    d = DTYPES.get(dtype or "")
    if d is None or not d.mant_bits:
        return None
    bound = 2.0 ** -(d.mant_bits + 1)
    if width:
        bound += 2.0 * math.sqrt(width) * 2.0 ** -(max(d.mant_bits, 23) + 1)
    return bound


def _within_rotation_rounding(r: TensorRecord, width: int | None = None, what: str = "rotation") -> None:
    """A rotated tensor whose change beneath the rotation is within the rounding of its stored format reads
    ``rounding``: the base in the rotated frame is float64 values, which no stored tensor holds bitwise (a
    float32 or bfloat16 copy of the rotated base differs from them by its rounding, and the fitted R by less).
    The bound (``_rotation_bound``): a relative change of at most 2^-(mantissa bits + 1), twice what rounding to
    nearest leaves, plus, under a rotation of width ``width`` (None: nothing rotated), the round-off of the
    width-n products that computed it. A token table with rows added or removed stays ``resized``: its shared rows
    so within the bound count no element beyond rounding (``frac_beyond_rounding`` 0: element by element, the
    float64 values of a fitted R round to other float32 values in about half the elements), so it reads as a table
    with rows added, as it would unrotated, not as a change."""
    bound = _rotation_bound(r.dtype_tuned, width)
    if r.status not in ("changed", "resized") or bound is None or r.rel_change is None \
            or not math.isfinite(r.rel_change) or r.rel_change > bound \
            or (r.status == "resized" and (r.compared != "float" or not r.numel_compared)):
        return
    from .kernels.dtypes import DTYPES

    m = DTYPES[r.dtype_tuned].mant_bits
    if r.status == "resized":
        r.frac_beyond_rounding = 0.0
    else:
        r.status = "rounding"
    r.rank = None
    r.note = (r.note + "; " if r.note else "") + (
        f"within the rounding of {r.dtype_tuned} (relative change at most 2^-{m + 1}"
        + (f" plus the round-off of a width-{width} product, {bound:.2g} in all" if width else "")
        + f"): beneath the {what} it changed by no more than that")


def _same_dense(r: TensorRecord, bases: Sequence[Checkpoint], tuned: Checkpoint, dtypes: Sequence[str],
                rows: bool = False) -> bool:
    """Both sides of ``r`` stored whole (no adapter factors, no quantized codes) in one of ``dtypes``, of one shape
    (``rows``: of one shape but for the number of rows, a token table resized)."""
    base = bases[r.base_index]
    t, b = tuned.tensors.get(r.name), base.tensors.get(r.base_name)
    return (t is not None and b is not None and t.dtype in dtypes and b.dtype in dtypes
            and (tuple(t.shape) == tuple(b.shape) or (rows and tuple(t.shape)[1:] == tuple(b.shape)[1:]))
            and not getattr(base, "quant", None)
            and not getattr(tuned, "quant", None) and getattr(tuned, "adapter", None) is None)


def _reordered(kind: str, rows: list, base: Checkpoint, tuned: Checkpoint, stray: list,
               undo: list | None = None, rows_seen: dict | None = None) -> bool | None:
    """Whether one block's ``kind`` (``mlp``, ``attn``, ``experts``) is the base's units in another order;
    None when it cannot be checked (a fused qkv in no known layout, no output projection). A layer whose experts were reordered
    but whose router rows were not is appended to ``stray``. ``undo`` receives the ``Undo`` of each
    tensor whose order was found (every member of a reordered MLP, attention or expert layer, the
    router rows that followed; a token table when each of its rows is bitwise a base row). ``rows_seen``
    receives, for a token table whose rows are found bitwise, the base row each of its rows is (-1 for a
    row added): ``rows_consistent`` reads it where rows added leave no order to undo."""
    import numpy as np

    from .judge.relatedness import _EXPERT, is_expert_name
    from .measure.permutation import (_as_float32, detect_permutations, experts_permuted, fused_qkv_sources,
                                      fused_qkv_views, heads_order, member_sources, members_follow_stored,
                                      rows_follow, rows_reordered)

    undo = [] if undo is None else undo
    rows_seen = {} if rows_seen is None else rows_seen

    def load(ck, name):
        info = ck.tensors[name]
        return _as_float32(np.asarray(ck.read(name)).reshape(tuple(info.shape)), info.dtype)

    def add(r, source, axis, index, note, trimmed=False, as_kind=None, outputs=None):
        undo.append(Undo(r, source, axis, None if index is None else np.asarray(index, np.int64), "",
                         as_kind or kind, note, trimmed, outputs=outputs))

    if kind == "mlp":
        name_map = {r.name: r.base_name for r in rows}
        by_name = {r.name: r for r in rows}
        for f in detect_permutations(base, tuned, name_map, seed=0):
            # read in row blocks, the base's neurons gathered in the order found: no member decoded whole
            mats = [(n, name_map[n], ax, role) for n, ax, role in f.members if not role.startswith("bias")]
            if f.applied and members_follow_stored(tuned, base, mats, f.perm):
                for n, ax, role in f.members:
                    if n in by_name:
                        parts = int(role.rsplit(":", 1)[1]) if ":" in role else 1
                        index = np.concatenate([f.perm + k * f.neurons for k in range(parts)])
                        add(by_name[n], name_map[n], ax, index,
                            f"compared with the base's MLP neurons in this model's order ({f.moved} of {f.neurons} "
                            "moved)", outputs=not role.startswith("out"))
                return True
        return False
    if kind == "rows":
        # every changed embedding or head table: its rows the base's in another order, or a subset of them
        mats = [r for r in rows if len(r.shape or ()) == 2 and r.status != "unchanged"]
        if not mats:
            return False
        from .measure.rowmatch import RowTable, match_rows

        orders, seen_here = [], {}
        for r in mats:
            # read by rows, never whole (two 32,000-token tables a side held 1 GB beside the process)
            t, b = RowTable.stored(tuned, r.name), RowTable.stored(base, r.base_name)
            dt, db = tuned.tensors[r.name].dtype, base.tensors[r.base_name].dtype
            ok, order = rows_reordered(t, b, dt, db, partial=True)
            if not ok:
                return False
            if order is not None:
                seen_here[r.name] = order
            if order is not None and bool(np.any(order < 0)):
                order = None            # rows added: some tuned rows are no base row, no order to undo
            how = ""
            if order is None:
                # trained after the remapping: no row is bitwise a base row; match every row by cosine, and
                # keep the order only when each match is unambiguous (else the table is not measured)
                m = match_rows(t, b, dt, db)
                order = m.order
                how = (f"; matched by cosine, every row's match unambiguous, lowest cosine {m.worst_cosine:.4g}"
                       if order is not None else "")
            orders.append((order, how))
        for r, (order, how) in zip(mats, orders):
            if order is not None:
                moved = int(np.count_nonzero(order != np.arange(len(order))))
                add(r, r.base_name, 0, order, f"compared with the base's token rows in this model's order ({moved} of "
                    f"{len(order)} rows from another index{how})",
                    trimmed=len(order) < base.tensors[r.base_name].shape[0], outputs=True)
        rows_seen.update(seen_here)
        return True
    if kind == "experts":
        experts = [r for r in rows if is_expert_name(r.name)]
        grouped = _by_expert(experts, lambda r: r)
        # stored sources, read in row blocks by experts_permuted (never a whole expert)
        perm = experts_permuted({e: list(zip(*member_sources(tuned, base, [(r.name, r.base_name, 0) for r in v])))
                                 for e, v in grouped.items()})
        if perm is None:
            return False
        # the experts are the base's either way; a router whose rows did not follow sends tokens to other
        # experts than in the base, which the reason must say (not "unrelated", which they are not)
        ids = sorted(grouped)
        routers = [r for r in rows if not is_expert_name(r.name) and len(r.shape or ()) == 2 and r.shape[0] == len(perm)]
        # a router's per-expert vectors beside its rows (DeepSeek's e_score_correction_bias, a router bias)
        heads = {r.name.rsplit(".", 1)[0] for r in routers}
        vectors = [r for r in rows if not is_expert_name(r.name) and len(r.shape or ()) == 1
                   and r.shape[0] == len(perm) and r.name.rsplit(".", 1)[0] in heads]
        follow = all(rows_follow(load(tuned, r.name), load(base, r.base_name), perm) for r in routers) \
            and all(_vector_follows(load(tuned, r.name), load(base, r.base_name), perm) for r in vectors)
        if not follow:
            stray.append(rows[0])
        for k, e in enumerate(ids):
            if ids[perm[k]] == e:
                continue
            for r in grouped[e]:
                m = _EXPERT.match(r.base_name)
                other = f"{m.group(1)}{ids[perm[k]]}{m.group(3)}" if m else None
                if other in base.tensors and tuple(base.tensors[other].shape) == tuple(base.tensors[r.base_name].shape):
                    add(r, other, None, None, f"compared with base expert {ids[perm[k]]}, the one this expert is "
                        "(experts reordered)")
        if ids == list(range(len(ids))):
            # a router left in the stored order routes to other experts than the base's: compared with the base's
            # rows in the experts' new order, it reads changed, as what the block computes is
            note = "compared with the base's router rows in this model's expert order" + (
                "" if follow else " (its rows were not reordered with the experts: it routes tokens to other experts "
                "than the base's)")
            for r in routers + vectors:
                add(r, r.base_name, 0, perm, note, as_kind=None if follow else "router", outputs=True)
        return True
    mats, names = {}, {}
    for r in rows:
        if r.module in ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv") and len(r.shape or ()) == 2 \
                and r.name.endswith("weight"):
            if _conv1d(r):                           # GPT-2's Conv1D stores [in, out]: split in memory
                t, b = load(tuned, r.name), load(base, r.base_name)
                t, b = t.T, b.T
            else:                                    # read in row blocks by the heads check, never whole (a fused
                # qkv as the rows of each of q, k and v: ``fused_qkv_sources``)
                (t,), (b,) = member_sources(tuned, base, [(r.name, r.base_name, 0)])
            mats[r.module.split(".", 1)[1]] = (t, b)
            names[r.module.split(".", 1)[1]] = r
    if "q" in mats or "qkv" not in mats or "o" not in mats:
        order = heads_order(mats)
        if order:
            note = "compared with the base's attention heads in this model's order"
            for r in rows:
                part = str(r.module or "").split(".", 1)[-1]
                if part in ("q", "k", "v", "o") and (part != "o" or len(r.shape or ()) == 2):
                    axis = (1 if part == "o" and not _conv1d(r) else 0)
                    n = int(r.shape[axis])
                    if (part in ("q", "o") and order.q is not None) or (part in ("k", "v") and order.kv is not None):
                        add(r, r.base_name, axis, order.rows(part, n), note, outputs=part != "o")
        return order if order is None else bool(order)
    views = fused_qkv_sources(mats["qkv"], mats["o"])
    found = [heads_order(m, head_dims=dims) for m, dims in views]
    hit = next((k for k, f in enumerate(found) if f), None)
    if hit is not None:
        rows_n = int(mats["qkv"][0].shape[0])
        pos = np.arange(rows_n, dtype=np.float64)[:, None]
        o_shapes = tuple(np.broadcast_to(np.float64(0.0), tuple(int(d) for d in x.shape)) for x in mats["o"])
        where = fused_qkv_views((pos, pos), o_shapes)[hit][0]
        order = found[hit]
        gather = np.arange(rows_n)
        for part in ("q", "k", "v"):
            at = where[part][0][:, 0].astype(np.int64)
            gather[at] = at[order.rows(part, len(at))]
        note = "compared with the base's attention heads in this model's order (fused q, k, v)"
        for r in rows:
            part = str(r.module or "").split(".", 1)[-1]
            if part == "qkv" and len(r.shape or ()) in (1, 2) and int(r.shape[1 if _conv1d(r) else 0]) == rows_n:
                add(r, r.base_name, 1 if _conv1d(r) else 0, gather, note, outputs=True)
            elif part == "o" and len(r.shape or ()) == 2 and order.q is not None:
                axis = 0 if _conv1d(r) else 1
                add(r, r.base_name, axis, order.rows("o", int(r.shape[axis])), note, outputs=False)
    return True if hit is not None else False if found else None


def _vector_follows(tuned, base, perm) -> bool:
    """Whether a router's per-expert vector (a bias) is at least as close to the base's in the experts' new
    order as in the stored one: one value per expert carries no direction to match by cosine."""
    import numpy as np

    t, b = np.asarray(tuned, np.float64).reshape(-1), np.asarray(base, np.float64).reshape(-1)
    t, b = np.where(np.isfinite(t), t, 0.0), np.where(np.isfinite(b), b, 0.0)
    return bool(np.linalg.norm(t - b[perm]) <= np.linalg.norm(t - b))


def _with_biases(undo: list[Undo], by_name: dict, base: Checkpoint, tuned: Checkpoint) -> list[Undo]:
    """``undo`` and the vectors indexed by the units of each reordered weight, compared with the base's in
    the units' new order: the bias of a weight whose outputs are the units (a q, k, v or gate row, a fused
    qkv row; ``Undo.outputs``), and the per-channel norm over a whole q or k projection (OLMo-2's
    ``q_norm``/``k_norm``, as long as q's or k's rows; Qwen3's, one head long and shared by every head, is
    not indexed by heads and stays as stored). Such a vector does not follow its units by choice: one
    left in the old order pairs each unit with another unit's offset or gain, and the model computes
    something else (logits 0.49 apart for Qwen2's q/k/v biases), yet compared as stored it equals the
    base's and read unchanged beside "a reordering alone changes nothing". Measured in the units' order it
    reads changed when it stayed and unchanged when it followed. An output projection's bias (o, down) is
    indexed by the hidden size, not the units, and stays as stored; where the side is not known
    (``outputs`` None) the bias follows only when the order brings it strictly closer to the base's. An
    attention's ``sinks`` (gpt-oss: one logit per query head) follow the query heads. For an expert
    compared with another, that expert's bias."""
    import numpy as np

    from .measure.permutation import _as_float32, expand_units

    out = list(undo)
    have = {id(u.record) for u in undo}

    def usable(b, n: int) -> bool:
        return (b is not None and id(b) not in have and b.compared == "float" and len(b.shape or ()) == 1
                and b.base_name is not None and n == b.shape[0] and b.base_name in base.tensors
                and tuple(base.tensors[b.base_name].shape) == tuple(b.shape))

    for u in undo:
        name = u.record.name
        if not name.endswith(".weight"):
            continue
        b = by_name.get(name[:-len("weight")] + "bias")
        if u.axis is None:
            if b is None or id(b) in have or b.compared != "float" or len(b.shape or ()) != 1 or b.base_name is None:
                continue
            source = u.source[:-len("weight")] + "bias"
            if source in base.tensors and tuple(base.tensors[source].shape) == tuple(b.shape):
                out.append(replace(u, record=b, source=source))
                have.add(id(b))
            continue
        if u.outputs is False:
            continue
        if usable(b, len(u.index)):
            follows = u.outputs
            if follows is None:
                t = _as_float32(np.asarray(tuned.read(b.name)).reshape(-1), tuned.tensors[b.name].dtype).astype(np.float64)
                v = _as_float32(np.asarray(base.read(b.base_name)).reshape(-1), base.tensors[b.base_name].dtype).astype(np.float64)
                follows = bool(np.linalg.norm(t - v[u.index]) < np.linalg.norm(t - v))
            if follows:
                out.append(replace(u, record=b, source=b.base_name, axis=0))
                have.add(id(b))
        leaf = name[:-len(".weight")].rsplit(".", 1)
        if u.outputs and u.kind == "attn" and len(leaf) == 2 and leaf[1] in ("q_proj", "k_proj"):
            for part in ("weight", "bias"):
                g = by_name.get(f"{leaf[0]}.{leaf[1][0]}_norm.{part}")
                if usable(g, len(u.index)):
                    out.append(replace(u, record=g, source=g.base_name, axis=0,
                                       note=u.note + f" (its {leaf[1][0]}_norm gains, one per channel of "
                                       f"{leaf[1]}, in that order too)"))
                    have.add(id(g))
            g = by_name.get(f"{leaf[0]}.sinks") if leaf[1] == "q_proj" else None
            if g is not None and len(g.shape or ()) == 1 and g.shape[0] and len(u.index) % g.shape[0] == 0:
                # one attention sink per query head (gpt-oss): the heads' order, read off q's rows
                d = len(u.index) // g.shape[0]
                heads = u.index[::d] // d
                if np.array_equal(expand_units(heads, d), u.index) and usable(g, len(heads)):
                    out.append(replace(u, record=g, source=g.base_name, axis=0, index=heads,
                                       note=u.note + " (its sinks, one per query head, in that order too)"))
                    have.add(id(g))
    return out


class Again:
    """The tensors measured again after the pass, beneath the reparametrisations found (``measure_undone``,
    ``measure_folded_norms``): with ``options.cache`` each record is stored as soon as it is final (``RecordCache``:
    written to a temporary and renamed, validated when read back) under the key of its pair's inputs and the
    options (the pass's) plus the undo itself (``RecordCache.key(post=...)``: its kind, the permutation, the
    rotation and the gains by the sha256 of their bytes, what it reads besides the pair's base), so a run killed
    during these measurements, or run again with other outputs, measures only what is not stored. A record read
    back must fit the pair as measured again (``remeasured_pair``: names, dtypes, shapes, status), or it is
    measured again and written over. ``progress``: a progress object with ``advance(n, cached=False)`` is told
    the elements of each tensor as they stream (``stage(what, total)`` announces the total first); one with
    ``stage`` alone hears the stage's name."""

    def __init__(self, options: CompareOptions, bases: Sequence[Checkpoint], tuned: Checkpoint,
                 progress: Any = None):
        self._options = options
        self._cache: Any = None
        self._warned = 0
        if options.cache:
            from .measure.cache import warnings_given

            self._warned = warnings_given(options.cache)      # before the pass: did the pass warn?
        self.bases, self.tuned = bases, tuned
        self._key: str | None = None            # the checks' outcome's key (``checks``)
        self._stage = getattr(progress, "stage", None)
        self._advance = getattr(progress, "advance", None)

    @property
    def cache(self) -> Any:
        """The ``RecordCache`` of ``--cache``, opened when first needed (None without one)."""
        if self._cache is None and self._options.cache:
            from .measure.cache import RecordCache

            self._cache = RecordCache(self._options.cache, self._options.settings())
        return self._cache

    def begin(self, what: str, total: int) -> None:
        """Name the stage of ``total`` elements to the progress line."""
        if self._stage is None:
            return
        if self._advance is not None:
            self._stage(what, total=total)
        else:
            self._stage(what)

    def advance(self, n: int, cached: bool = False) -> None:
        if self._advance is not None:
            self._advance(n, cached=cached)

    def array_id(self, a: Any) -> list | None:
        return self.cache.array_id(a) if self.cache is not None else None

    def record(self, pair: Any, expected: Any, post: Callable[[], dict],
               measure: Callable[[Callable[[int], None]], TensorRecord]) -> TensorRecord:
        """The record of ``pair`` measured again: the stored one when the cache holds one that fits
        ``expected`` (the pair as measured again, with the base name, dtype and shape its final record carries),
        else ``measure(on_window)``, stored once it returns (complete, every note and status set). ``post()``:
        the key's undo material (``RecordCache.key``), built only with a cache."""
        from .measure.compute import streamed

        key = material = None
        if self.cache is not None:
            material = post()
            key = self.cache.key(pair, self.bases, self.tuned, post=material)
            rec = self.cache.get(key, expected, self.bases)
            if rec is not None:
                self.advance(streamed(expected), cached=True)
                return rec
        rec = measure(self.advance)
        if key is not None:
            self.cache.put(key, rec, post=str(material.get("undo")))
        return rec

    def fit(self, material: dict, compute: Callable[[], Any]) -> Any:
        """A rotation fitted during the checks (``rotated_residual``'s ``memo``): with a cache, the R stored under the
        checks' key and ``material`` (the matrices fitted on, the embedding's rows) when it reads back whole and
        square (float64), else ``compute()``, stored as soon as it returns (``None``, no fit, too). At 70B widths
        a fit is minutes to hours on a CPU: a run killed during the checks resumes past the fits it finished."""
        if self.cache is None or self._key is None:
            return compute()
        import hashlib
        import json

        import numpy as np

        key = hashlib.sha256(json.dumps({"checks": self._key, "fit": material}, sort_keys=True,
                                        default=str).encode()).hexdigest()
        got = self.cache.get_outcome(key, ".fit")
        if got is not None and got[0].get("fit") == json.loads(json.dumps(material, default=str)):
            r = got[1].get("r")
            if got[0].get("none") is True and r is None:
                return None
            if isinstance(r, np.ndarray) and r.ndim == 2 and r.shape[0] == r.shape[1] and r.dtype == np.float64:
                return np.ascontiguousarray(r)
        r = compute()
        self.cache.put_outcome(key, {"fit": material, "none": r is None}, {} if r is None else {"r": r}, ".fit")
        return r

    def measured_all(self) -> None:
        """Every tensor the checks' outcome measures again is measured and stored: noted beside the outcome."""
        if self.cache is not None and self._key is not None and not self.cache.unwritten:
            self.cache.mark_measured(self._key)

    def _checks_key(self, plan: Plan, undo_reorderings: bool) -> str:
        return self.cache.checks_key(plan, self.bases, self.tuned, {"undo_reorderings": bool(undo_reorderings)})

    def expected(self, plan: Plan, undo_reorderings: bool) -> int:
        """Before the pass: the elements of the tensors a previous run of the same inputs and options measured again
        after it (its checks' outcome, read without its arrays), for the pass's ETA; 0 when none is known, or when
        that run stored every one of them (``RecordCache.measured``: they come from the cache, in no time)."""
        if self.cache is None:
            return 0
        key = self._checks_key(plan, undo_reorderings)
        if self.cache.measured(key):
            return 0
        data = self.cache.peek_outcome(key)
        try:
            return sum(int(d["elements"]) for d in data["outcome"]["undo"]) if data else 0
        except (KeyError, TypeError, ValueError):
            return 0

    def checks(self, plan: Plan, records: Sequence[TensorRecord], undo_reorderings: bool,
               run: Callable[[], Checks]) -> Checks:
        """What the checks after the pass find: with a cache, the outcome a run of the same inputs and options stored
        when it was found from the same records (``records_digest``) and reads back whole and fitting this run's
        records and bases (``_decode_checks``); else ``run()``, stored as soon as it returns (before anything is
        measured again, so a run killed then finds it)."""
        if self.cache is None:
            return run()
        from .measure.cache import records_digest

        key = self._key = self._checks_key(plan, undo_reorderings)
        digest = records_digest(records)
        got = self.cache.get_outcome(key)
        if got is not None and got[0].get("records") == digest:
            try:
                return _decode_checks(got[0], got[1], records, self.bases)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                pass
        found = run()
        outcome, arrays = _encode_checks(found, records)
        self.cache.put_outcome(key, {"records": digest, **outcome}, arrays)
        return found

    def close(self) -> None:
        """The warning of records not written, unless the pass gave it (one line per run: the disk is as full)."""
        if self._cache is not None:
            from .measure.cache import warnings_given

            if warnings_given(self._options.cache) == self._warned:
                self._cache.warn_unwritten()


def _undo_material(u: Undo, r: TensorRecord, array_id: Callable[[Any], Any]) -> dict:
    """What a record measured again beneath ``u`` depends on besides its pair's inputs and the options (a
    ``RecordCache.key(post=...)``): the undo's kind and parameters (the order, the rotation and the gains by their
    bytes' digest: a rotation fitted again to other bits is another key, whatever made it differ), the note it
    writes, and what it takes from the pass's record ``r``."""
    rotate = None
    if u.rotate is not None:
        form, r_, gains = u.rotate
        rotate = [form, array_id(r_), array_id(gains)]
    return {"undo": "measure_undone", "source": u.source, "axis": u.axis,
            "index": array_id(None if u.index is None else u.index), "note": u.note, "trimmed": u.trimmed,
            "negate": u.negate, "rotate": rotate, "gain_name": u.gain_name,
            "record": {"base_shape": r.base_shape, "dtype_base": r.dtype_base},
            "reads": [u.source] if u.source != r.base_name else []}


def _conv1d(r) -> bool:
    """GPT-2's Conv1D attention weights, stored [in, out]."""
    return r.name.endswith("c_attn.weight") or (r.module == "attn.o" and r.name.endswith("c_proj.weight"))


def measure_undone(records: list[TensorRecord], undo: Sequence[Undo], the_plan: Plan, bases: Sequence[Checkpoint],
                   tuned: Checkpoint, options: CompareOptions, backend, classify,
                   again: Again | None = None) -> tuple[list[TensorRecord], dict]:
    """The records with each tensor of ``undo`` measured again against its base tensor in the tuned model's
    order (``measure.compute.remeasure``: statistics, status and rank of what changed beneath the
    reordering), and what was undone for ``scope.permuted_units``: ``blocks`` (block -> kinds whose every
    reordered tensor was measured so; ``router`` where a router whose rows did not follow its experts was
    measured in their new order), ``tensors``, ``trimmed`` (token tables with fewer rows), ``routers`` (the
    names of those routers' tensors). ``again``: the cache and progress of these measurements (``Again``)."""
    import numpy as np

    from .measure.compute import GatheredSide, remeasure, remeasured_pair, streamed

    if again is None:
        again = Again(replace(options, cache=None), bases, tuned)
    pairs = {p.tuned_name: p for p in the_plan.pairs if p.tuned_name is not None}
    redo = {id(u.record): u for u in undo}
    out, blocks, n, trimmed, routers = [], {}, 0, 0, []
    negated: dict[str, list[str]] = {}
    n_negated = 0
    rotated: list[str] = []
    folded: list[str] = []
    rescaled: list[str] = []
    jobs: dict[int, tuple] = {}         # id(record) -> (undo, pair, side, the pair as measured again)
    for r in records:
        u = redo.get(id(r))
        pair = pairs.get(r.name) if u is not None else None
        if u is None or pair is None or pair.base_name != r.base_name:
            continue
        if u.rotate is not None:
            from .measure.rotation import RotatedSide

            side = RotatedSide(bases[pair.base_index], pair.base_name, u.source, *u.rotate,
                               order=None if u.axis is None else (u.axis, u.index))
        else:
            side = GatheredSide(bases[pair.base_index], pair.base_name, u.source, u.axis, u.index, negate=u.negate)
        # the pair as its final record has it: another expert's tensor for base name, the base's whole table for a
        # trimmed one, the base's own dtype for one measured against float64 values
        expected = remeasured_pair(pair, side)
        expected = replace(expected, base_name=u.source,
                           shape_base=list(r.base_shape) if u.trimmed and r.base_shape else expected.shape_base,
                           dtype_base=r.dtype_base if u.rotate is not None else expected.dtype_base)
        jobs[id(r)] = (u, pair, side, expected)
    again.begin(f"measuring {len(jobs):,} tensors again beneath the reparametrisations found",
                sum(streamed(j[3]) for j in jobs.values()))

    def measured(r: TensorRecord, u: Undo, pair: Any, side: Any, on_window: Callable[[int], None]) -> TensorRecord:
        new = remeasure(pair, side, bases, tuned, options, backend, classify, on_window)
        new.note = u.note + (f"; {new.note}" if new.note else "")
        if u.trimmed and r.base_shape:
            # measured against the base rows it kept, but the base table is the whole one: its dropped rows are
            # counted as removed (the base read 713,856 parameters where its file holds 722,048)
            new.base_shape = list(r.base_shape)
        if u.source != pair.base_name:      # another expert's tensor: the one this expert is compared with
            new.base_name = u.source
        if u.negate and new.norm_delta == 0 and not new.max_abs_delta and not new.nonfinite and new.status != "unchanged":
            # equal values, differing bits: only zeros of the other sign (a quantizer's code 0 times its scale is
            # +0, the base's zero negated -0), which the sign flip leaves undecided: nothing changed beneath it
            new.status, new.frac_changed, new.frac_beyond_rounding, new.quant, new.rank = "unchanged", 0.0, 0.0, None, None
            new.note += "; its zeros differ from the base's negated only in their sign"
        if u.rotate is not None:
            new.dtype_base = r.dtype_base           # measured against float64 values; stored as the base stores it
            _within_rotation_rounding(new, None if u.rotate[1] is None else int(u.rotate[1].shape[0]))
        return new

    for r in records:
        # each side let go once measured: a rotated side keeps its last row block (up to 128 MB for an output
        # matrix), and 21 of them held to the end took a Mistral-7B-shaped pair's peak from 900 MB to 1.6 GB
        job = jobs.pop(id(r), None)
        if job is None:
            out.append(r)
            continue
        u, pair, side, expected = job
        new = again.record(pair, expected, lambda: _undo_material(u, r, again.array_id),
                           lambda on_window: measured(r, u, pair, side, on_window))
        release = getattr(side, "release", None)
        if release is not None:
            release()
        out.append(new)
        if u.rotate is not None:
            (rotated if u.rotate[1] is not None else folded if u.gain_name else rescaled).append(new.name)
            if u.axis is None:
                continue
            # units reordered then rescaled: the reordering counts as one undone too
        if u.negate:
            n_negated += 1
            kinds = negated.setdefault(u.label, [])
            if u.kind not in kinds:
                kinds.append(u.kind)
            continue
        n += 1
        trimmed += int(u.trimmed)
        if u.kind == "router":
            routers.append(new.name)
        kinds = blocks.setdefault(u.label, [])
        if u.kind not in kinds:
            kinds.append(u.kind)
    undone = {"blocks": {k: sorted(v) for k, v in sorted(blocks.items())}, "tensors": n, "trimmed": trimmed,
              "routers": routers} if n else {}
    if n_negated:
        undone["negated"] = {"blocks": {k: sorted(v) for k, v in sorted(negated.items())}, "tensors": n_negated,
                             "names": [u.record.name for u in undo if u.negate]}
    if rotated:
        undone["rotated"] = {"tensors": len(rotated), "names": rotated}
    if folded:
        undone["folded"] = {"tensors": len(folded), "names": folded}
    if rescaled:
        # the pairs' matrices (a bias scaled with its rows is measured so too, but is no member of a pair)
        mats = [u for u in undo if u.rotate is not None and u.rotate[1] is None and not u.gain_name
                and len(u.record.shape or ()) >= 2]
        names = {u.record.name for u in mats}
        undone["rescaled"] = {"tensors": len([n for n in rescaled if n in names]),
                              "names": [n for n in rescaled if n in names],
                              "biases": [n for n in rescaled if n not in names],
                              "negative": sum(int(np.count_nonzero(u.rotate[2] < 0)) for u in mats)}
    if undone and any(u.kind == "rows" and u.axis == 0 for u in undo):
        undone["rows_consistent"] = _rows_consistent(records, undo)
    return out, undone


def _rows_consistent(records: Sequence[TensorRecord], undo: Sequence[Undo]) -> bool:
    """Whether the token tables whose rows were reordered are all in one order (the embedding's and an untied
    head's, a table left as stored being in the base's order): only then is it a tokenizer's ids remapped, on
    which the model computes what the base computes. An embedding in one order and the head in another (or
    left alone) is a scrambled model."""
    import numpy as np

    orders = {u.label: np.asarray(u.index) for u in undo if u.kind == "rows" and u.axis == 0}
    tables = {component_of(r.name): int((r.shape or [0])[0]) for r in records
              if r.module in ("embed", "lm_head") and len(r.shape or ()) == 2 and r.base_name is not None
              and not getattr(r, "tied", False) and r.status != "removed"}
    seen = [orders.get(label, np.arange(n)) for label, n in tables.items()] or list(orders.values())
    return all(len(o) == len(seen[0]) and np.array_equal(o, seen[0]) for o in seen)


def grown_rows_consistent(records: Sequence[TensorRecord], found: dict, rows_seen: dict) -> bool | None:
    """``_rows_consistent`` for token tables whose reordering was not undone because rows were added (a
    tokenizer's ids remapped, then tokens added): whether the untied token tables follow one remapping,
    read from the base row each of their rows is bitwise (``rows_seen``, -1 for a row added; a table not
    found reordered is in the base's order, its added rows new). None when that cannot be told (a table
    matched by cosine only, rows trained): then no sentence may say the model computes what the base
    computes, nor that it does not. Example: embedding rows ``[2, 0, 1, -1]``, head left as stored
    ``[0, 1, 2, -1]``: False (the head does not follow the embedding's remapping)."""
    import numpy as np

    orders = []
    for r in records:
        if r.module not in ("embed", "lm_head") or len(r.shape or ()) != 2 or r.base_name is None \
                or getattr(r, "tied", False) or r.status == "removed":
            continue
        n_t, n_b = int(r.shape[0]), int((r.base_shape or r.shape)[0])
        if r.name in rows_seen:
            o = np.asarray(rows_seen[r.name])
            if int(np.count_nonzero(o < 0)) != max(0, n_t - n_b):
                return None                 # some shared rows are no base row bitwise: trained, not only remapped
        elif "rows" in (found.get(component_of(r.name)) or ()):
            return None                     # found reordered by cosine only: no exact order to compare
        else:
            o = np.concatenate([np.arange(min(n_t, n_b)), np.full(max(0, n_t - n_b), -1)])
        orders.append(o)
    if not orders:
        return None
    n = min(len(o) for o in orders)
    return all(np.array_equal(o[:n], orders[0][:n]) for o in orders)


def _by_expert(rows, load) -> dict[int, list]:
    """Expert index -> its (tuned, base) matrices in name order, the experts that have every kind of
    matrix the others have (a layer's experts compared as wholes)."""
    from .judge.relatedness import _EXPERT

    found: dict[int, dict[str, object]] = {}
    for r in rows:
        m = _EXPERT.match(r.name)
        if m is not None and len(r.shape or ()) == 2:
            found.setdefault(int(m.group(2)), {})[m.group(3)] = r
    kinds = set.intersection(*(set(v) for v in found.values())) if found else set()
    return {e: [load(v[k]) for k in sorted(kinds)] for e, v in found.items()} if kinds else {}


def _labels(given: str | Sequence[str] | None, n: int) -> list[str | None]:
    if given is None:
        return [None] * n
    labels = [given] if isinstance(given, str) else list(given)
    if len(labels) != n:
        raise OptionsError(f"base_label: give one label per base ({n}), got {len(labels)}", option="base_label")
    return labels


def _labelled(entry: dict, label: str | None) -> dict:
    if label and str(label).strip():    # a blank label names nothing: the path stands, as for an empty one
        entry["label"] = str(label)
    return entry


def explain(result: Comparison) -> Comparison:
    """Write the verdict's reason and the headline (``render.sentences``) into the summary
    and the reference scale (``render.reference``) beside it: the last step of the pipeline,
    after the judge has decided."""
    data = result.to_dict(include_run=False, _views=True)
    result.reference = data["reference"] = reference_scale(data)
    result.summary.verdict_reason = sentences.verdict_reason(data)
    data["summary"]["verdict_reason"] = result.summary.verdict_reason
    result.summary.headline = sentences.headline(data)
    return result


def _opened(stack: ExitStack, where: PathLike | Checkpoint, hub: HubOptions | None = None) -> Checkpoint:
    """A checkpoint the caller already holds open (provenance, lineage: each header is read
    once per command), or one located here and closed when the comparison ends."""
    return where if isinstance(where, Checkpoint) else stack.enter_context(locate(where, hub))


def check_adapter_plan(the_plan: Plan, bases: Sequence[Checkpoint], tuned: Checkpoint) -> None:
    """Every LoRA factor pair must modify a base weight it fits, with finite factors of a
    measurable size: checked before the plan is shown (adapters are small to read).

    A target the base lacks means the adapter belongs to another model: bad input, not an
    "added" tensor that would make the verdict read derived.
    """
    import numpy as np

    from .io.gguf_adapter import resolve_rows
    from .io.peft_adapter import layout_evidence
    from .kernels.dtypes import decode

    resolve_rows(tuned, the_plan, bases)        # a llama.cpp adapter's Q/K rows, by the base's head counts
    if getattr(tuned, "ia3", None):
        _check_ia3_plan(the_plan, bases, tuned)
    if getattr(getattr(tuned, "adapter", None), "peft_type", None) == "LN_TUNING":
        _check_ln_plan(the_plan, bases, tuned)

    seen = {layout_evidence(p.lora, tuned.tensors, bases[p.base_index].tensors[p.base_name])
            for p in the_plan.pairs if p.lora is not None and p.kind == "lora"} - {None}
    layout = seen.pop() if len(seen) == 1 else None       # one module type in evidence (never both in one model)
    if layout is None and not seen:
        # every target square: transformers' Conv1D modules are GPT-2's family, named c_attn, c_proj, c_fc, q_attn
        leaves = {str(p.lora.target).removesuffix(".weight").rsplit(".", 1)[-1] for p in the_plan.pairs
                  if p.lora is not None}
        layout = "conv1d" if leaves & {"c_attn", "c_proj", "c_fc", "q_attn"} else "linear" if leaves else None
    experts = [p for p in the_plan.pairs if p.kind == "lora" and getattr(p.lora, "expert", None) is not None
               and getattr(p.lora, "param", None) is not None]
    if experts:             # LoRA on fused experts: one orientation for them all, from the non-square ones
        from .io.peft_params import settle_orientation

        settle_orientation(experts, tuned, bases)
    for p in the_plan.pairs:
        lb = getattr(p, "lora_bias", None)
        if lb is not None and (p.kind != "paired" or p.transposed):
            found = "has no such bias" if p.kind == "added" else \
                f"has it as {list(p.shape_base or ())}, not {list(p.shape_tuned or ())}"
            raise CheckpointError(tuned.files[0], f"LoRA bias `{escape_name(lb.bias_name)}` (lora_bias: true) adds to "
                                                  f"`{escape_name(lb.bias_target)}`, but the base {found}: PEFT cannot "
                                                  "merge it either (its merge_and_unload refuses a lora_bias on a layer "
                                                  "without a bias)",
                                  "the adapter adds a bias the base layer lacks: there is no merged model to compare"
                                  if p.kind == "added" else "is this adapter for another base model?")
        if p.lora is None:
            continue
        if p.kind != "lora":
            where = ", ".join(str(b.path) for b in bases)
            if getattr(p.lora, "param", None) is not None:
                from .io.peft_params import missing_param

                raise missing_param(p.lora, bases, tuned.files[0], where)
            raise CheckpointError(tuned.files[0], f"{p.lora.label} target `{escape_name(p.lora.target)}` has no weight in "
                                                  f"the base ({escape_name(where)}) to modify",
                                  "is this adapter for another base model?")
        check_against_base(p.lora, tuned.tensors, bases[p.base_index].tensors[p.base_name], tuned.adapter,
                           tuned.files[0], layout)
    vera = [p.lora for p in the_plan.pairs if p.lora is not None and getattr(p.lora, "kind", "") == "VERA"]
    if vera:        # once every module's orientation is known: the projections' sizes (drawn again at them)
        from .io.peft_vera import check_projections

        check_projections(vera, tuned.files[0], tuned.tensors)
    checked = set()
    for p in the_plan.pairs:
        if p.lora is None:
            continue
        if getattr(p.lora, "expert", None) is not None:
            if (p.lora.a_name, p.lora.b_name) in checked:
                continue                # the experts of one parameter share its factors: checked whole, once
            checked.add((p.lora.a_name, p.lora.b_name))
        names = (p.lora.a_name, p.lora.b_name, p.lora.magnitude_name, p.lora.e_name, *p.lora.parts.values())
        values = {n: decode(tuned.read(n), tuned.tensors[n].dtype).reshape(tuned.tensors[n].shape)
                  for n in names if n}
        check_factor_values(p.lora, values, tuned.files[0])
        copy = getattr(p.lora, "tied_copy", None)
        if copy is not None and not (tuned.tensors[copy].dtype == tuned.tensors[p.lora.a_name].dtype and np.array_equal(
                np.asarray(tuned.read(copy)).view(np.uint8), np.asarray(tuned.read(p.lora.a_name)).view(np.uint8))):
            raise CheckpointError(tuned.files[0], f"trainable token rows `{escape_name(copy)}` of the LM head differ "
                                                  f"from the embedding's, `{escape_name(p.lora.a_name)}`, though the "
                                                  "base ties the two tables and PEFT ties their rows: which one PEFT "
                                                  "loads is not defined", "rows from different adapters?")
        if p.lora.kind == "BOFT":
            from .io.peft_boft import check_boft_values

            base = bases[p.base_index]
            src = base.tensors[p.base_name]
            check_boft_values(p.lora, values, src, p.base_name in (getattr(base, "quant", None) or {})
                              or src.quant is not None, tuned.files[0])
        if p.lora.kind == "OFT":
            from .io.peft_oft import check_oft_values

            base = bases[p.base_index]
            src = tuned.tensors[p.lora.base_layer_name] if p.lora.base_layer_name else base.tensors[p.base_name]
            check_oft_values(p.lora, values[p.lora.a_name], tuned.adapter, src,
                             not p.lora.base_layer_name and (p.base_name in (getattr(base, "quant", None) or {})
                                                             or src.quant is not None),
                             tuned.files[0])


def _check_ln_plan(the_plan: Plan, bases: Sequence[Checkpoint], tuned: Checkpoint) -> None:
    """Each trained layer copy of an LN tuning adapter replaces a base tensor of its name and shape: one the base
    lacks, or of another shape, is an adapter for another model (PEFT's load refuses the shape; a module the model
    lacks it skips with a warning), not an added or resized tensor that would read derived."""
    from .io.peft_ln import SEGMENT

    for p in the_plan.pairs:
        src = p.tuned_source
        if src is None or SEGMENT not in src or (p.kind == "paired" and not p.transposed):
            continue
        if p.kind == "added":
            where = ", ".join(str(b.path) for b in bases)
            found = f"which the base ({escape_name(where)}) does not have"
        else:
            found = f"which the base has as {list(p.shape_base or ())}, not {list(p.shape_tuned or ())}"
        raise CheckpointError(tuned.files[0], f"LN tuning copy `{escape_name(src)}` replaces "
                                              f"`{escape_name(p.tuned_name)}`, {found}",
                              "is this adapter for another base model?")


def _check_ia3_plan(the_plan: Plan, bases: Sequence[Checkpoint], tuned: Checkpoint) -> None:
    """Every IA3 vector must scale a float base weight it fits, with finite values (PEFT's merge multiplies the
    base's weight by it): checked, and each vector's orientation set, before the plan is shown."""
    import numpy as np

    from .io.peft_adapter import check_ia3, ia3_layout
    from .kernels.dtypes import decode

    pairs = [p for p in the_plan.pairs if p.ia3 is not None]
    seen = {ia3_layout(p.ia3, bases[p.base_index].tensors[p.base_name]) for p in pairs if p.kind == "paired"} - {None}
    layout = seen.pop() if len(seen) == 1 else None
    if layout is None and not seen:     # every target square: as for LoRA, the config's flag, then GPT-2's names
        leaves = {str(p.ia3.target).removesuffix(".weight").rsplit(".", 1)[-1] for p in pairs}
        layout = ("conv1d" if tuned.adapter.fan_in_fan_out or leaves & {"c_attn", "c_proj", "c_fc", "q_attn"}
                  else "linear")
    where = tuned.files[0]
    for p in pairs:
        v = p.ia3
        if p.kind != "paired":
            bases_shown = ", ".join(str(b.path) for b in bases)
            raise CheckpointError(where, f"IA3 target `{escape_name(v.target)}` has no weight in the base "
                                         f"({escape_name(bases_shown)}) to scale", "is this adapter for another base model?")
        base = bases[p.base_index]
        info = base.tensors[p.base_name]
        if info.dtype not in ("F16", "BF16", "F32", "F64") or p.base_name in (getattr(base, "quant", None) or {}):
            what = "quantized" if p.base_name in (getattr(base, "quant", None) or {}) else info.dtype
            raise CheckpointError(where, f"IA3 vector `{escape_name(v.name)}` scales the base's "
                                         f"`{escape_name(p.base_name)}`, which is {what}: weightdiff merges IA3 "
                                         "vectors into float16, bfloat16, float32 or float64 weights only",
                                  "merge the adapter (merge_and_unload) and compare the merged model")
        check_ia3(v, info, where, layout, tuned.tensors[v.base_layer_name] if v.base_layer_name else None)
        values = decode(tuned.read(v.name), tuned.tensors[v.name].dtype)
        if not np.isfinite(values).all():
            raise CheckpointError(where, f"IA3 vector `{escape_name(v.name)}` holds NaN or Inf values, so the "
                                         f"change of `{escape_name(v.target)}` cannot be measured")
    for p in the_plan.pairs:
        if p.ia3_bias is not None:
            info = bases[p.base_index].tensors[p.base_name]
            if info.dtype not in ("F16", "BF16", "F32", "F64") or info.numel != p.ia3_bias.size or \
                    p.base_name in (getattr(bases[p.base_index], "quant", None) or {}):
                raise CheckpointError(where, f"IA3 vector `{escape_name(p.ia3_bias.name)}` scales the outputs of "
                                             f"`{escape_name(p.ia3_bias.target)}`, and PEFT multiplies its bias "
                                             f"by it, but the base's `{escape_name(p.base_name)}` is "
                                             f"{info.dtype} {list(info.shape)}, not {p.ia3_bias.size} floats",
                                      "is this adapter for another base model?")


def _as_kwargs(options: CompareOptions) -> dict:
    from dataclasses import fields

    return {f.name: getattr(options, f.name) for f in fields(options)}
