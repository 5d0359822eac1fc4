"""Writing safetensors files from numpy, including bf16 and fp8 (which numpy lacks).

The demo, the benchmark generator and the tests build checkpoints with these; the
``safetensors`` package cannot write bf16 from numpy. Files are written atomically
(temporary file in the same folder, fsync, rename), so a reader never sees half a file.

>>> bits = to_storage(np.array([1.0, -2.5], dtype=np.float32), "BF16")
>>> bits.dtype.name, [hex(int(b)) for b in bits]
('uint16', ['0x3f80', '0xc020'])
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping, Union

import numpy as np

from ..kernels.dtypes import DTYPES, FP8_TABLES, byte_length, storage_dtype
from ..fsutil import atomic_writer

#: a tensor to write: a numpy array (dtype inferred) or (dtype name, raw stored array)
TensorLike = Union[np.ndarray, "tuple[str, np.ndarray]"]

_NP_TO_ST = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16",
    "float32": "F32", "float64": "F64", "complex64": "C64",
}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits with round-to-nearest-even (NaN kept quiet)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_fp8_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float -> nearest fp8 bit pattern of ``dtype`` (ties to the even pattern; NaN -> a NaN;
    values past the largest finite saturate to it, as fp8 training recipes do)."""
    table = FP8_TABLES[dtype].astype(np.float64)
    finite = np.isfinite(table)
    order = np.argsort(np.where(finite, table, np.inf), kind="stable")
    order = order[finite[order]]
    vals = table[order]
    # drop the duplicate -0/+0 so searchsorted sees strictly increasing values
    keep = np.concatenate([[True], np.diff(vals) > 0])
    vals, order = vals[keep], order[keep]
    x = np.asarray(x, dtype=np.float64).ravel()
    idx = np.clip(np.searchsorted(vals, x), 1, len(vals) - 1)
    lo, hi = vals[idx - 1], vals[idx]
    pick_hi = (hi - x) < (x - lo)
    tie = (hi - x) == (x - lo)
    pick_hi |= tie & (order[idx] % 2 == 0)
    out = np.where(pick_hi, order[idx], order[idx - 1]).astype(np.uint8)
    out = np.where(x >= vals[-1], order[-1], out)
    out = np.where(x <= vals[0], order[0], out)
    nan_code = int(np.flatnonzero(np.isnan(table))[0])
    out = np.where(np.isnan(x), nan_code, out).astype(np.uint8)
    return out


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float values -> the raw stored array for ``dtype`` (the inverse of ``dtypes.decode``)."""
    if dtype == "BF16":
        return to_bf16_bits(x)
    if dtype in FP8_TABLES:
        return to_fp8_bits(x, dtype).reshape(np.shape(x))
    d = DTYPES[dtype]
    if d.kind == "opaque" and d.storage == "uint8":
        raise ValueError(f"cannot encode floats as {dtype}; pass raw bytes as ('{dtype}', uint8 array)")
    return np.asarray(x).astype(storage_dtype(dtype))


def _normalise(t: TensorLike) -> tuple[str, np.ndarray, list[int]]:
    if isinstance(t, tuple):
        dtype, raw = t
        raw = np.asarray(raw)
        shape = list(raw.shape)
        if DTYPES[dtype].bits < 8:
            raise ValueError("pass packed F4/F6 data as (dtype, raw_uint8, shape) via save_raw")
        return dtype, raw, shape
    arr = np.asarray(t)
    name = _NP_TO_ST.get(arr.dtype.name)
    if name is None:
        raise ValueError(f"numpy dtype {arr.dtype} has no safetensors equivalent")
    return name, arr, list(arr.shape)


def encode(tensors: Mapping[str, TensorLike], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` in the given order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name, t in tensors.items():
        dtype, raw, shape = _normalise(t)
        data = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
        assert len(data) == byte_length(dtype, int(np.prod(shape, dtype=np.int64)))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


def save_file(path: str | os.PathLike, tensors: Mapping[str, TensorLike],
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file atomically."""
    path = Path(path)
    with atomic_writer(path, "wb") as fh:
        fh.write(encode(tensors, metadata))
    return path


def shard_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of consecutive tensors grouped into shards of at most ``budget`` bytes
    (a tensor larger than the budget gets a shard of its own).

    >>> shard_groups([4, 4, 4, 10, 1], 8)
    [[0, 1], [2], [3], [4]]
    """
    groups: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if groups[-1] and acc + size > budget:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += size
    return groups


def save_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, TensorLike],
                    shards: int = 1, metadata: Mapping[str, str] | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face style checkpoint folder.

    ``shards == 1`` and no ``max_shard_bytes``: ``model.safetensors``. Otherwise
    ``model-0000k-of-0000n.safetensors`` files plus ``model.safetensors.index.json``,
    tensors kept in order and split into ``shards`` groups of about equal bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = list(tensors.items())
    if shards <= 1 and max_shard_bytes is None:
        save_file(directory / "model.safetensors", dict(items), metadata or {"format": "pt"})
        return directory
    sizes = [_normalise(t)[1].nbytes for _, t in items]
    total = sum(sizes)
    groups = shard_groups(sizes, max_shard_bytes or max(1, -(-total // shards)))
    n = len(groups)
    weight_map = {}
    for k, g in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(directory / fname, {items[i][0]: items[i][1] for i in g}, metadata or {"format": "pt"})
        for i in g:
            weight_map[items[i][0]] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with atomic_writer(directory / "model.safetensors.index.json", "w") as fh:
        json.dump(index, fh, indent=2)
    return directory
