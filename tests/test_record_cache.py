"""--cache DIR: a killed run resumes to the same JSON bytes; a changed input or option misses the cache."""

from __future__ import annotations

import json
import os
import shutil
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
from weightdiff.measure.cache import CACHE_VERSION, RecordCache, _digest, record_from_dict


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


def _save(path: Path, d: dict) -> None:
    """A record file edited and sealed again with the digest of its new content, as a deliberate edit would
    be: what is tested is then what the record holds, not its digest."""
    d.pop("digest", None)
    d["digest"] = _digest(d)
    path.write_text(json.dumps(d))


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
        _save(p, d)
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


@pytest.mark.parametrize("edit", [
    lambda r: r.update(status="unchanged", rel_change=0.0, norm_delta=0.0, frac_changed=0.0,
                       frac_beyond_rounding=0.0, max_abs_delta=0.0, rank=None),
    lambda r: r.update(norm_base=1e308),
    lambda r: r.update(frac_changed=-1e308),
    lambda r: r.update(frac_beyond_rounding=1.5),
    lambda r: r.update(norm_delta=-1.0),
    lambda r: r.update(status="bogus"),
    lambda r: r.update(numel=-4),
])
def test_a_record_with_values_no_measurement_gives_is_measured_again(tmp_path, rng, edit):
    """Records were checked for types only (hostile-input tester): a changed tensor's record rewritten as
    unchanged (its norms left unequal) made a fine-tune read IDENTICAL, norms of 1e308 overflowed the
    roll-up (exit 1), an unknown status read INCONCLUSIVE. Such a record is ignored and measured again."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    first = compare(b, t, cache=str(cache))
    assert first.summary.verdict == "derived"
    for p in _records(cache):
        d = json.loads(p.read_text())
        if d["record"]["status"] == "changed":
            edit(d["record"])
            _save(p, d)
    again = compare(b, t, cache=str(cache))
    assert again.to_json(include_run=False) == first.to_json(include_run=False)


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


def _plant(cache: Path, value: float = 123.0, scale: float | None = None) -> None:
    """A marker in every cached record of a changed tensor: a rerun that uses the cache reports it (an unchanged
    record with a norm_delta would be one no measurement gives, and measured again). ``scale``: the record's own
    norm_delta times it instead, a marker the memo's consistency checks still accept (123 is far outside the
    triangle of the two norms: a memo from it is refused as not written by weightdiff)."""
    for p in _records(cache):
        d = json.loads(p.read_text())
        if d["record"]["status"] == "unchanged":
            continue
        d["record"]["norm_delta"] = value if scale is None else d["record"]["norm_delta"] * scale
        _save(p, d)


def _rewritten(path: Path, tensors: dict) -> None:
    """``path``'s shard rewritten in place with other values of the same size, its times restored
    (what ``cp -p``, ``touch -r``, ``rsync -t`` and ``tar x`` do)."""
    shard = next(path.glob("*.safetensors"))
    st = shard.stat()
    write_checkpoint(path.parent / "new", tensors, dtype="BF16")
    new = next((path.parent / "new").glob("*.safetensors"))
    assert new.stat().st_size == st.st_size
    os.replace(new, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_file_rewritten_with_its_size_and_mtime_kept_misses_the_cache(tmp_path, rng):
    """The key held path, size and mtime only: the old file's numbers came back (with --hash beside
    the new file's sha256)."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    name = compare(b, t, cache=str(cache)).tensors[1].name
    _plant(cache)
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta == 123.0
    base = llama(rng, layers=2, hidden=96, inter=160, vocab=200)
    _rewritten(t, {k: v + rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in base.items()})
    cached = compare(b, t, cache=str(cache))
    assert cached.tensor(name).norm_delta != 123.0
    assert cached.to_json(include_run=False) == compare(b, t).to_json(include_run=False)


