"""huggingface_hub's errors as weightdiff's one-line CheckpointError: what failed, naming the
repo, and what to do (``hf auth login``, the branches and tags of a missing revision).

The Hub answers a gated repo with ``X-Error-Code: GatedRepo``, a missing or private repo
with ``RepoNotFound`` (401 or 404), a missing revision with ``RevisionNotFound``; the
library turns those into its error classes on https endpoints, and the header is read
here as well so that a plain-http mirror (HF_ENDPOINT) gives the same lines.
"""

from __future__ import annotations

import re

from ..errors import CheckpointError, escape_name

__all__ = ["hub_error", "first_line", "is_transport_error", "LOGIN"]

LOGIN = "run `hf auth login` or set HF_TOKEN"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return escape_name(text.splitlines()[0] if text else type(exc).__name__)


def _refs(repo_id: str, endpoint: str | None) -> str:
    """`` (branches: main, dev; tags: v1)`` from list_repo_refs, or "" when the Hub does not say."""
    from huggingface_hub import constants

    from .hub_http import list_refs

    try:
        refs = list_refs((endpoint or constants.ENDPOINT).rstrip("/"), repo_id)
    except Exception:
        return ""
    parts = [f"{what}: {', '.join(escape_name(n) for n in refs[key])}"
             for what, key in (("branches", "branches"), ("tags", "tags")) if refs[key]]
    return f" ({'; '.join(parts)})" if parts else ""


def _cause(exc: BaseException) -> BaseException:
    """The transfer error behind a library wrapper (LocalEntryNotFoundError raised "from" it)."""
    from huggingface_hub import errors as e

    seen = exc
    while isinstance(seen, e.LocalEntryNotFoundError) and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


def _origin(response) -> str:
    """``scheme://host[:port]`` of the URL that answered (never its query: a CDN's is signed)."""
    try:
        url = response.request.url
        return escape_name(f"{url.scheme}://{url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc}")
    except Exception:
        return "another server"


def _elsewhere(response, endpoint: str | None) -> bool:
    """Whether ``response`` came from another server than the Hub at ``endpoint``: after a redirect, or
    from another origin (huggingface_hub fetches the CDN's URL by a request of its own)."""
    if getattr(response, "history", None):
        return True
    if not endpoint:
        return False
    try:
        return not same_origin(str(response.request.url), endpoint)
    except Exception:
        return False


def same_origin(url: str, endpoint: str) -> bool:
    """Whether ``url`` is on the Hub at ``endpoint``: the same scheme, host and port (default ports filled in)."""
    from urllib.parse import urlsplit

    a, b = urlsplit(url), urlsplit(endpoint)
    ports = {"http": 80, "https": 443}
    try:
        return (a.scheme, (a.hostname or "").lower(), a.port or ports.get(a.scheme)) == \
            (b.scheme, (b.hostname or "").lower(), b.port or ports.get(b.scheme))
    except ValueError:                      # a port that is not a number
        return False


