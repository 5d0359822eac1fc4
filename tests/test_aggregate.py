"""Aggregation and verdict: names parsed per family, statuses, and hand-computed worked examples.

Every number asserted here is worked out by hand in the comments next to it, so a
change in a definition (relative_change, delta_params, compressed bytes, the verdict
rules) shows up as a failing test rather than a silently different report.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from weightdiff.judge.aggregate import aggregate as _aggregate
from weightdiff.judge.status import classify, delta_params_of
from weightdiff.judge.verdict import summarise
from weightdiff.pairing.names import parse_name
from weightdiff.render import sentences
from weightdiff.options import Thresholds
from weightdiff.records import RankRecord, TensorRecord


def aggregate(records, thresholds):
    """The aggregate, judge and explain steps, as the pipeline (weightdiff.comparison) runs them."""
    blocks, modules = _aggregate(records, thresholds)
    s = summarise(records, blocks, thresholds)
    data = {"summary": s.to_dict(), "tensors": [r.to_dict() for r in records]}
    s.verdict_reason = data["summary"]["verdict_reason"] = sentences.verdict_reason(data)
    s.headline = sentences.headline(data)
    return blocks, modules, s

THR = Thresholds()


def rec(name, status="unchanged", shape=(8, 8), nb=1.0, nd=0.0, cos=1.0, frac=None, beyond=None, rank=None,
        dtype_base="F32", dtype_tuned="F32", base_shape=None, numel_compared=None, **kw) -> TensorRecord:
    numel = math.prod(shape)
    if frac is None:
        frac = 0.0 if status == "unchanged" else 1.0
    if beyond is None:
        beyond = 1.0 if status == "changed" else 0.0
    r = TensorRecord(name, name if status != "added" else None, status, list(shape),
                     list(base_shape or shape) if status != "added" else None, dtype_base, dtype_tuned, numel,
                     numel if numel_compared is None else numel_compared, compared="float", **kw)
    if status not in ("added", "removed"):
        r.norm_base, r.norm_delta, r.cosine = nb, nd, cos
        r.frac_changed, r.frac_beyond_rounding = frac, beyond
        r.rel_change = nd / nb if nb else None
    if rank is not None:
        r99, nr = rank
        r.rank = RankRecord(1.0, 1.0, r99, r99, nr, 0.0, [], 1.0, shape_2d=(shape[0], math.prod(shape[1:])))
    return r


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name,expected", [
    # Llama / Mistral / Qwen
    ("model.layers.3.self_attn.q_proj.weight", ("layers.3", 3, "attn.q")),
    ("model.layers.3.self_attn.k_proj.weight", ("layers.3", 3, "attn.k")),
    ("model.layers.3.self_attn.v_proj.weight", ("layers.3", 3, "attn.v")),
    ("model.layers.3.self_attn.o_proj.weight", ("layers.3", 3, "attn.o")),
    ("model.layers.3.mlp.gate_proj.weight", ("layers.3", 3, "mlp.gate")),
    ("model.layers.3.mlp.up_proj.weight", ("layers.3", 3, "mlp.up")),
    ("model.layers.3.mlp.down_proj.weight", ("layers.3", 3, "mlp.down")),
    ("model.layers.3.input_layernorm.weight", ("layers.3", 3, "norm")),
    ("model.layers.3.self_attn.q_proj.bias", ("layers.3", 3, "bias")),
    ("model.layers.3.self_attn.q_norm.weight", ("layers.3", 3, "norm")),
    ("model.embed_tokens.weight", (None, None, "embed")),
    ("model.norm.weight", (None, None, "norm")),
    ("lm_head.weight", (None, None, "lm_head")),
    ("base_model.model.model.layers.0.self_attn.q_proj.weight", ("layers.0", 0, "attn.q")),
    # Mixtral experts and router
    ("model.layers.2.block_sparse_moe.experts.7.w1.weight", ("layers.2", 2, "mlp.gate")),
    ("model.layers.2.block_sparse_moe.experts.7.w2.weight", ("layers.2", 2, "mlp.down")),
    ("model.layers.2.block_sparse_moe.gate.weight", ("layers.2", 2, "mlp.router")),
    # GPT-2
    ("transformer.h.11.attn.c_attn.weight", ("h.11", 11, "attn.qkv")),
    ("transformer.h.11.attn.c_proj.weight", ("h.11", 11, "attn.o")),
    ("transformer.h.11.mlp.c_fc.weight", ("h.11", 11, "mlp.up")),
    ("transformer.h.11.mlp.c_proj.weight", ("h.11", 11, "mlp.down")),
    ("transformer.h.11.ln_1.bias", ("h.11", 11, "norm")),
    ("transformer.wte.weight", (None, None, "embed")),
    ("transformer.wpe.weight", (None, None, "embed.pos")),
    ("transformer.ln_f.weight", (None, None, "norm")),
    # BERT / RoBERTa
    ("bert.encoder.layer.5.attention.self.query.weight", ("encoder.layer.5", 5, "attn.q")),
    ("roberta.encoder.layer.5.attention.self.value.weight", ("encoder.layer.5", 5, "attn.v")),
    ("bert.encoder.layer.5.attention.output.dense.weight", ("encoder.layer.5", 5, "attn.o")),
    ("bert.encoder.layer.5.attention.output.LayerNorm.weight", ("encoder.layer.5", 5, "norm")),
    ("bert.encoder.layer.5.intermediate.dense.weight", ("encoder.layer.5", 5, "mlp.up")),
    ("bert.encoder.layer.5.output.dense.weight", ("encoder.layer.5", 5, "mlp.down")),
    ("bert.embeddings.word_embeddings.weight", (None, None, "embed")),
    ("bert.embeddings.token_type_embeddings.weight", (None, None, "embed.type")),
    ("bert.pooler.dense.weight", (None, None, "head")),
    ("classifier.weight", (None, None, "head")),
    ("cls.predictions.decoder.weight", (None, None, "lm_head")),
    # ViT (both the classic and the current transformers layout)
    ("vit.encoder.layer.0.attention.attention.query.weight", ("encoder.layer.0", 0, "attn.q")),
    ("vit.encoder.layer.0.layernorm_before.weight", ("encoder.layer.0", 0, "norm")),
    ("vit.embeddings.patch_embeddings.projection.weight", (None, None, "embed.patch")),
    ("vit.embeddings.cls_token", (None, None, "embed.token")),
    ("layers.0.attention.q_proj.weight", ("layers.0", 0, "attn.q")),
    # T5
    ("encoder.block.0.layer.0.SelfAttention.q.weight", ("encoder.block.0", 0, "attn.q")),
    ("decoder.block.2.layer.1.EncDecAttention.o.weight", ("decoder.block.2", 2, "xattn.o")),
    ("decoder.block.2.layer.2.DenseReluDense.wi_0.weight", ("decoder.block.2", 2, "mlp.gate")),
    ("decoder.block.2.layer.2.DenseReluDense.wo.weight", ("decoder.block.2", 2, "mlp.down")),
    ("shared.weight", (None, None, "embed")),
    # vision-encoder-decoder
    ("encoder.encoder.layer.1.attention.attention.key.weight", ("encoder.layer.1", 1, "attn.k")),
    ("decoder.transformer.h.1.crossattention.q_attn.weight", ("decoder.h.1", 1, "xattn.q")),
    ("decoder.transformer.h.1.crossattention.c_proj.weight", ("decoder.h.1", 1, "xattn.o")),
    ("decoder.transformer.h.1.ln_cross_attn.weight", ("decoder.h.1", 1, "norm")),
    # generic fallback and odd names
    ("backbone.stages.2.mixer.in_proj.weight", ("stages.2", 2, "in_proj")),
    ("0.weight", ("0", 0, "other")),
    ("", (None, None, "other")),
    ("a..b", (None, None, "b")),
    ("x.\u202e.99999999999999999999.w", (None, None, "w")),
])
def test_parse_name_per_family(name, expected):
    assert parse_name(name) == expected


# ---------------------------------------------------------------- classify

@pytest.mark.parametrize("stats,dt,expected", [
    ({"count": 10, "n_changed": 0, "n_beyond": 0}, ("F32", "F32"), "unchanged"),
    ({"count": 10, "n_changed": 10, "n_beyond": 0}, ("F32", "BF16"), "rounding"),
    ({"count": 10, "n_changed": 3, "n_beyond": 1}, ("F32", "BF16"), "changed"),
    ({"frac_changed": 0.0, "frac_beyond_rounding": 0.0}, ("BF16", "BF16"), "unchanged"),
    ({"frac_changed": 0.2, "frac_beyond_rounding": 0.2}, ("BF16", "BF16"), "changed"),
    ({"frac_changed": 0.2, "frac_beyond_rounding": 0.0}, ("I64", "I64"), "changed"),         # ints store exactly
    ({"frac_changed": 0.1, "frac_beyond_rounding": 0.0, "nonfinite_base": 0, "nonfinite_tuned": 2},
     ("F32", "BF16"), "changed"),                                                           # a new NaN
    ({"frac_changed": None, "frac_beyond_rounding": None}, ("F32", "F32"), "changed"),       # unknown
    ({"count": 0, "n_changed": 0, "n_beyond": 0}, ("F32", "F32"), "unchanged"),             # empty tensor
])
def test_classify(stats, dt, expected):
    assert classify(stats, *dt, THR) == expected


def test_classify_rounding_threshold():
    stats = {"frac_changed": 0.5, "frac_beyond_rounding": 0.001}
    assert classify(stats, "F32", "BF16", THR) == "changed"
    assert classify(stats, "F32", "BF16", Thresholds(rounding_frac=0.01)) == "rounding"


# ---------------------------------------------------------------- a worked example: rank-1 change in one block

def _worked_example():
    s8 = math.sqrt(8)
    return [
        rec("model.embed_tokens.weight", shape=(10, 8), nb=3.0),
        rec("model.layers.0.self_attn.q_proj.weight", nb=2.0),
        rec("model.layers.0.input_layernorm.weight", shape=(8,), nb=s8),
        rec("model.layers.1.self_attn.q_proj.weight", "changed", nb=2.0, nd=0.3, cos=0.99, rank=(1, 1)),
        rec("model.layers.1.self_attn.v_proj.weight", "changed", nb=2.0, nd=0.4, cos=0.98, rank=(1, 1)),
        rec("model.layers.1.input_layernorm.weight", shape=(8,), nb=s8),
        rec("model.norm.weight", shape=(8,), nb=s8),
        rec("lm_head.weight", shape=(10, 8), nb=3.0),
    ]


def test_bitwise_unchanged_counts_numbers_not_tensors():
    """A change that touched 8 of each changed matrix's 64 numbers (a DARE or TIES merge, reserved token rows
    trained) leaves 56 of them bit for bit the base's: 248 + 2 * 56 = 360 of 376 (95.7%), not the 248 (66.0%)
    of the tensors left entirely unchanged (a DARE merge that kept 90.1% read "0.16% ... bit for bit the same")."""
    records = [r if r.status != "changed" else rec(r.name, "changed", nb=2.0, nd=0.3, cos=0.99, frac=0.125,
                                                   rank=(1, 1)) for r in _worked_example()]
    _, _, s = aggregate(records, THR)
    assert "95.7% of parameters are bitwise unchanged (66.0% in tensors left entirely unchanged)." in s.headline
    data = {"summary": s.to_dict(), "tensors": [r.to_dict() for r in records], "tuned": {"path": "t"},
            "base": [{"path": "b"}]}
    assert sentences.unchanged_elements(data) == 360
    text = " ".join(sentences.plain_language(data))
    assert "Of the 376 parameters of t, 95.7% are bit for bit the same as in b, 66.0% in tensors left" in text
    from weightdiff.render.memo import key_figures
    assert key_figures(data)[0][1] == "95.7% of 376 (66.0% in tensors left entirely unchanged)"


def test_worked_example_low_rank_derived():
    blocks, modules, s = aggregate(_worked_example(), THR)
    # params: 80 + 64 + 8 + 64 + 64 + 8 + 8 + 80 = 376; changed 128
    assert s.params_total == 376
    assert s.params_by_status == {"unchanged": 248, "rounding": 0, "quantized": 0, "changed": 128, "resized": 0, "added": 0,
                                  "removed": 0}
    # sum nb^2 = 9 + 4 + 8 + 4 + 4 + 8 + 8 + 9 = 54; sum nd^2 = 0.09 + 0.16 = 0.25
    assert s.relative_change == pytest.approx(0.5 / math.sqrt(54), rel=1e-12)
    # each changed 8x8 matrix with energy_rank_99 = 1: min(64, 1 * (8 + 8)) = 16
    assert s.delta_params == 32 and s.delta_params_share == pytest.approx(32 / 376)
    # no matrix reaches 4,096 elements, so every matrix counts, weighted by elements:
    # (80 + 64 + 80 + 64 * 0.99 + 64 * 0.98) / 352
    assert s.relatedness_cosine == pytest.approx((224 + 64 * 0.99 + 64 * 0.98) / 352, rel=1e-12)
    assert s.relatedness_rel_change == pytest.approx(0.5 / math.sqrt(9 + 4 + 4 + 4 + 9), rel=1e-12)
    assert (s.verdict, s.blocks_total, s.blocks_changed) == ("derived", 2, 1)
    assert s.form["kind"] == "low_rank" and s.form["max_numerical_rank"] == 1
    assert s.form["matrices_changed"] == 2 and s.form["vectors_changed"] == 0
    # bytes: model 376 * 4 = 1504; low-rank form 32 * 4 = 128; sign form 2 * (64 / 8 + one F32 scale) = 24
    assert s.compressed_bytes["model_bytes"] == 1504
    assert s.compressed_bytes["low_rank_bytes"] == 128 and s.compressed_bytes["sign_bytes"] == 24
    assert s.compressed_bytes["sign_share"] == pytest.approx(24 / 1504)
    assert s.scope["tensors_changed"] == 2 and s.scope["tensors_total"] == 8
    assert s.scope["changed_blocks"] == ["layers.1"] and s.scope["modules_changed"] == ["attn.q", "attn.v"]
    assert s.flags == []
    assert [b.block for b in blocks] == ["embeddings", "layers.0", "layers.1", "head"]
    b1 = blocks[2]
    assert (b1.params, b1.params_changed, b1.tensors, b1.tensors_changed, b1.delta_params) == (136, 128, 3, 2, 32)
    assert b1.rel_change == pytest.approx(0.5 / math.sqrt(16)) and b1.max_numerical_rank == 1
    assert b1.modules["attn.q"] == pytest.approx(0.15) and b1.modules["norm"] == 0.0
    assert modules["attn.q"]["params"] == 128 and modules["attn.q"]["params_changed"] == 64
    assert modules["attn.q"]["rel_change"] == pytest.approx(0.3 / math.sqrt(8))
    assert "66.0% of parameters are bitwise unchanged." in s.headline
    assert "1 of 2 blocks changed." in s.headline
    assert "The change is low-rank: at most rank 1 per matrix." in s.headline
    assert "Writing the change down takes 32 parameters (8.5% of the model)." in s.headline
    assert s.verdict_reason.startswith("Derived from this base: 2 of 8 tensors changed, in 1 of 2 blocks")


def test_records_get_block_and_module():
    records = _worked_example()
    aggregate(records, THR)
    assert [(r.block, r.module) for r in records][:4] == [
        (None, "embed"), ("layers.0", "attn.q"), ("layers.0", "norm"), ("layers.1", "attn.q")]


# ---------------------------------------------------------------- each verdict and form

def test_identical():
    _, _, s = aggregate([rec("a.weight"), rec("h.0.w", shape=(4,))], THR)
    assert (s.verdict, s.relative_change, s.delta_params, s.form["kind"]) == ("identical", 0.0, 0, None)
    assert s.verdict_reason == "All 2 tensors are bitwise identical to the base."
    assert "100% of parameters are bitwise unchanged." in s.headline


def test_identical_values_in_another_dtype_are_not_called_bitwise_equal():
    """An exact upcast (BF16 stored as F32) holds the same values in other bits."""
    _, _, s = aggregate([rec("a.weight", dtype_base="BF16", dtype_tuned="F32"), rec("h.0.w", shape=(4,))], THR)
    assert s.verdict == "identical" and "dtype_changed" in s.flags
    assert s.verdict_reason == ("All 2 tensors hold exactly the base's values; 1 is stored in another dtype "
                                "(BF16 -> F32), converted without loss.")
    assert "bitwise" not in sentences.verdict_title(s.to_dict())


def test_same_dtype_bit_differences_are_not_called_a_dtype_cast():
    """Signed zeros (or NaN payloads) differ in bits, not in value, and no cast took place."""
    _, _, s = aggregate([rec("a.weight", "rounding", frac=0.1, beyond=0.0), rec("h.0.w", shape=(4,))], THR)
    assert s.verdict == "cast_only" and "dtype_changed" not in s.flags
    assert "F32 -> F32" not in s.verdict_reason and "keeps its dtype" in s.verdict_reason
    assert "no dtype changed" in sentences.verdict_title(s.to_dict())


def test_a_model_that_only_gained_tensors_is_not_called_a_fine_tune_with_changed_tensors():
    recs = [rec("model.layers.0.w"), rec("model.layers.1.w", "added")]
    _, _, s = aggregate(recs, THR)
    assert s.verdict == "derived"
    assert "0 of 2 tensors changed and 1 added" in s.verdict_reason
    assert "fine-tune" not in sentences.verdict_title(s.to_dict())
    _, _, s = aggregate([rec("model.layers.0.w", "changed", nd=0.1), rec("model.layers.1.w", "added")], THR)
    assert "1 of 2 tensors changed and 1 added" in s.verdict_reason
    # a block the base does not have is named in the title (LLaMA-Pro, depth up-scaling)
    assert sentences.verdict_title(s.to_dict()) == "DERIVED: a fine-tune of this base, with 1 block more than the base's 1."


def test_cast_only():
    recs = [rec("a.weight", "rounding", nd=1e-3, dtype_tuned="BF16"), rec("b", "unchanged", shape=(4,))]
    _, _, s = aggregate(recs, THR)
    assert s.verdict == "cast_only" and s.delta_params == 0 and s.params_by_status["rounding"] == 64
    assert "(F32 -> BF16)" in s.verdict_reason and "dtype_changed" in s.flags
    assert s.compressed_bytes["low_rank_bytes"] == 0


def test_unrelated_independent_random_models_and_norms_left_out():
    """Two independent inits: every large matrix has cosine ~ 0 and relative change ~ sqrt(2);
    norm gains of ones (cosine 1) would make them look alike if they were counted."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(4):
        for m in ("q_proj", "up_proj"):
            b, t = rng.normal(0, 0.02, (64, 128)), rng.normal(0, 0.02, (64, 128))
            nb, nt, nd = np.linalg.norm(b), np.linalg.norm(t), np.linalg.norm(t - b)
            recs.append(rec(f"model.layers.{i}.x.{m}.weight", "changed", shape=(64, 128), nb=nb, nd=nd,
                            cos=float((b * t).sum() / nb / nt), rank=(60, 64)))
        recs.append(rec(f"model.layers.{i}.input_layernorm.weight", shape=(4096,), nb=64.0))
        recs.append(rec(f"model.layers.{i}.wide_norm.weight", shape=(1, 16384), nb=128.0))   # a 2-D gain
        recs.append(rec(f"model.layers.{i}.x.q_proj.bias", "changed", shape=(4096,), nb=0.1, nd=0.14, cos=0.0))
    _, _, s = aggregate(recs, THR)
    assert s.verdict == "unrelated"
    assert abs(s.relatedness_cosine) < 0.02
    assert s.relatedness_rel_change == pytest.approx(math.sqrt(2), rel=0.02)
    # the model-level relative change counts every paired tensor, gains included, so it is smaller
    assert s.relative_change < s.relatedness_rel_change
    assert s.form["kind"] is None and "near-orthogonal" in s.verdict_reason


