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
import os
import platform
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
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
from .measure.backend import backend_for
from .measure.compute import Progress, compute_all
from .options import CompareOptions, HubOptions, options_from_kwargs
from .pairing.plan import Plan, plan as make_plan
from .pairing.names import clear_name_caches
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
            **kwargs: Any) -> Comparison:
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
    (HubOptions) says how their weights are read. Raises WeightdiffError for bad input.
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
        date = run_date()
        bases = [_opened(stack, p, hub) for p in base_paths]
        for b in bases:
            if b.format == "adapter":
                raise CheckpointError(b.path, "is a PEFT adapter (adapter_config.json), not a base model",
                                      "an adapter is the tuned side: swap the arguments (BASE first, then the adapter)")
        tuned_ck = _opened(stack, tuned, hub)
        outs = active_outputs()
        if outs is not None:                # no output may overwrite a file being measured
            for ck in (*bases, tuned_ck):
                for f in ck.files:
                    outs.protect(f)
        the_plan = make_plan(bases, tuned_ck, include=options.include, exclude=options.exclude,
                             rename=options.rename)
        check_adapter_plan(the_plan, bases, tuned_ck)
        for ck in (*bases, tuned_ck):
            the_plan.notes.extend(getattr(ck, "notes", []))
        the_plan.sources = [ck.origin for ck in [*bases, tuned_ck] if ck.origin]
        if on_plan is not None:
            on_plan(the_plan)
        records, seconds = (compute or compute_all)(the_plan, bases, tuned_ck, options, backend, classify, progress)
        blocks, modules = aggregate(records, options.thresholds)
        summary = summarise(records, blocks, options.thresholds, buffers=the_plan.buffers,
                            declared={"bases": [declared(b) for b in bases], "tuned": declared(tuned_ck)},
                            reordering=permuted_units(records, bases, tuned_ck, options))
        if line is not None:
            line.close()
        for ck in (*bases, tuned_ck):
            ck.check_identity()             # the numbers describe the files located, unchanged
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


def permuted_units(records: Sequence[TensorRecord], bases: Sequence[Checkpoint], tuned: Checkpoint,
                   options: CompareOptions) -> tuple[dict[str, list[str]], list[str]]:
    """(block -> the module kinds whose units are the base's in another order, the ``block kind`` labels
    whose attention heads were examined). A kind that looks unrelated (alone, or with the rest of its
    block) is first checked for a reordering (``measure.permutation``): MLP neurons as provenance finds
    them, each member matrix related once the order is undone; attention heads by their q/o and k/v rows;
    a layer's experts with its router rows following them. A reordering changes nothing the model
    computes, so such a block must not read as another model's. Once one block shows a reordering of a
    kind, every changed block of that kind is checked too. Reads those modules' matrices again; nothing
    when no kind is suspect (the usual case)."""
    from .judge.relatedness import is_expert_name, kind_rows, split_suspects

    suspects = split_suspects(records, options.thresholds)
    if not suspects:
        return {}, []
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
            hit = _reordered(kind, [r for r in pairs if r.base_index == i], bases[i], tuned, stray)
            if stray:
                found.setdefault(label, []).append("router")
            if kind == "attn" and hit is not None:
                checked.append(f"{label} attn")
            if hit:
                found.setdefault(label, []).append(kind)
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


def _reordered(kind: str, rows: list, base: Checkpoint, tuned: Checkpoint, stray: list) -> bool | None:
    """Whether one block's ``kind`` (``mlp``, ``attn``, ``experts``) is the base's units in another order;
    None when it cannot be checked (a fused qkv in no known layout, no output projection). A layer whose experts were reordered
    but whose router rows were not is appended to ``stray``."""
    import numpy as np

    from .judge.relatedness import is_expert_name
    from .measure.permutation import (_as_float32, detect_permutations, experts_permuted, fused_qkv_views,
                                      heads_permuted, members_follow, rows_follow, rows_from_base)

    def load(ck, name):
        info = ck.tensors[name]
        return _as_float32(np.asarray(ck.read(name)).reshape(tuple(info.shape)), info.dtype)

    if kind == "mlp":
        name_map = {r.name: r.base_name for r in rows}
        for f in detect_permutations(base, tuned, name_map, seed=0):
            mats = [(load(tuned, n), load(base, name_map[n]), ax, role) for n, ax, role in f.members
                    if not role.startswith("bias")]
            if f.applied and members_follow(mats, f.perm):
                return True
        return False
    if kind == "rows":
        # every changed embedding or head table: its rows the base's in another order, or a subset of them
        mats = [r for r in rows if len(r.shape or ()) == 2 and r.status != "unchanged"]
        return bool(mats) and all(rows_from_base(tuned.read(r.name), base.read(r.base_name), tuned.tensors[r.name].dtype,
                                                 base.tensors[r.base_name].dtype) for r in mats)
    if kind == "experts":
        experts = [r for r in rows if is_expert_name(r.name)]
        perm = experts_permuted(_by_expert(experts, lambda r: (load(tuned, r.name), load(base, r.base_name))))
        if perm is None:
            return False
        # the experts are the base's either way; a router whose rows did not follow sends tokens to other
        # experts than in the base, which the reason must say (not "unrelated", which they are not)
        routers = [r for r in rows if not is_expert_name(r.name) and len(r.shape or ()) == 2 and r.shape[0] == len(perm)]
        if not all(rows_follow(load(tuned, r.name), load(base, r.base_name), perm) for r in routers):
            stray.append(rows[0])
        return True
    mats = {}
    for r in rows:
        if r.module in ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv") and len(r.shape or ()) == 2 \
                and r.name.endswith("weight"):
            t, b = load(tuned, r.name), load(base, r.base_name)
            if r.name.endswith("c_attn.weight") or (r.module == "attn.o" and r.name.endswith("c_proj.weight")):
                t, b = t.T, b.T                      # GPT-2's Conv1D stores [in, out]
            mats[r.module.split(".", 1)[1]] = (t, b)
    if "q" in mats or "qkv" not in mats or "o" not in mats:
        return heads_permuted(mats)
    found = [heads_permuted(m, head_dims=dims) for m, dims in fused_qkv_views(mats["qkv"], mats["o"])]
    return True if any(found) else False if found else None


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
    if label:
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
    from .kernels.dtypes import decode

    for p in the_plan.pairs:
        if p.lora is None:
            continue
        if p.kind != "lora":
            where = ", ".join(str(b.path) for b in bases)
            raise CheckpointError(tuned.files[0], f"LoRA target `{escape_name(p.lora.target)}` has no weight in "
                                                  f"the base ({escape_name(where)}) to modify",
                                  "is this adapter for another base model?")
        check_against_base(p.lora, tuned.tensors, bases[p.base_index].tensors[p.base_name], tuned.adapter,
                           tuned.files[0])
        values = {n: decode(tuned.read(n), tuned.tensors[n].dtype)
                  for n in (p.lora.a_name, p.lora.b_name, p.lora.magnitude_name) if n}
        check_factor_values(p.lora, values, tuned.files[0])


def _as_kwargs(options: CompareOptions) -> dict:
    from dataclasses import fields

    return {f.name: getattr(options, f.name) for f in fields(options)}
