"""--cache DIR: a killed run resumes to the same JSON bytes; a changed input or option misses the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.measure.cache import RecordCache, record_from_dict


def _pair(tmp_path: Path, rng, layers: int = 2) -> tuple[Path, Path]:
    base = llama(rng, layers=layers, hidden=96, inter=160, vocab=200)
    tuned = {k: v + rng.normal(0, 2e-3, v.shape).astype(np.float32) for k, v in base.items()}
    tuned["model.norm.weight"] = base["model.norm.weight"]           # one unchanged tensor
    write_checkpoint(tmp_path / "base", base, dtype="BF16")
    write_checkpoint(tmp_path / "tuned", tuned, dtype="BF16")
    return tmp_path / "base", tmp_path / "tuned"


def _body(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("run")
    return d


def _records(cache: Path) -> list[Path]:
    return sorted((cache / "records").glob("*/*.json"))


def test_records_round_trip_exactly(tmp_path, rng):
    b, t = _pair(tmp_path, rng)
    res = compare(b, t)
    for rec in res.tensors:
        d = rec.to_dict()
        assert record_from_dict(json.loads(json.dumps(d, allow_nan=True))).to_dict() == d


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, rng):
    b, t = _pair(tmp_path, rng, layers=8)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    plain = tmp_path / "plain.json"
    subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--json", str(plain)],
                   check=True, env=env, capture_output=True)
    cache = tmp_path / "cache"
    out = tmp_path / "resumed.json"
    cmd = [sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--json", str(out), "--cache", str(cache)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_records(cache)) < 12 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_records(cache))
    total = len(_body(plain)["tensors"])
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert 0 < done < total, f"the kill came at {done} of {total} records"
    for p in (cache / "records").glob("*/*.json"):      # whatever is there parses: nothing half-written
        json.loads(p.read_text())
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert len(_records(cache)) == total
    assert json.dumps(_body(out)) == json.dumps(_body(plain))
    assert out.read_text().split('"run"')[0] == plain.read_text().split('"run"')[0]


def test_the_cache_is_used_only_for_the_same_inputs_and_options(tmp_path, rng):
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache))
    name = first.tensors[1].name
    # plant a marker in every cached record: a rerun that uses the cache reports it
    for p in _records(cache):
        d = json.loads(p.read_text())
        d["record"]["norm_delta"] = 123.0
        p.write_text(json.dumps(d))
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta == 123.0
    assert json.dumps(first.to_dict(include_run=False)) != json.dumps(
        compare(b, t, cache=str(cache)).to_dict(include_run=False))
    # another option that changes records: measured again
    assert compare(b, t, cache=str(cache), rank_k=8).tensor(name).norm_delta != 123.0
    # the same file rewritten (new mtime): measured again
    shard = next(t.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta != 123.0
    # a torn or foreign file is ignored, not trusted
    p = _records(cache)[0]
    p.write_text(p.read_text()[:40])
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta != 123.0


def test_the_cache_folder_is_not_in_the_json(tmp_path, rng):
    b, t = _pair(tmp_path, rng)
    a = compare(b, t).to_json(include_run=False)
    c = compare(b, t, cache=str(tmp_path / "c")).to_json(include_run=False)
    assert a == c and "cache" not in json.loads(c)["settings"]


def test_an_unusable_cache_folder_is_one_clear_error(tmp_path, rng):
    b, t = _pair(tmp_path, rng)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--cache", str(blocker)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--cache" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
