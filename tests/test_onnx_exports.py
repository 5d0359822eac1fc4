"""Real exports by torch.onnx.export (tests/data/onnx_exports, written by scripts/onnx_export_fixtures.py):
what the dynamo exporter folds for a fixed input shape is not a weight, and a parameter folded away is not
read as removed. No onnx, onnxscript or torch needed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.io.checkpoint import locate
from weightdiff.io.safetensors_read import SafetensorsFile
from weightdiff.io.safetensors_write import save_file

DATA = Path(__file__).parent / "data" / "onnx_exports"


def _compare(base: Path, tuned: Path, tmp_path: Path) -> dict:
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


@pytest.mark.parametrize("model,variant,verdict", [
    ("llama", "static", "identical"),      # rotary cos/sin and the causal mask folded: not weights
    ("gpt2", "dynamic", "identical"),      # the tied head stored twice: as it is, and transposed for MatMul
    ("gpt2", "static", "inconclusive"),    # position rows 0-7 folded: the other rows are not in the export
    ("bert", "static", "inconclusive"),
])
def test_an_export_of_the_same_weights_reads_as_what_it_is(tmp_path, model, variant, verdict):
    doc = _compare(DATA / model / "hf", DATA / model / f"{variant}.onnx", tmp_path)
    s = doc["summary"]
    assert s["verdict"] == verdict
    assert not doc["plan"]["added"]
    if verdict == "inconclusive":
        assert "folded_parameters" in s["flags"]
        (f,) = doc["plan"]["folded"]
        assert f["base_name"].endswith(("position_embeddings.weight", "wpe.weight")) and f["rows"] == [0, 8]
        assert doc["plan"]["removed"] == [f["base_name"]]
    else:
        assert not doc["plan"]["removed"]


def test_folded_constants_are_noted_with_the_parameter_they_hold():
    with locate(DATA / "bert" / "static.onnx") as ck:
        names = {f["name"]: f for f in ck.folded}
        assert names["embedding_2"]["params"] == ["m.embeddings.position_embeddings.weight"]
        assert names["embedding_2"]["shape"] == [1, 8, 32]
        assert not any(n in ck.tensors for n in names)
        assert any("computed for a fixed input shape" in n and "embedding_2" in n for n in ck.notes)
        assert ck.read_stored("embedding_2").shape == (1, 8, 32)
    with locate(DATA / "llama" / "static.onnx") as ck:
        assert {tuple(f["shape"]) for f in ck.folded} == {(1, 1, 8, 8)}
        assert all(f["params"] == [] for f in ck.folded)         # computed from buffers and constants only


def _edited(tmp_path: Path, model: str, edit) -> Path:
    d = tmp_path / f"{model}_base"
    shutil.copytree(DATA / model / "hf", d)
    with SafetensorsFile(d / "model.safetensors") as f:
        tensors = {n: f.read(n).copy() for n in f.tensors}
    edit(tensors)
    save_file(d / "model.safetensors", tensors)
    return d


@pytest.mark.parametrize("row,held", [(3, False), (20, True)])
def test_a_base_whose_folded_rows_differ_is_never_identical(tmp_path, row, held):
    def edit(t):
        t["embeddings.position_embeddings.weight"][row] += 0.5
    doc = _compare(_edited(tmp_path, "bert", edit), DATA / "bert" / "static.onnx", tmp_path)
    assert doc["summary"]["verdict"] == "inconclusive"
    (f,) = doc["plan"]["folded"]
    assert (f["rows"] == [0, 8]) is held and f["known"]


def test_a_changed_matrix_beside_a_fold_reads_derived(tmp_path):
    def edit(t):
        t["encoder.layer.0.attention.self.query.weight"] += 0.05
    doc = _compare(_edited(tmp_path, "bert", edit), DATA / "bert" / "static.onnx", tmp_path)
    assert doc["summary"]["verdict"] == "derived"        # a fold never hides a measured change
    assert doc["summary"]["tensors_by_status"]["changed"] == 1
    assert doc["plan"]["folded"][0]["rows"] == [0, 8] and not doc["plan"]["added"]


def test_initializers_onnxruntime_stored_once_are_read_under_each_modules_name(tmp_path):
    """ONNX Runtime's graph optimizer (optimized_model_filepath) stores bitwise-equal initializers once and
    drops the legacy exporter's Identity aliases: a model whose RMSNorm gains are all 1.0 (freshly initialised,
    or norms frozen) kept one of five, read by every norm's Mul, and an unchanged base read "DERIVED: this
    base with tensors removed". The legacy node names say which module reads it."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "hf")

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, ids):
            return self.m(input_ids=ids)[0]

    torch.onnx.export(Wrap(m), (torch.randint(0, 96, (1, 8)),), str(tmp_path / "plain.onnx"), dynamo=False,
                      opset_version=17, input_names=["ids"], dynamic_axes={"ids": {0: "b", 1: "s"}})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "plain.onnx"), so, providers=["CPUExecutionProvider"])
    import onnx

    g = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert not any(n.op_type == "Identity" for n in g.node)
    assert sum("layernorm" in i.name or i.name.endswith("norm.weight") for i in g.initializer) == 1
    for name in ("plain", "optimized"):
        doc = _compare(tmp_path / "hf", tmp_path / f"{name}.onnx", tmp_path)
        assert doc["summary"]["verdict"] == "identical", (name, doc["summary"]["verdict_reason"])
        assert not doc["plan"]["removed"] and not doc["plan"]["added"]
