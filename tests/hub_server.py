"""A small Hugging Face Hub-compatible HTTP server for the tests, on 127.0.0.1 only.

It answers what the real ``huggingface_hub`` client calls, the way the Hub answers it:

  GET  /api/models/{repo}[/revision/{rev}]     model info (``sha``, ``siblings``; sizes and LFS
                                                oids with ``?blobs=true``)
  GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing (``recursive``), entries as the Hub's
  POST /api/models/{repo}/paths-info/{rev}      entries of the given paths
  GET  /api/models/{repo}/refs                  branches and tags
  HEAD/GET /{repo}/resolve/{rev}/{file}         small (git) files served here with ``ETag`` and
                                                ``X-Repo-Commit``; LFS files answered with a 302 to
                                                the "CDN" (a second server: another origin, as on
                                                the Hub) carrying ``X-Linked-Etag`` (the sha256),
                                                ``X-Linked-Size`` and ``X-Repo-Commit``
  Range requests (206 with ``Content-Range``) on both servers.

Errors as the Hub sends them: 404 with ``X-Error-Code: RepoNotFound``, ``RevisionNotFound``
or ``EntryNotFound``; 401 with ``RepoNotFound`` for a private repo and ``GatedRepo`` for a
gated one without the token. Every body byte sent is logged per (repo, file), and faults
can be planted: a connection dropped after some bytes, a transient 503, a body trickled a
byte at a time (``trickle``: seconds per byte), a body with its last bytes flipped (``corrupt``), a
wrong ``X-Linked-Size`` (``linked_size_delta``), a redirect loop on resolve (``redirect_loop``), a CDN
redirecting back to a missing repo (``redirect_back``), ``Retry-After`` on a planted status, transient statuses on the API (``api_faults``); ``api_stall``
makes the API accept connections and answer nothing for that many seconds, ``api_trickle`` sends every JSON
answer a byte at a time (seconds per byte). Faults of a mirror or CDN: a resolve answer whose ``X-Linked-Etag``
is not the file's sha256 (``linked_etag``), a resolve that redirects to another blob of the repo
(``cdn_serves``: (repo, path) of that blob; its answers carry that blob's ETag), a file served as Xet-backed
(``xet_hash``: the resolve answer carries ``X-Xet-Hash`` and the CDN's ETag is that hash, not the sha256, and
the tree lists it as ``xetHash`` unless ``listed_xet`` says otherwise: None for none, another hash for a mirror), a
status from the CDN only (``cdn_status``: the API's answers stay 2xx/3xx). As huggingface.co: a file in Xet
storage (``xet_auth``: the resolve answer carries ``X-Xet-Hash`` and ``Link: <...xet-read-token...>;
rel="xet-auth"``, which makes huggingface_hub hand the download to hf_xet; the token route answers with
``X-Xet-Cas-Url`` = ``HubServer.xet_cas`` when set, else 404), a listed file that ``/resolve`` answers 404
``EntryNotFound`` (``entry_missing``), a listing whose size for a file is off (``listed_size_delta``: model
info, tree and paths-info; the served file and ``X-Linked-Size`` stay right), and a status on the refs route
(``refs_faults``: repo_id -> {"status", "retry_after"}), a redirect to a storage host that cannot be reached
(``cdn_at``: the origin the resolve answer's Location names instead of the CDN's). Every redirect to the CDN
is a link of its own (``sig``, as a signed URL); ``link_uses`` makes the CDN refuse a link used more than that
many times with 403, as an expired signed URL. ``cdn_log`` holds (path, whether an Authorization header came)
for every CDN request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKEN = "hf_weightdiff_test_token"


_DIGESTS: dict[tuple[str, int], tuple[bytes, str]] = {}
_DIGESTS_LOCK = threading.Lock()


def _digest(kind: str, data: bytes) -> str:
    """A file's hash, computed once per bytes object (the object is kept, so its id is not reused): a range
    request hashed every file of the repo again, and most of a Hub test's time went there."""
    key = (kind, id(data))
    with _DIGESTS_LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    h = (hashlib.sha1(b"blob %d\0" % len(data) + data) if kind == "git" else hashlib.sha256(data)).hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[key] = (data, h)
    return h


