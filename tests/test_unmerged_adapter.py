"""A PEFT-wrapped model's whole state dict (LoRA, or another PEFT method): each adapted module's layer as `m.base_layer.weight` and its LoRA
factors beside it, the adapter not merged (`get_peft_model(...).state_dict()`, a trainer's full checkpoint).
Its base layers are the base's bit for bit, and it read "DERIVED: this base with tensors added; none of its own
weights changed" of a model that computes base + (lora_alpha / r) B A, a scale the state dict does not hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli, write_checkpoint
from weightdiff import compare

H, I = 64, 128
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]


def _base(rng) -> dict:
    t = {f"{m}.weight": rng.normal(0, 0.02, (I if "up" in m else H, H)).astype(np.float32) for m in MODULES}
    t.update({f"model.layers.{i}.input_layernorm.weight": np.ones(H, np.float32) for i in range(2)})
    t["model.embed_tokens.weight"] = rng.normal(0, 0.02, (200, H)).astype(np.float32)
    return t


def _wrapped(base: dict, rng, adapter: str | None = "default", dora: bool = False, changed: str | None = None,
             embedding: bool = False) -> dict:
    """The state dict PEFT's LoraModel holds: `m.base_layer.weight`, `m.lora_A.<adapter>.weight` [r, in],
    `m.lora_B.<adapter>.weight` [out, r] (and DoRA's `m.lora_magnitude_vector.<adapter>.weight`)."""
    name = f".{adapter}" if adapter else ""
    t = {}
    for k, v in base.items():
        m = k[:-len(".weight")]
        if m not in MODULES:
            t[k] = v
            continue
        t[f"{m}.base_layer.weight"] = v + (rng.normal(0, 2e-3, v.shape).astype(np.float32) if m == changed else 0)
        t[f"{m}.lora_A{name}.weight"] = rng.normal(0, 0.02, (4, v.shape[1])).astype(np.float32)
        t[f"{m}.lora_B{name}.weight"] = rng.normal(0, 0.02, (v.shape[0], 4)).astype(np.float32)
        if dora:
            t[f"{m}.lora_magnitude_vector{name}.weight"] = np.linalg.norm(v, axis=1).astype(np.float32)
    if embedding:
        e = "model.embed_tokens"
        t[f"{e}.base_layer.weight"] = t.pop(f"{e}.weight")
        t[f"{e}.lora_embedding_A{name}"] = rng.normal(0, 0.02, (4, 200)).astype(np.float32)
        t[f"{e}.lora_embedding_B{name}"] = rng.normal(0, 0.02, (H, 4)).astype(np.float32)
    return t


@pytest.mark.parametrize("adapter,dora,embedding", [("default", False, False), (None, False, False),
                                                    ("sft", True, True)], ids=["default", "unnamed", "dora-embedding"])
def test_unmerged_adapter_is_inconclusive_and_says_why(tmp_path, adapter, dora, embedding):
    rng = np.random.default_rng(3)
    base = _base(rng)
    a = write_checkpoint(tmp_path / "base", base)
    b = write_checkpoint(tmp_path / "wrapped", _wrapped(base, rng, adapter, dora, embedding=embedding))
    s = compare(a, b).summary
    assert s.verdict == "inconclusive" and "unmerged_adapter" in s.flags, (s.verdict, s.flags)
    modules = len(MODULES) + embedding
    assert s.scope["unmerged_adapter"]["modules"] == modules
    assert s.scope["unmerged_adapter"]["tensors"] == modules * 2 + (len(MODULES) if dora else 0)
    assert s.scope["unmerged_adapter"]["lora"] is True
    out = tmp_path / "out.json"
    rc, stdout, _ = cli("compare", a, b, "--json", out)
    assert rc == 0
    assert "LoRA factors not merged" in stdout and "none of its own weights changed" not in stdout
    assert "merge_and_unload" in stdout and f"{modules} modules carry LoRA factors" in stdout
    data = json.loads(out.read_text())
    assert data["summary"]["scope"]["unmerged_adapter"]["params"] == sum(
        t["numel"] for t in data["tensors"] if t["status"] == "added")


def test_unmerged_adapter_beside_a_changed_layer_is_a_fine_tune(tmp_path):
    """A base layer that moved too: the model is a fine-tune whatever the adapter adds (the flag says the
    factors are there)."""
    rng = np.random.default_rng(4)
    base = _base(rng)
    a = write_checkpoint(tmp_path / "base", base)
    b = write_checkpoint(tmp_path / "wrapped", _wrapped(base, rng, changed=MODULES[0]))
    s = compare(a, b).summary
    assert s.verdict == "derived" and "unmerged_adapter" in s.flags


def test_factors_both_models_store_are_paired_not_flagged(tmp_path):
    """Phi-4-multimodal keeps its speech and vision LoRAs in the checkpoint: a fine-tune of it stores them too,
    paired by name; nothing is unmerged relative to the base. And an added tensor named like a factor with no
    `base_layer` beside it is an added tensor."""
    rng = np.random.default_rng(5)
    base = _wrapped(_base(rng), rng, "speech")
    tuned = {k: v.copy() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.lora_B.speech.weight"] += 1e-3
    tuned["model.layers.0.extra.lora_A.weight"] = np.ones((4, H), np.float32)
    s = compare(write_checkpoint(tmp_path / "a", base), write_checkpoint(tmp_path / "b", tuned)).summary
    assert "unmerged_adapter" not in s.flags and s.verdict == "derived"


def test_another_methods_unmerged_tensors_are_inconclusive_too(tmp_path):
    """IA3 wrapped the same way: `m.base_layer.weight` and `m.ia3_l.default` (the model computes the layer
    with its rows or inputs scaled by it)."""
    rng = np.random.default_rng(6)
    base = _base(rng)
    tuned = {}
    for k, v in base.items():
        m = k[:-len(".weight")]
        if m in MODULES:
            tuned[f"{m}.base_layer.weight"] = v
            tuned[f"{m}.ia3_l.default"] = np.full((v.shape[0], 1), 1.1, np.float32)
        else:
            tuned[k] = v
    a, b = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ia3", tuned)
    s = compare(a, b).summary
    assert s.verdict == "inconclusive" and s.scope["unmerged_adapter"] == {
        "modules": len(MODULES), "tensors": len(MODULES), "params": sum(base[f"{m}.weight"].shape[0] for m in MODULES),
        "lora": False}
    rc, stdout, _ = cli("compare", a, b)
    assert rc == 0 and "a PEFT adapter's tensors not merged" in stdout and "lora_alpha" not in stdout


def test_a_vera_wrapped_state_dict_with_its_shared_projections_is_inconclusive(tmp_path):
    """VeRA keeps its projections at the model's root (`base_model.vera_A.default`) beside each module's copy: read
    as tensors added outside any wrapped module, they made the wrapped state dict "derived"."""
    rng = np.random.default_rng(7)
    base = _base(rng)
    tuned = {"base_model.vera_A.default": rng.normal(0, 1, (4, I)).astype(np.float32),
             "base_model.vera_B.default": rng.normal(0, 1, (I, 4)).astype(np.float32)}
    for k, v in base.items():
        m = k[:-len(".weight")]
        if m in MODULES:
            tuned[f"{m}.base_layer.weight"] = v
            tuned[f"{m}.vera_lambda_b.default"] = np.full(v.shape[0], 0.1, np.float32)
            tuned[f"{m}.vera_lambda_d.default"] = np.full(4, 0.1, np.float32)
        else:
            tuned[k] = v
    a, b = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "vera", tuned)
    s = compare(a, b).summary
    assert s.verdict == "inconclusive" and "unmerged_adapter" in s.flags
    assert s.scope["unmerged_adapter"]["modules"] == len(MODULES)
    assert s.scope["unmerged_adapter"]["tensors"] == 2 * len(MODULES) + 2
