"""Exact ranks from the streamed Gram matrix: kernels.gram (tiles, certified count) against
LAPACK's SVD, and weightdiff.measure.rank_stream (one read per byte) against weightdiff.rank."""

from __future__ import annotations

import numpy as np
import pytest

import weightdiff.measure.compute as compute
from conftest import write_checkpoint
from test_rank import merged_pair
from weightdiff import compare
from weightdiff.measure import rank
from weightdiff.kernels import gram as kgram
from weightdiff.kernels.dtypes import decode
from weightdiff.measure.rank_stream import DeltaGram
from weightdiff.io.safetensors_write import to_storage


def _count_svd(x: np.ndarray, thr: float) -> int:
    return int(np.count_nonzero(np.linalg.svd(x.astype(np.float64), compute_uv=False) > thr))


def _certified(x: np.ndarray, thr: float, tile: int = kgram.TILE, dtype=np.float64):
    t = x if x.shape[0] >= x.shape[1] else x.T
    acc = kgram.GramAccumulator(t.shape[1], tile=tile)
    for i in range(0, t.shape[0], 37):
        acc.add(np.asarray(t[i:i + 37], dtype=np.float64))
    rows = acc.rows
    lam = kgram.gram_eigenvalues(acc, dtype)
    d2 = float(np.sum(x.astype(np.float64) ** 2))
    delta = kgram.eig_error_bound(t.shape[1], rows, d2, float(np.sqrt(np.sum(lam * lam))), dtype)
    return lam, kgram.certified_count(lam, thr * thr, delta)


@pytest.mark.parametrize("tile", [kgram.TILE, 16])
def test_tiled_gram_is_the_gram(rng, tile):
    x = rng.standard_normal((123, 50))
    acc = kgram.GramAccumulator(50, tile=tile)
    acc.add(x[:60])
    acc.add(x[60:].T.copy().T)          # a transposed view works too
    g = acc.matrix()
    np.testing.assert_allclose(g, x.T @ x, rtol=1e-12, atol=1e-12)
    assert np.array_equal(g, g.T) and acc.rows == 123 and not acc.tiles


def _with_spectrum(rng, m, n, s):
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * np.asarray(s)) @ v.T


