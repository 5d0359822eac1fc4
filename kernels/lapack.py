"""LAPACK's symmetric eigenvalue solver and LDL^T factorization in place, from the OpenBLAS
that numpy ships.

``numpy.linalg.eigvalsh`` copies its input before LAPACK sees it: for the 8192 x 8192 Gram
matrix of a 70B-width matrix that is a second 537 MB in float64, which is why the streamed
rank path used to solve in float32 beyond 4096 (and got a bracket 20% wide). ``eigvalsh_inplace``
calls ``dsyevd`` (eigenvalues only) on the caller's array, which it overwrites: one copy of the
matrix, in float64, at any size. ``ldl_inertia_inplace`` calls ``dsytrf_rk`` (bounded
Bunch-Kaufman LDL^T, which numpy does not expose) and returns the inertia of the matrix by Sylvester's law,
with an a posteriori bound on the factorization's backward error. The symbols are those of
numpy's bundled OpenBLAS (``scipy_dsyevd_64_``, 64-bit integers; or the 32-bit
``scipy_dsyevd_``); where neither is found (another BLAS), ``available()`` is False and callers
fall back to numpy.

Pure array code: no file or model knowledge.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
from typing import NamedTuple

import numpy as np

__all__ = ["available", "eigvalsh_inplace", "ldl_available", "ldl_inertia_inplace", "Inertia", "polar_available",
           "polar_inplace", "PolarFailed", "transpose_inplace"]


#: LAPACK's two-stage tridiagonal reduction (eigenvalues only) is BLAS-3 rich: 3-4x faster than
#: ``dsyevd`` at n = 4096 on one core; plain ``dsyevd`` where an older LAPACK lacks it
_NAMES = (("scipy_dsyevd_2stage_64_", ctypes.c_int64), ("scipy_dsyevd_2stage_", ctypes.c_int32),
          ("scipy_dsyevd_64_", ctypes.c_int64), ("scipy_dsyevd_", ctypes.c_int32))


_SYTRF = (("scipy_dsytrf_rk_64_", ctypes.c_int64), ("scipy_dsytrf_rk_", ctypes.c_int32))
_GETRF = (("scipy_dgetrf_64_", ctypes.c_int64), ("scipy_dgetrf_", ctypes.c_int32))
_GETRI = (("scipy_dgetri_64_", ctypes.c_int64), ("scipy_dgetri_", ctypes.c_int32))


def _find(names):
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    paths = sorted(glob.glob(os.path.join(libdir, "*openblas*")))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, itype in names:
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = None
                return fn, itype
    return None


@functools.lru_cache(maxsize=1)
def _syevd():
    return _find(_NAMES)


@functools.lru_cache(maxsize=1)
def _sytrf():
    return _find(_SYTRF)


@functools.lru_cache(maxsize=1)
def _getrf_getri():
    f, i = _find(_GETRF), _find(_GETRI)
    return (f[0], i[0], f[1]) if f is not None and i is not None and f[1] is i[1] else None


def _checked(found, routine: str, a: np.ndarray, caller: str):
    """The LAPACK entry point ``found`` (RuntimeError when missing), after checking that ``a`` is a
    matrix ``caller`` can hand it in place (ValueError)."""
    if found is None:
        raise RuntimeError(f"LAPACK {routine} not found in numpy's OpenBLAS")
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != np.float64 or not a.flags.c_contiguous \
            or not a.flags.writeable:
        raise ValueError(f"{caller} needs a writeable C-contiguous square float64 matrix")
    return found


def available() -> bool:
    """Whether ``eigvalsh_inplace`` can run (numpy's OpenBLAS exports ``dsyevd``)."""
    return _syevd() is not None


def eigvalsh_inplace(a: np.ndarray, lower: bool = True) -> np.ndarray:
    """Eigenvalues (ascending, float64) of the symmetric C-contiguous float64 matrix ``a``,
    read from its lower triangle (``lower``) or upper; ``a`` is destroyed.

    Raises RuntimeError if LAPACK reports a failure, ValueError on a wrong input.
    """
    fn, itype = _checked(_syevd(), "dsyevd", a, "eigvalsh_inplace")
    n = a.shape[0]
    w = np.zeros(n)
    if n == 0:
        return w
    # row-major lower triangle == column-major upper triangle
    uplo = ctypes.c_char_p(b"U" if lower else b"L")
    jobz = ctypes.c_char_p(b"N")
    info = itype(0)
    nn = itype(n)
    iwork = np.zeros(1, dtype=np.int64 if itype is ctypes.c_int64 else np.int32)

    def call(work: np.ndarray, lwork: int, liwork: int) -> None:
        fn(jobz, uplo, ctypes.byref(nn), a.ctypes.data_as(ctypes.c_void_p), ctypes.byref(nn),
           w.ctypes.data_as(ctypes.c_void_p), work.ctypes.data_as(ctypes.c_void_p), ctypes.byref(itype(lwork)),
           iwork.ctypes.data_as(ctypes.c_void_p), ctypes.byref(itype(liwork)), ctypes.byref(info),
           ctypes.c_size_t(1), ctypes.c_size_t(1))

    query = np.zeros(1)
    call(query, -1, -1)
    if info.value != 0:
        raise RuntimeError(f"LAPACK dsyevd workspace query failed (info={info.value})")
    lwork = max(int(query[0]), 2 * n + 1)
    liwork = max(int(iwork[0]), 1)
    work = np.empty(lwork)
    iwork = np.zeros(liwork, dtype=iwork.dtype)
    call(work, lwork, liwork)
    if info.value != 0:
        raise RuntimeError(f"LAPACK dsyevd did not converge (info={info.value})")
    if not np.all(np.isfinite(w)):
        raise RuntimeError("LAPACK dsyevd returned non-finite eigenvalues")
    return w


def ldl_available() -> bool:
    """Whether ``ldl_inertia_inplace`` can run (numpy's OpenBLAS exports ``dsytrf_rk``)."""
    return _sytrf() is not None


class Inertia(NamedTuple):
    """Signs of the eigenvalues of ``A + E`` for the ``E`` the factorization's rounding made:
    ``positive + negative + zero = n`` exactly, and ``||E||_2 <= backward_error``."""

    positive: int
    negative: int
    zero: int
    backward_error: float


#: rows summed at a time when ``ldl_inertia_inplace`` reads the triangle (bounded temporaries)
_ROWS = 256
U64 = 2.0 ** -53


def _abs_row_sums(a: np.ndarray) -> np.ndarray:
    """Row sums of ``|A|`` for the symmetric matrix held in the lower triangle of ``a`` (row-major),
    in row blocks (no n x n temporary)."""
    n = a.shape[0]
    out = np.zeros(n)
    for i in range(0, n, _ROWS):
        j = min(n, i + _ROWS)
        blk = np.abs(a[i:j, :j])
        blk[:, i:j] = np.tril(blk[:, i:j])
        out[i:j] += blk.sum(axis=1)                       # the lower triangle's part of rows i..j
        np.fill_diagonal(blk[:, i:j], 0.0)
        out[:j] += blk.sum(axis=0)                        # mirrored: the upper part of rows 0..j
    return out


def _lower_times(a: np.ndarray, x: np.ndarray, transpose: bool) -> np.ndarray:
    """``|L| x`` (or ``|L|^T x``) for the unit lower triangular ``L`` whose strict lower part is
    that of ``a`` (row-major), in row blocks."""
    n = a.shape[0]
    out = x.copy()
    for i in range(0, n, _ROWS):
        j = min(n, i + _ROWS)
        blk = np.abs(a[i:j, :j])
        blk[:, i:j] = np.tril(blk[:, i:j], -1)
        if transpose:
            out[:j] += blk.T @ x[i:j]
        else:
            out[i:j] += blk @ x[:j]
    return out


def ldl_inertia_inplace(a: np.ndarray, lower: bool = True) -> Inertia:
    """Inertia of the symmetric C-contiguous float64 matrix ``a`` (read from its lower triangle,
    or upper with ``lower=False``) from LAPACK ``dsytrf_rk``; ``a`` is destroyed.

    Sylvester's law: ``P A P^T = L D L^T`` with ``L`` unit lower triangular and ``D`` block
    diagonal (1 x 1 and 2 x 2 blocks) has the inertia of ``D``. A 2 x 2 block
    ``[[p, q], [q, r]]`` has one eigenvalue of each sign when ``p r < q^2``, else two of the
    sign of ``p + r``. What is counted is the inertia of ``A + E`` where ``E`` is the rounding
    of the factorization; for a factorization with 1 x 1 and 2 x 2 pivots (bounded Bunch-Kaufman
    here) ``|E| <= p(n) u (|A| + |L| |D| |L|^T)`` (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., thm. 11.3, p(n) linear; we take 10 n + 10). ``dsytrf_rk`` leaves ``L``
    in standard form, so the bound is computed after the fact: ``|| |A| ||_2`` and
    ``|| |L| |D| |L|^T ||_2`` are at most their largest row sums (symmetric, non-negative), the
    latter ``|L| (|D| (|L|^T 1))`` by two triangular products. That is ``backward_error``.

    Raises RuntimeError when LAPACK is missing or reports an argument error, ValueError on a
    wrong input.
    """
    fn, itype = _checked(_sytrf(), "dsytrf_rk", a, "ldl_inertia_inplace")
    n = a.shape[0]
    if n == 0:
        return Inertia(0, 0, 0, 0.0)
    if not lower:              # work on the lower triangle: mirror the upper one into it
        il = np.tril_indices(n, -1)
        a[il] = a.T[il]
    norm_a = float(np.max(_abs_row_sums(a)))
    if not math.isfinite(norm_a):
        raise ValueError("ldl_inertia_inplace needs a finite matrix")
    # row-major lower triangle == column-major upper triangle: L here is LAPACK's U^T
    uplo = ctypes.c_char_p(b"U")
    info = itype(0)
    nn = itype(n)
    ipiv = np.zeros(n, dtype=np.int64 if itype is ctypes.c_int64 else np.int32)
    e = np.zeros(n)

    def call(work: np.ndarray, lwork: int) -> None:
        fn(uplo, ctypes.byref(nn), a.ctypes.data_as(ctypes.c_void_p), ctypes.byref(nn),
           e.ctypes.data_as(ctypes.c_void_p), ipiv.ctypes.data_as(ctypes.c_void_p),
           work.ctypes.data_as(ctypes.c_void_p), ctypes.byref(itype(lwork)), ctypes.byref(info),
           ctypes.c_size_t(1))

    query = np.zeros(1)
    call(query, -1)
    if info.value != 0:
        raise RuntimeError(f"LAPACK dsytrf_rk workspace query failed (info={info.value})")
    work = np.empty(max(int(query[0]), 1))
    call(work, work.size)
    if info.value < 0:
        raise RuntimeError(f"LAPACK dsytrf_rk: argument {-info.value} was wrong")
    # info > 0: an exactly zero pivot (D singular); the factorization is complete and counted below
    d = np.diagonal(a).copy()
    second = np.flatnonzero(e)                  # E(i) = D(i-1, i): a 2 x 2 block at (i-1, i)
    first = second - 1
    if second.size and (first[0] < 0 or np.any(np.diff(second) < 2) or not np.all(ipiv[second] < 0)
                        or not np.all(ipiv[first] < 0)):
        raise RuntimeError("LAPACK dsytrf_rk returned an unreadable pivot sequence")
    two = np.zeros(n, bool)
    two[first] = two[second] = True
    one = ~two
    pos = int(np.count_nonzero(d[one] > 0))
    neg = int(np.count_nonzero(d[one] < 0))
    q = e[second]
    p_, r_ = d[first], d[second]
    det = p_ * r_ - q * q
    mixed = det < 0
    pos += int(np.count_nonzero(mixed)) + 2 * int(np.count_nonzero((det > 0) & (p_ + r_ > 0)))
    neg += int(np.count_nonzero(mixed)) + 2 * int(np.count_nonzero((det > 0) & (p_ + r_ < 0)))
    pos += int(np.count_nonzero((det == 0) & (p_ + r_ > 0)))
    neg += int(np.count_nonzero((det == 0) & (p_ + r_ < 0)))
    zero = n - pos - neg
    a[second, first] = 0.0                      # inside a 2 x 2 block L is the identity
    v = _lower_times(a, np.ones(n), transpose=True)      # |L|^T 1 (|L| is LAPACK's |U|^T)
    y = np.abs(d) * v
    y[first] += np.abs(q) * v[second]
    y[second] += np.abs(q) * v[first]
    m_inf = float(np.max(_lower_times(a, y, transpose=False)))
    if not math.isfinite(m_inf):
        raise RuntimeError("LAPACK dsytrf_rk returned non-finite factors")
    err = (10.0 * n + 10.0) * U64 * (norm_a + m_inf)
    return Inertia(pos, neg, zero, float(err))


def polar_available() -> bool:
    """Whether ``polar_inplace`` can run (numpy's OpenBLAS exports ``dgetrf`` and ``dgetri``)."""
    return _getrf_getri() is not None


class PolarFailed(RuntimeError):
    """``polar_inplace`` could not finish: the matrix is singular to working precision, the iteration did not
    converge, or its result is not orthogonal to the tolerance; the caller falls back to an SVD."""


#: bytes of one row block ``polar_inplace`` updates at a time (and at most an eighth of the matrix)
_POLAR_BYTES = 8 << 20


def _inverse_inplace(y: np.ndarray, ipiv: np.ndarray, fns) -> None:
    """``y`` (C-contiguous float64, square) replaced by its inverse: LU with partial pivoting (``dgetrf``), then
    ``dgetri``. Row-major ``Y`` is LAPACK's column-major ``Y^T``, whose inverse, read row-major, is ``Y^-1``."""
    getrf, getri, itype = fns
    n = y.shape[0]
    nn, info = itype(n), itype(0)
    ptr = y.ctypes.data_as(ctypes.c_void_p)
    getrf(ctypes.byref(nn), ctypes.byref(nn), ptr, ctypes.byref(nn), ipiv.ctypes.data_as(ctypes.c_void_p),
          ctypes.byref(info))
    if info.value != 0:
        raise PolarFailed(f"LAPACK dgetrf: {'singular matrix' if info.value > 0 else 'argument error'} "
                          f"(info={info.value})")
    query = np.zeros(1)
    getri(ctypes.byref(nn), ptr, ctypes.byref(nn), ipiv.ctypes.data_as(ctypes.c_void_p),
          query.ctypes.data_as(ctypes.c_void_p), ctypes.byref(itype(-1)), ctypes.byref(info))
    work = np.empty(max(int(query[0]) if info.value == 0 else 0, n, 1))
    getri(ctypes.byref(nn), ptr, ctypes.byref(nn), ipiv.ctypes.data_as(ctypes.c_void_p),
          work.ctypes.data_as(ctypes.c_void_p), ctypes.byref(itype(work.size)), ctypes.byref(info))
    if info.value != 0:
        raise PolarFailed(f"LAPACK dgetri: {'singular matrix' if info.value > 0 else 'argument error'} "
                          f"(info={info.value})")


def transpose_inplace(a: np.ndarray, tile: int = 256) -> None:
    """A square C-contiguous array replaced by its transpose, tile pair by tile pair: temporaries of one tile
    (``tile`` x ``tile``), never of the array.

    >>> a = np.arange(9.0).reshape(3, 3); transpose_inplace(a, tile=2); a.tolist()
    [[0.0, 3.0, 6.0], [1.0, 4.0, 7.0], [2.0, 5.0, 8.0]]
    """
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError("transpose_inplace: a square matrix")
    n, tile = a.shape[0], max(1, int(tile))
    for i in range(0, n, tile):
        i1 = min(n, i + tile)
        a[i:i1, i:i1] = a[i:i1, i:i1].T.copy()
        for j in range(i1, n, tile):
            j1 = min(n, j + tile)
            t = a[i:i1, j:j1].copy()
            a[i:i1, j:j1] = a[j:j1, i:i1].T
            a[j:j1, i:i1] = t.T


def polar_inplace(a: np.ndarray, max_iter: int = 60, tol: float = 1e-9, stash=None) -> int:
    """``a`` (square, C-contiguous float64) replaced by the orthogonal factor ``U`` of its polar decomposition
    ``A = U H`` (``H`` symmetric positive semidefinite): the ``U V^T`` of ``A``'s SVD, the orthogonal matrix closest
    to ``A`` and the one maximising ``trace(U^T A)`` (orthogonal Procrustes). Returns the iterations taken.

    Newton's iteration ``X <- (mu X + X^-T / mu) / 2`` with Frobenius-norm scaling
    ``mu = (||X^-1|| / ||X||)^(1/2)`` until the step is below 1e-2 relative, unscaled after (Higham, Functions of
    Matrices, 2008, alg. 8.20; quadratic near the end), stopping one iteration after a step below 1e-7 relative.
    Memory: ``a`` and one copy (its inverse, in place), where numpy's SVD of ``a`` holds seven n x n float64
    arrays (its copy, U, V^T, the divide-and-conquer workspace) and ``U V^T`` one more: 2 n^2 against 8 n^2, which
    at n = 8192 is 1.1 GB against 4.3 GB. The result is checked: ``max |U^T U - I| <= tol``, computed in row blocks
    (``n`` u sqrt(n) bounds its rounding at the widths models have: 1e-10 at n = 8192).

    ``stash``: where the iterate waits while its inverse is computed in ``a`` (an object with ``put(a)``, which keeps
    a copy of ``a``'s values, and ``rows(i, j)``, which gives rows ``i:j`` of that copy as a new float64 array; the
    caller's, a temporary file say): the iteration then holds one n x n array in memory, not two (at n = 8192,
    537 MB against 1.07 GB), and gives the same bits: the inverse is transposed in place (``transpose_inplace``)
    and each row block of the step is the same sum of the same products.

    Raises PolarFailed when ``a`` is singular to working precision, has a non-finite value, does not converge in ``max_iter`` iterations, or fails the check: ``a`` then still holds
    finite values with the same orthogonal factor (the input, or a Newton iterate ``U H_k``, ``H_k`` symmetric
    positive definite), so an SVD of it gives the answer. RuntimeError when LAPACK lacks ``dgetrf``/``dgetri``;
    ValueError on a wrong input."""
    fns = _getrf_getri()
    _checked(fns, "dgetrf/dgetri", a, "polar_inplace")
    n = a.shape[0]
    if n == 0:
        return 0
    hi, lo = float(np.max(a)), float(np.min(a))     # (no n x n temporary: |a| at n = 8192 is 537 MB)
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise PolarFailed("the matrix has a non-finite value")
    top = max(hi, -lo)
    if top == 0.0:
        raise PolarFailed("the matrix is zero")
    a /= top                        # the orthogonal factor does not depend on scale: norms neither overflow nor underflow
    y = np.empty_like(a) if stash is None else None
    rows = max(1, min(-(-n // 8), _POLAR_BYTES // (8 * n)))    # a block's temporaries: at most n^2 / 8 each
    ipiv = np.zeros(n, dtype=np.int64 if fns[2] is ctypes.c_int64 else np.int32)
    scaled, last = True, False

    def failed(why: str) -> PolarFailed:
        """The error, ``a`` given back the iterate from the stash first (the inverse overwrote it there)."""
        if stash is not None:
            for i in range(0, n, rows):
                a[i:min(n, i + rows)] = stash.rows(i, min(n, i + rows))
        return PolarFailed(why)

    for it in range(1, max_iter + 1):
        if stash is None:
            np.copyto(y, a)
            _inverse_inplace(y, ipiv, fns)
            nx, ny = float(np.linalg.norm(a)), float(np.linalg.norm(y))
        else:
            nx = float(np.linalg.norm(a))
            stash.put(a)
            try:
                _inverse_inplace(a, ipiv, fns)
            except PolarFailed as e:
                raise failed(str(e)) from None
            ny = float(np.linalg.norm(a))
        if not (math.isfinite(ny) and nx > 0 and ny > 0):
            raise failed("the matrix is singular to working precision")
        mu = math.sqrt(ny / nx) if scaled else 1.0
        if not math.isfinite(mu) or mu * nx > 1e300 or ny / mu > 1e300:
            raise failed("the matrix is too ill-conditioned for the iteration")
        step2 = 0.0
        if stash is not None:
            transpose_inplace(a)                    # X^-T, row blocks of which the step reads
        for i in range(0, n, rows):
            j = min(n, i + rows)
            if stash is None:
                t = y[:, i:j].T * (0.5 / mu)
                t += a[i:j] * (0.5 * mu - 1.0)          # the step: new - old
                step2 += float(np.vdot(t, t))
                a[i:j] += t
            else:
                x = stash.rows(i, j)
                t = a[i:j] * (0.5 / mu)
                t += x * (0.5 * mu - 1.0)
                step2 += float(np.vdot(t, t))
                x += t
                a[i:j] = x
        rel = math.sqrt(step2) / max(float(np.linalg.norm(a)), 1e-300)
        if not math.isfinite(rel):
            raise PolarFailed("the iteration overflowed")
        if last:
            break
        if rel < 1e-2:
            scaled = False
        if rel < 1e-7:
            last = True
    else:
        raise PolarFailed(f"no convergence in {max_iter} iterations")
    del y
    worst = 0.0
    for i in range(0, n, rows):
        j = min(n, i + rows)
        g = a[:, i:j].T @ a                          # rows i..j of U^T U
        g[:, i:j] -= np.eye(j - i)
        worst = max(worst, float(np.max(np.abs(g))))
    if not worst <= tol:
        raise PolarFailed(f"the result is not orthogonal (max |U^T U - I| = {worst:.2g})")
    return it
