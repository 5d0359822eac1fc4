"""What a Hub that behaves like huggingface.co showed (the second Hub tester's findings), against the server of
tests/hub_server.py: a revision the HTTP client would rewrite (``@..``), a file in Xet storage whose storage
cannot be reached, a listed file the Hub does not serve, a listing whose size for a file is not the served
file's, and a rate-limited list of branches under a revision spelled with a slash. Each is one line naming
what failed, exit 2, nothing written, or the right reading."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("huggingface_hub")

from test_hub import SHAPE, _files, hf, one_error, run, server, stored  # noqa: F401  (fixtures)

from weightdiff.errors import CheckpointError
from weightdiff.io.hub import parse_ref


# -- 1: a revision the HTTP client rewrites -------------------------------------------------------------

BAD_REVISIONS = ["org/tuned@..", "hf://org/tuned@..", "org/tuned@%2E%2E", "org/tuned@.", "org/tuned@%2E",
                 "org/tuned@a/../b", "hf://org/tuned@main/./sub", "hf://org/tuned@main/..", "org/tuned@main@{1}",
                 "org/tuned@refs/heads/..", "org/tuned@release%2F", "org/tuned@a%00b", "org/tuned@a..b",
                 "hf://org/tuned/../base"]


@pytest.mark.parametrize("spelling", BAD_REVISIONS)
def test_a_revision_git_refuses_is_refused_before_any_request(server, hf, tmp_path, spelling):
    """`org/tuned@..` built `/api/models/org/tuned/revision/..`, which the HTTP client sends as
    `/api/models/org/tuned`: --stream and inspect read the default branch with exit 0 and recorded revision
    "..", a download said "HTTP 404 (try again later)". Now one line, before any request."""
    for args in (["compare", "org/base", spelling, "--stream", "--json", "o.json"],
                 ["compare", "org/base", spelling, "--download", "--json", "o.json"],
                 ["inspect", spelling]):
        server.reset_log()
        rc, out, err = run(*args)
        line = one_error(rc, err)
        assert line.startswith(f"error: {spelling}: "), line
        assert "is not a valid revision" in line or "segment, which names no folder or file" in line, line
        assert server.requests == [], (args, server.requests)
        assert not (tmp_path / "o.json").exists() and stored(hf) == []


def test_git_ref_names_the_hub_has_stay_valid():
    from weightdiff.io.hub import revision_problem

    for rev in ("main", "v1.0", "feature/x", "feat+x", "refs/pr/1", "release/v1/ckpts/step-1", "rel/2024",
                "c" * 40, "my_branch-2"):
        assert revision_problem(rev) is None, rev
    for rev, why in (("..", "`..` component"), (".", "`.` component"), ("a//b", "empty component"),
                     ("a/", "ends with `/`"), ("a@{1}", "`@{`"), ("a b", "space"), ("a~1", "`~`"),
                     (".hidden", "starting with `.`"), ("x.lock", "`.lock`"), ("x.", "ends with `.`"), ("@", "`@`")):
        assert why in (revision_problem(rev) or ""), (rev, revision_problem(rev))
    assert parse_ref("org/name@refs/pr/3").revision == "refs/pr/3"
    assert parse_ref("org/name@release%2Fv1").revision == "release/v1"
    with pytest.raises(CheckpointError, match="not a valid revision"):
        parse_ref("org/name@refs/tags/../x")


# -- 2: Xet storage that cannot be reached ---------------------------------------------------------------

def test_a_xet_backed_file_downloads_by_plain_http(server, hf, tmp_path, monkeypatch):
    """A resolve answer with `X-Xet-Hash` and a `rel="xet-auth"` link sent the download to hf_xet: its token
    route answering 404 read "hf://org/sibling/model.safetensors: the server answered HTTP 404 (try again later)"
    (the file exists), and a Xet storage that cannot be reached kept the run silent about two minutes (no
    timeout of weightdiff's applies to hf_xet), then blamed "the Hub at <endpoint>". The download now follows
    the resolve answer's redirect like any other file: the same timeouts, and a failure names the file."""
    from huggingface_hub import constants

    server.faults[("org/sibling", "model.safetensors")] = {"xet_auth": True}
    for cas in (None, "http://127.0.0.1:9"):              # the token route 404; a storage nobody answers at
        monkeypatch.setattr(server, "xet_cas", cas)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"cache{cas is None}"))     # a fresh download each
        server.reset_log()
        t0 = time.monotonic()
        rc, out, err = run("compare", "org/base", "org/sibling", "--download", "--no-rank", "-q", "--json",
                           f"x{cas is None}.json")
        assert rc == 0, (cas, err)
        assert time.monotonic() - t0 < 60
        assert not any("xet-read-token" in path for _, path in server.requests), server.requests
        doc = json.loads((tmp_path / f"x{cas is None}.json").read_text())
        assert doc["summary"]["verdict"] == "derived"
        assert not constants.HF_HUB_DISABLE_XET          # the library's setting is given back after the run
    # the storage refusing the file: one line naming the file and the server that answered, at once
    server.faults[("org/independent", "model.safetensors")] = {"xet_auth": True, "cdn_status": 404}
    rc, out, err = run("compare", "org/base", "org/independent", "--download", "-q", "--json", "f.json")
    line = one_error(rc, err)
    assert line.startswith("error: hf://org/independent/model.safetensors: "), line
    assert server.cdn_url in line and "HTTP 404" in line, line
    assert not (tmp_path / "f.json").exists()


