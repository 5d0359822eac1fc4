"""A change hidden under inflated scales, in the formats the first scale check left out.

The floor test bounds each difference by the quantized side's own step, so a tuned file whose stored scales
are several times what any quantizer of the base picks has a floor wide enough to hold a real change: the
weights of the attacked groups below are the base plus a change, encoded under a scale ``K`` times the honest
one wherever the change fits under that scale's floor (the base's own code elsewhere), and read "QUANTIZED
ONLY" before ``scale_excess`` knew these formats (bitsandbytes 4-bit plain and double-quantized, AWQ with and
without its scale search, ONNX Runtime's MatMulNBits and MatMulBnb4, stacked FP8 experts). Honest copies, made
by the formats' own writers (ONNX Runtime's quantizers) or the repository's transcriptions of them
(``quant_packers``: bitsandbytes, AutoAWQ), at several bit widths, block sizes and code tables, still read
quantized."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from weightdiff import compare  # noqa: E402
from weightdiff.kernels.quant import codebook_halfwidth  # noqa: E402

import quant_packers as P  # noqa: E402
import test_quant_checkpoint as T  # noqa: E402

M = "model.layers.0.mlp.up_proj"
K = 6                        # how many times the honest scale the attacked groups store


def _quant(r):
    return r.summary.verdict, [(t.name, t.status, t.quant) for t in r.tensors if t.quant]


def _changed(r):
    verdict, q = _quant(r)
    assert verdict != "quantized_only", q
    assert q and any(x.get("within") is False and x.get("scales_beyond_base") for _, _, x in q), q
    assert all(s != "quantized" for _, s, x in q if x.get("scales_beyond_base")), q


def _quantized(r):
    assert r.summary.verdict == "quantized_only", _quant(r)


def _base(rng, rows=64, cols=256):
    return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _change(rng, x):
    """A dense change of about half the weights' size: what the attacked groups try to carry."""
    return (0.5 * x.std() * rng.standard_normal(x.shape)).astype(np.float32)


def _hidden_share(deq, honest, x, attacked):
    """How far the tuned values of the attacked groups are from the base's honest quantization: a real
    change, several times the honest rounding."""
    a = attacked.reshape(x.shape)
    return np.linalg.norm((deq - honest)[a]) / np.linalg.norm((honest - x)[a])


# -- bitsandbytes 4-bit (transformers' saved Params4bit) -------------------------------------------

