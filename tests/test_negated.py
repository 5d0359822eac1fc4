"""Matrices stored times -1 are measured against the base times -1, never read as another model's.

Negating v and o (or up and down of a gated MLP) leaves what a model computes exactly as it was, yet
as stored every such matrix has cosine -1 and relative change 2 with the base: a model computing its
base's function read "PARTIAL: ... unrelated (near-orthogonal, as independent initialisations)", and
the base with every matrix negated read "UNRELATED ... weighted cosine -1" (found by the
lineage/provenance/survey tester). The reference: a fine-tune, then negated, measures exactly as the
same fine-tune not negated.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.io.safetensors_write import to_storage
from weightdiff.kernels.dtypes import decode
from weightdiff.measure.compute import NEGATABLE, negated
from weightdiff.render.sentences import verdict_title

PAIRED = ("self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _negate(t: dict, layers=range(4), kinds=PAIRED) -> dict:
    out = dict(t)
    for i in layers:
        for k in kinds:
            name = f"model.layers.{i}.{k}.weight"
            out[name] = -out[name]
    return out


def _tuned(t: dict, rel: float = 1e-2, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rel * float(v.std()) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in t.items()}


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_function_preserving_sign_flip_reads_derived_with_nothing_changed(tmp_path, rng, dtype):
    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base, dtype=dtype)
    t = write_checkpoint(tmp_path / "signed", _negate(base), dtype=dtype)
    s = compare(b, t).summary
    assert s.verdict == "derived" and "negated_matrices" in s.flags
    assert s.scope["negated_matrices"]["tensors"] == 16 and s.scope["negated_matrices"]["tensors_changed"] == 0
    assert sorted(s.scope["negated_matrices"]["blocks"]["layers.2"]) == ["attn.o", "attn.v", "mlp.down", "mlp.up"]
    assert s.tensors_by_status.get("changed", 0) == 0 and s.relative_change == 0
    title = verdict_title(s.to_dict())
    assert "sign flipped" in title and "none of its other weights changed" in title
    assert "unrelated" not in (s.verdict_reason or "").lower()


def test_every_matrix_negated_is_not_unrelated(tmp_path, rng):
    base = llama(rng)
    neg = {k: -v if v.ndim == 2 else v for k, v in base.items()}
    r = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "n", neg))
    assert r.summary.verdict == "derived" and r.summary.scope["negated_matrices"]["tensors"] == 30
    assert not any(c["status"] == "unrelated" for c in r.summary.components)


def test_fine_tune_beneath_the_sign_measures_as_the_fine_tune(tmp_path, rng):
    base = llama(rng)
    tuned = _tuned(base)
    b = write_checkpoint(tmp_path / "base", base)
    plain = compare(b, write_checkpoint(tmp_path / "tuned", tuned))
    signed = compare(b, write_checkpoint(tmp_path / "signed", _negate(tuned, layers=[1, 3])))
    assert signed.summary.verdict == "derived" and signed.summary.scope["negated_matrices"] == {
        "blocks": {f"layers.{i}": ["attn.o", "attn.v", "mlp.down", "mlp.up"] for i in (1, 3)},
        "tensors": 8, "tensors_changed": 8}
    assert verdict_title(signed.summary.to_dict()).startswith("DERIVED: a fine-tune of this base, with some of its "
                                                              "matrices stored with the sign flipped")
    want = {r.name: r for r in plain.tensors}
    for r in signed.tensors:
        p = want[r.name]
        assert r.status == p.status
        for f in ("norm_delta", "rel_change", "cosine", "frac_changed", "max_abs_delta"):
            assert getattr(r, f) == pytest.approx(getattr(p, f), rel=1e-12, abs=1e-15), (r.name, f)
        if r.rank is not None:
            assert r.rank.numerical_rank == p.rank.numerical_rank
    assert signed.summary.relative_change == pytest.approx(plain.summary.relative_change, rel=1e-12)
    assert sum("sign flipped" in (r.note or "") for r in signed.tensors) == 8


def test_negated_bias_follows_its_weight(tmp_path, rng):
    base = llama(rng, layers=2)
    for i in range(2):
        base[f"model.layers.{i}.self_attn.v_proj.bias"] = rng.normal(0, 0.02, 128).astype(np.float32)
    tuned = _negate(base, layers=[0], kinds=("self_attn.v_proj", "self_attn.o_proj"))
    tuned["model.layers.0.self_attn.v_proj.bias"] = -base["model.layers.0.self_attn.v_proj.bias"]
    r = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    assert r.summary.scope["negated_matrices"]["tensors"] == 3
    assert r.summary.tensors_by_status.get("changed", 0) == 0


def test_a_partly_negative_cosine_is_left_as_measured(tmp_path, rng):
    # half the rows negated: cosine about 0, neither the base negated nor a sign flip of the whole matrix
    base = llama(rng, layers=2)
    tuned = dict(base)
    w = tuned["model.layers.0.mlp.up_proj.weight"].copy()
    w[::2] *= -1
    tuned["model.layers.0.mlp.up_proj.weight"] = w
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert "negated_matrices" not in s.flags


@pytest.mark.parametrize("dtype", NEGATABLE)
def test_negated_is_times_minus_one_in_every_format(dtype, rng):
    import torch

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz}
    bits = 8 * np.dtype(to_storage(np.zeros(1), dtype).dtype).itemsize
    if bits <= 16:      # every bit pattern: zeros, subnormals, infinities and NaNs
        raw = np.arange(1 << bits, dtype=np.uint16 if bits == 16 else np.uint8)
        raw = raw.view(to_storage(np.zeros(1), dtype).dtype)
    else:
        vals = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-40, 30, 1000),
                               [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-310, -5e-324]])
        raw = to_storage(vals, dtype)
    got = negated(raw.copy(), dtype)
    # the reference: torch's own negation of the same bit patterns
    t = torch.from_numpy(raw.view(np.int16 if bits == 16 else np.int8 if bits == 8 else raw.dtype).copy())
    ref = (-(t.view(names[dtype]).to(torch.float64))).to(names[dtype]).view(t.dtype).numpy().view(raw.dtype) \
        if bits <= 16 else -raw
    d_got, d_ref = decode(got, dtype), decode(ref, dtype)
    same = (d_got == d_ref) | (np.isnan(d_got) & np.isnan(d_ref))
    assert same.all(), dtype
    # and exactly -1 times each finite value, signed zeros as torch gives them
    v = decode(raw, dtype)
    finite = np.isfinite(v)
    assert np.array_equal(d_got[finite], -v[finite])


def test_provenance_ranks_the_signed_base_first_and_says_why(tmp_path, rng):
    from weightdiff.provenance import provenance

    base, other = llama(rng), llama(np.random.default_rng(77))
    b = write_checkpoint(tmp_path / "base", base)
    u = write_checkpoint(tmp_path / "other", other)
    t = write_checkpoint(tmp_path / "signed", _negate(base))
    r = provenance(t, [u, b], screen=False)
    assert r.leading == str(b) and r.candidates[0]["verdict"] == "derived"
    assert r.candidates[0]["negated"] == {"tensors": 16, "tensors_changed": 0}
    assert r.candidates[1]["negated"] is None and r.candidates[1]["verdict"] == "unrelated"
    assert any("sign flipped" in f and "nothing changed beneath" in f for f in r.findings)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3"])
def test_negated_then_cast_is_not_cast_only(tmp_path, rng, dtype):
    """Only q negated (which changes what the model computes), then cast: read "CAST ONLY ... no weight moved
    beyond it" (found by a tester verifying this round's fixes)."""
    base = llama(rng)
    s = compare(write_checkpoint(tmp_path / "b", base),
                write_checkpoint(tmp_path / "t", _negate(base, kinds=("self_attn.q_proj",)), dtype=dtype)).summary
    assert s.verdict == "derived" and s.scope["negated_matrices"]["tensors"] == 4
    title = verdict_title(s.to_dict())
    assert "sign flipped" in title and "beyond rounding" in title
    assert "not checked here" in s.verdict_reason


