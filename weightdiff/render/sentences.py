"""The one writer of headline sentences: the verdict's title, its reason and the headline.

Everything here reads the compare result as a plain dict (``schema: weightdiff.compare/2``)
and returns English; numbers go through ``render.formats``. The compare command fills
``summary.verdict_reason`` and ``summary.headline`` from here once, when the result is
made, and every renderer (terminal, memo, captions, report) prints those same strings,
so a sentence is written in one place only. The judge stage decides the verdict and its
numbers and writes no prose.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import escape_name
from ..kernels.dtypes import DTYPES
from ..judge.verdict import holds_exactly
from ..measure.recast import STEP_WORDS, twin_route
from ..records import count_lookalikes
from .formats import (at_least, count, floor_blocks, floor_rest, nothing_compared, num, sci, share, summary_blocks_text,
                      tuned_params, within_floor)
from .reference import nonfinite_only, one_minus_cosine_of, quantization_noise

__all__ = ["verdict_title", "untested_why", "parts_text", "verdict_reason", "headline", "coverage_sentence", "form_sentence", "matrices_phrase",
           "is_tied_row", "PAIRED", "plain_language", "model_label", "plural"]

#: statuses of a tensor that has a counterpart on the other side (``judge.status.PAIRED``)
PAIRED = ("unchanged", "rounding", "quantized", "changed", "resized")

_TITLES = {
    "identical": "IDENTICAL: every tensor is bitwise equal to the base.",
    "cast_only": "CAST ONLY: every difference is explained by a change of storage dtype.",
    "quantized_only": "QUANTIZED ONLY: every difference is explained by quantizing the base.",
    "derived": "DERIVED: a fine-tune of this base.",
    "partial": "PARTIAL: some components derive from this base, others do not.",
    "unrelated": "UNRELATED: not derived from this base.",
    "inconclusive": "INCONCLUSIVE: too little of the two models could be compared to judge.",
}


def _large_compared(summary: dict) -> bool | None:
    """Whether any large matrix was compared (None for a result without coverage: schema /1)."""
    cov = summary.get("coverage") or {}
    if not cov:
        return None
    return bool((cov.get("tuned") or {}).get("large_compared") or (cov.get("base") or {}).get("large_compared"))


def matrices_phrase(summary: dict) -> str:
    """"large matrices" only when some were compared, else "compared matrices"."""
    return "compared matrices" if _large_compared(summary) is False else "large matrices"


#: a safetensors dtype name (F32, BF16, F8_E4M3, I8, BOOL, ...): anything else in a side's ``dtypes`` is a
#: quantization scheme its tensors are stored in (``mxfp4``, a GGUF type), counted by comparison.describe
_STORAGE_DTYPE = re.compile(r"^(?:BOOL|(?:F|BF|I|U|C)\d+|F8_E\w+|F[46](?:_E\w+)?)$")


def untested_why(data: dict) -> str:
    """Why the quantized tensors whose floor test did not decide (``quant.within`` null) are untested, as a phrase
    after "N more are": a format with no floor, one scheme on both sides with codes moved, or either of several."""
    q = [t.get("quant") or {} for t in data.get("tensors") or [] if t.get("status") == "quantized"
         and (t.get("quant") or {}).get("within") is None]
    if q and all(x.get("codes_moved") for x in q):
        return "quantized the same way on both sides with codes moved by a step"
    if q and all(x.get("test") == "none" for x in q):
        return "quantized in a format whose noise floor weightdiff cannot compute"
    return "quantized where the noise-floor test cannot decide (each tensor's quant note says why)"


def verdict_title(summary: dict) -> str:
    """The verdict in capitals with its one-line meaning, as the terminal prints it first.
    The unrelated title cites near-orthogonal matrices only when matrices were measured. Beside a verdict
    that says the weights are the base's, GGUF settings that change what llama.cpp computes are named
    (flag ``gguf_metadata_differs``), and config.json settings transformers computes with (``config_differs``):
    "IDENTICAL" must not read as "the same model" when its RoPE base differs. Beside a derived or partial verdict, a head the tuned config unties and does not store is named
    (flag ``head_missing``): loaded, it is random."""
    title = _verdict_title(summary)
    if summary.get("verdict") in ("derived", "partial") and "head_missing" in (summary.get("flags") or []):
        title = (title.rstrip(".") + "; its config unties the LM head and none is stored: loaded with transformers, "
                 "that head is random.")
    for flag, what in (("gguf_metadata_differs", "the GGUF metadata llama.cpp runs the model with differs"),
                       ("config_differs", "its config.json sets what transformers runs it with otherwise")):
        keys = ((summary.get("scope") or {}).get(flag) or {}).get("keys")
        if keys and flag in (summary.get("flags") or []):
            shown = ", ".join(f"`{escape_name(str(k))}`" for k in keys[:4]) + (f" and {len(keys) - 4} more"
                                                                           if len(keys) > 4 else "")
            title = title.rstrip(".") + f"; but {what} ({shown}), so it may not compute what the base computes."
    return title


def _verdict_title(summary: dict) -> str:
    v = summary.get("verdict")
    if v == "unrelated" and summary.get("relatedness_cosine") is not None:
        return f"UNRELATED: not derived from this base (the {matrices_phrase(summary)} are near-orthogonal)."
    tbs = summary.get("tensors_by_status") or {}
    untouched = v == "derived" and not any(tbs.get(k) for k in ("changed", "resized", "quantized", "rounding"))
    if untouched and (tbs.get("added") or tbs.get("removed")) and "unpaired_lookalikes" in (summary.get("flags") or []):
        # a removed matrix beside an added one of its shape may be that weight changed beyond recognition
        return ("DERIVED: this base with tensors added, removed or changed beyond recognition; none of the "
                "weights paired with it changed.")
    if untouched and (tbs.get("added") or tbs.get("removed")):
        return f"DERIVED: this base with {_structural_words(summary)}; none of its own weights changed."
    grown = tbs.get("resized") and tbs.get("resized") == (summary.get("scope") or {}).get("tensors_only_resized")
    if v == "derived" and grown and (tbs.get("added") or tbs.get("removed")) \
            and not any(tbs.get(k) for k in ("changed", "quantized", "rounding")) \
            and "permuted_units" not in (summary.get("flags") or []) and not (summary.get("scope") or {}).get("blocks_moved"):
        # experts added with their routers' rows (upcycled), a vocabulary grown beside a new head: nothing trained
        return ("DERIVED: this base with tensors added or removed and rows added to or removed from some of its "
                "tensors (their shared rows unchanged); none of its own weights changed.")
    if v == "derived" and not any(tbs.get(k) for k in ("changed", "resized")) and (tbs.get("added") or tbs.get("removed")):
        # its own weights moved only within a cast's rounding or a quantization's floor: "a fine-tune" overclaims
        return ("DERIVED: this base with tensors added or removed; its own weights changed only within "
                "rounding or quantization.")
    if untouched and (summary.get("scope") or {}).get("blocks_moved"):
        return "DERIVED: this base's blocks, reordered or repeated; none of its weights changed."
    if untouched and "tied_lm_head" in (summary.get("flags") or []) and not tbs.get("resized"):
        # only the effective head moved: one side's head is its embedding table, the other's its own
        return ("DERIVED: this base with its output head tied to its input embeddings on one side only (there the "
                "head's weights are the embedding's); none of its other weights changed.")
    if v == "derived" and tbs.get("resized") and tbs.get("resized") == (summary.get("scope") or {}).get(
            "tensors_only_resized") and not any(tbs.get(k) for k in ("changed", "added", "removed")) \
            and "permuted_units" not in (summary.get("flags") or []) and not (summary.get("scope") or {}).get("blocks_moved") \
            and not set(summary.get("flags") or ()) & _REPARAMETRISED:
        if tbs.get("quantized") or (summary.get("scope") or {}).get("tensors_only_resized_quantized"):
            # a GGUF (Q8_0, Q4_K) of a base with tokens added: its weights within the quantization noise floor
            untested = "quant_untested" in (summary.get("flags") or [])
            return ("DERIVED: this base with its vocabulary resized (token rows added or removed), quantized; its "
                    "own weights differ from the base only within their quantization noise floor"
                    + (" where a floor could be tested" if untested else "")
                    + " (a change smaller than that noise would not show).")
        return ("DERIVED: this base with its vocabulary resized (token rows added or removed); none of its own "
                "weights changed.")
    special = _derived_special(summary) if v == "derived" else None
    if special:
        return special
    if v == "derived" and "adapter" in (summary.get("flags") or []):
        # the factors fit any base of these shapes: the merged model is this base changed, by construction
        claim = (summary.get("declared") or {}).get("tuned_declares_base")
        far = ""
        if "far_from_base" in (summary.get("flags") or []):
            # the merged model's own title says so: the adapter's must not read milder (a resized vocabulary's
            # saved tables, re-initialised rows)
            far = ("; the result is changed far more than a fine-tune changes a model (relative change "
                   f"{sci(summary.get('relatedness_rel_change'))})")
        return ("DERIVED: this base with the adapter applied" + far + "; an adapter holds only a change, which fits "
                "any base of its shapes, so which base it was trained on is not measured"
                # the adapter's own words (adapter_config.json): a name holding terminal escapes reached stdout raw
                + (f" (it declares `{escape_name(str(claim))}`)." if claim else "."))
    if v == "quantized_only" and (summary.get("quantization") or {}).get("sides") == ["base"]:
        return ("QUANTIZED ONLY: every difference is explained by quantizing these weights (the base given is "
                "the quantized one).")
    if v == "quantized_only" and (summary.get("quantization") or {}).get("sides") == ["both"]:
        # "explained by" claimed what the floors cannot tell: a change smaller than a step passes them too
        return ("QUANTIZED ONLY: every difference is within what quantizing the same weights twice leaves (both "
                "models are quantized; a change smaller than a quantization step would not show).")
    if v == "identical" and "dtype_changed" in (summary.get("flags") or []):
        # an exact upcast (BF16 stored as F32) holds the same values in other bits
        return "IDENTICAL: every tensor holds exactly the base's values (some stored in another dtype)."
    if v == "identical" and "adapter" in (summary.get("flags") or []):
        # an adapter whose change is zero (LoRA's B all zero, IA3's vectors all ones, or rounded away when merged):
        # "every tensor is bitwise equal to the base" read as if the adapter's own tensors were the base's
        return "IDENTICAL: this base with the adapter applied is bitwise this base: the adapter changes no weight."
    if v == "inconclusive" and "gguf_unmapped" in (summary.get("flags") or []):
        return (f"INCONCLUSIVE: a GGUF of architecture {_archs(summary)}, which weightdiff has no name map for: "
                "llama.cpp's converter may have reordered or transformed its tensors, so what differs cannot be "
                "told from a change to the weights.")
    if v == "inconclusive" and "head_missing" in (summary.get("flags") or []):
        if (summary.get("tensors_by_status") or {}).get("removed"):
            # the base stores its head and the tuned model dropped it: "tensors added or removed" named nothing
            return ("INCONCLUSIVE: every other stored tensor matches the base, but the base's LM head is not stored "
                    "and the tuned config unties it: loaded with transformers, that head is random.")
        return ("INCONCLUSIVE: every stored tensor matches the base, but the tuned config unties the LM head and none "
                "is stored: loaded with transformers, that head is random.")
    if v == "inconclusive" and "unmerged_adapter" in (summary.get("flags") or []):
        if ((summary.get("scope") or {}).get("unmerged_adapter") or {}).get("lora"):
            return ("INCONCLUSIVE: the base's weights are unchanged, but LoRA factors not merged into them are stored "
                    "beside them, whose scale the checkpoint does not hold: the change they make cannot be measured.")
        return ("INCONCLUSIVE: the base's weights are unchanged, but a PEFT adapter's tensors not merged into them "
                "are stored beside them: the change they make is not measured.")
    if v == "inconclusive" and "vectors_only" in (summary.get("flags") or []):
        return "INCONCLUSIVE: only vectors were compared (no matrix), which any two models share closely."
    if v == "inconclusive" and "off_grid_mixed" in (summary.get("flags") or []):
        if ((summary.get("scope") or {}).get("off_grid") or {}).get("through"):
            return ("INCONCLUSIVE: some matrices are bitwise the base's and others differ by less than one rounding "
                    "through a narrower dtype, which no one rounding of a model explains.")
        return ("INCONCLUSIVE: some matrices hold exactly the base's values and others moved off them by less than "
                "its rounding, which no conversion of the base explains.")
    if v == "inconclusive" and "faint_relatedness" in (summary.get("flags") or []):
        return (f"INCONCLUSIVE: the {matrices_phrase(summary)} keep a faint trace of this base (weighted cosine "
                f"{num(summary.get('relatedness_cosine'))}): more than independent models share, far less than a "
                "fine-tune keeps.")
    if v == "inconclusive" and "awq_scaled" in (summary.get("flags") or []):
        return ("INCONCLUSIVE: an AWQ model with searched scales, which weightdiff does not undo; quantization "
                "cannot be told from a fine-tune.")
    if v == "inconclusive" and "nonfinite_changes" in (summary.get("flags") or []) \
            and (summary.get("tensors_by_status") or {}).get("changed") and "quant_untested" not in (summary.get("flags") or []):
        return "INCONCLUSIVE: the models differ only by NaN or infinite values, which cannot be measured."
    if v == "inconclusive" and "quant_both_compensated" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        return "INCONCLUSIVE: both models are quantized, and two quantizations cannot be told from a fine-tune here."
    if v == "inconclusive" and "quant_both_moved" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        return ("INCONCLUSIVE: both models are quantized the same way and their codes differ by a step, which a "
                "change smaller than a step or a quantizer using calibration data both give.")
    if v == "inconclusive" and "folded_parameters" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        return ("INCONCLUSIVE: no compared tensor changed, but the export folded base parameters into values "
                "computed for a fixed input shape and does not hold them whole.")
    if v == "inconclusive" and "pruned_by_export" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        return ("INCONCLUSIVE: no compared tensor changed, but the ONNX export does not hold some base parameters "
                "(dropped as no exported output reads them).")
    if v == "inconclusive" and "relayout" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        if "meta_layout_unmapped" in (summary.get("flags") or []):
            return ("INCONCLUSIVE: no compared tensor changed, but the query and key matrices of a Meta/Mistral "
                    "consolidated checkpoint could not be put in Hugging Face's order (no params.json), so they "
                    "were not compared.")
        return ("INCONCLUSIVE: no compared tensor changed, but some matrices are stored in another layout on each "
                "side (fused and separate), which weightdiff does not pair.")
    if v == "inconclusive" and "quant_untested" in (summary.get("flags") or []) \
            and not (summary.get("tensors_by_status") or {}).get("changed"):
        return "INCONCLUSIVE: some quantized tensors differ from the base where no noise floor could be tested."
    if v == "cast_only" and "dtype_changed" not in (summary.get("flags") or []) \
            and "cast_offset" in (summary.get("flags") or []):
        return ("CAST ONLY: every difference is the rounding of storing weights as 1 + w (a GGUF's norm "
                "weights), not training.")
    if v == "cast_only" and "cast_two_roundings" in (summary.get("flags") or []):
        # no chain gives the tuned values from the base's: within one rounding is no proof, so no "not training"
        flags = summary.get("flags") or []
        who = ("each side holds" if "cast_both_rounded" in flags else
               "the base holds" if "cast_base_rounded" in flags else None)
        if who is None:        # the tuned side rounded through a narrower dtype, or each side to its own
            return ("CAST ONLY: every difference is within the roundings of one original to the two sides' formats: "
                    "two roundings of one original, or a change smaller than that rounding, which the weights cannot "
                    "tell apart.")
        return (f"CAST ONLY: every difference is within one rounding through a narrower dtype, and {who} the rounded "
                "values: two roundings of one original, or a change smaller than that rounding, which the weights "
                "cannot tell apart.")
    if v == "cast_only" and "dtype_changed" not in (summary.get("flags") or []) \
            and "cast_rounded_twice" in (summary.get("flags") or []):
        # a float32 model loaded as bf16 and saved back as float32: no dtype changed, yet every value moved
        return ("CAST ONLY: every difference is the rounding of a cast through a narrower dtype and back (the "
                "model held in it and stored again), not training.")
    if v == "cast_only" and "dtype_changed" not in (summary.get("flags") or []):
        return "CAST ONLY: every difference is within rounding; no dtype changed (signed zeros, NaN payloads)."
    if v == "derived" and "rounding_level" in (summary.get("flags") or []):
        return "DERIVED: this base, its weights changed only at the level of floating-point rounding."
    if v == "derived" and "quant_noise_level" in (summary.get("flags") or []):
        return ("DERIVED: this base, quantized; its differences beyond the quantization noise floor are no larger "
                "than that noise.")
    if v == "derived" and "far_from_base" in (summary.get("flags") or []):
        cos, rel = summary.get("relatedness_cosine"), summary.get("relatedness_rel_change")
        return (f"DERIVED: built on this base, but changed far more than a fine-tune changes it (the "
                f"{matrices_phrase(summary)} keep 1 - cosine = {sci(max(0.0, 1 - cos)) if cos is not None else '?'}"
                f", relative change {sci(rel)}).")
    return _TITLES.get(v, str(v))


#: flags of a model measured beneath a function-preserving transformation: its title says the transformation
#: (``_derived_special``), so no shortcut title that names only what is left (a vocabulary resized) may stand
_REPARAMETRISED = frozenset({"rotated_residual", "folded_norms", "rescaled_units", "negated_matrices",
                             "pruned_elements"})


def _structural_words(summary: dict) -> str:
    """What was added or removed, as the counts say: ``2 blocks added (layers.4, layers.5: 18 tensors with no
    counterpart in the base)``, ``tensors added``, ``tensors removed``, ``tensors added and removed``. "Tensors added
    or removed" was said of a model with 2 blocks appended and nothing removed."""
    tbs = summary.get("tensors_by_status") or {}
    added, removed = int(tbs.get("added") or 0), int(tbs.get("removed") or 0)
    ba = (summary.get("scope") or {}).get("blocks_added") or {}
    names, in_blocks = list(ba.get("blocks") or ()), int(ba.get("tensors") or 0)
    if names and not removed:
        n = len(names)
        what = (f"{count(n)} {'block' if n == 1 else 'blocks'} added ({_names(names)}: {count(in_blocks)} "
                f"{'tensor' if in_blocks == 1 else 'tensors'} with no counterpart in the base)")
        rest = added - in_blocks
        return what + (f" and {count(rest)} other {'tensor' if rest == 1 else 'tensors'} added" if rest > 0 else "")
    return "tensors " + ("added and removed" if added and removed else "added" if added else "removed")


