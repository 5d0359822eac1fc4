"""LoRA on parameters (PEFT's ``target_parameters``, its ParamWrapper), as gpt-oss fine-tunes train the experts a
layer stores fused in one parameter: each expert's factors measured exactly against its expert's matrix, checked
against PEFT 0.21's own ``merge_and_unload()`` in both orientations PEFT reads experts in, and bad input refused in
one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main

from test_hostile_adapters import contract
from test_hra_adapter import factors_read_as_merged

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

E = 4                       # experts
PRE = "base_model.model."


def _gpt_oss(hidden=32, inter=48):
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"])).eval()


def _peft(model, tmp_path, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
        pm.save_pretrained(tmp_path / "ad")
        return pm.merge_and_unload()


def _saved(tmp_path, make=_gpt_oss, **config):
    """(base, adapter, merged model) folders of a tiny gpt-oss and a LoRA with ``config``."""
    make().save_pretrained(tmp_path / "base")
    _peft(make(), tmp_path, **config).save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


def _read_as_merged(base, ad, merged, rank, note):
    """``factors_read_as_merged`` (each changed matrix measured from its factors, rank exactly ``rank``, with the
    merged model's norm and cosine), and each expert's record note holding ``note``."""
    got, changed = factors_read_as_merged(base, ad, merged, rank, 1e-5, 1e-6, "adapter: target_parameters: ")
    for n, rec in changed.items():
        if ".experts." in n:
            assert rec["note"].startswith("LoRA on parameter") and note in rec["note"], rec["note"]
    return got, changed


def test_gpt_oss_experts_read_as_the_merged_model(tmp_path):
    """OpenAI's gpt-oss recipe: LoRA on attention modules and on chosen layers' fused experts (gate_up_proj and
    down_proj of one layer: two wrappers nested in one module, gate_up_proj innermost), read [experts, in, out]."""
    base, ad, merged = _saved(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"],
                              target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj",
                                                 "0.mlp.experts.down_proj"])
    got, changed = _read_as_merged(base, ad, merged, 2, "(B_e @ A_e)^T (the experts read [experts, in, out])")
    names = {n for n in changed if ".experts." in n}
    assert names == {f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(E)
                     for layer, p in ((1, "gate_up_proj"), (1, "down_proj"), (0, "down_proj"))}
    # the change written down takes exactly the adapter's own numbers: r (m + n) per expert and module
    adapter = sum(int(np.prod(t.shape)) for t in _tensors(ad).values())
    scope = got["summary"]["scope"]
    assert scope["delta_params_changed"] == adapter == 2 * 2 * (32 + 32) + E * 2 * ((32 + 96) + 2 * (48 + 32))
    assert any(x.startswith("adapter: target_parameters: 3 parameters adapted by PEFT's ParamWrapper, 3 of them fused "
                            "experts, counted above as their 12 experts' matrices") for x in got["plan"]["notes"])
    note = changed["model.layers.1.mlp.experts.3.gate_up_proj"]["note"]
    assert "expert 3 of 4, its factors rows 6-7 of `base_model.model.model.layers.1.mlp.experts.base_layer" in note
    assert "columns 3, 7 of" in note


@pytest.mark.parametrize("modules", [["q_proj"], "all-linear", ".*self_attn\\.q_proj"])
def test_bare_parameter_names_beside_target_modules(tmp_path, modules):
    """target_parameters by bare name (`gate_up_proj` matches every module's parameter of that name) beside
    target_modules: the modules target_modules adapts are LoRA layers (PEFT wraps no parameter of them as well), the
    experts' parameters are read as above; all as PEFT merges them."""
    base, ad, merged = _saved(tmp_path, r=2, lora_alpha=4, target_modules=modules,
                              target_parameters=["gate_up_proj", "down_proj"])
    got, changed = _read_as_merged(base, ad, merged, 2, "(B_e @ A_e)^T")
    assert sum(".experts." in n for n in changed) == 2 * 2 * E and "model.layers.1.self_attn.q_proj.weight" in changed


def _tensors(folder):
    return _tensors_of(folder / "adapter_model.safetensors")


def test_square_experts_alone_are_refused_whatever_the_model(tmp_path):
    """gpt-oss-20b's down_proj experts are square (2880 x 2880): either orientation fits, and which one PEFT used
    depends on its version and the transformers it ran with, none of which the adapter or the base's config says
    (gpt_oss or not): with no non-square parameter in the adapter, it is refused rather than read one way."""
    base, ad, _ = _saved(tmp_path, lambda: _gpt_oss(32, 32), r=2, lora_alpha=2, target_modules=[],
                         target_parameters=["mlp.experts.down_proj"])
    assert json.loads((base / "config.json").read_text())["model_type"] == "gpt_oss"
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors",
             "fit its square 32 x 32 experts either way", tmp_path)


def test_square_experts_follow_their_non_square_neighbour(tmp_path):
    """gpt-oss-20b's layout (hidden = intermediate: down_proj square, gate_up_proj not): the recipe's two parameters,
    the square one read the way the other's shapes say, as PEFT merges both."""
    base, ad, merged = _saved(tmp_path, lambda: _gpt_oss(32, 32), r=2, lora_alpha=2, target_modules=[],
                              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _, changed = _read_as_merged(base, ad, merged, 2, "(B_e @ A_e)^T")
    assert sum(".down_proj" in n for n in changed) == 2 * E


class _Experts(torch.nn.Module):
    """A fused experts module that reads its parameters [experts, out, in] (no ``is_transposed``): PEFT 0.21
    swaps its in and out features for it, so the expert's change is B_e A_e."""

    def __init__(self, out=12, inner=8):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, out, inner) * 0.1)
        self.down_proj = torch.nn.Parameter(torch.randn(E, inner, inner) * 0.1)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = torch.nn.Module()
        self.model.layers[0].mlp.experts = _Experts()
        self.model.layers[0].mlp.gate = torch.nn.Linear(8, E)


