"""A residual stream rotated: the base's weights seen through one orthogonal matrix of the hidden width.

QuaRot, SpinQuant and similar tools fold each RMSNorm's gains into the linears that read it and then
multiply the hidden (residual) dimension by an orthogonal matrix R: the token embedding E becomes E R, every
matrix that reads the residual stream (q, k, v, gate, up, the head) W diag(g) R, every matrix that writes it
(attention and MLP outputs) R^T W. The model computes what the base computes, yet every matrix moved (a
permutation of the hidden dimension is the special case R a permutation matrix): as stored, the weights read as
far from the base's as another model's. This module finds R and shows each base tensor in the rotated frame, so
that what changed beneath the rotation is measured (``comparison.rotated_residual``).

R is the orthogonal Procrustes solution (the U V^T of the SVD of sum A^T B) over the pairs whose form has no
unknown gain: the embedding's rows and the output matrices' columns. It is fitted on the embedding and half the
blocks and must hold, unchanged, on the other half (held out); only then is it taken, refitted on them all.
Values are float64 where the stored format needs it, else float32 (exact for F32, F16 and BF16 values).
Whole matrices are held only by ``values`` (small tensors, token tables matched row by row); every test the
comparison runs on a matrix (``Frame``, ``frame_sums``, ``out_cross``) and ``RotatedSide`` work in row blocks
of ``BLOCK_BYTES``: memory is bounded by the block and by the d x d matrices of the fit, not by the matrix (a
7B-shaped fine-tune with its norms trained held 1.6 GB here, whole matrices decoded twice in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..kernels.dtypes import DTYPES, decode
from .spill import Spilled, row_block, stash_for, times

__all__ = ["OUT_KINDS", "IN_KINDS", "values", "procrustes", "Rotation", "apply", "RotatedSide", "small_rotation", "BLOCK_BYTES", "Frame", "FrameSums", "frame_sums", "in_cross", "out_cross", "in_inner", "out_inner", "sample_rows", "rows_of", "inner", "signed_permutation", "column_gram_correlation"]

#: module kinds that write the residual stream (rows are hidden units): their tensor is R^T W
OUT_KINDS = ("attn.o", "mlp.down")
#: module kinds that read it (columns are hidden units): W diag(g) R, g a norm's gains folded in (or none)
IN_KINDS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "mlp.gate", "mlp.up", "lm_head", "embed", "embed.pos")

_ROWS = 4096                       # rows decoded at a time
#: float64 bytes of one row block a blocked pass decodes at a time (a block of the base, one of the tuned)
BLOCK_BYTES = 32 << 20
#: budgets (``BLOCK_BYTES``) of one row block where each block reads a whole matrix (an output matrix in the rotated
#: frame, R^T B; B's rows in the cross sums of output matrices): more budgets, fewer passes over that matrix. One:
#: 32 MB beside the 512 MB Gram of the tensor measured at 70B widths (four took that path to 1.18 GB, two to 1.05)
OUT_BUDGETS = 1
#: elements decoded at a time into a block's float64 rows (``rows_of``): 8 MB of them
DECODE_PIECE = 1 << 20
#: rows read by a sampled pre-test (``sample_rows``): evenly spaced, the first and the last among them
SAMPLE_ROWS = 256


def _dims(ck, name: str) -> tuple[int, int]:
    """(rows, columns) of tensor ``name`` seen 2-D: a vector as one column, a higher-rank tensor by its first axis."""
    shape = tuple(int(d) for d in ck.tensors[name].shape)
    n = math.prod(shape) if shape else 1
    rows = shape[0] if len(shape) >= 2 else n
    return rows, (n // rows if rows else 0)


def block_rows(cols: int, budget: int | None = None) -> int:
    """Rows of ``cols`` float64 columns in one block of ``budget`` bytes (``BLOCK_BYTES``; at least one)."""
    return max(1, int(BLOCK_BYTES if budget is None else budget) // (8 * max(1, int(cols))))


def rows_of(ck, name: str, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
    """Rows ``r0:r1`` of tensor ``name`` (seen 2-D, ``_dims``) decoded to float64, ``[r1 - r0, cols]``; with
    ``index``, the rows ``index[r0:r1]`` (read row by row) instead."""
    info = ck.tensors[name]
    _, cols = _dims(ck, name)
    if index is not None:
        raw = np.asarray(ck.read_rows(name, np.asarray(index[r0:r1], np.int64))).reshape(-1)
    elif r1 > r0 and not getattr(info, "packed", False):
        # decoded into the result piece by piece: a bf16 block decoded whole went through uint32 and float32
        # copies of its size beside the float64 one (a 134 MB block of an output matrix's fit: 100 MB more)
        out = np.empty((r1 - r0) * cols)
        at = 0
        for w in ck.windows(name, DECODE_PIECE, r0 * cols, r1 * cols):
            w = np.asarray(w).reshape(-1)
            out[at:at + w.size] = decode(w, info.dtype)
            at += w.size
        return out.reshape(r1 - r0, cols)
    else:
        parts = [np.asarray(w).reshape(-1) for w in ck.windows(name, None, r0 * cols, r1 * cols)] if r1 > r0 else []
        raw = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, np.float32)
    return np.asarray(decode(raw, info.dtype if raw.size else "F32"), np.float64).reshape(r1 - r0, cols)


def sample_rows(rows: int, k: int | None = None) -> np.ndarray:
    """``k`` evenly spaced row indices of ``rows`` (all of them when there are no more), the first and last included.

    >>> sample_rows(10, 4).tolist(), sample_rows(3, 4).tolist()
    ([0, 3, 6, 9], [0, 1, 2])
    """
    k = SAMPLE_ROWS if k is None else int(k)
    if rows <= k:
        return np.arange(rows, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, rows - 1, k)).astype(np.int64))


def values(ck, name: str) -> np.ndarray:
    """The tensor ``name`` of ``ck`` decoded, 2-D (a vector as one column): float32 when that holds every
    stored value exactly (at most 24 bits of mantissa and float32's exponent range), else float64."""
    info = ck.tensors[name]
    shape = tuple(int(d) for d in info.shape)
    d = DTYPES[info.dtype]
    exact32 = d.kind == "float" and (d.mant_bits or 0) <= 23 and (d.emin or -126) >= -126
    raw = np.asarray(ck.read(name)).reshape(shape[0] if shape else 1, -1)
    out = np.empty(raw.shape, np.float32 if exact32 else np.float64)
    for lo in range(0, raw.shape[0], _ROWS):
        out[lo:lo + _ROWS] = decode(raw[lo:lo + _ROWS], info.dtype)
    return out if len(shape) >= 2 else out.reshape(-1, 1)


def procrustes(c: np.ndarray, inplace: bool = False) -> np.ndarray:
    """The orthogonal R maximising trace(R^T C): U V^T of the SVD of C (C = sum A^T B for A R ~ B), the orthogonal
    factor of C's polar decomposition. Computed by Newton's iteration in place (``kernels.lapack.polar_inplace``:
    C and one copy, 2 d^2 float64, where numpy's SVD and the product U V^T hold 8 d^2: at d = 8192 the difference
    is 3.2 GB; the copy in a temporary file beyond ``spill.SPILL_BYTES``, ``spill.stash_for``); by the SVD where
    that is missing or cannot finish (C singular to working precision: R is then not unique, the SVD picks one). ``inplace``: C (float64, C-contiguous) is overwritten with R and returned.

    >>> r = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0]
    >>> a = np.random.default_rng(1).normal(size=(20, 4))
    >>> bool(np.allclose(procrustes(a.T @ (a @ r)), r))
    True
    """
    from ..kernels import lapack

    a = c if inplace and isinstance(c, np.ndarray) and c.dtype == np.float64 and c.flags.c_contiguous \
        and c.flags.writeable else np.array(c, np.float64, order="C")
    if lapack.polar_available():
        stash = stash_for(a)        # over 256 MB (d > 5,792): the iterate waits in a temporary file, same bits
        try:
            lapack.polar_inplace(a, stash=stash)
            return a
        except lapack.PolarFailed:
            pass                # ``a`` holds a finite iterate with C's orthogonal factor: its SVD gives it
        finally:
            if stash is not None:
                stash.close()
    u, _, vt = np.linalg.svd(a)
    del a
    return u @ vt


@dataclass
class Rotation:
    """Sums for one Procrustes fit: ``add`` each pair's cross sums (``in_cross``: B^T T for tuned = B R;
    ``out_cross``: B T^T for tuned = R^T B), then ``solve``, which turns the sum into R in place (one d x d
    float64 array from the first ``add`` to the result; ``add`` takes over a float64 ``cross`` it is handed,
    ``own``, rather than copy it)."""

    d: int
    c: np.ndarray | None = None
    pairs: int = 0

    def sums(self) -> np.ndarray:
        """The d x d float64 sums, for a pair's cross sums to be added to in place (``in_cross`` / ``out_cross``
        ``into=``), counting that pair: no d x d array of the pair's own beside them."""
        if self.c is None:
            self.c = np.zeros((self.d, self.d))
        self.pairs += 1
        return self.c

    def add(self, cross: np.ndarray, own: bool = False) -> None:
        if self.c is None:
            self.c = cross if own and isinstance(cross, np.ndarray) and cross.dtype == np.float64 \
                and cross.flags.c_contiguous and cross.flags.writeable else np.array(cross, np.float64, order="C")
        else:
            self.c += cross
        self.pairs += 1

    def solve(self) -> np.ndarray | None:
        """R; the sums are used up (``c`` None after). None when there are none, or when they are not finite (a
        matrix holding NaN or values whose products overflow: no rotation fits them, and LAPACK's SVD of such sums
        fails to converge)."""
        c, self.c = self.c, None
        if c is None or not np.isfinite(c).all():
            return None
        return procrustes(c, inplace=True)


def apply(kind: str, base: np.ndarray, r: np.ndarray | None, gain: np.ndarray | None = None) -> np.ndarray:
    """The base tensor in the rotated frame, float64: ``in`` (base diag(gain)) R, ``out`` R^T base (a bias,
    [d, 1], likewise); ``r`` None: no rotation (a norm's gains folded, nothing rotated); ``rows``: base diag-scaled
    row by row (``gain`` one factor per row), for units rescaled."""
    if kind == "rows":                  # each row the base's times its own factor (no rotation)
        return base.astype(np.float64) * gain.reshape(-1, *([1] * (base.ndim - 1)))
    if kind == "in":
        b = base.astype(np.float64) if gain is None else base.astype(np.float64) * gain[None, :]
        return b if r is None else times(b, r)
    if isinstance(r, Spilled):
        r = np.asarray(r)
    return base.astype(np.float64) if r is None else r.T @ base.astype(np.float64)


class RotatedSide:
    """One base tensor in the tuned model's rotated frame (``apply``), as float64 values (dtype ``F64``), for
    ``compute.remeasure``: computed row block by row block as windows ask for them (``Frame``; the block kept
    for the next window until its last window, which is a copy), never whole unless ``read`` asks for it.
    ``order``: (axis, index), the base's rows (axis 0) or columns (1) gathered in that order first, for units
    reordered and rescaled."""

    def __init__(self, ck, name: str, source: str, kind: str, r: np.ndarray, gain: np.ndarray | None = None,
                 order: tuple[int, np.ndarray] | None = None):
        info = ck.tensors[source]
        self.path, self._ck, self._source, self._kind, self._r, self._gain = ck.path, ck, source, kind, r, gain
        self._order = order
        # the base's weights as the tuned model's writer saw them, up to the error of factors recovered from
        # the files (a norm's ratio rounded to its dtype, a fitted R): a quantizer's scales come back within an ulp
        self.reconstructed = True
        self._shape = tuple(int(d) for d in info.shape)
        self._frame = Frame(ck, source, kind, r, gain, order)
        self._spans = self._frame.blocks()
        self._cached: tuple[int, int, np.ndarray] | None = None
        self.tensors = {name: replace(info, name=name, dtype="F64", start=None, end=None)}
        self.quant: dict = {}

    def _span(self, i: int) -> tuple[int, np.ndarray]:
        """(first flat element, values) of row block ``i``, flat."""
        lo, hi = self._spans[i]
        if self._cached is None or self._cached[0] != i:
            self._cached = None             # (the last block is let go before the next is computed)
            got = np.ascontiguousarray(self._frame.block(lo, hi).reshape(-1))
            got.flags.writeable = False
            self._cached = (i, lo * self._frame.cols, got)
        return self._cached[1], self._cached[2]

    def release(self) -> None:
        """Let go of the row block kept for the next window (the tensor is measured)."""
        self._cached = None

    def windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None):
        cols = max(1, self._frame.cols)
        total = self._frame.rows * self._frame.cols
        stop = total if stop is None else min(int(stop), total)
        step = max(1, int(max_elements or total or 1))
        pos = int(start)
        while pos < stop:
            end = min(pos + step, stop)
            parts = []
            at = pos
            while at < end:
                i = next(k for k, (lo, hi) in enumerate(self._spans) if lo * cols <= at < hi * cols)
                first, flat = self._span(i)
                upto = min(end, first + flat.size)
                part = flat[at - first:upto - first]
                if upto == first + flat.size:
                    # the block's last window: a copy, and the block let go now, not after the next block is
                    # computed (the consumer holds this window until then: a view kept the whole block alive
                    # beside the next, 128 MB for a writer at the 70B width before blocks were one budget)
                    part, self._cached = part.copy(), None
                parts.append(part)
                at = upto
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)
            pos = end

    def read(self, name: str) -> np.ndarray:
        parts = [self._frame.block(lo, hi).reshape(-1) for lo, hi in self._spans]
        flat = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return flat.reshape(self._shape)

    def read_rows(self, name: str, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self._frame.block(0, 0, rows).reshape((len(rows),) + self._shape[1:])

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        return None                 # float64 values: no quantization floor


class Frame:
    """The base tensor ``name`` of ``ck`` seen in a frame (``apply``), computed row block by row block, float64:
    ``order`` (axis, index) gathers its rows (axis 0) or columns (1) first; ``kind`` ``in`` scales its columns by
    ``gain`` then multiplies by ``r`` on the right, ``out`` multiplies by ``r``^T on the left (each output row block
    then reads every row of the base, in blocks), ``rows`` scales each row by its ``gain``."""

    def __init__(self, ck, name: str, kind: str = "in", r: np.ndarray | None = None, gain: np.ndarray | None = None,
                 order: tuple[int, np.ndarray] | None = None):
        self.ck, self.name, self.kind, self.r, self.gain = ck, name, kind, r, gain
        self.rows, self.cols = _dims(ck, name)
        self._rows_index = np.asarray(order[1], np.int64) if order is not None and order[0] == 0 else None
        self._cols_index = np.asarray(order[1], np.int64) if order is not None and order[0] == 1 else None
        if self._rows_index is not None:
            self.rows = len(self._rows_index)

    def base(self, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
        """Rows ``r0:r1`` of the base in its units' order (or the rows ``index``), before the frame's factors."""
        if index is not None:
            at = index if self._rows_index is None else self._rows_index[index]
            b = rows_of(self.ck, self.name, 0, len(at), at)
        else:
            b = rows_of(self.ck, self.name, r0, r1, self._rows_index)
        return b if self._cols_index is None else np.take(b, self._cols_index, axis=1)

    def block(self, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
        """Rows ``r0:r1`` of the base in the frame (or the rows ``index``), float64."""
        if self.kind == "out" and self.r is not None:
            pick = np.arange(r0, r1) if index is None else np.asarray(index, np.int64)
            acc = np.zeros((len(pick), self.cols))
            step = block_rows(self.cols)
            # the product added in column tiles: a temporary of a tile, not of the whole block
            tile = max(1, (8 << 20) // (8 * max(1, len(pick))))
            for k0 in range(0, self.rows, step):
                k1 = min(self.rows, k0 + step)
                rt = np.ascontiguousarray(row_block(self.r, k0, k1)[:, pick].T)    # (R's rows read back if spilled)
                b = self.base(k0, k1)
                for c0 in range(0, self.cols, tile):
                    acc[:, c0:c0 + tile] += rt @ b[:, c0:c0 + tile]
                rt = b = None       # (a name rebound keeps its old array until the new one is made: 2 blocks)
            return acc
        b = self.base(r0, r1, index)
        if self.kind == "rows":
            g = self.gain[r0:r1] if index is None else self.gain[np.asarray(index, np.int64)]
            return b * np.asarray(g, np.float64).reshape(-1, 1)
        if self.kind == "in":
            if self.gain is not None:
                b *= np.asarray(self.gain, np.float64)[None, :]
            return b if self.r is None else times(b, self.r)
        return b

    def blocks(self):
        """(r0, r1) row ranges of one block each: fewer and taller for ``out`` (each reads the whole base)."""
        step = block_rows(self.cols, OUT_BUDGETS * BLOCK_BYTES if self.kind == "out" and self.r is not None else None)
        return [(lo, min(self.rows, lo + step)) for lo in range(0, self.rows, step)]


@dataclass
class FrameSums:
    """Sums of one tuned tensor against frames of the base over the same rows (all of them, or a sample): per
    frame x.y and x.x, and the same over the tuned tensor's nonzero elements only (``_kept``); y.y and its kept
    part; the tuned tensor's zeros and the first frame's."""

    xy: np.ndarray
    xx: np.ndarray
    xy_kept: np.ndarray
    xx_kept: np.ndarray
    yy: float
    yy_kept: float
    zeros_tuned: int
    zeros_base: int

    def cosines(self, kept: bool = False) -> list[float]:
        """Each frame's cosine with the tuned tensor (0 when either is zero); ``kept``: on its nonzero elements."""
        xy, xx, yy = (self.xy_kept, self.xx_kept, self.yy_kept) if kept else (self.xy, self.xx, self.yy)
        return [float(a) / den if (den := math.sqrt(float(b)) * math.sqrt(yy)) else 0.0 for a, b in zip(xy, xx)]


def frame_sums(frames: Sequence[Frame], tuned, tname: str, rows: np.ndarray | None = None,
               upto: int | None = None) -> FrameSums:
    """``FrameSums`` of tuned tensor ``tname`` against each of ``frames`` (one base tensor seen several ways, of
    its shape), block by block over every row (the first ``upto`` only: a resized table's shared rows), or over the
    rows ``rows`` only (a sampled pre-test)."""
    k = len(frames)
    xy, xx, xyk, xxk = (np.zeros(k) for _ in range(4))
    yy = yyk = 0.0
    zt = zb = 0
    f0 = frames[0]
    n = len(rows) if rows is not None else f0.rows if upto is None else min(int(upto), f0.rows)
    step = block_rows(f0.cols, OUT_BUDGETS * BLOCK_BYTES if f0.kind == "out" and f0.r is not None else BLOCK_BYTES)
    spans = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    for lo, hi in spans:
        idx = None if rows is None else np.asarray(rows[lo:hi], np.int64)
        t = rows_of(tuned, tname, lo, hi) if idx is None else rows_of(tuned, tname, 0, len(idx), idx)
        kept = t != 0
        tk = np.where(kept, t, 0.0)
        yy += float(np.vdot(t, t))
        yyk += float(np.vdot(tk, tk))
        zt += int(t.size - np.count_nonzero(kept))
        for i, f in enumerate(frames):
            x = f.block(lo, hi) if idx is None else f.block(0, 0, idx)
            if i == 0:
                zb += int(x.size - np.count_nonzero(x))
            xy[i] += float(np.vdot(x, t))
            xx[i] += float(np.vdot(x, x))
            xk = np.where(kept, x, 0.0)
            xyk[i] += float(np.vdot(xk, tk))
            xxk[i] += float(np.vdot(xk, xk))
            x = xk = None           # (let go before the next frame's block is made)
        t = kept = tk = None
    return FrameSums(xy, xx, xyk, xxk, yy, yyk, zt, zb)


def in_cross(base, bname: str, tuned, tname: str, upto: int | None = None,
             index: np.ndarray | None = None, into: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(B^T T, ||B||, ||T||) over the first ``upto`` rows of two matrices [n, d] (all of them when None), float64, in
    row blocks; ``index``: B's rows in that order (T's first ``len(index)`` rows against them). What
    ``Rotation.add`` sums for a reader of the residual stream (tuned = B R). ``into``: a d x d float64 array the
    sums are added to (and returned), a fit's own sums (``Rotation.sums``), so that no d x d array of this pair's is
    made. Each block's product is added in column tiles of ``BLOCK_BYTES``: a d x d temporary per block, beside the
    sums and the fit's, took a 70B-width fit (d = 8,192) to 1.9 GB."""
    d, w = _dims(base, bname)[1], _dims(tuned, tname)[1]
    out = np.zeros((d, w)) if into is None else _sums_array(into, (d, w))
    tile = block_rows(d)                # a column tile of the product: BLOCK_BYTES

    def add(b: np.ndarray, t: np.ndarray) -> None:
        bt = b.T
        for j0 in range(0, w, tile):
            out[:, j0:j0 + tile] += bt @ t[:, j0:j0 + tile]

    nb, nt = _in_pass(base, bname, tuned, tname, upto, index, add)
    return out, nb, nt


def in_inner(base, bname: str, tuned, tname: str, r: np.ndarray, upto: int | None = None,
             index: np.ndarray | None = None) -> tuple[float, float, float]:
    """(sum(R * B^T T), ||B||, ||T||) over ``in_cross``'s rows, as sum((B R) * T) in row blocks: trace(R^T B^T T)
    with no d x d array besides ``r`` (for the cosine of B R with T)."""
    s = [0.0]

    def add(b: np.ndarray, t: np.ndarray) -> None:
        s[0] += inner(b @ r, t)

    nb, nt = _in_pass(base, bname, tuned, tname, upto, index, add)
    return s[0], nb, nt


def _in_pass(base, bname: str, tuned, tname: str, upto: int | None, index: np.ndarray | None, each) -> tuple[float, float]:
    """``each(B block, T block)`` over row blocks of two matrices [n, d] (``in_cross``'s rows), float64; (||B||, ||T||)."""
    if index is not None:
        rows = len(index)
    else:
        rows = min(_dims(base, bname)[0], _dims(tuned, tname)[0]) if upto is None else int(upto)
    step = block_rows(_dims(base, bname)[1])
    nb = nt = 0.0
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        b = rows_of(base, bname, lo, hi, index)
        t = rows_of(tuned, tname, lo, hi)
        nb, nt = nb + float(np.vdot(b, b)), nt + float(np.vdot(t, t))
        each(b, t)
        b = t = None                # (let go before the next blocks are read, not after)
    return math.sqrt(nb), math.sqrt(nt)


def out_cross(base, bname: str, tuned, tname: str, into: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(B T^T, ||B||, ||T||) of two matrices of one shape [d, n], float64, in row blocks: a block of B's rows (``OUT_BUDGETS``
    budgets) against each block of T's in turn. What ``Rotation.add`` sums for a writer (tuned = R^T B); the cosine of R^T B with
    T is then sum(R * B T^T) / (||B|| ||T||) for any orthogonal R (``out_inner`` sums it without the d x d array).
    ``into``: as for ``in_cross``."""
    d = _dims(base, bname)[0]
    out = np.zeros((d, d)) if into is None else _sums_array(into, (d, d))

    def add(i0: int, i1: int, j0: int, j1: int, p: np.ndarray) -> None:
        out[i0:i1, j0:j1] += p

    nb, nt = _out_pass(base, bname, tuned, tname, add)
    return out, nb, nt


def out_inner(base, bname: str, tuned, tname: str, r: np.ndarray) -> tuple[float, float, float]:
    """(sum(R * B T^T), ||B||, ||T||) of two matrices [d, n] and a d x d ``r``, the cross sums' blocks summed against
    ``r``'s as they are made: trace(R^T B T^T) with no d x d array besides ``r`` (for the cosine of R^T B with T)."""
    s = [0.0]

    def add(i0: int, i1: int, j0: int, j1: int, p: np.ndarray) -> None:
        s[0] += inner(r[i0:i1, j0:j1], p)

    nb, nt = _out_pass(base, bname, tuned, tname, add)
    return s[0], nb, nt


def _out_pass(base, bname: str, tuned, tname: str, each) -> tuple[float, float]:
    """``each(i0, i1, j0, j1, B[i0:i1] T[j0:j1]^T)`` over blocks of two [d, n] matrices, float64: a block of B's rows
    (``OUT_BUDGETS`` budgets) against each block of T's in turn; (||B||, ||T||)."""
    d, n = _dims(base, bname)
    big, small = block_rows(n, OUT_BUDGETS * BLOCK_BYTES), block_rows(n)
    nb = nt = 0.0
    for i0 in range(0, d, big):
        i1 = min(d, i0 + big)
        b = rows_of(base, bname, i0, i1)
        nb += float(np.vdot(b, b))
        for j0 in range(0, d, small):
            j1 = min(d, j0 + small)
            t = rows_of(tuned, tname, j0, j1)
            if i0 == 0:
                nt += float(np.vdot(t, t))
            each(i0, i1, j0, j1, b @ t.T)
            t = None
        b = None                    # (a block of B's rows, 128 MB at 70B widths: let go before the next is read)
    return math.sqrt(nb), math.sqrt(nt)


def _sums_array(into: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if not (isinstance(into, np.ndarray) and into.dtype == np.float64 and into.shape == shape and into.flags.writeable):
        raise ValueError(f"sums of shape {shape} go into a writeable float64 array of that shape")
    return into


def inner(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) of two arrays of one shape, float64, in row blocks (no temporary of their size), summed in a
    fixed order whatever the machine's BLAS threads (the cosines it gives end up in the JSON).

    >>> inner(np.arange(6.0).reshape(3, 2), np.ones((3, 2)))
    15.0
    """
    a2, b2 = a.reshape(a.shape[0] if a.ndim else 1, -1), b.reshape(b.shape[0] if b.ndim else 1, -1)
    step = block_rows(a2.shape[1] if a2.ndim == 2 else 1, 8 << 20)
    return float(sum(float(np.sum(np.multiply(a2[i:i + step], b2[i:i + step], dtype=np.float64)))
                     for i in range(0, a2.shape[0], step)))


def signed_permutation(r: np.ndarray, atol: float = 1.1e-5) -> bool:
    """Whether every column of ``r`` has an entry of magnitude 1 within ``atol`` (R orthogonal: a permutation of
    the hidden dimension, signs allowed), in row blocks (``numpy.allclose(|R|.max(0), 1)``, its tolerances)."""
    top = np.zeros(r.shape[1] if r.ndim == 2 else 0)
    step = block_rows(max(1, top.size), 8 << 20)
    for i in range(0, r.shape[0], step):
        np.maximum(top, np.max(np.abs(row_block(r, i, i + step)), axis=0), out=top)
    return bool(np.all(np.abs(top - 1.0) <= atol))


def column_gram_correlation(base, bname: str, tuned, tname: str, k: int | None = None) -> float | None:
    """Pearson correlation of the off-diagonal entries of B[:, S]^T B[:, S] and T[:, S]^T T[:, S], S ``k`` evenly
    spaced columns (``sample_rows``) of two matrices [d, n] of one shape, read in row blocks. A matrix that writes the
    residual stream, rotated, is R^T B: its columns' inner products are B's exactly (and a fine-tune's nearly), where
    an independent model's are unrelated to B's (about 0, spread 1/sqrt(pairs)). None when it cannot tell (fewer
    than three columns, no spread)."""
    d, n = _dims(base, bname)
    if n < 3 or _dims(tuned, tname) != (d, n):
        return None
    cols = sample_rows(n, k)
    gb = np.zeros((len(cols), len(cols)))
    gt = np.zeros_like(gb)
    step = block_rows(n)
    for lo in range(0, d, step):
        hi = min(d, lo + step)
        b = rows_of(base, bname, lo, hi)[:, cols]
        t = rows_of(tuned, tname, lo, hi)[:, cols]
        gb += b.T @ b
        gt += t.T @ t
    iu = np.triu_indices(len(cols), 1)
    x, y = gb[iu], gt[iu]
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.vdot(x, x)) * float(np.vdot(y, y)))
    return float(np.vdot(x, y)) / den if den > 0 and math.isfinite(den) else None


def small_rotation(r: np.ndarray) -> bool:
    """Whether ``r`` is the identity within fitting noise (no rotation: a fine-tune whose embedding was
    replaced fits R = I on its output matrices). ||R - I||^2 = ||R||^2 - 2 trace(R) + d: no d x d temporary."""
    d = r.shape[0]
    gap2 = float(np.vdot(r, r)) - 2.0 * float(np.trace(r)) + float(d)
    return math.sqrt(max(gap2, 0.0)) <= 0.05 * math.sqrt(d)