def test_small_matrices_are_never_taken_for_negations(tmp_path):
    """Two independent width-4 models: a 4 x 4 matrix reaches cosine -0.5 by chance; read PARTIAL "shared"
    once such matrices were undone as negations."""
    def toy(seed):
        r = np.random.default_rng(seed)
        return {f"model.layers.{i}.{k}.weight": r.normal(0, 0.02, (4, 4)).astype(np.float32)
                for i in range(2) for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")}
    for seed in range(1, 6):
        s = compare(write_checkpoint(tmp_path / f"a{seed}", toy(0)), write_checkpoint(tmp_path / f"b{seed}", toy(seed))).summary
        assert "negated_matrices" not in s.flags


def test_negated_matrices_left_as_stored_are_not_another_models(tmp_path, rng):
    """FP8-block quantized with v/o and up/down negated, and a LoRA adapter whose delta is -2W: neither can be
    measured against the base times -1, and both read PARTIAL "unrelated (near-orthogonal, as independent
    initialisations)" at cosine -1 (found by a tester verifying this round's fixes)."""
    import json

    import torch
    from safetensors.torch import save_file

    base = llama(rng, hidden=128, inter=256)
    b = write_checkpoint(tmp_path / "base", base)
    st = {}
    for k, v in base.items():
        x = torch.from_numpy(v).float()
        if k.startswith("model.layers") and x.ndim == 2:
            if any(p in k for p in PAIRED):
                x = -x
            o, i = x.shape
            s = x.reshape(o // 128, 128, i // 128, 128).abs().amax((1, 3)) / 448.0
            st[k] = (x / s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
            st[k[:-len("weight")] + "weight_scale_inv"] = s
        else:
            st[k] = x
    (tmp_path / "fp8").mkdir()
    save_file(st, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({
        "model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                       "fmt": "e4m3"}}))
    (tmp_path / "ad").mkdir()
    t = {}
    for i in range(4):
        for m in ("v_proj", "o_proj"):
            w = base[f"model.layers.{i}.self_attn.{m}.weight"]
            t[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_A.weight"] = torch.eye(128)
            t[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.weight"] = torch.from_numpy(-2 * w).float()
    save_file(t, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 128, "lora_alpha": 128, "target_modules": ["v_proj", "o_proj"],
        "bias": "none", "fan_in_fan_out": False}))
    for tuned, n in ((tmp_path / "fp8", 16), (tmp_path / "ad", 8)):
        s = compare(b, tuned).summary
        assert s.verdict == "derived", (tuned, s.verdict_reason)
        assert s.scope["negated_matrices"]["tensors_not_measured"] == n
        assert not any(c["status"] == "unrelated" for c in s.components)
        assert s.relatedness_cosine > 0.99
        title = verdict_title(s.to_dict())
        assert "sign flipped" in title and "not measured" in title and "a fine-tune" not in title, title


def test_zeros_of_the_other_sign_are_nothing_beneath_the_flip(tmp_path, rng):
    """A quantizer negates codes, not bits: code 0 times its scale is +0 where the base's zero negated is -0.
    A Q8_0 GGUF of a negated base against the base's own Q8_0 read INCONCLUSIVE, "quantized tensors differ",
    at relative change 0 (found by a tester verifying this round's fixes)."""
    gguf = pytest.importorskip("gguf")
    from gguf_build import to_gguf

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    neg = _negate(t, layers=range(2))
    q = gguf.GGMLQuantizationType.Q8_0
    b = to_gguf(tmp_path / "b.gguf", t, "llama", q, n_head=4, n_kv=2, layers=2)
    n = to_gguf(tmp_path / "n.gguf", neg, "llama", q, n_head=4, n_kv=2, layers=2)
    s = compare(b, n).summary
    assert s.verdict == "derived", s.verdict_reason
    assert s.scope["negated_matrices"] == {"blocks": {f"layers.{i}": ["attn.o", "attn.v", "mlp.down", "mlp.up"]
                                                      for i in range(2)}, "tensors": 8, "tensors_changed": 0}
    assert s.tensors_by_status.get("changed", 0) == 0 and s.tensors_by_status.get("quantized", 0) == 0


def test_lineage_step_says_what_its_numbers_are_net_of(tmp_path, rng):
    """A chain step whose model is its predecessor with 16 matrices negated read "derived, relative change 0,
    0 of 4 blocks changed" with the sign flips only in the raw flags (found by a tester verifying this
    round's fixes)."""
    from weightdiff.lineage import lineage

    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    t = write_checkpoint(tmp_path / "signed", _negate(base))
    r = lineage([b, t])
    step = r.to_dict()["steps"][0]
    assert step["negated_tensors"] == 16 and step["reordered_blocks"] == []
    assert any("16 tensors stored with the sign flipped" in f for f in r.findings)
