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

__all__ = ["compare", "CompareOptions", "Comparison", "Thresholds", "WeightdiffError", "__version__"]


def __getattr__(name: str):
    # compare() pulls in numba; keep `import weightdiff` and `weightdiff --help` fast.
    if name in ("compare", "Comparison"):
        from . import comparison

        return getattr(comparison, name)
    raise AttributeError(name)
