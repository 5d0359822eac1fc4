"""The delta kernels on torch (``--device cuda``, and ``cpu`` for tests): same names as ``kernels.cpu``.

Inputs are raw windows as numpy arrays or torch tensors (bf16 as uint16/int16 bits, fp8 as
uint8 bits); they are viewed as integers of their width, moved to the device and decoded
there (bf16/f16/f32/f64 by a dtype view, fp8 through ``dtypes.FP8_STACK``), then reduced
in float64 to the same ``float64[NSTATS]`` vector as ``kernels.reference.delta_stats``
(same semantics; sums in a different order, so compare with rtol). A window is processed
in pieces of ``PIECE`` elements so device memory stays bounded.

``stream_delta_stats`` is the fast path on CUDA: it copies each window into a pinned
host buffer, sends it with ``non_blocking`` copies on a side stream and computes on the
main stream, double buffered, so the copy of window k+1 overlaps the compute of window
k. On device "cpu" it is a plain loop over ``delta_stats``. torch is imported lazily;
importing this module without torch works, calling it raises ``DeviceUnavailable``.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator

import numpy as np

from .dtypes import DTYPES, FP8_NAMES, FP8_STACK
from .reference import IDX, NSTATS, STAT_FIELDS, as_storage, combine, finalize  # noqa: F401

__all__ = ["STAT_FIELDS", "NSTATS", "PIECE", "delta_stats", "bytes_stats", "combine", "finalize",
           "decode_delta_f32", "decode_delta", "stream_delta_stats",
           "require_device", "resolve_device", "DeviceUnavailable", "DeviceDelta"]

#: elements reduced at a time on the device: weightdiff.measure.compute's window, so one piece per
#: window; the temporaries of a piece peak near 75 bytes per element (~1.2 GB)
PIECE = 1 << 24


class DeviceUnavailable(RuntimeError):
    """The torch backend cannot run here (no torch, or no such device): ``(problem, hint)``."""

    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def _torch():
    try:
        import torch
    except ImportError as exc:   # pragma: no cover - exercised only without torch
        raise DeviceUnavailable("the torch backend needs torch, which is not installed",
                                "pip install 'weightdiff[torch]'") from exc
    return torch


def resolve_device(device=None):
    """``None`` -> cuda when available, else cpu; strings and torch devices pass through."""
    torch = _torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_device(device: str = "cuda") -> None:
    """Raise ``DeviceUnavailable`` unless torch can run on ``device``."""
    torch = _torch()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"torch {torch.__version__} sees no CUDA device",
                                "install a CUDA build of torch, or compute on the cpu")


def _int_dtype(torch, itemsize: int):
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def _as_int_tensor(raw, dtype: str, device):
    """A flat integer tensor (uint8/int16/int32/int64) of the raw bits, on ``device``."""
    torch = _torch()
    if isinstance(raw, torch.Tensor):
        t = raw.reshape(-1)
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        want = _int_dtype(torch, t.element_size())
        if t.dtype != want:
            t = t.view(want)
        return t.to(device)
    arr = as_storage(raw, dtype)
    arr = np.ascontiguousarray(arr).view({1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[arr.itemsize])
    with warnings.catch_warnings():   # read-only mmap windows: torch never writes to them here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.to(device)


_TABLES: dict = {}
#: dtypes whose values float32 holds exactly (all multiples of 2^-149); a pair of them is staged
#: in float32 for the masks and the half-ulp bound. Their products are exact in float64 and
#: never underflow, so the sign of x * y in float64 is the sign of the exact product.
_F32_STAGE = frozenset(("BF16", "F16", "F32", "I8", "U8", "I16", "U16", "BOOL") + FP8_NAMES)


def _fp8_table(torch, dtype: str, device, fdtype):
    key = (dtype, str(device), fdtype)
    if key not in _TABLES:
        table = FP8_STACK[FP8_NAMES.index(dtype)].astype(np.float64)
        _TABLES[key] = torch.from_numpy(table).to(device=device, dtype=fdtype)
    return _TABLES[key]


def _decode(x, dtype: str, fdtype=None):
    """Integer bits -> values of ``dtype`` as ``fdtype`` (float64 by default; exact, like
    ``dtypes.decode``; float32 only for the dtypes in ``_F32_STAGE``)."""
    torch = _torch()
    f = torch.float64 if fdtype is None else fdtype
    if dtype == "BF16":
        return x.view(torch.bfloat16).to(f)
    if dtype == "F16":
        return x.view(torch.float16).to(f)
    if dtype == "F32":
        return x.view(torch.float32).to(f)
    if dtype == "F64":
        return x.view(torch.float64)
    if dtype in FP8_NAMES:   # the bits arrive as uint8: in range for an int32 index
        return torch.index_select(_fp8_table(torch, dtype, x.device, f), 0, x.to(torch.int32))
    if dtype == "I8":
        return x.view(torch.int8).to(f)
    if dtype == "U16":
        return (x.to(torch.int32) & 0xFFFF).to(f)
    if dtype == "U32":
        return (x.to(torch.int64) & 0xFFFFFFFF).to(f)
    if dtype == "U64":   # hi * 2^32 is exact; one rounding in the add, as numpy's uint64 -> float64
        hi = ((x >> 32) & 0xFFFFFFFF).to(f)
        lo = (x & 0xFFFFFFFF).to(f)
        return hi * 4294967296.0 + lo
    return x.to(f)   # BOOL, U8, I16, I32, I64


def _half_ulp_params(dtype_base: str, dtype_tuned: str):
    """``(scale, floor)`` with half_ulp = max(pow2floor(abs(B)) * scale, floor), or None (both exact).

    max over the float dtypes f of 2^(max(E, emin_f) - mant_f - 1) is
    max(2^(E - min mant - 1), 2^(max(emin_f - mant_f) - 1)); integer dtypes add 0.
    """
    fl = [DTYPES[d] for d in (dtype_base, dtype_tuned) if DTYPES[d].kind == "float"]
    if not fl:
        return None
    m = min(d.mant_bits for d in fl)
    c = max(d.emin - d.mant_bits for d in fl)
    return math.ldexp(1.0, -m - 1), math.ldexp(1.0, c - 1)


def _half_ulp(torch, xs, params):
    """Half an ulp of the coarser dtype at ``abs(xs)`` (same float dtype as ``xs``; the caller passes the lesser
    magnitude of the pair).

    pow2floor by masking the exponent bits (0 below the smallest normal of ``xs``'s dtype,
    where the floor applies anyway: every emin is >= that exponent - 1); inf/NaN give inf.
    In float32 a bound below 2^-149 becomes 0 (the F32 floor 2^-150 is a tie, rounded to
    even); harmless, as every value staged in float32 is a multiple of 2^-149, so is every
    D, and abs(D) > h <=> D != 0 for any h < 2^-149. Larger bounds are exact powers of two.
    """
    scale, floor = params
    if xs.dtype == torch.float32:
        p = (xs.view(torch.int32) & 0x7F800000).view(torch.float32)
    else:
        p = (xs.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    return p.mul_(scale).clamp_min_(floor)


_EXP_MASK = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_ROW = 128   # bools summed per row in uint8 (<= 255) before the int64 total


def _finite(torch, bits, vals, dtype: str):
    """Bool mask of finite values: one mask-and-compare on the stored bits where the format
    has an exponent field, else abs(vals) < inf (``torch.isfinite`` is four kernels)."""
    mask = _EXP_MASK.get(dtype)
    if mask is not None:
        return (bits & mask) != mask
    return vals.abs() < math.inf


def _count(torch, mask):
    """int64 0-dim count of a bool tensor, read once as bytes.

    ``mask.sum()`` would first copy the mask to int64 (8 bytes written per element); here
    rows of ``_ROW`` bytes are summed in uint8, and only those row sums are widened.
    """
    u = mask.reshape(-1).view(torch.uint8)
    k = u.numel() - u.numel() % _ROW
    total = u[:k].view(-1, _ROW).sum(1, dtype=torch.uint8).sum()
    return total + u[k:].sum() if k < u.numel() else total


def _piece_stats(bt, tt, dtype_base: str, dtype_tuned: str):
    """float64[NSTATS] tensor (on the input's device) for one piece of integer bits.

    No host synchronisation: every count stays a device tensor. A pair of ``_F32_STAGE``
    dtypes is decoded to float32 for the masks and the half-ulp bound, then again to
    float64 from bits with the non-finite pairs zeroed, for the sums; other pairs decode to
    float64 once. Sums, D and the beyond test are float64 exactly as in the reference.
    """
    torch = _torch()
    f64 = torch.float64
    n = bt.numel()
    dev = bt.device
    if n == 0:
        return torch.zeros(NSTATS, dtype=f64, device=dev)
    small = dtype_base in _F32_STAGE and dtype_tuned in _F32_STAGE
    xs = _decode(bt, dtype_base, torch.float32 if small else f64)
    ys = _decode(tt, dtype_tuned, torch.float32 if small else f64)
    floats = DTYPES[dtype_base].kind == "float" or DTYPES[dtype_tuned].kind == "float"
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    if floats:
        fb, ft = _finite(torch, bt, xs, dtype_base), _finite(torch, tt, ys, dtype_tuned)
        fin = fb & ft
        veq = (xs == ys) | (torch.isnan(xs) & torch.isnan(ys))
        nf_beyond = n - _count(torch, fin | veq)   # non-finite pairs whose values differ
        nfb, nft = n - _count(torch, fb), n - _count(torch, ft)
    else:   # integers and bool are always finite
        fin = None
        veq = xs == ys if dtype_base != dtype_tuned else None
        nf_beyond = nfb = nft = zero
    changed = _count(torch, bt != tt) if dtype_base == dtype_tuned else n - _count(torch, veq)
    if fin is None:
        x, y = (xs, ys) if not small else (_decode(bt, dtype_base), _decode(tt, dtype_tuned))
    elif small:   # zero the bits of non-finite pairs, then decode straight to float64
        x = _decode(torch.where(fin, bt, 0), dtype_base)
        y = _decode(torch.where(fin, tt, 0), dtype_tuned)
    else:
        x = torch.where(fin, xs, 0.0)
        y = torch.where(fin, ys, 0.0)
    d = y - x
    if "F64" in (dtype_base, dtype_tuned):   # products of float64 values may underflow to 0
        dot = torch.dot(x, y)
        flips = _count(torch, ((x < 0) & (y > 0)) | ((x > 0) & (y < 0)))
    else:                                    # exact sign of x * y in float64
        p = x * y
        dot = p.sum()
        flips = _count(torch, p < 0)
    lo, hi = torch.aminmax(d)
    params = _half_ulp_params(dtype_base, dtype_tuned)
    if params is None:
        beyond = _count(torch, d != 0)
    else:   # non-finite pairs have d == 0, never beyond
        beyond = _count(torch, d.abs() > _half_ulp(torch, torch.minimum(xs.abs(), ys.abs()), params))
    parts = [torch.dot(x, x), torch.dot(y, y), torch.dot(d, d), dot, changed, beyond + nf_beyond,
             torch.maximum(hi, -lo).abs(), nfb, nft, flips]   # abs: +0, never -0
    out = torch.empty(NSTATS, dtype=f64, device=dev)
    out[:1].fill_(float(n))   # a fill kernel, not a host-to-device copy: no stream synchronisation
    out[1:] = torch.stack([v.to(f64) for v in parts])
    return out


def _stats_tensor(bt, tt, dtype_base: str, dtype_tuned: str):
    """float64[NSTATS] device tensor over a whole window, piece by piece, combined in order."""
    torch = _torch()
    if bt.numel() != tt.numel():
        raise ValueError(f"base window has {bt.numel()} elements, tuned window {tt.numel()}")
    acc = None
    for s in range(0, max(bt.numel(), 1), PIECE):
        part = _piece_stats(bt[s:s + PIECE], tt[s:s + PIECE], dtype_base, dtype_tuned)
        if acc is None:
            acc = part
        else:
            new = acc + part
            new[IDX["max_abs"]] = torch.maximum(acc[IDX["max_abs"]], part[IDX["max_abs"]])
            acc = new
    return acc


def _check_decodable(*names: str) -> None:
    for name in names:
        if not DTYPES[name].decodable:
            raise ValueError(f"dtype {name} has no float decoding; use bytes_stats")


def delta_stats(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, device=None) -> np.ndarray:
    """One window of a tensor pair -> float64[NSTATS]; see ``kernels.reference.delta_stats``."""
    _check_decodable(dtype_base, dtype_tuned)
    dev = resolve_device(device)
    bt = _as_int_tensor(base_raw, dtype_base, dev)
    tt = _as_int_tensor(tuned_raw, dtype_tuned, dev)
    return _stats_tensor(bt, tt, dtype_base, dtype_tuned).cpu().numpy()


def bytes_stats(base_raw, tuned_raw, device=None) -> np.ndarray:
    """Unit-by-unit comparison for C64/F4/F6 (see the reference); computed on the host."""
    from .reference import bytes_stats as _bytes_stats

    torch = _torch()
    if isinstance(base_raw, torch.Tensor):
        base_raw = base_raw.detach().cpu().numpy()
    if isinstance(tuned_raw, torch.Tensor):
        tuned_raw = tuned_raw.detach().cpu().numpy()
    return _bytes_stats(base_raw, tuned_raw)


def decode_delta(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, device=None):
    """float32 torch tensor ``T - B`` (difference in float64, 0 where a side is non-finite), flat."""
    _check_decodable(dtype_base, dtype_tuned)
    torch = _torch()
    dev = resolve_device(device)
    b = _decode(_as_int_tensor(base_raw, dtype_base, dev), dtype_base)
    t = _decode(_as_int_tensor(tuned_raw, dtype_tuned, dev), dtype_tuned)
    if b.numel() != t.numel():
        raise ValueError(f"base window has {b.numel()} elements, tuned window {t.numel()}")
    fin = torch.isfinite(b) & torch.isfinite(t)
    return torch.where(fin, t - torch.where(fin, b, 0.0), 0.0).to(torch.float32)


def decode_delta_f32(base_raw, tuned_raw, dtype_base: str, dtype_tuned: str, out, device=None) -> None:
    """``out[:] = float32(T - B)`` into a numpy array or torch tensor; see the reference."""
    torch = _torch()
    d = decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, device)
    if isinstance(out, torch.Tensor):
        if out.numel() != d.numel():
            raise ValueError(f"out has {out.numel()} elements, the windows {d.numel()}")
        out.view(-1).copy_(d)
        return
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous float32 array")
    if out.size != d.numel():
        raise ValueError(f"out has {out.size} elements, the windows {d.numel()}")
    out.reshape(-1)[:] = d.cpu().numpy()


def stream_delta_stats(windows: Iterable[tuple], device=None, depth: int = 2,
                       on_device=None) -> Iterator[np.ndarray]:
    """The stats of each window, copies overlapped with compute on CUDA (``kernels.cuda_stream``);
    ``on_device(bt, tt)``: called with each window's integer bits on the device, in order (a
    ``DeviceDelta.add``)."""
    from .cuda_stream import stream_delta_stats as stream

    return stream(windows, device=device, depth=depth, on_device=on_device)


class DeviceDelta:
    """``T - B`` of one ``m x n`` matrix kept on the device, filled from the stats pass's windows
    (flat, row-major, in order), and each side's storage-rounding variance summed per row and per
    column: what the rank of the change needs, so that it is not read a second time.

    ``tables``: per side, ``(table, shift, mask)`` of ``weightdiff.measure.rank._variance_table``
    (variance indexed by ``(bits >> shift) & mask``) or None for a dtype that stores exactly.
    ``float64``: keep the delta in float64 (exact for 16-bit sides; the Gram matrix's error bound then
    has no float32 copy term), else float32 like ``decode_delta``. The sums are taken per window as
    a partial first row, whole rows (``sum`` over a dimension) and a partial last row, in a fixed
    order: the same bits run after run (not those of the CPU's flat-order sums)."""

    def __init__(self, shape2: tuple[int, int], dtype_base: str, dtype_tuned: str, tables, device,
                 float64: bool = True):
        torch = _torch()
        _check_decodable(dtype_base, dtype_tuned)
        self.torch = torch
        self.shape2 = (int(shape2[0]), int(shape2[1]))
        m, n = self.shape2
        self.dtypes = (dtype_base, dtype_tuned)
        self.dev = resolve_device(device)
        self.fdtype = torch.float64 if float64 else torch.float32
        self.delta = torch.empty(m * n, dtype=self.fdtype, device=self.dev)
        self.rows = torch.zeros((2, m), dtype=torch.float64, device=self.dev)
        self.cols = torch.zeros((2, n), dtype=torch.float64, device=self.dev)
        self.tables = [None if t is None else (torch.from_numpy(np.asarray(t[0], np.float64)).to(self.dev),
                                               int(t[1]), int(t[2])) for t in tables]
        self.pos = 0

    def add(self, bt, tt) -> None:
        """The next window's raw bits (integer tensors or numpy arrays of the storage width)."""
        torch = self.torch
        db, dt = self.dtypes
        bt = _as_int_tensor(bt, db, self.dev)
        tt = _as_int_tensor(tt, dt, self.dev)
        size = bt.numel()
        if tt.numel() != size:
            raise ValueError(f"base window has {size} elements, tuned window {tt.numel()}")
        if self.pos + size > self.delta.numel():
            raise ValueError(f"windows past the matrix's {self.delta.numel()} elements")
        for s in range(0, size, PIECE):
            b = _decode(bt[s:s + PIECE], db)
            t = _decode(tt[s:s + PIECE], dt)
            fin = torch.isfinite(b) & torch.isfinite(t)
            d = torch.where(fin, t - torch.where(fin, b, 0.0), 0.0)
            self.delta[self.pos + s:self.pos + s + d.numel()].copy_(d)
            del b, t, fin, d
        for side, bits in enumerate((bt, tt)):
            if self.tables[side] is not None:
                self._profile(side, bits)
        self.pos += size

    def _profile(self, side: int, bits) -> None:
        torch = self.torch
        table, shift, mask = self.tables[side]
        n = self.shape2[1]
        rows, cols = self.rows[side], self.cols[side]
        for s in range(0, bits.numel(), PIECE):
            piece = bits[s:s + PIECE]
            idx = (piece.to(torch.int64) >> shift) & mask
            var = torch.index_select(table, 0, idx)
            p0 = self.pos + s
            r, c = divmod(p0, n)
            i = 0
            if c:                                   # the rest of a row begun before this piece
                k = min(n - c, var.numel())
                rows[r] += var[:k].sum()
                cols[c:c + k] += var[:k]
                i, r = k, r + 1
            whole = (var.numel() - i) // n
            if whole:
                blk = var[i:i + whole * n].view(whole, n)
                rows[r:r + whole] += blk.sum(dim=1)
                cols += blk.sum(dim=0)
                i, r = i + whole * n, r + whole
            if i < var.numel():                     # a row this piece begins
                rows[r] += var[i:].sum()
                cols[:var.numel() - i] += var[i:]

    def matrix(self):
        """The delta as an ``m x n`` device tensor (after every window)."""
        if self.pos != self.delta.numel():
            raise ValueError(f"fed {self.pos} of {self.delta.numel()} elements")
        return self.delta.view(self.shape2)

    def profile(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row and per-column variance sums, both sides added: float64 ``(m,)`` and ``(n,)``."""
        return (self.rows.sum(dim=0).cpu().numpy(), self.cols.sum(dim=0).cpu().numpy())

    def close(self) -> None:
        self.delta = self.rows = self.cols = None