def test_nothing_in_common_or_nothing_compared_is_inconclusive():
    # no counterpart is no evidence either way: not `unrelated` (issue 11, rule 1)
    _, _, s = aggregate([rec("new", "added"), rec("old", "removed")], THR)
    assert s.verdict == "inconclusive" and s.verdict_reason.startswith("Only 0% of the base's large-matrix")
    assert s.coverage["base"]["share"] == 0 and s.coverage["tuned"]["share"] == 0
    _, _, s = aggregate([], THR)
    assert s.verdict == "inconclusive" and s.verdict_reason == "No tensors were compared."
    assert s.params_total == 0 and s.delta_params_share is None and s.relative_change is None


def test_sparse_and_dense_forms():
    sparse = [rec("h.0.w", "changed", shape=(100, 100), nd=0.1, frac=0.01, beyond=0.01, rank=(60, 80)),
              rec("h.1.w", "unchanged", shape=(100, 100))]
    _, _, s = aggregate(sparse, THR)
    assert s.form["kind"] == "sparse" and s.form["changed_element_share"] == pytest.approx(0.01)
    assert "The change is sparse: 1.0% of the elements of the changed tensors differ." in s.headline
    dense = [rec("h.0.w", "changed", shape=(100, 100), nd=0.1, rank=(60, 80)), rec("h.0.b", "changed", shape=(100,))]
    _, _, s = aggregate(dense, THR)
    assert s.form["kind"] == "dense" and s.form["max_energy_rank_99"] == 60 and s.form["vectors_changed"] == 1
    assert "The change is dense: up to 60 directions per matrix hold 99% of its energy." in s.headline
    # a bracketed energy rank (a partial spectrum) is never the maximum: the bracket is
    bracketed = [rec("h.0.w", "changed", shape=(100, 100), nd=0.1, rank=(60, 80)),
                 rec("h.1.w", "changed", shape=(100, 100), nd=0.1, rank=(40, 80))]
    bracketed[1].rank.bounds = {"energy_rank_99": [40, 90]}
    _, _, s = aggregate(bracketed, THR)
    assert s.form["max_energy_rank_99"] is None and s.form["max_energy_rank_99_bounds"] == [60, 90]
    assert any("The change is dense: up to 60-90 directions per matrix hold 99% of its energy (a bracket" in h
               for h in s.headline)
    # ... and the parameters it takes to write the change down are an upper bound, said so
    # (100 x 100: min(m n, r99 (m + n)) = 10,000 for r99 = 60 or 90, 8,000 for 40)
    assert s.delta_params == 10_000 + 10_000 and s.delta_params_lower == 10_000 + 40 * 200
    assert any("takes at most 20,000 parameters" in h and "at least 18,000" in h for h in s.headline)
    from weightdiff.render.formats import delta_params_count, delta_params_text
    assert delta_params_text(s.to_dict()).startswith("≤ 20,000 (")
    blocks, modules, _ = aggregate(bracketed, THR)
    assert [b.delta_params_lower for b in blocks] == [None, 40 * 200]      # h.0 exact, h.1 a bracket
    assert delta_params_count(blocks[1].to_dict()) == "≤ 10,000" and delta_params_count(blocks[0].to_dict()) == "10,000"
    bracketed[1].rank.bounds = {"energy_rank_99": [40, 55]}      # cannot exceed the exact 60: exact again
    _, _, s = aggregate(bracketed, THR)
    assert s.form["max_energy_rank_99"] == 60 and s.form["max_energy_rank_99_bounds"] is None
    # without rank records there is no spectral evidence: undecided (it read dense by elements), said so
    _, _, s = aggregate([rec("h.0.w", "changed", shape=(100, 100), nd=0.1)], THR)
    assert s.form["kind"] == "undecided" and s.form["basis"] == "elements"
    assert s.delta_params == 100 * 100


