"""A stored scale that no quantizer of the base could have chosen vouches for nothing (FINDINGS F15, F16).

The floor test bounds each difference by the quantized side's own step. A file that stores weights of 0 (or
of one constant) beside a scale far larger than the base's weights made that floor wide enough to hold any
small weight, and read "QUANTIZED ONLY: every difference is explained by quantizing the base": GGUF K-quants
whose sub-block scales are 0 under a super-block scale of 1 (the floor of a step-0 sub-block is the search's
reach times half d), all-zero importance-matrix K-quant bytes (every step-0 element counted as a clamp), ONNX
QDQ int8, FP8 block scales, compressed-tensors with an ``mse`` observer and GPTQ with ``mse`` (where the
min/max scale check is off). Any real quantizer (absmax, min/max, MSE or clipping observers, GPTQ, llama.cpp's
searches with or without an importance matrix) picks a step within a small factor of its group's range over
its levels: the tests below give each format a part of its groups so zeroed, the rest a real quantization of
the base, and want them read as changed, not quantized; and real encodings never tripped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weightdiff import compare

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

import gguf_build  # noqa: E402
import test_quant_checkpoint as T  # noqa: E402

Q = gguf.GGMLQuantizationType
NAME = "blk.0.ffn_up.weight"


def _verdict_and_quant(r):
    t = [x for x in r.tensors if x.quant]
    return r.summary.verdict, [(x.name, x.status, x.quant) for x in t]


def _changed(r, name: str | None = None):
    verdict, q = _verdict_and_quant(r)
    assert verdict != "quantized_only", q
    q = [x for x in q if name is None or x[0] == name]
    assert q and all(s != "quantized" for _, s, _ in q), q
    assert any(x.get("within") is False for _, _, x in q), q


# -- GGUF -----------------------------------------------------------------------------------------

def _q4k_block(d: float, dmin: float, sc6: int, mn6: int) -> np.ndarray:
    """One Q4_K block of 144 bytes, every sub-block scale ``sc6`` and min ``mn6``, every code 0."""
    b = np.zeros(144, np.uint8)
    b[0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    b[2:4] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)
    q = np.zeros(12, np.uint8)
    for j in range(8):
        if j < 4:
            q[j], q[j + 4] = sc6 & 63, mn6 & 63
        else:
            q[j + 4] = (sc6 & 0xF) | ((mn6 & 0xF) << 4)
            q[j - 4] |= (sc6 >> 4) << 6
            q[j] |= (mn6 >> 4) << 6
    b[4:16] = q
    return b


def _gguf_pair(tmp_path, raw: np.ndarray, q, x: np.ndarray, imatrix: bool = False):
    base = gguf_build.raw_gguf(tmp_path / "base.gguf", {NAME: (x, Q.F32)})
    w = gguf.GGUFWriter(str(tmp_path / "tuned.gguf"), "llama")
    if imatrix:
        w.add_string("quantize.imatrix.file", "imatrix.dat")
    w.add_tensor(NAME, raw, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return compare(base, tmp_path / "tuned.gguf", rank=False)


def _weights(rng, rows=64, cols=512):
    return rng.normal(0, 0.02, (rows, cols)).astype(np.float32)


@pytest.mark.parametrize("case", ["zeros", "minus1", "imatrix-zero-bytes"])
def test_gguf_q4_k_of_constant_weights_under_large_scales_is_not_quantized_only(tmp_path, rng, case):
    """F15 as filed: every weight 0 (d = 1, every sub-block scale 0), every weight -1 (dmin = 1, m = 1),
    and every byte 0 with an importance-matrix key."""
    x = _weights(rng)
    nblocks = x.size // 256
    if case == "zeros":
        raw = np.tile(_q4k_block(1.0, 0.0, 0, 0), (nblocks, 1))
    elif case == "minus1":
        raw = np.tile(_q4k_block(1.0, 1.0, 0, 1), (nblocks, 1))
    else:
        raw = np.zeros((nblocks, 144), np.uint8)
    r = _gguf_pair(tmp_path, raw.reshape(x.shape[0], -1), Q.Q4_K, x, imatrix=case.startswith("imatrix"))
    _changed(r)


def test_gguf_q4_k_with_a_few_super_blocks_zeroed_under_d_1_is_a_change(tmp_path, rng):
    """The real quantization of the base but for four rows, whose blocks store 0 under d = 1: not all-zero,
    so only the scales' claim on the base's range tells it."""
    import ggml_kquants

    x = _weights(rng)
    raw = ggml_kquants.quantize(x, "Q4_K").reshape(-1, 144).copy()
    raw[:8] = _q4k_block(1.0, 0.0, 0, 0)                  # rows 0-3 (two super-blocks a row)
    r = _gguf_pair(tmp_path, raw.reshape(x.shape[0], -1), Q.Q4_K, x)
    _changed(r)
    q = [t.quant for t in r.tensors if t.quant][0]
    assert q["scales_beyond_base"] == 4 * 512
    # and without the zeroed rows, the same file reads quantized
    clean = ggml_kquants.quantize(x, "Q4_K")
    (tmp_path / "c").mkdir()
    r = _gguf_pair(tmp_path / "c", clean, Q.Q4_K, x)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)


def test_gguf_q8_0_with_blocks_zeroed_under_a_scale_of_1_is_a_change(tmp_path, rng):
    from gguf.quants import quantize

    x = _weights(rng, 64, 256)
    raw = quantize(x, Q.Q8_0).reshape(-1, 34).copy()
    raw[:16, 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    raw[:16, 2:] = 0                                      # rows 0-1: every weight 0, half a step of 1 around it
    r = _gguf_pair(tmp_path, raw.reshape(x.shape[0], -1), Q.Q8_0, x)
    _changed(r)


def test_gguf_imatrix_q4_k_with_zero_super_blocks_is_a_change(tmp_path, rng):
    """Step-0 elements count as importance-matrix clamps only where the base's sub-block is near one value:
    super-blocks of zero bytes (d = 0, every weight 0) against random base weights are not clamps."""
    import ggml_imatrix

    x = (rng.standard_t(2.5, (64, 512)) * 0.02).astype(np.float32)
    raw = ggml_imatrix.quantize(x, ggml_imatrix.importance(512, 3, zero=0.1)).reshape(-1, 144).copy()
    clean = raw.reshape(x.shape[0], -1).copy()
    raw[:4] = 0
    r = _gguf_pair(tmp_path, raw.reshape(x.shape[0], -1), Q.Q4_K, x, imatrix=True)
    _changed(r)
    (tmp_path / "c").mkdir()
    r = _gguf_pair(tmp_path / "c", clean, Q.Q4_K, x, imatrix=True)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)


@pytest.mark.parametrize("seed", [0, 1])
def test_gguf_claims_never_trip_on_llama_cpps_own_encodings(seed):
    """``gguf_floor.claims`` against the weights each encoder quantized (the adversarial set of
    test_gguf_floor: subnormal and zero scales, outlier channels, constant and sparse blocks, heavy tails;
    and importance-matrix Q4_K): no block claims more range than its weights have, with room to spare."""
    from gguf.quants import dequantize

    import ggml_imatrix
    from test_gguf_floor import _adversarial, _quant
    from weightdiff.io.gguf_floor import claims
    from weightdiff.measure.quant_floor import scales_beyond

    rng = np.random.default_rng(seed)
    x = _adversarial(rng)
    cases = [(q, x, _quant(x, q)) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K)]
    cases.append((Q.Q4_K, x, ggml_imatrix.quantize(x, ggml_imatrix.importance(512, 3, zero=0.1))))
    for q, w, raw in cases:
        bs, ts = gguf.GGML_QUANT_SIZES[q]
        v = dequantize(raw, q).astype(np.float32).reshape(-1, bs)
        c = claims(raw.reshape(-1, ts), v, q.name)
        sub = 16 if q == Q.Q6_K else 32
        # with the scales claiming 1.5 times what they do, still nothing trips
        bad = scales_beyond(w.reshape(-1), 1.5 * c[:, 0].reshape(-1), 1.5 * c[:, 1].reshape(-1), sub)
        assert not bad.any(), (q.name, int(bad.sum()))


# -- safetensors formats (GPTQ, compressed-tensors, FP8) and ONNX QDQ -----------------------------

M = "model.layers.0.mlp.up_proj"


def _base(rng, rows=64, cols=256):
    return {f"{M}.weight": (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)}


def _ct_int8(x: np.ndarray, zero_rows: int, observer: str | None):
    s = np.abs(x).max(axis=1, keepdims=True) / 127.0
    codes = np.clip(np.round(x / s), -127, 127).astype(np.int8)
    codes[:zero_rows], s[:zero_rows] = 0, 1.0
    weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
    if observer:
        weights["observer"] = observer
    qc = {"quant_method": "compressed-tensors", "format": "int-quantized",
          "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}
    return {f"{M}.weight": codes, f"{M}.weight_scale": s.astype(np.float32)}, qc


@pytest.mark.parametrize("zero_rows", [8, 64])
def test_compressed_tensors_mse_observer_rows_zeroed_under_scale_1_are_a_change(tmp_path, rng, zero_rows):
    """F16: with ``observer: mse`` the min/max scale check is off; a scale of 1 beside codes of 0 (a
    part of the rows, or all) vouched for any weight within half of 1."""
    base = _base(rng)
    x = base[f"{M}.weight"]
    stored, qc = _ct_int8(x, zero_rows, "mse")
    b = T._save(tmp_path / "base", base, None)
    r = compare(b, T._save(tmp_path / "ct", stored, qc), rank=False)
    _changed(r)
    # the same file without the zeroed rows is the base quantized
    stored, qc = _ct_int8(x, 0, "mse")
    r = compare(b, T._save(tmp_path / "ok", stored, qc), rank=False)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)


@pytest.mark.parametrize("zero_rows", [8, 64])
def test_gptq_mse_rows_zeroed_are_a_change(tmp_path, rng, zero_rows):
    """GPTQ with ``mse``: rows of zeros quantized by GPTQ's own packer get its zero-group scale (2 / maxq,
    0.13 at 4 bits), which holds every small base weight within half a step."""
    import quant_packers as P

    base = _base(rng)
    x = base[f"{M}.weight"].copy()
    g_idx = (np.arange(x.shape[1]) // 64).astype(np.int32)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False, "mse": 2.4}
    b = T._save(tmp_path / "base", base, None)
    for name, n in (("bad", zero_rows), ("ok", 0)):
        w = x.copy()
        w[:n] = 0
        qw, qz, sc, _ = P.gptq_pack(w, g_idx, 4, True)
        stored = {f"{M}.qweight": qw, f"{M}.qzeros": qz, f"{M}.scales": sc, f"{M}.g_idx": g_idx}
        r = compare(b, T._save(tmp_path / name, stored, qc), rank=False)
        if n:
            _changed(r)
        else:
            assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)


@pytest.mark.parametrize("whole", [False, True])
def test_fp8_block_of_zeros_under_scale_1000_is_a_change(tmp_path, rng, whole):
    """F16: an fp8 code 0 under a scale of 1000 has a floor of 1000 times half the smallest subnormal
    (about 1): one 128 x 128 block of zeros so scaled, or every block."""
    base = _base(rng, 256, 256)
    x = torch.from_numpy(base[f"{M}.weight"])
    s = x.reshape(2, 128, 2, 128).abs().amax((1, 3)) / 448.0
    w = (x / s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    b = T._save(tmp_path / "base", base, None)
    r = compare(b, T._save(tmp_path / "ok", {f"{M}.weight": w, f"{M}.weight_scale_inv": s.float()}, qc), rank=False)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)
    w2, s2 = w.float().clone(), s.float().clone()
    if whole:
        w2[:], s2[:] = 0, 1000.0
    else:
        w2[:128, :128], s2[0, 0] = 0, 1000.0
    stored = {f"{M}.weight": w2.to(torch.float8_e4m3fn), f"{M}.weight_scale_inv": s2}
    _changed(compare(b, T._save(tmp_path / "bad", stored, qc), rank=False))


@pytest.mark.parametrize("zero_channels", [4, 32])
def test_onnx_qdq_int8_channels_zeroed_under_scale_1_are_a_change(tmp_path, rng, zero_channels):
    """F16: ONNX QDQ int8 read by a MatMul, per output channel scales: channels of code 0 under a scale of
    1.0 (a part of them, or all)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    W = (rng.standard_normal((32, 64)) * 0.02).astype(np.float32)      # [out, in] as the base stores it
    save_file({"fc.weight": W}, str(tmp_path / "base.safetensors"))
    B = np.ascontiguousarray(W.T)                                       # the MatMul's [in, out]
    s = (np.abs(B).max(axis=0) / 127.0).astype(np.float32)

    def model(path, n):
        codes = np.clip(np.round(B / s), -127, 127).astype(np.int8)
        sc = s.copy()
        codes[:, :n], sc[:n] = 0, 1.0
        nodes = [helper.make_node("DequantizeLinear", ["fc.weight", "fc.weight_scale"], ["w_dq"], axis=1),
                 helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(codes, "fc.weight"),
                                           numpy_helper.from_array(sc, "fc.weight_scale")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
        return path

    r = compare(tmp_path / "base.safetensors", model(tmp_path / "ok.onnx", 0), rank=False)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)
    _changed(compare(tmp_path / "base.safetensors", model(tmp_path / "bad.onnx", zero_channels), rank=False))


