"""Legacy PyTorch checkpoints (``pytorch_model.bin``, ``.pt``), read only through torch's
restricted unpickler.

The sibling of ``safetensors_io`` for pickles. ``torch.load(..., weights_only=True,
mmap=True)`` rebuilds tensors and plain containers and refuses every other global a
pickle names, so a file whose ``__reduce__`` would run code is refused, never executed.
Plain ``pickle`` is never used. torch is imported lazily: without it the error says
``install weightdiff[torch]``. Tensors are handed out as numpy views in the same
storage dtypes as the safetensors reader (bf16 as uint16, fp8 as uint8).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .files import open_regular
from .safetensors_read import TensorInfo, storage_of

__all__ = ["PICKLE_SUFFIXES", "load_pickle"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

_TORCH_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "complex64": "C64",
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(path, "is a PyTorch pickle, which weightdiff reads only through torch's "
                                    "restricted unpickler", "install weightdiff[torch]") from None
    return torch


def _refusal(exc: BaseException) -> str:
    """The telling part of torch's long refusal: 'global io.open', without its advice to allow it."""
    text = str(exc)
    # torch < 2.13: "Unsupported global: GLOBAL io.open"; 2.13: "Trying to load unsupported
    # GLOBAL posix.system whose module posix is blocked"
    m = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.I)
    if m:
        return f"it names the global {m[1]}"
    m = re.search(r"Unsupported operand \d+", text)
    if m:
        return m[0].lower()
    # never relay torch's advice to rerun with weights_only=False
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.lstrip().startswith("Weights only load failed")
             and not ln.lstrip().startswith("Check the documentation of torch.load")]
    return lines[0][:160] if lines else type(exc).__name__


def _torch_load(torch, path: Path) -> object:
    fd, _ = open_regular(path)          # no FIFO, device or directory reaches torch
    os.close(fd)
    try:
        with warnings.catch_warnings():        # torch warns on stderr about pickle protocols
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # mmap needs the zip format (torch >= 1.6); older files load without it
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"Unsupported operand 149\b", str(exc)):
            # opcode 149 (FRAME) opens every pickle of protocol 4 or later, which torch.save never writes: a plain
            # pickle.dump, not "code outside the allow-list" (a benign dict of tensors read so)
            raise CheckpointError(path, "refused: a plain pickle (protocol 4 or later, as pickle.dump writes), not a "
                                        "file torch.save wrote; weightdiff reads pickles only through torch's "
                                        "weights-only loader", "convert it to safetensors with a trusted tool") from None
        raise CheckpointError(path, "refused: the pickle carries code or objects outside torch's "
                                    f"weights-only allow-list ({_refusal(exc)})",
                              "convert it to safetensors with a trusted tool") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {(exc.strerror or str(exc)).lower()}") from None
    except Exception as exc:  # torch raises assorted types for corrupt input
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({type(exc).__name__}: "
                                    f"{_refusal(exc)})") from None


def _state_dict(torch, obj: object, path: Path) -> dict:
    # unwrap {"state_dict": {...}} / {"model": {...}} style containers of one dict; a pickle's memo can make a
    # dict hold itself (d["model"] = d, loaded by the weights-only unpickler), which looped forever
    seen = set()
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        seen.add(id(obj))
        inner = [v for v in obj.values() if isinstance(v, dict)]
        if len(inner) != 1:
            # a training checkpoint: the model's state dict beside an optimizer's, a trainer's loops and callbacks
            # (which hold no tensor at their top level: an optimizer's are under "state"); the one nested dict
            # that holds tensors is the model's. Two (a model and its EMA copy) cannot be told apart
            holding = [(k, v) for k, v in obj.items()
                       if isinstance(v, dict) and any(isinstance(x, torch.Tensor) for x in v.values())]
            _refuse_hqq(inner, path)
            if len(holding) > 1:
                keys = ", ".join(f"`{escape_name(str(k))}`" for k, _ in holding[:4])
                raise CheckpointError(path, f"holds {len(holding)} state dicts ({keys}{', ...' if len(holding) > 4 else ''}): "
                                            "which one is the model cannot be told",
                                      "save the one to compare on its own, e.g. torch.save(ckpt['model'], 'model.pt')")
            if not holding:
                break
            inner = [holding[0][1]]
        if id(inner[0]) in seen:
            raise CheckpointError(path, "holds no tensors, only dictionaries that contain themselves")
        obj = inner[0]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, expected a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        nested = [v for v in obj.values() if isinstance(v, dict)]
        _refuse_hqq(nested, path)
        if nested:
            raise CheckpointError(path, f"holds no tensors at its top level, only {len(nested):,} nested "
                                        "dictionaries (not a flat state dict)")
        raise CheckpointError(path, "holds no tensors")
    return tensors


