"""A Hub checkpoint from the local Hugging Face cache only: ``--offline`` or HF_HUB_OFFLINE,
or a Hub that cannot be reached. The cache is read through huggingface_hub's own
``scan_cache_dir`` (repos, revisions with their refs, snapshot folders, blobs), never by
walking its layout here; the snapshot then goes through the local locator. A file the
checkpoint needs but the cache lacks is one line naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, escape_name
from .checkpoint import CONFIG_FILES, Checkpoint, LocalFolder, _read_index, build, choose_weights, file_kind, onnx_subfolder_names

if TYPE_CHECKING:
    from .hub import HubRef, _Env

__all__ = ["from_cache", "cached_revision", "cached_refs", "identity", "as_hub_file"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")


def identity(ref: HubRef, commit: str, files: list[tuple[str, int | None, str | None]]) -> dict:
    return {"repo_id": ref.repo_id, "revision": ref.revision, "commit": commit, "subfolder": ref.subfolder or None,
            "files": [{"name": p, "bytes": size, "sha256": sha} for p, size, sha in files]}


_TRUNCATED = re.compile(r" \(truncated download\?\)|;? truncated download\?")


def as_hub_file(exc: CheckpointError, ref: HubRef, commit: str, snapshot: Path, verified=frozenset()) -> CheckpointError:
    """An error of the local reader about a file of a cache snapshot, naming it as the repo's file
    (``hf://org/name@rev/path``), not by its path in the cache. A file this run downloaded and hashed equal to
    the Hub's sha256 (``verified``: paths in the repo) is the Hub's own file, byte for byte: "truncated
    download?" is dropped and the hint says so."""
    if exc.path is None:
        return exc
    try:
        rel = Path(exc.path).relative_to(snapshot).as_posix()
    except ValueError:
        return exc
    if rel in ("", ".") or not exc.message.startswith(exc.path):
        return exc
    problem = exc.message[len(exc.path):].removeprefix(": ")
    hint = exc.hint
    if rel in verified:
        problem = _TRUNCATED.sub("", problem)
        hint = ("the file is byte for byte the one the Hub lists (its sha256 was checked): it is malformed in the "
                "repo; ask its owner, or pick another revision")
    return CheckpointError(ref.file(commit, rel, -1, None), problem, hint)


def _cached_repos(ref: HubRef, env: _Env) -> list:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return [r for r in scan_cache_dir(env.cache_dir).repos if r.repo_id == ref.repo_id and r.repo_type == "model"]
    except CacheNotFound:
        return []


def cached_refs(ref: HubRef, env: _Env) -> set[str]:
    """The branch and tag names the local cache records for the repo (its ``refs/``; a name with a slash is a
    file in a folder there, as huggingface_hub writes it)."""
    return {x for repo in _cached_repos(ref, env) for r in repo.revisions for x in r.refs}


def cached_revision(ref: HubRef, env: _Env, why: str, commit: str | None = None):
    """The cached revision (``scan_cache_dir``'s) ``commit``, else the spelling's revision, names (a branch or
    tag the cache records, a commit sha, or an unambiguous prefix of a cached commit's sha of at least 7 hex
    digits, as the 12 digits weightdiff prints); CheckpointError when the cache holds no such revision."""
    hint = f"run once without --offline to download it, or `hf download {ref.repo_id}`"
    repos = _cached_repos(ref, env)
    if not repos:
        raise CheckpointError(ref.spelling, f"no such file or directory, and Hub repo `{escape_name(ref.repo_id)}` "
                                            f"is not in the local cache ({escape_name(env.cache_dir)}), and {why}",
                              hint)
    rev = commit or ref.revision or "main"
    revs = [r for r in repos[0].revisions if r.commit_hash == rev or rev in r.refs]
    if not revs and _SHORT_SHA.match(rev):            # a short sha, as git and the Hub resolve it
        revs = sorted((r for r in repos[0].revisions if r.commit_hash.startswith(rev)), key=lambda r: r.commit_hash)
        if len(revs) > 1:
            raise CheckpointError(ref.spelling, f"revision `{escape_name(rev)}` of `{escape_name(ref.repo_id)}` is the "
                                                f"start of {len(revs)} cached commits "
                                                f"({', '.join(r.commit_hash[:16] for r in revs)}), and {why}",
                                  "give more digits of the commit sha")
    if not revs:
        known = sorted({x for r in repos[0].revisions for x in r.refs}) + \
            sorted(r.commit_hash[:12] for r in repos[0].revisions)
        raise CheckpointError(ref.spelling, f"revision `{escape_name(rev)}` of `{escape_name(ref.repo_id)}` is not in "
                                            f"the local cache (cached: {', '.join(known)}), and {why}", hint)
    return revs[0]


def from_cache(ref: HubRef, env: _Env, why: str, commit: str | None = None) -> Checkpoint:
    """The checkpoint from the local cache only, found through ``scan_cache_dir``; at ``commit``
    when given (a parent's resolution), else at what the spelling's revision names in the cache."""
    snap = cached_revision(ref, env, why, commit)
    hint = f"run once without --offline to download it, or `hf download {ref.repo_id}`"
    snapshot = Path(snap.snapshot_path)
    root = snapshot / ref.subfolder if ref.subfolder else snapshot
    named = None
    if ref.subfolder and root.is_file():            # the spelling names a file (hf://org/name/model.Q8_0.gguf)
        root, named = root.parent, root.name
        ref = type(ref)(ref.spelling, ref.repo_id, ref.revision, ref.subfolder.rpartition("/")[0])
    local = LocalFolder(root)
    names = local.names() if root.is_dir() else []
    if named is None and "modules.json" in names:
        from .st_modules import refuse_remote_modules

        paths = [(Path(dp) / f).relative_to(root).as_posix() for dp, _, fs in os.walk(root) for f in fs]
        refuse_remote_modules(names, paths, lambda n: local.read_json(n, "sentence-transformers modules"),
                              ref.spelling)
    try:
        kind, name = (file_kind(named), named) if named is not None else \
            choose_weights(names, ref.spelling, lambda sub: onnx_subfolder_names(root / sub))
        if kind is None:
            raise CheckpointError(ref.spelling, f"`{escape_name(named)}` is not a weights file weightdiff reads")
    except CheckpointError as exc:
        raise CheckpointError(ref.spelling, f"no weights of commit {snap.commit_hash[:12]} in the local cache "
                                            f"({exc.message.split(': ', 1)[-1]}), and {why}", hint) from None
    wanted = [name] if name else []
    if kind in ("sharded", "pickle_sharded"):
        wanted += list(dict.fromkeys(_read_index(local, name)[0].values()))
    for n in wanted:
        if not local.exists(n) or not (root / n).exists():
            raise CheckpointError(ref.spelling, f"{escape_name((root / n).relative_to(snapshot).as_posix())} of commit "
                                                f"{snap.commit_hash[:12]} is not in the local cache, and {why}",
                                  f"run once without --offline, or `hf download {ref.repo_id} {n}`")
    if kind in ("single", "sharded", "pickle", "pickle_sharded"):       # (a GGUF file carries its own)
        _config_cached(ref, env, snap.commit_hash, root, snapshot, why)
    try:
        ckpt = build(local, kind, name, ref.spelling)
    except CheckpointError as exc:
        raise as_hub_file(exc, ref, snap.commit_hash, snapshot) from None
    blobs = {Path(f.file_path): f for f in snap.files}
    files = []
    for f in ckpt.files:
        info = blobs.get(Path(f))
        sha = info.blob_path.name if info is not None and _SHA256.match(info.blob_path.name) else None
        files.append((Path(f).relative_to(snapshot).as_posix(), os.path.getsize(f), sha))
    ckpt.hub = identity(ref, snap.commit_hash, files)
    ckpt.hub_run = {"mode": "cache", "reader": None, "offline": True}   # read without asking the Hub
    ckpt.origin = (f"{escape_name(ref.spelling)}: Hub repo {escape_name(ref.repo_id)} at commit "
                   f"{snap.commit_hash[:12]}, read from the Hugging Face cache only ({why})")
    return ckpt


def _config_cached(ref: HubRef, env: _Env, commit: str, root: Path, snapshot: Path, why: str) -> None:
    """CheckpointError when the cache holds the weights but no config file beside them, and does not record
    config.json as absent from the repo (a download of a repo without one records it, as the library does):
    the config decides how the weights are read (the head tie), so reading without it could change the verdict."""
    from huggingface_hub import try_to_load_from_cache

    if any((root / n).is_file() for n in CONFIG_FILES):
        return
    name = (root / CONFIG_FILES[0]).relative_to(snapshot).as_posix()
    if try_to_load_from_cache(ref.repo_id, name, cache_dir=env.cache_dir, revision=commit) is not None:
        return                       # recorded as not in the repo at this commit
    raise CheckpointError(ref.spelling, f"{escape_name(name)} of commit {commit[:12]} is not in the local cache "
                                        f"(the weights are: the config decides how they are read, such as whether the "
                                        f"head is tied), and {why}",
                          f"run once without --offline to fetch it, or `hf download {ref.repo_id} {name}`")