def test_low_rank_needs_every_ranked_matrix_low_and_numerical_rank_counts():
    # energy_rank_99 inflated by storage noise (90) but 5 singular values above the noise floor
    noisy = rec("h.0.w", "changed", shape=(128, 128), nd=0.1, rank=(90, 5))
    _, _, s = aggregate([noisy], THR)
    assert s.form["kind"] == "low_rank" and s.form["max_numerical_rank"] == 5
    # 90 * 256 > 128 * 128: delta_params is the full matrix (the definition uses energy_rank_99)
    assert s.delta_params == 128 * 128
    _, _, s = aggregate([noisy, rec("h.1.w", "changed", shape=(128, 128), nd=0.1, rank=(90, 90))], THR)
    # one low-rank and one dense matrix of the same size: mixed, half and half (rule 8)
    assert s.form["kind"] == "mixed" and s.form["matrices_low_rank"] == 1
    assert s.form["shares"] == {"low_rank": 0.5, "dense": 0.5, "undecided": 0.0, "without_rank": 0.0}
    # a LoRA over big matrices beside a small fully trained head: mixed (it read dense, the rule
    # needing 5% on both sides), with the sentence giving both shares
    head = rec("score.weight", "changed", shape=(4, 128), nd=0.1, rank=(4, 4))
    lora = [rec(f"h.{i}.w", "changed", shape=(128, 128), nd=0.1, rank=(90, 5)) for i in range(8)]
    _, _, s = aggregate(lora + [head], THR)
    assert s.form["kind"] == "mixed" and s.form["shares"]["dense"] < 0.05
    assert "The change is mixed" in sentences.form_sentence(s.form)


