"""Relatedness evidence on plain numbers: the arithmetic behind weightdiff.provenance.

Pure functions over tensor rows (the ``tensors`` of a compare JSON) and over row
samples: the global and large-matrix relative change, the parameter-weighted cosine
over large matrices, bitwise-identical shares, per-block relative change, coverage,
the ``derived``/``unrelated`` judgement, and the seeded row sample of the screening
pass with its estimates. No file access here except through arrays handed in.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Mapping, Sequence

import numpy as np

from ..kernels.dtypes import DTYPES, decode
from ..options import Thresholds
from ..pairing.names import component_of, group_of, parse_name
from ..records import TensorRow, moved, relabelled
from .status import PAIRED, is_mismatch, placements, ratio

__all__ = ["REFERENCE", "EXCLUDED_NOTE", "LIMITS", "MARGINS", "near_tie", "weak_evidence", "weak_by", "looks_unrelated", "low_rank_change", "large_matrix_relatedness", "components", "split_suspects", "kind_rows", "reordered_kinds", "is_expert_name",
           "counts_for_relatedness", "evidence_sizes", "chosen_evidence", "evidence", "judge", "rank_key",
           "sample_rows", "sample_plan", "sampled_sums", "screen_estimate"]

REFERENCE = {"relative_change": math.sqrt(2.0), "cosine": 0.0,
             "what": "two independently initialized models of the same shape"}
EXCLUDED_NOTE = ("relatedness (cosine and large-matrix relative change) uses matrices of at least "
                 "{n:,} elements only: norm gains, biases and small matrices are left out, because "
                 "vectors near 1 or 0 make any two models look alike")
LIMITS = (
    "MLP neurons, attention heads, the experts of a mixture-of-experts layer or token rows put in another "
    "order, and whole matrices stored times -1, are recognised and measured against the base's units in the "
    "same order and sign; a residual stream rotated or permuted as a whole (QuaRot, SpinQuant) is measured in "
    "the rotated frame; rows or columns each rescaled (signs flipped one by one included) are measured beneath "
    "the scales where the rest of their block is unchanged. Neurons split or merged, or rescaled inside a block "
    "that was also trained, are not recognised, and make a derived model look less related or unrelated.",
    "Distillation, or training from scratch on the same data, leaves no weight-space trace: such a "
    "model reads unrelated to the teacher or sibling.",
    "A merge of several bases (averaging, task arithmetic, TIES) reads derived from each of them, "
    "with larger changes; the method does not decompose a merge into its parts.",
    "Evidence is about weights, not about licences or training data; it draws no legal conclusion.",
    "Weight distance is symmetric: the weights cannot show which of two related models came first. "
    "\"Derived from X\" means related to X by a fine-tune in one direction or the other (X may be this "
    "model's base, or a fine-tune of it); dates, model cards or training records must settle the direction.",
)

#: The hedges of the provenance answer (docs/provenance.md, "How sure the answer is"):
#: ``near_tie_ratio``: a runner-up whose large-matrix relative change is within this factor of the
#: leader's cannot be told apart from it (a sibling fine-tune of similar size is about sqrt(2) further);
#: ``weak_rel_change`` / ``weak_cosine``: a derived candidate at or above this relative change, or at or
#: below this cosine, is weak evidence: closer to the unrelated reference (sqrt(2), 0) than to a fine-tune.
MARGINS = {"near_tie_ratio": 1.2, "weak_rel_change": 0.5, "weak_cosine": 0.5}


def near_tie(lead: float | None, other: float | None) -> bool:
    """Whether ``other`` (the runner-up's relative change) is within ``near_tie_ratio`` of ``lead``.

    >>> near_tie(0.0100, 0.01006), near_tie(0.01, 0.0141), near_tie(0.0, 0.0)
    (True, False, True)
    """
    if lead is None or other is None:
        return False
    return other <= lead * MARGINS["near_tie_ratio"]


def weak_evidence(cosine: float | None, rel_change: float | None) -> bool:
    """Whether a ``derived`` reading rests on weak evidence (near the unrelated reference).

    >>> weak_evidence(0.30, 1.2), weak_evidence(0.95, 0.3), weak_evidence(0.999, 0.01)
    (True, False, False)
    """
    return bool(weak_by(cosine, rel_change))


def weak_by(cosine: float | None, rel_change: float | None) -> list[str]:
    """Which of the two numbers make the evidence weak (the rule is an "or"): ``relative_change``
    at or above ``weak_rel_change``, ``cosine`` at or below ``weak_cosine``; empty when neither.

    >>> weak_by(1.0, 2.0), weak_by(0.3, 1.2), weak_by(0.3, 0.1), weak_by(0.999, 0.01)
    (['relative_change'], ['relative_change', 'cosine'], ['cosine'], [])
    """
    out = []
    if rel_change is not None and rel_change >= MARGINS["weak_rel_change"]:
        out.append("relative_change")
    if cosine is not None and cosine <= MARGINS["weak_cosine"]:
        out.append("cosine")
    return out


_ratio = ratio     # sqrt(num) / sqrt(den): the one norm ratio of judge.status


# ---------------------------------------------------------------- the one unrelated rule

def looks_unrelated(cosine: float | None, rel_change: float | None, thresholds: Thresholds) -> bool | None:
    """The unrelated rule, the only place its thresholds are compared: the large matrices
    are near-orthogonal (weighted cosine below ``unrelated_cosine``) and far apart (their
    relative change above ``unrelated_rel_change``), as between independent inits.
    None when nothing was measured: the caller says what that means for its verdict.

    >>> looks_unrelated(0.01, 1.41, Thresholds()), looks_unrelated(0.999, 0.02, Thresholds())
    (True, False)
    >>> looks_unrelated(None, None, Thresholds()) is None
    True
    """
    if cosine is None or rel_change is None:
        return None
    return bool(cosine < thresholds.unrelated_cosine and rel_change > thresholds.unrelated_rel_change)


def _getter(row):
    """``_field(row, .)`` for one row: a JSON row's ``get``, a record's ``__dict__.get`` (one
    dictionary lookup per field: this runs once per tensor per question, 100,000 times for a
    mixture-of-experts checkpoint)."""
    if isinstance(row, dict) or type(row) is TensorRow:
        return row.get                          # a view's get is its record's dict's when it can be
    fields = getattr(row, "__dict__", None)
    return fields.get if fields is not None else (lambda key: getattr(row, key, None))


_RELATED_STATUS = ("unchanged", "rounding", "quantized", "changed", "resized")   # tuples: a JSON row may hold
_RELATED_COMPARED = ("float", "factors", None)                                  # anything, hashable or not
_KIND = {name: d.kind for name, d in DTYPES.items()}


def counts_for_relatedness(row, large: int | None) -> bool:
    """Whether one tensor (a ``TensorRecord`` or a JSON row) is evidence of relatedness:
    a paired matrix compared as floats with a finite cosine, not a norm gain or bias,
    with at least ``large`` compared elements (any size when ``large`` is None)."""
    n = _evidence_size(row)
    return n is not None and (large is None or n >= large)


def evidence_sizes(rows) -> list[tuple[object, int]]:
    """(row, compared elements) of each row that is evidence of relatedness at some size, in order:
    ``counts_for_relatedness(row, large)`` is ``n >= large`` for these and False for the rest."""
    return [(r, n) for r in rows if (n := _evidence_size(r)) is not None]


def _field(row, key: str):
    return _getter(row)(key)


def chosen_evidence(evidence: list[tuple[object, int]], large: int | None) -> list[tuple[object, int]]:
    """The (row, size) pairs of ``evidence_sizes`` that relatedness is judged on: the large
    matrices (at least ``large`` compared elements), all of them when none is large."""
    big = [(r, n) for r, n in evidence if large is None or n >= large]
    return big or list(evidence)


#: the note of a position table computed from a formula (``comparison.mark_fixed_tables``): not evidence
FIXED_NOTE = "a fixed sinusoidal position table, the same in every model of its shape: not evidence of relatedness"


def is_sinusoid_table(table, dtype: str) -> bool:
    """Whether every column of a [positions, width] table is a sinusoid of the position (sin or cos of w * p,
    any w, a zero column allowed): v[p - 1] + v[p + 1] = 2 cos(w) v[p] within the stored dtype's rounding,
    values within [-1, 1] and reaching it (a cos column starts at 1), at least half the columns non-zero, at
    least 8 positions. A learned table (GPT-2's
    wpe, Whisper's decoder positions) fails the recurrence by orders of magnitude.

    >>> import numpy as np
    >>> p = np.arange(64)[:, None]; w = 1e-4 ** (np.arange(8) / 8)
    >>> is_sinusoid_table(np.concatenate([np.sin(p * w), np.cos(p * w)], 1), "F32")
    True
    >>> is_sinusoid_table(np.random.default_rng(0).normal(0, 0.02, (64, 16)), "F32")
    False
    """
    import numpy as np

    from ..kernels.dtypes import DTYPES

    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 8 or not np.isfinite(t).all() or not 0.99 <= np.abs(t).max() <= 1.0 + 1e-6:
        return False
    live = np.abs(t).max(axis=0) > 0
    if live.sum() * 2 < t.shape[1]:
        return False
    v, side = t[1:-1, live], t[:-2, live] + t[2:, live]
    den = (v * v).sum(axis=0)
    a = (v * side).sum(axis=0) / den
    # each stored value's own rounding (half an ulp at its magnitude: a value near a zero crossing is held
    # far finer than one near 1, so a trained deviation shows there even in bf16), and the float32 rounding
    # of the argument w * p, which grows with the position (1.2e-4 at 1,500 positions)
    # (a float64 table computed in float32 holds float32 values: the coarser of the two)
    mant = min(DTYPES[dtype].mant_bits if dtype in DTYPES and DTYPES[dtype].mant_bits else 7, 23)
    ulp = np.ldexp(1.0, np.frexp(t[:, live])[1] - 1 - mant)          # the ulp of each stored value
    w = np.arccos(np.clip(a / 2.0, -1.0, 1.0))                        # each column's frequency
    tol = (ulp[:-2] + ulp[2:] + np.abs(a) * ulp[1:-1]) + 4.0 * t.shape[0] * w * 2.0 ** -24 + 2.0 ** -60
    return bool(np.all(np.abs(a) <= 2.0 + 2.0 ** -mant) and np.all(np.abs(side - a * v) <= tol))


def _evidence_size(row) -> int | None:
    """The compared elements of a row that is evidence of relatedness at some size, else None."""
    get = _getter(row)
    if get("status") not in _RELATED_STATUS or get("compared") not in _RELATED_COMPARED:
        return None
    cos = get("cosine")
    if cos is None or not math.isfinite(cos):
        return None
    if get("module") in ("norm", "bias") or len(get("shape") or ()) < 2:
        return None
    if get("module") == "embed.pos" and FIXED_NOTE in (get("note") or ""):
        return None
    db, dt = get("dtype_base"), get("dtype_tuned")
    if (db != dt or cos < 0.5) and get("note") is not None and (relabelled(row) or moved(row)):
        # the base's bytes under another dtype label, or another tensor of the base under this name: what they
        # read as, or their cosine with this one, is no evidence
        return None
    kinds = tuple(_KIND.get(d) if isinstance(d, str) else None for d in (db, dt))
    if "int" in kinds and "float" in kinds:
        # integer codes (an int8 export read without its scales) against floats: the cosine of
        # raw codes depends on the zero point, not on relatedness
        return None
    return get("numel_compared") or get("numel") or 0


def large_matrix_relatedness(rows, thresholds: Thresholds, evidence: list | None = None
                             ) -> tuple[float | None, float | None, int]:
    """(element-weighted cosine, relative change, matrices) over the large matrices, over
    all matrices when none is large; norm gains and biases never count. ``evidence``: ``evidence_sizes(rows)``
    when the caller has it."""
    chosen = chosen_evidence(evidence_sizes(rows) if evidence is None else evidence, thresholds.large_matrix_numel)
    if not chosen:
        return None, None, 0
    w = [float(n) for _, n in chosen]
    cos = nb2 = nd2 = 0.0
    for wi, (r, n) in zip(w, chosen):
        c, nb, nd = _field(r, "cosine"), _field(r, "norm_base"), _field(r, "norm_delta")
        if c < -negation_cut(thresholds, n):
            # the base's matrix with its sign flipped, left as stored (quantized, adapter factors, reordered
            # too): a sign is no evidence of another model, so it counts by its distance from the base negated
            nt = _field(r, "norm_tuned")
            if nb is not None and nt is not None and math.isfinite(nb) and math.isfinite(nt):
                nd = from_negated(nb, nt, c)
            c = -c
        cos += wi * c
        if nb is not None and nd is not None and math.isfinite(nb) and math.isfinite(nd):
            nb2, nd2 = nb2 + nb * nb, nd2 + nd * nd
    return cos / sum(w), _ratio(nd2, nb2), len(chosen)


def from_negated(norm_base: float, norm_tuned: float, cosine: float) -> float:
    """||T + B||, the distance of T from the base negated, from the two norms and their cosine.

    >>> from_negated(2.0, 2.0, -1.0), from_negated(3.0, 4.0, 0.0)
    (0.0, 5.0)
    """
    return math.sqrt(max(0.0, norm_tuned * norm_tuned + norm_base * norm_base + 2.0 * norm_tuned * norm_base * cosine))


def negation_cut(thresholds: Thresholds, elements: int | None) -> float:
    """How negative a matrix's cosine with the base must be to read as the base negated: below
    -``unrelated_cosine``, and below what two independent matrices of that size reach by chance (their
    cosine spreads as 1/sqrt(elements): six of those; a 4 x 4 toy matrix is never taken for a negation).

    >>> negation_cut(Thresholds(), 4096), round(negation_cut(Thresholds(), 256), 3), negation_cut(Thresholds(), 16)
    (0.2, 0.375, 1.5)
    """
    return max(thresholds.unrelated_cosine, 6.0 / math.sqrt(max(int(elements or 0), 1)))


def negated_rows(rows, thresholds: Thresholds, evidence: list | None = None) -> list:
    """The evidence rows still stored with the sign flipped (cosine below -``negation_cut``): those
    ``comparison.negated_matrices`` could not measure against the base times -1. ``evidence``:
    ``evidence_sizes(rows)`` when the caller has it."""
    return [r for r, n in (evidence_sizes(rows) if evidence is None else evidence)
            if _field(r, "cosine") < -negation_cut(thresholds, n)]


def net_of_quantization(rows, thresholds: Thresholds) -> float | None:
    """The large matrices' relative change with each quantized matrix's difference replaced by its part
    above the quantization noise floor (``quant.norm_above_floor``); None when none of them was floor
    tested. A quantized copy is as far from its base as its quantization noise (a 2-bit copy of an
    unchanged base: 1 - cosine 0.2), which says nothing of how far training moved it."""
    chosen = chosen_evidence(evidence_sizes(rows), thresholds.large_matrix_numel)
    nb2 = nd2 = 0.0
    tested = False
    for r, _ in chosen:
        nb, nd = _field(r, "norm_base"), _field(r, "norm_delta")
        q = _field(r, "quant")
        above = q.get("norm_above_floor") if isinstance(q, dict) and q.get("test") not in (None, "none") else None
        if above is not None and math.isfinite(above):
            nd, tested = min(above, nd) if nd is not None else above, True
        if nb is not None and nd is not None and math.isfinite(nb) and math.isfinite(nd):
            nb2, nd2 = nb2 + nb * nb, nd2 + nd * nd
    return _ratio(nd2, nb2) if tested else None


def _low_rank_row(row, thresholds: Thresholds) -> bool:
    """Whether one evidence row's change is certified low-rank (or absent): its numerical rank,
    at the upper end of any bracket, within the form's low-rank rule. Not for a rank counted above
    modelled quantization noise that leaves energy unexplained."""
    if _field(row, "status") in ("unchanged", "rounding", "quantized"):
        return True
    rank = _field(row, "rank")
    if rank is None:
        return False
    get = rank.get if isinstance(rank, dict) else (lambda k: getattr(rank, k, None))
    n, shape = get("numerical_rank"), get("shape_2d")
    extra = get("extra") or {}
    if n is None or not shape or (extra.get("noise_model") == "quantization"
                                  and not extra.get("noise_explains_rest")):
        return False
    hi = ((get("bounds") or {}).get("numerical_rank") or [n, n])[-1]
    return hi is not None and hi <= thresholds.low_rank_max and hi <= low_rank_cap(shape[0], shape[1], thresholds)


def low_rank_cap(m: int, n: int, thresholds: Thresholds) -> float:
    """The largest rank an m x n matrix's change may have and be low-rank: ``low_rank_share`` of the harmonic
    mean of its sides, 2mn / (m + n) (at least 1). Its factors then take at most 2 x ``low_rank_share`` of the
    matrix's parameters, r (m + n) <= 0.2 mn: for a square matrix a tenth of its side, and for a rectangular one
    what the same saving allows. A tenth of the shorter side called a rank-8 LoRA of a 64 x 128 key projection
    (grouped-query attention: 2 key/value heads) dense, and with it the whole adapter's form "mixed".

    >>> from weightdiff.options import Thresholds
    >>> low_rank_cap(4096, 4096, Thresholds()), round(low_rank_cap(64, 128, Thresholds()), 2), low_rank_cap(1, 8, Thresholds())
    (409.6, 8.53, 1.0)
    """
    m, n = int(m), int(n)
    if m <= 0 or n <= 0:
        return 1.0
    return max(1.0, thresholds.low_rank_share * 2.0 * m * n / (m + n))


def low_rank_change(rows, thresholds: Thresholds, evidence: list | None = None) -> bool:
    """Whether every matrix the unrelated rule weighs changed by a certified low-rank update: then
    tuned = base + a low-rank matrix, which two independent initialisations never are (their
    difference has full rank), however large the change; the rule must not call them unrelated.
    ``evidence``: ``evidence_sizes(rows)`` when the caller has it."""
    chosen = chosen_evidence(evidence_sizes(rows) if evidence is None else evidence, thresholds.large_matrix_numel)
    return bool(chosen) and all(_low_rank_row(r, thresholds) for r, _ in chosen)


def components(records, thresholds: Thresholds, permuted: Mapping[str, Sequence[str]] | None = None,
               sizes: Mapping[int, int] | None = None) -> list[dict]:
    """Relatedness per component (``embeddings``, each block, ``head``), in model order.

    Each entry: ``component``, ``status``, the component's ``cosine`` and ``rel_change``
    over its matrices (``large_matrix_relatedness``), ``matrices``, ``params`` (tuned
    side, base side when only the base has it) and ``identical`` (every compared tensor
    bitwise equal). ``status``: ``shared`` (``looks_unrelated`` is False), ``unrelated``
    (True), ``unmeasured`` (paired, but no matrix to judge by: norms and biases only),
    ``faint`` (``unrelated`` by that rule, but with a cosine at or above ``independent_cosine``: more of the
    base than independent initialisations share, far less than a fine-tune keeps),
    ``base_only`` / ``tuned_only`` (no counterpart), ``tied`` (only a tied head row: one side's
    head is its embedding table, compared with the other side's head, which is not evidence
    of unrelatedness). A shared block whose module kinds disagree is given per kind (``_families``),
    where the kinds that look unrelated are not ``permuted[label]`` (MLP neurons, attention heads or a
    layer's experts that are the base's in another order: ``comparison.permuted_units``). ``sizes``: id of
    each record of ``evidence_sizes(records)`` -> its size, when the caller has them.
    """
    if sizes is None:
        sizes = {id(r): n for r, n in evidence_sizes(records)}
    groups: dict[str, list] = {}
    order: dict[str, tuple] = {}
    placed = placements(records)
    # a base block none of whose tensors has a counterpart is gone: when the tuned model's blocks were
    # renumbered (layers dropped), its number may be a live tuned block's, so it is labelled apart
    paired_base = {parse_name(r.base_name)[0] for r in records if r.base_name and r.status in PAIRED}
    labels = [component_of(n) for n in placed]
    live = {label for r, label in zip(records, labels) if r.status != "removed"}
    for r, name, label in zip(records, placed, labels):
        if r.status == "removed" and label in live and parse_name(name)[0] is not None \
                and parse_name(r.base_name or name)[0] not in paired_base:
            label += " (base)"
        groups.setdefault(label, []).append(r)
        if label not in order:
            block, index, _ = parse_name(name)
            order[label] = (0, 0, label) if label == "embeddings" else (2, 0, label) if block is None \
                else (1, index, label)
    out = []
    for label in sorted(groups, key=lambda k: order[k]):
        entry = _component(label, groups[label], thresholds, sizes)
        kinds = tuple((permuted or {}).get(label, ()))
        if entry["status"] == "unrelated" and kinds:
            # its units are the base's in another order: judged per kind, the reordered ones not unrelated
            rest = _families(label, groups[label], thresholds, reordered_kinds(kinds), sizes)
            if rest is None or "experts" in kinds and not any(p["status"] == "unrelated" for p in rest):
                entry["status"] = "shared"
            else:
                out.extend(rest)
                continue
        parts = _families(label, groups[label], thresholds, reordered_kinds(kinds), sizes) \
            if entry["status"] == "shared" and (_some_far(groups[label], thresholds)
                                                or any(is_mismatch(r) for r in groups[label])) else None
        out.extend(parts or [entry])
    for entry in out:
        # near-orthogonal by the unrelated rule, yet above what independently initialised matrices share (their
        # cosine stays near 1/sqrt(elements)): a faint share of the base (a merge that kept a little of it, training
        # far from it), which neither "shared" nor "unrelated" says; the pooled rule reads the same range so
        if entry["status"] == "unrelated" and entry["cosine"] is not None \
                and entry["cosine"] >= thresholds.independent_cosine:
            entry["status"] = "faint"
    return out


def reordered_kinds(kinds: Sequence[str]) -> tuple:
    """The module kinds a block's reordered units cover (a layer's experts are its ``mlp``; an embedding's
    or head's ``rows`` their tables)."""
    return tuple(kinds) + (("mlp",) if "experts" in kinds else ()) + \
        (("embed", "lm_head", "head") if "rows" in kinds else ())


def split_suspects(records, thresholds: Thresholds) -> dict[str, dict[str, list]]:
    """Blocks that ``components`` would give per kind with an ``mlp`` or ``attn`` unrelated, and blocks
    with a changed matrix whose norm is exactly the base's (``_norm_kept``) or whose own cosine is below the
    unrelated rule's while its kind as a whole is not (query heads swapped within their key/value group,
    then trained: q and o look like other matrices, k and v keep the kind related): label -> kind -> its rows.
    Such a module may be another model's, or the base's own neurons or heads in another order, which
    changes nothing the model computes and which ``comparison.permuted_units`` tells apart (it holds the
    files)."""
    far = _some_far(records, thresholds)
    some_kept = any(_norm_kept(r) for r in records)
    if not far and not some_kept:                    # the usual case: no kind can look unrelated or reordered
        return {}
    placed = placements(records)
    kept: dict[str, set] = {}                        # block -> kinds with a matrix moved but its norm kept
    cut = thresholds.unrelated_cosine
    for r, name in zip(records, placed):
        lone = far and r.cosine is not None and r.cosine < cut and len(r.shape or ()) == 2
        if (some_kept and _norm_kept(r)) or lone:
            kind = str(r.module or "").split(".", 1)[0]
            if kind in ("attn", "mlp"):
                kept.setdefault(component_of(name), set()).add(kind)
    groups: dict[str, list] = {}
    for r, name in zip(records, placed):
        groups.setdefault(component_of(name), []).append(r)
    out = _far_suspects(groups, thresholds) if far else {}
    for label, kinds in kept.items():
        # a reordering moves every value and keeps the norm exactly, which no training does: query heads
        # reordered within their key/value group leave k and v as they were, so the block reads shared
        for k in sorted(kinds):
            rows = [r for r in groups[label] if str(r.module or "").split(".", 1)[0] == k]
            k = _suspect_kind(k, rows)
            if k not in out.get(label, {}) and "experts" not in out.get(label, {}):
                out.setdefault(label, {})[k] = rows
    return out


def _suspect_kind(kind: str, rows) -> str:
    """``experts`` for an ``mlp`` that holds a mixture-of-experts layer's experts, else ``kind``: its units
    are whole experts (with the router's rows), not one MLP's neurons. A block whose ``mlp`` reads unrelated
    while the block as a whole reads shared is one: a shared expert (Qwen2-MoE's ``shared_expert``,
    DeepSeek's ``shared_experts``) or the attention, unchanged, outweighs the reordered experts."""
    return "experts" if kind == "mlp" and any(is_expert_name(r.name) and r.base_name is not None for r in rows) \
        else kind


def _norm_kept(r) -> bool:
    """A changed matrix whose norm is the base's to 1e-9 though it moved by more than 1e-3 of it: its values
    in another order (a permutation keeps every norm)."""
    nb, nt, rc = getattr(r, "norm_base", None), getattr(r, "norm_tuned", None), getattr(r, "rel_change", None)
    return bool(getattr(r, "status", None) == "changed" and nb and nt is not None and rc is not None
                and rc > 1e-3 and abs(nt - nb) <= 1e-9 * nb and len(getattr(r, "shape", None) or ()) == 2)


def _far_suspects(groups: dict[str, list], thresholds: Thresholds) -> dict[str, dict[str, list]]:
    out = {}
    for label, rows in groups.items():
        status = _component(label, rows, thresholds)["status"]
        if status == "unrelated":
            # a mixture-of-experts block whose experts are the base's in another order (router rows with
            # them) compares each expert with another, and a block whose heads and MLP neurons are both
            # reordered compares every unit with another: either reads unrelated whole
            if label in ("embeddings", "head"):
                # a table whose token rows were remapped or trimmed compares each row with another token's
                tables = [r for r in rows if len(r.shape or ()) == 2 and r.base_name is not None]
                if tables:
                    out[label] = {"rows": tables}
            elif any(is_expert_name(r.name) and r.base_name is not None for r in rows):
                out[label] = {"experts": [r for r in rows if str(r.module or "").split(".", 1)[0] == "mlp"]}
            else:
                kinds = {k: [r for r in rows if str(r.module or "").split(".", 1)[0] == k] for k in ("attn", "mlp")}
                kinds = {k: v for k, v in kinds.items() if v}
                if kinds:
                    out[label] = kinds
            continue
        if status != "shared":
            continue
        kinds = {p["component"][len(label) + 1:] for p in _families(label, rows, thresholds) or []
                 if p["status"] == "unrelated"} & {"mlp", "attn"}
        if kinds:
            by_kind = {k: [r for r in rows if str(r.module or "").split(".", 1)[0] == k] for k in sorted(kinds)}
            out[label] = {_suspect_kind(k, v): v for k, v in by_kind.items()}
    return out


def kind_rows(records) -> dict[str, dict[str, list]]:
    """Block -> module kind (``attn``, ``mlp``) -> its changed rows with a base counterpart: where else to
    look for a reordering once one block has shown one (``comparison.permuted_units``)."""
    out: dict[str, dict[str, list]] = {}
    for r, name in zip(records, placements(records)):
        kind = str(r.module or "").split(".", 1)[0]
        if kind in ("attn", "mlp") and r.status == "changed" and r.base_name is not None:
            out.setdefault(component_of(name), {}).setdefault(kind, []).append(r)
    return out


#: an expert's tensor: (prefix up to ``experts.``, expert index, the rest)
_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..+)$")


def is_expert_name(name) -> bool:
    """A tensor of one expert of a mixture-of-experts layer (``...experts.3.w1.weight``)."""
    return _EXPERT.match(str(name)) is not None


def _component(label: str, rows: list, thresholds: Thresholds, sizes: Mapping[int, int] | None = None) -> dict:
    """One component's entry (``components``; ``sizes`` as there)."""
    measured = [r for r in rows if r.status in PAIRED and r.compared in ("float", "bytes", "factors")]
    # a tied head row (the tuned embedding against the base head) says the head was re-tied,
    # not that it comes from elsewhere: it counts for `identical`, not as relatedness evidence
    paired = [r for r in measured if not getattr(r, "tied", False)]
    evidence = evidence_sizes(paired) if sizes is None else [(r, sizes[id(r)]) for r in paired if id(r) in sizes]
    cos, rel, n = large_matrix_relatedness(paired, thresholds, evidence)
    verdict = looks_unrelated(cos, rel, thresholds)
    if verdict and low_rank_change(paired, thresholds, evidence):
        verdict = False                  # a large but low-rank change of these very matrices
    if not measured:
        # tensors of another shape than the base's (a narrower student) have a counterpart, not compared
        status = "base_only" if all(r.status == "removed" for r in rows) else \
            "reshaped" if any(is_mismatch(r) for r in rows) else "tuned_only"
    elif verdict is None and len(paired) < len(measured):
        status = "tied"
    else:
        status = {True: "unrelated", False: "shared", None: "unmeasured"}[verdict]
    live = [r for r in rows if r.status != "removed" and not getattr(r, "tied", False)]
    params = sum(r.numel for r in live) if live else sum(r.numel for r in rows if r.status == "removed")
    return {"component": label, "status": status, "cosine": cos, "rel_change": rel, "matrices": n,
            "params": params, "identical": bool(measured) and all(r.status == "unchanged" for r in measured)}


def _some_far(rows, thresholds: Thresholds) -> bool:
    """Whether some row's cosine is below the unrelated rule's: a pooled cosine is a weighted mean of its
    rows', so without one no module kind can look unrelated (a cheap test before ``_families``)."""
    cut = thresholds.unrelated_cosine
    for r in rows:
        c = getattr(r, "cosine", None)
        if c is not None and -negation_cut(thresholds, getattr(r, "numel_compared", None)) <= c < cut:
            return True
    return False


def _families(label: str, rows: list, thresholds: Thresholds, reordered: Sequence[str] = (),
              sizes: Mapping[int, int] | None = None) -> list[dict] | None:
    """A shared block whose modules of one kind (``mlp``, ``attn``: the first part of the module kind)
    look unrelated while others are shared, as one entry per kind (``layers.3 mlp``): the MLPs of an
    independently initialised model grafted into every block leave each block's pooled matrices
    related through their attention. None when the block is all of a piece. Kinds without a matrix
    to judge by (norms) are left out of the entries; a kind in ``reordered`` (its neurons or heads are
    the base's in another order) is not unrelated."""
    fams: dict[str, list] = {}
    for r in rows:
        fams.setdefault(str(r.module or "other").split(".", 1)[0], []).append(r)
    if len(fams) < 2:
        return None
    parts = [_component(f"{label} {fam}", fam_rows, thresholds, sizes) for fam, fam_rows in fams.items()]
    for p in parts:
        if p["status"] == "unrelated" and p["component"][len(label) + 1:] in reordered:
            p["status"] = "shared"
    # a kind of another shape (narrower MLPs) was never compared: shown apart, not inside a "shared" block
    judged = [p for p in parts if p["status"] in ("shared", "unrelated", "reshaped")]
    if not any(p["status"] in ("unrelated", "reshaped") for p in judged):
        return None
    return judged


def evidence(tensors: Sequence[dict], thresholds: Thresholds, tuned_params: int) -> dict:
    """Relatedness evidence from tensor rows (the ``tensors`` of a compare JSON).

    Rows need name, status, shape, numel, numel_compared, norm_base, norm_tuned,
    norm_delta, cosine, compared and block. Large matrices: at least two dimensions
    and ``thresholds.large_matrix_numel`` compared elements.
    """
    sb = sd = 0.0
    n_cmp = n_ident = p_ident = shared = 0
    excluded = {"vectors": 0, "vector_params": 0, "small_matrices": 0, "small_matrix_params": 0}
    blocks: dict[str, list[float]] = {}
    order: dict[str, tuple] = {}
    labels = _block_labels(tensors)
    for t, label in zip(tensors, labels):
        if t.get("compared", "none") == "none":
            continue
        nc = int(t.get("numel_compared") or t["numel"])
        shared += nc
        n_cmp += 1
        if t["status"] == "unchanged":
            n_ident += 1
            p_ident += nc
        nb, nd = t.get("norm_base"), t.get("norm_delta")
        if t.get("compared") != "float" or nb is None or nd is None or not (math.isfinite(nb) and math.isfinite(nd)):
            continue
        sb += nb * nb
        sd += nd * nd
        if label is not None:
            acc = blocks.setdefault(label[0], [0.0, 0.0, 0])
            order.setdefault(label[0], label[1])
            acc[0] += nb * nb
            acc[1] += nd * nd
            acc[2] += nc
        if len(t["shape"]) < 2:
            excluded["vectors"] += 1
            excluded["vector_params"] += nc
        elif nc < thresholds.large_matrix_numel:
            excluded["small_matrices"] += 1
            excluded["small_matrix_params"] += nc
    cos_large, rel_large, _ = large_matrix_relatedness(tensors, thresholds)
    large = [t for t in tensors if counts_for_relatedness(t, thresholds.large_matrix_numel)]
    large_params = sum(int(t.get("numel_compared") or t["numel"]) for t in large)
    identical_large = sum(int(t.get("numel_compared") or t["numel"]) for t in large if t["status"] == "unchanged")
    return {
        "relative_change": _ratio(sd, sb),
        "relative_change_large": rel_large,
        "cosine_large": cos_large,
        "large_params": large_params,
        "identical_large_params": identical_large,
        "identical_share": n_ident / n_cmp if n_cmp else None,
        "identical_params_share": p_ident / shared if shared else None,
        "tensors_compared": n_cmp,
        "params_shared": shared,
        "coverage": min(1.0, shared / tuned_params) if tuned_params else None,
        "excluded": excluded,
        "blocks": [{"block": b, "rel_change": _ratio(blocks[b][1], blocks[b][0]), "params": blocks[b][2]}
                   for b in sorted(blocks, key=lambda b: order[b])],
    }


def _block_labels(tensors: Sequence[dict]) -> list[tuple[str, tuple] | None]:
    """(label, sort key) of each row's block, as compare's ``judge.aggregate`` labels and orders its
    blocks (``embeddings``, the numbered blocks, ``head``; placed by ``placements``), so provenance,
    compare and lineage line up block by block; None for a tied head row (compare leaves it out).

    >>> [x[0] for x in _block_labels([{"name": "lm_head.weight"}, {"name": "model.layers.1.mlp.up_proj.weight"},
    ...                               {"name": "model.embed_tokens.weight"}])]
    ['head', 'layers.1', 'embeddings']
    """
    from types import SimpleNamespace

    views = [SimpleNamespace(name=t.get("name"), base_name=t.get("base_name"), status=t.get("status"),
                             paired_by=t.get("paired_by"), base_index=t.get("base_index") or 0) for t in tensors]
    namespaces: dict[str, int] = {}
    out: list[tuple[str, tuple] | None] = []
    for t, name in zip(tensors, placements(views)):
        note = t.get("note")
        if t.get("tied") or (note is not None and str(note).startswith("tied:")):
            out.append(None)
            continue
        block, index, module = parse_name(name)
        if block is None:
            label = group_of(name, module)
            out.append((label, (0 if label == "embeddings" else 2, 0, 0, label)))
            continue
        ns = namespaces.setdefault(block.rsplit(".", 1)[0], len(namespaces))
        out.append((block, (1, ns, index, block)))
    return out


def judge(cosine: float | None, rel_change: float | None, thresholds: Thresholds) -> str:
    """A provenance candidate: ``unrelated`` by ``looks_unrelated``, and also when no large
    matrix could be measured (no evidence of derivation), else ``derived``.

    >>> judge(0.01, 1.41, Thresholds()), judge(0.999, 0.02, Thresholds()), judge(None, None, Thresholds())
    ('unrelated', 'derived', 'unrelated')
    """
    return "derived" if looks_unrelated(cosine, rel_change, thresholds) is False else "unrelated"


_VERDICT_ORDER = {"derived": 0, "partial": 1}


def rank_key(c: dict) -> tuple:
    """Derived before partial before unrelated, then the smaller large-matrix relative change, then
    the path (only to make the order of equal values reproducible: an exact tie is reported as a
    tie, never decided by the path)."""
    d = c.get("relative_change_large")
    return (_VERDICT_ORDER.get(c["verdict"], 2), math.inf if d is None else d, c["path"])


def sample_rows(name: str, rows: int, k: int, seed: int) -> np.ndarray:
    """A fixed, sorted sample of ``k`` of ``rows`` row indices, seeded by seed and tensor name.

    >>> sample_rows("w", 10, 3, 0).tolist() == sample_rows("w", 10, 3, 0).tolist()
    True
    """
    k = max(0, min(k, rows))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(rows, size=k, replace=False)) if k < rows else np.arange(rows)


