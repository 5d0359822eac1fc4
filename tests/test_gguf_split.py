"""A GGUF split into parts (llama-gguf-split, convert_hf_to_gguf.py --split-max-size / --split-max-tensors):
the Hub holds files of at most 50 GB, so a 70B model at 8 bits or more is published so. The parts are
written by gguf's own writer (``GGUFWriter(split_max_tensors=...)``, the converter's), read as one model
whichever part or folder is named, and every way a series can be broken is one line naming the part."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import cli as run, one_error, write_checkpoint
from models import llama, low_rank_update

from weightdiff.io.checkpoint import choose_weights, locate

gguf = pytest.importorskip("gguf")
from gguf_build import to_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
SHAPE = dict(layers=2, hidden=64, inter=128, vocab=96, kv=32)
ARGS = dict(n_head=4, n_kv=2, layers=2)




@pytest.fixture(scope="module")
def model():
    return llama(np.random.default_rng(3), **SHAPE)


def _split(folder: Path, tensors: dict, per: int = 5, qtype=Q.Q8_0, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return to_gguf(folder / "m.gguf", tensors, "llama", qtype, split_max_tensors=per, **ARGS, **kw)


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf"))


def test_the_writer_splits_as_llama_cpp_names_its_parts(tmp_path, model):
    first = _split(tmp_path / "s", model)
    names = [p.name for p in _parts(tmp_path / "s")]
    assert first.name == "m-00001-of-00005.gguf" and names == [f"m-{i:05d}-of-00005.gguf" for i in range(1, 6)]


def test_a_split_gguf_reads_as_the_whole_file_from_any_part_or_its_folder(tmp_path, model):
    whole = to_gguf(tmp_path / "whole.gguf", model, "llama", Q.Q8_0, **ARGS)
    first = _split(tmp_path / "s", model)
    with locate(whole) as w:
        for named in [first, *_parts(tmp_path / "s")[1:], tmp_path / "s"]:
            with locate(named) as s:
                assert s.format == "gguf" and list(s.files) == _parts(tmp_path / "s"), named
                assert s.tensors.keys() == w.tensors.keys()
                for n, info in w.tensors.items():
                    assert (s.tensors[n].dtype, s.tensors[n].shape, s.tensors[n].scheme) == \
                        (info.dtype, info.shape, info.scheme)
                    assert np.array_equal(s.read(n), w.read(n)), n      # the Q/K permutation undone in every part
                    assert all(np.array_equal(a, b) for a, b in zip(s.windows(n, 100), w.windows(n, 100), strict=True))
                assert s.metadata["general.architecture"] == "llama"
                assert s.metadata["gguf.transforms"] == w.metadata["gguf.transforms"]   # counted over every part
                assert s.metadata["gguf.split"].startswith("5 parts (m-00001-of-00005.gguf")


def test_a_first_part_with_the_metadata_only_is_read(tmp_path, model):
    """llama-gguf-split --no-tensor-first-split (gguf's small_first_shard): part 1 holds no tensor."""
    first = _split(tmp_path / "s", model, per=8, small_first_shard=True)
    with locate(first) as s:
        assert len(s.tensors) == len(model) and len(s.files) == 4
        assert s._headers[s.files[0]] == {}


def test_compare_reads_every_part_and_gives_the_whole_files_json(tmp_path, model):
    base = write_checkpoint(tmp_path / "base", model)
    tuned = {k: low_rank_update(np.random.default_rng(9), v, 2) if k.endswith("q_proj.weight") else v
             for k, v in model.items()}
    (tmp_path / "w").mkdir()
    whole = to_gguf(tmp_path / "w" / "m.gguf", tuned, "llama", Q.Q8_0, **ARGS)
    first = _split(tmp_path / "s", tuned)
    docs = []
    for i, tuned_path in enumerate((whole, first)):
        rc, _, err = run("compare", base, tuned_path, "--json", tmp_path / f"{i}.json", "-q")
        assert rc == 0, err
        docs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    a, b = docs
    assert a["tensors"] == b["tensors"] and a["summary"] == b["summary"]
    assert b["summary"]["verdict"] == "derived"
    assert {t["name"] for t in b["tensors"] if t["status"] == "changed"} == \
        {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert [f["name"] for f in b["tuned"]["files"]] == [p.name for p in _parts(tmp_path / "s")]
    assert sum(f["bytes"] for f in b["tuned"]["files"]) == sum(p.stat().st_size for p in _parts(tmp_path / "s"))


def test_a_folder_counts_a_split_once_and_names_it_by_its_first_part():
    assert choose_weights(["m-00002-of-00002.gguf", "m-00001-of-00002.gguf", "README.md"], "x") == \
        ("gguf", "m-00001-of-00002.gguf")
    with pytest.raises(Exception) as err:
        choose_weights(["m-00002-of-00002.gguf", "m-00001-of-00002.gguf", "mmproj-f16.gguf"], "x")
    assert "2 .gguf files, so which is the model is ambiguous: m-00001-of-00002.gguf, mmproj-f16.gguf" in str(err.value)


# -- a broken series: one line naming the part, exit 2, nothing written ---------------------------------

def _set_kv(path: Path, key: str, value: int, fmt: str) -> None:
    """Overwrite the value of metadata key ``key`` in place (same type, same width)."""
    blob = bytearray(path.read_bytes())
    k = key.encode()
    at = blob.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4
    blob[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(blob))


def test_a_missing_part_is_named(tmp_path, model):
    first = _split(tmp_path / "s", model)
    (tmp_path / "s" / "m-00003-of-00005.gguf").unlink()
    line = one_error(*run("inspect", first)[::2])
    assert "is part 1 of a GGUF split into 5 files, and part 3 (m-00003-of-00005.gguf) is not beside it" in line
    line = one_error(*run("inspect", tmp_path / "s")[::2])
    assert "part 3 (m-00003-of-00005.gguf) is not beside it" in line


def test_a_part_renamed_cannot_say_where_the_others_are(tmp_path, model):
    first = _split(tmp_path / "s", model)
    renamed = first.rename(tmp_path / "s" / "model.gguf")
    line = one_error(*run("inspect", renamed)[::2])
    assert "model.gguf: is part 1 of a GGUF split into 5 files, but its name is not llama.cpp's name for that part " \
           "(PREFIX-00001-of-00005.gguf)" in line and "llama-gguf-split --merge" in line


def test_parts_of_two_splits_are_not_read_as_one(tmp_path, model):
    _split(tmp_path / "a", model, per=5)
    _split(tmp_path / "b", model, per=4)              # six parts of other sizes
    shutil.copy(tmp_path / "b" / "m-00002-of-00006.gguf", tmp_path / "a" / "m-00002-of-00005.gguf")
    line = one_error(*run("inspect", tmp_path / "a" / "m-00001-of-00005.gguf")[::2])
    assert "m-00002-of-00005.gguf: is named as part 2 of 5 of a split GGUF, but its header says part 2 of 6" in line


@pytest.mark.parametrize("key,value,fmt,expect", [
    ("split.no", 3, "<H", "m-00002-of-00005.gguf: is named as part 2 of 5 of a split GGUF, but its header says part 4 of 5"),
    ("split.tensors.count", 20, "<i", "m-00002-of-00005.gguf: says its split GGUF holds 20 tensors, part 1 says 21"),
])
def test_a_part_whose_header_disagrees_is_named(tmp_path, model, key, value, fmt, expect):
    first = _split(tmp_path / "s", model)
    _set_kv(tmp_path / "s" / "m-00002-of-00005.gguf", key, value, fmt)
    line = one_error(*run("inspect", first)[::2])
    assert expect in line, line


def test_parts_holding_other_than_the_declared_tensor_count(tmp_path, model):
    first = _split(tmp_path / "s", model)
    for p in _parts(tmp_path / "s"):
        _set_kv(p, "split.tensors.count", 22, "<i")
    line = one_error(*run("inspect", first)[::2])
    assert "whose parts hold 21 tensors between them, not the 22 the split declares" in line


def test_a_tensor_in_two_parts(tmp_path, model):
    """Two parts naming one tensor (a part copied over another of a split of the same model)."""
    first = _split(tmp_path / "s", model, per=11)      # two parts: 11 + 10
    other = _split(tmp_path / "o", {**model}, per=10)  # three parts: its second repeats tensors of the first
    for p in _parts(tmp_path / "o")[1:2]:
        blob = bytearray(p.read_bytes())
        (tmp_path / "s" / "m-00002-of-00002.gguf").write_bytes(bytes(blob))
    for p in _parts(tmp_path / "s"):
        _set_kv(p, "split.tensors.count", 21, "<i")
    p2 = tmp_path / "s" / "m-00002-of-00002.gguf"
    _set_kv(p2, "split.count", 2, "<H")
    _set_kv(p2, "split.no", 1, "<H")
    assert first.exists() and other.exists()
    line = one_error(*run("inspect", first)[::2])
    assert "m-00002-of-00002.gguf: tensor `" in line and "is in parts 1 and 2 of its split GGUF" in line


def test_a_part_symlinked_out_of_its_folder_is_refused(tmp_path, model):
    first = _split(tmp_path / "s", model)
    away = tmp_path / "elsewhere"
    away.mkdir()
    part = tmp_path / "s" / "m-00004-of-00005.gguf"
    shutil.move(part, away / part.name)
    os.symlink(away / part.name, part)
    for named in (first, tmp_path / "s"):
        line = one_error(*run("inspect", named)[::2])
        assert "m-00004-of-00005.gguf: resolves to" in line and "refusing to follow the symlink" in line
