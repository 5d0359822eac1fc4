"""A 70B-width rotation's d x d arrays kept in temporary files (``measure.spill``), read back in panels.

At d = 8,192 the rotation R (537 MB) was in memory beside the Gram matrix of every tensor measured beneath it
(537 MB), and the polar iteration's iterate beside its inverse: the path peaked at 1.7 GB. The reference for
everything here is the in-memory array: the same values, the same products bit for bit, the same digest, the same
polar factor bit for bit, the same JSON; and what stays in memory is a panel, not the matrix.
"""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from weightdiff.kernels import lapack
from weightdiff.measure import spill
from weightdiff.measure.cache import RecordCache


@pytest.mark.parametrize("n,tile", [(1, 4), (5, 2), (7, 3), (257, 64), (600, 256)])
def test_transpose_in_place_is_the_transpose(n, tile, rng):
    a = rng.standard_normal((n, n))
    want = a.T.copy()
    lapack.transpose_inplace(a, tile=tile)
    assert np.array_equal(a, want)
    with pytest.raises(ValueError):
        lapack.transpose_inplace(np.zeros((3, 4)))


@pytest.fixture
def small_panels(monkeypatch):
    """Panels of a few rows: a test-sized matrix is read back in many of them."""
    monkeypatch.setattr(spill, "PANEL_BYTES", 8 * 40 * 7)


def test_a_spilled_matrix_reads_back_as_the_array(rng, small_panels):
    a = rng.standard_normal((40, 40))
    s = spill.Spilled.of(a)
    assert s.shape == (40, 40) and s.nbytes == a.nbytes and s.dtype == np.float64 and s.ndim == 2
    assert np.array_equal(s.rows(3, 17), a[3:17]) and np.array_equal(s.rows(35, 99), a[35:])
    assert [(j0, j1) for j0, j1, _ in s.panels()] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 40)]
    assert all(np.array_equal(p, a[:, j0:j1]) and p.flags.c_contiguous for j0, j1, p in s.panels())
    assert np.array_equal(np.asarray(s), a) and np.array_equal(spill.row_block(s, 2, 9), a[2:9])
    assert all(np.array_equal(p, np.abs(a[:, j0:j1])) for j0, j1, p in spill.elementwise(np.abs, s).panels())
    assert np.array_equal(spill.elementwise(np.abs, s).rows(0, 40), np.abs(a))
    assert spill.digest(s) == spill.digest(a) == s.sha256()
    with pytest.raises(ValueError):
        spill.Spilled.of(a.astype(np.float32))


def test_the_cache_names_a_spilled_array_as_the_array(tmp_path, rng):
    """A run that spilled its rotation keys its records as one that held it in memory."""
    a = rng.standard_normal((24, 24))
    cache = RecordCache.__new__(RecordCache)
    cache._arrays = {}
    assert cache.array_id(spill.Spilled.of(a)) == cache.array_id(a.copy())


@pytest.mark.parametrize("shape", [(64, 1024), (1, 1024), (300, 1536)])
def test_products_with_a_spilled_matrix_give_the_bits_of_the_whole_product(rng, monkeypatch, shape):
    """Panels of 512 columns, as at the widths that spill (32 MB of 8,192 rows): the whole product's bits."""
    monkeypatch.setattr(spill, "PANEL_BYTES", 8 * shape[1] * 512)
    r = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))[0]
    x = rng.standard_normal(shape)
    assert np.array_equal(spill.times(x, spill.Spilled.of(r)), x @ r)
    assert np.array_equal(spill.times(x, r), x @ r)


def test_products_in_narrow_panels_are_the_product(rng, small_panels):
    """Panels of two columns (a test-sized matrix): the product within rounding (narrow BLAS calls take other
    paths)."""
    r = rng.standard_normal((40, 40))
    x = rng.standard_normal((9, 40))
    assert np.allclose(spill.times(x, spill.Spilled.of(r)), x @ r, rtol=1e-13, atol=1e-13)