def transfer_error(exc: BaseException, where: str, transfer: bool = True,
                   endpoint: str | None = None) -> CheckpointError | None:
    """What a server did wrong while serving one file (``where`` names it), or None when ``exc``
    is not such a fault: a redirect loop or an error from the server the file's request was sent on to
    (the CDN: its 401 or 403 is the storage refusing a signed link, not the Hub refusing the token), a body
    cut short, a size other than announced, an answer without the Hub's headers, a read that timed out
    (when ``transfer``: a file's bytes were awaited, not an API answer)."""
    from huggingface_hub import errors as e

    httpx = _httpx()
    exc = _cause(exc)
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    text = first_line(exc)
    if isinstance(exc, httpx.TooManyRedirects):
        return CheckpointError(where, f"the server redirected badly: a redirect loop ({text})",
                               "the Hub or the mirror in HF_ENDPOINT is misconfigured; try again later")
    if status in (401, 403) and transfer and _elsewhere(response, endpoint):
        return CheckpointError(where, f"the file's request was redirected to {_origin(response)}, which refused it "
                                      f"(HTTP {status}): the storage refused the link the Hub gave, not the repo's "
                                      "access", "an expired link or a storage fault; try again later")
    if status is not None and status >= 400 and getattr(response, "history", None):
        code = response.headers.get("X-Error-Code")
        return CheckpointError(where, f"the server redirected badly: the file's request was redirected to "
                                      f"{_origin(response)}, which answered HTTP {status}"
                                      f"{f' ({escape_name(code)})' if code else ''}",
                               "the Hub's storage or the mirror in HF_ENDPOINT is failing; try again later")
    if isinstance(exc, e.FileMetadataError):
        return CheckpointError(where, f"the server's answer for this file lacks what a Hub sends ({text})",
                               "is HF_ENDPOINT a Hugging Face Hub?")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        sizes = re.search(r"size (\d+) but has size (\d+)", str(exc))
        said = (f": {int(sizes[2]):,} bytes where {int(sizes[1]):,} were announced" if sizes else
                f" ({text.split(' ((')[0]})")       # never the CDN's url (signed)
        return CheckpointError(where, f"the server sent a file of another size than announced (size mismatch{said})",
                               "a faulty server or proxy; try again later")
    if isinstance(exc, httpx.RemoteProtocolError):
        return CheckpointError(where, f"the server closed the connection before sending the whole file ({text})",
                               "a faulty server or proxy; try again later (the download resumes)")
    if transfer and isinstance(exc, httpx.ReadTimeout):
        from .hub_http import download_timeout

        return CheckpointError(where, f"the server sent nothing for {download_timeout():g} s (timed out)",
                               "try again later; HF_HUB_DOWNLOAD_TIMEOUT sets the wait, in seconds")
    origin = request_origin(exc, endpoint)
    if transfer and origin and isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.ProxyError):
        # the Hub answered and redirected the file to its storage (a CDN, Xet's bridge), which did not: said so,
        # never "cannot reach the Hub" naming only the repo
        return CheckpointError(where, f"the Hub redirected the file to {origin}, which cannot be reached ({text})",
                               "the Hub's storage or the network to it is failing; try again later, or check the "
                               "proxy settings")
    return None


def request_origin(exc: BaseException, endpoint: str | None) -> str | None:
    """``scheme://host[:port]`` of the request a transport error was raised on (never its query: a CDN's is
    signed) when that is another server than the Hub at ``endpoint``; None when it is the Hub, or unknown."""
    from urllib.parse import urlsplit

    try:
        url = exc.request.url            # (an httpx error raised without a request has none: RuntimeError)
        hub = urlsplit(endpoint or "")
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        if (url.scheme, (url.host or "").lower(), port) == \
                (hub.scheme, (hub.hostname or "").lower(), hub.port or {"http": 80, "https": 443}.get(hub.scheme)):
            return None
        netloc = url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc
        return escape_name(f"{url.scheme}://{netloc.rpartition('@')[2]}")
    except Exception:
        return None


def _has_token() -> bool:
    """Whether requests carry a token (HF_TOKEN, or one saved by `hf auth login`)."""
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return False


