"""How to count singular values above a floor on a 4096 x 14336 delta: the measurements behind
``method: "gram"`` (docs/rank.md).

Times, on one dense float32 delta of the given shape: the randomized top-k (the old default),
the float32 and float64 Gram products of the smaller side, ``eigvalsh`` of the Gram matrix in
float64 and float32 (the full spectrum, hence the exact count), the LDL^T factorizations that
would give the same count by Sylvester's law of inertia (LAPACK ``dsytrf`` and its rook, rk and
Aasen variants, called through ctypes in the OpenBLAS that numpy ships, when it is there: numpy
has no LDL^T of its own), Cholesky (a yes/no test only) and LU, and the streamed path end to end.

    nice .venv/bin/python benchmarks/bench_inertia.py [--shape 4096x14336]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import time

import numpy as np


def _lapack():
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _sytrf(lib, name: str, a: np.ndarray) -> float:
    """Seconds for LAPACK ``name`` on ``a`` (in place); ILP64 OpenBLAS symbols (``scipy_*64_``)."""
    f = getattr(lib, name)
    i64 = ctypes.c_int64
    n = a.shape[0]
    ipiv = np.zeros(n, np.int64)
    info = i64(0)
    e = np.zeros(n)
    rk = name.startswith("scipy_dsytrf_rk")

    def args(work, lwork):
        out = [ctypes.c_char_p(b"L"), ctypes.byref(i64(n)), a.ctypes.data_as(ctypes.c_void_p), ctypes.byref(i64(n))]
        if rk:
            out.append(e.ctypes.data_as(ctypes.c_void_p))
        return out + [ipiv.ctypes.data_as(ctypes.c_void_p), work.ctypes.data_as(ctypes.c_void_p),
                      ctypes.byref(i64(lwork)), ctypes.byref(info), ctypes.c_size_t(1)]

    query = np.zeros(1)
    f(*args(query, -1))
    work = np.empty(max(int(query[0]), 1))
    t = time.perf_counter()
    f(*args(work, work.size))
    return time.perf_counter() - t


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x14336")
    args = ap.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    from weightdiff.kernels import gram as kgram
    from weightdiff.kernels import spectral

    d = np.random.default_rng(0).standard_normal((m, n), dtype=np.float32)
    t = d if m >= n else d.T
    r = min(m, n)
    rows = []
    rows.append(("randomized top-64 (old default)", timed(lambda: spectral.randomized_svd(d, 64))[0]))
    rows.append(("Gram float32 (syrk)", timed(lambda: t.T @ t)[0]))
    t64 = t.astype(np.float64)
    sec, g = timed(lambda: t64.T @ t64)
    del t64
    rows.append(("Gram float64 (syrk)", sec))
    sec, lam = timed(lambda: np.linalg.eigvalsh(g))
    rows.append((f"eigvalsh float64, n = {r}", sec))
    rows.append((f"eigvalsh float32, n = {r}", timed(lambda: np.linalg.eigvalsh(g.astype(np.float32)))[0]))
    tau2 = float(np.median(lam))
    shifted = g - tau2 * np.eye(r)
    lib = _lapack()
    for name in ("scipy_dsytrf_64_", "scipy_dsytrf_rook_64_", "scipy_dsytrf_rk_64_", "scipy_dsytrf_aa_64_"):
        if lib is not None and hasattr(lib, name):
            rows.append((f"LDL^T {name.split('_', 1)[1].rsplit('_64_', 1)[0]}", _sytrf(lib, name, shifted.copy())))
        else:
            rows.append((f"LDL^T {name} (not in this numpy's LAPACK)", float("nan")))
    rows.append(("Cholesky (yes/no only)", timed(lambda: np.linalg.cholesky(g + np.eye(r)))[0]))
    rows.append(("LU, partial pivoting (no inertia)", timed(lambda: np.linalg.slogdet(shifted))[0]))
    del shifted

    def streamed():
        acc = kgram.GramAccumulator(r)
        step = max(1, (64 << 20) // (8 * r))
        for i in range(0, t.shape[0], step):
            acc.add(t[i:i + step].astype(np.float64))
        return kgram.gram_eigenvalues(acc)

    rows.append(("streamed Gram (64 MB row blocks) + eigvalsh", timed(streamed)[0]))
    print(f"shape {m} x {n}, load {os.getloadavg()[0]:.2f}")
    print("| step | seconds |\n| --- | --- |")
    for label, sec in rows:
        print(f"| {label} | {sec:.2f} |")


if __name__ == "__main__":
    main()
