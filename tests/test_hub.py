"""Hub repo ids as checkpoints, against the Hub-compatible server of tests/hub_server.py on
127.0.0.1 (HF_ENDPOINT pointed at it, HF_HOME in a tmp folder), through the real
huggingface_hub client: resolution by id, by @revision, from a pre-filled cache offline,
streamed reads that store nothing and give the same JSON as a download, provenance
screening that reads only the sampled rows, and one-line errors with exit code 2."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("huggingface_hub")

import weightdiff
from weightdiff.lineage import lineage
from weightdiff.provenance import provenance
from weightdiff.io import hub_http, hub_stream
from weightdiff.cli import main
from weightdiff.errors import CheckpointError
from weightdiff.io.hub import hub_spelling, parse_ref
from weightdiff.options import HubOptions
from conftest import write_checkpoint
from hub_server import TOKEN, HubServer
from models import llama, low_rank_update

SHAPE = dict(layers=2, hidden=64, inter=128, vocab=256)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def _tune(tensors: dict, seed: int, rel: float = 0.02) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (low_rank_update(rng, v, 4, rel=rel) if v.ndim == 2 else v) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepos")
    base = llama(np.random.default_rng(7), **SHAPE)
    srv = HubServer()
    srv.local = {}
    for name, tensors, shards in [("base", base, 1), ("tuned", _tune(base, 1), 2), ("sibling", _tune(base, 2), 1),
                                  ("independent", llama(np.random.default_rng(99), **SHAPE), 1),
                                  ("stranger", llama(np.random.default_rng(123), **SHAPE), 1)]:
        d = write_checkpoint(root / name, tensors, shards=shards, dtype="BF16")
        srv.local[name] = d
        srv.commit(f"org/{name}", {**_files(d), "config.json": b'{"model_type": "llama"}', "README.md": b"# x"})
    # org/tuned: tag v1 is the fine-tune above; main moved on to a further step
    srv.v1 = srv.repos["org/tuned"].branches["main"]
    srv.repos["org/tuned"].tags["v1"] = srv.v1
    d2 = write_checkpoint(root / "tuned2", _tune(base, 5, rel=0.2), dtype="BF16")
    srv.main2 = srv.commit("org/tuned", {**_files(d2), "config.json": b"{}"}, branch="main")
    srv.local["tuned2"] = d2
    srv.commit("org/multi", {f"sub/{k}": v for k, v in _files(srv.local["sibling"]).items()} | {"README.md": b"x"})
    srv.commit("org/gated", _files(srv.local["base"]), gated=True)
    srv.commit("org/private", _files(srv.local["base"]), private=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    srv.commit("org/st", {**_files(srv.local["base"]), "modules.json": json.dumps(modules).encode(),
                          "2_Dense/config.json": b"{}",
                          "2_Dense/model.safetensors": (srv.local["base"] / "model.safetensors").read_bytes()})
    yield srv
    srv.close()


@pytest.fixture
def hf(server, tmp_path, monkeypatch):
    """HF_ENDPOINT at the test server, HF_HOME empty in tmp, no token, online; fast retries."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(hub_stream, "BACKOFF", 0.01)
    monkeypatch.chdir(tmp_path)
    server.reset_log()
    server.faults.clear()
    server.api_stall = 0.0
    server.api_trickle = 0.0
    server.api_faults.clear()
    server.info_edit.clear()
    server.tree_loop.clear()
    monkeypatch.setattr(hub_http, "BACKOFF", 0.01)
    return home


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def one_error(rc: int, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, stderr)
    return lines[0]


def stored(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) if home.exists() else []


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def as_online(doc: dict) -> dict:
    """An offline run's JSON with each sha256 labelled as an online run labels it: offline the Hub lists
    nothing, so a sha256 is the cached blob's name (``cache``), where online it is the listing's (``hub``)."""
    for entry in [*doc["base"], doc["tuned"]]:
        for f in entry["files"]:
            assert f["sha256_source"] in ("cache", None), f
            f["sha256_source"] = "hub" if f["sha256_source"] else None
    return doc


# -- spelling ---------------------------------------------------------------------------------

def test_spellings():
    assert hub_spelling("org/name") and hub_spelling("org/name@v1.0") and hub_spelling("hf://org/name@r/sub")
    assert not hub_spelling("base/") and not hub_spelling("/abs/org/name") and not hub_spelling("name")
    assert parse_ref("org/name@refs/pr/3").revision == "refs/pr/3"
    r = parse_ref("hf://org/name@v2/sub/dir")
    assert (r.repo_id, r.revision, r.subfolder) == ("org/name", "v2", "sub/dir")
    with pytest.raises(CheckpointError, match="model repos"):
        parse_ref("hf://datasets/org/name")


# -- resolution, identity, modes ---------------------------------------------------------------

def test_compare_by_id_and_revision_records_identity(server, hf, tmp_path):
    rc, out, err = run("compare", "org/base", "org/tuned@v1", "--json", "r.json", "--no-rank")
    assert rc == 0, err
    assert "source: org/base: Hub repo org/base at commit" in err
    assert "source: org/tuned@v1: Hub repo org/tuned at commit " + server.v1[:12] in err
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["tuned"]["hub"] == {"repo_id": "org/tuned", "revision": "v1", "commit": server.v1, "subfolder": None}
    assert d["base"][0]["hub"]["revision"] is None
    assert d["base"][0]["hub"]["commit"] == server.repos["org/base"].branches["main"]
    local = _files(server.local["tuned"])
    assert d["tuned"]["files"] == [{"name": n, "bytes": len(local[n]), "sha256": sha256(local[n]), "sha256_source": "hub"}
                                   for n in sorted(local) if n.endswith(".safetensors")]
    assert d["run"]["date"].endswith("Z") and d["run"]["hub"][0]["mode"] == "download"
    assert d["summary"]["verdict"] == "derived"
    # the default branch is another commit with other weights
    rc, _, err = run("compare", "org/base", "org/tuned", "--json", "main.json", "--no-rank", "-q")
    assert rc == 0, err
    main_ = json.loads((tmp_path / "main.json").read_text())
    assert main_["tuned"]["hub"]["commit"] == server.main2 != server.v1
    assert main_["summary"]["relative_change"] > d["summary"]["relative_change"]


def test_stream_stores_nothing_and_matches_download(server, hf, tmp_path):
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "--json", "s.json")
    assert rc == 0, err
    assert stored(hf) == [], "--stream wrote into HF_HOME"
    assert "streamed by HTTP range requests, nothing stored on disk" in err
    streamed = server.bytes_sent("org/tuned")
    assert streamed >= sum(len(v) for k, v in _files(server.local["tuned"]).items() if k.endswith(".safetensors"))
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "--json", "d.json")
    assert rc == 0, err
    assert any("snapshots" in p for p in stored(hf))
    s, d = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "d.json"))
    assert [r["mode"] for r in s["run"]["hub"]] == ["stream", "stream"]
    assert [r["mode"] for r in d["run"]["hub"]] == ["download", "download"]
    assert s["run"]["hub"][1]["bytes_read"] > 0
    s.pop("run"), d.pop("run")
    assert json.dumps(s, sort_keys=True) == json.dumps(d, sort_keys=True)
    # a third run finds everything in the cache and fetches no weights
    server.reset_log()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--json", "c.json")
    assert rc == 0 and "read from the Hugging Face cache" in err
    assert server.bytes_sent("org/tuned") == 0 and server.bytes_sent("org/base") == 0


def test_stream_above_threshold_is_the_default(server, hf, tmp_path):
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream-above", "0", "--json", "r.json", "--no-rank")
    assert rc == 0, err
    assert [r["mode"] for r in json.loads((tmp_path / "r.json").read_text())["run"]["hub"]] == ["stream", "stream"]
    assert stored(hf) == []


def test_a_revision_read_from_the_cache_is_recorded_for_offline_runs(server, hf, tmp_path):
    """A tag whose commit was already downloaded (as main) was read from the cache without writing refs/<tag>; the
    same command with --offline then said the revision is not in the local cache: "run once without --offline"."""
    server.repos["org/base"].tags["rel"] = server.repos["org/base"].branches["main"]
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "--no-rank", "-q")
    assert rc == 0, err
    rc, _, err = run("compare", "org/base@rel", "org/tuned@v1", "--download", "--json", "online.json", "--no-rank", "-q")
    assert rc == 0, err
    assert json.loads((tmp_path / "online.json").read_text())["run"]["hub"][0]["mode"] == "cache"
    ref = next(hf.rglob("models--org--base/refs/rel"))
    assert ref.read_text() == server.repos["org/base"].branches["main"]
    server.reset_log()
    rc, _, err = run("compare", "org/base@rel", "org/tuned@v1", "--offline", "--no-rank", "-q")
    assert rc == 0 and server.requests == [], err


