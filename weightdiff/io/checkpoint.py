"""Checkpoint locator: a path -> the files, tensors and (for PEFT adapters) LoRA factors.

A path may be one ``.safetensors`` file; a folder with ``model.safetensors``; a sharded
folder with ``*.safetensors.index.json`` (every shard must exist, hold exactly the
tensors the index names for it, and no tensor may sit in two shards; a stray shard of
the same series is an error, other ``.safetensors`` files are listed in ``ignored``);
a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``); a
llama.cpp GGUF file (recognised by its magic, whatever its name), or a folder holding
exactly one ``.gguf``, read through ``weightdiff.io.gguf_read`` (the ``gguf`` extra); a
Hugging Face cache folder (``models--org--name`` or one of its ``snapshots/<rev>``,
whose symlinks are followed); or a legacy ``pytorch_model*.bin`` / ``.pt`` pickle, read
only through torch's restricted unpickler. Locating reads headers, never tensor data.

>>> with locate("tuned/") as ckpt:                               # doctest: +SKIP
...     ckpt.format, ckpt.params, [f.target for f in ckpt.lora][:1]
('adapter', 1703936, ['model.layers.0.self_attn.q_proj.weight'])
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from .peft_adapter import JSON_CAP, AdapterConfig, LoraFactor, lora_factors, parse_adapter_config
from ..errors import CheckpointError, escape_name
from .pickle_read import PICKLE_SUFFIXES, load_pickle
from .quant_sources import Source
from .quantized import fold, read_quant_config
from .files import load_json, open_regular, os_problem, pread_into, read_small
from .safetensors_read import SafetensorsFile, TensorInfo, array_windows, check_range, storage_of

__all__ = ["AdapterConfig", "LoraFactor", "Checkpoint", "locate", "JSON_CAP", "LocalFolder", "choose_weights", "build",
           "is_hub_candidate"]

#: trainer state saved beside the weights, never a model
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
_OPEN_FILES = 8                     # headers parsed and fds held at once; data is mapped per window


class Checkpoint:
    """A located checkpoint (a context manager). Tensor data is read lazily, one window at a time."""

    def __init__(self, path: Path, format: str, files: list[Path], tensors: dict[str, TensorInfo],
                 metadata: dict, root: Path, adapter: AdapterConfig | None = None,
                 ignored: list[Path] | None = None, opener=SafetensorsFile):
        self.path, self.format, self.files, self.tensors = path, format, files, tensors
        self.metadata, self.root, self.adapter = metadata, root, adapter
        self.ignored = ignored or []
        self._opener = opener               # the reader class of this checkpoint's files
        self.notes: list[str] = []          # things the user should hear about (shown with the plan)
        self._identity = {f: _identity(f) for f in files}
        self.lora: list[LoraFactor] = lora_factors(tensors, files[0], adapter) if adapter is not None else []
        self._open: OrderedDict[Path, SafetensorsFile] = OrderedDict()
        self._pins: dict[Path, int] = {}
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._pickle: tuple[Path, dict[str, np.ndarray]] | None = None
        #: quantized checkpoints: the stored tensors, the logical tensors' sources, and the
        #: activation/KV-cache scales folded away (weightdiff.io.quantized)
        self.stored: dict[str, TensorInfo] = tensors
        self.quant: dict[str, Source] = {}
        self.quant_config: dict | None = None
        self.hidden: list[str] = []
        #: identity of a Hub checkpoint (weightdiff.io.hub): repo id, commit, files with sizes and sha256
        self.hub: dict | None = None
        #: a line for the plan saying where a checkpoint came from, when its spelling could be a Hub id
        self.origin: str | None = None
        #: how a Hub checkpoint's bytes were read ({"mode": stream|download|cache, "reader": ...})
        self.hub_run: dict | None = None
        #: reads a small JSON file beside the weights (config.json) for a checkpoint not on disk
        self.read_config = None
        self._closers: list = []

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, {len(self.tensors)} tensors)"

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._pickle = None
        while self._closers:
            self._closers.pop()()

    def on_close(self, fn) -> None:
        """Call ``fn()`` when the checkpoint is closed (a streamed Hub checkpoint's HTTP workers)."""
        self._closers.append(fn)

    # -- sources ---------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor `{escape_name(name)}` in {self.path}") from None

    def _file(self, path: Path) -> SafetensorsFile:
        f = self._open.get(path)
        if f is not None:
            self._open.move_to_end(path)
            return f
        for old in [p for p in self._open if not self._pins.get(p)][:max(0, len(self._open) - _OPEN_FILES + 1)]:
            self._open.pop(old).close()
        f = self._opener(path)
        want = self._headers.get(path)
        if want is not None and f.tensors != want:
            f.close()
            raise CheckpointError(path, "file changed since the checkpoint was located (rerun)")
        self._headers[path] = f.tensors
        self._open[path] = f
        return f

    def _array(self, info: TensorInfo) -> np.ndarray:
        if self._pickle is None or self._pickle[0] != info.path:
            self._pickle = None                   # one pickle shard mapped at a time
            self._pickle = (info.path, load_pickle(info.path)[1])
        return self._pickle[1][info.name]

    def _stored_read(self, name: str) -> np.ndarray:
        return self._file(self.stored[name].path).read(name)

    def _stored_rows(self, name: str, rows) -> np.ndarray:
        return self._file(self.stored[name].path).read_rows(name, np.asarray(rows, dtype=np.int64))

    def _quant_windows(self, name: str, max_elements: int | None, start: int, stop: int | None,
                       floor: bool) -> Iterator[np.ndarray]:
        info = self._info(name)
        start, stop, step = check_range(info, max_elements, start, stop, 4)
        return self.quant[name].windows(self._stored_read, self._stored_rows, start, stop, step, floor)

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0,
                      stop: int | None = None) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows``: per element, the largest error a faithful
        round-to-nearest quantization with this tensor's own scales leaves; None for a tensor
        that was not quantized (or whose reader gives no floor)."""
        if name in self.quant:
            return self._quant_windows(name, max_elements, start, stop, True)
        info = self._info(name)
        if info.quant is not None and info.start is not None:   # a reader that dequantizes itself
            f = self._file(info.path)
            it = f.floor_windows(name, max_elements, start, stop) if hasattr(f, "floor_windows") else None
            return None if it is None else self._pinned(info.path, it)
        return None

    def windows(self, name: str, max_elements: int | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[np.ndarray]:
        """As ``SafetensorsFile.windows``, opening the right shard lazily; quantized tensors
        come out dequantized to float32."""
        if name in self.quant:
            return self._quant_windows(name, max_elements, start, stop, False)
        info = self._info(name)
        if info.start is None:
            start, stop, step = check_range(info, max_elements, start, stop, storage_of(info.dtype).itemsize)
            return array_windows(self._array(info), start, stop, step)
        f = self._file(info.path)
        return self._pinned(info.path, f.windows(name, max_elements, start, stop))

    def _pinned(self, path: Path, it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        self._pins[path] = self._pins.get(path, 0) + 1
        try:
            yield from it
        finally:
            self._pins[path] -= 1

    def read(self, name: str) -> np.ndarray:
        info = self._info(name)
        if name in self.quant:
            src = self.quant[name]
            try:
                return src.rows(self._stored_read, self._stored_rows, 0, src.nrows)[0].reshape(info.shape)
            finally:
                src.release()
        if info.start is None:
            out = self._array(info).copy()
            return out if info.packed else out.reshape(info.shape)
        return self._file(info.path).read(name)

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        info = self._info(name)
        if name in self.quant:
            src = self.quant[name]
            idx = np.asarray(rows, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= info.shape[0]):
                raise IndexError(f"row index out of range for `{escape_name(name)}` with {info.shape[0]} rows")
            per = math.prod(info.shape[1:]) // src.rowlen if len(info.shape) > 1 else 1
            try:
                parts = [src.rows(self._stored_read, self._stored_rows, int(r) * per, (int(r) + 1) * per)[0]
                         for r in idx]
            finally:
                src.release()
            return np.stack(parts).reshape((idx.size, *info.shape[1:])) if parts else \
                np.zeros((0, *info.shape[1:]), np.float32)
        if info.start is None:
            if not info.shape:
                raise ValueError(f"read_rows needs a >=1-D tensor; `{escape_name(name)}` is 0-d")
            return self._array(info).reshape(info.shape)[np.asarray(rows, dtype=np.int64)].copy()
        return self._file(info.path).read_rows(name, rows)

    def read_rows_many(self, requests: Sequence[tuple[str, Sequence[int] | np.ndarray]]) -> list[np.ndarray]:
        """``read_rows`` for several tensors at once (a streamed Hub checkpoint fetches them concurrently)."""
        if requests and all(n not in self.quant and self._info(n).start is not None for n, _ in requests):
            files = [self._file(self._info(n).path) for n, _ in requests]
            many = getattr(files[0], "read_rows_many", None)
            if many is not None and all(type(f) is type(files[0]) for f in files):
                return many([(f, n, rows) for f, (n, rows) in zip(files, requests)])
        return [self.read_rows(n, rows) for n, rows in requests]

    def check_identity(self) -> None:
        """CheckpointError if any file was replaced or modified since it was located (the numbers
        and a hash taken now would describe different files)."""
        for path, ident in self._identity.items():
            if ident is not None and _identity(path) != ident:
                raise CheckpointError(path, "file was replaced or modified during the run; its numbers and "
                                            "hash would not match (rerun)")

    def file_digests(self) -> dict[str, str]:
        """sha256 of every file, streamed, keyed by the file's path relative to the checkpoint.
        The file hashed must be the one located (same device, inode, size, mtime) before and after.
        For a Hub checkpoint: the Hub's own LFS sha256, keyed by the path in the repo."""
        if self.hub is not None:
            return {f["name"]: f["sha256"] for f in self.hub["files"]}
        out = {}
        self.check_identity()
        for path in self.files:
            fd, st = open_regular(path)
            if _identity_of(st) != self._identity.get(path, _identity_of(st)):
                os.close(fd)
                raise CheckpointError(path, "file was replaced during the run; its hash would not describe "
                                            "the bytes measured (rerun)")
            try:
                h, buf, pos = hashlib.sha256(), bytearray(4 << 20), 0
                while pos < st.st_size:
                    mv = memoryview(buf)[:min(len(buf), st.st_size - pos)]
                    pread_into(fd, mv, pos, path)
                    h.update(mv)
                    pos += len(mv)
            finally:
                os.close(fd)
            out[_rel(path, self.root)] = h.hexdigest()
        self.check_identity()
        return out


