"""Hub answers that contradict each other or the user's spelling (the Hub tester's findings), against the
server of tests/hub_server.py: an API answer trickled forever, a CDN serving another file's bytes, a lying
``X-Linked-Etag``, branch names with a slash, short commit shas offline, a CDN's 403, a default branch not
named ``main`` offline, a malformed file that was downloaded and verified. Each is one line, exit 2, nothing
written, or the right reading."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

pytest.importorskip("huggingface_hub")

from test_hub import SHAPE, _files, hf, one_error, run, server, stored  # noqa: F401  (fixtures)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- 2: a CDN serving another file's bytes ---------------------------------------------------------

def test_a_stream_whose_etag_names_another_blob_is_refused(server, hf, tmp_path):
    """The resolve answer for org/sibling's weights redirected to the base's blob (same size): every range
    answer carried the base's sha256 as its ETag, and --stream read "identical" while the JSON recorded the
    sibling's sha256 as the file compared."""
    server.faults[("org/sibling", "model.safetensors")] = {"cdn_serves": ("org/base", "model.safetensors")}
    rc, out, err = run("compare", "org/base", "org/sibling", "--stream", "-q", "--json", "o.json")
    line = one_error(rc, err)
    want = sha256(_files(server.local["sibling"])["model.safetensors"])
    got = sha256(_files(server.local["base"])["model.safetensors"])
    assert line.startswith(f"error: hf://org/sibling/model.safetensors: the server sent bytes whose ETag is the "
                           f"content hash {got[:16]}..., not the sha256 {want[:16]}... the Hub lists"), line
    assert "use --download" in line and out == "" and not (tmp_path / "o.json").exists()


def test_a_xet_hash_etag_the_resolve_announced_is_accepted(server, hf, tmp_path):
    """A Xet-backed file's CDN answers carry the Xet hash, which the resolve answer names in X-Xet-Hash."""
    server.faults[("org/sibling", "model.safetensors")] = {"xet_hash": "e" * 64}
    rc, _, err = run("compare", "org/base", "org/sibling", "--stream", "-q", "--no-rank")
    assert rc == 0, err


# -- 1: an API answer trickled a byte at a time -------------------------------------------------------

def test_an_api_answer_trickled_forever_is_bounded_as_a_whole(server, hf, monkeypatch):
    """The model info sent a byte every 2 s: each read inside HF_HUB_ETAG_TIMEOUT, the answer never done
    (about 40 minutes for 1.2 KB). Every API exchange must finish within WEIGHTDIFF_HUB_API_SECONDS."""
    from weightdiff.io import hub_errors, hub_http

    monkeypatch.setenv("WEIGHTDIFF_HUB_API_SECONDS", "1")
    server.api_trickle = 0.05                 # about 60 s for a model info; 1 KB in 50 s for the refs
    t0 = time.monotonic()
    line = one_error(*run("compare", "org/base", "org/sibling", "-q")[::2])
    assert time.monotonic() - t0 < 8
    assert line.startswith(f"error: org/base: the Hub at {server.url} did not finish its answer for `org/base` "
                           f"within the 1 s an API answer may take ("), line
    assert "WEIGHTDIFF_HUB_API_SECONDS" in line and stored(hf) == []
    t0 = time.monotonic()                     # the file listing and the refs (get_json) too
    with pytest.raises(hub_http.AnswerTooSlow):
        hub_http.list_tree(server.url, "org/multi", "main")
    assert hub_errors._refs("org/tuned", server.url) == ""
    assert time.monotonic() - t0 < 6
    server.api_trickle = 0.0                  # a steady answer within the limit passes
    assert hub_http.list_refs(server.url, "org/tuned")["tags"] == ["v1"]


# -- 6: a CDN's 403 is the storage's refusal, not the user's token ------------------------------------

@pytest.mark.parametrize("mode", ["--stream", "--download"])
def test_a_cdn_refusal_names_the_file_and_the_host_not_the_token(server, hf, mode):
    """Only the CDN answered 403 (an expired signed URL) for a public repo: the line said the Hub refused the
    token and to set HF_TOKEN, and under --download did not name the file."""
    server.faults[("org/sibling", "model.safetensors")] = {"cdn_status": 403}
    line = one_error(*run("compare", "org/base", "org/sibling", mode, "-q")[::2])
    assert line.startswith(f"error: hf://org/sibling/model.safetensors: the file's request was redirected to "
                           f"{server.cdn_url}, which refused it (HTTP 403): the storage refused the link the Hub gave"), line
    assert "HF_TOKEN" not in line and "hf auth login" not in line and "token" not in line


# -- 4: a branch whose name holds a slash ----------------------------------------------------------------

