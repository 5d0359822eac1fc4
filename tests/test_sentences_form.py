"""render.sentences.form_sentence: the sentence quotes the rank that made the form, never a
misleading one."""

from __future__ import annotations

from weightdiff.render.sentences import form_sentence


def test_low_rank_by_energy_quotes_the_energy_rank_not_a_full_numerical_rank():
    # 256-wide matrices: 99% of the change in 4 directions, numerical rank 256 (quantization noise)
    f = {"kind": "low_rank", "max_numerical_rank": 256, "max_numerical_rank_bounds": None,
         "max_energy_rank_99": 4, "max_energy_rank_99_bounds": None}
    text = form_sentence(f)
    assert "at most 4 directions" in text and "numerical rank at most 256" in text
    assert "at most rank 256 per matrix" not in text


def test_low_rank_where_both_ranks_agree_reads_as_before():
    f = {"kind": "low_rank", "max_numerical_rank": 8, "max_numerical_rank_bounds": None,
         "max_energy_rank_99": 8, "max_energy_rank_99_bounds": None}
    assert form_sentence(f) == "The change is low-rank: at most rank 8 per matrix."
    f = {**f, "max_numerical_rank": None, "max_numerical_rank_bounds": [6, 8], "max_energy_rank_99": None,
         "max_energy_rank_99_bounds": [5, 8]}
    assert form_sentence(f) == "The change is low-rank: at most rank 8 per matrix."


def test_a_change_with_no_rank_above_the_noise_floor_is_not_called_rank_zero_low_rank():
    # one NaN in an otherwise identical matrix: non-finite pairs count as 0 in the delta
    f = {"kind": "low_rank", "max_numerical_rank": 0, "max_numerical_rank_bounds": None,
         "max_energy_rank_99": 0, "max_energy_rank_99_bounds": None}
    text = form_sentence(f)
    assert "noise floor" in text and "low-rank" not in text


def test_plain_language_with_no_form_word_is_a_sentence():
    """Only added tensors: no form, and "The change is writing it down takes ..." was printed."""
    from weightdiff.render.sentences import plain_language

    data = {"summary": {"verdict": "derived", "delta_params": 128, "delta_params_share": 0.01,
                        "form": {"kind": None}, "params_total": 12800},
            "tensors": [{"name": "score.weight", "status": "added", "numel": 128}]}
    text = " ".join(plain_language(data))
    assert "Writing the change down takes 128 numbers, 1.0% of the model." in text
    assert "The change is writing" not in text


def test_title_with_only_rounding_and_added_tensors_is_not_a_fine_tune():
    """A GGUF of an architecture without a name map: every weight paired within a cast's rounding, the
    biases and norms left unpaired: "DERIVED: a fine-tune" beside "0 of 36 tensors changed"."""
    from weightdiff.render.sentences import verdict_title

    s = {"verdict": "derived", "tensors_by_status": {"rounding": 14, "added": 22, "changed": 0}}
    assert verdict_title(s) == ("DERIVED: this base with tensors added or removed; its own weights changed only "
                                "within rounding or quantization.")
    s["tensors_by_status"]["changed"] = 1
    assert verdict_title(s) == "DERIVED: a fine-tune of this base."


def test_derived_by_float_tensors_beside_quantized_matrices_names_their_noise():
    # a norm-only fine-tune quantized: "the large matrices keep 1 - cosine = 1.1e-2 with the base" quoted
    # the matrices' quantization noise as if the matrices had moved
    from weightdiff.render.sentences import verdict_reason

    rows = [{"name": "model.layers.0.q.weight", "status": "quantized", "shape": [64, 64]},
            {"name": "model.layers.0.norm.weight", "status": "changed", "shape": [64]}]
    data = {"tensors": rows, "summary": {"verdict": "derived", "relatedness_cosine": 0.989,
                                         "scope": {"tensors_changed": 1, "tensors_total": 2},
                                         "tensors_by_status": {"quantized": 1, "changed": 1}}}
    text = verdict_reason(data)
    assert "differ only within their quantization noise floor (1 - cosine = 1.1e-2)" in text, text
    assert "keep 1 - cosine" not in text


def test_unrelated_attention_is_hedged_only_where_its_heads_were_not_examined():
    from weightdiff.render.sentences import _partial

    comps = [{"component": "layers.0 attn", "status": "unrelated"}, {"component": "layers.0 mlp", "status": "shared"}]
    hedge = "may also be the base's heads in another order"
    assert hedge in _partial({"summary": {"components": comps, "scope": {}}})
    assert hedge not in _partial({"summary": {"components": comps, "scope": {"heads_checked": ["layers.0 attn"]}}})
    assert hedge not in _partial({"summary": {"components": comps[1:], "scope": {}}})


def test_an_adapter_far_from_its_base_says_so_in_its_title():
    from weightdiff.render.sentences import verdict_title

    s = {"verdict": "derived", "flags": ["adapter", "far_from_base"], "relatedness_cosine": 0.4,
         "relatedness_rel_change": 0.9, "coverage": {}}
    t = verdict_title(s)
    assert t.startswith("DERIVED: this base with the adapter applied; the result is changed far more") and "9.0e-1" in t
    assert "far more" not in verdict_title({**s, "flags": ["adapter"]})