# ---------------------------------------------------------------- structure: added, removed, resized, tied

def test_added_head_is_derived_with_added_params_in_delta():
    recs = [rec("model.layers.0.w"), rec("score.weight", "added", shape=(3, 8))]
    blocks, _, s = aggregate(recs, THR)
    assert s.verdict == "derived" and s.flags == ["added_tensors"]
    assert s.params_by_status["added"] == 24 and s.params_total == 88
    assert s.delta_params == 24 and s.scope["delta_params_added"] == 24 and s.scope["delta_params_changed"] == 0
    assert s.form["kind"] is None and s.blocks_changed == 0
    assert [(b.block, b.params_changed) for b in blocks] == [("layers.0", 0), ("head", 24)]
    assert "1 tensor was added (24 parameters)." in s.headline


def test_removed_only_is_derived_not_identical():
    _, _, s = aggregate([rec("a.w"), rec("gone.w", "removed", shape=(2, 2))], THR)
    assert s.verdict == "derived" and s.flags == ["removed_tensors"]
    assert s.params_by_status["removed"] == 4 and s.params_total == 68 and s.delta_params == 0
    assert s.scope["tensors_total"] == 1
    # the shares of "the tuned model" leave the removed base tensor out (a pruned model read "94.1%
    # bitwise unchanged" of 68 parameters it does not have)
    assert "100% of parameters are bitwise unchanged." in s.headline
    from weightdiff.render.sentences import plain_language
    text = " ".join(plain_language({"summary": s.to_dict() if hasattr(s, "to_dict") else vars(s),
                                    "tuned": {"path": "pruned"}, "base": [{"path": "base"}]}))
    assert "Of the 64 parameters of" in text and "100% are bit for bit the same" in text


