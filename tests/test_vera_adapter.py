"""PEFT's VeRA adapters: each module measured exactly as the rank-r factor pair (lambda_b x vera_B) @ (lambda_d x
vera_A) its vectors make of the shared projections, checked against the model PEFT loads from the saved adapter
and merges (Llama's linear layers, GPT-2's Conv1D), and hostile adapters refused in one line."""

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


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64,
                                                                n_positions=32))


@pytest.mark.parametrize("make, targets, changed", [
    (_llama, ["q_proj", "down_proj", "up_proj"], 6),
    # GPT-2's Conv1D stores [in, out]: attn.c_proj is square, its orientation taken from the other modules'
    (_gpt2, ["c_attn", "c_proj"], 3),
])
@pytest.mark.parametrize("save", [True, False])
def test_vera_adapters_read_as_their_merged_model(tmp_path, make, targets, changed, save):
    """save_projection false: the adapter holds no projections; PEFT draws them again when it loads it, and so does
    weightdiff (torch's CPU generator from projection_prng_key, sized to the largest layer adapted)."""
    torch.manual_seed(0)
    model = make()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.VeraConfig(r=4, target_modules=targets, fan_in_fan_out=make is _gpt2,
                                                    save_projection=save, projection_prng_key=7))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "vera_lambda" in n:
                t.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(type(model).from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    assert r.summary.verdict == dense.summary.verdict == "derived" and "adapter" in r.summary.flags
    moved = [t for t in dense.tensors if t.status == "changed"]
    assert len(moved) == changed
    for t in moved:
        a = r.tensor(t.name)
        assert a.compared == "factors" and a.note.startswith("VeRA adapter (r=4)")
        assert a.norm_delta == pytest.approx(t.norm_delta, rel=1e-6)          # PEFT merges in float32
        assert a.cosine == pytest.approx(t.cosine, rel=1e-6)
        assert a.rank.numerical_rank == t.rank.numerical_rank == 4 and a.rank.exact
        assert ("drawn again from projection_prng_key 7" in a.note) is not save
    assert f"adapter: {changed} VeRA modules" in " ".join(r.plan["notes"])


PRE = "base_model.model."
Q, D = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
CFG = {"peft_type": "VERA", "r": 2, "target_modules": ["q_proj", "down_proj"]}


def _pair(tmp_path, rng, config=None, tensors=None, base_extra=None):
    (tmp_path / "base").mkdir()
    base = {f"{Q}.weight": rng.standard_normal((16, 16)).astype(np.float32),
            f"{D}.weight": rng.standard_normal((16, 32)).astype(np.float32)}
    base.update(base_extra or {})
    save_file(tmp_path / "base" / "model.safetensors", base)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CFG if config is None else config))
    f = {"base_model.vera_A": rng.standard_normal((2, 32)).astype(np.float32),
         "base_model.vera_B": rng.standard_normal((16, 2)).astype(np.float32)}
    for mod in (Q, D):
        f[f"{PRE}{mod}.vera_lambda_b"] = rng.standard_normal(16).astype(np.float32)
        f[f"{PRE}{mod}.vera_lambda_d"] = rng.standard_normal(2).astype(np.float32)
    f.update(tensors or {})
    save_file(tmp_path / "ad" / "adapter_model.safetensors", {k: v for k, v in f.items() if v is not None})
    return tmp_path / "base", tmp_path / "ad"


def test_a_written_vera_is_measured_from_its_vectors(tmp_path, rng):
    base, ad = _pair(tmp_path, rng)
    r = weightdiff.compare(str(base), str(ad))
    from safetensors.numpy import load_file

    f = {k: v.astype(np.float64) for k, v in load_file(ad / "adapter_model.safetensors").items()}
    for mod, cols in ((Q, 16), (D, 32)):
        delta = (f[f"{PRE}{mod}.vera_lambda_b"][:, None] * f["base_model.vera_B"]) @ \
                (f[f"{PRE}{mod}.vera_lambda_d"][:, None] * f["base_model.vera_A"][:, :cols])
        t = r.tensor(f"{mod}.weight")
        assert t.norm_delta == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
        assert t.rank.spectrum == pytest.approx(list(np.linalg.svd(delta, compute_uv=False)[:2]), rel=1e-9)