def test_offline_reads_a_prefilled_cache_only(server, hf, tmp_path, monkeypatch):
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "--json", "online.json", "--no-rank")
    assert rc == 0, err
    server.reset_log()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--offline", "--json", "offline.json", "--no-rank")
    assert rc == 0, err
    assert server.requests == [], "--offline made HTTP requests"
    assert "read from the Hugging Face cache only" in err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("online.json", "offline.json"))
    a.pop("run"), b.pop("run")
    assert a == as_online(b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")     # the library's own switch does the same
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--no-rank", "-q")
    assert rc == 0 and server.requests == [], err
    # not cached: the default branch of org/tuned, a repo never fetched, a missing shard
    line = one_error(*run("compare", "org/base", "org/tuned", "--offline")[::2])
    assert "revision `main` of `org/tuned` is not in the local cache (cached: v1" in line
    line = one_error(*run("compare", "org/base", "org/sibling", "--offline")[::2])
    assert "org/sibling" in line and "not in the local cache" in line and "without --offline" in line
    snap = next(p for p in hf.rglob("model-00002-of-*.safetensors"))
    snap.unlink()
    line = one_error(*run("compare", "org/base", "org/tuned@v1", "--offline")[::2])
    assert "model-00002-of-00003.safetensors of commit" in line and "is not in the local cache" in line
    assert server.requests == []


def test_local_path_wins_over_a_repo_id(server, hf, tmp_path):
    (tmp_path / "org").mkdir()
    write_checkpoint(tmp_path / "org" / "tuned", llama(np.random.default_rng(7), **SHAPE), dtype="BF16")
    rc, out, err = run("compare", "org/base", "org/tuned", "--no-rank", "--json", "r.json")
    assert rc == 0, err
    assert "source: org/tuned: the local folder, not the Hub repo of the same spelling" in err
    assert not any("org/tuned" in path for _, path in server.requests)
    d = json.loads((tmp_path / "r.json").read_text())
    assert "hub" not in d["tuned"] and d["summary"]["verdict"] == "identical"


def test_hf_uri_with_subfolder_and_python_api(server, hf):
    r = weightdiff.compare("hf://org/base", "hf://org/multi@main/sub", hub=HubOptions(download=False), rank=False)
    assert r.tuned["hub"]["subfolder"] == "sub"
    assert r.tuned["files"][0]["name"] == "sub/model.safetensors"
    assert r.summary.verdict == "derived"
    assert stored(hf) == []


def test_inspect_and_lineage(server, hf):
    rc, out, err = run("inspect", "org/tuned@v1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["hub"]["commit"] == server.v1 and d["format"] == "sharded" and len(d["files"]) == 3
    assert stored(hf) == [], "inspect downloaded weights to read headers"
    local = _files(server.local["tuned"])
    heads = sum(8 + int.from_bytes(b[:8], "little") for n, b in local.items() if n.endswith(".safetensors"))
    config = len(server.repos["org/tuned"].commits[server.v1]["config.json"])     # read for a quantization_config
    assert server.bytes_sent("org/tuned") == len(local["model.safetensors.index.json"]) + heads + config
    rc, out, err = run("inspect", "org/base")
    assert rc == 0 and "hub repo    org/base at commit" in out
    res = lineage(["org/base", "org/tuned@v1", "org/tuned"], hub=HubOptions(download=False), rank=False)
    assert [s["verdict"] for s in res.steps] == ["derived", "derived"]
    assert res.run["date"]


# -- provenance over the network ----------------------------------------------------------------

def test_provenance_screens_candidates_on_sampled_rows_only(server, hf):
    header = {}
    for name in ("base", "sibling", "independent", "stranger"):
        blob = _files(server.local[name])["model.safetensors"]
        header[name] = 8 + int.from_bytes(blob[:8], "little") + len(b'{"model_type": "llama"}')  # + config.json
    res = provenance("org/tuned@v1", ["org/sibling", "org/independent", "org/base", "org/stranger"],
                                hub=HubOptions(download=False), full_top=1, sample_kib=8)
    assert res.leading == "org/base"
    # the shared sample of rows, plus a quarter of the budget on the candidate's own MLP rows (their size
    # bounds how close a fully compared candidate could come)
    mlp = res.screening["mlp_bytes_per_candidate"]
    per = res.screening["bytes_per_checkpoint"]
    assert 0 < per <= 8 << 10 and 0 < mlp <= 2 << 10
    per += mlp
    for name in ("sibling", "independent", "stranger"):
        sent = server.bytes_sent(f"org/{name}")
        size = len(_files(server.local[name])["model.safetensors"])
        assert header[name] < sent <= header[name] + per, (name, sent, header[name], per)
        assert sent < size / 4
    assert server.bytes_sent("org/base") >= len(_files(server.local["base"])["model.safetensors"])
    assert stored(hf) == []


# -- errors: one line, exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["org/base", "org/nothing"], ["org/nothing: no such file or directory, and no Hub repo `org/nothing`",
                                   "hf auth login"]),
    (["org/base", "org/tuned@v9"], ["revision `v9` not found in `org/tuned` (branches: main; tags: v1)"]),
    (["org/base", "org/gated"], ["`org/gated` is a gated repo", "hf auth login"]),
    (["org/base", "org/gated", "--stream"], ["`org/gated` is a gated repo", "hf auth login"]),
    (["org/base", "org/private"], ["no Hub repo `org/private` (or it is private)", "hf auth login"]),
    (["org/base", "hf://org/multi@main/nope"], ["no folder or file `nope` in `org/multi`"]),
    (["org/base", "hf://org/base/config.json"], ["`config.json` in `org/base` is not a weights file weightdiff reads"]),
    (["org/base", "hf://datasets/org/data"], ["is a Hub dataset repo"]),
    (["org/base", "org/multi"], ["no checkpoint here", "found README.md, sub"]),
    # a sentence-transformers repo's module folders are not read over HTTP: refused, never compared without them
    (["org/base", "org/st"], ["org/st: is a sentence-transformers model whose module folders 2_Dense hold weights",
                              "only from a local folder"]),
])
def test_errors_are_one_line(server, hf, args, words):
    rc, out, err = run("compare", *args)
    line = one_error(rc, err)
    for w in words:
        assert w in line, line
    assert out == ""


def test_a_token_opens_gated_and_private_repos(server, hf, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for repo in ("org/gated", "org/private"):
        rc, out, err = run("compare", "org/base", repo, "--stream", "--no-rank", "-q")
        assert rc == 0, err
        assert "IDENTICAL" in out


def test_unreachable_hub_is_one_line(hf, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")        # nothing listens on the discard port
    line = one_error(*run("compare", "org/base", "org/tuned")[::2])
    assert "org/base" in line and ("cannot reach the Hub" in line or "not in the local cache" in line)
    # a local path mistyped (gg/model.gguf) is spelled as a repo id: the line says no local file exists either
    line = one_error(*run("compare", "gg/does-not-exist.gguf", "org/tuned")[::2])
    assert line.startswith("error: gg/does-not-exist.gguf: no such file or directory, and cannot reach the Hub at "
                           "http://127.0.0.1:9"), line


# -- the network failing mid-run ------------------------------------------------------------------

def test_lost_connection_is_an_error_naming_the_file(server, hf, monkeypatch):
    monkeypatch.setattr(hub_stream, "RETRIES", 2)
    server.faults[("org/tuned", "model-00002-of-00003.safetensors")] = {"drop_after": 100, "times": 99}
    t0 = time.monotonic()
    line = one_error(*run("compare", "org/base", "org/tuned@v1", "--stream")[::2])
    assert time.monotonic() - t0 < 30
    assert line.startswith("error: hf://org/tuned@v1/model-00002-of-00003.safetensors: connection lost at byte")
    assert "after 2 retries" in line


def test_transient_failures_are_retried(server, hf, tmp_path, monkeypatch):
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "--json", "ok.json", "--no-rank")
    assert rc == 0, err
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    server.faults[("org/tuned", "model-00001-of-00003.safetensors")] = {"status": 503, "times": 2}
    server.faults[("org/base", "model.safetensors")] = {"drop_after": 3000, "times": 1, "stall": 3}
    t0 = time.monotonic()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "--json", "retried.json", "--no-rank")
    assert rc == 0, err
    assert time.monotonic() - t0 < 20
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("ok.json", "retried.json"))
    a.pop("run"), b.pop("run")
    assert a == b


# -- the remote reader against the local one --------------------------------------------------------

def test_remote_reader_matches_the_local_reader(server, hf, monkeypatch):
    from weightdiff.io.checkpoint import locate

    monkeypatch.setattr(hub_stream, "PART_BYTES", 1000)        # windows split into parallel parts
    monkeypatch.setattr(hub_stream, "PREFETCH", 1)
    with locate("org/tuned@v1", HubOptions(download=False)) as remote, locate(str(server.local["tuned"])) as local:
        assert remote.tensors.keys() == local.tensors.keys()
        for name in list(local.tensors)[:6]:
            a = [w.copy() for w in remote.windows(name, 333)]
            b = [w.copy() for w in local.windows(name, 333)]
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
            assert np.array_equal(remote.read(name), local.read(name))
        rows = [0, 1, 2, 7, 100, 101, 255]
        name = "model.embed_tokens.weight"
        assert np.array_equal(remote.read_rows(name, rows), local.read_rows(name, rows))
        many = remote.read_rows_many([(name, rows), ("lm_head.weight", [3, 4])])
        assert np.array_equal(many[1], local.read_rows("lm_head.weight", [3, 4]))
        it = remote.windows(name, 64)          # abandoning a window stream stops its prefetch thread
        next(it)
        it.close()


def test_a_corrupt_file_on_the_hub_fails_the_same_parser(server, hf):
    blob = bytearray(_files(server.local["base"])["model.safetensors"])
    server.commit("org/corrupt", {"model.safetensors": bytes(blob[:-10])})
    line = one_error(*run("compare", "org/base", "org/corrupt", "--stream")[::2])
    assert line.startswith("error: hf://org/corrupt/model.safetensors: header declares")
    assert "truncated download?" in line


# -- a hostile or faulty Hub (probe H) -----------------------------------------------------------

def _sharded_without_last(server) -> None:
    """org/holey: the index of org/tuned@v1 with its last shard left out of the repo."""
    files = dict(server.repos["org/tuned"].commits[server.v1])
    files.pop(max(n for n in files if n.startswith("model-0")))
    server.commit("org/holey", files)


@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_index_naming_a_missing_shard_fails_before_any_download(server, hf, mode):
    _sharded_without_last(server)
    line = one_error(*run("compare", "org/base", "org/holey", mode)[::2])
    assert line.startswith("error: hf://org/holey/model.safetensors.index.json: names shard "
                           "model-00003-of-00003.safetensors, which is not in `org/holey` at commit "), line
    assert stored(hf) == [] or not any("snapshots" in p for p in stored(hf)), stored(hf)
    assert server.bytes_sent("org/base") == 0          # checked before the base was fetched
    line = one_error(*run("inspect", "org/holey", mode)[::2])
    assert "names shard model-00003-of-00003.safetensors" in line


