"""Lineage chains: base -> SFT -> DPO, each step's change and the end-to-end change.

``lineage([A, B, C])`` runs ``weightdiff.compare`` on every consecutive step (A->B,
B->C) and on the whole chain (A->C), and lines up the per-block relative change
of each, so a reader can see which step injected what. Step sizes are also given
in absolute terms (the Frobenius norm of each step's delta over the compared
tensors): ``straightness`` = end-to-end norm / sum of step norms is 1 when every
step moved the weights the same way and about 1/sqrt(steps) when the steps are
orthogonal, as independent fine-tunes mostly are.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from ._callable import callable_module
from ._version import __version__
from .io.checkpoint import is_hub_candidate, locate
from .comparison import Comparison, compare_with_progress, run_date, versions
from .errors import CheckpointError, OptionsError
from .options import CompareOptions, HubOptions, options_from_kwargs
from .records import dumps
from .render.formats import count, sci, share, step_blocks_text, step_compared

SCHEMA = "weightdiff.lineage/1"
#: steps whose change is within this share of the longest step's are said to move the weights about equally
TIE_SHARE = 0.01
PathLike = Union[str, os.PathLike]

__all__ = ["lineage", "LineageResult", "SCHEMA"]


@dataclass
class LineageResult:
    """Steps of a chain and its end-to-end change; ``to_dict()`` is ``weightdiff.lineage/1``."""

    settings: dict
    paths: list[str]
    steps: list[dict]
    end_to_end: dict
    blocks: list[dict]
    findings: list[str]
    run: dict = field(default_factory=dict)

    def to_dict(self, include_run: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA, "tool": {"name": "weightdiff", "version": __version__},
                             "settings": self.settings, "paths": self.paths, "steps": self.steps,
                             "end_to_end": self.end_to_end, "blocks": self.blocks, "findings": self.findings}
        if include_run:
            d["run"] = self.run
        return d

    def to_json(self, include_run: bool = True) -> str:
        return dumps(self.to_dict(include_run))


def step_summary(cmp: Comparison, src: str, dst: str) -> dict:
    """The numbers of one compare() that a lineage table shows."""
    s = cmp.summary
    nd2 = sum(t.norm_delta ** 2 for t in cmp.tensors
              if t.compared == "float" and t.norm_delta is not None and math.isfinite(t.norm_delta))
    cos = s.relatedness_cosine
    return {"from": src, "to": dst, "verdict": s.verdict, "relative_change": s.relative_change,
            "norm_delta": math.sqrt(nd2), "relatedness_cosine": cos,
            "one_minus_cosine": None if cos is None else 1.0 - cos,
            "tensors_changed": s.scope.get("tensors_changed"), "tensors_total": s.scope.get("tensors_total"),
            "blocks_changed": s.blocks_changed, "blocks_total": s.blocks_total,
            # blocks whose only difference is tensors of another shape (not compared), and the tuned parameters
            # compared at all: 0 when nothing could be (another width), so no block is said to have changed
            "blocks_reshaped": s.scope.get("blocks_reshaped", 0),
            "params_compared": int(((s.coverage or {}).get("tuned") or {}).get("compared") or 0),
            "delta_params": s.delta_params, "delta_params_share": s.delta_params_share,
            # (an upper bound when some energy rank is a bracket: the least it could be, else null)
            "delta_params_lower": s.delta_params_lower,
            "form": s.form.get("kind"), "flags": list(s.flags),
            # what the step's numbers are net of: matrices stored times -1, units in another order
            "negated_tensors": int((s.scope.get("negated_matrices") or {}).get("tensors") or 0),
            "reordered_blocks": sorted((s.scope.get("permuted_units") or {}).get("blocks") or {}),
            "blocks": {b.block: b.rel_change for b in cmp.blocks}}


def lineage(paths: Sequence[PathLike], *, options: CompareOptions | None = None,
            progress: Callable[[str], None] | None = None, command: str | None = None,
            hub: HubOptions | None = None, measure_progress: Callable[[], Any] | None = None,
            **kwargs: Any) -> LineageResult:
    """Compare each consecutive pair of ``paths`` and the first with the last.

    ``measure_progress``: makes the progress object of each comparison (``compare(progress=...)``, its own line,
    every 30 s on a log), closed when the comparison ends (``measured``); None: no progress within a comparison.

    Options are those of ``weightdiff.compare`` (CompareOptions); paths may be Hub repo ids,
    read as ``hub`` (HubOptions) says. Raises
    WeightdiffError for fewer than two paths or unreadable checkpoints.
    """
    if options is None:
        options = options_from_kwargs(CompareOptions, **kwargs)
    paths = [os.fspath(p) for p in paths]
    if len(paths) < 2:
        raise OptionsError(f"a lineage needs at least two checkpoints (got {len(paths)})",
                           "list them oldest first: weightdiff lineage BASE SFT DPO")
    say = progress or (lambda message: None)
    for p in paths:
        if not os.path.exists(p) and not is_hub_candidate(p):
            raise CheckpointError(p, "no such file or directory")
    if any(is_hub_candidate(p) for p in paths):
        from .io.hub import preflight

        preflight(paths, hub)
    date = run_date()
    t0 = time.perf_counter()
    steps = []
    with ExitStack() as stack:
        opened = []
        for p in paths:   # fail on a bad path or header now, not after the first comparisons; read each once
            opened.append(stack.enter_context(locate(p, hub)))
            if opened[-1].origin:
                say(opened[-1].origin)
        keys = [_identity(c, p) for c, p in zip(opened, paths)]
        for i in range(1, len(paths)):
            if keys[i] == keys[i - 1]:
                raise OptionsError(
                    f"`{paths[i - 1]}` and `{paths[i]}` (positions {i} and {i + 1} of the chain) are the same "
                    "checkpoint: a step from a model to itself measures nothing",
                    "list each model once where the chain passes it; to compare two copies of one model, "
                    "use weightdiff compare")
        for (a, ca), (b, cb) in zip(zip(paths, opened), zip(paths[1:], opened[1:])):
            say(f"comparing {a} -> {b}")
            steps.append(step_summary(compare_with_progress(measure_progress, ca, cb, options=options), a,
                                      b))
        if len(paths) > 2:
            say(f"comparing {paths[0]} -> {paths[-1]} (end to end)")
            end = step_summary(compare_with_progress(measure_progress, opened[0], opened[-1], options=options),
                               paths[0], paths[-1])
        else:
            end = dict(steps[0])
    # a step of which nothing was compared has no measured length (its norm reads 0): the path has none
    total = sum(s["norm_delta"] for s in steps) if all(step_compared(s) for s in steps) else 0.0
    for s in steps:
        s["share_of_path"] = s["norm_delta"] / total if total > 0 else None
    end["straightness"] = end["norm_delta"] / total if total > 0 and step_compared(end) else None
    # the triangle inequality holds over one set of elements: ends that compare rows some step could not (a
    # vocabulary trimmed, then grown back: the new rows against the first model's) are no shorter than the
    # path by construction (straightness 71.6 read "7160.6%" of the path), so none is stated
    wider = end["straightness"] is not None and (end.get("params_compared", 0) > min(
        s.get("params_compared", 0) for s in steps) or end["straightness"] > 1.0 + 1e-9)   # (over one set, <= 1)
    if wider:
        end["straightness"] = None
    names: list[str] = []
    for s in [*steps, end]:
        names += [b for b in s["blocks"] if b not in names]
    blocks = [{"block": b, "steps": [s["blocks"].get(b) for s in steps], "end_to_end": end["blocks"].get(b)}
              for b in names]
    return LineageResult(settings=options.settings(), paths=paths, steps=steps, end_to_end=end, blocks=blocks,
                         findings=_findings(steps, end) + _repeats(paths, keys) + (
                             ["straightness not measured: the ends compare other parameters than the steps do "
                              f"({count(end['params_compared'])} against "
                              f"{', '.join(count(x.get('params_compared', 0)) for x in steps)}: rows or tensors added, "
                              "removed or reshaped along the chain), so the end-to-end change and the path are not over "
                              "the same weights"] if wider else []),
                         run={"date": date, "seconds": round(time.perf_counter() - t0, 3), "command": command,
                              "versions": versions()})


def _identity(ck: Any, path: str) -> Any:
    """What makes two spellings one checkpoint: its weight files' real paths (``B``, ``./B/``,
    ``B/model.safetensors`` and a symlink to it are one), a Hub checkpoint's repo and commit."""
    from .io.located import weight_files

    return weight_files(ck) if ck.files else ("path", os.path.realpath(path))