def test_two_same_size_folders_swapped_miss_the_cache(tmp_path, rng):
    b, t = _pair(tmp_path, rng)
    other = tmp_path / "other"
    write_checkpoint(other, {k: v + 1e-2 for k, v in llama(rng, layers=2, hidden=96, inter=160, vocab=200).items()},
                     dtype="BF16")
    for f in (*t.iterdir(), *other.iterdir()):      # one archive's times, as tar x leaves them
        os.utime(f, ns=(10**18, 10**18))
    cache = tmp_path / "cache"
    compare(b, t, cache=str(cache))
    os.rename(t, tmp_path / "x")
    os.rename(other, t)
    os.rename(tmp_path / "x", other)
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == compare(b, t).to_json(include_run=False)


def test_with_hash_records_are_keyed_by_the_sha256(tmp_path, rng):
    """--hash computes the sha256 anyway: a copy of the file (another path, inode and times) hits,
    a rewritten one misses, and the file is hashed once."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    name = compare(b, t, cache=str(cache), hash_files=True).tensors[1].name
    _plant(cache)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in t.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    hit = compare(b, copy, cache=str(cache), hash_files=True)
    assert hit.tensor(name).norm_delta == 123.0
    base = llama(rng, layers=2, hidden=96, inter=160, vocab=200)
    _rewritten(copy, {k: v + rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in base.items()})
    fresh = compare(b, copy, hash_files=True).to_json(include_run=False)
    assert compare(b, copy, cache=str(cache), hash_files=True).to_json(include_run=False) == fresh


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "1", '{"v": 4, "key": [], "record": {}}', "NAN_FIELD"])
def test_a_record_of_the_wrong_shape_is_a_miss_and_is_overwritten(tmp_path, rng, text):
    """Valid JSON of another shape crashed every rerun (AttributeError, TypeError: exit 1)."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    want = compare(b, t, cache=str(cache)).to_json(include_run=False)
    for p in _records(cache):
        if text == "NAN_FIELD":
            d = json.loads(p.read_text())
            d["record"]["norm_delta"] = "NaN"
            _save(p, d)
        else:
            p.write_text(text)
    assert compare(b, t, cache=str(cache)).to_json(include_run=False) == want
    for p in _records(cache):       # measured again and written over
        assert json.loads(p.read_text())["record"]["norm_delta"] != "NaN"


def test_a_record_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    """A full cache disk: the write failed with "internal error: OSError" (exit 1) and left a temporary file.
    Now the run finishes with the same results, one warning, and nothing half-written in the cache."""
    import errno
    import json as _json
    import os as _os

    from weightdiff import compare
    from weightdiff.measure import cache as cache_mod

    b, t = _pair_for_disk_full(tmp_path)
    want = _json.loads(compare(b, t).to_json(include_run=False))
    real = _os.fsync

    def full(fd):
        real(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", full)
    got = _json.loads(compare(b, t, cache=str(tmp_path / "c")).to_json(include_run=False))
    got.get("settings", {}).pop("cache", None)
    want.get("settings", {}).pop("cache", None)
    assert got["tensors"] == want["tensors"] and got["summary"] == want["summary"]
    err = capsys.readouterr().err
    assert err.count("warning: --cache") == 1 and "No space left on device" in err and "not written" in err
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def _pair_for_disk_full(tmp_path):
    import numpy as np

    from conftest import write_checkpoint

    rng = np.random.default_rng(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(0, 0.02, (64, 32)).astype(np.float32) for i in range(3)}
    tuned = {k: (v + 1e-3).astype(np.float32) for k, v in base.items()}
    return write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)


def test_bad_input_leaves_no_cache_folder_and_a_bad_place_is_refused(tmp_path, rng):
    # exit 2 means nothing written: the cache folder appears with the first record, not before the inputs
    # are accepted (a tester found `newcache/records/` left by a refused run)
    from click.testing import CliRunner

    from weightdiff.cli import main

    b, _ = _pair(tmp_path, rng)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"")            # an empty file: bad input
    r = CliRunner().invoke(main, ["compare", str(b), str(bad), "--cache", str(tmp_path / "newcache"), "-q"])
    assert r.exit_code == 2 and not (tmp_path / "newcache").exists(), (r.exit_code, r.stderr)
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["compare", str(b), str(b), "--cache", str(tmp_path / "afile" / "c"), "-q"])
    assert r.exit_code == 2 and "is not a folder" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = CliRunner().invoke(main, ["compare", str(b), str(b), "--cache", str(tmp_path / "ok"), "-q"])
    assert r.exit_code == 0 and _records(tmp_path / "ok")