@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_an_api_that_never_answers_times_out(server, hf, monkeypatch, mode):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    server.api_stall = 5.0
    t0 = time.monotonic()
    line = one_error(*run("inspect", "org/base", mode)[::2])
    assert time.monotonic() - t0 < 4, "the model info call waited for the server"
    assert line.startswith(f"error: org/base: the Hub at {server.url} did not answer within 0.5 s (timed out)"), line
    assert stored(hf) == []


def test_the_refs_of_a_missing_revision_are_bounded_too(server, hf, monkeypatch):
    from huggingface_hub import constants
    from weightdiff.io import hub_errors, hub_http

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    assert hub_http.list_refs(server.url, "org/tuned") == {"branches": ["main"], "tags": ["v1"]}
    files = hub_http.list_tree(server.url, "org/multi", "main", "sub")
    assert sorted(f["path"] for f in files) == ["sub/model.safetensors"]
    server.api_stall = 5.0
    t0 = time.monotonic()
    assert hub_errors._refs("org/tuned", server.url) == ""
    with pytest.raises(Exception):
        hub_http.list_tree(server.url, "org/multi", "main")
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_a_trickling_server_is_stopped_naming_the_file(server, hf, monkeypatch, mode):
    from weightdiff.io import hub_http

    monkeypatch.setenv("WEIGHTDIFF_HUB_STALL_SECONDS", "1")
    monkeypatch.setattr(hub_http, "STALL_BYTES", 4096)
    server.faults[("org/tuned", "model-00002-of-00003.safetensors")] = {"trickle": 0.02}
    t0 = time.monotonic()
    line = one_error(*run("compare", "org/base", "org/tuned@v1", mode, "-q")[::2])
    assert time.monotonic() - t0 < 15
    assert line.startswith("error: hf://org/tuned@v1/model-00002-of-00003.safetensors: the server sent "), line
    assert "under the 4 KiB per 1 s a transfer must keep up" in line


def test_a_slow_but_steady_transfer_passes(server, hf, monkeypatch):
    from weightdiff.io import hub_http

    monkeypatch.setenv("WEIGHTDIFF_HUB_STALL_SECONDS", "1")
    monkeypatch.setattr(hub_http, "STALL_BYTES", 16)       # 16 bytes a second: 50 a second passes
    server.faults[("org/tuned", "config.json")] = {"trickle": 0.02}
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "-q", "--no-rank")
    assert rc == 0, err


def test_hash_checks_the_bytes_on_disk_against_the_hub(server, hf, tmp_path):
    shard = "model-00002-of-00003.safetensors"
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "--hash", "--json", "s.json", "--no-rank", "-q")
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert {f["sha256_source"] for f in s["tuned"]["files"]} == {"hub"}        # streamed: the Hub's word only
    server.faults[("org/tuned", shard)] = {"corrupt": True}
    # a corrupt transfer is caught as it is downloaded (hashed against the listing, with or without --hash), and
    # the copy leaves the cache: a corrupt tail read "derived" at relative change 2e+28 and stayed for later runs
    for flag in ("--hash", "--no-hash"):
        rc, out, err = run("compare", "org/base", "org/tuned@v1", "--download", flag, "--json", "d.json", "--no-rank",
                           "-q")
        line = one_error(rc, err)
        assert line.startswith(f"error: hf://org/tuned@v1/{shard}: the downloaded bytes have sha256 "), line
        assert "the copy was removed from the cache" in line and not (tmp_path / "d.json").exists()
    server.faults.clear()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "--json", "d.json", "--no-rank", "-q")
    assert rc == 0, err
    # a copy spoiled in the cache afterwards: a run with --hash refuses it, naming the blob to delete
    cached = next((tmp_path / "hf_home").rglob(f"models--org--tuned/snapshots/{server.v1}/{shard}")).resolve()
    raw = bytearray(cached.read_bytes())
    raw[-5:] = bytes(b ^ 0xFF for b in raw[-5:])
    cached.chmod(0o644)
    cached.write_bytes(bytes(raw))
    line = one_error(*run("compare", "org/base", "org/tuned@v1", "--hash", "--no-rank", "-q")[::2])
    assert line.startswith(f"error: hf://org/tuned@v1/{shard}: the file read from the Hugging Face cache has "
                           f"sha256 "), line
    assert "a corrupt download or cache" in line
    blob = line.split("(delete ")[1].split(" and rerun")[0]
    Path(blob).unlink()                                   # as the hint says
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--hash", "--json", "d.json", "--no-rank", "-q")
    assert rc == 0, err
    d = json.loads((tmp_path / "d.json").read_text())
    assert {f["sha256_source"] for f in d["tuned"]["files"]} == {"verified"}
    assert [f["sha256"] for f in d["tuned"]["files"]] == [f["sha256"] for f in s["tuned"]["files"]]
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--no-hash", "--json", "n.json", "--no-rank", "-q")
    assert {f["sha256_source"] for f in json.loads((tmp_path / "n.json").read_text())["tuned"]["files"]} == {"hub"}


@pytest.mark.parametrize("fault, words", [
    ({"drop_after": 3000, "times": 99}, "the server closed the connection before sending the whole file"),
    ({"linked_size_delta": 100}, "the server sent a file of another size than announced (size mismatch: "),
    ({"redirect_loop": True}, "the server redirected badly: a redirect loop"),
    ({"redirect_back": True}, "the server redirected badly: the file's request was redirected to "
                              "http://127.0.0.1:"),
])
def test_download_faults_are_one_line_naming_the_file(server, hf, fault, words):
    shard = "model-00002-of-00003.safetensors"
    server.faults[("org/tuned", shard)] = fault
    t0 = time.monotonic()
    line = one_error(*run("compare", "org/base", "org/tuned@v1", "--download", "-q")[::2])
    assert time.monotonic() - t0 < 30
    assert line.startswith(f"error: hf://org/tuned@v1/{shard}: {words}"), line
    assert "cannot reach the Hub" not in line and "no Hub repo" not in line


@pytest.mark.parametrize("fault, words", [
    ({"redirect_loop": True}, "the server redirected badly: a redirect loop"),
    ({"redirect_back": True}, "the server redirected badly: the file's request was redirected to "
                              "http://127.0.0.1:"),
])
def test_stream_redirect_faults_name_the_file(server, hf, fault, words):
    shard = "model-00002-of-00003.safetensors"
    server.faults[("org/tuned", shard)] = fault
    line = one_error(*run("inspect", "org/tuned@v1", "--stream")[::2])
    assert line.startswith(f"error: hf://org/tuned@v1/{shard}: {words}"), line


@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_transient_api_and_cdn_answers_are_retried(server, hf, mode):
    server.api_faults["org/base"] = {"status": 429, "times": 2, "retry_after": 0}
    server.api_faults["org/tuned"] = {"status": 503, "times": 2}
    server.faults[("org/tuned", "model-00001-of-00003.safetensors")] = {"status": 503, "times": 2}
    server.faults[("org/base", "model.safetensors")] = {"status": 429, "times": 2, "retry_after": 0}
    rc, out, err = run("compare", "org/base", "org/tuned@v1", mode, "-q", "--no-rank")
    assert rc == 0 and err == "", err
    assert server.api_faults["org/base"]["times"] == server.api_faults["org/tuned"]["times"] == 0


@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_retries_are_bounded(server, hf, mode):
    server.faults[("org/base", "model.safetensors")] = {"status": 429, "times": 99, "retry_after": 3600}
    t0 = time.monotonic()
    line = one_error(*run("compare", "org/base", "org/tuned@v1", mode, "-q", "--no-rank")[::2])
    assert time.monotonic() - t0 < 10, "waited for the server's Retry-After: 3600"
    assert line.startswith("error: hf://org/base/model.safetensors: the server answered HTTP 429 and asked to "
                           "retry after 3600 s, over the 30 s weightdiff waits"), line
    server.faults.clear()
    server.api_faults["org/base"] = {"status": 503, "times": 99}
    line = one_error(*run("compare", "org/base", "org/tuned@v1", mode, "-q", "--no-rank")[::2])
    assert line.startswith("error: org/base: the Hub answered HTTP 503 after retries for `org/base`"), line
    assert server.api_faults["org/base"]["times"] >= 99 - 2 * (hub_http.RETRIES + 1)


