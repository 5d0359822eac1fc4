"""The noise-floor test of a quantized pair and the grid test of a dequantized export.

Pure array compute over decoded windows: ``floor_stats`` counts, per window, the elements
whose difference lies beyond the per-element quantization floor that the dequantizers of
``kernels.quant`` return (one numba pass; ``floor_stats_numpy`` is its specification);
``grid_levels`` and ``row_grids`` recognise rows that lie on a uniform grid of at most 2^b
levels (a quantized-then-dequantized export). docs/methodology.md has the formulas.
"""

from __future__ import annotations
__all__ = ["FLOOR_FIELDS", "floor_stats", "floor_stats_numpy", "grid_levels", "row_grids", "round_trip",
           "ggml_round_trip", "GGML_LEGACY", "clipped_beyond", "clipped_beyond_numpy"]

import numpy as np

def grid_levels(rows: np.ndarray, max_levels: int = 256) -> tuple[int, float]:
    """For float rows, the number of levels of the coarsest uniform grid that holds every row
    (each row its own step: the gcd of its distinct differences), or (0, nan) when a row is on
    no grid of at most ``max_levels`` levels. Returns (levels of the widest row, worst misfit).

    >>> grid_levels(np.array([[0.0, 0.25, -0.5, 0.75]], np.float32))
    (6, 0.0)
    """
    worst, misfit = 0, 0.0
    for row in np.asarray(rows, dtype=np.float64):
        u = np.unique(row[np.isfinite(row)])
        if u.size > max_levels:
            return 0, float("nan")
        if u.size < 2:
            continue
        span = u[-1] - u[0]
        step = span / np.round(span / np.diff(u).min())
        k = (u - u[0]) / step
        err = float(np.max(np.abs(k - np.round(k))))
        if err > 0.02:
            return 0, err
        misfit = max(misfit, err)
        worst = max(worst, int(round(k[-1])) + 1)
    return (worst, misfit) if worst <= max_levels else (0, float("nan"))


# -- the noise-floor test ---------------------------------------------------------------

#: fields of ``floor_stats``: elements compared, elements beyond the floor, sum of (|d| / floor)^2,
#: largest |d| / floor, sum of squares of the part above the floor, sum of d^2, elements that moved
#: (finite |d| above the cast allowance ``cast_rel * |base|``, or above 0 without one) on a nonzero
#: quantized value, how many of those sit within ``NEAR_U`` of their floor (a quantization spreads them
#: over it: about that share), and the elements off by more than ``off_rel * |base|`` whatever their
#: quantized value (none: the float side is the dequantized values, up to a dequantization's rounding)
FLOOR_FIELDS = ("count", "n_beyond", "sum_u2", "max_u", "sum_excess2", "sum_d2", "n_moved", "n_moved_near",
                "n_off")
#: |d| / floor below which a moved element counts as near its quantized value
NEAR_U = 0.25


