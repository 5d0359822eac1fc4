"""Pairing corner cases found by probes: tied aliases saved twice, the tied-head rule as a
last resort, content-paired records placed by their base name, square matrices of a
transposed export (docs/pairing.md)."""

from __future__ import annotations

import numpy as np
import pytest

import weightdiff
from conftest import write_checkpoint
from models import gpt2, llama


def _compare(base, tuned, **kw):
    return weightdiff.compare(str(base), str(tuned), rank=False, **kw)


# ---------------------------------------------------------------- 1. tied aliases saved twice

def _t5ish(rng: np.random.Generator) -> dict:
    """A T5-like encoder-decoder as ``save_pretrained`` writes it: ``shared`` only."""
    t = {"shared.weight": rng.normal(0, 0.02, (512, 64)).astype(np.float32)}
    for side in ("encoder", "decoder"):
        for i in range(2):
            p = f"{side}.block.{i}.layer.0.SelfAttention."
            for m in "qkvo":
                t[p + m + ".weight"] = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
            t[f"{side}.block.{i}.layer.1.DenseReluDense.wi.weight"] = rng.normal(0, 0.02, (128, 64)).astype(np.float32)
            t[f"{side}.block.{i}.layer.1.DenseReluDense.wo.weight"] = rng.normal(0, 0.02, (64, 128)).astype(np.float32)
        t[f"{side}.final_layer_norm.weight"] = np.ones(64, np.float32)
    return t


def _bertish(rng: np.random.Generator) -> dict:
    t = {"bert.embeddings.word_embeddings.weight": rng.normal(0, 0.02, (512, 64)).astype(np.float32)}
    for i in range(2):
        p = f"bert.encoder.layer.{i}.attention.self."
        for m in ("query", "key", "value"):
            t[p + m + ".weight"] = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
    t["cls.predictions.transform.dense.weight"] = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
    t["cls.predictions.bias"] = rng.normal(0, 0.02, 512).astype(np.float32)
    return t


def test_state_dict_copy_with_tied_aliases_is_identical(tmp_path):
    rng = np.random.default_rng(11)
    base = _t5ish(rng)
    tuned = dict(base)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        tuned[alias] = base["shared.weight"].copy()
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    s = r.summary
    assert s.verdict == "identical", s.verdict_reason
    assert {a["name"] for a in r.plan["aliases"]} == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                                      "lm_head.weight"}
    assert all(a["alias_of"] == "shared.weight" and a["side"] == "tuned" for a in r.plan["aliases"])
    base_params = sum(v.size for v in base.values())
    assert s.coverage["base"]["params"] == base_params and s.coverage["tuned"]["params"] == base_params


def test_bert_prediction_head_aliases_are_identical(tmp_path):
    rng = np.random.default_rng(12)
    base = _bertish(rng)
    tuned = dict(base)
    tuned["cls.predictions.decoder.weight"] = base["bert.embeddings.word_embeddings.weight"].copy()
    tuned["cls.predictions.decoder.bias"] = base["cls.predictions.bias"].copy()
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    assert {a["name"] for a in r.plan["aliases"]} == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def test_base_aliases_the_tuned_model_drops_are_not_removed(tmp_path):
    rng = np.random.default_rng(13)
    tuned = _t5ish(rng)
    base = dict(tuned)
    base["encoder.embed_tokens.weight"] = tuned["shared.weight"].copy()
    base["lm_head.weight"] = tuned["shared.weight"].copy()
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    assert {(a["name"], a["side"]) for a in r.plan["aliases"]} == {("encoder.embed_tokens.weight", "base"),
                                                                   ("lm_head.weight", "base")}
    assert not r.plan["removed"]