def test_fused_experts_of_a_hub_repo_split_streamed_and_downloaded(server, hf, tmp_path):
    # gpt-oss-shaped fused experts in a sharded Hub repo whose index lists the fused names: streamed and
    # downloaded, each expert is its own tensor, and the one expert changed is the only one that reads so
    rng = np.random.default_rng(31)
    t = {"model.layers.0.mlp.experts.gate_up_proj": rng.normal(0, 0.02, (4, 32, 48)).astype(np.float32),
         "model.layers.0.mlp.experts.down_proj": rng.normal(0, 0.02, (4, 24, 32)).astype(np.float32),
         "model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (32, 32)).astype(np.float32)}
    ft = {k: v.copy() for k, v in t.items()}
    ft["model.layers.0.mlp.experts.down_proj"][3] += 0.01 * np.outer(rng.normal(size=24), rng.normal(size=32))
    for name, tensors in (("moe-base", t), ("moe-tuned", ft)):
        d = write_checkpoint(tmp_path / name, tensors, shards=2, dtype="BF16")
        server.commit(f"org/{name}", {**_files(d), "config.json": b'{"model_type": "gpt_oss"}'})
    docs = []
    for mode in ("--stream", "--download"):
        rc, _, err = run("compare", "org/moe-base", "org/moe-tuned", mode, "--json", f"{mode[2:]}.json", "-q")
        assert rc == 0, err
        docs.append(json.loads((tmp_path / f"{mode[2:]}.json").read_text()))
    for d in docs:
        status = {x["name"]: x["status"] for x in d["tensors"]}
        assert len(status) == 4 + 4 + 1
        assert [n for n, s in status.items() if s == "changed"] == ["model.layers.0.mlp.experts.3.down_proj"]
        assert d["tensors"][[x["name"] for x in d["tensors"]].index("model.layers.0.mlp.experts.3.down_proj")
                            ]["rank"]["numerical_rank"] == 1


def test_an_onnx_repo_with_external_data_is_downloaded_with_its_data_and_refused_streamed(server, hf, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(41)
    w = rng.normal(0, 0.02, (64, 48)).astype(np.float32)
    for name, ww in (("onnx-base", w), ("onnx-tuned", w + 0.01 * np.outer(rng.normal(size=64), rng.normal(size=48)))):
        g = helper.make_graph([helper.make_node("MatMul", ["x", "onnx::MatMul_3"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
                              [numpy_helper.from_array(ww.astype(np.float32), "onnx::MatMul_3")])
        d = tmp_path / name
        d.mkdir()
        onnx.save_model(helper.make_model(g), str(d / "model.onnx"), save_as_external_data=True,
                        location="model.onnx_data", size_threshold=0)
        server.commit(f"org/{name}", {**_files(d), "config.json": b"{}", "README.md": b"x"})
    rc, _, err = run("compare", "org/onnx-base", "org/onnx-tuned", "--json", "o.json", "-q")
    assert rc == 0, err
    doc = json.loads((tmp_path / "o.json").read_text())
    assert [(t["name"], t["status"], t["rank"]["numerical_rank"]) for t in doc["tensors"]] == \
        [("onnx::MatMul_3", "changed", 1)]
    assert sorted(f["name"] for f in doc["tuned"]["files"]) == ["model.onnx", "model.onnx_data"]
    rc, _, err = run("compare", "org/onnx-base", "org/onnx-tuned", "--hash", "--json", "h.json", "-q")
    assert rc == 0, err
    files = json.loads((tmp_path / "h.json").read_text())["tuned"]["files"]
    assert [f["sha256_source"] for f in files] == ["verified", "verified"]
    rc, _, err = run("compare", "org/onnx-base", "org/onnx-tuned", "--stream")
    assert rc == 2 and "holds an ONNX model, which cannot be read by range requests" in err


# -- naming one file of a repo; the transformers.js layout -------------------------------------------

def _onnx_model(w: np.ndarray) -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/layer/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
                          [numpy_helper.from_array(w.astype(np.float32), "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_a_transformers_js_repo_reads_onnx_model_onnx_and_any_file_can_be_named(server, hf, tmp_path):
    """Xenova/* and sentence-transformers ONNX repos keep onnx/model.onnx beside quantized variants and
    no weights at the top: the repo id reads onnx/model.onnx (as locally); hf://org/name/onnx/<file>
    names another; the onnx/ folder alone is ambiguous and its error shows how to name one."""
    rng = np.random.default_rng(43)
    w = rng.normal(0, 0.02, (64, 48)).astype(np.float32)
    t = w + 0.01 * np.outer(rng.normal(size=64), rng.normal(size=48)).astype(np.float32)
    for name, ww, other in (("js-base", w, w * 2), ("js-tuned", t, t * 2)):
        server.commit(f"org/{name}", {"config.json": b"{}", "onnx/model.onnx": _onnx_model(ww),
                                      "onnx/model_fp16.onnx": _onnx_model(other)})
    rc, _, err = run("compare", "org/js-base", "org/js-tuned", "--json", "a.json", "-q")
    assert rc == 0, err
    doc = json.loads((tmp_path / "a.json").read_text())
    assert [f["name"] for f in doc["tuned"]["files"]] == ["onnx/model.onnx"]
    assert [(x["name"], x["status"], x["rank"]["numerical_rank"]) for x in doc["tensors"]] == [("W", "changed", 1)]
    # naming a file: the other export; downloaded, then the same from the cache offline
    named = ("hf://org/js-base/onnx/model_fp16.onnx", "hf://org/js-tuned@main/onnx/model_fp16.onnx")
    rc, _, err = run("compare", *named, "--json", "b.json", "-q")
    assert rc == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert [f["name"] for f in b["tuned"]["files"]] == ["onnx/model_fp16.onnx"]
    assert b["tuned"]["hub"]["subfolder"] == "onnx" and b["tuned"]["hub"]["revision"] == "main"
    assert b["tensors"][0]["norm_base"] == pytest.approx(2 * doc["tensors"][0]["norm_base"], rel=1e-6)
    server.reset_log()
    rc, _, err = run("compare", *named, "--offline", "--json", "c.json", "-q")
    assert rc == 0 and server.requests == [], err
    c = json.loads((tmp_path / "c.json").read_text())
    b.pop("run"), c.pop("run")
    assert b == as_online(c)
    line = one_error(*run("compare", "org/js-base", "hf://org/js-tuned/onnx")[::2])
    assert "2 .onnx files, so which is the model is ambiguous: model.onnx, model_fp16.onnx" in line
    assert "(name one file: hf://org/js-tuned/onnx/model.onnx)" in line


def test_a_gguf_repo_with_one_file_per_quantization_names_its_file(server, hf, tmp_path):
    """A GGUF repo holds a file per quantization: the repo id is ambiguous (the hint spells a file), a
    named file is read (downloaded: GGUF needs a local file), and a file of another repo's subfolder too."""
    gguf = pytest.importorskip("gguf")
    from gguf_build import to_gguf

    Q = gguf.GGMLQuantizationType
    base = llama(np.random.default_rng(5), **SHAPE)
    tuned = {k: low_rank_update(np.random.default_rng(6), v, 2) if k.endswith("q_proj.weight") else v
             for k, v in base.items()}
    files = {}
    for side, tensors in (("b", base), ("t", tuned)):
        for q in (Q.F32, Q.Q8_0):
            p = to_gguf(tmp_path / f"{side}.{q.name}.gguf", tensors, "llama", q, n_head=4, layers=2)
            files[(side, q.name)] = p.read_bytes()
    server.commit("org/gguf-base", {"README.md": b"x", "m.F32.gguf": files[("b", "F32")],
                                    "m.Q8_0.gguf": files[("b", "Q8_0")], "llava-mmproj-F16.gguf": files[("b", "F32")]})
    server.commit("org/gguf-tuned", {"README.md": b"x", "q/m-tuned.Q8_0.gguf": files[("t", "Q8_0")],
                                     "m-tuned.F32.gguf": files[("t", "F32")]})
    line = one_error(*run("compare", "org/gguf-base", "org/gguf-tuned")[::2])
    assert "org/gguf-base: 3 .gguf files, so which is the model is ambiguous: llava-mmproj-F16.gguf, m.F32.gguf" in line
    assert "(name one file: hf://org/gguf-base/m.F32.gguf)" in line      # a model, never the projector
    rc, _, err = run("compare", "hf://org/gguf-base/m.F32.gguf", "hf://org/gguf-tuned/m-tuned.F32.gguf",
                     "--json", "f.json", "-q")
    assert rc == 0, err
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["summary"]["verdict"] == "derived"
    assert {x["name"] for x in doc["tensors"] if x["status"] == "changed"} == \
        {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert doc["base"][0]["format"] == "gguf" and doc["base"][0]["hub"]["subfolder"] is None
    rc, _, err = run("compare", "hf://org/gguf-base/m.Q8_0.gguf", "hf://org/gguf-tuned/q/m-tuned.Q8_0.gguf",
                     "--json", "q.json", "-q")
    assert rc == 0, err
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["tuned"]["files"][0]["name"] == "q/m-tuned.Q8_0.gguf" and doc["tuned"]["hub"]["subfolder"] == "q"
    assert {x["name"] for x in doc["tensors"] if x["status"] == "changed"} == \
        {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_a_split_gguf_in_a_repo_is_fetched_whole(server, hf, tmp_path):
    """A 70B GGUF at 8 bits is over the Hub's 50 GB per file: llama-gguf-split parts. Naming any part (or the
    repo, whose only model it is) fetches every part; a part the repo lacks fails before any download."""
    gguf = pytest.importorskip("gguf")
    from gguf_build import to_gguf

    base = llama(np.random.default_rng(5), **SHAPE)
    tuned = {k: low_rank_update(np.random.default_rng(6), v, 2) if k.endswith("q_proj.weight") else v
             for k, v in base.items()}
    (tmp_path / "w").mkdir()
    whole = to_gguf(tmp_path / "w" / "m.gguf", tuned, "llama", gguf.GGMLQuantizationType.Q8_0, n_head=4, layers=2)
    (tmp_path / "s").mkdir()
    to_gguf(tmp_path / "s" / "m-Q8_0.gguf", tuned, "llama", gguf.GGMLQuantizationType.Q8_0, n_head=4, layers=2,
            split_max_tensors=8)
    parts = {f"Q8_0/{p.name}": p.read_bytes() for p in sorted((tmp_path / "s").iterdir())}
    assert len(parts) == 3
    server.commit("org/gguf-split", {"README.md": b"x", **parts})
    server.commit("org/gguf-split-broken", {"README.md": b"x", **{k: v for k, v in parts.items() if "00002" not in k}})
    base_dir = str(write_checkpoint(tmp_path / "base", base, dtype="F32"))
    rc, _, err = run("compare", base_dir, str(whole), "--json", "w.json", "-q")
    assert rc == 0, err
    for spelled in ("hf://org/gguf-split/Q8_0/m-Q8_0-00003-of-00003.gguf", "hf://org/gguf-split/Q8_0"):
        rc, _, err = run("compare", base_dir, spelled, "--json", "s.json", "-q")
        assert rc == 0, err
        a, b = (json.loads((tmp_path / n).read_text()) for n in ("w.json", "s.json"))
        assert a["tensors"] == b["tensors"] and a["summary"]["verdict"] == b["summary"]["verdict"] == "derived"
        assert [f["name"] for f in b["tuned"]["files"]] == list(parts)
    before = stored(hf)
    line = one_error(*run("compare", base_dir, "hf://org/gguf-split-broken/Q8_0/m-Q8_0-00001-of-00003.gguf")[::2])
    assert "is part 1 of a GGUF split into 3 files, and part 2 (m-Q8_0-00002-of-00003.gguf) is not in " \
           "`org/gguf-split-broken`" in line
    assert stored(hf) == before, "a split with a missing part was downloaded"


def test_a_named_safetensors_file_streams_like_its_folder(server, hf, tmp_path):
    r = weightdiff.compare("org/base", "hf://org/sibling/model.safetensors", hub=HubOptions(download=False),
                           rank=False)
    f = weightdiff.compare("org/base", "org/sibling", hub=HubOptions(download=False), rank=False)
    assert r.tuned["files"] == f.tuned["files"] and r.tuned["hub"]["subfolder"] is None
    a, b = r.to_dict(include_run=False), f.to_dict(include_run=False)
    assert a["tensors"] == b["tensors"] and a["summary"] == b["summary"]
    assert stored(hf) == []


def _no_sizes(info: dict) -> dict:
    """A model info as a server that ignores ``?blobs=true`` answers: file names only."""
    return {**info, "siblings": [{"rfilename": x["rfilename"]} for x in info["siblings"]]}


@pytest.mark.parametrize("how", ["names_only", "size_as_string"])
def test_a_listing_without_usable_sizes_has_them_filled_before_any_file_is_read(hf, server, tmp_path, how):
    """Model info without sizes (a server ignoring ?blobs=true) failed every sharded repo with "internal error:
    ValueError: negative count" (the index was read with size -1 before sizes were filled); a size given as a
    string with "internal error: TypeError". Sizes come from the tree listing or a HEAD request first."""
    edit = _no_sizes if how == "names_only" else (
        lambda info: {**info, "siblings": [{**x, "size": str(x.get("size"))} for x in info["siblings"]]})
    server.info_edit.update({"org/base": edit, "org/tuned": edit})
    rc, out, err = run("compare", "org/base", "org/tuned@v1", "--no-rank", "-q", "--json", str(tmp_path / "h.json"))
    assert rc == 0, err
    server.info_edit.clear()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--no-rank", "-q", "--json", str(tmp_path / "ok.json"))
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("h.json", "ok.json"))
    assert a["summary"] == b["summary"] and a["tensors"] == b["tensors"]


def test_a_listing_whose_pages_lead_back_is_one_line_not_a_hang(hf, server):
    """Model info with no files, and a tree listing whose ``Link: rel="next"`` is the same page: weightdiff
    followed it forever (tens of thousands of requests a minute). A page seen twice is refused."""
    server.info_edit["org/base"] = lambda info: {**info, "siblings": []}
    server.tree_loop.add("org/base")
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--no-rank", "-q")
    line = one_error(rc, err)
    assert "org/base" in line and "pages lead back to a page already read" in line
    assert sum("/tree/" in p for _, p in server.requests) <= 3


@pytest.mark.parametrize("answer", [b"<html><body>Please sign in to the network</body></html>",
                                    {"sha": "0" * 40, "siblings": ["model.safetensors"]}])
def test_an_answer_no_hub_gives_is_named_so_not_a_network_fault(hf, server, answer):
    """A captive portal's page answered 200, or a file list of plain strings, read "cannot reach the Hub"
    (check the network), which sends the user the wrong way."""
    server.info_edit["org/base"] = lambda info: answer
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--no-rank", "-q")
    line = one_error(rc, err)
    assert "did not answer as a Hugging Face Hub does" in line and "cannot reach" not in line


def test_a_default_branch_not_named_main_downloads_the_commit_the_listing_resolved(hf, server, tmp_path):
    """A repo whose default branch is `master`: --stream worked, --download asked for revision `main` and failed."""
    sha = server.commit("org/master", _files(server.local["sibling"]), branch="master")
    server.repos["org/master"].default = "master"
    rc, _, err = run("compare", "org/base", "org/master", "--no-rank", "-q", "--download", "--json", str(tmp_path / "m.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["tuned"]["hub"]["commit"] == sha


def test_a_cached_copy_of_another_size_than_listed_is_fetched_again(hf, server, tmp_path):
    """One faulty answer stored a 0-byte weights file in the Hugging Face cache; every later run took "cache"
    mode and failed on it ("empty file"), with no way out but deleting it by hand. A cached file whose size is
    not the listed one is a broken download: it is fetched again."""
    rc, _, err = run("compare", "org/base", "org/sibling", "--no-rank", "-q", "--download", "--json",
                     str(tmp_path / "a.json"))
    assert rc == 0, err
    snap = next(hf.rglob("models--org--sibling/snapshots/*/model.safetensors"))
    blob = snap.resolve()
    blob.write_bytes(b"")                         # the broken copy a faulty answer left
    rc, _, err = run("compare", "org/base", "org/sibling", "--no-rank", "-q", "--json", str(tmp_path / "b.json"))
    assert rc == 0, err
    assert snap.resolve().stat().st_size > 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["tensors"] == b["tensors"]


@pytest.mark.parametrize("mode", ["--stream", "--download", None])
def test_a_stray_shard_is_refused_in_every_mode(hf, server, tmp_path, mode):
    """A repo holding a shard of the index's series that the index does not list: --stream refused it, --download
    and the default mode accepted it (only the index's shards were fetched, so the local check never saw it)."""
    files = _files(server.local["tuned"])
    shard = next(n for n in files if n.endswith(".safetensors"))
    stray = shard.replace("00001-of-", "00009-of-")
    server.commit("org/stray", {**files, stray: files[shard]})
    rc, _, err = run("compare", "org/base", "org/stray", "--no-rank", "-q", *([mode] if mode else []))
    line = one_error(rc, err)
    assert stray in line and "not in the index" in line


def test_a_downloaded_files_bytes_are_the_files_not_the_listings(hf, server, tmp_path):
    """A listing that overstated a file's size (20 GB for a 230 KB file) was recorded as the file's `bytes`, beside
    `sha256_source: "verified"`: the record described a file that was not read."""
    def inflate(info):
        return {**info, "siblings": [{**x, "size": 20_000_000_000} if x["rfilename"].endswith(".safetensors") else x
                                     for x in info["siblings"]]}

    server.info_edit["org/sibling"] = inflate
    rc, _, err = run("compare", "org/base", "org/sibling", "--no-rank", "-q", "--download", "--hash",
                     "--json", str(tmp_path / "s.json"))
    assert rc == 0, err
    files = json.loads((tmp_path / "s.json").read_text())["tuned"]["files"]
    real = (server.local["sibling"] / "model.safetensors").stat().st_size
    assert [(f["bytes"], f["sha256_source"]) for f in files if f["name"].endswith(".safetensors")] == [(real, "verified")]


def test_a_consolidated_hub_repo_reads_its_params_json_streamed_and_downloaded(server, hf, tmp_path):
    # a Mistral repo's consolidated.safetensors with params.json: the heads come from the repo in both modes
    # (a download fetches params.json beside config.json), so it reads identical to the converter's output
    pytest.importorskip("torch")
    from test_meta_layout import fine_tune, meta_tensors, write_hf, write_meta

    t = meta_tensors()
    hf_dir = write_hf(tmp_path / "hfside", t)
    meta_dir = write_meta(tmp_path / "metaside", fine_tune(t))
    server.commit("org/hf-base", _files(hf_dir))
    server.commit("org/meta-tuned", {**_files(meta_dir), "tokenizer.model.v3": b"x"})
    want = weightdiff.compare(str(hf_dir), str(write_hf(tmp_path / "hft", fine_tune(t))))
    want = {x["name"]: x for x in json.loads(want.to_json())["tensors"]}
    for mode in ("--stream", "--download"):
        rc, _, err = run("compare", "org/hf-base", "org/meta-tuned", mode, "--json", f"{mode[2:]}.json", "-q")
        assert rc == 0, err
        got = {x["name"]: x for x in json.loads((tmp_path / f"{mode[2:]}.json").read_text())["tensors"]}
        assert got == want, mode


def test_a_streamed_hub_checkpoint_caches_its_records_by_commit(server, hf, tmp_path):
    # --cache with a streamed Hub model stopped with "internal error" (the key stat'ed the hf:// name); the
    # records are keyed by the commit, so a moved branch is measured again, never served stale
    docs = {}
    for rev in ("v1", "v1", "main"):
        rc, _, err = run("compare", "org/base", f"org/tuned@{rev}", "--stream", "--cache", "c", "--json", "o.json", "-q")
        assert rc == 0, err
        d = json.loads((tmp_path / "o.json").read_text())
        d.pop("run")
        docs.setdefault(rev, []).append(d)
        if rev == "v1":
            assert list((tmp_path / "c" / "records").glob("*/*.json"))
    assert docs["v1"][0] == docs["v1"][1]
    assert docs["main"][0]["summary"]["relative_change"] != docs["v1"][0]["summary"]["relative_change"]
    want = weightdiff.compare(str(server.local["base"]), str(server.local["tuned2"]))
    assert docs["main"][0]["summary"]["relative_change"] == json.loads(want.to_json())["summary"]["relative_change"]


def test_credentials_in_the_endpoint_are_never_printed(server, hf, tmp_path, monkeypatch):
    # a mirror spelled http://user:password@host printed the password in every error line, and a survey wrote
    # it into survey.csv and survey.parquet
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror-user:s3cretPassw0rd@127.0.0.1:1")
    rc, _, err = run("compare", "org/base", "org/tuned")
    assert "s3cretPassw0rd" not in err and "http://***@127.0.0.1:1" in one_error(rc, err)
    rc, _, err = run("survey", "org/base", "org/tuned", "--out", "out", "-q")
    assert rc in (0, 2) and "s3cretPassw0rd" not in err
    for f in (tmp_path / "out").glob("survey.*") if (tmp_path / "out").exists() else ():
        assert b"s3cretPassw0rd" not in f.read_bytes()


def test_an_environment_huggingface_hub_refuses_is_one_line(tmp_path):
    # HF_HUB_ETAG_TIMEOUT=abc made huggingface_hub's import raise ValueError: "internal error", exit 1
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": "abc", "HF_HOME": str(tmp_path / "h"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", "from weightdiff.cli import main; main()", "compare", "org/base",
                        "org/tuned"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    line = one_error(p.returncode, p.stderr)
    assert "huggingface_hub refused the environment" in line and "HF_HUB_ETAG_TIMEOUT" in line


def test_hash_with_a_streamed_model_says_it_checks_nothing(server, hf, tmp_path):
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "--hash", "--json", "o.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "o.json").read_text())
    notes = [n for n in d["plan"]["notes"] if "--hash checks nothing" in n]
    assert len(notes) == 2 and all(f["sha256_source"] == "hub" for f in d["tuned"]["files"])
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--download", "--hash", "--json", "p.json", "-q")
    assert rc == 0 and not [n for n in json.loads((tmp_path / "p.json").read_text())["plan"]["notes"]
                            if "--hash checks nothing" in n]


def test_an_hf_uri_is_never_read_as_a_local_folder(server, hf, tmp_path):
    # the filesystem reads hf://org/base as the folder hf:/org/base: a local folder of that spelling was read
    decoy = write_checkpoint(tmp_path / "hf:" / "org" / "base", _tune(llama(np.random.default_rng(7), **SHAPE), 9))
    assert decoy.exists()
    rc, _, err = run("compare", "hf://org/base", "org/base", "--json", "o.json", "-q")
    assert rc == 0, err
    d = json.loads((tmp_path / "o.json").read_text())
    assert d["summary"]["verdict"] == "identical" and d["base"][0]["hub"]["repo_id"] == "org/base"


def test_a_cache_read_because_the_hub_cannot_be_reached_is_recorded(server, hf, tmp_path, monkeypatch):
    # the fallback was said only on stderr (nothing with -q): the JSON's plan notes and the memo say it now
    rc, _, err = run("compare", "org/base", "org/sibling", "--download", "-q")
    assert rc == 0, err
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    rc, _, err = run("compare", "org/base", "org/sibling", "--json", "o.json", "--report", "m.md", "-q")
    assert rc == 0 and err == "", err
    notes = json.loads((tmp_path / "o.json").read_text())["plan"]["notes"]
    assert sum("could not be reached" in n and "local Hugging Face cache was read" in n for n in notes) == 2
    assert (tmp_path / "m.md").read_text().count("Not checked against the Hub") == 2


def test_workers_read_the_parents_commit_in_the_parents_mode(hf, server, tmp_path, monkeypatch):
    """`compare --workers` sent the workers the spelling `org/moving` with default Hub options: each worker
    resolved `main` again (the JSON named commit A and held commit B's numbers once `main` moved), downloaded
    under --stream (stderr: "nothing stored on disk") and asked the Hub under --offline."""
    pytest.importorskip("distributed")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))        # the workers' processes too
    a = server.commit("org/moving", _files(server.local["sibling"]))
    b = server.commit("org/moving", _files(server.local["tuned2"]), branch="later")
    server.repos["org/moving"].branches["main"] = a
    calls = []

    def move(info):                   # `main` moves to B once the parent has resolved it (preflight, locate)
        calls.append(1)
        if len(calls) == 2:
            server.repos["org/moving"].branches["main"] = b
        return info

    server.info_edit["org/moving"] = move
    rc, _, err = run("compare", "org/base", "org/moving", "--stream", "--workers", "2", "--no-rank", "-q",
                     "--json", "w.json")
    assert rc == 0, err
    assert stored(hf) == [], "--stream --workers wrote into HF_HOME"
    server.info_edit.clear()
    # (the reference by download, which the offline run below reads: a streamed compare is seconds of range requests)
    rc, _, err = run("compare", "org/base", f"org/moving@{a}", "--download", "--no-rank", "-q", "--json", "a.json")
    assert rc == 0, err
    w, want = (json.loads((tmp_path / f).read_text()) for f in ("w.json", "a.json"))
    assert w["tuned"]["hub"]["commit"] == a
    assert w["summary"]["relative_change"] == want["summary"]["relative_change"]
    assert w["tensors"] == want["tensors"]
    # offline: the workers read the cache and ask the Hub nothing
    server.repos["org/moving"].branches["main"] = a
    rc, _, err = run("compare", "org/base", "org/moving", "--download", "--no-rank", "-q")     # records refs/main
    assert rc == 0, err
    server.reset_log()
    rc, _, err = run("compare", "org/base", "org/moving", "--offline", "--workers", "2", "--no-rank", "-q",
                     "--json", "o.json")
    assert rc == 0, err
    assert server.requests == [], "--offline --workers made HTTP requests"
    assert json.loads((tmp_path / "o.json").read_text())["tensors"] == want["tensors"]


def test_a_resumed_survey_reads_each_hub_member_at_its_commit_now(hf, server, tmp_path):
    """A survey keyed a Hub member by its spelling alone: once `main` moved, a rerun kept the old row (and the
    table had no commit to show it). Each task also resolved `main` again, after the parent had."""
    pytest.importorskip("distributed")
    a = server.commit("org/surveyed", _files(server.local["sibling"]))
    b = server.commit("org/surveyed", _files(server.local["tuned2"]), branch="later")
    server.repos["org/surveyed"].branches["main"] = a
    calls = []

    def move(info):                     # `main` moves once the parent has resolved it (call 1)
        calls.append(1)
        if len(calls) == 1:
            server.repos["org/surveyed"].branches["main"] = b
        return info

    server.info_edit["org/surveyed"] = move
    rc, _, err = run("survey", "org/base", "org/surveyed", "--out", "s", "--no-rank", "-q", "--workers", "2")
    assert rc == 0, err
    server.info_edit.clear()
    rc, _, err = run("compare", "org/base", f"org/surveyed@{a}", "--no-rank", "-q", "--json", "a.json")
    assert rc == 0, err
    rc, _, err = run("compare", "org/base", f"org/surveyed@{b}", "--no-rank", "-q", "--json", "b.json")
    assert rc == 0, err
    want_a, want_b = (json.loads((tmp_path / f).read_text())["summary"]["relative_change"] for f in ("a.json", "b.json"))
    from weightdiff.survey import read_csv

    [row] = read_csv(tmp_path / "s" / "survey.csv")
    assert (row["tuned"], row["tuned_commit"], row["relative_change"]) == ("org/surveyed", a, want_a)
    assert row["base_commit"] == server.repos["org/base"].branches["main"]
    # `main` is B now: a rerun compares again and records B
    rc, out, err = run("survey", "org/base", "org/surveyed", "--out", "s", "--no-rank", "-q")
    assert rc == 0 and "1 compared, 0 already done" in out, (out, err)
    [row] = read_csv(tmp_path / "s" / "survey.csv")
    assert (row["tuned_commit"], row["relative_change"]) == (b, want_b) != (a, want_a)
    # unchanged: skipped
    rc, out, err = run("survey", "org/base", "org/surveyed", "--out", "s", "--no-rank", "-q")
    assert rc == 0 and "0 compared, 1 already done" in out, (out, err)


def test_cached_weights_without_their_config_are_read_with_it_in_every_mode(hf, server, tmp_path):
    """The cache held org/untied-base's weights (fetched by another tool) but not its config.json: the default mode,
    --download and --offline read the cache, found no config and assumed a tied head (verdict partial, 0.12);
    --stream read config.json (tie_word_embeddings: false) and said derived (0.0044). Same commit."""
    from huggingface_hub import hf_hub_download

    base = llama(np.random.default_rng(7), **SHAPE)
    cfg = b'{"model_type": "llama", "tie_word_embeddings": false}'
    d = write_checkpoint(tmp_path / "ub", {k: v for k, v in base.items() if k != "lm_head.weight"}, dtype="BF16")
    server.commit("org/untied-base", {**_files(d), "config.json": cfg})
    t = write_checkpoint(tmp_path / "ut", _tune(base, 1), dtype="BF16")
    server.commit("org/untied-tuned", {**_files(t), "config.json": cfg})
    hf_hub_download("org/untied-base", "model.safetensors", cache_dir=str(hf / "hub"), endpoint=server.url)
    hf_hub_download("org/untied-tuned", "model.safetensors", cache_dir=str(hf / "hub"), endpoint=server.url)
    line = one_error(*run("compare", "org/untied-base", "org/untied-tuned", "--offline", "--no-rank")[::2])
    assert "org/untied-base: config.json of commit" in line and "is not in the local cache" in line
    rc, _, err = run("compare", "org/untied-base", "org/untied-tuned", "--stream", "--no-rank", "-q", "--json", "s.json")
    assert rc == 0, err
    want = json.loads((tmp_path / "s.json").read_text())
    for mode in ([], ["--download"], ["--offline"]):
        rc, _, err = run("compare", "org/untied-base", "org/untied-tuned", *mode, "--no-rank", "-q", "--json", "x.json")
        assert rc == 0, (mode, err)
        got = json.loads((tmp_path / "x.json").read_text())
        assert (got["summary"]["verdict"], got["tensors"]) == (want["summary"]["verdict"], want["tensors"]), mode
    # a repo without any config file, downloaded here, still reads offline (its absence is recorded)
    server.commit("org/noconfig", _files(server.local["sibling"]))
    rc, _, err = run("compare", "org/base", "org/noconfig", "--download", "--no-rank", "-q")
    assert rc == 0, err
    rc, _, err = run("compare", "org/base", "org/noconfig", "--offline", "--no-rank", "-q")
    assert rc == 0, err


def test_a_default_branch_not_named_main_is_read_in_every_online_mode(server, hf, tmp_path):
    # `dev` the default beside a `main`: --stream read dev, --download fetched main's bytes and failed "moved
    # during the run (rerun)" on every rerun (the library downloads "main" when no revision is given)
    x = server.commit("org/dflt", _files(server.local["tuned"]), branch="main")
    y = server.commit("org/dflt", _files(server.local["tuned2"]), branch="dev")
    server.repos["org/dflt"].default = "dev"
    docs = []
    for mode in ("--stream", "--download", "--download"):
        rc, _, err = run("compare", "org/base", "org/dflt", mode, "--json", "o.json", "--no-rank", "-q")
        assert rc == 0, (mode, err)
        d = json.loads((tmp_path / "o.json").read_text())
        assert d["tuned"]["hub"]["commit"] == y != x
        d.pop("run")
        docs.append(d)
    assert docs[0] == docs[1] == docs[2]


def test_a_wrong_token_on_a_gated_repo_is_not_told_to_set_a_token(server, hf, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    line = one_error(*run("compare", "org/base", "org/gated", "--stream")[::2])
    assert "the token in use has no access" in line and "set HF_TOKEN" not in line, line


def test_a_branch_spelled_refs_heads_is_that_branch():
    # `org/base@refs/heads/main` read revision `refs` with subfolder `heads/main` ("revision `refs` not found")
    assert parse_ref("org/base@refs/heads/main").revision == "main"
    r = parse_ref("hf://org/base@refs/heads/dev/sub")
    assert (r.repo_id, r.revision, r.subfolder) == ("org/base", "dev", "sub")
    assert parse_ref("org/base@refs/pr/2").revision == "refs/pr/2"


def test_a_survey_row_of_a_hub_member_counts_the_files_it_read(hf, server, tmp_path):
    # a Hub member has no local folder: its row said 0 files and 0 bytes for the tuned model and the base
    import csv

    rc, _, err = run("survey", "org/base", "org/sibling", "--out", "s", "--no-rank", "-q")
    assert rc == 0, err
    row = next(csv.DictReader((tmp_path / "s" / "survey.csv").open()))
    d = json.loads(weightdiff.compare(str(server.local["base"]), str(server.local["sibling"])).to_json())
    weights = sum(f["bytes"] for f in d["tuned"]["files"])
    assert int(row["tuned_files"]) >= 1 and int(row["tuned_bytes"]) >= weights > 0
    assert int(row["base_bytes"]) >= sum(f["bytes"] for f in d["base"][0]["files"]) > 0


def test_streamed_range_requests_keep_their_connections(server, hf):
    """Each range request opened a new connection to the storage: its answer was left unread at the last byte
    asked for (the end of the message not consumed), so the client closed it; on the real Hub, a TLS handshake
    to the CDN for every part of every tensor. An answer of exactly the bytes asked is read to its end now. And
    every range went through the Hub's resolve URL and its redirect (828 resolve calls, each a round trip more,
    on a route the Hub rate-limits): a file's ranges now go to the link its first redirect gave."""
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "-q", "--json", "r.json")
    assert rc == 0, err
    ranges = len(server.cdn_log)
    resolves = sum(1 for _, p in server.requests if "/resolve/" in p)
    lfs = [p for p in server.repos["org/tuned"].commits[server.v1] if p.endswith(".safetensors")] + ["model.safetensors"]
    assert ranges > 60
    assert server.connections["cdn"] <= hub_stream.WORKERS + 4, (ranges, dict(server.connections))
    assert server.connections["api"] <= hub_stream.WORKERS + 8, (ranges, dict(server.connections))
    assert resolves <= 2 * len(lfs) + 4, (resolves, ranges)      # racing first reads of a file may each resolve


def test_an_expired_storage_link_is_asked_for_again(server, hf, tmp_path):
    """A storage link that stops working (a signed URL past its expiry: 403 from the storage, not the Hub) is
    asked for again through the Hub, and the run reads what it reads without the fault."""
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "-q", "--json", "plain.json")
    assert rc == 0, err
    for repo in ("org/base", "org/tuned"):
        for p in server.repos[repo].commits[server.repos[repo].resolve("v1" if repo == "org/tuned" else "main")]:
            if p.endswith(".safetensors"):
                server.faults[(repo, p)] = {"link_uses": 3}
    server.reset_log()
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "-q", "--json", "expiring.json")
    assert rc == 0, err
    assert max(server.link_used.values()) > 3                   # links did expire, and were refused
    resolves = sum(1 for _, p in server.requests if "/resolve/" in p)
    assert resolves >= len(server.cdn_log) / 4
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "expiring.json"))
    a.pop("run"), b.pop("run")
    assert a == b


def test_a_link_that_keeps_failing_is_the_storages_error_not_a_loop(server, hf):
    """Refused again after the Hub gave a fresh link: the storage's refusal, in one line, as without the cache."""
    for p in server.repos["org/tuned"].commits[server.v1]:
        if p.endswith(".safetensors"):
            server.faults[("org/tuned", p)] = {"link_uses": 0}
    line = one_error(*run("compare", "org/base", "org/tuned@v1", "--stream")[::2])
    assert "refused" in line and "HTTP 403" in line, line


def test_the_token_never_goes_to_the_storage(server, hf, monkeypatch):
    """The Hub's token is for the Hub: a range sent straight to the storage's link (another origin) carries none,
    as the HTTP client drops it on a redirect to another origin."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rc, out, err = run("compare", "org/base", "org/gated", "--stream", "--no-rank", "-q")
    assert rc == 0 and "IDENTICAL" in out, err
    assert len(server.cdn_log) > 10 and not any(auth for _, auth in server.cdn_log), server.cdn_log[:5]


def test_links_that_serve_once_are_not_kept(server, hf, tmp_path):
    """A storage whose links serve one request each (or expire at once): after a few refusals a file's ranges go
    through the Hub's resolve URL every time, as before links were kept, not a refused request more for each."""
    for p in server.repos["org/tuned"].commits[server.v1]:
        if p.endswith(".safetensors"):
            server.faults[("org/tuned", p)] = {"link_uses": 1}
    rc, _, err = run("compare", "org/base", "org/tuned@v1", "--stream", "-q", "--json", "once.json")
    assert rc == 0, err
    served = sum(1 for path, _ in server.cdn_log if path in {p for (r, p) in server.faults})
    files = len(server.faults)
    assert served > 40 and server.links_refused <= files * 12, \
        (served, server.links_refused)


def test_small_tensors_stream_in_runs_not_a_request_each(server, hf, tmp_path):
    """A streamed checkpoint of many small tensors (a mixture of experts) cost a range request per tensor per side,
    and two more per changed tensor for the cast checks after the statistics (6,672 for 2,000 tensors of 4 values:
    a round trip to the Hub each). Neighbouring small tensors are read in one run now, and the checks read the run
    kept in memory; the numbers are the local files' own."""
    rng = np.random.default_rng(3)
    base = {f"model.layers.{i // 50}.mlp.experts.{i % 50}.w": rng.normal(size=(3, 4)).astype(np.float32)
            for i in range(600)}
    tuned = {k: v + np.float32(0.01) * (i % 3 == 0) for i, (k, v) in enumerate(base.items())}
    local = {}
    for name, t in (("manybase", base), ("manytuned", tuned)):
        local[name] = write_checkpoint(tmp_path / name, t, dtype="BF16")
        server.commit(f"org/{name}", _files(local[name]))
    server.reset_log()
    rc, _, err = run("compare", "org/manybase", "org/manytuned", "--stream", "-q", "--json", "s.json")
    assert rc == 0, err
    assert len(server.cdn_log) <= 12, len(server.cdn_log)
    rc, _, err = run("compare", str(local["manybase"]), str(local["manytuned"]), "-q", "--json", "l.json")
    assert rc == 0, err
    s, loc = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "l.json"))
    by = s["summary"]["tensors_by_status"]
    assert (by["changed"], by["unchanged"]) == (200, 400), by
    for d in (s, loc):
        d.pop("run"), d.pop("base"), d.pop("tuned")
    assert json.dumps(s, sort_keys=True) == json.dumps(loc, sort_keys=True)


def _committed(server, ad: Path, repo: str, base: Path | None = None) -> dict:
    """Commit adapter folder ``ad`` as ``repo``; the JSON of ``compare BASE ad`` read locally (the server's base)."""
    server.commit(repo, _files(ad))
    return weightdiff.compare(str(base or server.local["base"]), str(ad)).to_dict(include_run=False)


def _one_change(local: dict, name: str, rank: int) -> None:
    """The one changed record is ``name``'s, measured from factors with numerical rank ``rank``."""
    rec = next(x for x in local["tensors"] if x["status"] == "changed")
    assert rec["name"] == name and rec["compared"] == "factors" and rec["rank"]["numerical_rank"] == rank


def _reads_as_local(run, tmp_path, local: dict, base: str, tuned: str) -> None:
    """By id, streamed and downloaded, the adapter's records are ``local``'s, flag adapter raised."""
    for got in _by_id_both_ways(run, tmp_path, base, tuned):
        assert got["tensors"] == local["tensors"] and "adapter" in got["summary"]["flags"]


def _by_id_both_ways(run, tmp_path, base: str, tuned: str):
    """``compare BASE TUNED --json`` by repo id, streamed then downloaded: each run's JSON (exit 0 checked)."""
    for mode in ("--stream", "--download"):
        rc, _, err = run("compare", base, tuned, mode, "--json", f"r{mode}.json")
        assert rc == 0, err
        yield json.loads((tmp_path / f"r{mode}.json").read_text())


def test_a_vera_adapter_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """A VeRA adapter repo, streamed and downloaded: its shared projections (one tensor each, read for every module)
    and its vectors over HTTP give the records of the folder read locally."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(12)
    with locate(server.local["base"]) as b:
        shapes = {n: tuple(t.shape) for n, t in b.tensors.items()}
    mods = ["model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    out = max(shapes[f"{m}.weight"][0] for m in mods)
    inn = max(shapes[f"{m}.weight"][1] for m in mods)
    ad = tmp_path / "vera"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4,
                                                        "target_modules": ["k_proj", "down_proj"]}))
    t = {"base_model.vera_A": rng.standard_normal((4, inn)).astype(np.float32),
         "base_model.vera_B": rng.standard_normal((out, 4)).astype(np.float32)}
    for m in mods:
        t[f"base_model.model.{m}.vera_lambda_b"] = (0.01 * rng.standard_normal(shapes[f"{m}.weight"][0])).astype(
            np.float32)
        t[f"base_model.model.{m}.vera_lambda_d"] = rng.standard_normal(4).astype(np.float32)
    save_file(ad / "adapter_model.safetensors", t)
    local = _committed(server, ad, "org/vera")
    assert [x["compared"] for x in local["tensors"] if x["status"] == "changed"] == ["factors", "factors"]
    _reads_as_local(run, tmp_path, local, "org/base", "org/vera")


def test_an_ia3_adapter_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """An IA3 adapter repo, streamed and downloaded: the same records as the folder read locally (the merged
    weights are computed from the base's bytes read over HTTP)."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(11)
    with locate(server.local["base"]) as b:
        shapes = {n: tuple(t.shape) for n, t in b.tensors.items()}
    k, d = "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"
    ad = tmp_path / "ia3"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                                        "feedforward_modules": ["down_proj"]}))
    save_file(ad / "adapter_model.safetensors", {
        f"base_model.model.{k}.ia3_l": (1 + 0.1 * rng.standard_normal((shapes[f"{k}.weight"][0], 1))).astype(np.float32),
        f"base_model.model.{d}.ia3_l": (1 + 0.1 * rng.standard_normal((1, shapes[f"{d}.weight"][1]))).astype(np.float32)})
    local = _committed(server, ad, "org/ia3")
    for got in _by_id_both_ways(run, tmp_path, "org/base", "org/ia3"):
        assert got["tensors"] == local["tensors"] and got["summary"]["scope"]["ia3"]["vectors"] == 2


