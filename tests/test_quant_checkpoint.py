"""Quantized checkpoints built with the formats' own tools where they run on CPU
(compressed-tensors' compressors, torch float8, transformers' MXFP4 layout) and with the
documented packers of tests/quant_packers.py otherwise (GPTQ, AWQ, bitsandbytes): each is
located, folded into its logical weights, dequantized equal to the reference, and compared
with its float base without companions showing up as tensors or parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from weightdiff import compare  # noqa: E402
from weightdiff.io.checkpoint import locate  # noqa: E402
from weightdiff.errors import CheckpointError  # noqa: E402

import quant_packers as P  # noqa: E402
from conftest import cli, one_error  # noqa: E402

LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
OUT, IN = 64, 256


def base_model(rng) -> dict[str, np.ndarray]:
    t = {f"{m}.weight": (rng.standard_normal((OUT, IN)) * 0.02).astype(np.float32) for m in LINEARS}
    t["model.norm.weight"] = np.ones(IN, np.float32)
    t["model.embed_tokens.weight"] = (rng.standard_normal((100, IN)) * 0.02).astype(np.float32)
    return t


def fine_tune(rng, base: dict, rel: float = 0.05, rank: int = 4) -> dict:
    out = dict(base)
    for m in LINEARS:
        w = base[f"{m}.weight"]
        d = rng.standard_normal((OUT, rank)) @ rng.standard_normal((rank, IN))
        out[f"{m}.weight"] = (w + d * rel * np.linalg.norm(w) / np.linalg.norm(d)).astype(np.float32)
    return out


def _save(folder, tensors: dict, qc: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
               for k, v in tensors.items()}, str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if qc is not None:
        cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _others(t: dict) -> dict:
    return {k: v for k, v in t.items() if not any(k.startswith(m + ".") for m in LINEARS)}


# -- builders: (stored tensors, config, {logical name: reference dequantized values}) --------

def build_fp8_block(t):
    out, ref = _others(t), {}
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    for m in LINEARS:
        x = torch.from_numpy(t[f"{m}.weight"])
        s = x.reshape(OUT // 32, 32, IN // 128, 128).abs().amax((1, 3)) / 448.0   # 32x128 blocks
        w = (x / s.repeat_interleave(32, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
        out[f"{m}.weight"], out[f"{m}.weight_scale_inv"] = w, s.float()
        ref[f"{m}.weight"] = _dequantize_fp8_weight(w, s, [32, 128], torch.float32).numpy()
    return out, {"quant_method": "fp8", "weight_block_size": [32, 128], "fmt": "e4m3"}, ref


def _ct(t, compressor_name, weights_args, scale_dtype=torch.bfloat16):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**weights_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    comp = BaseCompressor.get_value_from_registry(compressor_name)
    out, ref = _others(t), {}
    for m in LINEARS:
        x = torch.from_numpy(t[f"{m}.weight"]).to(scale_dtype)
        if args.strategy == "group":
            v = x.reshape(OUT, IN // args.group_size, args.group_size)
            mn, mx = v.amin(-1), v.amax(-1)
        else:
            mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale, zp = calculate_qparams(mn, mx, args)
        sd = {"weight": x, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zp}
        packed = comp.compress(sd, scheme)
        out.update({f"{m}.{k}": v for k, v in packed.items()})
        ref[f"{m}.weight"] = comp.decompress(packed, scheme)["weight"].float().numpy()
    qc = {"quant_method": "compressed-tensors", "format": compressor_name,
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_args}}}
    return out, qc, ref


def build_ct_pack(t):
    return _ct(t, "pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                     "group_size": 64})


def build_ct_int8(t):
    return _ct(t, "int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"})


def build_ct_int8_asym(t):
    # compressed-tensors computes x / s + zp in the weights' dtype (bf16 here), rounded before the round to
    # an integer: up to half a step more error than the symmetric scheme, at codes of large magnitude
    return _ct(t, "int-quantized", {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"})


def build_ct_pack_g32_asym(t):
    return _ct(t, "pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                     "group_size": 32})


def build_ct_fp8(t):
    return _ct(t, "float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"})


def build_gptq(t, v1=True):
    out, ref = _others(t), {}
    rng = np.random.default_rng(7)
    for m in LINEARS:
        g_idx = (np.arange(IN) // 64).astype(np.int32)[rng.permutation(IN)]     # desc_act order
        qw, qz, sc, _ = P.gptq_pack(t[f"{m}.weight"], g_idx, 4, v1)
        out.update({f"{m}.qweight": qw, f"{m}.qzeros": qz, f"{m}.scales": sc, f"{m}.g_idx": g_idx})
        ref[f"{m}.weight"] = P.gptq_reference(qw, qz, sc, g_idx, 4, v1).T
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
          "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return out, qc, ref


def build_awq(t):
    out, ref = _others(t), {}
    for m in LINEARS:
        qw, qz, sc = P.awq_pack(t[f"{m}.weight"], 64)
        out.update({f"{m}.qweight": qw, f"{m}.qzeros": qz, f"{m}.scales": sc})
        ref[f"{m}.weight"] = P.awq_reference(qw, qz, sc, 4, 64).T
    return out, {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, ref


def build_bnb4(t, nested=True):
    out, ref = _others(t), {}
    for m in LINEARS:
        st = P.bnb4_quantize(torch.from_numpy(t[f"{m}.weight"]).to(torch.bfloat16), 64, "nf4", nested)
        out.update(P.bnb4_state_tensors(f"{m}.weight", st))
        ref[f"{m}.weight"] = P.bnb4_reference(st).float().numpy()
    return out, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                 "bnb_4bit_use_double_quant": nested}, ref


def build_bnb8(t):
    out, ref = _others(t), {}
    for m in LINEARS:
        x = t[f"{m}.weight"]
        scb = np.abs(x).max(1).astype(np.float32)
        cb = np.round(x * (127.0 / scb)[:, None]).astype(np.int8)
        out.update({f"{m}.weight": cb, f"{m}.SCB": scb})
        ref[f"{m}.weight"] = (torch.from_numpy(cb) * torch.from_numpy(scb).view(-1, 1) * 7.874015718698502e-3).numpy()
    return out, {"quant_method": "bitsandbytes", "load_in_8bit": True}, ref


BUILDERS = {"fp8-block": build_fp8_block, "ct-pack-int4": build_ct_pack, "ct-int8": build_ct_int8,
            "ct-int8-asym": build_ct_int8_asym, "ct-pack-int4-g32-asym": build_ct_pack_g32_asym,
            "ct-fp8": build_ct_fp8, "gptq-v1": build_gptq, "gptq-v2": lambda t: build_gptq(t, False),
            "awq": build_awq, "bnb-nf4-nested": build_bnb4, "bnb-int8": build_bnb8}


@pytest.fixture(scope="module")
def base_tensors():
    return base_model(np.random.default_rng(2024))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_fold_reads_reference_values(tmp_path, base_tensors, kind):
    stored, qc, ref = BUILDERS[kind](base_tensors)
    path = _save(tmp_path / kind, stored, qc)
    with locate(path) as ck:
        assert sorted(ck.tensors) == sorted(base_tensors)              # companions folded away
        assert ck.params == sum(v.size for v in base_tensors.values())  # packed ints are not parameters
        for name, want in ref.items():
            info = ck.tensors[name]
            assert info.quant is not None and info.shape == (OUT, IN) and info.dtype == "F32"
            got = ck.read(name)
            np.testing.assert_array_equal(got, want)
            flat = np.concatenate(list(ck.windows(name, 1000)))       # windows straddle rows
            np.testing.assert_array_equal(flat, want.reshape(-1))
            floors = np.concatenate(list(ck.floor_windows(name, 777)))
            assert floors.shape == (OUT * IN,) and np.all(floors > 0)
            np.testing.assert_array_equal(ck.read_rows(name, [5, 3]), want[[5, 3]])


def test_mxfp4_experts(tmp_path, rng):
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    blocks = rng.integers(0, 256, (2, 8, 2, 16)).astype(np.uint8)
    scales = rng.integers(118, 130, (2, 8, 2)).astype(np.uint8)
    p = _save(tmp_path / "mx", {"model.layers.0.mlp.experts.gate_up_proj_blocks": blocks,
                                "model.layers.0.mlp.experts.gate_up_proj_scales": scales,
                                "model.layers.0.mlp.experts.gate_up_proj_bias": np.zeros((2, 8), np.float32)},
              {"quant_method": "mxfp4"})
    want = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                       dtype=torch.bfloat16).float().numpy()
    with locate(p) as ck:
        # fused experts come out as the experts' own tensors (weightdiff.io.experts), the bias too
        assert sorted(ck.tensors) == [f"model.layers.0.mlp.experts.{e}.{leaf}"
                                      for e in (0, 1) for leaf in ("gate_up_proj", "gate_up_proj_bias")]
        for e in (0, 1):
            name = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
            assert ck.tensors[name].shape == (64, 8)
            assert ck.tensors[name].quant.stored_bytes == (blocks.nbytes + scales.nbytes) // 2
            np.testing.assert_array_equal(ck.read(name), want[e])
            np.testing.assert_array_equal(np.concatenate(list(ck.windows(name, 100))), want[e].reshape(-1))
            np.testing.assert_array_equal(ck.read_rows(name, [63, 2, 3]), want[e][[63, 2, 3]])
            assert np.concatenate(list(ck.floor_windows(name, 77))).shape == (64 * 8,)


def test_compare_base_with_its_quantization_has_no_added_tensors(tmp_path, base_tensors):
    base = _save(tmp_path / "base", base_tensors, None)
    stored, qc, _ = build_gptq(base_tensors)
    tuned = _save(tmp_path / "gptq", stored, qc)
    result = compare(base, tuned, rank=False)
    statuses = {t.name: t.status for t in result.tensors}
    assert sorted(statuses) == sorted(base_tensors)
    assert "added" not in statuses.values() and "removed" not in statuses.values()


BAD = [
    ("missing scales", lambda s: s.pop(f"{LINEARS[0]}.scales"), "has no `model.layers.0.self_attn.q_proj.scales`"),
    ("g_idx length", lambda s: s.__setitem__(f"{LINEARS[0]}.g_idx", np.zeros(7, np.int32)), "expected [256]"),
    ("scales rows", lambda s: s.__setitem__(f"{LINEARS[0]}.scales", np.zeros((3, OUT), np.float16)), "disagree"),
    ("g_idx range", lambda s: s.__setitem__(f"{LINEARS[0]}.g_idx", np.full(IN, 9, np.int32)),
     "must index the 4 scale groups with integers in [0, 4)"),
    ("stray companion", lambda s: s.__setitem__("model.layers.0.mlp.up_proj.qzeros", np.zeros((4, 8), np.int32)),
     "quantization companion"),
]


@pytest.mark.parametrize("what,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_quantization_is_bad_input(tmp_path, base_tensors, what, mutate, message):
    stored, qc, _ = build_gptq(base_tensors)
    mutate(stored)
    path = _save(tmp_path / "bad", stored, qc)
    with pytest.raises(CheckpointError) as exc:
        locate(path)
    assert message in str(exc.value) and "model.safetensors" in str(exc.value)


@pytest.mark.parametrize("packed", [False, True], ids=["qint8", "qint4"])
def test_optimum_quanto_files_are_refused(tmp_path, base_tensors, packed):
    """optimum-quanto 0.2.7's save_pretrained (QuantizedModelForCausalLM) writes no
    quantization_config: `m.weight._data` (I8; U8 `m.weight._data._data` for 4 bits), `._scale`,
    `._shift` and `input_scale`/`output_scale` beside them. Its codes were read as weights (a
    `derived` verdict with a relative change of 1069 for the base's own quantization)."""
    stored = _others(base_tensors)
    for m in LINEARS:
        w = base_tensors[f"{m}.weight"]
        s = np.abs(w).max(axis=1, keepdims=True) / 127
        if packed:
            stored[f"{m}.weight._data._data"] = np.zeros((w.shape[0], w.shape[1] // 2), np.uint8)
            stored[f"{m}.weight._shift"] = np.zeros((w.shape[0], 1), np.float32)
        else:
            stored[f"{m}.weight._data"] = np.round(w / s).astype(np.int8)
        stored[f"{m}.weight._scale"] = s.astype(np.float32)
        stored[f"{m}.input_scale"] = np.ones((), np.float32)
    path = _save(tmp_path / "quanto", stored, None)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*\._data.* are an optimum-quanto quantized "
                                              "weight, which weightdiff does not dequantize"):
        locate(path)


def _foreign(kind: str, w: np.ndarray) -> dict:
    """A module's stored leaves in a quantized format weightdiff does not read, as its own writers name them
    (shapes of their packing; the values do not matter to the refusal)."""
    out, inp = w.shape
    i32, i16, u8, f16 = np.int32, np.int16, np.uint8, np.float16
    return {
        # exllamav2 ext.py / linear.py: q_weight packed [in * bits / 32, out], per-group scales and their max
        "exl2": {"q_weight": np.zeros((inp // 8, out), i32), "q_scale": np.zeros((inp // 32, out // 8), i32),
                 "q_scale_max": np.ones(inp // 32, f16), "q_groups": np.zeros(inp // 16, i16),
                 "q_invperm": np.arange(inp, dtype=i32)},
        # exllamav3 LinearEXL3: trellis [in / 16, out / 16, 16 * bits], Hadamard signs suh / svh
        "exl3": {"trellis": np.zeros((inp // 16, out // 16, 64), i16), "suh": np.ones(inp, f16),
                 "svh": np.ones(out, f16)},
        # transformers' AQLM QuantizedLinear: codes [out, in / 8, codebooks], codebooks, scales
        "aqlm": {"codes": np.zeros((out, inp // 8, 1), i16), "codebooks": np.zeros((1, 256, 1, 8), f16),
                 "scales": np.ones((out, 1, 1, 1), f16)},
        # hqq's HQQLinear state dict as transformers serializes it: W_q and its meta flattened beside it
        "hqq": {"W_q": np.zeros((out * inp // 128, 64), u8), "scale": np.ones((out * inp // 64, 1), f16),
                "zero": np.ones((out * inp // 64, 1), f16), "nbits": np.array([4], i32)},
        "vptq": {"indices": np.zeros((1, out // 2, inp), i16), "centroids.weight": np.zeros((1, 4096 * 8), f16),
                 "weight_scale": np.ones(inp, f16), "weight_bias": np.zeros(inp, f16)},
        "quip": {"Qidxs": np.zeros((out, inp // 8), i16), "SU": np.ones(inp, f16), "SV": np.ones(out, f16),
                 "Wscale": np.ones((), np.float32)},
        "spqr": {"dense_weights": np.zeros(out * inp // 8, np.int64), "row_offsets": np.zeros(out + 1, i32),
                 "col_vals": np.zeros(8, i32), "in_perm": np.arange(inp, dtype=i32)},
        # EETQ's EetqLinear: the int8 weight [in, out], per-column weight_scales
        "eetq": {"weight": np.zeros((inp, out), np.int8), "weight_scales": np.ones(out, f16)},
    }[kind]


FOREIGN = {"exl2": "EXL2 (exllamav2)", "exl3": "EXL3 (exllamav3)", "aqlm": "AQLM", "hqq": "HQQ", "vptq": "VPTQ",
           "quip": "QuIP#", "spqr": "SpQR", "eetq": "EETQ"}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_quantized_formats_not_read_are_refused_by_their_names(tmp_path, base_tensors, kind):
    """A build in a quantized format weightdiff does not dequantize, with no quantization_config saying so
    (an EXL2 build from before exllamav2 wrote one; a file passed on its own): read as plain tensors, every
    linear weight was removed and other tensors added, and the verdict read "DERIVED: this base with tensors
    added and removed; none of its own weights changed" (EETQ's int8 codes: "a fine-tune of this base"). It is
    refused in one line naming the file, the tensors and the format, and nothing is written."""
    stored = _others(base_tensors)
    for m in LINEARS:
        stored.update({f"{m}.{leaf}": v for leaf, v in _foreign(kind, base_tensors[f"{m}.weight"]).items()})
    path = _save(tmp_path / kind, stored, None)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .* hold a weight quantized in the "
                                              + re.escape(FOREIGN[kind]) + " format, which weightdiff does not"):
        locate(path)
    base = _save(tmp_path / "base", base_tensors, None)
    out = tmp_path / "out.json"
    line = one_error(*cli("compare", base, path, "--json", out)[::2])
    assert f"{kind}/model.safetensors" in line and FOREIGN[kind] in line and "model.layers.0.mlp.down_proj." in line
    assert not out.exists()


def test_foreign_names_without_their_companions_stay_tensors(tmp_path, base_tensors):
    """The marks alone are not a format: a model's own parameter named `W_q` or `indices`, or a float weight
    with `weight_scales` beside it, is read as the tensor it is; so is a float `W_q` beside a `scale` (an
    attention's own parameters: HQQ's codes are integers), and float `codes` beside `codebooks`."""
    stored = dict(base_tensors)
    stored["model.layers.0.attn.W_q"] = np.ones((4, 4), np.float32)
    stored["model.layers.0.router.indices"] = np.arange(4, dtype=np.int64)
    stored["model.layers.0.gate.weight"] = np.ones((4, 4), np.float32)
    stored["model.layers.0.gate.weight_scales"] = np.ones(4, np.float32)
    stored["model.layers.1.attn.W_q"] = np.ones((4, 4), np.float32)        # float: a parameter, not HQQ's codes
    stored["model.layers.1.attn.scale"] = np.ones((), np.float32)
    stored["model.layers.1.vq.codebooks"] = np.ones((4, 4), np.float32)    # float codes beside: not AQLM's
    stored["model.layers.1.vq.codes"] = np.ones((4, 4), np.float32)
    ckpt = locate(_save(tmp_path / "own", stored, None))
    assert {"model.layers.0.attn.W_q", "model.layers.0.router.indices",
            "model.layers.0.gate.weight_scales", "model.layers.1.attn.W_q", "model.layers.1.vq.codes"} <= set(ckpt.tensors)


def test_unsupported_method_names_config(tmp_path, base_tensors):
    path = _save(tmp_path / "hqq", base_tensors, {"quant_method": "hqq"})
    with pytest.raises(CheckpointError, match="config.json: quantization method 'hqq' is not supported"):
        locate(path)


def test_fp8_scale_grid_must_tile(tmp_path, base_tensors):
    stored, qc, _ = build_fp8_block(base_tensors)
    stored[f"{LINEARS[1]}.weight_scale_inv"] = torch.ones(3, 3)
    path = _save(tmp_path / "fp8bad", stored, qc)
    with pytest.raises(CheckpointError, match=r"does not tile fp8 weight `model.layers.0.mlp.down_proj.weight`"):
        locate(path)


@pytest.mark.parametrize("strategy, scale, ok", [("channel", "scalar", False), ("tensor", "rows", False),
                                                 ("tensor", "scalar", True), ("channel", "rows", True)])
def test_compressed_tensors_fp8_scale_must_be_its_strategys(tmp_path, base_tensors, strategy, scale, ok):
    # a per-tensor scalar under strategy "channel" (or per-channel scales under "tensor") is not this config's
    # scale: read as one, every row would dequantize with one number
    stored, qc, _ = build_ct_fp8(base_tensors)
    qc["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    m = LINEARS[1]
    rows = stored[f"{m}.weight"].shape[0]
    stored[f"{m}.weight_scale"] = torch.full((1,), 0.01) if scale == "scalar" else torch.full((rows, 1), 0.01)
    for other in LINEARS:
        if other != m:
            stored[f"{other}.weight_scale"] = torch.full((1,), 0.01) if scale == "scalar" else \
                torch.full((stored[f"{other}.weight"].shape[0], 1), 0.01)
    path = _save(tmp_path / f"ct-{strategy}-{scale}", stored, qc)
    if ok:
        with locate(path) as ck:
            assert f"{m}.weight" in ck.quant
    else:
        with pytest.raises(CheckpointError, match=rf"`{m}.weight_scale` has shape .* but quantization_config's "
                                                  rf"strategy is {strategy}"):
            locate(path)


@pytest.mark.parametrize("block", [[128, 256], [64, 256], [128, 512]])
def test_fp8_weight_inside_one_block_reads_as_transformers_does(tmp_path, base_tensors, block):
    """A weight no larger than one block has a [1, 1] scale grid, what the config asks for; it was taken
    for a per-tensor scale and refused because the config names a block size (tiny FP8 models, small
    projections). Read against transformers' own dequantization."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    stored, ref = _others(base_tensors), {}
    for m in LINEARS:
        x = torch.from_numpy(base_tensors[f"{m}.weight"])                     # [64, 256]: inside every block
        grid = (-(-OUT // block[0]), -(-IN // block[1]))
        s = torch.full(grid, float(x.abs().max()) / 448.0) if grid == (1, 1) else \
            x.reshape(grid[0], OUT // grid[0], grid[1], IN // grid[1]).abs().amax((1, 3)) / 448.0
        w = (x / s.repeat_interleave(OUT // grid[0], 0).repeat_interleave(IN // grid[1], 1)).to(torch.float8_e4m3fn)
        stored[f"{m}.weight"], stored[f"{m}.weight_scale_inv"] = w, s.float()
        ref[f"{m}.weight"] = _dequantize_fp8_weight(w, s, block, torch.float32).numpy()
    path = _save(tmp_path / "fp8one", stored, {"quant_method": "fp8", "weight_block_size": block})
    with locate(path) as ck:
        for name, want in ref.items():
            np.testing.assert_array_equal(ck.read(name), want)
            assert ck.quant[name].scheme.group == f"{block[0]}x{block[1]}"


def test_inspect_names_format_and_scheme(tmp_path, base_tensors):
    from weightdiff.inspect import describe, render_text

    stored, qc, _ = build_ct_pack(base_tensors)
    stored[f"{LINEARS[0]}.input_scale"] = torch.ones(1)
    doc = describe(_save(tmp_path / "ct", stored, qc))
    q = doc["quantization"]
    assert q["method"] == "compressed-tensors" and q["folded_away"] == [f"{LINEARS[0]}.input_scale"]
    assert {t["scheme"] for t in q["tensors"]} == {"int4 asym, group 64 (pack-quantized)"}
    assert sorted(q["tensors"][0]["stored"])[0].endswith(".weight_packed")
    assert doc["params"] == sum(v.size for v in base_tensors.values())
    text = render_text(doc)
    assert "compressed-tensors: int4 asym, group 64 (pack-quantized)  (4: " in text
    assert describe(_save(tmp_path / "plain", base_tensors, None))["quantization"] is None


def test_fp8_stacked_experts(tmp_path, rng):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    x = torch.from_numpy((rng.standard_normal((3, 64, 256)) * 0.02).astype(np.float32))
    s = x.reshape(3, 2, 32, 2, 128).abs().amax((2, 4)) / 448.0
    w = (x / s.repeat_interleave(32, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    p = _save(tmp_path / "moe", {"model.layers.0.mlp.experts.down_proj.weight": w,
                                 "model.layers.0.mlp.experts.down_proj.weight_scale_inv": s}, None)
    name = "model.layers.0.mlp.experts.down_proj.weight"
    want = _dequantize_fp8_weight(w, s, [32, 128], torch.float32).numpy()
    with locate(p) as ck:
        assert list(ck.tensors) == [name] and ck.tensors[name].shape == (3, 64, 256)
        np.testing.assert_array_equal(np.concatenate(list(ck.windows(name, 5000))).reshape(want.shape), want)


def test_fold_shortcut_sees_every_name_fold_acts_on(monkeypatch):
    """The one-search shortcut of ``fold`` (nothing to fold: the same tensors) never skips a name the
    full pass acts on, and gives the full pass's answer on a plain checkpoint."""
    from pathlib import Path

    from weightdiff.io import quantized as Q
    from weightdiff.io.safetensors_read import TensorInfo

    def info(name, dtype="BF16", shape=(4, 4)):
        return TensorInfo(name, dtype, shape, Path("x"), 0, 32)

    leaves = {"qweight", "weight_packed", "SCB", "weight_scale", "weight_scale_inv", *Q.ACTIVATION_SCALES,
              *Q._COMPANIONS, *Q._COMPANIONS_IF_QUANTIZED}
    for leaf in leaves:
        for name in (f"model.layers.0.mlp.{leaf}", leaf, f"a\nb.{leaf}"):
            assert Q._special_names({"model.embed.weight": info("model.embed.weight"), name: info(name)}), name
    for name in ("model.layers.0.experts.gate_up_proj_blocks", "x.weight.quant_state.bitsandbytes__nf4"):
        assert Q._special_names({name: info(name)}), name
    plain = {n: info(n) for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                  "model.layers.0.mlp.qweight_x", "model.layers.0.scales_norm.weight",
                                  "model.layers.1.blocks.0.weight", "lm_head.weight", "weight_scale.bias")}
    assert not Q._special_names(plain)
    fast = Q.fold(plain, None, None)
    monkeypatch.setattr(Q, "_special_names", lambda tensors, joined=None: True)
    assert Q.fold(plain, None, None) == fast == (plain, {}, [])


# -- hostile companions and quantization_config values: CheckpointError naming the file, never a crash

_M = "model.layers.0.q"
_BNB_STATE = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [16, 16]}


def _js(x) -> np.ndarray:
    return np.frombuffer(x if isinstance(x, bytes) else json.dumps(x).encode(), np.uint8).copy()


def _bnb(state, weight=True, name=f"{_M}.weight.quant_state.bitsandbytes__nf4") -> dict:
    t = {name: _js(state)}
    if weight:
        t.update({f"{_M}.weight": np.zeros((128, 1), np.uint8), f"{_M}.weight.absmax": np.ones(4, np.float32),
                  f"{_M}.weight.quant_map": np.linspace(-1, 1, 16).astype(np.float32)})
    return t


def _ct_cfg(**w) -> dict:
    return {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, **w}}}}


_I8W = {f"{_M}.weight": np.zeros((4, 8), np.int8), f"{_M}.weight_scale": np.ones((2, 3), np.float32)}
_NESTED = {f"{_M}.weight.nested_absmax": np.ones(1, np.float32),
           f"{_M}.weight.nested_quant_map": np.ones(256, np.float32)}

HOSTILE = [
    ("bnb state without weight", _bnb(_BNB_STATE, weight=False), None, "model.safetensors",
     "quant state `model.layers.0.q.weight.quant_state.bitsandbytes__nf4` has no weight `model.layers.0.q.weight`"),
    ("bnb marker twice", {"x.quant_state.bitsandbytes__a.quant_state.bitsandbytes__b": _js(_BNB_STATE)}, None,
     "model.safetensors", "is not a bitsandbytes quant state name"),
    ("bnb state nested deep", _bnb(b'{"shape": ' + b"[" * 100000 + b"]" * 100000 + b"}"), None,
     "model.safetensors", "JSON is nested too deeply"),
    ("bnb state not json", _bnb(b"\xff{"), None, "model.safetensors", "is not valid UTF-8"),
    ("bnb nested_offset string", {**_bnb({**_BNB_STATE, "nested_blocksize": 256, "nested_offset": "x"}), **_NESTED},
     None, "model.safetensors", "nested_offset 'x' are not a positive integer and a finite number"),
    ("bnb nested_blocksize negative", {**_bnb({**_BNB_STATE, "nested_blocksize": -1, "nested_offset": 0.5}),
                                       **_NESTED}, None, "model.safetensors", "nested_blocksize -1"),
    ("fp8 scale [2, 0]", {f"{_M}.weight": torch.zeros((4, 8)).to(torch.float8_e4m3fn),
                          f"{_M}.weight_scale_inv": np.zeros((2, 0), np.float32)}, None, "model.safetensors",
     "has shape [2, 0], with no scales along a dimension"),
    ("fp8 scale [0, 0]", {f"{_M}.weight": torch.zeros((4, 8)).to(torch.float8_e4m3fn),
                          f"{_M}.weight_scale_inv": np.zeros((0, 0), np.float32)}, None, "model.safetensors",
     "with no scales along a dimension"),
    ("fp8 weight_block_size zero", {f"{_M}.weight": torch.zeros((4, 8)).to(torch.float8_e4m3fn),
                                    f"{_M}.weight_scale_inv": np.ones((2, 2), np.float32)},
     {"quant_method": "fp8", "weight_block_size": [0, 4]}, "config.json",
     "weight_block_size [0, 4] is not two positive integers"),
    ("ct block_structure [0, 0]", _I8W, _ct_cfg(block_structure=[0, 0]), "config.json",
     "block_structure [0, 0] is not two positive integers"),
    ("ct block_structure string", _I8W, _ct_cfg(block_structure="ab"), "config.json",
     "block_structure 'ab' is not two positive integers"),
    ("ct block_structure one int", _I8W, _ct_cfg(block_structure=[2]), "config.json",
     "block_structure [2] is not two positive integers"),
    ("ct block_structure object", _I8W, _ct_cfg(block_structure={"a": 1}), "config.json",
     "block_structure {'a': 1} is not two positive integers"),
    ("ct block_structure bools", _I8W, _ct_cfg(block_structure=[True, True]), "config.json",
     "is not two positive integers"),
    ("ct weight_shape NaN", {f"{_M}.weight_packed": np.zeros((4, 1), np.int32),
                             f"{_M}.weight_shape": np.array([4, np.nan], np.float32),
                             f"{_M}.weight_scale": np.ones((4, 1), np.float32)}, _ct_cfg(), "model.safetensors",
     "`model.layers.0.q.weight_shape` is F32 [2], expected two integers"),
    ("ct weight_shape negative", {f"{_M}.weight_packed": np.zeros((4, 1), np.int32),
                                  f"{_M}.weight_shape": np.array([4, -8], np.int64),
                                  f"{_M}.weight_scale": np.ones((4, 1), np.float32)}, _ct_cfg(), "model.safetensors",
     "is not a shape (a negative dimension)"),
]


@pytest.mark.parametrize("what,stored,qc,file,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_quantization_is_bad_input(tmp_path, what, stored, qc, file, message):
    """Each value is validated where it is read: a CheckpointError naming the safetensors file or
    config.json, never a KeyError, RecursionError, ZeroDivisionError ... (exit 1), on locate and
    on reading the tensors (the nested offset is used only then)."""
    text, path = _refusal(tmp_path, stored, qc)
    assert str(path / file) in text and message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("layout", ["gptq_p", "marlin", "bitblas"])
def test_gptq_packings_other_than_classic_are_refused(tmp_path, base_tensors, layout):
    """GPTQModel's `gptq_p` (planar bit planes, v2 zeros) keeps the names and shapes of the classic
    layout: read as v1 it gave wrong values and an unchanged base read `derived`."""
    stored, qc, _ = build_gptq(base_tensors)
    path = _save(tmp_path / layout, stored, {**qc, "checkpoint_format": layout})
    with pytest.raises(CheckpointError, match=f"config.json: GPTQ checkpoint_format '{layout}' is not supported"):
        locate(path)


# -- a quantized weight without a companion, tensors the config disagrees with (tester's findings 2, 3, 5-7):
#    refused in one line naming the file and the tensor, never read another way or crashing

_Q = LINEARS[1]       # model.layers.0.mlp.down_proj


def _pop(name):
    return lambda s: s.pop(name)


def _set(name, value):
    return lambda s: s.__setitem__(name, value)


def _ct_weights_cfg(qc, **w):
    qc["config_groups"]["group_0"]["weights"].update(w)


MISSING = [
    ("ct fp8 no weight_scale", "ct-fp8", _pop(f"{_Q}.weight_scale"),
     f"`{_Q}.weight` is F8_E4M3 but has no `{_Q}.weight_scale` beside it (quantization_config of compressed-tensors"),
    ("ct int8 no weight_scale", "ct-int8", _pop(f"{_Q}.weight_scale"),
     f"`{_Q}.weight` is I8 but has no `{_Q}.weight_scale` beside it"),
    ("bnb int8 no SCB", "bnb-int8", _pop(f"{_Q}.SCB"),
     f"`{_Q}.weight` is I8 but has no `{_Q}.SCB` beside it (quantization_config of bitsandbytes"),
    ("bnb nf4 nested no nested_absmax", "bnb-nf4-nested", _pop(f"{_Q}.weight.nested_absmax"),
     f"bitsandbytes weight `{_Q}.weight` is double-quantized (its quant state has nested_blocksize) but has no "
     f"`{_Q}.weight.nested_absmax`"),
    # short, they were an IndexError (exit 1, no file named) while the values were read
    ("bnb nf4 nested_absmax wrong length", "bnb-nf4-nested", _set(f"{_Q}.weight.nested_absmax", np.ones(5, np.float32)),
     f"bitsandbytes weight `{_Q}.weight` is double-quantized but `{_Q}.weight.nested_absmax` has 5 values"),
    ("bnb nf4 nested_quant_map short", "bnb-nf4-nested", _set(f"{_Q}.weight.nested_quant_map", np.ones(10, np.float32)),
     f"`{_Q}.weight.nested_quant_map` has 10 codes, bitsandbytes' dynamic map has 256"),
    ("ct asym no weight_zero_point", "ct-pack-int4", _pop(f"{_Q}.weight_zero_point"),
     f"`{_Q}.weight_packed` has no `{_Q}.weight_zero_point` beside it, but quantization_config says its weights "
     "are asymmetric (symmetric: false)"),
    ("fp8 block no weight_scale_inv", "fp8-block", _pop(f"{_Q}.weight_scale_inv"),
     f"`{_Q}.weight` is F8_E4M3 but has no `{_Q}.weight_scale_inv` beside it"),
]

DISAGREE = [
    # a corrupt weight_shape: 32 words per row are 256 4-bit codes; [64, 200] would make them 5-bit
    ("ct weight_shape", "ct-pack-int4", _set(f"{_Q}.weight_shape", np.array([OUT, 200], np.int64)), None,
     f"`{_Q}.weight_packed` has 32 int32 words per row, but `{_Q}.weight_shape` = [64, 200] needs 25 at 4 bits "
     "(num_bits of quantization_config)"),
    ("ct zero point a row short", "ct-pack-int4", lambda s: s.__setitem__(f"{_Q}.weight_zero_point",
                                                                          s[f"{_Q}.weight_zero_point"][:-1]), None,
     f"`{_Q}.weight_zero_point` is I32 [7, 4], expected I32 [8, 4] (64 rows of 4-bit zero points packed 8 per "
     "int32, x 4 groups)"),
    ("ct config num_bits 8", "ct-pack-int4", None, lambda qc: _ct_weights_cfg(qc, num_bits=8),
     f"`{_Q}.weight_packed` has 32 int32 words per row, but "
     f"`{_Q}.weight_shape` = [64, 256] needs 64 at 8 bits"),
    ("ct config group_size 128", "ct-pack-int4", None, lambda qc: _ct_weights_cfg(qc, group_size=128),
     f"`{_Q}.weight_scale` has shape [64, 4], but quantization_config's strategy for "
     f"`{_Q}.weight_packed` of logical shape [64, 256] gives group 128: [64, 2]"),
    ("ct config channel", "ct-int8", None, lambda qc: _ct_weights_cfg(qc, strategy="tensor"),
     f"`{_Q}.weight_scale` has shape [64, 1], but quantization_config's strategy"),
    ("gptq config group_size 128", "gptq-v1", None, lambda qc: qc.update(group_size=128),
     f"`{_Q}.scales` has 4 group rows over 256 inputs, but quantization_config's "
     "group_size 128 gives 2"),
    ("gptq qweight a row short", "gptq-v1", lambda s: s.__setitem__(f"{_Q}.qweight", s[f"{_Q}.qweight"][:-1]), None,
     f"`{_Q}.qweight` has shape [31, 64], packing 248 inputs at 4 bits, but `{_Q}.g_idx` and `{_Q}.scales` "
     "[4, 64] give 256 inputs (expected [32, 64])"),
]


def _refusal(tmp_path, stored: dict, qc: dict) -> tuple[str, Path]:
    """(the CheckpointError's text, the folder) of a checkpoint saved with ``qc`` and refused on locate or
    while its tensors are read."""
    path = _save(tmp_path / "bad", stored, qc)
    with pytest.raises(CheckpointError) as exc:
        with locate(path) as ck:
            for name in ck.tensors:
                ck.read(name)
    return str(exc.value), path


def _refused(tmp_path, stored: dict, qc: dict, message: str) -> None:
    """Saved with ``qc``, the checkpoint is refused while its tensors are read, in one line naming the file."""
    text, path = _refusal(tmp_path, stored, qc)
    assert text.startswith(f"{path / 'model.safetensors'}: ") and message in text, text


@pytest.mark.parametrize("what,kind,mutate,message", MISSING, ids=[m[0] for m in MISSING])
def test_quantized_weight_without_its_companion_is_refused(tmp_path, base_tensors, what, kind, mutate, message):
    """Its codes (or a double-quantized absmax's U8 codes) were read as values: an unchanged base read
    `derived`, and an asymmetric weight without its zero point read as symmetric."""
    stored, qc, _ = BUILDERS[kind](base_tensors)
    mutate(stored)
    _refused(tmp_path, stored, qc, message)


@pytest.mark.parametrize("what,kind,mutate,config,message", DISAGREE, ids=[d[0] for d in DISAGREE])
def test_tensors_the_config_disagrees_with_are_refused(tmp_path, base_tensors, what, kind, mutate, config, message):
    """quantization_config wins, as in the formats' own loaders: a weight_shape or zero point that does not
    fit it, or a config whose num_bits / group_size / strategy the tensors do not have, is bad input (the
    reader overrode num_bits 4 with 5-bit codes, crashed on a short zero point, accepted a wrong group size
    and blamed a healthy g_idx for a short qweight)."""
    stored, qc, _ = BUILDERS[kind](base_tensors)
    if mutate:
        mutate(stored)
    if config:
        config(qc)
    _refused(tmp_path, stored, qc, message)


def test_gptq_quantize_config_json_group_size_is_checked(tmp_path, base_tensors):
    stored, qc, _ = build_gptq(base_tensors)
    path = _save(tmp_path / "q", stored, None)
    (path / "quantize_config.json").write_text(json.dumps({**qc, "group_size": 32}))
    with pytest.raises(CheckpointError, match="group_size 32 gives 8"):
        locate(path)


def test_missing_companion_exits_2_with_one_line_and_writes_nothing(tmp_path, base_tensors):
    from click.testing import CliRunner
    from weightdiff.cli import main

    base = _save(tmp_path / "base", base_tensors, None)
    stored, qc, _ = build_ct_fp8(base_tensors)
    stored.pop(f"{_Q}.weight_scale")
    tuned = _save(tmp_path / "tuned", stored, qc)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--no-rank", "-q", "--json", str(out)])
    assert r.exit_code == 2 and r.stdout == "" and not out.exists()
    assert r.stderr == (f"error: {tuned / 'model.safetensors'}: `{_Q}.weight` is F8_E4M3 but has no "
                        f"`{_Q}.weight_scale` beside it (quantization_config of compressed-tensors says it is "
                        "quantized)\n")


def test_plain_fp8_and_int8_tensors_without_a_quantization_config_stay_tensors(tmp_path, base_tensors):
    """Only the config (or a quant state) says a weight is quantized: a bare F8/I8 tensor of an unquantized
    model is read as it is stored, and one the config's `ignore` names is not its business either."""
    t = dict(base_tensors)
    t[f"{_Q}.weight"] = torch.from_numpy(t[f"{_Q}.weight"]).to(torch.float8_e4m3fn)
    t[LINEARS[0] + ".weight"] = np.zeros((OUT, IN), np.int8)
    with locate(_save(tmp_path / "plain", t, None)) as ck:
        assert ck.tensors[f"{_Q}.weight"].dtype == "F8_E4M3" and ck.tensors[f"{_Q}.weight"].quant is None
        assert ck.tensors[LINEARS[0] + ".weight"].dtype == "I8"
    stored, qc, _ = build_ct_fp8(base_tensors)
    stored.pop(f"{_Q}.weight_scale")
    qc["ignore"] = ["lm_head", f"re:.*{_Q.split('.', 3)[-1]}$"]
    with locate(_save(tmp_path / "ignored", stored, qc)) as ck:
        assert ck.tensors[f"{_Q}.weight"].quant is None and ck.tensors[LINEARS[0] + ".weight"].quant is not None


@pytest.mark.parametrize("method,scale,message", [
    ("fbgemm_fp8", (7, 1), "per channel ([rows, 1]) or per tensor (fbgemm_fp8 has no block scales)"),
    ("fbgemm_fp8", (2, 2), "per channel ([rows, 1]) or per tensor (fbgemm_fp8 has no block scales)"),
    ("fp8", (7, 1), "in 128x128 blocks or blocks that divide it evenly"),
])
def test_fp8_scale_of_no_writers_layout_is_refused(tmp_path, method, scale, message):
    """A [7, 1] fbgemm_fp8 ``weight_scale`` over a [256, 512] weight was read as "37x512 block scales", a
    block no writer produces (fbgemm's scale is one per row): an inferred block must be 128x128 or divide
    the weight evenly, and fbgemm_fp8 has no blocks at all."""
    w = torch.from_numpy((np.random.default_rng(0).standard_normal((256, 512)) * 0.02).astype(np.float32))
    name = "model.layers.0.mlp.down_proj"
    key = "weight_scale" if method == "fbgemm_fp8" else "weight_scale_inv"
    stored = {f"{name}.weight": (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn), f"{name}.{key}": torch.ones(scale)}
    path = _save(tmp_path / "bad", stored, {"quant_method": method})
    with pytest.raises(CheckpointError) as exc:
        locate(path)
    text = str(exc.value)
    assert text.startswith(f"{path / 'model.safetensors'}: ") and f"`{name}.{key}`" in text and message in text, text
    stored[f"{name}.{key}"] = torch.ones(256, 1)                 # one per row: read
    with locate(_save(tmp_path / "ok", stored, {"quant_method": method})) as ck:
        assert ck.tensors[f"{name}.weight"].quant.group == "channel"


@pytest.mark.parametrize("names", [("x\ny.q_weight", "y.q_invperm"), ("a\nb.weight._data", "b.weight._scale")],
                         ids=["exl2-marks", "quanto-marks"])
def test_names_holding_a_newline_are_names_not_lines(tmp_path, names):
    """A tensor name may hold a newline (JSON allows it). The refusals of formats weightdiff does not read
    searched the names joined by newlines, took a name's second line for a tensor and failed with an internal
    error (KeyError); the names are read as the plain tensors they are."""
    stored = {names[0]: np.zeros((4, 4), np.int32 if "q_weight" in names[0] else np.int8),
              names[1]: np.zeros(4, np.int32 if "q_invperm" in names[1] else np.float32),
              "lm_head.weight": np.zeros((4, 4), np.float32)}
    ckpt = locate(_save(tmp_path / "n", stored, None))
    assert set(ckpt.tensors) == set(stored)


@pytest.mark.parametrize("kind", ["gptq-v1", "gptq-v2", "awq"])
def test_packed_columns_are_read_in_bands_not_whole(tmp_path, base_tensors, kind, monkeypatch):
    """GPTQ's and AWQ's ``qweight`` pack the logical rows across their stored columns: a window of rows reads a
    band of columns (``Source._band``, in runs of whole rows), never the whole tensor when a band is smaller;
    bands as narrow as one window give the reference values through windows that straddle rows and bands, and a
    comparison the same JSON as with every band the whole tensor."""
    from weightdiff.io import quant_sources as QS
    from weightdiff.records import dumps

    stored, qc, ref = BUILDERS[kind](base_tensors)
    path = _save(tmp_path / kind, stored, qc)
    base = _save(tmp_path / "base", {k: v + np.float32(1e-3) * (k == f"{LINEARS[1]}.weight") for k, v in
                                     base_tensors.items()}, None)
    whole = dumps(compare(base, path).to_dict(include_run=False))
    widths, real = [], QS.Source._band

    def band(self, read_rows, t, c0, c1):
        got = real(self, read_rows, t, c0, c1)
        widths.append((got[0].shape[1], int(t.shape[1])))
        return got

    monkeypatch.setattr(QS.Source, "_band", band)
    monkeypatch.setattr(QS, "BAND_BYTES", 1)
    monkeypatch.setattr(QS, "BAND_READ_BYTES", 1)
    for local in (True, False):
        if not local:       # a reader that cannot read columns alone (Hub-streamed): sliced from whole rows
            from weightdiff.io import located
            monkeypatch.setattr(located, "SafetensorsFile", type("Other", (), {"read_rows": None}))
        with locate(path) as ck:
            for name, want in ref.items():
                for step in (1000, 333, IN * OUT):
                    widths.clear()
                    np.testing.assert_array_equal(np.concatenate(list(ck.windows(name, step))), want.reshape(-1))
                    # a window of a few rows reads a few columns' band; one of every row, all of them
                    assert widths and all(0 < w < cols if step < IN * OUT else w == cols for w, cols in widths)
                np.testing.assert_array_equal(ck.read(name), want)
                np.testing.assert_array_equal(ck.read_rows(name, [9, 2, 3, 63]), want[[9, 2, 3, 63]])
        assert dumps(compare(base, path).to_dict(include_run=False)) == whole
