"""NVIDIA ModelOpt checkpoints (nvidia's FP8 and FP4 releases): a transformers Llama quantized by ModelOpt itself
(``mtq.quantize`` with its FP8 / NVFP4 configs) and written by its ``export_hf_checkpoint`` (``hf_quant_config.json``
and config.json's quant_method ``modelopt``), kept in tests/data/modelopt (its make.py wrote them, with
nvidia-modelopt 0.47.0); NVFP4 values checked against ``NVFP4QTensor.dequantize``'s, stored beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli as run, one_error

import weightdiff
from weightdiff.io.checkpoint import locate
from weightdiff.kernels.dtypes import decode

DATA = Path(__file__).parent / "data" / "modelopt"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_nvfp4_values_are_modelopts_and_the_floor_holds():
    ref = np.load(DATA / "reference.npz")
    assert len(ref.files) == 14
    with locate(DATA / "NVFP4") as ck, locate(DATA / "base") as base:
        assert ck.quant_config["quant_method"] == "modelopt" and ck.quant_config["quant_algo"] == "NVFP4"
        for name in ref.files:
            src = ck.quant[name]
            assert src.scheme.format == "modelopt" and src.scheme.group == "16"
            assert ck.tensors[name].shape == ref[name].shape
            v, f = src.rows(ck._stored_read, ck._stored_rows, 0, ref[name].shape[0])
            assert np.array_equal(v, ref[name]), name
            held = decode(base.read(name), "BF16").astype(np.float32)
            assert np.all(np.abs(held - v) <= f), name      # the floor holds against the weights ModelOpt rounded
        assert not any(n.endswith(("input_scale", "weight_scale_2")) for n in ck.tensors)


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_a_modelopt_build_of_the_base_is_quantized_only(algo):
    res = weightdiff.compare(DATA / "base", DATA / algo, rank=False)
    assert res.summary.verdict == "quantized_only", res.summary.headline
    quantized = [t for t in res.tensors if t.status == "quantized"]
    assert len(quantized) == 14 and all(t.quant["within"] is True for t in quantized)
    assert {t.name.rsplit(".", 2)[-2] for t in quantized} == set(LINEAR)


def test_a_fine_tune_built_by_modelopt_is_derived():
    res = weightdiff.compare(DATA / "base", DATA / "tuned", rank=False)
    assert res.summary.verdict == "derived", res.summary.headline
    assert {t.name for t in res.tensors if t.status == "changed"} == \
        {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)}


def _without_config_entry(tmp_path: Path, algo: str) -> Path:
    d = shutil.copytree(DATA / algo, tmp_path / algo)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_modelopt_without_the_config_json_entry_reads_hf_quant_config(tmp_path, algo):
    """Older exports name the method only in hf_quant_config.json (whose ``quantization`` holds a group_size: not
    mlx-lm's ``quantization`` in config.json)."""
    d = _without_config_entry(tmp_path, algo)
    with locate(d) as ck:
        assert ck.quant_config["quant_method"] == "modelopt" and ck.quant_config["quant_algo"] == algo
    assert weightdiff.compare(DATA / "base", d, rank=False).summary.verdict == "quantized_only"
    hq = json.loads((d / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "W4A8_AWQ"
    (d / "hf_quant_config.json").write_text(json.dumps(hq))
    line = one_error(*run("inspect", d)[::2])
    assert "hf_quant_config.json: ModelOpt quant_algo 'W4A8_AWQ' is not supported" in line


def test_nvfp4_weights_without_their_tensor_scale_are_one_line(tmp_path):
    from weightdiff.io.safetensors_read import SafetensorsFile
    from weightdiff.io.safetensors_write import save_file

    d = shutil.copytree(DATA / "NVFP4", tmp_path / "q")
    with SafetensorsFile(d / "model.safetensors") as f:
        kept = {n: (i.dtype, f.read(n)) for n, i in f.tensors.items() if n != "model.layers.1.mlp.up_proj.weight_scale_2"}
    save_file(d / "model.safetensors", kept, {"format": "pt"})
    line = one_error(*run("inspect", d)[::2])
    assert "`model.layers.1.mlp.up_proj.weight` U8 with `model.layers.1.mlp.up_proj.weight_scale` F8_E4M3: ModelOpt's " \
           "NVFP4 stores e4m3 block scales and a one-number `model.layers.1.mlp.up_proj.weight_scale_2` beside them" in line


@pytest.mark.parametrize("download", [False, True])
def test_a_hub_repo_whose_method_is_only_in_hf_quant_config_is_read_with_it(tmp_path, monkeypatch, download):
    """hf_quant_config.json is one of the files that decide how the weights read: fetched (or streamed) with the
    weights, as config.json is. Read without it, the NVFP4 codes were companions without their weight."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    from hub_server import HubServer
    from weightdiff.options import HubOptions

    d = _without_config_entry(tmp_path, "NVFP4")
    srv = HubServer()
    try:
        srv.commit("nvidia/tiny-fp4", {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()})
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        res = weightdiff.compare(DATA / "base", "nvidia/tiny-fp4", rank=False, hub=HubOptions(download=download))
        assert res.summary.verdict == "quantized_only", res.summary.headline
        assert sum(1 for r in res.tensors if r.quant and r.quant.get("within")) == 14
    finally:
        srv.close()
