"""The rank analysis of a changed matrix gathered during the statistics pass: one read per byte.

``DeltaGram`` receives the same raw windows as the stats kernels, in order, and keeps
what ``finish`` needs to fill the ``rank`` block exactly, without a second read of the
checkpoint and without the ``m x n`` delta in memory when it is tall:

* the storage-rounding variance summed per row and per column (the noise floor of
  ``weightdiff.measure.rank.noise_floor``), from every window;
* the float64 Gram matrix of the smaller side (``kernels.gram.GramAccumulator``):
  a *tall* delta (``m >= n``) is decoded to float64 row block by row block
  (``BLOCK_BYTES`` each) and summed as it streams; a *wide* one needs whole columns, so its
  float32 delta is kept in column tiles, in memory up to ``KEEP_BYTES`` and in an unlinked
  temporary file beyond (the 70B ``down_proj``, 8192 x 28672, 940 MB), and summed at the end.

The Gram work starts at the first window whose changes go beyond storage rounding
(``activate``): a cast-only or unchanged matrix costs only the noise profile. Windows
before that point that changed within rounding are re-read then (they are usually still
in the page cache); windows that did not change at all add nothing to a Gram matrix.

Memory for an ``r x r`` Gram (r = min(m, n)): one float64 ``r x r`` array (r = 4096: 134 MB;
8192: 537 MB), solved in place (``kernels.lapack``: no copy), one row block (64 MB) and a tile
product per summing thread; a wide delta up to ``KEEP_BYTES`` more. See docs/rank.md.
"""

from __future__ import annotations

import math
import tempfile
from typing import Callable

import numpy as np

from ..kernels import gram as kgram
from ..kernels import spectral
from ..kernels.dtypes import DTYPES
from ..records import RankRecord
from .heap import trim_heap
from .spill import scratch_dir
from .rank import (_UINT, COPY_NOTE, NOISE_NOTE, _bits, _explained, _var_sums, _variance_table, copy_noise,
                   copy_rounds, noise_floor, noise_kernel)

__all__ = ["DeltaGram", "RankSink", "streamed_rank_sink", "float_matrix", "KEEP_BYTES", "BLOCK_BYTES"]

#: bytes of float64 delta decoded at a time for a tall matrix (and per column tile when summing a wide one)
BLOCK_BYTES = 64 << 20
#: a wide matrix's float32 delta is kept in memory up to this size, else in a temporary file
KEEP_BYTES = 128 << 20


def _decoder():
    try:
        from ..kernels import cpu

        return cpu.decode_delta_f64, cpu.decode_delta_f32
    except ImportError:    # pragma: no cover - numba is a core dependency
        from ..kernels import reference

        return reference.decode_delta_f64, reference.decode_delta_f32





