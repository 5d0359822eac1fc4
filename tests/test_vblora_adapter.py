"""PEFT's VBLoRA adapters (LoRA factors mixed from a shared vector bank): measured exactly as the factor pair they
make, in both of PEFT's save forms (logits, or top-k indices and weights), checked against PEFT 0.21's own
factors and ``merge_and_unload()``, and bad input refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


def _saved(tmp_path, make, topk_only, targets):
    make().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.VBLoRAConfig(
            r=4, target_modules=targets, vector_length=8, num_vectors=16, topk=2, save_only_topk_weights=topk_only))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(tmp_path / "ad")
        # the merged model of what was saved: a top-k-only adapter loads back as PEFT restores its logits
        peft.PeftModel.from_pretrained(make(), tmp_path / "ad").merge_and_unload().save_pretrained(tmp_path / "merged")
        back = peft.PeftModel.from_pretrained(make(), tmp_path / "ad")        # unmerged: its factors
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged", back


@pytest.mark.parametrize("topk_only", [False, True])
@pytest.mark.parametrize("model, targets", [(_llama, ["q_proj", "down_proj"]), (_gpt2, ["c_attn", "c_fc"])])
def test_adapters_read_as_their_merged_model(tmp_path, topk_only, model, targets):
    """Llama (Linear) and GPT-2 (Conv1D, fan_in_fan_out), logits and top-k-only: each module's factors are PEFT's own
    (``_get_lora_matrices``, float32), and the records the merged model's within float32 round-off, rank exactly r."""
    base, ad, merged, back = _saved(tmp_path, model, topk_only, targets)
    from weightdiff.io.checkpoint import locate
    from weightdiff.io.peft_adapter import factor_pair
    from weightdiff.kernels.dtypes import decode

    with locate(ad) as ck:
        for f in ck.lora:
            values = {role: decode(np.asarray(ck.read(n)), ck.tensors[n].dtype).reshape(ck.tensors[n].shape)
                      for role, n in f.parts.items()}
            a, b = factor_pair(f, values)
            module = back.base_model.model.get_submodule(f.target.removesuffix(".weight"))
            want_a, want_b = (x.detach().double().numpy() for x in module._get_lora_matrices("default"))
            np.testing.assert_allclose(a, want_a, rtol=0, atol=1e-6)
            np.testing.assert_allclose(b, want_b, rtol=0, atol=1e-6)
    from test_hra_adapter import factors_read_as_merged

    _, g = factors_read_as_merged(base, ad, merged, 4, 1e-5, 1e-6, "adapter: 4 VBLoRA modules (each measured exactly "
                                  "as the factor pair its top-k mixtures")
    assert len(g) == 4 and all(r["note"].startswith("VBLoRA adapter (r=4) analysed exactly from its factors")
                               for r in g.values())


