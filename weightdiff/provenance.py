"""Which base was this model derived from? Rank candidate bases by weight-space evidence.

``provenance(tuned, candidates)`` compares one model against several candidate bases
and ranks them. Evidence per candidate: the global relative change, the
parameter-weighted cosine and relative change over large matrices (norm gains,
biases and small matrices are left out: vectors near 1 or 0 make any two models
look alike), the share of tensors bitwise identical, the per-block relative change,
and coverage (the share of the tuned model's parameters the candidate shares by
name and shape). Each candidate is ``derived`` or ``unrelated`` by the thresholds of
weightdiff.options.Thresholds, against the reference of two independently
initialized models (relative change near sqrt(2), cosine near 0). Candidates that
share no large matrix are listed as incompatible with the reason.

With many candidates a screening pass first reads a fixed seeded sample of rows of
each large non-MLP matrix (``sample_kib`` per checkpoint, through ``read_rows``) and
only the leading ``full_top`` candidates get the full comparison. Permuted MLP
neurons are found and undone before comparing (weightdiff.measure.permutation).
Lineage chains (base -> SFT -> DPO) live in weightdiff.lineage.
"""

from __future__ import annotations

import math
import os
import time
from types import SimpleNamespace
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np

from ._callable import callable_module
from ._version import __version__
from .io.checkpoint import Checkpoint, is_hub_candidate, locate
from .io.declared import declared
from .io.located import weight_files
from .comparison import compare_with_progress, describe, hub_run, run_date, versions
from .errors import CheckpointError, OptionsError, WeightdiffError, escape_name
from .kernels.dtypes import DTYPES, decode
from .options import HubOptions, ProvenanceOptions, Thresholds, options_from_kwargs
from .pairing.plan import plan as make_plan
from .measure.permutation import Finding, detect_permutations, mlp_groups, undo_member
from .records import dumps
from .render.formats import num, sci, share
from .judge.relatedness import (EXCLUDED_NOTE, LIMITS, MARGINS, REFERENCE, components, evidence, judge,
                                large_matrix_relatedness, near_tie, rank_key, sample_plan, sample_rows,
                                sampled_sums, screen_estimate, weak_by)
from .judge.ties import promote, singles_out, within_margin
from .render.formats import count
from .render.sentences import parts_text

SCHEMA = "weightdiff.provenance/1"
PathLike = Union[str, os.PathLike]
_NO_PAIR = ("added", "removed", "mismatch", "lora", "inherited")


@dataclass
class ProvenanceResult:
    """The ranking; ``to_dict()`` is the ``weightdiff.provenance/1`` JSON."""

    settings: dict
    tuned: dict
    candidates: list[dict]
    incompatible: list[dict]
    screening: dict | None
    findings: list[str]
    run: dict = field(default_factory=dict)

    @property
    def leading(self) -> str | None:
        return next((c["path"] for c in self.candidates if c["verdict"] == "derived"), None)

    @property
    def answer(self) -> dict:
        """How the answer is stated (see ``_answer``): its kind and the candidates it names."""
        return _answer(self.candidates, len(self.incompatible))

    def to_dict(self, include_run: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA, "tool": {"name": "weightdiff", "version": __version__},
            "settings": self.settings, "tuned": self.tuned, "reference": dict(REFERENCE),
            "relatedness": EXCLUDED_NOTE.format(n=self.settings["thresholds"]["large_matrix_numel"]),
            "leading": self.leading, "answer": self.answer, "margins": dict(MARGINS),
            "candidates": self.candidates, "incompatible": self.incompatible,
            "screening": self.screening, "findings": self.findings, "limits": list(LIMITS)}
        if include_run:
            d["run"] = self.run
        return d

    def to_json(self, include_run: bool = True) -> str:
        return dumps(self.to_dict(include_run))


# ---------------------------------------------------------------- the library call