def _toy_saved(tmp_path, targets):
    from safetensors.torch import save_file

    def state(m):
        return {k: v.detach().contiguous() for k, v in m.state_dict().items()}

    torch.manual_seed(3)
    (tmp_path / "base").mkdir()
    save_file(state(_Toy()), tmp_path / "base" / "model.safetensors")
    torch.manual_seed(3)
    merged = _peft(_Toy(), tmp_path, r=2, lora_alpha=3, target_modules=[], target_parameters=targets)
    (tmp_path / "merged").mkdir()
    save_file(state(merged), tmp_path / "merged" / "model.safetensors")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


def test_experts_read_out_in_and_a_square_one_follows_its_neighbour(tmp_path):
    """A module read [experts, out, in]: the non-square gate_up_proj's factors say so, and the square down_proj
    takes the same orientation (one module class, one PEFT): both as PEFT merges them."""
    base, ad, merged = _toy_saved(tmp_path, ["gate_up_proj", "down_proj"])
    _, changed = _read_as_merged(base, ad, merged, 2, "analysed exactly as B_e @ A_e")
    assert len(changed) == 2 * E
    # the square one alone: nothing says which way, and the base has no config.json
    (tmp_path / "sq").mkdir()
    b2, a2, _ = _toy_saved(tmp_path / "sq", ["down_proj"])
    contract(["compare", str(b2), str(a2)], a2 / "adapter_model.safetensors", "either way", tmp_path)