def _absmax_state(absmax: np.ndarray, nested: bool) -> tuple[dict, np.ndarray]:
    """The absmax entries of ``P.bnb4_quantize``'s state (double-quantized as bitsandbytes does when
    ``nested``) and the absmax they decode to."""
    am = torch.from_numpy(np.asarray(absmax, np.float32))
    if not nested:
        return {"absmax": am.numpy()}, am.numpy()
    offset = am.mean()
    dyn = P.create_dynamic_map()
    qabs, a2 = P._quantize_blockwise(am - offset, dyn, 256)
    used = dyn[qabs.long()] * a2[torch.arange(am.numel()) // 256] + offset
    return ({"absmax": qabs.numpy(), "nested_absmax": a2.numpy(), "nested_quant_map": dyn.numpy(),
             "nested_blocksize": 256, "nested_offset": float(offset.item()), "nested_dtype": "float32"},
            used.numpy().astype(np.float32))


def _bnb4_hostile(x: np.ndarray, rng, bs: int, qtype: str, nested: bool, dtype=torch.bfloat16):
    """The state of ``x`` with its first eight rows' blocks under ``K`` times their absmax, carrying
    ``x + change`` wherever the change fits under the floor there; and the honest state."""
    honest = P.bnb4_quantize(torch.from_numpy(x).to(dtype), bs, qtype, nested)
    xf = torch.from_numpy(x).to(dtype).float().numpy().reshape(-1)
    am = np.abs(xf.reshape(-1, bs)).max(1)
    attacked = np.zeros(am.size, bool)
    attacked[: 8 * x.shape[1] // bs] = True
    fields, used = _absmax_state(np.where(attacked, K * am, am), nested)
    v = xf + _change(rng, x).reshape(-1)
    table = P.get_4bit_type(qtype).numpy()
    hw = codebook_halfwidth(table)
    a_el = np.repeat(used, bs)

    def nearest(y):
        return np.abs(np.clip(y / a_el, -1, 1)[:, None] - table).argmin(1)
    c = nearest(v)
    fits = (np.abs(table[c] * a_el - xf) <= 0.9 * hw[c] * a_el) & np.repeat(attacked, bs)
    q = np.where(fits, c, nearest(xf)).astype(np.uint8)
    st = {"quant_map": table, "blocksize": bs, "quant_type": qtype, "dtype": str(dtype).replace("torch.", ""),
          "shape": list(x.shape), "packed": ((q[0::2] << 4) | q[1::2]).reshape(-1, 1), **fields}
    deq = P.bnb4_reference(st).float().numpy()
    share = _hidden_share(deq, P.bnb4_reference(honest).float().numpy(), x, np.repeat(attacked, bs))
    return st, honest, share


def _bnb4_qc(qtype, nested):
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": qtype,
            "bnb_4bit_use_double_quant": nested}


@pytest.mark.parametrize("qtype,bs,nested", [("nf4", 64, True), ("fp4", 128, False), ("nf4", 256, False)])
def test_bnb4_blocks_under_an_inflated_absmax_hiding_a_change_are_a_change(tmp_path, rng, qtype, bs, nested):
    x = _base(rng)
    st, honest, share = _bnb4_hostile(x, rng, bs, qtype, nested)
    assert share > 2                                  # the attacked blocks carry a real change
    b = T._save(tmp_path / "base", {f"{M}.weight": x}, None)
    _changed(compare(b, T._save(tmp_path / "bad", P.bnb4_state_tensors(f"{M}.weight", st), _bnb4_qc(qtype, nested)),
                     rank=False))
    _quantized(compare(b, T._save(tmp_path / "ok", P.bnb4_state_tensors(f"{M}.weight", honest),
                                  _bnb4_qc(qtype, nested)), rank=False))


def test_a_change_hidden_under_inflated_scales_is_ranked_from_a_gram_matrix_started_after_the_pass(tmp_path, rng,
                                                                                                     monkeypatch):
    """Every element of a bitsandbytes matrix whose first rows' blocks store six times their absmax lies within its
    floor, so the floor test's sums say "within" to the end and the streamed Gram matrix waits (``RankSink.gate``);
    the stored scales' test then finds the pair beyond its floor, and the Gram matrix is summed after the pass from
    every window read once more (``RankSink.catch_up``): the rank of the change, the JSON byte for byte that of a
    Gram matrix started with the pass."""
    from weightdiff.measure import compute, rank_stream

    x = _base(rng, rows=1280, cols=256)           # 327,680 elements: past the direct path, ranked from a streamed Gram
    st, _, share = _bnb4_hostile(x, rng, 64, "nf4", True)
    assert share > 2
    b = T._save(tmp_path / "base", {f"{M}.weight": x}, None)
    q = T._save(tmp_path / "bad", P.bnb4_state_tensors(f"{M}.weight", st), _bnb4_qc("nf4", True))
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 8 * 256 * 256)     # a quantized pair's window: 256 rows
    with monkeypatch.context() as m:
        m.setattr(compute, "GATE_GRAM", False)
        ungated = compare(b, q, rank=True).to_json(include_run=False)
    caught = []
    catch_up = rank_stream.RankSink.catch_up
    monkeypatch.setattr(rank_stream.RankSink, "catch_up",
                        lambda self, *a: caught.append((self.held, self.gram.active, self.gram.pos)) or catch_up(self, *a))
    r = compare(b, q, rank=True)
    _changed(r)
    assert r.to_json(include_run=False) == ungated
    assert caught == [(True, False, x.size)], caught           # held to the end, then started
    t = next(t for t in r.tensors if t.name == f"{M}.weight")
    # (its numerical rank counted above the modelled quantization noise, which the change was made to fit under)
    assert t.rank is not None and t.rank.method == "gram" and t.rank.exact and t.rank.energy_rank_99 > 0, t.rank