@pytest.mark.parametrize("xet", [False, True])
def test_a_storage_host_that_cannot_be_reached_is_named_with_the_file(server, hf, tmp_path, xet):
    """The resolve answer redirects to a storage host nobody answers at: a download said "org/tuned: cannot
    reach the Hub at <endpoint>" (the Hub had answered every request), naming neither the file nor the host."""
    fault = {"cdn_at": "http://127.0.0.1:9", **({"xet_auth": True} if xet else {})}
    server.faults[("org/sibling", "model.safetensors")] = fault
    for mode in ("--download", "--stream"):
        rc, out, err = run("compare", "org/base", "org/sibling", mode, "-q", "--json", "o.json")
        line = one_error(rc, err)
        assert line.startswith("error: hf://org/sibling/model.safetensors: "), (mode, line)
        assert "http://127.0.0.1:9" in line and "cannot reach the Hub" not in line, (mode, line)
        assert not (tmp_path / "o.json").exists()


# -- 3: a listed file the Hub does not serve ---------------------------------------------------------------

def test_a_listed_file_the_hub_does_not_serve_is_named_in_every_mode(server, hf, tmp_path):
    """--download named only the repo ("org/tuned: a file of `org/tuned` is listed but the Hub does not serve
    it"); --stream named the file."""
    server.faults[("org/tuned", "model-00002-of-00003.safetensors")] = {"entry_missing": True}
    for mode in ("--download", "--stream"):
        rc, out, err = run("compare", "org/base", "org/tuned@v1", mode, "-q", "--json", "o.json")
        line = one_error(rc, err)
        assert line.startswith("error: hf://org/tuned@v1/model-00002-of-00003.safetensors: a file of `org/tuned` is "
                               "listed but the Hub does not serve it (HTTP 404)"), (mode, line)
        assert not (tmp_path / "o.json").exists()


# -- 4: the listing's size is not the served file's -------------------------------------------------------

@pytest.mark.parametrize("delta", [100, -100])
def test_a_listing_size_the_served_file_contradicts_is_said_as_such(server, hf, tmp_path, delta):
    """The listing off by 100 bytes, the served file right: --stream blamed the file ("100 trailing bytes after
    the last tensor's data (corrupt or appended file?)", "... (truncated download?)") though nothing was
    downloaded. Now the line says the listing and the served file disagree; --download checks the sha256."""
    name = "model-00002-of-00003.safetensors"
    server.faults[("org/tuned", name)] = {"listed_size_delta": delta}
    real = len(_files(server.local["tuned"])[name])
    rc, out, err = run("compare", "org/base", "org/tuned@v1", "--stream", "-q", "--json", "o.json")
    line = one_error(rc, err)
    assert line.startswith(f"error: hf://org/tuned@v1/{name}: the Hub's listing gives this file {real + delta:,} "
                           f"bytes but the server serves {real:,} bytes: the listing and the served file "
                           "disagree"), line
    assert "truncated" not in line and "trailing" not in line and not (tmp_path / "o.json").exists()
    rc, out, err = run("compare", "org/base", "org/tuned@v1", "--download", "--no-rank", "-q", "--json", "d.json")
    assert rc == 0, err


# -- 5: the list of branches rate-limited ------------------------------------------------------------------

def test_a_rate_limited_refs_list_is_reported_not_read_as_another_split(server, hf, tmp_path, monkeypatch):
    """`org/slash@feature/x` with the refs route answering 429 (Retry-After 3600): the failure was swallowed and
    the spelling read as revision `feature`, subfolder `x` ("revision `feature` not found")."""
    sha = server.commit("org/slash", _files(server.local["sibling"]), branch="feature/x")
    server.commit("org/slash", _files(server.local["base"]), branch="main")
    monkeypatch.setitem(server.refs_faults, "org/slash", {"status": 429, "retry_after": 3600})
    for mode in ("--stream", "--download"):
        rc, out, err = run("compare", "org/base", "org/slash@feature/x", mode, "-q", "--json", "o.json")
        line = one_error(rc, err)
        assert line.startswith("error: org/slash@feature/x: cannot tell where the revision in `feature/x` ends: "
                               "asked for the branches and tags of `org/slash`, the Hub answered HTTP 429 and asked "
                               "to retry after 3600 s"), line
        assert "@feature%2Fx" in line and "not found" not in line, line
        assert not (tmp_path / "o.json").exists()
    server.refs_faults.clear()
    rc, out, err = run("compare", "org/base", "org/slash@feature/x", "--stream", "--no-rank", "-q", "--json", "o.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "o.json").read_text())["tuned"]["hub"]["commit"] == sha