def test_resized_vocabulary_accounting():
    grown = rec("model.embed_tokens.weight", "resized", shape=(150, 8), base_shape=(100, 8), numel_compared=800,
                nb=3.0, nd=0.0, frac=0.0, beyond=0.0)
    shrunk = rec("lm_head.weight", "resized", shape=(90, 8), base_shape=(100, 8), numel_compared=720,
                 nb=3.0, nd=0.3, frac=1.0, beyond=1.0)
    blocks, _, s = aggregate([grown, shrunk, rec("model.layers.0.w")], THR)
    # grown: 800 compared, 400 new (added); shrunk: 720 compared, 80 base rows gone (removed)
    assert s.params_by_status == {"unchanged": 64, "rounding": 0, "quantized": 0, "changed": 0, "resized": 1520, "added": 400,
                                  "removed": 80}
    assert s.params_total == 64 + 1520 + 400 + 80
    # delta: 400 new rows + the shrunk head's 90 x 8 overlap changed without a rank record: 720
    assert s.delta_params == 1120
    assert "resized_embeddings" in s.flags and s.verdict == "derived"
    assert "The vocabulary was resized from 100 to 150 rows." in s.headline
    # the grown table's shared rows are bitwise the base's: the reason says so (it counted it "changed")
    assert "(1 of them only resized: rows added or removed, the shared rows bitwise unchanged)" in s.verdict_reason
    assert s.scope["tensors_changed"] == 2


