"""``verdict._flags`` walks the records once; each flag is checked against its own definition here (the
per-flag form it replaced), on random records that raise every flag alone and in mixtures."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from weightdiff.judge import verdict
from weightdiff.judge.status import is_mismatch, is_tied, zero_side
from weightdiff.records import RankRecord, TensorRecord


def _reference(counted, records, declared):
    st = Counter(r.status for r in counted)
    checks = [
        ("added_tensors", st["added"] > 0),
        ("removed_tensors", st["removed"] > 0),
        ("resized_embeddings", any(r.status == "resized" and not is_mismatch(r) for r in counted)),
        ("shape_mismatch", any(is_mismatch(r) for r in counted)),
        ("composite_base", len({r.base_index for r in counted if r.base_name is not None}) > 1),
        ("adapter", any(r.compared == "factors" for r in counted)),
        ("tied_lm_head", any(is_tied(r) for r in records)),
        ("dtype_changed", any(r.dtype_base and r.dtype_tuned and r.dtype_base != r.dtype_tuned
                              and r.compared != "factors" for r in counted)),
        ("nonfinite", any((r.nonfinite or 0) > 0 for r in records)),
        ("cast_rounded_twice", any(r.cast and r.cast.get("through") for r in counted)),
        ("cast_two_roundings", any(r.cast and r.cast.get("rounded") for r in counted)),
        ("cast_base_rounded", any(r.cast and r.cast.get("rounded") in ("base", "both") for r in counted)),
        ("cast_both_rounded", any(r.cast and r.cast.get("rounded") == "both" for r in counted)),
        ("nonfinite_changes", any(verdict.nonfinite_only(r) for r in counted)),
        ("awq_scaled", verdict.awq_scaled([r for r in counted if r.status in ("changed", "resized")])),
        ("quant_untested", any(r.status == "quantized" and (r.quant or {}).get("within") is None for r in counted)),
        ("quant_both_compensated", any(r.status == "quantized" and (r.quant or {}).get("within") is None
                                       and (r.quant or {}).get("side") == "both" and not (r.quant or {}).get("codes_moved")
                                       and (r.quant or {}).get("test") not in ("none", "bound") for r in counted)),
        ("quant_both_moved", any(r.status == "quantized" and (r.quant or {}).get("within") is None
                                 and (r.quant or {}).get("codes_moved") for r in counted)),
        ("cast_offset", any(r.cast and any("1 + w" in str(c) for c in r.cast.get("chain") or ()) for r in counted)),
        ("cast_overflow", any(r.cast and ((r.cast.get("overflow") or 0) + (r.cast.get("saturated") or 0)) > 0
                              for r in counted)),
        ("bytes_compared", any(r.compared == "bytes" for r in counted)),
        ("partial_spectrum", any(r.rank is not None and not r.rank.exact for r in counted)),
        ("content_paired", any(r.paired_by == "content" for r in counted)),
        ("declared_base_mismatch", bool(declared.get("mismatch"))),
        ("relayout", bool(verdict.relayout(counted))),
        ("meta_layout_unmapped", bool(verdict.relayout(counted)) and any(
            r.status in ("added", "removed") and r.name.startswith("layers.") and ".attention.w" in r.name
            and r.name.split(".attention.w")[1] in ("q.weight", "k.weight") for r in counted)),
        ("unpaired_lookalikes", bool(verdict.lookalikes(counted))),
        ("zeroed_matrices", any(r.status == "changed" and zero_side(r) for r in counted)),
        ("unmerged_adapter", any(r.status == "added" and any(
            r.name.startswith(m + ".") and not r.name.startswith(m + ".base_layer.")
            for m in {x.name[:-len(".base_layer.weight")] for x in counted
                      if x.status != "removed" and x.name.endswith(".base_layer.weight")}) for r in counted)),
    ]
    return [name for name, on in checks if on]


def _record(rng: random.Random, i: int) -> TensorRecord:
    status = rng.choice(["unchanged"] * 6 + ["changed"] * 3 + ["added", "removed", "resized", "quantized"])
    shape = rng.choice([[8, 8], [8], [4, 8]])
    name = rng.choice([f"model.layers.{i % 3}.mlp.{rng.choice(['up', 'down'])}_proj.weight"] * 5
                      + [f"layers.{i % 3}.attention.w{rng.choice('qkv')}.weight"]
                      + [f"model.layers.{i % 3}.mlp.up_proj.{rng.choice(['base_layer', 'lora_A.default', 'lora_B'])}"
                         ".weight"])
    r = TensorRecord(name=name,
                     base_name=None if status == "added" else f"b{i}", status=status, shape=shape,
                     base_shape=shape, dtype_base=rng.choice(["BF16", "F16", None]),
                     dtype_tuned=rng.choice(["BF16", "F16", None]), numel=64,
                     base_index=rng.choice([0, 0, 0, 1]),
                     compared=rng.choice(["float"] * 6 + ["none", "bytes", "factors"]))
    r.norm_base, r.norm_tuned = rng.choice([(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (None, None)])
    r.norm_delta = rng.choice([0.0, 0.5, None])
    r.nonfinite = rng.choice([0] * 8 + [3])
    r.module = rng.choice(["mlp", "attn", "norm"])
    if rng.random() < 0.05:
        r.tied = True
    if rng.random() < 0.05:
        r.note = "tied: shares the embedding"
    if rng.random() < 0.2:
        r.quant = rng.choice([{}, {"within": None, "side": "both", "test": "floor"},
                              {"within": None, "side": "tuned", "test": "bound"},
                              {"within": None, "side": "both", "test": "bound", "codes_moved": 7},
                              {"within": None, "side": "both", "test": "first-group", "codes_moved": 3},
                              {"within": False, "format": "awq"}, {"within": True}])
    if rng.random() < 0.1:
        r.cast = rng.choice([{"through": "F16"}, {"chain": ["x", "1 + w then BF16"]}, {"overflow": 2},
                             {"through": "BF16", "rounded": "base"}, {"through": "BF16", "rounded": "tuned"},
                             {"through": "BF16", "rounded": "both", "vias": {"base": ["BF16"], "tuned": ["F16"]}},
                             {"saturated": 1, "chain": []}, {}])
    if rng.random() < 0.1:
        r.rank = RankRecord(None, None, None, None, numerical_rank=3, noise_floor=0.0, spectrum=[], energy_captured=None,
                            exact=rng.random() < 0.5)
    r.paired_by = rng.choice(["name"] * 9 + ["content"])
    return r


@pytest.mark.parametrize("seed", range(60))
def test_flags_match_their_definitions(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 3, 10, 40])
    records = [_record(rng, i) for i in range(n)]
    counted = [r for r in records if rng.random() < 0.9]
    declared = rng.choice([{}, {"mismatch": True}, {"mismatch": False}])
    assert verdict._flags(counted, records, declared) == _reference(counted, records, declared)


def test_every_flag_is_listed_in_order():
    assert len(set(verdict.FLAG_ORDER)) == len(verdict.FLAG_ORDER) == 33


def test_meta_layout_unmapped_needs_relayout_and_a_meta_query_or_key():
    def rec(name, status, block="layers.0"):
        return TensorRecord(name=name, base_name=None if status == "added" else name, status=status, shape=[8, 8],
                            base_shape=[8, 8], dtype_base="BF16", dtype_tuned="BF16", numel=64, block=block,
                            compared="none" if status in ("added", "removed") else "float")
    kept = [rec("model.layers.0.mlp.up_proj.weight", "unchanged")]
    meta = kept + [rec("layers.0.attention.wq.weight", "added"), rec("model.layers.0.self_attn.q_proj.weight", "removed")]
    other = kept + [rec("model.layers.0.mlp.gate_up_proj", "added"), rec("model.layers.0.mlp.up_proj.x", "removed")]
    v_only = kept + [rec("layers.0.attention.wv.weight", "added"), rec("model.layers.0.self_attn.v_proj.weight", "removed")]
    assert "meta_layout_unmapped" in verdict._flags(meta, meta, {})
    assert "relayout" in verdict._flags(other, other, {}) and "meta_layout_unmapped" not in verdict._flags(other, other, {})
    assert "meta_layout_unmapped" not in verdict._flags(v_only, v_only, {})
    for recs in (meta, other, v_only):
        assert verdict._flags(recs, recs, {}) == _reference(recs, recs, {})


def test_a_matrix_that_differs_only_by_nan_or_inf_is_not_in_the_form():
    # one NaN and one inf in one matrix (nothing measured) beside a rank-1 change: the form read "mixed,
    # dense 50%" for the unmeasured matrix (a tester found it); it is the rank-1 change's, low-rank
    from weightdiff.options import Thresholds
    from weightdiff.records import RankRecord

    def rec(name, **kw):
        r = TensorRecord(name=name, base_name=name, status="changed", shape=[64, 64], base_shape=[64, 64],
                         dtype_base="F32", dtype_tuned="F32", numel=4096, compared="float", **kw)
        r.numel_compared = 4096
        return r
    low = rec("model.layers.2.mlp.up_proj.weight", norm_delta=0.064, frac_changed=1.0, frac_beyond_rounding=1.0)
    low.rank = RankRecord(1.0, 1.0, 1, 1, numerical_rank=1, noise_floor=1e-9, spectrum=[0.064], energy_captured=1.0,
                          exact=True)
    broken = rec("model.layers.1.mlp.up_proj.weight", norm_delta=0.0, nonfinite=2, frac_changed=2 / 4096,
                 frac_beyond_rounding=2 / 4096)
    form = verdict._form([low, broken], Thresholds())
    assert form["kind"] == "low_rank" and form["matrices_changed"] == 1, form


def test_a_changed_matrix_without_a_rank_is_priced_as_a_bound():
    # no rank analysis (--no-rank, or an inf in the matrix): m x n is what it costs at most; a rank-1 change
    # costs m + n. The memo printed "delta params 4,096" as exact for a rank-1 change that needs 128
    from weightdiff.judge.status import delta_params_range
    from weightdiff.options import Thresholds

    r = TensorRecord(name="model.layers.0.mlp.up_proj.weight", base_name="b", status="changed", shape=[64, 64],
                     base_shape=[64, 64], dtype_base="F32", dtype_tuned="F32", numel=4096, compared="float")
    r.numel_compared, r.frac_changed, r.frac_beyond_rounding, r.norm_delta = 4096, 1.0, 1.0, 0.1
    assert delta_params_range(r, Thresholds()) == (4096, 0, 128)
