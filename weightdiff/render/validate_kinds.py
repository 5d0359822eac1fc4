"""The shape of a ``weightdiff.provenance/1`` or ``weightdiff.lineage/1`` JSON, checked before a section is drawn.

Unlike ``validate.check_result`` (a comparison), these results carry a ranking or a chain, but the rule is
the same: ``weightdiff report`` refuses a hand-edited or damaged file in one line that names the file and
the key (exit 2), so a string where a number belongs is never an internal error or a quiet `n/a`.

>>> try:
...     check_kind("lineage", {"schema": "weightdiff.lineage/1", "paths": ["a", "b"], "steps": [],
...                            "end_to_end": {"relative_change": "0.1"}, "blocks": [], "findings": []}, "c.json")
... except WeightdiffError as exc:
...     print(exc)
c.json: `end_to_end.relative_change` should be a number or null (found a string) (was it written by weightdiff?)
"""

from __future__ import annotations

from typing import Any

from ..errors import WeightdiffError
from .validate import (_FILE, _HINT, MAX_DEPTH, N, I, S, _at_least0, _cos, _share, _within, array, boolean,
                       free, mapping, num, obj, one_of, opt, scalar, string)

__all__ = ["check_kind", "CANDIDATE_VERDICTS", "ANSWER_KINDS", "MAX_DEPTH"]

#: a provenance candidate's verdict (``judge.relatedness.judge``, partial from the components)
CANDIDATE_VERDICTS = ("derived", "partial", "unrelated")
#: ``answer.kind`` of a provenance result (``provenance._answer``)
ANSWER_KINDS = ("none", "inconclusive", "identical", "cast_only", "tie", "weak", "derived", "partial")
_LINEAGE_VERDICTS = ("identical", "cast_only", "quantized_only", "derived", "partial", "unrelated", "inconclusive")

_RUN = opt(obj({"date": S, "command": S, "seconds": N, "versions": opt(mapping(scalar))}))
_TOOL = opt(obj({"name": string, "version": S}))
_THRESHOLDS = obj({"unrelated_cosine": num, "unrelated_rel_change": num}, required=("unrelated_cosine",
                                                                                  "unrelated_rel_change"),
                  rest=opt(scalar))
_CANDIDATE = obj({"path": string, "format": S, "params": I, "verdict": one_of(*CANDIDATE_VERDICTS),
                  "compared": one_of("full", "sample"), "compare_verdict": S, "relative_change": N,
                  "relative_change_large": N, "cosine_large": N, "large_params": I, "identical_large_params": I,
                  "identical_share": N, "identical_params_share": N, "tensors_compared": I, "params_shared": I,
                  "coverage": N, "rank": I, "nonfinite": I,
                  "blocks": opt(array(obj({"block": S, "rel_change": N, "params": I}))),
                  "components": opt(obj({"shared": opt(array(string)), "unrelated": opt(array(string))})),
                  "permutation": opt(obj({"groups_examined": I, "groups_permuted": I, "neurons": I, "moved": I,
                                          "moved_share": N}))},
                 required=("path", "verdict", "compared", "rank"))
_ANSWER = obj({"kind": one_of(*ANSWER_KINDS), "leading": S, "tied": opt(array(string)),
               "separated": opt(array(obj({"path": S}))), "ratio": N, "weak": opt(boolean),
               "weak_by": opt(array(one_of("relative_change", "cosine"))), "not_compared": I,
               "shared": opt(array(string)), "unrelated": opt(array(string))}, required=("kind",))
_PROVENANCE = obj({"schema": string, "tool": _TOOL,
                   "settings": obj({"thresholds": _THRESHOLDS}, required=("thresholds",)),
                   "tuned": obj({"path": string, "label": S, "format": S, "params": I, "files": opt(array(_FILE))},
                                required=("path",)),
                   "reference": obj({"relative_change": num, "cosine": num, "what": S},
                                    required=("relative_change", "cosine")),
                   "relatedness": S, "leading": S, "answer": opt(_ANSWER),
                   "margins": opt(obj({"near_tie_ratio": N, "weak_rel_change": N, "weak_cosine": N})),
                   "candidates": array(_CANDIDATE),
                   "incompatible": opt(array(obj({"path": string, "reason": S}, required=("path",)))),
                   "screening": opt(free), "findings": array(string), "limits": array(string), "run": _RUN},
                  required=("schema", "settings", "tuned", "reference", "candidates", "findings", "limits"))