@pytest.mark.parametrize("config, tensors, base_extra, expect", [
    ({**CFG, "save_projection": False}, {"base_model.vera_B": None}, None,
     "VeRA adapter holds vera_A of its shared projections vera_A and vera_B"),
    (None, {"base_model.vera_B": None}, None, "VeRA adapter holds vera_A of its shared projections vera_A and vera_B"),
    (None, {f"{PRE}{Q}.vera_lambda_d": np.ones(3, np.float32)}, None,
     "VeRA vectors of `base_model.model.model.layers.0.self_attn.q_proj` are vera_lambda_d [3]"),
    (None, {f"{PRE}{Q}.vera_lambda_b": np.ones(17, np.float32)}, None, "with out at most vera_B's 16 rows"),
    (None, {f"{PRE}{Q}.vera_lambda_b": None}, None, "has only vera_lambda_d of its two vectors"),
    ({**CFG, "r": 3}, None, None, "are not [r, in] and [out, r] for adapter_config.json's r = 3"),
    (None, {"base_model.vera_A": np.ones((2, 40), np.float32)}, None,
     "VeRA projections vera_A [2, 40] and vera_B [16, 2] are not sized to the largest layer the adapter modifies "
     "(16 outputs, 32 inputs)"),
    (None, {f"{PRE}{Q}.vera_lambda_b": np.ones(8, np.float32)}, None,
     "VeRA vectors of `model.layers.0.self_attn.q_proj.weight` (vera_lambda_b [8]) and vera_A [2, 32] do not fit "
     "the base weight, which is [16, 16]"),
    (None, None, {f"{Q}.weight": np.ones((16, 4, 3), np.float32)}, "PEFT builds VeRA on Linear and Conv1D layers"),
    (None, {f"{PRE}{Q}.vera_lambda_b": np.full(16, np.nan, np.float32)}, None, "VeRA tensor `base_model.model.model"
                                                                               ".layers.0.self_attn.q_proj.vera_lambd"
                                                                               "a_b` holds NaN or Inf values"),
    (None, {"base_model.vera_A": np.ones((2, 32), np.int8)}, None, "VeRA tensor `base_model.vera_A` is I8"),
    (None, {f"{PRE}{Q}.lora_A.weight": np.ones((2, 16), np.float32)}, None, "which is not VeRA's"),
    ({"peft_type": "LORA", "r": 2}, None, None, "adapter holds VeRA factors (`"),
    ({**CFG, "projection_prng_key": "0"}, None, None, 'projection_prng_key = "0", expected an integer'),
    ({**CFG, "save_projection": "no"}, None, None, 'save_projection = "no", expected true or false'),
    (None, {f"{PRE}model.layers.0.self_attn.k_proj.vera_lambda_b": np.ones(16, np.float32),
            f"{PRE}model.layers.0.self_attn.k_proj.vera_lambda_d": np.ones(2, np.float32)}, None,
     "VeRA target `model.layers.0.self_attn.k_proj.weight` has no weight in the base"),
])
def test_hostile_vera_adapters_are_one_line_exit_2(tmp_path, rng, config, tensors, base_extra, expect):
    base, ad = _pair(tmp_path, rng, config, tensors, base_extra)
    contract(["compare", str(base), str(ad)], ad, expect, tmp_path)


def test_inspect_names_the_modules_and_the_projections(tmp_path, rng):
    from click.testing import CliRunner

    from weightdiff.cli import main

    _, ad = _pair(tmp_path, rng)
    out = CliRunner().invoke(main, ["inspect", str(ad)])
    assert out.exit_code == 0 and "PEFT VeRA adapter" in out.stdout
    assert "adapter     VeRA r=2, 2 modules, shared projections saved (projection_prng_key 0)" in out.stdout
    j = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).stdout)
    assert j["adapter"] == {"peft_type": "VERA", "r": 2, "target_modules": ["q_proj", "down_proj"],
                            "base_model": None, "modules": 2, "fan_in_fan_out": False, "save_projection": True,
                            "projection_prng_key": 0}


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    """The columns of vera_A each module reads are set by the checks a worker runs as the parent does."""
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_pair(tmp_path, rng), 2)


def test_projections_not_saved_need_torch_to_be_drawn_again(tmp_path, rng, monkeypatch):
    import sys

    base, ad = _pair(tmp_path, rng, {**CFG, "save_projection": False},
                     {"base_model.vera_A": None, "base_model.vera_B": None})
    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` fails, as without the extra
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors",
             "holds no projections (vera_A, vera_B): PEFT draws them again from projection_prng_key with torch's "
             "random generator, and so does weightdiff, with the torch extra", tmp_path)


def test_a_worker_draws_the_projections_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_pair(tmp_path, rng, {**CFG, "save_projection": False},
                                 {"base_model.vera_A": None, "base_model.vera_B": None}), 2)