def test_an_all_zero_quantized_tensor_is_never_within(tmp_path, rng):
    """A tuned tensor of zeros against a base that is not: pruning, whatever scale sits beside the zeros
    (compressed-tensors under the default observer, which read it so before, and under ``mse``)."""
    base = _base(rng)
    b = T._save(tmp_path / "base", base, None)
    for obs in ("mse", None, "minmax"):
        stored, qc = _ct_int8(base[f"{M}.weight"], 64, obs)
        r = compare(b, T._save(tmp_path / str(obs), stored, qc), rank=False)
        q = [t.quant for t in r.tensors if t.quant][0]
        assert q["within"] is False and q.get("all_zero") is True, q
        assert r.summary.verdict != "quantized_only"


def test_scale_excess_counts_groups_past_the_slack(tmp_path, rng):
    """The unit: groups whose stored scale times half the code span is more than ``SCALE_SLACK`` times the
    base group's largest magnitude; a scale at the slack's edge is not counted."""
    from weightdiff.io.checkpoint import locate
    from weightdiff.measure.quant_floor import SCALE_SLACK, scale_excess

    base = _base(rng)
    x = base[f"{M}.weight"]
    stored, qc = _ct_int8(x, 0, "mse")
    amax = np.abs(x).max(axis=1)
    s = stored[f"{M}.weight_scale"]
    s[0, 0] = amax[0] * SCALE_SLACK / 127.5            # at the edge: not counted
    s[1, 0] = amax[1] * SCALE_SLACK * 1.1 / 127.5      # past it
    s[2, 0] = 1.0
    b = locate(T._save(tmp_path / "base", base, None))
    q = locate(T._save(tmp_path / "ct", stored, qc))
    shape = tuple(x.shape)
    assert scale_excess(b, f"{M}.weight", "F32", q, f"{M}.weight", "F32", "tuned", shape) == 2
    assert scale_excess(b, f"{M}.weight", "F32", q, f"{M}.weight", "F32", "both", shape) is None