class DeltaGram:
    """What the rank of one ``shape2`` matrix needs, fed window by window (flat, row-major)."""

    def __init__(self, shape2: tuple[int, int], dtype_base: str, dtype_tuned: str, *,
                 keep_bytes: int = KEEP_BYTES, spill_dir: str | None = None, count: bool = False, seed: int = 0):
        m, n = shape2
        self.count = count               # --spectrum count: numerical_rank by inertia, the rest from the top k
        self.seed = seed
        self.shape2 = (int(m), int(n))
        self.dtypes = (dtype_base, dtype_tuned)
        # each side's profile apart (a few KB), added at the end as rank.analyze_delta adds them
        self.rows = (np.zeros(m), np.zeros(m))
        self.cols = (np.zeros(n), np.zeros(n))
        self.tall = m >= n
        # a float64 pair is ranked at float32's resolution of its delta on every path (rank.copy_noise)
        self.copied = copy_rounds(dtype_base, dtype_tuned)
        self.copy_rows, self.copy_cols = (np.zeros(m), np.zeros(n)) if self.copied else (None, None)
        self.keep_bytes = keep_bytes
        self.spill_dir = spill_dir if spill_dir is not None else scratch_dir()   # not a memory file system
        self.active = False
        self.pos = 0                     # flat elements seen (noise profile)
        self.fed = 0                     # flat elements fed to the delta part
        self.spilled = False
        self.inexact = 0                 # elements of a float32 delta copy that are not the exact difference
        self.copy_err2 = 0.0             # and the sum of their squared errors
        self._acc: kgram.GramAccumulator | None = None
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._nonzero = False
        self._rows_done = 0
        self._tiles: list | None = None
        self._file = None

    # -- the noise profile ---------------------------------------------------------------
    def _profile(self, raw: np.ndarray, dtype: str, pos0: int, side: int) -> None:
        if DTYPES[dtype].kind != "float":
            return
        table, shift, mask = _variance_table(dtype)
        bits = _bits(raw, dtype, (1, raw.size)).reshape(-1)
        # each sum in flat order: the same bits as rank.noise_profile of the whole matrix
        noise_kernel()(bits.view(_UINT[bits.dtype.itemsize]), shift, mask, table, pos0, self.shape2[1],
                        self.rows[side], self.cols[side])

    # -- the delta ------------------------------------------------------------------------
    def activate(self) -> None:
        """Start gathering the delta (from flat position ``fed``, which is 0 the first time)."""
        if self.active:
            return
        self.active = True
        m, n = self.shape2
        if self.tall:
            self._acc = kgram.GramAccumulator(n)
            rows = max(1, min(m, BLOCK_BYTES // (8 * n)))
            self._buf = np.empty(rows * n)
        else:
            self._acc = kgram.GramAccumulator(m)
            rows = max(1, min(m, BLOCK_BYTES // (4 * n)))
            self._buf = np.empty(rows * n, dtype=np.float32)
            width = max(1, min(n, BLOCK_BYTES // (8 * m)))
            self._edges = list(range(0, n, width)) + [n]
            if m * n * 4 <= self.keep_bytes:
                self._tiles = [np.zeros((m, b - a), np.float32) for a, b in zip(self._edges, self._edges[1:])]
            else:
                self.spilled = True
                self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="weightdiff-delta-")

    def feed(self, wb: np.ndarray, wt: np.ndarray, changed: bool = True) -> None:
        """The next window pair. ``changed``: the window has any changed element (else its delta is 0)."""
        self._profile(wb, self.dtypes[0], self.pos, 0)
        self._profile(wt, self.dtypes[1], self.pos, 1)
        self.pos += int(wb.size)
        if self.active:
            self.feed_delta(wb, wt, changed)

    def feed_delta(self, wb: np.ndarray | None, wt: np.ndarray | None, changed: bool = True,
                   size: int | None = None) -> None:
        """The delta part of ``feed`` (after ``activate``); an unchanged window may come as
        ``None, None, False, size``."""
        dec64, dec32 = _decoder()
        dec = dec64 if self.tall else dec32
        buf = self._buf
        if wb is not None:
            wb = wb.reshape(-1)
            wt = wt.reshape(-1)
            size = wb.size
        i = 0
        while i < size:
            take = min(size - i, buf.size - self._fill)
            seg = buf[self._fill:self._fill + take]
            if changed:
                bad, err2 = dec(wb[i:i + take], wt[i:i + take], *self.dtypes, seg)
                self.inexact += bad
                self.copy_err2 += err2
                self._nonzero = True
            else:
                seg[:] = 0.0
            self._fill += take
            i += take
            if self._fill == buf.size:
                self._flush()
        self.fed += int(size)

    def end_of_stream(self) -> None:
        """The stats pass has fed every window: the last rows summed and the row buffer (64 MB) let go now, not
        at ``finish``, so that what runs between (the floor test of a quantized pair, its noise sums) does not
        hold it beside the Gram matrix."""
        if self.active and self._fill:
            self._flush()
        self._buf = None

    def _flush(self) -> None:
        n = self.shape2[1]
        rows = self._fill // n
        if rows == 0:
            return
        blk = self._buf[:rows * n].reshape(rows, n)
        r0 = self._rows_done
        if self.copied:
            cr, cc = copy_noise(blk)
            self.copy_rows[r0:r0 + rows] = cr
            self.copy_cols += cc
        if self.tall:
            if self._nonzero:
                self._acc.add(blk)
            else:
                self._acc.rows += rows
        else:
            for j, (a, b) in enumerate(zip(self._edges, self._edges[1:])):
                part = blk[:, a:b]
                if self._tiles is not None:
                    self._tiles[j][r0:r0 + rows] = part
                else:
                    off = (self.shape2[0] * a + r0 * (b - a)) * 4
                    kgram.pwrite_all(self._file.fileno(), part, off)
        self._rows_done += rows
        self._fill = 0            # the buffer holds whole rows, so nothing is left over
        self._nonzero = False

    def _wide_gram(self) -> None:
        m = self.shape2[0]
        for j, (a, b) in enumerate(zip(self._edges, self._edges[1:])):
            if self._tiles is not None:
                c = self._tiles[j]
                self._tiles[j] = None
            else:
                c = np.empty((m, b - a), np.float32)
                kgram.pread_all(self._file.fileno(), c, m * a * 4)
            x = c.T.astype(np.float64)
            del c                   # (its float32 copy not beside the float64 one and the tile products)
            self._acc.add(x)
            del x
        self._acc.rows = self.shape2[1]
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the record ----------------------------------------------------------------------
    def finish(self, norm_delta_sq: float, noise_factor: float, k: int,
               extra_var: tuple[np.ndarray, np.ndarray] | None = None) -> RankRecord:
        """The ``rank`` block (method ``"gram"``): the full spectrum, with ``numerical_rank``
        certified (or bracketed, see ``kernels.gram``). Frees everything.

        ``extra_var``: noise beyond the stored dtypes' rounding, as per-element variance summed per row and
        per column (a quantized side's: ``measure.quant_floor.quant_noise_var``), added to the floor as
        ``rank.analyze_delta`` adds it, with the same record fields (``noise_model``,
        ``residual_energy_ratio``)."""
        m, n = self.shape2
        if self.pos != m * n:
            raise ValueError(f"fed {self.pos} of {m * n} elements")
        self.end_of_stream()       # (the last rows' copy noise before the floor is taken)
        rows_v, cols_v = self.rows[0] + self.rows[1], self.cols[0] + self.cols[1]
        if extra_var is not None:
            er, ec = _var_sums(extra_var, self.shape2)
            rows_v, cols_v = rows_v + er, cols_v + ec
        if self.copied and self.active:
            rows_v, cols_v = rows_v + self.copy_rows, cols_v + self.copy_cols
        floor, rms = noise_floor(rows_v, cols_v)
        extra: dict = {"noise_rms": rms}
        if extra_var is not None:
            extra["noise_model"] = "quantization"
            extra["note_noise"] = NOISE_NOTE
        if self.copied and self.active:
            extra["note_copy"] = COPY_NOTE
        rec = self._finish(norm_delta_sq, noise_factor, k, floor, extra)
        if extra_var is not None:       # (a norm that is not finite: the noise explains nothing, as there)
            _explained(rec, norm_delta_sq, float(rows_v.sum()))
        return rec

    def finish_at(self, norm_delta_sq: float, noise_factor: float, k: int, floor: float, extra: dict) -> RankRecord:
        """``finish`` with the noise floor given (``floor``) rather than taken from the fed windows' rounding: a
        delta fed by ``feed_delta`` alone (a DoRA's, ``rank.analyze_factors``), whose floor is its base's."""
        self.end_of_stream()
        return self._finish(norm_delta_sq, noise_factor, k, floor, extra)

    def _finish(self, norm_delta_sq: float, noise_factor: float, k: int, floor: float, extra: dict) -> RankRecord:
        m, n = self.shape2
        r = min(m, n)
        if self.active:
            trim_heap()             # (the row buffer went with end_of_stream: not beside the wide Gram and its solve)
            if not self.tall:
                self._wide_gram()
            acc = self._acc
            rows = acc.rows
            if self.count:
                return self._finish_count(acc, rows, norm_delta_sq, noise_factor * floor, floor, k, extra)
            eig_dtype = kgram.eig_dtype_for(acc.n)
            lam = kgram.gram_eigenvalues(acc, eig_dtype)
        else:
            lam, rows, eig_dtype = np.zeros(r), max(m, n), np.float64
        self.close()
        thr = noise_factor * floor
        s = kgram.singular_values(lam)
        fields = spectral.spectrum_fields(s, thr)
        total = norm_delta_sq if norm_delta_sq >= 0 and math.isfinite(norm_delta_sq) else float(np.sum(s * s))
        delta = kgram.eig_error_bound(r, rows, max(total, float(np.sum(np.clip(lam, 0, None)))),
                                      float(np.sqrt(np.sum(lam * lam))), eig_dtype,
                                      d_float32=not self.tall and self.inexact > 0,
                                      copy_err=math.sqrt(self.copy_err2) if not self.tall else None)
        _, lo, hi = kgram.certified_count(lam, thr * thr, delta)
        bounds: dict = {}
        extra["eig_error_bound"] = delta
        extra["eig_dtype"] = np.dtype(eig_dtype).name
        fields["numerical_rank"] = lo
        if lo != hi:
            bounds["numerical_rank"] = [lo, hi]
            extra["note_bounds"] = (f"{hi - lo} singular values lie within the computation's error bound of "
                                    "the threshold: numerical_rank is the lower end of `bounds`")
        top = s[:k]
        captured = float(np.sum(top * top)) / total if total > 0 else None
        return RankRecord(
            stable_rank=fields["stable_rank"], effective_rank=fields["effective_rank"],
            energy_rank_90=fields["energy_rank_90"], energy_rank_99=fields["energy_rank_99"],
            numerical_rank=fields["numerical_rank"], noise_floor=floor, spectrum=[float(v) for v in top],
            energy_captured=captured, method="gram", shape_2d=(m, n), exact=not bounds, extra=extra,
            bounds=bounds, estimated=[])

    def _finish_count(self, acc, rows: int, norm_delta_sq: float, thr: float, floor: float, k: int,
                      extra: dict) -> RankRecord:
        """``--spectrum count``: ``numerical_rank`` certified by two LDL^T inertia counts of the
        Gram matrix (``kernels.gram.inertia_bracket``), the top ``k`` from subspace iteration on it
        and every other field from those (bounds and estimates, as for ``randomized``)."""
        m, n = self.shape2
        r = min(m, n)
        g = acc.matrix(np.float64, full=True)
        self._acc = None
        lam_top, ritz = kgram.gram_top(g, k, self.seed, vectors=True)
        s_top = np.sqrt(lam_top)
        trace = float(np.trace(g))
        total = norm_delta_sq if norm_delta_sq >= 0 and math.isfinite(norm_delta_sq) else trace
        delta = kgram.gram_error_bound(rows, max(total, trace),
                                       d_float32=not self.tall and self.inexact > 0,
                                       copy_err=math.sqrt(self.copy_err2) if not self.tall else None)
        caps = kgram.energy_caps(g, ritz, total, delta)
        del ritz
        lo, hi, band = kgram.inertia_bracket(g, thr * thr, delta, self.spill_dir)
        del g
        self.close()
        # energy_caps's margin: the computed total may be total_error off the true trace, both ways
        caps = np.minimum(caps, spectral.count_caps(r, total + 2.0 * kgram.total_error(r, delta), lo, thr * thr))
        fields = spectral.partial_spectrum_fields(s_top, total, r, thr, count_hi=hi, caps=caps)
        bounds = dict(fields["bounds"])
        bounds.pop("numerical_rank", None)
        extra["count_error_bound"] = band
        notes = []
        if lo != hi:
            bounds["numerical_rank"] = [lo, hi]
            notes.append(f"{hi - lo} singular values lie within the count's error bound of the threshold: "
                         "numerical_rank is the lower end of `bounds`")
        if bounds.keys() - {"numerical_rank"} or fields["estimated"]:
            notes.append(f"top {len(s_top)} of {r} singular values: other fields in `bounds` are lower bounds, "
                         "those in `estimated` approximate")
        if notes:
            extra["note_bounds"] = "; ".join(notes)
        captured = float(np.sum(s_top * s_top)) / total if total > 0 else None
        return RankRecord(
            stable_rank=fields["stable_rank"], effective_rank=fields["effective_rank"],
            energy_rank_90=fields["energy_rank_90"], energy_rank_99=fields["energy_rank_99"],
            numerical_rank=lo, noise_floor=floor, spectrum=[float(v) for v in s_top],
            energy_captured=captured, method="inertia", shape_2d=(m, n),
            exact=not bounds and not fields["estimated"], extra=extra, bounds=bounds,
            estimated=list(fields["estimated"]))

    def close(self) -> None:
        self._acc = None
        self._buf = None
        self._tiles = None
        if self._file is not None:
            self._file.close()
            self._file = None


class RankSink:
    """The stats pass's hook: feeds each window to a ``DeltaGram`` and starts its delta part at
    the first window whose changes go beyond rounding (re-reading earlier changed windows).

    ``gate``: a quantized pair's floor test, fed by the same pass first (``FloorPass.wants_rank``), says whether
    its change is likely to be ranked at all; while it says no, the delta part waits (``held``), so a quantized
    release of the base (its every window beyond rounding, and within its floor) sums no Gram matrix it then
    drops (60% of a 70B-width GPTQ pair's time). ``catch_up`` starts it after the pass when the test's result
    asks for the rank after all (every window read once more)."""

    def __init__(self, gram: DeltaGram, window_elements: int, gate: Callable[[], bool] | None = None):
        self.gram = gram
        self.window_elements = window_elements
        self.gate = gate
        self.held = False                                 # a window beyond rounding came while the gate said no
        self.prefix: list[tuple[int, int, bool]] = []     # (start, size, changed) before activation

    def window(self, wb, wt, part, base, bname: str, tuned, tname: str) -> None:
        from ..kernels.reference import IDX

        g = self.gram
        changed = bool(part[IDX["n_changed"]] > 0)
        if not g.active:
            beyond = part[IDX["n_beyond"]] > 0 or part[IDX["nonfinite_b"]] != part[IDX["nonfinite_t"]]
            if beyond and self.gate is not None and not self.gate():
                self.held, beyond = True, False
            if not beyond:
                self.prefix.append((g.pos, int(wb.size), changed))
                g.feed(wb, wt, changed)
                return
            self._start(base, bname, tuned, tname)
        g.feed(wb, wt, changed)

    def _start(self, base, bname: str, tuned, tname: str) -> None:
        """The delta part started, the windows before it (``prefix``) read once more in order."""
        g = self.gram
        g.activate()
        for start, size, was_changed in self.prefix:
            if not was_changed:
                g.feed_delta(None, None, False, size)
                continue
            for rb, rt in zip(base.windows(bname, self.window_elements, start, start + size),
                              tuned.windows(tname, self.window_elements, start, start + size)):
                g.feed_delta(rb, rt, True)
        self.prefix = []

    def catch_up(self, base, bname: str, tuned, tname: str) -> bool:
        """After the pass (``DeltaGram.end_of_stream``): the delta part of a pair the gate held, summed from every
        window read once more, the same sums as if it had started with the pass. Whether the Gram matrix is now
        active."""
        g = self.gram
        if not g.active and self.held:
            self._start(base, bname, tuned, tname)
            g.end_of_stream()
        return g.active


def float_matrix(pair) -> tuple[int, int] | None:
    """``(m, n)`` of the part of a pair whose rank is taken, at least 2 x 2 (rows x the rest): both sides
    float matrices of one shape; or a resized one's shared rows (``overlap_rows`` x the rest, the rest
    the same on both sides: the part the stats pass compares); else None."""
    st, sb = pair.shape_tuned, pair.shape_base
    if st is None or sb is None or len(st) < 2 or len(sb) != len(st):
        return None
    if pair.kind == "resized":
        if tuple(st[1:]) != tuple(sb[1:]) or not pair.overlap_rows:
            return None
        m = int(pair.overlap_rows)
    elif tuple(st) != tuple(sb):
        return None
    else:
        m = int(st[0])
    if not (DTYPES[pair.dtype_base].decodable and DTYPES[pair.dtype_tuned].decodable):
        return None
    n = int(math.prod(st[1:]))
    return (m, n) if min(m, n) >= 2 else None


def streamed_rank_sink(pair, options, backend: str, window_elements: int) -> RankSink | None:
    """A ``RankSink`` when this pair's rank is measured from its streamed Gram matrix: CPU, rank on,
    no ``--subspace``, a float matrix (a resized one's shared rows: the stats pass's windows stop
    there) whose smaller side is at most ``exact_svd_max`` and that is too large for the direct LAPACK
    path; else None (``weightdiff.measure.rank.analyze_delta`` then reads it)."""
    from .backend import LAPACK_MAX_ELEMENTS

    if not options.rank or options.subspace or backend != "cpu" or getattr(pair, "transposed", False):
        return None
    mn = float_matrix(pair)
    if mn is None:
        return None
    m, n = mn
    if min(m, n) > options.exact_svd_max or m * n <= LAPACK_MAX_ELEMENTS:
        return None
    return RankSink(DeltaGram((m, n), pair.dtype_base, pair.dtype_tuned, count=options.spectrum == "count",
                              seed=options.seed), window_elements)