def test_keep_spills_only_beyond_the_bound(rng, monkeypatch):
    a = rng.standard_normal((16, 16))
    assert spill.keep(a) is a and spill.keep(None) is None and spill.stash_for(a) is None
    monkeypatch.setattr(spill, "SPILL_BYTES", a.nbytes - 1)
    assert isinstance(spill.keep(a), spill.Spilled) and isinstance(spill.stash_for(a), spill.Stash)
    assert spill.keep(a.astype(np.float32)).dtype == np.float32         # (float64 square matrices only)


def test_the_files_are_unlinked_from_the_start(rng, tmp_path, monkeypatch):
    """Nothing is left in the temporary folder, even by a run that is killed."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    s = spill.Spilled.of(rng.standard_normal((8, 8)))
    st = spill.Stash()
    st.put(rng.standard_normal((8, 8)))
    assert os.listdir(tmp_path) == [] and s.rows(0, 1).shape == (1, 8)
    st.close()


pol = pytest.mark.skipif(not lapack.polar_available(), reason="numpy's OpenBLAS lacks dgetrf/dgetri")


@pol
@pytest.mark.parametrize("what", ["random", "kappa 1e8", "signed permutation", "near identity"])
def test_the_polar_iteration_with_a_stash_gives_the_same_bits(rng, what, small_panels):
    n = 96
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    c = {"random": rng.standard_normal((n, n)),
         "kappa 1e8": (q * np.logspace(0, -8, n)) @ np.linalg.qr(rng.standard_normal((n, n)))[0],
         "signed permutation": np.eye(n)[rng.permutation(n)] * rng.choice([-1.0, 1.0], n),
         "near identity": np.eye(n) + 1e-3 * rng.standard_normal((n, n))}[what]
    a, b = c.copy(), c.copy()
    stash = spill.Stash()
    assert lapack.polar_inplace(a) == lapack.polar_inplace(b, stash=stash)
    assert np.array_equal(a, b)
    stash.close()


@pol
def test_a_failed_polar_iteration_with_a_stash_leaves_the_iterate(rng, small_panels):
    """Singular: PolarFailed, and ``a`` holds what it holds without a stash (the input, scaled), not the LU factors
    the inverse left there; its SVD still gives the answer."""
    c = rng.standard_normal((12, 12))
    c[:, 3] = 0.0
    a, b = c.copy(), c.copy()
    with pytest.raises(lapack.PolarFailed):
        lapack.polar_inplace(a)
    with pytest.raises(lapack.PolarFailed):
        lapack.polar_inplace(b, stash=spill.Stash())
    assert np.array_equal(a, b)


@pol
def test_the_polar_iteration_with_a_stash_holds_one_matrix(rng):
    """Memory beside ``a``: row blocks and a tile, not a second n x n array (1.07 GB -> 537 MB at d = 8,192)."""
    n = 1024
    c = rng.standard_normal((n, n))

    def peak(stash) -> int:
        a = c.copy()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            lapack.polar_inplace(a, stash=stash)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    plain, stashed = peak(None), peak(spill.Stash())
    assert plain > c.nbytes and stashed < plain - 0.75 * c.nbytes, (plain, stashed)


def test_a_product_with_a_spilled_matrix_holds_a_panel(rng, monkeypatch):
    n = 512
    monkeypatch.setattr(spill, "PANEL_BYTES", 8 * n * 64)
    r = spill.Spilled.of(rng.standard_normal((n, n)))
    x = rng.standard_normal((8, n))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        spill.times(x, r)
        spill.row_block(r, 0, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.2 * r.nbytes, peak          # a panel is an eighth of it here


_INFO = ("21 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
         "22 21 0:30 / /tmp rw,nosuid - tmpfs tmpfs rw\n"
         "23 21 0:31 / /mnt/my\\040disk rw - xfs /dev/vdb rw\n"
         "24 22 0:32 / /tmp/inner rw - ext4 /dev/vdc rw\n"
         "25 21 0:33 / /var/tmp rw - ext4 /dev/vdd rw\n"
         "26 25 0:34 / /var/tmp rw - ramfs ramfs rw\n")


@pytest.mark.parametrize("path,kind", [("/tmp", "tmpfs"), ("/tmp/a/b", "tmpfs"), ("/tmp/inner/x", "ext4"),
                                       ("/tmpfoo", "ext4"), ("/", "ext4"), ("/mnt/my disk/f", "xfs"),
                                       ("/var/tmp/x", "ramfs")])   # the last of two mounts on one point is on top
def test_the_file_system_of_a_path(path, kind):
    assert spill.fs_type(path, _INFO) == kind


def test_no_mount_table_no_file_system(monkeypatch, tmp_path):
    monkeypatch.setattr(spill, "_MOUNTINFO", str(tmp_path / "absent"))
    assert spill.fs_type("/tmp") is None


@pytest.fixture
def mounts(monkeypatch, tmp_path):
    """A mount table where ``mem/`` under tmp_path is a tmpfs and ``disk/`` a disk; no TMPDIR, TEMP or TMP."""
    (tmp_path / "mem").mkdir()
    (tmp_path / "disk").mkdir()

    def write(disk_kind: str = "ext4") -> None:
        (tmp_path / "mountinfo").write_text(f"1 0 8:1 / / rw - ext4 /dev/vda1 rw\n"
                                            f"2 1 0:2 / {tmp_path / 'mem'} rw - tmpfs tmpfs rw\n"
                                            f"3 1 0:3 / {tmp_path / 'disk'} rw - {disk_kind} x rw\n")
    write()
    monkeypatch.setattr(spill, "_MOUNTINFO", str(tmp_path / "mountinfo"))
    monkeypatch.setattr(spill, "DISK_TMP", (str(tmp_path / "disk"),))
    for k in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(spill.tempfile, "gettempdir", lambda: str(tmp_path / "mem"))
    spill._scratch_dir.cache_clear()
    yield tmp_path, write
    spill._scratch_dir.cache_clear()


def test_scratch_files_leave_a_memory_file_system_for_a_disk(mounts):
    """/tmp on a tmpfs (Fedora, Arch, many containers): a spill there is memory again; /var/tmp is a disk."""
    tmp_path, _ = mounts
    assert spill.scratch_dir() == str(tmp_path / "disk")


def test_scratch_files_stay_where_the_user_points(mounts, monkeypatch):
    tmp_path, _ = mounts
    monkeypatch.setenv("TMPDIR", str(tmp_path / "mem"))
    assert spill.scratch_dir() == str(tmp_path / "mem")       # set on purpose: respected


def test_scratch_files_stay_when_no_disk_is_offered(mounts):
    tmp_path, write = mounts
    write("tmpfs")
    assert spill.scratch_dir() == str(tmp_path / "mem")
    spill._scratch_dir.cache_clear()
    write()
    (tmp_path / "disk").chmod(0o500)                            # not writable
    try:
        if not os.access(tmp_path / "disk", os.W_OK):          # root writes anyway
            assert spill.scratch_dir() == str(tmp_path / "mem")
    finally:
        (tmp_path / "disk").chmod(0o700)


def test_every_scratch_file_goes_to_the_scratch_folder(mounts, monkeypatch, rng):
    """The three writers of scratch files: the spill, the rank pass's wide delta, the inertia count's Gram copy."""
    from weightdiff.kernels import gram as kgram
    from weightdiff.measure import rank_stream

    tmp_path, _ = mounts
    made = []
    real = spill.tempfile.TemporaryFile

    def recording(*a, **kw):
        made.append((kw.get("prefix"), kw.get("dir")))
        return real(*a, **kw)
    monkeypatch.setattr(spill.tempfile, "TemporaryFile", recording)   # the one tempfile module of the process
    spill._File().close()
    g = rank_stream.DeltaGram((30, 70), "BF16", "BF16", keep_bytes=0)
    g.activate()
    assert g.spilled
    src = kgram._Source(rng.standard_normal((8, 8)), g.spill_dir)
    src.file.close()
    want = str(tmp_path / "disk")
    assert sorted(made) == sorted([("weightdiff-spill-", want), ("weightdiff-delta-", want),
                                   ("weightdiff-gram-", want)])
