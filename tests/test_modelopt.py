"""NVIDIA ModelOpt checkpoints (nvidia's FP8 and FP4 releases): a transformers model quantized by ModelOpt itself
(``mtq.quantize`` with its FP8 / NVFP4 configs) and written by its ``export_hf_checkpoint`` (``hf_quant_config.json``
and config.json's quant_method ``modelopt``); NVFP4 values checked against ``NVFP4QTensor.dequantize``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import cli as run, one_error

import weightdiff
from weightdiff.io.checkpoint import locate
from weightdiff.kernels.dtypes import decode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint  # noqa: E402
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402

CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, architectures=["LlamaForCausalLM"])


def _model(seed: int = 0, tune: bool = False):
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    if tune:                                   # a rank-4 fine-tune of every value projection, 30% of its norm
        g = torch.Generator().manual_seed(5)
        for layer in m.model.layers:
            w = layer.self_attn.v_proj.weight
            d = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g)
            w.data += (d * 0.3 * w.float().norm() / d.norm()).to(w.dtype)
    return m


def export(folder: Path, algo: str, tune: bool = False) -> Path:
    cfg = {"FP8": mtq.FP8_DEFAULT_CFG, "NVFP4": mtq.NVFP4_DEFAULT_CFG}[algo]
    m = _model(tune=tune)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mtq.quantize(m, cfg, lambda model: model(torch.randint(0, 128, (2, 16))))
        export_hf_checkpoint(m, export_dir=str(folder))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelopt")
    base = root / "base"
    _model().save_pretrained(str(base))
    return {"base": base, **{a: export(root / a, a) for a in ("FP8", "NVFP4")},
            "tuned": export(root / "tuned", "NVFP4", tune=True)}


def test_the_export_is_read_as_modelopt_wrote_it(built):
    cfg = json.loads((built["NVFP4"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "NVFP4"
    with locate(built["NVFP4"]) as ck:
        src = ck.quant["model.layers.0.mlp.down_proj.weight"]
        assert ck.tensors["model.layers.0.mlp.down_proj.weight"].shape == (128, 256)
        assert src.scheme.format == "modelopt" and src.scheme.group == "16"
        v, f = src.rows(ck._stored_read, ck._stored_rows, 0, 128)
        raw = {n: torch.from_numpy(np.array(ck._stored_read(f"model.layers.0.mlp.down_proj.{n}")))
               for n in ("weight", "weight_scale_2")}
        scale = torch.from_numpy(np.array(ck._stored_read("model.layers.0.mlp.down_proj.weight_scale"))
                                 .view(np.uint8)).view(torch.float8_e4m3fn)
    q = NVFP4QTensor(torch.Size((128, 256)), torch.bfloat16, raw["weight"])
    ref = q.dequantize(dtype=torch.bfloat16, scale=scale, double_scale=raw["weight_scale_2"],
                       block_sizes={-1: 16}).float().numpy()
    assert np.array_equal(v, ref)
    with locate(built["base"]) as ck:
        held = decode(ck.read("model.layers.0.mlp.down_proj.weight"), "BF16").astype(np.float32)
    assert np.all(np.abs(held - v) <= f)                 # the floor holds against the weights ModelOpt rounded


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_a_modelopt_build_of_the_base_is_quantized_only(built, algo):
    res = weightdiff.compare(built["base"], built[algo], rank=False)
    assert res.summary.verdict == "quantized_only", res.summary.headline
    quantized = [t for t in res.tensors if t.status == "quantized"]
    assert len(quantized) == 14 and all(t.quant["within"] is True for t in quantized)


def test_a_fine_tune_built_by_modelopt_is_derived(built):
    res = weightdiff.compare(built["base"], built["tuned"], rank=False)
    assert res.summary.verdict == "derived", res.summary.headline
    assert {t.name for t in res.tensors if t.status == "changed"} == \
        {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)}


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_modelopt_without_the_config_json_entry_reads_hf_quant_config(built, tmp_path, algo):
    """Older exports name the method only in hf_quant_config.json (whose ``quantization`` holds a group_size: not
    mlx-lm's ``quantization`` in config.json)."""
    import shutil

    d = shutil.copytree(built[algo], tmp_path / "old")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with locate(d) as ck:
        assert ck.quant_config["quant_method"] == "modelopt" and ck.quant_config["quant_algo"] == algo
    assert weightdiff.compare(built["base"], d, rank=False).summary.verdict == "quantized_only"
    hq = json.loads((d / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "W4A8_AWQ"
    (d / "hf_quant_config.json").write_text(json.dumps(hq))
    line = one_error(*run("inspect", d)[::2])
    assert "hf_quant_config.json: ModelOpt quant_algo 'W4A8_AWQ' is not supported" in line


@pytest.mark.parametrize("download", [False, True])
def test_a_hub_repo_whose_method_is_only_in_hf_quant_config_is_read_with_it(built, tmp_path, monkeypatch, download):
    """hf_quant_config.json is one of the files that decide how the weights read: fetched (or streamed) with the
    weights, as config.json is. Read without it, the NVFP4 codes were companions without their weight."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    from hub_server import HubServer
    from weightdiff.options import HubOptions

    files = {p.name: p.read_bytes() for p in sorted(built["NVFP4"].iterdir()) if p.is_file()}
    cfg = json.loads(files["config.json"])
    del cfg["quantization_config"]
    files["config.json"] = json.dumps(cfg).encode()
    srv = HubServer()
    try:
        srv.commit("nvidia/tiny-fp4", files)
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        res = weightdiff.compare(built["base"], "nvidia/tiny-fp4", rank=False, hub=HubOptions(download=download))
        assert res.summary.verdict == "quantized_only", res.summary.headline
        assert any(r.quant and r.quant.get("within") for r in res.tensors)
    finally:
        srv.close()
