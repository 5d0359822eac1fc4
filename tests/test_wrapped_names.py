"""A state dict saved through a training wrapper (torch.distributed's activation checkpointing, FSDP) holds the
wrapper's segment inside each wrapped module's names: `model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`.
Prefix alignment finds a wrapper only in front; these paired by content at best, and the norm weights (alike to
content pairing) not at all, counted as added and the base's as removed. They are read under the module's own
names (``checkpoint.unwrap_names``), by their stored names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli, write_checkpoint
from weightdiff import compare
from weightdiff.io.checkpoint import locate

H = 96


def _model(rng) -> dict:
    t = {}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.02, (H, H)).astype(np.float32)
        t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.02, (768, H)).astype(np.float32)   # past the small-pair path
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32)
    t["model.embed_tokens.weight"] = rng.normal(0, 0.02, (50, H)).astype(np.float32)
    return t


def _wrapped(t: dict, fsdp: bool = False) -> dict:
    def name(k: str) -> str:
        k = k.replace(".layers.0.", ".layers.0._checkpoint_wrapped_module.").replace(
            ".layers.1.", ".layers.1._checkpoint_wrapped_module.")
        return "_fsdp_wrapped_module." + k if fsdp else k
    return {name(k): v for k, v in t.items()}


@pytest.mark.parametrize("fsdp", [False, True], ids=["checkpointed", "fsdp"])
def test_wrapped_names_pair_by_name_and_measure_as_unwrapped(tmp_path, fsdp):
    rng = np.random.default_rng(7)
    base = _model(rng)
    tuned = {k: v + (rng.normal(0, 1e-3, v.shape).astype(np.float32) if v.ndim == 2 else 0.01) for k, v in base.items()}
    a = write_checkpoint(tmp_path / "base", base)
    plain = write_checkpoint(tmp_path / "plain", tuned)
    wrapped = write_checkpoint(tmp_path / "wrapped", _wrapped(tuned, fsdp))
    ckpt = locate(wrapped)
    assert set(ckpt.tensors) == set(tuned)
    assert ckpt.file_names["model.layers.1.mlp.up_proj.weight"] == _wrapped(
        {"model.layers.1.mlp.up_proj.weight": 0}, fsdp).popitem()[0]
    np.testing.assert_array_equal(ckpt.read("model.layers.1.mlp.up_proj.weight"), tuned["model.layers.1.mlp.up_proj.weight"])
    outs = []
    for b in (plain, wrapped):
        out = tmp_path / f"{b.name}.json"
        rc, _, err = cli("compare", a, b, "--json", out)
        assert rc == 0, err
        outs.append(json.loads(out.read_text()))
    assert outs[1]["summary"]["tensors_by_status"] == outs[0]["summary"]["tensors_by_status"] == \
        {**outs[0]["summary"]["tensors_by_status"], "added": 0, "removed": 0}
    assert [{k: v for k, v in t.items() if k != "note"} for t in outs[1]["tensors"]] == \
        [{k: v for k, v in t.items() if k != "note"} for t in outs[0]["tensors"]]
    assert outs[1]["summary"]["verdict"] == "derived"
    assert any("training wrapper" in n for n in outs[1]["plan"]["notes"])


def test_wrapped_names_that_would_collide_stay_stored(tmp_path):
    """A name whose unwrapped form is another stored name (or two that unwrap alike) leaves every name as stored."""
    rng = np.random.default_rng(8)
    t = _model(rng)
    t["model.layers.0._checkpoint_wrapped_module.input_layernorm.weight"] = np.ones(H, np.float32)
    ckpt = locate(write_checkpoint(tmp_path / "c", t))
    assert set(ckpt.tensors) == set(t) and not ckpt.file_names


def test_wrapped_pickle_reads_by_stored_names(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    base = _model(rng)
    (tmp_path / "p").mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in _wrapped(base).items()}, tmp_path / "p" / "pytorch_model.bin")
    s = compare(write_checkpoint(tmp_path / "base", base), tmp_path / "p").summary
    assert s.verdict == "identical" and s.tensors_by_status["unchanged"] == len(base)


def test_peft_modules_to_save_copy_is_the_models_own(tmp_path):
    """PEFT's trained copy (`m.modules_to_save.<adapter>.weight`) is read as `m.weight`, the frozen
    `m.original_module.weight` left out; two adapters' copies, or an original with no copy, leave every name as
    stored."""
    rng = np.random.default_rng(10)
    t = _model(rng)
    head = rng.normal(0, 0.02, (50, H)).astype(np.float32)
    one = {**t, "lm_head.original_module.weight": head, "lm_head.modules_to_save.default.weight": head + 0.01}
    ckpt = locate(write_checkpoint(tmp_path / "one", one))
    assert "lm_head.weight" in ckpt.tensors and not any("original_module" in n for n in ckpt.tensors)
    np.testing.assert_array_equal(ckpt.read("lm_head.weight"), head + 0.01)
    assert any("modules_to_save" in n for n in ckpt.notes)
    two = {**one, "lm_head.modules_to_save.other.weight": head}
    assert set(locate(write_checkpoint(tmp_path / "two", two)).tensors) == set(two)
    alone = {**t, "lm_head.original_module.weight": head}
    assert set(locate(write_checkpoint(tmp_path / "alone", alone)).tensors) == set(alone)