def test_adding_hash_or_a_memo_reads_the_records_of_a_run_without_it(tmp_path, rng):
    """--memo turns --hash on, and --hash keyed records by the sha256 instead of the stat identity: adding
    --memo to a cached command measured every tensor again (resume tester). The key no longer depends on
    the outputs: both ways round, every record is found and none is written."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    name = compare(b, t, cache=str(cache)).tensors[1].name
    _plant(cache)
    count = len(_records(cache))
    assert compare(b, t, cache=str(cache), hash_files=True).tensor(name).norm_delta == 123.0
    assert len(_records(cache)) == count
    # and a hashed run's records are found without --hash
    cache2 = tmp_path / "cache2"
    compare(b, t, cache=str(cache2), hash_files=True)
    _plant(cache2)
    assert compare(b, t, cache=str(cache2)).tensor(name).norm_delta == 123.0
    # the CLI: --memo after --json, same cache: no record added
    from click.testing import CliRunner

    from weightdiff.cli import main

    cache3 = tmp_path / "cache3"
    r = CliRunner().invoke(main, ["compare", str(b), str(t), "--cache", str(cache3), "--json", str(tmp_path / "a.json"),
                                  "-q"])
    assert r.exit_code == 0, r.output
    _plant(cache3, scale=1.25)
    count = len(_records(cache3))
    r = CliRunner().invoke(main, ["compare", str(b), str(t), "--cache", str(cache3), "--json", str(tmp_path / "b.json"),
                                  "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.output
    assert len(_records(cache3)) == count
    before = json.loads((tmp_path / "a.json").read_text())["tensors"][1]["norm_delta"]
    assert json.loads((tmp_path / "b.json").read_text())["tensors"][1]["norm_delta"] == before * 1.25
    assert json.loads((tmp_path / "b.json").read_text())["tuned"]["files"][0]["sha256"]     # hashed all the same


def test_with_hash_a_record_written_for_other_bytes_misses(tmp_path, rng):
    """With --hash a record found by the stat identity is checked against the files' sha256 as hashed now:
    one written for other bytes (a change that left no trace in stat) is measured again; without --hash it is
    trusted on the stat identity, as before."""
    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    name = compare(b, t, cache=str(cache), hash_files=True).tensors[1].name
    by_content = [p for p in _records(cache) if json.loads(p.read_text())["key"] == json.loads(p.read_text())["content"]]
    assert by_content and len(by_content) * 2 == len(_records(cache))
    for p in by_content:            # only the stat-keyed records are left, as if written for other bytes
        p.unlink()
    for p in _records(cache):
        d = json.loads(p.read_text())
        d["content"] = "0" * 64
        d["record"]["norm_delta"] = 123.0
        _save(p, d)
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta == 123.0
    assert compare(b, t, cache=str(cache), hash_files=True).tensor(name).norm_delta != 123.0


def test_an_interrupted_record_write_leaves_no_temporary(tmp_path, rng, monkeypatch):
    """Ctrl-C/SIGTERM while a record was written left ``records/XX/.KEY.PID.tmp`` for good (resume tester):
    put() removed its temporary on OSError only."""
    from weightdiff.fsutil import Interrupted
    from weightdiff.measure import cache as cache_mod

    b, t = _pair(tmp_path, rng)
    cache = tmp_path / "cache"
    real = os.replace

    def interrupted(src, dst, **dir_fds):        # renamed within the record's folder (its descriptor)
        if str(src).endswith(".tmp"):
            raise Interrupted(signal.SIGTERM)
        return real(src, dst, **dir_fds)

    monkeypatch.setattr(cache_mod.os, "replace", interrupted)
    with pytest.raises(Interrupted):
        compare(b, t, cache=str(cache))
    monkeypatch.undo()
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []


def test_opening_a_cache_sweeps_the_temporaries_of_dead_writers(tmp_path):
    """A SIGKILL while a record is written leaves its temporary: the next run removes those of this host's
    dead processes and any a day old, never a live writer's (nor another host's, which it cannot check)."""
    from weightdiff.measure import cache as cache_mod

    folder = tmp_path / "cache" / "records" / "ab"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    key = "ab" + "0" * 62
    host = cache_mod._HOST
    names = {f".{key}.{host}.{dead}.tmp": False, f".{key}.{host}.{os.getppid()}.tmp": True,
             f".{key}.{'f' * 8}.{dead}.tmp": True, f".{key}.{dead}.tmp": True,
             f".{key}.{'e' * 8}.{dead}.tmp": False, f"{key}.json": True}
    for n in names:
        (folder / n).write_text("{")
    old = time.time() - 2 * cache_mod.STALE_SECONDS
    os.utime(folder / f".{key}.{'e' * 8}.{dead}.tmp", (old, old))
    cache_mod.RecordCache(tmp_path / "cache", {})
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n, kept in names.items() if kept)


@pytest.mark.parametrize("sidecar", ["config.json", "quantize_config.json"])
def test_a_changed_config_beside_the_weights_misses_the_cache(tmp_path, rng, sidecar):
    """config.json's quantization_config (an FP8 block size) and adapter_config.json's fan_in_fan_out decide how
    the bytes are read: with them out of the key, a stale DERIVED came back after the config was corrected. An
    output written beside the model (an earlier --json) is no such file and keeps the records."""
    b, t = _pair(tmp_path, rng)
    (t / sidecar).write_text(json.dumps({"model_type": "llama"}))
    cache = tmp_path / "cache"
    name = compare(b, t, cache=str(cache)).tensors[1].name
    _plant(cache)
    (t / "out.json").write_text("{}")
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta == 123.0
    (t / sidecar).write_text(json.dumps({"model_type": "llama", "x": 1}))
    assert compare(b, t, cache=str(cache)).tensor(name).norm_delta != 123.0
    # and with --hash (the content key): the new bytes, not the planted record
    _plant(cache)
    (t / sidecar).write_text(json.dumps({"model_type": "llama", "x": 2}))
    assert compare(b, t, cache=str(cache), hash_files=True).tensor(name).norm_delta != 123.0


def _forge(r: dict) -> None:
    """A changed tensor's record rewritten as a consistent unchanged one (its norms made equal)."""
    r.update(status="unchanged", norm_tuned=r["norm_base"], norm_delta=0.0, rel_change=0.0, cosine=1.0,
             frac_changed=0.0, frac_beyond_rounding=0.0, max_abs_delta=0.0, sign_flips=0, rank=None, quant=None)


