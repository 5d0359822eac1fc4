"""A located checkpoint: its files, tensors, adapter factors and quantized sources, and the
reads (windows, whole tensors, rows, noise floors) the measure stage makes of it. The
locator that builds one from a path is ``io.checkpoint.locate``.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, escape_name
from .files import open_regular, sha256_fd
from .peft_adapter import AdapterConfig, IA3Vector, LoraFactor, ia3_vectors, lora_factors
from .meta_layout import interleaved_rows
from .pickle_read import load_pickle
from .quant_sources import Source
from .safetensors_read import Header, SafetensorsFile, TensorInfo, array_windows, check_range, storage_of

__all__ = ["Checkpoint", "weight_files"]

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
        self._hashed: dict | None = None    # hash_files() once done (a file is hashed once per run)
        #: sha256 of each file by its real path, when the run hashed the files before measuring them:
        #: the record cache keys by it (weightdiff.measure.cache)
        self.digests: dict[str, str] | None = None
        lora = adapter is not None and adapter.peft_type in ("LORA", "ADALORA", "LOHA", "LOKR", "VERA", "OFT",
                                                                  "BOFT", "HRA", "VBLORA", "FOURIERFT", "DELORA",
                                                                  "TRAINABLE_TOKENS")
        self.lora: list[LoraFactor] = lora_factors(tensors, files[0], adapter) if lora else []
        #: an IA3 adapter's vectors (weightdiff.io.peft_adapter.ia3_vectors)
        ln = adapter is not None and adapter.peft_type == "LN_TUNING"
        if ln:                  # trained copies of whole layers, compared as the base's tensors they replace
            from .peft_ln import check_ln_tensors

            check_ln_tensors(tensors, files[0])
        self.ia3: list[IA3Vector] = (ia3_vectors(tensors, files[0], adapter) if adapter is not None and not lora
                                     and not ln else [])
        self._open: OrderedDict[Path, SafetensorsFile] = OrderedDict()
        self._pins: dict[Path, int] = {}
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._pickle: tuple[Path, Mapping[str, np.ndarray]] | None = None
        #: a pickle's fused expert tensor split into the experts' own (weightdiff.io.experts): name -> (fused, e)
        self._expert_of: dict[str, tuple[str, int]] = {}
        #: quantized checkpoints: the stored tensors, the logical tensors' sources, and the
        #: activation/KV-cache scales folded away (weightdiff.io.quantized)
        self.stored: dict[str, TensorInfo] = tensors
        self.quant: dict[str, Source] = {}
        self.quant_config: dict | None = None
        self.hidden: list[str] = []
        #: values an exporter computed and stored beside the weights (an ONNX model's folded masks, rotary
        #: tables, position rows): [{name, shape, dtype, params}], readable by ``read_stored``, not compared
        self.folded: list[dict] = []
        #: the layout an ONNX graph fixes for a 2-D float weight: "in_out" (the B input of MatMul, of Gemm
        #: without transB), "out_in" (Gemm with transB=1); absent where no operator says (name -> layout)
        self.layouts: dict[str, str] = {}
        #: identity of a Hub checkpoint (weightdiff.io.hub): repo id, commit, files with sizes and sha256
        self.hub: dict | None = None
        #: a line for the plan saying where a checkpoint came from, when its spelling could be a Hub id
        self.origin: str | None = None
        #: how a Hub checkpoint's bytes were read ({"mode": stream|download|cache, "reader": ...})
        self.hub_run: dict | None = None
        #: reads a small JSON file beside the weights (config.json) for a checkpoint not on disk
        self.read_config = None
        self._closers: list = []
        #: tensors whose name inside their file differs from the name reported (a
        #: sentence-transformers module's tensors carry its folder as a prefix): reported -> stored
        self.file_names: dict[str, str] = {}
        #: the folder whose config.json describes the model (None: ``root``); a
        #: sentence-transformers folder's backbone module may sit in a subfolder
        self.config_dir: Path | None = None
        #: sentence-transformers modules (modules.json): [{path, type, prefix, files, tensors}]
        self.modules: list[dict] | None = None
        #: tensors stored with each head's rows in rotary (interleaved) order, handed out in Hugging Face's
        #: order: name -> head size (a Meta/Mistral consolidated checkpoint, weightdiff.io.meta_layout)
        self.row_order: dict[str, int] = {}
        #: a GGUF model's Q/K tensors and the head count their rows were un-permuted by (weightdiff.io.gguf_read)
        self.rope_heads: dict[str, int] = {}
        #: a llama.cpp GGUF LoRA adapter's header (weightdiff.io.gguf_adapter.GGUFLora), None otherwise
        self.gguf_lora = None

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def streamed(self) -> bool:
        """Whether its bytes are read from the Hub by HTTP range requests (each run of rows one request): what reads
        rows in another order holds a table whole instead."""
        return (self.hub_run or {}).get("mode") == "stream"

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
        want = self._headers.get(path)
        f = self._opener(path, known=want) if isinstance(want, Header) else self._opener(path)
        if want is not None and f.tensors is not want and f.tensors != want:
            f.close()
            raise CheckpointError(path, "file changed since the checkpoint was located (rerun)")
        self._headers[path] = f.tensors
        self._open[path] = f
        return f

    def _array(self, info: TensorInfo) -> np.ndarray:
        if self._pickle is None or self._pickle[0] != info.path:
            self._pickle = None                   # one pickle shard mapped at a time
            self._pickle = (info.path, load_pickle(info.path)[1])
        cut = self._expert_of.get(info.name)
        if cut is not None:               # expert e of a fused tensor: its run of the flat array
            per = info.numel
            return self._pickle[1][cut[0]][cut[1] * per:(cut[1] + 1) * per]
        return self._pickle[1][self._fname(info.name)]

    def _fname(self, name: str) -> str:
        """The name of tensor ``name`` inside its file."""
        return self.file_names.get(name, name) if self.file_names else name

    def read_stored(self, name: str) -> np.ndarray:
        """A stored tensor read whole by its name in the file (one ``tensors`` does not list: a folded
        constant of an ONNX model)."""
        return self._file(self.stored[name].path).read(name)

    def _stored_read(self, name: str) -> np.ndarray:
        return self._file(self.stored[name].path).read(self._fname(name))

    def _stored_rows(self, name: str, rows, cols: tuple[int, int] | None = None) -> np.ndarray:
        """Rows of a stored tensor; ``cols`` (c0, c1): only those columns of a 2-D one (``Source._band``), read as
        such by a reader that can (a local safetensors file), else sliced from whole rows."""
        f, rows = self._file(self.stored[name].path), np.asarray(rows, dtype=np.int64)
        if cols is None:
            return f.read_rows(self._fname(name), rows)
        if type(f).read_rows is SafetensorsFile.read_rows:
            return f.read_rows(self._fname(name), rows, cols)
        return f.read_rows(self._fname(name), rows)[:, cols[0]:cols[1]]

    def _quant_windows(self, name: str, max_elements: int | None, start: int, stop: int | None,
                       floor: bool) -> Iterator[np.ndarray]:
        info = self._info(name)
        start, stop, step = check_range(info, max_elements, start, stop, 4)
        return self.quant[name].windows(self._stored_read, self._stored_rows, start, stop, step, floor)

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0,
                      stop: int | None = None, noise: bool = False) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows``: per element, the largest error a faithful
        round-to-nearest quantization with this tensor's own scales leaves; None for a tensor
        that was not quantized (or whose reader gives no floor). ``noise``: the half-width of the
        error's model instead of its bound where the two differ (GGUF K-quants: half a step also
        at the end codes, whose bound allows the encoder's search several steps there)."""
        info = self._info(name)
        if name in self.quant:
            # a lossless decoding (a sparse bitmask) is a plain tensor: no floor; nor are scales tuned after the
            # rounding (``has_floor``: mlx-lm's DWQ)
            src = self.quant[name]
            if info.quant is None or not src.floored(self._stored_read):
                return None
            return self._quant_windows(name, max_elements, start, stop, True)
        if info.quant is not None and info.start is not None:   # a reader that dequantizes itself
            f = self._file(info.path)
            it = f.floor_windows(self._fname(name), max_elements, start, stop, noise) if hasattr(f, "floor_windows") else None
            return None if it is None else self._pinned(info.path, it)
        return None

    def end_windows(self, name: str, max_elements: int | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows`` marking each element's code as the top (1) or bottom (-1)
        of its range, between (0), or unknown (2), for a reader that has them (GGUF K-quants:
        ``GGUFFile.end_windows``); None otherwise."""
        info = self._info(name)
        if name in self.quant or info.quant is None or info.start is None:
            return None
        f = self._file(info.path)
        it = f.end_windows(self._fname(name), max_elements, start, stop) if hasattr(f, "end_windows") else None
        return None if it is None else self._pinned(info.path, it)

    def claim_windows(self, name: str, which: int, max_elements: int | None = None, start: int = 0,
                      stop: int | None = None) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows`` of what each element's stored block scales say of the
        weights they quantized (GGUF: ``GGUFFile.claim_windows``); None for a reader without them."""
        info = self._info(name)
        if name in self.quant or info.quant is None or info.start is None:
            return None
        f = self._file(info.path)
        it = f.claim_windows(self._fname(name), which, max_elements, start, stop) \
            if hasattr(f, "claim_windows") else None
        return None if it is None else self._pinned(info.path, it)

    def claim_order(self, name: str) -> str:
        """How the blocks of ``claim_windows`` run: ``"rows"`` (runs of the flat order) or ``"cols"`` (down the
        columns of a tensor its reader hands out transposed: ``GGUFFile.claim_order``)."""
        info = self._info(name)
        if name in self.quant or info.start is None:
            return "rows"
        f = self._file(info.path)
        return f.claim_order(self._fname(name)) if hasattr(f, "claim_order") else "rows"

    def windows(self, name: str, max_elements: int | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[np.ndarray]:
        """As ``SafetensorsFile.windows``, opening the right shard lazily; quantized tensors
        come out dequantized to float32."""
        if name in self.quant:
            return self._quant_windows(name, max_elements, start, stop, False)
        info = self._info(name)
        if name in self.row_order:
            start, stop, step = check_range(info, max_elements, start, stop, storage_of(info.dtype).itemsize)
            return self._reordered_windows(info, start, stop, step)
        if info.start is None:
            start, stop, step = check_range(info, max_elements, start, stop, storage_of(info.dtype).itemsize)
            return array_windows(self._array(info), start, stop, step)
        f = self._file(info.path)
        return self._pinned(info.path, f.windows(self._fname(name), max_elements, start, stop))

    def _reordered_windows(self, info: TensorInfo, start: int, stop: int, step: int) -> Iterator[np.ndarray]:
        """``windows`` of a tensor in ``row_order``: each window's rows read as the run of stored rows
        that holds them (whole heads at most, one read) and put in Hugging Face's order."""
        cols = math.prod(info.shape[1:])
        hd = self.row_order[info.name]
        for pos in range(start, stop, step):
            end = min(pos + step, stop)
            ra, rb = pos // cols, -(-end // cols)
            g = interleaved_rows(np.arange(ra, rb, dtype=np.int64), hd)
            lo, hi = int(g.min()), int(g.max()) + 1
            run = self._plain_rows(info.name, np.arange(lo, hi, dtype=np.int64))
            vals = run.reshape(hi - lo, cols)[g - lo].reshape(-1)[pos - ra * cols:end - ra * cols]
            vals.flags.writeable = False
            yield vals

    def _pinned(self, path: Path, it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        self._pins[path] = self._pins.get(path, 0) + 1
        try:
            yield from it
        finally:
            self._pins[path] -= 1

    def offset_storage(self, name: str) -> str | None:
        """The float dtype ``name`` is stored in as ``1 + w`` by its reader (GGUF Gemma norms), or None."""
        if self._opener is SafetensorsFile and not hasattr(SafetensorsFile, "offset_storage"):
            return None                 # (asked of every changed vector: no file to look up)
        info = self.tensors.get(name)
        if info is None or info.start is None or name in self.quant:
            return None
        f = self._file(info.path)
        return f.offset_storage(name) if hasattr(f, "offset_storage") else None

    def plain_span(self, name: str) -> tuple[Path, int, int] | None:
        """(file, first byte, end byte) of a tensor stored as plain safetensors bytes in a local
        file or a streamed Hub file (not quantized, not packed); None for any other."""
        info = self.tensors.get(name)
        if (info is None or info.start is None or info.quant is not None or name in self.quant
                or info.packed or name in self.row_order):
            return None
        if self._opener is not SafetensorsFile and not getattr(getattr(self._opener, "__self__", None),
                                                                "plain_spans", False):
            return None
        return info.path, info.start, info.end

    def read_span(self, path: Path, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) of one of this checkpoint's safetensors files (local, or streamed: one range
        request), in one read."""
        return self._file(path).read_span(start, end)

    def read(self, name: str) -> np.ndarray:
        info = self._info(name)
        if name in self.quant:
            src = self.quant[name]
            try:
                return src.rows(self._stored_read, self._stored_rows, 0, src.nrows)[0].reshape(info.shape)
            finally:
                src.release()
        if name in self.row_order:
            return self.read_rows(name, np.arange(info.shape[0], dtype=np.int64))
        if info.start is None:
            out = self._array(info).copy()
            return out if info.packed else out.reshape(info.shape)
        return self._file(info.path).read(self._fname(name))

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        info = self._info(name)
        if name in self.quant:
            src = self.quant[name]
            idx = np.asarray(rows, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= info.shape[0]):
                raise IndexError(f"row index out of range for `{escape_name(name)}` with {info.shape[0]} rows")
            per = math.prod(info.shape[1:]) // src.rowlen if len(info.shape) > 1 else 1
            parts, i = [], 0
            try:
                while i < idx.size:          # one call per run of consecutive rows (a block of a fit)
                    j = i + 1
                    while j < idx.size and idx[j] == idx[j - 1] + 1:
                        j += 1
                    got = src.rows(self._stored_read, self._stored_rows, int(idx[i]) * per, int(idx[j - 1] + 1) * per)[0]
                    parts.append(np.asarray(got).reshape(j - i, -1))
                    i = j
            finally:
                src.release()
            return np.concatenate(parts).reshape((idx.size, *info.shape[1:])) if parts else \
                np.zeros((0, *info.shape[1:]), np.float32)
        if name in self.row_order:
            idx = np.asarray(rows, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= info.shape[0]):
                raise IndexError(f"row index out of range for `{escape_name(name)}` with {info.shape[0]} rows")
            return self._plain_rows(name, interleaved_rows(idx, self.row_order[name]))
        return self._plain_rows(name, rows)

    def _plain_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored rows of ``name`` (no reordering), from a pickle or a file."""
        info = self._info(name)
        if info.start is None:
            if not info.shape:
                raise ValueError(f"read_rows needs a >=1-D tensor; `{escape_name(name)}` is 0-d")
            return self._array(info).reshape(info.shape)[np.asarray(rows, dtype=np.int64)].copy()
        return self._file(info.path).read_rows(self._fname(name), rows)

    def read_rows_many(self, requests: Sequence[tuple[str, Sequence[int] | np.ndarray]]) -> list[np.ndarray]:
        """``read_rows`` for several tensors at once (a streamed Hub checkpoint fetches them concurrently)."""
        if requests and all(n not in self.quant and self._info(n).start is not None for n, _ in requests):
            files = [self._file(self._info(n).path) for n, _ in requests]
            many = getattr(files[0], "read_rows_many", None)
            if many is not None and all(type(f) is type(files[0]) for f in files):
                for n, rows in requests:       # the same range check as read_rows, before any read
                    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
                    if n in self.row_order and idx.size and (idx.min() < 0 or idx.max() >= self._info(n).shape[0]):
                        raise IndexError(f"row index out of range for `{escape_name(n)}`")
                stored = [(n, interleaved_rows(np.asarray(rows, dtype=np.int64).reshape(-1), self.row_order[n])
                           if n in self.row_order else rows) for n, rows in requests]
                return many([(f, self._fname(n), rows) for f, (n, rows) in zip(files, stored)])
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
        return {_rel(path, self.root): digest for path, digest in self.hash_files().items()}

    def hash_files(self) -> dict:
        """sha256 of every local file (``self.files``, the bytes on disk), keyed by the file as
        ``self.files`` holds it; the identity checks of file_digests. Hashed once: a second call
        checks that no file changed since and returns the same digests."""
        if self._hashed is not None:
            self.check_identity()
            return dict(self._hashed)
        out = {}
        self.check_identity()
        for path in self.files:
            fd, st = open_regular(path)
            if _identity_of(st) != self._identity.get(path, _identity_of(st)):
                os.close(fd)
                raise CheckpointError(path, "file was replaced during the run; its hash would not describe "
                                            "the bytes measured (rerun)")
            try:
                out[path] = sha256_fd(fd, st.st_size, path)
            finally:
                os.close(fd)
        self.check_identity()
        self._hashed = dict(out)
        return out


def weight_files(ckpt: "Checkpoint") -> tuple:
    """What names one checkpoint whatever the spelling: the sorted real paths of the files it reads
    (``B``, ``B/`` and ``B/model.safetensors`` alike), or, for a Hub checkpoint streamed (its files not
    on disk), its repo, commit and file names. Two checkpoints with equal keys read the same bytes.

    >>> weight_files(Checkpoint(Path("B"), "safetensors", [], {}, {}, Path("B")))
    ('files', ())
    """
    if ckpt.hub is not None and not all(os.path.exists(f) for f in ckpt.files):
        return ("hub", ckpt.hub.get("repo_id"), ckpt.hub.get("commit"), ckpt.hub.get("subfolder"),
                tuple(sorted(str(f.get("name")) for f in ckpt.hub.get("files") or ())))
    return ("files", tuple(sorted(os.path.realpath(f) for f in ckpt.files)))


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
