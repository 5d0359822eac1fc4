"""compare() on checkpoints written by transformers and peft themselves (real names and layouts).

Tiny configs, save_pretrained, a few real training steps on CPU. Skipped when
transformers/peft/torch are not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import weightdiff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _train(model, params, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_base")
    _tiny_llama().save_pretrained(d)
    return d


def test_real_training_of_one_block_is_found(tmp_path, base_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    block = model.model.layers[1]
    _train(model, list(block.parameters()))
    model.save_pretrained(tmp_path / "tuned")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "tuned"))
    assert r.summary.verdict == "derived"
    assert r.summary.blocks_changed == 1
    changed = {t.name for t in r.tensors if t.status == "changed"}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)


def test_bf16_save_of_the_base_is_cast_only(tmp_path, base_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "bf16"))
    assert r.summary.verdict == "cast_only"


def test_peft_adapter_as_tuned_side_is_analysed_from_factors(tmp_path, base_dir):
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    assert r.tuned["format"] == "adapter"
    assert r.summary.verdict == "derived"
    lora = [t for t in r.tensors if t.compared == "factors"]
    assert len(lora) == 2 * 3
    for t in lora:
        assert t.status == "changed"
        assert t.rank.numerical_rank == 4
        assert t.rank.method == "factors"
    # the same numbers as the merged model, measured densely
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    for t in lora:
        d = dense.tensor(t.name)
        assert t.norm_delta == pytest.approx(d.norm_delta, rel=1e-4)
        assert t.cosine == pytest.approx(d.cosine, rel=1e-6)
        assert d.rank.numerical_rank == 4
        np.testing.assert_allclose(t.rank.spectrum[:4], d.rank.spectrum[:4], rtol=1e-3)
    assert r.summary.blocks_changed == dense.summary.blocks_changed == 3
    # untouched base tensors count in the model-level figure, as in the merged model
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-4)


def test_peft_adapter_on_the_embedding_matches_the_merged_model(tmp_path, base_dir):
    """Embedding adapters store A as [r, vocab] and B as [dim, r] plus a full copy of the layer."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    emb = r.tensor("model.embed_tokens.weight")
    assert emb.compared == "factors" and emb.status == "changed" and emb.rank.numerical_rank == 2
    assert [t.name for t in r.tensors].count("model.embed_tokens.weight") == 1
    assert emb.norm_delta == pytest.approx(dense.tensor("model.embed_tokens.weight").norm_delta, rel=1e-5)
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-5)
    assert not [t for t in r.tensors if t.status in ("added", "resized")]


def test_adapter_that_saves_an_edited_base_layer_reads_as_its_merged_model(tmp_path, base_dir):
    """Rows of the embedding re-initialised (reserved special tokens), then LoRA on it: PEFT saves the
    edited table as ``embed_tokens.base_layer.weight`` and loads it over the base's. The adapter read
    rel 0.256, "rank 4, exactly from its factors" where the merged model reads rel 0.358, rank 20."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[112:] = emb[:112].mean(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    name = "model.embed_tokens.weight"
    t, d = r.tensor(name), dense.tensor(name)
    assert t.compared == "float" and "base layer the adapter saves" in t.note
    assert t.norm_delta == pytest.approx(d.norm_delta, rel=1e-6)
    assert t.rank.numerical_rank == d.rank.numerical_rank > 2
    assert r.tensor("model.layers.0.self_attn.q_proj.weight").compared == "factors"
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-5)


def test_lora_on_resized_embeddings_reads_as_a_resize(tmp_path, base_dir):
    """resize_token_embeddings, then LoRA on embed_tokens and lm_head: PEFT saves the resized base layers
    in the adapter. It was refused as "do not fit the base weight (is this adapter for another base
    model?)"; the merged weights against the base are a resize, as the merged model reads."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model.resize_token_embeddings(136, mean_resizing=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                    target_modules=["embed_tokens", "lm_head", "q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t, d = r.tensor(name), dense.tensor(name)
        assert t.status == d.status == "resized" and t.shape == [136, 64] and t.base_shape == [128, 64]
        assert t.norm_delta == pytest.approx(d.norm_delta, rel=1e-6)
    assert "resized_embeddings" in r.summary.flags
    assert r.summary.params_by_status == dense.summary.params_by_status


def test_dora_adapter_stats_match_the_merged_model(tmp_path, base_dir):
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], use_dora=True,
                                                    init_lora_weights=False))
    with torch.no_grad():   # move the magnitude away from the base row norms, as training would
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    for t in (t for t in r.tensors if t.compared == "factors"):
        d = dense.tensor(t.name)
        assert "DoRA" in t.note
        assert t.norm_delta == pytest.approx(d.norm_delta, rel=1e-5)
        assert t.cosine == pytest.approx(d.cosine, rel=1e-6)
        # the whole change's spectrum (the row rescaling is full rank: "at most rank r" would be wrong with
        # confidence), exact: the merged model's ranks (a bracket [r, 64] before)
        assert t.rank.exact and "whole change" in t.rank.extra["dora"]["note"] and "whole change's" in t.note
        for field in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
            assert getattr(t.rank, field) == getattr(d.rank, field), field
        assert t.rank.spectrum == pytest.approx(d.rank.spectrum, rel=1e-4, abs=1e-6)
    ranks = ("kind", "max_numerical_rank", "max_numerical_rank_bounds", "max_energy_rank_99")
    assert {k: r.summary.form[k] for k in ranks} == {k: dense.summary.form[k] for k in ranks}
    assert r.summary.delta_params == dense.summary.delta_params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_untrained_dora_adapter_reads_as_the_base(tmp_path, dtype):
    """peft's DoRA init: B = 0 and the magnitude peft's own row norms of W, in the weight's dtype; its
    merge gives the base back (up to the rounding of bfloat16). weightdiff recomputed the norms in
    float64 and read the few-ulp gap of magnitude / ||W|| from 1 as "DERIVED, 4 tensors changed"."""
    peft = pytest.importorskip("peft")
    dt = getattr(torch, dtype)
    _tiny_llama().to(dt).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=dt),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "adapter")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    assert not [t.name for t in r.tensors if t.status == "changed"]


