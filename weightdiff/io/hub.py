"""Hugging Face Hub repo ids as checkpoints: ``org/name``, ``org/name@revision``,
``hf://org/name@revision/subfolder`` and ``hf://org/name@revision/path/to/file`` (one file of the
repo, as a local file path: a GGUF repo's ``model.Q8_0.gguf``, a transformers.js repo's
``onnx/model_quantized.onnx``; the kind goes by the name, ``checkpoint.file_kind``).

Resolution goes through huggingface_hub (the ``hub`` extra) and honours what it honours:
HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE (read when the call is
made). A local path always wins over a repo id of the same spelling (weightdiff.io.checkpoint
decides that before calling here). The repo's file list (``HfApi.model_info``) goes
through the rules that choose the weights of a local folder (``checkpoint.choose_weights``),
so only the files they name are fetched, plus config.json. The bytes are read one of
three ways, none of which changes a number:

  cache     every chosen file is already in the cache at the resolved commit: read there;
  download  ``hf_hub_download`` of exactly those files into the normal cache, with its progress, by plain
            HTTP (a file in Xet storage too: hub_http.plain_http), so every timeout and the stall watch apply;
  stream    weightdiff.io.hub_stream: HTTP range requests into bounded buffers, nothing stored.

``--offline`` (or HF_HUB_OFFLINE) reads the cache only (``scan_cache_dir``). A Hub
checkpoint carries its identity (``Checkpoint.hub``): repo id, requested revision,
resolved commit, and each weights file's path in the repo, size and sha256 as the Hub
lists it (its LFS oid), the same whichever way it was read. ``hub_files(ckpt, hashed)``
gives them for the JSON: with ``--hash``, a file on disk (download, cache) is hashed and
must match the Hub's sha256 (``sha256_source`` "verified"); a streamed one keeps the Hub's
value, unverified ("hub"); offline, the Hub lists nothing: the sha256 is the cached blob's
name ("cache"), or with ``--hash`` the bytes' own ("local"). A download is hashed against the
listing; when the server's ETag (the blob's name in the cache) was not that sha256, the blob is
renamed to it, so an offline run reads the verified value.

>>> hub_spelling("meta-llama/Llama-2-7b-hf@main"), hub_spelling("hf://org/name@v1/sub")
(True, True)
>>> hub_spelling("./base"), hub_spelling("/models/base"), hub_spelling("base")
(False, False, False)
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, escape_name, redact_url
from ..options import HubOptions
from .checkpoint import CONFIG_FILES, JSON_CAP, AmbiguousWeights, Checkpoint, LocalFolder, build, choose_weights, file_kind
from .files import load_json, os_problem
from .gguf_header import split_of, split_part_name
from .hub_cache import as_hub_file, cached_refs, cached_revision, from_cache, identity
from .hub_errors import first_line, hub_error, is_transport_error
from .hub_http import (NotAHubAnswer, Stalled, api_retrying, api_timeout, library_silenced, list_refs, list_tree,
                       plain_http, retrying, size_of, watching)
from .hub_stream import HubFile, RangeReader, RemoteSafetensorsFile

__all__ = ["HubRef", "hub_spelling", "parse_ref", "locate_hub", "resolve_commit", "preflight", "hub_error", "hub_files", "EXTRA"]

EXTRA = "pip install 'weightdiff[hub]'"
_BARE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@\S+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")      # an ETag that is a sha256 (an LFS file's)
#: checkpoint kinds whose reader needs a local file (torch's loader, the gguf package): downloaded, never streamed
_LOCAL_ONLY = ("pickle", "pickle_sharded", "gguf", "onnx")


def hub_spelling(spec: str) -> bool:
    """True when ``spec`` is spelled as a Hub repo id (it may still name a local path)."""
    return spec.startswith("hf://") or bool(_BARE.match(spec))


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub spelling: repo id, the revision asked for (None: the default branch), subfolder."""

    spelling: str
    repo_id: str
    revision: str | None
    subfolder: str
    kind: str | None = None          # "branch" or "tag" when spelled refs/heads/... or refs/tags/...

    def file(self, commit: str, path: str, size: int, sha256: str | None) -> HubFile:
        at = f"@{self.revision}" if self.revision else ""
        return HubFile(self.repo_id, commit, path, size, sha256, shown=f"hf://{self.repo_id}{at}/{path}")


