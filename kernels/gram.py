"""The full spectrum of a large matrix from its streamed Gram matrix, with a certified count.

Pure array code (no dtype, file or name knowledge; ``weightdiff.measure.rank_stream`` feeds it).
For an ``m x n`` matrix ``D`` with ``n`` the smaller side, ``G = D^T D`` (``n x n``) has the
eigenvalues ``s_i^2``, so ``#{s_i > tau} = #{lambda_i(G) > tau^2}``. ``G`` is summed in
float64 over row blocks (``GramAccumulator.add``), so the ``m x n`` matrix is never needed
whole; for a wide matrix the caller passes column blocks transposed.

Eigenvalues or an inertia count: Sylvester's law gives the count alone from the LDL^T of
``G - tau^2 I`` (``inertia_bracket``, two factorizations that bracket the rounding), at a third of
the flops of a tridiagonalization; the eigenvalues (``gram_eigenvalues``) give every other rank field
exactly too. Which is faster depends on the LAPACK: at n = 4096 on one core, ``dsytrf_rk`` took
0.9 s against 8.8 s for ``dsyevd_2stage`` on the Intel development machine, while an earlier AMD
machine's ``dsytrf`` took 5-6.5 s against 2.9 s for ``eigvalsh`` (``benchmarks/bench_inertia.py``).
``compare --spectrum count`` chooses the count. See docs/rank.md.

Error bound (``eig_error_bound``), by Weyl's inequality every computed eigenvalue is within
``delta`` of the true one, where ``delta`` adds

* the float64 accumulation of ``G``: ``|G~ - G| <= gamma_m |D|^T |D|`` elementwise (Higham,
  Accuracy and Stability, 3.5), so ``||G~ - G||_2 <= gamma_m ||D||_F^2``;
* a float32 copy of ``D`` (when the caller stored it so): ``||E||_F <= u32 ||D||_F``, which moves
  each ``s_i^2`` by at most ``3 u32 ||D||_F^2``;
* the rounding of ``G`` to the eigen-solver's dtype: ``u ||G||_F``;
* the eigen-solver's backward error, ``p(n) u ||G||_2`` for Householder tridiagonalization
  and implicit QL/QR; we take ``p(n) = 4 n`` and ``||G||_F`` for ``||G||_2``.

``certified_count`` then brackets the count: eigenvalues farther than ``delta`` from the
threshold are on the same side of it as the true ones, those within ``delta`` are
undecided. The Gram squares the condition number: a threshold below about
``sqrt(delta)`` (in float64, ``sqrt(n u) ||D||_F``) cannot be resolved and the bracket
says so.

>>> acc = GramAccumulator(2)
>>> acc.add(np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
>>> lam = gram_eigenvalues(acc)
>>> lam.tolist(), certified_count(lam, 4.0, 1e-9)
([9.0, 1.0], (1, 1, 1))
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["TILE", "GramAccumulator", "gram_eigenvalues", "eig_dtype_for", "eig_error_bound",
           "gram_error_bound", "certified_count", "singular_values", "gram_top", "energy_caps",
           "total_error", "inertia_bracket"]

#: side of the tiles the Gram matrix is summed in (each tile one BLAS call on one BLAS thread; the
#: tiles run side by side on a small thread pool, so the sum is the same bits whatever the core count)
TILE = 2048
#: the largest side solved in float64 by ``numpy.linalg.eigvalsh`` (which copies its input) when
#: LAPACK cannot be called in place (``kernels.lapack``); beyond it float32, to keep the copy at 4 bytes
EIG64_MAX = 4096
#: threads summing tiles at most (each holds one tile product, TILE^2 float64, while it adds it)
WORKERS = 4

U64 = 2.0 ** -53
U32 = 2.0 ** -24

_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(WORKERS, os.cpu_count() or 1)),
                                   thread_name_prefix="weightdiff-gram")
    return _POOL


class GramAccumulator:
    """``G = sum_b X_b^T X_b`` for row blocks ``X_b`` (``b x n``), in one float64 ``n x n`` array.

    Only the lower triangle is summed, tile by tile (a diagonal tile is one BLAS ``syrk``,
    numpy spots ``x.T @ x``; an off-diagonal one a ``gemm``); every tile is computed by one
    BLAS call on one BLAS thread, and the tiles of a block run concurrently on a small thread
    pool. Each tile's bits therefore depend only on the data and ``tile``, never on the number
    of cores or BLAS threads (the JSON of a comparison is the same on every machine). A single
    tile (``n <= tile``) is split into two fixed row halves instead, summed in order.
    ``rows`` counts the rows summed (the length of every dot product, for the error bound).
    Memory: the ``n x n`` float64 array (n = 8192: 537 MB) plus one tile product per worker.
    """

    def __init__(self, n: int, tile: int = TILE):
        self.n = int(n)
        self.edges = list(range(0, self.n, tile)) + [self.n]
        k = len(self.edges) - 1
        self.pairs = [(i, j) for i in range(k) for j in range(i + 1)]
        self.g: np.ndarray | None = np.zeros((self.n, self.n))
        self.rows = 0

    @property
    def tiles(self) -> bool:
        """Whether the sum is still held (``matrix`` hands it over)."""
        return self.g is not None

    def _tile(self, x: np.ndarray, i: int, j: int) -> None:
        e = self.edges
        xi = x[:, e[i]:e[i + 1]]
        self.g[e[i]:e[i + 1], e[j]:e[j + 1]] += xi.T @ xi if i == j else xi.T @ x[:, e[j]:e[j + 1]]

    def add(self, x: np.ndarray) -> None:
        """``G += x^T x`` for a float64 ``b x n`` block (a transposed view is fine)."""
        from .blas import blas_threads

        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"block of shape {x.shape} does not have {self.n} columns")
        if self.g is None:
            raise ValueError("the Gram matrix was already handed over by matrix()")
        if x.dtype != np.float64:
            x = x.astype(np.float64)
        with blas_threads(1):
            if len(self.pairs) == 1:
                if self.n:
                    h = x.shape[0] // 2         # two fixed halves: the same sum on any machine
                    parts = list(_pool().map(lambda p: p.T @ p, (x[:h], x[h:])))
                    self.g += parts[0] + parts[1]
            else:
                list(_pool().map(lambda ij: self._tile(x, *ij), self.pairs))
        self.rows += x.shape[0]

    def matrix(self, dtype=np.float64, full: bool = True) -> np.ndarray:
        """The summed matrix in ``dtype``, handed over (the accumulator is spent). ``full``:
        mirror the lower triangle into the upper one; else only the lower triangle is meaningful."""
        g, self.g = self.g, None
        if g is None:
            raise ValueError("the Gram matrix was already handed over")
        if full:
            mirror_lower(g)
        return g if dtype == np.float64 else g.astype(dtype)


def mirror_lower(g: np.ndarray, rows: int = 512) -> None:
    """Copy the strictly lower triangle of the square ``g`` into its upper one, in place, a band of
    ``rows`` at a time (index arrays for the whole triangle would take 16 bytes per element)."""
    n = g.shape[0]
    for i in range(0, n, rows):
        j = min(n, i + rows)
        blk = g[i:j, i:j]
        iu = np.triu_indices(j - i, 1)
        blk[iu] = blk.T[iu]
        g[i:j, j:] = g[j:, i:j].T


def eig_dtype_for(n: int):
    """The dtype ``gram_eigenvalues`` solves an ``n x n`` Gram matrix in by default: float64
    whenever LAPACK can be called in place (one copy of the matrix), else float64 up to
    ``EIG64_MAX`` and float32 beyond."""
    from . import lapack

    return np.float64 if lapack.available() or n <= EIG64_MAX else np.float32


def gram_eigenvalues(acc: GramAccumulator, dtype=None) -> np.ndarray:
    """Eigenvalues of the accumulated Gram matrix, descending, float64, solved on one BLAS
    thread (LAPACK's tridiagonal reduction splits its work by thread count).

    ``dtype``: of the eigen-solve (default ``eig_dtype_for(n)``). In float64 with LAPACK
    available, ``dsyevd`` runs in place on the accumulator's array (``kernels.lapack``).
    The accumulator is spent.
    """
    from . import lapack
    from .blas import blas_threads

    if dtype is None:
        dtype = eig_dtype_for(acc.n)
    if acc.n == 0:
        acc.g = None
        return np.zeros(0)
    with blas_threads(1):
        if np.dtype(dtype) == np.float64 and lapack.available():
            g = acc.matrix(np.float64, full=False)
            w = lapack.eigvalsh_inplace(g, lower=True)
        else:
            g = acc.matrix(dtype, full=False)
            w = np.linalg.eigvalsh(g, UPLO="L")
    del g
    return np.asarray(w, dtype=np.float64)[::-1].copy()


def gram_error_bound(rows: int, frob_d2: float, d_float32: bool = False, copy_err: float | None = None) -> float:
    """``||G~ - G||_2`` at most: the float64 accumulation of ``G`` over dot products of length ``rows``
    and, when ``D`` was stored in float32, that copy's rounding (see ``eig_error_bound``)."""
    gamma = rows * U64 / (1.0 - rows * U64) if rows * U64 < 0.5 else math.inf
    delta = gamma * frob_d2
    if copy_err is not None:
        delta += 2.0 * math.sqrt(max(frob_d2, 0.0)) * copy_err + copy_err * copy_err
    elif d_float32:
        delta += 3.0 * U32 * frob_d2
    return float(delta)


def eig_error_bound(n: int, rows: int, frob_d2: float, frob_g: float, eig_dtype=np.float64,
                    d_float32: bool = False, copy_err: float | None = None) -> float:
    """``delta``: every computed eigenvalue of the Gram matrix is within it of the exact one.

    ``n``: side of G; ``rows``: length of its dot products; ``frob_d2``: ``||D||_F^2``;
    ``frob_g``: ``||G||_F`` (``sqrt(sum lambda_i^2)``); ``d_float32``: D was stored in float32,
    with ``copy_err`` = ``||E||_F`` of that copy's rounding when it is known (the decoder sums
    it): G moves by at most ``2 ||D||_F ||E||_F + ||E||_F^2``; unknown, ``||E||_F <= u32 ||D||_F``.
    """
    u = U32 if np.dtype(eig_dtype) == np.float32 else U64
    return float(gram_error_bound(rows, frob_d2, d_float32, copy_err) + u * frob_g + 4.0 * n * u * frob_g)


def certified_count(lam: np.ndarray, thr2: float, delta: float) -> tuple[int, int, int]:
    """``(count, lo, hi)``: computed eigenvalues above ``thr2``, and the bracket that holds the
    exact count given that each is within ``delta`` of the exact one (``lo == hi``: exact)."""
    lam = np.asarray(lam, dtype=np.float64)
    count = int(np.count_nonzero(lam > thr2))
    lo = int(np.count_nonzero(lam > thr2 + delta))
    hi = int(np.count_nonzero(lam > thr2 - delta))
    return count, lo, hi


def singular_values(lam: np.ndarray) -> np.ndarray:
    """``sqrt(max(lambda, 0))``, descending."""
    return np.sqrt(np.clip(np.sort(np.asarray(lam, dtype=np.float64))[::-1], 0.0, None))


#: directions of the Krylov basis kept in ``gram_top``: eigenvalues of its Gram matrix above this
#: share of the largest (a nearly dependent direction adds almost nothing, and dropping it keeps
#: the basis orthonormal to ~1e-10, so the Ritz values stay lower bounds up to that; 1e-3 dropped
#: directions that carry the gain on a flat spectrum: s_1^2 4% low instead of 2.3% at n = 4096)
KRYLOV_KEEP = 1e-6


def gram_top(g: np.ndarray, k: int, seed: int = 0, n_iter: int = 3, oversample: int = 16,
             vectors: bool = False):
    """The top ``k`` eigenvalues of the symmetric positive semi-definite float64 matrix ``g`` (full,
    not only a triangle), descending, by seeded block Krylov iteration: ``n_iter + 1`` products of
    ``g`` with ``k + oversample`` columns (each one two passes over ``D`` for ``g = D^T D``) build
    the orthonormal blocks Q_0 .. Q_n_iter of subspace iteration, and the Ritz values come from all
    of them at once (their span is the block Krylov space of the sketch), not from the last block
    alone: the products G Q_i are the ones the iteration made anyway, so this costs two small
    products and an eigen-solve of (n_iter + 1) (k + oversample) columns. On a flat spectrum (a
    dense fine-tune's noise, 14336 x 4096) s_1^2 comes out 2.3% low instead of 8% (Musco and
    Musco 2015); where the top stands apart both are exact to rounding.

    Ritz values of an orthonormal basis never exceed the eigenvalues they approximate (Cauchy
    interlacing), so each is a lower bound up to the rounding of the basis (``KRYLOV_KEEP``). On
    one BLAS thread (the same bits on every machine). ``g`` is left unchanged. With ``vectors``,
    returns ``(values, y)``: ``y`` (n x k) the Ritz vectors of the whole Krylov space's top k, for
    ``energy_caps``.
    """
    from .blas import blas_threads
    from .spectral import sketch

    n = g.shape[0]
    kk = min(k, n)
    if kk == 0:
        return (np.zeros(0), np.zeros((n, 0))) if vectors else np.zeros(0)
    width = min(n, kk + oversample)
    blocks = n_iter + 1
    basis = np.empty((n, blocks * width))          # Q_0 .. Q_n_iter side by side (n = 8192: 21 MB)
    products = np.empty_like(basis)                # G Q_0 .. G Q_n_iter
    with blas_threads(1):
        q, _ = np.linalg.qr(g @ sketch(n, width, seed).astype(np.float64))
        for i in range(blocks):
            basis[:, i * width:(i + 1) * width] = q
            np.matmul(g, q, out=products[:, i * width:(i + 1) * width])
            if i + 1 < blocks:
                q, _ = np.linalg.qr(products[:, i * width:(i + 1) * width])
        # the blocks are each orthonormal, not to each other: Rayleigh-Ritz on their span through
        # the eigenvectors of their Gram matrix (canonical orthogonalization)
        sig, v = np.linalg.eigh(basis.T @ basis)
        keep = sig > KRYLOV_KEEP * sig[-1]
        w = v[:, keep] / np.sqrt(sig[keep])
        m = basis.T @ products
        t = w.T @ ((m + m.T) * 0.5) @ w
        vals, z = np.linalg.eigh((t + t.T) * 0.5)
        vals, z = vals[::-1][:kk], z[:, ::-1][:, :kk]
        y = basis @ (w @ z) if vectors else None
        # the last block alone (plain subspace iteration, its product made above): where the top
        # stands apart its values are exact to rounding, the larger basis's to ~1e-10. The i-th Ritz
        # value of either basis is at most the i-th eigenvalue, so the larger of the two is too.
        m = q.T @ products[:, -width:]
        last = np.linalg.eigvalsh((m + m.T) * 0.5)[::-1][:kk]
        vals = np.maximum(vals, last)
    vals = np.clip(vals, 0.0, None).astype(np.float64)
    return (vals, y) if vectors else vals


def energy_caps(g: np.ndarray, y: np.ndarray | None, total: float, delta: float) -> np.ndarray:
    """``caps[j]`` (j = 0..n): certified upper bounds on ``lambda_1 + ... + lambda_j``, the sum of
    the ``j`` largest eigenvalues of the exact Gram matrix ``G`` whose trace is ``total`` and which
    the computed ``g`` (full, float64) approximates within ``delta`` in Frobenius norm (the bound of
    ``gram_error_bound``). The lower ends of the energy ranks come from these
    (``kernels.spectral.lower_rank``); ``caps[1]`` bounds ``s_1^2``. The caps exceed the sums by at
    least ``total_error(n, delta)``, what ``total`` (the stats pass's float64 sum) may be off by, so
    that comparing them with ``q total`` stays certified.

    The smaller of two bounds (``kernels.spectral``): ``frobenius_caps`` from ``total`` and
    ``||G||_F <= ||g||_F + delta`` alone (tight on a flat spectrum: a dense fine-tune), and
    ``ritz_caps`` from a Rayleigh-Ritz step on ``y`` (the Ritz vectors of ``gram_top``,
    re-orthonormalized here) and its residual (tight where the top stands apart: a low-rank
    change over a noise floor). The rounding of this step is covered by ``j (4 (n + k) u ||g||_F)``
    and ``G - g`` by ``(sqrt(j) + n) delta`` (Ky Fan, and ``g``'s eigenvalues at most ``delta``
    below 0). Cost: one ``n x n`` by ``n x k`` product, on one
    BLAS thread; ``g`` is left unchanged.
    """
    from .blas import blas_threads
    from .spectral import _envelope, frobenius_caps, ritz_step_caps

    n = g.shape[0]
    total = max(float(total), 0.0)
    e_t = total_error(n, delta)
    # ||g||_F summed in float64 over n^2 squares: at most n^2 u relative low
    frob_g = math.sqrt(float(np.vdot(g, g))) * (1.0 + n * n * U64)
    caps = frobenius_caps(n, total, (frob_g + float(delta)) ** 2, total_err=e_t)
    if y is None or y.shape[1] == 0 or n == 0:
        return _envelope(caps + e_t, total + e_t)
    with blas_threads(1):
        q, _ = np.linalg.qr(np.asarray(y, dtype=np.float64))
        fine = ritz_step_caps(q, g @ q, float(np.trace(g)), frob_g, 4.0 * (n + q.shape[1]) * U64 * frob_g)
    j = np.arange(n + 1, dtype=np.float64)
    # G - g moves S_j by at most sqrt(j) delta (Ky Fan), and g's own eigenvalues can dip below 0 by
    # delta, which the PSD envelope of ritz_caps ignores: at most n delta more
    fine = fine + (np.sqrt(j) + n) * float(delta)
    # + e_t: the caller compares with q x the computed total, which may exceed the true one by e_t
    return _envelope(np.minimum(caps, fine) + e_t, total + e_t)


def total_error(n: int, delta: float) -> float:
    """How far the stats pass's ``norm_delta^2`` (float64 sum of the ``rows x n`` squares) can be from
    the trace of the exact Gram matrix: ``rows n u ||D||_F^2``, at most ``n delta`` for the
    ``delta`` of ``gram_error_bound`` (``rows u ||D||_F^2`` and more)."""
    return float(n) * float(delta)


#: a Gram matrix up to this size is factored at both shifts at once (two working arrays, each on
#: its own thread and one BLAS thread); a larger one (n = 8192: 537 MB) at one shift after the other
#: in a single working array. The original waits in an unlinked temporary file either way.
KEEP_GRAM_BYTES = 160 << 20

#: first guess of || |L||D||L^T| ||_2 / (n max|A_ii|) (see ``inertia_bracket``)
LDL_GUESS = 512.0

_LDL_POOL = None


def _ldl_pool():
    global _LDL_POOL
    if _LDL_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _LDL_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weightdiff-ldl")
    return _LDL_POOL


def pwrite_all(fd: int, arr: np.ndarray, offset: int = 0) -> None:
    """Write the contiguous ``arr`` to ``fd`` at ``offset`` whole (``pwrite`` may write less)."""
    mv = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def pread_all(fd: int, out: np.ndarray, offset: int = 0) -> np.ndarray:
    """Fill the contiguous ``out`` from ``fd`` at ``offset`` (OSError on a short file)."""
    mv = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(mv):
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read of a temporary file at {offset + done}")
        done += got
    return out


class _Source:
    """Working copies of a matrix for in-place factorizations. The original is saved to an unlinked
    temporary file; ``arrays(k)`` gives ``k`` arrays holding it: the caller's matrix itself (the
    caller holds it until the count is done anyway), refilled from the file after its first use,
    and ``k - 1`` new ones. So a second pair of factorizations holds two n x n arrays, not three."""

    def __init__(self, g: np.ndarray, spill_dir: str | None):
        import tempfile

        self.g: np.ndarray | None = g
        self.fresh = True
        self.file = tempfile.TemporaryFile(dir=spill_dir, prefix="weightdiff-gram-")
        pwrite_all(self.file.fileno(), g)

    def _fill(self, out: np.ndarray) -> np.ndarray:
        return pread_all(self.file.fileno(), out)

    def arrays(self, k: int) -> list[np.ndarray]:
        out = [self.g if self.fresh else self._fill(self.g)]
        out += [self._fill(np.empty(self.g.shape, self.g.dtype)) for _ in range(k - 1)]
        self.fresh = False
        return out

    def close(self) -> None:
        self.g = None
        if self.file is not None:
            self.file.close()
            self.file = None


def _count_at(a: np.ndarray, shift: float, dmax: float) -> tuple[int, float]:
    """Positive pivots of ``a - shift I`` (``a`` consumed) and the error bound of that count."""
    from . import lapack
    from .blas import blas_threads

    a[np.diag_indices(a.shape[0])] -= shift
    with blas_threads(1):
        got = lapack.ldl_inertia_inplace(a, lower=True)
    return got.positive, got.backward_error + U64 * (dmax + abs(shift))


def inertia_bracket(g: np.ndarray, thr2: float, delta: float, spill_dir: str | None = None) -> tuple[int, int, float]:
    """``(lo, hi, band)``: the exact count of eigenvalues above ``thr2`` of the matrix ``G`` that the
    computed float64 ``g`` approximates within ``delta`` (``||g - G||_2 <= delta``) lies in
    ``[lo, hi]``, from two LDL^T factorizations (Sylvester's law of inertia, ``kernels.lapack``).

    ``lo`` is the number of positive pivots of ``g - s_hi I`` and ``hi`` that of ``g - s_lo I`` with
    ``s_hi = thr2 + band``, ``s_lo = thr2 - band``, ``band = delta + e``; ``e`` bounds the rounding of
    forming the shift and the factorization's backward error, checked after each factorization
    (a pair whose bound exceeds ``e`` is factored again with a larger ``e``; a pair that leaves a
    bracket with a bound well under the guessed ``e`` is factored once more at the proved bound).
    By Weyl's
    inequality each count is then on the right side of the exact one: ``lo == hi`` makes it
    exact; otherwise ``hi - lo`` eigenvalues lie within ``band`` of ``thr2``. When ``s_lo < 0`` the
    upper end is ``n`` (``G`` is positive semi-definite) and no second factorization is needed.
    Only the lower triangle of ``g`` is read; ``g`` is consumed (overwritten). Each factorization
    runs on one BLAS thread, so the counts are the same on every machine. Memory: one more
    working array up to ``KEEP_GRAM_BYTES`` (the two shifts factored side by side), none beyond
    (``g`` itself is the working array, refilled from a temporary file).
    """
    n = g.shape[0]
    if n == 0:
        return 0, 0, float(delta)
    d = np.diagonal(g)
    norm_g = math.sqrt(float(np.sum(d * d)) + 2.0 * sum(float(np.dot(r[:i], r[:i])) for i, r in enumerate(g)))
    dmax = float(np.max(np.abs(d)))
    # the factorization's bound is p(n) u (|| |A| || + || |L||D||L^T| ||); the second term measured
    # 8-230 n max|A_ii| on the shifted Gram matrices of a Mistral-7B-shaped pair, so the first guess
    # is 512 n max|A_ii|: a guess too small costs a second pair of factorizations, one too large
    # widens the band (here ~1e-9 against eigenvalue gaps of ~3e-7)
    e = (10.0 * n + 10.0) * U64 * (norm_g + LDL_GUESS * n * (dmax + abs(thr2)))
    together = g.nbytes <= KEEP_GRAM_BYTES
    src = _Source(g, spill_dir)
    del g, d
    tightened = False
    best = None
    try:
        for _ in range(8):
            band = float(delta) + e
            shifts = [s for s in (thr2 + band, thr2 - band) if s >= 0]
            if together and len(shifts) == 2:
                arrays = src.arrays(2)
                got = list(_ldl_pool().map(lambda a_s: _count_at(a_s[0], a_s[1], dmax), zip(arrays, shifts)))
                del arrays
            else:
                got = [_count_at(src.arrays(1)[0], s, dmax) for s in shifts]
            counts = [c for c, _ in got] + [n] * (2 - len(got))
            worst = max(err for _, err in got)
            if worst <= e:
                lo, hi = min(counts), max(counts)
                if tightened:       # both brackets hold the count: their intersection does
                    return max(lo, best[0]), min(hi, best[1]), band
                if lo == hi or worst * 1.25 >= e or e < 0.1 * band:    # nothing a smaller e would change
                    return lo, hi, band
                # a bracket from a guess well above the bound the factorizations proved: once more
                # with the proved bound (and a margin)
                best = (lo, hi, band)
                tightened = True
                e = 1.25 * worst
                continue
            if tightened:           # the narrower band's factorizations had a larger bound
                return best
            e = 2.0 * worst
        raise RuntimeError("the LDL^T error bound did not settle")
    finally:
        src.close()
