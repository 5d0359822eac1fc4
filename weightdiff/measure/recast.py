"""The cast-chain test: is a tensor that fails the half-ulp rounding test still exactly a cast of its base?

The stats pass (``kernels.*.delta_stats``) calls an element rounding when it moved by at most half an
ulp of the coarser dtype. Two casts are not covered by that bound: a cast through a third dtype
(fp32 -> fp16 -> bf16 rounds twice, and fp16's subnormals below 6.1e-5 lose absolute precision 2^-25
that bf16 keeps) and a value beyond the cast dtype's range (1e5 becomes inf in fp16). For a pair whose
dtypes differ and whose stats count elements beyond rounding, ``cast_test`` streams both tensors again
through ``kernels.cpu.recast_counts``: for each chain base -> via -> tuned (``reference.RECAST_VIAS``:
direct, through F16, BF16, F32) the elements neither within half an ulp nor bitwise the value that chain
gives (nor, past the range, the tuned dtype's largest value of the right sign: a saturating cast).

A chain that leaves no element unexplained (at most ``rounding_frac`` of them) is a proof that the
tuned tensor is what casting the base through it gives; the judge then calls the tensor ``rounding``
(``judge.status.classify``). The test is cheap where it fails: it reads a first probe of
``PROBE`` elements and stops as soon as every chain leaves more unexplained elements than allowed (a
fine-tune fails in the probe); a chain is dropped from the following windows once it has failed, and the
counts of the chain that succeeds are exact. The pass runs on the CPU with any ``--device`` (it is rare:
only casts the half-ulp test could not explain read a whole tensor).
"""

from __future__ import annotations

import math
import os
import weakref

import numpy as np

from ..kernels import cpu
from ..kernels.dtypes import DTYPES
from ..kernels.reference import RECAST_DTYPES, RECAST_VIAS

__all__ = ["cast_test", "clamp_test", "twin_test", "twin_route", "twin_chains", "twin_vias", "side_chains", "chains",
           "PROBE", "CLAMP_MIN", "CLAMP_MAX"]

#: elements of the first window read: a fine-tune leaves unexplained elements in it, and the test stops
PROBE = 1 << 16


def chains(dtype_b: str, dtype_t: str) -> list[str | None]:
    """The chains worth testing for a pair: the direct cast, and each intermediate that is neither side
    and does not hold every base value exactly (through such a one the chain is the direct cast)."""
    if dtype_b not in RECAST_DTYPES or dtype_t not in RECAST_DTYPES:
        return []
    b = DTYPES[dtype_b]
    if dtype_b == dtype_t:
        # the same dtype on both sides, rounded through a narrower one in between (a model loaded as bf16 and
        # saved back as fp16: GPTQModel on CPU writes a fp16 model's biases so)
        return [v for v in RECAST_VIAS if v is not None and v != dtype_b
                and (DTYPES[v].mant_bits < b.mant_bits or DTYPES[v].emin > b.emin)]
    out: list[str | None] = []
    for via in RECAST_VIAS:
        if via is not None:
            v = DTYPES[via]
            if via in (dtype_b, dtype_t) or (v.mant_bits >= b.mant_bits and v.emin <= b.emin):
                continue
        out.append(via)
    return out


def _plain(ckpt, name: str) -> bool:
    """Values stored as they are handed out (not dequantized, not decoded from a GGML block)."""
    info = ckpt.tensors.get(name)
    return (info is not None and name not in getattr(ckpt, "quant", {})
            and getattr(info, "quant", None) is None and getattr(info, "scheme", None) is None)