def test_equal_bytes_under_another_name_or_unequal_bytes_stay_added(tmp_path):
    rng = np.random.default_rng(14)
    base = _t5ish(rng)
    tuned = dict(base)
    tuned["classifier.weight"] = base["shared.weight"].copy()          # not a tie name: a real new tensor
    head = base["shared.weight"].copy()
    head[3, 5] += 1e-3                                                  # a tie name, one element off
    tuned["lm_head.weight"] = head
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert not r.plan.get("aliases")
    assert "classifier.weight" in r.plan["added"]
    assert r.summary.verdict != "identical"
    # the untied head is compared with the base embedding: the base still counts that table once
    assert r.summary.coverage["base"]["params"] == sum(v.size for v in base.values())


# ---------------------------------------------------------------- 2. the tied-head rule is a last resort

def _onnxish(t: dict) -> dict:
    """What pulling an ONNX export's initializers gives: every matrix transposed under
    ``onnx::MatMul_N`` (the head too), the rest under the wrapper's ``m.`` prefix."""
    out, n = {}, 100
    for k, v in t.items():
        if v.ndim == 2 and "embed_tokens" not in k:
            out[f"onnx::MatMul_{n}"] = np.ascontiguousarray(v.T)
            n += 1
        else:
            out["m." + k] = v
    return out


def _small_llama(seed: int) -> dict:
    return llama(np.random.default_rng(seed), layers=2, hidden=64, inter=128, vocab=256)


def test_onnx_export_of_the_base_pairs_its_transposed_head_by_content(tmp_path):
    base = _small_llama(21)
    tuned = _onnxish(base)
    head = next(k for k, v in tuned.items() if v.shape == (64, 256))
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    assert not r.plan["added"] and not r.plan["removed"]
    rec = r.tensor(head)
    assert rec.base_name == "lm_head.weight" and rec.paired_by == "content"
    assert not any(t.paired_by == "tied" for t in r.tensors)


def test_a_tuned_model_that_ties_its_head_is_still_compared_with_the_base_head(tmp_path):
    base = _small_llama(22)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    tied = [t for t in r.tensors if t.paired_by == "tied"]
    assert [t.base_name for t in tied] == ["lm_head.weight"]


# ---------------------------------------------------------------- 3. content pairs are placed by their base partner

def test_content_paired_records_take_the_block_and_module_of_their_base_partner(tmp_path):
    from models import low_rank_update
    base = _small_llama(23)
    ft = dict(base)
    q = "model.layers.1.self_attn.q_proj.weight"
    ft[q] = low_rank_update(np.random.default_rng(1), base[q], 2)
    tuned = _onnxish(ft)
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    s = r.summary
    rec = next(t for t in r.tensors if t.base_name == q)
    assert rec.paired_by == "content" and rec.name.startswith("onnx::")
    norm = r.tensor("m.model.layers.1.input_layernorm.weight")
    assert (rec.block, rec.module) == (norm.block, "attn.q") == ("m.layers.1", "attn.q")
    assert (s.scope["blocks_changed"], s.scope["blocks_total"]) == (1, 2)
    assert s.scope["changed_blocks"] == ["m.layers.1"] and s.scope["modules_changed"] == ["attn.q"]
    assert [c["component"] for c in s.components] == ["embeddings", "m.layers.0", "m.layers.1", "head"]
    assert "in 1 of 2 blocks" in s.verdict_reason


# ---------------------------------------------------------------- 4. square matrices of a transposed export

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_gpt2_in_linear_layout_compares_its_square_matrices_transposed_too(tmp_path):
    base = gpt2(np.random.default_rng(31), hidden=64)
    tuned = {k: np.ascontiguousarray(v.T) if k.endswith(_CONV1D) else v for k, v in base.items()}
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    square = "transformer.h.0.attn.c_proj.weight"
    assert any(p["tuned_name"] == square and p["transposed"] for p in r.plan["special"])


