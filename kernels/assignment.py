"""Linear assignment: the minimum-cost one-to-one matching of rows to columns.

``linear_assignment(cost)`` solves ``min sum_i cost[i, col[i]]`` over injective maps
``col`` from the n rows to the m >= n columns, exactly, by shortest augmenting paths
with row and column potentials (the Hungarian method in the O(n^2 m) form of
Jonker-Volgenant / Kuhn-Munkres; no scipy). weightdiff uses it to match the hidden
neurons of one MLP to those of another (weightdiff.measure.permutation).

Worked example: rows 0 and 1 both prefer column 0, but row 1 loses less by taking
column 1, so the optimum is 1 + 3 = 4 (not 2 + ... or 1 + 5):

>>> import numpy as np
>>> linear_assignment(np.array([[1.0, 2.0], [2.0, 3.0]])).tolist()
[0, 1]
>>> linear_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])).tolist()
[1, 0, 2]
"""

from __future__ import annotations

import numba
import numpy as np

from .numba_cache import ensure as _ensure_numba_cache

_ensure_numba_cache()     # before the first cache=True decorator: numba places its cache when it decorates

__all__ = ["linear_assignment", "assignment_cost", "precompile"]


@numba.njit(cache=True, nogil=True)
def _hungarian(cost: np.ndarray) -> np.ndarray:
    """Shortest-augmenting-path Hungarian method on a finite n x m cost matrix, n <= m.

    u (rows) and v (columns) are dual potentials with cost[i, j] - u[i] - v[j] >= 0;
    each row is added by a Dijkstra-like search over reduced costs, then the path
    is augmented. Index 0 of the 1-based arrays is the virtual start column.
    """
    n, m = cost.shape
    inf = np.inf
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)      # p[j] = row (1-based) matched to column j, 0 if none
    way = np.zeros(m + 1, dtype=np.int64)
    minv = np.empty(m + 1)
    used = np.zeros(m + 1, dtype=np.bool_)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv[:] = inf
        used[:] = False
        while True:
            used[j0] = True
            i0 = p[j0]
            delta = inf
            j1 = -1
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j] = cur
                        way[j] = j0
                    if minv[j] < delta:
                        delta = minv[j]
                        j1 = j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:          # augment along the alternating path back to column 0
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    col = np.full(n, -1, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j] != 0:
            col[p[j] - 1] = j - 1
    return col


def linear_assignment(cost: np.ndarray, maximize: bool = False) -> np.ndarray:
    """Column index for each row of the optimal one-to-one assignment.

    ``cost`` is n x m with n <= m (transpose it otherwise); NaN and Inf are not
    allowed. With ``maximize=True`` the total is maximized (a similarity matrix).
    Returns int64[n], all distinct. Exact; O(n^2 m) time, O(n + m) extra memory.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a matrix (got {c.ndim} dimensions)")
    n, m = c.shape
    if n > m:
        raise ValueError(f"cost has more rows than columns ({n} > {m}); pass its transpose")
    if not np.isfinite(c).all():
        raise ValueError("cost has NaN or Inf entries")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if maximize:
        c = -c
    # shift so the smallest entry is 0: same optimum, smaller potentials
    c = np.ascontiguousarray(c - c.min())
    return _hungarian(c)


def assignment_cost(cost: np.ndarray, col: np.ndarray) -> float:
    """Total ``sum_i cost[i, col[i]]`` of an assignment (float64)."""
    c = np.asarray(cost, dtype=np.float64)
    return float(c[np.arange(len(col)), col].sum())


def precompile() -> None:
    """Compile, or load from numba's cache, the kernel ``linear_assignment`` calls (its one argument type: a
    C-contiguous float64 matrix); see ``kernels.cpu.precompile``."""
    linear_assignment(np.zeros((2, 2)))