def cast_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, numel: int,
              stop: int | None, window: int, rounding_frac: float) -> dict | None:
    """The record's ``cast`` dict when a chain explains the tensor, else None.

    ``{"chain": [dtype_b, (via,) dtype_t], "through": via or None, "elements": compared,
    "unexplained": n, "overflow": k, "saturated": s}``: ``overflow`` base values that became an
    infinity of their sign in the cast, ``saturated`` those stored as the largest finite value instead.
    ``numel``: elements compared (``stop`` when given). None also when no chain applies (same dtype,
    an integer or fp8 side, a quantized side).
    """
    off_b, off_t = (getattr(ck, "offset_storage", lambda n: None)(n) for ck, n in ((base, bname), (tuned, tname)))
    if (off_b or off_t) and numel > 0 and not (off_b and off_t):
        return offset_test(base, bname, dtype_b, tuned, tname, dtype_t, off_b or off_t, off_t is not None,
                           numel, stop, window, rounding_frac)
    vias = chains(dtype_b, dtype_t)
    if not vias or numel <= 0 or not (_plain(base, bname) and _plain(tuned, tname)):
        return None
    end = numel if stop is None else min(stop, numel)
    budget = math.floor(rounding_frac * end) if rounding_frac > 0 else 0
    totals = {v: [0, 0, 0] for v in vias}
    alive = list(vias)

    def spans():
        first = min(PROBE, end)
        yield 0, first, first
        if end > first:
            yield first, end, window

    for start, stop_, step in spans():
        pairs = zip(base.windows(bname, step, start, stop_), tuned.windows(tname, step, start, stop_))
        for wb, wt in pairs:
            counts = cpu.recast_counts(wb, wt, dtype_b, dtype_t, tuple(alive))
            for via, row in zip(list(alive), counts.tolist()):
                t = totals[via]
                for j in range(3):
                    t[j] += int(row[j])
                if t[0] > budget:
                    alive.remove(via)
            if not alive:
                return None
    via = alive[0]
    n, ovf, sat = totals[via]
    return {"chain": [dtype_b] + ([via] if via is not None else []) + [dtype_t], "through": via,
            "elements": end, "unexplained": n, "overflow": ovf, "saturated": sat}


def offset_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, stored: str,
                tuned_side: bool, numel: int, stop: int | None, window: int, rounding_frac: float) -> dict | None:
    """The ``cast`` dict when one side is stored as ``1 + w`` in ``stored`` (llama.cpp's Gemma norm
    weights) and every value it hands out (that minus 1, in float32) is what storing the other side's
    value gives: ``round_F32(round_F32(round_stored(round_inner(w + 1))) - 1)``, ``inner`` the float32
    or the other side's own dtype the converter added in. The subtraction does not give back an F32 or
    F16 weight's bits (about 6e-8 off), so an unchanged Gemma converted to an F32 GGUF read "5 of 20
    tensors changed". ``chain`` is ``[plain dtype, "1 + w as <stored>", "F32"]``, ``through`` None."""
    from ..kernels.reference import decode, round_to

    plain_ck, plain_name, plain_dt = (base, bname, dtype_b) if tuned_side else (tuned, tname, dtype_t)
    off_ck, off_name = (tuned, tname) if tuned_side else (base, bname)
    if plain_dt not in RECAST_DTYPES or stored not in RECAST_DTYPES:
        return None
    end = numel if stop is None else min(stop, numel)
    budget = math.floor(rounding_frac * end) if rounding_frac > 0 else 0
    inners = list(dict.fromkeys(("F32", plain_dt)))
    missed = {k: 0 for k in inners}
    for wp, wo in zip(plain_ck.windows(plain_name, window, 0, end), off_ck.windows(off_name, window, 0, end)):
        p = decode(np.asarray(wp).reshape(-1), plain_dt)
        got = np.asarray(wo, dtype=np.float64).reshape(-1)
        for inner in list(missed):
            want = round_to(round_to(round_to(round_to(p + 1.0, inner), stored), "F32") - 1.0, "F32")
            same = (want == got) | (np.isnan(want) & np.isnan(got))
            missed[inner] += int(same.size - np.count_nonzero(same))
            if missed[inner] > budget:
                del missed[inner]
        if not missed:
            return None
    inner, n = min(missed.items(), key=lambda kv: kv[1])
    return {"chain": [plain_dt, f"1 + w as {stored}", "F32"], "through": None, "elements": end,
            "unexplained": n, "overflow": 0, "saturated": 0}


#: onnxconverter-common's ``convert_float_to_float16`` (the usual fp16 conversion of an ONNX model) raises
#: magnitudes in (0, min_positive_val) to min_positive_val and lowers those above max_finite_val to it
#: before the cast (``convert_np_to_float16``), with these defaults
CLAMP_MIN = 1e-7
CLAMP_MAX = 1e4
#: (min_positive_val, max_finite_val, whose) of each fp16 converter that clamps so: onnxconverter-common's, and
#: ONNX Runtime's own (``onnxruntime.transformers.float16``, behind ``optimize_model(...).convert_float_to_float16()``
#: and Optimum's ORT fp16 exports), whose defaults are fp16's smallest subnormal and largest finite value
CLAMPS = ((CLAMP_MIN, CLAMP_MAX, "onnxconverter-common"), (5.96e-08, 65504.0, "onnxruntime"))


