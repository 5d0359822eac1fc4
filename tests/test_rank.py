"""weightdiff.measure.rank: numerical rank that survives storage precision, adapters from factors, subspaces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weightdiff.measure import rank
from weightdiff.kernels import reference, spectral
from weightdiff.kernels.dtypes import decode
from weightdiff.records import dumps
from weightdiff.io.safetensors_write import to_storage

M, N = 512, 384


def low_rank(rng, m: int, n: int, r: int, norm: float) -> np.ndarray:
    """A rank-r update with a LoRA-like, unevenly spread spectrum, scaled to Frobenius ``norm``."""
    u = rng.standard_normal((m, r)) * np.geomspace(1.0, 0.3, r)
    upd = u @ rng.standard_normal((r, n))
    return upd * (norm / np.linalg.norm(upd))


def merged_pair(rng, dtype: str, r: int = 8, share: float = 0.02, m: int = M, n: int = N):
    """(base_raw, tuned_raw, norm_delta_sq): base ~ N(0, 0.02) stored in ``dtype``, tuned = the base
    plus a rank-r update of ``share`` of its norm, merged in float32 and saved in ``dtype``."""
    w = rng.normal(0.0, 0.02, (m, n)).astype(np.float32)
    base = to_storage(w, dtype)
    wb = decode(base, dtype)
    tuned = to_storage((wb + low_rank(rng, m, n, r, share * np.linalg.norm(wb))).astype(np.float32), dtype)
    d = decode(tuned, dtype) - wb
    return base, tuned, float(np.sum(d * d))


EXACT, RANDOMIZED = 4096, 0          # exact_max values forcing each method


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("exact_max", [EXACT, RANDOMIZED])
def test_rank8_update_saved_in_16_bits_reads_8(rng, dtype, exact_max):
    base, tuned, nd2 = merged_pair(rng, dtype)
    rec = rank.analyze_delta(base, tuned, dtype, dtype, (M, N), nd2, exact_max=exact_max)
    assert rec.method == ("exact" if exact_max else "randomized")
    assert rec.numerical_rank == 8
    assert rec.energy_rank_99 <= 8 and rec.stable_rank < 8
    assert rec.spectrum[7] > 1.5 * rec.noise_floor > rec.spectrum[8]
    assert rec.energy_captured == pytest.approx(1.0, abs=1e-2)
    assert "energy_rank_99" not in rec.bounds and "numerical_rank" not in rec.bounds
    # rounding noise spreads thin energy everywhere: effective rank far above 8 (DESIGN.md)
    assert rec.effective_rank > (20 if dtype == "BF16" else 9)
    assert rec.exact == (exact_max == EXACT)


@pytest.mark.parametrize("share", [0.01, 0.05])
def test_rank8_reads_8_at_both_ends_of_the_realistic_range(rng, share):
    base, tuned, nd2 = merged_pair(rng, "BF16", share=share)
    assert rank.analyze_delta(base, tuned, "BF16", "BF16", (M, N), nd2).numerical_rank == 8


def test_untouched_matrix_reads_zero(rng):
    base, _, _ = merged_pair(rng, "BF16")
    rec = rank.analyze_delta(base, base.copy(), "BF16", "BF16", (M, N), 0.0)
    assert (rec.numerical_rank, rec.energy_rank_99, rec.stable_rank, rec.energy_captured) == (0, 0, None, None)
    assert rec.spectrum == [0.0] * 64 and rec.noise_floor > 0
    again = rank.analyze_delta(base, base.copy(), "BF16", "BF16", (M, N), float("nan"))
    assert again.numerical_rank == 0 and "recomputed" in again.extra["note"]


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("exact_max", [EXACT, RANDOMIZED])
def test_fp32_cast_without_update_reads_zero(rng, dtype, exact_max):
    w = rng.normal(0.0, 0.02, (M, N)).astype(np.float32)
    tuned = to_storage(w, dtype)
    d = decode(tuned, dtype) - w
    rec = rank.analyze_delta(w, tuned, "F32", dtype, (M, N), float(np.sum(d * d)), exact_max=exact_max)
    assert rec.numerical_rank == 0
    assert 0.5 * rec.noise_floor < rec.spectrum[0] < rec.noise_floor   # the floor is the noise's edge


def test_outlier_columns_do_not_read_as_rank(rng):
    """A few large input features (common in LLMs) make the rounding noise of those columns
    stand out; a floor from the overall RMS alone would call the cast rank 4."""
    w = rng.normal(0.0, 0.02, (M, N)).astype(np.float32)
    w[:, :4] *= 60
    tuned = to_storage(w, "BF16")
    d = decode(tuned, "BF16") - w
    rec = rank.analyze_delta(w, tuned, "F32", "BF16", (M, N), float(np.sum(d * d)))
    assert rec.numerical_rank == 0
    naive_floor = rec.extra["noise_rms"] * (math.sqrt(M) + math.sqrt(N))
    assert sum(s > 1.5 * naive_floor for s in rec.spectrum) == 4


def test_noise_floor_reduces_to_the_design_formula_for_even_magnitudes(rng):
    ref = pytest.importorskip("weightdiff.kernels.reference")
    base, tuned, _ = merged_pair(rng, "BF16")
    rows_b, cols_b = rank.noise_profile(base, "BF16", (M, N))
    rows_t, cols_t = rank.noise_profile(tuned, "BF16", (M, N))
    floor, rms = rank.noise_floor(rows_b + rows_t, cols_b + cols_t)
    sigma2 = ref.rounding_sigma2(base, "BF16") + ref.rounding_sigma2(tuned, "BF16")
    assert rms ** 2 * M * N == pytest.approx(sigma2, rel=1e-9)
    # the largest row/column sums sit a little above the mean ones, never below
    assert 1.0 <= floor / (rms * (math.sqrt(M) + math.sqrt(N))) < 1.25


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F8_E4M3", "F64"])
def test_variance_table_matches_ulp_per_element(rng, dtype):
    ref = pytest.importorskip("weightdiff.kernels.reference")
    x = to_storage(rng.normal(0, 0.05, (7, 9)), dtype)
    rows, cols = rank.noise_profile(x, dtype, (7, 9))
    v = (2 * ref.half_ulp(np.abs(decode(x, dtype)), dtype)) ** 2 / 12
    np.testing.assert_allclose(rows, v.reshape(7, 9).sum(1), rtol=1e-12)
    np.testing.assert_allclose(cols, v.reshape(7, 9).sum(0), rtol=1e-12)


def test_dense_update_reads_high_rank(rng):
    w = rng.normal(0.0, 0.02, (256, 192)).astype(np.float32)
    base = to_storage(w, "BF16")
    tuned = to_storage(w + rng.normal(0, 2e-3, w.shape).astype(np.float32), "BF16")
    d = decode(tuned, "BF16") - decode(base, "BF16")
    rec = rank.analyze_delta(base, tuned, "BF16", "BF16", (256, 192), float(np.sum(d * d)))
    assert rec.method == "exact" and rec.numerical_rank > 150 and rec.energy_rank_90 > 60


def test_conv_weights_are_read_as_rows_by_rest(rng):
    w = rng.normal(0, 0.05, (64, 32, 3, 3)).astype(np.float32)
    upd = low_rank(rng, 64, 288, 4, 0.03 * np.linalg.norm(w)).reshape(w.shape)
    base, tuned = to_storage(w, "BF16"), to_storage(w + upd.astype(np.float32), "BF16")
    d = decode(tuned, "BF16") - decode(base, "BF16")
    rec = rank.analyze_delta(base, tuned, "BF16", "BF16", w.shape, float(np.sum(d * d)))
    assert rec.shape_2d == (64, 288) and rec.numerical_rank == 4
    with pytest.raises(ValueError, match="2-D"):
        rank.analyze_delta(base[:5], tuned[:5], "BF16", "BF16", (5,), 1.0)


def test_nonfinite_values_count_as_zero(rng):
    base, tuned, _ = merged_pair(rng, "BF16")
    tuned = tuned.copy()
    tuned[3] = 0x7FC0                       # a NaN in bf16
    rec = rank.analyze_delta(base, tuned, "BF16", "BF16", (M, N), float("nan"))
    assert rec.numerical_rank == 8 and "non-finite" in rec.extra["note"]


def test_randomized_runs_are_bitwise_repeatable(rng):
    base, tuned, nd2 = merged_pair(rng, "BF16")
    a = rank.analyze_delta(base, tuned, "BF16", "BF16", (M, N), nd2, exact_max=0, seed=5)
    b = rank.analyze_delta(base.copy(), tuned.copy(), "BF16", "BF16", (M, N), nd2, exact_max=0, seed=5)
    assert dumps(a.to_dict()) == dumps(b.to_dict())


def test_randomized_partial_spectrum_is_flagged(rng):
    w = rng.normal(0.0, 0.02, (400, 300)).astype(np.float32)
    t = w + rng.normal(0, 1e-3, w.shape).astype(np.float32)
    nd2 = float(np.sum((t - w).astype(np.float64) ** 2))
    rec = rank.analyze_delta(w, t, "F32", "F32", w.shape, nd2, k=16, exact_max=0)
    exact = rank.analyze_delta(w, t, "F32", "F32", w.shape, nd2, k=16)
    assert not rec.exact and rec.estimated == ["stable_rank", "effective_rank"] and exact.exact and exact.bounds == {}
    for key in ("energy_rank_90", "energy_rank_99"):
        lo, hi = rec.bounds[key]
        assert getattr(rec, key) == lo <= getattr(exact, key) <= hi
    # noise-like delta: the top 16 hold little, and the randomized share runs low, never high
    assert 0.85 * exact.energy_captured < rec.energy_captured <= exact.energy_captured * (1 + 1e-6) < 0.2
    assert "lower bounds" in rec.extra["note_bounds"]


# --- adapters from factors ------------------------------------------------------------------

def _dense_fields(w: np.ndarray, t: np.ndarray) -> dict:
    d = t - w
    return {"norm_base": np.linalg.norm(w), "norm_tuned": np.linalg.norm(t), "norm_delta": np.linalg.norm(d),
            "cosine": float(np.sum(w * t) / (np.linalg.norm(w) * np.linalg.norm(t))),
            "max_abs_delta": np.abs(d).max(), "frac_changed": np.count_nonzero(d) / d.size}


@pytest.mark.parametrize("rslora", [False, True])
def test_factors_match_the_dense_delta(rng, monkeypatch, rslora):
    monkeypatch.setattr(rank, "_BLOCK", 1000)             # many row blocks
    m, n, r, alpha = 96, 80, 8, 16.0
    w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
    base = to_storage(w, "BF16")
    a, b = rng.normal(0, 0.1, (r, n)), rng.normal(0, 0.01, (m, r))
    b[:, 0] = 0.0
    b[5] = 0.0                                             # a row the adapter leaves alone
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    stats, rec = rank.analyze_factors(a, b, scale, base, "BF16", (m, n), k=64)
    wb = decode(base, "BF16").reshape(m, n)
    dense = scale * b @ a
    for key, want in _dense_fields(wb, wb + dense).items():
        assert stats[key] == pytest.approx(want, rel=1e-12, abs=1e-15), key
    assert 1 - stats["cosine"] > 0
    s_dense = np.linalg.svd(dense, compute_uv=False)
    np.testing.assert_allclose(rec.spectrum, s_dense[:len(rec.spectrum)], rtol=1e-10, atol=1e-14)
    assert len(rec.spectrum) == r and rec.method == "factors" and rec.exact
    assert rec.numerical_rank == r - 1                      # b's first column is zero: rank 7
    assert rec.energy_captured == pytest.approx(1.0, rel=1e-12)
    assert rec.stable_rank == pytest.approx(np.sum(s_dense ** 2) / s_dense[0] ** 2, rel=1e-10)
    assert rec.effective_rank == pytest.approx(spectral.effective_rank(s_dense[:r]), rel=1e-9)


def test_factors_and_merged_checkpoint_agree_on_rank(rng):
    m, n, r = 512, 384, 8
    w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
    base = to_storage(w, "BF16")
    wb = decode(base, "BF16").reshape(m, n)
    b = rng.standard_normal((m, r)) * np.geomspace(1, 0.3, r)
    a = rng.standard_normal((r, n))
    scale = 0.02 * np.linalg.norm(wb) / np.linalg.norm(b @ a)
    _, rec = rank.analyze_factors(a, b, scale, base, "BF16", (m, n))
    merged = to_storage((wb + scale * b @ a).astype(np.float32), "BF16")
    d = decode(merged, "BF16").reshape(m, n) - wb
    dense = rank.analyze_delta(base, merged, "BF16", "BF16", (m, n), float(np.sum(d * d)))
    assert rec.numerical_rank == dense.numerical_rank == r
    assert rec.noise_floor == pytest.approx(dense.noise_floor, rel=0.02)


def test_factors_without_a_base(rng):
    a, b = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    stats, rec = rank.analyze_factors(a, b, 0.5, None, "F32", (20, 30))
    assert stats["norm_base"] is None and stats["cosine"] is None
    assert stats["norm_delta"] == pytest.approx(np.linalg.norm(0.5 * b @ a), rel=1e-12)
    assert rec.noise_floor == 0.0 and rec.numerical_rank == 4 and "no base" in rec.extra["note"]


def _dora_merge(w, a, b, scale, magnitude):
    merged = w + scale * b @ a
    return (magnitude / np.linalg.norm(merged, axis=1))[:, None] * merged


def test_dora_stats_are_exact_and_the_spectrum_is_the_direction_term(rng, monkeypatch):
    monkeypatch.setattr(rank, "_BLOCK", 500)
    m, n, r = 40, 30, 4
    w = rng.normal(0, 0.05, (m, n)).astype(np.float32)
    a, b = rng.normal(0, 0.1, (r, n)), rng.normal(0, 0.1, (m, r))
    magnitude = np.linalg.norm(w, axis=1) * rng.uniform(0.9, 1.1, m)
    stats, rec = rank.analyze_factors(a, b, 2.0, w, "F32", (m, n), magnitude=magnitude)
    t = _dora_merge(w.astype(np.float64), a, b, 2.0, magnitude)
    for key, want in _dense_fields(w.astype(np.float64), t).items():
        assert stats[key] == pytest.approx(want, rel=1e-10), key
    merged = w + 2.0 * b @ a
    c = magnitude / np.linalg.norm(merged, axis=1)
    direction = c[:, None] * (2.0 * b @ a)
    np.testing.assert_allclose(rec.spectrum, np.linalg.svd(direction, compute_uv=False)[:r], rtol=1e-10)
    assert not rec.exact and rec.extra["dora"]["magnitude_term_norm"] == pytest.approx(
        np.linalg.norm((c - 1)[:, None] * w), rel=1e-10)


def test_dora_formula_matches_peft_merge():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.05)
    w = layer.base_layer.weight.detach().double().numpy().copy()
    a = layer.lora_A["default"].weight.detach().double().numpy()
    b = layer.lora_B["default"].weight.detach().double().numpy()
    mag = layer.lora_magnitude_vector["default"].weight.detach().double().numpy().reshape(-1)
    scale = layer.scaling["default"]
    merged = pm.merge_and_unload()[0].weight.detach().double().numpy()
    np.testing.assert_allclose(_dora_merge(w, a, b, scale, mag), merged, rtol=1e-5, atol=1e-6)
    stats, _ = rank.analyze_factors(a, b, scale, w.astype(np.float32), "F32", w.shape, magnitude=mag)
    assert stats["norm_delta"] == pytest.approx(np.linalg.norm(merged - w), rel=1e-4)


# --- weight subspaces (opt-in) ----------------------------------------------------------------

def test_subspace_identical_weights_overlap_exactly(rng):
    base, tuned, nd2 = merged_pair(rng, "BF16", m=256, n=192)
    same = rank.weight_subspace(base, base, "BF16", "BF16", (256, 192), k=16)
    assert same["subspace_overlap_left"] == pytest.approx(1.0, abs=1e-6)   # float32 vectors
    assert max(same["principal_angles_deg_right"]) < 1e-3
    rec = rank.analyze_delta(base, tuned, "BF16", "BF16", (256, 192), nd2, k=16, subspace=True)
    x = rec.extra
    assert 0.5 < x["subspace_overlap_left"] < 1.0 and x["subspace_k"] == 16
    wb = decode(base, "BF16").reshape(256, 192)
    assert x["effective_rank_base"] == pytest.approx(spectral.effective_rank(np.linalg.svd(wb, compute_uv=False)),
                                                      rel=1e-6)
    assert x["rank_method_base"] == "exact"


def test_subspace_of_unrelated_weights_barely_overlaps(rng):
    m, n, k = 300, 200, 16
    structured = lambda: (rng.standard_normal((m, 30)) @ rng.standard_normal((30, n))).astype(np.float32)
    x = rank.weight_subspace(structured(), structured(), "F32", "F32", (m, n), k=k, exact_max=0)
    assert x["subspace_overlap_left"] < 0.3 and x["subspace_overlap_right"] < 0.3
    assert x["rank_method_tuned"] == "randomized" and x["effective_rank_tuned"] > 20


@pytest.mark.parametrize("torch_backend", [False, True])
def test_randomized_lower_ends_are_certified_on_both_backends(rng, torch_backend):
    """A rank-8 update over bf16 rounding noise, read by the randomized path on numpy and on the torch
    backend (on the CPU): the caps prove the top k's energy ranks exact and the stable rank certified;
    on a noise-like delta every bracket holds the exact value."""
    from weightdiff.measure.backend import CPU_SPECTRA, Backend

    backend = CPU_SPECTRA
    if torch_backend:
        pytest.importorskip("torch")
        from weightdiff.kernels import cuda

        backend = Backend("cuda", cuda, "cpu")
    base, tuned, nd2 = merged_pair(rng, "BF16")
    rec = rank.analyze_delta(base, tuned, "BF16", "BF16", (M, N), nd2, exact_max=0, backend=backend)
    exact = rank.analyze_delta(base, tuned, "BF16", "BF16", (M, N), nd2)
    assert rec.method == "randomized" and rec.estimated == ["effective_rank"]
    assert (rec.energy_rank_90, rec.energy_rank_99) == (exact.energy_rank_90, exact.energy_rank_99)
    assert "energy_rank_99" not in rec.bounds
    assert rec.stable_rank == pytest.approx(exact.stable_rank, rel=1e-5)
    w = rng.normal(0.0, 0.02, (400, 300)).astype(np.float32)
    t = w + rng.normal(0, 1e-3, w.shape).astype(np.float32)
    nd2 = float(np.sum((t - w).astype(np.float64) ** 2))
    rec = rank.analyze_delta(w, t, "F32", "F32", w.shape, nd2, k=16, exact_max=0, backend=backend)
    exact = rank.analyze_delta(w, t, "F32", "F32", w.shape, nd2, k=16)
    for key in ("energy_rank_90", "energy_rank_99"):
        lo, hi = rec.bounds[key]
        assert getattr(rec, key) == lo <= getattr(exact, key) <= hi


def test_a_dora_bracket_counts_what_the_energy_certifies():
    """A DoRA delta D + M whose magnitude term M dominates read numerical_rank [0, 64] ("at least 0") for a
    matrix changed by half its norm: every singular value is at most s_1(D) + ||M||_F, so the energy above
    r thr^2 certifies some above thr. The bracket holds the true count of random cases."""
    from weightdiff.measure.rank import _dora_bounds

    fields, bounds = _dora_bounds(np.array([0.01]), 1.0, 1.0, 1e-3, 64, {})
    assert fields["numerical_rank"] >= 1 and bounds["numerical_rank"][0] >= 1
    rng = np.random.default_rng(3)
    for _ in range(40):
        m = 32
        w = rng.standard_normal((m, m))
        c = 1 + rng.normal(0, rng.choice([1e-3, 1e-2, 0.3]), m)
        d = rng.normal(0, rng.choice([1e-4, 1e-2, 1.0])) * rng.standard_normal((m, 2)) @ rng.standard_normal((2, m))
        mm = (c - 1)[:, None] * w
        thr = float(rng.choice([1e-3, 1e-1, 1.0]))
        s_d = np.linalg.svd(d, compute_uv=False)
        total = float(np.sum((d + mm) ** 2))
        f, b = _dora_bounds(s_d, float(np.linalg.norm(mm)), total, thr, m, {})
        true = int(np.count_nonzero(np.linalg.svd(d + mm, compute_uv=False) > thr))
        lo, hi = b.get("numerical_rank", [f["numerical_rank"]] * 2)
        assert lo <= true <= hi, (lo, true, hi)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (700, 96), (96, 700)])
@pytest.mark.parametrize("path", ["direct", "gram", "count"])
def test_a_dora_change_is_ranked_whole_and_exactly(rng, monkeypatch, shape, path):
    """``dora_whole``: the spectrum and ranks of diag(c) (W + s B A) - W itself, not of its direction term with a
    bracket ([4, 8192] at 70B widths): an SVD of the delta for a small matrix, the Gram matrix summed over the row
    blocks (tall and wide) or its inertia for a large one (a bfloat16 base: a float32 one's floor lies below the
    Gram matrix's resolution, where the plain path too takes an SVD); the same floor as the bracket's, the same
    stats."""
    from weightdiff.io.safetensors_write import to_storage

    monkeypatch.setattr(rank, "_BLOCK", 3000)            # several row blocks
    if path != "direct":
        monkeypatch.setattr(rank, "DORA_DIRECT_MAX", 100)
    m, n = shape
    r = 4
    dt = "F32" if path == "direct" else "BF16"
    w = reference.round_to(rng.normal(0, 0.05, (m, n)), dt).reshape(m, n)
    raw = w.astype(np.float32) if dt == "F32" else to_storage(w, "BF16")
    a, b = rng.normal(0, 0.1, (r, n)), rng.normal(0, 0.1, (m, r))
    magnitude = np.linalg.norm(w.astype(np.float64) + 2.0 * b @ a, axis=1)
    magnitude[::3] *= rng.uniform(0.9, 1.1, len(magnitude[::3]))      # a third of the rows rescaled
    whole = {"seed": 0, "count": path == "count", "exact_max": 8192}
    stats, rec = rank.analyze_factors(a, b, 2.0, raw, dt, (m, n), magnitude=magnitude, dora_whole=whole)
    stats0, rec0 = rank.analyze_factors(a, b, 2.0, raw, dt, (m, n), magnitude=magnitude)
    assert stats == stats0 and rec.noise_floor == rec0.noise_floor and not rec0.exact
    # (rows whose c is within rounding of 1 take c = 1, as on every DoRA path)
    delta = rank.merged_factor_weight(w, a, b, 2.0, magnitude, dt) - w
    s = np.linalg.svd(delta, compute_uv=False)
    thr = 1.5 * rec.noise_floor
    assert rec.method == {"direct": "exact", "gram": "gram", "count": "inertia"}[path]
    assert rec.exact or path == "count"        # (count: beyond the top k, other fields are estimates, as for any pair)
    assert "numerical_rank" not in rec.bounds and rec.numerical_rank == int(np.count_nonzero(s > thr))
    assert rec.numerical_rank > r                         # the rescaled rows: beyond the direction term's rank
    assert rec.energy_rank_99 == int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.99) + 1)
    np.testing.assert_allclose(rec.spectrum[:10], s[:10], rtol=1e-7)
    assert "whole change" in rec.extra["dora"]["note"] and rec.extra["dora"]["magnitude_term_norm"] > 0
    # no base: nothing to rescale against, the direction term's spectrum as before
    _, bare = rank.analyze_factors(a, b, 2.0, None, dt, (m, n), magnitude=magnitude, dora_whole=whole)
    assert bare.method == "factors"