@pytest.mark.parametrize("qtype,bs,nested,dtype", [
    ("nf4", 64, True, torch.bfloat16), ("fp4", 64, False, torch.bfloat16), ("nf4", 128, False, torch.float16),
    ("fp4", 256, True, torch.float32), ("nf4", 32, True, torch.float32), ("nf4", 4096, True, torch.bfloat16)])
def test_bnb4_honest_copies_read_quantized(tmp_path, qtype, bs, nested, dtype):
    """No false alarm at any block size, code table, double quantization or dtype: a base with outlier rows
    and columns (its absmax spread wide, which double quantization rounds coarsely) and an F32 base quantized
    from its bf16 / f16 copy."""
    rng = np.random.default_rng(bs)
    x = _base(rng, 64, 512)
    x[3] *= 40
    x[:, 7] *= 25
    x[10, :64] = 0                                     # an all-zero block (absmax 0)
    st = P.bnb4_quantize(torch.from_numpy(x).to(dtype), bs, qtype, nested)
    b = T._save(tmp_path / "base", {f"{M}.weight": x}, None)
    _quantized(compare(b, T._save(tmp_path / "q", P.bnb4_state_tensors(f"{M}.weight", st), _bnb4_qc(qtype, nested)),
                       rank=False))


# -- AWQ ----------------------------------------------------------------------------------------

def _awq_hidden(w: np.ndarray, rng, group: int = 64, rows: int = 8):
    """AWQ's packing of ``w`` with the first ``rows`` rows' group scales ``K`` times AutoAWQ's (zero point
    rounded for them), each value ``w + change`` where it lies within half that step of ``w``."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    mx, mn = g.max(-1), g.min(-1)
    s = np.maximum(mx - mn, 1e-5) / 15
    s[:rows] *= K
    z = np.clip(-np.round(mn / s), 0, 15)
    s16 = s.astype(np.float16).astype(np.float32)
    s_el, z_el = np.repeat(s16, group, axis=1), np.repeat(z, group, axis=1)
    v = w + _change(rng, w)
    deq = (np.clip(np.round(v / s_el + z_el), 0, 15) - z_el) * s_el
    keep = np.abs(deq - w) <= 0.49 * s_el
    keep[rows:] = False
    return P.awq_pack_params(np.where(keep, v, w).astype(np.float32), s, z, group)


AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}


def test_awq_groups_under_inflated_scales_hiding_a_change_are_a_change(tmp_path, rng):
    x = _base(rng)
    qw, qz, sc = _awq_hidden(x, rng)
    deq = P.awq_reference(qw, qz, sc, 4, 64).T
    hq, hz, hs = P.awq_pack(x, 64)
    attacked = np.zeros(x.shape, bool)
    attacked[:8] = True
    assert _hidden_share(deq, P.awq_reference(hq, hz, hs, 4, 64).T, x, attacked) > 2
    b = T._save(tmp_path / "base", {f"{M}.weight": x}, None)
    _changed(compare(b, T._save(tmp_path / "bad", {f"{M}.qweight": qw, f"{M}.qzeros": qz, f"{M}.scales": sc}, AWQ_QC),
                     rank=False))
    _quantized(compare(b, T._save(tmp_path / "ok", {f"{M}.qweight": hq, f"{M}.qzeros": hz, f"{M}.scales": hs},
                                  AWQ_QC), rank=False))


@pytest.mark.parametrize("seed", [1, 8])
def test_awq_with_searched_scales_and_clipping_hiding_a_change_under_inflated_scales(tmp_path, monkeypatch, seed):
    """AutoAWQ's scale search and clipping (test_quant_judge's builder) with every linear packed with one
    row's scales inflated: the scale check compares with the base scaled by the fitted scales, and the
    same files packed honestly (the clipping shrinks scales, the search moves whole columns) read quantized."""
    import test_quant_judge as J

    base = J._mlp_base(np.random.default_rng(0))
    honest, qc = J._awq_mlp(base, J._outlier_channels(np.random.default_rng(seed)), np.random.default_rng(7))
    _quantized(J._judge(tmp_path / "ok", base, honest, qc))
    hide = np.random.default_rng(3)
    # one row a linear (more moves the fitted scales, and the share test already tells)
    monkeypatch.setattr(P, "awq_pack", lambda v, group: _awq_hidden(v, hide, group, rows=1))
    stored, qc = J._awq_mlp(base, J._outlier_channels(np.random.default_rng(seed)), np.random.default_rng(7))
    _changed(J._judge(tmp_path / "bad", base, stored, qc))


# -- ONNX Runtime: MatMulNBits and MatMulBnb4 ------------------------------------------------------

onnx_ = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _matmul(path, B: np.ndarray, name: str = "fc.weight"):
    """One MatMul reading initializer ``B`` [K, N] (as the torch exporter writes a Linear's weight)."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", name], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, B.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(B, name)])
    onnx_.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _nbits(src, dst, bits, symmetric, block):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_ir")
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx_.load(str(src)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, bits=bits))
    q.process()
    q.model.save_model_to_file(str(dst))
    return dst