def test_trainable_tokens_by_id_read_as_they_do_locally(server, hf, tmp_path):
    """A trainable-tokens adapter repo against a bf16 base by id, streamed and downloaded: the base's rows read over
    HTTP (and the table for the statistics) give the records of the pair read locally."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(14)
    with locate(server.local["base"]) as b:
        emb = next(n for n in b.tensors if n.endswith("embed_tokens.weight"))
        vocab, dim = (int(d) for d in b.tensors[emb].shape)
    ad = tmp_path / "tokens"
    ad.mkdir()
    ids = [vocab - 1, 0, 5]
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "TRAINABLE_TOKENS", "token_indices": ids}))
    save_file(ad / "adapter_model.safetensors", {
        f"base_model.model.{emb.removesuffix('.weight')}.trainable_tokens_delta":
            rng.standard_normal((3, dim)).astype(np.float32)})
    local = _committed(server, ad, "org/tokens")
    _one_change(local, emb, 3)
    _reads_as_local(run, tmp_path, local, "org/base", "org/tokens")


def test_an_hra_adapter_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """An HRA adapter repo, streamed and downloaded: the base weight read over HTTP (for P = W A^T, then its
    statistics) gives the records of the folder read locally."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(16)
    with locate(server.local["base"]) as b:
        q = next(n for n, t in b.tensors.items() if n.endswith("q_proj.weight"))
        inputs = int(b.tensors[q].shape[1])
    ad = tmp_path / "hra"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"]}))
    save_file(ad / "adapter_model.safetensors", {
        f"base_model.model.{q.removesuffix('.weight')}.hra_u": rng.standard_normal((inputs, 2)).astype(np.float32)})
    local = _committed(server, ad, "org/hra")
    _one_change(local, q, 2)
    _reads_as_local(run, tmp_path, local, "org/base", "org/hra")


