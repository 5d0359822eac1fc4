"""The C heap's policy for large arrays (glibc only; nothing elsewhere): no numpy here, so the command line sets it
before anything heavy is imported."""

from __future__ import annotations

import functools

__all__ = ["MMAP_THRESHOLD", "map_large_arrays", "trim_heap"]

#: allocations of this many bytes or more are mapped one by one and unmapped when freed (``map_large_arrays``)
MMAP_THRESHOLD = 1 << 20


def map_large_arrays() -> bool:
    """Every allocation of ``MMAP_THRESHOLD`` bytes or more mapped on its own and given back when freed (glibc's
    ``M_MMAP_THRESHOLD``, which also ends its sliding threshold; nothing elsewhere); whether it was set. glibc raises
    its threshold to the size of each large block freed, up to 32 MB: after that, arrays of 1-32 MB (windows, panels,
    the Gram's tile products) come from the heap and the summing threads' arenas, whose freed pages stay resident.
    At 70B widths that was about 45 MB above the arrays alive beside a 512 MB Gram matrix (a rotated stream's
    measurement, 1,008 -> 964 MB); a 1.1B pair runs in the same time. Called once by the command line."""
    import ctypes

    lib = _libc()
    if lib is None:
        return False
    try:
        fn = lib.mallopt
    except AttributeError:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn(-3, MMAP_THRESHOLD) == 1          # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere) before a Gram
    matrix of hundreds of MB is assembled and solved: what the checks and the windows before it freed stayed
    resident (the tensors measured again after the pass ran about 100 MB above the pass's own level)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, on Linux; None elsewhere (its malloc tunables mean nothing to another allocator)."""
    import ctypes
    import os

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):      # not glibc (macOS, musl, Windows)
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes

    lib = _libc()
    try:
        fn = lib.malloc_trim if lib is not None else None
    except AttributeError:
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn
