"""SmoothQuant's smoothing scales: each norm divided by a factor per channel and the matrices that read it
(q, k, v; gate, up) multiplied column by column by the same factors, which changes nothing the model computes.
llm-compressor applies them before quantizing (its W8A8 recipes: SmoothQuantModifier, then round to nearest or
GPTQ). As written, the base so smoothed and quantized read "DERIVED: built on this base, but changed far more
than a fine-tune changes it" (relative change 3.9): the matrices are measured against the base times the norms'
ratio now, the quantized ones tested against their floor so.

The fixtures under tests/data/ct_smooth were written by llm-compressor 0.14's oneshot and compressed-tensors'
writer (make.py there says how)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.render.sentences import verdict_title

DATA = Path(__file__).parent / "data" / "ct_smooth"
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


@pytest.mark.parametrize("folder,status", [("sq-float", "rounding"), ("sq-w8a8", "quantized"),
                                           ("sq-gptq", "quantized")])
def test_the_base_smoothed_by_llm_compressor_is_the_base(folder, status):
    r = compare(DATA / "base", DATA / folder)
    s = r.summary
    assert s.verdict == "derived" and "folded_norms" in s.flags and "far_from_base" not in s.flags, s.verdict_reason
    assert s.scope["folded_norms"] == {"norms": 4, "norms_smoothed": 4, "tensors": 10, "tensors_changed": 0}
    by = {t.name: t for t in r.tensors}
    for i in range(2):
        for m in READERS:
            t = by[f"model.layers.{i}.{m}.weight"]
            assert t.status == status and "gains of the base's" in t.note, (t.name, t.status)
        for n in ("input_layernorm", "post_attention_layernorm"):
            assert "smoothing scales" in by[f"model.layers.{i}.{n}.weight"].note
    title = verdict_title(s.to_dict())
    assert "smoothing scales" in title and "none of its other weights changed" in title, title
    assert "a fine-tune" not in title


def test_a_fine_tune_smoothed_and_quantized_reads_as_the_fine_tune():
    """A rank-4 update of every q_proj, then SmoothQuant W8A8: the two q_proj read changed beneath the scales, the
    rest within the floor (the group scales checked against the base so scaled, within an ulp: a fine-tune of
    relative size 1e-2 matched 56-67% of them, the base 100%)."""
    r = compare(DATA / "base", DATA / "ft-sq-w8a8")
    s = r.summary
    changed = sorted(t.name for t in r.tensors if t.status == "changed" and len(t.shape) == 2)
    assert changed == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    assert s.scope["folded_norms"]["norms_smoothed"] == 4 and s.scope["folded_norms"]["tensors_changed"] == 2
    assert verdict_title(s.to_dict()).startswith("DERIVED: a fine-tune of this base, with the gains of 4 norms moved")


def _smoothed(base: dict, s: np.ndarray, readers=READERS, layers=range(4)) -> dict:
    """Each norm divided by its own scales (SmoothQuant's come from each norm's activations): ``s`` for the input
    norms, its reverse for the others."""
    t = {k: v.astype(np.float64) for k, v in base.items()}
    for i in layers:
        p = f"model.layers.{i}."
        for norm, kinds, f in (("input_layernorm", readers[:3], s), ("post_attention_layernorm", readers[3:], s[::-1])):
            t[p + norm + ".weight"] = t[p + norm + ".weight"] / f
            for k in kinds:
                if k:
                    t[p + k + ".weight"] = t[p + k + ".weight"] * f[None, :]
    return {k: v.astype(np.float32) for k, v in t.items()}


def test_smoothing_in_float_and_what_is_not_smoothing(tmp_path, rng):
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    s = np.exp(np.random.default_rng(4).normal(0, 0.5, 128))
    r = compare(b, write_checkpoint(tmp_path / "sq", _smoothed(base, s))).summary
    assert r.verdict == "derived" and r.scope["folded_norms"]["norms_smoothed"] == 8
    assert not r.tensors_by_status.get("changed")                # the norms measured beneath the fold too
    assert "none of its other weights changed" in verdict_title(r.to_dict())
    # the norms divided, the matrices left alone: the model computes something else
    plain = dict(base)
    for k in base:
        if k.endswith("layernorm.weight"):
            plain[k] = (base[k] / s).astype(np.float32)     # (test of the matrices: one scale for all will do)
    r = compare(b, write_checkpoint(tmp_path / "norms", plain)).summary
    assert "folded_norms" not in r.flags and "a fine-tune" in verdict_title(r.to_dict())
    # q scaled, k and v left as they were: q matches the scaled base, but the input norms are no smoothing
    part = _smoothed(base, s, readers=("self_attn.q_proj", "", "", "mlp.gate_proj", "mlp.up_proj"))
    r = compare(b, write_checkpoint(tmp_path / "part", part)).summary
    assert r.scope["folded_norms"]["norms_smoothed"] == 4            # the MLP's norms only
    assert "a fine-tune" in verdict_title(r.to_dict())
    # a dense fine-tune whose norms moved too is no smoothing
    rr = np.random.default_rng(6)
    ft = {k: (v * (1 + 0.02 * rr.standard_normal(v.shape))).astype(np.float32) for k, v in base.items()}
    r = compare(b, write_checkpoint(tmp_path / "ft", ft)).summary
    assert "folded_norms" not in r.flags
    # fine-tuned (norms too), then pruned: the pruned matrices came closer to a base scaled by any norm's ratio (their
    # zeros cost less) and read "0 norms hold all ones, their base gains folded ... the model computes what the base
    # computes"; a ratio must explain most of the difference, from a norm that feeds the matrix
    pruned = {}
    for k, v in ft.items():
        if v.ndim == 2 and ".layers." in k:
            v = np.where(np.abs(v) >= np.quantile(np.abs(v), 0.5), v, 0).astype(np.float32)
        pruned[k] = v
    r = compare(b, write_checkpoint(tmp_path / "ftp", pruned)).summary
    assert "folded_norms" not in r.flags and "computes what the base computes" not in r.verdict_reason


def test_folded_norms_are_measured_beneath_the_fold_and_blocks_count_the_training_only(tmp_path, rng):
    """A model with one block trained, then its norms folded: each all-ones norm read as a change of the size of its
    gains' spread (0.1 here), so every block read changed, the untouched ones more than the trained one."""
    base = llama(rng)
    for k in base:
        if k.endswith("norm.weight"):
            base[k] = (1 + 0.1 * np.random.default_rng(2).standard_normal(base[k].shape)).astype(np.float32)
    b = write_checkpoint(tmp_path / "b", base)
    t = dict(base)
    rr = np.random.default_rng(7)
    for k, v in base.items():
        if k.startswith("model.layers.2.") and v.ndim == 2:
            t[k] = (v + 0.05 * float(v.std()) * rr.standard_normal(v.shape)).astype(np.float32)
    folded = {k: v.astype(np.float64) for k, v in t.items()}
    for i in range(4):
        p = f"model.layers.{i}."
        for norm, kinds in (("input_layernorm", READERS[:3]), ("post_attention_layernorm", READERS[3:])):
            g = folded[p + norm + ".weight"]
            for k in kinds:
                folded[p + k + ".weight"] = folded[p + k + ".weight"] * g[None, :]
            folded[p + norm + ".weight"] = np.ones_like(g)
    folded["lm_head.weight"] = folded["lm_head.weight"] * folded["model.norm.weight"][None, :]
    folded["model.norm.weight"] = np.ones_like(folded["model.norm.weight"])
    r = compare(b, write_checkpoint(tmp_path / "f", {k: v.astype(np.float32) for k, v in folded.items()}))
    s = r.summary
    assert s.scope["folded_norms"]["norms"] == 9 and s.scope["blocks_changed"] == 1, s.scope
    assert [blk.block for blk in r.blocks if blk.tensors_changed] == ["layers.2"]
    norms = [x for x in r.tensors if x.name.endswith("norm.weight")]
    assert all(x.status in ("unchanged", "rounding") and "folded" in x.note for x in norms)