def test_mismatched_shape_costs_the_whole_tensor():
    m = rec("model.layers.0.mlp.up_proj.weight", "resized", shape=(32, 8), base_shape=(16, 8))
    m.compared, m.norm_base, m.norm_delta, m.cosine = "none", None, None, None
    _, _, s = aggregate([m, rec("model.layers.0.w")], THR)
    assert s.flags == ["shape_mismatch"] and s.delta_params == 256
    assert s.params_by_status["resized"] == 256
    # never compared: no measured change, so its block is counted apart, not as changed
    assert (s.blocks_changed, s.scope["blocks_reshaped"], s.scope["tensors_changed"]) == (0, 1, 0)


def test_tied_head_row_is_not_counted_twice():
    emb = rec("model.embed_tokens.weight", shape=(10, 8), nb=3.0)
    tied = rec("lm_head.weight", "changed", shape=(10, 8), nb=3.0, nd=1.0, tied=True)
    _, _, s = aggregate([emb, tied], THR)
    assert s.params_total == 80 and s.tensors_by_status["changed"] == 0 and "tied_lm_head" in s.flags
    # the tuned model's effective head (its embedding) differs from the base head: not identical (rule 4)
    assert s.verdict == "derived"
    same = rec("lm_head.weight", "unchanged", shape=(10, 8), nb=3.0, tied=True)
    assert aggregate([emb, same], THR)[2].verdict == "identical"
    legacy = rec("lm_head.weight", shape=(10, 8), nb=3.0, note="tied: the tuned model has no `lm_head.weight`")
    assert aggregate([emb, legacy], THR)[2].params_total == 80


def test_delta_params_per_record():
    conv = rec("stem.conv.weight", "changed", shape=(8, 3, 2, 2))
    assert delta_params_of(conv, THR) == (96, 0)                   # no rank: m x n = 8 x 12
    conv.rank = RankRecord(1.0, 1.0, 2, 2, 2, 0.0, [], 1.0, shape_2d=(8, 12))
    assert delta_params_of(conv, THR) == (40, 0)                   # min(96, 2 * (8 + 12))
    assert delta_params_of(rec("v", "changed", shape=(7,)), THR) == (7, 0)
    assert delta_params_of(rec("r", "rounding"), THR) == (0, 0)
    assert delta_params_of(rec("g", "removed"), THR) == (0, 0)


def test_a_sparse_change_costs_two_numbers_per_changed_element_at_most():
    """1% of a 100 x 100 matrix changed, at full numerical rank: writing it down takes a
    position and a value per changed element (200), not the low-rank form's m n; a dense or a
    low-rank change is not affected, nor a vector whose every element changed."""
    sparse = rec("w", "changed", shape=(100, 100), frac=0.01, beyond=0.01, rank=(100, 100))
    assert delta_params_of(sparse, THR) == (200, 0)
    assert delta_params_of(rec("w", "changed", shape=(100, 100), rank=(100, 100)), THR) == (10_000, 0)
    assert delta_params_of(rec("w", "changed", shape=(100, 100), frac=0.3, rank=(2, 2)), THR) == (400, 0)
    assert delta_params_of(rec("v", "changed", shape=(10,), frac=0.1), THR) == (2, 0)
    assert delta_params_of(rec("v", "changed", shape=(10,), frac=float("nan")), THR) == (10, 0)
    _, _, s = aggregate([sparse, rec("u", shape=(100, 100))], THR)
    assert s.delta_params == 200 and s.form["kind"] == "sparse"