def _identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return _identity_of(os.stat(path))
    except OSError:
        return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


# -- locating ------------------------------------------------------------------

def locate(path: str | os.PathLike, hub: object = None) -> Checkpoint:
    """Find and validate the checkpoint at ``path`` (headers only, plus the few bytes of a
    quantized checkpoint's shape and quant-state tensors). Raises CheckpointError.

    A path that does not exist but is spelled as a Hugging Face Hub repo id (``org/name``,
    ``org/name@revision``, ``hf://org/name@revision/subfolder``) is resolved on the Hub by
    weightdiff.io.hub (the ``hub`` extra); ``hub`` is its HubOptions (download or stream,
    offline). A local path always wins over a repo id of the same spelling.
    """
    if is_hub_candidate(path):
        from .hub import locate_hub

        ckpt = locate_hub(path, hub)
    else:
        ckpt = _locate(Path(os.fspath(path)), path)
    if ckpt.format in ("safetensors", "sharded"):
        try:
            _fold_quantized(ckpt)
        except BaseException:
            ckpt.close()
            raise
    return ckpt


def is_hub_candidate(path: object) -> bool:
    """True when ``path`` names nothing local and is spelled as a Hub repo id."""
    if not isinstance(path, str) or os.path.lexists(path):
        return False
    from .hub import hub_spelling

    return hub_spelling(path)


