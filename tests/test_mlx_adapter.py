"""mlx-lm's adapters (``adapters.safetensors`` and mlx-lm's ``adapter_config.json``), made by mlx-lm itself
(``linear_to_lora_layers``, its trainable parameters saved as ``mlx_lm.lora`` saves them) on a tiny Llama, and
measured against the model mlx-lm's own ``fuse`` gives: LoRA on Linear and Embedding layers, DoRA, a 4-bit
quantized base, a full fine-tune; bad input refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main

from test_hostile_adapters import contract
from test_hra_adapter import factors_read_as_merged

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402


def _model(seed=0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    m = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=96, num_key_value_heads=2,
                                    tie_word_embeddings=False))
    mx.eval(m.parameters())
    return m


def _save(folder: Path, model, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **(config or {})}))
    return folder


def _made(tmp_path, kind="lora", keys=("self_attn.q_proj", "mlp.down_proj"), quantized=False, scale=20.0):
    """(base, adapter, fused) folders: a tiny mlx-lm Llama (4-bit when ``quantized``), an adapter mlx-lm builds on it
    (trained factors drawn at random), and the model mlx-lm's fuse gives (dequantized)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _model()
    config = {}
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        config = {"quantization": {"group_size": 32, "bits": 4}}
    base = _save(tmp_path / "base", model, config)
    model.freeze()
    params = {"rank": 4, "scale": scale, "dropout": 0.0, "keys": list(keys)}
    linear_to_lora_layers(model, 2, params, use_dora=kind == "dora")
    mx.random.seed(1)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.02
        if kind == "dora" and hasattr(m, "m"):
            m.m = m.m * (1 + 0.05 * mx.random.normal(m.m.shape))
    ad = tmp_path / "ad"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (ad / "adapter_config.json").write_text(json.dumps({"model": str(base), "fine_tune_type": kind, "num_layers": 2,
                                                        "lora_parameters": params, "iters": 100}))
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    if quantized:                        # the layers left quantized, dequantized too (fuse --de-quantize)
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    return base, ad, _save(tmp_path / "fused", model)


def _read_as_fused(base, ad, fused, rank=4, rel=1e-5):
    """``factors_read_as_merged`` against the model mlx-lm's fuse gives, each record's note naming mlx-lm."""
    _, changed = factors_read_as_merged(base, ad, fused, rank, rel, 1e-6, "adapter: mlx-lm's (adapters.safetensors")
    assert all(r["note"].startswith("mlx-lm LoRA adapter (r=4, scale=20)") for r in changed.values())
    return changed


def test_lora_on_linear_layers_reads_as_mlx_fuses_it(tmp_path):
    recs = _read_as_fused(*_made(tmp_path))
    assert sorted(recs) == [f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]
    assert all("scale x lora_b^T @ lora_a^T" in r["note"] for r in recs.values())


def test_lora_on_the_embedding_table(tmp_path):
    """mlx-lm's LoRAEmbedding saves lora_a [vocab, r], lora_b [r, dims] and fuses scale x lora_a @ lora_b."""
    recs = _read_as_fused(*_made(tmp_path, keys=("model.embed_tokens", "self_attn.v_proj")))
    assert "scale x lora_a @ lora_b, an embedding table's" in recs["model.embed_tokens.weight"]["note"]


@pytest.mark.parametrize("keys", [("self_attn.q_proj", "mlp.down_proj"), ("model.embed_tokens", "self_attn.k_proj")])
def test_dora_reads_as_mlx_fuses_it(tmp_path, keys):
    """DoRA: each row of W + delta (an embedding table's too: a row per token) scaled to its magnitude m; the
    spectrum is of the low-rank direction term."""
    base, ad, fused = _made(tmp_path, kind="dora", keys=keys)
    got = weightdiff.compare(str(base), str(ad)).to_dict()
    want = {t["name"]: t for t in weightdiff.compare(str(base), str(fused)).to_dict()["tensors"]}
    changed = [t for t in got["tensors"] if t["status"] == "changed"]
    assert len(changed) == (4 if "mlp.down_proj" in keys else 3) and all(t["compared"] == "factors" for t in changed)
    for t in changed:
        assert t["norm_delta"] == pytest.approx(want[t["name"]]["norm_delta"], rel=1e-4)
        assert t["cosine"] == pytest.approx(want[t["name"]]["cosine"], abs=1e-6)
        assert "DoRA" in t["note"]


