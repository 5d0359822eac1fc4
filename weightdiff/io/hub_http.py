"""The HTTP rules of every Hub request weightdiff makes or asks huggingface_hub to make:
bounded waits, and the few API calls the library makes without a timeout made here instead.

Timeouts are huggingface_hub's own settings, read when the call is made:
``HF_HUB_ETAG_TIMEOUT`` (default 10 s) bounds each wait of an API call (model info, file
listing, refs, the HEAD of a file): connecting, and each read of the answer;
``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s) bounds each wait for bytes of a download or a
range request.
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["api_timeout", "download_timeout", "get_json", "list_tree", "list_refs"]


def api_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def download_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def get_json(url: str, params: dict | None = None):
    """GET an API url with the library's session and headers (token, user agent), bounded by
    api_timeout(); HTTP errors raised as huggingface_hub raises them. -> (decoded JSON, response)."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    r = get_session().get(url, params=params, headers=build_hf_headers(), timeout=api_timeout())
    hf_raise_for_status(r)
    return r.json(), r


def list_tree(endpoint: str, repo_id: str, revision: str, path: str | None = None) -> list[dict]:
    """Every file entry (``path``, ``size``, ``lfs``) under ``path`` at ``revision``, recursively,
    following the Hub's pages (``Link: rel="next"``); HfApi.list_repo_tree without a timeout."""
    url = f"{endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}" + \
          (f"/{quote(path, safe='')}" if path else "")
    out: list[dict] = []
    params: dict | None = {"recursive": True}
    while url:
        page, r = get_json(url, params)
        out += [e for e in page if isinstance(e, dict) and e.get("type") == "file"]
        url, params = r.links.get("next", {}).get("url"), None
    return out


def list_refs(endpoint: str, repo_id: str) -> dict[str, list[str]]:
    """``{"branches": [...], "tags": [...]}``: HfApi.list_repo_refs without a timeout."""
    doc, _ = get_json(f"{endpoint}/api/models/{repo_id}/refs")
    return {k: [r["name"] for r in doc.get(k) or [] if isinstance(r, dict) and isinstance(r.get("name"), str)]
            for k in ("branches", "tags")}