def test_an_ln_tuning_adapter_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """An LN tuning adapter repo (trained copies of two norms), streamed and downloaded: the records of the folder
    read locally, each copy compared with the base's norm it replaces."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(15)
    with locate(server.local["base"]) as b:
        norms = [n for n, t in b.tensors.items() if n.endswith("norm.weight") and len(t.shape) == 1][:2]
        shapes = {n: tuple(b.tensors[n].shape) for n in norms}
    assert len(norms) == 2, norms
    ad = tmp_path / "ln"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LN_TUNING", "target_modules": ["norm"]}))
    save_file(ad / "adapter_model.safetensors", {
        f"base_model.model.{n.removesuffix('.weight')}.ln_tuning_layers.weight":
            (1 + 0.1 * rng.standard_normal(shapes[n])).astype(np.float32) for n in norms})
    local = _committed(server, ad, "org/ln")
    assert sorted(x["name"] for x in local["tensors"] if x["status"] == "changed") == sorted(norms)
    _reads_as_local(run, tmp_path, local, "org/base", "org/ln")


def test_a_lora_on_fused_experts_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """A LoRA on gpt-oss-style fused experts (target_parameters: gate_up_proj and the square down_proj, nested) by repo
    id, streamed and downloaded: the records are the folders' read locally (each expert's factor pair against its own
    matrix, the square ones read the way the non-square ones' shapes say)."""
    from weightdiff.io.safetensors_write import save_file

    rng = np.random.default_rng(16)
    L = "model.layers.0.mlp.experts."
    base = write_checkpoint(tmp_path / "moe-base", {
        L + "gate_up_proj": rng.normal(0, 0.02, (4, 16, 24)).astype(np.float32),
        L + "down_proj": rng.normal(0, 0.02, (4, 16, 16)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (16, 16)).astype(np.float32)}, dtype="F32")
    server.commit("org/moe-base", _files(base))
    ad = tmp_path / "experts-lora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [],
                                                        "target_parameters": ["gate_up_proj", "down_proj"]}))
    pre = "base_model.model." + L.rstrip(".")
    save_file(ad / "adapter_model.safetensors", {       # gate_up_proj innermost, read [experts, in, out]
        pre + ".base_layer.lora_A.weight": rng.standard_normal((8, 16)).astype(np.float32),
        pre + ".base_layer.lora_B.weight": (0.01 * rng.standard_normal((24, 8))).astype(np.float32),
        pre + ".lora_A.weight": rng.standard_normal((8, 16)).astype(np.float32),
        pre + ".lora_B.weight": (0.01 * rng.standard_normal((16, 8))).astype(np.float32)})
    local = _committed(server, ad, "org/experts-lora", base)
    changed = [x for x in local["tensors"] if x["status"] == "changed"]
    assert sorted(x["name"] for x in changed) == sorted(f"{L}{e}.{p}" for e in range(4) for p in ("gate_up_proj",
                                                                                                 "down_proj"))
    assert all(x["compared"] == "factors" and "[experts, in, out]" in x["note"] for x in changed)
    _reads_as_local(run, tmp_path, local, "org/moe-base", "org/experts-lora")


