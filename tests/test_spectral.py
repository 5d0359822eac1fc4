"""kernels.spectral against matrices whose spectra are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weightdiff.kernels import spectral


def with_spectrum(rng, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """m x n float64 matrix U diag(s) V^T with random orthonormal U, V."""
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * np.asarray(s, dtype=np.float64)) @ v.T


SPECTRA = {
    "power_law": lambda r: np.arange(1, r + 1, dtype=np.float64) ** -1.0,
    "flat": lambda r: np.ones(r),
    "low_rank": lambda r: np.r_[np.arange(8, 0, -1.0), np.zeros(r - 8)],
    "zero": lambda r: np.zeros(r),
}


@pytest.mark.parametrize("m,n", [(96, 64), (64, 96), (80, 80), (1, 50), (50, 1)])
@pytest.mark.parametrize("kind", list(SPECTRA))
def test_exact_and_gram_recover_known_spectra(rng, kind, m, n):
    r = min(m, n)
    s = SPECTRA[kind](r) if r >= 8 or kind not in ("low_rank",) else np.ones(r)
    x = with_spectrum(rng, m, n, s).astype(np.float32)
    ref = np.sort(s)[::-1]
    tol = 2e-6 * max(1.0, ref[0])
    np.testing.assert_allclose(spectral.svdvals_exact(x), ref, atol=tol)
    # Gram squares the values: accurate to ~sqrt(eps32) * s1 for the smallest ones only
    np.testing.assert_allclose(spectral.svdvals_gram(x), ref, atol=2e-3 * max(1.0, ref[0]))
    np.testing.assert_allclose(spectral.svdvals_gram(x)[:8], ref[:8], rtol=1e-5, atol=tol)


def test_gram_is_the_same_for_a_wide_matrix_and_its_transpose(rng):
    x = rng.standard_normal((40, 300)).astype(np.float32)
    assert np.array_equal(spectral.svdvals_gram(x), spectral.svdvals_gram(np.ascontiguousarray(x.T)))


def test_spectrum_fields_hand_computed():
    f = spectral.spectrum_fields(np.ones(10), 0.5)
    assert f["stable_rank"] == 10.0
    assert f["effective_rank"] == pytest.approx(10.0)
    assert (f["energy_rank_90"], f["energy_rank_99"], f["numerical_rank"]) == (9, 10, 10)
    # s = (3, 4 -> sorted 4, 3): energy 16, 25 of 25 -> 90% needs both, stable rank 25/16
    f = spectral.spectrum_fields(np.array([3.0, 4.0, 0.0]), 3.5)
    assert (f["stable_rank"], f["energy_rank_90"], f["numerical_rank"]) == (25 / 16, 2, 1)
    p = np.array([4.0, 3.0]) / 7
    assert f["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    z = spectral.spectrum_fields(np.zeros(5), 0.0)
    assert (z["stable_rank"], z["effective_rank"], z["energy_rank_90"], z["numerical_rank"]) == (None, None, 0, 0)


def test_randomized_matches_exact_on_low_rank_plus_noise(rng):
    m, n, k = 600, 400, 64
    s = np.r_[np.geomspace(10, 1, 16), np.zeros(n - 16)]
    x = (with_spectrum(rng, m, n, s) + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)
    exact = spectral.svdvals_gram(x)
    top = spectral.randomized_svd(x, k, seed=3)
    assert top.shape == (k,)
    np.testing.assert_allclose(top[:16], exact[:16], rtol=1e-5)
    # stated error: top-k energy within 1e-4 relative on a low-rank delta above noise
    assert abs(np.sum(top ** 2) / np.sum(exact[:k] ** 2) - 1) < 1e-4


def test_randomized_energy_error_on_noise_is_within_the_stated_bound(rng):
    # worst case: a flat Gaussian spectrum; docs/rank.md states <= 15% low at the defaults
    x = rng.standard_normal((512, 512)).astype(np.float32)
    exact = spectral.svdvals_gram(x)[:64]
    top = spectral.randomized_svd(x, 64, seed=0)
    ratio = np.sum(top ** 2) / np.sum(exact ** 2)
    assert 0.85 < ratio <= 1.0 + 1e-6
    assert np.all(top <= exact * (1 + 1e-5))        # Ritz values never exceed the true ones


def test_randomized_is_bitwise_repeatable_and_depends_on_the_seed(rng):
    x = rng.standard_normal((300, 200)).astype(np.float32)
    a = spectral.randomized_svd(x, 32, seed=7)
    b = spectral.randomized_svd(x.copy(), 32, seed=7)
    c = spectral.randomized_svd(x, 32, seed=8)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_randomized_vectors_reconstruct_a_low_rank_matrix(rng):
    for m, n in ((120, 50), (50, 120)):
        x = with_spectrum(rng, m, n, np.r_[np.arange(5, 0, -1.0), np.zeros(min(m, n) - 5)]).astype(np.float32)
        u, s, vt = spectral.randomized_svd(x, 5, vectors=True)
        assert u.shape == (m, 5) and vt.shape == (5, n)
        np.testing.assert_allclose((u * s) @ vt, x, atol=1e-5)


def test_randomized_caps_k_at_the_smaller_side(rng):
    x = rng.standard_normal((10, 200)).astype(np.float32)
    top = spectral.randomized_svd(x, 64)
    np.testing.assert_allclose(top, spectral.svdvals_exact(x), rtol=1e-5)


@pytest.mark.parametrize("m,n,r", [(50, 40, 4), (30, 70, 8), (5, 5, 5), (64, 1, 1), (1, 64, 1)])
def test_factors_match_the_dense_product(rng, m, n, r):
    b, a = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    scale = 16 / math.sqrt(r)                       # rsLoRA: alpha / sqrt(r)
    dense = scale * b @ a
    s = spectral.factors_svd(b, a, scale)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[: len(s)], rtol=1e-12, atol=1e-12)
    u, s2, vt = spectral.factors_svd(b, a, scale, vectors=True)
    np.testing.assert_allclose((u * s2) @ vt, dense, atol=1e-10)


def _truth_and_partial(rng, s, k=32, thr=0.05):
    m, n = 300, 200
    x = with_spectrum(rng, m, n, s).astype(np.float32)
    full = spectral.svdvals_gram(x)
    total = float(np.sum(full ** 2))
    return spectral.spectrum_fields(full, thr), spectral.partial_spectrum_fields(
        spectral.randomized_svd(x, k), total, min(m, n), thr)


@pytest.mark.parametrize("kind", ["flat100", "power_half", "step", "noise_like"])
def test_partial_bounds_contain_the_truth(rng, kind):
    s = {"flat100": np.r_[np.ones(100), np.zeros(100)],
         "power_half": np.arange(1, 201.0) ** -0.5,
         "step": np.r_[np.full(40, 3.0), np.full(160, 0.3)],
         "noise_like": np.sqrt(np.linspace(4, 0.01, 200))}[kind]
    truth, part = _truth_and_partial(rng, s)
    assert part["estimated"] == ["stable_rank", "effective_rank"]
    # s_1 is a Ritz value, at most the true one: the stable rank errs high, never low
    assert part["stable_rank"] >= truth["stable_rank"] * (1 - 1e-6)
    for key in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
        if key in part["bounds"]:
            lo, hi = part["bounds"][key]
            assert lo == part[key] and lo <= truth[key] <= hi, (key, lo, truth[key], hi)
        else:
            assert part[key] == truth[key]
    lo, hi = part["bounds"]["effective_rank"]
    assert lo * (1 - 1e-3) <= truth["effective_rank"] <= hi * (1 + 1e-3)
    assert part["stable_rank"] == pytest.approx(truth["stable_rank"], rel=0.05)


def test_partial_is_exact_when_the_top_k_hold_everything(rng):
    s = np.r_[np.arange(6, 0, -1.0), np.zeros(194)]
    truth, part = _truth_and_partial(rng, s)
    assert part["bounds"] == {} or set(part["bounds"]) == {"effective_rank"}
    for key in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
        assert part[key] == truth[key]
    # effective rank feels even float32 round-off in the tail: same to 1%
    assert part["effective_rank"] == pytest.approx(truth["effective_rank"], rel=1e-2)


# --- torch versions: same answers ---------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def test_torch_versions_agree_with_numpy(rng):
    t = _torch()
    x = with_spectrum(rng, 200, 120, np.r_[np.geomspace(5, 0.5, 20), np.zeros(100)]).astype(np.float32)
    tx = t.from_numpy(x)
    np.testing.assert_allclose(spectral.svdvals_exact_torch(tx), spectral.svdvals_exact(x), atol=1e-5)
    np.testing.assert_allclose(spectral.svdvals_gram_torch(tx.T), spectral.svdvals_gram(x), atol=2e-3)
    np.testing.assert_allclose(spectral.randomized_svd_torch(tx, 16, seed=1),
                               spectral.randomized_svd(x, 16, seed=1), rtol=1e-4)
    b, a = rng.standard_normal((40, 3)), rng.standard_normal((3, 30))
    np.testing.assert_allclose(spectral.factors_svd_torch(t.from_numpy(b), t.from_numpy(a), 2.0),
                               spectral.factors_svd(b, a, 2.0), rtol=1e-12)
    u, s, vt = spectral.randomized_svd_torch(tx, 20, seed=1, vectors=True)
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-4)
    assert spectral.randomized_svd_torch(tx, 16, seed=1).tobytes() == \
        spectral.randomized_svd_torch(tx, 16, seed=1).tobytes()


def test_randomized_handles_zero_and_exactly_low_rank_matrices(rng):
    assert spectral.randomized_svd(np.zeros((50, 40), np.float32), 8).tolist() == [0.0] * 8
    x = with_spectrum(rng, 200, 150, np.r_[np.arange(3, 0, -1.0), np.zeros(147)]).astype(np.float32)
    top = spectral.randomized_svd(x, 10)
    np.testing.assert_allclose(top[:3], [3, 2, 1], rtol=1e-5)
    assert np.all(top[3:] < 1e-5)
    u, s, vt = spectral.randomized_svd(x, 10, vectors=True)
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-5)


@pytest.mark.parametrize("kind", ["rank150_noise", "flat100", "step", "noise_like"])
def test_a_certified_count_narrows_the_energy_rank_bounds_and_they_still_hold(rng, kind):
    m, n, k, thr = 600, 400, 32, 0.05
    s = {"rank150_noise": np.r_[np.geomspace(3.0, 0.2, 150), np.full(250, 0.02)],
         "flat100": np.r_[np.ones(100), np.zeros(300)],
         "step": np.r_[np.full(40, 3.0), np.full(360, 0.03)],
         "noise_like": np.sqrt(np.linspace(4, 0.001, 400))}[kind]
    x = with_spectrum(rng, m, n, s)
    full = np.linalg.svd(x, compute_uv=False)
    total = float(np.sum(full ** 2))
    truth = spectral.spectrum_fields(full, thr)
    top = spectral.randomized_svd(x, k)
    plain = spectral.partial_spectrum_fields(top, total, n, thr)
    for count_hi in (truth["numerical_rank"], min(n, truth["numerical_rank"] + 3)):
        got = spectral.partial_spectrum_fields(top, total, n, thr, count_hi=count_hi)
        for key in ("energy_rank_90", "energy_rank_99"):
            if key in got["bounds"]:
                lo, hi = got["bounds"][key]
                assert lo <= truth[key] <= hi, (key, lo, truth[key], hi)
                assert hi <= plain["bounds"][key][1] and lo == plain["bounds"][key][0]
            else:
                assert got[key] == truth[key]
    if kind == "rank150_noise":           # the even spread over 368 directions said ~3x more
        got = spectral.partial_spectrum_fields(top, total, n, thr, count_hi=truth["numerical_rank"])
        assert got["bounds"]["energy_rank_90"][1] <= 150 < plain["bounds"]["energy_rank_90"][1]


# --- certified caps on partial sums: the lower ends of the energy ranks ----------------------

CAP_SPECTRA = {
    "flat": lambda r, rng: np.ones(r),
    "marchenko_pastur": lambda r, rng: np.linspace(2.35, 0.22, r),
    "geometric": lambda r, rng: np.geomspace(1.0, 1e-6, r),
    "spike_over_noise": lambda r, rng: np.r_[np.geomspace(100.0, 10.0, 6), np.full(r - 6, 1e-4)],
    "step": lambda r, rng: np.r_[np.full(r // 10, 9.0), np.full(r - r // 10, 0.09)],
    "with_zeros": lambda r, rng: np.r_[rng.random(r // 2), np.zeros(r - r // 2)],
    "dirichlet": lambda r, rng: rng.dirichlet(np.full(r, 0.3)),
    "one": lambda r, rng: np.r_[[1.0], np.zeros(r - 1)],
}


def _sums(lam: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.sort(lam)[::-1])])


@pytest.mark.parametrize("kind", list(CAP_SPECTRA))
@pytest.mark.parametrize("r", [1, 2, 7, 300])
def test_frobenius_caps_hold_every_partial_sum(rng, kind, r):
    lam = CAP_SPECTRA[kind](max(r, 8), rng)[:r]
    truth = _sums(lam)
    caps = spectral.frobenius_caps(r, float(lam.sum()), float(np.sum(lam * lam)))
    assert caps.shape == (r + 1,) and caps[0] == 0.0 and np.all(np.diff(caps) >= 0)
    assert np.all(caps >= truth * (1 - 1e-12) - 1e-15), np.flatnonzero(caps < truth)
    if kind == "flat":                     # tight: every direction holds the same
        np.testing.assert_allclose(caps, truth, rtol=1e-6, atol=1e-9)


def _g_and_truth(rng, lam):
    n = len(lam)
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    g = (v * lam) @ v.T
    return (g + g.T) / 2, v


@pytest.mark.parametrize("kind", list(CAP_SPECTRA))
@pytest.mark.parametrize("subspace", ["random", "noisy_top", "exact_top"])
def test_ritz_caps_hold_for_any_subspace_and_sit_on_converged_sums(rng, kind, subspace):
    n, k = 120, 10
    lam = np.sort(CAP_SPECTRA[kind](n, rng))[::-1]
    g, v = _g_and_truth(rng, lam)
    y = {"random": rng.standard_normal((n, k)),
         "noisy_top": v[:, :k] + 1e-3 * rng.standard_normal((n, k)),
         "exact_top": v[:, :k]}[subspace]
    q, _ = np.linalg.qr(y)
    t = q.T @ g @ q
    theta, z = np.linalg.eigh((t + t.T) / 2)
    theta, q = theta[::-1], q @ z[:, ::-1]
    resid = g @ q - q * theta
    col = np.linalg.norm(resid, axis=0)
    fro = float(np.linalg.norm(resid))
    tail = float(np.trace(g) - theta.sum())
    frob2_tail = float(np.sum(g * g) - np.sum(theta ** 2) - 2 * fro ** 2)
    truth = _sums(lam)
    scale = float(lam.sum())
    for f2 in (None, frob2_tail):
        caps = spectral.ritz_caps(theta, n, tail, f2, fro, float(col.sum()))
        assert np.all(caps >= truth - 1e-9 * scale), (kind, subspace, np.flatnonzero(caps < truth - 1e-9 * scale))
    if subspace == "exact_top" and kind in ("spike_over_noise", "flat", "one"):
        # converged, and the rest far below (or level with) the top k: the caps are the Ritz sums up to k
        np.testing.assert_allclose(caps[:k + 1], truth[:k + 1], atol=1e-8 * scale)
    if subspace == "noisy_top" and kind == "spike_over_noise":
        # s_1 stands apart: the quadratic residual bound puts caps[1] within ~|residual|^2 of lambda_1
        assert lam[0] <= caps[1] <= lam[0] * (1 + 1e-4)


def test_without_caps_a_low_ritz_value_overstates_the_lower_end_and_caps_fix_it():
    """Ritz values 10% low (each still a lower bound) on a flat spectrum: the estimate
    k + ceil(need / s_k^2) lands above the true energy rank; the Frobenius caps do not."""
    n, k = 100, 10
    total = float(n)                                   # 100 singular values of 1
    s_top = np.full(k, math.sqrt(0.9))
    truth = 90                                         # 90% of the energy: 90 directions
    old = spectral.partial_spectrum_fields(s_top, total, n, 0.0)
    assert old["energy_rank_90"] > truth               # why caps exist
    caps = spectral.frobenius_caps(n, total, float(n))
    new = spectral.partial_spectrum_fields(s_top, total, n, 0.0, caps=caps)
    lo, hi = new["bounds"].get("energy_rank_90", [new["energy_rank_90"]] * 2)
    assert lo <= truth <= hi and lo == truth           # flat: the caps are tight


@pytest.mark.parametrize("kind", ["rank150_noise", "flat100", "step", "noise_like", "geometric"])
def test_caps_make_the_lower_ends_certified_and_the_top_k_rank_exact_only_when_proved(rng, kind):
    m, n, k, thr = 500, 300, 24, 0.05
    s = {"rank150_noise": np.r_[np.geomspace(3.0, 0.2, 150), np.full(150, 0.02)],
         "flat100": np.r_[np.ones(100), np.zeros(200)],
         "step": np.r_[np.full(40, 3.0), np.full(260, 0.03)],
         "noise_like": np.sqrt(np.linspace(4, 0.001, 300)),
         "geometric": np.geomspace(10, 1e-12, 300)}[kind]
    x = with_spectrum(rng, m, n, s)
    g = x.T @ x
    full = np.linalg.svd(x, compute_uv=False)
    total = float(np.sum(full ** 2))
    truth = spectral.spectrum_fields(full, thr)
    from weightdiff.kernels import gram as kgram
    vals, y = kgram.gram_top(g, k, seed=2, vectors=True)
    caps = kgram.energy_caps(g, y, total, 1e-13 * total)
    assert np.all(caps >= _sums(full ** 2) * (1 - 1e-12))
    got = spectral.partial_spectrum_fields(np.sqrt(vals), total, n, thr, count_hi=truth["numerical_rank"], caps=caps)
    for key in ("energy_rank_90", "energy_rank_99"):
        lo, hi = got["bounds"].get(key, [got[key]] * 2)
        assert lo == got[key] and lo <= truth[key] <= hi, (key, lo, truth[key], hi)
    if "stable_rank" not in got["estimated"]:         # certified: within STABLE_CERTIFIED
        assert got["stable_rank"] == pytest.approx(truth["stable_rank"], rel=2 * spectral.STABLE_CERTIFIED)
    if kind == "geometric":                  # s_1 stands apart, the top 12 hold 90%: certified and exact
        assert "stable_rank" not in got["estimated"] and "energy_rank_90" not in got["bounds"]


@pytest.mark.parametrize("kind", ["spike_over_noise", "marchenko_pastur", "geometric", "one"])
@pytest.mark.parametrize("wide", [False, True])
def test_randomized_caps_hold_and_are_tight_where_the_top_stands_apart(rng, kind, wide):
    m, n, k = 260, 150, 16
    s = np.sqrt(CAP_SPECTRA[kind](n, rng))
    x = with_spectrum(rng, m, n, s).astype(np.float32)
    x = x.T.copy() if wide else x
    full = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    total = float(np.sum(full ** 2))
    u, top, vt = spectral.randomized_svd(x, k, seed=1, vectors=True)
    caps = spectral.randomized_caps(x, u if wide else vt.T, total)
    truth = _sums(full ** 2)
    assert caps.shape == (n + 1,) and np.all(caps >= truth * (1 - 1e-12))
    got = spectral.partial_spectrum_fields(top, total, n, 0.0, caps=caps)
    exact = spectral.spectrum_fields(full, 0.0)
    for key in ("energy_rank_90", "energy_rank_99"):
        lo, hi = got["bounds"].get(key, [got[key]] * 2)
        assert lo <= exact[key] <= hi
    if wide:                              # the two-pass wide route computes the tall route's caps
        u2, _, vt2 = spectral.randomized_svd(x.T.copy(), k, seed=1, vectors=True)
        np.testing.assert_allclose(spectral.randomized_caps(x.T.copy(), vt2.T, total),
                                   spectral.randomized_caps(x, vt2.T, total), rtol=1e-9, atol=1e-12 * total)
    if kind == "spike_over_noise":        # six values far above a noise floor: exact, as before
        assert got["energy_rank_99"] == exact["energy_rank_99"] and "energy_rank_99" not in got["bounds"]
        assert "stable_rank" not in got["estimated"]


def test_randomized_caps_torch_twin_agrees(rng):
    torch = pytest.importorskip("torch")
    x = with_spectrum(rng, 200, 90, np.sqrt(CAP_SPECTRA["spike_over_noise"](90, rng))).astype(np.float32)
    u, top, vt = spectral.randomized_svd(x, 12, seed=3, vectors=True)
    total = float(np.sum(x.astype(np.float64) ** 2))
    for a in (x, x.T.copy()):                   # tall (one pass) and wide (two passes)
        want = spectral.randomized_caps(a, vt.T, total)
        got = spectral.randomized_caps_torch(torch.from_numpy(a), vt.T, total)
        np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("kind", list(CAP_SPECTRA))
def test_count_caps_hold_for_any_certified_lower_count(rng, kind):
    r = 200
    lam = np.sort(CAP_SPECTRA[kind](r, rng))[::-1]
    truth = _sums(lam)
    for thr2 in (0.0, float(np.median(lam)), float(lam[r // 10]), float(lam[0]) * 2):
        count = int(np.count_nonzero(lam > thr2))
        for lo in {0, count // 2, count}:           # any lower bound on the count
            caps = spectral.count_caps(r, float(lam.sum()), lo, thr2)
            assert np.all(caps >= truth * (1 - 1e-12) - 1e-15)
    # a flat spectrum all above the threshold: the caps are the sums themselves
    caps = spectral.count_caps(r, float(r), r, 1.0)
    np.testing.assert_allclose(caps, np.arange(r + 1.0))


def test_frobenius_caps_with_an_uncertain_total_hold_for_every_total_in_range(rng):
    """The stats pass's total is a float64 sum: the caps must hold for any true total within its
    error, including a flat spectrum, where r frob2 - total^2 cancels to nothing."""
    r = 300
    for lam in (np.ones(r), np.linspace(2.35, 0.22, r), rng.dirichlet(np.full(r, 0.5))):
        t, f = float(lam.sum()), float(np.sum(lam * lam))
        err = 1e-6 * t
        for true_scale in (1 - 1e-6, 1.0, 1 + 1e-6):        # the true spectrum's total is t x scale
            truth = _sums(lam * true_scale)
            caps = spectral.frobenius_caps(r, t, f * (1 + 1e-6) ** 2, total_err=err)
            assert np.all(caps >= truth * (1 - 1e-13))


@pytest.mark.parametrize("m, k, cond", [(3000, 40, 1.0), (2500, 64, 1e12), (999, 7, 1e6), (130, 64, 1.0)])
def test_tall_r_in_row_blocks_gives_the_singular_values_of_one_qr(rng, monkeypatch, m, k, cond):
    """The tall-skinny QR (row blocks stacked under the R so far) against LAPACK's QR of the whole factor: the same
    singular values of R to float64 round-off, on random factors and on ill-conditioned ones (singular values
    spread over 12 decades), blocks of one row up to the whole (m <= 2 k takes the one QR)."""

    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    x = (u * np.logspace(0, -np.log10(cond), k)) @ v.T
    want = np.linalg.svd(np.linalg.qr(x, mode="r"), compute_uv=False)
    for block_bytes in (8 * k, 8 * k * 37, 8 * k * m // 3, 1 << 30):
        monkeypatch.setattr(spectral, "TSQR_BYTES", block_bytes)
        got = np.linalg.svd(spectral.tall_r(x), compute_uv=False)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-13 * want[0], (block_bytes, np.abs(got - want).max() / want[0])