def test_inspect_names_the_bank(tmp_path):
    _, ad, _, _ = _saved(tmp_path, _llama, True, ["q_proj"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "format      PEFT VBLoRA adapter, 1 file" in r.output, r.output
    assert "adapter     VBLoRA r=4 topk=2, a bank of 16 vectors of 8 (top-k weights saved), 2 modules" in r.output
    a = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert a == {"peft_type": "VBLORA", "r": 4, "topk": 2, "num_vectors": 16, "vector_length": 8,
                 "save_only_topk_weights": True, "fan_in_fan_out": False, "target_modules": ["q_proj"],
                 "base_model": None, "modules": 2}


# -- bad input, a worker -----------------------------------------------------------------------------------------

PRE = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
BANK = "base_model.vblora_vector_bank"


def _write(tmp_path, rng, config=None, tensors=None):
    b = tmp_path / "base"
    b.mkdir(parents=True, exist_ok=True)
    save_file(b / "model.safetensors", {f"{Q}.weight": rng.standard_normal((16, 24)).astype(np.float32)})
    ad = tmp_path / "ad"
    ad.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "VBLORA", "r": 2, "topk": 2, "num_vectors": 5, "vector_length": 8,
           "target_modules": ["q_proj"]}
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    t = {BANK: rng.standard_normal((5, 8)).astype(np.float32),
         f"{PRE}{Q}.vblora_logits_A": rng.standard_normal((2, 3, 5)).astype(np.float32),
         f"{PRE}{Q}.vblora_logits_B": rng.standard_normal((2, 2, 5)).astype(np.float32)}
    save_file(ad / "adapter_model.safetensors", {**t, **(tensors or {})} if tensors is not False else {})
    return b, ad


def test_a_written_adapter_is_measured_as_numpy_mixes_it(tmp_path, rng):
    b, ad = _write(tmp_path, rng)
    from safetensors.numpy import load_file

    t = load_file(str(ad / "adapter_model.safetensors"))
    bank = t[BANK].astype(np.float64)

    def piece(logits):
        out = np.zeros(logits.shape[:-1] + (8,))
        for ix in np.ndindex(*logits.shape[:-1]):
            top = np.argsort(logits[ix])[::-1][:2]
            w = np.exp(logits[ix][top]) / np.exp(logits[ix][top]).sum()
            out[ix] = w @ bank[top]
        return out

    a = piece(t[f"{PRE}{Q}.vblora_logits_A"].astype(np.float64)).reshape(2, 24)
    bb = piece(t[f"{PRE}{Q}.vblora_logits_B"].astype(np.float64)).transpose(0, 2, 1).reshape(16, 2)
    d = bb @ a
    rec = weightdiff.compare(str(b), str(ad)).tensor(f"{Q}.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(d)), rel=1e-12)
    np.testing.assert_allclose(rec.rank.spectrum[:2], np.linalg.svd(d, compute_uv=False)[:2], rtol=1e-10)


def _tie():
    x = np.arange(30, dtype=np.float32).reshape(2, 3, 5)
    x[0, 0] = [0.0, 1.0, 1.0, 3.0, -1.0]          # the 2nd largest, 1.0, twice
    return x


@pytest.mark.parametrize("config, tensors, where, expect", [
    ({"topk": 9}, None, "config", "topk = 9 above num_vectors = 5"),
    ({"r": 0}, None, "config", "r = 0, expected a positive integer"),
    ({"save_only_topk_weights": 1}, None, "config", "save_only_topk_weights = 1, expected true or false"),
    ({"r": 3}, None, "model", "are not those PEFT builds with r=3"),
    ({"vector_length": 4}, None, "model", "vector bank"),
    (None, {f"{PRE}{Q}.vblora_logits_A": np.zeros((2, 2, 5), np.float32)}, "model",
     "make a change of 16 outputs x 16 inputs"),
    (None, {f"{PRE}{Q}.vblora_logits_A": _tie()}, "model", "tie at a piece's 2-th largest value"),
    (None, {f"{PRE}{Q}.vblora_logits_A": np.full((2, 3, 5), np.nan, np.float32)}, "model", "NaN or Inf"),
    (None, {f"{PRE}{Q}.lora_A.weight": np.ones((2, 24), np.float32)}, "model",
     "which is not VBLoRA's (vblora_logits_A, vblora_logits_B, vblora_vector_bank), but adapter_config.json says "
     "peft_type VBLORA"),
    ({"save_only_topk_weights": True}, None, "model", "for which PEFT loads A_topk_indices"),
])
def test_bad_vblora_adapters_are_refused_in_one_line(tmp_path, rng, config, tensors, where, expect):
    b, ad = _write(tmp_path, rng, config, tensors)
    names = ad / ("adapter_config.json" if where == "config" else "adapter_model.safetensors")
    contract(["compare", str(b), str(ad)], names, expect, tmp_path)


def _topk(rng, idx_a=None, w_a=None):
    t = {BANK: rng.standard_normal((5, 8)).astype(np.float32),
         f"{PRE}{Q}.vblora_logits_A_topk_indices": np.array([[[0, 1], [2, 3], [4, 0]]] * 2, np.uint8)
         if idx_a is None else idx_a,
         f"{PRE}{Q}.vblora_logits_A_topk_weights": np.full((2, 3, 1), 0.7, np.float32) if w_a is None else w_a,
         f"{PRE}{Q}.vblora_logits_B_topk_indices": np.array([[[1, 2], [3, 4]]] * 2, np.uint8),
         f"{PRE}{Q}.vblora_logits_B_topk_weights": np.full((2, 2, 1), 0.6, np.float32)}
    return t


@pytest.mark.parametrize("change, expect", [
    ({"idx_a": np.array([[[0, 5], [2, 3], [4, 0]]] * 2, np.uint8)}, "point outside the vector bank of 5"),
    ({"idx_a": np.array([[[1, 1], [2, 3], [4, 0]]] * 2, np.uint8)}, "repeat a vector within a piece"),
    ({"w_a": np.full((2, 3, 1), 1.5, np.float32)}, "not the first k - 1 of a softmax"),
    ({"w_a": np.full((2, 3, 1), -0.1, np.float32)}, "not the first k - 1 of a softmax"),
])
def test_bad_top_k_adapters_are_refused(tmp_path, rng, change, expect):
    b, ad = _write(tmp_path, rng, {"save_only_topk_weights": True}, False)
    save_file(ad / "adapter_model.safetensors", _topk(rng, **change))
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", expect, tmp_path)


def test_a_top_k_adapter_mixes_the_last_weight_as_one_minus_the_rest(tmp_path, rng):
    b, ad = _write(tmp_path, rng, {"save_only_topk_weights": True}, False)
    t = _topk(rng)
    save_file(ad / "adapter_model.safetensors", t)
    bank = t[BANK].astype(np.float64)
    a = (0.7 * bank[t[f"{PRE}{Q}.vblora_logits_A_topk_indices"][..., 0]]
         + np.float64(1 - np.float32(0.7)) * bank[t[f"{PRE}{Q}.vblora_logits_A_topk_indices"][..., 1]])
    w = np.float64(np.float32(0.6))
    bb = w * bank[t[f"{PRE}{Q}.vblora_logits_B_topk_indices"][..., 0]] + \
        (1 - w) * bank[t[f"{PRE}{Q}.vblora_logits_B_topk_indices"][..., 1]]
    d = bb.transpose(0, 2, 1).reshape(16, 2) @ a.reshape(2, 24)
    rec = weightdiff.compare(str(b), str(ad)).tensor(f"{Q}.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(d)), rel=1e-6)


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_write(tmp_path, rng), 1)
