"""Output files written all or nothing.

``atomic_writer(path)`` writes one file through a temporary beside it and a rename: a
reader sees the old file or the whole new one, never half of one.

``OutputSet`` makes every output of one command a single transaction. Targets are
claimed up front (``claim``): the same target twice, a target that is an input of the
command, a folder where a file is wanted, or a parent that is a regular file is an
``OutputError`` (exit 2) before any work is done. While a set is active (``with
OutputSet():``, re-entrant), ``write_text``/``write_bytes`` stage each file into a
temporary beside its target; leaving the outermost ``with`` without an exception
renames them all into place, any exception (or SIGINT/SIGTERM, which the set turns
into ``Interrupted``) removes every temporary and every folder it created, so a failed
or interrupted run leaves nothing behind. A target that already exists and is not a
regular file (a character device such as ``/dev/null``, a FIFO) is written into, never
replaced.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> with OutputSet():
...     _ = write_text(os.path.join(d, "a.txt"), "a")
...     os.listdir(d) == ["a.txt"]          # only a temporary so far
False
>>> os.listdir(d)
['a.txt']
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import re
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from .errors import CheckpointError, OutputError, WeightdiffError, escape_name  # noqa: F401  (re-exported)

__all__ = ["OutputError", "Interrupted", "OutputSet", "atomic_writer", "write_text", "write_bytes",
           "active_outputs", "check_interrupted", "immediate_writes"]


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while outputs were pending; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_ACTIVE: contextvars.ContextVar["OutputSet | None"] = contextvars.ContextVar("weightdiff_outputs", default=None)


def active_outputs() -> "OutputSet | None":
    """The output set of the running command, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def immediate_writes() -> Iterator[None]:
    """Inside, ``write_text``/``write_bytes`` write each file at once (atomically), outside the
    command's output set: for work that saves as it goes so that it can resume (a survey)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def check_interrupted() -> None:
    """Raise ``Interrupted`` if a signal arrived whose exception may have been swallowed
    (numba's compiler calls back into Python through ctypes, which ignores exceptions)."""
    outs = _ACTIVE.get()
    if outs is not None and outs.signal is not None:
        raise Interrupted(outs.signal)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class OutputSet:
    """Every file one command writes, committed together at the end (see the module docstring)."""

    def __init__(self, protect: Iterable[str | os.PathLike] = ()):
        self._claimed: dict[str, str] = {}          # normalized target -> what it is for
        self._folders: set[str] = set()             # the claimed targets that are folders
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._created: list[Path] = []              # folders made for the outputs
        self._special: dict[str, int] = {}          # FIFO/device targets: fds opened at claim time
        self._after: list[Callable[[], object]] = []  # run once every file is in place ("wrote ..." lines)
        self._protect: list[tuple[Path, str]] = [(Path(p), "is an input of this command") for p in protect]
        self._depth = 0
        self._token = None
        self._handlers: dict[int, object] = {}
        self._holding = False                       # in the commit's renames: a signal is noted, raised after
        self.signal: int | None = None

    # -- claiming ---------------------------------------------------------------
    def protect(self, path: str | os.PathLike, why: str = "is an input of this command") -> None:
        """Never write over ``path`` (an input of the command; ``why`` says what it is)."""
        path = Path(path)
        self._protect.append((path, why))
        for key in self._claimed:
            if key != "-" and _same_file(Path(key), path):
                raise OutputError(key, f"{why}; writing there would overwrite it", "choose another output path")

    def _check_not_input(self, target: Path) -> None:
        for p, why in self._protect:
            if _same_file(target, p):
                raise OutputError(target, f"{why}; writing there would overwrite it", "choose another output path")

    def claim(self, target: str | os.PathLike, what: str | None = "output", folder: bool = False) -> Path | None:
        """Register ``target`` (``-`` is stdout) and check it can be written, before any work.

        ``folder`` for an output that is a directory of files (``--plots DIR``).
        Claiming the same target again for the same purpose, or with ``what=None`` (a
        library function confirming what its caller claimed), is a no-op.
        """
        # the real path: two spellings of one file, through a symlink too (dangling or not: the writer
        # replaces the link's target), are one output
        key = "-" if os.fspath(target) == "-" else os.path.realpath(os.fspath(target))
        if key in self._claimed:
            if self._claimed[key] == what or what is None:
                return None if key == "-" else Path(target)
            shown = "stdout" if key == "-" else escape_name(os.fspath(target))
            raise OutputError(None, f"{shown} is given for two outputs ({self._claimed[key]} and {what})",
                              "give each output its own path")
        if key != "-":
            self._check_nesting(key, target, what or "output", folder)
        self._claimed[key] = what or "output"
        if key == "-":
            return None
        if folder:
            self._folders.add(key)
        path = Path(target)
        self._check_not_input(path)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as exc:
            raise OutputError(path, f"cannot write here ({exc.strerror or exc})") from None
        if st is not None and stat.S_ISDIR(st.st_mode) and not folder:
            raise OutputError(path, "is a folder, expected a file name")
        if st is not None and not stat.S_ISDIR(st.st_mode) and folder:
            raise OutputError(path, f"is a file, expected a folder ({what or 'output'})")
        self._check_parent(path if folder and st is None else path.parent, path)
        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            self._special[key] = _open_special(path)      # a FIFO needs its reader now, not at the end
        return path

    def _check_nesting(self, key: str, target: str | os.PathLike, what: str, folder: bool) -> None:
        """An output inside another output that is a file (``--json out/x --cache out/x/c``) could
        only fail at the end, after the work: refused now."""
        for other, other_what in self._claimed.items():
            if other == "-":
                continue
            if key.startswith(other + os.sep) and other not in self._folders:
                outer, inner = (other, other_what), (key, what)
            elif other.startswith(key + os.sep) and not folder:
                outer, inner = (key, what), (other, other_what)
            else:
                continue
            raise OutputError(None, f"{escape_name(inner[0])} ({inner[1]}) lies inside {escape_name(outer[0])}, "
                                    f"which is given as a file ({outer[1]})", "give each output its own path")

    def _check_parent(self, parent: Path, target: Path) -> None:
        """The nearest existing ancestor of ``target`` must be a writable folder."""
        p = Path(os.path.abspath(parent))
        while True:
            try:
                st = os.stat(p)
                break
            except FileNotFoundError:
                p = p.parent
            except NotADirectoryError:
                p = p.parent
            except OSError as exc:
                raise OutputError(p, f"cannot write here ({exc.strerror or exc})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(p, f"is not a folder, so {escape_name(os.fspath(target))} cannot be written")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(p, f"permission denied: cannot write {escape_name(os.fspath(target))} here")
        # access() says yes for root on /proc, /sys and read-only mounts: make (and remove) a
        # temporary file, so such a place fails now, before any work, not after the whole run
        try:
            fd, probe = tempfile.mkstemp(dir=p, prefix=".weightdiff-probe-")
        except OSError as exc:
            raise OutputError(p, f"cannot write {escape_name(os.fspath(target))} here "
                                 f"({exc.strerror or exc})") from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)

    # -- staging ------------------------------------------------------------------
    def _mkdirs(self, folder: Path) -> None:
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            self._created.append(d)

    def stage(self, target: str | os.PathLike, data: bytes | Callable[[Callable[[bytes], object]], None]) -> Path:
        """Write ``data`` into a temporary beside ``target``; it becomes ``target`` at commit.
        ``data`` may be a function that writes the bytes itself through the one it is given
        (a large document written in pieces).
        A symlink target is followed: the file it points to is replaced, never the link (nor,
        for ``/dev/stdout``, a node in ``/dev``)."""
        shown = Path(target)
        key = os.path.realpath(shown)              # as claim() keys it
        if key not in self._claimed:
            self.claim(shown, f"`{escape_name(shown.name)}`")
        special = key in self._special
        # a pipe or device (``/dev/stdout`` into a pipe resolves to ``/proc/PID/fd/pipe:[N]``, no path at
        # all) is written through the descriptor opened at claim time, staged in the temporary folder
        target = shown if special else Path(os.path.realpath(shown)) if os.path.islink(shown) else shown
        if special:
            self._special[os.path.abspath(target)] = self._special.pop(key)
        try:
            if not special:
                self._mkdirs(target.parent)
            # the pid in the name lets a later run remove what a killed one left (``_sweep_stale``)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                       dir=tempfile.gettempdir() if special else target.parent)
        except OSError as exc:
            raise OutputError(target, f"cannot write here ({exc.strerror or exc})") from None
        self._staged.append((Path(tmp), target))
        try:
            with os.fdopen(fd, "wb") as fh:
                if callable(data):
                    data(fh.write)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
        except OSError as exc:
            raise OutputError(target, f"cannot write ({exc.strerror or exc}); nothing was written") from None
        return shown

    def after_commit(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` once every output is in place (never when the command fails)."""
        self._after.append(fn)

    # -- commit / abort -----------------------------------------------------------
    def commit(self) -> list[Path]:
        """Move every staged file into place (written into non-regular targets); returns the targets.
        Non-regular targets (a FIFO, /dev/full) are written first: they are the ones that can still
        fail here, and then no regular file has been put in place yet. Every target is checked first
        (one that became a folder fails before any rename), and a rename that fails part way puts the
        files already replaced back (their old files kept as hard links until the end)."""
        check_interrupted()

        def special(item: tuple[Path, Path]) -> bool:
            try:
                st = os.stat(item[1])
            except OSError:
                return False
            return not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)

        self._staged.sort(key=lambda item: not special(item))     # stable: the order given otherwise
        for tmp, target in self._staged:      # every destination checked before any is replaced
            if os.path.isdir(target):
                raise OutputError(target, "is a folder now, expected a file name; nothing was written")
        # Each regular target is recorded *before* anything is done to it: [target, its old file kept as a
        # hard link (None: none), the temporary]. Whether the rename happened is read from the disk (the
        # temporary is gone once renamed), not from a list appended after it, so an exception between a
        # rename and the bookkeeping cannot leave a new file that the roll-back takes for not placed.
        # SIGINT/SIGTERM are held while the regular files move (not while a FIFO's reader is awaited: Ctrl-C
        # must still end that): the signal is noted, every placed file is put back, and Interrupted is raised
        # then, so an interrupted commit leaves the old outputs, never a mix.
        backups: list[list] = []
        done: list[Path] = []
        try:
            try:
                for tmp, target in self._staged:
                    try:
                        st = os.stat(target)
                    except OSError:
                        st = None
                    try:
                        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                            fd = self._special.pop(os.path.abspath(target), None)
                            _write_into(_open_special(target) if fd is None else fd, tmp)
                            os.unlink(tmp)
                        else:
                            self._holding = True
                            entry: list = [target, None, tmp]
                            backups.append(entry)
                            if st is not None:
                                _keep_old(target, entry)
                            os.replace(tmp, target)
                    except OSError as exc:
                        raise OutputError(target, f"cannot write ({exc.strerror or exc}); nothing was "
                                                  "written") from None
                    done.append(target)
                if self.signal is not None:         # arrived while the files moved: none of them stays
                    raise Interrupted(self.signal)
            except BaseException:
                _roll_back(backups)
                self._holding = False
                raise
            # every output is in place: the command has done what it was asked, so a signal from here on is
            # held to the end and then dropped (raised during the clean-up it exited 130 "interrupted" with
            # every new output in place and the old files' hard links left behind)
            for _, old, _ in backups:
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(old)
            self._staged.clear()
            self._created.clear()
            self._close_special()
            _sweep_stale(done)
            after, self._after = self._after, []
            for fn in after:
                fn()
            self.signal = None              # held and dropped: the outputs are complete
        finally:
            self._holding = False
        return done

    def _close_special(self) -> None:
        for fd in self._special.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._special.clear()

    def abort(self) -> None:
        """Remove every temporary and every folder made for the outputs."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._staged.clear()
        self._after.clear()
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._created.clear()
        self._close_special()

    # -- context ------------------------------------------------------------------
    def __enter__(self) -> "OutputSet":
        self._depth += 1
        if self._depth == 1:
            self._token = _ACTIVE.set(self)
            self._install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth:
            return
        try:
            ok = exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (0, None))
            if ok:
                try:
                    self.commit()
                except BaseException:
                    self.abort()
                    raise
            else:
                self.abort()
        finally:
            self._restore()
            _ACTIVE.reset(self._token)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        if not self._holding:       # during the commit's renames commit() raises it once they are undone
            raise Interrupted(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is signal.SIG_IGN:
                continue            # ignored by whoever started this process (a shell's background job): kept so
            try:
                self._handlers[s] = signal.signal(s, self._on_signal)
            except (ValueError, OSError):
                pass

    def _restore(self) -> None:
        for s, h in self._handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h)
        self._handlers.clear()


def _keep_old(target: Path, entry: list) -> None:
    """Keep ``target``'s current file as a hard link (``.NAME.PID.XXXXXXXX.tmp``, swept like a temporary if
    the run is killed), so that a failed commit can put it back: its name goes into ``entry[1]`` before the
    link is made (the roll-back checks that it exists), and stays None where links are not supported."""
    for _ in range(8):
        name = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        if os.path.lexists(name):
            continue
        entry[1] = name
        try:
            os.link(target, name)
            return
        except FileExistsError:
            entry[1] = None
            continue
        except OSError:
            entry[1] = None
            return
    entry[1] = None


def _roll_back(backups: list[list]) -> None:
    """Undo the renames of a commit that failed part way: old files back, new files removed (as far as
    the filesystem allows: without hard links an overwritten file cannot come back). ``backups``:
    ``[target, old file's link or None, temporary]`` of every target the commit began to place; a target
    was placed when its temporary is gone, and its old file is kept when the link exists."""
    for target, old, tmp in reversed(backups):
        placed = not os.path.lexists(tmp)
        kept = old is not None and os.path.lexists(old)
        with contextlib.suppress(OSError):
            if kept:
                if placed:
                    os.replace(old, target)
                else:
                    os.unlink(old)
            elif placed:
                os.unlink(target)


def _sweep_stale(targets: list[Path]) -> None:
    """Remove the temporaries a run killed while writing these same outputs left beside them
    (``.NAME.PID.XXXXXXXX.tmp`` of a process that no longer exists; SIGKILL leaves them, nothing can
    catch it). A live writer's temporaries, and files of any other name, are left alone."""
    by_dir: dict[Path, set[str]] = {}
    for t in targets:
        by_dir.setdefault(Path(t).parent, set()).add(Path(t).name)
    stale = re.compile(r"^\.(.+)\.(\d+)\.[A-Za-z0-9_]{8}\.tmp$")
    for d, names in by_dir.items():
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for e in entries:
            m = stale.match(e)
            if (m is None or m.group(1) not in names or int(m.group(2)) == os.getpid()
                    or pid_alive(int(m.group(2)))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(d / e)


def pid_alive(pid: int) -> bool:
    """Whether a process of this number runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _open_special(target: Path) -> int:
    """Open an existing FIFO or device for writing (a FIFO must have a reader already)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OutputError(target, "is a FIFO with no reader") from None
        raise OutputError(target, f"cannot write ({exc.strerror or exc})") from None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def _write_into(fd: int, tmp: Path) -> None:
    """Copy ``tmp`` into an open FIFO or device without replacing the node; closes ``fd``."""
    try:
        with open(tmp, "rb") as src:
            while chunk := src.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``path`` may be ``-`` only at the CLI layer, never here.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, f"cannot write here ({exc.strerror or exc})") from None
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WeightdiffError):
            raise OutputError(path, f"cannot write ({exc.strerror or exc}); nothing was written") from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes | Callable[[Callable[[bytes], object]], None]) -> Path:
    """Write ``data`` to ``path``: staged in the active ``OutputSet``, else atomically now."""
    outs = _ACTIVE.get()
    if outs is not None:
        return outs.stage(path, data)
    outs = OutputSet()
    with outs:
        outs.stage(path, data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8", "backslashreplace"))


def write_text_pieces(path: str | os.PathLike, produce: Callable[[Callable[[str], None]], None]) -> Path:
    """``write_text`` of the text ``produce(write)`` hands to ``write`` piece by piece, encoded
    piece by piece (the same bytes: Python's UTF-8 encoder never joins code points across pieces)."""
    def write_all(put: Callable[[bytes], object]) -> None:
        produce(lambda text: put(text.encode("utf-8", "backslashreplace")))

    return write_bytes(path, write_all)