def _fold_quantized(ckpt: Checkpoint) -> None:
    """Fold quantized weights and their companions into logical tensors (weightdiff.io.quantized)."""
    try:
        qc, qc_error = read_quant_config(ckpt.root, ckpt.read_config), None
    except CheckpointError as exc:         # a broken config.json matters only to a quantized model
        qc, qc_error = None, exc
    tensors, sources, hidden = fold(ckpt.tensors, qc, ckpt._stored_read)
    if sources and qc_error is not None:
        raise qc_error
    if sources or hidden:
        ckpt.tensors, ckpt.quant, ckpt.hidden = tensors, sources, hidden
    ckpt.quant_config = qc if sources else None


def _locate(p: Path, path: str | os.PathLike) -> Checkpoint:
    try:
        st = p.stat()
    except OSError as exc:
        raise CheckpointError(p, os_problem(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        ckpt = _locate_dir(p)
    elif _sniff(p) == "gguf" or p.name.lower().endswith(".gguf"):
        ckpt = _gguf(p, p, p.parent)          # a .gguf without the magic is refused by name
    elif p.name.endswith(".bin.index.json"):
        ckpt = _pickle_sharded(p.parent, p)
    elif p.name.endswith(".index.json"):
        ckpt = _sharded(LocalFolder(p.parent, named=p.name), p.name, p)
    elif p.name.endswith(PICKLE_SUFFIXES):
        ckpt = _pickles(p, [p], p.parent)
    else:
        ckpt = _single(LocalFolder(p.parent, named=p.name), p.name, p)
    if isinstance(path, str):
        from .hub import hub_spelling

        if hub_spelling(path):
            ckpt.origin = (f"{escape_name(path)}: the local {'folder' if stat.S_ISDIR(st.st_mode) else 'file'}, "
                           "not the Hub repo of the same spelling (a local path always wins)")
    return ckpt


def _roots(d: Path) -> list[Path]:
    """Folders the files of checkpoint folder ``d`` may resolve into: ``d`` itself, and for a
    Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``) that repo's ``blobs/``."""
    real = Path(os.path.realpath(d))
    roots = [real]
    for a in (real, *real.parents):          # a subfolder of a snapshot shares the repo's blobs/ too
        if a.parent.name == "snapshots" and "--" in a.parent.parent.name:
            roots.append(Path(os.path.realpath(a.parent.parent / "blobs")))
            break
    return roots


def _inside(path: Path, d: Path) -> Path:
    """``path`` (a file of checkpoint folder ``d``) if it resolves inside ``d``; CheckpointError if a
    symlink (of the file or of a folder on its way) leads out. Broken links are left to the reader."""
    if not os.path.exists(path):
        return path
    real = Path(os.path.realpath(path))
    roots = _roots(d)
    if not any(real.is_relative_to(r) for r in roots):
        where = "the checkpoint folder" if len(roots) == 1 else "the checkpoint folder or its cache repo's blobs/"
        raise CheckpointError(path, f"resolves to {escape_name(str(real))}, outside {where} "
                                    f"{escape_name(str(d))}; refusing to follow the symlink",
                              "pass that file directly if it is the one you mean")
    return path


def _listdir(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError as exc:
        raise CheckpointError(d, f"cannot list: {os_problem(exc)}") from None


class LocalFolder:
    """A folder on disk as the locator reads it. Its twin for a Hub repo read over HTTP is
    weightdiff.io.hub's ``HubFolder``: the same verbs, so both go through the same rules.
    ``file()`` refuses a symlink that leads out of the folder, except for ``named``: the file
    the user named directly, whose folder is only where it lives."""

    def __init__(self, root: Path, named: str | None = None):
        self.root, self.named = root, named

    def names(self) -> list[str]:
        return _listdir(self.root)

    def file(self, name: str) -> Path:
        return self.root / name if name == self.named else _inside(self.root / name, self.root)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.root / name)

    def read_json(self, name: str, what: str) -> object:
        path = self.file(name)
        return load_json(read_small(path, JSON_CAP), path, what)

    def headers(self, names: Sequence[str]) -> dict[str, tuple[dict[str, TensorInfo], dict[str, str]]]:
        return {n: _header(self.file(n)) for n in names}


def choose_weights(names: Sequence[str], where: object) -> tuple[str, str | None]:
    """Which file of a folder listing holds the model: ``(kind, name)``.

    Kinds: ``adapter`` (name: the adapter's weights file, None when missing), ``sharded``
    (name: the safetensors index), ``single``, ``pickle_sharded`` (the .bin index),
    ``pickle`` and ``gguf``. The same rules serve a local folder and a Hub repo's file list
    (a new format adds its rule here). Raises CheckpointError naming ``where``.

    >>> choose_weights(["config.json", "model-00001-of-00002.safetensors",
    ...                 "model-00002-of-00002.safetensors", "model.safetensors.index.json"], "x")
    ('sharded', 'model.safetensors.index.json')
    """
    names = sorted(names)
    if "adapter_config.json" in names:
        return "adapter", next((n for n in ("adapter_model.safetensors", "adapter_model.bin") if n in names), None)
    lone = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if n in names]
    if lone:
        raise CheckpointError(where, f"{lone[0]} is here but adapter_config.json is missing, so the adapter's "
                                     "scale and targets are unknown", "add the adapter's adapter_config.json")
    st = [n for n in names if n.endswith(".safetensors")]
    st_index = [n for n in names if n.endswith(".safetensors.index.json")]
    if "model.safetensors.index.json" in st_index:
        st_index = ["model.safetensors.index.json"]
    if len(st_index) == 1:
        return "sharded", st_index[0]
    if len(st_index) > 1:
        raise CheckpointError(where, f"several index files and none named model.safetensors.index.json: "
                                     f"{', '.join(st_index)}", "pass the index file to use")
    if len(st) == 1:
        return "single", st[0]
    if len(st) > 1:
        raise CheckpointError(where, f"{len(st)} .safetensors files and no index, so which is the model is "
                                     f"ambiguous: {', '.join(escape_name(n) for n in st)}",
                              "pass one file, or add model.safetensors.index.json")
    pk_index = [n for n in names if n.endswith(".bin.index.json")]
    if len(pk_index) == 1:
        return "pickle_sharded", pk_index[0]
    pk = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in _NOT_WEIGHTS]
    if "pytorch_model.bin" in pk:
        pk = ["pytorch_model.bin"]
    if len(pk) == 1:
        return "pickle", pk[0]
    if len(pk) > 1:
        raise CheckpointError(where, f"{len(pk)} pickle files and no index, so which is the model is ambiguous: "
                                     f"{', '.join(escape_name(n) for n in pk)}", "pass one file")
    gg = [n for n in names if n.lower().endswith(".gguf")]
    if len(gg) == 1:
        return "gguf", gg[0]
    if len(gg) > 1:
        raise CheckpointError(where, f"{len(gg)} .gguf files, so which is the model is ambiguous: "
                                     f"{', '.join(escape_name(n) for n in gg)}", "pass one file")
    found = f"found {', '.join(escape_name(n) for n in names[:6])}" + (", ..." if len(names) > 6 else "") \
        if names else "the folder is empty"
    raise CheckpointError(where, f"no checkpoint here: expected model.safetensors, "
                                 f"model.safetensors.index.json or a .gguf file ({found})")


