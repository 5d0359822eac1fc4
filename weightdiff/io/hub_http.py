"""The HTTP rules of every Hub request weightdiff makes or asks huggingface_hub to make:
bounded waits, and the few API calls the library makes without a timeout made here instead.

Timeouts are huggingface_hub's own settings, read when the call is made:
``HF_HUB_ETAG_TIMEOUT`` (default 10 s) bounds each wait of an API call (model info, file
listing, refs, the HEAD of a file): connecting, and each read of the answer;
``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s) bounds each wait for bytes of a download or a
range request.

Transient answers (HTTP 408, 429, 500, 502, 503, 504) to an API call or a download are retried
(``retrying``): at most RETRIES times, after the server's ``Retry-After`` when it sends one, else
after 1, 2, 4, 8 s; never more than RETRY_WAIT_TOTAL (30 s) of waiting per call, so a server
asking for a longer wait fails at once with its status. The range requests of --stream follow
the same rules (weightdiff.io.hub_stream).

A server can also keep every read inside its timeout and still never finish: a few bytes a
second. So each response body must deliver ``STALL_BYTES`` (64 KiB) within every
``WEIGHTDIFF_HUB_STALL_SECONDS`` (default 60 s) of its transfer, about 1 KiB/s, which any
real connection passes (a dial-up modem sends 5 KiB/s); a body that falls below stops with
one line naming the file. This holds for streamed range requests (weightdiff.io.hub_stream)
and for downloads (the watch is hooked onto huggingface_hub's session for the thread that
downloads the file). A file in the Hub's Xet storage is downloaded by plain HTTP too, never by
hf_xet (``plain_http``): hf_xet keeps its own timeouts and retries (a storage host that cannot be
reached kept a run silent for two minutes, then blamed "the Hub"), so its files come through the
redirect the resolve answer carries, like every other file, under these timeouts and the stall watch,
and a failure names the file and the server that answered.

An API answer is small, and a pace alone would let a server trickle one forever (a byte every 2 s keeps
every read inside its timeout): so every API exchange (model info, file listing, branches and tags, a
file's HEAD; ``api_exchange``) must be complete within ``WEIGHTDIFF_HUB_API_SECONDS`` (default 60 s) of
its request, counted per request (a retry or a redirect starts again); past it the run stops with one
line naming the repo and the endpoint (``AnswerTooSlow``). The check runs when the answer's headers are
in and at each piece of its body, so a server that sends nothing at all is bounded by
``HF_HUB_ETAG_TIMEOUT`` instead, and the whole exchange by the sum of the two.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from urllib.parse import quote

__all__ = ["retrying", "api_retrying", "api_exchange", "api_seconds", "AnswerTooSlow", "API_SECONDS", "retry_after", "RETRY_STATUS", "library_silenced", "plain_http", "api_timeout", "download_timeout", "get_json", "list_tree", "list_refs", "STALL_BYTES",
           "stall_seconds", "Stalled", "StallWatch", "watching", "Cancelled"]

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
RETRIES = 4
BACKOFF = 1.0
BACKOFF_MAX = 8.0
#: the most a call waits between its retries, all together (seconds)
RETRY_WAIT_TOTAL = 30.0
#: a response body must bring this many bytes within every stall_seconds() of its transfer
STALL_BYTES = 64 << 10
STALL_SECONDS = 60.0
#: the most seconds one API exchange may take, request to last byte (WEIGHTDIFF_HUB_API_SECONDS)
API_SECONDS = 60.0


def api_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def download_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


class NotAHubAnswer(ValueError):
    """An answer no Hugging Face Hub gives: not JSON, fields of the wrong kind, pages that lead back."""


#: pages of a tree listing followed at most (a Hub pages a 100,000-file repo in about a hundred)
TREE_PAGES_MAX = 10_000


def size_of(value) -> int | None:
    """A listed file size: a non-negative int, else None (unknown; a string, a float, a negative or absent one)."""
    return value if type(value) is int and value >= 0 else None


def get_json(url: str, params: dict | None = None):
    """GET an API url with the library's session and headers (token, user agent), bounded by
    api_timeout(); HTTP errors raised as huggingface_hub raises them. -> (decoded JSON, response)."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    def call():
        r = get_session().get(url, params=params, headers=build_hf_headers(), timeout=api_timeout())
        hf_raise_for_status(r)
        return r

    r = api_retrying(call)
    try:
        return r.json(), r
    except ValueError:
        kind = r.headers.get("content-type") or "no content type"
        raise NotAHubAnswer(f"its answer is not JSON ({kind.split(';')[0]})") from None