@pytest.mark.parametrize("case", ["random", "rank7", "zero", "bf16_noise", "wide"])
def test_certified_count_holds_the_svd_count_and_is_exact_off_the_threshold(rng, case):
    m, n = 300, 120
    if case == "random":
        x = rng.standard_normal((m, n))
    elif case == "rank7":
        x = _with_spectrum(rng, m, n, np.geomspace(5.0, 0.5, 7))
    elif case == "zero":
        x = np.zeros((m, n))
    elif case == "bf16_noise":             # a cast: bf16(w) - w, the storage-rounding noise itself
        w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
        x = decode(to_storage(w, "BF16"), "BF16") - w.astype(np.float64)
    else:
        x = rng.standard_normal((n, m))
    s = np.linalg.svd(x, compute_uv=False)
    if case == "zero":
        thr = 1e-3
    else:                                  # halfway between two neighbours, in the middle of the spectrum
        k = min(len(s) // 2, int(np.count_nonzero(s > 1e-8 * s[0])) - 1)
        thr = float(s[k - 1] + s[k]) / 2
    lam, (count, lo, hi) = _certified(x, thr, tile=16)
    want = _count_svd(x, thr)
    assert lo == hi == count == want
    np.testing.assert_allclose(kgram.singular_values(lam)[:5], s[:5], rtol=1e-9, atol=1e-12)


def test_a_cluster_at_the_threshold_is_bracketed_not_guessed(rng):
    """Singular values closer to the threshold than the error bound can resolve: the bracket
    holds both answers, the value is its lower end."""
    s = np.array([3.0, 2.0] + [1.0 + e for e in (-1e-14, 0.0, 1e-14)] + [0.5])
    x = _with_spectrum(rng, 200, 60, s)
    lam, (count, lo, hi) = _certified(x, 1.0)
    assert lo <= 2 and hi >= 5 and lo <= count <= hi
    # a threshold well away from every value is exact again
    assert _certified(x, 1.5)[1] == (2, 2, 2)


def test_float32_eigen_solve_has_a_wider_but_honest_bracket(rng):
    x = _with_spectrum(rng, 400, 100, np.concatenate([np.geomspace(1.0, 0.1, 20), np.full(80, 1e-4)]))
    lam, (count, lo, hi) = _certified(x, 0.01, dtype=np.float32)
    assert lo <= 20 <= hi and lo == hi == 20           # 0.01 is far above float32's resolution here
    # below sqrt(u32) ||D|| the threshold cannot be resolved: the bracket says so
    lam, (count, lo, hi) = _certified(x, 1e-5, dtype=np.float32)
    assert lo <= 100 <= hi and hi - lo >= 80


@pytest.mark.parametrize("shape", [(700, 300), (300, 700)])
@pytest.mark.parametrize("keep", [1 << 30, 0])          # wide: in memory, or spilled to a temporary file
def test_streamed_rank_matches_the_whole_matrix_analysis(rng, shape, keep):
    m, n = shape
    base, tuned, nd2 = merged_pair(rng, "BF16", m=m, n=n)
    want = rank.analyze_delta(base, tuned, "BF16", "BF16", shape, nd2, exact_max=4096)
    got = []
    for early in (False, True):     # the row buffer let go when the stream ends (end_of_stream), or at finish
        g = DeltaGram(shape, "BF16", "BF16", keep_bytes=keep)
        g.activate()
        fb, ft = base.reshape(-1), tuned.reshape(-1)
        for p in range(0, fb.size, 50_001):           # windows that cut rows anywhere
            g.feed(fb[p:p + 50_001], ft[p:p + 50_001], True)
        assert g.spilled == (keep == 0 and m < n)
        if early:
            g.end_of_stream()
            assert g._buf is None
        got.append(g.finish(nd2, 1.5, 64))
    assert got[0] == got[1]
    got = got[0]
    assert got.method == "gram" and got.exact and not got.bounds
    assert got.numerical_rank == want.numerical_rank == 8
    assert got.energy_rank_99 == want.energy_rank_99
    assert got.noise_floor == want.noise_floor        # each row and column sum in flat order either way
    np.testing.assert_allclose(got.spectrum, want.spectrum, rtol=1e-6, atol=1e-9 * want.spectrum[0])


def _pair_on_disk(tmp_path, rng, m, n, rows_changed=None):
    w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
    upd = np.zeros_like(w)
    lr = (rng.standard_normal((m, 5)) @ rng.standard_normal((5, n))).astype(np.float32)
    upd[rows_changed if rows_changed is not None else slice(None)] = 0.002 * lr[
        rows_changed if rows_changed is not None else slice(None)]
    write_checkpoint(tmp_path / "b", {"w": w}, dtype="BF16")
    write_checkpoint(tmp_path / "t", {"w": w + upd}, dtype="BF16")
    return tmp_path / "b", tmp_path / "t"


@pytest.mark.parametrize("shape", [(1200, 300), (300, 1200)])
def test_compare_reads_each_byte_once_and_agrees_with_the_two_read_path(tmp_path, rng, monkeypatch, shape):
    """The change starts late in the matrix (rows 900-1000 or 200-250), after several unchanged
    windows: the streamed Gram picks it up and gives the numbers of the whole-matrix path."""
    m, n = shape
    rows = slice(900, 1000) if m > n else slice(200, 250)
    b, t = _pair_on_disk(tmp_path, rng, m, n, rows)
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 40_000)
    reads: list[str] = []
    from weightdiff.io.checkpoint import Checkpoint

    real_read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name) or real_read(self, name))
    got = compare(b, t).tensors[0].rank
    assert reads == []                                    # no second read
    want = compare(b, t, exact_svd_max=0).tensors[0].rank  # randomized path still reads it whole
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 1 << 24)
    assert got.method == "gram" and got.exact and got.numerical_rank == 5
    assert want.method == "randomized" and want.numerical_rank == 5
    np.testing.assert_allclose(got.spectrum[:5], want.spectrum[:5], rtol=1e-4)


def test_a_rounding_prefix_is_reread_when_the_change_starts_later(tmp_path, rng, monkeypatch):
    """Windows that changed within rounding before the first real change still belong to the delta."""
    m, n = 1000, 300
    w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
    wb = decode(to_storage(w, "BF16"), "BF16").astype(np.float32)
    tuned = w.copy()                                      # float32: differs from bf16 by rounding only ...
    tuned[800:] += 0.01 * np.outer(rng.standard_normal(200), rng.standard_normal(n)).astype(np.float32)
    write_checkpoint(tmp_path / "b", {"w": wb}, dtype="BF16")
    write_checkpoint(tmp_path / "t", {"w": tuned}, dtype="F32")
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 30_000)
    got = compare(tmp_path / "b", tmp_path / "t").tensors[0]
    assert got.status == "changed" and got.rank.method == "gram"
    want = rank.analyze_delta(to_storage(wb, "BF16"), tuned, "BF16", "F32", (m, n),
                              got.norm_delta ** 2, exact_max=4096)
    assert got.rank.numerical_rank == want.numerical_rank
    np.testing.assert_allclose(got.rank.spectrum[:3], want.spectrum[:3], rtol=1e-6)