@pytest.mark.parametrize("kind, use_dora", [("lora", False), ("lora", None), ("dora", True)])
def test_a_config_from_before_fine_tune_type_reads_as_its_mlx_lm_loaded_it(tmp_path, kind, use_dora):
    """mlx-lm before ``fine_tune_type`` saved ``lora_layers`` and ``use_dora`` (its ``apply_lora_layers`` built DoRA
    layers by that key): the same adapter under that config reads as under today's, tensor for tensor."""
    base, ad, _ = _made(tmp_path, kind=kind)
    today = weightdiff.compare(str(base), str(ad)).to_dict()["tensors"]
    cfg = json.loads((ad / "adapter_config.json").read_text())
    old = {"model": cfg["model"], "lora_layers": cfg["num_layers"], "lora_parameters": cfg["lora_parameters"],
           **({} if use_dora is None else {"use_dora": use_dora})}
    (ad / "adapter_config.json").write_text(json.dumps(old))
    got = weightdiff.compare(str(base), str(ad)).to_dict()["tensors"]
    assert got == today and sum(t["compared"] == "factors" for t in got) == 4
    assert all(("DoRA" in t["note"]) == (kind == "dora") for t in got if t["compared"] == "factors")


def test_lora_on_a_4bit_base_reads_as_the_dequantized_fuse(tmp_path):
    """An mlx-community 4-bit base: the change is the factors' whatever the base's codes; the fused model (dequantized,
    as `mlx_lm.fuse --de-quantize` writes it) against the quantized base reads the same change."""
    _read_as_fused(*_made(tmp_path, quantized=True), rel=1e-5)


def test_a_full_fine_tune_compares_the_trained_tensors(tmp_path):
    """fine_tune_type full: adapters.safetensors holds the trained layers' weights, compared as they are; the
    others are the base's."""
    model = _model()
    base = _save(tmp_path / "base", model)
    ad = tmp_path / "ad"
    ad.mkdir()
    trained = {k: v + 0.01 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())
               if k.startswith("model.layers.1.")}
    mx.save_safetensors(str(ad / "adapters.safetensors"), trained)
    (ad / "adapter_config.json").write_text(json.dumps({"model": "base", "fine_tune_type": "full", "num_layers": 1}))
    got = weightdiff.compare(str(base), str(ad)).to_dict()
    by = {t["name"]: t for t in got["tensors"]}
    assert sorted(n for n, t in by.items() if t["status"] == "changed") == sorted(trained)
    assert all(t["status"] == "unchanged" for n, t in by.items() if n not in trained)
    assert any(x.startswith(f"adapter: an mlx-lm full fine-tune (adapters.safetensors): its {len(trained)} trained")
               for x in got["plan"]["notes"])


def test_lora_on_stacked_experts_reads_as_mlx_fuses_it(tmp_path):
    """A Qwen3 MoE's switch_mlp layers (mlx-lm's SwitchLinear, [experts, out, in]): lora_a [experts, r, in], lora_b
    [experts, out, r], fused as scale x lora_b[e] @ lora_a[e]; each expert's pair against its own matrix, which the
    reader splits out of the stacked weight under the Hugging Face names."""
    from mlx_lm.models import qwen3_moe
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=24,
        rms_norm_eps=1e-6, vocab_size=64, num_key_value_heads=2, head_dim=8, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=128, norm_topk_prob=True))
    mx.eval(model.parameters())
    base = _save(tmp_path / "base", model, {"model_type": "qwen3_moe"})
    model.freeze()
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["mlp.switch_mlp.gate_proj", "mlp.switch_mlp.down_proj"]}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(1)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.02
    ad = tmp_path / "ad"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                        "lora_parameters": params}))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    recs = _read_as_fused(base, ad, _save(tmp_path / "fused", model))
    assert sorted(recs) == sorted(f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in (0, 1) for e in range(4)
                                  for p in ("gate_proj", "down_proj"))


def test_inspect_names_mlx_lm(tmp_path):
    _, ad, _ = _made(tmp_path)
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "format      mlx-lm adapter, 1 file" in r.output, r.output
    assert "adapter     mlx-lm lora r=4 scale=20, 4 LoRA factor pairs, last 2 layers" in r.output
    a = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert (a["source"], a["fine_tune_type"], a["r"], a["scale"], a["factors"]) == ("mlx-lm", "lora", 4, 20.0, 4)


def test_a_worker_measures_the_layers_as_the_parent_does(tmp_path):
    from test_lycoris_adapter import assert_worker_matches

    base, ad, _ = _made(tmp_path)
    assert_worker_matches(base, ad, 4)