def test_a_square_matrix_that_matches_as_stored_is_never_transposed(tmp_path):
    rng = np.random.default_rng(32)
    base = gpt2(rng, hidden=64)
    # the non-square matrices transposed, the square ones left as they were
    tuned = {k: np.ascontiguousarray(v.T) if k.endswith(_CONV1D) and v.shape[0] != v.shape[1] else v
             for k, v in base.items()}
    # and one square matrix retrained from scratch: it matches neither way and stays as stored
    fresh = "transformer.h.1.attn.c_proj.weight"
    tuned[fresh] = rng.normal(0, 0.02, base[fresh].shape).astype(np.float32)
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    flipped = {p["tuned_name"] for p in r.plan["special"] if p["transposed"]}
    assert not any(n.endswith("attn.c_proj.weight") for n in flipped)
    assert r.tensor("transformer.h.0.attn.c_proj.weight").status == "unchanged"
    assert r.tensor(fresh).status == "changed"


# ---------------------------------------------------------------- 4. a missing head is tied only when the config says so

def _hf_llama(tie: bool, seed: int = 0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    return transformers, cfg, transformers.LlamaForCausalLM(cfg)


def test_a_reward_model_of_an_untied_base_drops_the_head_and_adds_score(tmp_path):
    """AutoModelForSequenceClassification from an untied Llama: lm_head removed, score added (it
    read "ties lm_head to its embedding; that effective head differs", nothing removed)."""
    transformers, cfg, lm = _hf_llama(tie=False)
    lm.save_pretrained(tmp_path / "base")
    cls = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    cls.save_pretrained(tmp_path / "reward")
    r = _compare(tmp_path / "base", tmp_path / "reward")
    status = {t.name: t.status for t in r.tensors if t.status != "unchanged"}
    removed = [t.base_name for t in r.tensors if t.status == "removed"]
    assert removed == ["lm_head.weight"] and status.get("score.weight") == "added", (status, removed)
    assert not any(t.paired_by == "tied" for t in r.tensors)
    assert "tied_lm_head" not in r.summary.flags
    assert any("does not tie one" in n and "tie_word_embeddings false" in n for n in r.plan["notes"])
    assert r.summary.verdict == "derived"


def test_a_headless_base_against_the_causal_lm_of_the_same_weights_adds_the_head(tmp_path):
    """AutoModel (no lm_head) vs the CausalLM: read "partial, head unrelated" from an invented tie."""
    transformers, cfg, lm = _hf_llama(tie=False)
    lm.save_pretrained(tmp_path / "lm")
    transformers.LlamaModel.from_pretrained(tmp_path / "lm").save_pretrained(tmp_path / "headless")
    r = _compare(tmp_path / "headless", tmp_path / "lm")
    assert [t.name for t in r.tensors if t.status == "added"] == ["lm_head.weight"]
    assert r.summary.verdict == "derived"
    assert not any(t.paired_by == "tied" for t in r.tensors)


def test_a_tied_base_is_still_compared_with_an_untied_fine_tune(tmp_path):
    transformers, cfg, lm = _hf_llama(tie=True)
    lm.save_pretrained(tmp_path / "base")
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": False}))
    emb = lm.model.embed_tokens.weight.detach()
    untied.load_state_dict({**lm.state_dict(), "lm_head.weight": emb + 1e-3 * emb.abs().mean()})
    untied.save_pretrained(tmp_path / "untied")
    r = _compare(tmp_path / "base", tmp_path / "untied")
    head = r.tensor("lm_head.weight")
    assert head.paired_by == "tied" and head.base_name == "model.embed_tokens.weight" and head.status == "changed"
    assert r.summary.verdict == "derived"


def test_without_a_config_the_tie_is_assumed_and_said_to_be(tmp_path):
    base = _small_llama(22)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert [t.base_name for t in r.tensors if t.paired_by == "tied"] == ["lm_head.weight"]
    assert any("assumed, as it has no config.json" in n for n in r.plan["notes"]), r.plan["notes"]


@pytest.mark.parametrize("config, ties", [
    ({"model_type": "llama"}, False),                       # LlamaConfig defaults to untied
    ({"model_type": "gpt2"}, True),                         # PretrainedConfig's default
    ({"model_type": "qwen2", "tie_word_embeddings": True}, True),
    ({"model_type": "llava", "text_config": {"tie_word_embeddings": True}}, True),
    ({"model_type": "mystery"}, True),
])
def test_the_tie_a_config_declares(tmp_path, config, ties):
    import json

    base = _small_llama(22)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    t = write_checkpoint(tmp_path / "t", tuned)
    (t / "config.json").write_text(json.dumps(config))
    r = _compare(write_checkpoint(tmp_path / "b", base), t)
    assert any(x.paired_by == "tied" for x in r.tensors) is ties
    assert any(x.status == "removed" and x.base_name == "lm_head.weight" for x in r.tensors) is not ties


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "LlamaModel"])
def test_a_config_that_unties_a_head_it_does_not_store_is_not_identical(tmp_path, arch):
    """A tied base, and a copy whose config.json says tie_word_embeddings false but stores no lm_head: every stored
    tensor is the base's, yet transformers loads that copy with a random head; it read IDENTICAL. An encoder class
    (no LM head to load) is unaffected."""
    import json

    from weightdiff.render.sentences import verdict_title

    t = llama(np.random.default_rng(3), tied=True)
    b = write_checkpoint(tmp_path / "b", t)
    c = write_checkpoint(tmp_path / "c", t)
    (b / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                               "tie_word_embeddings": True}))
    (c / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": [arch],
                                               "tie_word_embeddings": False}))
    r = weightdiff.compare(str(b), str(c))
    if arch == "LlamaModel":
        assert r.summary.verdict == "identical" and "head_missing" not in r.summary.flags
        return
    s = r.summary
    assert s.verdict == "inconclusive" and "head_missing" in s.flags
    assert "that head is random" in verdict_title(s.to_dict())
    assert any("stores no LM head" in n for n in r.plan["notes"])