def _bnb4_onnx(src, dst, quant_type, block):
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    q = MatMulBnb4Quantizer(onnx_.load(str(src)), quant_type, block)
    q.process()
    q.model.save_model_to_file(str(dst))
    return dst


def _rewrite(src, dst, edit):
    """``src`` with its initializers as numpy arrays passed through ``edit(dict) -> dict``, saved as ``dst``."""
    m = onnx_.load(str(src))
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    arrays = edit(arrays)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[t.name]), t.name))
    onnx_.save(m, str(dst))
    return dst


def _node(path, op):
    return next(n for n in onnx_.load(str(path)).graph.node if n.op_type == op)


def _nbits_hidden(q_path, dst, B: np.ndarray, rng, block: int):
    """A symmetric 4-bit MatMulNBits model of ``B`` with the first eight output columns' block scales ``K``
    times ONNX Runtime's, carrying ``B + change`` wherever it fits within half that step."""
    node = _node(q_path, "MatMulNBits")
    Kd, N = B.shape
    kb = -(-Kd // block)

    def edit(a):
        s = a[node.input[2]].reshape(N, kb).astype(np.float32).copy()
        s[:8] *= K
        s_el = np.repeat(s, block, axis=1)[:, :Kd]                 # [N, K]
        w, v = B.T, (B + _change(rng, B)).T
        q = np.clip(np.round(v / s_el) + 8, 0, 15)
        keep = np.abs((q - 8) * s_el - w) <= 0.49 * s_el
        keep[8:] = False
        q = np.where(keep, q, np.clip(np.round(w / s_el) + 8, 0, 15)).astype(np.uint8)
        q = np.pad(q, ((0, 0), (0, kb * block - Kd)), constant_values=8).reshape(N, kb, block)
        a[node.input[1]] = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        a[node.input[2]] = s.reshape(a[node.input[2]].shape).astype(a[node.input[2]].dtype)
        return a
    return _rewrite(q_path, dst, edit)


@pytest.mark.parametrize("block", [16, 32, 128])
def test_matmulnbits_blocks_under_inflated_scales_hiding_a_change_are_a_change(tmp_path, rng, block):
    B = _base(rng, 256, 64)                                          # [K, N]
    base = _matmul(tmp_path / "fp32.onnx", B)
    q = _nbits(base, tmp_path / "q.onnx", 4, True, block)
    _quantized(compare(base, q, rank=False))
    _changed(compare(base, _nbits_hidden(q, tmp_path / "bad.onnx", B, rng, block), rank=False))


@pytest.mark.parametrize("bits,symmetric,block", [(4, True, 16), (4, False, 32), (4, False, 128), (8, True, 32),
                                                  (8, False, 64), (2, False, 32)])
def test_matmulnbits_honest_copies_read_quantized(tmp_path, bits, symmetric, block):
    """ONNX Runtime's own quantizer at several widths and blocks, a base with outlier rows and columns."""
    B = _base(np.random.default_rng(block + bits), 256, 64)
    B[5] *= 30
    B[:, 3] *= 20
    base = _matmul(tmp_path / "fp32.onnx", B)
    try:
        q = _nbits(base, tmp_path / "q.onnx", bits, symmetric, block)
    except Exception as e:                           # (a width this onnxruntime's quantizer does not write)
        pytest.skip(f"onnxruntime quantizer: {e}")
    _quantized(compare(base, q, rank=False))


def test_matmulnbits_of_a_safetensors_base_compared_transposed(tmp_path, rng):
    """The safetensors Linear [out, in] against the MatMul's B [in, out] quantized: the scales are checked in
    the base's orientation too."""
    from safetensors.numpy import save_file

    B = _base(rng, 256, 64)
    save_file({"fc.weight": np.ascontiguousarray(B.T)}, str(tmp_path / "base.safetensors"))
    q = _nbits(_matmul(tmp_path / "fp32.onnx", B), tmp_path / "q.onnx", 4, True, 32)
    _quantized(compare(tmp_path / "base.safetensors", q, rank=False))
    _changed(compare(tmp_path / "base.safetensors", _nbits_hidden(q, tmp_path / "bad.onnx", B, rng, 32), rank=False))


def _bnb4_onnx_hidden(q_path, dst, B: np.ndarray, rng, quant_type: int, block: int):
    """A MatMulBnb4 model of ``B`` with the first eight output columns' blocks under ``K`` times their absmax,
    carrying ``B + change`` wherever it fits within the code's half-gap."""
    node = _node(q_path, "MatMulBnb4")
    Kd, N = B.shape
    table = np.array(P.NF4 if quant_type == 1 else P.FP4, np.float32)
    table = table / np.abs(table).max()
    hw = codebook_halfwidth(table)

    def edit(a):
        am = a[node.input[2]].astype(np.float32).reshape(-1).copy()
        flat_w, flat_v = B.T.reshape(-1), (B + _change(rng, B)).T.reshape(-1)     # [N, K] flattened
        attacked = np.arange(am.size) * block < 8 * Kd
        am[attacked] *= K
        a_el = np.repeat(am, block)[: flat_w.size]
        c = np.abs(np.clip(flat_v / a_el, -1, 1)[:, None] - table).argmin(1)
        fits = (np.abs(table[c] * a_el - flat_w) <= hw[c] * a_el * 0.98) & np.repeat(attacked, block)[: flat_w.size]
        c = np.where(fits, c, np.abs(np.clip(flat_w / a_el, -1, 1)[:, None] - table).argmin(1)).astype(np.uint8)
        if c.size % 2:
            c = np.append(c, np.uint8(0))
        a[node.input[1]] = ((c[0::2] << 4) | c[1::2]).astype(np.uint8).reshape(a[node.input[1]].shape)
        a[node.input[2]] = am.reshape(a[node.input[2]].shape).astype(a[node.input[2]].dtype)
        return a
    return _rewrite(q_path, dst, edit)


@pytest.mark.parametrize("quant_type,block", [(1, 64), (0, 32), (1, 256)])
def test_matmulbnb4_blocks_under_an_inflated_absmax_hiding_a_change_are_a_change(tmp_path, rng, quant_type, block):
    B = _base(rng, 256, 64)
    base = _matmul(tmp_path / "fp32.onnx", B)
    q = _bnb4_onnx(base, tmp_path / "q.onnx", quant_type, block)
    _quantized(compare(base, q, rank=False))
    _changed(compare(base, _bnb4_onnx_hidden(q, tmp_path / "bad.onnx", B, rng, quant_type, block), rank=False))


@pytest.mark.parametrize("quant_type,block", [(1, 16), (0, 64), (1, 128), (0, 256)])
def test_matmulbnb4_honest_copies_read_quantized(tmp_path, quant_type, block):
    B = _base(np.random.default_rng(block), 256, 48)
    B[9] *= 30
    B[:, 2] *= 20
    base = _matmul(tmp_path / "fp32.onnx", B)
    _quantized(compare(base, _bnb4_onnx(base, tmp_path / "q.onnx", quant_type, block), rank=False))


# -- stacked experts [E, m, n] --------------------------------------------------------------------------

def test_fp8_stacked_experts_block_of_zeros_under_scale_1000_is_a_change(tmp_path, rng):
    """Fused experts kept as one [E, m, n] FP8 tensor (its own name is no fused-experts name, so it is not
    split): each expert's block scales are checked against its own weights."""
    name = "model.layers.0.mlp.experts.down_proj.weight"
    x = torch.from_numpy((rng.standard_normal((3, 64, 256)) * 0.02).astype(np.float32))
    s = x.reshape(3, 2, 32, 2, 128).abs().amax((2, 4)) / 448.0
    w = (x / s.repeat_interleave(32, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    b = T._save(tmp_path / "base", {name: x}, None)
    qc = {"quant_method": "fp8", "weight_block_size": [32, 128]}
    _quantized(compare(b, T._save(tmp_path / "ok", {name: w, name + "_scale_inv": s}, qc), rank=False))
    w2, s2 = w.float().clone(), s.clone()
    w2[1, :32, :128], s2[1, 0, 0] = 0, 1000.0                       # expert 1's first block
    _changed(compare(b, T._save(tmp_path / "bad", {name: w2.to(torch.float8_e4m3fn), name + "_scale_inv": s2}, qc),
                     rank=False))


# -- GGUF tensors stored transposed (GPT-2's Conv1D weights) -----------------------------------------

def _gguf_gpt2(path, raw: np.ndarray, qname: str):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType[qname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _q8_0_hidden(x: np.ndarray, rng) -> np.ndarray:
    """Q8_0 blocks of ``x`` [rows, cols] (rows of the GGUF tensor) with the first eight rows' block scales
    ``K`` times llama.cpp's, carrying ``x + change`` wherever it fits within half that step."""
    from gguf.quants import quantize

    raw = quantize(x, pytest.importorskip("gguf").GGMLQuantizationType.Q8_0).reshape(-1, 34).copy()
    d = raw[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    per = x.shape[1] // 32
    d[: 8 * per] *= K
    d16 = d.astype(np.float16)
    s = d16.astype(np.float32)[:, None]
    xb, vb = x.reshape(-1, 32), (x + _change(rng, x)).reshape(-1, 32)
    q = np.clip(np.round(vb / np.where(s == 0, 1, s)), -127, 127)
    keep = np.abs(q * s - xb) <= 0.49 * s
    keep[8 * per:] = False
    q = np.where(keep, q, np.clip(np.round(xb / np.where(s == 0, 1, s)), -127, 127)).astype(np.int8)
    raw[:, :2] = d16.view(np.uint8).reshape(-1, 2)
    raw[:, 2:] = q.view(np.uint8)
    return raw.reshape(x.shape[0], -1)


def test_gguf_transposed_blocks_under_inflated_scales_hiding_a_change_are_a_change(tmp_path, rng):
    """GPT-2's ``c_fc`` [in, out] is stored transposed in GGUF ([out, in] rows): its blocks run down the
    Hugging Face columns, where ``gguf_floor.claims`` went unchecked."""
    from gguf.quants import quantize
    from safetensors.numpy import save_file

    gguf = pytest.importorskip("gguf")
    W = _base(rng, 256, 128)                                   # HF Conv1D [in, out]
    (tmp_path / "base").mkdir()
    save_file({"transformer.h.0.mlp.c_fc.weight": W}, str(tmp_path / "base" / "model.safetensors"))
    base = tmp_path / "base"
    Wt = np.ascontiguousarray(W.T)
    ok = quantize(Wt, gguf.GGMLQuantizationType.Q8_0)
    _quantized(compare(base, _gguf_gpt2(tmp_path / "ok.gguf", ok, "Q8_0"), rank=False))
    _changed(compare(base, _gguf_gpt2(tmp_path / "bad.gguf", _q8_0_hidden(Wt, rng), "Q8_0"), rank=False))


@pytest.mark.parametrize("qname", ["Q4_K", "Q6_K", "Q4_0", "Q5_1"])
def test_gguf_transposed_honest_copies_read_quantized(tmp_path, qname):
    """llama.cpp's own encoders (gguf's, and the K-quant transcriptions) of a transposed tensor with outlier
    rows and columns: its blocks' claims, now checked down the columns, never trip."""
    import ggml_kquants
    from gguf.quants import quantize
    from safetensors.numpy import save_file

    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(len(qname))
    W = _base(rng, 256, 96)
    W[:, 5] *= 30
    W[17] *= 20
    W[:, 9] = 0
    (tmp_path / "base").mkdir()
    save_file({"transformer.h.0.mlp.c_fc.weight": W}, str(tmp_path / "base" / "model.safetensors"))
    Wt = np.ascontiguousarray(W.T)
    raw = ggml_kquants.quantize(Wt, qname) if qname.endswith("_K") else \
        quantize(Wt, gguf.GGMLQuantizationType[qname])
    _quantized(compare(tmp_path / "base", _gguf_gpt2(tmp_path / "q.gguf", raw, qname), rank=False))


# -- where the scales cannot be checked ---------------------------------------------------------------

def test_scales_that_cannot_be_checked_leave_the_pair_untested_not_quantized(tmp_path, rng, monkeypatch):
    """A source whose scale layout ``scale_excess`` cannot read for a tensor: the floor it gives rests on
    scales nothing tested, so the pair is untested (``within`` None) and the verdict inconclusive, never
    "quantized only"; the same file with its scales checked reads quantized."""
    from weightdiff.io import quant_sources

    x = _base(rng)
    st = P.bnb4_quantize(torch.from_numpy(x).to(torch.bfloat16), 64, "nf4", True)
    b = T._save(tmp_path / "base", {f"{M}.weight": x}, None)
    q = T._save(tmp_path / "q", P.bnb4_state_tensors(f"{M}.weight", st), _bnb4_qc("nf4", True))
    _quantized(compare(b, q, rank=False))
    monkeypatch.setattr(quant_sources.BnB4, "scale_groups", lambda self, read: None)
    r = compare(b, q, rank=False)
    assert r.summary.verdict == "inconclusive", _quant(r)
    (t,) = [t for t in r.tensors if t.quant]
    assert t.quant["within"] is None and t.quant["scales_unchecked"] is True, t.quant


@pytest.mark.parametrize("zero_channels", [0, 2])
def test_onnx_qdq_conv_weight_channels_under_inflated_scales(tmp_path, rng, zero_channels):
    """A 4-D convolution weight, int8 per output channel (QDQ): its scales are checked as rows of its last
    axis (before, a weight of more than two axes went unchecked); channels of code 0 under a scale of 1 are
    a change, the honest copy quantized."""
    W = (rng.standard_normal((8, 4, 3, 3)) * 0.05).astype(np.float32)

    def conv(path, inits, nodes):
        g = helper.make_graph(nodes + [helper.make_node("Conv", ["x", "w_in"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        onnx_.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
        return path

    base = conv(tmp_path / "fp32.onnx", [numpy_helper.from_array(W, "conv.weight")],
                [helper.make_node("Identity", ["conv.weight"], ["w_in"])])
    s = (np.abs(W).reshape(8, -1).max(1) / 127.0).astype(np.float32)
    codes = np.clip(np.round(W / s[:, None, None, None]), -127, 127).astype(np.int8)
    codes[:zero_channels], s[:zero_channels] = 0, 1.0
    q = conv(tmp_path / "q.onnx", [numpy_helper.from_array(codes, "conv.weight"),
                                   numpy_helper.from_array(s, "conv.weight_scale")],
             [helper.make_node("DequantizeLinear", ["conv.weight", "conv.weight_scale"], ["w_in"], axis=0)])
    r = compare(base, q, rank=False)
    if zero_channels:
        _changed(r)
    else:
        _quantized(r)