def _repeats(paths: list[str], keys: list) -> list[str]:
    """A finding per checkpoint the chain lists more than once (never next to itself: refused).

    >>> _repeats(["a", "b", "./a/"], ["A", "B", "A"])
    ['`a` and `./a/` (positions 1 and 3) are the same checkpoint: steps 1 to 2 lead from it back to it']
    """
    out, seen = [], {}
    for j, k in enumerate(keys):
        if k in seen:
            i = seen[k]
            out.append(f"`{paths[i]}` and `{paths[j]}` (positions {i + 1} and {j + 1}) are the same checkpoint: "
                       f"steps {i + 1} to {j} lead from it back to it")
        seen[k] = j
    return out


def _findings(steps: list[dict], end: dict) -> list[str]:
    out = []
    for i, s in enumerate(steps, 1):
        rc = s["relative_change"]
        net = [w for w, on in ((f"{s.get('negated_tensors')} tensors stored with the sign flipped, measured "
                                "against the previous model's times -1", s.get("negated_tensors")),
                               (f"units in another order in {len(s.get('reordered_blocks') or [])} blocks, "
                                "measured in the previous model's order", s.get("reordered_blocks"))) if on]
        out.append(f"step {i} (`{s['from']}` -> `{s['to']}`): {s['verdict']}, relative change "
                   f"{sci(rc) if rc is not None else 'n/a'}, {step_blocks_text(s)}"
                   + (f" ({'; '.join(net)})" if net else ""))
    if len(steps) > 1:
        big = max(range(len(steps)), key=lambda i: steps[i]["norm_delta"])
        rc = end["relative_change"]
        text = f"end to end: relative change {sci(rc) if rc is not None else 'n/a'}; "
        blind = [str(i) for i, s in enumerate(steps, 1) if not step_compared(s)]
        if blind:
            text += (f"path length not measured (step{'s' if len(blind) > 1 else ''} {', '.join(blind)} could not "
                     "be compared)")
        elif steps[big]["share_of_path"] is None:   # no step moved a compared float tensor (or none shared one)
            text += "path length not measured (no step changed a tensor it shares with the one before)"
        else:
            # steps within 1% of the longest moved the weights about as much: naming one of them "most" on a
            # 50.001% / 49.999% split (scale tester 2) says more than the measurement does
            near = [i for i, s in enumerate(steps) if s["norm_delta"] is not None and s["share_of_path"] is not None
                    and s["norm_delta"] >= (1.0 - TIE_SHARE) * steps[big]["norm_delta"]]
            if len(near) > 1:
                names = ", ".join(str(i + 1) for i in near[:-1]) + f" and {near[-1] + 1}"
                shares = ", ".join(share(steps[i]["share_of_path"]) for i in near[:-1]) + \
                    f" and {share(steps[near[-1]]['share_of_path'])}"
                text += (f"steps {names} moved the weights about equally ({shares} of the path length, within "
                         f"{share(TIE_SHARE)} of each other)")
            else:
                text += (f"step {big + 1} moved the weights most ({share(steps[big]['share_of_path'])} of the path "
                         "length)")
        out.append(text)
        # the ends closer than the longest step: a later step undid part of an earlier one, or the
        # models are listed out of order (B-chat, B, B-instruct); fine-tunes in order move the ends
        # apart at least as far as their longest step unless they reverse it
        # (nothing compared end to end reads norm 0 too: no finding then)
        e_norm, s_norm = end.get("norm_delta"), steps[big]["norm_delta"]
        if end["verdict"] == "identical" and s_norm:
            # the strongest case: the steps undid each other entirely
            out.append(f"the chain ends where it began: `{end['from']}` and `{end['to']}` are identical, although "
                       f"step {big + 1} alone moved the weights by a relative change of "
                       f"{sci(steps[big]['relative_change'])}: the steps' changes cancel out exactly, so "
                       "the chain doubles back and its order may not be the order the models were made in (the "
                       "weights do not say which came first)")
        elif e_norm is not None and s_norm is not None and e_norm < s_norm and end["relative_change"] is not None:
            out.append(f"the end-to-end change is smaller than step {big + 1}'s ({sci(end['relative_change'])} "
                       f"against {sci(steps[big]['relative_change'])}): the chain doubles back, so its order may "
                       "not be the order the models were made in (the weights do not say which came first)")
        for i, s in enumerate(steps, 1):
            if s["verdict"] == "unrelated":
                out.append(f"step {i} is not a fine-tune of the previous model: the chain is broken there")
            elif not step_compared(s):
                out.append(f"step {i}: no element of the two models could be compared, so the chain is not "
                           "measured there")
            elif s["verdict"] in ("partial", "inconclusive"):
                out.append(f"step {i} is {s['verdict']}: only part of the chain holds there (see its comparison)")
    return out


callable_module(__name__, "lineage")      # weightdiff.lineage(...) even once this module is imported
