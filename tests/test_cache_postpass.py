"""--cache DIR covers the tensors measured again after the pass, beneath the reparametrisations found.

At 70B widths the post-pass (a rotation, folded gains, rescaled or reordered units undone, then each tensor
measured again) took 10-20 minutes and none of it was kept: a kill during it redid all of it, and so did a
second run with other outputs. Each record measured again is now stored as it finishes, under its pair's key
plus the undo itself: a run killed during the post-pass resumes to the same JSON bytes, measuring only the rest;
another input, option or undo misses; a record torn, edited or not fitting its pair is measured again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from test_record_cache import _body, _records, _save
from test_rotation import _orthogonal, _rotated, _tuned
from weightdiff import compare
from weightdiff.measure import compute as mc
from weightdiff.measure.cache import RecordCache


def _rotated_pair(tmp_path: Path, rng) -> tuple[Path, Path]:
    """A fine-tune whose residual stream was rotated and its norms folded (QuaRot): 30 matrices measured again
    beneath the rotation, 9 norms beneath the fold."""
    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    t = write_checkpoint(tmp_path / "tuned", _rotated(_tuned(base), _orthogonal(128)))
    return b, t


def _permuted_pair(tmp_path: Path, rng) -> tuple[Path, Path]:
    """Neurons reordered with up rows and down columns rescaled (a gated MLP computes the same), then fine-tuned:
    measured again beneath the reordering (GatheredSide) and the rescale (RotatedSide with an order)."""
    base = llama(rng, layers=2)
    r = np.random.default_rng(9)
    t = dict(base)
    for i in range(2):
        p = f"model.layers.{i}."
        perm, c = r.permutation(256), r.uniform(0.5, 2.0, 256)
        t[p + "mlp.gate_proj.weight"] = base[p + "mlp.gate_proj.weight"][perm]
        t[p + "mlp.up_proj.weight"] = (base[p + "mlp.up_proj.weight"] * c[:, None])[perm]
        t[p + "mlp.down_proj.weight"] = (base[p + "mlp.down_proj.weight"] / c[None, :])[:, perm]
    t = {k: v.astype(np.float32) for k, v in t.items()}
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", t)


def _post(cache: Path) -> list[Path]:
    """The record files of tensors measured again after the pass."""
    return [p for p in _records(cache) if "post" in json.loads(p.read_text())]


def _outcomes(cache: Path) -> list[Path]:
    """The files of the checks' outcomes (not records: ``.checks``, not ``.json``)."""
    return sorted((cache / "records").glob("*/*.checks"))


@pytest.fixture
def counted(monkeypatch):
    """The names of the tensors measured again (``remeasure`` calls) in this process."""
    calls: list[str] = []
    orig = mc.remeasure

    def remeasure(pair, *args, **kwargs):
        calls.append(pair.tuned_name)
        return orig(pair, *args, **kwargs)
    monkeypatch.setattr(mc, "remeasure", remeasure)
    return calls


#: a CLI run in a subprocess: counts its remeasure calls into $COUNT_TO, kills itself with SIGKILL once $KILL_AFTER
#: records of the post-pass are final (stored, with a cache)
_SCRIPT = """
import atexit, os, signal, sys
import weightdiff.comparison as c
import weightdiff.measure.compute as mc
calls = []
orig_remeasure = mc.remeasure
def remeasure(pair, *a, **k):
    calls.append(pair.tuned_name)
    return orig_remeasure(pair, *a, **k)
mc.remeasure = remeasure
checks = []
orig_checks = c.reparametrisations
def reparametrisations(*a, **k):
    checks.append(1)
    return orig_checks(*a, **k)
c.reparametrisations = reparametrisations
atexit.register(lambda: open(os.environ["COUNT_TO"], "w").write(f"{len(calls)} {len(checks)}"))
kill_after = int(os.environ.get("KILL_AFTER") or 0)
orig_record = c.Again.record
done = []
def record(self, *a, **k):
    rec = orig_record(self, *a, **k)
    done.append(rec.name)
    if len(done) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return rec
c.Again.record = record
from weightdiff.cli import main
main(sys.argv[1:])
"""