def floor_stats(base: np.ndarray, other: np.ndarray, floor: np.ndarray, col_start: int = 0,
                ncols: int = 1, cast_rel: float = 0.0, off_rel: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One window of the noise-floor test in one numba pass (no window-sized temporaries):
    the same fields as ``floor_stats_numpy``, its specification; counts and the maximum are
    equal, the float sums agree to rounding (summed in order, not pairwise).

    >>> s, cols = floor_stats(np.array([1.0, 2.0, 3.0]), np.array([1.2, 2.0, 3.9]),
    ...                       np.array([0.25, 0.25, 0.5], np.float32), 0, 3)
    >>> dict(zip(FLOOR_FIELDS, s.round(3).tolist()))["n_beyond"], cols.tolist()
    (1.0, [0, 0, 1])
    """
    b = np.ascontiguousarray(base).reshape(-1)
    o = np.ascontiguousarray(other).reshape(-1)
    f = np.ascontiguousarray(floor).reshape(-1)
    if not (b.size == o.size == f.size):
        raise ValueError(f"floor_stats: {b.size}, {o.size} and {f.size} elements")
    ncols = max(int(ncols), 1)
    cols = np.zeros(ncols, dtype=np.int64)
    out = np.zeros(len(FLOOR_FIELDS), dtype=np.float64)
    _floor_pass()(b, o, f, float(cast_rel), float(off_rel), int(col_start), ncols, cols, out)
    if ncols == 1:
        cols[0] = int(out[1])
    return out, cols


_FLOOR_PASS: list = []


def _floor_pass():
    """The compiled pass behind ``floor_stats`` (compiled on first use, cached on disk)."""
    if not _FLOOR_PASS:
        import math

        import numba

        from .numba_cache import ensure

        ensure()     # numba places its cache when it decorates

        @numba.njit(cache=True, nogil=True)
        def run(b, o, f, cast_rel, off_rel, col_start, ncols, cols, out):  # pragma: no cover - compiled
            # the counts taken without branches (a comparison's outcome added as 0 or 1, a sum's term max(., 0)):
            # whether an element is beyond its floor, or near its value, is a coin toss the branch predictor
            # loses (11.5 -> 6 ns an element); the sums the same terms in the same order, so the same bits
            n_beyond = 0
            n_moved = 0
            n_near = 0
            n_off = 0
            su2 = se2 = sd2 = 0.0
            mx = 0.0
            nan_max = False
            many = ncols > 1
            c = col_start % ncols          # the column of element i, kept without a division per element
            for i in range(b.size):
                bi = np.float64(b[i])
                ab = abs(bi)
                d = abs(bi - np.float64(o[i]))
                fi = np.float64(f[i]) + cast_rel * ab
                finite = math.isfinite(d)
                if not finite:
                    d = math.inf
                if fi != fi:               # a NaN floor (a NaN scale) explains nothing
                    fi = -1.0
                if fi > 0:
                    u = d / fi
                elif d > 0 or fi < 0:
                    u = math.inf
                else:
                    u = 0.0
                beyond = d > fi
                n_beyond += beyond
                if many:
                    cols[c] += beyond
                    c += 1
                    if c == ncols:
                        c = 0
                if u != u:
                    nan_max = True
                else:
                    mx = max(mx, u)
                if finite:
                    su2 += u * u
                    ex = max(d - fi, 0.0)  # adding +0.0 leaves a sum that started at +0.0 as it was
                    se2 += ex * ex
                    sd2 += d * d
                    n_off += d > off_rel * ab
                    moved = d > cast_rel * ab and o[i] != 0
                    n_moved += moved
                    n_near += moved and u < NEAR_U
            out[0] = b.size
            out[1] = n_beyond
            out[2] = su2
            out[3] = math.nan if nan_max else mx
            out[4] = se2
            out[5] = sd2
            out[6] = n_moved
            out[7] = n_near
            out[8] = n_off

        _FLOOR_PASS.append(run)
    return _FLOOR_PASS[0]


def floor_stats_numpy(base: np.ndarray, other: np.ndarray, floor: np.ndarray, col_start: int = 0,
                ncols: int = 1, cast_rel: float = 0.0, off_rel: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The numpy specification of ``floor_stats`` (the numba pass must agree with it). One window of the noise-floor test: ``d = |base - other|`` against ``floor`` (+
    ``cast_rel * |base|``, for a base stored wider than the quantizer read it).

    Returns (float64[len(FLOOR_FIELDS)], int64[ncols]: elements beyond the floor per column,
    the window's first element being column ``col_start``). A NaN or Inf on either side,
    a difference where the floor is 0, and an element whose floor is NaN (a NaN scale) is beyond.

    >>> s, cols = floor_stats_numpy(np.array([1.0, 2.0, 3.0]), np.array([1.2, 2.0, 3.9]),
    ...                       np.array([0.25, 0.25, 0.5], np.float32), 0, 3)
    >>> dict(zip(FLOOR_FIELDS, s.round(3).tolist()))["n_beyond"], cols.tolist()
    (1.0, [0, 0, 1])
    """
    b = np.asarray(base, dtype=np.float64)
    d = np.abs(b - np.asarray(other, dtype=np.float64))
    f = np.asarray(floor, dtype=np.float64) + cast_rel * np.abs(b)
    bad = ~np.isfinite(d)
    d = np.where(bad, np.inf, d)
    f = np.where(np.isnan(f), -1.0, f)
    beyond = d > f
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(f > 0, d / f, np.where((d > 0) | (f < 0), np.inf, 0.0))
    fin = ~bad
    with np.errstate(invalid="ignore"):
        excess = np.maximum(d - f, 0.0)
    off = fin & (d > off_rel * np.abs(b))
    moved = fin & (d > cast_rel * np.abs(b)) & (np.asarray(other) != 0)
    out = np.array([d.size, beyond.sum(), float(np.sum(u[fin] ** 2)), float(u.max()) if u.size else 0.0,
                    float(np.sum(excess[fin] ** 2)), float(np.sum(d[fin] ** 2)), moved.sum(),
                    np.count_nonzero(u[moved] < NEAR_U), off.sum()], dtype=np.float64)
    idx = np.flatnonzero(beyond)
    cols = np.bincount((idx + col_start) % ncols, minlength=ncols).astype(np.int64) if ncols > 1 else \
        np.array([idx.size], dtype=np.int64)
    return out, cols


def row_grids(rows: np.ndarray, max_levels: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a 2-D float array: (step, lowest, highest value, levels) of the uniform grid the
    row's values lie on; step 0 for a row of one value, NaN for a row on no grid of at most
    ``max_levels`` levels (within 2% of a step). A dequantized int-b export has one per row.

    >>> s, lo, hi, n = row_grids(np.array([[0.0, 0.5, -1.0, 1.5], [0.1, 0.2, 0.7, 0.4]]))
    >>> s.round(6).tolist(), n.tolist()
    ([0.5, 0.1], [6.0, 7.0])
    """
    x = np.asarray(rows, dtype=np.float64)
    out = np.full((4, x.shape[0]), np.nan)
    for i, row in enumerate(x):
        u = np.unique(row[np.isfinite(row)])
        if u.size == 0 or u.size > max_levels:
            continue
        if u.size == 1:
            out[:, i] = (0.0, u[0], u[0], 1)
            continue
        span = u[-1] - u[0]
        k = np.round(span / np.diff(u).min())
        step = span / k
        if k + 1 > max_levels or np.max(np.abs((u - u[0]) / step - np.round((u - u[0]) / step))) > 0.02:
            continue
        out[:, i] = (step, u[0], u[-1], k + 1)
    return out[0], out[1], out[2], out[3]


def round_trip(v: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized values, step) of rows ``v`` [units, n], each unit quantized to nearest on its own
    grid: symmetric absmax (``2^(bits-1) - 1`` levels each way) or asymmetric min-max (``2^bits - 1`` steps),
    rounding half to even (as ``torch.round``). A unit of zeros (or of one value, asymmetric) has step 0.

    >>> dq, step = round_trip(np.array([[0.5, -1.0, 0.26, 0.0]]), 2, True)
    >>> dq.tolist(), step.tolist()
    ([[0.0, -1.0, 0.0, 0.0]], [1.0])
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        if sym:
            step = np.abs(v).max(axis=1) / (2 ** (bits - 1) - 1)
            safe = np.where(step > 0, step, 1.0)
            return np.round(v / safe[:, None]) * safe[:, None], step
        lo, hi = v.min(axis=1), v.max(axis=1)
        step = (hi - lo) / (2 ** bits - 1)
        safe = np.where(step > 0, step, 1.0)
        zero = np.round(-lo / safe)
        q = np.clip(np.round(v / safe[:, None]) + zero[:, None], 0, 2 ** bits - 1)
        return (q - zero[:, None]) * safe[:, None], step


#: llama.cpp's block quantizations that need no search (ggml-quants.c ``quantize_row_*_ref``): name ->
#: (levels, signed: the largest magnitude maps to the lowest code; else min-max with a stored minimum)
GGML_LEGACY = {"Q8_0": (255, True), "Q4_0": (16, True), "Q5_0": (32, True), "Q4_1": (16, False), "Q5_1": (32, False)}


def ggml_round_trip(v: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized values, step) of blocks ``v`` [blocks, 32] under llama.cpp's ``kind`` (``GGML_LEGACY``),
    the arithmetic of ggml's reference quantizers in float32: Q8_0 ``d = amax / 127``, codes rounded half
    away from zero; Q4_0/Q5_0 ``d = max / -8`` (or -16, ``max`` the signed value of largest magnitude), codes
    ``trunc(x / d + 8.5)`` clipped to 15 (31); Q4_1/Q5_1 ``d = (max - min) / 15`` (31), codes
    ``trunc((x - min) / d + 0.5)``; each block's ``d`` (and ``min``) stored as fp16, the value ``q d (+ min)``.
    The step is the fp16 ``|d|``. What a float copy of a GGUF is tested against (``detect_roundtrip``).

    >>> dq, step = ggml_round_trip(np.linspace(-1, 1, 32, dtype=np.float32)[None], "Q4_0")
    >>> float(step[0]), float(dq[0, 0]), float(dq[0, -1])
    (0.125, -1.0, 0.875)
    """
    levels, signed = GGML_LEGACY[kind]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        x = np.asarray(v, np.float32)      # float64 values past float32's range: inf, as ggml's own cast
        if kind == "Q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            a = np.abs(x * inv)
            q = np.sign(x) * (np.floor(a) + np.floor(2 * (a - np.floor(a)))) + np.float32(0)   # roundf, no -0
            d16 = d.astype(np.float16).astype(np.float32)
            return (q.astype(np.float32) * d16).astype(np.float32), d16[:, 0]
        if signed:
            half = levels // 2
            big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d = big / np.float32(-half)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.clip(np.trunc(x * inv + np.float32(half + 0.5)), 0, levels - 1)
            d16 = d.astype(np.float16).astype(np.float32)
            return ((q - half).astype(np.float32) * d16).astype(np.float32), np.abs(d16[:, 0])
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(levels - 1)
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = np.clip(np.trunc((x - lo) * inv + np.float32(0.5)), 0, levels - 1)
        d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
        return (d16 * q.astype(np.float32) + m16).astype(np.float32), d16[:, 0]


def clipped_beyond(base: np.ndarray, other: np.ndarray, floor: np.ndarray, group: int,
                   cast_rel: float = 0.0) -> int:
    """Elements of one window beyond the floor that AWQ's clipping search explains, in one numba pass (no
    window-sized temporaries; the numpy form made ten float64 arrays of each window, a quarter of a 70B-width AWQ
    pair's time): the count of ``clipped_beyond_numpy``, its specification. The window starts at a group boundary
    and holds whole groups of ``group`` consecutive elements.

    >>> clipped_beyond(np.array([1.0, 0.1, 3.0, 0.2]), np.array([1.0, 0.1, 2.0, 0.2]), np.full(4, 0.1), 4)
    1
    """
    b = np.ascontiguousarray(base).reshape(-1)
    o = np.ascontiguousarray(other).reshape(-1)
    f = np.ascontiguousarray(floor).reshape(-1)
    group = int(group)
    if group < 1 or b.size % group:
        raise ValueError(f"clipped_beyond: {b.size} elements are not whole groups of {group}")
    if not (b.size == o.size == f.size):
        raise ValueError(f"clipped_beyond: {b.size}, {o.size} and {f.size} elements")
    return int(_clip_pass()(b, o, f, group, float(cast_rel)))


_CLIP_PASS: list = []


def _clip_pass():
    """The compiled pass behind ``clipped_beyond`` (compiled on first use, cached on disk)."""
    if not _CLIP_PASS:
        import numba

        from .numba_cache import ensure

        ensure()

        @numba.njit(cache=True, nogil=True)
        def run(b, o, f, group, cast_rel):  # pragma: no cover - compiled
            n = 0
            for g0 in range(0, b.size, group):
                hi = -np.inf
                lo = np.inf
                nan = False
                for i in range(g0, g0 + group):
                    v = np.float64(o[i])
                    if v != v:               # numpy's max and min of a group with a NaN are NaN: no end code
                        nan = True
                        break
                    if v > hi:
                        hi = v
                    if v < lo:
                        lo = v
                if nan:
                    continue
                for i in range(g0, g0 + group):
                    bi = np.float64(b[i])
                    oi = np.float64(o[i])
                    if abs(bi - oi) <= np.float64(f[i]) + cast_rel * abs(bi):
                        continue             # within (a NaN anywhere here is beyond, as ``~(d <= f)``)
                    if oi != hi and oi != lo:
                        continue
                    so = 1 if oi > 0 else (-1 if oi < 0 else 0)
                    sb = 1 if bi > 0 else (-1 if bi < 0 else (0 if bi == 0 else 2))    # 2: NaN's sign, never equal
                    if so == sb and abs(oi) < abs(bi):
                        n += 1
            return n

        _CLIP_PASS.append(run)
    return _CLIP_PASS[0]


def clipped_beyond_numpy(base: np.ndarray, other: np.ndarray, floor: np.ndarray, group: int,
                   cast_rel: float = 0.0) -> int:
    """The numpy specification of ``clipped_beyond`` (the numba pass must give the same count). Elements of one
    window beyond the floor (as ``floor_stats`` counts them) that a clipping search
    explains: ``other`` (the quantized side) sits on its group's largest or smallest value, with the
    sign of ``base`` and a smaller magnitude (AWQ clamps each group to a searched ``+-max`` before
    quantizing, so the elements past it land on the end codes). The window starts at a group boundary
    and holds whole groups of ``group`` consecutive elements.

    >>> clipped_beyond_numpy(np.array([1.0, 0.1, 3.0, 0.2]), np.array([1.0, 0.1, 2.0, 0.2]), np.full(4, 0.1), 4)
    1
    """
    b = np.asarray(base, np.float64).reshape(-1)
    o = np.asarray(other, np.float64).reshape(-1)
    f = np.asarray(floor, np.float64).reshape(-1)
    if b.size % group:
        raise ValueError(f"clipped_beyond: {b.size} elements are not whole groups of {group}")
    with np.errstate(invalid="ignore"):
        beyond = ~(np.abs(b - o) <= f + cast_rel * np.abs(b))
        g = o.reshape(-1, group)
        end = (g == g.max(axis=1, keepdims=True)) | (g == g.min(axis=1, keepdims=True))
        inward = (np.sign(o) == np.sign(b)) & (np.abs(o) < np.abs(b))
    return int(np.count_nonzero(beyond & end.reshape(-1) & inward))
