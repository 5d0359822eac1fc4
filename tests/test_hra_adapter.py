"""PEFT's HRA adapters (Householder reflection adaptation): the change W (H - I) measured exactly as the factor pair
it is (rank at most r), checked against PEFT 0.21's own reflections (``get_delta_weight``) and
``merge_and_unload()``, and bad input refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.peft_hra import factor_b, reflections
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("gs", [False, True])
@pytest.mark.parametrize("r, inputs", [(1, 5), (2, 7), (4, 16), (6, 9), (8, 8)])
def test_the_factor_pair_is_peft_own_reflections(rng, gs, r, inputs):
    """W + B @ A equals W @ H with H from PEFT's ``HRALayer.get_delta_weight`` (float64), vectors of mixed scales,
    under both forms."""
    from peft.tuners.hra.layer import HRALinear

    u = rng.standard_normal((inputs, r)) * np.exp(rng.uniform(-3, 3, r))
    w = rng.standard_normal((11, inputs))
    attrs = {"hra_r": {"a": r}, "hra_apply_GS": {"a": gs}, "hra_u": {"a": torch.tensor(u, dtype=torch.float64)}}
    if hasattr(HRALinear, "_get_householder_vt"):     # PEFT 0.22: H from the compact WY form (V, T) of the reflections
        attrs["_get_householder_vt"] = HRALinear._get_householder_vt
    layer = type("L", (), attrs)()
    h = HRALinear.get_delta_weight(layer, "a").numpy()
    a = reflections(u, gs)
    b = factor_b(w @ a.T, a, gs)
    np.testing.assert_allclose(w + b @ a, w @ h, rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(b @ a) <= r


def _llama(dtype):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval().to(dtype)


def _saved(tmp_path, model, **cfg):
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.HRAConfig(init_weights=False, **cfg))
        pm.save_pretrained(tmp_path / "ad")
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


@pytest.mark.parametrize("gs", [False, True])
@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("bfloat16", 2e-3)])
def test_llama_reads_as_its_merged_model(tmp_path, gs, dtype, rel):
    """q_proj and down_proj of two layers: the changed tensors, norms and cosines are the merged model's (within the
    merge's float32 or bfloat16 round-off: the factors give the exact change), the rank exactly r."""
    base, ad, merged = _saved(tmp_path, _llama(getattr(torch, dtype)), r=4, apply_GS=gs,
                              target_modules=["q_proj", "down_proj"])
    got, g = factors_read_as_merged(base, ad, merged, 4, rel, rel, "adapter: 4 HRA modules (each measured exactly as "
                                    "the factor pair W (H - I) is")
    assert len(g) == 4
    for n, rec in g.items():
        assert rec["note"].startswith(f"HRA `base_model.model.{n.removesuffix('.weight')}.hra_u` (4 Householder "
                                      "reflections of the inputs")
    assert got["summary"]["verdict"] == "derived"


def factors_read_as_merged(base, ad, merged, rank: int, rel: float, cos: float, plan_note: str):
    """``compare base ad`` against ``compare base merged``: the same changed tensors, each measured from the
    adapter's factors (rank exactly ``rank``) with the merged model's norm and cosine (within ``rel`` and ``cos``:
    the merge's round-off), the same verdict, flag adapter, and a plan note starting ``plan_note``; the adapter's
    document and its changed records by name."""
    got = weightdiff.compare(str(base), str(ad)).to_dict()
    want = weightdiff.compare(str(base), str(merged)).to_dict()
    g, w = ({t["name"]: t for t in d["tensors"]} for d in (got, want))
    changed = sorted(n for n, t in w.items() if t["status"] == "changed")
    assert changed and sorted(n for n, t in g.items() if t["status"] == "changed") == changed
    for n in changed:
        assert g[n]["compared"] == "factors" and g[n]["rank"]["numerical_rank"] == rank and g[n]["rank"]["exact"]
        assert g[n]["norm_delta"] == pytest.approx(w[n]["norm_delta"], rel=rel)
        assert g[n]["cosine"] == pytest.approx(w[n]["cosine"], abs=cos)
    assert got["summary"]["verdict"] == want["summary"]["verdict"] and "adapter" in got["summary"]["flags"]
    assert any(x.startswith(plan_note) for x in got["plan"]["notes"]), got["plan"]["notes"]
    return got, {n: g[n] for n in changed}


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.head = torch.nn.Linear(5, 4)


def test_a_conv2d_reads_as_numpy_merges_it(tmp_path):
    """A Conv2d (3 inputs, 3 x 3 kernel: 27 inputs to reflect) and a Linear: the records against the weights PEFT's
    merge gives, computed in numpy from the saved vectors."""
    from safetensors.torch import save_file as torch_save

    torch.manual_seed(2)
    model = _Conv()
    (tmp_path / "base").mkdir()
    torch_save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.HRAConfig(r=2, target_modules=["conv", "head"], init_weights=False))
        pm.save_pretrained(tmp_path / "ad")
        merged = {k: v.detach().numpy().astype(np.float64) for k, v in pm.merge_and_unload().state_dict().items()}
    torch.manual_seed(2)
    base = {k: v.detach().numpy().astype(np.float64) for k, v in _Conv().state_dict().items()}   # the same model
    got = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "ad"))
    for name in ("conv.weight", "head.weight"):
        rec = got.tensor(name)
        d = (merged[name] - base[name]).reshape(base[name].shape[0], -1)
        assert rec.compared == "factors" and rec.rank.numerical_rank == 2
        assert rec.norm_delta == pytest.approx(float(np.linalg.norm(d)), rel=1e-5)
        np.testing.assert_allclose(rec.rank.spectrum[:2], np.linalg.svd(d, compute_uv=False)[:2], rtol=1e-4)


