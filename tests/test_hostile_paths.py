"""Issue 17, paths: symlinks may not lead out of a checkpoint folder (or its Hugging Face cache repo),
several weight files without an index are ambiguous, an adapter needs its config, a shard's unlisted
tensor is measured with a note, a lone surrogate in a name is bad input, and --hash describes the
files measured."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.io.checkpoint import locate
from weightdiff.cli import main
from weightdiff.errors import CheckpointError
from weightdiff.io.safetensors_write import save_checkpoint, save_file


def bad(args: list, names, expect: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(names) in lines[0] and expect in lines[0], lines[0]
    return lines[0]


def tensors(v: float = 1.0) -> dict:
    return {"model.layers.0.w": np.full((4, 4), v, np.float32), "model.layers.1.w": np.full((4, 4), 2 * v, np.float32)}


@pytest.fixture
def outside(tmp_path) -> Path:
    p = tmp_path / "secret" / "other.safetensors"
    p.parent.mkdir()
    save_file(p, tensors(5.0))
    return p


def test_model_file_symlinked_outside(tmp_path, outside):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside)
    bad(["inspect", d], d / "model.safetensors", "outside the checkpoint folder")
    # named directly, the user chose it
    r = CliRunner().invoke(main, ["inspect", str(d / "model.safetensors")])
    assert r.exit_code == 0, r.output


def test_shard_symlinked_outside(tmp_path, outside):
    d = save_checkpoint(tmp_path / "ck", tensors(), shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    (tmp_path / "secret" / "s2.safetensors").write_bytes(data)
    shard.symlink_to(tmp_path / "secret" / "s2.safetensors")
    bad(["inspect", d], shard, "refusing to follow the symlink")


def test_symlinked_subfolder_outside(tmp_path, outside):
    d = save_checkpoint(tmp_path / "ck", tensors(), shards=1)
    index = {"metadata": {}, "weight_map": {"model.layers.0.w": "sub/other.safetensors",
                                            "model.layers.1.w": "sub/other.safetensors"}}
    for f in d.iterdir():
        f.unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "sub").symlink_to(outside.parent, target_is_directory=True)
    bad(["inspect", d], d / "sub" / "other.safetensors", "outside the checkpoint folder")


def test_hf_snapshot_may_point_into_its_blobs_but_not_beyond(tmp_path, outside):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(repo / "blobs" / "deadbeef", tensors())
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    with locate(repo) as c:
        assert set(c.tensors) == set(tensors())
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(outside)
    bad(["inspect", repo], snap / "model.safetensors", "outside the checkpoint folder or its cache repo's blobs/")


@pytest.mark.parametrize("link", ["snapshot", "snapshots", "blobs", "refs"])
def test_hf_cache_repo_folders_linked_out_of_the_repo_are_refused(tmp_path, link):
    """The repo's own snapshots/<rev>, snapshots/ or blobs/ (or refs/main) symlinked to a folder
    outside the repo would make ``models--org--name`` read files that are not its own."""
    out = tmp_path / "elsewhere"
    (out / "abc123").mkdir(parents=True)
    save_file(out / "model.safetensors", tensors())
    save_file(out / "abc123" / "model.safetensors", tensors())
    (out / "main").write_text("abc123")
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    if link == "snapshot":
        (repo / "snapshots").mkdir()
        (repo / "snapshots" / "abc123").symlink_to(out)
        bad(["inspect", repo], repo / "snapshots" / "abc123", "outside the Hugging Face cache folder")
    elif link == "snapshots":
        (repo / "snapshots").symlink_to(out)
        bad(["inspect", repo], repo / "snapshots", "outside the Hugging Face cache folder")
    elif link == "blobs":
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        (repo / "blobs").symlink_to(out)
        (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to("../../blobs/model.safetensors")
        bad(["inspect", repo], repo / "snapshots" / "abc123" / "model.safetensors", "outside the checkpoint folder")
    else:
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        save_file(repo / "snapshots" / "abc123" / "model.safetensors", tensors())
        (repo / "refs" / "main").unlink()
        (repo / "refs" / "main").symlink_to(out / "main")
        bad(["inspect", repo], repo / "refs" / "main", "outside the Hugging Face cache folder")


@pytest.mark.parametrize("quantized", [False, True])
def test_config_json_symlinked_outside_is_refused(tmp_path, quantized):
    # config.json decides how a model is read (its head tie, its quantization_config): one borrowed from
    # another folder through a symlink was read and changed the pairing
    secret = tmp_path / "elsewhere" / "config.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True,
                                  **({"quantization_config": {"quant_method": "fp8"}} if quantized else {})}))
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    save_checkpoint(base, tensors())
    save_checkpoint(tuned, tensors())
    (tuned / "config.json").symlink_to(secret)
    out = tmp_path / "out"
    line = bad(["compare", base, tuned, "--json", out / "r.json"], tuned / "config.json", "outside the checkpoint folder")
    assert "copy it into the folder" in line
    assert not out.exists()
    bad(["inspect", tuned], tuned / "config.json", "outside the checkpoint folder")
    # inside the folder (a link to a sibling) it is read as before
    (tuned / "config.json").unlink()
    (tuned / "cfg.json").write_text(json.dumps({"model_type": "llama"}))
    (tuned / "config.json").symlink_to(tuned / "cfg.json")
    r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(out / "r.json")])
    assert r.exit_code == 0, r.output


def test_several_weight_files_without_index_are_ambiguous(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    save_file(d / "model.safetensors", tensors())
    save_file(d / "model-4bit.safetensors", tensors())
    line = bad(["inspect", d], d, "ambiguous")
    assert "model-4bit.safetensors" in line and "model.safetensors" in line
    r = CliRunner().invoke(main, ["inspect", str(d / "model.safetensors")])
    assert r.exit_code == 0


def test_adapter_weights_without_config(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    save_file(d / "adapter_model.safetensors", {"base_model.model.l.q.lora_A.weight": np.ones((2, 4), np.float32)})
    bad(["inspect", d], d, "adapter_config.json is missing")


def test_shard_holding_an_unlisted_tensor_is_measured_with_a_note(tmp_path):
    base = save_checkpoint(tmp_path / "base", tensors(), shards=2)
    tuned = save_checkpoint(tmp_path / "tuned", tensors(1.5), shards=2)
    shard = tuned / "model-00002-of-00002.safetensors"
    with locate(tuned) as c:
        listed = [n for n, t in c.tensors.items() if t.path == shard]
    save_file(shard, {**{n: np.full((4, 4), 3.0, np.float32) for n in listed}, "extra.bias": np.ones(3, np.float32)})
    r = weightdiff.compare(str(base), str(tuned))
    assert r.tensor("extra.bias").status == "added"
    assert any("`extra.bias` that the index does not list" in n for n in r.plan["notes"])
    cli = CliRunner().invoke(main, ["compare", str(base), str(tuned)])
    assert cli.exit_code == 0 and "extra.bias" in cli.stderr


def test_lone_surrogate_in_a_tensor_name(tmp_path):
    h = json.dumps({"a\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    bad(["inspect", p], p, "lone UTF-16 surrogate")
    save_file(tmp_path / "b.safetensors", {"a": np.zeros(1, np.float32)})
    bad(["compare", tmp_path / "b.safetensors", p, "--json", tmp_path / "o.json"], p, "lone UTF-16 surrogate")
    assert not (tmp_path / "o.json").exists()


def test_file_replaced_during_the_run_is_not_hashed(tmp_path, monkeypatch):
    base = tmp_path / "b.safetensors"
    tuned = tmp_path / "t.safetensors"
    save_file(base, tensors())
    save_file(tuned, tensors(1.5))
    import weightdiff.comparison as comparison

    real = comparison.aggregate

    def aggregate_then_swap(*a, **k):
        out = real(*a, **k)
        save_file(tmp_path / "x.safetensors", tensors(9.0))       # replaced by rename, as a download would
        os.replace(tmp_path / "x.safetensors", tuned)
        return out

    monkeypatch.setattr(comparison, "aggregate", aggregate_then_swap)
    with pytest.raises(CheckpointError, match="replaced or modified during the run"):
        weightdiff.compare(str(base), str(tuned), hash_files=True)


@pytest.mark.parametrize("chain", [
    [{"s": np.ones(3, np.float32)}, {"x": np.ones((4, 4), np.float32)}, {}],        # nothing shared
    [{"s": np.ones(3, np.float32)}, {"s": np.ones(3, np.float32)}, {"s": np.ones(3, np.float32)}],  # scalars only
])
def test_lineage_with_steps_sharing_no_large_matrix(tmp_path, chain):
    paths = []
    for i, tensors in enumerate(chain):
        save_file(tmp_path / f"m{i}.safetensors", tensors)
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    r = CliRunner().invoke(main, ["lineage", *paths, "--json", str(tmp_path / "l.json"), "--memo",
                                  str(tmp_path / "l.md"), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "path length not measured" in r.stdout
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["end_to_end"]["straightness"] is None
    assert "not measured" in (tmp_path / "l.md").read_text()


@pytest.mark.parametrize("fast_max,bound", [(0, 7), (1 << 30, 10)], ids=["strict", "shortcut"])
def test_header_parse_memory_is_a_few_times_the_header(monkeypatch, fast_max, bound):
    """1.2M one-element tensors in a 65 MB header took 4.3 GB; the strict parser holds one small
    TensorInfo per tensor (slots, shared shapes) and never a dict per entry. The C-decoder shortcut
    (headers up to FAST_HEADER_MAX) holds its plain dicts for a moment: under 10 times."""
    import tracemalloc

    from weightdiff.io import safetensors_read
    from weightdiff.io.safetensors_read import parse_header

    monkeypatch.setattr(safetensors_read, "FAST_HEADER_MAX", fast_max)

    n = 40_000
    raw = ("{" + ",".join(f'"model.layers.{i // 100}.t{i}":{{"dtype":"F32","shape":[1],"data_offsets":'
                          f'[{4 * i},{4 * i + 4}]}}' for i in range(n)) + "}").encode()
    tracemalloc.start()
    try:
        tensors, _ = parse_header(raw, 8 + len(raw) + 4 * n, "m.safetensors")
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tensors) == n and tensors["model.layers.399.t39999"].end == 8 + len(raw) + 4 * n
    assert peak < bound * len(raw), peak / len(raw)     # was 14x
    assert kept < 4 * len(raw), kept / len(raw)         # was 6x
