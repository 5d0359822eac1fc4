"""What a checkpoint says about itself: its own name and the base it declares.

Hugging Face writes ``_name_or_path`` into ``config.json`` (the name or path the model
was loaded from before it was saved) and PEFT writes ``base_model_name_or_path`` into
``adapter_config.json``. These are claims, not evidence: weightdiff compares them by
name only (``same_model``) and reports a disagreement as the ``declared_base_mismatch``
flag beside the verdict, which the weights alone decide.

>>> same_model("sentence-transformers/all-MiniLM-L6-v2", "/data/all-MiniLM-L6-v2/")
True
>>> same_model("models--org--Qwen2-0.5B", "Qwen/Qwen2-0.5B"), same_model("bert-base-uncased", "gpt2")
(True, False)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .files import load_json, read_beside

__all__ = ["declared", "same_model"]

_CAP = 1 << 20


def _name_in(path: Path, key: str) -> str | None:
    try:
        got = read_beside(path.parent, path.name, _CAP)     # never one that resolves out of the folder
        if got is None:
            return None
        doc = load_json(got[1], path, path.name)
    except (CheckpointError, OSError):
        return None        # a hint only: a config we cannot read declares nothing
    value = doc.get(key) if isinstance(doc, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def declared(ckpt) -> dict:
    """``{"name": own name or None, "declares_base": declared base or None}`` of a located checkpoint."""
    root = Path(getattr(ckpt, "root", None) or ".")
    adapter = getattr(ckpt, "adapter", None)
    base = getattr(adapter, "base_model", None) if adapter is not None else None
    own = _name_in(root / "config.json", "_name_or_path")
    if base is None:
        base = own       # a saved fine-tune's config names what it was loaded from
    return {"name": own, "declares_base": base}


def _short(name: str) -> str:
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if last.startswith("models--"):
        last = last.split("--")[-1]
    return last.lower()


def same_model(a: str, b: str) -> bool:
    """Whether two model names or paths name the same model (their last components agree)."""
    return _short(a) == _short(b)