def _half_ulp(v: np.ndarray, dtype: str) -> np.ndarray:
    """Half an ulp of ``dtype`` at each magnitude of ``v`` (subnormals: the smallest normal's ulp)."""
    d = DTYPES[dtype]
    e = np.frexp(np.abs(v))[1].astype(np.int64) - 1
    e = np.where(v == 0, d.emin, np.maximum(e, d.emin))
    return np.ldexp(0.5, (e - d.mant_bits).astype(np.int32))


def _two_roundings(x: np.ndarray, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Elements where a BF16 base ``x`` and an F16 ``t`` are the two roundings of one float32 original
    clamped as onnxconverter-common clamps it: within half an ulp of each at the value, or, for the clamped,
    ``t`` the clamp's magnitude in fp16 with the base's sign and the base no farther from the clamp than a
    bf16 rounding could put it."""
    with np.errstate(invalid="ignore", over="ignore"):
        tol = _half_ulp(x, "BF16") + _half_ulp(t, "F16")
        near = np.isfinite(x) & np.isfinite(t) & (np.abs(t - x) <= tol)
        lo16 = float(np.float16(np.float32(lo)))
        hi16 = float(np.float16(np.float32(hi)))
        clamp_lo = (np.abs(t) == lo16) & (np.sign(t) == np.sign(x)) & (np.abs(x) <= lo + _half_ulp(x, "BF16"))
        clamp_hi = (np.abs(t) == hi16) & (np.sign(t) == np.sign(x)) & (np.abs(x) >= hi - _half_ulp(x, "BF16"))
    return near | clamp_lo | clamp_hi


def clamp_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, numel: int,
               stop: int | None, window: int, rounding_frac: float) -> dict | None:
    """The record's ``cast`` dict when the tuned F16 tensor is bitwise the base (F32, F64, BF16) clamped to
    ``[CLAMP_MIN, CLAMP_MAX]`` in magnitude and cast, as onnxconverter-common converts an ONNX model to
    fp16, or to ONNX Runtime's ``[5.96e-8, 65504]`` (its own converter; ``clamp`` then gives that range: it
    raised BERT's never-trained key biases, ~1e-8, to 5.96e-8, and an untouched base read as a fine-tune);
    ``clamped`` counts the values the clamp moved. None when another value differs.

    A BF16 base is most often the release the fp16 export was made from (upcast to float32 first: the
    chain above), or the bf16 rounding of the float32 original it was made from: then an element that is not
    the chain's still counts when it lies within the two roundings (half an ulp of bf16 and of fp16 at the
    value) and a clamped one when the base rounds to the clamp's magnitude, with its sign."""
    if dtype_t != "F16" or dtype_b not in ("F32", "F64", "BF16") or numel <= 0 \
            or not (_plain(base, bname) and _plain(tuned, tname)):
        return None
    for lo, hi, whose in CLAMPS:              # a fine-tune fails each in its first small read
        got = _clamp_cast(base, bname, dtype_b, tuned, tname, dtype_t, numel, stop, window, rounding_frac, lo, hi)
        if got is not None:
            if got["clamped"] and whose != CLAMPS[0][2]:
                got["clamp"] = [lo, hi]        # the converter's range, when not onnxconverter-common's
            return got
    return None


def _clamp_cast(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, numel: int, stop: int | None,
                window: int, rounding_frac: float, lo: float, hi: float) -> dict | None:
    """``clamp_test`` for one converter's clamp range ``[lo, hi]``."""
    from ..kernels.dtypes import decode
    end = numel if stop is None else min(stop, numel)
    budget = math.floor(rounding_frac * end) if rounding_frac > 0 else 0
    lo, hi = np.float64(lo), np.float64(hi)
    bad = clamped = 0
    first = min(PROBE, end)                   # a fine-tune fails in the probe: one small read, not a window
    spans = [(0, first, first)] + ([(first, end, window)] if end > first else [])
    for wb, wt in ((wb, wt) for a, b, step in spans
                   for wb, wt in zip(base.windows(bname, step, a, b), tuned.windows(tname, step, a, b))):
        x = decode(wb, dtype_b) if dtype_b == "BF16" else np.asarray(wb, dtype=np.float64)
        c = np.where((x > 0) & (x < lo), lo, x)
        c = np.where((x < 0) & (x > -lo), -lo, c)
        c = np.where((x > hi) & (x < np.inf), hi, c)
        c = np.where((x < -hi) & (x > -np.inf), -hi, c)
        want = c.astype(np.float32).astype(np.float16) if dtype_b in ("F32", "BF16") else c.astype(np.float16)
        got = np.asarray(wt).view(np.uint16)
        same = want.view(np.uint16) == got
        if dtype_b == "BF16" and not same.all():
            same |= _two_roundings(x, got.view(np.float16).astype(np.float64), lo, hi)
        bad += int(same.size - np.count_nonzero(same))
        clamped += int(np.count_nonzero(c != x))
        if bad > budget:
            return None
    return {"chain": [dtype_b, dtype_t], "through": None, "elements": end, "unexplained": bad, "overflow": 0,
            "saturated": 0, "clamped": clamped}