def provenance(tuned: PathLike, candidates: Sequence[PathLike], *, options: ProvenanceOptions | None = None,
               progress: Callable[[str], None] | None = None, command: str | None = None,
               hub: HubOptions | None = None, measure_progress: Callable[[], Any] | None = None,
               **kwargs: Any) -> ProvenanceResult:
    """Rank ``candidates`` as possible bases of ``tuned``; options as in ProvenanceOptions.

    ``measure_progress``: as ``lineage``'s, for each candidate's full comparison.

    ``progress`` receives one-line status messages (for stderr). Models may be Hub repo
    ids; ``hub`` (HubOptions) says how they are read (screening a streamed candidate fetches
    only its sampled rows by range requests). Raises WeightdiffError for bad input: a
    missing path, an unreadable tuned model, a PEFT adapter as the tuned model (it holds LoRA
    factors, not weights to match: compare it with its base instead), no candidates (none left once
    the tuned model itself and repeats are dropped), an ``include``/``exclude`` that leaves no
    tuned tensor.
    """
    if options is None:
        options = options_from_kwargs(ProvenanceOptions, **kwargs)
    if not candidates:
        raise OptionsError("candidates: none given", "pass at least one candidate base", option="candidates")
    for p in [tuned, *candidates]:
        if not os.path.exists(p) and not is_hub_candidate(p):
            raise CheckpointError(p, "no such file or directory")
    if is_hub_candidate(tuned):
        from .io.hub import preflight

        preflight([tuned], hub)
    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    date = run_date()
    thr = options.thresholds
    with ExitStack() as stack:
        tck = stack.enter_context(locate(tuned, hub))
        if tck.origin:
            say(tck.origin)
        _refuse_adapter(tuned, tck)
        # the filters concern the tuned model's names: one that leaves nothing is bad input, never a
        # candidate that "cannot be read"
        make_plan([], tck, include=options.include, exclude=options.exclude, content=False, reorder=False)
        entries, incompatible = [], []
        unique, duplicates = _dedupe(candidates)
        seen = {weight_files(tck): None}      # the tuned model's own files: a candidate naming them is itself
        for path in unique:
            try:
                ck = stack.enter_context(locate(path, hub))
                if ck.origin:
                    say(ck.origin)
                if ck.format == "adapter":
                    kind = "a llama.cpp LoRA adapter" if ck.gguf_lora is not None else "a PEFT adapter"
                    incompatible.append({"path": str(path), "reason": f"{kind} (a change), not a model's "
                                         "weights: give it merged into its base"})
                    continue
                key = weight_files(ck)
                if key in seen:
                    duplicates.append((str(path), seen[key], "same weight files"))
                    continue
                seen[key] = str(path)
                pl = make_plan([ck], tck, include=options.include, exclude=options.exclude, reorder=False)
            except OptionsError:
                raise
            except WeightdiffError as exc:
                incompatible.append({"path": str(path), "reason": f"cannot be read: {exc.one_line()}"})
                continue
            entry = _Entry(str(path), ck, *_shared(pl, tck, thr))
            if entry.large:
                entries.append(entry)
            else:
                incompatible.append({"path": str(path), "reason": _why_incompatible(pl, tck)})
        if not entries and not incompatible:
            raise OptionsError("candidates: every candidate is the tuned model itself (the same weight files)",
                               "list the candidate bases after TUNED, not TUNED again", option="candidates")
        do_screen = options.screen if options.screen is not None else len(entries) > options.full_top
        screening = None
        screened_names: frozenset = frozenset()
        if do_screen and entries:
            say(f"screening {len(entries)} candidates on a sample of rows")
            screening, screened_names = _screen(entries, tck, options)
            entries.sort(key=_screen_key)
            full = _first_full(entries, options.full_top)
        else:
            full = list(entries)
        done: dict[int, dict] = {}
        while True:
            for e in full:
                if id(e) not in done:
                    say(f"comparing {e.path} in full")
                    done[id(e)] = _full(e, tuned, tck, options, screened_names, measure_progress)
            full = _must_compare(entries, done)
            if not full:
                break
        rows = []
        for e in entries:
            if id(e) in done:
                if done[id(e)]["relative_change_large"] is None:
                    # nothing measured is no evidence either way: listed as not compared, never "unrelated"
                    incompatible.append({"path": e.path, "reason": _why_unmeasured(done[id(e)])})
                    continue
                rows.append(done[id(e)])
            else:
                rows.append({"path": e.path, "format": e.ck.format, "params": e.ck.params,
                             "verdict": e.screen["verdict"], "compared": "sample",
                             "coverage": e.coverage, "params_shared": e.shared,
                             "relative_change": None, "relative_change_large": e.screen["relative_change_large"],
                             "cosine_large": e.screen["cosine_large"], "identical_share": None,
                             "blocks": [], "permutation": None, "negated": None, "screen": e.screen})
        # one ranking by the evidence, whatever the comparison mode: a sampled candidate is compared in
        # full whenever its sample cannot rule out that it beats the leader (_must_compare)
        rows.sort(key=rank_key)
        # within the near-tie margin of the pooled number, a candidate the blocks single out ranks first
        rows = promote(rows)
        for c in rows:
            c.pop("_screened", None)
        if screening is not None:
            screening["compared_in_full"] = sum(c["compared"] == "full" for c in rows)
        for i, c in enumerate(rows, 1):
            c["rank"] = i
        tuned_desc = {"path": str(tuned), "format": tck.format, "params": tck.params,
                      # its files' names and sizes: a combined report tells models apart by them, not by a spelling
                      "files": [{"name": f["name"], "bytes": f["bytes"]} for f in describe(tck, False)["files"]]}
        if tck.hub is not None:
            tuned_desc["hub"] = {k: v for k, v in tck.hub.items() if k != "files"}
        run = {"date": date, "seconds": round(time.perf_counter() - t0, 3), "command": command,
               "versions": versions()}
        hub_reads = hub_run([tck, *(e.ck for e in entries)])
        if hub_reads:
            run["hub"] = hub_reads
    return ProvenanceResult(
        settings=options.settings(), tuned=tuned_desc, candidates=rows, incompatible=incompatible,
        screening=screening, findings=_findings(rows, incompatible, screening, thr, duplicates), run=run)


