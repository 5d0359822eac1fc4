"""compressed-tensors' packed fp4 formats: ``nvfp4-pack-quantized`` (llm-compressor's NVFP4 and NVFP4A16: e4m3
scales per 16 and a global scale) and ``mxfp4-pack-quantized`` (e8m0 scales per 32). Files are written by
compressed-tensors' own compressors and the values checked against its own decompressor, bit for bit."""

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

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from safetensors.torch import save_file  # noqa: E402

SHAPE = dict(layers=2, hidden=128, inter=256, vocab=128, kv=64)
SCHEMES = {
    "nvfp4-pack-quantized": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                             "group_size": 16},
    "mxfp4-pack-quantized": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                             "group_size": 32, "scale_dtype": "torch.uint8"},
}


def _args(fmt: str):
    """llm-compressor's preset weight args (NVFP4A16, MXFP4A16: scales rounded to their stored dtype before
    any weight is quantized, a zero scale replaced by that dtype's eps)."""
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16

    return (NVFP4A16 if fmt.startswith("nvfp4") else MXFP4A16)["weights"]


def ct_fp4(x: torch.Tensor, fmt: str) -> tuple[dict, np.ndarray]:
    """One weight compressed as llm-compressor's NVFP4A16 / MXFP4A16 schemes leave it (a min/max observer, the
    global scale of ``generate_gparam``), and compressed-tensors' own decompression of it (float32)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = _args(fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    v = x.reshape(x.shape[0], -1, args.group_size)
    gs = generate_gparam(x.amin(), x.amax()) if fmt.startswith("nvfp4") else None
    scale, zp = calculate_qparams(v.amin(-1), v.amax(-1), args, global_scale=gs)
    sd = {"weight": x, "weight_scale": scale, "weight_zero_point": zp}
    if gs is not None:
        sd["weight_global_scale"] = gs
    packed = comp.compress(sd, scheme)
    return packed, comp.decompress(packed, scheme)["weight"].float().numpy()


def build(folder: Path, tensors: dict, fmt: str, ignore=("lm_head",)) -> tuple[Path, dict]:
    """Every linear weight of the blocks quantized (llm-compressor's default recipe: ``Linear``, the head
    ignored), the rest bf16, saved with the config llm-compressor writes."""
    folder.mkdir(parents=True, exist_ok=True)
    out, ref = {}, {}
    for name, w in tensors.items():
        x = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(torch.bfloat16)
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            packed, ref[name] = ct_fp4(x, fmt)
            out.update({f"{name[:-7]}.{k}": t.contiguous() for k, t in packed.items()})
        else:
            out[name] = x.contiguous()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    weights = dict(SCHEMES[fmt])
    if fmt.startswith("mxfp4"):
        weights["scale_dtype"] = "torch.uint8"
    qc = {"quant_method": "compressed-tensors", "format": fmt, "ignore": list(ignore),
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return folder, ref


@pytest.fixture(scope="module")
def model():
    return llama(np.random.default_rng(21), **SHAPE)


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
def test_values_are_compressed_tensors_own_and_the_floor_holds(tmp_path, fmt):
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.02, (16, 256)).astype(np.float32)
    w[0] = 0                                              # an all-zero group
    w[1, :16] = 1e-9                                      # a group far below the tensor's largest: nvfp4's e4m3
    w[2] = rng.normal(0, 1, 256) * np.exp(rng.normal(0, 2, 256))   # scale rounds to its subnormals, or to 0
    w[3, 5] = 3.0                                         # one outlier
    w[4] = np.abs(w[4]) + 0.05
    x = torch.from_numpy(w).to(torch.bfloat16)
    packed, ref = ct_fp4(x, fmt)
    group = SCHEMES[fmt]["group_size"]
    g = float(packed["weight_global_scale"]) if "weight_global_scale" in packed else None
    v, f = K.ct_fp4_rows(packed["weight_packed"].numpy(), _scales_of(packed), group, g)
    assert np.array_equal(v, ref, equal_nan=True)
    held = x.float().numpy()
    assert np.all(np.abs(held - v) <= f), float(np.max(np.abs(held - v) - f))
    step = np.repeat(np.abs(_scales_of(packed)) / (g or 1.0), group, axis=1)
    assert np.all(f[5:] <= 3.1 * step[5:] + 2 * 2.0 ** -8 * np.abs(v[5:]) + (6 * 2.0 ** -10 / g if g else 0))
    # the same through a checkpoint of that one weight
    with locate(build(tmp_path / "one", {"model.layers.0.mlp.up_proj.weight": w}, fmt)[0]) as ck:
        got = ck.quant["model.layers.0.mlp.up_proj.weight"].rows(ck._stored_read, ck._stored_rows, 0, 16)
    assert np.array_equal(got[0], v, equal_nan=True) and np.array_equal(got[1], f)


def _scales_of(packed: dict) -> np.ndarray:
    s = packed["weight_scale"]
    if s.dtype == torch.uint8:
        return np.ldexp(np.float32(1.0), s.numpy().astype(np.int32) - 127).astype(np.float32)
    return s.float().numpy()


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
def test_a_build_of_the_base_is_quantized_only_and_of_a_fine_tune_derived(tmp_path, model, fmt):
    base = write_checkpoint(tmp_path / "base", model, dtype="BF16")
    q, _ = build(tmp_path / "q", model, fmt)
    with locate(q) as ck:
        info = ck.tensors["model.layers.0.mlp.down_proj.weight"]
        assert info.shape == (128, 256) and info.quant.format == "compressed-tensors" and info.quant.bits == 4
        assert info.quant.group == ("16" if fmt.startswith("nv") else "32")
    res = weightdiff.compare(base, q, rank=False)
    assert res.summary.verdict == "quantized_only", res.summary.headline
    quantized = [t for t in res.tensors if t.status == "quantized"]
    assert len(quantized) == 14 and all(t.quant["within"] is True for t in quantized)
    rng = np.random.default_rng(4)
    tuned = {k: low_rank_update(rng, v, 4, rel=0.3) if k.endswith("v_proj.weight") else v for k, v in model.items()}
    qt, _ = build(tmp_path / "qt", tuned, fmt)
    res = weightdiff.compare(base, qt, rank=False)
    assert res.summary.verdict == "derived", res.summary.headline
    assert {t.name for t in res.tensors if t.status == "changed"} == \
        {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)}


def test_broken_fp4_weights_are_one_line(tmp_path, model):
    q, _ = build(tmp_path / "q", model, "nvfp4-pack-quantized")
    from safetensors.torch import load_file

    t = load_file(str(q / "model.safetensors"))
    del t["model.layers.0.mlp.up_proj.weight_global_scale"]
    save_file(t, str(q / "model.safetensors"))
    line = one_error(*run("inspect", q)[::2])
    assert "`model.layers.0.mlp.up_proj.weight_packed` has e4m3 (nvfp4) scales but no one-number " \
           "`model.layers.0.mlp.up_proj.weight_global_scale` beside it" in line
    q2, _ = build(tmp_path / "q2", model, "nvfp4-pack-quantized")
    cfg = json.loads((q2 / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    (q2 / "config.json").write_text(json.dumps(cfg))
    line = one_error(*run("inspect", q2)[::2])
    assert "gives groups of 16 4-bit codes, but quantization_config's float group" in line