def list_tree(endpoint: str, repo_id: str, revision: str, path: str | None = None) -> list[dict]:
    """Every file entry (``path``, ``size``, ``lfs``) under ``path`` at ``revision``, recursively,
    following the Hub's pages (``Link: rel="next"``); HfApi.list_repo_tree without a timeout."""
    url = f"{endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}" + \
          (f"/{quote(path, safe='')}" if path else "")
    out: list[dict] = []
    params: dict | None = {"recursive": True}
    seen: set[str] = set()
    while url:
        if url in seen or len(seen) >= TREE_PAGES_MAX:
            raise NotAHubAnswer("its file listing's pages lead back to a page already read" if url in seen else
                                f"its file listing runs past {TREE_PAGES_MAX:,} pages")
        seen.add(url)
        page, r = get_json(url, params)
        if not isinstance(page, list):
            raise NotAHubAnswer("its file listing is not a list of files")
        out += [e for e in page if isinstance(e, dict) and e.get("type") == "file" and isinstance(e.get("path"), str)]
        url, params = r.links.get("next", {}).get("url"), None
    return out


def list_refs(endpoint: str, repo_id: str) -> dict[str, list[str]]:
    """``{"branches": [...], "tags": [...]}``: HfApi.list_repo_refs without a timeout."""
    doc, _ = get_json(f"{endpoint}/api/models/{repo_id}/refs")
    return {k: [r["name"] for r in doc.get(k) or [] if isinstance(r, dict) and isinstance(r.get("name"), str)]
            for k in ("branches", "tags")}


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (read at call time), else ``default``."""
    try:
        v = float(os.environ.get(name) or default)
    except ValueError:
        v = default
    return v if v > 0 else default


def api_seconds() -> float:
    """``WEIGHTDIFF_HUB_API_SECONDS`` (read at call time), default API_SECONDS."""
    return _env_seconds("WEIGHTDIFF_HUB_API_SECONDS", API_SECONDS)


class AnswerTooSlow(Exception):
    """An API answer not complete within api_seconds() of its request."""

    def __init__(self, got: int, seconds: float, limit: float):
        self.got, self.seconds, self.limit = got, seconds, limit
        super().__init__(self.text())

    def text(self, what: str = "its answer") -> str:
        return (f"did not finish {what} within the {self.limit:g} s an API answer may take ({self.got:,} bytes in "
                f"{self.seconds:.0f} s: a stalled or throttled connection)")


def stall_seconds() -> float:
    """``WEIGHTDIFF_HUB_STALL_SECONDS`` (read at call time), default STALL_SECONDS."""
    return _env_seconds("WEIGHTDIFF_HUB_STALL_SECONDS", STALL_SECONDS)


class Stalled(Exception):
    """A response body that delivered fewer than STALL_BYTES within stall_seconds()."""

    def __init__(self, got: int, seconds: float, limit: float):
        self.got, self.seconds, self.limit = got, seconds, limit
        super().__init__(self.text())

    def text(self) -> str:
        return (f"the server sent {self.got:,} bytes in {self.seconds:.0f} s, under the {STALL_BYTES >> 10} KiB per "
                f"{self.limit:g} s a transfer must keep up (a stalled or throttled connection)")


class Cancelled(Exception):
    """A download stopped because another file of the same run failed."""


class StallWatch:
    """Counts a body's bytes as they arrive; ``add`` raises Stalled when the last STALL_BYTES
    took longer than stall_seconds()."""

    def __init__(self):
        self.limit = stall_seconds()
        self.since = time.monotonic()
        self.window = 0

    def add(self, n: int) -> None:
        self.window += n
        now = time.monotonic()
        if self.window >= STALL_BYTES:
            self.since, self.window = now, 0
        elif now - self.since > self.limit:
            raise Stalled(self.window, now - self.since, self.limit)


# -- downloads made by huggingface_hub: a watch per thread, hooked onto its session ---------------

_local = threading.local()
_hooked: set[int] = set()
_hook_lock = threading.Lock()


def _watched_stream(stream, cancel):
    from .hub_stream import _httpx

    class Watched(_httpx().SyncByteStream):
        def __iter__(self):
            watch = StallWatch()
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                watch.add(len(chunk))
                yield chunk

        def close(self):
            stream.close()

        @property
        def elapsed(self):
            return getattr(stream, "elapsed", None)

    return Watched()


def _deadline_stream(stream, started: float, limit: float):
    from .hub_stream import _httpx

    class Bounded(_httpx().SyncByteStream):
        def __iter__(self):
            got = 0
            for chunk in stream:
                got += len(chunk)
                now = time.monotonic()
                if now - started > limit:
                    raise AnswerTooSlow(got, now - started, limit)
                yield chunk

        def close(self):
            stream.close()

    return Bounded()


def _on_request(request) -> None:
    if getattr(_local, "api", None) is not None:
        _local.started = time.monotonic()


def _on_response(response) -> None:
    limit = getattr(_local, "api", None)
    if limit is not None:
        started = getattr(_local, "started", None) or time.monotonic()
        if time.monotonic() - started > limit:         # the headers alone took too long
            raise AnswerTooSlow(0, time.monotonic() - started, limit)
        response.stream = _deadline_stream(response.stream, started, limit)
    state = getattr(_local, "state", None)
    if state is None:
        return
    if response.status_code in RETRY_STATUS:
        # raised here, to ``retrying`` around the download: the library would itself wait out
        # any Retry-After (an hour if the server says so) and retry only 408 and 429
        from huggingface_hub.utils import hf_raise_for_status

        response.read()
        hf_raise_for_status(response)
    response.stream = _watched_stream(response.stream, state)


def _hook() -> None:
    """Our hooks on huggingface_hub's shared client (recreated after close_session), once."""
    from huggingface_hub import get_session

    session = get_session()
    with _hook_lock:
        if id(session) not in _hooked or _on_response not in session.event_hooks["response"]:
            hooks = dict(session.event_hooks)
            hooks["request"] = [*hooks.get("request", []), _on_request]
            hooks["response"] = [*hooks.get("response", []), _on_response]
            session.event_hooks = hooks
            _hooked.add(id(session))