def _refuse_adapter(tuned: PathLike, tck: Checkpoint) -> None:
    """A PEFT adapter holds LoRA factors or IA3 vectors, not a model's weights: merged into any candidate it would
    make that candidate look like its base, so provenance refuses it (compare it with its base)."""
    if tck.format != "adapter":
        return
    names = declared(tck)["declares_base"]
    gguf = getattr(tck, "gguf_lora", None) is not None
    where = "model card in its GGUF metadata" if gguf else "adapter_config.json"
    said = f" (its {where} names `{names}` as its base)" if names else ""
    kind = "a llama.cpp LoRA adapter" if gguf else "a PEFT adapter"
    raise CheckpointError(tuned, f"is {kind} (a change, not a model's weights): provenance has "
                                 f"nothing to match against the candidates{said}",
                          "run `weightdiff compare BASE ADAPTER` to see what it changes, or give the adapter "
                          "merged into its base as TUNED")


def _why_unmeasured(row: dict) -> str:
    return ("no large matrix could be measured: every shared large matrix has non-finite norms"
            if row.get("nonfinite") else "no large matrix could be measured")


@dataclass(eq=False)
class _Entry:
    path: str
    ck: Checkpoint
    name_map: dict          # tuned name -> base name, for pairs of equal shape
    large: dict             # tuned name -> (tuned read name, base name, usable rows, shape, dtype_t, dtype_b)
    shared: int             # tuned parameters the candidate shares by name and shape
    coverage: float | None
    screen: dict | None = None


def _dedupe(candidates: Sequence[PathLike]) -> tuple[list[PathLike], list[tuple[str, str | None, str]]]:
    """The candidates with repeats of one path removed (``B``, ``./B``, ``B/``, a symlink to
    ``B``: the same real path), first spelling kept; and (dropped, kept, why) for each repeat.
    Spellings of one checkpoint by other paths (``B`` and ``B/model.safetensors``) are found once
    located, by their weight files (``io.located.weight_files``)."""
    seen: dict[str, str] = {}
    unique, dropped = [], []
    for p in candidates:
        key = os.path.realpath(p) if os.path.exists(p) else str(p)
        if key in seen:
            dropped.append((str(p), seen[key], "same real path"))
            continue
        seen[key] = str(p)
        unique.append(p)
    return unique, dropped


def _screen_key(e: "_Entry") -> tuple:
    return rank_key({"path": e.path, **e.screen})


def _first_full(entries: list["_Entry"], full_top: int) -> list["_Entry"]:
    """The leading ``full_top`` by the screening estimate, and every derived candidate tied with the
    last of them (within ``near_tie_ratio``): who gets a full comparison never depends on the path."""
    full = entries[:full_top]
    if len(entries) > full_top:
        cut = entries[full_top - 1].screen
        if cut["verdict"] == "derived":
            full += [e for e in entries[full_top:] if e.screen["verdict"] == "derived"
                     and near_tie(cut["relative_change_large"], e.screen["relative_change_large"])]
    return full


def _must_compare(entries: list["_Entry"], done: dict[int, dict]) -> list["_Entry"]:
    """Sampled candidates whose sample cannot rule out that they beat the leader of the full comparisons.

    The sample leaves the MLP matrices out, so a candidate is compared in full when even its lowest
    possible full relative change (its sampled change with MLPs that matched exactly,
    ``relative_change_floor``) is not above the leader's, or when its sampled change is within
    ``near_tie_ratio`` of the leader's change over the same matrices; with no derived leader, every
    candidate the sample reads derived."""
    full_rows = [r for r in done.values() if r["verdict"] == "derived"]
    lead = min(full_rows, key=rank_key) if full_rows else None
    out = []
    for e in entries:
        if id(e) in done or e.screen is None:
            continue
        est = e.screen
        if lead is None or est["relative_change_large"] is None:
            if est["verdict"] == "derived" or est["relative_change_large"] is None:
                out.append(e)
            continue
        floor = est.get("relative_change_floor")
        if est["verdict"] == "derived" and (
                (floor is not None and lead["relative_change_large"] is not None
                 and floor <= lead["relative_change_large"])
                or near_tie(lead.get("_screened"), est["relative_change_large"])):
            out.append(e)
    return out