def test_inspect_names_the_parameters(tmp_path):
    _, ad, _ = _saved(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"],
                      target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "r=2 lora_alpha=4 scale=2, 4 LoRA factor pairs (ranks 2)" in r.output, r.output
    assert ("parameters  model.layers.1.mlp.experts.gate_up_proj (4 experts), model.layers.1.mlp.experts.down_proj "
            "(4 experts) (target_parameters)") in r.output
    a = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert a["factors"] == 4 and a["target_parameters"] == ["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"]
    assert a["parameters"] == {"model.layers.1.mlp.experts.gate_up_proj": 4, "model.layers.1.mlp.experts.down_proj": 4}


def test_a_worker_measures_the_experts_as_the_parent_does(tmp_path):
    from test_lycoris_adapter import assert_worker_matches

    base, ad, _ = _saved(tmp_path, r=2, lora_alpha=4, target_modules=[],
                         target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    assert_worker_matches(base, ad, 2 * E)


# -- bad input ---------------------------------------------------------------------------------------------------

def _edited(tmp_path, config=None, drop=()):
    """The gpt-oss adapter of two nested wrappers with its config edited and tensors left out."""
    from safetensors.numpy import save_file

    base, ad, _ = _saved(tmp_path, r=2, lora_alpha=4, target_modules=[],
                         target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    t = {k: v for k, v in _tensors(ad).items() if not any(d in k for d in drop)}
    save_file(t, str(ad / "adapter_model.safetensors"))
    return base, ad


@pytest.mark.parametrize("config, drop, names_config, expect", [
    ({"use_dora": True}, (), True, "target_parameters with use_dora, which PEFT's ParamWrapper refuses"),
    ({"target_parameters": "mlp.experts.down_proj"}, (), True, "expected a list of parameter names"),
    ({"target_parameters": ["1.mlp.experts.down_proj"]}, (), False,
     "has 2 LoRA factor pairs but target_parameters names 1 of its parameters (down_proj)"),
    ({"r": 3}, (), False, "are not PEFT's ParamWrapper's for r = 3"),
    ({"r": 1, "rank_pattern": {"gate_up_proj": 2}}, (), False,      # an r of 1: 8 rows read as 8 experts
     "has it as 4 experts, not 8, so expert 4's matrix `model.layers.1.mlp.experts.4.down_proj` cannot be found"),
    ({}, ("experts.lora_B",), False, "has only one of its A/B factors"),
    ({"target_parameters": ["mlp.experts.w_in", "mlp.experts.w_out"]}, (), False,
     "which is not known for w_in, w_out"),
])
def test_refused(tmp_path, config, drop, names_config, expect):
    base, ad = _edited(tmp_path, config, drop)
    contract(["compare", str(base), str(ad)], ad / ("adapter_config.json" if names_config else
                                                    "adapter_model.safetensors"), expect, tmp_path)


def test_experts_the_base_does_not_hold(tmp_path):
    """Fused experts LoRA against a base that keeps its experts' matrices apart (as Mixtral's checkpoints do, which
    transformers fuses when it loads them): refused, naming the parameter, not read as tensors added."""
    base, ad = _edited(tmp_path)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(base / "model.safetensors"))
    save_file({k: v for k, v in t.items() if "layers.1.mlp.experts.gate_up_proj" not in k},
              str(base / "model.safetensors"))
    line = contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors",
                    "LoRA on fused experts parameter `model.layers.1.mlp.experts.gate_up_proj` (target_parameters, "
                    "4 experts): the base", tmp_path)
    assert "holds no such tensor (transformers may fuse" in line


def test_against_gpt_oss_as_released_mxfp4(tmp_path):
    """gpt-oss as released keeps its experts in MXFP4 (blocks and scales): each expert's factor pair is measured
    against the dequantized expert, and reads as numpy's merge (PEFT's einsum "o r e, e r i -> e i o") of the
    factors into transformers' dequantization of the base."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    rng = np.random.default_rng(5)
    L = "model.layers.0.mlp.experts."
    n, rows, groups, r = 3, 16, 2, 2                    # gate_up: [experts, hidden = groups x 32, 2 inter = rows]
    blocks = torch.from_numpy(rng.integers(0, 256, (n, rows, groups, 16)).astype(np.uint8))
    scales = torch.from_numpy(rng.integers(120, 126, (n, rows, groups)).astype(np.uint8))
    (tmp_path / "base").mkdir()
    save_file({L + "gate_up_proj_blocks": blocks, L + "gate_up_proj_scales": scales,
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}))
    a = rng.normal(0, 0.1, (n * r, groups * 32)).astype(np.float32)
    b = rng.normal(0, 0.1, (rows, n * r)).astype(np.float32)
    (tmp_path / "ad").mkdir()
    save_file({PRE + L.rstrip(".") + ".lora_A.weight": torch.from_numpy(a),
               PRE + L.rstrip(".") + ".lora_B.weight": torch.from_numpy(b)}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 3, "target_modules": [], "target_parameters": ["gate_up_proj"]}))
    delta = np.einsum("ore,eri->eio", b.astype(np.float64).reshape(rows, r, n),
                      a.astype(np.float64).reshape(n, r, -1)) * 1.5
    w = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).double().numpy()
    got = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "ad")).to_dict()
    t = {x["name"]: x for x in got["tensors"]}
    for e in range(n):
        x = t[L + f"{e}.gate_up_proj"]
        assert x["compared"] == "factors" and x["shape"] == [groups * 32, rows]
        assert x["rank"]["numerical_rank"] == r and x["rank"]["exact"]
        assert x["norm_delta"] == pytest.approx(np.linalg.norm(delta[e]), rel=1e-9)
        assert x["norm_base"] == pytest.approx(np.linalg.norm(w[e]), rel=1e-9)
        assert x["cosine"] == pytest.approx(np.sum(w[e] * (w[e] + delta[e])) / np.linalg.norm(w[e])
                                            / np.linalg.norm(w[e] + delta[e]), abs=1e-9)
    assert got["summary"]["scope"]["delta_params_changed"] == a.size + b.size


def test_a_million_experts_are_refused_before_any_is_built(tmp_path):
    from safetensors.numpy import save_file

    base, ad = _edited(tmp_path)
    key = PRE + "model.layers.1.mlp.experts.lora_"
    save_file({key + "A.weight": np.zeros((10 ** 6, 1), np.float32), key + "B.weight": np.zeros((1, 10 ** 6), np.float32)},
              str(ad / "adapter_model.safetensors"))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1, "target_parameters": ["down_proj"]}))
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors",
             "stack 1,000,000 experts of rank 1: more than the 4,096", tmp_path)


def _moe(kind):
    """A tiny transformers v5 MoE whose experts are fused parameters in the model and kept apart on disk (its
    save_pretrained writes each expert's own tensors, as the released checkpoints hold them)."""
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=2)).eval()
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=2)).eval()


