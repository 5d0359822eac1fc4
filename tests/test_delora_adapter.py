"""PEFT's DeLoRA adapters (normalized low-rank terms bounded by a trained lambda, columns scaled by the base's saved
norms): measured exactly as the factor pair they make, against PEFT 0.21's own ``merge_and_unload()`` and numpy, and
bad input refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract
from test_hra_adapter import factors_read_as_merged
from test_vblora_adapter import _llama

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _saved(tmp_path, **config):
    _llama().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama(), peft.DeloraConfig(init_weights=False, **config))
        pm.save_pretrained(tmp_path / "ad")
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


def test_a_llama_adapter_reads_as_peft_merges_it(tmp_path):
    got, recs = factors_read_as_merged(*_saved(tmp_path, r=4, delora_lambda=15.0, target_modules=["q_proj", "down_proj"]),
                                       4, 1e-5, 1e-6, "adapter: 4 DeLoRA modules (each measured exactly")
    assert all(r["note"].startswith("DeLoRA `base_model.model.") for r in recs.values())
    # the change written down: r (out + in) per module, the adapter's A and B (lambda and w_norm are scales)
    assert got["summary"]["scope"]["delta_params_changed"] == 2 * 4 * ((32 + 32) + (32 + 48))


def test_a_rank_pattern_and_a_trained_lambda(tmp_path):
    """rank_pattern gives q_proj its own r; the lambda the adapter saves (trained) is the one applied, not the
    config's delora_lambda."""
    base, ad, merged = _saved(tmp_path, r=4, rank_pattern={"q_proj": 2}, delora_lambda=15.0,
                              target_modules=["q_proj", "down_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "delora_lambda": 1.0}))     # only the start value
    got = {x["name"]: x for x in weightdiff.compare(str(base), str(ad)).to_dict()["tensors"]}
    want = {x["name"]: x for x in weightdiff.compare(str(base), str(merged)).to_dict()["tensors"]}
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert got[n]["rank"]["numerical_rank"] == (2 if "q_proj" in n else 4)
        assert got[n]["norm_delta"] == pytest.approx(want[n]["norm_delta"], rel=1e-5)


def test_factors_against_numpy():
    """A term whose norm is under PEFT's clamp (1e-4) keeps the clamp, as PEFT's torch.clamp does."""
    from types import SimpleNamespace

    from weightdiff.io.peft_delora import delora_product

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 7)), rng.standard_normal((5, 3))
    a[1] *= 1e-7
    w, lam = rng.uniform(0.5, 2, 7), 4.0
    a2, b2 = delora_product(SimpleNamespace(r=3), {"A": a, "B": b, "lambda": np.array([lam]), "w_norm": w})
    an = np.maximum(np.linalg.norm(a, axis=1), 1e-4)
    bn = np.maximum(np.linalg.norm(b, axis=0), 1e-4)
    want = (b @ np.diag(lam / 3 / (an * bn)) @ a) * w[None, :]
    assert np.abs(b2 @ a2 - want).max() <= 1e-13 * np.abs(want).max()


def test_inspect(tmp_path):
    _, ad, _ = _saved(tmp_path, r=4, target_modules=["q_proj"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "format      PEFT DeLoRA adapter, 1 file" in r.output, r.output
    assert "adapter     DeLoRA r=4, 2 modules" in r.output


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _write(tmp_path, config=None, drop=(), shapes=None):
    b, ad = tmp_path / "base", tmp_path / "ad"
    for f in (b, ad):
        f.mkdir(parents=True, exist_ok=True)
    save_file(b / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": np.ones((8, 6), np.float32)})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "DELORA", "r": 2, "target_modules": ["q_proj"],
                                                        **(config or {})}))
    sh = {"A": (2, 6), "B": (8, 2), "lambda": (1,), "w_norm": (6,), **(shapes or {})}
    save_file(ad / "adapter_model.safetensors", {f"{Q}.delora_{k}": np.ones(s, np.float32) for k, s in sh.items()
                                                 if k not in drop})
    return b, ad


@pytest.mark.parametrize("config, drop, shapes, expect", [
    ({}, ("w_norm",), None, "lacks delora_w_norm"),
    ({"r": 3}, (), None, "PEFT builds [3, in], [out, 3], [1] and [in]"),
    ({}, (), {"w_norm": (5,)}, "delora_w_norm [5]"),
    ({}, (), {"A": (2, 7), "w_norm": (7,)}, "do not fit the base weight, which is [8, 6]"),
    ({"peft_type": "LORA"}, (), None, "DeLoRA"),
])
def test_refused(tmp_path, config, drop, shapes, expect):
    b, ad = _write(tmp_path, config, drop, shapes)
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", expect, tmp_path)
