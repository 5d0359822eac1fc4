"""``weightdiff.compare()``: the library entry point behind ``weightdiff compare``.

Phases, one direction: locate the checkpoints, plan the pairing from headers alone
(seconds; reported before any heavy compute through ``on_plan``), measure every
pair (weightdiff.compute), aggregate to blocks, modules and a verdict
(weightdiff.aggregate). The result is a ``Comparison`` whose JSON is the contract
of DESIGN.md (``schema: weightdiff.compare/1``) and is byte-for-byte reproducible:
everything that varies between runs (time, command line, versions) is under
``run``, which ``to_json(include_run=False)`` leaves out.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from . import __version__
from .aggregate import aggregate
from .checkpoint import Checkpoint, locate
from .compute import Progress, compute_all
from .options import CompareOptions, options_from_kwargs
from .pairing import Plan, plan as make_plan
from .records import SCHEMA, BlockRecord, Summary, TensorRecord, dumps

PathLike = Union[str, os.PathLike]
#: (plan, bases, tuned, options, progress) -> (records in plan order, seconds): ``compute_all``'s signature
Compute = Callable[[Plan, Sequence[Checkpoint], Checkpoint, CompareOptions, Union[Progress, None]],
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

    def to_dict(self, include_run: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "tool": {"name": "weightdiff", "version": __version__},
            "settings": self.settings,
            "base": self.base,
            "tuned": self.tuned,
            "plan": self.plan,
            "summary": self.summary.to_dict(),
            "modules": self.modules,
            "blocks": [b.to_dict() for b in self.blocks],
            "tensors": [t.to_dict() for t in self.tensors],
        }
        if include_run:
            d["run"] = self.run
        return d

    def to_json(self, include_run: bool = True) -> str:
        return dumps(self.to_dict(include_run))

    def tensor(self, name: str) -> TensorRecord:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def describe(ckpt: Checkpoint, digests: bool) -> dict:
    """The ``base``/``tuned`` entry of the JSON: path, format, sizes, dtypes, files."""
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
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


def compare(base: PathLike | Sequence[PathLike], tuned: PathLike, *, options: CompareOptions | None = None,
            progress: Progress | None = None, on_plan: Callable[[Plan], None] | None = None,
            hash_files: bool = False, command: str | None = None, compute: Compute | None = None,
            **kwargs: Any) -> Comparison:
    """Compare a fine-tuned checkpoint against its base (or several bases of a composite model).

    ``base`` is one path or a list of paths; ``tuned`` one path. Options are those of
    ``CompareOptions`` (``rank``, ``rank_k``, ``device``, ``threads``, ``include``,
    ``exclude``, ...), given as keywords or as ``options=``. ``on_plan`` receives the
    pairing plan before any tensor data is read; ``progress(done, total, name)``
    receives element counts while tensors stream. ``hash_files`` adds the sha256 of
    every input file (one extra read of each file) for the memo's reproducibility block.
    ``compute`` replaces ``compute_all`` (same arguments, same return): a split comparison
    (weightdiff.split) measures the pairs on workers; everything else stays the same.
    Raises WeightdiffError for bad input.
    """
    if options is None:
        options = options_from_kwargs(CompareOptions, **kwargs)
    elif kwargs:
        options = options_from_kwargs(CompareOptions, **{**_as_kwargs(options), **kwargs})
    if options.device == "cuda":        # fail before any reading, not after the plan
        from .kernels import cuda

        cuda.require_device("cuda")
    base_paths = [base] if isinstance(base, (str, os.PathLike)) else list(base)
    with ExitStack() as stack:
        bases = [stack.enter_context(locate(p)) for p in base_paths]
        tuned_ck = stack.enter_context(locate(tuned))
        the_plan = make_plan(bases, tuned_ck, include=options.include, exclude=options.exclude)
        if on_plan is not None:
            on_plan(the_plan)
        records, seconds = (compute or compute_all)(the_plan, bases, tuned_ck, options, progress)
        blocks, modules, summary = aggregate(records, options.thresholds)
        base_desc = [describe(b, hash_files) for b in bases]
        tuned_desc = describe(tuned_ck, hash_files)
    return Comparison(
        settings=options.settings(), base=base_desc, tuned=tuned_desc, plan=the_plan.to_dict(),
        summary=summary, modules=modules, blocks=blocks, tensors=records,
        run={"seconds": round(seconds, 3), "command": command, "versions": versions(),
             "threads": options.threads})


def _as_kwargs(options: CompareOptions) -> dict:
    from dataclasses import fields

    return {f.name: getattr(options, f.name) for f in fields(options)}