def test_an_mlx_lm_adapter_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """An mlx-lm adapter repo (adapters.safetensors and mlx-lm's adapter_config.json), streamed and downloaded: the
    records of the folder read locally."""
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(17)
    with locate(server.local["base"]) as b:
        q = next(n for n, t in b.tensors.items() if n.endswith("q_proj.weight"))
        out, inputs = (int(d) for d in b.tensors[q].shape)
    ad = tmp_path / "mlx"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                        "lora_parameters": {"rank": 2, "scale": 20.0}}))
    m = q.removesuffix(".weight")
    save_file(ad / "adapters.safetensors", {m + ".lora_a": rng.standard_normal((inputs, 2)).astype(np.float32),
                                            m + ".lora_b": (0.001 * rng.standard_normal((2, out))).astype(np.float32)})
    local = _committed(server, ad, "org/mlx")
    _one_change(local, q, 2)
    _reads_as_local(run, tmp_path, local, "org/base", "org/mlx")


def test_a_llama_cpp_lora_gguf_by_id_reads_as_it_does_locally(server, hf, tmp_path):
    """A repo holding a llama.cpp LoRA GGUF against a base by id (downloaded: a GGUF is read from a local file), the
    head counts that put Q/K's rows back in order read from the base repo's config.json: the records of the pair
    read locally."""
    pytest.importorskip("gguf")
    from gguf_lora import lora_to_gguf

    rng = np.random.default_rng(13)
    cfg = json.dumps({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4}).encode()
    server.commit("org/heads-base", {**_files(server.local["base"]), "config.json": cfg})
    local_base = tmp_path / "heads-base"
    local_base.mkdir()
    for k, v in {**_files(server.local["base"]), "config.json": cfg}.items():
        (local_base / k).write_bytes(v)
    fac = {m: (rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32))
           for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj")}
    lora = lora_to_gguf(tmp_path / "adapter-F32-LoRA.gguf", fac, alpha=8.0, n_head=4, n_kv=4)
    server.commit("org/lora-gguf", {"README.md": b"x", lora.name: lora.read_bytes()})
    local = weightdiff.compare(str(local_base), str(lora)).to_dict(include_run=False)
    assert [x["compared"] for x in local["tensors"] if x["status"] == "changed"] == ["factors", "factors"]
    rc, _, err = run("compare", "org/heads-base", "org/lora-gguf", "--download", "--json", "r.json")
    assert rc == 0, err
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["tensors"] == local["tensors"] and "adapter" in got["summary"]["flags"]
    assert got["tuned"]["format"] == "adapter" and got["tuned"]["files"][0]["name"] == lora.name