def _shared(pl, tck: Checkpoint, thr: Thresholds) -> tuple[dict, dict, int, float | None]:
    name_map, large, shared = {}, {}, 0
    for pr in pl.pairs:
        if pr.kind in _NO_PAIR or pr.base_name is None or pr.tuned_name is None or pr.shape_tuned is None:
            continue
        shape = tuple(pr.shape_tuned)
        rows = int(pr.overlap_rows) if pr.kind == "resized" else (shape[0] if shape else 1)
        numel = rows * math.prod(shape[1:]) if shape else 1
        shared += numel
        read_name = getattr(pr, "tuned_source", None) or pr.tuned_name
        if not getattr(pr, "tied", False) and pr.kind != "resized":
            name_map[pr.tuned_name] = pr.base_name
        if (len(shape) >= 2 and numel >= thr.large_matrix_numel and DTYPES[pr.dtype_tuned].decodable
                and DTYPES[pr.dtype_base].decodable and DTYPES[pr.dtype_tuned].kind == "float"):
            large[pr.tuned_name] = (read_name, pr.base_name, rows, shape, pr.dtype_tuned, pr.dtype_base)
    return name_map, large, shared, (min(1.0, shared / tck.params) if tck.params else None)


def _why_incompatible(pl, tck: Checkpoint) -> str:
    paired = [p for p in pl.pairs if p.base_name is not None and p.tuned_name is not None]
    if not paired:
        return (f"no tensor name in common with the tuned model ({len(tck.tensors)} tuned tensors, "
                "none found here under the same or a prefixed name)")
    odd = next((p for p in paired if p.kind == "mismatch"), None)
    if odd is not None:
        return (f"no large matrix of the same shape: `{escape_name(odd.tuned_name)}` is "
                f"{list(odd.shape_base)} here and {list(odd.shape_tuned)} in the tuned model")
    return f"{len(paired)} tensors share names, but none is a float matrix of at least the large-matrix size"


