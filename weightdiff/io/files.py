"""Opening user-named files safely, and strict JSON.

Every file weightdiff reads is opened with ``O_RDONLY|O_NONBLOCK|O_CLOEXEC`` and must be
a regular file, so a FIFO or a device named as a checkpoint cannot hang the tool or feed
it endless bytes. JSON (safetensors headers, shard indexes, adapter configs) is parsed
strictly: UTF-8, no duplicate keys, no NaN/Infinity, bounded nesting. Every failure is a
one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..errors import CheckpointError, escape_name

__all__ = ["open_regular", "pread_into", "sha256_fd", "read_small", "load_json", "os_problem"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_IO_CHUNK = 1 << 30          # Linux moves at most ~2 GiB per read call


def os_problem(exc: OSError) -> str:
    """One lower-case phrase for an OS error on a path the user gave."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (check the file's permissions)"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return (exc.strerror or type(exc).__name__).lower()


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking and require a regular file.

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; the ``fstat`` check then refuses
    FIFOs, devices and directories before a single byte is read.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise CheckpointError(path, f"broken symlink to {escape_name(os.readlink(path))}",
                                  "incomplete download?") from None
        raise CheckpointError(path, os_problem(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(path, f"is {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_into(fd: int, buf: memoryview, offset: int, path: str | os.PathLike) -> None:
    """Fill ``buf`` (a byte memoryview) from ``offset``; a short file is a CheckpointError."""
    done, total = 0, len(buf)
    while done < total:
        try:
            n = os.preadv(fd, [buf[done:done + _IO_CHUNK]], offset + done)
        except OSError as exc:
            raise CheckpointError(path, f"read failed at byte {offset + done:,}: {os_problem(exc)}") from None
        if n == 0:
            raise CheckpointError(path, f"file ended at byte {offset + done:,} while {offset + total:,} "
                                        "were expected (truncated while being read?)")
        done += n


def sha256_fd(fd: int, size: int, path: str | os.PathLike) -> str:
    """The sha256 of the first ``size`` bytes of an open file, read in 4 MiB preads."""
    import hashlib

    h, buf, pos = hashlib.sha256(), bytearray(4 << 20), 0
    while pos < size:
        mv = memoryview(buf)[:min(len(buf), size - pos)]
        pread_into(fd, mv, pos, path)
        h.update(mv)
        pos += len(mv)
    return h.hexdigest()


def _q(name: str) -> str:
    return f"`{escape_name(name)}`"


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _pairs(items: list) -> dict:
    out: dict = {}
    for k, v in items:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def duplicate_key(key: str) -> Exception:
    """The exception a ``load_json`` pairs hook raises for a key seen twice in one object."""
    return _Duplicate(key)


def _reject_constant(word: str):
    raise ValueError(f"{word} is not valid JSON")


def load_json(raw: bytes | bytearray, path: str | os.PathLike | None, what: str, pairs_hook=None) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded nesting.

    ``pairs_hook(items)`` may build each object instead of a dict (it must refuse repeated
    keys by raising ``duplicate_key(key)``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                    f"at position {exc.start:,})") from None
    if len(raw) > DENSE_CHECK_BYTES:
        _check_density(raw, path, what)
    try:
        return json.loads(text, object_pairs_hook=pairs_hook or _pairs, parse_constant=_reject_constant)
    except _Duplicate as exc:
        raise CheckpointError(path, f"{what} repeats the key {_q(exc.key)}") from None
    except RecursionError:
        raise CheckpointError(path, f"{what} JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc.msg.lower()} at byte {exc.pos:,})") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):     # Python's own advice would leak into the message
            raise CheckpointError(path, f"{what} holds an integer of more than 4,300 digits") from None
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})") from None


#: JSON larger than this is checked for bulk nesting before it is parsed (``_check_density``)
DENSE_CHECK_BYTES = 1 << 20


def _structure_counts(raw: bytes | bytearray) -> tuple[int, int, int]:
    """(colons, commas, opening brackets) outside JSON strings, in 1 MB chunks (a few MB of
    temporaries whatever the size): a quote toggles the parity of the running count of quotes,
    and escaped quotes and backslashes are blanked first (one copy, only when there are escapes)."""
    import numpy as np

    if b"\\" in raw:
        raw = bytes(raw).replace(b"\\\\", b"__").replace(b'\\"', b"__")
    a = np.frombuffer(raw, np.uint8)
    parity = 0
    colons = commas = opens = 0
    step = 1 << 20
    for i in range(0, a.size, step):
        c = a[i:i + step]
        inside = np.cumsum(c == 34, dtype=np.uint8)        # wraps at 256: the parity survives
        inside += parity
        inside &= 1
        parity = int(inside[-1])
        out = inside == 0
        colons += int(np.count_nonzero((c == 58) & out))
        commas += int(np.count_nonzero((c == 44) & out))
        opens += int(np.count_nonzero(((c == 123) | (c == 91)) & out))
    return colons, commas, opens


def _check_density(raw: bytes | bytearray, path, what: str) -> None:
    """Refuse JSON whose parse would cost many times its size: tens of MB of ``[{},{},...]`` or
    ``["a","a",...]`` under one key build an object per few bytes (a 93 MB header took 4.4 GB).
    Checkpoint JSON (headers, indexes, configs) has about one object or array per key and a few
    separators per key (a tensor entry: 4 keys, 3 containers, 4-10 commas), so outside strings the
    counts are held to ``containers <= keys + 64`` and ``commas <= 8 keys + 64``."""
    keys, commas, containers = _structure_counts(raw)
    if containers > keys + 64 or commas > 8 * keys + 64:
        raise CheckpointError(path, f"{what} holds {containers:,} JSON objects and arrays and {commas:,} separators "
                                    f"for {keys:,} keys: bulk nested data, not checkpoint JSON (refused to keep "
                                    "memory bounded)")


def read_small(path: Path, cap: int) -> bytes:
    """The whole of a small regular file, refusing one over ``cap`` bytes."""
    fd, st = open_regular(path)
    try:
        if st.st_size > cap:
            raise CheckpointError(path, f"file is {st.st_size:,} bytes, over the {cap:,}-byte cap for this kind of file")
        buf = bytearray(st.st_size)
        pread_into(fd, memoryview(buf), 0, path)
        return bytes(buf)
    finally:
        os.close(fd)


class OpenCheckpointFile:
    """The life of one open weights file, shared by every file reader (safetensors, GGUF).

    Subclasses call ``_open(path)`` first in ``__init__`` (it opens the file with
    ``open_regular`` and records its size), then parse their header and fill ``tensors``;
    on any error during parsing they ``close()`` and re-raise. ``check_unchanged`` guards
    every read against a file replaced or truncated since it was opened.
    """

    path: Path
    size: int
    tensors: dict

    def _open(self, path: str | os.PathLike) -> int:
        self._fd: int | None = None
        self.path = Path(path)
        fd, st = open_regular(self.path)
        self._fd = fd
        self.size = st.st_size
        return fd

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(getattr(self, 'tensors', {}))} tensors)"

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def _info(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor `{escape_name(name)}` in {self.path}") from None

    def check_unchanged(self) -> None:
        """Raise CheckpointError if the file's size differs from when it was opened."""
        try:
            size = os.fstat(self._open_fd()).st_size
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot stat: {os_problem(exc)}") from None
        if size != self.size:
            raise CheckpointError(self.path, f"file changed while being read: it held {self.size:,} "
                                             f"bytes, now {size:,} (overwritten or truncated?)")


def checkpoint_roots(d: Path) -> list[Path]:
    """Folders the files of checkpoint folder ``d`` may resolve into: ``d`` itself, and for a
    Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``) that repo's ``blobs/``."""
    real = Path(os.path.realpath(d))
    roots = [real]
    for a in (real, *real.parents):          # a subfolder of a snapshot shares the repo's blobs/ too
        if a.parent.name == "snapshots" and "--" in a.parent.parent.name:
            blobs = Path(os.path.realpath(a.parent.parent / "blobs"))
            if blobs.is_relative_to(a.parent.parent):     # a blobs/ linked out of the repo is no root
                roots.append(blobs)
            break
    return roots


def inside(path: Path, d: Path, hint: str = "pass that file directly if it is the one you mean") -> Path:
    """``path`` (a file of checkpoint folder ``d``) if it resolves inside ``d``; CheckpointError if a
    symlink (of the file or of a folder on its way) leads out. Broken links are left to the reader."""
    if not os.path.exists(path):
        return path
    real = Path(os.path.realpath(path))
    roots = checkpoint_roots(d)
    if not any(real.is_relative_to(r) for r in roots):
        where = "the checkpoint folder" if len(roots) == 1 else "the checkpoint folder or its cache repo's blobs/"
        raise CheckpointError(path, f"resolves to {escape_name(str(real))}, outside {where} "
                                    f"{escape_name(str(d))}; refusing to follow the symlink",
                              hint)
    return path


def read_beside(root: str | os.PathLike, name: str, cap: int) -> tuple[Path, bytes] | None:
    """``(path, bytes)`` of the small file ``name`` beside a checkpoint's weights (``config.json``), or
    None when there is none; CheckpointError when it resolves out of the folder ``root`` (a symlink to
    another model's config would change how this one is read) or is over ``cap`` bytes."""
    path = Path(root, name)
    if not path.is_file():
        return None
    inside(path, Path(root), "copy it into the folder if it belongs to this model")
    return path, read_small(path, cap)
