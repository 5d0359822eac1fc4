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