def _screen(entries: list[_Entry], tck: Checkpoint, options: ProvenanceOptions) -> tuple[dict, frozenset]:
    thr = options.thresholds
    large = {}
    for e in entries:
        large.update({n: v for n, v in e.large.items()})
    in_mlp = {m[0] for g in mlp_groups({n: v[3] for n, v in large.items()}) for m in g.members}
    names = sorted(n for n in large if n not in in_mlp) or sorted(large)
    shapes = {n: large[n][3] for n in names}
    k = sample_plan(shapes, {n: large[n][4] for n in names}, options.sample_kib << 10)
    idx = {n: sample_rows(n, shapes[n][0], k[n], options.seed) for n in names}
    cache = dict(zip(names, tck.read_rows_many([(large[n][0], idx[n]) for n in names])))
    # the MLP matrices left out: only the candidate's rows, for the size of its MLPs (a neuron
    # permutation leaves it unchanged), with a quarter of the budget: the lowest full relative
    # change the candidate could reach if its MLPs matched the tuned model's exactly
    mlp = sorted(n for n in large if n not in names)
    mshapes = {n: large[n][3] for n in mlp}
    mk = sample_plan(mshapes, {n: large[n][5] for n in mlp}, max(1, (options.sample_kib << 10) // 4))
    midx = {n: sample_rows(n, mshapes[n][0], mk[n], options.seed) for n in mlp}
    for e in entries:
        sums, scale, numel = {}, {}, {}
        todo = [n for n in names if n in e.large and (idx[n] < e.large[n][2]).any()]
        keeps = {n: idx[n] < e.large[n][2] for n in todo}
        got = dict(zip(todo, e.ck.read_rows_many([(e.large[n][1], idx[n][keeps[n]]) for n in todo])))
        for n in todo:
            _, bname, rows, shape, dt, db = e.large[n]
            keep = keeps[n]
            sums[n] = sampled_sums(cache[n][keep], got[n], dt, db)
            scale[n] = rows / int(keep.sum())
            numel[n] = rows * math.prod(shape[1:])
        est = screen_estimate(sums, scale, numel)
        est["verdict"] = judge(est["cosine_large"], est["relative_change_large"], thr)
        est["tensors"] = len(sums)
        mtodo = [n for n in mlp if n in e.large and (midx[n] < e.large[n][2]).any()]
        mkeep = {n: midx[n] < e.large[n][2] for n in mtodo}
        mgot = dict(zip(mtodo, e.ck.read_rows_many([(e.large[n][1], midx[n][mkeep[n]]) for n in mtodo])))
        sb = sum(scale[n] * s_[0] for n, s_ in sums.items())
        sd = sum(scale[n] * s_[2] for n, s_ in sums.items())
        for n in mtodo:
            b = decode(mgot[n], e.large[n][5]).ravel()
            b = b[np.isfinite(b)]
            sb += e.large[n][2] / int(mkeep[n].sum()) * float(b @ b)
        est["relative_change_floor"] = math.sqrt(sd / sb) if sb > 0 and math.isfinite(sd) else None
        e.screen = est
    row_bytes = {n: math.prod(shapes[n][1:]) * DTYPES[large[n][4]].bits // 8 for n in names}
    return ({"candidates": len(entries), "full_top": options.full_top, "seed": options.seed,
             "tensors": len(names), "rows": int(sum(len(i) for i in idx.values())),
             "elements": int(sum(len(idx[n]) * math.prod(shapes[n][1:]) for n in names)),
             "bytes_per_checkpoint": int(sum(len(idx[n]) * row_bytes[n] for n in names)),
             "sample_kib": options.sample_kib, "mlp_left_out": bool(in_mlp) and names[0] not in in_mlp,
             "mlp_rows": int(sum(len(i) for i in midx.values())),
             "mlp_bytes_per_candidate": int(sum(len(midx[n]) * math.prod(mshapes[n][1:])
                                                * DTYPES[large[n][5]].bits // 8 for n in mlp))},
            frozenset(names))


def _full(e: _Entry, tuned: PathLike, tck: Checkpoint, options: ProvenanceOptions,
          screened: frozenset = frozenset(), measure_progress: Callable[[], Any] | None = None) -> dict:
    findings: list[Finding] = []
    if options.permutations:
        findings = detect_permutations(e.ck, tck, e.name_map, exact_max=options.exact_max, seed=options.seed,
                                       min_cosine=options.min_neuron_cosine)
    cmp = compare_with_progress(measure_progress, e.ck, tck,           # headers already read once
                                options=options.compare_options(), undo_reorderings=options.permutations)
    rows = [t.to_dict() for t in cmp.tensors]
    applied = [f for f in findings if f.applied]
    comps = cmp.summary.components
    if applied:
        _undo_rows(rows, applied, e.ck, tck, options)
        # components again, on the tensors measured with the permutation undone
        comps = components([SimpleNamespace(**{"tied": False, **r}) for r in rows], options.thresholds)
    ev = evidence(rows, options.thresholds, tck.params)
    verdict = judge(ev["cosine_large"], ev["relative_change_large"], options.thresholds)
    shared = [c["component"] for c in comps if c["status"] == "shared"]
    unrelated = [c["component"] for c in comps if c["status"] == "unrelated"]
    if shared and unrelated:
        # some components come from this candidate and others do not: never "derived" or
        # "unrelated" on a pooled number that the largest component decides
        verdict = "partial"
    perm = None
    if findings:
        neurons = sum(f.neurons for f in findings)
        moved = sum(f.moved for f in applied)
        perm = {"groups_examined": len(findings), "groups_permuted": len(applied), "neurons": neurons,
                "moved": moved, "moved_share": moved / neurons if neurons else 0.0,
                "groups": [f.to_dict() for f in applied]}
        bad = sum(f.nonfinite for f in findings)
        if bad:
            perm["nonfinite_left_out"] = bad
    row = {"path": e.path, "format": e.ck.format, "params": e.ck.params, "verdict": verdict,
           "compared": "full", "compare_verdict": cmp.summary.verdict, **ev,
           "components": {"shared": shared, "unrelated": unrelated},
           "nonfinite": int(sum(r.get("nonfinite") or 0 for r in rows)), "permutation": perm,
           "negated": _negated(cmp.summary.scope), "screen": e.screen}
    if screened:
        row["_screened"] = large_matrix_relatedness(
            [r for r in rows if r["name"] in screened], options.thresholds)[1]
    return row


def _negated(scope: dict) -> dict | None:
    """The candidate's ``negated`` entry: how many tuned tensors are its own times -1
    (``scope.negated_matrices`` of the comparison), or None."""
    neg = (scope or {}).get("negated_matrices") or {}
    return {"tensors": int(neg.get("tensors") or 0), "tensors_changed": int(neg.get("tensors_changed") or 0)} \
        if neg.get("tensors") else None


def _undo_rows(rows: list[dict], applied: list[Finding], base: Checkpoint, tck: Checkpoint,
               options: ProvenanceOptions) -> None:
    """Re-measure the MLP tensors of permuted groups with the permutation undone."""
    from .judge.status import classify
    from .measure.backend import backend_for
    from .kernels import reference

    backend = backend_for(options.device, options.threads)
    by_name = {r["name"]: r for r in rows}
    for f in applied:
        for name, axis, role in f.members:
            r = by_name.get(name)
            if r is None or r.get("compared") != "float":
                continue
            braw = np.ascontiguousarray(base.read(r["base_name"])).reshape(-1)
            traw = np.ascontiguousarray(undo_member(tck.read(name), f.perm, axis, role)).reshape(-1)
            stats = backend.module.delta_stats(braw, traw, r["dtype_base"], r["dtype_tuned"])
            fields_ = reference.finalize(stats)
            for key in ("norm_base", "norm_tuned", "norm_delta", "rel_change", "cosine", "frac_changed",
                        "frac_beyond_rounding", "max_abs_delta"):
                if key in fields_:
                    r[key] = fields_[key]
            r["status"] = classify(fields_, r["dtype_base"], r["dtype_tuned"], options.thresholds)
            r["note"] = f"compared after undoing the permutation of {f.moved} of {f.neurons} MLP neurons"


def _answer(rows: list[dict], not_compared: int = 0) -> dict:
    """How sure the answer is, from the ranked rows (the memo's headline reads it).

    ``kind``: ``identical`` (the leader holds the tuned model's weights bitwise), ``cast_only`` (the
    same weights within the rounding of a cast), ``derived`` (one closest candidate), ``tie`` (candidates
    within ``near_tie_ratio`` of the leader that nothing else singles out: ``judge.ties``), ``weak``
    (the leader reads derived on evidence near the unrelated reference; ``weak_by`` says which number),
    ``partial`` (no candidate is derived, but one shares some components and not others), ``none``
    (every candidate compared is unrelated), ``inconclusive`` (no candidate could be compared).
    ``leading`` the first derived (or partial) candidate, ``tied`` the others within the margin that
    cannot be told apart from it, ``separated`` those within the margin that the blocks tell apart (and
    how: ``ties.singles_out``), ``ratio`` the runner-up's relative change over the leader's,
    ``not_compared`` how many candidates could not be compared.
    """
    out = {"kind": "none", "leading": None, "tied": [], "separated": [], "ratio": None, "weak": False,
           "weak_by": [], "not_compared": not_compared}
    derived = [c for c in rows if c["verdict"] == "derived"]
    if derived:
        a = derived[0]
        lead = a["relative_change_large"]
        near = [c for c in within_margin(rows) if c is not a]
        tied, separated = [], []
        for c in near:
            why = singles_out(a, c)
            if why is None:
                tied.append(c["path"])
            else:
                separated.append(why)
        ratio = None
        if len(derived) > 1 and lead and derived[1]["relative_change_large"] is not None:
            ratio = derived[1]["relative_change_large"] / lead
        elif len(derived) > 1 and lead == 0 and derived[1]["relative_change_large"] == 0:
            ratio = 1.0
        weak = weak_by(a["cosine_large"], lead)
        exact = a.get("compare_verdict") if a.get("compare_verdict") in ("identical", "cast_only") else None
        kind = exact or ("tie" if tied else "weak" if weak else "derived")
        out.update(kind=kind, leading=a["path"], tied=tied, separated=separated, ratio=ratio, weak=bool(weak),
                   weak_by=weak)
        return out
    partial = [c for c in rows if c["verdict"] == "partial"]
    if partial:
        out.update(kind="partial", leading=partial[0]["path"], shared=partial[0]["components"]["shared"],
                   unrelated=partial[0]["components"]["unrelated"])
        return out
    if not rows:
        out["kind"] = "inconclusive"
    return out


def _separation_text(a: dict, why: dict, rows: list[dict]) -> str:
    """Why a candidate within the near-tie margin of the leader is not tied with it (``ties.singles_out``)."""
    other = next(c for c in rows if c["path"] == why["path"])
    lead, rc = a["relative_change_large"], other["relative_change_large"]
    if lead and rc is not None and rc != lead:
        pooled = f"{rc / lead - 1:.1%} further" if rc > lead else f"{1 - rc / lead:.1%} closer"
    else:
        pooled = "exactly as close"
    if why["exact"] == "identical":
        parts = [f"`{a['path']}` holds the tuned model's weights bitwise and `{why['path']}` does not"]
    elif why["exact"] == "cast_only":
        parts = [f"`{a['path']}` holds the tuned model's weights within the rounding of a cast and "
                 f"`{why['path']}` does not"]
    else:
        parts = []
        if why["identical_large_params"] and not why["other_identical_large_params"]:
            parts.append(f"{share(why['identical_large_params'] / a['large_params'])} of the large-matrix parameters "
                         f"are bitwise equal to `{a['path']}`'s and none to `{why['path']}`'s")
        if why["closer"]:
            s = (f"`{a['path']}` is closer by more than the margin in {count(len(why['closer']))} of the "
                 f"{count(why['blocks'])} blocks both share ({parts_text(why['closer'])}")
            if why["bitwise"]:
                s += f"; bitwise equal in {count(len(why['bitwise']))} of them"
            parts.append(s + f"), `{why['path']}` in none")
    return (f"`{why['path']}` is within the {MARGINS['near_tie_ratio']}x margin of `{a['path']}` on the pooled "
            f"relative change ({pooled}), but the weights single out `{a['path']}`: " + ", and ".join(parts))


def _weak_text(a: dict, weak_by: Sequence[str]) -> str:
    """The weak-evidence finding, naming only the numbers that are near the unrelated reference."""
    cos = a["cosine_large"]
    rel = f"relative change {sci(a['relative_change_large'])}"
    omc = f"1 - cosine {sci(None if cos is None else 1 - cos)}"
    ref_rel, ref_omc = sci(REFERENCE["relative_change"]), "1"
    if list(weak_by) == ["relative_change"]:
        near = f"{rel} is nearer the unrelated reference ({ref_rel}) than a fine-tune's (typically 1e-3 to 1e-1)"
        near += f"; {omc} is not" if cos is not None else ""
    elif list(weak_by) == ["cosine"]:
        near = f"{omc} is nearer the unrelated reference ({ref_omc}) than a fine-tune's"
        near += f"; {rel} is not" if a["relative_change_large"] is not None else ""
    else:
        near = (f"{rel} and {omc} are nearer the unrelated reference ({ref_rel} and {ref_omc}) than a fine-tune "
                "(typically 1e-3 to 1e-1)")
    return f"the evidence for `{a['path']}` is weak: {near}; \"derived\" here only says the weights are not independent"


DIRECTION = ("the weights cannot show which of two related models came first: \"derived from\" means related "
             "by a fine-tune in one direction or the other (`{a}` may be this model's base or a fine-tune of it)")


def _findings(rows: list[dict], incompatible: list[dict], screening: dict | None, thr: Thresholds,
              duplicates: Sequence[tuple[str, str | None, str]] = ()) -> list[str]:
    out = []
    ans = _answer(rows, len(incompatible))
    derived = [c for c in rows if c["verdict"] == "derived"]
    if derived:
        a = derived[0]
        cos = a["cosine_large"]
        omc = sci(None if cos is None else 1 - cos)
        others = ", ".join(f"`{p}`" for p in ans["tied"])
        if ans["kind"] == "identical":
            s = (f"`{a['path']}` ranks first: it holds the same weights as the tuned model (every compared tensor "
                 "bitwise equal)") + (f"; so does {others}" if others else "")
        elif ans["kind"] == "cast_only":
            s = (f"`{a['path']}` ranks first: it holds the same weights as the tuned model at another precision "
                 f"(every difference within the rounding of a cast; relative change {sci(a['relative_change_large'])} "
                 "over large matrices); either may be the cast of the other") + (f"; so does {others}" if others else "")
        else:
            s = (f"`{a['path']}` ranks first: relative change {sci(a['relative_change_large'])} over large "
                 f"matrices, 1 - cosine {omc}")
            if ans["tied"]:
                s += (f"; but it cannot be told apart from {others}: "
                      + ("exactly as close" if ans["ratio"] == 1.0 else
                         f"the next is only {(ans['ratio'] - 1):.1%} further")
                      + f", within the {MARGINS['near_tie_ratio']}x margin, and no block singles out one of them")
            elif ans["ratio"] is not None and not ans["separated"]:
                s += f"; the next derived candidate, `{derived[1]['path']}`, is {ans['ratio']:.1f}x further"
        out.append(s)
        out += [_separation_text(a, why, rows) for why in ans["separated"]]
        if ans["weak"]:
            out.append(_weak_text(a, ans["weak_by"]))
        if ans["kind"] not in ("identical", "cast_only"):
            out.append(DIRECTION.format(a=a["path"]))
    elif ans["kind"] == "partial":
        out.append(f"no candidate is a plausible base of the whole model; `{ans['leading']}` is partially "
                   f"derived: the tuned model shares {parts_text(ans['shared'])} with it; "
                   f"{parts_text(ans['unrelated'])} unrelated")
        out.append(DIRECTION.format(a=ans["leading"]))
    elif rows:
        out.append(f"no candidate is a plausible base: every one compared is unrelated (reference for "
                   f"independent inits: relative change {sci(REFERENCE['relative_change'])}, cosine 0)"
                   + (f"; {count(len(incompatible))} could not be compared and {'is' if len(incompatible) == 1 else 'are'} "
                      "not judged" if incompatible else ""))
    else:
        n = len(incompatible)
        out.append("nothing was compared: " + (
            "the candidate could not be compared with the tuned model (reason below), so this run says nothing "
            "about whether it is its base" if n == 1 else
            f"none of the {count(n)} candidates could be compared with the tuned model (reasons below), so this "
            "run says nothing about whether any of them is its base"))
    for c in rows:
        if c["verdict"] == "unrelated":
            out.append(f"`{c['path']}` is unrelated: cosine {num(c['cosine_large'])}, relative change "
                       f"{sci(c['relative_change_large'])} over large matrices (thresholds: cosine < "
                       f"{thr.unrelated_cosine}, relative change > {thr.unrelated_rel_change})")
        if c["verdict"] == "partial" and c["path"] != ans["leading"]:
            out.append(f"`{c['path']}` is partially derived: the tuned model shares "
                       f"{parts_text(c['components']['shared'])} with it; "
                       f"{parts_text(c['components']['unrelated'])} unrelated")
        p = c.get("permutation")
        if p and p["groups_permuted"]:
            out.append(f"`{c['path']}`: the tuned model's MLP neurons are permuted in {p['groups_permuted']} "
                       f"of {p['groups_examined']} MLPs ({share(p['moved_share'])} of neurons moved); "
                       "undone before comparing")
        neg = c.get("negated")
        if neg:
            out.append(f"`{c['path']}`: {count(neg['tensors'])} of the tuned model's tensors are its own stored with the "
                       "sign flipped (times -1); measured against it times -1, so they do not read as another "
                       "model's" + (f" ({count(neg['tensors_changed'])} of them changed beneath the sign)"
                                    if neg.get("tensors_changed") else " (nothing changed beneath the sign)"))
        if c.get("nonfinite"):
            s = (f"`{c['path']}`: {count(c['nonfinite'])} non-finite values (NaN or Inf) were found in the "
                 "compared tensors; tensors whose norms are not finite are left out of the relatedness evidence")
            if p and p.get("nonfinite_left_out"):
                s += ", and non-finite weights are left out of the neuron matching"
            out.append(s)
        if c["coverage"] is not None and c["coverage"] < 0.999:
            out.append(f"`{c['path']}` shares {share(c['coverage'])} of the tuned model's parameters by name and "
                       "shape; only that part is compared")
    for c in incompatible:
        out.append(f"`{c['path']}` was not compared: {c['reason']}")
    for dropped, kept, why in duplicates:
        if kept is None:
            out.append(f"`{dropped}` is the tuned model itself ({why}); left out of the ranking")
        else:
            out.append(f"`{dropped}` is the same checkpoint as `{kept}` ({why}); ranked once, as `{kept}`")
    if screening:
        full = screening.get("compared_in_full", min(screening["full_top"], screening["candidates"]))
        s = (f"screened {screening['candidates']} candidates on {screening['rows']:,} sampled rows of "
             f"{screening['tensors']} large matrices ({screening['bytes_per_checkpoint'] / 2**10:,.1f} KiB "
             f"per checkpoint); {full} compared in full")
        if full > min(screening["full_top"], screening["candidates"]):
            s += (f" (the leading {screening['full_top']}, and those the sample could not rule out: tied within "
                  f"{MARGINS['near_tie_ratio']}x, or possibly closer than the leader)")
        sampled = screening["candidates"] - full
        if sampled:
            s += (f"; the other {sampled} keep sampled estimates"
                  + (" over the matrices outside the MLPs" if screening.get("mlp_left_out") else "")
                  + (", and the sample shows none of them could be closer than the leader" if derived
                     else ", all of them unrelated on the sample"))
        out.append(s)
    return out


callable_module(__name__, "provenance")   # weightdiff.provenance(...) even once this module is imported