def _refuse_hqq(nested: list, path: Path) -> None:
    """HQQ's save_quantized (qmodel.pt): {module: {"W_q": packed codes, "scale", "zero", "nbits", ...}}."""
    if any("W_q" in v for v in nested):
        raise CheckpointError(path, "is an HQQ quantized model (per-module `W_q` packed codes), which "
                                    "weightdiff does not dequantize",
                              "save the model's float weights (HQQ's dequantize) and compare those")


class _PickleArrays(Mapping):
    """name -> flat storage-dtype array. A contiguous tensor is a zero-copy view of torch's map
    of the file; a strided one (a transpose, a slice) is copied only when it is read, so locating
    or inspecting a pickle never materializes a tensor."""

    def __init__(self, views: dict[str, np.ndarray], strided: dict[str, tuple]):
        self._views = views
        self._strided = strided

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._views:
            return self._views[name]
        t, torch_uint8, storage = self._strided[name]
        return t.detach().contiguous().reshape(-1).view(torch_uint8).numpy().view(storage)

    def __iter__(self):
        yield from self._views
        yield from self._strided

    def __len__(self) -> int:
        return len(self._views) + len(self._strided)


def _check_storage(torch, t, name: str, path: Path) -> None:
    """Refuse a tensor that claims more bytes than its storage holds (``ones(1).expand(n, n)``:
    a stride-0 or overlapping view); copying it out would cost memory unbounded by the file."""
    esize = t.element_size()
    logical = t.numel() * esize
    held = max(0, t.untyped_storage().nbytes() - t.storage_offset() * esize)
    if logical > held:
        shape = " x ".join(f"{int(d):,}" for d in t.shape)
        raise CheckpointError(path, f"tensor `{escape_name(name)}` is a broadcast or overlapping view "
                                    f"of {held:,} bytes of storage: its shape {shape} would expand to "
                                    f"{logical:,} bytes; not a plain checkpoint tensor",
                              "save a .contiguous() copy of it from a trusted source")


def load_pickle(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], Mapping[str, np.ndarray]]:
    """Tensor infos (no byte offsets) and flat storage-dtype arrays of one pickle file.

    The arrays view torch's memory map of the file, so nothing is copied until read; a
    tensor whose shape needs more bytes than its storage holds (a broadcast view) is refused.
    """
    path = Path(path)
    torch = _import_torch(path)
    state = _state_dict(torch, _torch_load(torch, path), path)
    infos: dict[str, TensorInfo] = {}
    views: dict[str, np.ndarray] = {}
    strided: dict[str, tuple] = {}
    for name, t in state.items():
        dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise CheckpointError(path, f"tensor `{escape_name(name)}` has dtype {t.dtype}, which has "
                                        "no safetensors equivalent")
        if t.layout != torch.strided or t.is_quantized:
            raise CheckpointError(path, f"tensor `{escape_name(name)}` is sparse or quantized")
        _check_storage(torch, t, name, path)
        infos[name] = TensorInfo(name, dtype, tuple(int(d) for d in t.shape), path, None, None)
        if t.is_contiguous():
            views[name] = t.detach().reshape(-1).view(torch.uint8).numpy().view(storage_of(dtype))
        else:
            strided[name] = (t, torch.uint8, storage_of(dtype))
    return infos, _PickleArrays(views, strided)
