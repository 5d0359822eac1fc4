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
types, or whose stored key differs, is ignored, measured again and overwritten. So is a record whose ``digest`` (the
sha256 of the file's content, stored in it) does not match, or that does not fit the pair it is read for
(``check_pair``: names, base index, dtypes, shapes, element count, status): a record edited or copied by hand is
absent, never a result (a forged ``unchanged`` record made a fine-tune read IDENTICAL, a ``base_index`` of 5 made the
run exit 1). The digest is no signature: whoever can write the folder can recompute it. Every folder and record is
opened with ``O_NOFOLLOW`` (relative to its parent's descriptor), so nothing is read or written through a symbolic
link inside the folder (a linked ``records/<xx>`` put records outside it; ``check_folder`` refuses one up front).
Floats keep their exact bits (JSON repr round-trips, NaN and infinities
included), so a resumed run writes the same JSON bytes as an uninterrupted one.

The tensors measured again after the pass, beneath a reparametrisation found (``comparison.Again``:
``measure_undone``, ``measure_folded_norms``), are records of this cache too, in the same folder with the same
writes and checks: their key is their pair's key with ``post`` added to the material (``key(post=...)``: the
undo's kind, its note, what it takes from the pass's record, the identity of the other base tensors it reads,
and its order, rotation and gains by ``array_id``, the sha256 of their bytes), so it is never the pass's key
of the pair, and another input, option or undo misses. Such a record carries ``post`` (what measured it) for
whoever reads the folder; nothing reads it back. It is checked against the pair as measured again
(``measure.compute.remeasured_pair``, with the base name, dtype and shape its final record carries).

What the checks after the pass found (``comparison.reparametrisations``) is stored here too, once they end
(``put_outcome``): a JSON outcome file (``records/<xx>/<key>.checks``, not ``.json``: no record) in the records'
layout (``v``, ``key``, ``digest``) naming the size and
sha256 of one ``.npz`` of its arrays (the orders, rotations and gains), which is written first, under a key of
its own. Its key (``checks_key``) is known before the pass: the plan's pairs, every file's stat identity and
sidecars, the options. The outcome is taken only when its digest matches, its arrays have the size and sha256
it names and load without pickles to the dtypes and shapes it names, the pass's records are those it was found
from (``records_digest``), and it fits them (``comparison._decode_checks``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import time
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from ..errors import WeightdiffError, escape_name
from ..fsutil import pid_alive
from ..records import RankRecord, TensorRecord

__all__ = ["RecordCache", "CACHE_VERSION", "check_folder", "record_from_dict", "records_digest"]

#: bump when a change of the code changes records for the same inputs and options
CACHE_VERSION = 8           # 4: inode and ctime (or the sha256) in a file's identity; 5: the JSON sidecars;
#                             6: recipe.yaml among them, compressed-tensors int weights' floor test changed;
#                             7: a digest of the record's content stored with it; 8: a DoRA's whole change ranked


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


#: past this a square (or a product of two) overflows a float: no measurement of weights comes near it
_HUGE = 1e150


def _measure(v: Any, name: str, low: float = 0.0) -> None:
    """TypeError unless ``v`` is None or a number a measurement gives: at least ``low`` (or NaN), at most
    ``_HUGE``."""
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= low or v != v) or v > _HUGE:
        raise TypeError(name)


def _count(v: Any, name: str) -> None:
    """TypeError unless ``v`` is None or an integer not negative."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise TypeError(name)


def _bounded(v: Any, name: str, depth: int = 0) -> None:
    """TypeError unless ``v`` is JSON of string keys, nested at most 8 deep, with no finite number past
    ``_HUGE`` (a free-form dict: the quantization floor test, a rank's extra analyses)."""
    if depth > 8:
        raise TypeError(name)
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError(name)
            _bounded(x, name, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _bounded(x, name, depth + 1)
    elif isinstance(v, float):
        if math.isfinite(v) and abs(v) > _HUGE:
            raise TypeError(name)
    elif isinstance(v, int) and not isinstance(v, bool):
        if abs(v) > 2 ** 63:
            raise TypeError(name)
    elif v is not None and not isinstance(v, (str, bool)):
        raise TypeError(name)


def _check_nested(d: dict) -> None:
    """TypeError unless the record's nested values are ones a measurement produces: cast floors (a string
    there made the roll-up exit 1), a rank's counts not negative and its numbers within ``_HUGE`` (a
    numerical rank of -5 was printed, a spectrum of 1e308 overflowed), the floor test's verdict a boolean."""
    for name in ("rel_change",):
        _measure(d.get(name), name)
    cos = d.get("cosine")
    if cos is not None and not (-1.0 - 1e-6 <= cos <= 1.0 + 1e-6 or math.isnan(cos)):
        raise TypeError("cosine")
    floor = d.get("rounding_floor")
    if floor is not None:
        for k, v in floor.items():
            if not isinstance(k, str):
                raise TypeError("rounding_floor")
            _measure(v, "rounding_floor")
    quant = d.get("quant")
    if quant is not None:
        _bounded(quant, "quant")
        if not isinstance(quant.get("within"), (bool, type(None))):
            raise TypeError("quant.within")
        for k in ("beyond", "beyond_clamped", "elements"):
            _measure(quant.get(k), f"quant.{k}")
    rank = d.get("rank")
    if rank is not None:
        for k in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
            _count(rank.get(k), f"rank.{k}")
        for k in ("stable_rank", "effective_rank", "noise_floor", "energy_captured"):
            _measure(rank.get(k), f"rank.{k}")
        for v in rank.get("spectrum") or ():
            _measure(v, "rank.spectrum")
        shape_2d = rank.get("shape_2d")
        if shape_2d is not None and (len(shape_2d) != 2 or any(x < 0 for x in shape_2d)):
            raise TypeError("rank.shape_2d")
        for k, v in (rank.get("bounds") or {}).items():
            if not isinstance(v, list) or len(v) != 2:
                raise TypeError("rank.bounds")
            for x in v:
                _measure(x, "rank.bounds", low=-_HUGE)
        _bounded(rank.get("extra"), "rank.extra")


#: the statuses a pair of each kind gives (``measure.compute.compute_pair``)
_STATUS_OF_KIND = {"added": ("added",), "removed": ("removed",), "inherited": ("unchanged",),
                   "mismatch": ("resized",)}


def check_pair(rec: TensorRecord, pair: Any, n_bases: int) -> None:
    """ValueError unless the record is one measured for ``pair``: the names, the base it was paired with
    (an index within the ``n_bases`` bases: 5 of 1 made the run exit 1), the dtypes, the shapes and the
    element count as ``compute_pair`` writes them from the pair, and a status of its kind. A record is found
    by a key hashing the pair, so a mismatch is a record edited or copied by hand (another tensor's name or
    an empty shape skewed the scope: "150% of the tuned model's parameters"); it is measured again."""
    name = pair.tuned_name if pair.tuned_name is not None else pair.base_name
    if rec.name != name or rec.base_name != pair.base_name:
        raise ValueError("name")
    if rec.base_index != pair.base_index or not 0 <= rec.base_index < max(1, n_bases):
        raise ValueError("base_index")
    if rec.dtype_base != pair.dtype_base or rec.tied != bool(pair.tied) or rec.paired_by != pair.paired_by:
        raise ValueError("dtype_base")
    statuses = _STATUS_OF_KIND.get(pair.kind)
    if (rec.status not in statuses) if statuses else (rec.status in ("added", "removed")):
        raise ValueError("status")
    base_shape = list(pair.shape_base) if pair.shape_base is not None else None
    if rec.base_shape != base_shape:
        raise ValueError("base_shape")
    # an adapter merged with the base layer it saves, or a merged LoRA bias, is measured as the merged tensor
    # (its own shape and dtype); every other record has the pair's
    merged = any(getattr(pair, k, None) is not None for k in ("lora", "lora_bias", "ia3", "ia3_bias"))
    if not merged:
        shape = list(pair.shape_tuned) if pair.shape_tuned is not None else base_shape
        if rec.shape != shape or rec.dtype_tuned != pair.dtype_tuned:
            raise ValueError("shape")
    if rec.shape is None or any(x < 0 for x in rec.shape) or rec.numel != math.prod(rec.shape):
        raise ValueError("numel")
    top = max(rec.numel, math.prod(base_shape)) if base_shape is not None else rec.numel
    if rec.numel_compared > top:
        raise ValueError("numel_compared")


def _digest(payload: dict) -> str:
    """The sha256 of a record file's content (everything but the digest) as JSON with sorted keys: the same
    text for the dict written and the dict read back (floats keep their bits through JSON)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=_plain, allow_nan=True).encode()).hexdigest()


def record_from_dict(d: dict) -> TensorRecord:
    """The inverse of ``TensorRecord.to_dict`` (lists stay lists, as in the JSON). TypeError when
    ``d`` is not such a dict: a field of another type, an unknown field, not a dict at all, or values no
    measurement gives (``_check_values``)."""
    _check_fields(d, TensorRecord)
    _check_values(d)
    if d.get("rank") is not None:
        _check_fields(d["rank"], RankRecord)
    _check_nested(d)
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
    # records are written only inside the cache folder: a symbolic link for records/ or one of its
    # subfolders (records/<xx>) sent them elsewhere (the folder itself may be a link: the user named it)
    links = [root] if os.path.islink(root) else []
    if not links and os.path.isdir(root):
        try:
            links = sorted(Path(e.path) for e in os.scandir(root) if e.is_symlink() and _SUB.match(e.name))
        except OSError:
            links = []
    if links:
        raise CacheError(f"--cache {escape_name(os.fspath(folder))}: {escape_name(os.fspath(links[0]))} is a "
                         "symbolic link; records are written only inside the cache folder, never through a link",
                         "remove the link, or give another --cache folder")
    return root


#: a record subfolder's name (``records/<key[:2]>``)
_SUB = re.compile(r"^[0-9a-f]{2}$")
#: a folder of the cache opened never through a symbolic link (ELOOP when it is one)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: a record opened for reading: never through a link, never blocking on a FIFO
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
#: a record temporary opened for writing: never through a link
_WRITE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_CLOEXEC", 0))


class _Link(OSError):
    """A folder of the cache is a symbolic link (or not a folder): nothing is read or written through it."""


#: this host in a record temporary's name (``.KEY.HOST.PID.tmp``): a sweep removes only its own host's
#: temporaries of dead processes (workers of a cluster share a cache folder; their pids are not ours)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: a record temporary (``HOST.`` absent in those of weightdiff before 0.1.0's sweep)
_TMP = re.compile(r"^\.[0-9a-f]{64}\.(?:([0-9a-f]{8})\.)?(\d+)\.tmp$")
#: a temporary older than this is removed whoever wrote it
STALE_SECONDS = 86400

#: the files beside the weights that decide how their bytes are read (heads, ties, quantization, adapter
#: orientation and scale, sentence-transformers modules): in a record's key
READ_SIDECARS = ("config.json", "quantize_config.json", "hf_quant_config.json", "params.json", "adapter_config.json",
                 "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "recipe.yaml")

#: the largest record file read back (a record is a few KB; its spectrum at most 64 values)
RECORD_CAP = 16 << 20
#: the largest checks' outcome read back: 500-600 bytes a tensor measured again (its note is repeated), so a MoE of
#: 58 layers x 256 experts with its experts reordered (44,544 tensors, about 25 MB) passed RECORD_CAP and its checks
#: ran again on resume
OUTCOME_CAP = 128 << 20

#: bump when a change of the code changes what the checks after the pass find for the same records
CHECKS_VERSION = 1


def records_digest(records: Sequence[TensorRecord]) -> str:
    """The sha256 of records as JSON (sorted keys; floats keep their bits): what the checks' outcome was found
    from, compared before it is taken."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_dict(), sort_keys=True, default=_plain, allow_nan=True).encode())
        h.update(b"\n")
    return h.hexdigest()


#: the warnings ``warn_unwritten`` gave in this process, by records folder
_WARNED: dict[str, int] = {}


def warnings_given(folder: str | os.PathLike) -> int:
    """How many times this process warned that records of the cache ``folder`` could not be written: a run's
    second cache of one folder (the post-pass's, after the pass's) says nothing when the first said it."""
    return _WARNED.get(str(Path(folder) / "records"), 0)


def _arrays_key(key: str) -> str:
    """The key of the arrays file of the outcome stored under ``key`` (its own name, so its temporary is not the
    outcome's)."""
    return hashlib.sha256(f"{key}:arrays".encode()).hexdigest()


class RecordCache:
    """Records of one comparison's pairs on disk (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, options_settings: dict):
        self.root = check_folder(folder)
        self.options = json.dumps(options_settings, sort_keys=True, default=_plain)
        self._files: dict[tuple[int, str, bool], list] = {}
        self._content: dict[str, str] = {}    # stat key -> content key (sha256 of the files), when hashed
        self._arrays: dict[int, tuple[Any, list]] = {}     # id(array) -> (array, array_id): digested once
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

    def _key(self, pair: Any, bases: Sequence[Any], tuned: Any, content: bool, post: dict | None = None) -> str:
        base = bases[pair.base_index] if pair.base_name is not None else None
        names = [getattr(pair, "tuned_source", None) or pair.tuned_name]
        copy = getattr(getattr(pair, "ia3", None), "base_layer_name", None)
        if copy:                        # an IA3 vector scales the base layer its adapter saves
            names.append(copy)
        lora = getattr(pair, "lora", None)
        if lora is not None:
            names += [getattr(lora, k, None) for k in ("a_name", "b_name", "magnitude_name", "base_layer_name",
                                                       "e_name")]
            names += [n for n in getattr(lora, "parts", {}).values() if n not in names]
        material = {
            "v": CACHE_VERSION,
            "pair": pair.to_dict(),
            "base": self._tensor_id(base, pair.base_name, content) if base is not None else None,
            "tuned": [self._tensor_id(tuned, n, content) for n in names if n is not None],
            "options": self.options,
            "sidecars": [self._sidecars(base, content) if base is not None else None, self._sidecars(tuned, content)],
        }
        if post is not None:
            # a record measured again after the pass (beneath an undo): what the undo is, and the identity of
            # every other base tensor it reads (another expert's, for experts reordered)
            material["post"] = {**post, "reads": [self._tensor_id(base, n, content) for n in post.get("reads", ())]}
        blob = json.dumps(material, sort_keys=True, default=_plain).encode()
        return hashlib.sha256(blob).hexdigest()

    def key(self, pair: Any, bases: Sequence[Any], tuned: Any, post: dict | None = None) -> str:
        """The record's key: by the stat identity of the files it reads, whatever the run outputs (so
        adding ``--memo``, which hashes, still finds the records of a run without it). When the files were
        hashed, the key by their sha256 (the content key) is kept beside it for ``get`` and ``put``.

        ``post``: the key of the pair's record measured again after the pass beneath an undo (a reordering,
        a sign flip, a rotation, folded gains, a rescale: ``comparison.measure_undone``, ``measure_folded_norms``):
        a JSON dict saying everything besides the pair's inputs and the options that the record depends on (the
        undo's kind and its parameters, arrays as ``array_id``), with ``reads``, the names of the other base
        tensors it reads. The pass's key with that added: never the pass's record's key, and a changed input,
        option or undo misses."""
        stat_key = self._key(pair, bases, tuned, content=False, post=post)
        if any(getattr(ck, "digests", None) for ck in (*bases, tuned)):
            content_key = self._key(pair, bases, tuned, content=True, post=post)
            if content_key != stat_key:
                self._content[stat_key] = content_key
        return stat_key

    def array_id(self, a: Any) -> list | None:
        """``[dtype, shape, sha256 of the bytes]`` of an array an undo holds (an order, a rotation, gains), for
        ``key(post=...)``; None for None. The digest of one array object is taken once per cache object (a
        70B-width rotation is 512 MB, shared by every matrix it turns): the array is kept with it, so its id
        names it for as long as the cache lives."""
        if a is None:
            return None
        got = self._arrays.get(id(a))
        if got is not None and got[0] is a:
            return got[1]
        import numpy as np

        from .spill import Spilled, digest

        arr = a if isinstance(a, Spilled) else np.ascontiguousarray(np.asarray(a))
        ident = [str(arr.dtype), list(arr.shape), digest(arr)]       # (a spilled rotation read back in panels)
        self._arrays[id(a)] = (a, ident)
        return ident

    # -- records --------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _folder(self, key: str, create: bool) -> int:
        """A descriptor of ``records/<key[:2]>``, opened through no symbolic link (records/ and the subfolder
        each opened with O_NOFOLLOW, the subfolder relative to records/, so a link put there in the meantime
        is not followed either); with ``create`` the folders are made first. ``_Link`` when one is a link."""
        if create:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.root)
            except FileExistsError:
                pass
        try:
            root = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            if os.path.islink(self.root) or exc.errno == errno.ENOTDIR:
                raise _Link(exc.errno, f"{self.root} is a symbolic link or not a folder") from None
            raise
        try:
            if create:
                try:
                    os.mkdir(key[:2], dir_fd=root)
                except FileExistsError:
                    pass
            try:
                return os.open(key[:2], _DIR_FLAGS, dir_fd=root)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Link(exc.errno, f"{self.root / key[:2]} is a symbolic link or not a folder") from None
                raise
        finally:
            os.close(root)

    def _load(self, key: str, suffix: str = ".json") -> Any:
        """The parsed JSON of the record file of ``key``: a regular file under RECORD_CAP (OUTCOME_CAP for an outcome;
        a FIFO hung, /dev/zero filled the memory), read through no symbolic link (a record or subfolder linked
        elsewhere is not a record of this cache). OSError when there is none such. ``suffix``: ``.checks`` for the
        checks' outcome."""
        cap = OUTCOME_CAP if suffix in (".checks", ".fit") else RECORD_CAP
        folder = self._folder(key, create=False)
        try:
            fd = os.open(f"{key}{suffix}", _READ_FLAGS, dir_fd=folder)
        finally:
            os.close(folder)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
                raise OSError(errno.EINVAL, "not a record")
            chunks, left = [], st.st_size
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        return json.loads(b"".join(chunks).decode("utf-8"))

    def _read(self, key: str, content: str | None = None, pair: Any = None, n_bases: int = 1) -> TensorRecord | None:
        """The record stored under ``key``, or None. ``content``: the content key of the files as hashed now;
        a record that was written with another one (the files' bytes changed under an unchanged stat
        identity) is not returned. Nor is one whose digest does not match its content (edited or torn), nor
        one that is not a record of ``pair`` (``check_pair``)."""
        try:
            data = self._load(key)
            if not isinstance(data, dict) or data.get("key") != key or data.get("v") != CACHE_VERSION:
                raise ValueError("stale")
            digest = data.pop("digest", None)
            if not isinstance(digest, str) or digest != _digest(data):
                raise ValueError("digest")
            stored = data.get("content")
            if stored is not None and not isinstance(stored, str):
                raise ValueError("content")
            if content is not None and stored is not None and stored != content:
                raise ValueError("other bytes")
            rec = record_from_dict(data["record"])
            if pair is not None:
                check_pair(rec, pair, n_bases)
            return rec
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError,
                WeightdiffError):
            return None

    def get(self, key: str, pair: Any = None, bases: Sequence[Any] = ()) -> TensorRecord | None:
        """The record of ``key`` (a stat key), or None. When the files were hashed, a record under the
        stat key is taken only if it was not written for other bytes, and a record under the content key
        (written for a copy of the same bytes elsewhere) is taken too, and stored under the stat key.
        ``pair`` (with the ``bases`` of the comparison): a record that does not fit it is a miss."""
        content = self._content.get(key)
        n_bases = len(bases)
        rec = self._read(key, content, pair, n_bases)
        if rec is None and content is not None:
            rec = self._read(content, None, pair, n_bases)
            if rec is not None:             # found again by the stat key next time, hashed or not
                self._write(key, rec, content)
        if rec is None:
            self.misses += 1
            return None
        self._content.pop(key, None)
        self.hits += 1
        return rec

    def put(self, key: str, rec: TensorRecord, post: str | None = None) -> None:
        """Store one record under its stat key (and under its content key when the files were hashed,
        with that key beside it); a write that fails (a full disk, a folder gone read-only, a subfolder that
        is a symbolic link) leaves no temporary behind and stops the writes of this run: the results do not
        depend on the cache, so the run goes on, and ``warn_unwritten`` says so once at the end. An exception
        of another kind (Ctrl-C, SIGTERM) also removes the temporary, and goes on. ``post``: what measured
        the record again after the pass (``measure_undone``), written beside it for whoever reads the folder
        (nothing reads it back: the key says what the record is)."""
        content = self._content.pop(key, None)
        self._write(key, rec, content, post)
        if content is not None:
            self._write(content, rec, content, post)

    def _write(self, key: str, rec: TensorRecord, content: str | None, post: str | None = None) -> None:
        if self.write_error is not None:
            self.unwritten += 1
            return
        payload = {"v": CACHE_VERSION, "key": key, "record": rec.to_dict(),
                   **({"content": content} if content is not None else {}),
                   **({"post": post} if post is not None else {})}
        # the digest of the content as it reads back: the same JSON text (numpy scalars, tuples and sets
        # written as the floats, ints and lists they read back as; a float's repr round-trips)
        blob = json.dumps({**payload, "digest": _digest(payload)}, default=_plain, allow_nan=True).encode()
        self._write_bytes(key, f"{key}.json", lambda fh: fh.write(blob))

    # -- the checks' outcome ----------------------------------------------------------------
    def checks_key(self, plan: Any, bases: Sequence[Any], tuned: Any, extra: dict) -> str:
        """The key of what the checks after the pass found (``comparison.reparametrisations``), known before the
        pass: the plan's pairs, the stat identity of every file of every checkpoint and of its ``READ_SIDECARS``,
        the options and ``extra`` (the caller's own settings). The outcome stored under it also names the digest
        of the pass's records it was found from, and is taken only when they are the same records again."""
        files = [[self._file_id(f, ck) for f in getattr(ck, "files", None) or []] for ck in (*bases, tuned)]
        pairs = hashlib.sha256(json.dumps([p.to_dict() for p in plan.pairs], sort_keys=True,
                                          default=_plain).encode()).hexdigest()
        material = {"v": CACHE_VERSION, "checks": CHECKS_VERSION, "pairs": pairs, "files": files,
                    "sidecars": [self._sidecars(ck, False) for ck in (*bases, tuned)], "options": self.options,
                    "extra": extra}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=_plain).encode()).hexdigest()

    def put_outcome(self, key: str, outcome: dict, arrays: dict, suffix: str = ".checks") -> None:
        """Store a JSON ``outcome`` and its numpy ``arrays`` (``name -> array``) under ``key``: the arrays first, in
        one ``.npz`` of their own key (``_arrays_key``), then the outcome as a record file naming the arrays' size
        and sha256, each written to a temporary and renamed, so a kill leaves the outcome whole or absent. A failed
        write stops the cache's writes as ``put``'s does. ``suffix``: ``.checks`` for the checks' outcome, ``.fit``
        for one rotation fitted during them (``Again.fit``)."""
        if self.write_error is not None:
            self.unwritten += 1
            return
        import numpy as np

        akey = _arrays_key(key)
        # written straight to the temporary (a 70B-width rotation is 512 MB: no copy of it in memory), then hashed
        # as it reads back from there; each array in its own memory order (.npy keeps a Fortran order: a product
        # with the array read back takes the same BLAS path, so gives the same bits)
        got = self._write_bytes(akey, f"{akey}.npz", lambda fh: np.savez(fh, **{
            k: np.asarray(v) for k, v in arrays.items()}))
        if got is None:
            return
        size, sha = got
        payload = {"v": CACHE_VERSION, "key": key, "outcome": outcome,
                   "arrays": {"size": size, "sha256": sha,
                              "names": {k: [str(np.asarray(v).dtype), list(np.asarray(v).shape)]
                                        for k, v in arrays.items()}}}
        text = json.dumps({**payload, "digest": _digest(payload)}, default=_plain, allow_nan=True).encode()
        self._write_bytes(key, f"{key}{suffix}", lambda fh: fh.write(text))

    def peek_outcome(self, key: str, suffix: str = ".checks") -> dict | None:
        """The outcome stored under ``key`` (its JSON only, the arrays not read), or None: absent, torn, or with a
        digest that does not match."""
        try:
            data = self._load(key, suffix)
            if not isinstance(data, dict) or data.get("key") != key or data.get("v") != CACHE_VERSION:
                raise ValueError("stale")
            digest = data.pop("digest", None)
            if not isinstance(digest, str) or digest != _digest(data):
                raise ValueError("digest")
            if not isinstance(data.get("outcome"), dict) or not isinstance(data.get("arrays"), dict):
                raise ValueError("outcome")
            return data
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
            return None

    def mark_measured(self, key: str) -> None:
        """Note beside the outcome under ``key`` that every tensor it measures again is stored (``.done``: the
        outcome's digest), so that a run that finds both tells no time for them in its ETA (``measured``)."""
        data = self.peek_outcome(key)
        if data is None or self.write_error is not None:
            return
        text = json.dumps({"v": CACHE_VERSION, "key": key, "outcome": _digest(data)}).encode()
        self._write_bytes(key, f"{key}.done", lambda fh: fh.write(text))

    def measured(self, key: str) -> bool:
        """Whether ``mark_measured`` noted the outcome stored under ``key`` now (not an earlier one written over)."""
        data = self.peek_outcome(key)
        if data is None:
            return False
        try:
            return self._load(key, ".done") == {"v": CACHE_VERSION, "key": key, "outcome": _digest(data)}
        except (OSError, ValueError, RecursionError):
            return False

    def get_outcome(self, key: str, suffix: str = ".checks") -> tuple[dict, dict] | None:
        """(outcome, arrays) stored under ``key``, or None: the outcome as ``peek_outcome`` takes it, and its arrays
        only when their file (read through no symbolic link) has the size and sha256 the outcome names, loads
        without pickles and holds exactly the arrays named, of the dtypes and shapes named."""
        data = self.peek_outcome(key, suffix)
        if data is None:
            return None
        import numpy as np

        meta = data["arrays"]
        akey = _arrays_key(key)
        fd = None
        try:
            folder = self._folder(akey, create=False)
            try:
                fd = os.open(f"{akey}.npz", _READ_FLAGS, dir_fd=folder)
            finally:
                os.close(folder)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != meta.get("size"):
                raise ValueError("size")
            h = hashlib.sha256()
            while True:
                chunk = os.read(fd, 1 << 24)
                if not chunk:
                    break
                h.update(chunk)
            if h.hexdigest() != meta.get("sha256"):
                raise ValueError("sha256")
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(fd, "rb") as fh:
                fd = None
                with np.load(fh, allow_pickle=False) as z:
                    names = meta.get("names")
                    if not isinstance(names, dict) or sorted(z.files) != sorted(names):
                        raise ValueError("names")
                    arrays = {}
                    for k, (dtype, shape) in names.items():
                        a = z[k]
                        if str(a.dtype) != dtype or list(a.shape) != shape:
                            raise ValueError("array")
                        arrays[k] = a
            return data["outcome"], arrays
        except Exception:           # whatever np.load makes of a file that is no outcome's: absent
            return None
        finally:
            if fd is not None:
                os.close(fd)

    def _write_bytes(self, key: str, name: str, produce: Any) -> tuple[int, str] | None:
        """``produce(file)`` written to ``records/<key[:2]>/name`` through a temporary (``.<key>.<host>.<pid>.tmp``,
        opened through no link) renamed into place once flushed to the disk; (its size, its sha256 as read back
        from the temporary), or None (the cache's writes stopped, as ``_write``'s) when it fails."""
        tmp = f".{key}.{_HOST}.{os.getpid()}.tmp"
        folder = fh = None
        try:
            folder = self._folder(key, create=True)
            fh = os.fdopen(os.open(tmp, _WRITE_FLAGS & ~os.O_WRONLY | os.O_RDWR, 0o666, dir_fd=folder), "w+b")
            produce(fh)
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            h, size = hashlib.sha256(), 0
            while True:
                chunk = fh.read(1 << 24)
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
            fh.close()
            fh = None
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            return size, h.hexdigest()
        except BaseException as exc:
            if fh is not None:
                fh.close()
            if folder is not None:
                try:
                    os.unlink(tmp, dir_fd=folder)
                except OSError:
                    pass
            if not isinstance(exc, OSError):
                raise
            self.write_error = exc.strerror or str(exc)
            self.unwritten += 1
            return None
        finally:
            if folder is not None:
                os.close(folder)

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
        """One line on stderr when some records could not be written (counted in ``warnings_given``)."""
        if self.unwritten:
            import sys

            _WARNED[str(self.root)] = _WARNED.get(str(self.root), 0) + 1

            sys.stderr.write(f"warning: --cache {self.root}: {self.unwritten} record"
                             f"{'s' if self.unwritten != 1 else ''} not written ({self.write_error}); the results "
                             "are complete, and a rerun measures those tensors again\n")