# ---------------------------------------------------------------- leftover vectors: module, then bytes

def test_opaque_names_pair_vectors_by_unique_bytes_but_never_constant_ones(tmp_path):
    """Every tensor renamed ``w0..wN`` (an ONNX model's initializers renamed): the matrices pair by content,
    the norm gains (each one of a kind) by their bytes; two all-zero biases, equal to each other, say nothing
    of their module and stay added and removed."""
    base = _small_llama(21)
    base["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    base["model.layers.0.self_attn.k_proj.bias"] = np.zeros(64, np.float32)
    tuned = {f"w{k}": v for k, v in enumerate(base.values())}
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    by = {t.base_name or t.name: t for t in r.tensors}
    for name, t in by.items():
        if t.status == "added":
            continue
        if name.endswith("_proj.bias"):
            assert t.status == "removed", (name, t.status)
        else:
            assert t.status == "unchanged" and t.paired_by == "content", (name, t.status)
    assert sorted(r.plan["added"]) == sorted(f"w{k}" for k, n in enumerate(base) if n.endswith("_proj.bias"))
    assert any("by their bytes" in n for n in r.plan["notes"])


def test_a_module_paired_by_content_brings_its_bias_even_an_all_zero_one(tmp_path):
    """A head moved to another name (a sentence-transformers Dense in another folder): its weight pairs by
    content and its bias, all zeros, follows it (its changed value is measured); a constant vector of no
    paired module stays added."""
    base = _small_llama(22)
    rng = np.random.default_rng(5)
    base["dense.weight"] = rng.normal(0, 0.02, (48, 64)).astype(np.float32)
    base["dense.bias"] = np.zeros(48, np.float32)
    tuned = {k: v for k, v in base.items() if not k.startswith("dense.")}
    tuned["extra.proj.weight"] = base["dense.weight"]
    tuned["extra.proj.bias"] = np.full(48, 0.5, np.float32)
    tuned["other.scale"] = np.zeros(48, np.float32)
    r = _compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    by = {t.name: t for t in r.tensors}
    assert by["extra.proj.weight"].base_name == "dense.weight" and by["extra.proj.weight"].status == "unchanged"
    assert by["extra.proj.bias"].base_name == "dense.bias" and by["extra.proj.bias"].status == "changed"
    assert by["other.scale"].status == "added"
    assert any("as the other tensors of their module's matrix" in n for n in r.plan["notes"])
