"""The reference scale: where this model sits between a cast's rounding and an unrelated model.

Every point is computed for this very base from the compare JSON, never typed in:

* ``cast to bfloat16`` / ``cast to float16``: the change a cast of the base's own weights
  would make (the tensors' ``rounding_floor``, measured while the base streamed; see
  weightdiff.measure.floors). Relative change = sqrt(sum floor^2) / sqrt(sum norm_base^2);
  1 - cosine of rounding noise independent of the weights is floor^2 / (2 norm_base^2)
  per matrix, weighted by size as the model's own 1 - cosine is.
* ``this model`` (the tuned model, named so whatever the verdict): the relative change and 1 - cosine of the large matrices, the
  numbers the verdict uses.
* ``unrelated model``: two independently initialised models are near-orthogonal
  (cosine about 0), so ||T - B||^2 = ||B||^2 + ||T||^2 and the relative change is
  sqrt(sum (norm_base^2 + norm_tuned^2)) / sqrt(sum norm_base^2) (sqrt 2 when the norms
  agree); 1 - cosine is 1. tests/test_reference.py checks this against two models
  initialised independently.

All points use the same matrices: the large matrices the relatedness rule reads
(weightdiff.judge.relatedness.counts_for_relatedness), all matrices when none is large.

>>> rows = [{"status": "changed", "compared": "float", "cosine": 0.99, "module": "attn.q", "shape": [4, 4],
...          "numel": 16, "numel_compared": 16, "norm_base": 3.0, "norm_tuned": 4.0, "norm_delta": 0.5,
...          "rounding_floor": {"BF16": 0.03, "F16": 0.003}}]
>>> s = reference_scale({"tensors": rows, "summary": {}, "settings": {"thresholds": {"large_matrix_numel": 1}}})
>>> [(p["key"], round(p["rel_change"], 4)) for p in s["points"]]
[('F16', 0.001), ('BF16', 0.01), ('model', 0.1667), ('unrelated', 1.6667)]
"""

from __future__ import annotations

import math

from ..judge.relatedness import chosen_evidence, evidence_sizes, from_negated, negation_cut

__all__ = ["reference_scale", "reference_of", "quantization_noise", "LABELS", "one_minus_cosine_of", "nonfinite_only", "only_nonfinite",
           "unmeasured_blocks", "norms_cancel"]

LABELS = {"F16": "float16 rounding", "BF16": "bfloat16 rounding", "model": "this model",
          "unrelated": "unrelated model"}


def _rows(data: dict) -> list[dict]:
    # a tied head row repeats the tuned embedding against the base head: the summary's
    # relatedness leaves it out (judge/verdict.py), and so does this scale
    tensors = [t for t in data.get("tensors") or []
               if not t.get("tied") and not str(t.get("note") or "").startswith("tied:")]
    large = ((data.get("settings") or {}).get("thresholds") or {}).get("large_matrix_numel")
    evidence = [(t, n) for t, n in evidence_sizes(tensors)
                if t.get("norm_base") and t.get("norm_tuned") is not None and t.get("norm_delta") is not None]
    return [t for t, _ in chosen_evidence(evidence, large)]


def quantization_noise(data: dict) -> tuple[bool, float | None]:
    """Whether the large matrices the scale reads include quantized ones (a quantized side, ``quant``), and
    the relative change of those among them within their quantization noise floor (status ``quantized``):
    what an untouched quantized copy of the base shows, the level the model's own figure includes (a Q4_K
    copy of a 1e-3 fine-tune read 9.0e-2, as the base's own Q4_K copy does). (False, None) for float pairs;
    (True, None) when no quantized matrix is within its floor."""
    rows = _rows(data)
    if not any(t.get("quant") for t in rows):
        return False, None
    within = [t for t in rows if t.get("status") == "quantized" and t.get("norm_base")]
    nb2 = sum(t["norm_base"] ** 2 for t in within)
    if not within or nb2 <= 0:
        return True, None
    return True, math.sqrt(sum(t["norm_delta"] ** 2 for t in within) / nb2)


def _net_of_sign(t: dict, unrelated_cosine: float) -> dict:
    """A row stored with the sign flipped and left so (``judge.relatedness.negated_rows``: quantized, adapter
    factors) as its distance from the base negated, as the summary's relatedness counts it; others as they are."""
    from types import SimpleNamespace

    n = t.get("numel_compared") or t.get("numel") or 0
    c = t.get("cosine")
    if c is None or c >= -negation_cut(SimpleNamespace(unrelated_cosine=unrelated_cosine), n):
        return t
    return {**t, "cosine": -c, "norm_delta": from_negated(t["norm_base"], t["norm_tuned"], c)}


#: explicit mantissa bits of the cast floors' formats: a cast moves each element by at most |x| 2^-(bits + 1)
_MANT = {"F16": 10, "BF16": 7}


def _floor_over_norm(t: dict) -> dict:
    """A row's cast floors over the elements its norms cover. The floors come from the base's exponent
    histogram, every element; the norms leave out pairs where either side is NaN or infinite. A base value of
    1e6 cast to float16 (infinite) still put its bfloat16 rounding (~2e3) into the floor beside a norm of 1.8:
    the bfloat16 point read a relative change of 1,190. Where a row has such pairs, each floor is capped at
    the most a cast can move its norm's elements, norm_base x 2^-(mantissa bits + 1)."""
    f = t.get("rounding_floor") or {}
    if not (t.get("nonfinite") or 0) or not f:
        return f
    nb = float(t.get("norm_base") or 0.0)
    return {k: (min(v, nb * 2.0 ** -(_MANT[k] + 1)) if k in _MANT and isinstance(v, (int, float)) else v)
            for k, v in f.items()}