_STEP = {"from": S, "to": S, "verdict": one_of(*_LINEAGE_VERDICTS), "relative_change": N, "norm_delta": N,
         "relatedness_cosine": N, "one_minus_cosine": N, "tensors_changed": I, "tensors_total": I,
         "blocks_changed": I, "blocks_total": I, "blocks_reshaped": I, "params_compared": I, "delta_params": N,
         "delta_params_share": N, "delta_params_lower": N, "form": S, "flags": opt(array(string)),
         "blocks": opt(mapping(N)), "share_of_path": N, "straightness": N}
_LINEAGE = obj({"schema": string, "tool": _TOOL, "settings": opt(obj({"thresholds": opt(mapping(scalar))})),
                "paths": array(string), "steps": array(obj(_STEP, required=("verdict",))),
                "end_to_end": obj(_STEP), "blocks": array(obj({"block": S, "steps": opt(array(N)), "end_to_end": N})),
                "findings": array(string), "run": _RUN},
               required=("schema", "paths", "steps", "end_to_end", "blocks", "findings"))


def _provenance_rules(d: dict, where: str) -> None:
    for i, c in enumerate(d["candidates"]):
        p = f"candidates[{i}]"
        for k in ("relative_change", "relative_change_large", "params", "large_params", "params_shared", "rank"):
            _at_least0(c.get(k), where, f"{p}.{k}")
        for k in ("identical_share", "identical_params_share", "coverage"):
            _share(c.get(k), where, f"{p}.{k}")
        _cos(c.get("cosine_large"), where, f"{p}.cosine_large")
        _within(c.get("identical_large_params"), c.get("large_params"), where, f"{p}.identical_large_params",
                f"{p}.large_params")
    ref = d["reference"]
    _at_least0(ref["relative_change"], where, "reference.relative_change")
    _cos(ref["cosine"], where, "reference.cosine")


def _lineage_rules(d: dict, where: str) -> None:
    for p, s in [*((f"steps[{i}]", s) for i, s in enumerate(d["steps"])), ("end_to_end", d["end_to_end"])]:
        for k in ("relative_change", "norm_delta", "one_minus_cosine", "delta_params"):
            _at_least0(s.get(k), where, f"{p}.{k}")
        for k in ("delta_params_share", "share_of_path", "straightness"):
            _share(s.get(k), where, f"{p}.{k}")
        _cos(s.get("relatedness_cosine"), where, f"{p}.relatedness_cosine")
        _within(s.get("blocks_changed"), s.get("blocks_total"), where, f"{p}.blocks_changed", f"{p}.blocks_total")
        _within(s.get("tensors_changed"), s.get("tensors_total"), where, f"{p}.tensors_changed", f"{p}.tensors_total")
    if len(d["paths"]) >= 2 and len(d["steps"]) != len(d["paths"]) - 1:
        raise WeightdiffError(f"{where}: `steps` holds {len(d['steps'])} steps for {len(d['paths'])} `paths` "
                              f"(expected {len(d['paths']) - 1})", _HINT)
    for i, b in enumerate(d["blocks"]):
        if len(b.get("steps") or []) != len(d["steps"]):
            raise WeightdiffError(f"{where}: `blocks[{i}].steps` holds {len(b.get('steps') or [])} values for "
                                  f"{len(d['steps'])} steps", _HINT)


def check_kind(kind: str, data: Any, where: str) -> dict:
    """Check a provenance or lineage result (``kind``) for every key its section, figure and headline read,
    with its type, its enums and the ranges a measurement can take; return it unchanged."""
    (_PROVENANCE if kind == "provenance" else _LINEAGE)(data, where, "")
    (_provenance_rules if kind == "provenance" else _lineage_rules)(data, where)
    return data
