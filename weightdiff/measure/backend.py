"""The one device choice: which kernels measure a pair, and on what device.

``BACKENDS`` maps a device name to a factory; ``backend_for(device, threads)`` is the only
place weightdiff decides between the numba kernels (``kernels.cpu``, with
``kernels.spectral``'s numpy spectra) and the torch kernels (``kernels.cuda``, with
``kernels.spectral``'s torch spectra). Everything downstream (the stats pass, the rank
pass, provenance's re-measurement) receives a ``Backend`` and asks it; nothing else
looks at a device string. Adding a device means adding one factory here.

>>> b = backend_for("cpu", threads=1)
>>> b.name, b.device
('cpu', 'cpu')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import OptionsError
from ..kernels import spectral

__all__ = ["Backend", "BACKENDS", "backend_for", "CPU_SPECTRA", "LAPACK_MAX_ELEMENTS"]

#: above this many elements, a full spectrum comes from the Gram matrix rather than LAPACK's SVD
LAPACK_MAX_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Backend:
    """The kernels of one device: ``module`` is kernels.cpu or kernels.cuda."""

    name: str
    module: Any
    device: str = "cpu"   # the torch device of the torch backend ("cuda"; tests use "cpu")

    @property
    def torch(self) -> bool:
        return self.name != "cpu"

    def spectrum(self, d: np.ndarray, k: int, seed: int, exact_max: int,
                 total: float | None = None, direct: bool = False) -> tuple[np.ndarray, str, np.ndarray | None]:
        """Singular values of ``d``, the method (the full spectrum, ``exact``/``gram``, or the top k,
        ``randomized``) and, for the top k, ``caps``: certified upper bounds on the partial sums of
        the squared singular values (``kernels.spectral.randomized_caps``; ``total``, the exact
        energy of the delta ``d`` stands for, defaults to that of ``d``). None for a full spectrum.
        ``direct``: a full spectrum by LAPACK's SVD of ``d`` itself, whatever its size (the Gram
        matrix's eigenvalues lose the singular values below ~sqrt(n u) s_1; see ``refine_rank``)."""
        m, n = d.shape
        full = direct or min(m, n) <= exact_max
        if not self.torch:
            if full:
                return ((spectral.svdvals_exact(d), "exact", None) if direct or m * n <= LAPACK_MAX_ELEMENTS
                        else (spectral.svdvals_gram(d), "gram", None))
            u, s, vt = spectral.randomized_svd(d, k, seed=seed, vectors=True)
            if total is None:
                total = _sum_sq(d)
            caps = spectral.randomized_caps(d, u if m < n else vt.T, total)
            return s, "randomized", caps
        import torch

        t = d if isinstance(d, torch.Tensor) else torch.from_numpy(d).to(self.device)
        if full:
            return ((spectral.svdvals_exact_torch(t), "exact", None) if direct or m * n <= LAPACK_MAX_ELEMENTS
                    else (spectral.svdvals_gram_torch(t), "gram", None))
        u, s, vt = spectral.randomized_svd_torch(t, k, seed=seed, vectors=True)
        if total is None:
            total = _sum_sq(d)
        return s, "randomized", spectral.randomized_caps_torch(t, u if m < n else vt.T, total)

    def top_vectors(self, w: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U_k, s_k, V_k^T) of ``w`` by the seeded randomized SVD."""
        if not self.torch:
            return spectral.randomized_svd(w, k, seed=seed, vectors=True)
        import torch

        return spectral.randomized_svd_torch(torch.from_numpy(w).to(self.device), k, seed=seed, vectors=True)


def _sum_sq(d: np.ndarray) -> float:
    """Sum of squares of ``d`` in float64, a million elements at a time (no float64 copy of it)."""
    flat = np.asarray(d).reshape(-1)
    step = 1 << 20
    return float(sum(float(np.dot(c, c)) for c in (flat[i:i + step].astype(np.float64)
                                                  for i in range(0, flat.size, step))))


def _cpu(threads: int | None) -> Backend:
    from ..kernels import cpu

    cpu.set_threads(threads)
    return Backend("cpu", cpu, "cpu")


def _torch_on(device: str) -> Callable[[int | None], Backend]:
    def make(threads: int | None) -> Backend:
        from ..kernels import cuda

        try:
            cuda.require_device(device)
        except cuda.DeviceUnavailable as exc:
            raise OptionsError(f"device {device}: {exc.problem}", exc.hint, option="device") from None
        return Backend("cuda", cuda, device)

    return make


BACKENDS: dict[str, Callable[[int | None], Backend]] = {"cpu": _cpu, "cuda": _torch_on("cuda")}


def backend_for(device: str, threads: int | None = None) -> Backend:
    """The backend of a device name; ``OptionsError`` when it cannot run here."""
    try:
        make = BACKENDS[device]
    except KeyError:
        raise OptionsError(f"device must be one of {', '.join(BACKENDS)} (got {device!r})",
                           option="device") from None
    return make(threads)


#: the CPU spectra without touching the numba thread count (rank analysis called outside a comparison)
CPU_SPECTRA = Backend("cpu", None, "cpu")
