"""One large comparison split by tensor: the parent plans, workers measure, the parent judges.

``compare(base, tuned, workers=N | scheduler=ADDRESS | client=...)`` runs
``weightdiff.compare`` with one change: instead of measuring every pair itself, the
parent cuts the plan (made from headers alone) into groups of pairs balanced by the
bytes they read, and each Dask task measures one group with ``compute.compute_some``,
reading its tensors from the same paths (a shared filesystem). The records come back
to the parent, go back into plan order, and the parent aggregates and judges them with
the code of a local run: the JSON is the same bytes as an unsplit comparison's.

A worker plans again from the headers it sees and checks that the plan is the
parent's (same pairs, shapes, dtypes), so a worker that sees other files at those paths
fails loudly instead of measuring the wrong model.

A Hub repo id is read by each worker at the commit the parent resolved (never at what its
branch names by then), the way the parent read it: streamed when the parent streamed,
from the cache only when the parent was offline (or fell back to the cache), else through
the cache (downloading there when it lacks the files). A worker that finds another commit
or other files than the parent's refuses to measure.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack
from typing import Any, Callable, Sequence

from .io.checkpoint import Checkpoint, locate
from .cluster import Sequential, runner, worker_threads
from .comparison import Comparison, PathLike, check_adapter_plan, compare as local_compare
from .judge.status import classify
from .measure.backend import backend_for
from .measure.compute import Progress, compute_some, streamed
from .errors import WeightdiffError
from .kernels.dtypes import byte_length
from .options import CompareOptions, HubOptions
from .pairing.plan import Pair, Plan, plan as make_plan
from .records import TensorRecord, dumps

#: groups per worker: more, smaller groups even out tensors of unequal cost (rank analysis)
GROUPS_PER_WORKER = 4


class SplitError(WeightdiffError):
    """A worker could not measure its share (exit code 1: not the user's input)."""

    exit_code = 1


def pair_bytes(pair: Pair) -> int:
    """Bytes a worker reads to measure ``pair`` (both sides; 0 for pairs that read nothing)."""
    n = streamed(pair)
    if not n:
        return 0
    return byte_length(pair.dtype_base, n) + byte_length(pair.dtype_tuned or pair.dtype_base, n)


def balanced_groups(weights: Sequence[int], n_groups: int) -> list[list[int]]:
    """Indices cut into at most ``n_groups`` groups of near-equal total weight (heaviest first,
    each to the lightest group so far; ties to the lower group), each group in index order.

    >>> balanced_groups([5, 1, 4, 2, 3], 2)
    [[0, 1, 3], [2, 4]]
    """
    n_groups = max(1, min(n_groups, len(weights)))
    loads = [0] * n_groups
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        g = min(range(n_groups), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += weights[i]
    return [sorted(g) for g in groups if g]


def plan_digest(plan: Plan) -> str:
    """sha256 of every pair (names, kinds, shapes, dtypes) and the alignment of a plan."""
    blob = dumps({"pairs": [p.to_dict() for p in plan.pairs], "alignment": plan.alignment})
    return hashlib.sha256(blob.encode()).hexdigest()


def worker_hub(spelling: str, ck: Checkpoint, hub: HubOptions | None) -> HubOptions | None:
    """How a worker reads a Hub checkpoint the parent located: at the parent's commit, in the parent's
    mode (None for a local checkpoint)."""
    if ck.hub is None or ck.hub_run is None:
        return None
    mode = ck.hub_run.get("mode")
    return HubOptions(download=mode != "stream", offline=bool(ck.hub_run.get("offline")),
                      stream_above=(hub or HubOptions()).stream_above, progress=False,
                      pinned=((spelling, ck.hub["commit"]),))


def _hub_identity(hub: dict | None) -> dict | None:
    return None if hub is None else {k: hub.get(k) for k in ("repo_id", "commit", "subfolder", "files")}


def measure_task(base_paths: list[str], tuned_path: str, options: CompareOptions, indices: list[int],
                 digest: str, digests: dict[str, str] | None = None,
                 hubs: Sequence[tuple[HubOptions | None, dict | None]] | None = None) -> tuple:
    """A worker's share: ``("ok", records)`` in the order of ``indices``, or ``("error", line, code)``.
    ``digests``: the sha256 of files the parent hashed, by real path (the record cache keys by them).
    ``hubs``: per path (bases, then tuned), how to read a Hub id and the identity the parent read."""
    hubs = list(hubs) if hubs else [(None, None)] * (len(base_paths) + 1)
    try:
        with ExitStack() as stack:
            bases = [stack.enter_context(locate(p, h)) for p, (h, _) in zip(base_paths, hubs)]
            tuned = stack.enter_context(locate(tuned_path, hubs[-1][0]))
            for path, ck, (_, want) in zip([*base_paths, tuned_path], (*bases, tuned), hubs):
                if want is not None and _hub_identity(ck.hub) != _hub_identity(want):
                    got = (ck.hub or {}).get("commit") or "a local path"
                    raise SplitError(f"{path}: this worker read commit {str(got)[:12]} or other files, not the "
                                     f"parent's commit {want['commit'][:12]}",
                                     "do the parent and every worker see the same Hub (HF_ENDPOINT) and cache?")
            if digests:
                for ck in (*bases, tuned):
                    ck.digests = {os.path.realpath(f): digests[os.path.realpath(f)] for f in ck.files
                                  if os.path.realpath(f) in digests} or None
            the_plan = make_plan(bases, tuned, include=options.include, exclude=options.exclude,
                                 rename=options.rename)
            # the parent's checks of an adapter, which also orient each factor pair and IA3 vector (a GPT-2
            # Conv1D weight is stored [in, out]): unchecked, a worker measured B @ A against the weight untransposed
            check_adapter_plan(the_plan, bases, tuned)
            if plan_digest(the_plan) != digest:
                raise SplitError(f"{tuned_path}: this worker pairs the tensors differently from the parent",
                                 "do the parent and every worker see the same files at these paths?")
            backend = backend_for(options.device, options.threads)
            return ("ok", compute_some(the_plan, indices, bases, tuned, options, backend, classify))
    except WeightdiffError as exc:
        return ("error", exc.one_line(), exc.exit_code)
    except MemoryError:
        return ("error", f"{tuned_path}: out of memory on a worker (give workers more memory)", 1)


def distributed_compute(run: Any, base_paths: list[str], tuned_path: str, task_options: CompareOptions,
                        say: Callable[[str], None], hub: HubOptions | None = None) -> Callable:
    """A ``compute`` for ``weightdiff.compare``: the plan's pairs measured on ``run``'s workers."""

    def compute(the_plan: Plan, bases: Sequence[Checkpoint], tuned: Checkpoint, options: CompareOptions,
                backend: Any, classify_: Any, progress: Progress | None) -> tuple[list[TensorRecord], float]:
        # the workers choose their own backend and use the judge's classify (see measure_task)
        t0 = time.perf_counter()
        weights = [pair_bytes(p) for p in the_plan.pairs]
        groups = balanced_groups(weights, GROUPS_PER_WORKER * run.workers)
        digest = plan_digest(the_plan)
        say(f"measuring {len(the_plan.pairs)} tensor pairs ({sum(weights) / 1e9:.2f} GB) in {len(groups)} "
            f"groups on {run.description}")
        total = sum(streamed(p) for p in the_plan.pairs)
        done = 0
        records: list[TensorRecord | None] = [None] * len(the_plan.pairs)
        digests = {k: v for ck in (*bases, tuned) for k, v in (getattr(ck, "digests", None) or {}).items()}
        # Hub ids: the commit, files and mode the parent resolved (a branch may move during the run)
        hubs = [(worker_hub(p, ck, hub), ck.hub) for p, ck in zip([*base_paths, tuned_path], (*bases, tuned))]
        args = [(base_paths, tuned_path, task_options, g, digest, digests or None,
                 hubs if any(h for h, _ in hubs) else None) for g in groups]
        for oc in run.map(measure_task, args, name="split"):
            if oc.error is not None:
                msg = f"group {oc.index + 1} of {len(groups)} failed: {oc.error}"
                # workers killed (for memory): the machine's limits, not a bug to report
                raise WeightdiffError(msg) if oc.killed else SplitError(msg)
            if oc.value[0] != "ok":
                _, line, code = oc.value
                err = WeightdiffError(line) if code == 2 else SplitError(line)
                raise err
            for i, rec in zip(groups[oc.index], oc.value[1]):
                records[i] = rec
            done += sum(streamed(the_plan.pairs[i]) for i in groups[oc.index])
            if progress is not None:
                progress(done, total, f"group {oc.index + 1}")
        if progress is not None:
            progress(total, total, "")
        return [r for r in records if r is not None], time.perf_counter() - t0

    return compute


def _absolute(path: PathLike) -> str:
    """An existing local path made absolute for the workers; anything else (a repo id) as given."""
    return os.path.abspath(path) if os.path.exists(path) else os.fspath(path)


def compare(base: PathLike | Sequence[PathLike], tuned: PathLike, *, options: CompareOptions,
            scheduler: str | None = None, workers: int | None = None, memory_limit: str | None = None,
            client: Any = None, say: Callable[[str], None] = lambda m: None, **kwargs: Any) -> Comparison:
    """``weightdiff.compare`` with the pairs measured on Dask workers (same JSON bytes).

    ``scheduler``, ``workers``, ``memory_limit`` and ``client`` as in ``weightdiff.cluster.runner``;
    other keywords go to ``weightdiff.compare`` (``progress``, ``on_plan``, ``hash_files``,
    ``command``). Without Dask and without ``scheduler`` it is a plain local comparison.
    """
    base_paths = [_absolute(base)] if isinstance(base, (str, os.PathLike)) else [_absolute(b) for b in base]
    tuned_path = _absolute(tuned)
    from dataclasses import replace

    if options.cache:       # the parent's folder: a worker's current directory is another machine's
        options = replace(options, cache=os.path.abspath(options.cache))
    task_options = options
    if workers and client is None and scheduler is None and options.threads is None:
        task_options = replace(options, threads=worker_threads(workers))
    with runner(scheduler, workers, memory_limit, client, say) as run:
        # the parent's JSON keeps the paths as given; workers get absolute ones
        compute = None if isinstance(run, Sequential) else \
            distributed_compute(run, base_paths, tuned_path, task_options, say, kwargs.get("hub"))
        return local_compare(base, tuned, options=options, compute=compute, **kwargs)
