"""The numba kernels against the float64 reference, plus the semantics the reference fixes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightdiff.kernels import cpu, reference as ref
from weightdiff.kernels.reference import IDX
from weightdiff.io.safetensors_write import to_storage

from kernel_cases import PAIRS, assert_stats_close, make_pair, specials

LENGTHS = [0, 1, cpu.CHUNK - 1, cpu.CHUNK + 1, 3 * cpu.CHUNK]


@pytest.mark.parametrize("db,dt", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_delta_stats_matches_reference(db, dt):
    rng = np.random.default_rng(zlib.crc32(f"{db}-{dt}".encode()))   # str hash() is salted per process
    for n in LENGTHS:
        b, t = make_pair(rng, n, db, dt)
        assert_stats_close(cpu.delta_stats(b, t, db, dt), ref.delta_stats(b, t, db, dt))


@pytest.mark.parametrize("db,dt", [("BF16", "BF16"), ("F32", "BF16"), ("F16", "F16"), ("F64", "F64"),
                                   ("F8_E4M3", "F8_E4M3"), ("I8", "I8")])
def test_decode_delta_and_sigma_match_reference(db, dt):
    rng = np.random.default_rng(7)
    for n in (0, 1, cpu.CHUNK + 3):
        b, t = make_pair(rng, n, db, dt)
        got, want = np.empty(n, np.float32), np.empty(n, np.float32)
        bad, err2 = cpu.decode_delta_f32(b, t, db, dt, got)
        rbad, rerr2 = ref.decode_delta_f32(b, t, db, dt, want)
        np.testing.assert_array_equal(got, want)
        exact = ref.decode(t, dt) - ref.decode(b, db)
        fin = np.isfinite(exact)
        assert bad == rbad == int(np.count_nonzero(got[fin] != exact[fin]))
        e = got[fin].astype(np.float64) - exact[fin]
        np.testing.assert_allclose([err2, rerr2], float(np.sum(e * e)), rtol=1e-12, atol=0)
        assert cpu.decode_delta_f64(b, t, db, dt, np.empty(n)) == (0, 0.0)


def test_worked_example():
    """B = [1, 2, -0.5, 0], T = [1, 2.5, 0.5, -0] in F32, by hand."""
    b = np.array([1.0, 2.0, -0.5, 0.0], np.float32)
    t = np.array([1.0, 2.5, 0.5, -0.0], np.float32)
    s = cpu.delta_stats(b, t, "F32", "F32")
    assert s.tolist() == [4, 5.25, 7.5, 1.25, 5.75, 3, 2, 1.0, 0, 0, 1]
    f = ref.finalize(s)
    assert f["norm_delta"] == np.sqrt(1.25) and f["frac_changed"] == 0.75
    assert f["frac_beyond_rounding"] == 0.5 and f["sign_flips"] == 1


def test_signed_zero_and_nan_rules():
    nan_a = np.array([0x7FC0], np.uint16)          # bf16 quiet NaN
    nan_b = np.array([0x7FC1], np.uint16)          # another payload
    s = cpu.delta_stats(nan_a, nan_a, "BF16", "BF16")
    assert s[IDX["n_changed"]] == 0 and s[IDX["nonfinite_b"]] == 1 and s[IDX["nonfinite_t"]] == 1
    s = cpu.delta_stats(nan_a, nan_b, "BF16", "BF16")
    assert s[IDX["n_changed"]] == 1 and s[IDX["n_beyond"]] == 0     # bits differ, value (NaN) does not
    s = cpu.delta_stats(np.array([0x0000], np.uint16), np.array([0x8000], np.uint16), "BF16", "BF16")
    assert s[IDX["n_changed"]] == 1 and s[IDX["n_beyond"]] == 0 and s[IDX["sign_flips"]] == 0
    s = cpu.delta_stats(np.array([-0.0], np.float32), to_storage(np.array([0.0]), "BF16"), "F32", "BF16")
    assert s[IDX["n_changed"]] == 0                                   # by value across dtypes
    s = cpu.delta_stats(np.array([1.0], np.float32), np.array([np.nan], np.float32), "F32", "F32")
    assert s[IDX["n_beyond"]] == 1 and s[IDX["sum_b2"]] == 0 and s[IDX["nonfinite_t"]] == 1
    s = cpu.delta_stats(np.array([np.inf], np.float32), np.array([np.inf], np.float32), "F32", "F32")
    assert s[IDX["n_changed"]] == 0 and s[IDX["n_beyond"]] == 0


def test_cast_is_rounding_and_one_ulp_is_not(rng):
    x = (rng.standard_normal(cpu.CHUNK * 2 + 17) * 0.02).astype(np.float32)
    x[:3] = [0.0, 1e-40, -3e38]                     # zero, fp32 subnormal, huge
    bits = to_storage(x, "BF16")
    assert cpu.delta_stats(x, bits, "F32", "BF16")[IDX["n_beyond"]] == 0
    assert cpu.delta_stats(bits, x, "BF16", "F32")[IDX["n_beyond"]] == 0
    x16 = np.clip(x, -6e4, 6e4)
    assert cpu.delta_stats(x16, x16.astype(np.float16), "F32", "F16")[IDX["n_beyond"]] == 0
    bumped = bits + np.uint16(1)                    # one bf16 ulp up (no sign or exponent wrap here)
    ok = (bits & 0x7F80) != 0x7F80
    s = cpu.delta_stats(bits[ok], bumped[ok], "BF16", "BF16")
    assert s[IDX["n_beyond"]] == ok.sum() == s[IDX["n_changed"]]
    # a one-ulp bf16 step seen against an fp32 base is beyond rounding too
    s = cpu.delta_stats(x, bumped, "F32", "BF16")
    assert s[IDX["n_beyond"]] >= ok.sum() - 3


def test_integers_count_any_change():
    b = np.array([0, 5, -7, 2**40], np.int64)
    t = np.array([0, 6, -7, 2**40 + 1], np.int64)
    s = cpu.delta_stats(b, t, "I64", "I64")
    assert s[IDX["n_changed"]] == 2 == s[IDX["n_beyond"]]
    s = cpu.delta_stats(np.array([True, False]), np.array([True, True]), "BOOL", "BOOL")
    assert s[IDX["n_beyond"]] == 1 and s[IDX["sum_d2"]] == 1


def test_inputs_in_any_layout(rng):
    b, t = make_pair(rng, 3000, "BF16", "BF16")
    want = cpu.delta_stats(b, t, "BF16", "BF16")
    ro_b, ro_t = b.copy(), t.copy()
    ro_b.setflags(write=False)
    ro_t.setflags(write=False)
    np.testing.assert_array_equal(cpu.delta_stats(ro_b, ro_t, "BF16", "BF16"), want)
    np.testing.assert_array_equal(cpu.delta_stats(b.reshape(30, 100), t.reshape(30, 100), "BF16", "BF16"), want)
    wide_b, wide_t = np.repeat(b, 2)[::2], np.repeat(t, 2)[::2]          # non-contiguous views
    assert not wide_b.flags.c_contiguous
    np.testing.assert_array_equal(cpu.delta_stats(wide_b, wide_t, "BF16", "BF16"), want)
    s0 = cpu.delta_stats(np.array(1.5, np.float32), np.array(2.5, np.float32), "F32", "F32")   # 0-d
    assert s0[IDX["count"]] == 1 and s0[IDX["sum_d2"]] == 1.0
    f16 = np.array([1.0, 2.0], np.float16)
    np.testing.assert_array_equal(cpu.delta_stats(f16, f16.view(np.uint16), "F16", "F16"),
                                  ref.delta_stats(f16, f16, "F16", "F16"))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="elements"):
        cpu.delta_stats(np.zeros(3, np.float32), np.zeros(4, np.float32), "F32", "F32")
    with pytest.raises(ValueError, match="bytes_stats"):
        cpu.delta_stats(np.zeros(3, np.uint8), np.zeros(3, np.uint8), "F4", "F4")
    with pytest.raises(ValueError, match="cannot hold"):
        cpu.delta_stats(np.zeros(3, np.float32), np.zeros(3, np.float32), "BF16", "BF16")
    with pytest.raises(ValueError):
        cpu.set_threads(0)


def test_bytes_stats(rng):
    c = (rng.standard_normal(10) + 1j * rng.standard_normal(10)).astype(np.complex64)
    d = c.copy()
    d[3] += 1
    for mod in (cpu, ref):
        s = mod.bytes_stats(c, d)
        assert s[IDX["count"]] == 10 and s[IDX["n_changed"]] == 1 == s[IDX["n_beyond"]]
        assert s[IDX["sum_b2"]] == 0
    packed = rng.integers(0, 256, cpu.CHUNK + 5, dtype=np.uint8)
    other = packed.copy()
    other[[0, 7, cpu.CHUNK + 4]] ^= 1
    np.testing.assert_array_equal(cpu.bytes_stats(packed, other), ref.bytes_stats(packed, other))
    assert cpu.bytes_stats(packed, other)[IDX["n_changed"]] == 3


def test_combine_and_finalize():
    a = np.array([2, 1.0, 4.0, 1.0, 2.0, 1, 1, 1.0, 0, 1, 0])
    b = np.array([2, 3.0, 0.0, 3.0, 0.0, 2, 0, 3.0, 1, 0, 1])
    c = cpu.combine(a, b)
    assert c.tolist() == [4, 4.0, 4.0, 4.0, 2.0, 3, 1, 3.0, 1, 1, 1]
    f = ref.finalize(c)
    assert f["norm_base"] == 2.0 and f["cosine"] == 0.5 and f["nonfinite"] == 2
    empty = ref.finalize(np.zeros(ref.NSTATS))
    assert empty["rel_change"] is None and empty["cosine"] is None and empty["frac_changed"] is None
    zero_base = ref.finalize(np.array([3, 0.0, 1.0, 1.0, 0.0, 1, 1, 1.0, 0, 0, 0]))
    assert zero_base["rel_change"] is None and zero_base["cosine"] is None
    assert zero_base["frac_changed"] == pytest.approx(1 / 3)


def test_specials_cover_the_named_values():
    sp = ref.decode(specials("BF16"), "BF16")
    assert np.isnan(sp).any() and np.isinf(sp).any() and (np.signbit(sp) & (sp == 0)).any()


def test_threads_bitwise_equal(rng):
    b, t = make_pair(rng, 5 * cpu.CHUNK + 11, "BF16", "F32")
    try:
        cpu.set_threads(1)
        one = cpu.delta_stats(b, t, "BF16", "F32")
        cpu.set_threads(None)
        many = cpu.delta_stats(b, t, "BF16", "F32")
    finally:
        cpu.set_threads(None)
    assert one.tobytes() == many.tobytes()


finite_f32 = st.floats(-2.0 ** 100, 2.0 ** 100, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_f32, max_size=300), st.lists(finite_f32, max_size=300),
       st.sampled_from(["BF16", "F32", "F16", "F8_E4M3"]))
def test_properties(xs, ys, dtype):
    n = min(len(xs), len(ys))
    with np.errstate(over="ignore"):
        b = to_storage(np.array(xs[:n], np.float32), dtype)
        t = to_storage(np.array(ys[:n], np.float32), dtype)
    same = cpu.delta_stats(b, b, dtype, dtype)
    assert same[IDX["n_changed"]] == same[IDX["n_beyond"]] == same[IDX["sum_d2"]] == 0
    assert same[IDX["sign_flips"]] == 0 and same[IDX["sum_b2"]] == same[IDX["sum_t2"]]
    fwd = cpu.delta_stats(b, t, dtype, dtype)
    back = cpu.delta_stats(t, b, dtype, dtype)
    assert fwd[IDX["sum_d2"]] == back[IDX["sum_d2"]] and fwd[IDX["n_changed"]] == back[IDX["n_changed"]]
    assert ref.finalize(fwd)["norm_delta"] == ref.finalize(back)["norm_delta"]
    assert_stats_close(fwd, ref.delta_stats(b, t, dtype, dtype))


def _lane_order_sums(b: np.ndarray, t: np.ndarray) -> list[float]:
    """The documented summation order, in numpy: per sub-block, 16 lanes then halves folded."""
    e = t - b
    out = []
    for v in (b * b, t * t, e * e, b * t):
        total = 0.0
        for s0 in range(0, v.size, cpu.SUB):
            blk = v[s0:s0 + cpu.SUB]
            blk = np.concatenate([blk, np.zeros(-blk.size % cpu.LANES)]).reshape(-1, cpu.LANES)
            lanes = np.zeros(cpu.LANES)
            for row in blk:              # each lane adds in index order
                lanes = lanes + row
            while lanes.size > 1:        # lane j += lane j + 8, then + 4, + 2, + 1
                lanes = lanes[:lanes.size // 2] + lanes[lanes.size // 2:]
            total += lanes[0]
        out.append(total)
    return out


@pytest.mark.parametrize("db,dt,n", [("BF16", "BF16", 3 * cpu.SUB), ("F32", "BF16", 2 * cpu.SUB + 37),
                                     ("F16", "F16", cpu.SUB + 5), ("F64", "F64", 100)])
def test_sums_follow_the_documented_order_bitwise(rng, db, dt, n):
    """Raw-bits fast path and decoded scratch path both sum in the documented lane order."""
    x = rng.standard_normal(n) * 0.02
    y = x + rng.standard_normal(n) * 0.001
    b, t = to_storage(x, db), to_storage(y, dt)
    got = cpu.delta_stats(b, t, db, dt)
    want = _lane_order_sums(ref.decode(b, db), ref.decode(t, dt))
    assert [got[IDX[k]] for k in ("sum_b2", "sum_t2", "sum_d2", "dot")] == want
    np.testing.assert_array_equal(got[[IDX["n_changed"], IDX["n_beyond"], IDX["max_abs"], IDX["sign_flips"]]],
                                  ref.delta_stats(b, t, db, dt)[[IDX["n_changed"], IDX["n_beyond"],
                                                                 IDX["max_abs"], IDX["sign_flips"]]])


def test_nonfinite_in_a_whole_raw_sub_block(rng):
    """A NaN/Inf inside a full bf16 or f32 sub-block leaves the fast path for the masked one."""
    x = (rng.standard_normal(2 * cpu.SUB) * 0.02).astype(np.float32)
    y = x.copy()
    y[[3, 700]] = [np.nan, -np.inf]
    x[[5, 700, 1500]] = [np.inf, np.inf, -0.0]
    y[[9, 1500]] = [x[9] * 1.5, 0.0]
    for db, dt in (("BF16", "BF16"), ("F32", "F32"), ("F32", "BF16")):
        b, t = to_storage(x, db), to_storage(y, dt)
        assert_stats_close(cpu.delta_stats(b, t, db, dt), ref.delta_stats(b, t, db, dt))


def test_a_float32_delta_copy_reports_what_it_rounded():
    bf = np.array([1.0, 3.0, -2.5, 1e-30, 7.0], np.float32)
    b16 = (bf.view(np.uint32) >> 16).astype(np.uint16)           # exact bf16 values
    t16 = b16.copy()
    t16[0] += 1                                                   # a neighbour: the difference fits float32
    got = np.empty(5, np.float32)
    assert cpu.decode_delta_f32(b16, t16, "BF16", "BF16", got) == (0, 0.0)
    t16[4] = (np.array([2.0 ** -30], np.float32).view(np.uint32) >> 16).astype(np.uint16)[0]   # 2^-30 - 7: 33 bits
    bad, err2 = cpu.decode_delta_f32(b16, t16, "BF16", "BF16", got)
    exact = 2.0 ** -30 - 7.0
    assert bad == 1 and err2 == (float(np.float32(exact)) - exact) ** 2 > 0
    b64 = np.array([0.1, 2.0], np.float64)
    assert cpu.decode_delta_f32(b64, np.array([0.3, 2.5]), "F64", "F64", np.empty(2, np.float32))[0] == 1


@pytest.mark.parametrize("db,dt", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_delta_stats_many_is_delta_stats_of_each_pair_bitwise(db, dt):
    """The batched small-pair kernel gives every pair the bits of its own ``delta_stats`` call
    (and the reference twin agrees with the reference), at lengths around the sub-block."""
    rng = np.random.default_rng(zlib.crc32(f"many-{db}-{dt}".encode()))
    lengths = [0, 1, 3, cpu.SUB - 1, cpu.SUB, cpu.SUB + 1, 7, 2 * cpu.SUB + 5, cpu.CHUNK, 0, 2]
    pairs = [make_pair(rng, n, db, dt) for n in lengths]
    b = np.concatenate([p[0] for p in pairs])
    t = np.concatenate([p[1] for p in pairs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    got = cpu.delta_stats_many(b, t, offsets, db, dt)
    want = ref.delta_stats_many(b, t, offsets, db, dt)
    assert got.shape == want.shape == (len(lengths), ref.NSTATS)
    for i, (pb, pt) in enumerate(pairs):
        np.testing.assert_array_equal(got[i], cpu.delta_stats(pb, pt, db, dt))
        assert_stats_close(got[i], want[i])


def test_delta_stats_many_rejects_bad_offsets():
    b = np.zeros(10, np.float32)
    for offsets in ([0, 5], [1, 10], [0, 6, 4, 10], [], [0, cpu.CHUNK + 1]):
        with pytest.raises(ValueError):
            cpu.delta_stats_many(np.zeros(max(10, cpu.CHUNK + 1), np.float32)
                                 if offsets == [0, cpu.CHUNK + 1] else b,
                                 np.zeros(max(10, cpu.CHUNK + 1), np.float32)
                                 if offsets == [0, cpu.CHUNK + 1] else b, np.array(offsets), "F32", "F32")
    with pytest.raises(ValueError):
        cpu.delta_stats_many(b, np.zeros(9, np.float32), np.array([0, 10]), "F32", "F32")


def test_finalize_many_is_finalize_of_each_row():
    """Column-wise finalize: the same values and types as one ``finalize`` per row, on rows with
    zero counts, zero and non-finite norms, cosines past +-1, NaN and norms whose product underflows."""
    rng = np.random.default_rng(11)
    rows = np.abs(rng.standard_normal((400, ref.NSTATS))) * np.exp2(rng.integers(-600, 600, (400, ref.NSTATS)))
    rows[:, ref.IDX["dot"]] *= rng.choice([-1.0, 1.0, 1.5, -3.0], 400)
    for k in ("count", "n_changed", "n_beyond", "nonfinite_b", "nonfinite_t", "sign_flips"):
        rows[:, ref.IDX[k]] = rng.integers(0, 50, 400)
    specials = [0.0, np.inf, np.nan, 1e-320, 1e300]
    floats = [ref.IDX[k] for k in ("sum_b2", "sum_t2", "sum_d2", "dot", "max_abs")]
    for i in range(200):
        rows[i, floats[i % len(floats)]] = specials[(i // len(floats)) % len(specials)]
    rows[7, :] = 0.0
    rows[8, ref.IDX["sum_b2"]] = rows[8, ref.IDX["sum_t2"]] = 1e-320       # nb * nt underflows to 0
    got = ref.finalize_many(rows)
    want = [ref.finalize(r) for r in rows]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for k in w:
            assert type(g[k]) is type(w[k]), k
            assert g[k] == w[k] or (g[k] != g[k] and w[k] != w[k]), (k, g[k], w[k])
    assert ref.finalize_many(np.zeros((0, ref.NSTATS))) == []


NOISE_DTYPES = ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"]


def _noise_case(rng, dtype, m, n):
    from weightdiff.measure.rank import _UINT, _variance_table

    x = rng.normal(0, 0.05, m * n) * np.exp(rng.normal(0, 3, m * n))    # many exponents
    raw = to_storage(x, dtype).reshape(-1)
    bits = raw.view(_UINT[raw.dtype.itemsize]).copy()
    k = rng.choice(m * n, size=min(8, m * n), replace=False)
    if dtype in ("BF16", "F16", "F32", "F64"):                # signed zeros, NaN, inf, subnormals, negatives
        specials_ = to_storage(np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-41, -1e-310, -3.5]),
                               dtype).reshape(-1).view(bits.dtype)
        bits[k] = specials_[:k.size]
    return bits, *_variance_table(dtype)


@pytest.mark.parametrize("dtype", NOISE_DTYPES)
def test_noise_scatter_matches_reference_bitwise_in_any_windows(rng, dtype):
    m, n = 37, 53
    bits, table, shift, mask = _noise_case(rng, dtype, m, n)
    want_r, want_c = np.zeros(m), np.zeros(n)
    ref.noise_scatter(bits, shift, mask, table, 0, n, want_r, want_c)
    # the plain definition: each element's variance added to its row and its column
    v = table[(bits.astype(np.uint64) >> np.uint64(shift)) & np.uint64(mask)].reshape(m, n)
    np.testing.assert_allclose(want_r, v.sum(1), rtol=1e-13)
    np.testing.assert_allclose(want_c, v.sum(0), rtol=1e-13)
    assert np.isfinite(want_r).all() and (want_r > 0).all()
    for cuts in ([0, m * n], [0, 1, 52, 53, 54, 500, m * n - 1, m * n], list(range(0, m * n, 97)) + [m * n]):
        got_r, got_c = np.zeros(m), np.zeros(n)
        for a, b in zip(cuts, cuts[1:]):                  # windows that start and end anywhere in a row
            cpu.noise_scatter(bits[a:b], shift, mask, table, a, n, got_r, got_c)
        np.testing.assert_array_equal(got_r, want_r)
        np.testing.assert_array_equal(got_c, want_c)


def test_noise_scatter_adds_to_what_is_there_and_checks_its_arguments(rng):
    bits, table, shift, mask = _noise_case(rng, "BF16", 4, 6)
    r, c = np.full(4, 1.0), np.full(6, 2.0)
    r0, c0 = np.zeros(4), np.zeros(6)
    cpu.noise_scatter(bits, shift, mask, table, 0, 6, r, c)
    cpu.noise_scatter(bits, shift, mask, table, 0, 6, r0, c0)
    np.testing.assert_allclose(r, r0 + 1.0, rtol=1e-15)
    np.testing.assert_allclose(c, c0 + 2.0, rtol=1e-15)
    cpu.noise_scatter(bits[:0], shift, mask, table, 24, 6, r, c)      # an empty window is nothing
    with pytest.raises(ValueError, match="do not fit"):
        cpu.noise_scatter(bits, shift, mask, table, 1, 6, r, c)        # one element past the last row
    with pytest.raises(ValueError, match="unsigned"):
        cpu.noise_scatter(bits.view(np.int16), shift, mask, table, 0, 6, r, c)
    with pytest.raises(ValueError, match="float64"):
        cpu.noise_scatter(bits, shift, mask, table, 0, 6, r.astype(np.float32), c)
    with pytest.raises(ValueError, match="do not index"):           # a mask past the table: refused, not read
        cpu.noise_scatter(bits, shift, mask, table[:100], 0, 6, r, c)
    with pytest.raises(ValueError, match="do not index"):
        cpu.noise_scatter(bits, 16, mask, table, 0, 6, r, c)


# ---------------------------------------------------------------- cast chains (recast_counts)

def _recast_case(rng, db, dt, via, n=70_000):
    """A base window with every hard magnitude (fp16 subnormals, the fp16 and bf16 range edges,
    ties) and a tuned window cast from it through ``via``, with a few planted changes and
    saturated values."""
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 6, n)
    x[:24] = [65519, 65520, -65520, 65504, 1e-8, 6e-8, 2.0 ** -25, 3 * 2.0 ** -26, np.inf, -np.inf, np.nan,
              -0.0, 0.0, 1e5, -7e4, 3e38, -3.4e38, 1e-40, 2.0 ** -149, -2.0 ** -150, 1 + 2.0 ** -11,
              1 + 2.0 ** -8, 1 + 3 * 2.0 ** -9, 1e39]
    b = to_storage(x, db)
    bb = ref.decode(b, db)
    t = ref.round_to(bb if via is None else ref.round_to(bb, via), dt)
    t[100:140] *= 1.01                                  # changed: no cast explains them
    if dt != "F64":
        t[140:142] = [ref.max_finite(dt), -ref.max_finite(dt)]   # saturated, where the base is beyond range
    return b, to_storage(t, dt)


@pytest.mark.parametrize("db,dt", [(a, c) for a in ref.RECAST_DTYPES for c in ref.RECAST_DTYPES if a != c])
def test_recast_counts_matches_reference(rng, db, dt):
    # one chunk: the chunk function alone, which the parallel driver inlines (its bits and thread counts are
    # test_recast_counts_threads_and_windows_add's); a parallel compile for each signature is seconds in a fresh clone
    for via in ref.RECAST_VIAS:
        if via in (db, dt):
            continue
        b, t = (x[:cpu.CHUNK] for x in _recast_case(rng, db, dt, via))
        want = ref.recast_counts(b, t, db, dt)
        got = cpu.recast_counts(b, t, db, dt)
        assert np.array_equal(got, want), (db, dt, via, got, want)
        row = list(ref.RECAST_VIAS).index(via)
        assert want[row, 0] <= 40 + 2                   # the planted changes (and saturations of in-range values)
        assert want[:, 0].min() == want[row, 0]


def test_round_to_is_the_cast_numpy_and_torch_make(rng):
    x = rng.standard_normal(200_000) * 10.0 ** rng.integers(-12, 8, 200_000)
    x[:8] = [65519, 65520, -65520, 2.0 ** -25, 3 * 2.0 ** -26, np.inf, np.nan, -0.0]
    x32 = x.astype(np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        assert np.array_equal(ref.round_to(x32, "F16"), x32.astype(np.float16).astype(np.float64), equal_nan=True)
        assert np.array_equal(ref.round_to(x, "F32"), x.astype(np.float32).astype(np.float64), equal_nan=True)
    torch = pytest.importorskip("torch")
    got = ref.round_to(x32, "BF16")
    want = torch.from_numpy(x32.astype(np.float32)).to(torch.bfloat16).to(torch.float64).numpy()
    assert np.array_equal(got, want, equal_nan=True)
    # torch casts float64 to bfloat16 / float16 through float32: the chain via F32
    for name, td in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        want = torch.from_numpy(x).to(td).to(torch.float64).numpy()
        assert np.array_equal(ref.round_to(ref.round_to(x, "F32"), name), want, equal_nan=True)


def test_recast_counts_threads_and_windows_add(rng):
    b, t = _recast_case(rng, "F32", "BF16", "F16", n=300_000)
    whole = cpu.recast_counts(b, t, "F32", "BF16")
    parts = sum(cpu.recast_counts(b[i:i + 70_001], t[i:i + 70_001], "F32", "BF16") for i in range(0, b.size, 70_001))
    assert np.array_equal(whole, parts)
    old = cpu.get_threads()
    try:
        cpu.set_threads(1)
        assert np.array_equal(cpu.recast_counts(b, t, "F32", "BF16"), whole)
    finally:
        cpu.set_threads(old)
    with pytest.raises(ValueError):
        cpu.recast_counts(b, t, "F32", "F8_E4M3")
    with pytest.raises(ValueError):
        ref.recast_counts(b[:5], t[:4], "F32", "BF16")
    for fn in (cpu.recast_counts, ref.recast_counts):              # empty windows count nothing
        assert fn(b[:0], t[:0], "F32", "BF16").tolist() == [[0.0, 0.0, 0.0]] * 4


@pytest.mark.parametrize("n", [0, 1, 300, cpu.CHUNK])
def test_one_chunk_skips_the_thread_pool_with_the_drivers_bits(rng, monkeypatch, n):
    """A window of one chunk has nothing to spread over threads, and a parallel region's launch waits for every
    worker to be scheduled: 4 ms a call beside a busy neighbour, 72 s for the deltas of 16,667 small FP8 experts.
    The float32 delta copy (its bits the parallel driver's, called here directly), the cast-chain counts and the
    byte comparison (the reference's integers) of one chunk run without it."""
    cases = []
    for db, dt in (("BF16", "BF16"), ("F8_E4M3", "BF16"), ("F64", "F32")):
        b, t = make_pair(rng, n, db, dt)
        bb, tt = cpu._bits(b, db), cpu._bits(t, dt)
        want = np.empty(n, np.float32)
        got = cpu._delta_driver(bb, tt, ref.DTYPES[db].code, ref.DTYPES[dt].code, cpu._F16_TABLE, cpu._FP8, want)
        cases.append((b, t, db, dt, want, (int(got[0]), float(got[1]))))
    rb, rt = _recast_case(rng, "F32", "BF16", "F16", n=max(n, 300))
    rb, rt = rb[:n], rt[:n]
    want_recast = ref.recast_counts(rb, rt, "F32", "BF16")          # integer counts: the reference's exactly
    ub = rng.integers(0, 256, n, dtype=np.uint8)
    ut = ub.copy()
    ut[::7] ^= 1
    want_bytes = ref.bytes_stats(ub, ut)

    def refused(*a):
        raise AssertionError("a parallel driver launched for one chunk")
    for name in ("_delta_driver", "_recast_driver", "_count_diff", "_stats_driver"):
        monkeypatch.setattr(cpu, name, refused)
    for b, t, db, dt, want, counts in cases:
        out = np.empty(n, np.float32)
        assert cpu.decode_delta_f32(b, t, db, dt, out) == counts
        assert out.tobytes() == want.tobytes()
    assert np.array_equal(cpu.recast_counts(rb, rt, "F32", "BF16"), want_recast)
    assert cpu.bytes_stats(ub, ut).tobytes() == want_bytes.tobytes()
    monkeypatch.undo()
    if n:                 # and the drivers themselves still spread more than one chunk
        big_b, big_t = make_pair(rng, 2 * cpu.CHUNK + 5, "BF16", "BF16")
        a, c = np.empty(big_b.size, np.float32), np.empty(big_b.size, np.float32)
        (bad, err2), (rbad, rerr2) = (cpu.decode_delta_f32(big_b, big_t, "BF16", "BF16", a),
                                      ref.decode_delta_f32(big_b, big_t, "BF16", "BF16", c))
        assert a.tobytes() == c.tobytes() and bad == rbad and err2 == pytest.approx(rerr2, rel=1e-12, abs=0)


def test_the_drivers_see_read_only_inputs_whatever_they_are_given(rng):
    """numba compiles a kernel apart for each read-only/writable mix of its arguments, each ~100 MB of LLVM memory
    kept by the process and seconds on a first run (a 70B-width run compiled one while its Gram matrix was alive:
    1,255 MB instead of 960). Windows come mapped (read-only) or computed (writable): the drivers see them read-only."""
    n = 2 * cpu.CHUNK + 3
    b, t = make_pair(rng, n, "BF16", "BF16")
    for wb, wt in ((b, t), (b.copy(), t.copy())):
        wb.flags.writeable = wt.flags.writeable = wb is b        # mapped-like, then computed-like
        cpu.delta_stats(wb, wt, "BF16", "BF16")
        cpu.decode_delta_f32(wb, wt, "BF16", "BF16", np.empty(n, np.float32))
        cpu.bytes_stats(wb.view(np.uint8), wt.view(np.uint8))
    for driver in (cpu._stats_driver, cpu._delta_driver, cpu._count_diff):
        assert driver.signatures and not any(sig[0].mutable or sig[1].mutable for sig in driver.signatures), driver


# ---------------------------------------------------------------- two roundings of one original (twin_counts)

def _twin_case(rng, dtype, via, fine_dtype=None, n=60_000):
    """A fine window (the original rounded to ``fine_dtype``) and a coarse one (rounded through ``via`` to
    ``dtype``) over every hard magnitude, with planted steps of ``via`` on the coarse side, values past both
    ranges, NaN and signed zeros."""
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 6, n)
    x[:20] = [65519, 65520, -65520, 65504, 1e-8, 6e-8, 2.0 ** -25, 3 * 2.0 ** -26, np.inf, -np.inf, np.nan,
              -0.0, 0.0, 1e5, -7e4, 1 - 2.0 ** -9, 1 - 2.0 ** -10, 0.99755859375, 1e-40, 3e38]
    fd = fine_dtype or dtype
    fine = ref.round_to(x, fd)
    coarse = ref.round_to(ref.round_to(x, via), dtype)
    step = 2 * ref.half_ulp(np.abs(np.nan_to_num(coarse[100:140], posinf=0, neginf=0)), via)
    coarse[100:140] += np.where(rng.random(40) < 0.5, step, -step)
    coarse = ref.round_to(coarse, dtype)
    return to_storage(fine, fd), to_storage(coarse, dtype), fd


@pytest.mark.parametrize("dtype,via,fine", [("F16", "BF16", None), ("F32", "BF16", None), ("F32", "F16", None),
                                            ("F32", "BF16", "F16"), ("F32", "F16", "F64")])
def test_twin_counts_matches_reference(rng, dtype, via, fine):
    # one chunk (the chunk function alone) but for one pair, which also runs the parallel driver: each new argument
    # signature of the driver is a parallel compile of its own, seconds in a fresh clone
    f, c, fd = _twin_case(rng, dtype, via, fine, n=70_000 if (dtype, fine) == ("F16", None) else 60_000)
    keys = [((), (via,)), ((via,), ())]
    for b, t, db, dt in ((f, c, fd, dtype), (c, f, dtype, fd)):
        want = ref.twin_counts(b, t, db, dt, keys)
        got = cpu.twin_counts(b, t, db, dt, keys)
        assert np.array_equal(got, want), (dtype, via, fine, got, want)
    # the fine side as base and the coarse as tuned: only the planted steps (at most 40) and few edge values
    # stay unexplained, read as that pair; the other reading explains few
    want = ref.twin_counts(f, c, fd, dtype, keys)
    assert want[0, 0] <= 40 + 4 and want[1, 0] > 1000, want
    # windows add, on one thread and many
    half = len(ref.decode(f, fd)) // 2
    split = ref.twin_counts(f[:half], c[:half], fd, dtype, keys) + ref.twin_counts(f[half:], c[half:], fd, dtype, keys)
    assert np.array_equal(split, want)


@pytest.mark.parametrize("db,dt", [("F32", "F32"), ("BF16", "BF16"), ("F16", "F16"), ("BF16", "F32")])
def test_twin_counts_of_every_pair_of_chains_matches_reference(rng, db, dt):
    """Every pair of chains ``twin_test`` tries (two roundings on a side, both sides rounded, an fp16 converter's
    clamp), on windows rounded through the longest of them with planted steps: the kernel's counts are the
    reference's, and the chains that made the windows explain all but the planted steps. One chunk (no driver)."""
    from weightdiff.measure.recast import twin_chains

    keys = twin_chains(db, dt)
    x = rng.standard_normal(30_000) * 10.0 ** rng.integers(-12, 6, 30_000)
    x[:12] = [65519, 65520, -65520, 1e-8, 6e-8, 2.0 ** -25, np.inf, -np.inf, np.nan, -0.0, 1e5, 3e38]
    for kb, kt in (keys[-1], keys[len(keys) // 2]):
        sides = [ref.chain_apply(x, dtype, vias) for dtype, vias in ((db, kb), (dt, kt))]
        sides[1][100:130] = ref.round_to(sides[1][100:130] * (1 + 2.0 ** -6), dt)
        b, t = to_storage(sides[0], db), to_storage(sides[1], dt)
        want = ref.twin_counts(b, t, db, dt, keys)
        got = cpu.twin_counts(b, t, db, dt, keys)
        assert np.array_equal(got, want), (db, dt, kb, kt)
        assert want[keys.index((kb, kt)), 0] <= 30, want[keys.index((kb, kt))]
    for fn in (cpu.twin_counts, ref.twin_counts):                   # empty windows count nothing
        assert fn(b[:0], t[:0], db, dt, keys).tolist() == [[0.0, 0.0]] * len(keys)


def test_chain_apply_kernel_matches_reference(rng):
    """The scalar chain ``twin_counts``' fast accept runs (``cpu.chain_apply``) is ``reference.chain_apply`` bit for
    bit, signed zeros, NaN, infinities, ties, subnormals, overflow and the clamps' ends included, for every chain
    ``twin_test`` tries; and the reference is the roundings numpy makes (float32 then float16)."""
    from weightdiff.measure.recast import side_chains

    x = rng.standard_normal(40_000) * 10.0 ** rng.uniform(-12, 8, 40_000)
    edges = [65519, 65520, -65520, 65504, 6e-8, 2.0 ** -25, 3 * 2.0 ** -26, 1 - 2.0 ** -9, 3e38, 3.5e38, 1e-7, -5e-8,
             2e4, 1e4, -1e4, 0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -2.0 ** -149, 2.0 ** -150, 65504 + 16]
    lows = [v for c in ref.CLAMPS.values() for v in (c[0], np.nextafter(c[0], 0), np.nextafter(c[0], 1), c[1],
                                                    np.nextafter(c[1], 0), np.nextafter(c[1], np.inf))]
    x[:len(edges) + len(lows)] = edges + lows
    for dtype in ("F32", "BF16", "F16", "F64"):
        for vias in side_chains(dtype) + [("F32", "F16"), ("F16",)]:
            want, got = ref.chain_apply(x, dtype, vias), cpu.chain_apply(x, dtype, vias)
            assert np.array_equal(got.view(np.int64), want.view(np.int64)), (dtype, vias)
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32).astype(np.float64)
        assert np.array_equal(ref.chain_apply(x32, "F16"), x32.astype(np.float16).astype(np.float64), equal_nan=True)


@pytest.mark.parametrize("db,dt", [("F32", "F32"), ("F16", "F16"), ("BF16", "F32"), ("F16", "BF16"), ("F64", "F16")])
def test_twin_counts_fast_accept_is_exact_beside_the_roundings(rng, db, dt):
    """The kernel accepts an element at once where either stored value, taken as the original, goes through both
    chains to the two stored values; every other element gets the exact intervals. On pairs one step beside two
    roundings of one original (the next value up or down of either side, a bf16 tie moved, a sign flipped, past the
    ranges and beside the clamps' ends), for every pair of chains: the kernel's counts are the reference's."""
    from weightdiff.measure.recast import twin_chains

    keys = twin_chains(db, dt)
    n = 20_000
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-10, 5.5, n)
    x[:14] = [65519, 65520, 1e-7, 5.96e-8, 1e4 + 3, 2.0 ** -25, 1 - 2.0 ** -9, 1 + 3 * 2.0 ** -9, 3e38, -0.0,
              np.inf, 1e5, np.nan, -np.inf]
    for kb, kt in (keys[0], keys[len(keys) // 2], keys[-1]):
        b = ref.chain_apply(x, db, kb)
        t = ref.chain_apply(x, dt, kt)
        side = rng.integers(0, 2, n).astype(bool)
        way = np.where(rng.random(n) < 0.5, np.inf, -np.inf)
        pick = rng.random(n) < 0.4                                 # 40% moved by one stored step
        moved = ref.round_to(np.nextafter(np.where(side, b, t), way), db)
        b = np.where(pick & side, moved, b)
        t = np.where(pick & ~side, ref.round_to(np.nextafter(t, way), dt), t)
        flip = rng.random(n) < 0.01
        t = np.where(flip, -t, t)
        bb, tt = to_storage(b, db), to_storage(t, dt)
        want = ref.twin_counts(bb, tt, db, dt, keys)
        got = cpu.twin_counts(bb, tt, db, dt, keys)
        assert np.array_equal(got, want), (db, dt, kb, kt)
        assert 0 < want[:, 0].min() < n * 0.45                      # some explained, some not: both paths taken


@pytest.mark.parametrize("db,dt", [("F32", "BF16"), ("BF16", "F32"), ("F32", "F16"), ("F64", "BF16"), ("F16", "F32")])
def test_rounding_bound_is_taken_at_the_lesser_magnitude(db, dt):
    """A rounding moves a value by at most half the spacing below the larger of the two: a bf16 step down from a
    power of two (a norm gain 1.0 trained to 1 - 2^-8 in pure bf16) is beyond rounding, where the bound at |B| (the
    binade above) read it as rounding and the model cast_only; a value rounded up onto the power of two stays within.
    The SIMD path (whole sub-blocks of bf16/f32), the general loop and the reference agree."""
    coarse = "BF16" if "BF16" in (db, dt) else "F16"
    step = 2.0 ** -(DTYPE_MANT[coarse] + 1)                  # a step of the coarse dtype just below 1
    n = 2048
    b = np.ones(n)
    t = np.ones(n)
    t[:100] = 1 - step                                      # a whole step down: no rounding of 1.0
    t[100:200] = -1.0                                        # a sign flip
    b[200:300] = 1 - step / 4                                # rounded up onto 1.0: within
    b[300:400] = 2.0 + 4 * step
    t[300:400] = 2.0                                         # one step of the binade above 2, down onto it: beyond
    # (kept in range of both dtypes; the coarse dtype's values on the coarse side)
    if db == coarse:
        b, t = t, b
    bb, tt = to_storage(b, db), to_storage(t, dt)
    want = ref.delta_stats(bb, tt, db, dt)
    got = cpu.delta_stats(bb, tt, db, dt)
    assert got[IDX["n_beyond"]] == want[IDX["n_beyond"]] == 300, (got[IDX["n_beyond"]], want[IDX["n_beyond"]])


DTYPE_MANT = {"BF16": 7, "F16": 10}
