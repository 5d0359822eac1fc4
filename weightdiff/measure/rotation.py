"""A residual stream rotated: the base's weights seen through one orthogonal matrix of the hidden width.

QuaRot, SpinQuant and similar tools fold each RMSNorm's gains into the linears that read it and then
multiply the hidden (residual) dimension by an orthogonal matrix R: the token embedding E becomes E R, every
matrix that reads the residual stream (q, k, v, gate, up, the head) W diag(g) R, every matrix that writes it
(attention and MLP outputs) R^T W. The model computes what the base computes, yet every matrix moved (a
permutation of the hidden dimension is the special case R a permutation matrix): as stored, the weights read as
far from the base's as another model's. This module finds R and shows each base tensor in the rotated frame, so
that what changed beneath the rotation is measured (``comparison.rotated_residual``).

R is the orthogonal Procrustes solution (the U V^T of the SVD of sum A^T B) over the pairs whose form has no
unknown gain: the embedding's rows and the output matrices' columns. It is fitted on the embedding and half the
blocks and must hold, unchanged, on the other half (held out); only then is it taken, refitted on them all.
Values are float64 where the stored format needs it, else float32 (exact for F32, F16 and BF16 values), and
each matrix is held whole: memory is bounded by the largest matrix, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..kernels.dtypes import DTYPES, decode

__all__ = ["OUT_KINDS", "IN_KINDS", "values", "procrustes", "Rotation", "apply", "RotatedSide", "rotated_cosine",
           "small_rotation"]

#: module kinds that write the residual stream (rows are hidden units): their tensor is R^T W
OUT_KINDS = ("attn.o", "mlp.down")
#: module kinds that read it (columns are hidden units): W diag(g) R, g a norm's gains folded in (or none)
IN_KINDS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "mlp.gate", "mlp.up", "lm_head", "embed", "embed.pos")

_ROWS = 4096                       # rows decoded at a time


def values(ck, name: str) -> np.ndarray:
    """The tensor ``name`` of ``ck`` decoded, 2-D (a vector as one column): float32 when that holds every
    stored value exactly (at most 24 bits of mantissa and float32's exponent range), else float64."""
    info = ck.tensors[name]
    shape = tuple(int(d) for d in info.shape)
    d = DTYPES[info.dtype]
    exact32 = d.kind == "float" and (d.mant_bits or 0) <= 23 and (d.emin or -126) >= -126
    raw = np.asarray(ck.read(name)).reshape(shape[0] if shape else 1, -1)
    out = np.empty(raw.shape, np.float32 if exact32 else np.float64)
    for lo in range(0, raw.shape[0], _ROWS):
        out[lo:lo + _ROWS] = decode(raw[lo:lo + _ROWS], info.dtype)
    return out if len(shape) >= 2 else out.reshape(-1, 1)


def procrustes(c: np.ndarray) -> np.ndarray:
    """The orthogonal R maximising trace(R^T C): U V^T of the SVD of C (C = sum A^T B for A R ~ B).

    >>> r = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0]
    >>> a = np.random.default_rng(1).normal(size=(20, 4))
    >>> bool(np.allclose(procrustes(a.T @ (a @ r)), r))
    True
    """
    u, _, vt = np.linalg.svd(np.asarray(c, np.float64))
    return u @ vt


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A^T B in float64, in row blocks (A, B: [n, d])."""
    out = np.zeros((a.shape[1], b.shape[1]))
    for lo in range(0, a.shape[0], _ROWS):
        out += a[lo:lo + _ROWS].astype(np.float64).T @ b[lo:lo + _ROWS].astype(np.float64)
    return out


@dataclass
class Rotation:
    """Sums for one Procrustes fit: add (base, tuned) pairs in their forms, then ``solve``."""

    d: int
    c: np.ndarray | None = None
    pairs: int = 0

    def add(self, kind: str, base: np.ndarray, tuned: np.ndarray) -> None:
        """``kind`` ``in``: tuned = base R (rows [n, d]); ``out``: tuned = R^T base ([d, n]: base^T R = tuned^T)."""
        part = _cross(base, tuned) if kind == "in" else _cross(base.T, tuned.T)
        self.c = part if self.c is None else self.c + part
        self.pairs += 1

    def solve(self) -> np.ndarray | None:
        return procrustes(self.c) if self.c is not None else None


def apply(kind: str, base: np.ndarray, r: np.ndarray | None, gain: np.ndarray | None = None) -> np.ndarray:
    """The base tensor in the rotated frame, float64: ``in`` (base diag(gain)) R, ``out`` R^T base (a bias,
    [d, 1], likewise); ``r`` None: no rotation (a norm's gains folded, nothing rotated); ``rows``: base diag-scaled
    row by row (``gain`` one factor per row), for units rescaled."""
    if kind == "rows":                  # each row the base's times its own factor (no rotation)
        return base.astype(np.float64) * gain.reshape(-1, *([1] * (base.ndim - 1)))
    if kind == "in":
        b = base.astype(np.float64) if gain is None else base.astype(np.float64) * gain[None, :]
        return b if r is None else b @ r
    return base.astype(np.float64) if r is None else r.T @ base.astype(np.float64)


def rotated_cosine(kind: str, base: np.ndarray, tuned: np.ndarray, r: np.ndarray,
                   gain: np.ndarray | None = None) -> float:
    """Cosine of the base tensor in the rotated frame with the tuned tensor (0 when either is zero)."""
    x, y = apply(kind, base, r, gain).ravel(), tuned.astype(np.float64).ravel()
    den = float(np.sqrt(x @ x) * np.sqrt(y @ y))
    return float(x @ y) / den if den else 0.0


class RotatedSide:
    """One base tensor in the tuned model's rotated frame (``apply``), as float64 values (dtype ``F64``), for
    ``compute.remeasure``: computed once, whole, when first read. ``order``: (axis, index), the base's rows
    (axis 0) or columns (1) gathered in that order first, for units reordered and rescaled."""

    def __init__(self, ck, name: str, source: str, kind: str, r: np.ndarray, gain: np.ndarray | None = None,
                 order: tuple[int, np.ndarray] | None = None):
        info = ck.tensors[source]
        self.path, self._ck, self._source, self._kind, self._r, self._gain = ck.path, ck, source, kind, r, gain
        self._order = order
        # the base's weights as the tuned model's writer saw them, up to the error of factors recovered from
        # the files (a norm's ratio rounded to its dtype, a fitted R): a quantizer's scales come back within an ulp
        self.reconstructed = True
        self._shape = tuple(int(d) for d in info.shape)
        self._whole: np.ndarray | None = None
        self.tensors = {name: replace(info, name=name, dtype="F64", start=None, end=None)}
        self.quant: dict = {}

    def _values(self) -> np.ndarray:
        if self._whole is None:
            base = values(self._ck, self._source)
            if self._order is not None:     # the base's units in the tuned model's order first
                base = np.take(base, np.asarray(self._order[1], np.int64), axis=self._order[0])
            got = apply(self._kind, base, self._r, self._gain)
            self._whole = np.ascontiguousarray(got.reshape(-1))
            self._whole.flags.writeable = False
        return self._whole

    def windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None):
        flat = self._values()
        stop = flat.size if stop is None else min(int(stop), flat.size)
        step = max(1, int(max_elements or flat.size or 1))
        for pos in range(int(start), stop, step):
            yield flat[pos:min(pos + step, stop)]

    def read(self, name: str) -> np.ndarray:
        return self._values().reshape(self._shape)

    def read_rows(self, name: str, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.read(name).reshape(self._shape[0], -1)[rows].reshape((len(rows),) + self._shape[1:])

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0, stop: int | None = None,
                      noise: bool = False):
        return None                 # float64 values: no quantization floor


def small_rotation(r: np.ndarray) -> bool:
    """Whether ``r`` is the identity within fitting noise (no rotation: a fine-tune whose embedding was
    replaced fits R = I on its output matrices)."""
    return float(np.linalg.norm(r - np.eye(r.shape[0]))) <= 0.05 * math.sqrt(r.shape[0])
