"""The logical tensors of a quantized safetensors checkpoint, one class per format: each
``Source`` reads its stored parts (packed codes, scales, zero points, group index, absmax,
block exponents) and hands out rows of dequantized float32 values with their per-element
noise floor through ``kernels.quant``. Recognition (which stored tensors make which
``Source``) is ``io.quantized``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..kernels import quant as K
from ..kernels.dtypes import decode
from .safetensors_read import QuantScheme, TensorInfo, storage_of

__all__ = ["Source", "Bitmask", "FP8", "IntGrid", "GPTQ", "AWQ", "BnB4", "BnB8", "MXFP4", "MLX", "CTFP4", "AxisGrid", "NBits", "Bnb4T", "unpack_low_first", "Read", "ReadRows"]

Read = Callable[[str], np.ndarray]                      # stored name -> whole array (storage dtype, shaped)
ReadRows = Callable[..., np.ndarray]   # stored name, first-axis rows[, (c0, c1): those columns alone] -> array



def _f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    return decode(raw, dtype).astype(np.float32)


class Source:
    """One logical quantized tensor: ``rows(r0, r1)`` -> (values, floor), float32
    [r1 - r0, row length] each, rows of the logical shape flattened over all but the last
    axis. Companions are read whole once (they are small) and dropped by ``release``."""

    def __init__(self, name: str, shape: tuple[int, ...], scheme: QuantScheme, path: Path):
        self.name, self.shape, self.scheme, self.path = name, shape, scheme, path
        self._cache: dict = {}

    @property
    def nrows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def rowlen(self) -> int:
        return self.shape[-1] if self.shape else 1

    def release(self) -> None:
        self._cache.clear()

    def _get(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def rows(self, read: Read, read_rows: ReadRows, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _band(self, read_rows: ReadRows, t: TensorInfo, c0: int, c1: int) -> tuple[np.ndarray, int]:
        """(columns [b0, b1) of the stored 2-D tensor ``t``, b0) with b0 <= c0 < c1 <= b1: the columns a window of
        logical rows needs of a layout that packs them across the stored columns (GPTQ's and AWQ's ``qweight``).
        A window's band, at least ``BAND_BYTES``, is kept until a window asks for columns outside it; a few columns
        (a row or two: the pairing's fingerprints) are read as they are asked for. ``read_rows(name, rows, cols)``
        reads only the band's columns where the reader can (a local file), else whole rows, a few MB at a time. Held
        whole, a 70B-width ``qweight`` (117 MB) stood beside the Gram matrix through the whole pass."""
        got = self._cache.get("band")
        if got is not None and got[1] <= c0 and c1 <= got[1] + got[0].shape[1]:
            return got
        rows, cols = int(t.shape[0]), int(t.shape[1])
        dt = storage_of(t.dtype)
        width = c1 - c0 if c1 - c0 <= FEW_COLUMNS else max(c1 - c0, BAND_BYTES // max(1, dt.itemsize * rows))
        b0, b1 = c0, min(cols, c0 + width)
        if width > FEW_COLUMNS:
            self._cache.pop("band", None)
        band = np.empty((rows, b1 - b0), dt)
        step = max(1, BAND_READ_BYTES // max(1, dt.itemsize * cols))       # whole rows a read, a few MB
        for a in range(0, rows, step):
            band[a:a + step] = read_rows(t.name, range(a, min(rows, a + step)), (b0, b1))
        if width > FEW_COLUMNS:
            self._cache["band"] = (band, b0)
        return band, b0

    def has_floor(self, read: Read) -> bool:
        """Whether the floor ``rows`` gives bounds what the quantizer left (a format may write files of the
        same layout with scales tuned after rounding: ``MLX.has_floor``)."""
        return True

    def floored(self, read: Read) -> bool:
        """``has_floor``, decided once per tensor."""
        got = getattr(self, "_floored", None)
        if got is None:
            got = self._floored = bool(self.has_floor(read))
        return got

    def _rows_cached(self, read: Read, read_rows: ReadRows, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """``rows``, remembering the last block: the values and the floor windows of one pass
        (the judge's floor test streams both in step) dequantize each block once."""
        last = self._cache.get("_last")
        if last is not None and last[0] == r0 and last[1] == r1:
            return last[2], last[3]
        v, f = self.rows(read, read_rows, r0, r1)
        self._cache["_last"] = (r0, r1, v, f)
        return v, f

    def windows(self, read: Read, read_rows: ReadRows, start: int, stop: int, step: int,
                floor: bool = False) -> Iterator[np.ndarray]:
        """Flat float32 windows of [start, stop) in chunks of ``step`` (values, or floors)."""
        n = self.rowlen
        self._open = getattr(self, "_open", 0) + 1
        try:
            for pos in range(start, stop, step):
                end = min(pos + step, stop)
                r0, r1 = pos // n, -(-end // n)
                v, f = self._rows_cached(read, read_rows, r0, r1)
                out = (f if floor else v).reshape(-1)[pos - r0 * n: end - r0 * n]
                out.flags.writeable = False
                # the other array not kept while this pass waits: a floor pass fed by the stats pass waits
                # through the next window's dequantization and Gram product
                v = f = None
                yield out
        finally:
            self._open -= 1
            if not self._open:              # the last open pass over this tensor has ended
                self.release()


# -- the formats --------------------------------------------------------------------------

#: set bits of each byte value
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


class Bitmask(Source):
    """compressed-tensors' lossless sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``): the
    non-zero values of a weight in row-major order (``m.compressed``: flat, or [R, C/2] for 2:4) and a
    bitmask of where they stand (``m.bitmask`` U8 [R, ceil(C/8)], little bit order as ``numpy.packbits``),
    decoded as compressed-tensors' ``bitmask_decompress`` does: zeros, the mask's places filled with the
    values in order (``m.row_offsets`` is not read, as there). Rows come out in the stored float dtype
    (``dtype``), not float32, and with no floor: nothing was rounded. The logical tensor is a plain one
    (its ``TensorInfo.quant`` is None)."""

    lossless = True

    def __init__(self, name, shape, scheme, path, compressed: TensorInfo, bitmask: TensorInfo):
        super().__init__(name, shape, scheme, path)
        self.compressed, self.bitmask, self.dtype = compressed, bitmask, compressed.dtype

    def _offsets(self, read) -> np.ndarray:
        """Where each row's values start in the flat values, and their end (R + 1 entries)."""
        m = read(self.bitmask.name).reshape(self.shape[0], -1)
        counts = _POPCOUNT[m].sum(axis=1) if m.size else np.zeros(self.shape[0], np.int64)
        pad = m.shape[1] * 8 - self.rowlen
        if pad and m.size:              # bits past the row's end are not read (``unpackbits(count=C)``)
            counts -= _POPCOUNT[m[:, -1] & np.uint8((0xFF << (8 - pad)) & 0xFF)]
        off = np.concatenate([[0], np.cumsum(counts)])
        if int(off[-1]) != self.compressed.numel:
            from ..errors import CheckpointError

            raise CheckpointError(self.bitmask.path, f"`{self.bitmask.name}` marks {int(off[-1]):,} non-zero "
                                  f"values, but `{self.compressed.name}` holds {self.compressed.numel:,}")
        return off

    def rows(self, read, read_rows, r0, r1):
        off = self._get("off", lambda: self._offsets(read))
        C = self.rowlen
        mask = np.unpackbits(np.asarray(read_rows(self.bitmask.name, range(r0, r1))).reshape(r1 - r0, -1),
                             axis=1, count=C, bitorder="little").astype(bool)
        a, b = int(off[r0]), int(off[r1])
        width = self.compressed.shape[-1] if len(self.compressed.shape) > 1 else 1
        vals = np.zeros(0, storage_of(self.dtype))
        if b > a:
            stored = read_rows(self.compressed.name, np.arange(a // width, -(-b // width)))
            vals = np.asarray(stored).reshape(-1)[a - (a // width) * width:][:b - a]
        out = np.zeros((r1 - r0, C), storage_of(self.dtype))
        out[mask] = vals
        return out, np.zeros((r1 - r0, C), np.float32)


class FP8(Source):
    """fp8 weight times a block, channel or tensor scale (DeepSeek-V3 ``weight_scale_inv``,
    FBGEMM and compressed-tensors ``weight_scale``)."""

    def __init__(self, info: TensorInfo, scale: TensorInfo, block: tuple[int, int] | None, scheme: QuantScheme):
        super().__init__(info.name, info.shape, scheme, info.path)
        self.w, self.s, self.block = info, scale, block
        self.sdtype = scale.dtype if scale.dtype in ("BF16", "F16") else "F32"

    def rows(self, read, read_rows, r0, r1):
        s = self._get("s", lambda: _f32(read(self.s.name), self.s.dtype))
        if len(self.shape) == 2:
            w = read_rows(self.w.name, range(r0, r1))
        else:                                   # stacked experts: read only the experts the rows touch
            per = self.nrows // self.shape[0]
            e0, e1 = r0 // per, -(-r1 // per)
            w = read_rows(self.w.name, range(e0, e1)).reshape(-1, self.rowlen)[r0 - e0 * per: r1 - e0 * per]
        idx = np.arange(r0, r1)
        if self.block is not None:
            bh, bw = self.block
            n = self.shape[-2]
            grid = s.reshape(-1, s.shape[-2], s.shape[-1])
            srow = grid[idx // n, (idx % n) // bh]
        elif s.size == 1:
            srow, bw = np.full((r1 - r0, 1), s.reshape(-1)[0], np.float32), self.rowlen
        else:
            srow, bw = s.reshape(-1, 1)[idx], self.rowlen
        return K.fp8_rows(w.reshape(r1 - r0, -1), self.w.dtype, srow, bw, self.sdtype, self.sdtype)

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``; ``half`` the fp8 format's largest finite value (448 for e4m3: a
        block's scale is its largest magnitude over it). Stacked experts [E, m, n] as their [E * m, n] rows,
        each expert's blocks its own."""
        from ..kernels.dtypes import FP8_TABLES

        table = FP8_TABLES.get(self.w.dtype)
        if len(self.shape) not in (2, 3) or table is None:
            return None
        per, C = self.shape[-2], self.shape[-1]        # stacked experts [E, m, n]: rows m to an expert
        R = self.nrows
        s = np.abs(_f32(read(self.s.name), self.s.dtype))
        half = float(np.nanmax(np.abs(table[np.isfinite(table)])))
        if self.block is not None:
            bh, bw = self.block
            return s.reshape(-1, -(-C // bw)), ("block", bh, bw, per), half
        if s.size == 1:
            return s.reshape(1, 1), ("block", R, C), half
        return s.reshape(-1, 1), ("block", 1, C), half


#: how much larger than the block's largest magnitude a bitsandbytes-style 4-bit absmax may be
#: (``BnB4.scale_groups``, ``Bnb4T``): it is that magnitude, of the weights as the quantizer read them (a bf16 or
#: f16 copy of a wider plain side: 2^-8 of it; an f16 absmax rounds it by 2^-11), the floor test's check allows
#: 2^-6 more on top
BNB4_SLACK = 1.0 + 2.0 ** -5

#: the least size of a band of packed columns ``Source._band`` keeps, and of the runs of rows it reads it in (whole
#: rows where the reader cannot read columns alone); up to ``FEW_COLUMNS`` columns are read as asked, not kept
BAND_BYTES = 16 << 20
BAND_READ_BYTES = 4 << 20
FEW_COLUMNS = 8

#: half an ulp, relative to the value, of the dtypes a quantizer may compute its codes in
HALF_ULP = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11}


class IntGrid(Source):
    """compressed-tensors integer weights: ``pack-quantized`` (int32 words) or int8
    (``int-quantized``/``naive-quantized``), group/channel/tensor/block scales, optional
    zero points (packed along rows for group/channel) and ``weight_g_idx``."""

    def __init__(self, name, shape, scheme, path, codes: TensorInfo, bits: int, scale: TensorInfo,
                 zero: TensorInfo | None, g_idx: TensorInfo | None, strategy: str, group: int | None,
                 block: tuple[int, int] | None, packed: bool, actorder: bool = False, minmax: bool = False):
        super().__init__(name, shape, scheme, path)
        self.codes, self.bits, self.scale, self.zero, self.g_idx = codes, bits, scale, zero, g_idx
        self.strategy, self.group, self.block, self.packed = strategy, group, block, packed
        self.actorder = actorder
        self.sdtype = scale.dtype if scale.dtype in ("BF16", "F16") else "F32"
        #: the config says every group's scale is compressed-tensors' ``calculate_qparams`` of the min/max of
        #: the weights it read (int, a min/max observer, no transform): llm-compressor sets
        #: up every group before quantizing (GPTQModifier too, before any compensation), so ``group_params``
        #: is checked against the base in every group, not only the first (``all_groups``)
        self.minmax = minmax and strategy in ("group", "channel")
        self.sym, self.all_groups = zero is None, True

    def group_params(self, read) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scales [groups, rows] float32 as stored, zero points [groups, rows] as ``first_group_scales``
        compares them (unsigned, as GPTQ's: the stored signed zero point plus 2^(b-1); a symmetric scheme's
        midpoint), the group of each column [columns]) of a group or channel scheme."""
        s = _f32(read(self.scale.name), self.scale.dtype).reshape(self.shape[0], -1).T
        cols = np.arange(self.rowlen)
        if self.strategy == "channel":
            g = np.zeros(self.rowlen, np.int64)
        elif self.g_idx is not None:
            g = read(self.g_idx.name).astype(np.int64).reshape(-1)
        else:
            g = cols // self.group
        half = (1 << self.bits) // 2
        if self.zero is None:
            z = np.full(s.shape, half, np.int64)
        else:
            z = np.asarray(self._zeros(read), np.int64).reshape(self.shape[0], -1).T + half
        return np.ascontiguousarray(s), np.ascontiguousarray(z), g

    def scale_groups(self, read) -> tuple | None:
        """The stored scales and the groups of the logical 2-D tensor they cover, for the floor test's check
        that no scale is larger than a quantizer of the other side's weights picks (``measure.quant_floor.
        scale_excess``): ``(|scales|, layout, half)``, layout ``("block", bh, bw)`` (scales [ceil(R / bh),
        ceil(C / bw)]) or ``("cols", g, checked)`` (scales [R, groups], ``g`` the group of each column,
        ``checked`` the groups set up from the weights or None for all), ``half`` the largest weight a scale
        of 1 quantizes without clipping (half the code span). None where not 2-D. (The layouts in full, a
        ``("block", bh, bw, per)`` of stacked experts and ``("flat", bs, transposed)``, and the optional fourth
        item {"slack", "min_scale"}: ``measure.quant_floor._group_ids`` and ``scale_excess``.)"""
        if len(self.shape) != 2:
            return None
        R, C = self.shape
        s = np.abs(_f32(read(self.scale.name), self.scale.dtype))
        half = ((1 << self.bits) - 1) / 2
        if self.strategy == "group":
            g = read(self.g_idx.name).astype(np.int64).reshape(-1) if self.g_idx is not None else \
                np.arange(C) // self.group
            return s.reshape(R, -1), ("cols", g, None), half
        if self.strategy == "channel":
            return s.reshape(-1, 1), ("block", 1, C), half
        if self.strategy == "block" and self.block is not None:
            bh, bw = self.block
            return s.reshape(-(-R // bh), -(-C // bw)), ("block", bh, bw), half
        if s.size == 1:
            return s.reshape(1, 1), ("block", R, C), half
        return None

    def first_scale_groups(self, read) -> np.ndarray:
        """Every group: llm-compressor computes them all from the weights before quantizing any."""
        return np.unique(self.group_params(read)[2])

    def first_group(self, read, ncols: int) -> np.ndarray:
        """Columns one of which a GPTQ-style quantizer (llm-compressor) processed first, before any
        compensation: column 0 without an activation order; with one, ``weight_g_idx == 0`` (actorder
        ``group``), or every column (``static``/``weight``: the order is not stored)."""
        return first_columns(read(self.g_idx.name) if self.g_idx is not None else None, self.actorder, ncols)

    def _zeros(self, read) -> np.ndarray | int:
        if self.zero is None:
            return 0
        z = read(self.zero.name)
        if self.packed and self.strategy in ("group", "channel"):
            ng = self.scale.shape[-1]       # [words, groups]: the scale's columns (1 per channel)
            z = K.unpack_dense_int32(np.ascontiguousarray(z.reshape(-1, ng).T), self.bits, self.shape[0])
            return z.T.astype(np.int32) - (1 << (self.bits - 1))
        return z.astype(np.int32)

    def rows(self, read, read_rows, r0, r1):
        src = read_rows(self.codes.name, range(r0, r1))
        s = self._get("s", lambda: _f32(read(self.scale.name), self.scale.dtype))
        z = self._get("z", lambda: self._zeros(read))
        s2, z2, rmap, cmap = self._layout(read, s, None if np.isscalar(z) else z, r0, r1)
        half = 1 << (self.bits - 1)
        # compressed-tensors quantizes in the weights' dtype (its scales are stored in it): x / s + zp is rounded
        # to bf16 or f16 before the round to an integer, up to half an ulp of |x / s + zp| ~ |q| + 1/2 steps more
        # (half a step at codes near 128 in bf16); x / s's own rounding is the cast allowance of the floor test.
        # Asymmetric schemes only: with no zero point nothing is added
        hu = HALF_ULP.get(self.sdtype, 0.0) if self.zero is not None else 0.0
        return K.int_grid_rows(src, self.bits if self.packed else 0, self.rowlen, rmap, cmap, s2, z2,
                               half if self.packed else 0, -half, half - 1, self.sdtype, hu)

    def _layout(self, read, s, z, r0, r1):
        """(scales, zero points, row map, column map): the scale of element (r, c) of rows [r0, r1) is
        ``scales[rmap[r - r0], cmap[c]]`` (``kernels.quant.int_grid_rows``), for each strategy."""
        C = self.rowlen
        if self.strategy == "group":
            cmap = self._get("cmap", lambda: read(self.g_idx.name).astype(np.int64).reshape(-1)
                             if self.g_idx is not None else np.arange(C) // self.group)
            return s, z, np.arange(r0, r1), cmap
        if self.strategy == "block":
            bh, bw = self.block
            return s, z, np.arange(r0, r1) // bh, self._get("cmap", lambda: np.arange(C) // bw)
        zero_cols = self._get("cmap", lambda: np.zeros(C, np.int64))
        if self.strategy == "channel":
            return s.reshape(-1, 1), None if z is None else np.reshape(z, (-1, 1)), np.arange(r0, r1), zero_cols
        return s.reshape(1, 1), None if z is None else np.reshape(z, (1, 1)), np.zeros(r1 - r0, np.int64), zero_cols


def first_columns(g_idx: np.ndarray | None, actorder: bool | str, ncols: int) -> np.ndarray:
    """The columns among which GPTQ's first processed column lies (it is plainly rounded: its error
    compensation only moves later columns). Without an activation order it processes the columns in
    order, so column 0, also when a stored ``g_idx`` is the plain ``arange // group``; with one,
    the first group of that order (``g_idx == 0``), or every column when no ``g_idx`` records it.
    ``actorder == "unknown"``: an order the file does not record (GPTQModel's ``act_group_aware``
    reorders the groups and the columns within them by the Hessian while writing a plain ``g_idx``;
    ``static_groups`` with ``desc_act`` too): every column."""
    if actorder == "unknown":
        return np.arange(ncols)
    if g_idx is not None:
        g = np.asarray(g_idx).astype(np.int64).reshape(-1)
        if not actorder and g.size and bool(np.all(g[1:] >= g[:-1])):
            return np.arange(min(1, ncols))
        return np.flatnonzero(g == 0)
    return np.arange(ncols) if actorder else np.arange(min(1, ncols))


class GPTQ(Source):
    def first_group(self, read, ncols: int) -> np.ndarray:
        """Columns one of which the quantizer processed first (``first_columns``: column 0 without
        desc_act; with it, ``g_idx == 0``), which its error compensation had not yet moved."""
        gi = self.t[3]
        return first_columns(read(gi.name) if gi is not None else None, self.actorder, ncols)

    def __init__(self, name, shape, scheme, path, qweight, qzeros, scales, g_idx, bits, v1, group,
                 actorder: bool | str = False, sym: bool | None = None, minmax: bool = False):
        super().__init__(name, shape, scheme, path)
        self.t = (qweight, qzeros, scales, g_idx)
        self.bits, self.v1, self.group, self.actorder = bits, v1, group, actorder
        self.sdtype = scales.dtype if scales.dtype in ("BF16", "F16") else "F32"
        #: the config says how each group's scale was found: min/max of the group's weights (no ``mse``
        #: clipping search), symmetric or not; ``group_params`` is then checked against the base
        self.sym, self.minmax = sym, minmax

    def group_params(self, read) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scales [G, out] float32 as stored, zero points [G, out] int64 as dequantization uses them,
        g_idx [in]) of this tensor."""
        qw, qz, sc, gi = self.t
        out = self.shape[0]
        z = K.unpack_cols(read(qz.name), self.bits)[:, :out].astype(np.int64)
        if self.v1:
            z = (z + 1) & ((1 << self.bits) - 1)
        g = read(gi.name).astype(np.int64) if gi is not None else np.arange(self.shape[1]) // self.group
        return _f32(read(sc.name), sc.dtype), z, g

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: only the groups set up from the weights before any compensation
        (``first_scale_groups``) are checked, as the later ones come from the compensated weights."""
        if len(self.shape) != 2:
            return None
        s, _, g = self.group_params(read)
        return np.abs(s).T[:self.shape[0]], ("cols", g, self.first_scale_groups(read)), ((1 << self.bits) - 1) / 2

    def first_scale_groups(self, read) -> np.ndarray:
        """Scale groups one of which the quantizer set up first, from the original weights (before any
        error compensation): group ``g_idx[0]`` in order, group 0 under ``desc_act`` (the first group
        of its order), every group when the order is not recorded."""
        g = self.group_params(read)[2]
        if self.actorder == "unknown":
            return np.unique(g)
        return np.array([0 if self.actorder else int(g[0])]) if g.size else np.zeros(0, np.int64)

    def rows(self, read, read_rows, r0, r1):
        qw, qz, sc, gi = self.t
        a, col0 = self._band(read_rows, qw, r0, r1)        # qweight [in / pack, out]: rows r0..r1 its columns
        z = self._get("qz", lambda: read(qz.name))
        s = self._get("s", lambda: _f32(read(sc.name), sc.dtype))
        g = self._get("g", lambda: read(gi.name).astype(np.int64) if gi is not None else
                      np.arange(self.shape[1]) // self.group)
        return K.gptq_rows(a, z, s, g, self.bits, self.v1, self.sdtype, r0, r1, col0)


class AWQ(Source):
    def __init__(self, name, shape, scheme, path, qweight, qzeros, scales, bits, group):
        super().__init__(name, shape, scheme, path)
        self.t = (qweight, qzeros, scales)
        self.bits, self.group = bits, group
        self.sdtype = scales.dtype if scales.dtype in ("BF16", "F16") else "F32"

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: scales [in / group, out] per group of ``group`` input columns of each
        output row. AutoAWQ's ``pseudo_quantize_tensor`` stores ``(max - min) / maxq`` of the group as it
        scaled and clipped it (clipping only shrinks it; the floor test compares with the base scaled by the
        searched scales it fit back), at least ``1e-5 / maxq`` (``min_scale``: its clamp)."""
        if len(self.shape) != 2 or not self.group or self.shape[1] % self.group:
            return None
        maxq = (1 << self.bits) - 1
        s = np.abs(_f32(read(self.t[2].name), self.t[2].dtype)).reshape(-1, self.shape[0]).T
        return s, ("block", 1, self.group), maxq / 2, {"min_scale": 1e-5 / maxq}

    def rows(self, read, read_rows, r0, r1):
        qw, qz, sc = self.t
        pf = 32 // self.bits
        a, w0 = self._band(read_rows, qw, r0 // pf, -(-r1 // pf))    # qweight [in, out / pack]: words of r0..r1
        z = self._get("qz", lambda: read(qz.name))
        s = self._get("s", lambda: _f32(read(sc.name), sc.dtype))
        return K.awq_rows(a, z, s, self.bits, self.group, self.sdtype, r0, r1, w0)


class BnB4(Source):
    def __init__(self, name, shape, scheme, path, packed, absmax, qmap, nested, meta):
        super().__init__(name, shape, scheme, path)
        self.packed, self.absmax, self.qmap, self.nested, self.meta = packed, absmax, qmap, nested, meta
        self.out = {"bfloat16": "BF16", "float16": "F16"}.get(meta.get("dtype"), "F32")

    def _absmax(self, read):
        raw = read(self.absmax.name)
        if self.nested is None:
            return _f32(raw, self.absmax.dtype), None
        n_abs, n_map = self.nested
        return K.bnb_nested_absmax(raw.reshape(-1), _f32(read(n_map.name), n_map.dtype),
                                   _f32(read(n_abs.name), n_abs.dtype), int(self.meta["nested_blocksize"]),
                                   float(self.meta["nested_offset"]))

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: one absmax per ``blocksize`` elements of the flat order
        (``("flat", bs)``), the least the stored absmax may be (a double-quantized one less its own
        rounding), ``half`` the code table's largest magnitude (1: the block's largest weight takes the end
        code). bitsandbytes stores the block's largest magnitude itself, with no observer that could pick
        another: its slack is ``BNB4_SLACK``, not the observers' ``SCALE_SLACK``."""
        a, err = self._absmax(read)
        a = np.abs(np.asarray(a, np.float64).reshape(-1))
        if err is not None:
            a = np.maximum(a - np.abs(np.asarray(err, np.float64).reshape(-1)), 0.0)
        qmap = _f32(read(self.qmap.name), self.qmap.dtype)
        half = float(np.nanmax(np.abs(qmap))) if qmap.size else 0.0
        if not half or not np.isfinite(half):
            return None
        return a, ("flat", int(self.meta["blocksize"])), half, {"slack": BNB4_SLACK}

    def rows(self, read, read_rows, r0, r1):
        p = self._get("p", lambda: read(self.packed.name).reshape(-1).view(np.uint8))
        a, err = self._get("a", lambda: self._absmax(read))
        qmap = self._get("m", lambda: _f32(read(self.qmap.name), self.qmap.dtype))
        n = self.rowlen
        v, f = K.bnb4_flat(p, a, qmap, int(self.meta["blocksize"]), self.out, r0 * n, r1 * n, err)
        return v.reshape(r1 - r0, n), f.reshape(r1 - r0, n)


class BnB8(Source):
    def __init__(self, name, shape, scheme, path, weight, scb):
        super().__init__(name, shape, scheme, path)
        self.w, self.scb = weight, scb

    def rows(self, read, read_rows, r0, r1):
        s = self._get("s", lambda: _f32(read(self.scb.name), self.scb.dtype).reshape(-1))
        return K.bnb_int8_rows(read_rows(self.w.name, range(r0, r1)), s[r0:r1])

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: one scale a row, ``SCB / 127`` (SCB is the row's largest magnitude)."""
        if len(self.shape) != 2:
            return None
        s = np.abs(_f32(read(self.scb.name), self.scb.dtype).reshape(-1, 1)) / np.float32(127)
        return s, ("block", 1, self.shape[1]), 127.0


class MXFP4(Source):
    """gpt-oss experts: blocks [E, R, G, 16] and scales [E, R, G] -> [E, G*32, R] (transformers'
    ``convert_moe_packed_tensors`` transposes the last two axes). With ``expert``: that expert's
    [G*32, R] alone (weightdiff.io.experts splits fused experts into the experts' own tensors)."""

    def __init__(self, name, shape, scheme, path, blocks, scales, out, expert: int | None = None):
        super().__init__(name, shape, scheme, path)
        self.b, self.s, self.out, self.expert = blocks, scales, out, expert

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``, for one expert's [G * 32, R]: a power-of-two scale per 32 rows of a
        column, ``half`` 6 (e2m1's largest: the OCP scale is 2^(floor(log2 amax) - 2), at most amax / 4; one
        rounded up, at most amax / 3)."""
        if len(self.shape) != (2 if self.expert is not None else 3):
            return None
        e = np.asarray(read(self.s.name)).astype(np.int32) - 127                    # [E, R, G]
        if self.expert is not None:
            return np.ldexp(np.float64(1.0), e[self.expert]).T, ("block", 32, 1), 6.0
        # all the experts, [E, G * 32, R]: each expert's [G, R] scales stacked, blocks of 32 rows within it
        s = np.ldexp(np.float64(1.0), np.transpose(e, (0, 2, 1)))
        return s.reshape(-1, s.shape[-1]), ("block", 32, 1, self.shape[-2]), 6.0

    def rows(self, read, read_rows, r0, r1):
        per = self.shape[-2]
        vs, fs = [], []
        first = 0 if self.expert is None else self.expert
        for e in range(first + r0 // per, first - (-r1 // per)):
            if self._cache.get("e") != e:
                v, f = K.mxfp4_rows(read_rows(self.b.name, [e])[0], read_rows(self.s.name, [e])[0], self.out)
                self._cache.update(e=e, v=np.ascontiguousarray(v.T), f=np.ascontiguousarray(f.T))
            at = (e - first) * per
            lo, hi = max(r0, at) - at, min(r1, at + per) - at
            vs.append(self._cache["v"][lo:hi])
            fs.append(self._cache["f"][lo:hi])
        return np.concatenate(vs), np.concatenate(fs)


#: the share of an MLX affine tensor's groups whose bias may sit off its scale's grid before the tensor's scales
#: read as tuned after rounding (``MLX.has_floor``)
MLX_OFF_GRID_SHARE = 0.01


class MLX(Source):
    """mlx-lm's quantized weights (``mx.quantize``): codes [..., C * bits / 32] uint32, one LSB-first bit stream
    per row, and ``scales`` per ``group`` elements of a row: affine (``biases`` beside them: value = scale *
    code + bias, ``K.mlx_affine_rows``) or a floating-point mode (mxfp4, mxfp8: ``K.mlx_fp_rows``). Stacked
    experts ([E, m, n], a ``SwitchLinear``) are their flattened rows."""

    def __init__(self, name, shape, scheme, path, codes: TensorInfo, scales: TensorInfo, biases: TensorInfo | None,
                 bits: int, group: int, mode: str):
        super().__init__(name, shape, scheme, path)
        self.codes, self.scales, self.biases = codes, scales, biases
        self.bits, self.group, self.mode = bits, group, mode
        self.sdtype = scales.dtype if mode == "affine" else "F32"

    def _rows_of(self, read_rows, info: TensorInfo, r0: int, r1: int) -> np.ndarray:
        width = info.shape[-1]
        if len(info.shape) == 2:
            return np.asarray(read_rows(info.name, range(r0, r1))).reshape(r1 - r0, width)
        per = self.nrows // info.shape[0]              # stacked experts: the experts the rows touch
        e0, e1 = r0 // per, -(-r1 // per)
        got = np.asarray(read_rows(info.name, range(e0, e1))).reshape(-1, width)
        return got[r0 - e0 * per:r1 - e0 * per]

    def _group_params(self, read) -> tuple[np.ndarray, np.ndarray]:
        s = self._get("s", lambda: _f32(read(self.scales.name), self.scales.dtype).reshape(self.nrows, -1))
        b = self._get("b", lambda: _f32(read(self.biases.name), self.biases.dtype).reshape(self.nrows, -1))
        return s, b

    def rows(self, read, read_rows, r0, r1):
        words = self._rows_of(read_rows, self.codes, r0, r1)
        if self.mode != "affine":
            sc = self._get("s8", lambda: np.asarray(read(self.scales.name), np.uint8).reshape(self.nrows, -1))
            return K.mlx_fp_rows(words, sc[r0:r1], self.mode, "BF16")
        s, b = self._group_params(read)
        return K.mlx_affine_rows(words, s[r0:r1], b[r0:r1], self.bits, self.group, self.sdtype)

    def has_floor(self, read) -> bool:
        """Whether the stored scales are those of a plain rounding, so that the floor bounds what it left. MLX's
        affine quantizer (``affine_quantize``) takes the bias as the group's extreme of larger magnitude, a weight
        held exactly in the scales' dtype, and stretches or shrinks the step so that zero is on the grid: the scale
        is that bias over a whole number of steps q0, divided in float32 and rounded to the dtype. So in every
        group the stored scale is ``round(float32(bias / q0))`` (float32 scales to within an ulp) for the integer
        q0 nearest bias / scale (a bias of 0 says nothing). mlx-lm's DWQ, AWQ and GPTQ write the same files with scales and biases tuned after the
        rounding (DWQ trains them by distillation), which leaves them off that identity, and the weights any
        distance from their codes: then no floor (the judge reads such a tensor as quantized, untested). More than
        ``MLX_OFF_GRID_SHARE`` of a tensor's groups off it: tuned. Floating-point modes have no bias: always a
        floor."""
        if self.mode != "affine":
            return True
        s, b = (np.asarray(x, np.float32) for x in self._group_params(read))
        live = (b != 0) & (s != 0) & np.isfinite(s) & np.isfinite(b)
        if not live.any():
            return True
        sl, bl = s[live], b[live]
        # float32 scales within one ulp: a quantizer that divides otherwise (Metal's kernel, a reciprocal) may land a
        # quotient an ulp away. In bf16 or f16 exactly: such a difference crosses their rounding only rarely, and an
        # ulp there is coarser than the next q0's quotient at 8 bits (any scale would pass)
        ulp = np.float32(2.0 ** -K.MANT["F32"] if self.sdtype == "F32" else 0.0)
        with np.errstate(all="ignore"):
            k = np.round(bl.astype(np.float64) / sl.astype(np.float64))
            ok = np.zeros(sl.shape, bool)
            for d in (0.0, -1.0, 1.0):                   # q0, and its neighbours where bias / scale rounds across
                q = (k + d).astype(np.float32)
                e = K.round_to(bl / q, self.sdtype)
                ok |= (q != 0) & (np.abs(e - sl) <= np.abs(e) * ulp)
        return float(np.count_nonzero(~ok)) <= MLX_OFF_GRID_SHARE * sl.size

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: one scale per ``group`` elements of a row. Affine: at most (max - min)
        of the group over the top code, stretched by at most 1 / (top - 1) to put zero on the grid, so ``half``
        is half the top code (|scale| x top / 2 is at most the group's largest magnitude, that stretch
        aside); mxfp4 / mxfp8: a power of two nearest amax / 6 (e2m1's largest) or amax / 448 (e4m3's), so
        ``half`` 6 or 448, with the rounding up to sqrt(2) within the slack."""
        if self.mode == "affine":
            s, _ = self._group_params(read)
            return np.abs(s), ("block", 1, self.group), ((1 << self.bits) - 1) / 2
        half = 6.0 if K.MLX_FP_MODES[self.mode][2] == "e2m1" else 448.0
        return (_f32(read(self.scales.name), "F8_E8M0").astype(np.float64).reshape(self.nrows, -1),
                ("block", 1, self.group), half)


class CTFP4(Source):
    """compressed-tensors' packed fp4 weights (llm-compressor's NVFP4 and MXFP4 schemes): ``weight_packed`` U8
    [R, C / 2], ``weight_scale`` per ``group`` columns (nvfp4: F8_E4M3 per 16, with ``weight_global_scale`` F32
    [1]; mxfp4: U8 e8m0 per 32), dequantized by ``K.ct_fp4_rows``."""

    def __init__(self, name, shape, scheme, path, packed: TensorInfo, scale: TensorInfo,
                 global_scale: TensorInfo | None, group: int, multiply: bool = False):
        super().__init__(name, shape, scheme, path)
        self.packed, self.scale, self.global_scale, self.group = packed, scale, global_scale, group
        #: NVIDIA ModelOpt's NVFP4: ``weight`` U8 beside ``weight_scale`` and ``weight_scale_2``, the tensor scale
        #: multiplied (compressed-tensors divides by its ``weight_global_scale``)
        self.multiply = multiply

    def _scales(self, read) -> tuple[np.ndarray, float | None]:
        # U8 scales are e8m0 (mxfp4: 2^(e - 127), 255 NaN)
        s = self._get("s", lambda: _f32(read(self.scale.name), "F8_E8M0" if self.scale.dtype == "U8" else
                                        self.scale.dtype).reshape(self.shape[0], -1))
        g = None
        if self.global_scale is not None:
            gs = self.global_scale
            g = float(self._get("g", lambda: _f32(read(gs.name), gs.dtype).reshape(-1))[0])
        return s, g

    def rows(self, read, read_rows, r0, r1):
        s, g = self._scales(read)
        return K.ct_fp4_rows(read_rows(self.packed.name, range(r0, r1)), s[r0:r1], self.group, g, self.multiply)

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``: one scale per ``group`` columns, ``half`` 6 (e2m1's largest: nvfp4's scale
        is the group's amax / 6, rounded to e4m3; mxfp4's a power of two near amax / 4 to amax / 8). An nvfp4
        scale of at most e4m3's eps (0.125, over the global scale) is not counted (``min_scale``): compressed-tensors
        puts that eps where a group's scale rounded to zero, not a quantizer's choice from its weights."""
        s, g = self._scales(read)
        s = np.abs(np.asarray(s, np.float64))
        if g is None:
            return s, ("block", 1, self.group), 6.0
        if self.multiply:       # ModelOpt: e4m3 block scales times the tensor's; a scale rounded on e4m3's
            return s * abs(g), ("block", 1, self.group), 6.0, {"min_scale": 2.0 ** -9 * abs(g)}   # subnormals
        return s / abs(g), ("block", 1, self.group), 6.0, {"min_scale": 0.125 / abs(g)}


class AxisGrid(Source):
    """ONNX ``DequantizeLinear`` (and ONNX Runtime's ``W_quantized``/``W_scale``/``W_zero_point``):
    ``value = (q - zero) * scale`` in the scale's dtype, with one scale for the tensor, one per
    index of ``axis``, or one per ``block`` consecutive indices along ``axis`` (opset 21).

    ``scale2``: a second scale the first is multiplied by (an int32 bias of ``QGemm``/``QLinearConv``:
    input scale x weight scale). ``transposed``: the logical 2-D tensor is the stored codes'
    transpose (ONNX Runtime's ``W_Transposed_quantized`` of a ``Gemm`` weight); ``axis`` and
    ``block`` are given in the stored layout."""

    def __init__(self, name, shape, scheme, path, codes: TensorInfo, scale: TensorInfo, zero: TensorInfo | None,
                 axis: int | None, block: int, scale2: TensorInfo | None = None, transposed: bool = False,
                 nibbles: str | None = None, stored_shape: tuple | None = None):
        super().__init__(name, shape, scheme, path)
        self.codes, self.scale, self.zero, self.block, self.scale2 = codes, scale, zero, block, scale2
        self.transposed, self.nibbles = transposed, nibbles
        self.stored_shape = tuple(stored_shape) if stored_shape is not None else tuple(codes.shape)
        self.axis = (1 - axis if axis is not None else None) if transposed else axis
        self.sdtype = scale.dtype if scale.dtype in ("BF16", "F16") else "F32"
        if nibbles is not None:                # INT4 / UINT4: two codes a byte, low nibble first
            self.qmin, self.qmax = (-8, 7) if nibbles == "I4" else (0, 15)
        else:
            info = np.iinfo(storage_of(codes.dtype))
            self.qmin, self.qmax = int(info.min), int(info.max)

    def _codes(self, read, t: TensorInfo, shape: tuple) -> np.ndarray:
        """A stored code tensor (the codes, or the zero points: ``shape``), whole, shaped as declared
        (4-bit codes unpacked to int8)."""
        raw = read(t.name)
        if self.nibbles is None:
            return raw
        q = unpack_low_first(np.ascontiguousarray(raw).reshape(-1), 4)[:math.prod(shape)]
        q = q.astype(np.int8)
        if self.nibbles == "I4":
            q[q > 7] -= 16
        return q.reshape(shape)

    def _expand(self, a: np.ndarray) -> np.ndarray:
        """A per-axis or per-block parameter spread over the whole tensor (its logical shape)."""
        ax, shape = self.axis, self.shape
        if self.block:
            return np.repeat(a, self.block, axis=ax)[tuple(slice(0, d) for d in shape)]
        view = [1] * len(shape)
        view[ax] = shape[ax]
        return np.broadcast_to(a.reshape(view), shape)

    def _whole(self, read, key: str, t: TensorInfo) -> np.ndarray:
        if key == "z":
            a = self._codes(read, t, tuple(self.scale.shape)).astype(np.int32)
        else:
            a = _f32(read(t.name), t.dtype)
            if self.scale2 is not None:
                a = (a * _f32(read(self.scale2.name), self.scale2.dtype)).astype(np.float32)
        return a.T if self.transposed and a.ndim == 2 else a

    def _param(self, read, key: str, t: TensorInfo | None, r0: int, r1: int):
        """The scale (``s``) or zero point (``z``) of every element of rows r0..r1, broadcastable."""
        if t is None:
            return 0
        a = self._get(key, lambda: self._whole(read, key, t))
        if self.axis is None:
            return a.reshape(1, 1)
        if len(self.shape) == 2:
            if self.axis == 0:
                return a.reshape(-1)[r0:r1].reshape(-1, 1) if not self.block else a[np.arange(r0, r1) // self.block]
            if not self.block:
                return a.reshape(1, -1)
            return a[r0:r1][:, np.arange(self.rowlen) // self.block]
        full = self._get(key + "full", lambda: self._expand(a).reshape(-1, self.rowlen))
        return full[r0:r1]

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``, in the logical orientation (a transposed ``W_Transposed_quantized``
        already turned); a tensor of more axes as its rows of the last axis (per-tensor, per output channel
        or per last-axis index)."""
        if len(self.shape) < 2 or self.scale2 is not None:
            return None
        a = np.abs(self._get("s", lambda: self._whole(read, "s", self.scale)))
        half = (self.qmax - self.qmin) / 2
        R, C = math.prod(self.shape[:-1]), self.shape[-1]
        if self.axis is None:
            return a.reshape(1, 1), ("block", R, C), half
        if len(self.shape) > 2:
            # a convolution's [out, in, kh, kw] as rows of kw: a scale per output channel (or per block of them)
            # covers whole runs of R / out rows; per last-axis index, a column
            per = R // self.shape[0]
            if self.axis == 0:
                return a.reshape(-1, 1), ("block", per * (self.block or 1), C), half
            if self.axis == len(self.shape) - 1 and not self.block:
                return a.reshape(1, -1), ("block", R, 1), half
            return None
        R, C = self.shape
        if self.axis == 0:
            return a.reshape(-1, C if self.block else 1), ("block", self.block or 1, 1 if self.block else C), half
        if self.block:
            return a.reshape(R, -1), ("block", 1, self.block), half
        return a.reshape(1, -1), ("block", R, 1), half

    def rows(self, read, read_rows, r0, r1):
        if self.transposed:
            q = self._get("q", lambda: np.ascontiguousarray(self._codes(read, self.codes, self.stored_shape).T))[r0:r1]
        elif len(self.shape) == 2 and self.nibbles is None:
            q = read_rows(self.codes.name, range(r0, r1))
        else:
            q = self._get("q", lambda: self._codes(read, self.codes, self.stored_shape).reshape(-1, self.rowlen))[r0:r1]
        s = self._param(read, "s", self.scale, r0, r1)
        z = self._param(read, "z", self.zero, r0, r1)
        return K.dequant_int(np.asarray(q).reshape(r1 - r0, -1), z, s, self.sdtype, self.qmin, self.qmax)


def unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> codes of ``bits`` (2, 4 or 8) each, the lowest bits first: [..., n] -> [..., n * 8 / bits]."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per)


class NBits(Source):
    """ONNX Runtime's ``MatMulNBits`` (com.microsoft): ``B`` uint8 [N, blocks, block_size * bits / 8], codes
    lowest bits first along K, one scale (and zero point, packed the same way per row; default
    2^(bits-1)) per block of ``block_size`` along K: ``W[n, k] = (q - z[n, k // bs]) * s[n, k // bs]``.
    The logical tensor is the ``MatMul``'s B, [K, N] (the float model's initializer): rows of it are
    columns of the stored codes, so the packed codes are read whole once per pass (half a byte per
    element for 4 bits) and only the blocks a window needs are dequantized."""

    def __init__(self, name, shape, scheme, path, b: TensorInfo, scales: TensorInfo, zeros: TensorInfo | None,
                 bits: int, block: int):
        super().__init__(name, shape, scheme, path)
        self.b, self.s, self.z, self.bits, self.bs = b, scales, zeros, bits, block
        self.K, self.N = shape
        self.kb = -(-self.K // block)
        self.sdtype = scales.dtype if scales.dtype in ("BF16", "F16") else "F32"

    def scale_groups(self, read) -> tuple | None:
        """As ``IntGrid.scale_groups``, in the logical [K, N]: one scale per block of ``block_size`` rows of a
        column (``("block", bs, 1)``, scales [ceil(K / bs), N]); ``half`` half the code span (ONNX Runtime's
        quantizer stores ``absmax / 2^(bits-1)`` symmetric, ``(max - min) / maxq`` with a zero point)."""
        s = np.abs(_f32(read(self.s.name), self.s.dtype)).reshape(self.N, self.kb)
        return s.T, ("block", self.bs, 1), ((1 << self.bits) - 1) / 2

    def rows(self, read, read_rows, r0, r1):
        packed = self._get("b", lambda: read(self.b.name).reshape(self.N, self.kb, -1))
        s = self._get("s", lambda: _f32(read(self.s.name), self.s.dtype).reshape(self.N, self.kb))
        if self.z is None:
            z = self._get("z", lambda: np.full((self.N, self.kb), 1 << (self.bits - 1), np.int32))
        else:
            z = self._get("z", lambda: unpack_low_first(read(self.z.name).reshape(self.N, -1), self.bits)
                          [:, :self.kb].astype(np.int32))
        k0, k1 = r0 // self.bs, -(-r1 // self.bs)
        q = unpack_low_first(packed[:, k0:k1, :], self.bits).reshape(self.N, -1)
        s_el = np.repeat(s[:, k0:k1], self.bs, axis=1)
        z_el = np.repeat(z[:, k0:k1], self.bs, axis=1)
        v, f = K.dequant_int(q, z_el, s_el, self.sdtype, 0, (1 << self.bits) - 1)
        lo = r0 - k0 * self.bs
        return (np.ascontiguousarray(v[:, lo:lo + r1 - r0].T), np.ascontiguousarray(f[:, lo:lo + r1 - r0].T))


class Bnb4T(Source):
    """ONNX Runtime's ``MatMulBnb4`` (com.microsoft; transformers.js ``model_bnb4.onnx``): the MatMul's
    B [K, N] quantized as its transpose [N, K], flattened and cut into blocks of ``block_size`` with one
    absmax each (the weight's float type), NF4 or FP4 codes two a byte, first element in the high
    nibble: ``W[k, n] = T(table[code(n * K + k)]) * absmax[(n * K + k) // bs]`` computed in T. A row of
    the logical tensor is a strided column of the codes, so each window gathers its elements; an F16
    absmax was rounded from the block's true absmax, which the floor allows for."""

    def __init__(self, name, shape, scheme, path, b: TensorInfo, absmax: TensorInfo, table: np.ndarray, block: int):
        super().__init__(name, shape, scheme, path)
        self.b, self.a, self.bs = b, absmax, block
        self.K, self.N = shape
        self.out = absmax.dtype if absmax.dtype in ("F16", "BF16") else "F32"
        # T(table): the code values in the weight's type, as ONNX Runtime's DequantizeOneBnb4 casts them
        self.table = K.round_to(np.asarray(table, np.float32), self.out)

    def scale_groups(self, read) -> tuple | None:
        """As ``BnB4.scale_groups``: one absmax per ``block_size`` elements of the flat order of the logical
        [K, N]'s transpose (``("flat", bs, True)``); ``half`` the table's largest magnitude."""
        a = np.abs(_f32(read(self.a.name), self.a.dtype).reshape(-1)).astype(np.float64)
        half = float(np.nanmax(np.abs(self.table))) if self.table.size else 0.0
        if not half or not np.isfinite(half):
            return None
        return a, ("flat", self.bs, True), half, {"slack": BNB4_SLACK}

    def rows(self, read, read_rows, r0, r1):
        p = self._get("p", lambda: read(self.b.name).reshape(-1).view(np.uint8))
        a = self._get("a", lambda: _f32(read(self.a.name), self.a.dtype).reshape(-1))
        err = None if self.out == "F32" else self._get("e", lambda: np.abs(a) * np.float32(
            2.0 ** -11 if self.out == "F16" else 2.0 ** -8))
        idx = np.arange(self.N, dtype=np.int64)[:, None] * self.K + np.arange(r0, r1, dtype=np.int64)[None, :]
        v, f = K.bnb4_gather(p, a, self.table, self.bs, self.out, idx.reshape(-1), err)
        return (np.ascontiguousarray(v.reshape(self.N, r1 - r0).T), np.ascontiguousarray(f.reshape(self.N, r1 - r0).T))
