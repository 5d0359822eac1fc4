"""The shape of a ``weightdiff.compare/2`` JSON (or /1), checked before any renderer reads it.

``weightdiff report`` redraws figures and memos from a file the user hands it, which may be
damaged or hostile. ``check_result(data, where)`` walks every field a renderer reads with
its type (numbers finite and of a sane size, integers within int64, strings and lists
bounded, free-form objects bounded in depth) and raises a one-line ``WeightdiffError``
naming the file and the field, so the renderers only ever see values they can draw.
Unknown keys are allowed (the contract lets keys be added) but are not read.

>>> try:
...     check_result({"schema": "weightdiff.compare/1", "summary": {"verdict": "derived"},
...                   "blocks": [], "tensors": [{"name": "w", "status": "changed", "shape": [2, "3"]}]}, "r.json")
... except WeightdiffError as exc:
...     print(exc)
r.json: `tensors[0].shape[1]` should be an integer (found a string) (was it written by weightdiff?)
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import WeightdiffError, escape_name
from ..records import READABLE_SCHEMAS, SCHEMA, VERDICTS

__all__ = ["check_result", "SCHEMA", "READABLE_SCHEMAS", "MAX_DEPTH"]

#: deepest nesting accepted in free-form fields (settings, run, plan, extra, ...)
MAX_DEPTH = 16
_NUM_CAP = 1e200          # squares and sums of squares stay finite
_INT_CAP = 2 ** 63
_STR_CAP = 1_000_000
_HINT = "was it written by weightdiff?"

Check = Callable[[Any, str, str], None]


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer" if abs(v) < _INT_CAP else "an integer too large"
    if isinstance(v, float):
        return f"{v}" if not math.isfinite(v) else "a number too large" if abs(v) > _NUM_CAP else "a number"
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(v), type(v).__name__)


class _Mismatch(WeightdiffError):
    def __init__(self, where: str, path: str, what: str, v: Any):
        self.where, self.path, self.what, self.value = where, path, what, v
        super().__init__(f"{where}: `{escape_name(path)}` should be {what} (found {_kind(v)})", _HINT)


def _fail(where: str, path: str, what: str, v: Any) -> WeightdiffError:
    return _Mismatch(where, path, what, v)


def num(v: Any, where: str, path: str) -> None:
    t = type(v)
    if not ((t is float and abs(v) <= _NUM_CAP) or (t is int and abs(v) < _INT_CAP)):
        raise _fail(where, path, "a number", v)


def integer(v: Any, where: str, path: str) -> None:
    if type(v) is not int or abs(v) >= _INT_CAP:
        raise _fail(where, path, "an integer", v)


def string(v: Any, where: str, path: str) -> None:
    if type(v) is not str or len(v) > _STR_CAP:
        raise _fail(where, path, "a string" + (f" of at most {_STR_CAP:,} characters" if type(v) is str else ""), v)
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise WeightdiffError(f"{where}: `{escape_name(path)}` holds a lone UTF-16 surrogate, which is not "
                                  "text", _HINT) from None


def boolean(v: Any, where: str, path: str) -> None:
    if type(v) is not bool:
        raise _fail(where, path, "true or false", v)


def scalar(v: Any, where: str, path: str) -> None:
    if v is None or type(v) is bool:
        return
    if type(v) is str:
        string(v, where, path)
    else:
        num(v, where, path)


def free(v: Any, where: str, path: str) -> None:
    """Any JSON value nested at most MAX_DEPTH deep, with bounded numbers and strings."""
    stack = [(v, path, 0)]
    while stack:
        x, p, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WeightdiffError(f"{where}: `{escape_name(p)}` is nested more than {MAX_DEPTH} deep", _HINT)
        if isinstance(x, dict):
            stack.extend((val, f"{p}.{k}", depth + 1) for k, val in x.items())
        elif isinstance(x, list):
            stack.extend((val, f"{p}[{i}]", depth + 1) for i, val in enumerate(x))
        else:
            scalar(x, where, p)


def opt(check: Check) -> Check:
    def c(v: Any, where: str, path: str) -> None:
        if v is not None:
            try:
                check(v, where, path)
            except _Mismatch as exc:
                if exc.path != path:
                    raise
                raise _Mismatch(where, path, f"{exc.what} or null", v) from None
    c.__name__ = f"opt_{check.__name__}"
    return c


def obj(fields: dict[str, Check], required: tuple[str, ...] = (), rest: Check | None = free) -> Check:
    """An object whose listed keys (``required`` ones must be present) meet their checks; other keys ``rest``."""
    def c(v: Any, where: str, path: str) -> None:
        if type(v) is not dict:
            raise _fail(where, path, "an object", v)
        for k in required:
            if k not in v:                  # checked as null: "`summary` should be an object (found null)"
                fields[k](None, where, f"{path}.{k}" if path else k)
        for k, val in v.items():
            check = fields.get(k, rest)
            if check is not None:
                check(val, where, f"{path}.{k}" if path else k)
    return c


def array(check: Check, length: int | None = None) -> Check:
    def c(v: Any, where: str, path: str) -> None:
        if type(v) is not list:
            raise _fail(where, path, "a list", v)
        if length is not None and len(v) != length:
            raise WeightdiffError(f"{where}: `{escape_name(path)}` should hold {length} values (found {len(v)})",
                                  _HINT)
        for i, val in enumerate(v):
            check(val, where, f"{path}[{i}]")
    return c


def mapping(check: Check) -> Check:
    return obj({}, rest=check)


N, I, S = opt(num), opt(integer), opt(string)

_FILE = obj({"name": S, "bytes": I, "sha256": S, "sha256_source": S})
_CHECKPOINT = obj({"path": S, "format": S, "params": I, "bytes": I, "dtypes": mapping(I),
                   "files": opt(array(_FILE))})
_RANK = obj({"stable_rank": N, "effective_rank": N, "energy_rank_90": I, "energy_rank_99": I,
             "numerical_rank": I, "noise_floor": N, "spectrum": opt(array(num)), "energy_captured": N,
             "method": S, "shape_2d": opt(array(integer, 2)), "exact": opt(boolean),
             "bounds": opt(mapping(opt(array(N, 2)))), "estimated": opt(array(string))})
_TENSOR = obj({"name": string, "base_name": S, "status": string, "shape": array(integer),
               "base_shape": opt(array(integer)), "dtype_base": S, "dtype_tuned": S, "numel": I,
               "numel_compared": I, "norm_base": N, "norm_tuned": N, "norm_delta": N, "rel_change": N,
               "cosine": N, "frac_changed": N, "frac_beyond_rounding": N, "max_abs_delta": N, "nonfinite": I,
               "sign_flips": I, "base_index": I, "compared": S, "block": S, "module": S, "note": S,
               "rank": opt(_RANK), "tied": opt(boolean), "paired_by": S,
               "cast": opt(obj({"chain": opt(array(string)), "through": S, "rounded": S, "elements": I, "unexplained": I,
                                "overflow": I, "saturated": I, "clamped": opt(I),
                                "vias": opt(obj({"base": array(string), "tuned": array(string)})),
                                "clamp": opt(array(N, 2))}))}, required=("name", "status", "shape"))
_BLOCK = obj({"block": S, "index": I, "params": N, "params_changed": N, "tensors": N, "tensors_changed": N,
              "rel_change": N, "norm_base": N, "norm_delta": N, "delta_params": N, "max_numerical_rank": N,
              "max_numerical_rank_bounds": opt(array(integer, 2)), "modules": opt(mapping(N)),
              "delta_params_lower": N})
_SIDE = obj({k: N for k in ("params", "compared", "share", "large_params", "large_compared", "large_share")})
_COMPONENT = obj({"component": string, "status": string, "cosine": N, "rel_change": N, "matrices": I, "params": I,
                  "identical": opt(boolean)}, required=("component", "status"))
_SUMMARY = obj({"verdict": string, "verdict_reason": S,
                "scope": opt(obj({**{k: I for k in ("blocks_changed", "blocks_total", "tensors_changed",
                                                    "tensors_total", "base_blocks_total", "base_blocks_paired",
                                                    "blocks_reshaped")},
                                  # the objects the sentences read: a list or a number there was exit 1
                                  **{k: opt(mapping(free)) for k in (
                                      "tensors_reshaped", "within_quant_floor", "permuted_units", "negated_matrices",
                                      "rescaled_units", "folded_norms", "rotated_residual", "pruned_elements",
                                      "gguf_metadata_differs", "config_differs", "off_grid", "matrices_zeroed", "blocks_added")}})),
                "form": opt(obj({"kind": S, "max_numerical_rank": I, "max_energy_rank_99": I,
                                 "max_numerical_rank_bounds": opt(array(integer, 2)),
                                 "max_energy_rank_99_bounds": opt(array(integer, 2)), "shares": opt(mapping(N)),
                                 "matrices_undecided": I, "matrices_compensated": I,
                                 "matrices_without_rank": I})),
                "flags": opt(array(string)), "params_total": I,
                "coverage": opt(obj({"base": opt(_SIDE), "tuned": opt(_SIDE)})),
                "components": opt(array(_COMPONENT)), "buffers": opt(array(obj({"name": S, "side": S}))),
                "params_by_status": opt(mapping(integer)), "tensors_by_status": opt(mapping(integer)),
                "relative_change": N, "relatedness_cosine": N, "blocks_total": I, "blocks_changed": I,
                "delta_params": N, "delta_params_share": N, "delta_params_lower": N, "headline": opt(array(string)),
                "relatedness_rel_change": N}, required=("verdict",))
def one_of(*values: str) -> Check:
    def c(v: Any, where: str, path: str) -> None:
        if v not in values or type(v) is not str:
            raise _fail(where, path, "one of " + ", ".join(f'"{x}"' for x in values), v)
    c.__name__ = "one_of"
    return c


#: the reference scale the compare JSON carries (render.reference), read by its figure and captions: unchecked,
#: a hand-edited point (`true`, a string rel_change, an unknown key) was an internal error (exit 1)
_REFERENCE = obj({"matrices": I, "params": I,
                  "points": array(obj({"key": one_of("F16", "BF16", "model", "unrelated"), "label": S,
                                       "rel_change": num, "one_minus_cosine": num, "overflow": I},
                                      required=("key", "rel_change", "one_minus_cosine")))},
                 required=("points",))
_RESULT = obj({"schema": string, "reference": opt(_REFERENCE), "tool": opt(obj({"name": string, "version": S})),
               "settings": opt(obj({"thresholds": opt(mapping(scalar)), "rank": opt(boolean)})),
               "base": opt(array(_CHECKPOINT)), "tuned": opt(_CHECKPOINT), "summary": _SUMMARY,
               "modules": opt(mapping(free)), "blocks": array(_BLOCK), "tensors": array(_TENSOR),
               "run": opt(obj({"command": S, "date": S, "versions": opt(mapping(scalar)), "seconds": N}))},
              required=("schema", "summary", "blocks", "tensors"))


def check_result(data: Any, where: str = "result") -> dict:
    """Check ``data`` against the compare schema (the fields renderers read); return it unchanged."""
    if not isinstance(data, dict):
        raise WeightdiffError(f"{where}: expected a JSON object written by weightdiff (a comparison result), found {_kind(data)}")
    schema = data.get("schema")
    if schema not in READABLE_SCHEMAS:
        found = "no `schema` key" if schema is None else f"schema `{escape_name(str(schema))[:80]}`"
        older = "`, `".join(x for x in READABLE_SCHEMAS if x != SCHEMA)
        raise WeightdiffError(f"{where}: expected schema `{SCHEMA}` (or `{older}`), found {found}",
                              "use the weightdiff version that wrote it")
    _RESULT(data, where, "")
    _consistent(data["summary"], where)
    _invariants(data, where)
    th = (data.get("settings") or {}).get("thresholds") or {}
    for key in ("unrelated_cosine", "independent_cosine"):
        if key in th:
            num(th[key], where, f"settings.thresholds.{key}")
    return data


def _consistent(s: dict, where: str) -> None:
    """The summary's values that a memo states as facts, checked against what a comparison can write: a
    verdict of the documented set, counts and shares in range, and no "identical" beside changed
    tensors. A hand-edited JSON re-rendered as "IDENTICAL ... 15 of 76 tensors changed" would put a
    contradiction under weightdiff's name."""
    v = s.get("verdict")
    if v not in VERDICTS:
        raise WeightdiffError(f"{where}: `summary.verdict` is `{escape_name(str(v))[:40]}`, not one of "
                              f"{', '.join(VERDICTS)}", _HINT)
    for key in ("params_total", "delta_params", "delta_params_lower", "blocks_total", "blocks_changed"):
        x = s.get(key)
        if x is not None and x < 0:
            raise WeightdiffError(f"{where}: `summary.{key}` is negative ({x})", _HINT)
    for key in ("delta_params_share",):
        x = s.get(key)
        if x is not None and not 0 <= x <= 1:
            raise WeightdiffError(f"{where}: `summary.{key}` is {x}, outside [0, 1]", _HINT)
    for key in ("params_by_status", "tensors_by_status"):
        for k, x in (s.get(key) or {}).items():
            if x < 0:
                raise WeightdiffError(f"{where}: `summary.{key}.{escape_name(str(k))[:40]}` is negative ({x})", _HINT)
    moved = {k: x for k, x in (s.get("tensors_by_status") or {}).items()
             if k not in ("unchanged", "rounding", "quantized") and x}
    if v in ("identical", "cast_only", "quantized_only") and moved:
        raise WeightdiffError(f"{where}: `summary.verdict` is `{v}`, but `summary.tensors_by_status` counts "
                              + ", ".join(f"{x} {k}" for k, x in sorted(moved.items())), _HINT)