def _other_name(r: dict) -> None:
    r.update(name="model.embed_tokens.weight", shape=[])


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_record_is_taken_only_if_it_fits_its_pair_and_its_digest(tmp_path, rng):
    """Records were checked for their own types and values only, never against the pair they are keyed to,
    nor for being the bytes that were written (hostile-input tester, round 4): a forged consistent `unchanged`
    record made a fine-tune read IDENTICAL, `base_index` 5 (IndexError) or a string in `rounding_floor`
    (TypeError) made every rerun exit 1, another tensor's name or an empty shape skewed the scope ("150% of the
    tuned model's parameters"), a numerical rank of -5 was printed and a spectrum of 1e308 overflowed. Each
    such record is measured again and written over: the JSON is the uninterrupted run's, byte for byte."""
    b, t = _pair(tmp_path, rng, layers=1)
    pristine = tmp_path / "pristine"
    want = compare(b, t, cache=str(pristine)).to_json(include_run=False)
    unsealed = [_forge, lambda r: r.update(norm_delta=r["norm_delta"] * 1.5)]
    sealed = [lambda r: r.update(base_index=5),
              lambda r: r.update(base_index=-1),
              lambda r: r.update(rounding_floor={"BF16": "x"}),
              lambda r: r.update(rounding_floor={"BF16": 1e308}),
              _other_name,
              lambda r: r.update(shape=[10 ** 12, 10 ** 12], numel=10 ** 24),
              lambda r: r.update(base_name="model.norm.weight"),
              lambda r: r.update(dtype_tuned="F32"),
              lambda r: r.update(status="added"),
              lambda r: r["rank"].update(numerical_rank=-5),
              lambda r: r["rank"].update(spectrum=[1e308] * 8),
              lambda r: r["rank"].update(stable_rank="x"),
              lambda r: r.update(quant={"within": "yes"}),
              lambda r: r.update(cosine=7.0)]
    for i, (edit, seal) in enumerate([(e, False) for e in unsealed] + [(e, True) for e in sealed]):
        cache = tmp_path / f"cache{i}"
        shutil.copytree(pristine, cache)
        edited = 0
        for p in _records(cache):
            d = json.loads(p.read_text())
            if d["record"]["status"] == "changed" and d["record"]["rank"] is not None:
                edit(d["record"])
                edited += 1
                if seal:
                    _save(p, d)
                else:
                    p.write_text(json.dumps(d))
        assert edited, i
        assert compare(b, t, cache=str(cache)).to_json(include_run=False) == want, i
        # measured again and written over: the rerun finds every record
        assert [p.read_bytes() for p in _records(cache)] == [p.read_bytes() for p in _records(pristine)], i