def build(folder, kind: str, name: str | None, shown: object) -> Checkpoint:
    """The Checkpoint of ``choose_weights``' answer, read through ``folder`` (headers only)."""
    if kind == "adapter":
        return _adapter(folder, name, shown)
    if kind == "sharded":
        return _sharded(folder, name, shown)
    if kind == "single":
        return _single(folder, name, shown)
    if kind == "pickle_sharded":
        return _pickle_sharded(folder.root, folder.file(name))
    if kind == "gguf":
        return _gguf(folder.root / name, shown, folder.root)
    return _pickles(shown, [folder.file(name)], folder.root)


def _locate_dir(d: Path) -> Checkpoint:
    names = _listdir(d)
    if "adapter_config.json" not in names and "snapshots" in names and (d / "snapshots").is_dir():
        return _locate_dir(_snapshot(d))
    kind, name = choose_weights(names, d)
    return build(LocalFolder(d), kind, name, d)


def _snapshot(d: Path) -> Path:
    """The revision folder of a Hugging Face cache repo: refs/main, else the only snapshot."""
    snaps = _listdir(d / "snapshots")
    ref = d / "refs" / "main"
    if ref.is_file():
        rev = read_small(ref, 4096).decode("utf-8", "replace").strip()
        if rev in snaps:
            return d / "snapshots" / rev
    if len(snaps) == 1:
        return d / "snapshots" / snaps[0]
    raise CheckpointError(d, f"Hugging Face cache folder with {len(snaps)} snapshots and no usable "
                             "refs/main", "pass snapshots/<revision>/")


