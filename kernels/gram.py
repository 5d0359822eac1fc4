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

import numpy as np

__all__ = ["TILE", "GramAccumulator", "gram_eigenvalues", "eig_error_bound", "certified_count",
           "singular_values"]

#: side of the float64 tiles the Gram matrix is kept in (lower tiles only), and the largest side
#: whose eigenvalues are computed in float64 (beyond it float32, to keep one n x n copy at 4 bytes)
TILE = 4096
EIG64_MAX = 4096

U64 = 2.0 ** -53
U32 = 2.0 ** -24


class GramAccumulator:
    """``G = sum_b X_b^T X_b`` for row blocks ``X_b`` (``b x n``), in float64 lower tiles.

    Only the tiles on and below the diagonal are stored (for n = 8192: 3 of 4 tiles of 4096^2,
    400 MB instead of 537 MB); a diagonal tile is one BLAS ``syrk`` (numpy spots ``x.T @ x``).
    ``rows`` counts the rows summed (the length of every dot product, for the error bound).
    """

    def __init__(self, n: int, tile: int = TILE):
        self.n = int(n)
        self.edges = list(range(0, self.n, tile)) + [self.n]
        k = len(self.edges) - 1
        self.tiles: dict[tuple[int, int], np.ndarray] = {
            (i, j): np.zeros((self.edges[i + 1] - self.edges[i], self.edges[j + 1] - self.edges[j]))
            for i in range(k) for j in range(i + 1)}
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        """``G += x^T x`` for a float64 ``b x n`` block (a transposed view is fine)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"block of shape {x.shape} does not have {self.n} columns")
        if x.dtype != np.float64:
            x = x.astype(np.float64)
        e = self.edges
        for (i, j), t in self.tiles.items():
            xi = x[:, e[i]:e[i + 1]]
            t += xi.T @ xi if i == j else xi.T @ x[:, e[j]:e[j + 1]]
        self.rows += x.shape[0]

    def matrix(self, dtype=np.float64) -> np.ndarray:
        """The full symmetric ``n x n`` matrix in ``dtype``; the tiles are freed as it is built.

        (numpy mirrors the triangle ``syrk`` computes, so the diagonal tiles are exactly symmetric.)"""
        g = np.empty((self.n, self.n), dtype=dtype)
        e = self.edges
        for (i, j) in sorted(self.tiles):
            t = self.tiles.pop((i, j))
            g[e[i]:e[i + 1], e[j]:e[j + 1]] = t
            if i != j:
                g[e[j]:e[j + 1], e[i]:e[i + 1]] = t.T
        return g


def gram_eigenvalues(acc: GramAccumulator, dtype=None) -> np.ndarray:
    """Eigenvalues of the accumulated Gram matrix, descending, float64.

    ``dtype``: of the eigen-solve; default float64 up to ``EIG64_MAX``, float32 beyond.
    The accumulator's tiles are consumed.
    """
    if dtype is None:
        dtype = np.float64 if acc.n <= EIG64_MAX else np.float32
    if acc.n == 0:
        return np.zeros(0)
    g = acc.matrix(dtype)
    w = np.linalg.eigvalsh(g, UPLO="L")
    del g
    return np.asarray(w, dtype=np.float64)[::-1].copy()


def eig_error_bound(n: int, rows: int, frob_d2: float, frob_g: float, eig_dtype=np.float64,
                    d_float32: bool = False) -> float:
    """``delta``: every computed eigenvalue of the Gram matrix is within it of the exact one.

    ``n``: side of G; ``rows``: length of its dot products; ``frob_d2``: ``||D||_F^2``;
    ``frob_g``: ``||G||_F`` (``sqrt(sum lambda_i^2)``); ``d_float32``: D was stored in float32.
    """
    u = U32 if np.dtype(eig_dtype) == np.float32 else U64
    gamma = rows * U64 / (1.0 - rows * U64) if rows * U64 < 0.5 else math.inf
    delta = gamma * frob_d2 + u * frob_g + 4.0 * n * u * frob_g
    if d_float32:
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
