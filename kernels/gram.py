"""The full spectrum of a large matrix from its streamed Gram matrix, with a certified count.

Pure array code (no dtype, file or name knowledge; ``weightdiff.measure.rank_stream`` feeds it).
For an ``m x n`` matrix ``D`` with ``n`` the smaller side, ``G = D^T D`` (``n x n``) has the
eigenvalues ``s_i^2``, so ``#{s_i > tau} = #{lambda_i(G) > tau^2}``. ``G`` is summed in
float64 over row blocks (``GramAccumulator.add``), so the ``m x n`` matrix is never needed
whole; for a wide matrix the caller passes column blocks transposed.

Why eigenvalues and not an LDL^T inertia count: Sylvester's law gives the same count from
the LDL^T of ``G - tau^2 I`` at a third of the flops of a tridiagonalization, but the LDL^T
numpy can reach (LAPACK ``dsytrf`` and its rook, rk and Aasen variants in numpy's OpenBLAS)
took 5-6.5 s at n = 4096 on the development machine against 2.9 s for ``eigvalsh``
(``benchmarks/bench_inertia.py``), and the eigenvalues give every other rank field exactly
too. See docs/rank.md.

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
           "certified_count", "singular_values"]

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
            iu = np.triu_indices(self.n, 1)
            g[iu] = g.T[iu]
        return g if dtype == np.float64 else g.astype(dtype)


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


def eig_error_bound(n: int, rows: int, frob_d2: float, frob_g: float, eig_dtype=np.float64,
                    d_float32: bool = False, copy_err: float | None = None) -> float:
    """``delta``: every computed eigenvalue of the Gram matrix is within it of the exact one.

    ``n``: side of G; ``rows``: length of its dot products; ``frob_d2``: ``||D||_F^2``;
    ``frob_g``: ``||G||_F`` (``sqrt(sum lambda_i^2)``); ``d_float32``: D was stored in float32,
    with ``copy_err`` = ``||E||_F`` of that copy's rounding when it is known (the decoder sums
    it): G moves by at most ``2 ||D||_F ||E||_F + ||E||_F^2``; unknown, ``||E||_F <= u32 ||D||_F``.
    """
    u = U32 if np.dtype(eig_dtype) == np.float32 else U64
    gamma = rows * U64 / (1.0 - rows * U64) if rows * U64 < 0.5 else math.inf
    delta = gamma * frob_d2 + u * frob_g + 4.0 * n * u * frob_g
    if copy_err is not None:
        delta += 2.0 * math.sqrt(max(frob_d2, 0.0)) * copy_err + copy_err * copy_err
    elif d_float32:
        delta += 3.0 * U32 * frob_d2
    return float(delta)


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
