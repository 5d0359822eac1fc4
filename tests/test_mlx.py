"""MLX quantized checkpoints (mlx-lm: ``mlx_lm.convert -q``, the mlx-community builds): codes packed in uint32
with scales (and biases) per group, the group size and bits in config.json's ``quantization``. The files are
written by MLX itself (``mx.quantize``, ``mx.save_safetensors``), the dequantizer is checked against
``mx.dequantize`` bit for bit, and its floor against the weights MLX quantized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli as run, one_error, write_checkpoint
from models import llama, low_rank_update

import weightdiff
from weightdiff.io.checkpoint import locate
from weightdiff.kernels import quant as K

mx = pytest.importorskip("mlx.core")

SHAPE = dict(layers=2, hidden=128, inter=256, vocab=128, kv=64)
MX_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}




def _mx(x: np.ndarray, dtype: str):
    return mx.array(np.asarray(x, np.float32)).astype(getattr(mx, MX_DTYPE[dtype]))


def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype not in (mx.uint8, mx.uint32) else np.array(a)


def mlx_build(folder: Path, tensors: dict, bits: int = 4, group: int = 64, mode: str = "affine",
              per_module: dict | None = None, dtype: str = "BF16", tune=None) -> Path:
    """The model as ``mlx_lm.convert -q`` leaves it: every 2-D weight (and stacked experts) whose rows split into
    groups quantized by ``mx.quantize`` (the embedding and head too), the rest in ``dtype``, saved by ``mx.save_safetensors``, and
    config.json's ``quantization`` (and ``quantization_config``) as ``mlx_lm.utils.quantize_model`` writes it,
    with ``per_module`` entries by module path. ``tune(name, scales, biases)``: scales and biases changed after
    the rounding (what mlx-lm's DWQ trains)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, w in tensors.items():
        mod = name.removesuffix(".weight")
        cfg = {"group_size": group, "bits": bits, "mode": mode, **(per_module or {}).get(mod, {})}
        x = _mx(w, dtype)
        if w.ndim >= 2 and name.endswith(".weight") and w.shape[-1] % cfg["group_size"] == 0:
            q = mx.quantize(x, group_size=cfg["group_size"], bits=cfg["bits"], mode=cfg["mode"])
            parts = [q[0], q[1]] + ([q[2]] if cfg["mode"] == "affine" else [])
            if tune is not None and cfg["mode"] == "affine":
                s, b = tune(name, _np(q[1]), _np(q[2]))
                parts[1], parts[2] = _mx(s, dtype), _mx(b, dtype)
            out[name], out[mod + ".scales"] = parts[0], parts[1]
            if len(parts) > 2:
                out[mod + ".biases"] = parts[2]
        else:
            out[name] = x
    mx.save_safetensors(str(folder / "model.safetensors"), out, metadata={"format": "mlx"})
    quant = {"group_size": group, "bits": bits, "mode": mode, **(per_module or {})}
    config = {"model_type": "llama", "hidden_size": SHAPE["hidden"], "num_attention_heads": 4,
              "num_key_value_heads": 2, "quantization": quant, "quantization_config": quant}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model():
    return llama(np.random.default_rng(11), **SHAPE)


def _adversarial(rng, cols: int) -> np.ndarray:
    w = rng.normal(0, 0.02, (12, cols)).astype(np.float32)
    w[0] = 0                                          # an all-zero group
    w[1] = 0.0123                                     # constant
    w[2] = rng.normal(0, 1, cols) * np.exp(rng.normal(0, 3, cols))     # a huge dynamic range
    w[3, 7] = 5.0                                     # one outlier
    w[4] = np.abs(w[4]) + 0.1                         # all positive, away from zero
    w[5] = -np.abs(w[5]) - 0.1                        # all negative
    w[6] = 1e-8 * rng.normal(size=cols)               # below the scale's eps
    w[7] = np.float32(2.0 ** -130) * rng.integers(-3, 4, cols)         # subnormal
    w[8, ::2], w[8, 1::2] = 1.0, -1.0                 # extremes of equal magnitude
    return w


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_affine_dequantization_is_mlxs_bit_for_bit_and_its_floor_holds(dtype):
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            w = _adversarial(rng, 256)
            if dtype == "F16":
                w[7] = 0                              # below float16's range: flushed to zero by the cast anyway
            x = _mx(w, dtype)
            q, s, b = mx.quantize(x, group_size=group, bits=bits)
            ref = _np(mx.dequantize(q, s, b, group_size=group, bits=bits))
            v, f = K.mlx_affine_rows(np.array(q), _np(s), _np(b), bits, group, dtype)
            assert np.array_equal(v, ref, equal_nan=True), (bits, group)
            held = _np(x)
            ok = np.isfinite(held).all(axis=1)[:, None] & np.isfinite(v)    # (a float16 cast overflows row 2)
            assert ok[3:].all() and np.all(np.abs(held - v)[ok] <= f[ok]), (bits, group)
            step = np.repeat(np.abs(_np(s)), group, axis=1)
            # a bound, not a blanket: on ordinary rows at 4 bits or fewer, within 2 steps (1.5 at the end codes,
            # and the roundings of the scale and the bias, which at 6 and 8 bits in bfloat16 reach a step more)
            assert bits > 4 or np.all(f[9:] <= 2 * step[9:]), (bits, group)
            assert np.all((f >= step / 2)[ok]), (bits, group)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8"])
def test_floating_point_modes_are_mlxs_bit_for_bit_and_their_floor_holds(mode):
    rng = np.random.default_rng(1)
    for dtype in ("BF16", "F32"):
        w = _adversarial(rng, 256)
        w[9] = rng.normal(0, 1, 256) * 0.0707        # amax / 6 (or / 448) just past a power of two: rounded down
        w[9, 0] = 6 * 2.0 ** -3 * 1.4 if mode == "mxfp4" else 448 * 2.0 ** -9 * 1.4
        x = _mx(w, dtype)
        q, s = mx.quantize(x, mode=mode)
        ref = _np(mx.dequantize(q, s, mode=mode))
        v, f = K.mlx_fp_rows(np.array(q), np.array(s), mode)
        assert np.array_equal(v, ref, equal_nan=True), dtype
        held = _np(x)
        ok = np.isfinite(v)
        # (row 7, weights near 2^-130: MLX's exponent, below -127, wraps around in its uint8 scale and the codes
        # read as numbers near 2^125; mx.dequantize reads them so, as above, and no floor is claimed for them)
        ok[7] = False
        assert np.all(np.abs(held - v)[ok] <= f[ok]), (dtype, float(np.max((np.abs(held - v) - f)[ok])))


@pytest.mark.parametrize("bits,group,mode", [(4, 64, "affine"), (8, 64, "affine"), (3, 32, "affine"),
                                             (6, 128, "affine"), (4, 32, "mxfp4"), (8, 32, "mxfp8")])
def test_an_mlx_build_of_the_base_is_quantized_only(tmp_path, model, bits, group, mode):
    base = write_checkpoint(tmp_path / "base", model, dtype="BF16")
    q = mlx_build(tmp_path / "q", model, bits, group, mode)
    with locate(q) as ck:
        src = ck.quant["model.layers.0.mlp.down_proj.weight"]
        assert ck.tensors["model.layers.0.mlp.down_proj.weight"].shape == (128, 256)
        assert src.scheme.format == "mlx" and src.scheme.bits == bits and src.scheme.group == str(group)
        assert ck.tensors["model.embed_tokens.weight"].quant is not None          # embeddings are quantized too
    res = weightdiff.compare(base, q, rank=False)
    assert res.summary.verdict == "quantized_only", (res.summary.verdict, res.summary.headline)
    quantized = [t for t in res.tensors if t.status == "quantized"]
    assert len(quantized) == 16 and all(t.quant["within"] is True and t.quant["test"] == "bound" for t in quantized)


def test_per_module_bits_are_read_from_the_config(tmp_path, model):
    """A mixed recipe (mlx_lm.convert --quant-predicate mixed_4_6): some layers at more bits, by module path."""
    base = write_checkpoint(tmp_path / "base", model, dtype="BF16")
    mixed = {"model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}, "lm_head": {"group_size": 64, "bits": 6}}
    q = mlx_build(tmp_path / "q", model, 4, 64, per_module=mixed)
    with locate(q) as ck:
        assert ck.quant["model.layers.0.mlp.down_proj.weight"].bits == 8
        assert ck.quant["model.layers.0.mlp.down_proj.weight"].group == 32
        assert ck.quant["lm_head.weight"].bits == 6 and ck.quant["model.layers.1.mlp.down_proj.weight"].bits == 4
    assert weightdiff.compare(base, q, rank=False).summary.verdict == "quantized_only"
    # read with the default instead (its entry dropped), the head's 6-bit codes do not fit 4-bit groups of 64
    # (8 bits in groups of 32 would: the same words and as many scales; only the config tells them apart)
    cfg = json.loads((q / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        del cfg[key]["lm_head"]
    (q / "config.json").write_text(json.dumps(cfg))
    line = one_error(*run("inspect", q)[::2])
    assert "`lm_head.weight` U32 [128, 24] and `lm_head.scales` BF16 [128, 2] do not hold 4-bit codes in groups " \
           "of 64 (the config's MLX quantization): the scales should be [128, 3]" in line


def test_a_fine_tune_quantized_by_mlx_is_derived(tmp_path, model):
    base = write_checkpoint(tmp_path / "base", model, dtype="BF16")
    rng = np.random.default_rng(5)
    tuned = {k: low_rank_update(rng, v, 4, rel=0.2) if k.endswith("q_proj.weight") else v for k, v in model.items()}
    q = mlx_build(tmp_path / "q", tuned, 8, 64)
    res = weightdiff.compare(base, q, rank=False)
    assert res.summary.verdict == "derived", res.summary.headline
    changed = {t.name for t in res.tensors if t.status == "changed"}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


@pytest.mark.parametrize("bits,dtype", [(4, "BF16"), (8, "BF16"), (3, "F16")])
def test_scales_tuned_after_rounding_are_untested_not_a_fine_tune(tmp_path, model, bits, dtype):
    """mlx-lm's DWQ (and its AWQ, GPTQ) write the same layout with scales and biases trained after the rounding:
    the weights may then be any distance from their codes' plain values, so no floor bounds them. Read as
    quantized, untested: inconclusive, never "derived" (at 8 bits in bfloat16 too, where the scale's own
    rounding spans a step: the check is the identity scale = round(bias / q0), not a tolerance)."""
    base = write_checkpoint(tmp_path / "base", model, dtype="BF16")
    rng = np.random.default_rng(8)

    def tune(name, s, b):
        return s * (1 + rng.normal(0, 0.03, s.shape)), b + rng.normal(0, 0.3, b.shape) * np.abs(s)

    q = mlx_build(tmp_path / "q", model, bits, 64, dtype=dtype, tune=tune)
    with locate(q) as ck:
        src = ck.quant["model.layers.0.mlp.up_proj.weight"]
        assert src.floored(ck._stored_read) is False
        assert ck.floor_windows("model.layers.0.mlp.up_proj.weight") is None
    res = weightdiff.compare(base, q, rank=False)
    assert res.summary.verdict == "inconclusive", res.summary.headline
    assert all(t.quant["within"] is None for t in res.tensors if t.quant)
    # the plain build's scales pass the same check
    with locate(mlx_build(tmp_path / "plain", model, bits, 64, dtype=dtype)) as ck:
        assert all(s.floored(ck._stored_read) for s in ck.quant.values())


def test_mlx_weights_without_their_config_or_in_a_mode_not_read(tmp_path, model):
    q = mlx_build(tmp_path / "q", model, 4, 64)
    (q / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = one_error(*run("inspect", q)[::2])
    assert "`lm_head.weight` is U32 beside `lm_head.scales`: an MLX quantized weight (mlx-lm), but config.json has no " \
           "`quantization` (group size and bits)" in line
    nv = mlx_build(tmp_path / "nv", model, 4, 16, mode="nvfp4")
    line = one_error(*run("inspect", nv)[::2])
    assert "MLX's nvfp4 mode (e4m3 scales per 16) is not read" in line
    cfg = json.loads((q / "config.json").read_text())
    q2 = mlx_build(tmp_path / "q2", model, 4, 64)
    cfg = json.loads((q2 / "config.json").read_text())
    cfg["quantization"]["mode"] = cfg["quantization_config"]["mode"] = "ternary"
    (q2 / "config.json").write_text(json.dumps(cfg))
    line = one_error(*run("inspect", q2)[::2])
    assert "the config's MLX quantization mode 'ternary' is not one weightdiff reads" in line


@pytest.mark.parametrize("edit,expect", [
    ({"bits": True}, "(bits True, group size 64) is not one MLX writes"),
    ({"bits": 7}, "(bits 7, group size 64) is not one MLX writes"),
    ({"group_size": 0}, "(bits 4, group size 0) is not one MLX writes"),
    ({"group_size": 10 ** 9}, "do not hold 4-bit codes in groups of 1000000000"),
    ({"mode": ["affine"]}, "the config's MLX quantization mode ['affine'] is not one weightdiff reads"),
])
def test_a_hostile_mlx_quantization_config_is_one_line(tmp_path, model, edit, expect):
    q = mlx_build(tmp_path / "q", model, 4, 64)
    cfg = json.loads((q / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        cfg[key].update(edit)
    (q / "config.json").write_text(json.dumps(cfg))
    line = one_error(*run("compare", q, q)[::2])
    assert expect in line, line


def mlx_sanitized(tensors: dict) -> dict:
    """A mixture-of-experts state dict as mlx-lm's ``sanitize`` stores it: each layer's experts stacked as
    ``switch_mlp.{gate,up,down}_proj.weight`` [experts, m, n] (Mixtral's w1, w3, w2 renamed so)."""
    out, groups = {}, {}
    for k, v in tensors.items():
        parts = k.split(".")
        if "experts" not in parts:
            out[k] = v
            continue
        i = parts.index("experts")
        proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.get(parts[i + 2], parts[i + 2])
        groups.setdefault(".".join(parts[:i]) + f".switch_mlp.{proj}.weight", {})[int(parts[i + 1])] = v
    out.update({k: np.stack([g[e] for e in range(len(g))]) for k, g in groups.items()})
    return out


@pytest.mark.parametrize("style", ["qwen", "mixtral"])
@pytest.mark.parametrize("bits", [4, None])
def test_mlx_stacked_experts_pair_with_the_bases_own(tmp_path, style, bits):
    """mlx-lm's MoE models store a layer's experts stacked (``switch_mlp``, quantized or not): read as the experts'
    own tensors under the Hugging Face names they were stacked from, each expert pairs with the base's, and a
    fine-tune of one expert is that expert's change."""
    from models import moe

    t = moe(np.random.default_rng(2), style=style, layers=2, hidden=64, inter=64, experts=4)
    base = write_checkpoint(tmp_path / "base", t, dtype="BF16")
    down = "experts.1.w2.weight" if style == "mixtral" else "experts.1.down_proj.weight"
    tuned = {k: low_rank_update(np.random.default_rng(3), v, 2, rel=0.5) if k.endswith(down) else v
             for k, v in t.items()}
    for tag, tensors in (("same", t), ("tuned", tuned)):
        if bits:
            q = mlx_build(tmp_path / tag, mlx_sanitized(tensors), bits, 64)
        else:
            q = write_checkpoint(tmp_path / tag, mlx_sanitized(tensors), shards=2, dtype="BF16")  # an index of the stacks
        with locate(q) as ck:
            assert ck.tensors.keys() == t.keys()
            src = ck.quant.get(f"model.layers.0.{'block_sparse_moe' if style == 'mixtral' else 'mlp'}.{down}")
            assert (src is not None and src.shape == (64, 64)) == bool(bits)     # each expert its own source
        res = weightdiff.compare(base, q, rank=False)
        assert not [x for x in res.tensors if x.status in ("added", "removed")]
        if tag == "same":
            assert res.summary.verdict == ("quantized_only" if bits else "identical"), res.summary.headline
        else:
            assert res.summary.verdict == "derived", res.summary.headline
            assert {x.name for x in res.tensors if x.status == "changed"} == \
                {f"model.layers.{i}.{'block_sparse_moe' if style == 'mixtral' else 'mlp'}.{down}" for i in range(2)}


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "mxfp8"])
def test_nan_inf_and_empty_read_as_mlx_reads_them(mode):
    """A group holding NaN or an infinity (a broken weight): the values read are mx.dequantize's whatever MLX made
    of it (the affine quantizer stores such a group as zeros; the base side's NaN is then what the stats pass
    counts), the sound rows keep their bound, and an empty row block reads as nothing."""
    rng = np.random.default_rng(9)
    w = rng.normal(0, 0.02, (4, 64)).astype(np.float32)
    w[1, 3], w[2, 40] = np.nan, np.inf
    x = _mx(w, "BF16")
    if mode == "affine":
        q, s, b = mx.quantize(x, group_size=32, bits=4)
        ref = _np(mx.dequantize(q, s, b, group_size=32, bits=4))
        v, f = K.mlx_affine_rows(np.array(q), _np(s), _np(b), 4, 32, "BF16")
        empty = K.mlx_affine_rows(np.zeros((0, 8), np.uint32), np.zeros((0, 2), np.float32),
                                  np.zeros((0, 2), np.float32), 4, 32, "BF16")
    else:
        q, s = mx.quantize(x, mode=mode)
        ref = _np(mx.dequantize(q, s, mode=mode))
        v, f = K.mlx_fp_rows(np.array(q), np.array(s), mode)
        empty = K.mlx_fp_rows(np.zeros((0, 8 if mode == "mxfp4" else 16), np.uint32), np.zeros((0, 2), np.uint8), mode)
    assert np.array_equal(v, ref, equal_nan=True)
    held = _np(x)
    assert np.all(np.abs(held - v)[[0, 3]] <= f[[0, 3]])                       # the sound rows keep their bound
    assert empty[0].shape == (0, 64) and empty[1].shape == (0, 64)