def test_a_bracketed_rank_is_never_the_summary_maximum():
    from weightdiff.judge.aggregate import aggregate
    from weightdiff.judge.verdict import summarise
    from weightdiff.options import Thresholds
    from weightdiff.records import RankRecord, TensorRecord
    from weightdiff.render.formats import max_rank

    def rec(name, nr, bounds):
        r = TensorRecord(name, name, "changed", [64, 64], [64, 64], "F32", "F32", 4096, 4096, norm_base=4.0,
                         norm_delta=1.0, cosine=0.97, frac_changed=1.0, frac_beyond_rounding=1.0)
        r.rank = RankRecord(1.0, 1.0, 1, 1, nr, 0.1, [1.0], 1.0, method="gram", shape_2d=(64, 64),
                            exact=not bounds, bounds={"numerical_rank": bounds} if bounds else {})
        return r

    def run(records):
        blocks, _ = aggregate(records, Thresholds())
        return blocks, summarise(records, blocks, Thresholds())

    exact = [rec("h.0.w", 30, None), rec("h.1.w", 12, None)]
    _, s = run(exact)
    assert s.form["max_numerical_rank"] == 30 and s.form["max_numerical_rank_bounds"] is None
    blocks, s = run(exact + [rec("h.2.w", 20, [20, 40])])
    assert s.form["max_numerical_rank"] is None and s.form["max_numerical_rank_bounds"] == [30, 40]
    assert max_rank(s.form) == "30-40"
    b2 = [b for b in blocks if b.block == "h.2"][0]
    assert b2.max_numerical_rank is None and b2.max_numerical_rank_bounds == [20, 40]
    # a bracket below an exact maximum does not blur it
    _, s = run(exact + [rec("h.2.w", 5, [5, 29])])
    assert s.form["max_numerical_rank"] == 30 and s.form["max_numerical_rank_bounds"] is None


@pytest.mark.parametrize("n", [1, 7, 50])
def test_the_gram_sum_has_the_same_bits_whatever_the_thread_count(rng, monkeypatch, n):
    x = rng.standard_normal((301, n))
    sums = []
    for workers in (1, 3):
        monkeypatch.setattr(kgram, "_POOL", None)
        monkeypatch.setattr(kgram, "WORKERS", workers)
        monkeypatch.setattr(kgram.os, "cpu_count", lambda: 8)
        for tile in (16,) if n > 16 else (kgram.TILE,):
            acc = kgram.GramAccumulator(n, tile=tile)
            for i in range(0, 301, 100):
                acc.add(x[i:i + 100])
            sums.append(acc.matrix())
    monkeypatch.setattr(kgram, "_POOL", None)
    assert all(np.array_equal(s, sums[0]) for s in sums)
    np.testing.assert_allclose(sums[0], x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["random", "rank3", "zeros", "identity", "scaled", "one", "clustered"])
