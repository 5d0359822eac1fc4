"""kernels/quant.py against the formats' own code where it runs on CPU (compressed-tensors,
transformers' fp8 and mxfp4 dequantizers, torch float8 casts) and against packers and
dequantizers transcribed from the reference source where it does not (AutoGPTQ, AutoAWQ,
bitsandbytes: see tests/quant_packers.py). Values must match bit for bit; every floor must
hold for the round-to-nearest quantization of random and adversarial inputs."""

from __future__ import annotations

import numpy as np
import pytest

from weightdiff.kernels import quant as Q
from weightdiff.kernels import quant_floor as QF  # noqa: E402

from quant_packers import (awq_pack, awq_reference, bnb4_quantize, bnb4_reference, gptq_pack,
                           gptq_reference, rtn_int)

torch = pytest.importorskip("torch")


def _adversarial(rng, rows, cols):
    """Gaussian rows plus an all-zero row, a constant row, a row with one huge outlier and
    values exactly on rounding midpoints."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.75
    x[2, 3] = 40.0
    x[3] = (np.arange(cols) % 16 - 7.5) / 7.5
    return x


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _bits(t):
    return t.contiguous().view(torch.uint8).numpy() if t.dtype.itemsize == 1 else t.numpy()


def test_round_to_matches_torch(rng):
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 5000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3e38], np.float32)])
    for name, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        want = _t(x).to(dt).float().numpy()
        np.testing.assert_array_equal(Q.round_to(x, name), want)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_dense_matches_compressed_tensors(rng, bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    for cols in (1, 31, 32, 33, 70):
        codes = torch.from_numpy(rng.integers(lo, hi, (5, cols)).astype(np.int8))
        packed = pack_to_int32(codes, bits)
        mine = Q.unpack_dense_int32(packed.numpy(), bits, cols).astype(np.int16) - (1 << (bits - 1))
        np.testing.assert_array_equal(mine, codes.numpy())
        np.testing.assert_array_equal(mine, unpack_from_int32(packed, bits, torch.Size((5, cols))).numpy())


@pytest.mark.parametrize("strategy,bits,symmetric,sdt", [
    ("group", 4, True, torch.bfloat16), ("group", 4, False, torch.float16), ("channel", 8, True, torch.bfloat16),
    ("channel", 8, False, torch.float32), ("tensor", 8, True, torch.float16), ("group", 2, False, torch.bfloat16)])
def test_compressed_tensors_int_dequant_bit_exact(rng, strategy, bits, symmetric, sdt):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, strategy=strategy, symmetric=symmetric,
                            group_size=32 if strategy == "group" else None)
    x = _adversarial(rng, 8, 64)
    xt = _t(x).to(sdt)
    if strategy == "group":
        v = xt.reshape(8, 2, 32)
        mn, mx = v.amin(-1), v.amax(-1)
    elif strategy == "channel":
        mn, mx = xt.amin(-1, keepdim=True), xt.amax(-1, keepdim=True)
    else:
        mn, mx = xt.amin().reshape(1), xt.amax().reshape(1)
    scale, zp = calculate_qparams(mn, mx, args)
    scale = scale.to(sdt)
    q = quantize(xt, scale, zp, args, dtype=torch.int8)
    want = dequantize(q, scale, zp if not symmetric else None, args).float().numpy()
    g = 32 if strategy == "group" else 64
    s = scale.float().numpy()
    s_el = np.repeat(s, g, axis=-1) if strategy == "group" else s
    z_el = 0 if symmetric else (np.repeat(zp.numpy(), g, axis=-1) if strategy == "group" else zp.numpy())
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[sdt]
    value, floor = Q.dequant_int(q.numpy(), z_el, s_el, name, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    np.testing.assert_array_equal(value, want)
    base = xt.float().numpy()
    assert np.all(np.abs(base - value) <= floor)


def _block_scales_rows(scale: np.ndarray, r0: int, r1: int, cols: int, block: tuple[int, int]) -> np.ndarray:
    """A [ceil(R/bh), ceil(C/bw)] block-scale grid expanded to rows [r0, r1) x cols."""
    bh, bw = block
    return np.asarray(scale)[np.arange(r0, r1) // bh][:, np.arange(cols) // bw]


@pytest.mark.parametrize("fp8,tdt", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)])
def test_fp8_block_matches_transformers(rng, fp8, tdt):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    rows, cols, block = 300, 200, (128, 128)
    x = _adversarial(rng, rows, cols)
    nb = (-(-rows // 128), -(-cols // 128))
    fmax = torch.finfo(tdt).max
    s = np.zeros(nb, np.float32)
    for i in range(nb[0]):
        for j in range(nb[1]):
            s[i, j] = max(np.abs(x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max(), 1e-12) / fmax
    s_el = _block_scales_rows(s, 0, rows, cols, block)
    w = (_t(x) / _t(s_el)).to(tdt)
    want = _dequantize_fp8_weight(w, _t(s), list(block), torch.float32).numpy()
    value, floor = Q.dequant_fp8(_bits(w), fp8, s_el, "F32")
    np.testing.assert_array_equal(value, want)
    assert np.all(np.abs(x - value) <= floor)
    # windows of rows give the same values as the whole tensor
    v2, _ = Q.dequant_fp8(_bits(w)[130:260], fp8, _block_scales_rows(s, 130, 260, cols, block), "F32")
    np.testing.assert_array_equal(v2, value[130:260])


def test_fp8_per_channel_and_tensor_scale(rng):
    x = _adversarial(rng, 16, 40)
    for s in (np.abs(x).max(1, keepdims=True) / 448 + 1e-12, np.array([[np.abs(x).max() / 448]])):
        s = s.astype(np.float32)
        w = (_t(x) / _t(s)).to(torch.float8_e4m3fn)
        value, floor = Q.dequant_fp8(_bits(w), "F8_E4M3", s, "F32")
        np.testing.assert_array_equal(value, (w.float() * _t(s)).numpy())
        assert np.all(np.abs(x - value) <= floor)
    # bf16 scales (compressed-tensors float-quantized): the product rounds to bf16
    s = _t(np.abs(x).max(1, keepdims=True) / 448 + 1e-6).to(torch.bfloat16)
    w = (_t(x).to(torch.bfloat16) / s).to(torch.float8_e4m3fn)
    value, floor = Q.dequant_fp8(_bits(w), "F8_E4M3", s.float().numpy(), "BF16", "BF16")
    np.testing.assert_array_equal(value, (w.to(torch.bfloat16) * s).float().numpy())
    assert np.all(np.abs(_t(x).to(torch.bfloat16).float().numpy() - value) <= floor)


@pytest.mark.parametrize("bits,v1,desc_act", [(4, True, False), (4, True, True), (8, False, True), (4, False, False),
                                               (3, True, False), (3, True, True), (3, False, False), (2, True, False)])
def test_gptq_matches_reference(rng, bits, v1, desc_act):
    """Against AutoGPTQ's own unpacking (``gptq_reference``, its 3-bit twelve-shift form too: a code split over two
    words), every code and zero point of a random and adversarial matrix; row ranges cut inside a unit of zeros."""
    out_f, in_f, group = {3: 96, 2: 32}.get(bits, 24), 64, 16
    x = _adversarial(rng, out_f, in_f)
    g_idx = (np.arange(in_f) // group).astype(np.int32)
    if desc_act:
        g_idx = g_idx[rng.permutation(in_f)]
    qweight, qzeros, scales, codes = gptq_pack(x, g_idx, bits, v1)
    want = gptq_reference(qweight, qzeros, scales, g_idx, bits, v1)      # [in, out], fp16
    value, floor = Q.gptq_rows(qweight, qzeros, scales.astype(np.float32), g_idx, bits, v1, "F16", 0, out_f)
    np.testing.assert_array_equal(value, want.T)
    assert np.all(np.abs(x - value) <= floor)
    sc_bf = np.asarray(scales, np.float32)                  # bf16 rounding of the numba kernel too
    vb, _ = Q.gptq_rows(qweight, qzeros, sc_bf, g_idx, bits, v1, "BF16", 0, out_f)
    np.testing.assert_array_equal(vb, Q.gptq_rows_numpy(qweight, qzeros, sc_bf, g_idx, bits, v1, "BF16", 0, out_f)[0])
    for r0, r1 in ((5, 19), (20, 45), (31, 33), (0, 0)):
        r1 = min(r1, out_f)
        r0 = min(r0, r1)
        part, _ = Q.gptq_rows(qweight, qzeros, scales.astype(np.float32), g_idx, bits, v1, "F16", r0, r1)
        np.testing.assert_array_equal(part, value[r0:r1])
    assert bits == 8 or set(np.unique(codes)) == set(range(2 ** bits))     # every code met, the end ones too


@pytest.mark.parametrize("bits", [4])
def test_awq_matches_reference(rng, bits):
    out_f, in_f, group = 32, 64, 32
    x = _adversarial(rng, out_f, in_f)
    qweight, qzeros, scales = awq_pack(x, group, bits)
    want = awq_reference(qweight, qzeros, scales, bits, group)              # [in, out], fp16
    value, floor = Q.awq_rows(qweight, qzeros, scales.astype(np.float32), bits, group, "F16", 0, out_f)
    np.testing.assert_array_equal(value, want.T)
    # AWQ's min/max range leaves out zero, so the constant row 1 (0.75) clips to a tiny grid:
    # far beyond any step, which is why AWQ is judged statistically (docs/methodology.md)
    assert np.all(np.abs(x - value)[2:] <= floor[2:]) and np.all(np.abs(x - value)[1] > floor[1])
    part, _ = Q.awq_rows(qweight, qzeros, scales.astype(np.float32), bits, group, "F16", 3, 21)
    np.testing.assert_array_equal(part, value[3:21])


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("bits", [4, 8])
def test_awq_numba_pass_is_its_numpy_specification(rng, dtype, bits):
    """``awq_rows`` (numba) gives ``awq_rows_numpy``'s values and floors bit for bit: random packed words (every
    code, the end codes' wider floor), adversarial scales (0, subnormal, huge past fp16's range, inf, NaN), groups
    that do not divide the input features, row ranges cut inside a packed word."""
    pf = 32 // bits
    in_f, out_f, group = 100, 8 * pf, 32
    qweight = rng.integers(-2 ** 31, 2 ** 31, (in_f, out_f // pf), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-2 ** 31, 2 ** 31, (-(-in_f // group), out_f // pf), dtype=np.int64).astype(np.int32)
    scales = (rng.standard_normal((-(-in_f // group), out_f)) * 1e-3).astype(np.float32)
    scales[0, :5] = [0.0, 1e-42, 7e4, np.inf, np.nan]
    scales[1, 3] = -2.5e-5
    for r0, r1 in ((0, out_f), (3, 21), (pf - 1, pf + 1), (5, 5)):
        a = Q.awq_rows(qweight, qzeros, scales, bits, group, dtype, r0, r1)
        with np.errstate(invalid="ignore", over="ignore"):          # (0 x inf: NaN, as in the numba pass)
            b = Q.awq_rows_numpy(qweight, qzeros, scales, bits, group, dtype, r0, r1)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[0].dtype == a[1].dtype == np.float32 and a[0].shape == (r1 - r0, in_f)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("bits", [0, 2, 3, 4, 5, 8])
def test_int_grid_numba_pass_is_its_numpy_specification(rng, dtype, bits):
    """``int_grid_rows`` (numba, compressed-tensors' integer weights) gives ``int_grid_rows_numpy``'s values and
    floors bit for bit: random words (every code; at 3 and 5 bits codes split over two words; ``bits`` 0: the
    int8 codes themselves), adversarial scales (0, subnormal, past fp16's range, inf, NaN, negative), extreme
    zero points (their difference with a code wrapping in int32, as numpy's), each layout's index maps (group
    with and without g_idx, channel, tensor, block), the half-ulp term on and off."""
    rows, cols = 9, 70
    if bits:
        words = -(-cols * bits // 32)
        src = rng.integers(-2 ** 31, 2 ** 31, (rows, words), dtype=np.int64).astype(np.int32)
        src[0, 0] = 0x00FF00FF                                           # the end codes at 8 bits
        offset, half = 1 << (bits - 1), 1 << (bits - 1)
    else:
        src = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
        src[0, :2] = [-128, 127]
        offset, half = 0, 128
    scales = (rng.standard_normal((rows, 7)) * 1e-3).astype(np.float32)
    scales[0, :6] = [0.0, 1e-42, 7e4, np.inf, np.nan, -2.5e-5]
    zeros = rng.integers(-20, 20, scales.shape).astype(np.int32)
    zeros[1, :3] = [2 ** 31 - 1, -2 ** 31, 2 ** 30]
    r = np.arange(rows)
    layouts = {"group": (r, np.arange(cols) // 10), "g_idx": (r, rng.integers(0, 7, cols)),
               "channel": (r, np.zeros(cols, np.int64)), "tensor": (np.zeros(rows, np.int64), np.zeros(cols, np.int64)),
               "block": (r // 2, np.arange(cols) // 16)}
    for name, (rmap, cmap) in layouts.items():
        for z in (None, zeros):
            for hu in (0.0, 2.0 ** -8):
                for lo, hi in ((0, rows), (2, 5), (4, 4)):
                    args = (src[lo:hi], bits, cols, rmap[lo:hi], cmap, scales, z, offset, -half, half - 1, dtype, hu)
                    a = Q.int_grid_rows(*args)
                    with np.errstate(invalid="ignore", over="ignore"):
                        b = Q.int_grid_rows_numpy(*args)
                    np.testing.assert_array_equal(a[0], b[0], err_msg=name)
                    np.testing.assert_array_equal(a[1], b[1], err_msg=name)
                    assert a[0].dtype == a[1].dtype == np.float32 and a[0].shape == (hi - lo, cols)
    codes = Q.unpack_dense_int32(src, bits, cols) if bits else src
    if 0 < bits < 8:
        assert set(np.unique(codes)) == set(range(2 ** bits))                # every code met
    assert {codes.min(), codes.max()} == ({0, 2 ** bits - 1} if bits else {-128, 127})   # the end codes
    with pytest.raises(ValueError, match="outside the scales"):
        Q.int_grid_rows(src, bits, cols, r, np.full(cols, 7), scales, None, offset, -half, half - 1, dtype)
    with pytest.raises(ValueError, match="outside the scales"):
        Q.int_grid_rows(src, bits, cols, r, np.zeros(cols, np.int64), scales, zeros[:1], offset, -half, half - 1, dtype)
    with pytest.raises(ValueError, match="hold fewer" if bits else "70 codes"):
        Q.int_grid_rows(src[:, :-1], bits, cols, r, np.zeros(cols, np.int64), scales, None, offset, -half,
                        half - 1, dtype)


@pytest.mark.parametrize("quant_type,nested,dtype", [("nf4", False, "BF16"), ("fp4", False, "F16"),
                                                     ("nf4", True, "F32"), ("nf4", True, "BF16")])
def test_bnb4_matches_reference(rng, quant_type, nested, dtype):
    x = _adversarial(rng, 10, 100)                 # 1,000 elements: a partial last block of 64
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    xs = _t(x).to(tdt)
    st = bnb4_quantize(xs, 64, quant_type, nested)
    want = bnb4_reference(st).float().numpy()
    if nested:
        absmax, err = Q.bnb_nested_absmax(st["absmax"], st["nested_quant_map"], st["nested_absmax"],
                                          st["nested_blocksize"], st["nested_offset"])
    else:
        absmax, err = st["absmax"], None
    value, floor = Q.bnb4_flat(st["packed"], absmax, st["quant_map"], 64, dtype, 0, x.size, err)
    np.testing.assert_array_equal(value.reshape(x.shape), want)
    assert np.all(np.abs(xs.float().numpy().ravel() - value) <= floor)
    v2, _ = Q.bnb4_flat(st["packed"], absmax, st["quant_map"], 64, dtype, 77, 501, err)
    np.testing.assert_array_equal(v2, value[77:501])
    # any flat indices (ONNX Runtime's MatMulBnb4 reads columns of the codes): the same values and floors
    idx = np.concatenate([rng.integers(0, x.size, 300), [0, 1, x.size - 2, x.size - 1, 63, 64, 65]])
    v3, f3 = Q.bnb4_gather(st["packed"], absmax, st["quant_map"], 64, dtype, idx, err)
    np.testing.assert_array_equal(v3, value[idx])
    np.testing.assert_array_equal(f3, floor[idx])


def test_bnb_int8(rng):
    x = _adversarial(rng, 12, 50)
    scb = np.abs(x).max(1).astype(np.float32)
    cb = np.round(x * (127.0 / np.where(scb == 0, 1, scb))[:, None]).astype(np.int8)
    value, floor = Q.bnb_int8_rows(cb, scb)
    want = (_t(cb) * _t(scb).view(-1, 1) * 7.874015718698502e-3).numpy()
    np.testing.assert_array_equal(value, want)
    assert np.all(np.abs(x - value) <= floor)


def test_mxfp4_matches_transformers(rng):
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    e, r, g = 2, 6, 3
    blocks = rng.integers(0, 256, (e, r, g, 16)).astype(np.uint8)
    scales = rng.integers(110, 140, (e, r, g)).astype(np.uint8)
    want = _convert_moe_packed_tensors(_t(blocks), _t(scales), dtype=torch.float32).numpy()   # [e, g*32, r]
    value, floor = Q.mxfp4_rows(blocks, scales, "F32")
    np.testing.assert_array_equal(value.transpose(0, 2, 1), want)
    # round-to-nearest e2m1 of values in a block stays within the floor
    x = rng.standard_normal((4, 32)).astype(np.float32)
    exp = np.ceil(np.log2(np.abs(x).max(1) / 6.0)).astype(np.int32)
    sc = (exp + 127).astype(np.uint8)
    y = x / np.ldexp(1.0, exp)[:, None]
    codes = np.abs(np.abs(y)[..., None] - Q.FP4_E2M1[:8]).argmin(-1) + 8 * (y < 0)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    v, f = Q.mxfp4_rows(packed[:, None, :], sc[:, None], "F32")
    assert np.all(np.abs(x - v) <= f)


def test_floor_int_is_tight_and_covers_clipping(rng):
    """A value clipped at the edge of the grid stays within 1.5 steps; an interior one within 0.5."""
    x = np.array([[0.0, 0.24, 0.26, 1.0, 1.7, -2.3]], np.float32)
    q, s, z = rtn_int(x, 0.5, 0, -4, 3)         # grid -2.0 .. 1.5, so 1.7 and -2.3 clip
    value, floor = Q.dequant_int(q, z, np.float32(s), "F32", -4, 3)
    assert np.all(np.abs(x - value) <= floor)
    assert floor[0, 0] == pytest.approx(0.25) and floor[0, 4] >= 0.75


def test_codebook_halfwidth_fp8_e4m3():
    from weightdiff.kernels.dtypes import FP8_TABLES

    hw = Q.codebook_halfwidth(FP8_TABLES["F8_E4M3"])
    assert hw[0x38] == pytest.approx(0.0625)        # 1.0: gap above 0.125, below 0.0625
    assert hw[0x7E] == pytest.approx(48.0)          # 448, the largest: 32 * 1.5
    assert hw[0x7F] == 0.0                          # NaN


def test_grid_levels():
    rows = (np.arange(-127, 128, dtype=np.float32) * np.float32(0.0123))[None, :]
    assert QF.grid_levels(rows)[0] == 255
    assert QF.grid_levels(np.random.default_rng(0).standard_normal((2, 64)))[0] == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_floor_stats_numba_pass_matches_its_numpy_specification(rng, dtype):
    n = 5000
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(dtype)
    o = (b + rng.standard_normal(n).astype(dtype) * dtype(0.01)).astype(dtype)
    f = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(0.01)
    f[::7] = 0.0
    o[::11] = b[::11]
    b[5], o[6], b[7], o[7], f[8] = np.inf, np.nan, np.inf, np.inf, np.inf
    f[20:23], o[21], o[22] = np.nan, b[21], np.nan               # NaN floors (NaN scales): beyond
    for ncols in (1, 13):
        got, gc = QF.floor_stats(b, o, f, 3, ncols, cast_rel=2.0 ** -8)
        want, wc = QF.floor_stats_numpy(b, o, f, 3, ncols, cast_rel=2.0 ** -8)
        np.testing.assert_array_equal(got[[0, 1]], want[[0, 1]])
        np.testing.assert_array_equal(np.isnan(got[3]), np.isnan(want[3]))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_array_equal(gc, wc)
    for fn in (QF.floor_stats, QF.floor_stats_numpy):              # NaN floors: every element beyond
        s, _ = fn(np.zeros(3, dtype), np.array([0.0, 1e-9, np.nan], dtype), np.full(3, np.nan, np.float32))
        assert s[1] == 3 and s[3] == np.inf
    empty, ec = QF.floor_stats(np.zeros(0), np.zeros(0), np.zeros(0, np.float32))
    assert empty.tolist() == [0.0] * len(QF.FLOOR_FIELDS) and ec.tolist() == [0]


def test_floor_stats_against_loop_and_windows(rng):
    n, ncols = 1000, 37
    b = rng.standard_normal(n)
    o = b + rng.standard_normal(n) * 0.1
    f = np.abs(rng.standard_normal(n)).astype(np.float32) * 0.1
    f[:5] = 0.0
    o[:3] = b[:3]                       # zero floor, no difference: within
    o[10], b[11] = np.nan, np.inf       # non-finite: beyond
    whole, cols = QF.floor_stats(b, o, f, 0, ncols, cast_rel=2.0 ** -9)
    beyond = [i for i in range(n) if not (abs(b[i] - o[i]) <= f[i] + 2.0 ** -9 * abs(b[i]))]
    assert whole[1] == len(beyond)
    # the three sums are the finite elements' terms added in order, one float64 at a time: the same bits as this
    # loop (a windowed pass's sums, and so the JSON, do not depend on how the kernel counts)
    su2 = se2 = sd2 = 0.0
    for i in range(5, n):               # (past the zero floors: their terms are infinite)
        d, fl = abs(b[i] - o[i]), float(f[i]) + 2.0 ** -9 * abs(b[i])
        if np.isfinite(d):
            su2, se2, sd2 = su2 + (d / fl) ** 2, se2 + max(d - fl, 0.0) ** 2, sd2 + d * d
    part = QF.floor_stats(b[5:], o[5:], f[5:], 0, ncols, cast_rel=2.0 ** -9)[0]
    assert (part[2], part[4], part[5]) == (su2, se2, sd2) and np.isfinite(su2)
    assert cols.tolist() == np.bincount(np.array(beyond) % ncols, minlength=ncols).tolist()
    parts = [QF.floor_stats(b[i:i + 300], o[i:i + 300], f[i:i + 300], i % ncols, ncols, 2.0 ** -9)
             for i in range(0, n, 300)]
    assert sum(p[0][1] for p in parts) == whole[1]
    np.testing.assert_array_equal(sum(p[1] for p in parts), cols)
    o[20:40] = 0.0                      # quantized to zero: off, but not counted as moved
    whole, cols = QF.floor_stats(b, o, f, 0, ncols, cast_rel=2.0 ** -9, off_rel=0.05)
    fin = [i for i in range(n) if np.isfinite(b[i] - o[i])]
    off = [i for i in fin if abs(b[i] - o[i]) > 0.05 * abs(b[i])]
    moved = [i for i in fin if abs(b[i] - o[i]) > 2.0 ** -9 * abs(b[i]) and o[i] != 0]
    assert whole[8] == len(off) < len(moved) < n - 5 - 20   # not the equal pairs, the non-finite, the zeros
    u = [abs(b[i] - o[i]) / (f[i] + 2.0 ** -9 * abs(b[i])) for i in moved]
    assert whole[7] == sum(1 for x in u if x < QF.NEAR_U) > 0
    spec, spec_cols = QF.floor_stats_numpy(b, o, f, 0, ncols, cast_rel=2.0 ** -9, off_rel=0.05)
    np.testing.assert_array_equal(whole[[0, 1, 3, 6, 7, 8]], spec[[0, 1, 3, 6, 7, 8]])   # counts and max exactly
    np.testing.assert_allclose(whole, spec, rtol=1e-12)
    np.testing.assert_array_equal(cols, spec_cols)


def test_gptq_numba_equals_numpy_specification(rng):
    """Both numba kernels (3 bits: the bit stream's, codes 10 and 21 of each unit split over two words, in
    ``qweight`` down the inputs and in ``qzeros`` along the outputs) give the numpy specification's values;
    row ranges cut inside a word and a unit; shapes the kernels would read past are refused."""
    x = _adversarial(rng, 96, 128)
    g = (np.arange(128) // 32).astype(np.int32)[rng.permutation(128)]
    for bits, v1 in ((4, True), (8, False), (2, True), (3, True), (3, False)):
        qw, qz, sc, _ = gptq_pack(x, g, bits, v1)
        for r0, r1 in ((0, 96), (3, 37), (9, 23), (63, 65)):
            a = Q.gptq_rows(qw, qz, sc.astype(np.float32), g, bits, v1, "F16", r0, r1)
            b = Q.gptq_rows_numpy(qw, qz, sc.astype(np.float32), g, bits, v1, "F16", r0, r1)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[1], b[1], rtol=1e-4)     # |v| before or after rounding
        for bad in ((qw[:-1], qz, sc, g), (qw, qz[:, :1], sc, g), (qw, qz, sc[:, :50], g), (qw, qz, sc, g[:-1])):
            with pytest.raises(ValueError, match="do not hold"):
                Q.gptq_rows(*bad[:3], bad[3], bits, v1, "F16", 0, 96)


def test_fp8_rows_numba_equals_dequant_fp8(rng):
    x = _adversarial(rng, 20, 300)
    s = (np.abs(x).reshape(20, 3, 100).max(-1) / 448 + 1e-6).astype(np.float32)
    for fp8, tdt in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        w = _bits((_t(x) / _t(np.repeat(s, 100, 1))).to(tdt))
        for sd in ("F32", "BF16"):
            a = Q.fp8_rows(w, fp8, s, 100, sd, sd)
            b = Q.dequant_fp8(w, fp8, np.repeat(s, 100, 1), sd, sd)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[1], b[1], rtol=1e-4)


@pytest.mark.parametrize("case", ["random", "adversarial", "float32"])
@pytest.mark.parametrize("group", [1, 8, 64])
def test_clipped_beyond_numba_pass_is_its_numpy_specification(rng, case, group):
    """The numba pass counts what ``clipped_beyond_numpy`` counts: random clipped groups, and NaN and infinities on
    either side, NaN floors, signed zeros, ties at a group's end codes, a cast allowance; float32 windows too."""
    n = 256 * group
    b = rng.standard_normal(n)
    o = np.round(b * 2) / 2
    o.reshape(-1, group)[:, 0] = np.clip(b.reshape(-1, group)[:, 0], -0.5, 0.5)
    o[::17] += 0.7
    f = np.full(n, 0.25)
    if case == "adversarial":
        b[::31] = np.nan
        o[5::97] = np.nan
        b[7::53], o[11::59] = np.inf, -np.inf
        f[13::41] = np.nan
        b[3::29], o[3::29] = -0.0, 0.0
        o.reshape(-1, group)[::3, -1] = o.reshape(-1, group)[::3].max(axis=1)     # ties at the top code
        b[::7] *= 1e-300
        if group > 1:                    # a clipped end code beside a NaN: numpy's group max is NaN, so not counted
            g0 = 2 * group
            o[g0:g0 + group], f[g0:g0 + group] = 0.25, 0.25
            o[g0], b[g0], o[g0 + 1] = 0.5, 2.0, np.nan
    dt = np.float32 if case == "float32" else np.float64
    for cast_rel in (0.0, 2.0 ** -9):
        want = QF.clipped_beyond_numpy(b.astype(dt), o.astype(dt), f.astype(dt), group, cast_rel)
        assert QF.clipped_beyond(b.astype(dt), o.astype(dt), f.astype(dt), group, cast_rel) == want
        assert want > 0 or case == "adversarial" and group == 1


def test_clipped_beyond_against_a_loop(rng):
    # elements beyond the floor that AWQ's clipping explains: on the group's end code, same sign, nearer 0
    clipped_beyond = QF.clipped_beyond

    group = 8
    b = rng.standard_normal(64 * group)
    o = np.round(b * 2) / 2
    o.reshape(-1, group)[:, 0] = np.clip(b.reshape(-1, group)[:, 0], -0.5, 0.5)     # some clipped
    o[::17] += 0.7                                                                    # some moved outward
    f = np.full(b.size, 0.25)
    want = 0
    for g in range(b.size // group):
        sl = slice(g * group, (g + 1) * group)
        hi, lo = o[sl].max(), o[sl].min()
        for i in range(sl.start, sl.stop):
            if abs(b[i] - o[i]) > f[i] and o[i] in (hi, lo) and np.sign(o[i]) == np.sign(b[i]) and abs(o[i]) < abs(b[i]):
                want += 1
    assert want > 0 and clipped_beyond(b, o, f, group) == want
    with pytest.raises(ValueError):
        clipped_beyond(b[:-1], o[:-1], f[:-1], group)


@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False), (2, False)])
def test_round_trip_matches_torch(rng, bits, sym):
    """``round_trip`` (the base's quantize-dequantize a float copy is tested against) against the same
    scheme written with torch, on random rows with ties, zero rows and one-value rows."""
    import torch

    v = rng.standard_normal((64, 32)).astype(np.float32).astype(np.float64)
    v[3] = 0.0                                               # a row of zeros: step 0
    v[4] = 0.25                                              # one value
    v[5] = np.round(v[5] * 4) / 4                            # many exact ties at half a step
    dq, step = QF.round_trip(v, bits, sym)
    x = torch.from_numpy(v)
    if sym:
        s = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        s1 = torch.where(s > 0, s, torch.ones_like(s))
        ref = torch.round(x / s1) * s1
    else:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        s = (hi - lo) / (2 ** bits - 1)
        s1 = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s1)
        ref = (torch.clamp(torch.round(x / s1) + z, 0, 2 ** bits - 1) - z) * s1
    np.testing.assert_array_equal(dq, ref.numpy())
    np.testing.assert_array_equal(step, s[:, 0].numpy())
    # within half a step (symmetric) or a step (asymmetric: the zero point is rounded) of the input, on rows
    # with a step (a one-value row has none: its floor is 0, so any difference there counts as beyond)
    live = step > 0
    assert np.all(np.abs(dq - v)[live] <= step[live, None] * (0.5 if sym else 1.0) + 1e-12)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_ggml_round_trip_matches_the_gguf_package_bitwise(rng, kind):
    """``ggml_round_trip`` (a GGUF dequantized back to floats is tested against it) against the gguf
    package's quantize then dequantize (transcriptions of ggml's reference quantizers), bit for bit, on
    random blocks of every scale and adversarial ones: zeros, one value, the largest magnitude negative,
    exact ties at half a code, values at fp16's range, subnormal scales."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    x = (rng.standard_normal((400, 64)) * rng.choice([1e-6, 1e-3, 0.02, 1.0, 300.0], (400, 1))).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.25
    x[2, :32] = -np.abs(x[2, :32])                   # largest magnitude negative: Q4_0's d > 0
    x[3] = np.round(x[3] * 8) / 8                    # many values on half-code ties
    x[4, :32] = np.linspace(-1, 1, 32)
    x[5] = 6e4 * np.sign(x[5])                       # near fp16's largest scale
    x[6] = 1e-9 * x[6]                               # subnormal fp16 scales
    t = getattr(gguf.GGMLQuantizationType, kind)
    ref = quants.dequantize(quants.quantize(x, t), t).reshape(x.shape).astype(np.float32)
    dq, step = QF.ggml_round_trip(x.reshape(-1, 32), kind)
    assert dq.dtype == np.float32
    np.testing.assert_array_equal(dq.reshape(x.shape).view(np.uint32), ref.view(np.uint32))
    assert (step >= 0).all() and step.shape == (x.size // 32,)
    # the step is the block's fp16 scale: every value one whole number of steps from the block's lowest
    g = dq.reshape(-1, 32).astype(np.float64)
    live = step > 0
    k = (g[live] - g[live].min(axis=1, keepdims=True)) / step[live, None]
    assert np.abs(k - np.round(k)).max() < 1e-3


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_encoder_matches_llama_cpps_own_bytes(kind):
    """``kernels/ggml_encode.encode`` against the bytes of ggml's own ``quantize_row_*_K_ref`` (compiled from
    ggml's C without contraction, scripts/ggml_kquant_fixture.py) on Gaussian rows at four scales and
    adversarial ones (zeros, one value, one sign, sixteenths, a ramp, cubes, sparse zeros): bit for bit."""
    from pathlib import Path

    from weightdiff.kernels import ggml_encode
    from weightdiff.kernels.ggml import dequantize

    ref = np.load(Path(__file__).parent / "data" / "ggml_kquants.npz")
    got = ggml_encode.encode(ref["x"], kind)
    np.testing.assert_array_equal(got, ref[kind])
    # the round trip is those bytes decoded; each value within its sub-block's step plus what clamping adds
    dq, step = ggml_encode.round_trip(ref["x"].reshape(-1, 256), kind)
    np.testing.assert_array_equal(dq.reshape(-1), dequantize(ref[kind], kind).reshape(-1))
    sub = ggml_encode.KQUANTS[kind][1]
    assert step.shape == (ref["x"].size // 256, 256 // sub) and (step >= 0).all()
    err = np.abs(dq - ref["x"].reshape(-1, 256)).reshape(-1, sub)
    inside = err <= step.reshape(-1, 1) * 0.5 * (1 + 1e-5) + 1e-12
    assert inside.mean() > 0.95                        # nearly every value within half a step (the rest clamped)
    with pytest.raises(ValueError):
        ggml_encode.encode(np.zeros(100, np.float32), kind)
