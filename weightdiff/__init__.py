"""weightdiff: measure how deep a fine-tune is.

Pairs a base checkpoint with a fine-tuned one, streams both, and reports per-tensor
and per-block deltas, the rank of each change and a verdict (identical, cast_only,
derived, unrelated).

>>> import weightdiff
>>> result = weightdiff.compare("base/", "tuned/")          # doctest: +SKIP
>>> result.summary.verdict, result.summary.blocks_changed     # doctest: +SKIP
('derived', 2)
"""

from __future__ import annotations

from .errors import WeightdiffError
from .options import CompareOptions, Thresholds

from ._version import __version__

__all__ = ["compare", "provenance", "lineage", "CompareOptions", "Comparison", "Thresholds", "WeightdiffError",
           "__version__"]

#: public names imported on first use: compare() pulls in numba; keep `import weightdiff` and
#: `weightdiff --help` fast
_LAZY = {"compare": "comparison", "Comparison": "comparison", "provenance": "provenance", "lineage": "lineage"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'weightdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
