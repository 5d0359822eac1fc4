"""Resumable comparisons: ``--cache DIR`` keeps each tensor's record as soon as it is measured.

A record is stored under a key that hashes everything it depends on:

* the pair itself (``Pair.to_dict()``: names, kind, shapes, dtypes, LoRA factors);
* the identity of every stored tensor it reads, base and tuned, and the tensor's byte range
  in its file (a tensor without a byte range of its own, from a pickle or a quantized group,
  is keyed by its checkpoint's whole set of files). A file's identity is its sha256 when the
  run hashes its inputs anyway (``--hash``: the checkpoint's ``digests``, taken before
  measuring), else what ``stat`` says without reading a byte: the resolved path, the inode
  number, the size, the modification time and the status-change time (ctime, ns). ``touch``,
  ``cp -p``, ``rsync -t`` and ``tar x`` can restore an mtime but not a ctime, and a file moved
  or copied into the path has another inode, so a rewritten or swapped file misses. What the
  stat identity cannot see: a file whose bytes changed with no write through the filesystem
  (a disk image edited offline, a filesystem without ctime), or a ctime forged by changing
  the system clock. The device number is left out: machines mounting one shared filesystem
  number it differently, and workers of a cluster must find each other's records;
* the options that change records (``CompareOptions.settings()``, which leaves out the
  thread count; thresholds included), and ``CACHE_VERSION``.

So a rerun of the same command reuses every record already written and measures the rest,
and any change of an input file or of an option misses the cache. Each record is one file
``DIR/records/<key[:2]>/<key>.json`` written to a temporary name in the same folder and
renamed into place (atomic on POSIX), so a run killed at any point leaves either a whole
record or none; a file that does not parse, is not a record of the expected shape and
types, or whose stored key differs, is ignored, measured again and overwritten. Floats keep their exact bits (JSON repr round-trips, NaN and infinities
included), so a resumed run writes the same JSON bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from ..errors import WeightdiffError
from ..records import RankRecord, TensorRecord

__all__ = ["RecordCache", "CACHE_VERSION", "check_folder", "record_from_dict"]

#: bump when a change of the code changes records for the same inputs and options
CACHE_VERSION = 4           # 4: inode and ctime (or the sha256) in a file's identity


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


def _fits(value: Any, kind: Any) -> bool:
    """Whether a value read back from JSON has the type a record field declares (an int where a
    float is declared too: JSON writes 0.0 as 0 from other writers; NaN and infinities are floats).

    >>> _fits(1.5, float), _fits("NaN", float), _fits([2, 3], list[int]), _fits(None, int | None)
    (True, False, True, True)
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (str, bool):
        return isinstance(value, kind)
    if origin in (list, tuple) or kind in (list, tuple):
        inner = args[0] if args and (origin is list or len(args) == 2 and args[1] is Ellipsis or
                                     len(set(args)) == 1) else Any
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return isinstance(value, dict)
    return True