def _derived_special(summary: dict) -> str | None:
    """The derived title when the changed tensors include ones no number measured: matrices set to
    zero (``zeroed_matrices``) or tensors of another shape (``shape_mismatch``). "A fine-tune of this
    base" would claim what was not measured (every block matrix zeroed read so, and so did MLPs
    replaced by narrower ones of an unrelated model)."""
    flags = summary.get("flags") or []
    scope = summary.get("scope") or {}
    z = scope.get("matrices_zeroed") or {}
    mism = int((scope.get("tensors_reshaped") or {}).get("tensors") or 0)
    grown_by = int(scope.get("blocks_total") or 0) - int(scope.get("base_blocks_total") or 0)
    if "zeroed_matrices" not in flags and "shape_mismatch" not in flags and "permuted_units" not in flags \
            and "negated_matrices" not in flags and "rotated_residual" not in flags and not scope.get("blocks_moved") \
            and "pruned_elements" not in flags and "folded_norms" not in flags and "rescaled_units" not in flags \
            and "dtype_relabelled" not in flags and "moved_tensors" not in flags \
            and not (grown_by > 0 and scope.get("base_blocks_total")):
        return None
    perm = scope.get("permuted_units") or {}
    changed = int((summary.get("tensors_by_status") or {}).get("changed") or 0)
    resized = int((summary.get("tensors_by_status") or {}).get("resized") or 0)
    zeroed = int(z.get("tuned") or 0) + int(z.get("base") or 0)
    what = []
    if scope.get("blocks_moved"):
        what.append("its blocks reordered or repeated")
    if grown_by > 0 and scope.get("base_blocks_total"):
        # LLaMA-Pro's inserted blocks, SOLAR's depth up-scaling: more blocks than the base has, trained or not
        what.append(f"{count(grown_by)} {'block' if grown_by == 1 else 'blocks'} more than the base's "
                    f"{count(int(scope['base_blocks_total']))}")
    if int(z.get("tuned") or 0):
        total = summary.get("params_total") or 0
        most = total and int(z.get("params") or 0) >= 0.5 * total      # every block's matrices erased: not "some"
        what.append(f"{'most of its weights' if most else 'some of its matrices'} set to zero")
    if int(z.get("base") or 0):
        what.append("some of its zero matrices filled")
    if mism:
        what.append("some tensors of another shape (not compared)")
    kinds = {k for v in (perm.get("blocks") or {}).values() for k in v}
    if kinds - {"rows", "router"}:
        what.append(" and ".join(w for k, w in (("mlp", "the neurons of some MLPs"),
                                                ("attn", "the heads of some attention modules"),
                                                ("experts", "the experts of some mixture-of-experts layers"))
                                 if k in kinds) + " reordered" + _stray_routers(perm.get("blocks") or {}))
    if "rows" in kinds:
        n_grown = int(perm.get("tensors_grown") or 0)
        cut = int(perm.get("tensors_resized") or 0) - n_grown > 0 or perm.get("tensors_trimmed")
        what.append("the token rows of its " + _and([b for b, v in (perm.get("blocks") or {}).items() if "rows" in v])
                    + (" reordered" + (" or trimmed" if cut else "") + (", with rows added" if n_grown else ""))
                    + (" (the embedding's and the head's not in one order: it computes something else than the base)"
                       if perm.get("rows_consistent") is False else ""))
    neg = scope.get("negated_matrices") or {}
    if neg.get("tensors"):
        what.append("some of its matrices stored with the sign flipped (times -1"
                    + ("; not all measured beneath the sign)" if neg.get("tensors_not_measured") else ")"))
    pr = scope.get("pruned_elements") or {}
    if pr.get("tensors"):
        n_pr = int(pr["tensors"])
        what.append(f"some of its weights pruned ({share(int(pr.get('elements_zeroed') or 0) / max(1, int(pr.get('elements_in') or 1)))} "
                    f"of the elements of {count(n_pr)} {'matrix' if n_pr == 1 else 'matrices'} set to zero, the rest "
                    + ("the base's cast to the tuned dtype)" if pr.get("cast") else
                       "the base's within rounding beneath the " + ("rotation)" if (scope.get("rotated_residual") or {}).get("tensors")
                                                                 else "fold)")
                       if pr.get("beneath") else
                       "exactly the base's)"))
    rs = scope.get("rescaled_units") or {}
    if rs.get("tensors"):
        n_rs = int(rs["tensors"])
        pairs = max(1, n_rs // 2)
        what.append(f"units rescaled in {count(pairs)} {'pair' if pairs == 1 else 'pairs'} of matrices (rows times a "
                    "factor, the reading matrix's columns divided by it" + ("; some negative: signs flipped"
                                                                          if rs.get("negative") else "") + ")")
    fo = scope.get("folded_norms") or {}
    if fo.get("norms"):
        n_fo, n_sm = int(fo["norms"]), int(fo.get("norms_smoothed") or 0)
        if n_sm < n_fo:
            what.append(f"the gains of {count(n_fo - n_sm)} {'norm' if n_fo - n_sm == 1 else 'norms'} folded into the "
                        "matrices that read them (the norms all ones, the matrices' columns times the base's gains)")
        if n_sm:
            what.append(f"the gains of {count(n_sm)} {'norm' if n_sm == 1 else 'norms'} moved in part into the matrices "
                        "that read them (each norm divided by a factor per channel, the matrices' columns times it: "
                        "smoothing scales, as SmoothQuant and AWQ apply before quantizing)")
    rot = scope.get("rotated_residual") or {}
    folded = int(rot.get("norms_folded") or 0) + int(fo.get("norms") or 0)
    if rot.get("tensors"):
        what.append("its residual stream rotated (every matrix that reads or writes it is the base's times one "
                    "orthogonal matrix)" + (" and its norms' gains folded into the matrices that read them"
                                            if folded else "")
                    + (", some norms' gains not folded (so it computes something else than the base)"
                       if rot.get("norms_unfolded") else "")
                    + (" (its head untied: the base's tied embedding, rotated like every matrix that reads the "
                       "residual stream)" if rot.get("head_untied") else ""))
    rl = scope.get("dtype_relabelled") or {}
    if rl.get("tensors"):
        n_rl = int(rl["tensors"])
        what.append(f"{count(n_rl)} {'tensor' if n_rl == 1 else 'tensors'} holding the base's bytes under another "
                    f"dtype label ({_and(list(rl.get('labels') or ['?']))}: read as labelled, other numbers; a header "
                    "written with the wrong dtype, not training)")
    mv = scope.get("moved_tensors") or {}
    if mv.get("tensors"):
        n_mv = int(mv["tensors"])
        what.append(("1 tensor that is bit for bit another tensor of the base, under another name" if n_mv == 1 else
                     f"{count(n_mv)} tensors that are bit for bit other tensors of the base, under other names")
                    + " (moved or swapped between modules or layers: not training, and the model computes something "
                    "else than the base)")
    if not what:
        return None
    # rows added or removed, the shared rows unchanged, beside tensors of another shape (a vocabulary grown
    # beside BART's [1, vocab] final_logits_bias) or beside a reordering (a head trimmed or grown in the base's
    # order beside a remapped embedding): nothing trained, not "a fine-tune"
    # (and beside a rotated residual stream: a rotated release with tokens added, its shared rows unchanged beneath
    # the rotation; tables whose rows were also reordered are counted with the reordering, not here)
    only = int(scope.get("tensors_only_resized") or 0)
    grown = max(0, only - int(perm.get("tensors_resized") or 0)) if rot.get("tensors") and not mism else only
    if grown:
        what.insert(0, "rows added to or removed from some of its tensors (their shared rows unchanged"
                    + (" beneath the rotation)" if rot.get("tensors") and not mism else ")"))
    routed = int(perm.get("routers_changed") or 0)              # routers left in place: counted as changed
    reordered = int(perm.get("tensors_changed") or 0) - routed
    changed -= routed + int(neg.get("tensors_not_measured") or 0)   # flipped, not measured beneath: said apart
    changed -= int(pr.get("tensors") or 0)                      # pruned matrices: said
    changed -= int(rl.get("tensors") or 0)                      # the base's bytes mislabelled: said
    changed -= int(mv.get("tensors") or 0)                      # the base's tensors moved: said
    mism += int(perm.get("tensors_resized") or 0)               # trimmed tables: rows kept, not trained
    undone = perm.get("undone") or {}
    measured = all(set(v) - {"router"} <= set(undone.get(b, ())) for b, v in (perm.get("blocks") or {}).items())
    if changed == zeroed + reordered and resized == mism + grown and not (reordered and measured):   # nothing else moved
        tbs = summary.get("tensors_by_status") or {}
        within = " beyond rounding or quantization" if tbs.get("rounding") or tbs.get("quantized") else ""
        tail = f"none of its other weights changed{within}" if not reordered else \
            f"no other weight changed{within}, and what changed beneath the reordering is not measured here"
        if neg.get("tensors_not_measured"):
            tail += ("; what changed beneath the sign of the flipped matrices that are quantized or adapter factors "
                     "is not measured here")
        return f"DERIVED: this base with {_and(what)}; {tail}."
    return f"DERIVED: a fine-tune of this base, with {_and(what)}."


def _stray_routers(blocks: dict) -> str:
    """What the title adds when some layers' experts were reordered but not their router's rows: tokens
    then reach other experts than in the base, so those layers compute something else."""
    moe = [v for v in blocks.values() if "experts" in v]
    stray = [v for v in moe if "router" in v]
    if not stray:
        return ""
    if len(stray) == len(moe):
        return " without their router's rows, so those layers route tokens to other experts than the base's"
    return (" (in some of those layers without the router's rows, so those route tokens to other experts than the "
            "base's)")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _names(items: list[str], most: int = 6) -> str:
    """``a, b, c and 4 more``."""
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def coverage_sentence(summary: dict) -> str:
    """What share of each model was compared, or "" when both were compared whole."""
    cov = summary.get("coverage") or {}
    b, t = cov.get("base") or {}, cov.get("tuned") or {}
    if not cov or (b.get("share") in (None, 1.0) and t.get("share") in (None, 1.0)):
        return ""
    return (f"Compared: {share(b.get('share'))} of the base's parameters ({count(b.get('compared'))} of "
            f"{count(b.get('params'))}) and {share(t.get('share'))} of the tuned model's ({count(t.get('compared'))} "
            f"of {count(t.get('params'))}).")


def _judged_share(side: dict):
    return side.get("large_share") if side.get("large_share") is not None else side.get("share")


def _folded_reason(data: dict) -> str:
    """Why base parameters folded into an export's computed constants leave the verdict open."""
    folds = (data.get("plan") or {}).get("folded") or []
    parts = []
    for f in folds[:3]:
        name, into, rows, n = str(f.get("base_name")), str(f.get("into")), f.get("rows"), (f.get("shape") or [0])[0]
        if rows:
            parts.append(f"{_names([name])} is held as rows {rows[0]}-{rows[1] - 1} of its {count(n)}, in "
                         f"{_names([into])}, bitwise the base's")
        elif f.get("known"):
            parts.append(f"{_names([name])} is folded into {_names([into])}, whose values are not rows of the base's")
        else:
            parts.append(f"{_names([name])} has no counterpart, and the export holds values computed from what the "
                         f"file does not say ({_names([into])})")
    more = f" (and {count(len(folds) - 3)} more)" if len(folds) > 3 else ""
    return ("Every tensor compared is the base's, but the exporter computed values for the fixed input shape it "
            "was given and stored them in place of " + ("a parameter" if len(folds) == 1 else "parameters") + ": "
            + "; ".join(parts) + more + ". What the export does not hold cannot be compared, so weightdiff does not "
            "call the model identical to the base; export with dynamic_shapes (or optimize=False) to keep the "
            "parameters whole.")


def _archs(summary: dict) -> str:
    """The unmapped GGUF architectures of ``scope.gguf_unmapped``, each in backticks (an empty one: none)."""
    names = ((summary.get("scope") or {}).get("gguf_unmapped") or {}).get("architectures") or [""]
    return " and ".join(f"`{escape_name(str(a))}`" if a else "(none given)" for a in names)


def _pruned_reason(data: dict) -> str:
    """Why base parameters an ONNX export does not hold (pruned as unused) leave the verdict open."""
    pruned = [str(f.get("base_name")) for f in (data.get("plan") or {}).get("pruned") or []]
    more = f" (and {count(len(pruned) - 3)} more)" if len(pruned) > 3 else ""
    return ("Every tensor compared is the base's, but the ONNX export does not hold "
            + ("a base parameter" if len(pruned) == 1 else f"{count(len(pruned))} base parameters")
            + f" outside the blocks: {_names(pruned[:3])}{more}. An exporter drops the parameters no exported "
            "output reads (a pooler or LM head when only the hidden states are exported), so their absence is no "
            "sign of a change; but what the export does not hold cannot be compared, so weightdiff does not call "
            "the model identical to the base.")


def _inconclusive(data: dict) -> str:
    s = data.get("summary") or {}
    tbs = s.get("tensors_by_status") or {}
    if "gguf_unmapped" in (s.get("flags") or []):
        moved = sum(int(tbs.get(k) or 0) for k in ("changed", "resized"))
        na, nr = int(tbs.get("added") or 0), int(tbs.get("removed") or 0)
        return (f"{count(moved)} paired {'tensor differs' if moved == 1 else 'tensors differ'} from the base, "
                f"{count(na)} tuned {'tensor has' if na == 1 else 'tensors have'} no counterpart in the base and "
                f"{count(nr)} base {'tensor has' if nr == 1 else 'tensors have'} none in the tuned model, but one "
                f"side is a GGUF of architecture {_archs(s)}, for which weightdiff has no name map: its tensors keep "
                "llama.cpp's names, and llama.cpp's converter may have changed their values on the way (it permutes "
                "the query and key rows of the architectures it converts as llama, and stores Gemma's norm weights "
                "as 1 + w), which weightdiff undoes only for the architectures it maps (docs/formats.md). What "
                "differs may be that conversion, not a change to the weights; compare a GGUF of the base converted "
                "the same way, or the model's safetensors.")
    if "vectors_only" in (s.get("flags") or []):
        return ("Only vectors were compared (norm weights, biases; no matrix): norm weights near 1 make any two models "
                "look alike, so whether this model derives from the base cannot be told from them; compare its "
                "matrices too (widen --include or --exclude).")
    if "folded_parameters" in (s.get("flags") or []) and not tbs.get("changed"):
        return _folded_reason(data)
    if "pruned_by_export" in (s.get("flags") or []) and not tbs.get("changed"):
        return _pruned_reason(data)
    if "off_grid_mixed" in (s.get("flags") or []):
        g = (s.get("scope") or {}).get("off_grid") or {}
        on, off = int(g.get("on_grid") or 0), int(g.get("off_grid") or 0)
        if g.get("through"):
            via = " or ".join(_DTYPE_WORDS.get(v) or STEP_WORDS.get(v, v) for v in g["through"])
            return (f"Some tensors are two roundings of one original, through {via}; {count(on)} matrices are "
                    f"bitwise the same on both sides and {count(off)} differ, each by less than such a rounding. Two "
                    "roundings of one original would leave every matrix apart, not only some. It looks like a change "
                    "smaller than that rounding, which weightdiff does not measure below it, so it does not call it a "
                    "cast.")
        return (f"The tuned model stores its matrices in a wider format than the base; {count(on)} of them hold "
                f"exactly the base's values and {count(off)} moved off them, each by less than the base's rounding. "
                "Converting the base to the wider format is exact, so those values are no conversion of it; two "
                "roundings of one original would leave every matrix off the base's values, not only some. It looks "
                "like a change smaller than the base's rounding (as small scales merged into a few matrices would "
                "be), which weightdiff does not measure below that rounding, so it does not call it a cast.")
    if "faint_relatedness" in (s.get("flags") or []):
        th = (data.get("settings") or {}).get("thresholds") or {}
        return (f"The {matrices_phrase(s)} are far from the base (relative change {sci(s.get('relatedness_rel_change'))}) "
                f"but not orthogonal to it: their size-weighted cosine is {num(s.get('relatedness_cosine'))}, where "
                f"independently initialised models stay near 0 (below {num(th.get('independent_cosine', 0.05))}; "
                f"about 1/sqrt(elements) for random ones), and a fine-tune keeps 0.9 or more. A merge of this base "
                "with another model, or training far from it, leaves such a trace; weightdiff cannot tell which, "
                "nor whether the trace is this base's or a close relative's, so it does not call the models "
                "unrelated.")
    if "awq_scaled" in (s.get("flags") or []):
        rows = data.get("tensors") or []
        nq = sum(1 for t in rows if t.get("status") == "changed" and "awq" in str((t.get("quant") or {}).get("format")))
        nn = sum(1 for t in rows if t.get("status") == "changed" and t.get("module") == "norm")
        return (f"{count(nq)} AWQ-quantized {'tensor stands' if nq == 1 else 'tensors stand'} beyond the quantization "
                f"noise floor and {count(nn)} norm {'weight differs' if nn == 1 else 'weights differ'} from the base: "
                "AWQ's scale search multiplies each input channel of a linear by an activation scale before "
                "quantizing and divides the norm before it by the same scale, which a fine-tune could also "
                "explain. weightdiff does not fit those scales back, so quantization cannot be told from a "
                "fine-tune here; compare the unquantized fine-tune, or an AWQ model quantized without scale search.")
    if "nonfinite_changes" in (s.get("flags") or []):
        bad = [t for t in data.get("tensors") or [] if nonfinite_only(t)]
        if bad and len(bad) == tbs.get("changed"):
            vals = sum(int(t.get("nonfinite") or 0) for t in bad)
            return (f"The only differences are non-finite values: {count(len(bad))} "
                    f"{'tensor holds' if len(bad) == 1 else 'tensors hold'} NaN or infinity where the other model "
                    f"has numbers ({plural(vals, 'value')}, for example {_names([str(bad[0].get('name'))])}), "
                    "and every finite value is the base's. Broken or overflowed weights are not a fine-tune, and "
                    "their change cannot be measured.")
    if "relayout" in (s.get("flags") or []) and not tbs.get("changed"):
        rows = [t for t in data.get("tensors") or [] if t.get("status") in ("added", "removed")]
        params = sum(int(t.get("numel") or 0) for t in rows if t.get("status") == "added")
        na, nr = tbs.get("added", 0), tbs.get("removed", 0)
        blocks = sorted({str(t.get("block")) for t in rows if t.get("block")})
        if "meta_layout_unmapped" in (s.get("flags") or []):
            return (f"No paired tensor changed, but the query and key matrices ({count(nr)} of the base, "
                    f"{count(na)} of the tuned model, {count(params)} parameters on each side) were not "
                    "compared: one model is a Meta/Mistral consolidated checkpoint (`layers.N.attention.wq`) with no "
                    "params.json or config.json beside it, and without its attention head counts the rows of those "
                    "matrices cannot be put in Hugging Face's order. Whether they changed is unknown; put the "
                    "release's params.json beside its weights and compare again.")
        return (f"No paired tensor changed, but {count(nr)} base {'tensor has' if nr == 1 else 'tensors have'} no "
                f"counterpart in the tuned model and {count(na)} tuned {'tensor has' if na == 1 else 'tensors have'} "
                f"none in the base, with the same number of parameters ({count(params)}) in each block where they "
                f"occur ({count(len(blocks))} {'block' if len(blocks) == 1 else 'blocks'}): most likely the same "
                "matrices in another layout, fused on one side and separate on the other ("
                + ("as transformers 5 keeps a mixture-of-experts layer's experts in memory, and a raw state dict "
                   "writes them; the Hub's files hold each expert's own gate and up matrices"
                   if any("expert" in str(t.get("name")) for t in rows) else
                   "one qkv or gate_up projection on one side, its parts on the other")
                + "). weightdiff does not pair those, so they were not "
                "compared and whether they changed is unknown; save both models with save_pretrained, or in the "
                "same layout, and compare again.")
    if "quant_untested" in (s.get("flags") or []) and not tbs.get("changed"):
        q = s.get("quantization") or {}
        n = (q.get("tensors") or 0) - (q.get("tensors_judged") or 0)
        if "quant_both_compensated" in (s.get("flags") or []):
            kinds = sorted({{"awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "gguf": "GGUF"}.get(f, f)
                            for x in q.get("formats") or [] for f in str(x).split("+") if f})
            return (f"Both models are quantized, at least one by an error-compensating quantizer "
                    f"({' and '.join(kinds) or 'unknown'}), and {count(n)} "
                    f"{'tensor differs' if n == 1 else 'tensors differ'} by more than their two noise floors: "
                    "such a quantizer moves values by several steps, so two quantizations of the same weights "
                    "cannot be told from a fine-tune; compare each with the unquantized model instead.")
        if "quant_both_moved" in (s.get("flags") or []):
            rows = [t for t in data.get("tensors") or [] if (t.get("quant") or {}).get("codes_moved")]
            moved = sum(int((t.get("quant") or {}).get("codes_moved") or 0) for t in rows)
            total = sum(int((t.get("quant") or {}).get("elements") or 0) for t in rows)
            schemes = sorted({str((t.get("quant") or {}).get("scheme")) for t in rows})
            return (f"Both models are quantized the same way ({', '.join(schemes) or 'unknown'}), and in "
                    f"{count(len(rows))} {'tensor' if len(rows) == 1 else 'tensors'} {share(moved / total if total else 0)} "
                    "of the values (at least) moved by about a step, each within the two noise floors. One quantizer "
                    "given the same weights stores the same codes, so the weights differ by less than a step (a "
                    "fine-tune, or another rounding of the same weights) or the quantizer depends on calibration "
                    "data (GPTQ, AWQ, an importance matrix); the two models cannot tell these apart. Compare each "
                    "with the unquantized model instead.")
        # the formats of the untested tensors only: a Q8_0 tested beside MXFP4 has a floor
        rows = [t.get("quant") or {} for t in data.get("tensors") or []
                if t.get("quant") and (t.get("quant") or {}).get("within") is None]
        untested = sorted({str(q.get("scheme")) for q in rows})
        rest = ("so whether by quantization alone or by a fine-tune cannot be told; every other tensor is unchanged, "
                "within rounding or within its quantization floor.")
        if rows and all(q.get("test") == "none" for q in rows):
            return (f"{count(n)} quantized {'tensor differs' if n == 1 else 'tensors differ'} from the base in a "
                    f"format whose noise floor weightdiff cannot compute ({', '.join(untested) or 'unknown'}), {rest}")
        # a floor was computed but cannot decide (scales that could not be checked): the tensors' notes say why
        notes = list(dict.fromkeys(str(q["note"]) for q in rows if q.get("note")))
        return (f"{count(n)} quantized {'tensor differs' if n == 1 else 'tensors differ'} from the base "
                f"({', '.join(untested) or 'unknown'}) where the noise-floor test cannot decide ("
                + ("; ".join(notes[:2]) + ("; and more" if len(notes) > 2 else "") if notes else "untested")
                + f"), {rest}")
    cov = s.get("coverage") or {}
    b, t = cov.get("base") or {}, cov.get("tuned") or {}
    need = ((data.get("settings") or {}).get("thresholds") or {}).get("min_coverage")
    counts = ((data.get("plan") or {}).get("counts") or {}).get("tensors") or {}
    text = (f"Only {share(_judged_share(b))} of the base's large-matrix parameters and {share(_judged_share(t))} "
            "of the tuned model's have a compared counterpart")
    text += f" (judging needs {share(need)} on one side)" if need is not None else ""
    text += (f": {count(counts.get('added', 0))} tuned tensors have no counterpart in the base and "
             f"{count(counts.get('removed', 0))} base tensors none in the tuned model.")
    reshaped = int(((s.get("scope") or {}).get("tensors_reshaped") or {}).get("tensors") or 0)
    if reshaped:
        # the names matched: --rename cannot help (a narrower student, a width-pruned model)
        text += (f" {count(reshaped)} {'tensor pairs' if reshaped == 1 else 'tensors pair'} by name with a base tensor "
                 "of another shape (the models differ in width or size: a distilled, pruned or resized model), "
                 "which cannot be compared element by element.")
    elif not counts.get("paired") or any("shares no tensor name" in n for n in (data.get("plan") or {}).get("notes") or []):
        text += (" The names do not match, even after prefix alignment, and no matrix matched by content; "
                 "map the names with --rename FROM=TO.")
    return text



#: said wherever an adapter is judged: its factors fit any base of their shapes
ADAPTER_CAVEAT = (" An adapter holds only a change, which applies to any base of its shapes: what it leaves alone is "
                  "this base's by construction, and which base it was trained on is not measured.")

def faint_components_sentence(s: dict) -> str:
    """" " and which components keep only a faint trace of the base (``summary.components`` status ``faint``: the
    unrelated rule's near-orthogonal range, but above what independent initialisations share), or "". Said beside
    any verdict but the one that already says it of the whole model (inconclusive, ``faint_relatedness``).

    >>> faint_components_sentence({"components": [{"component": "layers.0 attn", "status": "faint", "cosine": 0.176},
    ...                                           {"component": "layers.0 mlp", "status": "shared", "cosine": 0.99}]})
    ' Module layers.0 attn keeps only a faint trace of this base (cosine 0.176): more than independently initialised models share, far less than a fine-tune keeps; a merge with another model that kept a little of this base, or training very far from it, leaves such a trace.'
    """
    faint = [c for c in s.get("components") or [] if c.get("status") == "faint"]
    if not faint:
        return ""
    cosines = sorted(c["cosine"] for c in faint if c.get("cosine") is not None)
    span = "" if not cosines else f" (cosine {num(cosines[0])})" if num(cosines[0]) == num(cosines[-1]) else \
        f" (cosine {num(cosines[0])} to {num(cosines[-1])})"
    text = parts_text([str(c["component"]) for c in faint])
    return (f" {text[:1].upper() + text[1:]} {'keeps' if len(faint) == 1 else 'keep'} only a faint trace of this "
            f"base{span}: more than independently initialised models share, far less than a fine-tune keeps; a merge "
            "with another model that kept a little of this base, or training very far from it, leaves such a trace.")


def _partial(data: dict) -> str:
    comps = (data.get("summary") or {}).get("components") or []
    shared = [c["component"] for c in comps if c.get("status") == "shared"]
    unrelated = [c["component"] for c in comps if c.get("status") == "unrelated"]
    text = (f"Shared with this base: {_names(shared)}. Unrelated to it (near-orthogonal, as independent "
            f"initialisations): {_names(unrelated)}.")
    checked = set(((data.get("summary") or {}).get("scope") or {}).get("heads_checked") or ())
    if any(u.endswith(" attn") and u not in checked for u in unrelated):
        # an attention whose heads were put in another order reads so too, and is the base's: said where
        # the heads could not be matched (a fused qkv in no known layout, no output projection)
        text += (" An attention module unrelated while the rest of its block is shared may also be the base's "
                 "heads in another order, which weightdiff could not check there (its projections are fused "
                 "in a layout it does not split, or it has no output projection).")
    if "adapter" in ((data.get("summary") or {}).get("flags") or []):
        text += ADAPTER_CAVEAT
    return text


def is_tied_row(t: dict) -> bool:
    """A tied LM head row (the tuned embedding again, shown against the base head)."""
    if t.get("tied"):
        return True
    note = t.get("note")
    return bool(note) and str(note).startswith("tied:")


def _counted(data: dict) -> list[dict]:
    return [t for t in data.get("tensors") or [] if not is_tied_row(t)]


def unchanged_elements(data: dict) -> int:
    """The tuned model's parameters bit for bit the base's, counted number by number: every element
    of an unchanged tensor, and the elements a changed, rounded, quantized or resized tensor left as
    they were (``numel_compared`` less its changed count, ``frac_changed`` times it, exact in float64).
    ``params_by_status["unchanged"]`` counts whole tensors only: a DARE merge that left 90% of each
    matrix's numbers alone has no unchanged tensor at all. A summary without its tensors: the whole-tensor
    count."""
    if not data.get("tensors"):
        return int(((data.get("summary") or {}).get("params_by_status") or {}).get("unchanged", 0) or 0)
    n = 0
    for t in _counted(data):
        status = t.get("status")
        if status == "unchanged":
            n += int(t.get("numel") or 0)
        elif status in ("changed", "rounding", "quantized", "resized") and t.get("compared") in ("float", "bytes"):
            m, f = int(t.get("numel_compared") or 0), t.get("frac_changed")
            if m and f is not None and f == f:
                n += m - int(round(float(f) * m))
    return n


def unchanged_words(data: dict, total: int) -> tuple[str, str]:
    """(``"90.1%"`` of ``total`` bit for bit unchanged, number by number; the aside that gives the share in
    wholly unchanged tensors when it differs, ``" (0.16% in tensors left entirely unchanged)"``, else "")."""
    el = unchanged_elements(data)
    whole = int(((data.get("summary") or {}).get("params_by_status") or {}).get("unchanged", 0) or 0)
    text = share(el / total)
    return text, (f" ({share(whole / total)} in tensors left entirely unchanged)"
                  if share(whole / total) != text else "")


def same_bytes_words(s: dict, total: int) -> str:
    """``"100% of parameters (21 tensors) hold the base's bytes under another dtype label"`` (and tensors that are
    bit for bit other base tensors under other names): the parameters whose bytes are the base's, not counted
    bitwise unchanged because their values as labelled, or their place, differ; "" when none. "0% of parameters are
    bitwise unchanged" stood alone, in the headline and the memo, for a model whose every byte was the base's under
    another dtype label."""
    sc = s.get("scope") or {}
    parts = []
    rl, mv = sc.get("dtype_relabelled") or {}, sc.get("moved_tensors") or {}
    if rl.get("params") and total:
        parts.append(f"{share(int(rl['params']) / total)} of parameters ({plural(int(rl['tensors']), 'tensor')}) "
                     "hold the base's bytes under another dtype label")
    if mv.get("params") and total:
        parts.append(f"{share(int(mv['params']) / total)}{'' if parts else ' of parameters'} "
                     f"({plural(int(mv['tensors']), 'tensor')}) {'is' if int(mv['tensors']) == 1 else 'are'} bit for "
                     "bit other tensors of the base, under other names")
    return _and(parts) if parts else ""


def _mismatch(t: dict) -> bool:
    return t.get("status") == "resized" and t.get("compared") == "none"




_DTYPE_WORDS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _cast_words(t) -> str:
    """``BF16 -> F16`` for a cast of the base; where the tuned dtype holds every base value exactly (more mantissa
    bits: BF16 values in F16), a tuned value that differs cannot be a cast of the base: both are roundings of one
    original, said so instead of an arrow that gives a direction."""
    chain = _chain(t)
    if (t.get("cast") or {}).get("rounded"):
        # two roundings of one original: no direction from the base to the tuned model
        return f"{chain[0]} and {chain[-1]}, {twin_route(t['cast'])}"
    a, b = (DTYPES.get(x) for x in (chain[0], chain[-1])) if len(chain) == 2 else (None, None)
    if a is not None and b is not None and a.kind == b.kind == "float" and b.mant_bits > a.mant_bits:
        return f"{chain[0]} and {chain[-1]} roundings of the same weights"
    return " -> ".join(chain)


def _chain(t) -> list[str]:
    """The dtypes a rounding tensor was cast through, base first (``cast.chain`` when measured)."""
    chain = (t.get("cast") or {}).get("chain")
    return [str(x) for x in chain] if chain else [str(t.get("dtype_base")), str(t.get("dtype_tuned"))]


def verdict_reason(data: dict) -> str:
    """One sentence saying why the verdict is what it is, from the numbers behind it."""
    s = data.get("summary") or {}
    counted = _counted(data)
    tbs = s.get("tensors_by_status") or {}
    scope = s.get("scope") or {}
    cos, rel = s.get("relatedness_cosine"), s.get("relatedness_rel_change")
    v = s.get("verdict")
    text = _reason(data, s, counted, tbs, scope, cos, rel, v)
    if v != "inconclusive" or "faint_relatedness" not in (s.get("flags") or []):
        text += faint_components_sentence(s)
    cover = coverage_sentence(s)
    return f"{text} {cover}" if cover else text


def _reason(data: dict, s: dict, counted: list[dict], tbs: dict, scope: dict, cos, rel, v) -> str:
    if not counted:
        return "No tensors were compared."
    if v == "inconclusive" and "head_missing" in (s.get("flags") or []):
        live = [t for t in counted if t.get("status") != "removed"]
        gone = [t for t in counted if t.get("status") == "removed"]
        return (f"{count(len(live))} compared {'tensor matches' if len(live) == 1 else 'tensors match'} the "
                "base within rounding, but the tuned model's config.json unties its LM head and stores none"
                + (f" (the base's `{escape_name(str(gone[0].get('base_name') or gone[0].get('name')))}` is not in it)"
                   if gone else "")
                + ": transformers initialises that head at random, so the model as loaded computes something else "
                "than the base, and its weights alone cannot say what (see the notes).")
    if v == "inconclusive" and "unmerged_adapter" in (s.get("flags") or []):
        u = scope.get("unmerged_adapter") or {}
        n = int(u.get("modules") or 0)
        what = "LoRA factors" if u.get("lora") else "a PEFT adapter's tensors"
        head = (f"Every base weight compared is unchanged, but {count(n)} {'module carries' if n == 1 else 'modules carry'}"
                f" {what} ({plural(int(u.get('tensors') or 0), 'tensor')}, {plural(int(u.get('params') or 0), 'parameter')}"
                f") beside {'its layer' if n == 1 else 'their layers'}, stored as `base_layer`: the whole state dict of a "
                "model wrapped by PEFT, the adapter not merged.")
        if u.get("lora"):
            return (head + " Such a model computes the base layer plus (lora_alpha / r) B A, and that scale is in the "
                    "adapter's config, not in the state dict, so how far the adapter moves the weights cannot be "
                    "measured from these files; merge it (PEFT's merge_and_unload) and save the model, or save the "
                    "adapter with its adapter_config.json, and compare that.")
        return (head + " What such tensors do to the weights depends on the adapter's method and config, which the "
                "state dict does not hold, so the change is not measured; merge the adapter (PEFT's merge_and_unload) "
                "and save the model, and compare that.")
    if v == "inconclusive":
        return _inconclusive(data)
    if v == "partial":
        return _partial(data)
    if v == "unrelated":
        if not any(t.get("status") in PAIRED for t in counted):
            return "No tensor of the tuned model has a counterpart in the base, even after prefix alignment."
        return (f"The {matrices_phrase(s)} are near-orthogonal to the base (weighted cosine {num(cos)}) and the "
                f"relative change of those matrices is {sci(rel)}, as between independently initialised models.")
    if v == "identical":
        recast = [t for t in counted if t.get("dtype_base") and t.get("dtype_tuned")
                  and t.get("dtype_base") != t.get("dtype_tuned") and t.get("compared") != "factors"]
        # a base side that holds no F32 but quantized schemes: its "F32" tensors are those, dequantized
        sides = [b for b in (data.get("base") or []) if isinstance(b, dict)]
        held = {k for b in sides for k in (b.get("dtypes") or {})}
        schemes = sorted(k for k in held if not _STORAGE_DTYPE.match(k))
        deq = [t for t in recast if t.get("dtype_base") == "F32" and schemes and "F32" not in held]
        recast = [t for t in recast if t not in deq]
        moved = sorted({f"{t.get('dtype_base')} -> {t.get('dtype_tuned')}" for t in recast})
        parts = []
        if deq:
            to = sorted({str(t.get("dtype_tuned")) for t in deq})
            parts.append(f"{count(len(deq))} {'is' if len(deq) == 1 else 'are'} the base's quantized "
                         f"({', '.join(schemes)}) {'tensor' if len(deq) == 1 else 'tensors'}, dequantized exactly "
                         f"and stored as {', '.join(to)}")
        if moved:
            n = len(recast)
            parts.append(f"{count(n)} {'is' if n == 1 else 'are'} stored in another dtype ({', '.join(moved)}), "
                         "converted without loss")
        if parts:
            return f"All {count(tbs.get('unchanged', 0))} tensors hold exactly the base's values; " + "; ".join(parts) + "."
        return f"All {count(tbs.get('unchanged', 0))} tensors are bitwise identical to the base."
    if v == "cast_only":
        rounding = [t for t in counted if t.get("status") == "rounding"]
        casts = sorted({_cast_words(t) for t in rounding
                        if t.get("dtype_base") != t.get("dtype_tuned") or t.get("cast")})
        same = sum(1 for t in rounding if t.get("dtype_base") == t.get("dtype_tuned") and not t.get("cast"))
        parts = []
        if casts:
            parts.append(f"{count(len(rounding) - same)} tensors differ only within the rounding of a dtype cast "
                         f"({', '.join(casts)})")
        twice = [t for t in rounding if (t.get("cast") or {}).get("through") and not t["cast"].get("rounded")]
        twins = [t for t in rounding if (t.get("cast") or {}).get("rounded")]
        extra = []
        if twice:
            via = sorted({_DTYPE_WORDS.get(t["cast"]["through"], t["cast"]["through"]) for t in twice})
            extra.append(f"{count(len(twice))} of them bitwise a cast through {' or '.join(via)} "
                         "(rounded twice, so beyond half an ulp of a direct cast in places)")
        for route in sorted({twin_route(t["cast"], _DTYPE_WORDS) for t in twins}):
            these = [t for t in twins if twin_route(t["cast"], _DTYPE_WORDS) == route]
            first = "" if these[0]["cast"].get("rounded") == "neither" else " first"
            extra.append(f"{count(len(these))} of them two roundings of one original, {route}{first} "
                         "(each within those roundings of the other side's value)")
        ovf = sum(int((t.get("cast") or {}).get("overflow") or 0) for t in rounding)
        sat = sum(int((t.get("cast") or {}).get("saturated") or 0) for t in rounding)
        if ovf:
            extra.append(f"with {count(ovf)} value{'s' if ovf != 1 else ''} overflowed to infinity in the cast "
                         "(beyond the range of the cast dtype)")
        if sat:
            extra.append(f"with {count(sat)} value{'s' if sat != 1 else ''} beyond the range of the cast dtype "
                         "stored as its largest finite value")
        if parts and extra:
            parts[0] += ", " + ", ".join(extra)
        if same:
            one = same == 1
            parts.append(f"{count(same)} {'tensor keeps its' if one else 'tensors keep their'} dtype and "
                         f"{'differs' if one else 'differ'} only in bits that hold no value (signed zeros, NaN "
                         "payloads) or within its rounding")
        return "; ".join(parts) + "; no weight moved beyond it."
    q = s.get("quantization") or {}
    if v == "quantized_only" and q.get("sides") == ["both"]:
        unknown = (q.get("tensors") or 0) - (q.get("tensors_judged") or 0)
        n = int(tbs.get("quantized", 0))
        return (f"Both models are quantized: the {count(n)} quantized {'tensor' if n == 1 else 'tensors'} that "
                f"{'differs does' if n == 1 else 'differ do'} so only within their two quantization noise floors "
                f"together {_quant_how(q)} (up to about one "
                "quantization step), as two quantizations of the same weights can; at this precision a change "
                "smaller than a quantization step would not show either. Every other tensor is unchanged or "
                f"within rounding{_no_floor(unknown)}.")
    if v == "quantized_only" and q.get("sides") == ["base"]:
        unknown = (q.get("tensors") or 0) - (q.get("tensors_judged") or 0)
        return (f"The base given is a quantization of these weights: {_quantized_within(tbs, 'them')} "
                f"{_quant_how(q)}, and every other tensor is unchanged or within rounding{_no_floor(unknown)}.")
    if v == "quantized_only":
        unknown = (q.get("tensors") or 0) - (q.get("tensors_judged") or 0)
        # the floor is the test's resolution: at 2-4 bits a fine-tune of a few percent stays within it
        limit = (f"; a change smaller than the quantization noise would not show (the {matrices_phrase(s)} are "
                 f"{sci(rel)} of their size from the base, which is that noise)" if rel else "")
        return (f"Quantized from this base: {_quantized_within(tbs, 'it')} {_quant_how(q)}, and every other tensor "
                f"is unchanged or within rounding{_no_floor(unknown)}{limit}.")
    added = int(tbs.get("added") or 0)
    # a resized tensor whose shared rows carry no change (bitwise the base's, within rounding or within the
    # quantization noise floor) changed only by its new (or dropped) rows
    grown = int(scope.get("tensors_only_resized") or 0)
    bitwise = sum(1 for t in counted if t.get("status") == "resized" and t.get("frac_changed") == 0)
    # a table only trimmed (rows removed, none added) is not among the changed tensors: "0 of 39 tensors changed
    # (1 of them only resized ...)" contradicted itself, so it is counted apart
    cut = min(grown, sum(1 for t in counted if t.get("status") == "resized" and t.get("base_shape")
                         and int(t.get("numel") or 0) <= int(t.get("numel_compared") or 0)
                         and not t.get("frac_beyond_rounding")))
    kept = "bitwise unchanged" if bitwise >= grown else "unchanged beyond rounding or their quantization noise floor"
    asides = [f"{count(grown - cut)} of them only resized: rows added or removed, the shared rows {kept}"] \
        if grown - cut else []
    if cut:
        asides.append(f"{count(cut)} more only trimmed: rows removed, the rows kept {kept}")
    reshaped = scope.get("tensors_reshaped") or {}
    if reshaped.get("tensors"):
        n = int(reshaped["tensors"])
        # not among the changed tensors (no number measured them): counted apart
        asides.append(f"{count(n)} {'other is' if n == 1 else 'others are'} of another shape than in the base, "
                      f"{count(reshaped.get('params_base'))} base parameters: not compared, so nothing is known of "
                      "how they relate to it")
    removed = int(tbs.get("removed") or 0)
    # removed base tensors are not among the tuned model's tensors: said apart, or "0 of 37 tensors changed"
    # reads as if nothing differed (an ONNX export that leaves out the unused pooler)
    gone = f"; {count(removed)} base {'tensor' if removed == 1 else 'tensors'} removed" if removed else ""
    # tensors within their quantization noise floor beside changed ones may hide a smaller change: lower bounds
    least, hidden = at_least(s), within_floor(s)
    if hidden:
        # a tensor in a format with no floor (MXFP4 beside Q8_0) was not tested: it is not "within" anything
        n_u = int(hidden.get("untested") or 0)
        n_h = int(hidden.get("tensors") or 0) - n_u
        if n_h:
            asides.append(f"{count(n_h)} more {'stands' if n_h == 1 else 'stand'} within {'its' if n_h == 1 else 'their'} "
                          "quantization noise floor and may have changed by less than it")
        if n_u:
            asides.append(f"{count(n_u)} more {'is' if n_u == 1 else 'are'} {untested_why(data)}, untested, and may "
                          "have changed too")
    only = f" ({'; '.join(asides)})" if asides else ""      # one parenthesis, not two in a row
    if added and scope.get("tensors_changed") is not None:    # added tensors are new, not changed
        parts = [f"{least}{count(max(0, scope['tensors_changed'] - added))} of {count(scope.get('tensors_total'))} "
                 f"tensors changed{only} and {count(added)} added"]
    else:
        parts = [f"{least}{count(scope.get('tensors_changed'))} of {count(scope.get('tensors_total'))} tensors "
                 f"changed{only}"]
    if scope.get("blocks_total"):
        n_r = int(scope.get("blocks_reshaped") or 0)
        n_a = len((scope.get("blocks_added") or {}).get("blocks") or ())
        parts.append(f"{least}{int(scope.get('blocks_changed') or 0) - n_a} of {scope.get('blocks_total')} blocks"
                     + (f" ({count(n_r)} {'other holds' if n_r == 1 else 'others hold'} tensors of another shape than in "
                        "the base, not compared)" if n_r else "")
                     + (f"; {count(n_a)} {'block' if n_a == 1 else 'blocks'} added, with no counterpart in the base"
                        if n_a else ""))
    text = "Derived from this base: " + ", in ".join(parts) + gone
    heads = [t for t in data.get("tensors") or [] if is_tied_row(t) and t.get("status") == "changed"]
    if heads:
        # the tied head row is left out of every count (its parameters are the embedding's): "0 of 38 tensors
        # changed" alone was quoted of a model whose output head was swapped for a near-orthogonal matrix
        text += (f" (not counting the tuned model's effective head, its embedding table tied as `"
                 f"{escape_name(str(heads[0].get('name')))}`, which differs from the base's head: relative change "
                 f"{sci(heads[0].get('rel_change'))})")
    if scope.get("base_blocks_total") and scope.get("base_blocks_paired", 0) < scope["base_blocks_total"]:
        text += f"; {scope['base_blocks_paired']} of {scope['base_blocks_total']} base blocks have a counterpart"
    if scope.get("blocks_moved"):
        n = scope["blocks_moved"]
        text += (f"; {count(n)} {'block is a base block' if n == 1 else 'blocks are base blocks'} at another "
                 "position (reordered or repeated, paired by content: see the notes)")
    if cos is not None:
        mats = [t for t in counted if len(t.get("shape") or ()) >= 2]
        if mats and not any(t.get("status") in ("changed", "resized") for t in mats) \
                and any(t.get("status") == "quantized" for t in mats):
            # the 1 - cosine of matrices that moved only within their quantization floor is that noise,
            # not the fine-tune's (which changed other tensors)
            text += (f"; the {matrices_phrase(s)} differ only within their quantization noise floor "
                     f"(1 - cosine = {sci(one_minus_cosine_of(data))})")
        else:
            text += f"; the {matrices_phrase(s)} keep 1 - cosine = {sci(one_minus_cosine_of(data))} with the base"
            if one_minus_cosine_of(data) == 0 and matrices_phrase(s) == "large matrices" \
                    and any(t.get("status") in ("changed", "resized") for t in counted):
                # "1 - cosine = 0" beside "a fine-tune" read as nothing changed: what changed is outside that figure
                large = int(((data.get("settings") or {}).get("thresholds") or {}).get("large_matrix_numel") or 4096)
                if not any(t.get("status") in ("changed", "resized") and len(t.get("shape") or ()) >= 2
                           and int(t.get("numel") or 0) >= large for t in counted):
                    text += (f" (every tensor that changed is a vector or a matrix of fewer than {count(large)} "
                             "elements, which that figure leaves out)")
                # else large matrices changed that the figure leaves out: all zero on one side, which
                # _zeroed_phrase names (a zero matrix has no direction)
            if "quant_noise_distance" in (s.get("flags") or []):
                text += (", most of it the quantization's own noise (net of each quantized matrix's noise floor "
                         "the change is within what fine-tunes move; a copy of the base quantized the same way "
                         "would be about as far)")
    elif not scope.get("tensors_changed"):
        text += "; every shared tensor is bitwise equal or within rounding"
    text += _zeroed_phrase(scope, cos is not None)
    if "rounding_level" in (s.get("flags") or []):
        n = int(tbs.get("changed") or 0)
        text += (f"; no changed matrix has a direction above the rounding noise of its stored numbers (numerical "
                 f"rank 0 in {'the one' if n == 1 else f'all {count(n)}'}; relative change {sci(s.get('relative_change'))}): "
                 "differences of this size are what arithmetic over the same weights leaves (merging and unmerging "
                 "an adapter, a pass through another precision), and also what training stored in a 16-bit format "
                 "at a small learning rate can leave (most of its updates round away), so the weights alone do "
                 "not show whether the model was trained further")
    if "far_from_base" in (s.get("flags") or []) and (s.get("form") or {}).get("kind") == "low_rank":
        # a merge or training apart changes every direction: a low-rank change that large is a heavy update
        text += ("; that is far more than fine-tunes move (they keep a cosine of 0.9 or more and a relative change "
                 "well below 0.5), yet the change is low-rank: a large low-rank update (an adapter trained hard or "
                 "scaled up), not a merge or a model trained apart, which change every direction")
    elif "far_from_base" in (s.get("flags") or []):
        text += ("; that is far more than fine-tunes move (they keep a cosine of 0.9 or more and a relative change "
                 "well below 0.5): a merge with another model, long further training, a heavy fine-tune, or two "
                 "models trained apart from the same random initialisation (the same seed) would do it, and "
                 "weightdiff cannot tell which")
    pu = scope.get("permuted_units") or {}
    every = pu.get("blocks") or {}
    undone = pu.get("undone") or {}
    tables = [b for b, v in every.items() if "rows" in v]
    if tables:
        grown = int(pu.get("tensors_grown") or 0)
        trimmed = bool(int(pu.get("tensors_resized") or 0) - grown > 0 or pu.get("tensors_trimmed"))
        measured = all("rows" in undone.get(b, ()) for b in tables)
        scrambled = pu.get("rows_consistent") is False
        # "computes what the base computes" only when the tables were found in one order: unchecked, it was said
        # of an embedding remapped beside a head left in the base's order
        consistent = pu.get("rows_consistent") is True
        text += (f"; the token rows of the {_and(tables)} are the base's rows in another order"
                 + (" or a subset of them" if trimmed else "") + (", with rows added" if grown else "")
                 + (" (the embedding's rows and the head's are not in one order, so no remapping of the tokenizer's "
                    "ids gives the base's computation: the model computes something else than the base), so "
                    if scrambled else
                    f" (a tokenizer's ids remapped{', a vocabulary trimmed' if trimmed else ''}"
                    f"{', a vocabulary grown' if grown else ''}: on the remapped tokens the model computes what the base "
                    "computes), so " if consistent else
                    f" (a tokenizer's ids remapped{', a vocabulary trimmed' if trimmed else ''}"
                    f"{', a vocabulary grown' if grown else ''}, if the embedding's rows and the head's follow one "
                    "remapping, which was not established here: only then does the model compute what the base "
                    "computes on the remapped tokens), so ")
                 + ("each row is compared with the base row it is" if measured else
                    "their numbers here are of rows compared with other tokens' rows"))
    perm = {b: v for b, v in every.items() if b not in tables}
    if perm:
        n = len(perm)
        kinds = {k for v in perm.values() for k in v}
        what = " and ".join(w for k, w in (("mlp", "MLP neurons"), ("attn", "attention heads"), ("experts", "experts"))
                            if k in kinds)
        late = {b: [k for k in v if k != "router" and k not in undone.get(b, ())] for b, v in perm.items()}
        late = {b: v for b, v in late.items() if v}
        stays = [b for b, v in perm.items() if "router" in v]
        text += (f"; the {what} of {count(n)} {'block are' if n == 1 else 'blocks are'} the base's in another "
                 f"order ({_names(list(perm))}; a reordering alone changes nothing the model computes"
                 + (" when the router's rows follow it" if stays else "") + "): ")
        if not late:
            text += ("each reordered matrix is measured against the base's units in this model's order, so the "
                     "numbers here are of what changed beneath the reordering")
        else:
            text += ((f"in {_names(list(late))} " if len(late) < n else "")
                     + "their matrices' numbers here are of the reordered weights (the order was not found "
                     "exactly)")
        if stays:
            one = len(stays) == 1
            measured = all("router" in undone.get(b, ()) for b in stays)
            text += (f"; in {_names(stays)} the router's rows were not reordered with the experts, so tokens reach "
                     f"other experts than in the base: {'that block computes' if one else 'those blocks compute'} "
                     "something else"
                     + (f" ({'its router is' if one else 'their routers are'} compared with the base's rows in the "
                        f"experts' new order, and {'counts' if one else 'count'} as changed)" if measured else ""))
    neg = scope.get("negated_matrices") or {}
    if neg.get("tensors"):
        n_neg = int(neg["tensors"])
        kinds = sorted({k for v in (neg.get("blocks") or {}).values() for k in v})
        text += (f"; {count(n_neg)} {'tensor is' if n_neg == 1 else 'tensors are'} stored with the sign flipped "
                 f"({_names(kinds)}, in {_names(list(neg.get('blocks') or {}))}: a cosine with the base below "
                 f"-{((data.get('settings') or {}).get('thresholds') or {}).get('unrelated_cosine', 0.2)}, the base's "
                 "times -1 and whatever changed beside), "
                 f"so {'it' if n_neg == 1 else 'each'} is measured against the base times -1 and the numbers here are "
                 "of what changed beneath "
                 "the sign; a sign flip changes nothing the model computes only when the matrix that reads its "
                 "output is flipped too (v and o, up and down of a gated MLP), which is not checked here")
        n_left = int(neg.get("tensors_not_measured") or 0)
        if n_left:
            text += (f"; {count(n_left)} of them could not be measured so (quantized codes, adapter factors, or "
                     f"units also reordered): {'its' if n_left == 1 else 'their'} numbers here are of the flipped "
                     "weights, and relatedness counts them by their distance from the base negated")
    rs = scope.get("rescaled_units") or {}
    if rs.get("tensors"):
        n_rs = int(rs["tensors"])
        # counted by pair and by unit: "2 matrices are the base's with each row times its own factor, and the matrix
        # that reads those units ..." read as four matrices, and "266 of them negative" counted each of 133 flipped
        # units twice (once in each matrix of its pair; ``scope.rescaled_units.negative`` counts so)
        n_pairs = max(1, n_rs // 2)
        neg = int(rs.get("negative") or 0)
        units = neg // 2 if n_rs % 2 == 0 else neg
        text += (f"; in {count(n_pairs)} {'pair' if n_pairs == 1 else 'pairs'} of matrices the first's rows (up, v) are "
                 "the base's each times its own factor and the second's columns (down, o), which read those units, "
                 "the base's divided by the same factors"
                 + (f" ({count(units)} {'unit has' if units == 1 else 'units have'} a negative factor: "
                    f"{'its sign' if units == 1 else 'their signs'} flipped)" if neg else "")
                 + ": a scale "
                 "moved from one matrix to the next, or units' signs flipped one by one, which leaves what a gated MLP "
                 "and attention's v and o compute unchanged (an MLP with no gate only when it uses ReLU and every factor is "
                 "positive); each matrix is measured "
                 "against the base so scaled and the numbers here are of what changed beneath the scales")
    fo = scope.get("folded_norms") or {}
    if fo.get("tensors"):
        n_fo, n_norms = int(fo["tensors"]), int(fo.get("norms") or 0)
        n_sm = int(fo.get("norms_smoothed") or 0)
        n_ones = n_norms - n_sm
        parts = []
        if n_ones:
            parts.append(f"{count(n_ones)} {'norm holds' if n_ones == 1 else 'norms hold'} all ones, "
                         f"{'its' if n_ones == 1 else 'their'} base gains folded into the matrices that read "
                         f"{'it' if n_ones == 1 else 'them'} (QuaRot's first step; with RMSNorm the model computes what "
                         "the base computes)")
        if n_sm:
            parts.append(f"{count(n_sm)} {'norm is' if n_sm == 1 else 'norms are'} the base's divided by a factor per "
                         f"channel that the matrices reading {'it' if n_sm == 1 else 'them'} carry in their columns "
                         "(smoothing scales, as SmoothQuant and AWQ apply before quantizing; the model computes what "
                         "the base computes)")
        if not parts:
            parts.append("some norms differ from the base's by a factor per channel that the matrices reading them "
                         "carry in their columns")
        text += ("; " + "; ".join(parts) + ", so "
                 f"{'the' if n_fo == 1 else 'each of the'} {count(n_fo)} {'matrix' if n_fo == 1 else 'matrices'} is "
                 "measured against the base's times those factors and the numbers here are of what changed beneath "
                 "the fold")
    rot = scope.get("rotated_residual") or {}
    if rot.get("tensors"):
        n_rot, folded = int(rot["tensors"]), int(rot.get("norms_folded") or 0)
        held, held_ok = int(rot.get('matrices_held_out') or 0), int(rot.get('matrices_explained') or 0)
        bare = rot.get("embedding_fitted") is False     # the table's first rows are not the base's rows rotated
        text += ("; the residual stream is rotated: " + ("the output matrices are the base's times one orthogonal "
                 "matrix (fitted on the output matrices of half the blocks alone: the token embedding's shared rows "
                 "are not the base's rows rotated, so it is measured against them as it is; it " if bare else
                 "the token embedding and the output matrices are the base's times one orthogonal matrix (fitted on "
                 "the embedding and the output matrices of half the blocks, it ")
                 + (f"holds on the {count(held)} held-out output matrices" if held_ok >= held else
                    f"holds on {count(held_ok)} of the {count(held)} held-out output matrices, the others changed "
                    "beyond it")
                 + f" with 1 - cosine = {sci(max(0.0, 1.0 - float(rot.get('cosine_held_out') or 0.0)))}; QuaRot and SpinQuant rotate so, and a "
                 f"permuted hidden dimension is such a rotation), so {'the' if n_rot == 1 else 'each of the'} "
                 f"{count(n_rot)} {'tensor is' if n_rot == 1 else 'tensors is'} measured against the base in the "
                 "rotated frame and the numbers here are of what changed beneath the rotation; a rotation changes "
                 "nothing the model computes only with each norm's gains folded into the matrices that read it"
                 + (f" ({count(folded)} {'norm is' if folded == 1 else 'norms are'} so here: all ones, "
                    "the base's gains in those matrices)" if folded else ""))
        unfolded = int(rot.get("norms_unfolded") or 0)
        if unfolded:
            text += (f"; {count(unfolded)} {'norm keeps' if unfolded == 1 else 'norms keep'} gains that differ from "
                     "channel to channel, which scale the rotated coordinates: this model does not compute what the "
                     "base computes")
    alike = count_lookalikes((t.get("status"), t.get("shape")) for t in counted) if "unpaired_lookalikes" in (s.get("flags") or []) else 0
    if alike:
        text += (f"; {count(alike)} removed base {'matrix has' if alike == 1 else 'matrices have'} an added tuned "
                 f"matrix of {'its' if alike == 1 else 'their'} shape beside {'it' if alike == 1 else 'them'} that "
                 "no name pairs and whose values do not correlate with any base tensor: the same "
                 f"{'weight' if alike == 1 else 'weights'} changed beyond recognition, or replaced, cannot be told "
                 "from removed and new ones")
    broken = [t for t in counted if nonfinite_only(t)]
    if broken:
        text += (f"; {count(len(broken))} of the changed tensors {'differs' if len(broken) == 1 else 'differ'} "
                 "only by NaN or infinite values "
                 "(not measured: broken or overflowed weights)")
    near = int(q.get("tensors_near_grid") or 0)
    if near:
        # the float model starts from the base's quantized values (weightdiff.measure.quant_floor.near_grid)
        text += (f"; {count(near)} of {count(q.get('tensors_judged'))} quantized tensors are the base's quantized "
                 "values, changed: most of their changed elements lie next to those values, where quantizing float "
                 "weights spreads them over the noise floor (a fine-tune of the quantized model)")
    if q.get("tensors_beyond", 0) > near:
        after = {("base",): ", so the base given was quantized from other weights than these (a fine-tune of "
                            "them, or the weights they were tuned from)",
                 ("tuned",): ", so this is a fine-tune that was then quantized"}.get(tuple(q.get("sides") or ()),
                                                                                 ", so the weights quantized differ")
        if "quant_noise_level" in (s.get("flags") or []) and (q.get("tests") or {}).get("first-group"):
            after = ("; but no element GPTQ's error compensation leaves plainly rounded (a first column of each "
                     "matrix) lies beyond its floor, only some stored group scales are not the base's, and the energy "
                     "of each difference is within what that compensation holds: a bf16 copy moved by an ulp (an "
                     "adapter merged and unmerged, a pass through another precision) quantized the same way leaves "
                     "this, and so does a fine-tune too small to show at this precision, so the weights alone do not "
                     "show whether the model was trained further")
        elif "quant_noise_level" in (s.get("flags") or []):
            n = int(tbs.get("changed") or 0)
            after = (f"; but no changed matrix has a direction above the modelled quantization and rounding noise "
                     f"(numerical rank 0 in {'the one' if n == 1 else f'all {count(n)}'}), and the energy of each "
                     "difference is within that noise's: a bf16 copy moved by an ulp (an adapter merged and "
                     "unmerged, a pass through another precision) quantized the same way leaves this, and so does "
                     "a fine-tune too small to show at this precision, so the weights alone do not show whether "
                     "the model was trained further")
        if neg.get("tensors_not_measured"):        # the sign flip alone puts them beyond the floor
            after = (", some of them only by the sign flip said above (a flipped matrix is as far as it can be from "
                     "the base it copies)")
        far = q["tensors_beyond"] - near
        judged = q.get("tensors_judged")
        text += (f"; {count(far)} of {count(judged)} quantized tensors ({share(far / judged if judged else None)}) "
                 f"stand beyond the quantization noise floor {_quant_how(q)}" + after)
    return text + "." + (ADAPTER_CAVEAT if "adapter" in (s.get("flags") or []) else "")


def _zeroed_phrase(scope: dict, had_cosine: bool) -> str:
    """The matrices all zero on one side, which no cosine covers (``scope.matrices_zeroed``)."""
    z = scope.get("matrices_zeroed") or {}
    nt, nb = int(z.get("tuned") or 0), int(z.get("base") or 0)
    if not nt and not nb:
        return ""
    parts = []
    if nt:
        parts.append(f"{count(nt)} {'matrix is' if nt == 1 else 'matrices are'} all zero in the tuned model "
                     "(set to zero: erased)")
    if nb:
        parts.append(f"{count(nb)} {'matrix is' if nb == 1 else 'matrices are'} all zero in the base and not in the "
                     "tuned model (trained from zero)")
    where = "so that cosine leaves them out" if had_cosine else "so no cosine measures them"
    return (f"; {' and '.join(parts)}, {count(z.get('params'))} parameters: a zero matrix has no direction, "
            f"{where}")


#: how each noise-floor test is named in sentences (docs/methodology.md)
TEST_WORDS = {"bound": "the per-element bound of round-to-nearest",
              "first-group": "the first-group test for error-compensating quantizers",
              "statistical": "the share test for scale-searching quantizers",
              "none": "no test (the reader gives no floor)",
              "awq-fold": "AWQ's activation scales fit back from the norms they were folded into"}


def _quant_how(q: dict) -> str:
    tests = ", ".join(TEST_WORDS.get(t, t) for t in q.get("tests") or {})
    n = int(q.get("tensors_clamped") or 0)
    # an importance-matrix K-quant clamps elements to its end codes past the grid: set apart, and said so
    clamped = (f", elements an importance-matrix quantizer clamped to the end of their grid set apart in "
               f"{plural(n, 'tensor')}") if n else ""
    return f"({', '.join(q.get('formats') or [])}; decided by {tests}{clamped})"


def undone_words(s: dict) -> list[str]:
    """What was undone before the parameters were counted bit for bit and the matrices measured: the clauses of
    "once ..." (``["the units found reordered are put back in the base's order"]``), [] when nothing was. Page one
    and the key figures say them as the headline does: "100% are bit for bit the same ... numbers not touched at
    all" was printed of a model whose MLP neurons sit at other positions."""
    sc = s.get("scope") or {}
    return [w for w, on in (("the units found reordered are put back in the base's order",
                             (sc.get("permuted_units") or {}).get("tensors_undone")),
                            ("the tensors stored with the sign flipped are multiplied by -1",
                             (sc.get("negated_matrices") or {}).get("tensors")),
                            ("the residual stream's rotation is undone",
                             (sc.get("rotated_residual") or {}).get("tensors")),
                            ("the units found rescaled are divided by their factors",
                             (sc.get("rescaled_units") or {}).get("tensors")),
                            ("the norms' gains found folded into the matrices that read them are taken out again",
                             (sc.get("folded_norms") or {}).get("tensors"))) if on]


def _only_pruned(s: dict) -> bool:
    """Every changed tensor is a pruned matrix (``scope.pruned_elements``), nothing added, removed or resized."""
    pr = ((s.get("scope") or {}).get("pruned_elements") or {})
    tbs = s.get("tensors_by_status") or {}
    return bool(pr.get("tensors")) and int(tbs.get("changed") or 0) == int(pr["tensors"]) \
        and not any(tbs.get(k) for k in ("added", "removed", "resized"))


def rows_not_measured(s: dict) -> list[str]:
    """The token tables (``embeddings``, ``head``) found to hold the base's rows in another order whose order was
    not undone (rows added, or matched by no exact order): their numbers are of rows compared with other tokens'
    rows, which page one and the form sentence must say (they were quoted as a change)."""
    pu = (s.get("scope") or {}).get("permuted_units") or {}
    return [b for b, k in (pu.get("blocks") or {}).items() if "rows" in k and "rows" not in (pu.get("undone") or {}).get(b, ())]


def computes_else(s: dict) -> str:
    """The caveat the title gives when every weight matches the base beneath a transformation that the model does
    not undo itself, so that it computes something else (token tables in two orders, a rotation with norms left
    unfolded); "" otherwise. Page one and Figure 1 repeat it: "0 of 4 blocks changed", "did not change" stood
    beside a title that said the model computes something else than the base."""
    sc = s.get("scope") or {}
    said = []
    if (sc.get("permuted_units") or {}).get("rows_consistent") is False:
        said.append("the embedding's token rows and the head's are not in one order")
    n = int((sc.get("rotated_residual") or {}).get("norms_unfolded") or 0)
    if n:
        said.append(f"{plural(n, 'norm')} of the rotated residual stream keep gains that differ from channel to "
                    "channel, which scale the rotated coordinates")
    if not said:
        return ""
    return f"Yet {_and(said)}, so the model computes something else than the base."


def headline(data: dict) -> list[str]:
    """The verdict's reason, then the sentences a reader can quote, each from the numbers."""
    s: dict[str, Any] = data.get("summary") or {}
    counted = _counted(data)
    by = s.get("params_by_status") or {}
    total = tuned_params(s)
    out = [s.get("verdict_reason") or verdict_reason(data)]
    if total:
        unchanged = by.get("unchanged", 0)
        same_rows = sum(t.get("numel_compared") or 0 for t in counted if t.get("status") == "resized"
                        and t.get("compared") in ("float", "bytes") and t.get("frac_changed") == 0)
        if same_rows and unchanged_elements(data) == unchanged + same_rows:
            out.append(f"{share(unchanged / total)} of parameters are bitwise unchanged, "
                       f"{share((unchanged + same_rows) / total)} counting the shared rows of resized "
                       "tensors, which are bitwise unchanged too.")
        else:
            main, aside = unchanged_words(data, total)
            undone = undone_words(s)
            tied_moved = any(is_tied_row(t) and t.get("status") == "changed" for t in data.get("tensors") or [])
            out.append(f"{main} of parameters are bitwise unchanged{aside}"
                       + (f", once {' and '.join(undone)}" if undone else "")
                       + (" (not counting the effective head, which differs: see below)." if tied_moved else "."))
            if same_bytes_words(s, total):
                out.append(f"A further {same_bytes_words(s, total)}.")
        if by.get("rounding"):
            out.append(f"{share(by['rounding'] / total)} differ only within dtype rounding.")
        if by.get("quantized"):
            out.append(f"{share(by['quantized'] / total)} differ only within their quantization noise floor.")
    if s.get("blocks_total"):
        text = summary_blocks_text(s)
        beyond = " beyond the quantization noise floor" if s.get("verdict") == "quantized_only" else ""
        out.append(f"{text[0].upper()}{text[1:]}{beyond}{floor_blocks(s)}.")
    if s.get("verdict") in ("derived", "unrelated") and s.get("relative_change") is not None:
        out.append(f"Relative change {sci(s['relative_change'])} (norm of all deltas over norm of the base).")
    f = s.get("form") or {}
    said = form_sentence(f, (data.get("settings") or {}).get("rank"))
    if said:
        late = rows_not_measured(s)
        out.append(said[:-1] + f" (this counts the token rows of the {_and(late)}, which are the base's rows in another "
                   "order compared with other tokens' rows: for those tables it measures no change)." if late and
                   said.endswith(".") else said)
    if nothing_compared(s):
        pass                      # no change was measured: its cost is not stated
    elif s.get("delta_params") and within_floor(s):
        # no upper bound for the model: the tensors within their floor may hold a change of their own
        out.append("Writing down the change of the tensors beyond the quantization noise floor takes "
                   + ("at most " if s.get("delta_params_lower") is not None else "")
                   + f"{count(s['delta_params'])} parameters ({share(s.get('delta_params_share'))} of the model)"
                   + (f" and at least {count(s['delta_params_lower'])}" if s.get("delta_params_lower") else "")
                   + f"; this is no bound for the whole model: {floor_rest(s)}.")
    elif s.get("delta_params") and s.get("delta_params_lower") is not None:
        out.append(f"Writing the change down takes at most {count(s['delta_params'])} parameters "
                   f"({share(s.get('delta_params_share'))} of the model) and at least "
                   f"{count(s['delta_params_lower'])}: "
                   + ("some changed matrices have no rank analysis." if (f.get("matrices_without_rank") or 0)
                      else "some energy ranks are brackets."))
    elif s.get("delta_params"):
        out.append(f"Writing the change down takes {count(s['delta_params'])} parameters "
                   f"({share(s.get('delta_params_share'))} of the model).")
    ia3 = (s.get("scope") or {}).get("ia3") or {}
    if ia3.get("values") and s.get("verdict") == "derived":
        out.append(f"The adapter itself adds {count(ia3['values'])} numbers to the base "
                   f"({plural(int(ia3.get('vectors') or 0), 'IA3 vector')} rescaling the inputs or outputs of the layers "
                   "they change).")
    oft = (s.get("scope") or {}).get("oft") or {}
    if oft.get("tensors") and s.get("verdict") == "derived":
        out.append(f"The adapter itself adds {count(oft['values'])} numbers to the base ({_rotations(oft)} "
                   f"of {plural(int(oft['tensors']), 'layer')}).")
    for status, verb in (("added", ("were added", "was added")), ("removed", ("are missing", "is missing"))):
        rows = [t for t in counted if t.get("status") == status]
        if rows:
            n = len(rows)
            what = "tensor" if status == "added" else "base tensor"
            out.append(f"{count(n)} {what}{'s' if n != 1 else ''} {verb[0] if n != 1 else verb[1]} "
                       f"({count(sum(t.get('numel') or 0 for t in rows))} parameters).")
    for t in counted:
        if t.get("status") == "resized" and not _mismatch(t) and t.get("module") == "embed" and t.get("base_shape"):
            out.append(f"The vocabulary was resized from {count(t['base_shape'][0])} to {count(t['shape'][0])} rows.")
            break
    for t in data.get("tensors") or []:
        if is_tied_row(t) and t.get("status") == "changed":
            out.append(f"The tuned model ties `{t.get('name')}` to its embedding; that effective head differs from the "
                       f"base head (relative change {sci(t.get('rel_change'))}).")
    if "composite_base" in (s.get("flags") or []):
        n = len({t.get("base_index") for t in counted if t.get("base_name") is not None})
        out.append(f"The tuned model is assembled from {n} bases.")
    bad = sum(t.get("nonfinite") or 0 for t in counted)
    if bad:
        out.append(f"{plural(bad, 'non-finite value')} (NaN or Inf) {'was' if bad == 1 else 'were'} found.")
    return out


# --- the plain-language paragraph of the memo's first page ---------------------------------

def _rotations(oft: dict) -> str:
    """What an OFT or BOFT adapter's own values are (``summary.scope.oft``)."""
    if oft.get("method") == "BOFT":
        return "BOFT butterfly rotations of the inputs and scales of the outputs"
    return "OFT rotations of the inputs"


def plural(n: Any, word: str, many: str | None = None) -> str:
    """``plural(1, "tensor")`` -> ``'1 tensor'``; ``plural(3, "matrix", "matrices")`` -> ``'3 matrices'``."""
    return f"{count(n)} {word if n == 1 else many or word + 's'}"


def _quantized_within(tbs: dict, whom: str) -> str:
    """``all 12 quantized tensors differ from it only within their own quantization noise floor``; one tensor
    in the singular."""
    n = int(tbs.get("quantized", 0) or 0)
    if n == 1:
        return f"the 1 quantized tensor differs from {whom} only within its own quantization noise floor"
    return f"all {count(n)} quantized tensors differ from {whom} only within their own quantization noise floor"


def _no_floor(unknown: int) -> str:
    """`` (3 quantized tensors had no floor to test)``, or "" when every one had."""
    if not unknown:
        return ""
    return f" ({count(unknown)} quantized {'tensor' if unknown == 1 else 'tensors'} had no floor to test)"


def model_label(entry: dict | None) -> str:
    """How a memo names a model: its label, else its Hub repo id (with revision), else its path."""
    entry = entry or {}
    if entry.get("label") and str(entry["label"]).strip():      # a blank label (a hand-edited JSON) names nothing
        return escape_name(str(entry["label"]))
    hub = entry.get("hub") or {}
    if hub.get("repo_id"):
        rev = hub.get("revision")
        return escape_name(f"{hub['repo_id']}@{rev}" if rev and rev != "main" else str(hub["repo_id"]))
    return escape_name(str(entry.get("path") or "?"))


def _changed_matrices(data: dict) -> tuple[int, float] | None:
    """(matrices changed, their pooled relative change) when some compared matrices changed and the others
    are all unchanged or within rounding; else None."""
    nb2 = nd2 = 0.0
    n = rest = 0
    for t in _counted(data):
        if len(t.get("shape") or ()) < 2 or t.get("compared") not in ("float", "bytes"):
            continue
        if t.get("status") != "changed":
            rest += t.get("status") in ("unchanged", "rounding")
            if t.get("status") not in ("unchanged", "rounding"):
                return None
            continue
        if nonfinite_only(t):           # NaN/Inf only: no change measured (pooled as 0 it halved the figure)
            continue
        nb, nd = t.get("norm_base"), t.get("norm_delta")
        if not (isinstance(nb, (int, float)) and isinstance(nd, (int, float))) or nb != nb or nd != nd:
            return None
        n, nb2, nd2 = n + 1, nb2 + nb * nb, nd2 + nd * nd
    return (n, (nd2 / nb2) ** 0.5) if n and rest and nb2 > 0 else None


def _times(a: float, b: float) -> str:
    """How many times ``a`` is ``b``, in words a reader can quote: ``'about 30 times'``."""
    r = a / b
    if r >= 1.5:
        return f"about {num(r, 2)} times"
    if r >= 0.67:
        return "about the same as"
    return f"about {num(b / a, 2)} times smaller than"


def _partial_parts(components: list[dict], base: str, bf16: float | None, unrel: dict | None) -> list[str]:
    """A partial verdict in plain words: which components the model shares with the base, set against a
    bfloat16 cast, and which are unrelated to it, set against an unrelated model. The whole model's pooled
    figure mixes the two and is near neither, so each group is measured against the reference it is read by.

    >>> _partial_parts([{"component": "layers.0", "status": "shared", "rel_change": 0.0, "identical": True},
    ...                 {"component": "layers.1", "status": "unrelated", "rel_change": 1.41, "cosine": 0.001}],
    ...                "B", 1.7e-3, {"rel_change": 1.41, "one_minus_cosine": 1.0})[0]
    'It shares block layers.0 with B, bit for bit; block layers.1 is unrelated to B.'
    """
    shared = [c for c in components if c.get("status") == "shared"]
    apart = [c for c in components if c.get("status") == "unrelated"]
    if not shared or not apart:
        return []
    text = f"It shares {parts_text([str(c['component']) for c in shared])} with {base}"
    moved = [c.get("rel_change") for c in shared if c.get("rel_change") is not None]
    if all(c.get("identical") for c in shared):
        text += ", bit for bit"
    elif moved:
        top = max(moved)
        text += (f", whose large matrices moved by at most {sci(top)} of their size"
                 + (f", {_times(top, bf16)} the rounding a cast to bfloat16 would cause ({sci(bf16)})"
                    if bf16 and top > 0 else ""))
    n = len(apart)
    text += f"; {parts_text([str(c['component']) for c in apart])} {'is' if n == 1 else 'are'} unrelated to {base}."
    out = [text]
    rels = [c["rel_change"] for c in apart if c.get("rel_change") is not None]
    omcs = [max(0.0, 1.0 - c["cosine"]) for c in apart if c.get("cosine") is not None]
    if rels and omcs and unrel:
        span = (lambda xs: sci(xs[0]) if len(xs) == 1 or sci(min(xs)) == sci(max(xs)) else
                f"{sci(min(xs))} to {sci(max(xs))}")
        out.append(f"{'Its' if n == 1 else 'Their'} large matrices differ from the base's by {span(rels)} of their "
                   f"size (1 − cosine {span(omcs)}), as an independently initialised model of the same shape would "
                   f"({sci(unrel['rel_change'])} and {sci(unrel['one_minus_cosine'])}): those parts were not made "
                   "from the base.")
    return out


def plain_language(data: dict) -> list[str]:
    """Four to six sentences a non-engineer can quote, from the numbers; no legal conclusion.

    Reads ``summary``, ``base``/``tuned`` (labels, Hub ids) and the reference scale
    (``reference``: the rounding of a cast and the unrelated level of this base)."""
    from .reference import reference_of

    s = data.get("summary") or {}
    tuned = model_label(data.get("tuned"))
    bases = data.get("base") or []
    base = " and ".join(model_label(b) for b in bases) or "the base"
    if "adapter" in (s.get("flags") or []):
        # the adapter folder holds only its factors: the parameters counted are base + adapter's
        tuned = f"the model {tuned} adapts (its base with the adapter applied)"
    total = tuned_params(s)           # "of <tuned>": removed base parameters are not the tuned model's
    by = s.get("params_by_status") or {}
    v = s.get("verdict")
    points = {p["key"]: p for p in reference_of(data).get("points") or []}
    out = []
    if not total:
        out.append(f"No parameter of {tuned} could be compared with {base}, so the comparison says nothing about "
                   "how the two relate.")
    elif v == "identical":
        out.append(f"All {count(total)} parameters of {tuned} are bit for bit the same as in {base}.")
    else:
        main, aside = unchanged_words(data, total)
        text = f"Of the {count(total)} parameters of {tuned}, {main} are bit for bit the same as in {base}"
        if undone_words(s):
            # counted beneath the reordering, rotation or rescale, as the headline says: as stored they differ
            text += f" once {' and '.join(undone_words(s))} (as stored, the tensors concerned differ from the base's)"
        if aside:
            text += f", {share(int(by.get('unchanged', 0) or 0) / total)} in tensors left entirely unchanged"
        if s.get("blocks_total"):
            n_a = len(((s.get("scope") or {}).get("blocks_added") or {}).get("blocks") or ())
            n = (s.get("blocks_changed") or 0) - n_a      # blocks added are not changed: they have no base block
            tot = s["blocks_total"]
            least = at_least(s)
            if tot == 1 and n_a == 1:      # "its one block was not changed and 1 was added" said of one block
                text += f"{';' if aside else ', and'} its one block was added (not in the base)"
            else:
                text += (f"{';' if aside else ', and'} " + (f"its one block {'was' if n else 'was not'} changed" if tot == 1
                         else f"{least}{count(n)} of its {count(tot)} blocks {'was' if n == 1 else 'were'} changed"))
            if n_a and not (tot == 1 and n_a == 1):
                text += f" and {count(n_a)} {'was' if n_a == 1 else 'were'} added (not in the base)"
            sc = s.get("scope") or {}
            moved, base_tot = int(sc.get("blocks_moved") or 0), int(sc.get("base_blocks_total") or 0)
            if moved:
                # SOLAR's depth up-scaling read "0 of its 6 blocks were changed" and nothing else: the reader was not
                # told that the model is deeper, its blocks copies of the base's
                text += (f"; {count(moved)} of its blocks {'is a base block' if moved == 1 else 'are base blocks'} at "
                         "another position (repeated or reordered; the Notes say which)"
                         + (f", and it has {count(tot)} blocks where the base has {count(base_tot)}"
                            if base_tot and tot != base_tot else ""))
            text += floor_blocks(s)
        out.append(text + ".")
        if same_bytes_words(s, total):
            out.append(f"A further {same_bytes_words(s, total)}.")
        if computes_else(s):
            out.append(computes_else(s))
    model, unrel = points.get("model"), points.get("unrelated")
    bf16 = (points.get("BF16") or {}).get("rel_change")
    rel = (model or {}).get("rel_change")
    if v == "unrelated" and model and unrel:
        out.append(f"Its large weight matrices differ from the base by {sci(model['rel_change'])} of their size, "
                   f"as far as an independently initialised model of the same shape would ({sci(unrel['rel_change'])}): "
                   "the weights give no sign that one was made from the other.")
    elif v == "cast_only":
        twins = {(t.get("cast") or {}).get("rounded") for t in _counted(data)} - {None}
        if twins:
            # two roundings of one original, one through a narrower format: no cast of the stored base gives them
            sides = {s for w in twins for s in {"both": ("base", "tuned"), "neither": ()}.get(w, (w,))}
            who = " and ".join(sorted(("the base" if w == "base" else "this model") for w in sides))
            how = f"{who} holding them rounded through a narrower format" if who else "each rounded to its own format"
            out.append(f"Both sides are roundings of the same numbers, {how}: the weights show no change beyond the "
                       "two roundings (a change smaller than half a step of that format would not show).")
        elif any((t.get("cast") or {}).get("through") or (t.get("cast") or {}).get("overflow")
               or (t.get("cast") or {}).get("saturated") for t in _counted(data)):
            out.append("Every value is what storing the same numbers in another format gives (converted through "
                       "an intermediate format, or beyond the new format's range): the weights show no change beyond "
                       "that conversion.")
        elif any(holds_exactly(t.get("dtype_base"), t.get("dtype_tuned")) and t.get("status") == "rounding"
                 for t in _counted(data)):
            # the base converts exactly to the tuned dtype: the tuned values are not a conversion of the base
            out.append("Every difference is no larger than the rounding of the base's format: the base may be a "
                       "rounding of this model's numbers, or this model may have been changed from the base by less "
                       "than that rounding; the weights cannot tell the two apart.")
        else:
            out.append("Every difference is no larger than the rounding of storing the same numbers in another "
                       "format: the weights show no change beyond that conversion (a change smaller than the "
                       "rounding would not show).")
    elif v == "derived" and rel and quantization_noise(data)[0]:
        # a quantized side: the figure holds the quantization's own noise, which is no movement of the weights (a
        # Q4_K copy of a 1e-3 fine-tune read "moved by 9.0e-2, about 54 times the rounding", as the base's own does)
        noise = quantization_noise(data)[1]
        text = (f"Taken together, its large weight matrices differ from the base by {sci(rel)} of their size, a figure "
                "that includes the noise of the quantization, which is not a movement of the weights")
        text += (f": the matrices within their quantization noise floor, as an untouched quantized copy of the base "
                 f"would read, differ by {sci(noise)}" if noise is not None else
                 ": how much of it the fine-tune moved is not measured by this figure")
        out.append(text + ".")
        if model and unrel:
            out.append(f"Measured as a turn of direction, they read 1 − cosine = "
                       f"{sci(model['one_minus_cosine'])}, the quantization noise included, where an unrelated model "
                       f"of the same shape reads {sci(unrel['one_minus_cosine'])}.")
    elif v == "derived" and rel:
        text = (f"Taken together, {'measured so, ' if undone_words(s) else ''}its large weight matrices moved by "
                f"{sci(rel)} of their size")
        late = rows_not_measured(s)
        caveat = ""
        if late:
            # the reason admits that these tables' rows were compared with other tokens' rows; page one quoted the
            # figure as a movement ("moved by 6.0e-1 ..., 363 times the rounding") of a model nothing was trained in
            caveat = (f"These figures include the token rows of the {_and(late)}, which are the base's rows in another "
                      "order and were compared here with other tokens' rows, not with the rows they are: for "
                      f"{'that table' if len(late) == 1 else 'those tables'} they do not measure a change, nor does "
                      "the count of numbers it takes to write the change down.")
        if bf16:
            text += f", {_times(rel, bf16)} the rounding a cast to bfloat16 would cause ({sci(bf16)})"
        few = _changed_matrices(data)
        if few is not None and few[1] >= 1.5 * rel:
            # the pooled figure spreads a change of a few matrices over all of them: "about the rounding" of a
            # model whose one trained block moved 2.4 times it
            n, r_c = few
            text += (f"; the {plural(n, 'matrix', 'matrices')} that changed moved by {sci(r_c)} of "
                     f"{'its' if n == 1 else 'their'} size"
                     + (f", {_times(r_c, bf16)} that rounding" if bf16 else "")
                     + ", the others not beyond rounding")
        out.append(text + ".")
        if model and unrel:
            out.append(f"Measured as a turn of direction, they read 1 − cosine = "
                       f"{sci(model['one_minus_cosine'])}, where an unrelated model of the same shape reads "
                       f"{sci(unrel['one_minus_cosine'])}.")
        if caveat:
            out.append(caveat)
    elif v == "partial":
        out += _partial_parts(s.get("components") or [], base, (points.get("BF16") or {}).get("rel_change"), unrel)
    if v in ("derived", "partial", "unrelated") and (faint := faint_components_sentence(s)):
        out.append(faint.strip())
    form = s.get("form") or {}
    if v == "derived" and s.get("delta_params"):
        kind = {"low_rank": "compact (low-rank)", "sparse": "sparse", "dense": "spread over many directions",
                "mixed": "partly compact, partly spread out",
                "vectors": "in vectors only (norm weights or biases)"}.get(form.get("kind"), "")   # undecided: none
        sc = s.get("scope") or {}
        n_fold = int((sc.get("rotated_residual") or {}).get("norms_folded") or 0) \
            + int((sc.get("folded_norms") or {}).get("norms") or 0)
        if form.get("kind") == "vectors" and n_fold:
            # the norms whose gains were folded into the matrices read as LayerNorm tuning
            kind = (f"in vectors only (among them {plural(n_fold, 'norm')} whose gains were moved into the matrices "
                    "that read them, which the title names)")
        most = "at most " if s.get("delta_params_lower") is not None else ""
        if within_floor(s):
            # the tensors within their quantization floor may hold a change: no bound on the whole (a Q4_1 copy of a
            # dense fine-tune of 7 tensors read "at most 65,536 numbers", the one tensor beyond the floor)
            out.append(f"Writing down the change of the tensors beyond the quantization noise floor takes {most}"
                       f"{count(s['delta_params'])} numbers, {share(s.get('delta_params_share'))} of the model; "
                       f"this is no bound for the whole model: {floor_rest(s)}.")
        elif _only_pruned(s):
            # a mask on the base's weights: "spread over many directions" was said of 50% magnitude pruning, which
            # writes nothing into any direction
            pr = (s.get("scope") or {}).get("pruned_elements") or {}
            n_pr = int(pr.get("tensors") or 0)
            out.append(f"The change sets {count(pr.get('elements_zeroed'))} of the {count(pr.get('elements_in'))} "
                       f"elements of {plural(n_pr, 'matrix', 'matrices')} to zero and leaves the rest "
                       + ("the base's cast to the tuned dtype" if pr.get("cast") else "exactly the base's")
                       + " (pruning): a mask on the base's weights, not a change written into them; written down as "
                       f"a difference from the base, it takes {count(s['delta_params'])} numbers, "
                       f"{share(s.get('delta_params_share'))} of the model.")
        else:
            lead = f"The change is {kind}: writing" if kind else "Writing the change down"
            out.append(f"{lead} {'it down ' if kind else ''}takes {most}"
                       f"{count(s['delta_params'])} numbers, {share(s.get('delta_params_share'))} of the model.")
    ia3 = (s.get("scope") or {}).get("ia3") or {}
    if v == "derived" and ia3.get("values"):
        # an IA3 adapter's change is each weight's own rows or columns rescaled: dense as a difference, but the
        # adapter adds only its vectors to the base (a reader weighing "how much was trained" needs both)
        out.append(f"The adapter itself adds {count(ia3['values'])} numbers to the base: "
                   f"{plural(int(ia3.get('vectors') or 0), 'IA3 vector')} rescaling the inputs or outputs of the "
                   "layers it changes, each merged weight being the base's with its rows or columns scaled (which "
                   "is why the difference spreads over many directions).")
    oft = (s.get("scope") or {}).get("oft") or {}
    if v == "derived" and oft.get("tensors"):
        # an OFT adapter's change is each weight's inputs rotated block by block: dense as a difference, but the
        # adapter adds only the rotations' parameters
        out.append(f"The adapter itself adds {count(oft['values'])} numbers to the base: {_rotations(oft)} "
                   f"of {plural(int(oft['tensors']), 'layer')}, each merged weight being the base's with its inputs "
                   "rotated block by block (which is why the difference spreads over many directions).")
    added = [t for t in data.get("tensors") or [] if t.get("status") == "added" and not is_tied_row(t)]
    if added and v != "unrelated":
        out.append(f"{plural(len(added), 'new tensor')} with {plural(sum(t.get('numel') or 0 for t in added), 'parameter')} "
                   f"{'was' if len(added) == 1 else 'were'} added that the base does not have.")
    out.append("These numbers describe the weights only: they do not show what data either model was trained on, "
               "how it behaves, or any legal status.")
    return out


#: the changes no rank is taken of with the rank analysis on (weightdiff.measure.compute: each one's note
#: says why, but a single row or column's)
UNRANKED_KINDS = ("changes holding NaN, infinity, values or differences past float32's range or float64 ones "
                  "too small for its normals, the base's bytes under another dtype label, experts fused in one tensor, "
                  "a single row or column, bytes with no float decoding, or a quantized side whose noise or "
                  "scales the change cannot be told from")


def unranked_why(rank: bool | None) -> str:
    """Why changed matrices have no rank analysis, as far as the JSON tells: ``rank`` is
    ``settings.rank`` (None when unknown)."""
    if rank is False:
        return "--no-rank"
    return ("none is taken of " if rank else "--no-rank, or none is taken of ") + UNRANKED_KINDS


def form_sentence(f: dict, rank: bool | None = None) -> str:
    """The sentence about the form of the change; a rank bracket reads as its upper end
    ("at most"), never as a value. ``rank``: the run's ``settings.rank`` (None: unknown), for why
    some changed matrices have no rank analysis."""
    hi = (f.get("max_numerical_rank_bounds") or [None, None])[-1]
    if f.get("kind") == "low_rank":
        n = hi if hi is not None else f.get("max_numerical_rank")
        e = (f.get("max_energy_rank_99_bounds") or [None, f.get("max_energy_rank_99")])[-1]
        if n == 0:
            return "No changed matrix has a change above its noise floor (numerical rank 0 in every one)."
        if e is not None and n is not None and e < n:
            # low-rank by its energy: quote that rank, not the numerical rank (a small matrix may be
            # of full numerical rank with 99% of the change in a few directions)
            return (f"The change is low-rank: 99% of its energy lies in at most {count(e)} directions per matrix "
                    f"(numerical rank at most {count(n)}).")
        return f"The change is low-rank: at most rank {count(n)} per matrix."
    if f.get("kind") == "mixed":
        sh = f.get("shares") or {}
        return (f"The change is mixed: low-rank matrices hold {share(sh.get('low_rank'))} of the changed matrices' "
                f"parameters, dense ones {share(sh.get('dense'))}.")
    if f.get("kind") == "undecided" and (f.get("shares") or {}).get("without_rank") \
            and (f.get("shares") or {}).get("without_rank") >= (f.get("shares") or {}).get("undecided", 0):
        n = int(f.get("matrices_without_rank") or 0)
        return (f"Whether the change is low-rank or dense is not measured: {count(n)} changed "
                f"{'matrix has' if n == 1 else 'matrices have'} no rank analysis ({unranked_why(rank)}), holding {share(f['shares']['without_rank'])} of the changed matrices' parameters; "
                "how many elements changed does not tell (a low-rank update changes every element).")
    if f.get("kind") == "undecided":
        sh = f.get("shares") or {}
        b = f.get("max_numerical_rank_bounds")
        where = f" (the largest numerical rank lies between {count(b[0])} and {count(b[1])})" if b else ""
        if f.get("matrices_compensated") and f.get("matrices_compensated") == f.get("matrices_undecided"):
            n = int(f["matrices_compensated"])
            return (f"Whether the change is low-rank or dense is not decided: {count(n)} changed "
                    f"{'matrix is' if n == 1 else 'matrices are'} quantized with error compensation (GPTQ), holding "
                    f"{share(sh.get('undecided'))} of the changed matrices' parameters; compensation spreads each "
                    "column's rounding error onto the columns after it, correlated and larger than the noise "
                    "modelled per element, so the directions counted above that noise may be the compensation's "
                    "and the energy left beside them is within what it can hold.")
        also = (" (for some, quantized with error compensation (GPTQ), the directions counted above the modelled "
                "noise may be the compensation's)") if f.get("matrices_compensated") else ""
        return (f"Whether the change is low-rank or dense is not decided: for matrices holding "
                f"{share(sh.get('undecided'))} of the changed matrices' parameters the rank is a bracket that "
                f"spans the low-rank rule{where}, or the change sits at the level of the noise (rounding or "
                f"quantization){also}: the few directions above it hold too little of the change to call it "
                "low-rank.")
    if f.get("kind") == "sparse":
        part, whole = f.get("changed_element_share"), f.get("differing_element_share")
        if part is not None and whole is not None and whole > part:
            # across a cast every element differs by rounding: say which count this is
            return (f"The change is sparse: {share(part)} of the elements of the changed tensors differ beyond "
                    f"rounding ({share(whole)} differ at all, the rest by the rounding of the dtype change).")
        return (f"The change is sparse: {share(part)} of the elements of the "
                "changed tensors differ.")
    if f.get("kind") == "vectors":
        return (f"Only vectors changed (norm weights or biases, {count(f.get('vectors_changed'))} of them; no "
                f"matrix): {share(f.get('changed_element_share'))} of their elements differ, and a vector has no "
                "directions to count.")
    if f.get("kind") == "dense" and f.get("max_energy_rank_99") is not None:
        return (f"The change is dense: up to {count(f['max_energy_rank_99'])} directions per matrix hold 99% "
                "of its energy.")
    if f.get("kind") == "dense" and f.get("max_energy_rank_99_bounds"):
        lo, hi = f["max_energy_rank_99_bounds"]
        return (f"The change is dense: up to {count(lo)}-{count(hi)} directions per matrix hold 99% of its energy "
                "(a bracket: the full spectrum of some matrices is bounded, not computed).")
    if f.get("kind") == "dense":
        return (f"The change is dense: {share(f.get('changed_element_share'))} of the elements of the "
                "changed tensors differ (no rank analysis).")
    return ""


def parts_text(labels: list[str]) -> str:
    """Component labels in words: ``embeddings, head``; blocks counted (``4 blocks (layers.0-layers.3)``).

    >>> parts_text(["embeddings", "layers.0", "layers.1", "head"])
    'embeddings, 2 blocks (layers.0 to layers.1), head'
    >>> parts_text(["layers.2"])
    'block layers.2'
    >>> parts_text(["layers.0 attn", "layers.1 attn"])
    '2 modules (layers.0 attn to layers.1 attn)'
    """
    blocks = [x for x in labels if x not in ("embeddings", "head")]
    out = ["embeddings"] if "embeddings" in labels else []
    # a block given per module kind (``layers.0 attn``) is a module, not a block
    noun = "module" if blocks and all(" " in x for x in blocks) else "part" if any(" " in x for x in blocks) \
        else "block"
    if len(blocks) == 1:
        out.append(f"{noun} {blocks[0]}")
    elif blocks:
        out.append(f"{count(len(blocks))} {noun}s ({blocks[0]} to {blocks[-1]})")
    if "head" in labels:
        out.append("head")
    return ", ".join(out) or "nothing"

