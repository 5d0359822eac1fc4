"""The orthogonal Procrustes solution without numpy's SVD: Newton's polar iteration in place (``kernels.lapack``).

numpy's SVD of the d x d Procrustes sums and the product U V^T held eight d x d float64 arrays: at the 70B width
(d = 8192) 4.3 GB for one fit, the largest allocation of a rotated model's checks. ``polar_inplace`` holds two. The
reference is the SVD's U V^T, on random, ill-conditioned, orthogonal, signed-permutation and tiny inputs; a
singular or non-finite input raises ``PolarFailed`` and leaves a matrix whose SVD still gives the answer.
"""
from __future__ import annotations

import numpy as np
import pytest

from weightdiff.kernels import lapack
from weightdiff.measure import rotation as rot

pytestmark = pytest.mark.skipif(not lapack.polar_available(), reason="numpy's OpenBLAS lacks dgetrf/dgetri")


def _svd_polar(c: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(c)
    return u @ vt


def _orth(n: int, rng) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def _cases(rng):
    n = 96
    yield "random", rng.standard_normal((n, n)), 1e-12
    yield "random tall entries", 1e6 * rng.standard_normal((n, n)), 1e-12
    yield "tiny entries", 1e-200 * rng.standard_normal((n, n)), 1e-12
    yield "orthogonal", _orth(n, rng), 1e-13
    yield "kappa 1e6", (_orth(n, rng) * np.logspace(0, -6, n)) @ _orth(n, rng), 1e-9
    yield "kappa 1e10", (_orth(n, rng) * np.logspace(0, -10, n)) @ _orth(n, rng), 1e-5
    p = np.zeros((n, n))
    p[np.arange(n), rng.permutation(n)] = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)
    yield "signed permutation, scaled", p, 1e-13
    yield "one by one", np.array([[-3.0]]), 0.0
    yield "rotation near identity", np.eye(n) + 1e-3 * rng.standard_normal((n, n)), 1e-12


def test_polar_matches_the_svd(rng):
    for what, c, tol in _cases(rng):
        want = _svd_polar(c)
        got = np.array(c)
        its = lapack.polar_inplace(got)
        assert np.max(np.abs(got - want)) <= tol + 1e-14, what
        assert np.max(np.abs(got.T @ got - np.eye(len(c)))) <= 1e-12, what
        assert its <= 30, what


def test_singular_and_nonfinite_inputs_fail_cleanly_and_procrustes_falls_back(rng):
    c = rng.standard_normal((40, 40))
    c[:, 7] = 0.0                                       # exactly singular: an exact zero pivot, R is not unique
    with pytest.raises(lapack.PolarFailed):
        lapack.polar_inplace(np.array(c))
    with pytest.raises(lapack.PolarFailed):
        lapack.polar_inplace(np.zeros((5, 5)))
    for sing in (c, np.where(np.arange(40) == 7, rng.standard_normal((40, 1)), c)):
        sing = np.array(sing)
        sing[:, 9] = sing[:, 3]                         # singular to rounding: either way an orthogonal maximiser
        r = rot.procrustes(sing)
        assert np.allclose(r.T @ r, np.eye(40), atol=1e-10)
        assert rot.inner(r, sing) >= rot.inner(_svd_polar(sing), sing) - 1e-10 * np.abs(sing).sum()
    bad = rng.standard_normal((10, 10))
    bad[2, 2] = np.nan
    with pytest.raises(lapack.PolarFailed):
        lapack.polar_inplace(np.array(bad))
    with pytest.raises(ValueError):
        lapack.polar_inplace(np.zeros((3, 4)))
    with pytest.raises(ValueError):
        lapack.polar_inplace(np.asfortranarray(rng.standard_normal((4, 4)))[:, ::-1])


def test_procrustes_consumes_its_sums_in_place_only_when_asked(rng):
    r0 = _orth(32, rng)
    a = rng.standard_normal((100, 32))
    c = a.T @ (a @ r0)
    kept = c.copy()
    assert np.allclose(rot.procrustes(c), r0, atol=1e-12) and np.array_equal(c, kept)
    out = rot.procrustes(c, inplace=True)
    assert out is c and np.allclose(c, r0, atol=1e-12)
    fit = rot.Rotation(32)
    cross = a.T @ (a @ r0)
    fit.add(cross, own=True)
    fit.add(np.zeros((32, 32)))
    got = fit.solve()
    assert got is cross and fit.c is None and np.allclose(got, r0, atol=1e-12)
    assert rot.Rotation(4).solve() is None


def test_blocked_helpers_agree_with_numpy(rng):
    a, b = rng.standard_normal((300, 70)), rng.standard_normal((300, 70))
    assert rot.inner(a, b) == pytest.approx(float(np.sum(a * b)), rel=1e-13)
    r = _orth(50, rng)
    assert rot.small_rotation(np.eye(50)) and not rot.small_rotation(r)
    assert rot.small_rotation(_svd_polar(np.eye(50) + 1e-3 * rng.standard_normal((50, 50))))
    p = np.eye(50)[rng.permutation(50)] * rng.choice([-1.0, 1.0], 50)[:, None]
    assert rot.signed_permutation(p) and not rot.signed_permutation(r)
    assert rot.signed_permutation(p * (1 + 1e-6)) and not rot.signed_permutation(p * (1 + 1e-4))


def test_the_fit_holds_two_matrices_of_its_width(rng):
    """What numpy allocates while the sums become R (tracemalloc sees numpy's arrays): one copy besides the sums,
    where the SVD route allocated its input's copy, U, V^T and U V^T (and LAPACK's workspace unseen here)."""
    import tracemalloc

    n = 384
    c = rng.standard_normal((n, n)) + 4 * np.eye(n)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        rot.procrustes(c, inplace=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 1.5 * n * n * 8, peak