def sha256_hex(data: bytes) -> str:
    return _digest("sha256", data)


def git_oid(data: bytes) -> str:
    return _digest("git", data)


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)   # sha -> {path: bytes}
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    default: str = "main"                  # the branch the model info answers without a revision

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.branches.get(rev) or self.tags.get(rev)


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith((".safetensors", ".bin", ".gguf", ".pt", ".onnx", ".onnx_data")) or len(data) > 10 << 20


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-answer (a test's fault made it give up) is not news: printed
        from this thread it would land in the stderr a CliRunner captures at that moment."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class HubServer:
    """Start with ``HubServer()``, stop with ``.close()``; ``.url`` is the HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.sent: Counter = Counter()          # (repo_id, path) -> body bytes sent
        self.requests: list[tuple[str, str]] = []
        self.connections: Counter = Counter()   # "api" / "cdn" -> connections accepted
        self.cdn_log: list[tuple[str, bool]] = []  # (path, Authorization sent) per CDN request
        self.link_used: Counter = Counter()     # sig -> CDN requests made with that link
        self.links_refused = 0                  # CDN requests refused under ``link_uses``
        self._sig = 0
        self.faults: dict[tuple[str, str], dict] = {}
        self.api_stall = 0.0                    # seconds the API waits before answering anything
        self.api_trickle = 0.0                  # seconds per byte of every JSON answer of the API
        self.api_faults: dict[str, dict] = {}   # repo_id -> {"status", "times", "retry_after"}: API answers
        self.info_edit: dict[str, object] = {}  # repo_id -> f(model info dict) -> what the server answers instead
        self.tree_loop: set[str] = set()        # repos whose tree listing's next page is the same page
        self.refs_faults: dict[str, dict] = {}  # repo_id -> {"status", "retry_after"}: the refs route's answer
        self.xet_cas: str | None = None         # the Xet storage the token route names (None: the route answers 404)
        self.lock = threading.Lock()
        self._seq = 0
        self.api = self._start(_ApiHandler)
        self.cdn = self._start(_CdnHandler)
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def _start(self, handler) -> ThreadingHTTPServer:
        srv = _Server(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        srv.hub = self
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    def close(self) -> None:
        for srv in (self.api, self.cdn):
            srv.shutdown()
            srv.server_close()

    # -- content -------------------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", tag: str | None = None,
               gated: bool = False, private: bool = False) -> str:
        """Add a commit with exactly ``files``; move ``branch`` (and ``tag``) to it; return its sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.gated, repo.private = repo.gated or gated, repo.private or private
        self._seq += 1
        h = hashlib.sha1(f"{repo_id}:{self._seq}".encode())
        for p in sorted(files):
            h.update(p.encode() + hashlib.sha256(files[p]).digest())
        sha = h.hexdigest()
        repo.commits[sha] = dict(files)
        if branch:
            repo.branches[branch] = sha
        if tag:
            repo.tags[tag] = sha
        return sha

    def bytes_sent(self, repo_id: str, path: str | None = None) -> int:
        with self.lock:
            return sum(v for (r, p), v in self.sent.items() if r == repo_id and (path is None or p == path))

    def reset_log(self) -> None:
        with self.lock:
            self.sent.clear()
            self.requests.clear()
            self.connections.clear()
            self.cdn_log.clear()
            self.link_used.clear()
            self.links_refused = 0

    def entry(self, repo_id: str, path: str, data: bytes) -> dict:
        size = len(data) + (self.faults.get((repo_id, path)) or {}).get("listed_size_delta", 0)
        e = {"type": "file", "oid": git_oid(data), "size": size, "path": path}
        if is_lfs(path, data):
            e["lfs"] = {"oid": sha256_hex(data), "size": size, "pointerSize": 134}
        return e


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True        # headers and body go out at once, as a real server sends them

    #: which server's connections this handler counts
    side = ""

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections[self.side] += 1

    def log_message(self, *args) -> None:
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              log: tuple[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if head or not body:
            return
        fault = self.hub.faults.get(log) if log else None
        if fault and fault.get("corrupt") and len(body) > 200:     # the same size, the last bytes flipped
            body = body[:-100] + bytes(b ^ 0x55 for b in body[-100:])
        if fault and fault.get("trickle"):           # a byte every `trickle` seconds, each read in time
            try:
                for i in range(len(body)):
                    self._count(log, 1)
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(fault["trickle"])
            except OSError:
                pass
            self.close_connection = True
            return
        if fault and fault.get("times", 0) > 0 and fault.get("drop_after") is not None:
            fault["times"] -= 1
            part = body[:fault["drop_after"]]
            self._count(log, len(part))
            self.wfile.write(part)
            self.wfile.flush()
            if fault.get("stall"):
                time.sleep(fault["stall"])
            self.close_connection = True
            return
        # counted before the write: once the client holds the bytes it may ask bytes_sent at once,
        # before this thread runs again (a test read 23 bytes short on a loaded CI machine)
        self._count(log, len(body))
        self.wfile.write(body)

    def _count(self, log, n: int) -> None:
        if log:
            with self.hub.lock:
                self.hub.sent[log] += n

    def _error(self, status: int, code: str, message: str, head: bool = False, extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message, **(extra or {})}, head=head)

    def _content(self, data: bytes, headers: dict, head: bool, log: tuple[str, str]) -> None:
        """The whole body, or one Range of it (206)."""
        rng = self.headers.get("Range")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if rng:
            try:
                unit, spec = rng.split("=", 1)
                a, b = spec.split("-", 1)
                if unit.strip() != "bytes" or "," in spec:
                    raise ValueError
                if a == "":
                    start, end = max(0, len(data) - int(b)), len(data) - 1
                else:
                    start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                if start > end or start >= len(data):
                    raise ValueError
            except ValueError:
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], headers, head=head, log=log)
            return
        self._send(200, data, headers, head=head, log=log)


