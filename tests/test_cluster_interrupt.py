"""Ctrl-C during `compare --workers N`: one line, no worker tracebacks.

A terminal sends SIGINT to the whole foreground process group: every Dask worker process printed its own
KeyboardInterrupt and CancelledError tracebacks (about 67 lines) before "interrupted" (found by the tester of
resumable runs). The workers now start with SIGINT ignored; this process stops the cluster.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import write_checkpoint

pytest.importorskip("distributed")


def _group(pgid: int) -> list[int]:
    """The processes of a process group (Linux /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                out.append(int(d))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process groups read from /proc")
def test_ctrl_c_with_workers_prints_one_line(tmp_path):
    rng = np.random.default_rng(0)
    base = {f"model.layers.{i}.self_attn.{p}.weight": rng.normal(0, 0.02, (768, 768)).astype(np.float32)
            for i in range(12) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    tuned = {k: (v + 1e-3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    cmd = [sys.executable, "-c", "from weightdiff.cli import main; main()", "compare", str(tmp_path / "b"),
           str(tmp_path / "t"), "--json", str(tmp_path / "r.json"), "-q", "--workers", "2", "--subspace"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and len(_group(p.pid)) < 3:
        time.sleep(0.1)                             # until the worker processes run (this one and two more)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)                 # what Ctrl-C in a terminal does
    err = p.communicate(timeout=120)[1].decode()
    if p.returncode == 0:
        pytest.skip("the comparison ended before the interrupt (a fast machine)")
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.json").exists()
