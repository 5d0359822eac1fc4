"""Somewhere for numba to cache the kernels when it has nowhere of its own.

Every kernel is ``numba.njit(cache=True)``. numba picks a cache folder when the function is decorated: the
folder of ``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the source, else ``~/.cache/numba``, each only if it can
write there; with none writable it raises ``RuntimeError: cannot cache function ...: no locator available``, at
import. That is an ordinary setup: a package installed by root (or in a read-only image) run by a user whose
home cannot be written (``docker run --user 1000``, HOME=/), and every command stopped before reading a byte.

``ensure()`` (called by each module that decorates with ``cache=True``, before the first decorator) asks numba's
own locators whether one of them can cache a function of this folder; when none can, it points
``NUMBA_CACHE_DIR`` at a private folder under the system's temporary folder, ``weightdiff-numba-<uid>``:
created with mode 0700 and used only if it is a real folder owned by this user that nobody else can write (the
cache holds machine code this process will run: a folder someone else made or can write is never read). When that
name is taken by anything else, a fresh ``mkdtemp`` folder serves this process alone and is removed at exit. The
environment variable is set too, so the precompile child and local Dask workers started from here cache in the
same place.
"""

from __future__ import annotations

import os
import stat
import tempfile

_checked = False
#: the folder ``ensure`` chose (None when numba had a cache of its own, or nothing was chosen)
chosen: str | None = None


def _probe() -> None:      # a function of this folder for numba's locators to place
    pass


def _numba_can_cache() -> bool:
    """Whether one of numba's locators can cache a function of this folder (True when numba's internals are not
    the ones this reads: then numba decides, as it always did)."""
    try:
        from numba.core import caching, config
    except Exception:        # noqa: BLE001
        return True
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if classes is None or os.environ.get("NUMBA_CACHE_LOCATOR_CLASSES") or getattr(config, "DISABLE_JIT", False):
        return True
    for cls in classes:
        try:
            if cls.from_function(_probe, __file__) is not None:
                return True
        except Exception:    # noqa: BLE001  (a locator that fails to place a function places nothing)
            continue
    return False


def _private(folder: str) -> bool:
    """Whether ``folder`` is a real folder (not a link) owned by this user, writable by nobody else, and writable."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return False
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return False
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _fallback_folder() -> str | None:
    base = tempfile.gettempdir()
    uid = os.geteuid() if hasattr(os, "geteuid") else "user"
    folder = os.path.join(base, f"weightdiff-numba-{uid}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        folder = ""
    if folder and _private(folder):
        return folder
    try:                      # the shared name is someone else's, or a link: a folder for this process alone
        import atexit
        import shutil

        own = tempfile.mkdtemp(prefix="weightdiff-numba-")
    except OSError:
        return None
    atexit.register(shutil.rmtree, own, True)
    return own


def ensure() -> str | None:
    """Make sure numba can cache this folder's kernels (see the module's text); returns the folder chosen, None
    when numba had one of its own (or none could be made: numba then raises as it would have)."""
    global _checked, chosen
    if _checked:
        return chosen
    _checked = True
    if _numba_can_cache():
        return None
    folder = _fallback_folder()
    if folder is None:
        return None
    from numba.core import config

    config.CACHE_DIR = folder
    os.environ["NUMBA_CACHE_DIR"] = folder
    chosen = folder
    return folder