#: each side's roundings between the original and its stored dtype that ``twin_test`` tries, in the order applied
TWIN_CHAINS = ((), ("BF16",), ("F16",), ("F16", "BF16"), ("BF16", "F16"))
#: fp16 converters' clamps a float16 side may have gone through (``kernels.reference.CLAMPS``)
TWIN_CLAMPS = ("CLAMP", "CLAMP_ORT")
#: elements of the first read of ``twin_test``: a fine-tune fails every pair of chains in it
TWIN_PROBE = 4096


def side_chains(dtype: str) -> list[tuple[str, ...]]:
    """The roundings a side stored in ``dtype`` may have gone through first (``TWIN_CHAINS`` without ``dtype``
    itself: rounding to it twice is rounding once); a float16 side may also be an fp16 converter's, its clamp
    (``kernels.reference.CLAMPS``) last, after the original or its bf16 copy."""
    if dtype not in RECAST_DTYPES:
        return []
    out = [c for c in TWIN_CHAINS if dtype not in c]
    if dtype == "F16":
        out += [c + (k,) for k in TWIN_CLAMPS for c in ((), ("BF16",))]
    return out


def twin_chains(dtype_b: str, dtype_t: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The (base side's, tuned side's) roundings ``twin_test`` tries, fewest roundings first: every pair of
    ``side_chains`` but, in one dtype, a chain against itself (which gives equal values alone). Between two dtypes
    the original rounded to each (``((), ())``) is no cast of one side to the other where neither holds the other's
    values: 1e5 is an infinity in float16 and 99840 in bf16."""
    keys = [(cb, ct) for cb in side_chains(dtype_b) for ct in side_chains(dtype_t)
            if not (dtype_b == dtype_t and cb == ct)]
    return sorted(keys, key=lambda k: len(k[0]) + len(k[1]))


def twin_vias(dtype_b: str, dtype_t: str) -> list[str]:
    """The narrower dtypes either side of a pair may have been rounded through (``twin_chains``)."""
    return sorted({v for k in twin_chains(dtype_b, dtype_t) for side in k for v in side})


def _needs_grid(dtype: str, vias: tuple[str, ...]) -> str | None:
    """The dtype whose grid a side so rounded holds its values on, where that says something: the last rounding
    before the stored dtype, when it has fewer mantissa bits (bf16 values in float16 or float32); None where the
    stored dtype's own values are all its values (float16 values rounded to bf16 are just bf16 values)."""
    steps = [v for v in vias if v in DTYPES]
    if steps and DTYPES[steps[-1]].mant_bits < DTYPES[dtype].mant_bits:
        return steps[-1]
    return None


def _whole_model(dtype_b: str, dtype_t: str, key) -> bool:
    """Whether a pair of chains must explain the pair's other tensors too (``witness_explains``): every one but a
    single rounding on one side to a narrower grid, which ``side_on_grid`` witnesses, a clamp (which moves a value
    to exactly its magnitude) beside those, and the original rounded to each of two dtypes. Two roundings on a side,
    both sides rounded, or bf16's rounding of float16 values (no grid of its own) each widen what one tensor's values
    admit; a conversion converts the whole model, and a norm-only fine-tune's gains of 1 - 2^-8 beside a bf16 base
    of 1.0 read "two roundings" through float16 then bf16, where the matrices beside them are no such pair."""
    vb, vt = (tuple(v for v in side if v not in TWIN_CLAMPS) for side in key)
    if not (vb or vt):
        # a clamp alone moves a value to exactly the clamp's magnitude, which nothing else does; the original
        # rounded to each of two dtypes is the cast between them but past a range
        return not any(key) and dtype_b == dtype_t
    if vb and vt:
        return True
    vias, dt = (vb, dtype_b) if vb else (vt, dtype_t)
    return len(vias) != 1 or _needs_grid(dt, vias) is None


_WITNESS_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def witness_explains(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, key,
                     rounding_frac: float) -> bool:
    """Whether the pair's largest other tensor that differs (named on the tuned side as this pair's names differ:
    another prefix, ``m.`` of an ONNX export; of these dtypes and size, plain; its first ``PROBE`` elements, of the
    ``GRID_CANDIDATES`` largest) is explained by the chains ``key`` too. False where no other tensor differs (a
    conversion changes more than one tensor) or none is so named. Cached per checkpoint pair, dtypes, chains and
    candidates."""
    from ..kernels.reference import decode
    bck, tck = getattr(base, "_ck", base), getattr(tuned, "_ck", tuned)
    bt, tt = getattr(bck, "tensors", None) or {}, getattr(tck, "tensors", None) or {}
    common = len(os.path.commonprefix([bname[::-1], tname[::-1]]))
    pb, pt = bname[:len(bname) - common], tname[:len(tname) - common]

    def other(n: str) -> str:
        return pt + n[len(pb):] if n.startswith(pb) else ""

    names = sorted((n for n, info in bt.items()
                    if n != bname and other(n) in tt and getattr(info, "dtype", None) == dtype_b
                    and getattr(tt[other(n)], "dtype", None) == dtype_t and getattr(info, "numel", 0) >= GRID_DISTINCT
                    and getattr(tt[other(n)], "numel", -1) == info.numel and _plain(bck, n) and _plain(tck, other(n))),
                   key=lambda n: (-bt[n].numel, n))[:GRID_CANDIDATES]
    try:
        seen = _WITNESS_SEEN.setdefault(bck, {})
    except TypeError:                                  # not weakly referenceable: no cache
        seen = {}
    ckey = (id(tck), dtype_b, dtype_t, key, pb, pt, tuple(names))
    if ckey not in seen:
        seen[ckey] = False
        for n in names:
            k = min(PROBE, bt[n].numel)
            wb = np.asarray(next(iter(bck.windows(n, k, 0, k)))).reshape(-1)
            wt = np.asarray(next(iter(tck.windows(other(n), k, 0, k)))).reshape(-1)
            b, t = decode(wb, dtype_b), decode(wt, dtype_t)
            if ((b == t) | (np.isnan(b) & np.isnan(t))).all():
                continue                               # bitwise alike: any chains explain it
            budget = math.floor(rounding_frac * k) if rounding_frac > 0 else 0
            seen[ckey] = int(cpu.twin_counts(wb, wt, dtype_b, dtype_t, [key])[0, 0]) <= budget
            break
    return seen[ckey]


#: the words of a clamp step of a chain (``twin_route``)
STEP_WORDS = {"CLAMP": "onnxconverter-common's float16 clamp", "CLAMP_ORT": "ONNX Runtime's float16 clamp"}


def twin_route(cast: dict, words=None) -> str:
    """A two-roundings record's roundings in words: "the tuned side through BF16", "the base side through BF16 and
    the tuned side through F16", "the tuned side through F16 then BF16" (``words`` maps dtype names, e.g. to
    "bfloat16"). Records without ``vias`` name their one rounded side's ``through``."""
    vias = cast.get("vias") or {cast.get("rounded"): [cast.get("through")]}
    say = {**STEP_WORDS, **(words or {})}
    return " and ".join(f"the {side} side through {' then '.join(say.get(v, v) for v in vias[side])}"
                        for side in ("base", "tuned") if vias.get(side)) or "each rounded to its own dtype"


def twin_test(base, bname: str, dtype_b: str, tuned, tname: str, dtype_t: str, numel: int,
              stop: int | None, window: int, rounding_frac: float) -> dict | None:
    """The ``cast`` dict when the two sides are two roundings of one original through narrower dtypes: for every
    element some real x that rounding through one side's chain gives its base value and through the other's its
    tuned value (``kernels.reference.twin_explained``, exact). A model exported to float16 from its float32 master
    against one exported from a bf16 copy of it (both F16: ``round_F16(x)`` against ``round_F16(round_BF16(x))``,
    which differ by up to half a bf16 ulp and are no cast of each other: a ``bf16(x)`` that float16 rounds onto a
    bf16 midpoint rounds the other way through the chain, 6-9% of a tensor); a bf16 copy stored as float32 given as
    the *base* against the original; a bf16 release against a float16 one upcast to float32 (both sides rounded);
    ``bf16(x)`` against ``bf16(f16(x))`` (a float16 release converted to bf16: they differ by one bf16 step where
    float16 put x on a bf16 tie, and only towards the even value). Tried after ``cast_test`` and ``clamp_test``, on
    plain float sides, with each side's chains of up to two roundings through BF16 and F16 (``twin_chains``).

    ``rounded`` names the side that went through a rounding before its stored dtype (``"both"``; ``"neither"``: the
    original rounded to each side's dtype, as float16's infinity beside bf16's 99840), ``vias`` each
    side's (``{"base": [...], "tuned": [...]}``, in the order applied), ``through`` the narrowest last rounding of
    a rounded side (the grid its values are on), ``chain`` ``[dtype_b, through, dtype_t]``. A side said to hold a
    narrower dtype's values must hold them elsewhere too (``side_on_grid``). A fine-tune fails in the first small
    read: it moves values by more than a rounding somewhere, and a side trained in bf16 moves its bf16 values by
    whole steps, which no rounding of the same original gives. A change smaller than half a step of the narrower
    dtype does not show (as for any cast). Counted by ``kernels.cpu.twin_counts``: ``TWIN_PROBE`` elements first,
    then the rest of ``PROBE``, then windows (with the leading pair alone first, the others only where it fails); a
    pair of chains is dropped once it fails, and the fewest unexplained, then the fewest roundings, that pass
    ``side_on_grid`` and ``witness_explains`` are reported."""
    keys = twin_chains(dtype_b, dtype_t)
    if not keys or numel <= 0 or not (_plain(base, bname) and _plain(tuned, tname)):
        return None
    end = numel if stop is None else min(stop, numel)
    budget = math.floor(rounding_frac * end) if rounding_frac > 0 else 0
    missed = dict.fromkeys(keys, 0)           # (base chain, tuned chain) -> unexplained elements so far
    overflow = dict.fromkeys(keys, 0)
    cuts = sorted({0, min(TWIN_PROBE, end), min(PROBE, end), end})
    spans = [(a, b_, b_ - a if b_ <= PROBE else window) for a, b_ in zip(cuts, cuts[1:])]

    def count(spans, alive) -> None:
        """Add the unexplained and overflowing elements of ``spans`` for the chains ``alive``, dropping a pair of
        chains from ``missed`` once it is over the budget (and stopping once none of ``alive`` is left)."""
        if not alive:
            return
        for wb, wt in ((wb, wt) for a, b_, step in spans
                       for wb, wt in zip(base.windows(bname, step, a, b_), tuned.windows(tname, step, a, b_))):
            counts = cpu.twin_counts(wb, wt, dtype_b, dtype_t, alive)
            for key, row in zip(alive, counts.tolist()):
                missed[key] += int(row[0])
                overflow[key] += int(row[1])
                if missed[key] > budget:
                    del missed[key]
            alive = [k for k in alive if k in missed]
            if not alive:
                return

    # a side said to hold a narrower dtype's values must hold them elsewhere too: a float32 base whose all-ones
    # norm a fine-tune scaled by 1.001 read "the base holds the rounded values" (its matrices are off the bf16
    # grid, so it is no bf16 copy)
    # and chains that widen what one tensor admits must explain the model's other tensors (``_whole_model``)
    def holds(key) -> bool:
        return all(not (grid := _needs_grid(dt, vias))
                   or side_on_grid(ck, dt, grid, name, _varied(ck, name, dt, min(PROBE, end)))
                   for ck, name, dt, vias in ((base, bname, dtype_b, key[0]), (tuned, tname, dtype_t, key[1]))) \
            and (not _whole_model(dtype_b, dtype_t, key)
                 or witness_explains(base, bname, dtype_b, tuned, tname, dtype_t, key, rounding_frac))

    head, tail = [s for s in spans if s[1] <= PROBE], [s for s in spans if s[1] > PROBE]
    count(head, list(missed))
    # past the first PROBE elements, the first pair of chains (fewest roundings) that explained every one of them
    # alone: if it explains the rest too and holds, it is what counting every pair would report (no pair can have
    # fewer unexplained, and those before it in order already have some); only otherwise are the others read
    lead = next((k for k in missed if missed[k] == 0), None)
    if tail and lead is not None:
        count(tail, [lead])
        if missed.get(lead) == 0 and holds(lead):
            return _twin_record(lead, missed, overflow, end, dtype_b, dtype_t)
        count(tail, [k for k in missed if k != lead])
    elif tail:
        count(tail, list(missed))
    for key in sorted(missed, key=lambda k: missed[k]):          # fewest unexplained; of those, fewest roundings
        if holds(key):
            return _twin_record(key, missed, overflow, end, dtype_b, dtype_t)
    return None


def _twin_record(key, missed: dict, overflow: dict, end: int, dtype_b: str, dtype_t: str) -> dict:
    """``twin_test``'s ``cast`` dict for the pair of chains ``key``."""
    (vb, vt), n = key, missed[key]
    rounded = "both" if vb and vt else "base" if vb else "tuned" if vt else "neither"
    lasts = [[d for d in v if d in DTYPES][-1] for v in (vt, vb) if any(d in DTYPES for d in v)]
    through = min(lasts, key=lambda d: DTYPES[d].mant_bits) if lasts else (vt or vb or (None,))[-1]  # a clamp alone
    return {"chain": [dtype_b] + ([through] if through else []) + [dtype_t], "through": through, "rounded": rounded,
            "vias": {"base": list(vb), "tuned": list(vt)}, "elements": end, "unexplained": n,
            "overflow": overflow[(vb, vt)], "saturated": 0}


#: tensors of a side read by ``side_on_grid`` (its largest of the dtype), and elements read of each
GRID_WITNESSES = 4
GRID_PROBE = 4096
#: distinct values a witness must hold to say anything of a grid, and tensors looked at for witnesses at most
GRID_DISTINCT = 16
GRID_CANDIDATES = 16
_GRID_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _varied(ck, name: str, dtype: str, n: int) -> bool:
    """Whether the first ``n`` values of ``name`` hold at least ``GRID_DISTINCT`` distinct finite ones."""
    from ..kernels.reference import decode
    v = decode(np.asarray(next(iter(ck.windows(name, n, 0, n)))).reshape(-1), dtype)
    return np.unique(v[np.isfinite(v)]).size >= GRID_DISTINCT


def side_on_grid(ck, dtype: str, via: str, name: str, varied: bool = False) -> bool:
    """Whether the side's other plain ``dtype`` tensors show it holds ``via`` values: the first ``GRID_PROBE``
    elements of its largest ones (name order among equals), ``name`` left out, until ``GRID_WITNESSES`` of them hold
    at least ``GRID_DISTINCT`` distinct values, every one of those on ``via``'s grid. A tensor of few values (an
    all-ones norm, a zero bias) is on every grid and says nothing: a quantized GGUF whose float tensors are norms
    as initialised read "the base holds the rounded values" beside a fine-tune's trained norms. ``varied``: the
    tensor under test holds such values itself (its differing ones on the grid, as ``twin_test`` found), which
    counts as one witness. No witness at all: False (nothing shows the side is a rounded copy). Cached per
    checkpoint, dtype and via."""
    from ..kernels.reference import decode, round_to
    ck = getattr(ck, "_ck", ck)                       # a tensor held in memory (transposed): its checkpoint
    tensors = getattr(ck, "tensors", None) or {}
    names = sorted((n for n, info in tensors.items() if n != name and getattr(info, "dtype", None) == dtype
                    and _plain(ck, n) and getattr(info, "numel", 0) >= GRID_DISTINCT),
                   key=lambda n: (-tensors[n].numel, n))[:GRID_CANDIDATES]
    try:
        seen = _GRID_SEEN.setdefault(ck, {})
    except TypeError:                                  # not weakly referenceable: no cache
        seen = {}
    key = (dtype, via, tuple(names))
    if key not in seen:
        informative, ok = 0, True
        for n in names:
            k = min(GRID_PROBE, tensors[n].numel)
            v = decode(np.asarray(next(iter(ck.windows(n, k, 0, k)))).reshape(-1), dtype)
            v = v[np.isfinite(v)]
            if np.unique(v).size < GRID_DISTINCT:
                continue
            if not (round_to(v, via) == v).all():
                ok = False
                break
            informative += 1
            if informative >= GRID_WITNESSES:
                break
        seen[key] = (ok, informative)
    ok, informative = seen[key]
    return ok and (informative > 0 or varied)
