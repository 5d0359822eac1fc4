"""Base parameters an exporter folded into a computed constant, told apart from removed ones.

torch's dynamo exporter, given no ``dynamic_shapes``, computes what the fixed input shape makes constant
and stores the result: BERT's and GPT-2's position embeddings gathered with constant position ids
become a ``[1, seq, hidden]`` initializer (``embedding_2``) and the parameter itself leaves the file.
The ONNX reader sets such values apart (``Checkpoint.folded``: name, shape, and the parameters each was
computed from when the file says so). A base tensor with no tuned counterpart that one of them names
(or, when the file does not say, that one of them may hold) is not a plain removal: ``fold_of`` reads
the constant and the base tensor and looks for the constant's values as a run of the base's rows,
bitwise (the position rows of the fixed sequence length). The judge reads a run of folds as inconclusive
(the rows not held are not in the export), never as a confident structural change.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fold_of", "FOLD_READ_MAX"]

#: elements of a base tensor read whole to find a folded constant's rows in it, at most
FOLD_READ_MAX = 1 << 24


def fold_of(tuned, base, bname: str, shown: str, info) -> dict | None:
    """{into, rows, known} when the tuned model's folded constants may hold base tensor ``bname``
    (``shown``: its name in the tuned namespace), else None. ``known``: the file names the parameter
    among the constant's sources; ``rows``: [first, end) of the base rows the constant holds bitwise."""
    folded = getattr(tuned, "folded", None) or []
    named = [f for f in folded if f.get("params") and shown in f["params"]]
    cands, known = (named, True) if named else ([f for f in folded if f.get("params") is None], False)
    if not cands:
        return None
    for f in cands:
        rows = _rows_held(tuned, f, base, bname, info)
        if rows is not None:
            return {"into": f["name"], "rows": rows, "known": known}
    if not known:
        return {"into": cands[0]["name"], "rows": None, "known": False}
    return {"into": cands[0]["name"], "rows": None, "known": True}


def _rows_held(tuned, f: dict, base, bname: str, info) -> list[int] | None:
    """[r0, r0 + k) when the folded constant ``f`` is rows r0..r0+k of the base tensor, bitwise."""
    shape = tuple(int(d) for d in info.shape)
    if not shape or f.get("dtype") != info.dtype or math.prod(shape) > FOLD_READ_MAX:
        return None
    row = math.prod(shape[1:])
    size = math.prod(f["shape"])
    if row == 0 or size == 0 or size % row or size // row > shape[0]:
        return None
    try:
        c = np.ascontiguousarray(tuned.read_stored(f["name"])).reshape(-1, row)
        b = np.ascontiguousarray(base.read(bname)).reshape(shape[0], row)
    except (KeyError, ValueError, OSError):
        return None
    cb, bb = c.view(np.uint8).reshape(c.shape[0], -1), b.view(np.uint8).reshape(shape[0], -1)
    k = cb.shape[0]
    for r0 in np.flatnonzero((bb == cb[0]).all(axis=1)):
        r0 = int(r0)
        if r0 + k <= shape[0] and np.array_equal(bb[r0:r0 + k], cb):
            return [r0, r0 + k]
    return None