def test_eigvalsh_in_place_is_lapacks_answer(rng, case):
    from weightdiff.kernels import lapack

    if not lapack.available():
        pytest.skip("numpy's OpenBLAS does not export dsyevd here")
    n = 1 if case == "one" else 64
    if case == "random":
        x = rng.standard_normal((80, n)); g = x.T @ x
    elif case == "rank3":
        x = rng.standard_normal((3, n)); g = x.T @ x
    elif case == "zeros":
        g = np.zeros((n, n))
    elif case == "identity":
        g = np.eye(n)
    elif case == "scaled":
        x = rng.standard_normal((80, n)) * 1e150; g = x.T @ x
    elif case == "one":
        g = np.array([[4.0]])
    else:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        g = (q * np.r_[np.ones(n // 2), np.full(n - n // 2, 1 + 1e-12)]) @ q.T
        g = (g + g.T) / 2
    want = np.linalg.eigvalsh(g)
    a = np.tril(g).copy()
    a[np.triu_indices(n, 1)] = np.nan          # only the lower triangle is read
    got = lapack.eigvalsh_inplace(a, lower=True)
    scale = max(float(np.abs(want).max()), 1e-300)
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-12)
    b = np.triu(g).copy()
    b[np.tril_indices(n, -1)] = np.nan
    np.testing.assert_allclose(lapack.eigvalsh_inplace(b, lower=False) / scale, want / scale, rtol=0, atol=1e-12)


def test_eigvalsh_in_place_refuses_what_it_cannot_take():
    from weightdiff.kernels import lapack

    if not lapack.available():
        pytest.skip("numpy's OpenBLAS does not export dsyevd here")
    for bad in (np.zeros((3, 4)), np.zeros((3, 3), np.float32), np.zeros((4, 4))[:, ::2][:2],
                np.asfortranarray(np.zeros((3, 3)))[::-1]):
        with pytest.raises(ValueError):
            lapack.eigvalsh_inplace(bad)
    with pytest.raises(RuntimeError):
        lapack.eigvalsh_inplace(np.full((3, 3), np.nan))


@pytest.mark.parametrize("base_dtype,exact_copy", [("BF16", True), ("F32", False)])
def test_a_wide_float32_copy_adds_to_the_bound_only_when_it_rounded(rng, monkeypatch, base_dtype, exact_copy):
    m, n = 40, 90                                      # wide: the delta is kept as float32
    w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
    t = w + rng.normal(0, 2e-3, (m, n)).astype(np.float32)
    raw_b = to_storage(w, base_dtype)
    raw_t = to_storage(t, "BF16")
    seen = []
    real = kgram.eig_error_bound
    monkeypatch.setattr(kgram, "eig_error_bound", lambda *a, **k: seen.append(k.get("d_float32")) or real(*a, **k))
    g = DeltaGram((m, n), base_dtype, "BF16")
    g.activate()
    g.feed(raw_b.reshape(-1), raw_t.reshape(-1))
    d = decode(raw_t, "BF16").astype(np.float64) - decode(raw_b, base_dtype)
    g.finish(float(np.sum(d * d)), 1.0, 8)
    assert seen == [not exact_copy]
    assert (g.inexact == 0) is exact_copy


def _gram_model(tmp_path, rng, noise_only: bool = False):
    """Four matrices changed by a rank-1 update over noise (s_1 stands apart); with ``noise_only`` a
    fifth changed by noise alone (a flat spectrum)."""
    base, tuned = {}, {}
    for i, (m, n) in enumerate([(600, 300), (300, 600), (700, 200), (500, 250)] + [(400, 300)] * noise_only):
        w = rng.normal(0, 0.02, (m, n)).astype(np.float32)
        base[f"model.layers.{i}.mlp.w"] = w
        tuned[f"model.layers.{i}.mlp.w"] = w + (0.01 if i < 4 else 0.0) * np.outer(
            rng.standard_normal(m), rng.standard_normal(n)).astype(np.float32) \
            + rng.normal(0, 2e-3, (m, n)).astype(np.float32)
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    return tmp_path / "b", tmp_path / "t"


def test_solving_on_a_background_thread_gives_the_same_bytes(tmp_path, rng, monkeypatch):
    from weightdiff.measure import backend

    b, t = _gram_model(tmp_path, rng)
    monkeypatch.setattr(backend, "LAPACK_MAX_ELEMENTS", 1000)        # every matrix takes the streamed Gram
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 50_000)
    submitted = []
    real_submit = compute.Solver.submit
    monkeypatch.setattr(compute.Solver, "submit", lambda self, fn: submitted.append(1) or real_submit(self, fn))
    overlapped = compare(b, t)
    assert len(submitted) == 4 and all(r.rank.method == "gram" for r in overlapped.tensors)
    monkeypatch.setattr(compute, "OVERLAP_MAX", 0)                   # solved in turn
    in_turn = compare(b, t)
    assert len(submitted) == 4
    assert overlapped.to_json(include_run=False) == in_turn.to_json(include_run=False)


def test_a_failed_background_solve_is_the_comparison_s_error(tmp_path, rng, monkeypatch):
    from weightdiff.measure import backend

    b, t = _gram_model(tmp_path, rng)
    monkeypatch.setattr(backend, "LAPACK_MAX_ELEMENTS", 1000)

    def boom(self, *a):
        raise RuntimeError("LAPACK dsyevd did not converge (info=3)")
    monkeypatch.setattr(DeltaGram, "finish", boom)
    with pytest.raises(RuntimeError, match="did not converge"):
        compare(b, t)


# --- --spectrum count: Sylvester inertia of the shifted Gram matrix ---------------------

def _sym_with_eigs(rng, lam):
    n = len(lam)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.asarray(lam, dtype=np.float64)) @ q.T
    return (a + a.T) / 2


@pytest.mark.parametrize("case", ["indefinite", "psd_rank5", "zeros", "swap", "diag", "one", "wide_range",
                                  "two_by_two", "negative"])
