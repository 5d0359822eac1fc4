"""The model-level summary: per-record accounting, the verdict, its form, flags and headline.

Pure Python over ``TensorRecord``s and the block roll-up of ``weightdiff.judge.aggregate``
(which calls ``summarise``). Every number follows DESIGN.md:

* ``relative_change`` = sqrt(sum norm_delta^2) / sqrt(sum norm_base^2) over paired tensors;
* ``delta_params``: per changed matrix m x n, min(m n, energy_rank_99 (m + n), two numbers per
  changed element) (m n without
  a rank record); changed vectors whole; added tensors and new vocabulary rows whole
  (they must be shipped to rebuild the tuned model); rounding-only changes cost nothing;
* ``compressed_bytes``: that low-rank form in the tuned dtype, and a 1-bit sign form
  (BitDelta: one sign bit per element and one scale per changed matrix; vectors and
  added tensors kept whole), as shares of the tuned model's bytes;
* ``relatedness_cosine``: cosine weighted by elements compared, over matrices of at least
  ``large_matrix_numel`` elements, norm gains and biases left out.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np

from ..kernels.dtypes import DTYPES
from ..options import Thresholds
from ..records import BOFT_NOTE, IA3_NOTE, LN_NOTE, OFT_NOTE, TOKENS_NOTE, STATUSES, BlockRecord, ia3_merged, ia3_values, oft_values, Summary, TensorRecord, count_lookalikes, relabelled
from ..records import moved as is_moved
from ..io.declared import same_model
from ..io.meta_layout import is_meta_qk
from ..pairing.names import component_of, is_lm_head, is_router, parse_name
from .coverage import compared_elements, coverage, too_little
from .relatedness import (components as component_relatedness, evidence_sizes, large_matrix_relatedness, looks_unrelated, low_rank_cap, negated_rows, weak_evidence,
                          net_of_quantization, low_rank_change, reordered_kinds)
from .status import (PAIRED, bytes_per, delta_params_range, matrix_dims, extra_rows, is_changed, is_mismatch, only_resized, is_tied,
                     max_rank_fields, moved_blocks, norms_sq, placements, rank_upper, ratio, unresolved_quant_noise,
                     zero_side)



# ---------------------------------------------------------------- the summary


def quantization_explains(counted, thresholds: Thresholds) -> bool:
    """Whether the large matrices are far from the base only by their quantization noise: net of each
    quantized matrix's noise floor (``net_of_quantization``) their change is no longer weak evidence, so
    ``far_from_base`` ("changed far more than a fine-tune") would blame training for the quantizer's error
    (a 2-bit GPTQ copy of a 0.5% fine-tune read so; the base's own 2-bit copy is as far)."""
    net = net_of_quantization(counted, thresholds)
    return net is not None and not weak_evidence(None, net)

def _low_rank_k(rec: TensorRecord, lower: bool = False) -> int | None:
    """min(energy_rank_99, numerical_rank) at the upper end of their brackets, or the lower end."""
    get = (lambda f: getattr(rec.rank, f, None)) if lower else (lambda f: rank_upper(rec, f))
    ks = [int(k) for k in (get("energy_rank_99"), get("numerical_rank")) if k is not None]
    return min(ks) if ks else None


#: the share of a matrix's change its directions above the noise must hold for a low numerical rank to make it
#: low-rank when its energy is spread over many directions (a LoRA update beside the storage rounding: most)
RESOLVED_MIN = 0.5


def _resolved_share(rec: TensorRecord) -> float | None:
    """The share of the change's squared norm held by its top ``numerical_rank`` singular values (0 when no
    direction stands above the noise; None when the record carries no spectrum or norm to tell)."""
    nr = int(getattr(rec.rank, "numerical_rank", 0) or 0)
    spectrum = getattr(rec.rank, "spectrum", None) or []
    total = float(rec.norm_delta or 0.0) ** 2
    if not spectrum or not (total > 0 and math.isfinite(total)):
        return None
    s = np.sort(np.asarray(spectrum, dtype=np.float64))[::-1][:nr]
    return float(np.sum(s * s)) / total


#: the energy a compensating quantizer's error may hold, over the per-element model's (``measure.rank``'s uniform
#: noise within each element's floor): GPTQ pushes each column's rounding error onto the columns after it through
#: the inverse Hessian, so its error is correlated across columns and larger than the model. Measured (GPTQ 4-bit,
#: groups of 128, ``tests/quant_packers.gptq_quantize``) over round-to-nearest's error, which the model overstates
#: 1.2x: 1.1-1.4x for calibration inputs of even scale, 2.3-3.3x for log-normal channel scales, 5.4-6.8x with 1% of
#: channels 50-100x the rest at AutoGPTQ's damping of 0.01; the top singular value 1.3-19x round-to-nearest's
COMPENSATED_RESIDUAL_MAX = 16.0


def compensated(rec: TensorRecord) -> bool:
    """A change ranked above the modelled noise of a side quantized with error compensation (GPTQ, GPTQModifier's
    compressed-tensors: the first-group floor test), with the energies ``_compensated_side`` weighs."""
    quant = getattr(rec, "quant", None) or {}
    extra = getattr(rec.rank, "extra", None) or {}
    return quant.get("test") == "first-group" and extra.get("noise_model") == "quantization" \
        and bool(extra.get("energy_ratio")) and rec.norm_delta is not None and math.isfinite(rec.norm_delta)


def _compensated_side(rec: TensorRecord, cap: float, thresholds: Thresholds) -> str | None:
    """The form side of a ``compensated`` change whose energy beside its directions above the model the model does
    not explain (else None: the count is the change's, as for any quantized pair). Compensation may hold up to
    ``COMPENSATED_RESIDUAL_MAX`` times the model's noise energy, in directions that stand above the model: so
    ``undecided`` while the whole difference is within that (a 4-bit GPTQ build of a rank-4 fine-tune at 70B widths:
    288 directions above the model, 2.2x its energy in all, read dense); ``low`` when few directions stand above the
    model and what they leave is within what compensation holds; ``dense`` when even the ``cap`` largest directions
    leave more than it holds; else ``undecided``. In units of the model's noise energy N."""
    extra = getattr(rec.rank, "extra", None) or {}
    if extra.get("noise_explains_rest") or not compensated(rec):
        return None
    total = float(rec.norm_delta) ** 2
    ratio = float(extra["energy_ratio"])                   # total / N
    if not (total > 0 and math.isfinite(ratio)) or ratio <= COMPENSATED_RESIDUAL_MAX:
        return "undecided"
    noise = total / ratio
    nr = int(getattr(rec.rank, "numerical_rank", 0) or 0)
    s = np.sort(np.asarray(getattr(rec.rank, "spectrum", None) or [], dtype=np.float64))[::-1]
    left = extra.get("residual_energy_ratio")
    if left is None:
        left = (extra.get("residual_energy_ratio_bounds") or [None, None])[1]
    hi_n = rank_upper(rec, "numerical_rank")
    if nr and left is not None and left <= COMPENSATED_RESIDUAL_MAX and hi_n is not None \
            and hi_n <= cap and hi_n <= thresholds.low_rank_max:
        return "low"
    k = int(math.floor(cap))
    if len(s):
        held = float(np.sum(s[:k] ** 2)) + max(0, k - len(s)) * float(s[min(k, len(s)) - 1]) ** 2
        if (total - held) / noise > COMPENSATED_RESIDUAL_MAX:
            return "dense"                  # more outside any cap directions than compensation holds
    return "undecided"


def _rank_side(rec: TensorRecord, thresholds: Thresholds) -> str:
    """``low`` when a matrix's change is low-rank at the upper end of its rank brackets, ``dense``
    when it is not even at their lower end, ``undecided`` when the brackets straddle the rule (a
    randomized top-k with `--exact-svd-max`, a DoRA adapter's certified bracket) or when no
    direction stands above the modelled quantization noise (a change at that noise's level)."""
    m, n = matrix_dims(rec)
    cap = low_rank_cap(m, n, thresholds)
    if unresolved_quant_noise(rec):      # its numerical rank does not describe the change:
        # nothing resolved above the modelled quantization noise (the change is at its level), or a
        # bulk of energy left over beside what was resolved (dense), unless that bulk may be a compensating
        # quantizer's own correlated error (``_compensated_side``)
        side = _compensated_side(rec, cap, thresholds)
        if side is not None:
            return side
        return "undecided" if not (getattr(rec.rank, "numerical_rank", None) or 0) else "dense"
    hi_k, hi_n = _low_rank_k(rec), rank_upper(rec, "numerical_rank")
    if hi_k is not None and hi_k <= cap and hi_n is not None and hi_n <= thresholds.low_rank_max:
        er, held = rank_upper(rec, "energy_rank_99"), _resolved_share(rec)
        if er is not None and er > cap and held is not None and held < RESOLVED_MIN \
                and (getattr(rec.rank, "extra", None) or {}).get("noise_model") != "quantization":
            # few directions stand above the rounding noise, but they hold little of the change: the rest is a
            # dense change at the noise's level (a few small full fine-tune steps stored in fp32), not the
            # rounding beside a low-rank update, which its top directions would hold
            return "undecided"
        return "low"
    lo_k, lo_n = _low_rank_k(rec, lower=True), getattr(rec.rank, "numerical_rank", None)
    if (lo_k is not None and lo_k > cap) or (lo_n is not None and lo_n > thresholds.low_rank_max) \
            or lo_k is None or lo_n is None:
        return "dense"
    return "undecided"


def _form(changed: list[TensorRecord], thresholds: Thresholds) -> dict[str, Any]:
    """low_rank / sparse / vectors / undecided / mixed / dense, with the numbers behind it (docs/pairing.md).
    A tensor that differs only where one side holds NaN or infinity (``nonfinite_only``) is left out: no
    number measured its change, and counted it read as a dense matrix (the reason names it as unmeasured)."""
    changed = [r for r in changed if not nonfinite_only(r)]
    mats = [r for r in changed if not is_mismatch(r) and matrix_dims(r) is not None]
    vecs = [r for r in changed if not is_mismatch(r) and matrix_dims(r) is None]
    ranked = [r for r in mats if r.rank is not None]
    compared = [r for r in changed if not is_mismatch(r) and r.compared in ("float", "bytes")]
    n_el = sum(r.numel_compared for r in compared)
    n_diff = sum((r.frac_beyond_rounding if r.frac_beyond_rounding is not None else (r.frac_changed or 0.0))
                 * r.numel_compared for r in compared)
    share = n_diff / n_el if n_el else None
    n_any = sum((r.frac_changed if r.frac_changed is not None else 0.0) * r.numel_compared for r in compared)
    sides = [_rank_side(r, thresholds) for r in ranked]
    low = [x == "low" for x in sides]
    mat_params = sum(r.numel for r in mats)
    low_params = sum(r.numel for r, is_low in zip(ranked, low) if is_low)
    # a changed matrix without a rank analysis (--no-rank, an infinity in its delta, ...) is of unknown form: counted
    # dense it made a merged rank-4 LoRA read "form dense" under --no-rank (every element changes)
    unranked_params = sum(r.numel for r in mats if r.rank is None)
    open_params = sum(r.numel for r, x in zip(ranked, sides) if x == "undecided") + unranked_params
    form: dict[str, Any] = {
        "kind": None,
        **max_rank_fields(ranked),
        **max_rank_fields(ranked, "energy_rank_99", "max_energy_rank_99"),
        "shares": {"low_rank": low_params / mat_params if mat_params else None,
                   "dense": (mat_params - low_params - open_params) / mat_params if mat_params else None,
                   "undecided": open_params / mat_params if mat_params else None,
                   "without_rank": unranked_params / mat_params if mat_params else None},
        "max_rank_share": max(((_low_rank_k(r) or 0) / min(matrix_dims(r)) for r in ranked), default=None),
        "matrices_changed": len(mats), "matrices_low_rank": sum(low), "matrices_without_rank": len(mats) - len(ranked),
        "matrices_undecided": sides.count("undecided"),
        # of those, the ones whose count above the modelled noise may be a compensating quantizer's error
        "matrices_compensated": sum(1 for r in ranked if _compensated_side(r, low_rank_cap(*matrix_dims(r), thresholds),
                                                                            thresholds) == "undecided"),
        "vectors_changed": len(vecs), "changed_element_share": share,
        # elements that differ at all, rounding included (a cast rounds every element; the share above does not)
        "differing_element_share": max(n_any, n_diff) / n_el if n_el else None,
        "basis": "spectrum" if ranked else "elements",
    }
    if not mats and not vecs:
        return form
    shares = form["shares"]
    # matrices whose change sits at the rounding noise's level (undecided by their spectra, not for want of
    # one): few elements tip over a rounding boundary, so "sparse" would describe the rounding, not the change
    # (two small AdamW steps on an fp32 base saved in bf16 read "sparse: 9.1% of the elements differ")
    at_noise = (open_params - unranked_params) / mat_params if mat_params else 0.0
    if ranked and all(low) and len(ranked) == len(mats):
        form["kind"] = "low_rank"
    elif share is not None and share <= thresholds.sparse_frac and at_noise < thresholds.mixed_min_share:
        form["kind"] = "sparse"
    elif not mats:
        # norm gains or biases only (LN tuning, BitFit): a vector has no directions, so neither "dense"
        # ("spread over many directions") nor low-rank says anything true of it
        form["kind"] = "vectors"
    elif mat_params and open_params and (shares["undecided"] >= thresholds.mixed_min_share
                                         or shares["dense"] < thresholds.mixed_min_share):
        form["kind"] = "undecided"        # rank brackets that straddle the rule decide the form
    elif mat_params and shares["low_rank"] >= thresholds.mixed_min_share:
        # low-rank matrices hold a real share and the rest is not low-rank: mixed, however small
        # the rest (a LoRA beside a fully trained classifier head is not "dense")
        form["kind"] = "mixed"
    else:
        form["kind"] = "dense"
    return form


def _declared(declared: dict | None) -> dict:
    """The names each side declares, and whether the tuned model's declared base names a base."""
    if not declared:
        return {}
    bases = [b.get("name") for b in declared.get("bases") or []]
    claim = (declared.get("tuned") or {}).get("declares_base")
    named = [b for b in bases if b]
    mismatch = bool(claim and named and not any(same_model(claim, b) for b in named))
    return {"base_names": bases, "tuned_declares_base": claim, "mismatch": mismatch}


#: every flag ``_flags`` can raise, in the order the JSON lists them
FLAG_ORDER = ("added_tensors", "removed_tensors", "resized_embeddings", "shape_mismatch", "composite_base",
              "adapter", "tied_lm_head", "dtype_changed", "nonfinite", "cast_rounded_twice",
              "cast_two_roundings", "cast_base_rounded", "cast_both_rounded", "nonfinite_changes", "awq_scaled",
              "quant_untested",
              "quant_both_compensated", "quant_both_moved", "cast_offset",
              "cast_overflow", "bytes_compared", "partial_spectrum", "content_paired",
              "declared_base_mismatch", "relayout", "meta_layout_unmapped", "unpaired_lookalikes",
              "zeroed_matrices", "folded_parameters", "pruned_by_export", "dtype_relabelled",
              "moved_tensors", "unmerged_adapter")


def _flags(counted: list[TensorRecord], records: list[TensorRecord], declared: dict,
           folds: frozenset = frozenset(), prunes: frozenset = frozenset()) -> list[str]:
    """The run's flags, in ``FLAG_ORDER``. One pass over the records (a 100,000-tensor model paid a
    generator per flag): a record whose status, comparison and pairing are the common ones and that
    carries no cast, rank, quant or non-finite count raises nothing, so it costs a few lookups."""
    on: set[str] = set()
    base_indexes: set = set()
    moved: list[TensorRecord] = []
    for r in counted:
        s, compared, cast = r.status, r.compared, r.cast
        if r.base_name is not None:
            base_indexes.add(r.base_index)
        if s == "added":
            on.add("added_tensors")
        elif s == "removed":
            on.add("removed_tensors")
        elif s == "resized":
            if compared == "none" or not is_router(r.name):      # a router's rows: experts added, not a vocabulary
                on.add("shape_mismatch" if compared == "none" else "resized_embeddings")
        elif s == "quantized":
            q = r.quant or {}
            if q.get("within") is None:
                on.add("quant_untested")
                if q.get("codes_moved"):
                    on.add("quant_both_moved")
                elif q.get("side") == "both" and q.get("test") not in ("none", "bound"):
                    on.add("quant_both_compensated")
        if s in ("changed", "resized"):
            moved.append(r)
        if compared == "factors" or (r.note is not None and r.note.startswith((IA3_NOTE, OFT_NOTE, BOFT_NOTE, TOKENS_NOTE, LN_NOTE))):
            on.add("adapter")           # a LoRA's factors, or a tensor an IA3 vector scales, OFT rotates or trainable
            # tokens replace rows of, merged; a layer copy LN tuning trained
        elif compared == "bytes":
            on.add("bytes_compared")
        if r.dtype_base and r.dtype_tuned and r.dtype_base != r.dtype_tuned and compared != "factors":
            on.add("dtype_changed")
        if cast:
            if cast.get("through"):
                on.add("cast_rounded_twice")
            if cast.get("rounded"):
                on.add("cast_two_roundings")
            if cast.get("rounded") in ("base", "both"):
                on.add("cast_base_rounded")
            if cast.get("rounded") == "both":
                on.add("cast_both_rounded")
            if any("1 + w" in str(c) for c in cast.get("chain") or ()):
                on.add("cast_offset")
            if ((cast.get("overflow") or 0) + (cast.get("saturated") or 0)) > 0:
                on.add("cast_overflow")
        if s == "changed":
            if nonfinite_only(r):
                on.add("nonfinite_changes")
            if zero_side(r):
                on.add("zeroed_matrices")
            if r.note is not None:
                if r.dtype_base != r.dtype_tuned and relabelled(r):
                    on.add("dtype_relabelled")
                elif is_moved(r):
                    on.add("moved_tensors")
        if r.rank is not None and not r.rank.exact:
            on.add("partial_spectrum")
        if r.paired_by == "content":
            on.add("content_paired")
    if len(base_indexes) > 1:
        on.add("composite_base")
    for r in records:
        if "tied_lm_head" not in on and is_tied(r):
            on.add("tied_lm_head")
        if (r.nonfinite or 0) > 0:
            on.add("nonfinite")
            if "tied_lm_head" in on:
                break
    if awq_scaled(moved):
        on.add("awq_scaled")
    if declared.get("mismatch"):
        on.add("declared_base_mismatch")
    if relayout(counted):
        on.add("relayout")
        if any(r.status in ("added", "removed") and is_meta_qk(r.name) for r in counted):
            on.add("meta_layout_unmapped")
    if lookalikes(counted):
        on.add("unpaired_lookalikes")
    if "added_tensors" in on and unmerged_adapter(counted):
        on.add("unmerged_adapter")
    if folds and any(is_folded(r, folds) for r in counted):
        on.add("folded_parameters")
    if prunes and any(is_folded(r, prunes) for r in counted):
        on.add("pruned_by_export")
    return [name for name in FLAG_ORDER if name in on]


def trimmed_rows(r: TensorRecord) -> int:
    """Base elements of a token table trimmed and remapped, then measured on the base rows it kept
    (``comparison.measure_undone``): its record keeps the base's whole shape, and the rows it dropped are no
    part of the tuned model. 0 for any other record."""
    if r.status in ("resized", "added", "removed") or not r.base_shape or not r.shape \
            or list(r.base_shape[1:]) != list(r.shape[1:]):
        return 0
    return max(0, math.prod(r.base_shape) - r.numel)


def _all_undone(permuted: dict, undone: dict) -> bool:
    """Whether every reordered kind (a router left in place aside) was measured in the base's order."""
    done = (undone or {}).get("blocks") or {}
    return all(set(v) - {"router"} <= set(done.get(k, ())) for k, v in permuted.items())


def summarise(records: list[TensorRecord], blocks: list[BlockRecord], thresholds: Thresholds,
              buffers: list[dict] | None = None, declared: dict | None = None,
              reordering: tuple | None = None, folded: list[dict] | None = None,
              pruned: list[dict] | None = None) -> Summary:
    """The model-level ``Summary`` of DESIGN.md from the records and their block roll-up
    (``judge.aggregate``): the judge step of the pipeline. ``buffers`` (from the plan) are
    listed, never counted; ``declared`` holds the names each side declares (a hint); ``reordering``:
    (block -> the module kinds, ``mlp``, ``attn``, ``experts``, whose units are the base's in another
    order, not unrelated; the ``block attn`` labels whose heads were examined[; what was undone before
    measuring: ``blocks`` (block -> kinds), ``tensors``, ``trimmed``]), from ``comparison.permuted_units``
    and ``comparison.measure_undone``, which hold the files; ``folded`` (``Plan.folded``): the base
    parameters the tuned model's exporter folded into computed constants, removed but not read as a
    structural change; ``pruned`` (``Plan.pruned``): base parameters outside the blocks that the tuned ONNX
    model does not hold (an exporter drops what no output reads), read the same way."""
    permuted, checked, *more = reordering or ({}, [])
    undone = (more[0] if more else None) or {}
    counted = [r for r in records if not is_tied(r)]
    by_status = {s: 0 for s in STATUSES}
    for r in counted:
        if r.status == "resized" and not is_mismatch(r):
            by_status["resized"] += r.numel_compared
            by_status["added"] += extra_rows(r)
            by_status["removed"] += max(0, math.prod(r.base_shape or [0]) - r.numel_compared)
        else:
            by_status[r.status] = by_status.get(r.status, 0) + r.numel
            if trimmed_rows(r):               # a trimmed token table measured on the rows it kept
                by_status["removed"] += trimmed_rows(r)
    tensors_by_status = {s: 0 for s in STATUSES}
    tensors_by_status.update(Counter(r.status for r in counted))
    params_total = sum(by_status.values())
    live = [r for r in counted if r.status != "removed"]

    nb2 = nd2 = 0.0
    n_paired = 0
    for r in counted:
        if r.status in PAIRED:
            n_paired += 1
        sq = norms_sq(r)
        if sq is not None:
            nb2, nd2 = nb2 + sq[0], nd2 + sq[1]
    rel = ratio(nd2, nb2) if n_paired else None
    if rel is None and n_paired and nb2 == 0 and nd2 == 0 and any(norms_sq(r) for r in counted):
        rel = 0.0
    # which records are evidence of relatedness, and of what size: one pass, for the three questions below
    every = evidence_sizes(records)
    sizes = {id(r): n for r, n in every}
    evidence = [(r, n) for r, n in every if not is_tied(r)]         # evidence_sizes(counted)
    cos, rel_m, _ = large_matrix_relatedness(counted, thresholds, evidence)

    changed = [r for r in live if is_changed(r, thresholds)]
    dp_changed = dp_added = dp_lower = 0
    lr_bytes = sign_bytes = model_bytes = 0.0
    for r in live:
        c, a, c_lo = delta_params_range(r, thresholds)
        dp_changed, dp_added, dp_lower = dp_changed + c, dp_added + a, dp_lower + c_lo + a
        bpe = bytes_per(r.dtype_tuned or r.dtype_base)
        model_bytes += r.numel * bpe
        lr_bytes += (c + a) * bpe
        if c and (dims := matrix_dims(r)) is not None and not is_mismatch(r):
            sign_bytes += math.ceil(dims[0] * dims[1] / 8) + bpe
        else:
            sign_bytes += c * bpe
        sign_bytes += a * bpe
    delta = dp_changed + dp_added

    numbered = [b for b in blocks if b.index is not None]
    # numbered blocks whose every tensor is added (layers appended or inserted with no base counterpart): counted
    # among the changed blocks, yet nothing in them changed; the texts say "2 blocks added". Counted so even when
    # their tensors hold no element: a block of one empty added tensor had no parameter changed, was left out of
    # blocks_changed yet subtracted from it as added, and the texts said "in -1 of 1 blocks"
    labels = {b.block for b in numbered}
    added_in = sorted({r.block for r in live if r.block in labels}
                      - {r.block for r in live if r.block in labels and r.status != "added"})
    added_set = set(added_in)             # built once: rebuilt per tensor, 200,000 empty added tensors took minutes
    blocks_changed = sum(1 for b in numbered if b.params_changed > 0 or b.block in added_set)
    base_blocks: dict[str, bool] = {}
    for r in counted:
        label = parse_name(r.base_name)[0] if r.base_name is not None else None
        if label is not None:
            base_blocks[label] = base_blocks.get(label, False) or r.status in PAIRED
    # changed by measurement: a tensor of another shape, never compared, is counted apart (tensors_reshaped), and a
    # block whose only difference is such tensors is not "changed" (blocks_reshaped): "4 of 4 blocks changed"
    # was said of a model of another width of which no element had been compared
    tensors_changed = sum(1 for r in live if (is_changed(r, thresholds) and not is_mismatch(r))
                          or r.status == "added" or extra_rows(r))
    reshaped_in = {r.block for r in live if is_mismatch(r)}
    blocks_reshaped = sum(1 for b in numbered if b.params_changed == 0 and b.block in reshaped_in)
    params_changed = sum(b.params_changed for b in blocks)
    scope = {
        "blocks_changed": blocks_changed, "blocks_total": len(numbered), "blocks_reshaped": blocks_reshaped,
        "tensors_changed": tensors_changed, "tensors_total": len(live),
        "params_changed": params_changed, "params_changed_share": params_changed / params_total if params_total else None,
        "changed_blocks": [b.block for b in blocks if b.params_changed > 0 or b.block in added_set],
        "modules_changed": sorted({r.module for r in changed if r.module}),
        "delta_params_changed": dp_changed, "delta_params_added": dp_added,
        "base_blocks_total": len(base_blocks), "base_blocks_paired": sum(base_blocks.values()),
        "blocks_moved": len({parse_name(r.name)[0] for r in moved_blocks(counted)}),
        # changes no number measures: matrices all zero on one side (no direction), tensors of another shape
        "matrices_zeroed": _zeroed(counted),
        "tensors_reshaped": _reshaped([r for r in counted if r.status == "resized" and is_mismatch(r)]),
    }
    if added_in:
        scope["blocks_added"] = {"blocks": added_in,
                                 "tensors": sum(1 for r in live if r.block in added_set)}
    # vocabulary resized and nothing else: the shared rows the base's, within rounding or within the quantization
    # noise floor (the title must not say "a fine-tune": a GGUF of a base with tokens added read so)
    grown = [r for r in counted if only_resized(r, thresholds)]
    if grown:
        scope["tensors_only_resized"] = len(grown)
        within = sum(1 for r in grown if (r.quant or {}).get("within"))
        if within:
            scope["tensors_only_resized_quantized"] = within
    decl = _declared(declared)
    folds = frozenset((f.get("base_index", 0), f.get("base_name")) for f in folded or ())
    prunes = frozenset((f.get("base_index", 0), f.get("base_name")) for f in pruned or ())
    flags = _flags(counted, records, decl, folds, prunes)
    if "dtype_relabelled" in flags:
        # the base's bytes under another dtype label: read as labelled they are other numbers, not a fine-tune
        labels = [r for r in counted if r.status == "changed" and relabelled(r)]
        scope["dtype_relabelled"] = {"tensors": len(labels), "params": sum(r.numel for r in labels),
                                     "labels": sorted({f"{r.dtype_base} as {r.dtype_tuned}" for r in labels})}
    if "unmerged_adapter" in flags:
        extra = unmerged_adapter(counted)
        scope["unmerged_adapter"] = {"modules": len({m for _, m in extra} - {None}), "tensors": len(extra),
                                     "params": sum(int(r.numel or 0) for r, _ in extra),
                                     "lora": all(_LORA_FACTOR.match(str(r.name)) for r, _ in extra)}
    if "adapter" in flags:
        scaled = [r for r in counted if ia3_merged(r)]
        if scaled:
            # an IA3 adapter: the merged weights differ from the base in many directions, but the adapter adds
            # only its vectors' values to the base (the explanation says both)
            scope["ia3"] = {"tensors": len(scaled), "vectors": sum(1 for r in scaled if ia3_values(r)),
                            "values": sum(ia3_values(r) for r in scaled)}
        rotated = [v for v in (oft_values(r) for r in counted) if v is not None]
        if rotated:
            # an OFT adapter: each merged weight is the base's with its inputs rotated, dense as a difference, but
            # the adapter adds only the rotations' parameters
            scope["oft"] = {"tensors": len(rotated), "values": sum(rotated)}
            if any((r.note or "").startswith(BOFT_NOTE) for r in counted):
                scope["oft"]["method"] = "BOFT"     # butterfly rotations, and a scale per output
    if "moved_tensors" in flags:
        # another tensor of the base under this name, bit for bit: moved or swapped, not trained
        shifted = [r for r in counted if is_moved(r)]
        scope["moved_tensors"] = {"tensors": len(shifted), "params": sum(r.numel for r in shifted)}
    cov = coverage(records, thresholds)
    comps = component_relatedness(records, thresholds, permuted, sizes)
    if checked:
        scope["heads_checked"] = sorted(set(checked))
    if permuted:
        flags.append("permuted_units")
        inside = [r.status for r, b in zip(counted, placements(counted))
                  if str(r.module or "").split(".", 1)[0] in reordered_kinds(permuted.get(component_of(b), ()))]
        scope["permuted_units"] = {"blocks": {k: list(v) for k, v in sorted(permuted.items())},
                                   "tensors_changed": inside.count("changed")}
        if inside.count("resized"):           # a token table trimmed to a subset of the base's rows (or grown)
            scope["permuted_units"]["tensors_resized"] = inside.count("resized")
            grown = sum(1 for r, b in zip(counted, placements(counted)) if r.status == "resized"
                        and "rows" in (permuted.get(component_of(b)) or ()) and r.shape and r.base_shape
                        and r.shape[0] > r.base_shape[0])
            if grown:                         # reordered and rows added: a tokenizer's ids remapped and grown
                scope["permuted_units"]["tensors_grown"] = grown
        if undone.get("blocks"):              # measured against the base's units in the tuned model's order
            scope["permuted_units"].update({"undone": undone["blocks"], "tensors_undone": undone["tensors"]})
            if undone.get("trimmed"):
                scope["permuted_units"]["tensors_trimmed"] = undone["trimmed"]
        if undone.get("rows_consistent") is not None:   # the token tables all in one order, or not (also when
            # rows added left nothing to undo: comparison.grown_rows_consistent)
            scope["permuted_units"]["rows_consistent"] = bool(undone["rows_consistent"])
        stray = set(undone.get("routers") or ())
        if stray:                             # routers left in place, measured in their experts' new order
            scope["permuted_units"]["routers_changed"] = sum(
                1 for r in counted if r.name in stray and r.status == "changed")
    pruned = undone.get("pruned") or {}
    if pruned:                                # elements set to zero, the rest the base's: pruned, not trained
        flags.append("pruned_elements")
        scope["pruned_elements"] = {"tensors": len(pruned.get("names") or ()),
                                    "elements_zeroed": int(pruned.get("elements") or 0),
                                    "elements_in": int(pruned.get("elements_in") or 0)}
        names = set(pruned.get("names") or ())
        if any(r.dtype_base != r.dtype_tuned for r in counted if r.name in names):
            scope["pruned_elements"]["cast"] = True       # the kept elements are the base's cast to the tuned dtype
        if pruned.get("beneath"):             # the kept elements the base's beneath a rotation or fold, within rounding
            scope["pruned_elements"]["beneath"] = int(pruned["beneath"])
    folded = undone.get("folded") or {}
    if folded:                                # norms' gains folded into the matrices that read them, nothing rotated
        flags.append("folded_norms")
        names = set(folded.get("names") or ())
        scope["folded_norms"] = {"norms": len(folded.get("norms_folded") or ()), "tensors": len(names),
                                 "tensors_changed": [r.status for r in counted if r.name in names].count("changed")}
        if folded.get("norms_smoothed"):      # divided by smoothing scales (SmoothQuant, AWQ), not set to ones
            scope["folded_norms"]["norms_smoothed"] = len(folded["norms_smoothed"])
    rescaled = undone.get("rescaled") or {}
    if rescaled:                              # rows or columns each the base's times a factor
        flags.append("rescaled_units")
        names = set(rescaled.get("names") or ())
        scope["rescaled_units"] = {"tensors": len(names), "negative": int(rescaled.get("negative") or 0),
                                   "tensors_changed": [r.status for r in counted if r.name in names].count("changed")}
    rotated = undone.get("rotated") or {}
    if rotated:                               # the residual stream rotated: measured in the rotated frame
        flags.append("rotated_residual")
        names = set(rotated.get("names") or ())
        beneath = [r.status for r in counted if r.name in names]
        fit = rotated.get("fit") or {}
        scope["rotated_residual"] = {"tensors": len(names), "tensors_changed": beneath.count("changed"),
                                     "norms_folded": len(rotated.get("norms_folded") or ()),
                                     "norms_unfolded": len(rotated.get("norms_unfolded") or ()),
                                     "matrices_fitted": int(fit.get("matrices_fitted") or 0),
                                     "matrices_held_out": int(fit.get("matrices_held_out") or 0),
                                     "matrices_explained": int(fit.get("matrices_explained") or 0),
                                     "matrices_out": int(fit.get("matrices_out") or 0),
                                     "cosine_held_out": float(fit.get("cosine_held_out") or 0.0)}
        if rotated.get("embedding_fitted") is False:   # R from the output matrices alone (the table's rows moved)
            scope["rotated_residual"]["embedding_fitted"] = False
        if rotated.get("head_untied"):        # the base ties its head; this model stores one, measured rotated
            scope["rotated_residual"]["head_untied"] = True
    negated = undone.get("negated") or {}
    left = negated_rows(counted, thresholds, evidence)  # still stored negated: quantized, adapter factors, reordered
    if negated or left:                       # matrices stored times -1, measured against the base times -1
        flags.append("negated_matrices")
        names = set(negated.get("names") or ())
        beneath = [r.status for r in counted if r.name in names]
        blocks = {k: list(v) for k, v in (negated.get("blocks") or {}).items()}
        for r in left:
            kinds = blocks.setdefault(r.block or component_of(r.name), [])
            if str(r.module or "") not in kinds:
                kinds.append(str(r.module or ""))
        scope["negated_matrices"] = {"blocks": {k: sorted(v) for k, v in sorted(blocks.items())},
                                     "tensors": int(negated.get("tensors") or 0) + len(left),
                                     "tensors_changed": beneath.count("changed")}
        if left:                              # their numbers are of the flipped weights
            scope["negated_matrices"]["tensors_not_measured"] = len(left)
    # a tied head row is the tuned model's effective head: it counts for identical, not for parameters
    changed_eff = changed + [r for r in records if is_tied(r) and is_changed(r, thresholds)]
    verdict = _verdict(counted, tensors_by_status, rel_m, cos, changed_eff, thresholds, n_paired, cov, comps,
                       folds | prunes)
    if verdict == "inconclusive" and not changed and (grid := off_grid_mixed(counted)):
        flags.append("off_grid_mixed")
        scope["off_grid"] = grid
    if verdict == "faint":            # near-orthogonal, yet above what independent models show
        verdict = "inconclusive"
        flags.append("faint_relatedness")
    if verdict in ("derived", "partial", "unrelated") and not any(
            len(r.shape or ()) >= 2 and compared_elements(r) for r in counted):
        # only vectors compared (a filter kept the norms, biases): norm weights near 1 make any two models look
        # alike, and no matrix says whether this one derives from the base
        verdict = "inconclusive"
        flags.append("vectors_only")
    # a base that stores its head, a tuned model that drops it and unties it in its config: the removed head made
    # the verdict "derived" first, and it read "this base with tensors added or removed; none of its own weights
    # changed" of a model whose head, loaded, is random
    head_only = verdict == "derived" and not changed_eff and not tensors_by_status.get("added") \
        and not tensors_by_status.get("resized") and tensors_by_status.get("removed") \
        and all(is_lm_head(str(r.base_name or r.name)) for r in counted if r.status == "removed") \
        and not (permuted or negated or rotated or folded or rescaled or pruned)
    if undone.get("head_missing") and (verdict in ("identical", "cast_only", "quantized_only") or head_only):
        # every stored tensor the base's, but the head the config asks for is missing: loaded, it is random
        verdict = "inconclusive"
        flags.append("head_missing")
    elif undone.get("head_missing") and verdict in ("derived", "partial"):
        # a fine-tune that also drops the head its config unties: "a fine-tune" alone read as a usable model whose
        # head, loaded, is random (the title says so: ``render.sentences.verdict_title``)
        flags.append("head_missing")
    if verdict in ("identical", "cast_only", "quantized_only") and (permuted or negated or rotated or folded
                                                                   or rescaled):
        # the base's weights, some units in another order or negated, maybe cast or quantized: not the same
        # weights at another precision (a negated q alone changes what the model computes)
        verdict = "derived"
    only_pruned = bool(pruned) and all(r.name in set(pruned.get("names") or ()) for r in changed if len(r.shape or ()) >= 2)
    if only_pruned and verdict in ("unrelated", "partial"):
        # every changed matrix is the base's with elements set to zero: far from it by the numbers (90% pruned
        # keeps a cosine near 0.5), yet nothing in it comes from another model
        verdict = "derived"
    if verdict in ("identical", "cast_only", "quantized_only") and undone.get("gguf_metadata"):
        # the weights are the base's, but llama.cpp runs them with other settings (a RoPE base, a context
        # length, a chat template): said beside the verdict, which is of the weights
        flags.append("gguf_metadata_differs")
        scope["gguf_metadata_differs"] = {"keys": [k for k, _, _ in undone["gguf_metadata"]]}
    if verdict in ("identical", "cast_only", "quantized_only") and undone.get("config_settings"):
        # the same for a config.json: a long-context re-release that changed only rope_theta or rope_scaling
        flags.append("config_differs")
        scope["config_differs"] = {"keys": [k for k, _, _ in undone["config_settings"]]}
    if verdict not in ("identical", "cast_only", "quantized_only") and undone.get("gguf_unmapped"):
        # a GGUF whose architecture weightdiff has no name map for: llama.cpp's converter may have permuted
        # rows (llama's Q/K for RoPE) or shifted values (Gemma's 1 + w) under names kept as they are, and a
        # base converted that way reads as tensors added, removed or changed beyond recognition. What the
        # weights show is not told from what the conversion did; bitwise-equal pairs still read as such. An
        # inconclusive verdict keeps its value and gains the reason (nothing paired: --rename cannot help).
        verdict = "inconclusive"
        flags.append("gguf_unmapped")
        scope["gguf_unmapped"] = {"architectures": list(undone["gguf_unmapped"])}
    if verdict == "derived" and (not permuted or _all_undone(permuted, undone)) and weak_evidence(cos, rel_m) \
            and not only_pruned:
        # derived, but not "a fine-tune": a merge, long training; unless the distance is the quantizer's noise
        flags.append("quant_noise_distance" if quantization_explains(counted, thresholds) else "far_from_base")
    if verdict == "derived" and not permuted and "far_from_base" not in flags \
            and rounding_level(changed, tensors_by_status):
        flags.append("rounding_level")
    elif verdict == "derived" and not permuted and "far_from_base" not in flags \
            and quant_noise_level(changed, tensors_by_status):
        flags.append("quant_noise_level")
    if (changed and verdict in ("derived", "partial")) or verdict == "inconclusive":
        # tensors within their quantization noise floor beside tensors found changed: a fine-tune smaller than
        # the floor does not show there (a dense 1e-3 fine-tune of 7 tensors in Q4_1 read "1 of 21 tensors
        # changed", "at most 65,536 numbers"): the counts are lower bounds, delta_params bounds only the rest.
        # Inconclusive for want of a floor test (quantized tensors untested): "0 of 2 blocks changed" stated as a
        # fact that the pair cannot give (two round-to-nearest builds whose codes moved)
        hidden = [r for r in live if r.quant is not None and r.status in ("quantized", "resized")
                  and r.quant.get("within") is not False and not is_changed(r, thresholds)]
        if verdict == "inconclusive" and not any(r.quant.get("within") is None for r in hidden):
            hidden = []
        if hidden:
            quiet = {b.block for b in numbered if b.params_changed == 0}
            scope["within_quant_floor"] = {
                "tensors": len(hidden), "params": sum(int(r.numel_compared or 0) for r in hidden),
                "blocks": len({r.block for r in hidden if r.block in quiet}),
                # of ``tensors``, those in a format with no floor (MXFP4, IQ types): not within it, untested
                "untested": sum(1 for r in hidden if r.quant.get("within") is None)}
            flags.append("quant_floor_lower_bounds")
    quant = quantization_summary(counted)
    form = _form(changed, thresholds) if verdict in ("derived", "partial") else {"kind": None}
    summary = Summary(
        verdict=verdict, verdict_reason="", scope=scope, form=form, flags=flags, params_total=params_total,
        params_by_status=by_status, tensors_by_status=tensors_by_status, relative_change=rel,
        relatedness_cosine=cos, relatedness_rel_change=rel_m, blocks_total=len(numbered), blocks_changed=blocks_changed, delta_params=delta,
        # of the tuned model: a removed base tensor is not part of it (params_total counts it; "of the model"
        # over that read 1.3% where the quoted model's own size gave 1.8%)
        delta_params_share=delta / tuned_total if (tuned_total := params_total - int(by_status.get("removed", 0) or 0))
        else None,
        delta_params_lower=dp_lower if dp_lower != delta else None,
        compressed_bytes={"model_bytes": int(model_bytes), "low_rank_bytes": int(math.ceil(lr_bytes)),
                          "low_rank_share": lr_bytes / model_bytes if model_bytes else None,
                          "sign_bytes": int(math.ceil(sign_bytes)),
                          "sign_share": sign_bytes / model_bytes if model_bytes else None,
                          "rank_basis": "energy_rank_99"},
        coverage=cov, components=comps, buffers=list(buffers or []), declared=decl, quantization=quant)
    return summary

def rounding_level(changed: list[TensorRecord], tensors_by_status: dict) -> bool:
    """Every change at the level of rounding: each changed tensor is a matrix compared as floats whose
    numerical rank is 0 at the upper end of its bracket (no direction of the delta stands above the
    rounding noise of the stored values, ``rank.noise_floor``), none quantized, and nothing added,
    removed or resized. What merging and unmerging an adapter in float32, or another pass of arithmetic
    over the same weights, leaves (relative change ~1e-8); "a fine-tune" would claim training that no
    number here shows. A changed vector (no rank to test) keeps the ordinary title."""
    if not changed or any(tensors_by_status.get(k) for k in ("added", "removed", "resized", "quantized")):
        return False
    return all(r.status == "changed" and r.compared == "float" and len(r.shape or ()) >= 2 and r.quant is None
               and r.rank is not None and rank_upper(r, "numerical_rank") == 0 for r in changed)


def quant_noise_level(changed: list[TensorRecord], tensors_by_status: dict) -> bool:
    """``rounding_level`` where some changed tensors are quantized pairs beyond their floor: each such
    matrix has numerical rank 0 above the modelled quantization and rounding noise
    (``rank.extra["noise_model"] == "quantization"``) and the energy of its whole difference is within
    that noise's (``residual_energy_ratio`` at most ``measure.rank.RESIDUAL_MAX``); every other changed
    tensor is a float matrix of rank 0; nothing added, removed or resized. A bf16 copy whose values
    moved by an ulp (an adapter merged and unmerged), quantized, lands elements just past the floor
    (half a bf16 ulp is all it allows the plain side) and read "a fine-tune that was then quantized",
    though the same weights unquantized read rounding level; a dense fine-tune of relative size 1e-3 in
    Q8_0 gives the same numbers (residual ratio 0.77, the rounding copy 0.83), one of 1e-2 ranks 5-21
    with ratio 2.8-3.1. So what the file shows is a change no larger than the noise, not training. A side
    quantized with error compensation (``compensated``) instead: no element of its first-group columns beyond the
    floor (stored scales alone put it beyond) and its whole difference within ``COMPENSATED_RESIDUAL_MAX`` times the
    model's noise energy, whatever its count (the compensation's own directions stand above the model)."""
    from ..measure.rank import RESIDUAL_MAX

    if not changed or any(tensors_by_status.get(k) for k in ("added", "removed", "resized")) \
            or not any(r.quant is not None for r in changed):
        return False
    for r in changed:
        if r.status != "changed" or len(r.shape or ()) < 2 or r.rank is None:
            return False
        if r.quant is not None and compensated(r):
            # error compensation (GPTQ): its own directions stand above the model, so no rank 0 to ask for; the
            # elementwise test passed (a first-group column with no element beyond its floor: only stored scales
            # put it beyond) and the whole difference is within what compensation holds. A bf16 copy moved by an ulp
            # and GPTQ-quantized: 10% of its group scales not the base's, 8-9 directions, 2.3x the model's energy
            if r.quant.get("first_group_min_beyond") != 0 or \
                    not getattr(r.rank, "extra", {})["energy_ratio"] <= COMPENSATED_RESIDUAL_MAX:
                return False
            continue
        if rank_upper(r, "numerical_rank") != 0:
            return False
        if r.quant is None:
            if r.compared != "float":
                return False
            continue
        extra = getattr(r.rank, "extra", None) or {}
        ratio = extra.get("residual_energy_ratio")
        if extra.get("noise_model") != "quantization" or ratio is None or not ratio <= RESIDUAL_MAX:
            return False
    return True


def _reshaped(mism: list[TensorRecord]) -> dict[str, int]:
    return {"tensors": len(mism), "params_base": sum(math.prod(r.base_shape or [0]) for r in mism),
            "params_tuned": sum(int(r.numel or 0) for r in mism)}


def _zeroed(counted: list[TensorRecord]) -> dict[str, int]:
    """Changed matrices all zero on one side (``status.zero_side``): how many on each, and their parameters."""
    sides = [(zero_side(r), int(r.numel or 0)) for r in counted if r.status == "changed"]
    return {"tuned": sum(1 for s, _ in sides if s == "tuned"), "base": sum(1 for s, _ in sides if s == "base"),
            "params": sum(n for s, n in sides if s)}


def quantization_summary(counted: list[TensorRecord]) -> dict[str, Any] | None:
    """Roll-up of the noise-floor tests (records whose pair has a quantized side), or None."""
    tested = [r for r in counted if r.quant is not None]
    if not tested:
        return None
    judged = [r for r in tested if r.quant.get("within") is not None]
    beyond = [r for r in judged if not r.quant["within"]]
    near = [r for r in beyond if r.quant.get("near_grid") is not None]
    return {"tensors": len(tested), "tensors_judged": len(judged), "tensors_beyond": len(beyond),
            "share_beyond": len(beyond) / len(judged) if judged else None, "tensors_near_grid": len(near),
            "tests": dict(sorted(Counter(str(r.quant.get("test")) for r in tested).items())),
            "formats": sorted({str(r.quant.get("format")) for r in tested}),
            "schemes": sorted({str(r.quant.get("scheme")) for r in tested}),
            "sides": sorted({str(r.quant.get("side")) for r in tested}),
            # importance-matrix K-quants: tensors with elements past the floor that the quantizer's clamp explains
            "tensors_clamped": sum(1 for r in tested if r.quant.get("beyond_clamped"))}


def holds_exactly(dtype_base: str | None, dtype_tuned: str | None) -> bool:
    """Whether every value of ``dtype_base`` is a value of ``dtype_tuned`` (BF16 or F16 in F32, F32 in F64):
    a cast of the base to it is exact, so a tuned value that differs is no cast of the base."""
    a, b = DTYPES.get(str(dtype_base)), DTYPES.get(str(dtype_tuned))
    return (a is not None and b is not None and a.kind == b.kind == "float" and a.name != b.name
            and b.mant_bits >= a.mant_bits and b.emin <= a.emin and b.bits > a.bits)


def twin_vias_of(cast: dict) -> list[str]:
    """The narrower dtypes a two-roundings ``cast`` record names: each side's ``vias``, or (records written
    before those) its ``through``."""
    if "vias" in cast:
        return [*cast["vias"].get("base", ()), *cast["vias"].get("tuned", ())]
    return [cast["through"]] if cast.get("through") else []


#: -log of the chance that a matrix is bitwise equal when each of its values moves as often as those of the tensors
#: off the grid did: from e^-14 (about 1e-6) down, a bitwise-equal matrix is evidence
OFF_GRID_CHANCE = 14.0


def off_grid_mixed(counted) -> dict | None:
    """``{"on_grid": n, "off_grid": m}`` when the tuned model stores matrices in a dtype that holds every base
    value exactly (a bf16 base, an fp32 tuned model) and some of them are exactly the base's values while
    other tensors moved off them within rounding; else None. Two roundings of one float32 original leave every
    trained matrix off the coarser grid; a base upcast and then changed by less than its rounding (small IA3
    scales merged into an fp32 copy, a norm scaled by 1.001) leaves the untouched matrices on it. "Cast only"
    would then say that no weight was trained, which the tensors off the grid contradict (a vector counts off
    the grid, not on it: an all-ones norm is on every grid). So too where one side holds a narrower dtype's
    values in a wider one (``cast.rounded``: a bf16 copy stored as float32 against the original): some matrices
    bitwise the same beside tensors that are two roundings of one original is no one rounding of a model.

    A bitwise-equal matrix counts only where the matrices off the grid (the vectors, where no matrix is) differ
    often enough that it would not be equal by chance (``OFF_GRID_CHANCE``): where the two roundings part only at a
    few values (float16's subnormals, a value past its range, against bf16 values), most matrices are bitwise equal
    whatever they are."""
    twins = any((r.cast or {}).get("rounded") for r in counted)
    cands = [r for r in counted if holds_exactly(r.dtype_base, r.dtype_tuned) or (twins and r.status == "unchanged")
             or (r.cast or {}).get("rounded")]
    moved = [r for r in cands if r.status == "rounding"]
    off = len(moved)
    # the share of values moved, over the matrices off the grid (over the vectors where no matrix moved)
    pool = [r for r in moved if len(r.shape or ()) >= 2] or moved
    n = sum(int(r.numel_compared or r.numel or 0) for r in pool)
    p = sum(float(r.frac_changed or 0.0) * int(r.numel_compared or r.numel or 0) for r in pool) / n if n else 0.0
    on = 0
    for r in cands:
        # (an all-zero or empty matrix is on every grid: no evidence either way)
        if r.status == "unchanged" and len(r.shape or ()) >= 2 and (r.numel or 0) > 0 and (r.norm_base or 0) > 0 \
                and (p >= 1.0 or -int(r.numel) * math.log1p(-p) >= OFF_GRID_CHANCE):
            on += 1
    if not (on and off):
        return None
    vias = sorted({str(v) for r in counted if (r.cast or {}).get("rounded") for v in twin_vias_of(r.cast)})
    return {"on_grid": on, "off_grid": off, **({"through": vias} if vias else {})}


def _verdict(counted, tbs, rel, cos, changed, thr: Thresholds, n_paired: int, cov: dict,
             comps: list[dict], folds: frozenset = frozenset()) -> str:
    """The verdict, rule by rule (docs/methodology.md, "The verdict"). ``rel`` and ``cos``
    are over the relatedness matrices (norm gains and biases left out); the sentence that
    explains it is written by ``render.sentences.verdict_reason``.

    1. nothing compared, or too little of the large matrices on both sides: inconclusive;
    2. some components unrelated and others shared: partial (a pooled cosine dominated by
       one component never decides alone); all measured components unrelated: unrelated;
    3. the pooled large matrices look unrelated and no component is shared: unrelated;
       in 2 and 3, a pooled cosine at or above ``independent_cosine`` is inconclusive instead
       (``faint``: more of the base than independent models share, far less than a fine-tune keeps);
    4. no change beyond rounding (or the quantization noise floor) and no structural change:
       identical, cast_only or quantized_only;
    5. nothing changed and the only structural change is base parameters the tuned model's exporter
       folded into computed constants (``folded_parameters``: position embeddings gathered for a fixed
       input shape), or parameters outside the blocks that an ONNX export does not hold (``pruned_by_export``:
       an exporter drops what no output reads, BERT's pooler in a feature-extraction export): inconclusive,
       as what the export does not hold is not compared;
    6. otherwise derived.
    """
    # blocks paired by content with another base block (reordered, repeated) change the model
    # even when every tensor is bitwise a base tensor
    structural = tbs["added"] + tbs["removed"] + tbs["resized"] + len(moved_blocks(counted))
    if not counted or not n_paired or too_little(cov, thr):
        return "inconclusive"
    shared = [c for c in comps if c["status"] == "shared"]
    unrelated = [c for c in comps if c["status"] == "unrelated"]
    if unrelated:
        return "partial" if shared else _unrelated_or_faint(cos, thr)
    if looks_unrelated(cos, rel, thr) is True and not shared and not low_rank_change(
            [r for r in counted if r.status in PAIRED and not getattr(r, "tied", False)], thr):
        return _unrelated_or_faint(cos, thr)
    if not changed and not structural:
        if tbs["quantized"]:
            # a quantized tensor whose format gives no floor (GGUF TQ1_0, IQ2_XS) differs from the base
            # untested: quantization alone cannot be told from a fine-tune
            if any(r.status == "quantized" and (r.quant or {}).get("within") is None for r in counted):
                return "inconclusive"
            return "quantized_only"
        if tbs["rounding"] and off_grid_mixed(counted):
            return "inconclusive"     # some matrices on the base's grid, others off it: not one rounding
        return "identical" if tbs["rounding"] == 0 else "cast_only"
    moved = [r for r in counted if is_changed(r, thr)]
    if not moved and tbs["added"] and tbs["removed"] and not tbs["resized"] and not moved_blocks(counted) \
            and relayout(counted):
        return "inconclusive"         # the unpaired tensors may be the same weights in another layout: not compared
    if not moved and folds and not tbs["added"] and not tbs["resized"] and not moved_blocks(counted) \
            and all(is_folded(r, folds) for r in counted if r.status == "removed"):
        return "inconclusive"         # folded by the exporter, not removed: the rows it left out are not compared
    if not moved and tbs["added"] and not tbs["removed"] and not tbs["resized"] and not moved_blocks(counted) \
            and len(unmerged_adapter(counted)) == tbs["added"]:
        return "inconclusive"         # an adapter's tensors beside the base's layers, not merged: not measured
    if moved and not structural and all(nonfinite_only(r) for r in moved):
        return "inconclusive"         # NaN or infinity where the other side has numbers: broken, not measured
    if moved and not structural and awq_scaled(moved) and all(_awq_or_norm(r) for r in moved):
        return "inconclusive"         # AWQ's scale search, folded into the norms: not undone, not told apart
    return "derived"


def is_folded(r: TensorRecord, folds: frozenset) -> bool:
    """A removed base tensor the tuned model's exporter folded into a computed constant."""
    return r.status == "removed" and (r.base_index, r.base_name) in folds


def faint(cos: float | None, thr: Thresholds) -> bool:
    """Whether a cosine the unrelated rule calls near-orthogonal is still above what independently
    initialised models show (``independent_cosine``): a model that is 10% this base and 90% another keeps
    a cosine of about 0.1, a hundred times an independent model's, and read "UNRELATED"."""
    return cos is not None and cos >= thr.independent_cosine


def _unrelated_or_faint(cos: float | None, thr: Thresholds) -> str:
    """``unrelated``, or ``faint`` (``summarise`` reads it as inconclusive with flag ``faint_relatedness``)."""
    return "faint" if faint(cos, thr) else "unrelated"


def relayout(counted: list[TensorRecord]) -> int:
    """Parameters of the blocks whose added and removed tensors hold the same number of parameters
    (at least one of each): the same weights in another layout, fused on one side and separate on the
    other (transformers 5 keeps a mixture-of-experts layer's experts as one ``gate_up_proj`` in memory
    and a raw state dict writes it so; the Hub's files hold each expert's ``gate_proj`` and ``up_proj``),
    which pairing does not match. 0 unless every block with an added or removed tensor is such a block
    (a numbered block: a head or embedding swapped for a new one of the same size outside them is an
    addition) and some tensor was compared (with nothing paired, too little was compared to say anything)."""
    added: dict = {}
    removed: dict = {}
    for r in counted:
        if r.status == "added":
            added[r.block] = added.get(r.block, 0) + int(r.numel or 0)
        elif r.status == "removed":
            removed[r.block] = removed.get(r.block, 0) + int(r.numel or 0)
    blocks = set(added) | set(removed)
    if not blocks or None in blocks or len(counted) == sum(1 for r in counted if r.status in ("added", "removed")) or any(added.get(b, 0) != removed.get(b, 0) or not added.get(b) for b in blocks):
        return 0
    return sum(added.values())


#: a PEFT LoRA (or DoRA) factor of module ``m`` in a model's state dict: ``m.lora_A.<adapter>.weight``,
#: ``m.lora_embedding_B.<adapter>``, ``m.lora_magnitude_vector.<adapter>.weight``, with or without the adapter name
#: (the title of ``unmerged_adapter`` then names LoRA and its scale)
_LORA_FACTOR = re.compile(r"^(.+)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                          r"(?:\.[^.]+)?(?:\.weight)?$")


def unmerged_adapter(counted: list[TensorRecord]) -> list[tuple[TensorRecord, str]]:
    """(record, module) of each added tensor under a module ``m`` whose layer the tuned model stores beside it as
    ``m.base_layer.weight``: a PEFT-wrapped model's whole state dict (``get_peft_model(...).state_dict()``, a
    trainer's full checkpoint), the adapter not merged: LoRA's factors (``m.lora_A.default.weight``; the model
    computes base + (lora_alpha / r) B A, and that scale is in the adapter's config, not in the state dict), or
    another method's (IA3's ``m.ia3_l.default``, LoHa's ``m.hada_w1_a.default``). Its base layers alone read
    "none of its own weights changed". Adapter tensors the base has too (Phi-4-multimodal stores its speech and
    vision LoRAs) are paired, not added, and count for nothing here."""
    wrapped = {str(r.name)[:-len(".base_layer.weight")] for r in counted
               if r.status != "removed" and str(r.name).endswith(".base_layer.weight")}
    if not wrapped:
        return []
    out = []
    for r in counted:
        if r.status != "added":
            continue
        parts = str(r.name).split(".")
        for k in range(len(parts) - 1, 0, -1):
            m = ".".join(parts[:k])
            if m in wrapped:
                if parts[k] != "base_layer":
                    out.append((r, m))
                break
    if any(".vera_lambda_" in str(r.name) for r, _ in out):
        # VeRA's projections are shared by every module it adapts: PEFT keeps them at the model's root
        # (``base_model.vera_A.<adapter>``) and a copy in each module; read as tensors added, they made a
        # VeRA-wrapped state dict "derived" where the other methods' read inconclusive
        taken = {id(r) for r, _ in out}
        out += [(r, None) for r in counted if r.status == "added" and id(r) not in taken
                and _VERA_SHARED.match(str(r.name))]
    return out


#: VeRA's shared projections in a wrapped model's state dict, outside any module (``base_model.vera_B.default``)
_VERA_SHARED = re.compile(r"^(?:.+\.)?vera_[AB](?:\.[^.]+)?$")


def lookalikes(counted: list[TensorRecord]) -> int:
    """``records.count_lookalikes`` of the records."""
    return count_lookalikes((r.status, r.shape) for r in counted)


def _awq_or_norm(r: TensorRecord) -> bool:
    return "awq" in str((r.quant or {}).get("format") or "") or r.module == "norm"


def awq_scaled(moved: list[TensorRecord]) -> bool:
    """AWQ's scale search at work: AWQ tensors beyond their floor beside changed norm weights (AutoAWQ
    multiplies each input channel of a linear by an activation scale before quantizing and divides the
    norm before it by the same scale). weightdiff does not fit those scales back, so such a model of an
    unchanged base and one of a fine-tune look alike."""
    return (any("awq" in str((r.quant or {}).get("format") or "") and (r.quant or {}).get("within") is False
                for r in moved) and any(r.module == "norm" for r in moved))


def nonfinite_only(r: TensorRecord) -> bool:
    """A changed tensor whose every finite value is the base's: it differs only where one side holds
    NaN or infinity (a corrupted or overflowed tensor), which no number of this tool measures."""
    return r.status == "changed" and (r.nonfinite or 0) > 0 and r.norm_delta == 0.0