def test_trained_dora_magnitude_beyond_rounding_is_still_measured(tmp_path):
    """The rounding rule of the DoRA factor takes c = 1 only within rounding: a magnitude moved by
    1e-4 (far below any fine-tune's, far above float32's rounding) still reads as a change."""
    peft = pytest.importorskip("peft")
    _tiny_llama().save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 1e-4)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    assert r.summary.verdict == "derived"
    for t in (t for t in r.tensors if t.compared == "factors"):
        assert t.status == "changed"
        assert t.norm_delta == pytest.approx(dense.tensor(t.name).norm_delta, rel=1e-3)


def test_magnitudes_under_use_dora_false_are_ignored_as_peft_ignores_them(tmp_path, base_dir):
    """A DoRA adapter whose config says use_dora: false: PEFT builds plain LoRA layers and drops the
    magnitudes (rel 0.7049 in the tester's case); weightdiff applied DoRA anyway (0.7183)."""
    import json

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True,
                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    pm.save_pretrained(tmp_path / "adapter")
    conf = tmp_path / "adapter" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "use_dora": False}))
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                            tmp_path / "adapter")
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    changed = [t for t in r.tensors if t.compared == "factors"]
    assert len(changed) == 3 and all("DoRA" not in t.note for t in changed)
    for t in changed:
        assert t.norm_delta == pytest.approx(dense.tensor(t.name).norm_delta, rel=1e-5)
    assert any("use_dora false" in n and "not used" in n for n in r.plan["notes"])
    assert not [t for t in r.tensors if t.status == "added"]


