"""`weightdiff inspect`: whole-output text and JSON, block parsing, adapters, escaped names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.inspect import SCHEMA, block_of, describe
from weightdiff.io.safetensors_write import save_checkpoint, save_file


def _llama_like(tmp_path):
    t = {"model.embed_tokens.weight": np.zeros((10, 4), np.float32)}
    for i in range(2):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = ("BF16", np.zeros((4, 4), np.uint16))
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(4, np.float32)
    t["model.norm.weight"] = np.ones(4, np.float32)
    return save_checkpoint(tmp_path / "ck", t, shards=2, metadata={"format": "pt"})


def test_text_output_whole(tmp_path):
    d = _llama_like(tmp_path)
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    files = sorted(p.name for p in d.glob("*.safetensors"))
    sizes = [(d / f).stat().st_size for f in files]
    assert len(files) == 2
    wmap = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    counts = [list(wmap.values()).count(f) for f in files]
    expected = "\n".join([
        f"checkpoint  {d}",
        "format      sharded safetensors, 2 files",
        f"files       {files[0]}  {sizes[0]} B  {counts[0]} tensor{'s' * (counts[0] != 1)}",
        f"            {files[1]}  {sizes[1]} B  {counts[1]} tensor{'s' * (counts[1] != 1)}",
        "tensors     6",
        "parameters  84 (272 B)",
        "",
        "dtype           tensors        parameters   share",
        "F32                   4                52   61.9%",
        "BF16                  2                32   38.1%",
        "",
        "block           tensors        parameters",
        "layers.0              2                20",
        "layers.1              2                20",
        "(outside)             2                44",
        "",
        "metadata    format = pt",
        "            total_size = 272",
    ]) + "\n"
    assert r.stdout == expected


def test_json_output(tmp_path):
    d = _llama_like(tmp_path)
    r = CliRunner().invoke(main, ["inspect", str(d), "--json"])
    assert r.exit_code == 0 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["schema"] == SCHEMA == "weightdiff.inspect/1"
    assert (doc["format"], doc["tensors"], doc["params"], doc["bytes"]) == ("sharded", 6, 84, 272)
    assert doc["dtypes"] == {"F32": {"tensors": 4, "params": 52, "bytes": 208, "decodable": True},
                             "BF16": {"tensors": 2, "params": 32, "bytes": 64, "decodable": True}}
    assert doc["blocks"] == [{"block": "layers.0", "index": 0, "tensors": 2, "params": 20},
                             {"block": "layers.1", "index": 1, "tensors": 2, "params": 20}]
    assert doc["outside_blocks"] == {"tensors": 2, "params": 44}
    assert doc["metadata"] == {"format": "pt", "total_size": "272"} and doc["adapter"] is None
    assert sum(f["tensors"] for f in doc["files"]) == 6 and doc["ignored"] == []


@pytest.mark.parametrize("name, block", [
    ("model.layers.12.self_attn.q_proj.weight", ("layers.12", 12)),
    ("transformer.h.3.attn.c_attn.weight", ("h.3", 3)),
    ("bert.encoder.layer.11.attention.self.query.weight", ("encoder.layer.11", 11)),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", ("encoder.block.0", 0)),
    ("decoder.block.5.layer.0.SelfAttention.q.weight", ("decoder.block.5", 5)),
    ("vision_model.blocks.7.mlp.fc1.weight", ("vision_model.blocks.7", 7)),
    ("layers.2.w", ("layers.2", 2)),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.layers_extra.3.w", ("layers_extra.3", 3)),
    ("mesh.4.w", ("mesh.4", 4)),
])
def test_block_of(name, block):
    assert block_of(name) == block


def test_blocks_ordered_by_stack_then_index(tmp_path):
    t = {f"{stack}.block.{i}.w": np.zeros(1, np.float32) for stack in ("encoder", "decoder") for i in (10, 2, 1)}
    doc = describe(save_file(tmp_path / "t5.safetensors", t))
    assert [b["block"] for b in doc["blocks"]] == ["encoder.block.1", "encoder.block.2", "encoder.block.10",
                                                  "decoder.block.1", "decoder.block.2", "decoder.block.10"]


def test_adapter_text(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                                       "use_rslora": True, "base_model_name_or_path": "org/base"}))
    save_file(d / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 3), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((3, 2), np.float32)})
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 0, r.stderr
    out = r.stdout.splitlines()
    assert "format      PEFT LoRA adapter, 1 file" in out
    assert "layers.0              2                12" in out
    assert "adapter     r=2 lora_alpha=4 scale=2.82843 rslora, 1 LoRA factor pair (ranks 2)" in out
    assert "targets     q_proj" in out and "base model  org/base" in out
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(d), "--json"]).stdout)
    assert doc["adapter"]["factors"] == 1 and doc["adapter"]["scale"] == pytest.approx(4 / 2 ** 0.5)


def test_opaque_dtypes_say_byte_for_byte(tmp_path):
    path = save_file(tmp_path / "m.safetensors", {"c": np.zeros(2, np.complex64)})
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert "C64                   1                 2  100.0%  (compared byte for byte)" in r.stdout.splitlines()
    assert json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).stdout)["dtypes"]["C64"]["decodable"] is False


def test_hostile_names_printed_escaped(tmp_path):
    name = "model.layers.0.\x1b[2J\u202eevil"
    path = save_file(tmp_path / "m.safetensors", {name: np.zeros(1, np.float32)}, metadata={"k\x07": "v\u2066"})
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0
    for raw in ("\x1b", "\u202e", "\x07", "\u2066"):
        assert raw not in r.stdout
    assert "metadata    k\\x07 = v\\u2066" in r.stdout
    doc = CliRunner().invoke(main, ["inspect", str(path), "--json"]).stdout
    assert "\x1b" not in doc and "\u202e" not in doc and json.loads(doc)["metadata"] == {"k\x07": "v\u2066"}


def test_help_has_example():
    r = CliRunner().invoke(main, ["inspect", "--help"])
    assert r.exit_code == 0 and "Example:" in r.stdout and "--json" in r.stdout


def test_usage_error_is_exit_2():
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 2