def test_ldl_inertia_is_the_count_of_eigenvalue_signs(rng, case):
    from weightdiff.kernels import lapack

    if not lapack.ldl_available():
        pytest.skip("numpy's OpenBLAS does not export dsytrf here")
    n = 60
    if case == "indefinite":
        a = _sym_with_eigs(rng, rng.standard_normal(n))
    elif case == "psd_rank5":
        x = rng.standard_normal((5, n)); a = x.T @ x - 1e-3 * np.eye(n)
    elif case == "zeros":
        a = np.zeros((n, n))
    elif case == "swap":                   # zero diagonal: Bunch-Kaufman must take 2 x 2 pivots
        a = np.kron(np.eye(n // 2), np.array([[0.0, 1.0], [1.0, 0.0]]))
    elif case == "diag":
        a = np.diag(np.r_[np.ones(20), -np.ones(25), np.zeros(15)])
    elif case == "one":
        a = np.array([[-3.0]])
    elif case == "wide_range":
        a = _sym_with_eigs(rng, rng.choice([-1, 1], n) * np.geomspace(1e-6, 1e6, n))
    elif case == "two_by_two":             # 2 x 2 blocks of both kinds: definite and indefinite
        a = np.kron(np.eye(n // 2), np.array([[1e-9, 1.0], [1.0, 1e-9]])) + np.diag(np.r_[np.full(n // 2, 3.0),
                                                                                           np.zeros(n // 2)])
    else:
        a = -_sym_with_eigs(rng, rng.uniform(1, 2, n))
    w = np.linalg.eigvalsh(a)
    low = np.tril(a).copy()
    low[np.triu_indices(len(a), 1)] = np.nan            # only the lower triangle is read
    got = lapack.ldl_inertia_inplace(low, lower=True)
    e = got.backward_error
    assert got.positive + got.negative + got.zero == len(a)
    assert np.count_nonzero(w > e) <= got.positive <= np.count_nonzero(w > -e)
    assert np.count_nonzero(w < -e) <= got.negative <= np.count_nonzero(w < e)
    if np.all(np.abs(w[w != 0]) > 1e3 * e) and np.all((w == 0) | (np.abs(w) > 1e3 * e)) and case != "zeros":
        assert got.positive == np.count_nonzero(w > 0) and got.negative == np.count_nonzero(w < 0)
    up = np.triu(a).copy()
    up[np.tril_indices(len(a), -1)] = np.nan
    assert lapack.ldl_inertia_inplace(up, lower=False)[:3] == got[:3]


def test_ldl_inertia_refuses_what_it_cannot_take():
    from weightdiff.kernels import lapack

    if not lapack.ldl_available():
        pytest.skip("numpy's OpenBLAS does not export dsytrf here")
    for bad in (np.zeros((3, 4)), np.zeros((3, 3), np.float32), np.asfortranarray(np.zeros((3, 3)))[::-1]):
        with pytest.raises(ValueError):
            lapack.ldl_inertia_inplace(bad)
    with pytest.raises(ValueError):
        lapack.ldl_inertia_inplace(np.full((3, 3), np.inf))
    assert lapack.ldl_inertia_inplace(np.zeros((0, 0))) == (0, 0, 0, 0.0)


@pytest.mark.parametrize("side_by_side", [True, False])
@pytest.mark.parametrize("guess", [512.0, 0.0])          # 0: the first guess is too small, a second pair runs
def test_the_inertia_bracket_holds_the_count_and_is_exact_off_the_threshold(rng, monkeypatch, side_by_side, guess):
    if not side_by_side:                   # one shift after the other in a single working array
        monkeypatch.setattr(kgram, "KEEP_GRAM_BYTES", 0)
    monkeypatch.setattr(kgram, "LDL_GUESS", guess)
    calls = []
    real = kgram._count_at
    monkeypatch.setattr(kgram, "_count_at", lambda *a: calls.append(1) or real(*a))
    x = _with_spectrum(rng, 300, 80, np.concatenate([np.geomspace(5.0, 0.5, 30), np.full(50, 1e-3)]))
    g = x.T @ x
    s = np.linalg.svd(x, compute_uv=False)
    for thr in (0.6, float(s[10] + s[11]) / 2, 2e-3, 10.0):
        calls.clear()
        lo, hi, band = kgram.inertia_bracket(g.copy(), thr * thr, 1e-12)
        assert lo == hi == _count_svd(x, thr) and band >= 1e-12
        assert len(calls) == (2 if guess else 4)
    # a cluster within the error bound of the threshold is bracketed, never guessed
    y = _with_spectrum(rng, 200, 60, np.array([3.0, 2.0] + [1.0 + e for e in (-1e-9, 0.0, 1e-9)] + [0.5]))
    lo, hi, _ = kgram.inertia_bracket(y.T @ y, 1.0, 1e-6)
    assert lo <= 2 and hi >= 5
    # a threshold below the error bound: the upper end is the whole side, from one factorization
    calls.clear()
    lo, hi, _ = kgram.inertia_bracket(g.copy(), 1e-8, 1e-3)
    assert hi == 80 and lo <= 30 and len(calls) == (1 if guess else 2)


def test_gram_top_gives_the_top_eigenvalues_from_below(rng):
    x = _with_spectrum(rng, 400, 200, np.concatenate([np.geomspace(10.0, 1.0, 30), rng.uniform(0, 0.1, 170)]))
    g = x.T @ x
    want = np.linalg.eigvalsh(g)[::-1]
    got = kgram.gram_top(g, 20, seed=3)
    assert got.shape == (20,)
    assert np.all(got <= want[:20] * (1 + 1e-12))
    np.testing.assert_allclose(got, want[:20], rtol=1e-6)
    assert np.array_equal(kgram.gram_top(g, 20, seed=3), got)           # seeded: same bits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_top_on_a_flat_spectrum_uses_the_whole_krylov_space(seed):
    """Pure noise (a dense fine-tune's delta): the top has not converged after 4 products, and the
    Ritz values of the last block alone were 3-5% low at the top and ~9% at the 20th; Rayleigh-Ritz
    on every block of the iteration takes them to under 1% and 4%, still from below."""
    x = np.random.default_rng(seed).standard_normal((1500, 500))
    g = x.T @ x
    want = np.linalg.eigvalsh(g)[::-1][:20]
    got = kgram.gram_top(g, 20, seed=3)
    assert np.all(got <= want * (1 + 1e-10))
    assert (want[0] - got[0]) / want[0] < 0.01 and np.max((want - got) / want) < 0.04


@pytest.mark.parametrize("shape", [(700, 300), (300, 700)])
@pytest.mark.parametrize("keep", [1 << 30, 0])
def test_the_count_mode_certifies_the_same_numerical_rank_as_the_full_spectrum(rng, shape, keep):
    m, n = shape
    base, tuned, nd2 = merged_pair(rng, "BF16", m=m, n=n)
    out = {}
    for count in (False, True):
        g = DeltaGram(shape, "BF16", "BF16", keep_bytes=keep, count=count)
        g.activate()
        fb, ft = base.reshape(-1), tuned.reshape(-1)
        for p in range(0, fb.size, 50_001):
            g.feed(fb[p:p + 50_001], ft[p:p + 50_001], True)
        out[count] = g.finish(nd2, 1.5, 64)
    full, cnt = out[False], out[True]
    assert cnt.method == "inertia" and "numerical_rank" not in cnt.bounds
    assert cnt.numerical_rank == full.numerical_rank == 8
    assert cnt.extra["count_error_bound"] > 0
    np.testing.assert_allclose(cnt.spectrum[:8], full.spectrum[:8], rtol=1e-6)
    assert cnt.stable_rank == pytest.approx(full.stable_rank, rel=1e-6)
    for key in ("energy_rank_90", "energy_rank_99"):        # exact, or a bracket holding the exact value
        b = cnt.bounds.get(key)
        assert getattr(cnt, key) == getattr(full, key) if b is None else b[0] <= getattr(full, key) <= b[1]


def test_compare_with_spectrum_count(tmp_path, rng, monkeypatch):
    from weightdiff.measure import backend

    b, t = _gram_model(tmp_path, rng)
    monkeypatch.setattr(backend, "LAPACK_MAX_ELEMENTS", 1000)        # every matrix takes the streamed Gram
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 50_000)
    full = compare(b, t)
    cnt = compare(b, t, spectrum="count")
    assert cnt.to_json(include_run=False) == compare(b, t, spectrum="count").to_json(include_run=False)
    assert cnt.settings["spectrum"] == "count" and full.settings["spectrum"] == "full"
    for f, c in zip(full.tensors, cnt.tensors):
        assert f.rank.method == "gram" and c.rank.method == "inertia"
        assert c.rank.numerical_rank == f.rank.numerical_rank and "numerical_rank" not in c.rank.bounds
        # every energy rank of the full spectrum lies in the count path's certified bracket, and a
        # stable rank the count path reports as exact is the full spectrum's
        for key in ("energy_rank_90", "energy_rank_99"):
            lo, hi = c.rank.bounds.get(key, [getattr(c.rank, key)] * 2)
            assert lo == getattr(c.rank, key) <= getattr(f.rank, key) <= hi, (key, lo, getattr(f.rank, key), hi)
        assert "stable_rank" not in c.rank.estimated      # rank-1 updates: s_1 stands apart
        assert c.rank.stable_rank == pytest.approx(f.rank.stable_rank, rel=1e-6)
    assert cnt.to_dict()["summary"]["form"]["max_numerical_rank"] == full.to_dict()["summary"]["form"]["max_numerical_rank"]


@pytest.mark.parametrize("n,rows", [(1, 4), (7, 3), (50, 512), (50, 16)])
def test_mirror_lower_makes_the_matrix_symmetric_from_its_lower_triangle(rng, n, rows):
    a = rng.standard_normal((n, n))
    want = np.tril(a) + np.tril(a, -1).T
    kgram.mirror_lower(a, rows)
    assert np.array_equal(a, want)


def test_the_cli_takes_spectrum_count_and_the_memo_says_how_ranks_were_counted(tmp_path, rng, monkeypatch):
    import json

    from click.testing import CliRunner
    from weightdiff.cli import main
    from weightdiff.measure import backend

    b, t = _gram_model(tmp_path, rng, noise_only=True)
    monkeypatch.setattr(backend, "LAPACK_MAX_ELEMENTS", 1000)
    out, memo = tmp_path / "out.json", tmp_path / "memo.md"
    res = CliRunner().invoke(main, ["compare", str(b), str(t), "--spectrum", "count", "--json", str(out),
                                    "--report", str(memo)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["spectrum"] == "count"
    assert {x["rank"]["method"] for x in data["tensors"]} == {"inertia"}
    assert "--spectrum count" in memo.read_text() and "Sylvester" in memo.read_text()
    # the top k are Ritz values: where s_1 stands apart (the rank-1 updates) the residual bound
    # certifies the stable rank; on the flat spectrum of pure noise it is flagged estimated and the
    # memo's table writes it ~value
    est = [x["rank"] for x in data["tensors"] if "stable_rank" in x["rank"]["estimated"]]
    assert [x["name"] for x in data["tensors"] if "stable_rank" in x["rank"]["estimated"]] == \
        ["model.layers.4.mlp.w"]
    from weightdiff.render import formats as fmt
    assert all(f"| {fmt.rank_text(r, 'stable_rank', fmt.num)} |".replace("~", "\\~") in memo.read_text()
               for r in est)                            # Markdown escapes the tilde
    assert all(fmt.rank_text(r, "stable_rank", fmt.num).startswith("~") for r in est)
    res = CliRunner().invoke(main, ["compare", str(b), str(t), "--json", str(out), "--report", str(memo)])
    assert res.exit_code == 0 and "Sylvester" not in memo.read_text()
    res = CliRunner().invoke(main, ["compare", str(b), str(t), "--spectrum", "eigen"])
    assert res.exit_code == 2 and "--spectrum" in res.output


def test_a_bracket_left_by_a_generous_guess_is_narrowed_at_the_proved_bound(rng, monkeypatch):
    """Eigenvalues 1e-9 from the threshold: inside the band a generous first guess makes, outside
    the bound the factorizations prove; the second pair pins the count."""
    s = np.sqrt(np.array([4.0, 3.0, 1.0 + 1e-9, 1.0 - 1e-9, 0.5]))
    x = _with_spectrum(rng, 50, 5, s)
    g = x.T @ x
    monkeypatch.setattr(kgram, "LDL_GUESS", 1e8)
    calls = []
    real = kgram._count_at
    monkeypatch.setattr(kgram, "_count_at", lambda *a: calls.append(1) or real(*a))
    lo, hi, band = kgram.inertia_bracket(g.copy(), 1.0, 1e-14)
    assert (lo, hi) == (3, 3) and len(calls) == 4 and band < 1e-9
    monkeypatch.setattr(kgram, "LDL_GUESS", 512.0)
    calls.clear()
    assert kgram.inertia_bracket(g.copy(), 1.0, 1e-14)[:2] == (3, 3) and len(calls) == 2


def test_a_second_pair_of_factorizations_holds_two_working_arrays_not_three(rng):
    """The matrix handed in is the first working array of every pair, refilled from the temporary
    file after its first use: a second pair holds two n x n arrays (n = 4096: 134 MB each, the 7B
    pair's peak RSS), not the caller's spent original beside two new ones."""
    x = rng.standard_normal((60, 40))
    g = x.T @ x
    want = g.copy()
    src = kgram._Source(g, None)
    a, b = src.arrays(2)
    assert a is g and b is not g and np.array_equal(b, want)
    a[:] = 0
    b[:] = 0
    c, d = src.arrays(2)
    assert c is g and d is not b and np.array_equal(c, want) and np.array_equal(d, want)
    g[:] = 1
    (e,) = src.arrays(1)                                # one at a time: the same array, refilled
    assert e is g and np.array_equal(e, want)
    src.close()


def test_a_float32_low_rank_change_the_gram_matrix_cannot_resolve_is_refined_by_an_svd(tmp_path, rng):
    """An F32 rank-1 change of a 1500 x 1200 matrix: the Gram matrix's eigenvalue error bound
    (~n u s_1^2) is above the squared noise floor of the float32 delta, so it could only say
    numerical_rank in [1, 1200] and the form read dense; the matrix is small enough to be read
    again and its delta's SVD gives rank 1 exactly."""
    w = rng.standard_normal((1500, 1200)).astype(np.float32)
    t = w + 1e-2 * np.outer(rng.standard_normal(1500), rng.standard_normal(1200)).astype(np.float32)
    write_checkpoint(tmp_path / "b", {"model.layers.0.mlp.w": w}, dtype="F32")
    write_checkpoint(tmp_path / "t", {"model.layers.0.mlp.w": t}, dtype="F32")
    r = compare(tmp_path / "b", tmp_path / "t")
    rank = r.tensors[0].rank
    assert rank.method == "exact" and rank.numerical_rank == 1 and not rank.bounds
    assert "note_refined" in rank.extra and r.summary.form["kind"] == "low_rank"
    # above the size limit the bracket stays (and reads as one)
    import weightdiff.measure.compute as compute_mod
    old = compute_mod.REFINE_MAX_ELEMENTS
    compute_mod.REFINE_MAX_ELEMENTS = 1000
    try:
        kept = compare(tmp_path / "b", tmp_path / "t").tensors[0].rank
    finally:
        compute_mod.REFINE_MAX_ELEMENTS = old
    assert kept.method == "gram" and kept.bounds["numerical_rank"][1] - kept.bounds["numerical_rank"][0] > 100


@pytest.mark.parametrize("name", ["model.layers.0.moe.experts.w_in", "blk.0.ffn_gate_exps.weight"])
def test_fused_expert_tensors_get_no_rank_capped_at_the_expert_count(tmp_path, rng, name):
    """``[experts, m, n]`` that no reader split into the experts' own (weightdiff.io.experts splits
    gpt-oss's, Llama 4's, Granite's and llama.cpp's stacks by name), read as one experts x (m n) matrix,
    would report every rank at most the number of experts (a full-rank change of each expert read "up
    to 4 directions"): no rank, a note, delta_params counts the tensor whole and the form is undecided."""
    base = {name: rng.normal(0, 0.02, (4, 96, 80)).astype(np.float32),
            "model.layers.0.mlp.router.weight": rng.normal(0, 0.02, (4, 96)).astype(np.float32)}
    tuned = dict(base)
    tuned[name] = base[name] + rng.normal(0, 1e-2, (4, 96, 80)).astype(np.float32)
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    r = compare(tmp_path / "b", tmp_path / "t")
    t = r.tensor(name)
    assert t.status == "changed" and t.rank is None and "4 experts of 96 x 80" in t.note
    # its directions are not measured: the form is undecided (it read dense by element counts)
    assert r.summary.form["kind"] == "undecided" and r.summary.form["matrices_without_rank"] == 1
    assert r.summary.delta_params == 4 * 96 * 80


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_the_delta_buffer_is_let_go_before_the_gram_and_its_solve(rng, monkeypatch, shape):
    """The delta's row buffer (64 MB) was kept through the wide Gram's assembly and the eigen-solve, beside an
    8,192-wide Gram's 537 MB: it is let go after the last flush."""
    base, tuned, nd2 = merged_pair(rng, "BF16", m=shape[0], n=shape[1])
    g = DeltaGram(shape, "BF16", "BF16")
    g.activate()
    g.feed(base.reshape(-1), tuned.reshape(-1), True)
    seen = []
    real_add, real_eig = kgram.GramAccumulator.add, kgram.gram_eigenvalues
    monkeypatch.setattr(kgram.GramAccumulator, "add", lambda self, x: seen.append(g._buf is None) or real_add(self, x))
    monkeypatch.setattr(kgram, "gram_eigenvalues", lambda acc, *a: seen.append(g._buf is None) or real_eig(acc, *a))
    from weightdiff.measure import rank_stream

    trims = []
    monkeypatch.setattr(rank_stream, "trim_heap", lambda: trims.append(g._buf is None))
    assert g.finish(nd2, 1.5, 8).numerical_rank == 8
    assert seen and all(seen), seen
    assert trims == [True]                                  # the freed heap handed back once, before the Gram


def test_trim_heap_finds_glibc_here():
    import platform
    import sys

    from weightdiff.measure.heap import _malloc_trim, trim_heap

    trim_heap()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert (_malloc_trim() is not None) == glibc


def test_large_arrays_are_mapped_one_by_one_and_given_back():
    """``map_large_arrays`` (set by the command line): after a 20 MB array was freed (which raises glibc's sliding
    threshold to 20 MB), a 3 MB one is still mapped on its own (given back when freed), where by default it comes
    from the heap, whose freed pages stay resident (a 70B-width rotated stream's measurement ran 45 MB above its
    arrays)."""
    import platform
    import subprocess
    import sys

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc's malloc")
    code = """
import ctypes, sys
import numpy as np
from weightdiff.measure.heap import map_large_arrays
class Info(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "set":
    assert map_large_arrays()
big = np.ones(20 << 17)                 # 20 MB, freed: glibc's sliding threshold rises to it
del big
before = libc.mallinfo2().hblkhd
a = np.ones(3 << 17)                    # 3 MB
print(libc.mallinfo2().hblkhd - before >= a.nbytes)
"""
    out = {}
    for how in ("set", "default"):
        p = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True)
        if "mallinfo2" in p.stderr:
            pytest.skip("glibc older than 2.33 (no mallinfo2)")
        assert p.returncode == 0, p.stderr
        out[how] = p.stdout.strip()
    assert out == {"set": "True", "default": "False"}       # mapped on its own / from the heap