#: magics of llama.cpp's pre-GGUF formats (GGML, GGMF, GGJT), as stored on disk
_LEGACY_GGML = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}


def _sniff(path: Path) -> str | None:
    """"gguf" when the file starts with the GGUF magic; legacy GGML files are refused here."""
    try:
        fd, st = open_regular(path)
    except CheckpointError:
        return None                      # the reader that follows reports the problem
    try:
        head = bytearray(min(4, st.st_size))
        pread_into(fd, memoryview(head), 0, path)
    finally:
        os.close(fd)
    if bytes(head) == b"GGUF":
        return "gguf"
    if bytes(head) in _LEGACY_GGML:
        raise CheckpointError(path, f"is a legacy llama.cpp {_LEGACY_GGML[bytes(head)]} file, which weightdiff "
                                    "does not read", "convert it to GGUF with llama.cpp first")
    return None


def _gguf(file: Path, shown: Path, root: Path) -> Checkpoint:
    from .gguf_read import GGUFFile

    with GGUFFile(file) as f:
        tensors, metadata = f.tensors, f.metadata
    ckpt = Checkpoint(shown, "gguf", [file], tensors, dict(metadata), root, opener=GGUFFile)
    ckpt._headers[file] = tensors
    return ckpt


def _header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return f.tensors, f.metadata


