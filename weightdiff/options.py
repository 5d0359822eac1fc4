"""Frozen options: the single source of the library's keyword arguments and the CLI's flags.

``CompareOptions`` lists every knob of ``weightdiff.compare()``; ``click_options()``
turns the same fields into click flags, so the library and the CLI cannot drift.
``Thresholds`` is the one documented place where the verdict's numbers live; they
are copied into the JSON under ``settings.thresholds``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .errors import OptionsError


def _opt(default: Any, help: str, flag: str | None = None, **click_kw: Any) -> Any:
    meta = {"help": help, "flag": flag, "click": click_kw}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Thresholds:
    """Numbers behind ``summary.verdict``, ``form`` and the per-tensor status.

    See docs/methodology.md for what each means and why it has the value it has.
    """

    #: a tensor whose share of elements beyond rounding is at most this is `rounding`
    rounding_frac: float = 0.0
    #: `unrelated` when the parameter-weighted cosine over large matrices is below this ...
    unrelated_cosine: float = 0.2
    #: ... and the model-level relative change is above this (independent inits give ~sqrt(2))
    unrelated_rel_change: float = 0.9
    #: ... and that cosine is below this too: independently initialised models stay near 0 (about
    #: 1/sqrt(elements)); between this and `unrelated_cosine` the large matrices keep a faint share of the
    #: base (a merge with another model, training far from it), so the verdict is `inconclusive`
    independent_cosine: float = 0.05
    #: matrices with at least this many elements count as "large" in relatedness evidence
    large_matrix_numel: int = 4096
    #: a singular value counts toward numerical_rank when above this multiple of noise_floor
    noise_floor_factor: float = 1.5
    #: form is `low_rank` when every changed matrix has min(energy_rank_99, numerical_rank) <= this share
    #: of 2mn / (m + n), the harmonic mean of the sides (at least 1; a tenth of a square matrix's side: its factors
    #: take at most a fifth of its parameters; numerical_rank because storage rounding inflates energy ranks) ...
    low_rank_share: float = 0.1
    #: ... and numerical_rank at most this
    low_rank_max: int = 256
    #: form is `sparse` when the changed elements are at most this share of the changed tensors' elements
    sparse_frac: float = 0.1
    #: form is `mixed` when low-rank matrices hold at least this share of the changed matrices' parameters (and
    #: others the rest); `undecided` when matrices of undecided rank hold at least this share
    mixed_min_share: float = 0.05
    #: `inconclusive` when the compared share of the large-matrix parameters is below this on both sides
    min_coverage: float = 0.25

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CompareOptions:
    """Options of ``weightdiff.compare()``; each field is also a ``weightdiff compare`` flag."""

    rank: bool = _opt(True, "Analyse the spectrum (rank) of every changed matrix.",
                      flag="--rank/--no-rank")
    rank_k: int = _opt(64, "Number of top singular values kept per matrix.", flag="--rank-k")
    subspace: bool = _opt(False, "Also measure the rank of base and tuned weights and the overlap "
                          "of their top-k singular subspaces (costs about 2 extra SVDs per matrix).",
                          flag="--subspace/--no-subspace")
    device: str = _opt("cpu", "Compute backend: cpu (numba) or cuda (torch).", flag="--device",
                       type_choice=("cpu", "cuda"))
    threads: int | None = _opt(None, "CPU threads for the kernels (default: all cores).",
                               flag="--threads")
    include: tuple[str, ...] = _opt((), "Only compare tensors whose tuned name matches this glob "
                                    "(repeatable).", flag="--include", multiple=True)
    exclude: tuple[str, ...] = _opt((), "Skip tensors whose tuned name matches this glob "
                                    "(repeatable).", flag="--exclude", multiple=True)
    rename: tuple[str, ...] = _opt((), "Rename tuned tensors before pairing: FROM=TO replaces FROM in every "
                                   "tuned name (repeatable, applied in order).", flag="--rename", multiple=True)
    seed: int = _opt(0, "Seed of the randomized SVD (results are bitwise repeatable per seed).",
                     flag="--seed")
    exact_svd_max: int = _opt(8192, "Matrices whose smaller side is at most this get an exact "
                              "spectrum (on the CPU from the Gram matrix summed while the tensors "
                              "stream, so they are read once); larger ones a seeded randomized top-k "
                              "SVD, with ranks beyond k reported as bounds. 1024 is about 3x faster "
                              "on 4096-wide models.", flag="--exact-svd-max")
    spectrum: str = _opt("full", "How the rank of a matrix summed as a Gram matrix on the CPU is read: full "
                         "(its eigenvalues: every rank field exact) or count (numerical_rank certified by two "
                         "LDL^T inertia counts, the other fields from the top k as bounds; a Mistral-7B layer "
                         "took half the time on a 2-core CPU).", flag="--spectrum", type_choice=("full", "count"))
    cache: str | None = _opt(None, "Folder keeping each tensor's record as soon as it is measured (and "
                             "measured again beneath a reparametrisation found): "
                             "rerunning the same command resumes an interrupted run, and with other outputs "
                             "(--memo, --hash) re-renders from it; another option, an input file with another "
                             "inode, size, mtime or ctime, or (with --hash) other bytes than a record was "
                             "measured from, measures again.", flag="--cache")
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        # integers a result may hold (the JSON contract's cap): a seed of 2**80 ran a whole comparison
        # whose result the report reader then refused
        for name in ("rank_k", "seed", "exact_svd_max", "threads"):
            v = getattr(self, name)
            if v is not None and not -(2 ** 63) < v < 2 ** 63:
                raise OptionsError(f"{name} must be below 2**63 (got {v})", option=name)
        if self.seed < 0:
            raise OptionsError(f"seed must be non-negative (got {self.seed})", option="seed")
        if self.rank_k < 1:
            raise OptionsError(f"rank_k must be at least 1 (got {self.rank_k})", option="rank_k")
        if self.device not in ("cpu", "cuda"):
            raise OptionsError(f"device must be cpu or cuda (got {self.device!r})", option="device")
        if self.spectrum not in ("full", "count"):
            raise OptionsError(f"spectrum must be full or count (got {self.spectrum!r})", option="spectrum")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be at least 1 (got {self.threads})", option="threads")
        if self.exact_svd_max < 0:
            raise OptionsError(f"exact_svd_max must be non-negative (got {self.exact_svd_max})",
                               option="exact_svd_max")
        # accept lists from Python callers but keep the object hashable and frozen
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "rename", tuple(self.rename))
        for rule in self.rename:
            if "=" not in rule or rule.startswith("="):
                raise OptionsError(f"rename rule {rule!r} is not FROM=TO with a non-empty FROM", option="rename")

    def settings(self) -> dict:
        """The options as they go into the JSON ``settings`` block (threads and the cache folder
        left out: results do not depend on them, and the JSON must not either)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("thresholds", "threads", "cache")}
        d["backend"] = "numba" if self.device == "cpu" else "torch"
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        d["rename"] = list(self.rename)
        d["thresholds"] = self.thresholds.to_dict()
        return d