@pytest.mark.parametrize("kind, apart", [("qwen3_moe", ("gate_proj", "up_proj", "down_proj")),
                                         ("mixtral", ("w1", "w3", "w2"))])
def test_experts_the_base_keeps_apart_read_as_the_merged_model(tmp_path, kind, apart):
    """Qwen3 MoE and Mixtral in transformers v5: the model fuses each layer's experts into gate_up_proj [experts,
    2 m, n] and down_proj (LoRA on them by target_parameters), and the checkpoint keeps each expert's gate, up and
    down projections apart (Mixtral's as w1, w3, w2 under block_sparse_moe): each expert's share of the factors is
    split by rows, gate first, and measured against its own tensors, as PEFT's merge gives them."""
    base, ad, merged = _saved(tmp_path, lambda: _moe(kind), r=2, lora_alpha=4, target_modules=[],
                              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    stored = _tensors_of(base / "model.safetensors")
    assert not any("gate_up_proj" in n for n in stored)
    got, changed = _read_as_merged(base, ad, merged, 2, "analysed exactly as B_e @ A_e")
    assert {n.rsplit(".", 2)[1] for n in changed} == set(apart) and len(changed) == 2 * 3 * E
    gate = next(x for n, x in changed.items() if f".3.{apart[0]}." in n and "layers.1" in n)["note"]
    up = next(x for n, x in changed.items() if f".3.{apart[1]}." in n and "layers.1" in n)["note"]
    assert "rows 0-23 of it (the base keeps this part of the fused [48, 32] expert apart)" in gate
    assert "rows 24-47 of it" in up
    assert any(x.startswith("adapter: 4 fused experts parameters measured against the experts the base keeps apart "
                            "or under older names")
               for x in got["plan"]["notes"])


def _tensors_of(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_granitemoe_experts_under_their_old_names(tmp_path):
    """GraniteMoE's checkpoints keep each layer's experts fused as block_sparse_moe.input_linear / output_linear, which
    transformers v5 loads as experts.gate_up_proj / down_proj (the parameters a LoRA by target_parameters adapts):
    each expert's pair against the split input_linear / output_linear matrix, as PEFT merges it."""
    def make():
        torch.manual_seed(0)
        return transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2)).eval()

    base, ad, merged = _saved(tmp_path, make, r=2, lora_alpha=4, target_modules=[],
                              target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    assert any(".block_sparse_moe.input_linear.weight" in n for n in _tensors_of(base / "model.safetensors"))
    _, changed = _read_as_merged(base, ad, merged, 2, "analysed exactly as B_e @ A_e")
    assert sorted(changed) == sorted(f"model.layers.{i}.block_sparse_moe.{p}.{e}.weight" for i in (0, 1)
                                     for p in ("input_linear", "output_linear") for e in range(E))
