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
importing this module without torch works, calling it raises ``OptionsError``.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Iterable, Iterator

import numpy as np

from .dtypes import DTYPES, FP8_NAMES, FP8_STACK
from .reference import IDX, NSTATS, STAT_FIELDS, as_storage, combine, finalize  # noqa: F401

__all__ = ["STAT_FIELDS", "NSTATS", "PIECE", "delta_stats", "bytes_stats", "combine", "finalize",
           "decode_delta_f32", "decode_delta", "rounding_sigma2", "stream_delta_stats",
           "require_device", "resolve_device"]

#: elements reduced at a time on the device (bounds the float64 temporaries to ~200 MB)
PIECE = 1 << 21
_EXACT_M, _EXACT_E = 5000, -5000   # (mant, emin) of integer/bool dtypes: never the coarser side


def _torch():
    try:
        import torch
    except ImportError as exc:   # pragma: no cover - exercised only without torch
        from weightdiff.errors import OptionsError

        raise OptionsError("the torch backend needs torch, which is not installed",
                           "pip install 'weightdiff[torch]', or use --device cpu") from exc
    return torch


def resolve_device(device=None):
    """``None`` -> cuda when available, else cpu; strings and torch devices pass through."""
    torch = _torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_device(device: str = "cuda") -> None:
    """Raise ``OptionsError`` unless torch can run on ``device``."""
    from weightdiff.errors import OptionsError

    torch = _torch()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"--device {device}: torch {torch.__version__} sees no CUDA device",
                           "use --device cpu, or install a CUDA build of torch")


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


