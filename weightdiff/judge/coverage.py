"""Coverage: how much of each model the comparison actually looked at.

A verdict is only as good as what was compared. ``coverage`` counts, for the base and
for the tuned model, the parameters that have a counterpart and were compared element
by element, overall and over the large matrices (the evidence of relatedness);
``too_little`` is the one place the ``min_coverage`` threshold is compared. Buffers are
not parameters and never appear here (weightdiff.pairing.names.is_buffer). A tied head
row (the tuned embedding again, against the base head) covers the base head without
counting the tuned embedding twice.

>>> from weightdiff.records import TensorRecord
>>> r = TensorRecord("w", "w", "unchanged", [64, 64], [64, 64], "F32", "F32", 4096, 4096, compared="float")
>>> gone = TensorRecord("v", "v", "removed", [64, 64], [64, 64], "F32", None, 4096, compared="none")
>>> c = coverage([r, gone], Thresholds())
>>> c["base"]["share"], c["tuned"]["share"], too_little(c, Thresholds())
(0.5, 1.0, False)
"""

from __future__ import annotations

import math

from ..options import Thresholds
from ..records import TensorRecord
from .status import PAIRED, is_tied

__all__ = ["coverage", "too_little", "compared_elements"]


def compared_elements(rec: TensorRecord) -> int:
    """Elements this record compared with a counterpart (0 when it has none or none was read)."""
    if rec.status not in PAIRED or rec.compared not in ("float", "bytes", "factors"):
        return 0
    return int(rec.numel_compared or 0)


def _side(rows: list[tuple[list | None, int]], large: int) -> dict:
    params = compared = large_params = large_compared = 0
    for shape, done in rows:
        n = math.prod(shape) if shape is not None else 0      # a 0-d tensor holds one value
        big = shape is not None and len(shape) >= 2 and n >= large
        params += n
        compared += done
        if big:
            large_params += n
            large_compared += done
    return {"params": params, "compared": compared, "share": compared / params if params else None,
            "large_params": large_params, "large_compared": large_compared,
            "large_share": large_compared / large_params if large_params else None}


def coverage(records: list[TensorRecord], thresholds: Thresholds) -> dict:
    """``{"base": {...}, "tuned": {...}}``: params, compared, share, and the same over the
    large matrices (at least ``large_matrix_numel`` elements and two dimensions)."""
    base_done: dict[tuple[int, str], tuple[list, int]] = {}
    tuned_rows = []
    for r in records:
        done = compared_elements(r)
        # a base tensor compared twice (its embedding against the tuned embedding and, the base
        # tying its head, against the tuned head) is still one tensor of the base
        key = (getattr(r, "base_index", 0), r.base_name)
        if r.base_name is not None and r.base_shape is not None:
            base_done[key] = (r.base_shape, max(done, base_done.get(key, (None, 0))[1]))
        if not is_tied(r) and r.status != "removed":
            tuned_rows.append((r.shape, done))
    large = thresholds.large_matrix_numel
    return {"base": _side(list(base_done.values()), large), "tuned": _side(tuned_rows, large)}


def _share(side: dict) -> float | None:
    return side["large_share"] if side.get("large_share") is not None else side.get("share")


def too_little(cov: dict, thresholds: Thresholds) -> bool:
    """Too little compared to judge: on both sides, the compared share of the large
    matrices (of all parameters when a side has no large matrix) is below
    ``min_coverage``. One side well covered is enough: a slice of a model covers the
    slice, and a model grown from a base covers the base."""
    shares = [s for s in (_share(cov.get("base") or {}), _share(cov.get("tuned") or {})) if s is not None]
    return not shares or max(shares) < thresholds.min_coverage