def test_a_valid_record_is_read_back_as_written(tmp_path, rng):
    """The digest and the pair check take nothing from a record written by weightdiff: a rerun reads every
    record (the measuring code is never reached) and gives the same bytes."""
    from weightdiff.measure import compute

    b, t = _pair(tmp_path, rng, layers=1)
    cache = tmp_path / "cache"
    want = compare(b, t, cache=str(cache)).to_json(include_run=False)
    before = [p.read_bytes() for p in _records(cache)]
    real = compute.compute_pair
    calls = []
    compute.compute_pair = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert compare(b, t, cache=str(cache)).to_json(include_run=False) == want
    finally:
        compute.compute_pair = real
    assert calls == [] and [p.read_bytes() for p in _records(cache)] == before
    assert all(json.loads(x)["v"] == CACHE_VERSION == 8 and "digest" in json.loads(x) for x in before)


def test_a_record_subfolder_that_is_a_symlink_is_refused(tmp_path, rng):
    """`records/<xx>` as a symbolic link was written through: records landed outside --cache DIR (hostile-input
    tester, round 4). A link there (or for records/ itself) is one clear line and exit 2 before anything is
    read; nothing is written, outside or in."""
    b, t = _pair(tmp_path, rng, layers=1)
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    compare(b, t, cache=str(cache))
    sub = _records(cache)[0].parent
    shutil.rmtree(sub)
    elsewhere.mkdir()
    sub.symlink_to(elsewhere, target_is_directory=True)
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--cache", str(cache),
                        "--json", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "symbolic link" in r.stderr and sub.name in r.stderr
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "o.json").exists()
    records = cache / "records"
    shutil.rmtree(records)
    records.symlink_to(elsewhere, target_is_directory=True)
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--cache", str(cache)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "symbolic link" in r.stderr and list(elsewhere.iterdir()) == []


def test_a_link_made_in_the_cache_during_a_run_is_not_followed(tmp_path):
    """A symbolic link put into the cache after it was opened (another worker sharing the folder): a record is
    neither read nor written through it; the write stops the run's writes with the one warning."""
    from weightdiff.measure.cache import CacheError
    from weightdiff.records import TensorRecord

    cache = RecordCache(tmp_path / "c", {})
    rec = TensorRecord("w", "w", "added", [2], None, None, "F32", 2, 0, compared="none")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "c" / "records").mkdir(parents=True)
    (tmp_path / "c" / "records" / "ab").symlink_to(elsewhere, target_is_directory=True)
    cache.put("ab" + "0" * 62, rec)
    assert list(elsewhere.iterdir()) == [] and cache.unwritten == 1 and "symbolic link" in cache.write_error
    # a record found through a link (a subfolder, or the record file itself) is not one of this cache
    key = "ab" + "0" * 62
    other = RecordCache(tmp_path / "d", {})
    other.put(key, rec)
    assert other.get(key) is not None
    (elsewhere / f"{key}.json").write_bytes(other._path(key).read_bytes())
    assert cache.get(key) is None
    moved = tmp_path / "moved.json"
    other._path(key).rename(moved)
    other._path(key).symlink_to(moved)
    assert other.get(key) is None
    with pytest.raises(CacheError, match="symbolic link"):
        RecordCache(tmp_path / "c", {})