def _fp8_table(torch, dtype: str, device):
    key = (dtype, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(FP8_STACK[FP8_NAMES.index(dtype)].astype(np.float64)).to(device)
    return _TABLES[key]


def _decode(x, dtype: str):
    """Integer bits -> float64 values of ``dtype`` (exact, like ``dtypes.decode``)."""
    torch = _torch()
    f64 = torch.float64
    if dtype == "BF16":
        return x.view(torch.bfloat16).to(f64)
    if dtype == "F16":
        return x.view(torch.float16).to(f64)
    if dtype == "F32":
        return x.view(torch.float32).to(f64)
    if dtype == "F64":
        return x.view(torch.float64)
    if dtype in FP8_NAMES:
        return _fp8_table(torch, dtype, x.device)[x.to(torch.int64) & 0xFF]
    if dtype == "I8":
        return x.view(torch.int8).to(f64)
    if dtype == "U16":
        return (x.to(torch.int32) & 0xFFFF).to(f64)
    if dtype == "U32":
        return (x.to(torch.int64) & 0xFFFFFFFF).to(f64)
    if dtype == "U64":   # hi * 2^32 is exact; one rounding in the add, as numpy's uint64 -> float64
        hi = ((x >> 32) & 0xFFFFFFFF).to(f64)
        lo = (x & 0xFFFFFFFF).to(f64)
        return hi * 4294967296.0 + lo
    return x.to(f64)   # BOOL, U8, I16, I32, I64


def _ulp_params(dtype: str) -> tuple[int, int]:
    d = DTYPES[dtype]
    return (_EXACT_M, _EXACT_E) if d.kind in ("int", "bool") else (d.mant_bits, d.emin)


def _half_ulp_bits(torch, ax, params):
    """float64 bits of half an ulp of the coarser dtype at ``ax`` (>= 0); see kernels.cpu."""
    e = ((ax.view(torch.int64) >> 52) & 0x7FF) - 1023
    k = None
    for m, emin in params:
        kk = torch.clamp(e, min=emin) - m
        k = kk if k is None else torch.maximum(k, kk)
    k = k - 1
    sub = torch.where(k >= -1074, torch.bitwise_left_shift(torch.ones_like(k), torch.clamp(k + 1074, min=0)),
                      torch.zeros_like(k))
    return torch.where(k >= -1022, (k + 1023) << 52, sub)


def _piece_stats(bt, tt, dtype_base: str, dtype_tuned: str):
    """float64[NSTATS] tensor (on the input's device) for one piece of integer bits."""
    torch = _torch()
    b = _decode(bt, dtype_base)
    t = _decode(tt, dtype_tuned)
    fb, ft = torch.isfinite(b), torch.isfinite(t)
    fin = fb & ft
    x = torch.where(fin, b, 0.0)
    y = torch.where(fin, t, 0.0)
    d = y - x
    ad = d.abs()
    value_eq = (b == t) | (torch.isnan(b) & torch.isnan(t))
    changed = (bt != tt) if dtype_base == dtype_tuned else ~value_eq
    thr = _half_ulp_bits(torch, x.abs(), (_ulp_params(dtype_base), _ulp_params(dtype_tuned)))
    beyond = (fin & (ad.view(torch.int64) > thr)) | (~fin & ~value_eq)
    flips = ((x < 0) & (y > 0)) | ((x > 0) & (y < 0))
    zero = torch.zeros((), dtype=torch.float64, device=b.device)
    parts = [torch.tensor(float(b.numel()), dtype=torch.float64, device=b.device),
             (x * x).sum(), (y * y).sum(), (d * d).sum(), (x * y).sum(),
             changed.sum().to(torch.float64), beyond.sum().to(torch.float64),
             ad.max() if ad.numel() else zero,
             (~fb).sum().to(torch.float64), (~ft).sum().to(torch.float64), flips.sum().to(torch.float64)]
    return torch.stack(parts)


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


def rounding_sigma2(raw, dtype: str, device=None) -> float:
    """Sum of ``ulp(abs(x)) ** 2 / 12`` over the finite elements; see the reference."""
    d = DTYPES[dtype]
    if d.kind == "opaque":
        raise ValueError(f"dtype {dtype} has no float decoding")
    if d.kind in ("int", "bool"):
        return 0.0
    torch = _torch()
    x = _decode(_as_int_tensor(raw, dtype, resolve_device(device)), dtype)
    x = x[torch.isfinite(x)].abs()
    e = torch.clamp(((x.view(torch.int64) >> 52) & 0x7FF) - 1023, min=d.emin) - d.mant_bits
    u = torch.exp2(e.to(torch.float64))
    return float((u * u).sum().item() / 12.0)


def stream_delta_stats(windows: Iterable[tuple], device=None, depth: int = 2) -> Iterator[np.ndarray]:
    """Stats of each ``(base_raw, tuned_raw, dtype_base, dtype_tuned)`` window, in order.

    On CUDA the windows go through ``depth`` pinned host buffers per side; the host copy
    into a free buffer and the host-to-device copy (on a side stream) of window k+1
    overlap the compute of window k (on the current stream); the small results come
    back through pinned memory and are yielded as soon as they are ready. Pinned buffers
    grow to the largest window seen. On the CPU this is a plain loop.
    """
    torch = _torch()
    dev = resolve_device(device)
    if dev.type != "cuda":
        for b, t, db, dt in windows:
            yield delta_stats(b, t, db, dt, device=dev)
        return
    copy_stream = torch.cuda.Stream(device=dev)
    compute_stream = torch.cuda.current_stream(dev)
    slots = [_Slot(torch, dev) for _ in range(max(1, depth))]
    pending: deque = deque()
    for i, (b, t, db, dt) in enumerate(windows):
        _check_decodable(db, dt)
        b = np.ascontiguousarray(as_storage(b, db))
        t = np.ascontiguousarray(as_storage(t, dt))
        if b.size != t.size:
            raise ValueError(f"base window has {b.size} elements, tuned window {t.size}")
        slot = slots[i % len(slots)]
        slot.copy_done.synchronize()              # its pinned buffers are free again
        bt, tt = slot.load(b, t, copy_stream, compute_stream)
        compute_stream.wait_event(slot.copy_done)
        with torch.cuda.stream(compute_stream):
            stats = _stats_tensor(bt, tt, db, dt)
            res = torch.empty(NSTATS, dtype=torch.float64, pin_memory=True)
            res.copy_(stats, non_blocking=True)
            done = torch.cuda.Event()
            done.record(compute_stream)
            slot.compute_done = done
        pending.append((done, res))
        while pending and (len(pending) > len(slots) or pending[0][0].query()):
            ev, r = pending.popleft()
            ev.synchronize()
            yield r.numpy().copy()
    while pending:
        ev, r = pending.popleft()
        ev.synchronize()
        yield r.numpy().copy()


class _Slot:
    """One pinned host buffer and one device buffer per side, reused window after window."""

    def __init__(self, torch, dev):
        self.torch, self.dev, self.cap = torch, dev, 0
        self.copy_done = torch.cuda.Event()
        self.copy_done.record()
        self.compute_done = None

    def _grow(self, nbytes: int) -> None:
        torch = self.torch
        torch.cuda.synchronize(self.dev)
        self.cap = max(nbytes, 2 * self.cap)
        self.host = [torch.empty(self.cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.devb = [torch.empty(self.cap, dtype=torch.uint8, device=self.dev) for _ in range(2)]

    def load(self, b: np.ndarray, t: np.ndarray, copy_stream, compute_stream):
        torch = self.torch
        if max(b.nbytes, t.nbytes) > self.cap:
            self._grow(max(b.nbytes, t.nbytes))
        out = []
        if self.compute_done is not None:          # the device buffers are still being read
            copy_stream.wait_event(self.compute_done)
        with torch.cuda.stream(copy_stream):
            for k, arr in enumerate((b, t)):
                n = arr.nbytes
                host = self.host[k][:n]
                host.numpy()[:] = arr.reshape(-1).view(np.uint8)
                dst = self.devb[k][:n]
                dst.copy_(host, non_blocking=True)
                out.append(dst.view(_int_dtype(torch, max(arr.itemsize, 1))))
            self.copy_done = torch.cuda.Event()
            self.copy_done.record(copy_stream)
        return out
