"""sentence-transformers folders (modules.json): every module with weights is compared.

The folders are laid out as SentenceTransformer.save writes them (the backbone saved by
transformers at the top, or in ``0_Transformer/`` in the old layout; ``1_Pooling/`` with a
config only; ``2_Dense/`` with ``linear.weight``/``linear.bias``; ``3_Normalize`` without a
folder, as on the Hub, which keeps no empty folders).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.checkpoint import locate
from weightdiff.io.safetensors_write import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("bert") / "bert"
    transformers.BertModel(cfg).save_pretrained(d)
    return d


def dense(seed: int = 1, noise: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 32)).astype(np.float32) * 0.1
    b = rng.standard_normal(16).astype(np.float32) * 0.1
    if noise:
        w = w + np.random.default_rng(99).standard_normal(w.shape).astype(np.float32) * noise
    return {"linear.weight": w, "linear.bias": b}


def st_folder(path: Path, bert: Path, dense_tensors: dict | None = None, old: bool = False,
              dense_bin: bool = False) -> Path:
    """A SentenceTransformer folder: backbone, 1_Pooling, 2_Dense (when given), modules.json."""
    path.mkdir(parents=True)
    top = path / "0_Transformer" if old else path
    shutil.copytree(bert, top, dirs_exist_ok=True)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    modules = [dict(m) for m in MODULES[:2]]
    if old:
        modules[0]["path"] = "0_Transformer"
    if dense_tensors is not None:
        (path / "2_Dense").mkdir()
        (path / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 16,
                                                                  "bias": True}))
        if dense_bin:
            torch.save({k: torch.from_numpy(v) for k, v in dense_tensors.items()}, path / "2_Dense" / "pytorch_model.bin")
        else:
            save_file(path / "2_Dense" / "model.safetensors", dense_tensors)
        modules.append(dict(MODULES[2]))
    modules.append(dict(MODULES[3]))          # 3_Normalize: no folder at all
    (path / "modules.json").write_text(json.dumps(modules))
    return path


def test_a_change_in_the_dense_module_alone_is_found(tmp_path, bert):
    base = st_folder(tmp_path / "base", bert, dense())
    tuned = st_folder(tmp_path / "tuned", bert, dense(noise=0.01))
    r = weightdiff.compare(base, tuned)
    assert r.summary.verdict == "derived", r.summary
    changed = sorted(t.name for t in r.tensors if t.status != "unchanged")
    assert changed == ["2_Dense.linear.weight"]
    assert len(r.tensors) == len(weightdiff.compare(bert, bert).tensors) + 2
    assert weightdiff.compare(base, st_folder(tmp_path / "copy", bert, dense())).summary.verdict == "identical"


def test_a_plain_transformers_base_against_an_st_model_shows_the_dense_module_added(tmp_path, bert):
    tuned = st_folder(tmp_path / "tuned", bert, dense())
    r = weightdiff.compare(bert, tuned)
    added = sorted(t.name for t in r.tensors if t.status == "added")
    assert added == ["2_Dense.linear.bias", "2_Dense.linear.weight"]
    assert r.summary.verdict != "identical"


def test_old_layout_with_the_backbone_in_0_transformer_pairs_with_the_new(tmp_path, bert):
    old = st_folder(tmp_path / "old", bert, dense(), old=True)
    new = st_folder(tmp_path / "new", bert, dense())
    assert weightdiff.compare(old, new).summary.verdict == "identical"
    assert weightdiff.compare(bert, st_folder(tmp_path / "old_plain", bert, old=True)).summary.verdict == "identical"
    r = weightdiff.compare(old, st_folder(tmp_path / "old_tuned", bert, dense(noise=0.01), old=True))
    assert [t.name for t in r.tensors if t.status != "unchanged"] == ["2_Dense.linear.weight"]
    with locate(old) as c:
        assert c.config_dir == old / "0_Transformer"
        assert [m["path"] for m in c.modules] == ["0_Transformer", "1_Pooling", "2_Dense", "3_Normalize"]


def test_dense_module_saved_as_a_pickle_reads_like_safetensors(tmp_path, bert):
    a = st_folder(tmp_path / "a", bert, dense())
    b = st_folder(tmp_path / "b", bert, dense(), dense_bin=True)
    assert weightdiff.compare(a, b).summary.verdict == "identical"
    with locate(b) as c:
        np.testing.assert_array_equal(c.read("2_Dense.linear.weight"), dense()["linear.weight"])


def test_inspect_lists_the_modules(tmp_path, bert):
    d = st_folder(tmp_path / "st", bert, dense())
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 0, r.output
    assert "2_Dense/model.safetensors" in r.output and "2_Dense  Dense: 2 tensors" in r.output
    assert "1_Pooling  Pooling: no weights" in r.output and "3_Normalize  Normalize: no folder" in r.output
    r = CliRunner().invoke(main, ["inspect", "--json", str(d)])
    doc = json.loads(r.stdout)
    with locate(bert) as c:
        assert doc["format"] == "sentence-transformers" and doc["tensors"] == len(c.tensors) + 2
    assert [m["tensors"] for m in doc["modules"]][2] == 2


def bad(args: list, names, expect: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(names) in lines[0] and expect in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("path", ["../outside", "/etc", "a/../../x", "~/x"])
def test_module_paths_out_of_the_folder_are_refused(tmp_path, bert, path):
    d = st_folder(tmp_path / "st", bert, dense())
    modules = json.loads((d / "modules.json").read_text())
    modules[2]["path"] = path
    (d / "modules.json").write_text(json.dumps(modules))
    bad(["compare", bert, d], d / "modules.json", "outside the checkpoint folder")


def test_a_module_folder_symlinked_out_is_refused(tmp_path, bert):
    d = st_folder(tmp_path / "st", bert)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(elsewhere / "model.safetensors", dense())
    (d / "2_Dense").symlink_to(elsewhere, target_is_directory=True)
    modules = json.loads((d / "modules.json").read_text())
    modules.insert(2, dict(MODULES[2]))
    (d / "modules.json").write_text(json.dumps(modules))
    bad(["inspect", d], d / "2_Dense", "refusing to follow the symlink")


def test_a_module_with_weights_no_reader_takes_is_refused_not_skipped(tmp_path, bert):
    d = st_folder(tmp_path / "st", bert, dense())
    (d / "2_Dense" / "model.safetensors").unlink()
    (d / "2_Dense" / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    bad(["compare", bert, d], d / "2_Dense", "holds weights weightdiff cannot read: tf_model.h5")
    # two candidate files are ambiguous, as in any folder
    d2 = st_folder(tmp_path / "st2", bert, dense())
    save_file(d2 / "2_Dense" / "other.safetensors", dense())
    bad(["compare", bert, d2], d2 / "2_Dense", "ambiguous")
    # a nested module's weights are not read: refused
    d3 = st_folder(tmp_path / "st3", bert, dense())
    (d3 / "2_Dense" / "inner").mkdir()
    save_file(d3 / "2_Dense" / "inner" / "model.safetensors", dense())
    bad(["compare", bert, d3], d3 / "2_Dense" / "inner", "nested module")


def test_an_onnx_backbone_beside_a_dense_module_is_refused_with_a_hint_that_fits(tmp_path, bert):
    """sentence-transformers' ONNX backend saves the backbone as onnx/model.onnx beside 2_Dense: the refusal
    said "merge the adapter", which has nothing to do with it."""
    d = st_folder(tmp_path / "st", bert, dense())
    for f in ("model.safetensors", "config.json"):
        (d / f).unlink(missing_ok=True)
    (d / "onnx").mkdir()
    (d / "onnx" / "model.onnx").write_bytes(b"")
    line = bad(["compare", bert, d], "is an ONNX model", "compare the ONNX model and the other module folders one by one")
    assert "adapter" not in line


def test_a_huge_modules_list_is_checked_in_linear_time():
    """Each module path was compared with every earlier one: 200,000 entries (a 13 MB modules.json)
    ran for about 12 minutes. The alarm is a hang guard with a wide margin, not a timing."""
    import signal

    from weightdiff.errors import CheckpointError
    from weightdiff.io.st_modules import _parse_modules

    doc = [{"idx": k, "name": str(k), "path": f"m{k}", "type": "sentence_transformers.models.Dense"}
           for k in range(100_000)]
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("modules.json parsing hung"))
    signal.alarm(30)
    try:
        assert len(_parse_modules(doc, "modules.json")) == 100_000
        with pytest.raises(CheckpointError, match="module path `m7` is listed twice"):
            _parse_modules(doc + [{"path": "m7"}], "modules.json")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