def test_a_branch_with_a_slash_is_read_by_its_name_online_and_offline(server, hf, tmp_path):
    """`org/name@feature/x` read branch `feature` and subfolder `x` ("revision `feature` not found", listing
    `feature/x` among the branches); `@refs/heads/feature/x` too. The longest branch or tag the spelling
    starts with is meant; %2F keeps working."""
    sha = server.commit("org/slashed", {**_files(server.local["sibling"]),
                                        **{f"sub/{k}": v for k, v in _files(server.local["tuned2"]).items()}},
                        branch="feature/x")
    server.repos["org/slashed"].tags["rel/1"] = sha
    server.commit("org/slashed", _files(server.local["base"]), branch="main")
    for i, spelling in enumerate(("org/slashed@feature/x", "org/slashed@refs/heads/feature/x", "org/slashed@feature%2Fx",
                                  "org/slashed@refs/tags/rel/1")):
        # streamed once (each streamed compare is ~2 s of range requests); the spelling is resolved alike either way
        rc, _, err = run("compare", "org/base", spelling, *(["--stream"] if i == 0 else []), "--no-rank", "-q",
                         "--json", "o.json")
        assert rc == 0, (spelling, err)
        d = json.loads((tmp_path / "o.json").read_text())
        assert d["tuned"]["hub"]["commit"] == sha and d["tuned"]["hub"]["subfolder"] is None, spelling
        assert d["summary"]["verdict"] == "derived", spelling
    # a path after the branch is its subfolder; a file of it names the file
    for spelling in ("hf://org/slashed@feature/x/sub", "hf://org/slashed@feature/x/sub/model.safetensors"):
        rc, _, err = run("compare", "org/base", spelling, "--no-rank", "-q", "--json", "s.json")
        assert rc == 0, (spelling, err)
        assert json.loads((tmp_path / "s.json").read_text())["tuned"]["hub"]["revision"] == "feature/x"
    # refs/heads/ looks among branches only
    line = one_error(*run("compare", "org/base", "org/slashed@refs/heads/rel/1", "--stream", "-q")[::2])
    assert "revision `rel` not found in `org/slashed`" in line, line
    # offline, from the refs the cache recorded (a download by the branch's name writes refs/feature/x)
    rc, _, err = run("compare", "org/base", "org/slashed@feature/x", "--download", "--no-rank", "-q")
    assert rc == 0, err
    rc, _, err = run("compare", "org/base", "org/slashed@feature/x", "--offline", "--no-rank", "-q", "--json",
                     "off.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "off.json").read_text())["tuned"]["hub"]["commit"] == sha


# -- 5: the 12-digit commit weightdiff prints, offline ------------------------------------------------------

def test_a_short_sha_of_a_cached_commit_reads_offline(server, hf, tmp_path):
    """`org/name@<12 digits>` (as weightdiff prints a commit) was refused offline, the error listing that very
    commit as cached."""
    sha = server.repos["org/sibling"].branches["main"]
    rc, _, err = run("compare", "org/base", "org/sibling", "--download", "--no-rank", "-q")
    assert rc == 0, err
    for short in (sha[:12], sha[:7]):
        rc, _, err = run("compare", "org/base", f"org/sibling@{short}", "--offline", "--no-rank", "-q", "--json",
                         "o.json")
        assert rc == 0, (short, err)
        assert json.loads((tmp_path / "o.json").read_text())["tuned"]["hub"]["commit"] == sha
    other = "0123456" if not sha.startswith("0123456") else "7654321"
    line = one_error(*run("compare", "org/base", f"org/sibling@{other}", "--offline", "-q")[::2])
    assert f"revision `{other}` of `org/sibling` is not in the local cache (cached: main, {sha[:12]})" in line


# -- 3: a lying X-Linked-Etag, and what offline runs call the Hub's ------------------------------------

def test_a_wrong_linked_etag_leaves_no_mislabelled_blob_and_offline_says_where_a_sha256_comes_from(
        server, hf, tmp_path):
    """huggingface_hub names a blob by the server's X-Linked-Etag: a wrong one (the bytes right) made offline
    runs report it as the file's sha256 "from the Hub", and --hash offline refuse the correct file as corrupt,
    saying "the Hub lists" (offline the Hub lists nothing)."""
    true = sha256(_files(server.local["sibling"])["model.safetensors"])
    server.faults[("org/sibling", "model.safetensors")] = {"linked_etag": "ab" * 32}
    rc, _, err = run("compare", "org/base", "org/sibling", "--download", "--no-rank", "-q", "--json", "d.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "d.json").read_text())
    assert [f["sha256"] for f in d["tuned"]["files"]] == [true]
    assert any("the server's ETag was abababababababab..., not the file's sha256" in n for n in d["plan"]["notes"])
    link = next(hf.rglob("models--org--sibling/snapshots/*/model.safetensors"))
    assert link.resolve().name == true                      # the blob is kept under its verified sha256
    for flags, source in ((), "cache"), (("--hash",), "local"):
        rc, _, err = run("compare", "org/base", "org/sibling", "--offline", "--no-rank", "-q", "--json", "o.json",
                         *flags)
        assert rc == 0, err
        f = json.loads((tmp_path / "o.json").read_text())["tuned"]["files"][0]
        assert (f["sha256"], f["sha256_source"]) == (true, source), flags
    # a cache an older run left under the wrong name: offline says so, and --hash says which disagrees
    blob = link.resolve()
    wrong = blob.with_name("ab" * 32)
    blob.rename(wrong)
    link.unlink()
    link.symlink_to(wrong)
    rc, _, err = run("compare", "org/base", "org/sibling", "--offline", "--no-rank", "-q", "--json", "o.json")
    f = json.loads((tmp_path / "o.json").read_text())["tuned"]["files"][0]
    assert rc == 0 and (f["sha256"], f["sha256_source"]) == ("ab" * 32, "cache")
    line = one_error(*run("compare", "org/base", "org/sibling", "--offline", "--hash", "-q")[::2])
    assert line.startswith(f"error: hf://org/sibling/model.safetensors: the cached file's bytes have sha256 "
                           f"{true[:16]}..., but the cache stores it under abababababababab..."), line
    assert "the Hub lists" not in line and "run once online with --hash" in line


# -- 8: a malformed file downloaded and verified ---------------------------------------------------------

def test_a_malformed_downloaded_file_is_named_as_the_repos_and_not_called_truncated(server, hf):
    """--download named the file by its cache path and said "truncated download?", though the download had
    just been hashed equal to the Hub's sha256: the file is malformed in the repo."""
    import struct

    h = json.dumps({"w": {"dtype": "F32", "shape": [50000, 500000], "data_offsets": [0, 100 * 10**9]}}).encode()
    h += b" " * (-len(h) % 8)
    server.commit("org/bad", {"model.safetensors": struct.pack("<Q", len(h)) + h + b"\0" * 64,
                              "config.json": b'{"model_type": "llama"}'})
    line = one_error(*run("compare", "org/base", "org/bad", "--download", "-q")[::2])
    assert line.startswith("error: hf://org/bad/model.safetensors: header declares "), line
    assert "truncated download?" not in line and "byte for byte the one the Hub lists" in line
    line = one_error(*run("compare", "org/base", "org/bad", "--offline", "-q")[::2])    # named so offline too
    assert line.startswith("error: hf://org/bad/model.safetensors: header declares "), line


@pytest.mark.parametrize("listed", [None, "f" * 64])
def test_a_xet_hash_the_listing_does_not_give_vouches_for_nothing(server, hf, tmp_path, listed):
    """A redirect that serves the base's blob announces that blob's Xet hash: the ETag check took the
    redirect's word and an unrelated model read IDENTICAL (found by a tester verifying this round's fixes)."""
    server.faults[("org/base", "model.safetensors")] = {"xet_hash": "e" * 64}          # the base is Xet-backed
    server.faults[("org/sibling", "model.safetensors")] = {
        "cdn_serves": ("org/base", "model.safetensors"), "xet_hash": "e" * 64, "listed_xet": listed}
    rc, out, err = run("compare", "org/base", "org/sibling", "--stream", "-q", "--json", "o.json")
    line = one_error(rc, err)
    assert line.startswith("error: hf://org/sibling/model.safetensors: the server sent bytes whose ETag"), line
    assert not (tmp_path / "o.json").exists()


def test_same_origin_is_scheme_host_and_port():
    """What decides whether the Hub's token goes with a request to a kept storage link, and whether an error came
    from the Hub or from where it redirected."""
    from weightdiff.io.hub_errors import same_origin

    assert same_origin("https://huggingface.co/api/x?y=1", "https://huggingface.co")
    assert same_origin("https://HuggingFace.co:443/a", "https://huggingface.co/mirror")
    assert same_origin("http://127.0.0.1:8080/a", "http://127.0.0.1:8080")
    assert not same_origin("https://cdn-lfs.hf.co/a", "https://huggingface.co")
    assert not same_origin("http://huggingface.co/a", "https://huggingface.co")
    assert not same_origin("http://127.0.0.1:8081/a", "http://127.0.0.1:8080")
    assert not same_origin("http://127.0.0.1:port/a", "http://127.0.0.1:8080")
