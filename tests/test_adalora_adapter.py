"""PEFT AdaLoRA adapters: ``B @ (A * E)`` scaled by ``lora_alpha / (init_r + 1e-5)``, each module at the ranks
its ``rank_pattern`` kept (a module that kept none changes nothing), checked against the model PEFT builds from the
saved adapter and merges; configs and factors that disagree are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import weightdiff
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _allocated(pm, masks: dict[str, list[bool]]):
    """What AdaLoRA's rank allocation leaves: the singular values of the ranks a module drops zeroed, and the
    masks in the config's rank_pattern (save_pretrained cuts the factors to the kept ranks)."""
    pattern = {}
    for n, mod in pm.named_modules():
        if hasattr(mod, "lora_E") and "default" in mod.lora_E:
            key = n.removeprefix("base_model.model.") + ".lora_E"
            mask = masks.get(key, [True] * mod.lora_E["default"].shape[0])
            pattern[key] = mask
            with torch.no_grad():
                mod.lora_E["default"][~torch.tensor(mask)] = 0.0
    pm.peft_config["default"].rank_pattern = pattern


def test_adalora_adapter_reads_as_the_model_peft_loads_and_merges(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=6,
                                                target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_" in n:
                t.normal_(0, 0.3)
    _allocated(pm, {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
                    "model.layers.1.self_attn.q_proj.lora_E": [False] * 4})
    pm.save_pretrained(tmp_path / "adapter")
    # the reference: the adapter as saved, loaded by PEFT (rank_pattern applied) and merged
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter")
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    assert r.summary.verdict == dense.summary.verdict == "derived" and "adapter" in r.summary.flags
    ranks = {}
    for t in dense.tensors:
        a = r.tensor(t.name)
        assert a.status == t.status, t.name
        if t.status == "changed":
            assert a.compared == "factors" and a.norm_delta == pytest.approx(t.norm_delta, rel=1e-6)
            assert a.cosine == pytest.approx(t.cosine, rel=1e-6)       # PEFT merges in float32
            ranks[t.name] = (a.rank.numerical_rank, t.rank.numerical_rank)
    assert ranks == {"model.layers.0.self_attn.q_proj.weight": (2, 2), "model.layers.0.self_attn.v_proj.weight": (4, 4),
                     "model.layers.1.self_attn.v_proj.weight": (4, 4)}
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-6)
    # the pruned module is the base's, by construction
    assert r.tensor("model.layers.1.self_attn.q_proj.weight").status == "unchanged"
    notes = " ".join(r.plan["notes"])
    assert "AdaLoRA kept no rank of 1 of its modules" in notes and "3 AdaLoRA factor triples" in notes


def test_gpt2_adalora_is_oriented_as_conv1d(tmp_path):
    torch.manual_seed(1)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64,
                                                             n_positions=32))
    g.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(g, peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, lora_alpha=4,
                                                   target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_" in n:
                t.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    changed = [t for t in dense.tensors if t.status == "changed"]
    assert len(changed) == 3
    for t in changed:
        assert r.tensor(t.name).norm_delta == pytest.approx(t.norm_delta, rel=1e-6)
        assert r.tensor(t.name).rank.numerical_rank == t.rank.numerical_rank == 3


PRE = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
CFG = {"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _pair(tmp_path, rng, config=None, factors=None):
    (tmp_path / "base").mkdir()
    save_file(tmp_path / "base" / "model.safetensors", {f"{Q}.weight": rng.standard_normal((8, 6)).astype(np.float32)})
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CFG if config is None else config))
    f = {f"{Q}.lora_A": rng.standard_normal((4, 6)).astype(np.float32),
         f"{Q}.lora_B": rng.standard_normal((8, 4)).astype(np.float32),
         f"{Q}.lora_E": rng.standard_normal((4, 1)).astype(np.float32)}
    f.update(factors or {})
    save_file(tmp_path / "ad" / "adapter_model.safetensors", {PRE + k: v for k, v in f.items() if v is not None})
    return tmp_path / "base", tmp_path / "ad"


def test_the_delta_is_b_times_a_scaled_by_e(tmp_path, rng):
    base, ad = _pair(tmp_path, rng)
    from safetensors.numpy import load_file

    f = {k.removeprefix(PRE): v.astype(np.float64) for k, v in load_file(ad / "adapter_model.safetensors").items()}
    delta = f[f"{Q}.lora_B"] @ (f[f"{Q}.lora_A"] * f[f"{Q}.lora_E"]) * 8 / float(np.float32(4) + np.float32(1e-5))
    t = weightdiff.compare(str(base), str(ad)).tensor(f"{Q}.weight")
    assert t.norm_delta == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
    assert t.max_abs_delta == pytest.approx(float(np.abs(delta).max()), rel=1e-12)


@pytest.mark.parametrize("config, factors, expect", [
    ({**CFG, "init_r": 3}, None, "have rank 4 but adapter_config.json's init_r is 3"),
    ({**CFG, "rank_pattern": {f"{Q}.lora_E": [True, False, True, True]}}, None,
     "have rank 4 but adapter_config.json's rank_pattern keeps 3 of its 4 ranks"),
    ({**CFG, "rank_pattern": {f"{Q}.lora_E": [True, False]}}, None, "expected 4 true/false values (init_r)"),
    ({**CFG, "rank_pattern": [1]}, None, "rank_pattern = [1], expected an object"),
    (None, {f"{Q}.lora_E": None}, "has lora_A, lora_B but not all of lora_A, lora_B and lora_E"),
    (None, {f"{Q}.lora_E": np.ones((4, 2), np.float32)}, "do not chain: A is [4, 6], E [4, 2], B [8, 4]"),
    (None, {f"{Q}.lora_E": np.ones((4, 1), np.int8)}, "is I8; expected a float dtype"),
    (None, {f"{Q}.lora_E": np.full((4, 1), np.inf, np.float32)}, "holds NaN or Inf values"),
    ({**CFG, "use_dora": True}, None, "PEFT does not build DoRA under AdaLoRA"),
    ({**CFG, "init_r": 0}, None, "init_r = 0, expected a positive integer"),
    (None, {f"{Q}.lora_A.weight": np.ones((4, 6), np.float32)}, "which is not AdaLoRA's (lora_A, lora_B, lora_E)"),
    (None, {f"{Q}.lora_A": np.ones((4, 7), np.float32)}, "do not fit the base weight, which is [8, 6]"),
])
def test_hostile_adalora_adapters_are_one_line_exit_2(tmp_path, rng, config, factors, expect):
    base, ad = _pair(tmp_path, rng, config, factors)
    contract(["compare", str(base), str(ad)], ad, expect, tmp_path)