def sample_plan(shapes: dict[str, tuple], dtypes: dict[str, str], budget_bytes: int) -> dict[str, int]:
    """Rows to read per tensor: the budget split evenly over the tensors, at least one row each."""
    if not shapes:
        return {}
    share = budget_bytes / len(shapes)
    out = {}
    for name, shape in shapes.items():
        row_bytes = max(1, math.prod(shape[1:]) * DTYPES[dtypes[name]].bits // 8)
        out[name] = int(max(1, min(shape[0], share // row_bytes)))
    return out


def sampled_sums(tuned_rows: np.ndarray, base_rows: np.ndarray, dtype_t: str, dtype_b: str) -> np.ndarray:
    """[sum b^2, sum t^2, sum (t-b)^2, sum t*b] over the sampled rows, in float64."""
    t = decode(tuned_rows, dtype_t).ravel()
    b = decode(base_rows, dtype_b).ravel()
    d = t - b
    return np.array([b @ b, t @ t, d @ d, t @ b])


def screen_estimate(sums: dict[str, np.ndarray], scale: dict[str, float], numel: dict[str, int]) -> dict:
    """Large-matrix relative change and parameter-weighted cosine estimated from row samples.

    Each tensor's sums are scaled by rows / sampled rows, so a tensor weighs as much
    as it would in the full comparison.
    """
    sb = sum(scale[n] * s[0] for n, s in sums.items())
    sd = sum(scale[n] * s[2] for n, s in sums.items())
    wc = ws = 0.0
    for n, s in sums.items():
        den = math.sqrt(s[0] * s[1])
        if den > 0:
            wc += numel[n] * s[3] / den
            ws += numel[n]
    return {"relative_change_large": _ratio(sd, sb), "cosine_large": wc / ws if ws else None}