# -- bad input ---------------------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _written(tmp_path, config=None, tensors=None):
    from weightdiff.io.safetensors_write import save_file

    base, ad = tmp_path / "base", tmp_path / "ad"
    for f in (base, ad):
        f.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file(base / "model.safetensors", {Q + ".weight": rng.standard_normal((8, 6)).astype(np.float32)})
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                        "lora_parameters": {"rank": 2, "scale": 20.0}, **(config or {})}))
    t = {Q + ".lora_a": np.ones((6, 2), np.float32), Q + ".lora_b": np.ones((2, 8), np.float32)}
    save_file(ad / "adapters.safetensors", t if tensors is None else tensors)
    return base, ad


@pytest.mark.parametrize("config, tensors, names_config, expect", [
    ({"fine_tune_type": "qlora"}, None, True, "fine_tune_type 'qlora': only lora, dora and full are read"),
    ({"lora_parameters": [2, 20]}, None, True, "lora_parameters that is not an object"),
    ({"lora_parameters": {"rank": 0}}, None, True, "lora_parameters.rank"),
    ({"lora_parameters": {"rank": 3, "scale": 20.0}}, None, False, "have rank 2 but adapter_config.json gives "
                                                                    "lora_parameters.rank 3"),
    ({}, {Q + ".lora_a": np.ones((6, 2), np.float32)}, False, "has only one of lora_a and lora_b"),
    ({}, {Q + ".lora_a": np.ones((7, 2), np.float32), Q + ".lora_b": np.ones((2, 8), np.float32)}, False,
     "do not fit the base weight, which is [8, 6]"),
    ({}, {Q + ".lora_a": np.ones((6, 2), np.float32), Q + ".lora_b": np.ones((3, 8), np.float32)}, False,
     "do not chain"),
    ({}, {Q + ".lora_a": np.ones((6, 2), np.float32), Q + ".lora_b": np.ones((2, 8), np.float32),
          Q + ".m": np.ones(8, np.float32)}, False, "holds the DoRA magnitude"),
    ({"fine_tune_type": "dora"}, None, False, "has no magnitude"),
    ({"fine_tune_type": None}, None, True, "fine_tune_type None: only lora, dora and full are read"),
    ({}, {"model.layers.0.mlp.switch_mlp.gate_proj.lora_a": np.ones((4, 2, 6), np.float32),
          "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": np.ones((3, 8, 2), np.float32)}, False,
     "(a stacked experts layer's are lora_a [experts, r, in], lora_b [experts, out, r]"),
    ({}, {Q + ".lora_a": np.full((6, 2), np.nan, np.float32), Q + ".lora_b": np.ones((2, 8), np.float32)}, False,
     "NaN or Inf"),
    ({"lora_parameters": {"rank": 2, "scale": 1e300}}, None, False, "too large to measure: |scale| x |A| x |B| = "),
    ({}, {Q + ".lora_a": np.ones((2, 1), np.uint32), Q + ".lora_a_scales": np.ones((2, 1), np.float32),
          Q + ".lora_b": np.ones((8, 1), np.uint32), Q + ".lora_b_scales": np.ones((8, 1), np.float32)}, False,
     "its factors are quantized for inference"),
    ({"lora_parameters": {"rank": 2, "scale": 1e300}}, None, False, "(check lora_parameters.scale in adapter_config.json)"),
])
def test_refused(tmp_path, config, tensors, names_config, expect):
    base, ad = _written(tmp_path, config, tensors)
    contract(["compare", str(base), str(ad)], ad / ("adapter_config.json" if names_config else "adapters.safetensors"),
             expect, tmp_path)


@pytest.mark.parametrize("use_dora, expect", [("true", "use_dora = 'true', expected true or false"),
                                               (True, "has no magnitude `model.layers.0.self_attn.q_proj.m`")])
def test_a_config_from_before_fine_tune_type_refused(tmp_path, use_dora, expect):
    """Without fine_tune_type, use_dora decides (older mlx-lm): a string is not a boolean, and DoRA needs its m."""
    base, ad = _written(tmp_path)
    (ad / "adapter_config.json").write_text(json.dumps({"lora_layers": 1, "use_dora": use_dora,
                                                        "lora_parameters": {"rank": 2, "scale": 20.0}}))
    contract(["compare", str(base), str(ad)], ad / ("adapter_config.json" if use_dora == "true" else
                                                    "adapters.safetensors"), expect, tmp_path)


def test_adapters_without_a_config_or_a_peft_config_without_its_weights(tmp_path):
    base, ad = _written(tmp_path)
    shutil.move(ad / "adapters.safetensors", ad / "adapter_model.bin.not")
    contract(["compare", str(base), str(ad)], ad, "adapter folder has adapter_config.json but no", tmp_path)
