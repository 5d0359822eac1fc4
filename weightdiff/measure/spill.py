"""Float64 matrices kept in unlinked temporary files and read back in panels.

A rotated residual stream at the 70B width (d = 8,192) has d x d float64 arrays of 537 MB each: the rotation R,
and while it is fitted the sums its polar factor is computed from. Measuring a tensor beneath R builds an
8,192-wide Gram matrix (another 537 MB), and the polar iteration needs the iterate beside its inverse: in memory
together they took the path to 1.7 GB. Here the one that waits goes to a temporary file (``Stash`` for the polar
iteration's iterate; ``Spilled`` for R, in its rows and in its columns), read back a panel at a time: what the
process holds is a panel (32 MB), and the file's pages are the kernel's page cache, which it writes out and drops
under pressure. The files are unlinked when made (``tempfile.TemporaryFile``: nothing is left behind, even after
a kill) and live in ``scratch_dir()``: ``TMPDIR`` (or ``TEMP``, ``TMP``) when set, else the system's temporary
folder, unless that is a memory file system (tmpfs, as ``/tmp`` is on Fedora, Arch and many containers) and
``/var/tmp`` is a disk: a spill to memory would be memory again. Same bits as in memory: a panel is the same
values, and the products are taken in the column panels that a whole product's BLAS call takes (``times``).

Only arrays over ``SPILL_BYTES`` go out (``keep``): at d = 4,096 (7B widths) R is 134 MB and stays in memory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from typing import Any

import numpy as np

from ..kernels.gram import pread_all, pwrite_all

__all__ = ["scratch_dir", "fs_type", "SPILL_BYTES", "PANEL_BYTES", "Stash", "Spilled", "keep", "stash_for", "times",
           "row_block", "elementwise", "digest"]

#: a float64 square matrix larger than this is kept in a temporary file (d > 5,792)
SPILL_BYTES = 256 << 20
#: bytes of one panel read back at a time
PANEL_BYTES = 32 << 20


#: file systems whose files are memory (and swap): a spill there saves nothing
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
#: where to look when the temporary folder is one of them (a disk by convention: systemd's file-hierarchy)
DISK_TMP = ("/var/tmp",)
_MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fs_type(path: str, mountinfo: str | None = None) -> str | None:
    """The file system type of the mount holding ``path`` (the longest mount point above its real path in
    ``/proc/self/mountinfo``, or the ``mountinfo`` text given), None where that cannot be read (not Linux).

    >>> info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\\n23 22 0:5 / /tmp rw - tmpfs tmpfs rw\\n"
    >>> fs_type("/tmp/x", info), fs_type("/var/tmp", info), fs_type("/tmpx", info)
    ('tmpfs', 'ext4', 'ext4')
    """
    if mountinfo is None:
        try:
            with open(_MOUNTINFO) as fh:
                mountinfo = fh.read()
        except OSError:
            return None
    real = os.path.realpath(path)
    best, kind = -1, None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:        # the last of equal mount points is the one on top
            best, kind = len(point), tail.split()[0]
    return kind


def scratch_dir() -> str:
    """The folder for the scratch files of a run (this module's spill, the rank pass's wide deltas, the inertia
    count's Gram copy): ``TMPDIR``/``TEMP``/``TMP`` when the user set one, else the system's temporary folder,
    unless that is a memory file system and ``/var/tmp`` is a writable disk, which is taken instead (the files
    are unlinked when made, so nothing is left there, even after a kill)."""
    return _scratch_dir(tuple(os.environ.get(k) for k in ("TMPDIR", "TEMP", "TMP")), tempfile.gettempdir())


@functools.lru_cache(maxsize=8)
def _scratch_dir(env: tuple, default: str) -> str:
    if any(env) or fs_type(default) not in MEMORY_FS:
        return default
    for alt in DISK_TMP:
        kind = fs_type(alt)
        if kind is not None and kind not in MEMORY_FS and os.path.isdir(alt) and os.access(alt, os.W_OK | os.X_OK):
            return alt
    return default


class _File:
    """One unlinked temporary file of raw bytes, written and read by offset."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile(prefix="weightdiff-spill-", dir=scratch_dir())
        self.fd = self._fh.fileno()

    def write(self, offset: int, a: np.ndarray) -> None:
        pwrite_all(self.fd, a, offset)

    def read(self, offset: int, out: np.ndarray) -> np.ndarray:
        return pread_all(self.fd, out, offset)

    def close(self) -> None:
        self._fh.close()


class Stash:
    """The ``stash`` of ``kernels.lapack.polar_inplace``: ``put`` writes an n x n float64 array to a temporary
    file (over what was there), ``rows(i, j)`` reads rows back as a new array."""

    def __init__(self) -> None:
        self._file: _File | None = None
        self._cols = 0

    def put(self, a: np.ndarray) -> None:
        if self._file is None:
            self._file = _File()
        self._cols = int(a.shape[1])
        step = _rows_per_panel(self._cols)
        for i in range(0, a.shape[0], step):
            self._file.write(8 * i * self._cols, a[i:i + step])

    def rows(self, i: int, j: int) -> np.ndarray:
        return self._file.read(8 * i * self._cols, np.empty((j - i, self._cols)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _rows_per_panel(cols: int) -> int:
    return max(1, PANEL_BYTES // (8 * max(1, cols)))


class Spilled:
    """A float64 matrix never whole in memory: its rows in one unlinked temporary file, and its column panels
    (R[:, j0:j1], ``width`` columns each, the last narrower) in another, each in C order as a slice of the array in
    memory is, so that a product with a panel takes the BLAS path (and gives the bits) of the same product with
    the slice. ``rows(i, j)`` (R[i:j], a new array), ``panels()`` ((j0, j1, R[:, j0:j1]) in turn), ``shape``,
    ``ndim``, ``dtype``, ``nbytes``; ``numpy.asarray`` maps the rows' file read-only (for writers that stream it,
    as ``numpy.savez`` does)."""

    dtype = np.dtype(np.float64)
    ndim = 2

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.nbytes = 8 * self.shape[0] * self.shape[1]
        self.width = _rows_per_panel(self.shape[0])         # columns of a panel: 512 at d = 8,192
        self._rows, self._cols = _File(), _File()

    @classmethod
    def of(cls, a: np.ndarray) -> "Spilled":
        """``a`` (2-D, float64) written out: its rows, then its columns panel by panel."""
        a = np.asarray(a)
        if a.ndim != 2 or a.dtype != np.float64:
            raise ValueError("Spilled: a 2-D float64 array")
        out = cls(a.shape)
        m, n = out.shape
        step = _rows_per_panel(n)
        for i in range(0, m, step):
            out._rows.write(8 * i * n, a[i:i + step])
        for j in range(0, n, out.width):
            out._cols.write(8 * j * m, a[:, j:j + out.width])
        return out

    def rows(self, i: int, j: int) -> np.ndarray:
        i, j = max(0, int(i)), min(self.shape[0], int(j))
        return self._rows.read(8 * i * self.shape[1], np.empty((max(0, j - i), self.shape[1])))

    def panels(self):
        """(j0, j1, R[:, j0:j1]) for each column panel in turn, each a new C-ordered array."""
        m, n = self.shape
        for j in range(0, n, self.width):
            j1 = min(n, j + self.width)
            yield j, j1, self._cols.read(8 * j * m, np.empty((m, j1 - j)))

    def map(self, fn) -> "Spilled":
        """A new ``Spilled`` of ``fn`` applied element by element (``numpy.abs``), panel by panel."""
        out = Spilled(self.shape)
        m, n = self.shape
        step = _rows_per_panel(n)
        for i in range(0, m, step):
            out._rows.write(8 * i * n, fn(self.rows(i, i + step)))
        out.width = self.width
        for j, _, p in self.panels():
            out._cols.write(8 * j * m, fn(p))
            del p
        return out

    def sha256(self) -> str:
        """The sha256 of the matrix's bytes in C order, as of the array in memory (``RecordCache.array_id``)."""
        h = hashlib.sha256()
        step = _rows_per_panel(self.shape[1])
        for i in range(0, self.shape[0], step):
            h.update(self.rows(i, i + step).view(np.uint8))
        return h.hexdigest()

    def __array__(self, dtype=None, copy=None):
        mapped = np.memmap(self._rows._fh, dtype=np.float64, mode="r", shape=self.shape)
        return mapped if dtype is None else mapped.astype(dtype)

    def __del__(self) -> None:
        for f in (getattr(self, "_rows", None), getattr(self, "_cols", None)):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def keep(a: Any) -> Any:
    """``a`` as a ``Spilled`` when it is a 2-D float64 array over ``SPILL_BYTES``, else ``a`` itself."""
    if isinstance(a, np.ndarray) and a.ndim == 2 and a.dtype == np.float64 and a.nbytes > SPILL_BYTES:
        return Spilled.of(a)
    return a


def stash_for(a: np.ndarray) -> Stash | None:
    """A ``Stash`` for the polar iteration of ``a`` when ``a`` is over ``SPILL_BYTES``, else None (both in memory)."""
    return Stash() if a.nbytes > SPILL_BYTES else None


def times(x: np.ndarray, r: Any) -> np.ndarray:
    """``x @ r``, ``r`` an array or a ``Spilled``: column panels of ``r`` read back one at a time (a panel of 512
    columns and more gives the whole product's bits: checked for products of many rows and of one)."""
    if not isinstance(r, Spilled):
        return x @ r
    out = np.empty((x.shape[0], r.shape[1]))
    for j0, j1, p in r.panels():
        out[:, j0:j1] = x @ p
        del p                   # (not held while the next panel is read)
    return out


def row_block(r: Any, i: int, j: int) -> np.ndarray:
    """Rows ``i:j`` of ``r``, an array (a view) or a ``Spilled`` (read back)."""
    return r.rows(i, j) if isinstance(r, Spilled) else r[i:j]


def elementwise(fn, r: Any) -> Any:
    """``fn(r)`` element by element, ``r`` an array or a ``Spilled`` (then a ``Spilled`` too)."""
    return r.map(fn) if isinstance(r, Spilled) else fn(r)


def digest(a: Any) -> str:
    """The sha256 of an array's bytes in C order, of an array or a ``Spilled``."""
    if isinstance(a, Spilled):
        return a.sha256()
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()