#: statuses a tensor row can have (docs/json-schema.md, ``tensors[].status``)
STATUSES = ("unchanged", "rounding", "quantized", "changed", "resized", "added", "removed")
_TOL = 1e-9                 # float rounding in a cosine or a share computed as a ratio


def _rule(where: str, rule: str) -> WeightdiffError:
    return WeightdiffError(f"{where}: {rule}", _HINT)


def _at_least0(x: Any, where: str, path: str) -> None:
    if x is not None and x < 0:
        raise _rule(where, f"`{escape_name(path)}` is negative ({x}), and no measurement writes that")


def _share(x: Any, where: str, path: str, top: float = 1.0) -> None:
    if x is not None and not -_TOL <= x <= top + _TOL:
        raise _rule(where, f"`{escape_name(path)}` is {x}, outside [0, {top:g}]")


def _cos(x: Any, where: str, path: str) -> None:
    if x is not None and not -1 - _TOL <= x <= 1 + _TOL:
        raise _rule(where, f"`{escape_name(path)}` is {x}, outside [-1, 1]")


def _within(part: Any, whole: Any, where: str, ppath: str, wpath: str) -> None:
    if part is not None and whole is not None and part > whole:
        raise _rule(where, f"`{escape_name(ppath)}` is {part}, more than `{escape_name(wpath)}` ({whole})")