@contextmanager
def api_exchange():
    """While in this block, every answer huggingface_hub reads *in this thread* must be complete within
    api_seconds() of its request (AnswerTooSlow)."""
    _hook()
    previous = getattr(_local, "api", None)
    _local.api = api_seconds()
    try:
        yield
    finally:
        _local.api = previous


def api_retrying(call):
    """``retrying(call)`` for an API call: each exchange bounded as a whole (api_exchange)."""
    with api_exchange():
        return retrying(call)


@contextmanager
def watching(cancel: threading.Event | None = None):
    """While in this block, response bodies that huggingface_hub reads *in this thread* are
    watched (StallWatch), and stop with Cancelled once ``cancel`` is set."""
    _hook()
    previous = getattr(_local, "state", None)
    _local.state = cancel if cancel is not None else threading.Event()
    try:
        yield
    finally:
        _local.state = previous


_plain = 0
_saved_xet: bool | None = None


@contextmanager
def plain_http():
    """While in this block (any thread), huggingface_hub downloads every file by HTTP, never by hf_xet:
    its ``HF_HUB_DISABLE_XET`` setting on, so a Xet-backed file follows the resolve answer's redirect
    like any other (the library's own fallback when hf_xet is not installed)."""
    from huggingface_hub import constants

    global _plain, _saved_xet
    with _hook_lock:
        if _plain == 0:
            _saved_xet = constants.HF_HUB_DISABLE_XET
            constants.HF_HUB_DISABLE_XET = True
        _plain += 1
    try:
        yield
    finally:
        with _hook_lock:
            _plain -= 1
            if _plain == 0:
                constants.HF_HUB_DISABLE_XET = bool(_saved_xet)


_silenced = 0
_saved_level: int | None = None


@contextmanager
def library_silenced():
    """huggingface_hub's logger off while in this block (any thread): its retry and resume
    warnings would add lines to weightdiff's one-line error."""
    import logging

    global _silenced, _saved_level
    log = logging.getLogger("huggingface_hub")
    with _hook_lock:
        if _silenced == 0:
            _saved_level = log.level
            log.setLevel(logging.CRITICAL + 1)
        _silenced += 1
    try:
        yield
    finally:
        with _hook_lock:
            _silenced -= 1
            if _silenced == 0:
                log.setLevel(_saved_level or logging.NOTSET)


# -- retries ------------------------------------------------------------------------------------

def retry_after(response) -> float | None:
    """The seconds of a ``Retry-After: N`` header (an HTTP date is not honoured: None)."""
    try:
        v = float(response.headers.get("Retry-After", ""))
    except (AttributeError, TypeError, ValueError):
        return None
    return v if v >= 0 else None


def _status_of(exc: BaseException):
    from .hub_errors import _cause

    response = getattr(_cause(exc), "response", None)
    return getattr(response, "status_code", None), response


def retrying(call):
    """``call()``, again after a transient HTTP answer (RETRY_STATUS), as the module says; the
    last error is raised when the retries or the wait run out."""
    waited, failures = 0.0, 0
    while True:
        try:
            return call()
        except Exception as exc:
            status, response = _status_of(exc)
            if status not in RETRY_STATUS:
                raise
            failures += 1
            wait = retry_after(response)
            wait = min(BACKOFF_MAX, BACKOFF * 2 ** (failures - 1)) if wait is None else wait
            if failures > RETRIES or waited + wait > RETRY_WAIT_TOTAL:
                raise
        time.sleep(wait)
        waited += wait