def _single(folder, name: str, shown: object) -> Checkpoint:
    file = folder.file(name)
    if not name.endswith(".safetensors") and name.endswith(".json"):
        raise CheckpointError(file, "is JSON, not a checkpoint", "pass the folder that holds it")
    tensors, metadata = folder.headers([name])[name]
    ckpt = Checkpoint(shown, "safetensors", [file], tensors, dict(metadata), folder.root)
    ckpt._headers[file] = tensors
    return ckpt


def _shard_name(index: Path, value: object, tensor: str) -> str:
    if not isinstance(value, str) or not value:
        raise CheckpointError(index, f"weight_map entry for `{escape_name(tensor)}` is not a file name")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value or "\0" in value or value.startswith("~"):
        raise CheckpointError(index, f"weight_map sends `{escape_name(tensor)}` to `{escape_name(value)}`, "
                                     "outside the checkpoint folder", "shard names must be plain relative names")
    return value


def _read_index(folder, name: str) -> tuple[dict[str, str], dict]:
    index = folder.file(name)
    doc = folder.read_json(name, "index")
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CheckpointError(index, "index has no weight_map object")
    wmap = {t: _shard_name(index, s, t) for t, s in doc["weight_map"].items()}
    if not wmap:
        raise CheckpointError(index, "index weight_map is empty")
    meta = doc.get("metadata") or {}
    return wmap, meta if isinstance(meta, dict) else {}


def _series(index: Path, shard_names: set[str], names: list[str], suffix: str) -> list[str]:
    """Files of the index's shard series (``prefix-0000k-of-0000n``) that the index does not list."""
    if not index.name.endswith(suffix + ".index.json"):
        return []
    prefix = index.name[: -len(suffix + ".index.json")]
    pat = re.compile(rf"^{re.escape(prefix)}-\d+-of-\d+{re.escape(suffix)}$")
    return [n for n in names if pat.match(n) and n not in shard_names]