def _run(args: list, tmp_path: Path, kill_after: int = 0) -> tuple[int, int, int]:
    """(exit status, tensors measured again, times the checks ran) of ``weightdiff ARGS`` in a subprocess."""
    count = tmp_path / "count"
    count.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "COUNT_TO": str(count), "KILL_AFTER": str(kill_after),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, args)], env=env, capture_output=True)
    done, checks = map(int, count.read_text().split()) if count.exists() else (-1, -1)
    return proc.returncode, done, checks


def test_a_run_killed_during_the_post_pass_resumes_to_the_same_bytes(tmp_path, rng):
    b, t = _rotated_pair(tmp_path, rng)
    plain, out, cache = tmp_path / "plain.json", tmp_path / "resumed.json", tmp_path / "cache"
    rc, total, _ = _run(["compare", b, t, "--json", plain], tmp_path)
    assert rc == 0 and total == 39                      # 30 matrices beneath the rotation, 9 norms beneath the fold
    cmd = ["compare", b, t, "--json", out, "--cache", cache]
    rc, _, _ = _run(cmd, tmp_path, kill_after=12)       # killed during the post-pass, 12 records of it final
    tensors = len(_body(plain)["tensors"])
    assert rc == -signal.SIGKILL and not out.exists()
    # the pass's records, the checks' outcome, 12 records measured again
    assert len(_post(cache)) == 12 and len(_outcomes(cache)) == 1 and len(_records(cache)) == tensors + 12
    for p in _records(cache):                            # whatever is there parses: nothing half-written
        json.loads(p.read_text())
    rc, again, checks = _run(cmd, tmp_path)
    assert rc == 0 and again == total - 12 and checks == 0      # only the rest measured again, no check run
    assert len(_post(cache)) == total
    assert json.dumps(_body(out)) == json.dumps(_body(plain))
    assert out.read_text().split('"run"')[0] == plain.read_text().split('"run"')[0]
    # a second run with other outputs measures nothing again, and writes the same results
    csv = tmp_path / "out.csv"
    rc, again, checks = _run([*cmd[:3], "--json", tmp_path / "second.json", "--csv", csv, "--cache", cache],
                             tmp_path)
    assert rc == 0 and again == 0 and checks == 0 and csv.exists()
    assert json.dumps(_body(tmp_path / "second.json")) == json.dumps(_body(plain))


@pytest.mark.parametrize("make", [_rotated_pair, _permuted_pair])
def test_a_rerun_takes_the_post_pass_from_the_cache(tmp_path, rng, counted, make):
    b, t = make(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache))
    assert counted and len(_post(cache)) == len(counted)
    kinds = {json.loads(p.read_text())["post"] for p in _post(cache)}
    assert kinds == ({"measure_undone", "measure_folded_norms"} if make is _rotated_pair else {"measure_undone"})
    counted.clear()
    again = compare(b, t, cache=str(cache))
    assert counted == []
    assert again.to_json(include_run=False) == first.to_json(include_run=False)
    assert first.to_json(include_run=False) == compare(b, t).to_json(include_run=False)