class _ApiHandler(_Handler):
    side = "api"

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_POST(self) -> None:
        self._route(head=False, post=True)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head=head)
            else:
                self._error(401, "RepoNotFound", "Invalid username or password.", head=head)
            return None
        return repo

    def _rev(self, repo: Repo, rev: str, head: bool = False) -> str | None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        return sha

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        if self.hub.api_trickle:                # a byte at a time: each read in time, the answer never done
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(self.hub.api_trickle)
            except OSError:
                pass
            self.close_connection = True
            return
        self._send(200, body, {"Content-Type": "application/json"})

    def _route(self, head: bool, post: bool = False) -> None:
        url = urlsplit(self.path)
        raw = url.path.split("/")[1:]
        query = parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path))
        if self.hub.api_stall:
            time.sleep(self.hub.api_stall)
        if raw[:2] == ["api", "models"] and len(raw) >= 4:
            repo_id = f"{unquote(raw[2])}/{unquote(raw[3])}"
            rest = raw[4:]
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            fault = self.hub.api_faults.get(repo_id)
            if fault and fault.get("times", 0) > 0:             # a transient answer to the model info
                fault["times"] -= 1
                self._error(fault["status"], "", "Too many requests", head=head,
                            extra={"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else None)
                return
            if not rest or rest[0] == "revision":
                sha = self._rev(repo, unquote("/".join(rest[1:])) if rest else repo.default)
                if sha:
                    info = self._info(repo, sha, query.get("blobs", ["false"])[0].lower() == "true")
                    edit = self.hub.info_edit.get(repo_id)
                    if edit is not None:
                        info = edit(info)
                    if isinstance(info, bytes):              # a proxy's page, answered 200
                        self._send(200, info, {"Content-Type": "text/html"})
                    else:
                        self._json(info)
                return
            if rest[0] == "refs" and repo_id in self.hub.refs_faults:
                f = self.hub.refs_faults[repo_id]
                self._error(f["status"], "", "Too many requests", head=head,
                            extra={"Retry-After": str(f["retry_after"]), "RateLimit": f'"resolvers";r=0;t={f["retry_after"]}'}
                            if "retry_after" in f else None)
                return
            if rest[0] == "xet-read-token" and self.hub.xet_cas:
                self._send(200, b"{}", {"Content-Type": "application/json", "X-Xet-Cas-Url": self.hub.xet_cas,
                                        "X-Xet-Access-Token": "xet_token", "X-Xet-Token-Expiration": "9999999999"},
                           head=head)
                return
            if rest[0] == "refs":
                fmt = lambda kind, items: [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
                                           for n, s in sorted(items.items())]
                self._json({"branches": fmt("heads", repo.branches), "tags": fmt("tags", repo.tags),
                            "converts": [], "pullRequests": []})
                return
            if rest[0] in ("tree", "paths-info") and len(rest) >= 2:
                sha = self._rev(repo, unquote(rest[1]))
                if not sha:
                    return
                files = repo.commits[sha]
                if rest[0] == "paths-info":
                    n = int(self.headers.get("Content-Length") or 0)
                    form = parse_qs(self.rfile.read(n).decode()) if n else {}
                    want = form.get("paths", [])
                    self._json([self.hub.entry(repo_id, p, files[p]) for p in want if p in files])
                    return
                base = unquote("/".join(rest[2:])).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                if repo_id in self.hub.tree_loop:             # a next page that is this page again
                    body = json.dumps(self._tree(repo_id, files, base, recursive)).encode()
                    self._send(200, body, {"Content-Type": "application/json",
                                           "Link": f'<{self.hub.url}{self.path}>; rel="next"'})
                    return
                self._json(self._tree(repo_id, files, base, recursive))
                return
            self._error(404, "EntryNotFound", "Not found", head=head)
            return
        if len(raw) >= 5 and raw[2] == "resolve":
            repo_id = f"{unquote(raw[0])}/{unquote(raw[1])}"
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            if repo.gated and not self._authorized():
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to "
                                              "it and be authenticated to access it. Please log in.", head=head)
                return
            sha = self._rev(repo, unquote(raw[3]), head)
            if not sha:
                return
            path = unquote("/".join(raw[4:]))
            data = repo.commits[sha].get(path)
            if data is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on \"{raw[3]}\"", head=head,
                            extra={"X-Repo-Commit": sha})
                return
            fault = self.hub.faults.get((repo_id, path))
            if fault and fault.get("entry_missing"):          # listed, but not served
                self._error(404, "EntryNotFound", f"{path} does not exist on \"{raw[3]}\"", head=head,
                            extra={"X-Repo-Commit": sha})
                return
            if fault and fault.get("status") and fault.get("times", 0) > 0 and not head:
                fault["times"] -= 1
                self._error(fault["status"], "", "Service unavailable",
                            extra={"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else None)
                return
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_oid(data)}"'}
            if fault and fault.get("redirect_loop"):
                self._send(302, b"", {**headers, "Location": self.path}, head=head, length=0)
                return
            if is_lfs(path, data):
                oid = sha256_hex(data)
                blob = (repo_id, path, oid)
                if fault and fault.get("cdn_serves"):          # (repo, path): another file's blob on its main branch
                    other, served = fault["cdn_serves"]
                    o = self.hub.repos[other]
                    blob = (other, served, sha256_hex(o.commits[o.branches["main"]][served]))
                cdn = (fault or {}).get("cdn_at") or self.hub.cdn_url      # a storage host nobody answers at
                with self.hub.lock:
                    self.hub._sig += 1
                    sig = self.hub._sig
                loc = f"{cdn}/_lfs/{quote(blob[0], safe='')}/{blob[2]}?file={quote(blob[1], safe='')}&sig={sig}"
                size = len(data) + (fault or {}).get("linked_size_delta", 0)
                extra = {"X-Xet-Hash": fault["xet_hash"]} if fault and fault.get("xet_hash") else {}
                if fault and fault.get("xet_auth"):           # Xet storage, as huggingface.co announces it
                    extra = {"X-Xet-Hash": fault.get("xet_hash") or hashlib.sha256(b"xet" + data).hexdigest(),
                             "Link": f'<{self.hub.url}/api/models/{repo_id}/xet-read-token/{sha}>; rel="xet-auth"'}
                self._send(302, b"", {**headers, "Location": loc, "X-Linked-Etag": f'"{(fault or {}).get("linked_etag") or oid}"',
                                      "X-Linked-Size": str(size), **extra}, head=head, length=0)
                return
            self._content(data, headers, head, (repo_id, path))
            return
        self._error(404, "EntryNotFound", "Not found", head=head)

    def _info(self, repo: Repo, sha: str, blobs: bool) -> dict:
        files = repo.commits[sha]
        siblings = []
        for p in sorted(files):
            s = {"rfilename": p}
            if blobs:
                e = self.hub.entry(repo.repo_id, p, files[p])
                s.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        org = repo.repo_id.split("/")[0]
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": org, "sha": sha, "lastModified": "2024-05-01T12:00:00.000Z",
                "createdAt": "2024-01-01T12:00:00.000Z", "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": ["safetensors"], "library_name": "transformers", "siblings": siblings,
                "usedStorage": sum(len(v) for v in files.values())}

    def _tree(self, repo_id: str, files: dict[str, bytes], base: str, recursive: bool) -> list[dict]:
        pre = base + "/" if base else ""
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(pre):
                continue
            rest = p[len(pre):]
            if "/" in rest:
                parts = rest.split("/")
                for k in range(1, len(parts) if recursive else 2):
                    dirs.add(pre + "/".join(parts[:k]))
                if not recursive:
                    continue
            e = self.hub.entry(repo_id, p, files[p])
            fault = self.hub.faults.get((repo_id, p)) or {}
            if fault.get("listed_xet", fault.get("xet_hash")):   # the tree lists a Xet-backed file's hash
                e["xetHash"] = fault.get("listed_xet", fault.get("xet_hash"))
            out.append(e)
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]
        return out