def _invariants(data: dict, where: str) -> None:
    """What a memo states as a fact and a comparison cannot write otherwise: counts within their totals,
    shares in [0, 1], norms and relative changes not negative, cosines in [-1, 1], and the summary's counts
    by status equal to the tensor rows it sums. The first rule broken is named (``report`` exits 2): a
    hand-edited "99 of 2 blocks changed" or a share of 700% is never drawn as weightdiff's finding."""
    from .sentences import is_tied_row

    s = data["summary"]
    sc = s.get("scope") or {}
    _within(s.get("blocks_changed"), s.get("blocks_total"), where, "summary.blocks_changed", "summary.blocks_total")
    for part, whole in (("blocks_changed", "blocks_total"), ("tensors_changed", "tensors_total"),
                        ("base_blocks_paired", "base_blocks_total")):
        _within(sc.get(part), sc.get(whole), where, f"summary.scope.{part}", f"summary.scope.{whole}")
    for k in sc:
        if isinstance(sc[k], int) and not isinstance(sc[k], bool):
            _at_least0(sc[k], where, f"summary.scope.{k}")
    _within(s.get("delta_params_lower"), s.get("delta_params"), where, "summary.delta_params_lower",
            "summary.delta_params")
    for k in ("relative_change", "relatedness_rel_change"):
        _at_least0(s.get(k), where, f"summary.{k}")
    _cos(s.get("relatedness_cosine"), where, "summary.relatedness_cosine")
    for side, cov in (s.get("coverage") or {}).items():
        for k, x in (cov or {}).items():
            (_share if k.endswith("share") else _at_least0)(x, where, f"summary.coverage.{side}.{k}")
    for k, x in ((s.get("form") or {}).get("shares") or {}).items():
        _share(x, where, f"summary.form.shares.{k}")
    for i, c in enumerate(s.get("components") or []):
        _cos(c.get("cosine"), where, f"summary.components[{i}].cosine")
        _at_least0(c.get("rel_change"), where, f"summary.components[{i}].rel_change")
    by_status = s.get("params_by_status") or {}
    total = s.get("params_total")
    if by_status and total is not None and sum(by_status.values()) != total:
        raise _rule(where, f"`summary.params_by_status` sums to {sum(by_status.values())}, not "
                           f"`summary.params_total` ({total})")
    rows: dict[str, int] = {}
    for i, t in enumerate(data["tensors"]):
        p = f"tensors[{i}]"
        if t["status"] not in STATUSES:
            raise _rule(where, f"`{p}.status` is `{escape_name(str(t['status']))[:40]}`, not one of "
                               + ", ".join(STATUSES))
        if not is_tied_row(t):
            rows[t["status"]] = rows.get(t["status"], 0) + 1
        for k in ("numel", "numel_compared", "norm_base", "norm_tuned", "norm_delta", "rel_change", "max_abs_delta",
                  "nonfinite", "sign_flips"):
            _at_least0(t.get(k), where, f"{p}.{k}")
        for k in ("frac_changed", "frac_beyond_rounding"):
            _share(t.get(k), where, f"{p}.{k}")
        _cos(t.get("cosine"), where, f"{p}.cosine")
        _within(t.get("numel_compared"), t.get("numel"), where, f"{p}.numel_compared", f"{p}.numel")
        _within(t.get("frac_beyond_rounding"), t.get("frac_changed"), where, f"{p}.frac_beyond_rounding",
                f"{p}.frac_changed")
    stated = {k: x for k, x in (s.get("tensors_by_status") or {}).items() if x}
    if "tensors_by_status" in s and stated != rows:
        k = next(k for k in sorted(set(stated) | set(rows)) if stated.get(k, 0) != rows.get(k, 0))
        raise _rule(where, f"`summary.tensors_by_status.{escape_name(str(k))[:40]}` is {stated.get(k, 0)}, but "
                           f"{rows.get(k, 0)} of the rows in `tensors` have that status")
    numbered = sum(1 for b in data["blocks"] if b.get("index") is not None)
    if s.get("blocks_total") is not None and numbered != s["blocks_total"]:
        # a run lists every numbered block it counts, no more: 200,000 blocks beside a total of 4 took minutes
        raise _rule(where, f"`blocks` holds {numbered} numbered blocks, but `summary.blocks_total` is "
                           f"{s['blocks_total']}")
    for i, b in enumerate(data["blocks"]):
        p = f"blocks[{i}]"
        _at_least0(b.get("index"), where, f"{p}.index")
        for k in ("params", "params_changed", "tensors", "tensors_changed", "rel_change", "norm_base", "norm_delta",
                  "delta_params", "delta_params_lower"):
            _at_least0(b.get(k), where, f"{p}.{k}")
        _within(b.get("params_changed"), b.get("params"), where, f"{p}.params_changed", f"{p}.params")
        _within(b.get("tensors_changed"), b.get("tensors"), where, f"{p}.tensors_changed", f"{p}.tensors")
    for i, pt in enumerate((data.get("reference") or {}).get("points") or []):
        _at_least0(pt["rel_change"], where, f"reference.points[{i}].rel_change")
        _share(pt["one_minus_cosine"], where, f"reference.points[{i}].one_minus_cosine", top=2.0)