def test_the_cached_post_pass_is_used_only_for_the_same_inputs_and_options(tmp_path, rng, counted):
    b, t = _rotated_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache))
    planted = []
    for p in _post(cache):          # a marker in every record measured again: a rerun that uses one reports it
        d = json.loads(p.read_text())
        if d["record"]["status"] == "changed":
            d["record"]["norm_delta"] = 123.0
            _save(p, d)
            planted.append(d["record"]["name"])
    assert planted
    name = planted[0]
    assert first.tensor(name).norm_delta != 123.0
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta == 123.0
    # another option that changes records: measured again
    counted.clear()
    assert compare(b, t, cache=str(cache), rank_k=8).tensor(name).norm_delta != 123.0
    assert name in counted
    # the tuned file rewritten (new mtime and ctime): measured again
    shard = next(t.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta != 123.0
    # so is the base
    shard = next(b.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    counted.clear()
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta != 123.0
    assert len(counted) == 39


def test_the_undo_itself_is_in_the_key(tmp_path, rng):
    """Two undos of one pair (another rotation, by one bit; another order; another note) are other keys, and
    none is the pass's key of the pair."""
    from weightdiff.io.checkpoint import locate
    from weightdiff.pairing.plan import plan

    b, t = _rotated_pair(tmp_path, rng)
    base, tuned = locate(b), locate(t)
    pair = next(p for p in plan([base], tuned).pairs if p.tuned_name == "model.layers.0.mlp.up_proj.weight")
    cache = RecordCache(tmp_path / "cache", {"x": 1})
    r = _orthogonal(128)
    r2 = r.copy()
    r2[3, 5] = np.nextafter(r2[3, 5], 2.0)

    def post(rot, note="n", index=None):
        return {"undo": "measure_undone", "rotate": ["in", cache.array_id(rot), None], "note": note,
                "index": cache.array_id(index)}
    keys = {cache.key(pair, [base], tuned), cache.key(pair, [base], tuned, post=post(r)),
            cache.key(pair, [base], tuned, post=post(r2)), cache.key(pair, [base], tuned, post=post(r, "m")),
            cache.key(pair, [base], tuned, post=post(r, index=np.arange(4))),
            cache.key(pair, [base], tuned, post=post(r, index=np.arange(4)[::-1].copy()))}
    assert len(keys) == 6
    assert cache.key(pair, [base], tuned, post=post(r)) == cache.key(pair, [base], tuned, post=post(r.copy()))
    # another base tensor it reads (another expert's) is in the key by its file's identity
    with_read = {**post(r), "reads": ["model.layers.1.mlp.up_proj.weight"]}
    assert cache.key(pair, [base], tuned, post=with_read) not in keys


def _tear(d: dict, p: Path) -> None:
    p.write_text(p.read_text()[:60])


def _unsealed(d: dict, p: Path) -> None:
    d["record"]["norm_delta"] = 0.5                    # edited without its digest recomputed
    p.write_text(json.dumps(d))


def _sealed(edit):
    def run(d: dict, p: Path) -> None:
        edit(d["record"])
        _save(p, d)
    return run


_CORRUPT = [
    _tear, _unsealed,
    _sealed(lambda r: r.update(name="model.layers.1.mlp.up_proj.weight")),        # another tensor's
    _sealed(lambda r: r.update(base_name="model.layers.3.mlp.up_proj.weight")),
    _sealed(lambda r: r.update(dtype_base="F64")),                               # the rotated side's dtype
    _sealed(lambda r: r.update(base_shape=[1, 1])),
    _sealed(lambda r: r.update(status="added")),
    _sealed(lambda r: r.update(norm_delta=-1.0)),
    _sealed(lambda r: r.update(cosine=3.0)),
    _sealed(lambda r: r.update(rank={"bogus": 1})),
]


def test_a_corrupted_post_pass_record_is_measured_again_never_trusted(tmp_path, rng, counted):
    """Torn, edited without its digest, another tensor's, another base name, dtype, shape or status than the pair
    measured again gives, values no measurement gives: each such record of the post-pass is measured again and
    written over, never a result."""
    b, t = _rotated_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache)).to_json(include_run=False)
    files = {json.loads(p.read_text())["record"]["name"]: p for p in _post(cache)}
    names = sorted(n for n in files if n.endswith("proj.weight"))[:len(_CORRUPT)]
    assert len(names) == len(_CORRUPT)
    for name, corrupt in zip(names, _CORRUPT):
        corrupt(json.loads(files[name].read_text()), files[name])
    counted.clear()
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert sorted(counted) == names
    # each written over with the record measured again: the next run takes them all
    assert all(json.loads(files[n].read_text())["record"]["name"] == n for n in names)
    counted.clear()
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first and counted == []