def test_layernorm_bias_and_gemma_norms_in_smoothing(tmp_path, rng):
    """From the verification tester: a LayerNorm's weight divided by the scales and its bias left (logits 0.01 away)
    read "nothing changed"; divided with it (as llm-compressor does on BLOOM and OPT) the bias read changed; Gemma
    stores w and applies 1 + w: its stored w divided by the scales (logits 0.14 away) read "nothing changed", and a
    right smoothing, (1 + w) / s - 1, read "a fine-tune"."""
    import json

    base = llama(rng)
    for k in list(base):
        if k.endswith("layernorm.weight"):
            base[k[:-len("weight")] + "bias"] = rng.normal(0, 0.05, base[k].shape).astype(np.float32)
    b = write_checkpoint(tmp_path / "b", base)
    s = np.exp(np.random.default_rng(4).normal(0, 0.5, 128))

    def layernorm(bias: bool) -> dict:
        t = _smoothed(base, s)
        for i in range(4):
            for norm, f in (("input_layernorm", s), ("post_attention_layernorm", s[::-1])):
                k = f"model.layers.{i}.{norm}.bias"
                t[k] = (base[k] / f).astype(np.float32) if bias else base[k]
        return t

    r = compare(b, write_checkpoint(tmp_path / "with", layernorm(True))).summary
    assert r.scope["folded_norms"]["norms_smoothed"] == 8 and not r.tensors_by_status.get("changed"), r.tensors_by_status
    r = compare(b, write_checkpoint(tmp_path / "without", layernorm(False))).summary
    assert not r.scope.get("folded_norms", {}).get("norms_smoothed") and r.tensors_by_status.get("changed") == 8

    gemma = json.dumps({"model_type": "gemma"})
    g = {k: ((v - 1.0) if k.endswith("norm.weight") else v) for k, v in llama(np.random.default_rng(9)).items()}
    bg = write_checkpoint(tmp_path / "gb", g)
    (bg / "config.json").write_text(gemma)

    def gem(right: bool) -> Path:
        t = {k: v.astype(np.float64) for k, v in g.items()}
        for i in range(4):
            p = f"model.layers.{i}."
            for norm, kinds, f in (("input_layernorm", READERS[:3], s), ("post_attention_layernorm", READERS[3:], s[::-1])):
                w = t[p + norm + ".weight"]
                t[p + norm + ".weight"] = (1.0 + w) / f - 1.0 if right else w / f
                for k in kinds:
                    t[p + k + ".weight"] = t[p + k + ".weight"] * f[None, :]
        out = write_checkpoint(tmp_path / f"g{right}", {k: v.astype(np.float32) for k, v in t.items()})
        (out / "config.json").write_text(gemma)
        return out

    r = compare(bg, gem(False)).summary
    assert "none of its other weights changed" not in verdict_title(r.to_dict()) and r.tensors_by_status.get("changed")
    r = compare(bg, gem(True)).summary
    assert r.scope["folded_norms"]["norms_smoothed"] == 8 and not r.tensors_by_status.get("changed")

