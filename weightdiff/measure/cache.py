"""Resumable comparisons: ``--cache DIR`` keeps each tensor's record as soon as it is measured.

A record is stored under a key that hashes everything it depends on:

* the pair itself (``Pair.to_dict()``: names, kind, shapes, dtypes, LoRA factors);
* the identity of every stored tensor it reads, base and tuned: the file's resolved path,
  size and modification time (ns), and the tensor's byte range in it (a tensor without a
  byte range of its own, from a pickle or a quantized group, is keyed by its checkpoint's
  whole set of files);
* the options that change records (``CompareOptions.settings()``, which leaves out the
  thread count; thresholds included), and ``CACHE_VERSION``.

So a rerun of the same command reuses every record already written and measures the rest,
and any change of an input file or of an option misses the cache. Each record is one file
``DIR/records/<key[:2]>/<key>.json`` written to a temporary name in the same folder and
renamed into place (atomic on POSIX), so a run killed at any point leaves either a whole
record or none; a file that does not parse, or whose stored key differs, is ignored and
measured again. Floats keep their exact bits (JSON repr round-trips, NaN and infinities
included), so a resumed run writes the same JSON bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import WeightdiffError
from ..records import RankRecord, TensorRecord

__all__ = ["RecordCache", "CACHE_VERSION", "check_folder", "record_from_dict"]

#: bump when a change of the code changes records for the same inputs and options
CACHE_VERSION = 3           # 3: the near-grid test (quant.near_grid) and per-expert splits


class CacheError(WeightdiffError):
    """The cache folder cannot be used (not a folder, not writable)."""


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in the record cache")


def record_from_dict(d: dict) -> TensorRecord:
    """The inverse of ``TensorRecord.to_dict`` (lists stay lists, as in the JSON)."""
    d = dict(d)
    rank = d.pop("rank", None)
    cast = d.pop("cast", None)
    rec = TensorRecord(**d)
    if cast is not None:
        rec.cast = cast
    if rank is not None:
        rank = dict(rank)
        rank["shape_2d"] = tuple(rank["shape_2d"])
        rec.rank = RankRecord(**rank)
    return rec


def check_folder(folder: str | os.PathLike) -> Path:
    """``folder/records``, created; CacheError naming the folder when that fails or it is read-only."""
    root = Path(folder) / "records"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"--cache {folder}: cannot create a folder there ({exc.strerror or exc})") from None
    if not os.access(root, os.W_OK):
        raise CacheError(f"--cache {folder}: the folder is not writable")
    return root


class RecordCache:
    """Records of one comparison's pairs on disk (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, options_settings: dict):
        self.root = check_folder(folder)
        self.options = json.dumps(options_settings, sort_keys=True, default=_plain)
        self._files: dict[tuple[int, str], list] = {}
        self.hits = self.misses = 0

    # -- keys ---------------------------------------------------------------------------
    def _file_id(self, path: Path) -> list:
        st = os.stat(path)
        return [os.fspath(Path(path).resolve()), st.st_size, st.st_mtime_ns]

    def _tensor_id(self, ck: Any, name: str | None) -> list | None:
        if name is None:
            return None
        info = ck.tensors.get(name) if hasattr(ck, "tensors") else None
        if info is not None and getattr(info, "start", None) is not None and getattr(info, "path", None):
            return [*self._file_id(info.path), info.start, info.end]
        key = (id(ck), "all")
        if key not in self._files:    # no byte range of its own: the checkpoint's whole set of files
            self._files[key] = [self._file_id(p) for p in getattr(ck, "files", [])]
        return [name, self._files[key]]

    def key(self, pair: Any, bases: Sequence[Any], tuned: Any) -> str:
        base = bases[pair.base_index] if pair.base_name is not None else None
        names = [getattr(pair, "tuned_source", None) or pair.tuned_name]
        lora = getattr(pair, "lora", None)
        if lora is not None:
            names += [getattr(lora, k, None) for k in ("a_name", "b_name", "magnitude_name")]
        material = {
            "v": CACHE_VERSION,
            "pair": pair.to_dict(),
            "base": self._tensor_id(base, pair.base_name) if base is not None else None,
            "tuned": [self._tensor_id(tuned, n) for n in names if n is not None],
            "options": self.options,
        }
        blob = json.dumps(material, sort_keys=True, default=_plain).encode()
        return hashlib.sha256(blob).hexdigest()

    # -- records --------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TensorRecord | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            if data.get("key") != key or data.get("v") != CACHE_VERSION:
                raise ValueError("stale")
            rec = record_from_dict(data["record"])
        except (OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return rec

    def put(self, key: str, rec: TensorRecord) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        blob = json.dumps({"v": CACHE_VERSION, "key": key, "record": rec.to_dict()}, default=_plain,
                          allow_nan=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