@pytest.fixture
def checks_run(monkeypatch):
    """How many times the checks after the pass ran (``reparametrisations``) in this process."""
    import weightdiff.comparison as c

    runs: list[int] = []
    orig = c.reparametrisations

    def counting(*args, **kwargs):
        runs.append(1)
        return orig(*args, **kwargs)
    monkeypatch.setattr(c, "reparametrisations", counting)
    return runs


@pytest.mark.parametrize("make", [_rotated_pair, _permuted_pair])
def test_what_the_checks_found_is_taken_from_the_cache(tmp_path, rng, checks_run, make):
    b, t = make(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache))
    assert len(checks_run) == 1 and len(_outcomes(cache)) == 1
    again = compare(b, t, cache=str(cache))
    assert len(checks_run) == 1                          # not run again
    assert again.to_json(include_run=False) == first.to_json(include_run=False)
    # another option: its own checks
    compare(b, t, cache=str(cache), rank_k=8)
    assert len(checks_run) == 2


def _arrays_file(cache: Path, outcome: Path) -> Path:
    from weightdiff.measure.cache import _arrays_key

    key = _arrays_key(outcome.stem)
    return cache / "records" / key[:2] / f"{key}.npz"


def _edit_outcome(edit):
    def run(cache: Path, p: Path) -> None:
        d = json.loads(p.read_text())
        edit(d["outcome"])
        _save(p, d)
    return run


def _tear_arrays(cache: Path, p: Path) -> None:
    a = _arrays_file(cache, p)
    a.write_bytes(a.read_bytes()[:100])


def _flip_array_byte(cache: Path, p: Path) -> None:
    a = _arrays_file(cache, p)
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 1
    a.write_bytes(bytes(data))


def _index_out_of_range(o: dict) -> None:
    o["undo"][0]["record"] = 10_000


@pytest.mark.parametrize("corrupt", [
    lambda cache, p: p.write_text(p.read_text()[:50]),                  # torn outcome
    _tear_arrays, _flip_array_byte,
    lambda cache, p: _arrays_file(cache, p).unlink(),
    _edit_outcome(lambda o: o.update(records="0" * 64)),                 # found from other records
    _edit_outcome(_index_out_of_range),
    _edit_outcome(lambda o: o["undo"][0].update(name="model.norm.weight")),
    _edit_outcome(lambda o: o["undo"][0].update(source="no.such.tensor")),
    _edit_outcome(lambda o: o["undo"][0].update(rotate=["sideways", None, None])),
    _edit_outcome(lambda o: o.update(found="x")),
], ids=["torn", "arrays-torn", "arrays-byte", "arrays-gone", "records", "index", "name", "source", "rotate", "found"])
def test_a_corrupted_outcome_of_the_checks_runs_them_again(tmp_path, rng, checks_run, corrupt):
    b, t = _rotated_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache)).to_json(include_run=False)
    (outcome,) = _outcomes(cache)
    corrupt(cache, outcome)
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert len(checks_run) == 2                         # run again, and written over
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert len(checks_run) == 2