def hub_error(exc: BaseException, repo_id: str, where: str, revision: str | None = None,
              endpoint: str | None = None, file: object = None) -> CheckpointError:
    """A huggingface_hub error as one line naming the repo and what to do; a server's fault
    while serving ``file`` (transfer_error) names the file instead."""
    from huggingface_hub import errors as e

    fault = transfer_error(exc, str(file) if file is not None else where, transfer=file is not None, endpoint=endpoint)
    if fault is not None:
        return fault
    exc = _cause(exc)
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    code = response.headers.get("X-Error-Code") if response is not None else None
    repo = f"`{escape_name(repo_id)}`"
    from .hub_http import AnswerTooSlow

    if isinstance(exc, AnswerTooSlow):
        return CheckpointError(where, f"the Hub at {escape_name(str(endpoint))} {exc.text(f'its answer for {repo}')}",
                               "try again later; WEIGHTDIFF_HUB_API_SECONDS sets the limit, in seconds")
    if isinstance(exc, e.GatedRepoError) or code == "GatedRepo":
        if _has_token():        # "set HF_TOKEN" to someone whose token was sent and refused sends them in circles
            return CheckpointError(where, f"{repo} is a gated repo and the token in use has no access to it "
                                          f"(HTTP {status})",
                                   "accept its conditions on the repo's Hub page with that token's account, or use "
                                   "another token (HF_TOKEN, or `hf auth login`)")
        return CheckpointError(where, f"{repo} is a gated repo and this request has no access to it (HTTP {status})",
                               f"accept its conditions on the repo's Hub page, then {LOGIN}")
    if isinstance(exc, e.RevisionNotFoundError) or code == "RevisionNotFound":
        return CheckpointError(where, f"revision `{escape_name(str(revision or 'main'))}` not found in {repo}"
                                      f"{_refs(repo_id, endpoint)}", "give a branch, a tag or a commit sha")
    if isinstance(exc, e.RemoteEntryNotFoundError) or code == "EntryNotFound":
        return CheckpointError(str(file) if file is not None else where,
                               f"a file of {repo} is listed but the Hub does not serve it (HTTP {status})",
                               "the repo may have changed meanwhile: rerun")
    if isinstance(exc, e.RepositoryNotFoundError) or code == "RepoNotFound":
        return CheckpointError(where, f"no such file or directory, and no Hub repo {repo} (or it is private)",
                               f"check the spelling; for a private repo {LOGIN}")
    if status == 401:
        return CheckpointError(where, f"the Hub refused access to {repo} (HTTP 401: no token, or an invalid one)",
                               LOGIN)
    if status == 403:
        return CheckpointError(where, f"the Hub refused access to {repo} (HTTP 403: the token may not read it)",
                               f"{LOGIN} with a token that can read it; a gated repo needs its conditions accepted")
    if isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        return CheckpointError(where, f"not in the local Hugging Face cache, and offline mode is on",
                               "run once without --offline or HF_HUB_OFFLINE to download it")
    if status is not None:
        from .hub_http import RETRY_STATUS, RETRY_WAIT_TOTAL, retry_after

        asked = retry_after(response)
        wait = (f" and asked to retry after {asked:g} s, over the {RETRY_WAIT_TOTAL:g} s weightdiff waits"
                if asked is not None and asked > RETRY_WAIT_TOTAL else "")
        if file is not None:            # a file's request: the answer may be a CDN's; never its (signed) url
            again = " after retries" if status in RETRY_STATUS and not wait else ""
            return CheckpointError(str(file), f"the server answered HTTP {status}{again}{wait}", "try again later")
        again = " after retries" if status in RETRY_STATUS and not wait else ""
        return CheckpointError(where, f"the Hub answered HTTP {status}{again} for {repo}{wait} ({first_line(exc)})",
                               "try again later")
    from .hub_http import NotAHubAnswer

    if isinstance(exc, (NotAHubAnswer, ValueError, KeyError, TypeError)) and not isinstance(exc, OSError):
        # JSON that does not decode (a proxy's or captive portal's page answered 200), fields of the wrong kind,
        # a listing whose pages lead back to themselves: not a Hub's answer, not a network fault
        return CheckpointError(where, f"the server at {escape_name(str(endpoint))} did not answer as a Hugging Face "
                                      f"Hub does for {repo} ({first_line(exc)})",
                               "is HF_ENDPOINT a Hub's address? A proxy or captive portal may be answering instead")
    if isinstance(exc, _httpx().TimeoutException):
        from .hub_http import api_timeout

        return CheckpointError(where, f"the Hub at {escape_name(str(endpoint))} did not answer within "
                                      f"{api_timeout():g} s (timed out)",
                               "try again later; HF_HUB_ETAG_TIMEOUT sets the wait, in seconds")
    return CheckpointError(str(file) if file is not None else where,
                           f"{_no_local(where, file)}cannot reach the Hub at {escape_name(str(endpoint))} "
                           f"({first_line(exc)})",
                           "check the network or proxy settings, or use --offline with a cached copy")


def _no_local(where: str, file: object) -> str:
    """"no such file or directory, and " for a spelling that names no local path and was taken for a Hub repo id
    (``gg/model.gguf`` mistyped): the line said only that the Hub could not be reached; else ""."""
    import os

    if file is not None or not where or where.startswith("hf://"):
        return ""
    return "" if os.path.lexists(where.split("@", 1)[0]) else "no such file or directory, and "


def _httpx():
    from .hub_stream import _httpx

    return _httpx()


def is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, _httpx().TransportError) and not isinstance(exc, _httpx().ProxyError)