def test_flags_composite_adapter_nonfinite_bytes_partial():
    a = rec("encoder.layer.0.w", base_index=0)
    b = rec("decoder.h.0.w", "changed", base_index=1, nonfinite=3, rank=(2, 2))
    b.norm_delta = 0.5                 # a real change beside its non-finite values
    b.rank.exact = False
    c = rec("decoder.h.0.q", "changed", base_index=1)
    c.compared = "factors"
    d = rec("decoder.h.0.i", "changed", base_index=1, shape=(4,), dtype_base="I64", dtype_tuned="I64")
    d.compared = "bytes"
    _, _, s = aggregate([a, b, c, d], THR)
    assert s.flags == ["composite_base", "adapter", "nonfinite", "bytes_compared", "partial_spectrum"]
    assert "The tuned model is assembled from 2 bases." in s.headline
    assert "3 non-finite values (NaN or Inf) were found." in s.headline


# ---------------------------------------------------------------- order and determinism

def test_block_order_is_model_order_and_deterministic():
    names = ["encoder.encoder.layer.10.w", "encoder.encoder.layer.2.w", "encoder.embeddings.cls_token",
             "decoder.transformer.h.1.w", "decoder.transformer.h.0.w", "decoder.lm_head.weight",
             "encoder.layernorm.weight", "decoder.transformer.wte.weight"]
    blocks, modules, s = aggregate([rec(n) for n in names], THR)
    assert [b.block for b in blocks] == ["embeddings", "encoder.layer.2", "encoder.layer.10", "decoder.h.0",
                                         "decoder.h.1", "head"]
    assert s.blocks_total == 4
    again = aggregate([rec(n) for n in names], THR)
    assert [b.to_dict() for b in again[0]] == [b.to_dict() for b in blocks]
    assert again[1] == modules and again[2].to_dict() == s.to_dict()
    shuffled = [rec(n) for n in names]
    random.Random(1).shuffle(shuffled)
    assert aggregate(shuffled, THR)[2].params_total == s.params_total


def test_partial_spectrum_uses_the_upper_bound_for_cost_and_form():
    """With only the top k known, energy_rank_99 is a lower bound: claims use the upper end."""
    from weightdiff.records import RankRecord
    from weightdiff.judge.status import rank_upper

    r = rec("model.layers.0.self_attn.q_proj.weight", "changed", shape=(1000, 1000))
    r.rank = RankRecord(stable_rank=30.0, effective_rank=400.0, energy_rank_90=70, energy_rank_99=64,
                        numerical_rank=64, noise_floor=1e-4, spectrum=[1.0] * 64, energy_captured=0.9,
                        method="randomized", shape_2d=(1000, 1000), exact=False)
    r.rank.bounds = {"energy_rank_99": [64, 700], "numerical_rank": [64, 900]}
    assert rank_upper(r, "energy_rank_99") == 700
    _, _, s = aggregate([r], THR)
    assert s.delta_params == min(1000 * 1000, 700 * 2000)
    # rank 64 is low-rank for a 1000-wide matrix (cap 100), 700 is not: the form is not decided
    assert s.form["kind"] == "undecided" and s.form["matrices_undecided"] == 1
    assert s.form["shares"] == {"low_rank": 0.0, "dense": 0.0, "undecided": 1.0, "without_rank": 0.0}
    assert "is not decided" in sentences.form_sentence(s.form)
    r.rank.numerical_rank, r.rank.energy_rank_99 = 128, 128           # dense even at the lower end
    r.rank.bounds = {"energy_rank_99": [128, 700], "numerical_rank": [128, 900]}
    _, _, s = aggregate([r], THR)
    assert s.form["kind"] == "dense" and s.form["matrices_undecided"] == 0
    # a small undecided matrix beside a certainly dense one of 20x its size: dense
    big = rec("model.layers.1.mlp.up_proj.weight", "changed", shape=(4000, 5000), nd=0.1, rank=(3000, 3000))
    r.rank.numerical_rank, r.rank.energy_rank_99 = 64, 64
    r.rank.bounds = {"energy_rank_99": [64, 700], "numerical_rank": [64, 900]}
    _, _, s = aggregate([r, big], THR)
    assert s.form["kind"] == "dense" and s.form["matrices_undecided"] == 1


def test_headline_counts_unchanged_shared_rows_of_a_resized_vocabulary():
    emb = rec("model.embed_tokens.weight", "resized", shape=(12, 8), base_shape=(10, 8), frac=0.0,
              numel_compared=80)
    recs = [rec("model.layers.0.w", shape=(10, 10)), emb]
    _, _, s = aggregate(recs, THR)
    # 100 unchanged of 196; with the 80 bitwise-equal shared rows, 180 of 196
    assert ("51.0% of parameters are bitwise unchanged, 91.8% counting the shared rows of resized tensors, "
            "which are bitwise unchanged too.") in s.headline