@dataclass(frozen=True)
class HubOptions:
    """How a Hugging Face Hub repo id given as a checkpoint is read (weightdiff.hub).

    None of these changes a number: a streamed and a downloaded comparison give the same
    JSON, so they stay out of ``settings`` (the mode used is recorded under ``run``).
    """

    download: bool | None = _opt(None, "Hub repo ids: download the weights into the Hugging Face cache "
                                 "(--download), or read them by HTTP range requests without storing "
                                 "anything (--stream). Default: the cache when it holds them, else download "
                                 "up to --stream-above and stream above.", flag="--download/--stream")
    offline: bool = _opt(False, "Hub repo ids: use the local Hugging Face cache only, as HF_HUB_OFFLINE=1 "
                         "does.", flag="--offline", is_flag=True)
    stream_above: float = _opt(8.0, "Hub repo ids: stream instead of downloading when the weights exceed "
                               "this many GB.", flag="--stream-above")
    progress: bool = True    # the library's download progress bars (on stderr)
    #: (spelling, commit) pairs: read that spelling at that commit, not at what its revision names now
    #: (a parent's resolution handed to Dask workers and survey tasks, so all of a run reads one commit)
    pinned: tuple = ()

    def commit_of(self, spelling: object) -> str | None:
        """The commit ``spelling`` is pinned to, or None (resolve its revision)."""
        return next((c for s, c in self.pinned if s == spelling), None)

    def __post_init__(self) -> None:
        if not self.stream_above >= 0:
            raise OptionsError(f"--stream-above must be a non-negative number of GB (got {self.stream_above})")

    @classmethod
    def pop_from(cls, kwargs: dict) -> "HubOptions":
        """Take this class's fields out of a dict of click values (they arrive mixed with others)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})


def click_options(cls: type = CompareOptions) -> Callable:
    """Decorator adding one click option per field of ``cls`` that declares a flag."""
    import click

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields(cls)):
            meta = f.metadata
            if not meta or not meta.get("flag"):
                continue
            kw = dict(meta["click"])
            choice = kw.pop("type_choice", None)
            if choice:
                kw["type"] = click.Choice(choice)
            elif f.type in ("int", "int | None"):
                kw["type"] = int
            default = f.default
            fn = click.option(meta["flag"], f.name, default=default, show_default=default not in (None, ()),
                              help=meta["help"], **kw)(fn)
        return fn

    return decorate


def flag_of(option: str, *classes: type) -> str | None:
    """The CLI flag of an option field (``rank_k`` -> ``--rank-k``), or None."""
    for cls in classes or (CompareOptions,):
        for f in fields(cls):
            if f.name == option and f.metadata.get("flag"):
                return f.metadata["flag"].split("/")[0]
    return None


def options_from_kwargs(cls: type = CompareOptions, **kwargs: Any) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise OptionsError(f"unknown option {unknown[0]!r}", f"known: {', '.join(sorted(names))}")
    return cls(**kwargs)


@dataclass(frozen=True)
class ProvenanceOptions:
    """Options of ``weightdiff.provenance()``; each flagged field is also a CLI flag."""

    screen: bool | None = _opt(None, "Screen on a seeded sample of rows before the full comparison "
                               "(default: when there are more candidates than --full-top).",
                               flag="--screen/--no-screen")
    full_top: int = _opt(3, "Candidates compared in full after screening.", flag="--full-top")
    sample_kib: int = _opt(4096, "Screening sample per checkpoint, in KiB of stored rows.", flag="--sample-kib")
    permutations: bool = _opt(True, "Find and undo permuted MLP neurons before comparing.",
                              flag="--permutations/--no-permutations")
    exact_max: int = _opt(2048, "MLPs with at most this many neurons are matched exactly; larger ones "
                          "on seeded random projections.", flag="--exact-max")
    min_neuron_cosine: float = 0.5   # a neuron matching counts only when matched neurons agree this well
    seed: int = _opt(0, "Seed of the screening sample and the projections.", flag="--seed")
    device: str = _opt("cpu", "Compute backend: cpu (numba) or cuda (torch).", flag="--device",
                       type_choice=("cpu", "cuda"))
    threads: int | None = _opt(None, "CPU threads for the kernels (default: all cores).", flag="--threads")
    include: tuple[str, ...] = _opt((), "Only compare tensors whose tuned name matches this glob "
                                    "(repeatable).", flag="--include", multiple=True)
    exclude: tuple[str, ...] = _opt((), "Skip tensors whose tuned name matches this glob (repeatable).",
                                    flag="--exclude", multiple=True)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        for name in ("full_top", "sample_kib", "exact_max", "seed", "threads"):
            v = getattr(self, name)
            if v is not None and not -(2 ** 63) < v < 2 ** 63:
                raise OptionsError(f"{name} must be below 2**63 (got {v})", option=name)
        if self.full_top < 1:
            raise OptionsError(f"full_top must be at least 1 (got {self.full_top})", option="full_top")
        if self.sample_kib < 1:
            raise OptionsError(f"sample_kib must be at least 1 (got {self.sample_kib})", option="sample_kib")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def compare_options(self) -> CompareOptions:
        return CompareOptions(rank=False, device=self.device, threads=self.threads, include=self.include,
                              exclude=self.exclude, seed=self.seed, thresholds=self.thresholds)

    def settings(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("thresholds", "threads")}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["thresholds"] = self.thresholds.to_dict()
        return d