def test_lora_on_the_lm_head_of_a_tied_base_modifies_the_tied_embedding_as_head(tmp_path):
    """Qwen2 with tie_word_embeddings: the base saves no lm_head.weight. A LoRA on lm_head was
    refused "has no weight in the base (is this adapter for another base model?)"; its factors
    change the head the base ties to its embedding, and only the head."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    with torch.no_grad():                       # a fine-tune-sized update (random B is as large as W)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.02)
    pm.save_pretrained(tmp_path / "adapter")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    assert r.summary.verdict == "derived"
    head = r.tensor("lm_head.weight")
    assert (head.base_name, head.paired_by, head.status, head.compared) == \
        ("model.embed_tokens.weight", "tied", "changed", "factors")
    assert head.rank.numerical_rank == 2
    # the delta is the adapter's own: scale * B @ A against the tied embedding
    sd = pm.state_dict()
    a = next(v for k, v in sd.items() if "lm_head.lora_A" in k)
    b = next(v for k, v in sd.items() if "lm_head.lora_B" in k)
    want = float(torch.linalg.norm(2.0 * b @ a))
    assert head.norm_delta == pytest.approx(want, rel=1e-5)
    # the input embedding itself is untouched
    emb = r.tensor("model.embed_tokens.weight")
    assert emb.status == "unchanged"


def test_target_parameters_with_no_factors_saved_leave_the_modules_read_as_they_are(tmp_path, base_dir):
    """A config naming target_parameters (PEFT's ParamWrapper) that the base has no such parameter for and the
    adapter saves no factors of: its LoRA modules read as without it (LoRA on parameters: test_param_lora.py)."""
    import json

    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    want = weightdiff.compare(str(base_dir), str(tmp_path / "adapter")).to_dict()
    conf = tmp_path / "adapter" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "target_parameters": ["mlp.experts.gate_up_proj"]}))
    got = weightdiff.compare(str(base_dir), str(tmp_path / "adapter")).to_dict()
    assert got["tensors"] == want["tensors"] and got["summary"] == want["summary"]


def test_unconverted_pissa_adapter_is_refused_and_the_converted_one_reads_as_merged(tmp_path, base_dir):
    """init_lora_weights="pissa" trains on W - B0 A0: saved as is, its factors apply to that residual, and
    an untrained one (the base itself) read "DERIVED: this base with the adapter applied", rel 0.45.
    Converted at save (path_initial_model_for_weight_conversion), it is a plain LoRA of the base."""
    from click.testing import CliRunner
    from weightdiff.cli import main

    peft = pytest.importorskip("peft")
    cfg = dict(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="pissa")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**cfg))
    pm.save_pretrained(tmp_path / "raw")
    r = CliRunner().invoke(main, ["compare", str(base_dir), str(tmp_path / "raw"), "--json", str(tmp_path / "o.json")])
    lines = r.stderr.splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and str(tmp_path / "raw" / "adapter_config.json") in lines[0]
    assert 'init_lora_weights "pissa"' in lines[0] and "path_initial_model_for_weight_conversion" in lines[0]
    assert not (tmp_path / "o.json").exists()
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():   # training moves the factors
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(1.2)
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "converted"))
    dense = weightdiff.compare(str(base_dir), str(tmp_path / "merged"))
    for t in (t for t in r.tensors if t.compared == "factors"):
        assert t.norm_delta == pytest.approx(dense.tensor(t.name).norm_delta, rel=1e-4)


def test_trainable_tokens_saved_by_peft_are_read_as_rows(tmp_path, base_dir):
    """Once refused by name (their rows had read as an unrelated added tensor); now the rows PEFT replaces
    (tests/test_trainable_tokens.py): untrained, the base's own rows, so the table is unchanged."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0,
                          trainable_token_indices=[3, 5])
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    r = weightdiff.compare(str(base_dir), str(tmp_path / "adapter"))
    emb = r.tensor("model.embed_tokens.weight")
    assert emb.status == "unchanged" and emb.note.startswith("PEFT trainable tokens")


def test_lora_bias_is_a_change_of_the_layers_bias_as_peft_merges_it(tmp_path):
    """``lora_bias=True`` saves ``lora_B.bias``, which PEFT merges into the layer's bias: the adapter read 4
    changed weights and 4 *added* ``lora_B.bias`` tensors where its merged model reads 8 changed tensors.
    Untrained (the bias starts at zero) it is the base; on a base layer without a bias it is refused, as PEFT
    refuses to merge it."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    q = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in q.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    q.save_pretrained(tmp_path / "base")
    lcfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    pm = peft.get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(**lcfg))
    pm.save_pretrained(tmp_path / "untrained")
    assert weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "untrained")).summary.verdict == "identical"
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    changed = sorted(t.name for t in r.tensors if t.status == "changed")
    assert changed == sorted(t.name for t in dense.tensors if t.status == "changed") and len(changed) == 8
    assert not [t for t in r.tensors if t.status == "added"]
    name = "model.layers.1.self_attn.v_proj.bias"
    assert "lora_bias" in r.tensor(name).note
    assert r.tensor(name).norm_delta == pytest.approx(dense.tensor(name).norm_delta, rel=1e-6)
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-5)
    # a base without biases: PEFT builds the adapter but cannot merge it; nor can weightdiff read it as a change
    _tiny_llama().save_pretrained(tmp_path / "llama")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True))
    pm.save_pretrained(tmp_path / "llama_adapter")
    with pytest.raises(weightdiff.WeightdiffError, match="but the base has no such bias: PEFT cannot merge it"):
        weightdiff.compare(str(tmp_path / "llama"), str(tmp_path / "llama_adapter"))


def test_real_peft_state_dict_unmerged_is_inconclusive(tmp_path, base_dir):
    """A PeftModel's own state dict (LoRA trained a few steps, not merged), saved whole as a checkpoint: PEFT
    names it `base_model.model.<m>.base_layer.weight` and `<m>.lora_A.default.weight`; it read "DERIVED: this
    base with tensors added; none of its own weights changed"."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(pm, [p for p in pm.parameters() if p.requires_grad])
    (tmp_path / "whole").mkdir()
    save_file({k: v.detach().contiguous() for k, v in pm.state_dict().items()}, str(tmp_path / "whole" / "model.safetensors"))
    (tmp_path / "whole" / "config.json").write_text((base_dir / "config.json").read_text())
    s = weightdiff.compare(str(base_dir), str(tmp_path / "whole")).summary
    assert s.verdict == "inconclusive" and "unmerged_adapter" in s.flags
    # q_proj 64 -> 64 and v_proj 64 -> 32 (2 key/value heads of 16) in each of 3 layers, rank 4
    assert s.scope["unmerged_adapter"] == {"modules": 6, "tensors": 12, "params": 3 * 4 * (64 + 64 + 64 + 32),
                                           "lora": True}


