"""Spectra do not depend on the number of BLAS threads (kernels.blas pins LAPACK to one)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from weightdiff.kernels import blas

SCRIPT = """
import sys
import numpy as np
from weightdiff.kernels import spectral
x = np.random.default_rng(5).standard_normal((700, 500))
sys.stdout.write(spectral.svdvals_exact(x).tobytes().hex()[:4000])
sys.stdout.write(spectral.svdvals_gram(x).tobytes().hex()[:4000])
sys.stdout.write(spectral.randomized_svd(x, 16, seed=1).tobytes().hex())
"""


def test_blas_threads_sets_and_restores_the_count():
    if not blas.openblas_found():
        pytest.skip("numpy's BLAS is not an OpenBLAS this process can find")
    (setter, getter), *_ = blas._controls()
    before = getter()
    with blas.blas_threads(1):
        assert getter() == 1
    assert getter() == before


@pytest.mark.skipif(not blas.openblas_found(), reason="numpy's BLAS is not OpenBLAS")
def test_spectra_are_the_same_bits_with_one_or_four_blas_threads():
    outs = []
    for n in ("1", "4"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n)
        outs.append(subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1]


def test_the_pin_is_shared_by_threads_that_want_the_same_count():
    import threading

    if not blas.openblas_found():
        pytest.skip("numpy's BLAS is not an OpenBLAS this process can find")
    (setter, getter), *_ = blas._controls()
    before = getter()
    inside = threading.Event()
    release = threading.Event()
    seen = []

    def hold():
        with blas.blas_threads(1):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(5)
    with blas.blas_threads(1):          # does not wait for the other thread's body
        seen.append(getter())
    release.set()
    t.join(5)
    assert seen == [1] and getter() == before and blas._STATE["depth"] == 0
