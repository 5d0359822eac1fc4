"""Safetensors files of a Hub repo read by HTTP range requests: nothing is stored on disk.

The twin of weightdiff.io.safetensors_read.SafetensorsFile, with the same verbs (``tensors``,
``metadata``, ``windows``, ``read``, ``read_rows``). Unlike it, the bytes come over HTTP:
the header is fetched with two small range requests (the 8-byte length, then exactly the
header) and validated by the same parser the local reader uses (``header_length`` and
``parse_header`` of weightdiff.io.safetensors_read); tensor data is fetched window by window
into bounded buffers. ``windows()`` runs a prefetch thread per call with a queue of
``PREFETCH`` windows, so the reads of the base and of the tuned model overlap with each
other and with the compute. Requests go through huggingface_hub's own HTTP session
(``get_session``) with its headers (``build_hf_headers``: token, user agent), so tokens,
endpoints and proxies behave as the library's. Transient failures (timeouts, dropped
connections, HTTP 408/429/5xx) are retried with exponential backoff (or after the
server's Retry-After, up to hub_http.RETRY_WAIT_TOTAL), resuming at the
first missing byte; when the retries run out, the error names the file. Every read has
a timeout, and every response must keep up a minimum pace (weightdiff.io.hub_http.StallWatch:
64 KiB within every WEIGHTDIFF_HUB_STALL_SECONDS), so a lost or trickling connection is an
error naming the file, never a hang.

Each file is resolved through the Hub once per reader: its later ranges go straight to the link the resolve
answer redirected to (the storage's signed URL), with what the redirect said of the file (its Xet hash, its size)
kept for the checks below, and without the Hub's token when that link is another origin. A link that stops
working (an expired signature: 403, or 400 from some storages; a transport error; a retryable status) is
forgotten and the range asked for again through the Hub; a file whose links are refused ``LINK_REFUSALS``
times (a storage whose links serve once) is read through the Hub every time. Small tensors are read as the
local reader reads them, in runs of neighbouring tensors (``read_span``: one request a run, where it was one a
tensor and side), and the reader keeps the last runs (``SPAN_KEEP_BYTES``) for the checks that read the changed
ones again (``windows``, ``read``). Answers are read to their end, so that connections are
kept: a range costs one round trip on an open connection.

What a stream verifies: the header by the local parser, each answer's range, and each answer's ETag where
it is a content hash (64 hex digits: the sha256 the listing gives, or the Xet hash the resolve answer
announced when the tree listing gives that hash for the file): an ETag naming other content is an error naming the file (``_check_etag``). What it does not:
the bytes themselves are never hashed (a whole file would have to be read), so a server that sends other
bytes under the right ETag, or no content-hash ETag at all, is not caught; ``--download`` hashes every
file it fetches against the listing.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, escape_name
from .hub_errors import same_origin
from .hub_http import RETRY_WAIT_TOTAL, Stalled, StallWatch, retry_after
from .safetensors_read import TensorInfo, check_range, header_length, parse_header, row_runs, storage_of

__all__ = ["HubFile", "RangeReader", "RemoteSafetensorsFile", "PREFETCH", "PART_BYTES"]

#: windows fetched ahead of the consumer, per windows() call
PREFETCH = 2
#: bytes per range request; a window is fetched as several parts in parallel
PART_BYTES = 8 << 20
#: bytes of the runs ``read_span`` fetched that a reader (one checkpoint) keeps for ``windows`` and ``read`` to
#: serve: the last batch of small tensors (``measure.compute.SMALL_BATCH_BYTES`` a side, gaps included)
SPAN_KEEP_BYTES = 40 << 20
#: concurrent range requests per reader
WORKERS = 8
#: a file whose kept storage link was refused this many times is read through the Hub's resolve URL only
LINK_REFUSALS = 3
#: retries of one range request after a transient failure, and the backoff between them (seconds)
RETRIES = 5
BACKOFF = 1.0
BACKOFF_MAX = 8.0
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repo at a commit; ``str()`` is how errors name it (``hf://org/name/file``)."""

    repo_id: str
    commit: str
    path: str                      # path in the repo
    size: int
    sha256: str | None = None      # the Hub's LFS oid
    shown: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __fspath__(self) -> str:
        return self.shown or f"hf://{self.repo_id}/{self.path}"

    __str__ = __fspath__