def test_delta_params_share_is_of_the_tuned_model():
    # a removed base layer is not part of the tuned model: "8,192 numbers, 1.3% of the model" was quoted
    # beside the model's own size, which gives 1.8%
    recs = [rec("model.layers.0.w", "changed", shape=(8, 8), nd=0.5, rank=(1, 1)),
            rec("model.layers.1.w", shape=(8, 8)), rec("model.layers.2.w", "removed", shape=(8, 8))]
    _, _, s = aggregate(recs, THR)
    assert s.params_total == 192 and s.delta_params == 16
    assert s.delta_params_share == 16 / 128


def test_a_change_to_vectors_only_has_no_directions():
    """Only norm gains changed (LayerNorm tuning; BitFit's biases alike): no matrix changed, so no rank was
    measured, yet the form read "dense" and the memo "spread over many directions"."""
    records = [r if r.name != "model.layers.1.input_layernorm.weight" else
               rec(r.name, "changed", shape=(8,), nb=math.sqrt(8), nd=0.1, cos=0.999)
               for r in _worked_example() if r.status != "changed"]
    _, _, s = aggregate(records, THR)
    assert s.verdict == "derived" and s.form["kind"] == "vectors" and s.form["vectors_changed"] == 1
    data = {"summary": s.to_dict(), "tensors": [r.to_dict() for r in records], "tuned": {"path": "t"},
            "base": [{"path": "b"}]}
    words = " ".join(sentences.plain_language(data)) + " ".join(s.headline)
    assert "directions" not in words.replace("no directions to count", "")
    assert "Only vectors changed (norm weights or biases, 1 of them; no matrix)" in " ".join(s.headline)


def test_plain_words_give_the_changed_matrices_own_figure(tmp_path):
    """One block of two trained: pooled over every large matrix the change reads "about the same as the
    rounding a cast to bfloat16 would cause", while the trained matrices moved several times that rounding."""
    import weightdiff
    from conftest import write_checkpoint
    from models import llama

    base = llama(np.random.default_rng(8), layers=4)
    rng = np.random.default_rng(9)
    tuned = {k: (v + rng.normal(0, 4e-3 * float(np.std(v)), v.shape)).astype(np.float32)
             if ".layers.1." in k and v.ndim == 2 else v for k, v in base.items()}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", base, dtype="BF16"),
                           write_checkpoint(tmp_path / "t", tuned, dtype="BF16"), rank=False)
    words = " ".join(sentences.plain_language(json.loads(r.to_json())))
    assert r.summary.verdict == "derived" and r.summary.blocks_changed == 1
    changed = [t for t in r.tensors if t.status == "changed"]
    assert f"the {len(changed)} matrices that changed moved by" in words and "the others not beyond rounding" in words


def test_the_parameter_table_shares_are_of_the_tuned_model():
    """A pruned model (a base tensor removed): the table's shares read "unchanged 79.5%" (over the base's
    parameters too) beside the headline's 100%; they are of the tuned model now, the removed row has none."""
    from weightdiff.render.terminal import render_text

    records = [r for r in _worked_example() if r.status != "changed"]
    records.append(rec("model.layers.1.mlp.up_proj.weight", "removed", shape=(8, 8)))
    _, _, s = aggregate(records, THR)
    data = {"summary": s.to_dict(), "tensors": [r.to_dict() for r in records], "tuned": {"path": "t"},
            "base": [{"path": "b"}], "tool": {"version": "0"}}
    table = render_text(data)
    row = next(line for line in table.splitlines() if line.strip().startswith("unchanged"))
    assert "100%" in row and "100% of parameters are bitwise unchanged." in s.headline
    removed = next(line for line in table.splitlines() if line.strip().startswith("removed"))
    assert "%" not in removed


def test_a_merged_low_rank_update_without_rank_analysis_is_not_called_dense(tmp_path):
    """--no-rank on a merged rank-4 update read "form dense" (every element changes, and element counts were
    the only basis): how many directions changed is not measured, so the form is undecided and says why."""
    import weightdiff
    from conftest import write_checkpoint
    from weightdiff.render.sentences import form_sentence
    from weightdiff.render.terminal import render_text

    rng = np.random.default_rng(3)
    base = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(0, 1, (128, 64)).astype(np.float32) for i in range(3)}
    tuned = {k: (v + 0.05 * rng.normal(0, 1, (128, 4)) @ rng.normal(0, 1, (4, 64))).astype(np.float32)
             for k, v in base.items()}
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)
    ranked = weightdiff.compare(b, t)
    assert ranked.summary.form["kind"] == "low_rank"
    r = weightdiff.compare(b, t, rank=False)
    f = r.summary.form
    assert f["kind"] == "undecided" and f["basis"] == "elements" and f["matrices_without_rank"] == 3
    assert f["shares"] == {"low_rank": 0.0, "dense": 0.0, "undecided": 1.0, "without_rank": 1.0}
    assert "not measured: 3 changed matrices have no rank analysis" in form_sentence(f)
    assert "form      undecided (100% of the changed matrices' parameters have no rank analysis)" in \
        render_text(json.loads(r.to_json()))
    # a sparse change stays sparse without a rank: that is measured by element counts
    sparse = {k: v.copy() for k, v in base.items()}
    sparse["model.layers.0.mlp.up_proj.weight"][0, :3] += 1.0
    r = weightdiff.compare(b, write_checkpoint(tmp_path / "s", sparse), rank=False)
    assert r.summary.form["kind"] == "sparse"
