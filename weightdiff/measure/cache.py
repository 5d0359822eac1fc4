"""Resumable comparisons: ``--cache DIR`` keeps each tensor's record as soon as it is measured.

A record is stored under a key that hashes everything it depends on:

* the pair itself (``Pair.to_dict()``: names, kind, shapes, dtypes, LoRA factors);
* the identity of every stored tensor it reads, base and tuned, and the tensor's byte range
  in its file (a tensor without a byte range of its own, from a pickle or a quantized group,
  is keyed by its checkpoint's whole set of files). A file's identity is what ``stat`` says
  without reading a byte: the resolved path, the inode number, the size, the modification
  time and the status-change time (ctime, ns). ``touch``, ``cp -p``, ``rsync -t`` and ``tar x``
  can restore an mtime but not a ctime, and a file moved or copied into the path has another
  inode, so a rewritten or swapped file misses. What the stat identity cannot see: a file
  whose bytes changed with no write through the filesystem (a disk image edited offline, a
  filesystem without ctime), or a ctime forged by changing the system clock. The device
  number is left out: machines mounting one shared filesystem number it differently, and
  workers of a cluster must find each other's records;
* the identity of the files beside the weights that decide how their bytes are read
  (``READ_SIDECARS``: config.json's ``quantization_config``, adapter_config.json's
  ``fan_in_fan_out``, params.json's heads), in the checkpoint's folder and every folder its
  weights are read from, by the same stat identity (their sha256 when the run hashes);
* the options that change records (``CompareOptions.settings()``, which leaves out the
  thread count; thresholds included), and ``CACHE_VERSION``.

The key does not depend on the outputs asked for: ``--hash`` (which ``--memo`` turns on) does not
change it, so adding ``--memo`` or ``--report`` to a cached command finds its records. When the run
hashes its inputs anyway (``--hash``: the checkpoint's ``digests``, taken before measuring), the
key of the same material with each file's sha256 for its identity (the *content key*) is used
beside it: a record is also written under the content key, and both carry it (``content``), so

* a record found under the stat key but written for other bytes (its ``content`` differs from
  the files' as hashed now: changed without a trace in ``stat``) is a miss, as before;
* a record found under the content key (a copy of the same bytes at another path, inode or
  time) is a hit, and is stored under the stat key too.

A record written without ``--hash`` carries no ``content`` and is trusted on its stat identity
alone, as a run without ``--hash`` trusts it. The hash itself is not taken from the cache: with
``--hash`` every input file is read once more to hash it (the memo states the sha256 of the
bytes on disk now); ``--no-hash`` or ``weightdiff report`` re-render without reading them.

So a rerun of the same command reuses every record already written and measures the rest,
and any change of an input file or of an option misses the cache. Each record is one file
``DIR/records/<key[:2]>/<key>.json`` written to a temporary name in the same folder
(``.<key>.<host>.<pid>.tmp``) and renamed into place (atomic on POSIX), so a run killed at any
point leaves either a whole record or none; an exception while writing (Ctrl-C, SIGTERM) removes
the temporary, and the temporaries a SIGKILL leaves are swept when a cache is opened (those of
this host whose process is gone, and any a day old); a file that does not parse, is not a record of the expected shape and
types, or whose stored key differs, is ignored, measured again and overwritten. Floats keep their exact bits (JSON repr round-trips, NaN and infinities
included), so a resumed run writes the same JSON bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import time
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from ..errors import WeightdiffError
from ..fsutil import pid_alive
from ..records import RankRecord, TensorRecord

__all__ = ["RecordCache", "CACHE_VERSION", "check_folder", "record_from_dict"]

#: bump when a change of the code changes records for the same inputs and options
CACHE_VERSION = 6           # 4: inode and ctime (or the sha256) in a file's identity; 5: the JSON sidecars;
#                             6: recipe.yaml among them, compressed-tensors int weights' floor test changed


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


def _check_values(d: dict) -> None:
    """TypeError unless the record's values are ones a measurement produces: a known status, norms and
    counts not negative, shares within [0, 1], and an ``unchanged`` record with no difference. A record
    edited by hand (``changed`` rewritten as ``unchanged`` made a fine-tune read IDENTICAL) or corrupted into
    other valid JSON (norms of 1e308 overflowed the roll-up: exit 1) is measured again, as a torn one is."""
    from ..records import STATUSES

    if d.get("status") not in STATUSES:
        raise TypeError("status")
    for name in ("norm_base", "norm_tuned", "norm_delta", "max_abs_delta"):
        v = d.get(name)
        # past 1e150 a square in the roll-up overflows; no weights a model holds come near
        if v is not None and (not (v >= 0 or math.isnan(v)) or v > 1e150):
            raise TypeError(name)
    for name in ("frac_changed", "frac_beyond_rounding"):
        v = d.get(name)
        if v is not None and not (0.0 <= v <= 1.0 or math.isnan(v)):
            raise TypeError(name)
    for name in ("numel", "numel_compared", "nonfinite", "sign_flips"):
        v = d.get(name)
        if v is not None and v < 0:
            raise TypeError(name)
    if (d.get("numel_compared") or 0) > (d.get("numel") or 0) and d.get("status") != "resized":
        raise TypeError("numel_compared")
    if d.get("status") == "unchanged" and ((d.get("norm_delta") or 0) != 0 or (d.get("frac_changed") or 0) != 0
                                           or (d.get("frac_beyond_rounding") or 0) != 0
                                           or d.get("norm_base") != d.get("norm_tuned")):
        raise TypeError("unchanged with a difference")       # equal values have bitwise equal norms


def record_from_dict(d: dict) -> TensorRecord:
    """The inverse of ``TensorRecord.to_dict`` (lists stay lists, as in the JSON). TypeError when
    ``d`` is not such a dict: a field of another type, an unknown field, not a dict at all, or values no
    measurement gives (``_check_values``)."""
    _check_fields(d, TensorRecord)
    _check_values(d)
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


#: this host in a record temporary's name (``.KEY.HOST.PID.tmp``): a sweep removes only its own host's
#: temporaries of dead processes (workers of a cluster share a cache folder; their pids are not ours)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: a record temporary (``HOST.`` absent in those of weightdiff before 0.1.0's sweep)
_TMP = re.compile(r"^\.[0-9a-f]{64}\.(?:([0-9a-f]{8})\.)?(\d+)\.tmp$")
#: a temporary older than this is removed whoever wrote it
STALE_SECONDS = 86400

#: the files beside the weights that decide how their bytes are read (heads, ties, quantization, adapter
#: orientation and scale, sentence-transformers modules): in a record's key
READ_SIDECARS = ("config.json", "quantize_config.json", "params.json", "adapter_config.json", "modules.json",
                 "config_sentence_transformers.json", "sentence_bert_config.json", "recipe.yaml")

#: the largest record file read back (a record is a few KB; its spectrum at most 64 values)
RECORD_CAP = 16 << 20


class RecordCache:
    """Records of one comparison's pairs on disk (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, options_settings: dict):
        self.root = check_folder(folder)
        self.options = json.dumps(options_settings, sort_keys=True, default=_plain)
        self._files: dict[tuple[int, str, bool], list] = {}
        self._content: dict[str, str] = {}    # stat key -> content key (sha256 of the files), when hashed
        self.hits = self.misses = 0
        self.unwritten = 0                # records a write failed for (a full disk): the run goes on without them
        self.write_error: str | None = None
        self.sweep()

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def _file_id(path: Path, ck: Any = None, content: bool = False) -> list:
        """``["hub", repo, commit, file, sha256, size]`` for a streamed Hub file; with ``content``,
        ``["sha256", digest]`` when the checkpoint's files were hashed before measuring; else ``[resolved
        path, inode, size, mtime ns, ctime ns]`` (see the module doc)."""
        commit = getattr(path, "commit", None)
        if commit is not None:
            # a streamed Hub file (io.hub_stream.HubFile): its commit fixes its bytes, and it has no local path
            # to stat (os.stat of its hf:// name failed, or found an unrelated local file of that spelling)
            return ["hub", path.repo_id, commit, path.path, path.sha256, path.size]
        if content:
            digest = (getattr(ck, "digests", None) or {}).get(os.path.realpath(path))
            if digest is not None:
                return ["sha256", digest]
        st = os.stat(path)
        return [os.fspath(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _tensor_id(self, ck: Any, name: str | None, content: bool = False) -> list | None:
        if name is None:
            return None
        info = ck.tensors.get(name) if hasattr(ck, "tensors") else None
        if info is not None and getattr(info, "start", None) is not None and getattr(info, "path", None):
            order = (getattr(ck, "row_order", None) or {}).get(name)
            # rows handed out in another order than stored (a consolidated checkpoint's Q/K): the head size
            # decides the values read, so it is part of what they are
            return [*self._file_id(info.path, ck, content), info.start, info.end, *(["rows", order] if order else [])]
        key = (id(ck), "all", content)
        if key not in self._files:    # no byte range of its own: the checkpoint's whole set of files
            self._files[key] = [self._file_id(p, ck, content) for p in getattr(ck, "files", [])]
        order = (getattr(ck, "row_order", None) or {}).get(name)
        return [name, self._files[key], *(["rows", order] if order else [])]

    def _sidecars(self, ck: Any, content: bool) -> list:
        """The identity of the JSON files beside a checkpoint's weights (its folder and every folder its weights are
        read from), which decide how the bytes are read: config.json's ``quantization_config`` (an FP8 block size
        turns a fine-tune into quantization noise), adapter_config.json's ``fan_in_fan_out``, params.json's heads.
        ``READ_SIDECARS`` only (an output written beside the model must not make every rerun miss); a streamed
        Hub checkpoint's commit fixes them all."""
        key = (id(ck), "sidecars", content)
        if key in self._files:
            return self._files[key]
        files = list(getattr(ck, "files", None) or [])
        commits = sorted({(str(getattr(f, "repo_id", "")), str(f.commit)) for f in files
                          if getattr(f, "commit", None) is not None})
        out: list = [["hub", *c] for c in commits]
        root = getattr(ck, "path", None)
        folders = set()
        if root is not None and getattr(root, "commit", None) is None and os.path.exists(str(root)):
            folders.add(Path(str(root)) if os.path.isdir(str(root)) else Path(str(root)).parent)
        folders.update(Path(str(f)).parent for f in files if getattr(f, "commit", None) is None)
        if getattr(ck, "config_dir", None) is not None:
            folders.add(Path(str(ck.config_dir)))
        for folder in sorted(folders):
            try:
                names = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name in READ_SIDECARS)
            except OSError:
                continue
            for name in names:
                path = folder / name
                if content:
                    with open(path, "rb") as fh:
                        out.append([name, "sha256", hashlib.sha256(fh.read(RECORD_CAP * 4)).hexdigest()])
                else:
                    out.append([name, *self._file_id(path)])
        self._files[key] = out
        return out

    def _key(self, pair: Any, bases: Sequence[Any], tuned: Any, content: bool) -> str:
        base = bases[pair.base_index] if pair.base_name is not None else None
        names = [getattr(pair, "tuned_source", None) or pair.tuned_name]
        lora = getattr(pair, "lora", None)
        if lora is not None:
            names += [getattr(lora, k, None) for k in ("a_name", "b_name", "magnitude_name", "base_layer_name")]
        material = {
            "v": CACHE_VERSION,
            "pair": pair.to_dict(),
            "base": self._tensor_id(base, pair.base_name, content) if base is not None else None,
            "tuned": [self._tensor_id(tuned, n, content) for n in names if n is not None],
            "options": self.options,
            "sidecars": [self._sidecars(base, content) if base is not None else None, self._sidecars(tuned, content)],
        }
        blob = json.dumps(material, sort_keys=True, default=_plain).encode()
        return hashlib.sha256(blob).hexdigest()

    def key(self, pair: Any, bases: Sequence[Any], tuned: Any) -> str:
        """The record's key: by the stat identity of the files it reads, whatever the run outputs (so
        adding ``--memo``, which hashes, still finds the records of a run without it). When the files were
        hashed, the key by their sha256 (the content key) is kept beside it for ``get`` and ``put``."""
        stat_key = self._key(pair, bases, tuned, content=False)
        if any(getattr(ck, "digests", None) for ck in (*bases, tuned)):
            content_key = self._key(pair, bases, tuned, content=True)
            if content_key != stat_key:
                self._content[stat_key] = content_key
        return stat_key

    # -- records --------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _read(self, key: str, content: str | None = None) -> TensorRecord | None:
        """The record stored under ``key``, or None. ``content``: the content key of the files as hashed now;
        a record that was written with another one (the files' bytes changed under an unchanged stat
        identity) is not returned."""
        from ..errors import WeightdiffError
        from ..io.files import read_small

        try:        # a regular file under RECORD_CAP (a FIFO hung, /dev/zero filled the memory), any nesting
            data = json.loads(read_small(self._path(key), RECORD_CAP).decode("utf-8"))
            if not isinstance(data, dict) or data.get("key") != key or data.get("v") != CACHE_VERSION:
                raise ValueError("stale")
            stored = data.get("content")
            if content is not None and stored is not None and stored != content:
                raise ValueError("other bytes")
            return record_from_dict(data["record"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, WeightdiffError):
            return None

    def get(self, key: str) -> TensorRecord | None:
        """The record of ``key`` (a stat key), or None. When the files were hashed, a record under the
        stat key is taken only if it was not written for other bytes, and a record under the content key
        (written for a copy of the same bytes elsewhere) is taken too, and stored under the stat key."""
        content = self._content.get(key)
        rec = self._read(key, content)
        if rec is None and content is not None:
            rec = self._read(content)
            if rec is not None:             # found again by the stat key next time, hashed or not
                self._write(key, rec, content)
        if rec is None:
            self.misses += 1
            return None
        self._content.pop(key, None)
        self.hits += 1
        return rec

    def put(self, key: str, rec: TensorRecord) -> None:
        """Store one record under its stat key (and under its content key when the files were hashed,
        with that key beside it); a write that fails (a full disk, a folder gone read-only) leaves no
        temporary behind and stops the writes of this run: the results do not depend on the cache, so
        the run goes on, and ``warn_unwritten`` says so once at the end. An exception of another kind
        (Ctrl-C, SIGTERM) also removes the temporary, and goes on."""
        content = self._content.pop(key, None)
        self._write(key, rec, content)
        if content is not None:
            self._write(content, rec, content)

    def _write(self, key: str, rec: TensorRecord, content: str | None) -> None:
        if self.write_error is not None:
            self.unwritten += 1
            return
        path = self._path(key)
        tmp = path.with_name(f".{key}.{_HOST}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = json.dumps({"v": CACHE_VERSION, "key": key, "record": rec.to_dict(),
                               **({"content": content} if content is not None else {})},
                              default=_plain, allow_nan=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            if not isinstance(exc, OSError):
                raise
            self.write_error = exc.strerror or str(exc)
            self.unwritten += 1

    def sweep(self) -> int:
        """Remove the temporaries that writers which no longer run left in the record folders (a run
        killed while it wrote a record): those of this host whose process is gone, and any a day old (a
        record takes milliseconds to write; another host's pid cannot be checked from here). Returns how
        many were removed."""
        removed = 0
        now = time.time()
        try:
            folders = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for folder in folders:
            try:
                entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
            except OSError:
                continue
            for e in entries:
                m = _TMP.match(e.name)
                if m is None:
                    continue
                host, pid = m.group(1), int(m.group(2))
                try:
                    old = now - e.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
                except OSError:
                    continue
                if old or (host == _HOST and pid != os.getpid() and not pid_alive(pid)):
                    try:
                        os.unlink(e.path)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def warn_unwritten(self) -> None:
        """One line on stderr when some records could not be written."""
        if self.unwritten:
            import sys

            sys.stderr.write(f"warning: --cache {self.root}: {self.unwritten} record"
                             f"{'s' if self.unwritten != 1 else ''} not written ({self.write_error}); the results "
                             "are complete, and a rerun measures those tensors again\n")