class _Transient(Exception):
    def __init__(self, text: str, wait: float | None = None):
        super().__init__(text)
        self.wait = wait            # the server's Retry-After, seconds


class RangeReader:
    """Fetches byte ranges of Hub files through huggingface_hub's HTTP session, with
    retries, timeouts and a count of the bytes received per file."""

    def __init__(self, endpoint: str, token: str | bool | None = None):
        from huggingface_hub import constants, get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        self._session = get_session
        self.endpoint = endpoint
        self._url = lambda f: hf_hub_url(f.repo_id, f.path, revision=f.commit, endpoint=endpoint)
        self.headers = build_hf_headers(token=token)
        self.headers["Accept-Encoding"] = "identity"
        self.timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
        self.bytes_read: dict[str, int] = {}
        self.requests = 0
        self._lock = threading.Lock()
        self._xet: dict[tuple[str, str, str], str | None] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._where: dict[tuple[str, str, str], _Located] = {}
        self._refused: dict[tuple[str, str, str], int] = {}    # links of a file that stopped working
        self._kept: list[tuple[HubFile, int, int, np.ndarray]] = []  # runs read_span fetched, newest last
        self.resolves = 0           # requests sent to the Hub's resolve URL (the rest went to where it redirected)

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="weightdiff-range")
            return self._pool

    def close(self) -> None:
        with self._lock:
            self._kept.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def listed_xet(self, f: HubFile) -> str | None:
        """The Xet hash the Hub's tree listing gives for ``f`` at its commit (None when it lists none), read
        once per folder: what an ETag vouched for only by a redirect's ``X-Xet-Hash`` must match."""
        from .hub_http import list_tree

        key = (f.repo_id, f.commit, f.path)
        with self._lock:
            if key in self._xet:
                return self._xet[key]
        folder = f.path.rsplit("/", 1)[0] if "/" in f.path else None
        try:
            entries = list_tree(self.endpoint, f.repo_id, f.commit, folder)
        except Exception:           # no listing to check against: nothing vouches for the hash
            entries = []
        found = {e["path"]: e.get("xetHash") for e in entries}
        with self._lock:
            for p, h in found.items():
                self._xet[(f.repo_id, f.commit, p)] = _etag(h) if isinstance(h, str) else None
            self._xet.setdefault(key, None)
            return self._xet[key]

    def _located(self, f: HubFile) -> "_Located | None":
        with self._lock:
            return self._where.get((f.repo_id, f.commit, f.path))

    def _remember(self, f: HubFile, r) -> None:
        """After an answer that came by redirect: where it came from, and what the redirects said of the file
        (its Xet hash, its size), so that the next range of the file goes there directly. The Hub's resolve URL
        answers each range with a redirect: two round trips a range, and as many calls on the Hub's rate-limited
        resolve route as ranges read (828 for the test suite's small pair)."""
        history = getattr(r, "history", ())
        key = (f.repo_id, f.commit, f.path)
        if not history or self._refused.get(key, 0) >= LINK_REFUSALS:
            return          # links that serve once (or expire at once): every range through the Hub, as they must
        loc = _Located(str(r.url), frozenset(x for x in (_etag(h.headers.get("X-Xet-Hash")) for h in history) if x),
                       _linked_size(history), same_origin(str(r.url), self.endpoint))
        with self._lock:
            self._where[key] = loc

    def _forget(self, f: HubFile, loc: "_Located", refused: bool = False) -> None:
        key = (f.repo_id, f.commit, f.path)
        with self._lock:
            if self._where.get(key) is loc:
                del self._where[key]
                self._refused[key] = self._refused.get(key, 0) + refused

    def keep(self, f: HubFile, start: int, data: np.ndarray) -> None:
        """Keep bytes [start, start + len(data)) of ``f`` (read-only), the newest first, up to ``SPAN_KEEP_BYTES``
        for the whole reader (whatever the number of files)."""
        with self._lock:
            self._kept.append((f, start, start + data.nbytes, data))
            total = sum(x[2] - x[1] for x in self._kept)
            while total > SPAN_KEEP_BYTES and len(self._kept) > 1:
                gone = self._kept.pop(0)
                total -= gone[2] - gone[1]

    def kept(self, f: HubFile, lo: int, hi: int) -> "tuple[int, int, np.ndarray] | None":
        """(start, end, bytes) of a kept run of ``f`` that holds bytes [lo, hi), or None."""
        with self._lock:
            return next(((b, e, d) for g, b, e, d in reversed(self._kept) if g == f and b <= lo and hi <= e), None)

    def _count(self, f: HubFile, n: int) -> None:
        with self._lock:
            self.bytes_read[f.path] = self.bytes_read.get(f.path, 0) + n

    def fetch(self, f: HubFile, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.fetch_into(f, offset, memoryview(buf))
        return bytes(buf)

    def fetch_into(self, f: HubFile, offset: int, out: memoryview) -> None:
        """Fill ``out`` with bytes [offset, offset + len(out)) of ``f``; parts in parallel."""
        n = len(out)
        if offset < 0 or offset + n > f.size:
            raise CheckpointError(f, f"range {offset:,}-{offset + n:,} is outside the file ({f.size:,} bytes)")
        if n <= PART_BYTES:
            self._fetch_part(f, offset, out)
            return
        parts = [(p, min(PART_BYTES, n - p)) for p in range(0, n, PART_BYTES)]
        futures = [self.pool().submit(self._fetch_part, f, offset + p, out[p:p + k]) for p, k in parts]
        for fut in futures:
            fut.result()

    def _fetch_part(self, f: HubFile, offset: int, out: memoryview) -> None:
        import huggingface_hub.errors as hf_errors
        from huggingface_hub.utils import hf_raise_for_status

        httpx = _httpx()
        total, got, failures, stale = len(out), 0, 0, 0
        while got < total:
            start = offset + got
            headers = dict(self.headers, Range=f"bytes={start}-{offset + total - 1}")
            loc = self._located(f) if stale < 2 else None
            if loc is not None and not loc.same_origin:       # the token is the Hub's: never sent to its storage
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            try:
                with self._lock:
                    self.requests += 1
                    self.resolves += loc is None
                with self._session().stream("GET", loc.url if loc else self._url(f), headers=headers,
                                            timeout=self.timeout, follow_redirects=True) as r:
                    if loc is not None and (r.status_code >= 400 or r.history):
                        # a signed link expired (403, or 400 from some storages), a storage that moved the file:
                        # asked again through the Hub at once, which answers with a fresh link or the error
                        self._forget(f, loc, refused=r.status_code not in _RETRY_STATUS)
                        stale += 1
                        if r.status_code not in _RETRY_STATUS:
                            continue
                    if r.status_code in _RETRY_STATUS:
                        raise _Transient(f"HTTP {r.status_code}", retry_after(r))
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    # 206 from the right byte; a 200 (the whole file) only serves a read from byte 0
                    if not (r.status_code == 206 and _range_starts(r.headers.get("Content-Range"), start)
                            or r.status_code == 200 and start == 0):
                        raise CheckpointError(f, f"the server did not honour the range request (HTTP "
                                                 f"{r.status_code}, Content-Range "
                                                 f"{r.headers.get('Content-Range')!r})",
                                              "use --download to fetch whole files instead")
                    _check_size(f, r, loc)
                    _check_etag(f, r, self.listed_xet, loc)
                    if loc is None:
                        self._remember(f, r)
                    before, watch = got, StallWatch()
                    # an answer of exactly the bytes asked is read to its end, so that its connection goes back
                    # to the pool: left unread (a break at the last byte), it was closed, and every range
                    # request opened a new connection (a new TLS handshake to the Hub's CDN each time)
                    exact = r.status_code == 206 and r.headers.get("Content-Length", "") == str(total - got)
                    try:
                        for chunk in r.iter_bytes():       # as received: the pace is checked per read
                            k = min(len(chunk), total - got)
                            out[got:got + k] = chunk[:k]
                            got += k
                            if got == total:
                                if exact:
                                    continue
                                break
                            watch.add(k)
                    except Stalled as exc:
                        self._count(f, got - before)
                        raise CheckpointError(f, f"{exc.text()} at byte {offset + got:,} of {f.size:,}",
                                              "rerun later, or use --download from a faster mirror; "
                                              "WEIGHTDIFF_HUB_STALL_SECONDS sets the window") from None
                    self._count(f, got - before)
                    if got > before:
                        failures = 0
                    if got < total:
                        raise _Transient(f"the response ended after {got - before:,} of {total - before:,} bytes")
            except (_Transient, httpx.TransportError) as exc:
                if loc is not None:
                    self._forget(f, loc)       # the retry asks the Hub again
                failures += 1
                if failures > RETRIES:
                    from .hub_errors import request_origin

                    where = request_origin(exc, self.endpoint)         # the storage the Hub redirected to
                    raise CheckpointError(f, f"connection lost at byte {offset + got:,} of {f.size:,} after "
                                             f"{RETRIES} retries ({_what(exc)}"
                                             f"{f', at {where}, where the Hub redirected the file' if where else ''})",
                                          "check the network and rerun, or use --download") from None
                wait = min(BACKOFF_MAX, BACKOFF * 2 ** (failures - 1))
                asked = getattr(exc, "wait", None)
                if asked is not None and asked > wait:        # Retry-After, up to the Hub calls' bound
                    if asked > RETRY_WAIT_TOTAL:
                        raise CheckpointError(f, f"the server answered {_what(exc)} and asked to retry after "
                                                 f"{asked:g} s, over the {RETRY_WAIT_TOTAL:g} s weightdiff waits",
                                              "try again later") from None
                    wait = asked
                time.sleep(wait)
            except (hf_errors.HfHubHTTPError, httpx.TooManyRedirects) as exc:
                from .hub_errors import hub_error

                raise hub_error(exc, f.repo_id, str(f), file=f, endpoint=self.endpoint) from None


def _httpx():
    try:
        import httpx2 as httpx          # huggingface_hub 2.x
    except ImportError:                 # pragma: no cover - huggingface_hub 1.x
        import httpx
    return httpx


def _etag(value: str | None) -> str | None:
    """An ETag header without its weak marker and quotes, lower case (``W/"ab12"`` -> ``ab12``)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None


def _check_etag(f: HubFile, r, listed_xet: "Callable[[HubFile], str | None] | None" = None,
                loc: "_Located | None" = None) -> None:
    """A range answer whose ETag names other content than the file the Hub lists: CheckpointError.

    The Hub's CDN names an LFS blob by a content hash: its sha256 (the LFS oid the listing gives), or for a
    file in Xet storage the Xet hash that the resolve answer announced in ``X-Xet-Hash``. A 64-hex ETag that
    is neither is another blob (a mirror or CDN serving the wrong file: the base's bytes in place of the
    tuned model's read "identical"), or the file changed between two range requests. An ETag of another
    shape (a storage's MD5, a small file's git oid) says nothing about the content and is not checked. A
    Xet hash counts only when the Hub's tree listing gives that hash for the file (``listed_xet``): a
    redirect that serves another blob announces that blob's Xet hash, which vouches for nothing.

    >>> _etag('W/"AB12"'), _etag(None)
    ('ab12', None)
    """
    tag = _etag(r.headers.get("ETag"))
    if not f.sha256 or tag is None or not _SHA256.match(tag) or tag == f.sha256.lower():
        return
    vouched = {_etag(h.headers.get("X-Xet-Hash")) for h in getattr(r, "history", ())} | (loc.xet if loc else set())
    if tag in vouched and listed_xet is not None and listed_xet(f) == tag:
        return
    raise CheckpointError(f, f"the server sent bytes whose ETag is the content hash {tag[:16]}..., not the "
                             f"sha256 {f.sha256[:16]}... the Hub lists for the file (a mirror or CDN serving "
                             f"another file, or the file changed on the server during the run)",
                          "rerun later, or use --download, which hashes the whole file against the Hub's listing")


def _served_size(r, loc: "_Located | None" = None) -> int | None:
    """The whole file's size the server that answered states: a 206's ``Content-Range: bytes a-b/N``, a 200's
    ``Content-Length`` (not encoded), else the ``X-Linked-Size`` of the resolve answer that redirected to it (None
    when none says)."""
    total = (r.headers.get("Content-Range") or "").rpartition("/")[2].strip()
    if r.status_code == 206 and total.isdigit():
        return int(total)
    length = (r.headers.get("Content-Length") or "").strip()
    if r.status_code == 200 and length.isdigit() and r.headers.get("Content-Encoding", "identity") == "identity":
        return int(length)                   # the whole file, as sent
    linked = _linked_size(getattr(r, "history", ()))
    return linked if linked is not None else loc.linked_size if loc else None


def _linked_size(history) -> int | None:
    for h in history:
        linked = (h.headers.get("X-Linked-Size") or "").strip()
        if linked.isdigit():
            return int(linked)
    return None


@dataclass(frozen=True)
class _Located:
    """Where a file's resolve URL redirected (the storage's URL, a signed link on the Hub) and what the
    redirects said: the Xet hashes they announced, the file's size, and whether it is the Hub's own origin."""

    url: str
    xet: frozenset
    linked_size: int | None
    same_origin: bool


def _check_size(f: HubFile, r, loc: "_Located | None" = None) -> None:
    """A range answer from a file of another size than the Hub's listing gives: CheckpointError saying that the
    listing and the served file disagree (read with the listed size, its header would be blamed: "trailing bytes",
    "truncated download?", for a stream that downloaded nothing)."""
    served = _served_size(r, loc)
    if served is None or f.size < 0 or served == f.size:
        return
    raise CheckpointError(f, f"the Hub's listing gives this file {f.size:,} bytes but the server serves {served:,} "
                             f"bytes: the listing and the served file disagree",
                          "use --download, which checks the whole file against the sha256 the Hub lists; or ask "
                          "the Hub or mirror's owner")


def _range_starts(content_range: str | None, start: int) -> bool:
    """True when ``Content-Range: bytes a-b/n`` starts at ``start`` (or is absent: trusted)."""
    if not content_range:
        return True
    if not content_range.startswith("bytes "):
        return False
    try:
        return int(content_range[6:].split("-", 1)[0]) == start
    except ValueError:
        return False


def _what(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return escape_name(f"{type(exc).__name__}: {text}" if text and not isinstance(exc, _Transient) else
                       text or type(exc).__name__)


class RemoteSafetensorsFile:
    """One fully validated safetensors file of a Hub repo, read by range requests."""

    def __init__(self, f: HubFile, reader: RangeReader):
        self.path, self.reader, self.size = f, reader, f.size
        prefix = reader.fetch(f, 0, min(8, f.size)) if f.size else b""
        n = header_length(prefix, f.size, f)
        self.tensors, self.metadata = parse_header(reader.fetch(f, 8, n), f.size, f)
        self.tensors = {k: replace(v, path=f) for k, v in self.tensors.items()}

    def close(self) -> None:
        pass

    def __enter__(self) -> "RemoteSafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __repr__(self) -> str:
        return f"RemoteSafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor `{escape_name(name)}` in {self.path}") from None

    def windows(self, name: str, max_elements: int | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[np.ndarray]:
        """As SafetensorsFile.windows; a thread fetches up to PREFETCH windows ahead."""
        info = self._info(name)
        dt = storage_of(info.dtype)
        start, stop, step = check_range(info, max_elements, start, stop, dt.itemsize)
        lo = info.start + start * dt.itemsize
        kept = self._kept(lo, info.start + stop * dt.itemsize)
        if kept is not None:        # bytes read_span fetched for the batch: no request
            return self._kept_windows(kept[2], lo - kept[0], dt, start, stop, step)
        return self._windows(info, dt, start, stop, step)

    @staticmethod
    def _kept_windows(buf: np.ndarray, at: int, dt: np.dtype, start: int, stop: int, step: int
                      ) -> Iterator[np.ndarray]:
        for pos in range(start, stop, step):
            n = min(step, stop - pos)
            a = at + (pos - start) * dt.itemsize
            yield buf[a:a + n * dt.itemsize].view(dt)          # read-only, as every window

    def _windows(self, info: TensorInfo, dt: np.dtype, start: int, stop: int, step: int) -> Iterator[np.ndarray]:
        spans = [(pos, min(step, stop - pos)) for pos in range(start, stop, step)]
        if not spans:
            return
        q: queue.Queue = queue.Queue(PREFETCH)
        halt = threading.Event()

        def produce() -> None:
            for pos, n in spans:
                try:
                    arr = np.empty(n, dtype=dt)
                    self.reader.fetch_into(self.path, info.start + pos * dt.itemsize, memoryview(arr.view(np.uint8)))
                    item: object = arr
                except BaseException as exc:   # handed to the consumer, raised there
                    item = exc
                while not halt.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if halt.is_set() or isinstance(item, BaseException):
                    return

        worker = threading.Thread(target=produce, name="weightdiff-prefetch", daemon=True)
        worker.start()
        try:
            for _ in spans:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                item.flags.writeable = False
                yield item
                del item
        finally:
            halt.set()

    def read_span(self, start: int, end: int) -> np.ndarray:
        """File bytes [start, end) as an owned uint8 array, as SafetensorsFile.read_span: the run of neighbouring
        small tensors the compute loop reads at once (one range request, parts of ``PART_BYTES`` in parallel)."""
        if not (0 <= start <= end <= self.size):
            raise ValueError(f"byte range [{start}, {end}) is outside {self.path} ({self.size:,} bytes)")
        out = np.empty(end - start, dtype=np.uint8)
        if end > start:
            self.reader.fetch_into(self.path, start, memoryview(out))
        out.flags.writeable = False
        self.reader.keep(self.path, start, out)   # the checks after a batch's statistics read its tensors again
        return out

    def read(self, name: str) -> np.ndarray:
        """An owned copy of the whole tensor in its storage dtype, shaped (packed F4/F6 flat)."""
        info = self._info(name)
        out = np.empty(info.flat_length, dtype=storage_of(info.dtype))
        kept = self._kept(info.start, info.start + out.nbytes)
        if kept is not None:        # bytes read_span fetched for the batch: copied, no request
            out.view(np.uint8)[:] = kept[2][info.start - kept[0]:info.start - kept[0] + out.nbytes]
        else:
            self.reader.fetch_into(self.path, info.start, memoryview(out.view(np.uint8)))
        return out if info.packed else out.reshape(info.shape)

    def _kept(self, lo: int, hi: int) -> "tuple[int, int, np.ndarray] | None":
        """The kept run of ``read_span`` holding file bytes [lo, hi), or None."""
        return self.reader.kept(self.path, lo, hi)

    def _row_plan(self, name: str, rows: Sequence[int] | np.ndarray):
        return row_runs(self._info(name), name, rows)

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows (first-axis slices) of ``name`` in the given order; runs fetched concurrently."""
        return self.read_rows_many([(self, name, rows)])[0]

    @staticmethod
    def read_rows_many(requests: Sequence[tuple["RemoteSafetensorsFile", str, Sequence[int]]]) -> list[np.ndarray]:
        """read_rows of several (file, tensor, rows) at once: every run of rows in flight together."""
        outs, futures = [], []
        for f, name, rows in requests:
            out, jobs = f._row_plan(name, rows)
            outs.append(out)
            pool = f.reader.pool()
            for off, mv in jobs:       # parts of at most PART_BYTES: workers never wait on each other
                futures += [pool.submit(f.reader._fetch_part, f.path, off + p, mv[p:p + PART_BYTES])
                            for p in range(0, len(mv), PART_BYTES)]
        for fut in futures:
            fut.result()
        return outs