def _check_fields(d: Any, cls: type) -> None:
    """TypeError unless ``d`` is a dict whose every key is a field of ``cls`` of the declared type."""
    if not isinstance(d, dict):
        raise TypeError(f"not a {cls.__name__}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if name == "cast" and cls is TensorRecord:
            if value is not None and not isinstance(value, dict):
                raise TypeError("cast")
            continue
        if name not in hints or not _fits(value, hints[name]):
            raise TypeError(f"field {name}")


def record_from_dict(d: dict) -> TensorRecord:
    """The inverse of ``TensorRecord.to_dict`` (lists stay lists, as in the JSON). TypeError when
    ``d`` is not such a dict: a field of another type, an unknown field, not a dict at all."""
    _check_fields(d, TensorRecord)
    if d.get("rank") is not None:
        _check_fields(d["rank"], RankRecord)
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
    """``folder/records``, checked that it can be created and written, but not created: the first record
    written creates it, so a run refused before it measured anything (bad input) leaves no cache folder
    behind. CacheError naming the folder when it cannot be (a file on the way, a read-only folder)."""
    root = Path(folder) / "records"
    probe = root
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        raise CacheError(f"--cache {folder}: cannot create a folder there ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"--cache {folder}: the folder is not writable")
    return root


#: the largest record file read back (a record is a few KB; its spectrum at most 64 values)
RECORD_CAP = 16 << 20


class RecordCache:
    """Records of one comparison's pairs on disk (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, options_settings: dict):
        self.root = check_folder(folder)
        self.options = json.dumps(options_settings, sort_keys=True, default=_plain)
        self._files: dict[tuple[int, str], list] = {}
        self.hits = self.misses = 0
        self.unwritten = 0                # records a write failed for (a full disk): the run goes on without them
        self.write_error: str | None = None

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def _file_id(path: Path, ck: Any = None) -> list:
        """``["hub", repo, commit, file, sha256, size]`` for a streamed Hub file; ``["sha256", digest]`` when
        the checkpoint's files were hashed before measuring, else ``[resolved path, inode, size, mtime ns,
        ctime ns]`` (see the module doc)."""
        commit = getattr(path, "commit", None)
        if commit is not None:
            # a streamed Hub file (io.hub_stream.HubFile): its commit fixes its bytes, and it has no local path
            # to stat (os.stat of its hf:// name failed, or found an unrelated local file of that spelling)
            return ["hub", path.repo_id, commit, path.path, path.sha256, path.size]
        digest = (getattr(ck, "digests", None) or {}).get(os.path.realpath(path))
        if digest is not None:
            return ["sha256", digest]
        st = os.stat(path)
        return [os.fspath(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _tensor_id(self, ck: Any, name: str | None) -> list | None:
        if name is None:
            return None
        info = ck.tensors.get(name) if hasattr(ck, "tensors") else None
        if info is not None and getattr(info, "start", None) is not None and getattr(info, "path", None):
            order = (getattr(ck, "row_order", None) or {}).get(name)
            # rows handed out in another order than stored (a consolidated checkpoint's Q/K): the head size
            # decides the values read, so it is part of what they are
            return [*self._file_id(info.path, ck), info.start, info.end, *(["rows", order] if order else [])]
        key = (id(ck), "all")
        if key not in self._files:    # no byte range of its own: the checkpoint's whole set of files
            self._files[key] = [self._file_id(p, ck) for p in getattr(ck, "files", [])]
        order = (getattr(ck, "row_order", None) or {}).get(name)
        return [name, self._files[key], *(["rows", order] if order else [])]

    def key(self, pair: Any, bases: Sequence[Any], tuned: Any) -> str:
        base = bases[pair.base_index] if pair.base_name is not None else None
        names = [getattr(pair, "tuned_source", None) or pair.tuned_name]
        lora = getattr(pair, "lora", None)
        if lora is not None:
            names += [getattr(lora, k, None) for k in ("a_name", "b_name", "magnitude_name", "base_layer_name")]
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
        from ..errors import WeightdiffError
        from ..io.files import read_small

        try:        # a regular file under RECORD_CAP (a FIFO hung, /dev/zero filled the memory), any nesting
            data = json.loads(read_small(self._path(key), RECORD_CAP).decode("utf-8"))
            if not isinstance(data, dict) or data.get("key") != key or data.get("v") != CACHE_VERSION:
                raise ValueError("stale")
            rec = record_from_dict(data["record"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, WeightdiffError):
            self.misses += 1
            return None
        self.hits += 1
        return rec

    def put(self, key: str, rec: TensorRecord) -> None:
        """Store one record; a write that fails (a full disk, a folder gone read-only) leaves no temporary
        behind and stops the writes of this run: the results do not depend on the cache, so the run goes
        on, and ``warn_unwritten`` says so once at the end."""
        if self.write_error is not None:
            self.unwritten += 1
            return
        path = self._path(key)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = json.dumps({"v": CACHE_VERSION, "key": key, "record": rec.to_dict()}, default=_plain,
                              allow_nan=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
            self.unwritten += 1
            try:
                tmp.unlink()
            except OSError:
                pass

    def warn_unwritten(self) -> None:
        """One line on stderr when some records could not be written."""
        if self.unwritten:
            import sys

            sys.stderr.write(f"warning: --cache {self.root}: {self.unwritten} record"
                             f"{'s' if self.unwritten != 1 else ''} not written ({self.write_error}); the results "
                             "are complete, and a rerun measures those tensors again\n")