def _sharded(folder, index_name: str, shown: object) -> Checkpoint:
    index = folder.file(index_name)
    wmap, meta = _read_index(folder, index_name)
    shards = list(dict.fromkeys(wmap.values()))
    names = folder.names()
    stray = _series(index, set(shards), names, ".safetensors")
    if stray:
        raise CheckpointError(index, f"shard {escape_name(stray[0])} is in the folder but not in the index "
                                     "(incomplete index or stray file?)")
    for shard in shards:
        if not folder.exists(shard):
            raise CheckpointError(index, f"shard {escape_name(shard)} is listed but missing (incomplete download?)")
    parsed = folder.headers(shards)
    tensors: dict[str, TensorInfo] = {}
    headers: dict[Path, dict[str, TensorInfo]] = {}
    metadata: dict = {}
    owner: dict[str, str] = {}
    unlisted: list[tuple[str, str]] = []
    for shard in shards:
        path = folder.file(shard)
        infos, md = parsed[shard]
        for k, v in md.items():
            metadata.setdefault(k, v)
        headers[path] = infos
        for name in infos:
            if name in owner:
                raise CheckpointError(path, f"tensor `{escape_name(name)}` is stored in both "
                                            f"{escape_name(owner[name])} and {escape_name(shard)}")
            owner[name] = shard
            if name not in wmap:
                unlisted.append((name, shard))
            elif wmap[name] != shard:
                raise CheckpointError(path, f"holds tensor `{escape_name(name)}` that the index places in "
                                            f"{escape_name(wmap[name])}")
    for name, shard in wmap.items():
        if owner.get(name) != shard:
            raise CheckpointError(folder.file(shard), f"tensor `{escape_name(name)}` is listed in the index for "
                                                      "this shard but the shard does not hold it")
        tensors[name] = headers[folder.file(shard)][name]
    notes = []
    for name, shard in unlisted:             # transformers loads by the index; still, measure it
        tensors[name] = headers[folder.file(shard)][name]
        notes.append(f"{escape_name(str(folder.file(shard)))}: holds tensor `{escape_name(name)}` that the index "
                     "does not list; it is compared as a tensor of its own")
    metadata.update({k: str(v) for k, v in meta.items()})
    listed = {folder.file(s) for s in shards}
    ignored = [folder.root / n for n in names if n.endswith(".safetensors") and folder.root / n not in listed] \
        if isinstance(folder, LocalFolder) else [folder.file(n) for n in names
                                                  if n.endswith(".safetensors") and folder.file(n) not in listed]
    ckpt = Checkpoint(shown, "sharded", [folder.file(s) for s in shards], tensors, metadata, folder.root,
                      ignored=ignored)
    ckpt._headers.update(headers)
    ckpt.notes += notes
    return ckpt


def _pickles(shown: Path, files: list[Path], root: Path) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = load_pickle(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f, f"tensor `{escape_name(name)}` is stored in both "
                                         f"{tensors[name].path.name} and {f.name}")
            tensors[name] = info
    return Checkpoint(shown, "pickle", files, tensors, {}, root)


def _pickle_sharded(d: Path, index: Path) -> Checkpoint:
    wmap, _ = _read_index(LocalFolder(d), index.name)
    shards = list(dict.fromkeys(wmap.values()))
    ckpt = _pickles(d, [_inside(d / s, d) for s in shards], d)
    for name, shard in wmap.items():
        if name not in ckpt.tensors or ckpt.tensors[name].path.name != PurePosixPath(shard).name:
            raise CheckpointError(d / shard, f"tensor `{escape_name(name)}` is listed in the index for "
                                             "this shard but the shard does not hold it")
    return ckpt


# -- PEFT adapters ---------------------------------------------------------------

def _adapter(folder, weights: str | None, shown: object) -> Checkpoint:
    config = parse_adapter_config(folder.read_json("adapter_config.json", "adapter config"),
                                  folder.file("adapter_config.json"))
    if weights == "adapter_model.safetensors":
        ckpt = _single(folder, weights, shown)
    elif weights == "adapter_model.bin":
        ckpt = _pickles(shown, [folder.file(weights)], folder.root)
    else:
        raise CheckpointError(shown, "adapter folder has adapter_config.json but no adapter_model.safetensors")
    out = Checkpoint(shown, "adapter", ckpt.files, ckpt.tensors, ckpt.metadata, folder.root, adapter=config)
    out.notes += ckpt.notes
    out._headers.update(ckpt._headers)
    return out
