"""Pin numpy's OpenBLAS thread count around a LAPACK call whose last bits depend on it.

LAPACK's SVD and symmetric eigensolvers split their work by the number of BLAS threads, so
the same matrix gives singular values that differ in the last bits on a 2-core laptop, a
64-core server or a Dask worker (whose nanny sets ``OPENBLAS_NUM_THREADS=1``). The JSON of
a comparison must not depend on the machine, so the spectra run under ``blas_threads(1)``.
Matrix products are pinned as well: OpenBLAS's GEMM blocking also changes the last bits
with the thread count (measured: the Gram matrix and the randomized sketch both moved).
The cost is the rank pass's BLAS running on one core; the kernels' own numba threads are
unaffected.

The OpenBLAS library numpy loaded is found among the process's mapped files (Linux
``/proc/self/maps``) and driven through its ``*_set_num_threads`` entry points. Where
none is found (another BLAS, another OS) ``blas_threads`` does nothing, and
docs/reproducibility.md says results may then vary in the last bits with the thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import functools
from typing import Callable, Iterator

import numpy as np  # noqa: F401  (loads the BLAS this module looks for)

__all__ = ["blas_threads", "single_blas_thread", "openblas_found"]

_NAMES = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
          ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
          ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
          ("openblas_set_num_threads", "openblas_get_num_threads"))
_LOCK = threading.RLock()
_FOUND: list | None = None


def _libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in p)


def _controls() -> list[tuple]:
    global _FOUND
    if _FOUND is None:
        found = []
        for path in _libraries():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for set_name, get_name in _NAMES:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    found.append((setter, getter))
                    break
        _FOUND = found
    return _FOUND


def openblas_found() -> bool:
    """Whether the thread count of numpy's BLAS can be pinned in this process."""
    return bool(_controls())


_PIN = threading.Condition(_LOCK)
_STATE: dict = {"depth": 0, "n": None, "saved": None}


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run the body with OpenBLAS limited to ``n`` threads, then restore the previous count.

    The count is one setting for the whole process, so the pin is shared: bodies that ask for
    the same ``n`` run at the same time (the streamed Gram's tiles on one thread, an eigen-solve
    on another); a body asking for another count waits until the pin is released."""
    controls = _controls()
    if not controls:
        yield
        return
    with _PIN:
        while _STATE["depth"] and _STATE["n"] != n:
            _PIN.wait()
        if _STATE["depth"] == 0:
            _STATE["saved"] = [get() for _, get in controls]
            for setter, _ in controls:
                setter(n)
            _STATE["n"] = n
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _PIN:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                for (setter, _), old in zip(controls, _STATE["saved"]):
                    setter(old)
                _STATE["n"] = _STATE["saved"] = None
                _PIN.notify_all()


def single_blas_thread(fn: Callable) -> Callable:
    """Decorator: run ``fn`` under ``blas_threads(1)`` (its result must not depend on the machine)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_threads(1):
            return fn(*args, **kwargs)

    return wrapper
