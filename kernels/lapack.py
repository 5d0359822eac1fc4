"""LAPACK's symmetric eigenvalue solver in place, from the OpenBLAS that numpy ships.

``numpy.linalg.eigvalsh`` copies its input before LAPACK sees it: for the 8192 x 8192 Gram
matrix of a 70B-width matrix that is a second 537 MB in float64, which is why the streamed
rank path used to solve in float32 beyond 4096 (and got a bracket 20% wide). ``eigvalsh_inplace``
calls ``dsyevd`` (eigenvalues only) on the caller's array, which it overwrites: one copy of the
matrix, in float64, at any size. The symbols are those of numpy's bundled OpenBLAS
(``scipy_dsyevd_64_``, 64-bit integers; or the 32-bit ``scipy_dsyevd_``); where neither is
found (another BLAS), ``available()`` is False and callers fall back to numpy.

Pure array code: no file or model knowledge.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np

__all__ = ["available", "eigvalsh_inplace"]


#: LAPACK's two-stage tridiagonal reduction (eigenvalues only) is BLAS-3 rich: 3-4x faster than
#: ``dsyevd`` at n = 4096 on one core; plain ``dsyevd`` where an older LAPACK lacks it
_NAMES = (("scipy_dsyevd_2stage_64_", ctypes.c_int64), ("scipy_dsyevd_2stage_", ctypes.c_int32),
          ("scipy_dsyevd_64_", ctypes.c_int64), ("scipy_dsyevd_", ctypes.c_int32))


@functools.lru_cache(maxsize=1)
def _syevd():
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    paths = sorted(glob.glob(os.path.join(libdir, "*openblas*")))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, itype in _NAMES:
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = None
                return fn, itype
    return None


def available() -> bool:
    """Whether ``eigvalsh_inplace`` can run (numpy's OpenBLAS exports ``dsyevd``)."""
    return _syevd() is not None


def eigvalsh_inplace(a: np.ndarray, lower: bool = True) -> np.ndarray:
    """Eigenvalues (ascending, float64) of the symmetric C-contiguous float64 matrix ``a``,
    read from its lower triangle (``lower``) or upper; ``a`` is destroyed.

    Raises RuntimeError if LAPACK reports a failure, ValueError on a wrong input.
    """
    found = _syevd()
    if found is None:
        raise RuntimeError("LAPACK dsyevd not found in numpy's OpenBLAS")
    fn, itype = found
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != np.float64 or not a.flags.c_contiguous \
            or not a.flags.writeable:
        raise ValueError("eigvalsh_inplace needs a writeable C-contiguous square float64 matrix")
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
