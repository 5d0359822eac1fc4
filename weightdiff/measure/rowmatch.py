"""Match every row of a token table to the base row it came from, after training moved them all.

``permutation.rows_reordered`` recognises a table whose rows are the base's in another order or a
subset of them (a tokenizer's ids remapped, a vocabulary trimmed) and gives the exact order only when
every row is bitwise a base row. Once the model is trained after the remapping no row is bitwise a base
row, and the table would be compared row i against base row i, another token's. Unlike that bitwise
test, ``match_rows`` finds each tuned row's nearest base row by cosine over the whole table and accepts
the order only where every match is unambiguous, so that ``measure.compute.GatheredSide`` can measure
the table against the rows it holds.

The search is bounded in memory and cheap: both tables are sketched to ``SKETCH_DIMS`` dimensions by one
seeded Gaussian projection (read ``BLOCK`` rows at a time, as float32), the ``CANDIDATES`` best base rows
of each tuned row are found on the sketches (a product of at most ``SIM_ELEMENTS`` similarities at a
time), and only those candidates are verified on the full rows. A projection keeps distances to within a
small factor (Johnson-Lindenstrauss), so a base row as close to a tuned row as its match is among its
candidates: the runner-up the margin test needs is among them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RowMatch", "RowTable", "as_table", "match_rows", "SKETCH_DIMS", "CANDIDATES", "MARGIN"]

#: dimensions of the random projection the candidate search runs on
SKETCH_DIMS = 64
#: base rows kept per tuned row by the sketch search, then verified on the full rows
CANDIDATES = 3
#: a match is accepted when its distance (unit rows) is at most this share of the runner-up's
MARGIN = 0.5
#: rows read and converted to float32 at a time (a 4,096-wide block: 32 MB)
BLOCK = 2048
#: similarities of the sketch search held at a time (float32: 32 MB)
SIM_ELEMENTS = 1 << 23


class RowTable:
    """A 2-D table [rows, cols] read by rows, never whole: what ``match_rows`` and ``permutation.rows_reordered``
    index. A slice or an index array gives those rows as an array (``fetch`` of their indices), so a 32,000-token
    embedding is read ``BLOCK`` rows at a time rather than held (256 MB a side in bf16, 2 GB as float64 at Llama 3's
    128,256 x 4,096). ``dtype`` is the numpy dtype ``fetch`` returns (the stored one, or float32 when the rows come
    decoded).

    >>> t = RowTable((5, 2), lambda i: np.stack([i, -i], axis=1).astype(np.float32), np.float32)
    >>> t[1:3].tolist(), t[np.array([4, 0])].tolist(), len(t)
    ([[1.0, -1.0], [2.0, -2.0]], [[4.0, -4.0], [0.0, 0.0]], 5)
    """

    ndim = 2

    def __init__(self, shape, fetch, dtype):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._fetch = fetch

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            idx = np.arange(*key.indices(self.shape[0]), dtype=np.int64)
        else:
            idx = np.asarray(key, np.int64).reshape(-1)
            if idx.size and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
                raise IndexError(f"row index out of range for a table of {self.shape[0]} rows")
            idx = np.where(idx < 0, idx + self.shape[0], idx)
        return np.asarray(self._fetch(idx)).reshape(len(idx), self.shape[1])

    @classmethod
    def stored(cls, ck, name: str, rows: int | None = None) -> "RowTable":
        """Tensor ``name`` of checkpoint ``ck`` (2-D) in its stored dtype, read by ``ck.read_rows``; its first
        ``rows`` rows only when given. A checkpoint streamed from the Hub is read whole once instead: the cosine
        match gathers thousands of scattered rows at a time, one HTTP range each, where one download of the table
        is a single request (its memory is what a download's page cache would be)."""
        info = ck.tensors[name]
        n, cols = int(info.shape[0]), int(np.prod(info.shape[1:], dtype=np.int64))
        n = n if rows is None else min(n, int(rows))
        if getattr(ck, "streamed", False):
            whole = np.asarray(ck.read(name)).reshape(int(info.shape[0]), cols)[:n]
            return cls((n, cols), lambda idx: whole[idx], whole.dtype)
        first = np.asarray(ck.read_rows(name, np.zeros(0, np.int64)))
        return cls((n, cols), lambda idx: ck.read_rows(name, idx), first.dtype)


def as_table(x):
    """``x`` as ``match_rows`` reads it: a ``RowTable`` as it is, anything else as an array."""
    return x if isinstance(x, RowTable) else np.asarray(x)


@dataclass(frozen=True)
class RowMatch:
    """The answer of ``match_rows``: ``order`` (tuned row i is base row ``order[i]``) when every row
    matched unambiguously and no base row twice, else None; ``matched`` of ``rows`` tuned rows
    matched, ``worst_cosine`` the lowest cosine of a matched row with its base row (None with none),
    ``why``: what stopped the order ("" when found)."""

    order: np.ndarray | None
    matched: int
    rows: int
    worst_cosine: float | None
    why: str


def _float_block(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as float32, NaN/Inf set to 0 (they have no direction to match)."""
    from .permutation import _as_float32

    raw = np.ascontiguousarray(raw)
    x = _as_float32(raw, dtype)
    if np.may_share_memory(x, raw) or not x.flags.writeable:      # F32: a view of the (read-only) file
        x = np.array(x, np.float32)
    if not np.isfinite(x).all():
        x[~np.isfinite(x)] = 0
    return x


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit length in place, whether each row was nonzero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    live = norms > 0
    x /= np.where(live, norms, np.float32(1))[:, None]
    return x, live


def _sketch(table: np.ndarray, dtype: str, proj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit sketches [rows, k] float32, whether each row is nonzero), ``BLOCK`` rows at a time. A row's
    sketch is scaled after the projection, which is the sketch of the unit row scaled."""
    n = len(table)
    out = np.empty((n, proj.shape[1]), np.float32)
    live = np.empty(n, bool)
    for lo in range(0, n, BLOCK):
        x = _float_block(table[lo:lo + BLOCK], dtype)
        live[lo:lo + len(x)] = np.any(x != 0, axis=1)
        out[lo:lo + len(x)] = _unit(x @ proj)[0]
    return out, live


def match_rows(tuned: np.ndarray, base: np.ndarray, dtype_tuned: str, dtype_base: str, *,
               min_cosine: float = 0.5, margin: float = MARGIN, seed: int = 0) -> RowMatch:
    """Each tuned row's base row by cosine, for a table [rows, hidden] whose rows are base rows in
    another order (or a subset), then trained. ``tuned`` and ``base`` are 2-D arrays or ``RowTable``s
    (read ``BLOCK`` rows at a time). A tuned row is matched to its nearest base row
    when their cosine is at least ``min_cosine`` and the distance between the two unit rows is at most
    ``margin`` times the distance to the next nearest base row; the order is given only when every
    tuned row is matched so, no base row twice (a row of zeros has no direction: it stops the order).

    >>> rng = np.random.default_rng(0); b = rng.standard_normal((50, 16)).astype(np.float32)
    >>> t = b[::-1][:30] + 0.01 * rng.standard_normal((30, 16)).astype(np.float32)
    >>> m = match_rows(t, b, "F32", "F32"); m.order[:3].tolist(), m.matched
    ([49, 48, 47], 30)
    """
    tuned, base = as_table(tuned), as_table(base)
    n, nb = len(tuned), len(base)
    if tuned.ndim != 2 or base.ndim != 2 or tuned.shape[1] != base.shape[1] or not n or nb < 2:
        return RowMatch(None, 0, n, None, "the tables' shapes do not allow a row match")
    width = tuned.shape[1]
    k = min(SKETCH_DIMS, width)
    proj = np.random.default_rng([seed, width]).standard_normal((width, k)).astype(np.float32)
    st, live_t = _sketch(tuned, dtype_tuned, proj)
    sb, live_b = _sketch(base, dtype_base, proj)
    c = min(CANDIDATES, nb)
    cand = np.empty((n, c), np.int64)
    step = max(1, SIM_ELEMENTS // nb)
    dead = np.flatnonzero(~live_b)
    for lo in range(0, n, step):
        sim = st[lo:lo + step] @ sb.T
        sim[:, dead] = -np.inf                      # a zero base row is nobody's match
        rows = np.arange(len(sim))
        for j in range(c):                          # c argmax passes: far cheaper than a partition
            at = np.argmax(sim, axis=1)
            cand[lo + rows, j] = at
            if j + 1 < c:
                sim[rows, at] = -np.inf
    # verify on the full unit rows: the cosine with each candidate, and the distance of the unit rows
    best = np.full(n, -1, np.int64)
    d1 = np.full(n, np.inf)
    d2 = np.full(n, np.inf)
    vstep = max(1, BLOCK // c)
    for lo in range(0, n, vstep):
        t = _unit(_float_block(tuned[lo:lo + vstep], dtype_tuned))[0]
        ids = cand[lo:lo + len(t)]
        uniq, inv = np.unique(ids, return_inverse=True)
        b = _unit(_float_block(base[uniq], dtype_base))[0]
        cos_c = np.einsum("ijk,ik->ij", b[inv.reshape(ids.shape)], t).astype(np.float64)
        d = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos_c))       # distance of the unit rows
        d[~live_b[ids]] = np.inf
        order = np.argsort(d, axis=1, kind="stable")
        rows = np.arange(len(t))
        best[lo:lo + len(t)] = ids[rows, order[:, 0]]
        d1[lo:lo + len(t)] = d[rows, order[:, 0]]
        if c > 1:
            d2[lo:lo + len(t)] = d[rows, order[:, 1]]
    cos = 1.0 - d1 * d1 / 2.0
    ok = live_t & np.isfinite(d1) & (cos >= min_cosine) & (d1 <= margin * d2)
    # base rows stored bitwise alike (reserved tokens initialised to one vector, padding rows of zeros) are one
    # row for the measure: a tuned row between two of them is not ambiguous, whichever it is compared with
    tie = ~ok & live_t & np.isfinite(d1) & (cos >= min_cosine)
    zero_b = np.flatnonzero(~live_b)
    group = _row_groups(base, dtype_base) if tie.any() or zero_b.size or len(np.unique(best)) < n else \
        np.arange(nb)
    if tie.any():
        idx = np.flatnonzero(tie)
        d2[idx] = _runner_up_outside(tuned, base, dtype_tuned, dtype_base, idx, cand[idx], best[idx], group)
        ok = ok | (tie & (d1 <= margin * d2))
    # a tuned row of zeros is a base row of zeros, when the base has them (any one: they are alike)
    if zero_b.size:
        zt = np.flatnonzero(~live_t)
        if zt.size:
            best[zt], cos[zt] = zero_b[0], 1.0
            ok[zt] = True
    matched = int(ok.sum())
    worst = float(cos[ok].min()) if matched else None
    if matched < n:
        zeros = int(np.count_nonzero(~live_t))
        why = (f"{n - matched} of {n} rows have no unambiguous base row"
               + (f" ({zeros} of them all zero)" if zeros else ""))
        return RowMatch(None, matched, n, worst, why)
    best = _spread(best, group)
    if best is None:
        return RowMatch(None, matched, n, worst, "some base rows are the nearest of several tuned rows")
    return RowMatch(best, matched, n, worst, "")


def _row_groups(base: np.ndarray, dtype: str) -> np.ndarray:
    """A group id per base row: rows whose stored bytes are equal share one (the first row's index), and
    rows of zeros (either sign) one more; read ``BLOCK`` rows at a time."""
    seen: dict[bytes, int] = {}
    out = np.empty(len(base), np.int64)
    for lo in range(0, len(base), BLOCK):
        blk = np.ascontiguousarray(base[lo:lo + BLOCK])
        zero = ~np.any(_float_block(blk, dtype) != 0, axis=1)
        raw = blk.view(np.uint8).reshape(len(blk), -1)
        for i in range(len(blk)):
            key = b"0" if zero[i] else raw[i].tobytes()
            out[lo + i] = seen.setdefault(key, lo + i)
    return out


def _runner_up_outside(tuned, base, dtype_tuned, dtype_base, idx: np.ndarray, cand: np.ndarray, best: np.ndarray,
                       group: np.ndarray) -> np.ndarray:
    """The distance from each tuned row ``idx[i]`` (tied with a row alike its match) to its nearest candidate
    outside its match's group of alike base rows; inf when every candidate is in that group."""
    out = np.full(len(idx), np.inf)
    for lo in range(0, len(idx), BLOCK):
        sel = idx[lo:lo + BLOCK]
        t = _unit(_float_block(tuned[sel], dtype_tuned))[0]
        ids = cand[lo:lo + len(sel)]
        uniq, inv = np.unique(ids, return_inverse=True)
        b = _unit(_float_block(base[uniq], dtype_base))[0]
        cos_c = np.einsum("ijk,ik->ij", b[inv.reshape(ids.shape)], t).astype(np.float64)
        d = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos_c))
        d[group[ids] == group[best[lo:lo + len(sel)]][:, None]] = np.inf
        out[lo:lo + len(sel)] = d.min(axis=1)
    return out


def _spread(best: np.ndarray, group: np.ndarray) -> np.ndarray | None:
    """``best`` with the tuned rows matched into one group of alike base rows given its members in turn (in
    tuned order), so that no base row serves twice; None when a group has fewer members than rows matched
    into it, or a lone base row is the match of two tuned rows."""
    out = best.copy()
    g = group[best]
    members: dict[int, list[int]] = {}
    for j, gid in enumerate(group):
        members.setdefault(int(gid), []).append(j)
    taken: dict[int, int] = {}
    for i, gid in enumerate(g):
        k = taken.get(int(gid), 0)
        pool = members[int(gid)]
        if k >= len(pool):
            return None
        out[i] = pool[k]
        taken[int(gid)] = k + 1
    return out