class _CdnHandler(_Handler):
    """Serves LFS blobs by sha256, as the Hub's CDN does (another origin: no token sent here)."""

    side = "cdn"

    def do_HEAD(self) -> None:
        self._blob(head=True)

    def do_GET(self) -> None:
        self._blob(head=False)

    def _blob(self, head: bool) -> None:
        url = urlsplit(self.path)
        raw = url.path.split("/")[1:]
        query = parse_qs(url.query)
        path = query.get("file", [""])[0]
        with self.hub.lock:
            self.hub.cdn_log.append((path, "Authorization" in self.headers))
            sig = query.get("sig", [""])[0]
            self.hub.link_used[sig] += 1
            used = self.hub.link_used[sig]
        if len(raw) != 3 or raw[0] != "_lfs":
            self._send(404)
            return
        repo_id, oid = unquote(raw[1]), raw[2]
        repo = self.hub.repos.get(repo_id)
        data = None
        for files in (repo.commits.values() if repo else []):
            for p, d in files.items():
                if p == path and sha256_hex(d) == oid:
                    data = d
        if data is None:
            self._send(404)
            return
        fault = self.hub.faults.get((repo_id, path))
        if fault and fault.get("redirect_back"):       # back to the Hub, to a repo that is not there
            self._send(302, b"", {"Location": f"{self.hub.url}/x/y/resolve/main/{quote(path)}"}, head=head, length=0)
            return
        if fault and fault.get("status") and fault.get("times", 0) > 0 and not head:
            fault["times"] -= 1
            self._send(fault["status"], b"unavailable", {"Retry-After": str(fault["retry_after"])}
                       if "retry_after" in fault else None)
            return
        if fault and fault.get("link_uses") is not None and used > fault["link_uses"]:
            with self.hub.lock:
                self.hub.links_refused += 1
            self._send(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                       {"Content-Type": "application/xml"}, head=head)
            return
        if fault and fault.get("cdn_status"):          # the CDN alone refuses (an expired signed URL)
            self._send(fault["cdn_status"], b"<Error><Code>AccessDenied</Code></Error>",
                       {"Content-Type": "application/xml"}, head=head)
            return
        etag = fault["xet_hash"] if fault and fault.get("xet_hash") else oid
        self._content(data, {"ETag": f'"{etag}"'}, head, (repo_id, path))