def test_inspect_names_the_reflections(tmp_path):
    _, ad, _ = _saved(tmp_path, _llama(torch.float32), r=2, apply_GS=True, target_modules=["q_proj"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "format      PEFT HRA adapter, 1 file" in r.output, r.output
    assert "adapter     HRA r=2 Householder reflections (apply_GS), 2 modules" in r.output
    a = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert a == {"peft_type": "HRA", "r": 2, "apply_GS": True, "target_modules": ["q_proj"], "base_model": None,
                 "modules": 2}


# -- bad input, a worker -----------------------------------------------------------------------------------------

PRE = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


def _write(tmp_path, rng, config=None, tensors=None, base=None):
    b = tmp_path / "base"
    b.mkdir(parents=True, exist_ok=True)
    save_file(b / "model.safetensors", base or {f"{Q}.weight": rng.standard_normal((24, 16)).astype(np.float32),
                                                "model.layers.0.mlp.down_proj.weight":
                                                    rng.standard_normal((16, 40)).astype(np.float32)})
    ad = tmp_path / "ad"
    ad.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"]}
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    save_file(ad / "adapter_model.safetensors",
              tensors if tensors is not None else {f"{PRE}{Q}.hra_u": rng.standard_normal((16, 2)).astype(np.float32)})
    return b, ad


def test_a_written_adapter_is_measured_as_numpy_merges_it(tmp_path, rng):
    b, ad = _write(tmp_path, rng)
    from safetensors.numpy import load_file

    w = load_file(str(b / "model.safetensors"))[f"{Q}.weight"].astype(np.float64)
    u = load_file(str(ad / "adapter_model.safetensors"))[f"{PRE}{Q}.hra_u"].astype(np.float64)
    h = np.eye(16)
    for i in range(2):
        v = (u[:, i] / np.linalg.norm(u[:, i]))[:, None]
        h = h - 2 * h @ v @ v.T
    d = w @ h - w
    rec = weightdiff.compare(str(b), str(ad)).tensor(f"{Q}.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(d)), rel=1e-12)
    np.testing.assert_allclose(rec.rank.spectrum[:2], np.linalg.svd(d, compute_uv=False)[:2], rtol=1e-10)


@pytest.mark.parametrize("config, tensors, where, expect", [
    ({"r": 3}, None, "model", "holds 2 vectors, but adapter_config.json says r = 3"),
    ({"r": 0}, None, "config", "r = 0, expected a positive integer"),
    ({"apply_GS": "yes"}, None, "config", "apply_GS"),
    (None, {f"{PRE}{Q}.hra_u": np.ones((15, 2), np.float32)}, "model", "PEFT builds [16, 2]"),
    (None, {f"{PRE}{Q}.hra_u": np.ones(16, np.float32)}, "model", "expected a float matrix [inputs, r]"),
    (None, {f"{PRE}{Q}.hra_u": np.ones((16, 2), np.int32)}, "model", "expected a float matrix [inputs, r]"),
    (None, {f"{PRE}{Q}.hra_u": np.full((16, 2), np.nan, np.float32)}, "model", "NaN or Inf"),
    (None, {f"{PRE}{Q}.hra_u": np.stack([np.ones(16), np.zeros(16)], 1).astype(np.float32)}, "model",
     "has vector 1 all zero"),
    ({"apply_GS": True}, {f"{PRE}{Q}.hra_u": np.stack([np.ones(16), 3 * np.ones(16)], 1).astype(np.float32)}, "model",
     "has vector 1 in the span of those before it"),
    (None, {f"{PRE}{Q}.hra_u": np.ones((16, 2), np.float32), f"{PRE}{Q}.lora_A.weight": np.ones((2, 16), np.float32)},
     "model", "which is not HRA's (hra_u), but adapter_config.json says peft_type HRA"),
    (None, {f"{PRE}model.layers.5.self_attn.q_proj.hra_u": np.ones((16, 2), np.float32)}, "model",
     "has no weight in the base"),
])
def test_bad_hra_adapters_are_refused_in_one_line(tmp_path, rng, config, tensors, where, expect):
    b, ad = _write(tmp_path, rng, config, tensors)
    names = ad / ("adapter_config.json" if where == "config" else "adapter_model.safetensors")
    contract(["compare", str(b), str(ad)], names, expect, tmp_path)


def test_gpt2_conv1d_and_an_integer_base_are_refused(tmp_path, rng):
    b, ad = _write(tmp_path / "a", rng, {"target_modules": ["c_attn"]},
                   {f"{PRE}transformer.h.0.attn.c_attn.hra_u": np.ones((16, 2), np.float32)},
                   {"transformer.h.0.attn.c_attn.weight": np.ones((16, 48), np.float32)})
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", "GPT-2's Conv1D", tmp_path / "a")
    b, ad = _write(tmp_path / "b", rng, base={f"{Q}.weight": np.ones((24, 16), np.int8)})
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", "quantized or not float", tmp_path / "b")


def test_hra_vectors_under_a_lora_config_are_refused(tmp_path, rng):
    b, ad = _write(tmp_path, rng, {"peft_type": "LORA", "lora_alpha": 2})
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", "HRA", tmp_path)


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_write(tmp_path, rng), 1)