def _omc(t: dict) -> float:
    nb, nt, nd = t["norm_base"], t["norm_tuned"], t["norm_delta"]
    if nd == 0:
        return 0.0
    if nb > 0 and nt > 0 and not norms_cancel(nb, nt, nd, t.get("cosine")):
        return max(0.0, (nd * nd - (nb - nt) ** 2) / (2.0 * nb * nt))
    return max(0.0, 1.0 - t["cosine"])


def norms_cancel(nb: float, nt: float, nd: float, cosine: float | None) -> bool:
    """Whether 1 - cosine from the norms, (nd^2 - (nb - nt)^2) / (2 nb nt), loses its digits: when the norms differ
    by more than half the delta's, the two squares nearly cancel (a tuned matrix 1e37 times the base's size read
    1 - cosine = 0 beside a cosine of 0.013), where the stored cosine's 1 - cosine is exact to ~1e-16. The norm
    form is for a cosine near 1 with the norms close, which 1 - cosine rounds away."""
    return cosine is not None and math.isfinite(cosine) and abs(nb - nt) > 0.5 * nd


def reference_scale(data: dict) -> dict:
    """``{"matrices": n, "params": p, "points": [...]}``, points in the order float16, bfloat16, this model, unrelated,
    with ``key``, ``label``, ``rel_change`` and ``one_minus_cosine``; ``points`` is empty when
    no matrix was compared as floats."""
    rows = _rows(data)
    if not rows:
        return {"matrices": 0, "params": 0, "points": []}
    w = [float(t.get("numel_compared") or t.get("numel") or 0) for t in rows]
    wsum = sum(w) or 1.0
    unrel = ((data.get("settings") or {}).get("thresholds") or {}).get("unrelated_cosine", 0.2)
    rows = [_net_of_sign(t, unrel) for t in rows]
    nb2 = sum(t["norm_base"] ** 2 for t in rows)
    nt2 = sum(t["norm_tuned"] ** 2 for t in rows)
    nd2 = sum(t["norm_delta"] ** 2 for t in rows)
    points = []
    floors = [_floor_over_norm(t) for t in rows]
    for key in ("F16", "BF16"):
        if all(key in f for f in floors):
            f2 = sum(f[key] ** 2 for f in floors)
            omc = sum(wi * f[key] ** 2 / (2.0 * t["norm_base"] ** 2) for wi, f, t in zip(w, floors, rows)) / wsum
            p = {"key": key, "label": LABELS[key], "rel_change": math.sqrt(f2 / nb2), "one_minus_cosine": omc}
            if key == "F16":
                p["overflow"] = sum(f.get("F16_overflow", 0) for f in floors)
            points.append(p)
    points.append({"key": "model", "label": LABELS["model"], "rel_change": math.sqrt(nd2 / nb2),
                   "one_minus_cosine": sum(wi * _omc(t) for wi, t in zip(w, rows)) / wsum})
    points.append({"key": "unrelated", "label": LABELS["unrelated"], "rel_change": math.sqrt((nb2 + nt2) / nb2),
                   "one_minus_cosine": 1.0})
    return {"matrices": len(rows), "params": int(sum(w)), "points": points}



def reference_of(data: dict) -> dict:
    """The JSON's own ``reference`` when it has one (written by compare), else computed here."""
    given = data.get("reference")
    return given if isinstance(given, dict) and "points" in given else reference_scale(data)


def one_minus_cosine_of(data: dict) -> float | None:
    """The large matrices' 1 - cosine as every output prints it: the reference scale's "this model" point
    (each matrix's 1 - cosine from its norms, which keeps the digits that ``1 - cosine`` loses near 0), else
    ``1 - summary.relatedness_cosine``. One source, so a memo cannot print 0 in one place and 8.4e-17 in
    another for the same quantity; the two agree to float64 rounding (~1e-16) where both exist."""
    cos = (data.get("summary") or {}).get("relatedness_cosine")
    if cos is None:
        return None
    for p in reference_of(data).get("points") or []:
        if p.get("key") == "model" and p.get("one_minus_cosine") is not None:
            return float(p["one_minus_cosine"])
    return max(0.0, 1.0 - cos)


def nonfinite_only(t: dict) -> bool:
    """A JSON tensor row that differs only where one side holds NaN or infinity (``judge.verdict.nonfinite_only``):
    its norms are over the finite values, which are the base's, so its relative change of 0 is not a measurement
    of the change and prints as n/a."""
    return t.get("status") == "changed" and (t.get("nonfinite") or 0) > 0 and t.get("norm_delta") == 0.0


def only_nonfinite(data: dict) -> bool:
    """Every changed tensor differs only by NaN or infinity: the model's relative change and 1 - cosine (0, over
    the finite values) measure nothing, and every output prints them as n/a rather than 0."""
    changed = [t for t in data.get("tensors") or [] if t.get("status") == "changed"]
    return bool(changed) and all(nonfinite_only(t) for t in changed)


def unmeasured_blocks(data: dict) -> set:
    """Blocks whose changed tensors all differ only by NaN or infinity (their relative change prints as n/a)."""
    by_block: dict = {}
    for t in data.get("tensors") or []:
        if t.get("status") == "changed" and t.get("block") is not None:
            by_block.setdefault(t["block"], []).append(nonfinite_only(t))
    return {b for b, flags in by_block.items() if all(flags)}