def test_real_activation_checkpointed_state_dict_pairs_by_name(tmp_path, base_dir):
    """torch.distributed's checkpoint_wrapper around each decoder layer, trained, its parameters saved by the
    names `named_parameters()` gives (as a training script saving them does; the wrapper's own `state_dict`
    strips its segment): `model.layers.N._checkpoint_wrapped_module.*` read as `model.layers.N.*`."""
    from safetensors.torch import save_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model.model.layers = torch.nn.ModuleList(checkpoint_wrapper(layer) for layer in model.model.layers)
    _train(model, list(model.model.layers[2].parameters()))
    sd = dict(model.named_parameters())
    assert any("_checkpoint_wrapped_module." in k for k in sd)
    (tmp_path / "raw").mkdir()
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp_path / "raw" / "model.safetensors"))
    r = weightdiff.compare(str(base_dir), str(tmp_path / "raw"))
    tbs = r.summary.tensors_by_status
    assert r.summary.verdict == "derived" and not tbs.get("added") and not tbs.get("removed")
    changed = {t.name for t in r.tensors if t.status == "changed"}
    assert changed and all(n.startswith("model.layers.2.") for n in changed)


def test_real_peft_state_dict_with_modules_to_save(tmp_path, base_dir):
    """`modules_to_save=["lm_head"]`: the PeftModel's state dict stores the trained copy as
    `lm_head.modules_to_save.default.weight` and the frozen original as `lm_head.original_module.weight`, neither
    named `lm_head.weight`; it read "its config unties the LM head and none is stored: loaded with transformers,
    that head is random". The copy is read as the model's head, the original left out."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    modules_to_save=["lm_head"]))
    _train(pm, [p for p in pm.parameters() if p.requires_grad])
    (tmp_path / "whole").mkdir()
    save_file({k: v.detach().contiguous() for k, v in pm.state_dict().items()}, str(tmp_path / "whole" / "model.safetensors"))
    (tmp_path / "whole" / "config.json").write_text((base_dir / "config.json").read_text())
    r = weightdiff.compare(str(base_dir), str(tmp_path / "whole"))
    s = r.summary
    assert s.verdict == "derived" and "head_missing" not in s.flags and "unmerged_adapter" in s.flags
    head = [t for t in r.tensors if t.name.endswith("lm_head.weight")]
    assert len(head) == 1 and head[0].status == "changed" and head[0].paired_by in ("name", "prefix")
    assert not any("original_module" in t.name for t in r.tensors)
    assert s.tensors_by_status["added"] == 6 and not s.tensors_by_status.get("removed")


def test_gpt2_lora_on_a_worker_is_oriented_as_in_the_parent(tmp_path):
    """A Dask worker plans again from the headers: it re-planned without the adapter's checks, which orient the
    factors, so a GPT-2 LoRA's factors were not turned to the Conv1D layout (`--workers 2` failed: `factors b
    (48, 2) @ a (2, 16) do not make a 16 x 48 delta`; a square c_proj alone was measured untransposed)."""
    peft = pytest.importorskip("peft")
    from weightdiff.comparison import check_adapter_plan
    from weightdiff.io.checkpoint import locate
    from weightdiff.options import CompareOptions
    from weightdiff.pairing.plan import plan as make_plan
    from weightdiff.split import measure_task, plan_digest

    torch.manual_seed(2)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64,
                                                             n_positions=32))
    g.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(g, peft.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    local = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    with locate(tmp_path / "base") as b, locate(tmp_path / "adapter") as t:
        parent = make_plan([b], t)
        check_adapter_plan(parent, [b], t)
        digest = plan_digest(parent)
    idx = [i for i, p in enumerate(parent.pairs) if p.lora is not None]
    status, records = measure_task([str(tmp_path / "base")], str(tmp_path / "adapter"), CompareOptions(), idx,
                                   digest)
    assert status == "ok", records
    assert [r.norm_delta for r in records] == [local.tensor(r.name).norm_delta for r in records]
