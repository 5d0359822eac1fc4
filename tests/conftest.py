"""Shared fixtures: a seeded rng and writers of real safetensors checkpoints in tmp folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# The property tests explore the same examples on every run: a red CI must be reproducible, and a
# new failing example is found by running with HYPOTHESIS_PROFILE=explore (random, more examples).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))

from weightdiff.io.safetensors_write import save_checkpoint, save_file, to_storage

# A suite started as a background job of a non-interactive shell (``pytest ... &`` in a script) inherits SIGINT
# ignored, and so does every process it starts: the tests of Ctrl-C (a run interrupted exits 130 and writes
# nothing) then saw their own signal ignored and failed. They test what a terminal's Ctrl-C does, so the suite
# takes the terminal's default here (a caught signal is reset to the default across exec, so the processes the
# tests start have it too); the test of a process started with SIGINT ignored sets that up itself.
import signal as _signal

if _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def pytest_configure(config) -> None:
    """Under pytest-xdist, the controller rebuilds each warning a worker reports by importing the module of its
    category (torch.jit for a TracerWarning, peft for a PeftWarning), on the receiving thread of that worker: two
    such warnings at once imported torch from two threads, one of them got the module half-initialised ("partially
    initialized module 'torch' has no attribute 'jit'"), and the run ended in INTERNALERROR and a segmentation
    fault. The controller rebuilds them one at a time."""
    if hasattr(config, "workerinput"):
        return                                  # a worker: it sends warnings, it does not rebuild them
    try:
        from xdist import workermanage
    except ImportError:
        return
    import threading

    real = getattr(workermanage, "unserialize_warning_message", None)
    if real is None or getattr(real, "_one_at_a_time", False):
        return
    lock = threading.Lock()

    def one_at_a_time(data):
        with lock:
            return real(data)

    one_at_a_time._one_at_a_time = True
    workermanage.unserialize_warning_message = one_at_a_time


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def write_checkpoint(directory: Path, tensors: dict, shards: int = 1, dtype: str | None = None,
                     metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name -> float array, or (dtype, raw)) as a checkpoint folder.

    ``dtype`` ("BF16", "F16", "F32", "F8_E4M3", ...) casts every float array first.
    """
    if dtype is not None:
        tensors = {k: (dtype, to_storage(v, dtype)) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
                   for k, v in tensors.items()}
    return save_checkpoint(directory, tensors, shards=shards, metadata=metadata)


@pytest.fixture
def checkpoint_writer(tmp_path):
    def _write(name: str, tensors: dict, **kw) -> Path:
        return write_checkpoint(tmp_path / name, tensors, **kw)
    return _write


__all__ = ["write_checkpoint", "save_file"]


def cli(*args) -> tuple[int, str, str]:
    """``weightdiff ARGS`` in this process (paths may be Path): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from weightdiff.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error(rc: int, stderr: str) -> str:
    """The one line of a bad-input failure (exit 2, ``error: ...``, no traceback), checked."""
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, (rc, stderr)
    return lines[0]
