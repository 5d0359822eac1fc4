"""The overlapped CUDA path of ``kernels.cuda.stream_delta_stats``: pinned host buffers, a copy
stream and a compute stream, so the copy of window k+1 overlaps the compute of window k.

Each window is copied into a pinned host buffer (in parallel slices for large windows), sent
with ``non_blocking`` copies on a side stream and reduced on the main stream by
``kernels.cuda``'s piece kernels. On device "cpu" it is a plain loop over ``delta_stats``.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from .cuda import _check_decodable, _int_dtype, _stats_tensor, _torch, delta_stats, resolve_device
from .reference import NSTATS, as_storage


#: host copies of at least this many bytes are split over ``_copy_workers()`` threads
PARALLEL_COPY_BYTES = 4 << 20
_POOL: list = []
_POOL_LOCK = threading.Lock()


def _copy_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def host_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` for flat arrays of one dtype, in parallel slices when large.

    numpy releases the GIL while it copies, so the slices run at once: one thread copies
    ~10 GB/s, well under what feeds a GPU, and on an mmap window the page faults of the
    slices overlap too. The bytes written are the same whatever the thread count.
    """
    if dst.shape != src.shape:
        raise ValueError(f"host_copy: {src.shape} into {dst.shape}")
    workers = _copy_workers()
    if src.nbytes < PARALLEL_COPY_BYTES or workers == 1:
        dst[...] = src
        return
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="weightdiff-copy"))
    step = -(-src.size // workers)
    futures = [_POOL[0].submit(dst.__setitem__, slice(s, s + step), src[s:s + step])
               for s in range(0, src.size, step)]
    for f in futures:
        f.result()


def stream_delta_stats(windows: Iterable[tuple], device=None, depth: int = 2,
                       on_device=None) -> Iterator[np.ndarray]:
    """Stats of each ``(base_raw, tuned_raw, dtype_base, dtype_tuned)`` window, in order.

    On CUDA the windows go through ``depth`` pinned host buffers per side; the host copy
    into a free buffer (``host_copy``, several threads) and the host-to-device copy (on a
    side stream) of window k+1 overlap the compute of window k (on the current stream),
    which never waits on the host; the small results come back through pinned memory and
    are yielded as soon as they are ready. Pinned buffers grow to the largest window seen.
    ``on_device(bt, tt)``: called with each window's bits on the device, on the compute stream after
    its stats and before its buffers are reused. On the CPU this is a plain loop.
    """
    torch = _torch()
    dev = resolve_device(device)
    if dev.type != "cuda":
        for b, t, db, dt in windows:
            yield delta_stats(b, t, db, dt, device=dev)
            if on_device is not None:
                on_device(b, t)
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
            if on_device is not None:
                on_device(bt, tt)
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
                host_copy(host.numpy(), arr.reshape(-1).view(np.uint8))
                dst = self.devb[k][:n]
                dst.copy_(host, non_blocking=True)
                out.append(dst.view(_int_dtype(torch, max(arr.itemsize, 1))))
            self.copy_done = torch.cuda.Event()
            self.copy_done.record(copy_stream)
        return out
