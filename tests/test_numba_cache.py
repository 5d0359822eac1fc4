"""numba with nowhere to cache: a package installed read-only, run by a user whose home cannot be written.

numba raises ``RuntimeError: cannot cache function ...: no locator available`` when a ``cache=True`` function is
decorated and neither ``NUMBA_CACHE_DIR``, the package's ``__pycache__`` nor ``~/.cache/numba`` can be written:
every command failed at import. The tests run a subprocess whose numba finds the package folder and the home
unwritable (their two locators place nothing, as numba's own do when they cannot write), with NUMBA_CACHE_DIR
unset and TMPDIR a folder of the test's.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from weightdiff.kernels import numba_cache

_NOWHERE = """
import json, os, sys
from numba.core import caching
impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
for cls in impl._locator_classes:
    if cls.__name__.lstrip("_") in ("InTreeCacheLocator", "UserWideCacheLocator"):
        cls.from_function = classmethod(lambda cls, f, p: None)     # the package and the home: read-only
import numpy as np
from weightdiff.kernels import assignment, cpu, ggml, ggml_encode, numba_cache   # every cache=True module
col = assignment.linear_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
print(json.dumps({"col": [int(c) for c in col], "chosen": numba_cache.chosen,
                  "env": os.environ.get("NUMBA_CACHE_DIR"), "hits": sum(assignment._hungarian.stats.cache_hits.values()),
                  "misses": sum(assignment._hungarian.stats.cache_misses.values())}))
"""


def _run(tmp, program=_NOWHERE):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_CACHE_LOCATOR_CLASSES")}
    env["TMPDIR"] = str(tmp)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_private_cache_folder_when_numba_has_none_and_the_next_process_loads_from_it(tmp_path):
    first = _run(tmp_path)
    folder = tmp_path / f"weightdiff-numba-{os.geteuid()}"
    assert first["col"] == [1, 0, 2]
    assert first["chosen"] == first["env"] == str(folder)
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert any(p.suffix == ".nbi" for p in folder.rglob("*")), "numba cached nothing there"
    assert first["misses"] == 1 and first["hits"] == 0
    second = _run(tmp_path)
    assert second["chosen"] == str(folder) and second["hits"] == 1 and second["misses"] == 0


@pytest.mark.parametrize("planted", ["writable by all", "a link", "a file"])
def test_a_shared_name_someone_else_could_have_made_is_never_read(tmp_path, planted):
    shared = tmp_path / f"weightdiff-numba-{os.geteuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if planted == "writable by all":
        shared.mkdir()
        shared.chmod(0o777)
    elif planted == "a link":
        shared.symlink_to(elsewhere, target_is_directory=True)
    else:
        shared.write_text("not a folder")
    out = _run(tmp_path)
    assert out["col"] == [1, 0, 2]
    chosen = out["chosen"]
    assert chosen is not None and os.path.dirname(chosen) == str(tmp_path)
    assert os.path.basename(chosen).startswith("weightdiff-numba-") and chosen != str(shared)
    assert not os.path.exists(chosen), "the process's own folder is removed at exit"
    assert not list(elsewhere.iterdir())
    if planted == "writable by all":
        assert not list(shared.iterdir())


def test_nothing_chosen_when_numba_can_cache(monkeypatch):
    # this machine's numba caches in the package's __pycache__ (or NUMBA_CACHE_DIR): nothing to do
    assert numba_cache._numba_can_cache() is True
    monkeypatch.setattr(numba_cache, "_checked", False)
    monkeypatch.setattr(numba_cache, "chosen", None)
    before = os.environ.get("NUMBA_CACHE_DIR")
    assert numba_cache.ensure() is None and os.environ.get("NUMBA_CACHE_DIR") == before


def test_every_caching_module_finds_a_cache_before_it_decorates():
    """A kernel module added later without the call would fail at import where numba has nowhere to cache."""
    from pathlib import Path

    folder = Path(numba_cache.__file__).parent
    caching = [p for p in sorted(folder.glob("*.py")) if p.name != "numba_cache.py" and re.search(r"njit\(cache=True", p.read_text())]
    assert {p.name for p in caching} >= {"cpu.py", "ggml.py", "ggml_encode.py", "assignment.py", "quant.py",
                                         "quant_floor.py"}
    for p in caching:
        text = p.read_text()
        call = min((i for i in (text.find("_ensure_numba_cache()"), text.find("ensure()")) if i >= 0), default=-1)
        assert 0 <= call < re.search(r"njit\(cache=True", text).start(), f"{p.name} decorates with cache=True before numba_cache.ensure()"