def test_bnb_int8_rows_zeroed_under_a_large_scb_are_a_change(tmp_path, rng):
    """bitsandbytes LLM.int8: a row's codes of 0 under an SCB of 127 (a step of 1) held every weight of it."""
    base = _base(rng)
    x = base[f"{M}.weight"]
    scb = np.abs(x).max(1).astype(np.float32)
    cb = np.round(x * (127.0 / scb)[:, None]).astype(np.int8)
    qc = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    b = T._save(tmp_path / "base", base, None)
    r = compare(b, T._save(tmp_path / "ok", {f"{M}.weight": cb, f"{M}.SCB": scb}, qc), rank=False)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)
    cb[:8], scb[:8] = 0, 127.0
    _changed(compare(b, T._save(tmp_path / "bad", {f"{M}.weight": cb, f"{M}.SCB": scb}, qc), rank=False))


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _mxfp4(w: np.ndarray):
    """gpt-oss's MXFP4 of fused experts ``w`` [E, G * 32, R]: (blocks [E, R, G, 16], scales [E, R, G]), the
    scale the least power of two that holds the 32 values' largest within e2m1's 6 (up to amax / 3), each
    value rounded to the nearest e2m1 value."""
    E, H, R = w.shape
    x = np.transpose(w, (0, 2, 1)).reshape(E, R, H // 32, 32)
    amax = np.abs(x).max(-1, keepdims=True)
    e = np.ceil(np.log2(np.maximum(amax, 2.0 ** -120) / 6))
    y = np.abs(x) / np.exp2(e)
    idx = np.abs(np.minimum(y, 6)[..., None] - E2M1).argmin(-1).astype(np.uint8)
    codes = idx | np.where(x < 0, 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, np.ascontiguousarray(e[..., 0] + 127).astype(np.uint8)


def test_mxfp4_groups_zeroed_under_a_large_scale_are_a_change(tmp_path, rng):
    """gpt-oss MXFP4 experts: groups of code 0 under a scale of 2^10 (e2m1's 0 has a floor of a quarter of
    the scale) held every weight of them."""
    from safetensors.numpy import save_file

    L = "model.layers.0.mlp.experts."
    w = (rng.standard_normal((2, 64, 16)) * 0.02).astype(np.float32)
    cfg = {"model_type": "gpt_oss"}
    (tmp_path / "base").mkdir()
    save_file({L + "gate_up_proj": w}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))

    def write(folder, blocks, scales):
        (tmp_path / folder).mkdir()
        save_file({L + "gate_up_proj_blocks": blocks, L + "gate_up_proj_scales": scales},
                  str(tmp_path / folder / "model.safetensors"))
        (tmp_path / folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
        return tmp_path / folder

    blocks, scales = _mxfp4(w)
    r = compare(tmp_path / "base", write("ok", blocks, scales), rank=False)
    assert r.summary.verdict == "quantized_only", _verdict_and_quant(r)
    blocks, scales = blocks.copy(), scales.copy()
    blocks[0, :4], scales[0, :4] = 0, 127 + 10
    _changed(compare(tmp_path / "base", write("bad", blocks, scales), rank=False), L + "0.gate_up_proj")