def _require(spelling: str) -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(spelling, "no such file or directory, and reading it as a Hugging Face Hub repo id "
                                        "needs huggingface_hub", EXTRA) from None
    try:
        from huggingface_hub import constants  # noqa: F401   (reads the HF_* environment when first imported)
    except ValueError as exc:           # HF_HUB_ETAG_TIMEOUT=abc: the library refuses its environment
        bad = sorted(k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_")))
        raise CheckpointError(spelling, f"huggingface_hub refused the environment ({first_line(exc)})",
                              "check the HF_* environment variables" + (f" ({', '.join(bad[:8])})" if bad else "")
                              ) from None


def parse_ref(spelling: str) -> HubRef:
    """``org/name[@revision]`` or ``hf://org/name[@revision][/subfolder]`` -> HubRef (huggingface_hub's parser)."""
    _require(spelling)
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    text = spelling if spelling.startswith("hf://") else "hf://" + spelling
    # `@refs/heads/<branch>`, `@refs/tags/<tag>` (git's full names): the library's parser reads revision `refs`
    # and subfolder `heads/<branch>`; the branch or tag is meant (`refs/pr/N` it parses itself). A name with a
    # slash is settled against the repo's refs later (settle_revision)
    kind = None
    full = re.search(r"@refs/(heads|tags)/(?=[^/])", text)
    if full:
        kind = "branch" if full[1] == "heads" else "tag"
        text = text[:full.start()] + "@" + text[full.end():]
    try:
        uri = parse_hf_uri(text)
    except HfUriError as exc:
        raise CheckpointError(spelling, f"no such file or directory, nor a valid Hub repo id "
                                        f"({first_line(exc)})",
                              "spell a Hub model as org/name, org/name@revision or hf://org/name@revision/subfolder"
                              ) from None
    if uri.type != "model":
        raise CheckpointError(spelling, f"is a Hub {uri.type} repo; checkpoints are read from model repos")
    ref = HubRef(spelling, uri.id, uri.revision, uri.path_in_repo.strip("/"), kind)
    check_revision(ref)
    return ref


#: characters git refuses in a ref name (``git check-ref-format``): controls, space, ~ ^ : ? * [ and backslash
_REF_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` cannot name a branch, a tag or a commit (git's ref name rules), or None.

    A ``.`` or ``..`` component would be dropped by the HTTP client (``/revision/..`` becomes the repo's
    default branch), an empty one is not a name: none reaches the Hub.

    >>> revision_problem("main"), revision_problem("refs/pr/3"), revision_problem("feature/x")
    (None, None, None)
    >>> revision_problem("..")
    'has a `..` component'
    >>> revision_problem("a/./b"), revision_problem("a//b"), revision_problem("main@{1}")
    ('has a `.` component', 'has an empty component', 'contains `@{`')
    """
    parts = revision.split("/")
    if revision == "@":
        return "is `@` alone"
    if ".." in parts:
        return "has a `..` component"
    if "." in parts:
        return "has a `.` component"
    if "" in parts:
        return "ends with `/`" if revision.endswith("/") and revision.strip("/") else "has an empty component"
    if _REF_BAD_CHARS.search(revision):
        ch = _REF_BAD_CHARS.search(revision)[0]
        return f"contains {'a control character or a space' if ch <= ' ' or ch == chr(127) else f'`{ch}`'}"
    if ".." in revision:
        return "contains `..`"
    if "@{" in revision:
        return "contains `@{`"
    if any(p.startswith(".") for p in parts):
        return "has a component starting with `.`"
    if any(p.endswith(".lock") for p in parts) or revision.endswith("."):
        return "ends a component with `.lock` or `.`" if not revision.endswith(".") else "ends with `.`"
    return None


def check_revision(ref: HubRef) -> None:
    """CheckpointError (before any request) when the revision is not a name git allows, or the path after it
    has a ``.`` or ``..`` segment: read as given, the HTTP client would drop such a segment and the Hub would
    answer for another revision (``org/name@..`` read the default branch) or another folder."""
    if ref.revision is not None:
        problem = revision_problem(ref.revision)
        if problem:
            raise CheckpointError(ref.spelling, f"`{escape_name(ref.revision)}` is not a valid revision: it {problem} "
                                                f"(git's rules for branch and tag names)",
                                  "give a branch, a tag or a commit sha, e.g. org/name@main")
    segments = ref.subfolder.split("/") if ref.subfolder else []
    bad = next((s for s in segments if s in (".", "..")), None)
    if bad is not None:
        raise CheckpointError(ref.spelling, f"the path `{escape_name(ref.subfolder)}` in `{escape_name(ref.repo_id)}` "
                                            f"has a `{bad}` segment, which names no folder or file of a repo",
                              "spell the folder or file as the repo lists it")


_COMMITISH = re.compile(r"^[0-9a-f]{7,40}$")


def settle_revision(ref: HubRef, refs: dict[str, list[str]]) -> HubRef:
    """A revision followed by a path, re-split at the longest branch or tag name (``refs``: the repo's
    ``{"branches", "tags"}``) that the revision and a prefix of the path spell: ``org/name@feature/x/sub``
    is branch ``feature/x``, subfolder ``sub``, when the repo has a branch ``feature/x``. A spelling
    ``refs/heads/...`` looks among branches only, ``refs/tags/...`` among tags; a commit sha, a ``refs/pr/N``
    and a name spelled with ``%2F`` are left as they are.

    >>> r = HubRef("o/n@feature/x/sub", "o/n", "feature", "x/sub")
    >>> s = settle_revision(r, {"branches": ["main", "feature/x"], "tags": []}); s.revision, s.subfolder
    ('feature/x', 'sub')
    >>> s = settle_revision(r, {"branches": ["main"], "tags": []}); s.revision, s.subfolder
    ('feature', 'x/sub')
    """
    if not ref.revision or not ref.subfolder or ref.revision.startswith("refs/"):
        return ref
    pool = set(refs.get("branches", []) if ref.kind != "tag" else []) | \
        set(refs.get("tags", []) if ref.kind != "branch" else [])
    parts = ref.subfolder.split("/")
    for k in range(len(parts), 0, -1):
        name = "/".join([ref.revision, *parts[:k]])
        if name in pool:
            return HubRef(ref.spelling, ref.repo_id, name, "/".join(parts[k:]), ref.kind)
    return ref


def _settled(ref: HubRef, env: "_Env") -> HubRef:
    """settle_revision with the repo's refs: the Hub's (one request, only for a revision followed by a path),
    or offline the refs the local cache records. The refs unknown (an error): the spelling as parsed."""
    if not ref.revision or not ref.subfolder or ref.revision.startswith("refs/") or (
            _COMMITISH.match(ref.revision) and ref.kind is None):
        return ref
    def cached() -> dict[str, list[str]]:
        refs = {"branches": sorted(cached_refs(ref, env)), "tags": []}
        return {"branches": [], "tags": refs["branches"]} if ref.kind == "tag" else refs

    try:
        if env.offline:
            refs = cached()
        else:
            try:
                refs = list_refs(env.endpoint, ref.repo_id)
            except Exception as exc:
                if not is_transport_error(exc):
                    raise _refs_failed(ref, exc, env) from None
                # the Hub cannot be reached: the listing fails too and the cache is read; split as the cache knows
                refs = cached()
    except CheckpointError:
        raise
    except Exception:
        return ref
    settled = settle_revision(ref, refs)
    check_revision(settled)
    return settled


def _refs_failed(ref: HubRef, exc: BaseException, env: "_Env") -> CheckpointError:
    """The Hub's list of branches and tags, asked to tell where a revision spelled with a slash ends
    (``org/name@feature/x``), did not come: said as such, never read as the parser's split (revision
    ``feature``, subfolder ``x``), which would report a "missing" revision or read another folder."""
    from .hub_http import RETRY_STATUS, RETRY_WAIT_TOTAL, _status_of, retry_after

    status, response = _status_of(exc)
    code = response.headers.get("X-Error-Code") if response is not None else None
    if status is None or status in (401, 403) or code in ("RepoNotFound", "GatedRepo"):
        return hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint)   # access, or not a Hub
    asked = retry_after(response)
    wait = (f" and asked to retry after {asked:g} s, over the {RETRY_WAIT_TOTAL:g} s weightdiff waits"
            if asked is not None and asked > RETRY_WAIT_TOTAL else " after retries" if status in RETRY_STATUS else "")
    whole = f"{ref.revision}/{ref.subfolder}"
    return CheckpointError(ref.spelling, f"cannot tell where the revision in `{escape_name(whole)}` ends: asked for "
                                         f"the branches and tags of `{escape_name(ref.repo_id)}`, the Hub answered "
                                         f"HTTP {status}{wait}",
                           f"try again later; a branch or tag whose name has a slash can be spelled with %2F "
                           f"(@{escape_name(ref.revision)}%2F{escape_name(ref.subfolder.split('/')[0])}), which needs "
                           "no list")


@dataclass
class _Env:
    endpoint: str
    cache_dir: str
    offline: bool


def _env(options: HubOptions) -> _Env:
    """The library's settings, re-read from the environment at call time (as a new process would)."""
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    cache = os.path.expandvars(os.path.expanduser(cache)) if cache else constants.HF_HUB_CACHE
    offline = (options.offline or constants.is_offline_mode()
               or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES)
    return _Env(endpoint, cache, offline)


# -- the repo's file list ----------------------------------------------------------------------

@dataclass
class _Listing:
    """What the Hub says about a repo at one commit: path in repo -> (size, LFS sha256)."""

    commit: str
    files: dict[str, tuple[int | None, str | None]]
    prefix: str                      # "subfolder/" or ""
    stale: set = field(default_factory=set)   # cached files whose size is not the listed one: fetched again
    verified: set = field(default_factory=set)  # files this run downloaded and hashed equal to the listed sha256
    notes: list = field(default_factory=list)   # what the download found that the plan should say

    def names(self) -> list[str]:
        """Direct children of the subfolder (files and folders), as a local listdir gives them."""
        n = len(self.prefix)
        return sorted({p[n:].split("/", 1)[0] for p in self.files if p.startswith(self.prefix)})

    def children(self, sub: str) -> list[str]:
        """Direct children of ``sub`` inside the subfolder (``choose_weights``' ``listdir``)."""
        top = self.prefix + sub + "/"
        return sorted({p[len(top):].split("/", 1)[0] for p in self.files if p.startswith(top)})

    def named_file(self, ref: "HubRef") -> "tuple[HubRef, _Listing, str] | None":
        """When the spelling's path is a file of the repo, not a folder (``hf://org/name/model.Q8_0.gguf``):
        the spelling with its folder as the subfolder, this listing seen from that folder, and the file's name."""
        if not ref.subfolder or ref.subfolder not in self.files:
            return None
        parent, _, name = ref.subfolder.rpartition("/")
        return (HubRef(ref.spelling, ref.repo_id, ref.revision, parent),
                _Listing(self.commit, self.files, parent + "/" if parent else ""), name)


def _choose(ref: HubRef, listing: _Listing, named: str | None) -> tuple[str, str | None]:
    """``choose_weights`` on a repo's listing, or the kind of the file the spelling names. Where the
    folder holds several candidates, the hint shows how to name one (a local path's "pass one file"
    has no meaning for a repo id)."""
    if named is not None:
        kind = file_kind(named)
        if kind is None:
            raise CheckpointError(ref.spelling, f"`{escape_name(named)}` in `{escape_name(ref.repo_id)}` is not a weights "
                                                "file weightdiff reads (.safetensors, a .safetensors.index.json, .gguf, "
                                                ".onnx, .bin, .pt or .pth)", "name the model's folder or weights file")
        return kind, named
    try:
        return choose_weights(listing.names(), ref.spelling, listing.children)
    except AmbiguousWeights as exc:
        at = f"@{ref.revision}" if ref.revision else ""
        # the example names a model, not a vision projector (llama.cpp's mmproj-*.gguf beside it)
        pick = next((c for c in exc.candidates if "mmproj" not in c.rsplit("/", 1)[-1].lower()), exc.candidates[0])
        raise CheckpointError(ref.spelling, exc.problem,
                              f"name one file: hf://{ref.repo_id}{at}/{listing.prefix}{pick}") from None


def _listing(ref: HubRef, env: _Env) -> _Listing:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=env.endpoint)
    try:
        info = api_retrying(lambda: api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True,
                                               timeout=api_timeout()))
    except Exception as exc:
        if is_transport_error(exc):
            raise
        raise hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint) from None
    if not info.sha:
        raise CheckpointError(ref.spelling, "the Hub did not say which commit this revision is",
                              "is HF_ENDPOINT a Hugging Face Hub?")
    try:
        files = {s.rfilename: (size_of(s.size), _sibling_sha(s)) for s in info.siblings or []
                 if isinstance(getattr(s, "rfilename", None), str)}
    except (AttributeError, TypeError) as exc:     # siblings of another shape than a Hub's
        raise hub_error(NotAHubAnswer(f"its file list is malformed ({first_line(exc)})"), ref.repo_id, ref.spelling,
                        ref.revision, env.endpoint) from None
    if not files:
        try:
            files = {f["path"]: (size_of(f.get("size")), _lfs_oid(f))
                     for f in list_tree(env.endpoint, ref.repo_id, info.sha)}
        except Exception as exc:
            raise hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint) from None
    return _Listing(info.sha, files, ref.subfolder + "/" if ref.subfolder else "")


def _fill_sizes(ref: HubRef, listing: _Listing, paths: list[str], env: _Env) -> None:
    """Sizes and LFS oids the model info left out: from the tree listing, else from a HEAD request."""
    if all(listing.files[p][0] is not None for p in paths):
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        for f in list_tree(env.endpoint, ref.repo_id, listing.commit, ref.subfolder or None):
            if f.get("path") in listing.files:
                listing.files[f["path"]] = (size_of(f.get("size")), _lfs_oid(f) or listing.files[f["path"]][1])
    except Exception:
        pass
    for p in paths:
        if listing.files[p][0] is None:
            try:
                url = hf_hub_url(ref.repo_id, p, revision=listing.commit, endpoint=env.endpoint)
                meta = api_retrying(lambda: get_hf_file_metadata(url, endpoint=env.endpoint, timeout=api_timeout()))
            except Exception as exc:
                raise hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint) from None
            etag = meta.etag if meta.etag and _SHA256.match(meta.etag) else None
            if size_of(meta.size) is None:
                raise CheckpointError(ref.file(listing.commit, p, 0, None), "the Hub does not say how large this "
                                      "file is (no size in its listing, none in the answer to a HEAD request)",
                                      "is HF_ENDPOINT a Hugging Face Hub?")
            listing.files[p] = (meta.size, listing.files[p][1] or etag)


def _sibling_sha(s) -> str | None:
    sha = getattr(getattr(s, "lfs", None), "sha256", None)
    return sha if isinstance(sha, str) else None


def _lfs_oid(entry: dict) -> str | None:
    lfs = entry.get("lfs")
    oid = lfs.get("oid") or lfs.get("sha256") if isinstance(lfs, dict) else None
    return oid if isinstance(oid, str) else None


# -- the folder twin over HTTP -------------------------------------------------------------------

class HubFolder:
    """A Hub repo folder as the locator reads it (the twin of checkpoint.LocalFolder):
    listing from the Hub, small JSON fetched into memory, headers by range requests."""

    #: its files hold plain safetensors bytes that ``RemoteSafetensorsFile.read_span`` reads in runs
    #: (``Checkpoint.plain_span``)
    plain_spans = True

    def __init__(self, ref: HubRef, listing: _Listing, reader: RangeReader, cache_dir: str | None = None,
                 env: "_Env | None" = None):
        self.ref, self.listing, self.reader, self.cache_dir, self.env = ref, listing, reader, cache_dir, env
        self.root = ref.spelling
        self._files: dict[str, HubFile] = {}
        self._opened: dict[HubFile, RemoteSafetensorsFile] = {}
        self._json: dict[str, object] = {}

    def names(self) -> list[str]:
        return self.listing.names()

    def exists(self, name: str) -> bool:
        return self.listing.prefix + name in self.listing.files

    def file(self, name: str) -> HubFile:
        if name not in self._files:
            path = self.listing.prefix + name
            if path in self.listing.files and self.listing.files[path][0] is None and self.env is not None:
                _fill_sizes(self.ref, self.listing, [path], self.env)    # (an index, a config: read before the rest)
            size, sha = self.listing.files.get(path, (None, None))
            self._files[name] = self.ref.file(self.listing.commit, path, -1 if size is None else size, sha)
        return self._files[name]

    def read_json(self, name: str, what: str) -> object:
        if name not in self._json:
            self._json[name] = self._read_json(name, what)
        return self._json[name]

    def _read_json(self, name: str, what: str) -> object:
        from huggingface_hub import try_to_load_from_cache

        f = self.file(name)
        cached = try_to_load_from_cache(f.repo_id, f.path, cache_dir=self.cache_dir, revision=f.commit)
        if isinstance(cached, str):                    # already in the cache at this commit: no request
            return LocalFolder(Path(cached).parent).read_json(Path(cached).name, what)
        if f.size > JSON_CAP:
            raise CheckpointError(f, f"file is {f.size:,} bytes, over the {JSON_CAP:,}-byte cap for this kind of file")
        return load_json(self.reader.fetch(f, 0, f.size), f, what)

    def open(self, f: HubFile) -> RemoteSafetensorsFile:
        if f not in self._opened:
            self._opened[f] = RemoteSafetensorsFile(f, self.reader)
        return self._opened[f]

    def headers(self, names):
        files = [self.file(n) for n in names]
        opened = list(self.reader.pool().map(self.open, files)) if len(files) > 1 else [self.open(files[0])]
        return {n: (o.tensors, o.metadata) for n, o in zip(names, opened)}


# -- resolving a spelling -------------------------------------------------------------------------

def _needed(kind: str, name: str | None, folder: HubFolder) -> list[str]:
    """Names (relative to the subfolder) of the files the chosen checkpoint reads."""
    if kind == "adapter":
        return ["adapter_config.json"] + ([name] if name else [])
    if kind in ("sharded", "pickle_sharded"):
        from .checkpoint import _read_index, _series

        wmap, _ = _read_index(folder, name)
        shards = list(dict.fromkeys(wmap.values()))
        # the local rule, on the repo's file list: in every mode (a download fetched only the index's shards, so the
        # local check after it never saw a stray one, while streaming refused it)
        stray = _series(Path(name), set(shards), folder.names(), ".safetensors") if kind == "sharded" else []
        if stray:
            raise CheckpointError(folder.file(name), f"shard {escape_name(stray[0])} is in the repo but not in the "
                                                     "index (incomplete index or stray file?)",
                                  "ask the repo's owner, or pick another revision")
        for shard in shards:           # the local rule (every shard it names exists), before any download
            if not folder.exists(shard):
                raise CheckpointError(folder.file(name), f"names shard {escape_name(shard)}, which is not in "
                                                         f"`{escape_name(folder.ref.repo_id)}` at commit "
                                                         f"{folder.listing.commit[:12]}",
                                      "the repo's index and its files disagree: ask its owner, or pick another "
                                      "revision")
        return [name] + shards
    if kind == "gguf" and split_of(name) is not None:
        # a split GGUF (llama-gguf-split): every part, by llama.cpp's names for them (their headers are checked
        # once fetched); a part the repo lacks fails before any download
        prefix, _, count = split_of(name)
        parts = [split_part_name(prefix, i + 1, count) for i in range(count)]
        missing = next((p for p in parts if not folder.exists(p)), None)
        if missing is not None:
            raise CheckpointError(folder.file(name), f"is part {split_of(name)[1]} of a GGUF split into {count} "
                                                     f"files, and part {split_of(missing)[1]} ({escape_name(missing)}) "
                                                     f"is not in `{escape_name(folder.ref.repo_id)}` at commit "
                                                     f"{folder.listing.commit[:12]}",
                                  "name a GGUF whose parts are all in the repo")
        return parts
    if kind == "onnx":               # its external data files, by the exporters' names (model.onnx_data, model.onnx.data)
        stem, pre = name[:-len(".onnx")], folder.listing.prefix
        beside = [p[len(pre):] for p in folder.listing.files if p.startswith(pre)]
        return [name] + sorted(n for n in beside if n != name and n.startswith(stem) and "/" not in n[len(stem):]
                               and n.endswith("data"))
    return [name]


def _no_remote_modules(listing: _Listing, folder: "HubFolder", spelling: str) -> None:
    """A sentence-transformers repo with weights in module folders is refused (weightdiff.io.st_modules)."""
    if "modules.json" in listing.names():
        from .st_modules import refuse_remote_modules

        n = len(listing.prefix)
        refuse_remote_modules(listing.names(), [p[n:] for p in listing.files if p.startswith(listing.prefix)],
                              lambda name: folder.read_json(name, "sentence-transformers modules"), spelling)


def preflight(paths, options: HubOptions | None = None) -> None:
    """Check every Hub spelling among ``paths`` (repo, revision, subfolder, access) before
    anything is downloaded, so a typo in the second model fails before the first is fetched."""
    options = options if isinstance(options, HubOptions) else HubOptions()
    spellings = [s for s in paths if isinstance(s, str) and not os.path.lexists(s) and hub_spelling(s)]
    refs = [parse_ref(s) for s in spellings]       # every spelling (a revision git refuses) before any request
    for spelling, ref in zip(spellings, refs):
        env = _env(options)
        if env.offline:
            continue
        ref = _settled(ref, env)
        pin = options.commit_of(spelling)
        try:
            listing = _listing(ref if pin is None else HubRef(ref.spelling, ref.repo_id, pin, ref.subfolder), env)
        except CheckpointError:
            raise
        except Exception:           # unreachable: locate_hub falls back to the cache and says so
            continue
        ref, listing, named = _in_repo(ref, listing)
        if named is None and "modules.json" in listing.names():          # before anything is downloaded
            reader = RangeReader(env.endpoint)
            try:
                _no_remote_modules(listing, HubFolder(ref, listing, reader, env.cache_dir, env), spelling)
            finally:
                reader.close()
        kind, name = _choose(ref, listing, named)
        _head(ref, listing, listing.prefix + (name if kind != "adapter" else "adapter_config.json"), env)
        if kind in ("sharded", "pickle_sharded"):         # the index's shards exist (read from the index)
            reader = RangeReader(env.endpoint)
            try:
                _needed(kind, name, HubFolder(ref, listing, reader, env.cache_dir, env))
            finally:
                reader.close()


def _in_repo(ref: HubRef, listing: _Listing) -> tuple[HubRef, _Listing, str | None]:
    """The folder the spelling names and the file in it when it names a file (else None); CheckpointError
    when its path is neither a folder nor a file of the repo at that commit."""
    named = listing.named_file(ref)
    if named is not None:
        return named
    if ref.subfolder and not listing.names():
        raise CheckpointError(ref.spelling, f"no folder or file `{escape_name(ref.subfolder)}` in "
                                            f"`{escape_name(ref.repo_id)}` at commit {listing.commit[:12]}")
    return ref, listing, None


def _head(ref: HubRef, listing: _Listing, path: str, env: _Env) -> None:
    """One HEAD request: a gated or private repo fails here, before any download or progress bar."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        url = hf_hub_url(ref.repo_id, path, revision=listing.commit, endpoint=env.endpoint)
        api_retrying(lambda: get_hf_file_metadata(url, endpoint=env.endpoint, timeout=api_timeout()))
    except Exception as exc:
        raise hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint,
                        file=ref.file(listing.commit, path, -1, None)) from None


def resolve_commit(spelling: str, options: HubOptions | None = None) -> str:
    """The commit a Hub spelling names now: the Hub's answer (one model-info request), or offline or with the
    Hub unreachable, the local cache's (as ``locate_hub`` would read it). Raises CheckpointError."""
    options = options if isinstance(options, HubOptions) else HubOptions()
    ref = parse_ref(spelling)          # (first: it says so when huggingface_hub refuses the environment)
    env = _env(options)
    ref = _settled(ref, env)
    if not env.offline:
        try:
            return _listing(ref, env).commit
        except CheckpointError:
            raise
        except Exception as exc:                   # unreachable: what the cache holds, as locate_hub reads it
            try:
                return cached_revision(ref, env, "the Hub cannot be reached").commit_hash
            except CheckpointError:
                raise hub_error(exc, ref.repo_id, spelling, ref.revision, env.endpoint) from None
    return cached_revision(ref, env, "offline mode is on (--offline or HF_HUB_OFFLINE)").commit_hash


def locate_hub(spelling: str, options: HubOptions | None = None) -> Checkpoint:
    """The Checkpoint of a Hub spelling (see the module docstring). Raises CheckpointError."""
    options = options if isinstance(options, HubOptions) else HubOptions()
    ref = parse_ref(spelling)          # (first: it says so when huggingface_hub refuses the environment)
    env = _env(options)
    ref = _settled(ref, env)
    pin = options.commit_of(spelling)      # the commit a parent resolved: read it, whatever the revision names now
    if env.offline:
        return from_cache(ref, env, "offline mode is on (--offline or HF_HUB_OFFLINE)", commit=pin)
    try:
        listing = _listing(ref if pin is None else HubRef(ref.spelling, ref.repo_id, pin, ref.subfolder), env)
    except CheckpointError:
        raise
    except Exception as exc:                   # the Hub cannot be reached: the cache, as the library does
        try:
            ckpt = from_cache(ref, env, "the Hub cannot be reached", commit=pin)
        except CheckpointError:
            raise hub_error(exc, ref.repo_id, spelling, ref.revision, env.endpoint) from None
        ckpt.origin += redact_url(f" (the Hub at {env.endpoint} could not be reached: {first_line(exc)})")
        # into the JSON's plan notes too: with -q nothing else records that the revision was not checked
        ckpt.notes.append(redact_url(f"{escape_name(spelling)}: the Hub at {env.endpoint} could not be reached "
                                     f"({first_line(exc)}), so the copy in the local Hugging Face cache was read "
                                     f"(commit {ckpt.hub['commit'][:12] if ckpt.hub else '?'}); "
                                     f"`{escape_name(ref.revision or 'main')}` may have moved on the Hub since"))
        return ckpt
    ref, listing, named = _in_repo(ref, listing)
    reader = RangeReader(env.endpoint)
    folder = HubFolder(ref, listing, reader, env.cache_dir, env)
    try:
        if named is None:
            _no_remote_modules(listing, folder, spelling)
        kind, name = _choose(ref, listing, named)
    except CheckpointError:
        reader.close()
        raise
    needed = [listing.prefix + n for n in _needed(kind, name, folder)]
    _fill_sizes(ref, listing, needed, env)
    mode = _mode(options, ref, listing, needed, kind, env)
    if mode == "stream":
        ckpt = build(folder, kind, name, spelling)
        ckpt._opener = folder.open
        ckpt.read_config = lambda fname: folder.read_json(fname, fname) if folder.exists(fname) else None
        ckpt.on_close(reader.close)
        files = [f.path for f in ckpt.files]
    else:
        reader.close()
        snapshot = _fetch(ref, listing, needed, env, options, pinned=pin is not None) if mode == "download" else \
            _cached_snapshot(ref, listing, needed, env)
        root = snapshot / ref.subfolder if ref.subfolder else snapshot
        try:
            ckpt = build(LocalFolder(root), kind, name, spelling)
        except CheckpointError as exc:            # named as the repo's file, not by its place in the cache
            raise as_hub_file(exc, ref, listing.commit, snapshot, listing.verified) from None
        files = [Path(f).relative_to(snapshot).as_posix() for f in ckpt.files]
    ckpt.hub = identity(ref, listing.commit, [(p, *listing.files[p]) for p in files])
    ckpt.hub_run = {"mode": mode, "reader": reader if mode == "stream" else None}
    ckpt.notes.extend(listing.notes)
    size = sum(f["bytes"] or 0 for f in ckpt.hub["files"])
    how = {"stream": "streamed by HTTP range requests, nothing stored on disk",
           "download": f"downloaded into the Hugging Face cache ({escape_name(env.cache_dir)})",
           "cache": "read from the Hugging Face cache"}[mode]
    ckpt.origin = (f"{escape_name(spelling)}: Hub repo {escape_name(ref.repo_id)} at commit {listing.commit[:12]}, "
                   f"{len(files)} weights file{'s' if len(files) != 1 else ''} ({size / 1e9:.2f} GB), {how}")
    return ckpt


def _mode(options: HubOptions, ref: HubRef, listing: _Listing, needed: list[str], kind: str, env: _Env) -> str:
    from huggingface_hub import try_to_load_from_cache

    if options.download is False:
        if kind in _LOCAL_ONLY:
            what = {"gguf": "a GGUF file", "onnx": "an ONNX model"}.get(kind, "PyTorch pickles")
            raise CheckpointError(ref.spelling, f"holds {what}, which cannot be read by range requests",
                                  "use --download: its reader needs a local file")
        return "stream"
    found = {p: try_to_load_from_cache(ref.repo_id, p, cache_dir=env.cache_dir, revision=listing.commit) for p in needed}
    # a cached file of another size than the listed one is a broken download (a faulty answer stored as 0 bytes):
    # it is fetched again, never read as the file
    listing.stale = {p for p, f in found.items() if isinstance(f, str) and listing.files.get(p, (None,))[0] is not None
                     and os.path.getsize(f) != listing.files[p][0]}
    for p in listing.stale:            # the pointer to the broken copy: the download (forced) makes both again
        try:
            os.unlink(found[p])
        except OSError:
            pass
    if all(isinstance(f, str) for f in found.values()) and not listing.stale:
        # the repo's config files decide how the weights are read (head tie, quantization, heads): weights cached
        # without them (fetched by another tool) are read with them, fetched now (a few KB), never without
        configs = [c for c in _configs(listing) if not isinstance(
            try_to_load_from_cache(ref.repo_id, c, cache_dir=env.cache_dir, revision=listing.commit), str)]
        return "download" if configs else "cache"
    if options.download is None and kind not in _LOCAL_ONLY:
        total = sum(listing.files[p][0] or 0 for p in needed)
        if total > options.stream_above * 1e9:
            return "stream"
    return "download"


def _fetch(ref: HubRef, listing: _Listing, needed: list[str], env: _Env, options: HubOptions,
           pinned: bool = False) -> Path:
    """Download exactly ``needed`` (and the config) into the normal cache, a file per
    hf_hub_download, several at once; -> the snapshot folder of the resolved commit."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    _head(ref, listing, needed[-1], env)
    extra = _configs(listing)
    paths = needed + extra
    quiet = not options.progress and not are_progress_bars_disabled()
    cancel = threading.Event()
    if quiet:
        disable_progress_bars()
    try:
        with library_silenced(), plain_http(), \
                ThreadPoolExecutor(min(8, len(paths)), thread_name_prefix="weightdiff-download") as pool:
            futures = [pool.submit(_download, ref, listing, p, env, cancel, pinned) for p in paths]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                failed = [fut.exception() for fut in futures if fut.done() and fut.exception() is not None]
                if failed or not all(fut.done() for fut in futures):
                    cancel.set()          # the other downloads stop at their next read
            if failed:
                raise failed[0]
            commits = [fut.result() for fut in futures]
    finally:
        if quiet:
            enable_progress_bars()
    moved = next((c for c in commits if c != listing.commit), None)
    if moved:
        raise CheckpointError(ref.spelling, f"revision `{ref.revision or 'main'}` moved from commit "
                                            f"{listing.commit[:12]} to {moved[:12]} during the run", "rerun")
    repo = Path(env.cache_dir) / f"models--{ref.repo_id.replace('/', '--')}"
    if not extra:       # no config file at this commit: recorded as the library records a missing file, so that
        try:            # --offline tells this repo from a cache that holds the weights without their config
            marker = repo / ".no_exist" / listing.commit / (listing.prefix + CONFIG_FILES[0])
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
    return repo / "snapshots" / listing.commit


def _configs(listing: _Listing) -> list[str]:
    """The config files (``checkpoint.CONFIG_FILES``) the repo lists beside the weights, as paths in the repo."""
    return [listing.prefix + n for n in CONFIG_FILES if listing.prefix + n in listing.files]


def _download(ref: HubRef, listing: _Listing, path: str, env: _Env, cancel: threading.Event,
              pinned: bool = False) -> str:
    """One file into the cache (by the revision's name, so the cache records it under refs/ for
    --offline, as the library does; by the commit when ``pinned``), watched for a stalled transfer;
    -> the commit it came from."""
    from huggingface_hub import hf_hub_download

    from huggingface_hub import try_to_load_from_cache

    size, sha = listing.files.get(path, (None, None))
    shown = ref.file(listing.commit, path, -1 if size is None else size, sha)
    try:            # downloaded by this run (not found in the cache): hashed against the listing afterwards
        fresh = path in listing.stale or not isinstance(
            try_to_load_from_cache(ref.repo_id, path, cache_dir=env.cache_dir, revision=listing.commit), str)
    except Exception:
        fresh = True

    def fetch(revision: str) -> str:
        return retrying(lambda: hf_hub_download(ref.repo_id, path, revision=revision, cache_dir=env.cache_dir,
                                                endpoint=env.endpoint, etag_timeout=api_timeout(),
                                                force_download=path in listing.stale))

    depth = len(Path(path).parts) - 1
    revision = listing.commit if pinned else ref.revision or "main"
    if revision == "main" and not ref.revision and _main_commit(ref, path, env) != listing.commit:
        # the default branch is not `main` (a `dev` beside a `main`, or no `main`): the library would download
        # main's bytes, or fail; read the commit the listing resolved, as --stream does
        revision = listing.commit
    try:
        with watching(cancel):
            try:
                out = fetch(revision)
            except Exception as exc:
                from huggingface_hub.errors import RevisionNotFoundError

                if ref.revision or not isinstance(exc, RevisionNotFoundError):
                    raise
                out = fetch(listing.commit)      # a default branch not named `main`: the commit the listing resolved
            if not pinned and ref.revision is None and Path(out).parents[depth].name != listing.commit:
                # the library downloads "main" when no revision is given; the listing resolved the default branch,
                # which may be another (`dev` beside a `main`): read the commit the listing resolved, as --stream does
                out = fetch(listing.commit)
    except Stalled as exc:
        raise CheckpointError(shown, exc.text(), "rerun later (the download resumes where it stopped); "
                                                 "WEIGHTDIFF_HUB_STALL_SECONDS sets the window") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise hub_error(exc, ref.repo_id, ref.spelling, ref.revision, env.endpoint, file=shown) from None
    commit = Path(out).parents[depth].name
    if fresh and sha and commit == listing.commit:     # another commit's bytes: the caller says it moved
        _verify_download(Path(out), sha, shown)
        listing.verified.add(path)
        etag = _store_by_sha(Path(out), sha)
        if etag:
            listing.notes.append(f"{escape_name(str(shown))}: the server's ETag was {escape_name(etag[:16])}..., not the "
                                 f"file's sha256; the bytes match the sha256 the Hub lists ({sha[:16]}...), and the "
                                 "cache keeps them under that sha256")
    return commit


def _store_by_sha(out: Path, sha: str) -> str | None:
    """A verified download that huggingface_hub stored under the server's ETag (its blob's name) when the
    ETag is not the sha256: the blob renamed to the sha256 and the snapshot's link pointed at it, so that an
    offline run, which knows a blob only by its name, reads the verified sha256. -> the ETag, or None."""
    try:
        if not out.is_symlink():
            return None
        blob = out.resolve()
        if blob.name == sha or not _SHA256.match(blob.name):     # not an LFS blob's name: left as it is
            return None
        target = blob.with_name(sha)
        if target.exists():
            blob.unlink()
        else:
            os.replace(blob, target)
        out.unlink()
        out.symlink_to(os.path.relpath(target, out.parent))
        return blob.name
    except OSError:
        return None


def _main_commit(ref: HubRef, path: str, env: _Env) -> str | None:
    """The commit ``main`` resolves to for ``path`` (one HEAD request, nothing downloaded), or None when
    it cannot be told (no ``main`` branch, a network fault: the download then speaks for itself)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        url = hf_hub_url(ref.repo_id, path, revision="main", endpoint=env.endpoint)
        return api_retrying(lambda: get_hf_file_metadata(url, endpoint=env.endpoint, timeout=api_timeout())).commit_hash
    except Exception:
        return None


def _verify_download(out: Path, sha: str, shown: object) -> None:
    """A file this run downloaded, hashed against the sha256 the Hub lists for it (an LFS file's oid):
    huggingface_hub does not check it, and a corrupt transfer or a mirror's wrong bytes read as weights
    (a copy of the base with a flipped tail read "derived", relative change 2e+28) and stayed in the cache for
    every later run. The bytes were just written, so this reads them from the page cache; on a mismatch the
    copy is removed from the cache and the run stops. Files found in the cache are hashed only with --hash."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(out, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(shown, f"cannot read the downloaded file back ({os_problem(exc)})") from None
    if h.hexdigest() == sha:
        return
    for victim in (out.resolve(), out):          # the blob, then the snapshot's link to it
        try:
            victim.unlink()
        except OSError:
            pass
    raise CheckpointError(shown, f"the downloaded bytes have sha256 {h.hexdigest()[:16]}..., not the {sha[:16]}... "
                                 "the Hub lists for the file (a corrupt transfer, or a mirror serving other "
                                 "bytes); the copy was removed from the cache", "rerun")


def _cached_snapshot(ref: HubRef, listing: _Listing, needed: list[str], env: _Env) -> Path:
    from huggingface_hub import try_to_load_from_cache

    path = Path(try_to_load_from_cache(ref.repo_id, needed[0], cache_dir=env.cache_dir, revision=listing.commit))
    snapshot = path.parents[len(Path(needed[0]).parts) - 1]
    _record_ref(snapshot.parent.parent, ref.revision or "main", listing.commit)
    return snapshot


def _record_ref(storage: Path, revision: str, commit: str) -> None:
    """Write ``refs/<revision>`` (the commit it resolved to) into a repo's cache folder, as huggingface_hub does when
    it downloads: a run that found every file already cached (the tag's commit downloaded earlier as ``main``)
    recorded nothing, and the same spelling then failed with --offline ("not in the local cache ... run once
    without --offline"). Nothing for a commit spelled as such; a cache that cannot be written is left as it is."""
    if not commit or revision == commit:
        return
    refs = storage / "refs"
    target = refs.joinpath(*revision.split("/"))
    try:
        if os.path.commonpath([os.path.abspath(target), os.path.abspath(refs)]) != os.path.abspath(refs) \
                or any(p in ("", ".", "..") for p in revision.split("/")):
            return
        if target.is_file() and target.read_text().strip() == commit:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, target)
    except OSError:
        pass




def hub_files(ckpt: Checkpoint, hashed: bool) -> list[dict]:
    """The ``files`` of a Hub checkpoint's JSON entry: name, bytes, sha256 and where that sha256
    comes from: "hub" (the Hub's listed LFS oid, not checked against the bytes: without --hash,
    or streamed), "verified" (the file on disk hashed, equal to the Hub's), "cache" (offline: the
    name of the cached blob, which huggingface_hub takes from the server's ETag and weightdiff's
    downloads keep equal to the verified sha256; not hashed), "local" (hashed on disk, with no
    listing to compare: the Hub lists none, or offline, equal to the blob's name); a mismatch is
    CheckpointError saying which two sha256 disagree."""
    files = [dict(f) for f in ckpt.hub["files"]]
    mode = (ckpt.hub_run or {}).get("mode")
    offline = bool((ckpt.hub_run or {}).get("offline"))
    if mode in ("download", "cache"):
        # the bytes read, not the size the listing claims (a listing may overstate it; the hash is of these)
        for f, path in zip(files, ckpt.files):
            f["bytes"] = os.path.getsize(path)
    if not hashed or mode not in ("download", "cache"):
        said = "cache" if offline else "hub"
        return [dict(f, sha256_source=said if f["sha256"] else None) for f in files]
    digests = ckpt.hash_files()
    at = f"@{ckpt.hub['revision']}" if ckpt.hub.get("revision") else ""
    for f, path in zip(files, ckpt.files):
        got = digests[path]
        if f["sha256"] is None:
            f["sha256"], f["sha256_source"] = got, "local"
        elif offline and got != f["sha256"]:
            # offline the Hub lists nothing: the sha256 is the name huggingface_hub gave the blob (the server's
            # ETag when it was downloaded), which either the bytes or that ETag contradicts
            raise CheckpointError(f"hf://{ckpt.hub['repo_id']}{at}/{f['name']}",
                                  f"the cached file's bytes have sha256 {got[:16]}..., but the cache stores it under "
                                  f"{f['sha256'][:16]}... (the ETag the server sent when it was downloaded, normally "
                                  f"the sha256): the bytes were damaged in the cache, or that ETag was not the file's "
                                  f"sha256; offline the Hub's listing cannot tell which",
                                  "run once online with --hash: it checks the bytes against the Hub's listing")
        elif offline:
            f["sha256_source"] = "local"          # hashed here; no listing of the Hub's to compare with
        elif got != f["sha256"]:
            blob = Path(path).resolve()
            raise CheckpointError(f"hf://{ckpt.hub['repo_id']}{at}/{f['name']}",
                                  f"the file read from the Hugging Face cache has sha256 {got[:16]}..., but the Hub "
                                  f"lists {f['sha256'][:16]}... for commit {ckpt.hub['commit'][:12]} (a corrupt "
                                  f"download or cache)", f"delete {escape_name(str(blob))} and rerun to download it "
                                                         f"again")
        else:
            f["sha256_source"] = "verified"
    return files