def test_an_order_out_of_range_in_a_stored_outcome_is_refused(tmp_path, rng, checks_run):
    """An outcome whose arrays were rewritten consistently (size and sha256 recomputed) with an order past the
    source's units: refused, not an IndexError in the measurement."""
    import io

    b, t = _permuted_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache)).to_json(include_run=False)
    (outcome,) = _outcomes(cache)
    path = _arrays_file(cache, outcome)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    d = json.loads(outcome.read_text())
    k = next(u["index"] for u in d["outcome"]["undo"] if u["index"] is not None)
    arrays[k] = arrays[k] + 10_000
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    import hashlib

    d["arrays"]["size"], d["arrays"]["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    _save(outcome, d)
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert len(checks_run) == 2


def test_a_previous_runs_checks_put_the_post_pass_in_the_pass_eta(tmp_path, rng):
    """A previous run's checks say how much is measured again after the pass: counted in its ETA, unless that run
    stored all of it (a resumed run's ETA counted minutes for records it then read from the cache)."""
    b, t = _rotated_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    told: list = []

    class Progress:
        def __call__(self, done, total, name):
            pass

        def expect(self, n):
            told.append(n)
    compare(b, t, cache=str(cache), progress=Progress())
    assert told == []                                   # nothing known before the first run's checks
    done = list(cache.rglob("*.done"))
    assert len(done) == 1                               # every tensor measured again is stored: noted so
    compare(b, t, cache=str(cache), progress=Progress())
    assert told == []                                   # they come from the cache: no time for them in the ETA
    done[0].unlink()                                    # as a run killed during the post-pass leaves it
    compare(b, t, cache=str(cache), progress=Progress())
    # the 30 matrices measured again beneath the rotation: embedding and head, then q, k, v, o, gate, up, down x 4
    n = 2 * 512 * 128 + 4 * (4 * 128 * 128 + 3 * 256 * 128)
    assert told == [n]
    done = list(cache.rglob("*.done"))
    text = done[0].read_text()
    done[0].write_text(text.replace('"outcome": "', '"outcome": "0'))     # a note of another outcome
    compare(b, t, cache=str(cache), progress=Progress())
    assert told == [n, n]
    # and the progress line counts them in the pass's ETA
    from weightdiff.cli_options import _checked

    assert hasattr(_checked(Progress()), "expect")


def test_an_outcome_larger_than_a_record_is_read_back(tmp_path, rng, checks_run, monkeypatch):
    """The checks' outcome grows with the tensors measured again (500-600 bytes each: about 25 MB for a MoE of 58
    layers x 256 experts reordered): one past RECORD_CAP was not read back, and a resumed run ran its checks again.
    It has a cap of its own (OUTCOME_CAP); past that it is still refused."""
    from weightdiff.measure import cache as wcache

    b, t = _rotated_pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache)).to_json(include_run=False)
    (outcome,) = _outcomes(cache)
    monkeypatch.setattr(wcache, "RECORD_CAP", outcome.stat().st_size - 1)
    assert max(p.stat().st_size for p in _post(cache)) < wcache.RECORD_CAP      # the records still fit theirs
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert len(checks_run) == 1
    monkeypatch.setattr(wcache, "OUTCOME_CAP", outcome.stat().st_size - 1)
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == first
    assert len(checks_run) == 2


def test_a_run_killed_during_the_checks_resumes_past_its_fits(tmp_path, rng, monkeypatch):
    """The rotation's fits are kept as each ends (``Again.fit``): at 70B widths one is minutes to hours on a CPU,
    and a run killed during the checks ran them all again. Resumed, it fits only what it had not; the same JSON."""
    from weightdiff.measure import rotation as rot
    from weightdiff.records import dumps

    b, t = _rotated_pair(tmp_path, rng)
    real = rot.Rotation.solve
    calls: list = []

    def counted(self):
        calls.append(1)
        return real(self)
    monkeypatch.setattr(rot.Rotation, "solve", counted)
    plain = dumps(compare(b, t).to_dict(include_run=False))
    fits = len(calls)
    assert fits >= 2                                    # fitted, then refitted on what R explains

    def killed(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self)
    calls.clear()
    monkeypatch.setattr(rot.Rotation, "solve", killed)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        compare(b, t, cache=str(cache))
    assert len(list(cache.rglob("*.fit"))) == 1 and not list(cache.rglob("*.checks"))
    calls.clear()
    monkeypatch.setattr(rot.Rotation, "solve", counted)
    assert dumps(compare(b, t, cache=str(cache)).to_dict(include_run=False)) == plain
    assert len(calls) == fits - 1                       # the first fit read back, the others made
    for p in cache.rglob("*.checks"):                   # the checks run again (an outcome written over): no fit
        p.unlink()
    calls.clear()
    assert dumps(compare(b, t, cache=str(cache)).to_dict(include_run=False)) == plain and calls == []
