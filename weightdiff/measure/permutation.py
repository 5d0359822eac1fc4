"""Find and undo permuted MLP neurons between two checkpoints of the same shape.

Hidden units of an MLP can be reordered without changing what the model computes:
rows of the input projections (gate/up, fc1, c_fc columns, ...) and the matching
columns of the output projection (down, fc2, ...) permuted together. Weight-space
comparison is fooled by that: a fine-tune whose neurons were shuffled looks
unrelated to its base. This module recognises the MLP of each block from tensor
names, matches the tuned model's neurons to the base's by cosine similarity of
their concatenated weight vectors with an exact assignment solver
(weightdiff.kernels.assignment), and hands back the permutation so comparisons can
undo it.

Small MLPs (n <= ``exact_max`` neurons) are matched on the full n x n cosine matrix.
Large ones are matched on seeded random projections of the neuron vectors
(``proj_dims`` dimensions, Johnson-Lindenstrauss): mutual nearest neighbours are
taken as matched and only the rest go through the exact solver. Either way the
matched cosines are then measured on the full vectors, and a permutation is
accepted only when it clearly improves on the identity and matched neurons agree
(mean cosine >= ``min_cosine``): two unrelated models never get "aligned".

Each member matrix counts up to its sign: a neuron's similarity is the sum over the member matrices of the
absolute value of their dot products (the cosine likewise). A gated MLP computes the same with a neuron's up
row and down column negated (or scaled by c and 1/c), and tools that reparametrise a model do that to neurons
they also reorder; with the vectors concatenated, such a neuron's gate, up and down summed to a cosine of -1/3
and it matched nothing. Whether the signs and scales found change what the model computes is decided after
the order is undone (``comparison.rescaled_units``), not here.

A fused ``gate_up_proj`` (Phi-3: the gate's rows, then the up projection's) is one member whose
neuron axis holds two stacked parts (role ``in:2``): each neuron's vector is its gate row and its up
row side by side, and a reordering moves both halves alike (``undo_member``). Attention heads are
matched by ``heads_permuted`` (separate q/k/v/o, or a fused qkv split by ``fused_qkv_views``).

What this cannot see: a permuted residual stream (hidden size), neurons split or merged.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..kernels import assignment
from ..kernels.dtypes import decode
from . import precompile

__all__ = ["MlpGroup", "Finding", "mlp_groups", "match_neurons", "find_permutation", "RowsOf", "fused_qkv_sources",
           "detect_permutations", "undo", "neuron_vectors", "heads_permuted", "experts_permuted", "rows_follow",
           "members_follow", "members_follow_stored", "member_sources", "keep_matched", "HEAD_DIMS", "parts_of",
           "member_vectors", "undo_member", "fused_qkv_views"]

# (regex with the group prefix as group 1, neuron axis, role); role "in" feeds the neurons,
# "out" reads them; "bias" is permuted but not used for matching; ":2" after a role: the neuron
# axis holds two stacked parts of n each (a fused gate_up), reordered alike.
_SPECS: tuple[tuple[str, int, str], ...] = (
    (r"^(.*\.mlp)\.(?:gate_proj|up_proj|fc1|dense_h_to_4h|w1|w3)\.weight$", 0, "in"),
    (r"^(.*\.mlp)\.(?:gate_proj|up_proj|fc1|dense_h_to_4h|w1|w3|c_fc)\.bias$", 0, "bias"),
    (r"^(.*\.mlp)\.(?:down_proj|fc2|dense_4h_to_h|w2)\.weight$", 1, "out"),
    (r"^(.*\.mlp)\.gate_up_proj\.weight$", 0, "in:2"),   # Phi-3: [gate; up] stacked, [2n, hidden]
    (r"^(.*\.mlp)\.gate_up_proj\.bias$", 0, "bias:2"),
    (r"^(.*\.mlp)\.c_fc\.weight$", 1, "in"),           # GPT-2 Conv1D: [hidden, n]
    (r"^(.*\.mlp)\.c_proj\.weight$", 0, "out"),        # GPT-2 Conv1D: [n, hidden]
    (r"^(.*\.experts\.\d+)\.(?:w1|w3|gate_proj|up_proj)\.weight$", 0, "in"),   # Mixtral-style experts
    (r"^(.*\.experts\.\d+)\.(?:w2|down_proj)\.weight$", 1, "out"),
    (r"^(.*\.layer\.\d+)\.intermediate\.dense\.weight$", 0, "in"),           # BERT / ViT
    (r"^(.*\.layer\.\d+)\.intermediate\.dense\.bias$", 0, "bias"),
    (r"^(.*\.layer\.\d+)\.output\.dense\.weight$", 1, "out"),
    (r"^(.*\.DenseReluDense)\.(?:wi|wi_0|wi_1)\.weight$", 0, "in"),          # T5
    (r"^(.*\.DenseReluDense)\.wo\.weight$", 1, "out"),
    (r"^(.*)\.(?:fc1)\.weight$", 0, "in"),                                   # OPT: layers.N.fc1
    (r"^(.*)\.(?:fc1)\.bias$", 0, "bias"),
    (r"^(.*)\.(?:fc2)\.weight$", 1, "out"),
)
_COMPILED = tuple((re.compile(p), axis, role) for p, axis, role in _SPECS)


def linear_assignment(cost: np.ndarray, maximize: bool = False) -> np.ndarray:
    """``kernels.assignment.linear_assignment``, its kernel compiled in a child process on a first run
    (``measure.precompile``)."""
    precompile.ensure_keys([precompile.ASSIGNMENT])
    return assignment.linear_assignment(cost, maximize=maximize)


@dataclass
class MlpGroup:
    """The tensors of one MLP whose neuron axis moves together."""

    prefix: str
    members: list[tuple[str, int, str]] = field(default_factory=list)   # (tuned name, axis, role)
    neurons: int = 0


@dataclass
class Finding:
    """The best neuron matching of one MLP group; ``applied`` when it is a real permutation."""

    group: str
    neurons: int
    perm: np.ndarray            # tuned neuron i corresponds to base neuron perm[i]
    matched_cosine: float       # mean cosine of matched neuron vectors (full vectors)
    identity_cosine: float      # mean cosine of neuron i with neuron i
    method: str                 # "exact" | "projection"
    applied: bool
    members: list[tuple[str, int, str]] = field(default_factory=list)
    nonfinite: int = 0          # NaN/Inf values in the member matrices (both sides), left out of the search

    @property
    def moved(self) -> int:
        return int(np.count_nonzero(self.perm != np.arange(len(self.perm))))

    def to_dict(self) -> dict:
        return {"group": self.group, "neurons": self.neurons, "moved": self.moved,
                "moved_share": self.moved / self.neurons if self.neurons else 0.0,
                "matched_cosine": self.matched_cosine, "identity_cosine": self.identity_cosine,
                "method": self.method, "applied": self.applied,
                "tensors": [m[0] for m in self.members],
                **({"nonfinite": self.nonfinite} if self.nonfinite else {})}


def mlp_groups(shapes: Mapping[str, Sequence[int]]) -> list[MlpGroup]:
    """Group tensor names (name -> shape) into MLPs with one neuron count.

    A group needs at least one input and one output matrix whose neuron axes agree;
    anything else (a fused gate_up, odd shapes) is left alone.

    >>> g = mlp_groups({"m.layers.0.mlp.up_proj.weight": (8, 4), "m.layers.0.mlp.down_proj.weight": (4, 8)})
    >>> g[0].prefix, g[0].neurons, [m[1] for m in g[0].members]
    ('m.layers.0.mlp', 8, [1, 0])
    """
    found: dict[str, MlpGroup] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        for rx, axis, role in _COMPILED:
            m = rx.match(name)
            if m is None:
                continue
            if role.startswith("bias") != (len(shape) == 1) or axis >= len(shape) \
                    or shape[axis] % parts_of(role):
                break
            found.setdefault(m.group(1), MlpGroup(m.group(1))).members.append((name, axis, role))
            break
    groups = []
    for prefix in sorted(found):
        g = found[prefix]
        sizes = {shapes[n][a] // parts_of(r) for n, a, r in g.members}
        roles = {r.split(":")[0] for _, _, r in g.members}
        if len(sizes) == 1 and {"in", "out"} <= roles:
            g.neurons = sizes.pop()
            groups.append(g)
    return groups


def neuron_vectors(x: np.ndarray, axis: int) -> np.ndarray:
    """The weights of each neuron as rows: ``x`` with ``axis`` moved first, flattened after."""
    return np.moveaxis(np.asarray(x), axis, 0).reshape(x.shape[axis], -1)


def parts_of(role: str) -> int:
    """How many stacked parts a member's neuron axis holds (``in:2``: a fused gate_up), 1 for most."""
    return int(role.rsplit(":", 1)[1]) if ":" in role else 1


def member_vectors(x: np.ndarray, axis: int, role: str = "in") -> np.ndarray:
    """``neuron_vectors`` of one member: a fused member's parts side by side, one row per neuron.

    >>> member_vectors(np.arange(8).reshape(4, 2), 0, "in:2").tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
    """
    p = parts_of(role)
    if p == 1:
        return neuron_vectors(x, axis)
    return np.concatenate([neuron_vectors(c, axis) for c in np.split(np.asarray(x), p, axis=axis)], axis=1)


def undo_member(x: np.ndarray, perm: np.ndarray, axis: int, role: str = "in") -> np.ndarray:
    """``undo`` for one member: each stacked part of a fused member reordered alike.

    >>> undo_member(np.array([10, 20, 30, 40]), np.array([1, 0]), 0, "in:2").tolist()
    [20, 10, 40, 30]
    """
    p = parts_of(role)
    if p == 1:
        return undo(x, perm, axis)
    return np.concatenate([undo(c, perm, axis) for c in np.split(np.asarray(x), p, axis=axis)], axis=axis)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))
    return v / np.where(norms > 0, norms, 1.0)[:, None]


#: at most this many neurons left unmatched by the mutual nearest neighbours are matched greedily (their
#: similarity matrix is float64 [rest, rest]: 128 MB at 4,096)
GREEDY_MAX = 4096


def match_neurons(sim: np.ndarray | None = None, *, sig_tuned: np.ndarray | None = None,
                  sig_base: np.ndarray | None = None, exact_max: int = 2048,
                  chunk: int | None = None) -> tuple[np.ndarray, str]:
    """Best one-to-one matching of tuned neurons (rows) to base neurons.

    Either ``sim`` (n x n similarities, solved exactly) or two signature matrices
    (n x k each, one row per neuron, compared by cosine; or two lists of them, one per member matrix,
    compared by the sum of each member's absolute cosine). With signatures, mutual
    nearest neighbours are matched directly and only the remaining neurons are
    solved exactly (greedily when more than ``exact_max`` remain), ``chunk`` rows at a time (each member's
    similarities of a chunk are float64 [chunk, n]; by default as many rows as ``rotation.BLOCK_BYTES`` holds:
    1,024 rows were 235 MB a member at 28,672 neurons, several of them alive at once).
    Returns (perm, method) with tuned neuron i -> base neuron perm[i].
    """
    if sim is not None:
        return linear_assignment(sim, maximize=True), "exact"
    many = isinstance(sig_tuned, (list, tuple))
    st = [_unit_rows(np.asarray(x, np.float64)) for x in (sig_tuned if many else [sig_tuned])]
    sb = [_unit_rows(np.asarray(x, np.float64)) for x in (sig_base if many else [sig_base])]

    def sims(a: list, b: list, lo: int, hi: int) -> np.ndarray:
        # one member: the cosine of the signatures; several: the sum of each member's absolute cosine (a
        # neuron's up row and down column negated together match as they stand)
        if len(a) == 1:
            return a[0][lo:hi] @ b[0].T
        return sum(np.abs(x[lo:hi] @ y.T) for x, y in zip(a, b))

    n = st[0].shape[0]
    if chunk is None:
        chunk = _step(n)
    if n <= exact_max:
        return linear_assignment(sims(st, sb, 0, n), maximize=True), "exact"
    best_b = np.empty(n, dtype=np.int64)
    best_t = np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        best_b[lo:lo + chunk] = np.argmax(sims(st, sb, lo, lo + chunk), axis=1)
        best_t[lo:lo + chunk] = np.argmax(sims(sb, st, lo, lo + chunk), axis=1)
    perm = np.full(n, -1, dtype=np.int64)
    mutual = best_t[best_b] == np.arange(n)
    perm[mutual] = best_b[mutual]
    rest_t = np.flatnonzero(~mutual)
    if rest_t.size:
        taken = np.zeros(n, dtype=bool)
        taken[perm[mutual]] = True
        rest_b = np.flatnonzero(~taken)
        if rest_t.size > GREEDY_MAX:
            # most neurons match nothing (the MLPs are not one another's): no reordering to find, and the similarities
            # of the rest would be rest^2 float64 (1.6 GB at 14,336): they keep their order
            perm[rest_t] = rest_b
            return perm, "projection"
        sub = sims([x[rest_t] for x in st], [y[rest_b] for y in sb], 0, rest_t.size)
        if rest_t.size <= exact_max:
            perm[rest_t] = rest_b[linear_assignment(sub, maximize=True)]
        else:   # greedy by descending similarity: rare (the models barely agree), bounded work
            order = np.argsort(-sub, axis=None, kind="stable")
            used_t = np.zeros(rest_t.size, bool)
            used_b = np.zeros(rest_b.size, bool)
            for flat in order:
                i, j = divmod(int(flat), rest_b.size)
                if not used_t[i] and not used_b[j]:
                    used_t[i] = used_b[j] = True
                    perm[rest_t[i]] = rest_b[j]
    return perm, "projection"


def find_permutation(tuned: Sequence[tuple[np.ndarray, int]], base: Sequence[tuple[np.ndarray, int]], *,
                     exact_max: int = 2048, proj_dims: int = 64, seed: int = 0,
                     min_cosine: float = 0.5, group: str = "", roles: Sequence[str] | None = None) -> Finding:
    """Match the neurons of one MLP given its member matrices as float arrays.

    ``roles``: each member's role (``in:2`` for a fused gate_up, see ``parts_of``); plain by default.
    ``tuned`` and ``base`` list (array, neuron axis) in the same order. Read in row blocks as
    ``detect_permutations`` reads stored matrices (the same sums, the same answer).
    """
    roles = list(roles) if roles is not None else ["in"] * len(tuned)
    src_t = [_ArraySource(a, ax) for a, ax in tuned]
    src_b = [_ArraySource(a, ax) for a, ax in base]
    return _find(src_t, src_b, [0 if s.flat else ax for s, (_, ax) in zip(src_t, tuned)], exact_max=exact_max,
                 proj_dims=proj_dims, seed=seed, min_cosine=min_cosine, group=group, roles=roles)


class _ArraySource:
    """A member matrix held in memory, read as ``_StoredSource`` reads a stored one: 2-D rows, float64, in blocks.
    A member of more than two axes is seen with its neuron axis first, flattened after (``flat``: axis 0 then)."""

    def __init__(self, a: np.ndarray, axis: int):
        a = np.asarray(a)
        self.flat = a.ndim != 2
        self._a = a if not self.flat else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        self.rows, self.cols = self._a.shape
        self.shape = (self.rows, self.cols)

    def block(self, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
        x = self._a[np.asarray(index[r0:r1], np.int64)] if index is not None else self._a[r0:r1]
        return _f64(x)


class RowsOf:
    """Rows ``index`` of a member (a source or an array), as a source read in row blocks: the q, k or v rows of a
    fused qkv projection (``fused_qkv_sources``) without holding the projection whole.

    >>> a = np.arange(12.0).reshape(6, 2); s = RowsOf(a, [4, 0, 2])
    >>> s.shape, s.block(1, 3).tolist(), s.block(0, 2, np.array([2, 0])).tolist()
    ((3, 2), [[0.0, 1.0], [4.0, 5.0]], [[4.0, 5.0], [8.0, 9.0]])
    """

    flat = False

    def __init__(self, src, index):
        self.src = _source(src)
        self.index = np.asarray(index, np.int64)
        self.rows, self.cols = len(self.index), self.src.cols
        self.shape = (self.rows, self.cols)

    def block(self, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
        sel = self.index[r0:r1] if index is None else self.index[np.asarray(index[r0:r1], np.int64)]
        return self.src.block(0, len(sel), sel)


def fused_qkv_sources(qkv: tuple, o: tuple, head_dims: Sequence[int] | None = None) -> list[tuple[dict, tuple[int, ...]]]:
    """``fused_qkv_views`` of a fused projection given as sources (or arrays) [rows, hidden] and its output
    projection (sources or arrays; only their shapes are read here): each layout's q, k and v as ``RowsOf`` the
    rows it takes, read in row blocks by the heads check (a Falcon-40B qkv, 9,216 x 8,192, was decoded whole to
    float32 on each side: 600 MB)."""
    (qt, qb), (ot, ob) = qkv, o
    rows = int(qt.shape[0])
    if tuple(qt.shape) != tuple(qb.shape) or len(qt.shape) != 2 or len(ot.shape) != 2:
        return []
    pos = np.arange(rows, dtype=np.float64)[:, None]
    shape = tuple(int(d) for d in ot.shape)
    ghost = np.broadcast_to(np.float64(0.0), shape), np.broadcast_to(np.float64(0.0), tuple(int(d) for d in ob.shape))
    out = []
    for where, dims in fused_qkv_views((pos, pos), ghost, HEAD_DIMS if head_dims is None else head_dims):
        parts = {p: where[p][0][:, 0].astype(np.int64) for p in ("q", "k", "v")}
        out.append(({**{p: (RowsOf(qt, i), RowsOf(qb, i)) for p, i in parts.items()}, "o": o}, dims))
    return out


class _StoredSource:
    """A stored member matrix [rows, cols] read in row blocks (``rotation.rows_of``: rows ``r0:r1`` or the rows
    ``index[r0:r1]``, a gather), decoded to float64; never whole."""

    def __init__(self, ck, name: str):
        from .rotation import _dims

        self.ck, self.name, self.flat = ck, name, False
        self.rows, self.cols = _dims(ck, name)
        self.shape = (self.rows, self.cols)

    def block(self, r0: int, r1: int, index: np.ndarray | None = None) -> np.ndarray:
        from .rotation import rows_of

        if index is not None:
            return rows_of(self.ck, self.name, r0, r1, index)
        return rows_of(self.ck, self.name, r0, r1)


def _step(cols: int) -> int:
    from .rotation import block_rows

    return block_rows(cols)


def _clean(x: np.ndarray) -> tuple[np.ndarray, int]:
    """A float64 block with its NaN/Inf entries zeroed (``_finite``), and how many there were."""
    return _finite(x)


def _signatures(src, axis: int, parts: int, n: int, r: np.ndarray) -> tuple[np.ndarray, int]:
    """Each neuron's vector (its parts side by side, ``member_vectors``) times ``r`` [vector, k], float64 [n, k],
    read in row blocks; and the non-finite entries met (zeroed)."""
    out = np.zeros((n, r.shape[1]))
    r = np.asarray(r, np.float64)
    bad = 0
    if axis == 0:                        # neuron i of part k: row k * n + i, whole
        step = _step(src.cols)
        for k in range(parts):
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                x, b = _clean(src.block(k * n + lo, k * n + hi))
                bad += b
                out[lo:hi] += x @ r[k * src.cols:(k + 1) * src.cols]
    else:                                # neuron i of part k: column k * n + i, over every row
        step = _step(src.cols)
        for lo in range(0, src.rows, step):
            hi = min(src.rows, lo + step)
            x, b = _clean(src.block(lo, hi))
            bad += b
            for k in range(parts):
                out += x[:, k * n:(k + 1) * n].T @ r[k * src.rows + lo:k * src.rows + hi]
    return out, bad


def _similarities(st, sb, axis: int, parts: int, n: int) -> tuple[np.ndarray, int]:
    """The n x n dot products of every tuned neuron's vector with every base neuron's (one member, its parts side
    by side), in row blocks; and the non-finite entries met (zeroed)."""
    dots = np.zeros((n, n))
    bad = 0
    if axis == 0:
        step = _step(st.cols)
        for k in range(parts):
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                x, b = _clean(st.block(k * n + lo, k * n + hi))
                bad += b
                for lo2 in range(0, n, step):
                    hi2 = min(n, lo2 + step)
                    y, b = _clean(sb.block(k * n + lo2, k * n + hi2))
                    if lo == 0:
                        bad += b
                    dots[lo:hi, lo2:hi2] += x @ y.T
    else:
        step = _step(st.cols)
        for lo in range(0, st.rows, step):
            hi = min(st.rows, lo + step)
            (x, b1), (y, b2) = _clean(st.block(lo, hi)), _clean(sb.block(lo, hi))
            bad += b1 + b2
            for k in range(parts):
                dots += x[:, k * n:(k + 1) * n].T @ y[:, k * n:(k + 1) * n]
    return dots, bad


def _member_sums(st, sb, axis: int, parts: int, n: int, perm: np.ndarray) -> np.ndarray:
    """Per part and neuron of one member, in row blocks (the base's rows gathered in ``perm``'s order, never a
    whole matrix): [4, parts, n] of (tuned neuron i . base neuron perm[i], tuned i . base i, |tuned i|^2,
    |base i|^2), non-finite entries zeroed."""
    out = np.zeros((4, parts, n))
    perm = np.asarray(perm, np.int64)
    if axis == 0:
        step = _step(st.cols)
        for k in range(parts):
            gather = perm + k * n
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                x = _clean(st.block(k * n + lo, k * n + hi))[0]
                y = _clean(sb.block(k * n + lo, k * n + hi))[0]
                ym = _clean(sb.block(lo, hi, gather))[0]
                out[0, k, lo:hi] = np.einsum("ij,ij->i", x, ym)
                out[1, k, lo:hi] = np.einsum("ij,ij->i", x, y)
                out[2, k, lo:hi] = np.einsum("ij,ij->i", x, x)
                out[3, k, lo:hi] = np.einsum("ij,ij->i", y, y)
    else:
        step = _step(st.cols)
        for lo in range(0, st.rows, step):
            hi = min(st.rows, lo + step)
            x, y = _clean(st.block(lo, hi))[0], _clean(sb.block(lo, hi))[0]
            for k in range(parts):
                xk, yk = x[:, k * n:(k + 1) * n], y[:, k * n:(k + 1) * n]
                out[0, k] += np.einsum("ij,ij->j", xk, yk[:, perm])
                out[1, k] += np.einsum("ij,ij->j", xk, yk)
                out[2, k] += np.einsum("ij,ij->j", xk, xk)
                out[3, k] += np.einsum("ij,ij->j", yk, yk)
    return out


def _find(src_t: Sequence, src_b: Sequence, axes: Sequence[int], *, exact_max: int, proj_dims: int, seed: int,
          min_cosine: float, group: str, roles: Sequence[str] | None = None) -> Finding:
    """The matching of one MLP whose members are sources read in row blocks (``_ArraySource``,
    ``_StoredSource``): the signatures (or, for at most ``exact_max`` neurons, the n x n similarities) and the
    cosines summed block by block; memory is bounded by a block and by [n, proj_dims], never a whole matrix."""
    roles = list(roles) if roles is not None else ["in"] * len(axes)
    sim = None
    sig_t: list = []
    sig_b: list = []
    bad = 0
    n = None
    shortest = None                              # the shortest member's numbers per neuron (chance_cut)
    for k, (st, sb, ax, role) in enumerate(zip(src_t, src_b, axes, roles)):
        p = parts_of(role)
        n = (st.rows if ax == 0 else st.cols) // p
        each = (st.cols if ax == 0 else st.rows) * p
        shortest = each if shortest is None else min(shortest, each)
        if n <= exact_max:
            # each member up to its sign (see the module's docstring)
            dots, b = _similarities(st, sb, ax, p, n)
            bad += b
            part = np.abs(dots)
            sim = part if sim is None else sim + part
        else:
            length = (st.cols if ax == 0 else st.rows) * p
            rng = np.random.default_rng([seed, zlib.crc32(group.encode()), k])
            r = rng.standard_normal((length, proj_dims)).astype(np.float32)
            (a, bt), (c, bb) = _signatures(st, ax, p, n, r), _signatures(sb, ax, p, n, r)
            bad += bt + bb
            sig_t.append(a)
            sig_b.append(c)
    perm, method = match_neurons(sim, sig_tuned=sig_t or None, sig_base=sig_b or None, exact_max=exact_max)
    cos_m, cos_i, dead = _cosines(src_t, src_b, axes, roles, perm)
    min_cosine = chance_cut(int(n or 0), int(shortest or 0), min_cosine)
    # a neuron moves only where it matches (at least min_cosine, and better than where it stands): the
    # solver pairs every neuron, so a fine-tuned row whose match is no better than noise would move with
    # the real ones and the mean could still pass; neurons that matched no better stay where they stand
    # themselves, and a mean over the good moves would accept those too (a dead neuron, zero on both
    # sides, matches any other dead one)
    kept = keep_matched(perm, ((cos_m >= min_cosine) & (cos_m > cos_i + 1e-6)) | dead)
    if not np.array_equal(kept, perm):
        perm = kept
        cos_m = _cosines(src_t, src_b, axes, roles, perm)[0]
    matched, ident = float(cos_m.mean()), float(cos_i.mean())
    moved = bool(np.any(perm != np.arange(n)))
    applied = moved and matched >= min_cosine and matched > ident + 1e-6
    if not applied:
        perm = np.arange(n)
        matched = ident
    return Finding(group=group, neurons=int(n), perm=perm, matched_cosine=matched, identity_cosine=ident,
                   method=method, applied=applied, nonfinite=int(bad))


def chance_cut(n: int, length: int, min_cosine: float) -> float:
    """The least cosine a unit's match needs to be evidence of a reordering of ``n`` units, each compared as
    vectors of ``length`` numbers (each member up to its sign: the shortest member's): ``min_cosine``, raised to
    1.5 times what the best of ``2 n`` random candidates reaches by chance, sqrt(2 ln(2 n) / length), capped at
    0.95. Two independent models with an MLP 8 wide matched 199 of 200 neurons above 0.5 (the best of 200 random
    8-number vectors is near 0.8) and read "the base's MLP neurons in another order", its block shared; at real
    widths (4,096 numbers, 11,008 neurons: 0.07) the cut stays 0.5.

    >>> chance_cut(11008, 4096, 0.5), round(chance_cut(64, 64, 0.5), 3), chance_cut(200, 8, 0.5)
    (0.5, 0.584, 0.95)
    """
    if n < 2 or length < 1:
        return min_cosine
    return max(min_cosine, min(0.95, 1.5 * math.sqrt(2.0 * math.log(2.0 * n) / length)))


def keep_matched(perm: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``perm`` keeping the moves of the ``good`` units only: every other unit stays where it stands when
    its own place is free, and the rest take the places left, in order (a bijection still).

    >>> keep_matched(np.array([1, 0, 3, 2]), np.array([True, True, False, False])).tolist()
    [1, 0, 2, 3]
    >>> keep_matched(np.array([1, 2, 0]), np.array([True, False, False])).tolist()
    [1, 0, 2]
    """
    perm = np.asarray(perm, np.int64).copy()
    n = len(perm)
    keep = np.asarray(good, bool) | (perm == np.arange(n))
    free = np.ones(n, bool)
    free[perm[keep]] = False
    rest = np.flatnonzero(~keep)
    stay = rest[free[rest]]
    perm[stay] = stay
    free[stay] = False
    left = np.setdiff1d(rest, stay)
    perm[left] = np.flatnonzero(free)
    return perm


def _cosines(src_t, src_b, axes, roles, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine of tuned neuron i with base neuron perm[i], with base neuron i, whether both of the first
    pair are zero: a dead neuron, matched by any other) on the full vectors, each member up to its sign;
    summed in row blocks (``_member_sums``)."""
    n = len(perm)
    dot_m, dot_i, nt, nb = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for st, sb, ax, role in zip(src_t, src_b, axes, roles):
        sums = _member_sums(st, sb, ax, parts_of(role), n, perm)
        dot_m += np.abs(sums[0].sum(axis=0))
        dot_i += np.abs(sums[1].sum(axis=0))
        nt += sums[2].sum(axis=0)
        nb += sums[3].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_m = np.where((nt > 0) & (nb[perm] > 0), dot_m / np.sqrt(nt * nb[perm]), 0.0)
        cos_i = np.where((nt > 0) & (nb > 0), dot_i / np.sqrt(nt * nb), 0.0)
    return cos_m, cos_i, (nt == 0) & (nb[perm] == 0)


def _f64(x) -> np.ndarray:
    """``x`` as float64; a signaling NaN widens to NaN without numpy's "invalid value encountered in
    cast" warning (``_finite`` then leaves it out, as every NaN)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(x, dtype=np.float64)


def _finite(v: np.ndarray) -> tuple[np.ndarray, int]:
    """``v`` with its NaN/Inf entries set to 0 (a copy only when there are some), and how many there were.

    Non-finite weights are left out of the neuron similarities: one NaN would make a whole row of
    the cost matrix NaN and stop the assignment solver."""
    bad = ~np.isfinite(v)
    n = int(np.count_nonzero(bad))
    if n:
        v = np.where(bad, 0, v).astype(v.dtype, copy=False)
    return v, n


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32"):
        return np.asarray(raw, dtype=np.float32)
    return decode(raw, dtype).astype(np.float32)


def detect_permutations(base, tuned, name_map: Mapping[str, str], *, exact_max: int = 2048,
                        proj_dims: int = 64, seed: int = 0, min_cosine: float = 0.5) -> list[Finding]:
    """Look for permuted neurons in every MLP of ``tuned`` against ``base`` (two Checkpoints).

    ``name_map`` maps tuned tensor names to the base names they pair with; only MLPs
    whose member tensors all pair with the same shapes are examined. Returns one
    Finding per examined group (``applied`` False where the identity is best).
    """
    shapes = {}
    for tname, bname in name_map.items():
        ti, bi = tuned.tensors.get(tname), base.tensors.get(bname)
        if ti is not None and bi is not None and tuple(ti.shape) == tuple(bi.shape) \
                and ti.dtype not in ("C64", "F4", "F6_E2M3", "F6_E3M2"):
            shapes[tname] = tuple(ti.shape)
    findings = []
    for g in mlp_groups(shapes):
        mats = [(n, ax, role) for n, ax, role in g.members if not role.startswith("bias")]
        srcs_t, srcs_b = member_sources(tuned, base, [(n, name_map[n], ax) for n, ax, _ in mats])
        f = _find(srcs_t, srcs_b, [0 if s.flat else ax for s, (_, ax, _) in zip(srcs_t, mats)], exact_max=exact_max,
                  proj_dims=proj_dims, seed=seed, min_cosine=min_cosine, group=g.prefix, roles=[r for _, _, r in mats])
        f.members = list(g.members)
        findings.append(f)
    return findings


def member_sources(tuned, base, members: Sequence[tuple[str, str, int]]) -> tuple[list, list]:
    """Sources (tuned, base) for member matrices (tuned name, base name, neuron axis) of two Checkpoints: read in
    row blocks from the stored tensors (2-D ones; a member of more axes, rare, is decoded whole)."""
    out_t, out_b = [], []
    for tname, bname, ax in members:
        if len(tuned.tensors[tname].shape) == 2 and len(base.tensors[bname].shape) == 2:
            out_t.append(_StoredSource(tuned, tname))
            out_b.append(_StoredSource(base, bname))
        else:
            for ck, name, out in ((tuned, tname, out_t), (base, bname, out_b)):
                info = ck.tensors[name]
                out.append(_ArraySource(_as_float32(np.asarray(ck.read(name)).reshape(tuple(info.shape)),
                                                    info.dtype), ax))
    return out_t, out_b


def undo(x: np.ndarray, perm: np.ndarray, axis: int) -> np.ndarray:
    """Reorder ``x`` along ``axis`` so tuned neuron i lands at base position perm[i].

    Works on raw stored values (no decoding needed).

    >>> undo(np.array([10, 20, 30]), np.array([2, 0, 1]), 0).tolist()
    [20, 30, 10]
    """
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    return np.take(x, inverse, axis=axis)


def experts_permuted(experts: Mapping[int, Sequence[tuple[np.ndarray, np.ndarray]]],
                     min_cosine: float = 0.5) -> np.ndarray | None:
    """The order of a mixture-of-experts layer's experts when they are the base's in another order, else
    None: ``experts`` maps each expert index to its (tuned, base) matrices in one order; tuned expert i
    is matched to base expert ``perm[i]`` by the exact assignment of the cosines of their concatenated
    weights, accepted as ``heads_permuted`` accepts a reordering (the caller checks the router rows)."""
    ids = sorted(experts)
    if len(ids) < 2 or len({len(experts[i]) for i in ids}) != 1:
        return None
    pairs = [[(_source(t), _source(b)) for t, b in experts[i]] for i in ids]
    if all(len({(p[m][0].shape, p[m][1].shape) for p in pairs}) == 1 for m in range(len(pairs[0]))):
        # each member in row blocks, every expert's block of it at once (a block budget shared by 2 x experts):
        # a Mixtral-sized layer's experts stacked whole in float64 were 11 GB a side
        from .rotation import BLOCK_BYTES, block_rows

        e = len(ids)
        dots, nt, nb = np.zeros((e, e)), np.zeros(e), np.zeros(e)
        for m in range(len(pairs[0])):
            rows, cols = pairs[0][m][0].shape
            step = block_rows(cols, max(1, BLOCK_BYTES // (2 * e)))
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                x = np.stack([_clean(p[m][0].block(lo, hi))[0].reshape(-1) for p in pairs])
                y = np.stack([_clean(p[m][1].block(lo, hi))[0].reshape(-1) for p in pairs])
                dots += x @ y.T
                nt += np.einsum("ij,ij->i", x, x)
                nb += np.einsum("ij,ij->i", y, y)
        st, sb = np.sqrt(nt), np.sqrt(nb)
        sim = dots / np.outer(np.where(st > 0, st, 1.0), np.where(sb > 0, sb, 1.0))
        length = sum(int(np.prod(pairs[0][m][0].shape)) for m in range(len(pairs[0])))
        return _reordering(None, None, min_cosine, sim, length)[0]
    vt = np.stack([np.concatenate([_finite(np.asarray(t, np.float64))[0].ravel() for t, _ in experts[i]]) for i in ids])
    vb = np.stack([np.concatenate([_finite(np.asarray(b, np.float64))[0].ravel() for _, b in experts[i]]) for i in ids])
    return _reordering(vt, vb, min_cosine)[0]


def _reordering(vt: np.ndarray | None, vb: np.ndarray | None, min_cosine: float,
                sim: np.ndarray | None = None, length: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """(the exact assignment of tuned units, rows of ``vt``, to base units by cosine (or by the similarities
    ``sim`` given) when it is a reordering: units moved, every matched pair at ``chance_cut`` or more (the
    numbers a unit is compared by: ``vt``'s rows, else ``length``), one new unit among reordered ones being no
    reordering, and better than the identity; else None, the cosine matrix)."""
    if sim is None:
        sim = _unit_rows(vt) @ _unit_rows(vb).T
        length = vt.shape[1]
    n = sim.shape[0]
    if n < 2:
        return None, sim
    min_cosine = chance_cut(n, int(length or 0), min_cosine)
    perm = linear_assignment(sim, maximize=True)
    matched = sim[np.arange(n), perm]
    ok = bool(np.any(perm != np.arange(n))) and matched.min() >= min_cosine \
        and matched.mean() > np.diag(sim).mean() + 1e-6
    return (perm if ok else None), sim


def rows_follow(tuned: np.ndarray, base: np.ndarray, perm: np.ndarray, min_cosine: float = 0.5) -> bool:
    """Whether tuned row i is base row ``perm[i]`` (a router's rows following its experts' order)."""
    t = _unit_rows(_finite(np.asarray(tuned, np.float64).reshape(len(perm), -1))[0])
    b = _unit_rows(_finite(np.asarray(base, np.float64).reshape(len(perm), -1))[0])
    return bool(np.einsum("ij,ij->i", t, b[perm]).min() >= min_cosine)


def members_follow(load_pairs: Sequence[tuple[np.ndarray, np.ndarray, int] | tuple[np.ndarray, np.ndarray, int, str]],
                   perm: np.ndarray, min_cosine: float = 0.5) -> bool:
    """Whether every member matrix (tuned, base, neuron axis) of a reordered MLP is related to the base's
    once the order is undone (the mean over neurons of each one's absolute cosine at least ``min_cosine``: up to
    its sign and scale, as the matcher counts it; a neuron zero on one side only counts 0): pooled over gate, up
    and down, two matching matrices pass the matcher beside a new third one.
    Each part of a fused member (its gate and its up rows) is a matrix of its own here: a new gate beside the
    base's up would pass as one tensor. ``members_follow_stored`` answers the same for stored matrices."""
    srcs = []
    for t, b, axis, *role in load_pairs:
        st, sb = _ArraySource(t, axis), _ArraySource(b, axis)
        srcs.append((st, sb, 0 if st.flat else axis, role[0] if role else "in"))
    return _follow(srcs, perm, min_cosine)


def members_follow_stored(tuned, base, members: Sequence[tuple[str, str, int, str]], perm: np.ndarray,
                          min_cosine: float = 0.5) -> bool:
    """``members_follow`` for members (tuned name, base name, neuron axis, role) of two Checkpoints, read in row
    blocks (the base's neurons gathered in ``perm``'s order block by block): no matrix decoded whole."""
    srcs_t, srcs_b = member_sources(tuned, base, [(t, b, ax) for t, b, ax, _ in members])
    return _follow([(st, sb, 0 if st.flat else ax, role) for st, sb, (_, _, ax, role) in zip(srcs_t, srcs_b, members)],
                   perm, min_cosine)


def _follow(srcs, perm: np.ndarray, min_cosine: float) -> bool:
    perm = np.asarray(perm, np.int64)
    n = len(perm)
    for st, sb, axis, role in srcs:
        sums = _member_sums(st, sb, axis, parts_of(role), n, perm)
        for dm, nx2, ny2 in zip(sums[0], sums[2], sums[3][:, perm]):
            # tuned neuron i against base neuron perm[i]: the undone tuned neuron perm[i] against the base's (the mean
            # over neurons is the same in either order); the mean over neurons of each one's absolute cosine: pooled
            # over the matrix, one neuron scaled by 60 (and its down column by 1/60, the same function) outweighed
            # the rest and the MLP read unrelated
            nx, ny = np.sqrt(nx2), np.sqrt(ny2)
            live = (nx > 0) & (ny > 0)
            dead = (nx == 0) & (ny == 0)            # zero on both sides: a dead neuron, the base's
            if not (live.any() or dead.any()):
                return False
            cos = np.abs(dm[live]) / (nx[live] * ny[live])
            if float((cos.sum() + dead.sum()) / (live.sum() + dead.sum())) < min_cosine:
                return False
    return True


#: head sizes tried when the attention's are not known (every one that divides the rows is tried)
HEAD_DIMS = (256, 192, 160, 128, 112, 96, 80, 72, 64, 48, 40, 32, 24, 16)


@dataclass(frozen=True)
class HeadOrder:
    """How an attention's heads were reordered: tuned query head i is base head ``q[i]``, tuned key/value
    head j base head ``kv[j]`` (None: those heads stand where the base has them), each head ``d`` rows."""

    d: int
    q: np.ndarray | None
    kv: np.ndarray | None

    def rows(self, part: str, n: int) -> np.ndarray:
        """For ``n`` rows of ``part`` (``q``, ``k``, ``v``; ``o``'s columns follow ``q``): the base row each
        tuned row is, in order (the identity where that part was not reordered)."""
        perm = self.q if part in ("q", "o") else self.kv
        return np.arange(n) if perm is None else expand_units(perm, n // len(perm))


def expand_units(perm: np.ndarray, d: int) -> np.ndarray:
    """Unit order -> row order, for units of ``d`` consecutive rows.

    >>> expand_units(np.array([1, 0]), 2).tolist()
    [2, 3, 0, 1]
    """
    perm = np.asarray(perm, np.int64)
    return (perm[:, None] * d + np.arange(d)[None, :]).reshape(-1)


def heads_permuted(mats: Mapping[str, tuple[np.ndarray, np.ndarray]], min_cosine: float = 0.5,
                   head_dims: Sequence[int] = HEAD_DIMS) -> bool | None:
    """Whether an attention's heads are the base's in another order: ``mats`` maps ``q``, ``k``, ``v``
    (rows: heads of ``d`` rows each) and ``o`` (columns) to (tuned, base) float arrays [out, in]. The
    query heads are matched on their q rows and o columns together, the key/value heads on their k and
    v rows, by the exact assignment of their cosines, for each head size that divides the rows. A
    reordering is accepted when one of the two is reordered (matched heads agree, each head's cosine at
    least ``min_cosine``, better than the identity) and the other is reordered too or the base's as it
    stands: new key/value projections beside reordered queries are not the base's. None when the check
    cannot run (no separate q and o: a fused qkv). ``heads_order`` gives the order found."""
    found = heads_order(mats, min_cosine, head_dims)
    return found if found is None else found is not False


def heads_order(mats: Mapping[str, tuple[np.ndarray, np.ndarray]], min_cosine: float = 0.5,
                head_dims: Sequence[int] = HEAD_DIMS) -> HeadOrder | bool | None:
    """``heads_permuted``'s answer with the order: a ``HeadOrder`` when the heads are reordered, False
    when they are not, None when the check cannot run."""
    q, o = mats.get("q"), mats.get("o")
    if q is None or o is None or q[0].shape != q[1].shape or o[0].shape != o[1].shape \
            or o[0].shape[1] != q[0].shape[0]:
        return None
    kv = [mats[r] for r in ("k", "v") if r in mats and mats[r][0].shape == mats[r][1].shape]
    best, best_score = None, -1.0
    for d in head_dims:
        if q[0].shape[0] % d or q[0].shape[0] // d < 2:
            continue
        qo, q_perm, qs = _heads_state([(q, 0), (o, 1)], d, min_cosine)
        kv_perm, ks = None, 1.0
        if kv and all(t.shape[0] % d == 0 for t, _ in kv) and len({t.shape[0] for t, _ in kv}) == 1:
            kvs, kv_perm, ks = _heads_state([(m, 0) for m in kv], d, min_cosine) if kv[0][0].shape[0] // d >= 2 else \
                _heads_state([(m, 0) for m in kv], kv[0][0].shape[0], min_cosine)
        elif kv:
            continue
        else:
            kvs = "same"
        # of the head sizes that show a reordering, the one whose heads match best (the larger on a tie): with
        # heads of 16 rows reordered, units of 32 rows may match half their rows, a reordering too at a glance
        if "reordered" in (qo, kvs) and "unrelated" not in (qo, kvs) and min(qs, ks) > best_score + 1e-9:
            best, best_score = HeadOrder(d, q_perm, kv_perm), min(qs, ks)
    return best if best is not None else False


def _heads_state(members: Sequence[tuple[tuple[np.ndarray, np.ndarray], int]], d: int,
                 min_cosine: float) -> tuple[str, np.ndarray | None, float]:
    """(``reordered``, ``same`` (the base's heads where they stand) or ``unrelated``, for heads of ``d``
    rows; the order when reordered; the lowest similarity of a head with the base head it is taken for)."""
    # each row of a head counts up to its sign (v's rows and o's columns negated or rescaled alike change nothing
    # attention computes, and reparametrising tools do that to heads they also reorder): the similarity of two
    # heads is the sum over their rows of the absolute dot products, over the heads' norms
    # each matrix read in blocks (``_head_sums``): a 70B-width q and o held whole in float64 were 2 GB a side
    h = members[0][0][0].shape[members[0][1]] // d
    parts = [_head_sums(_source(t), _source(b), axis, d, h) for (t, b), axis in members]

    def cos(dots, nt, nb):
        den = np.sqrt(np.outer(nt, nb))
        return np.divide(dots, den, out=np.zeros_like(dots), where=den > 0)

    sim = cos(*(sum(x) for x in zip(*parts)))
    # each of a head's rows counts up to its sign: chance is that of one row's numbers (the shortest member's)
    row = min(t.shape[1 - axis] if len(t.shape) == 2 else int(np.prod(t.shape)) // max(1, t.shape[axis])
              for (t, _), axis in members)
    min_cosine = chance_cut(h, row, min_cosine)      # also the cut of each member and of "same" below
    perm, sim = _reordering(None, None, min_cosine, sim)
    # each member on its own too (q and o, k and v): the base's o beside a new q matches half of each pooled head
    # vector, which a threshold of 0.5 cannot tell from a head of the base's
    order = np.arange(h) if perm is None else perm
    each = min(float(cos(*part)[np.arange(h), order].min()) for part in parts)
    score = min(float(sim[np.arange(h), order].min()), each)
    if perm is not None:
        return ("reordered" if each >= min_cosine else "unrelated"), (perm if each >= min_cosine else None), score
    return ("same" if score >= min_cosine else "unrelated"), None, score


def _source(x):
    """A matrix as a source read in row blocks: a ``_StoredSource`` as it is, an array wrapped."""
    return x if hasattr(x, "block") else _ArraySource(np.asarray(x), 0)


def _head_sums(st, sb, axis: int, d: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For heads of ``d`` rows (``axis`` 0) or columns (1): (h x h sums over a head's rows of the absolute dot
    products of tuned head i's row r with base head j's, each head's squared norm tuned and base), non-finite
    entries zeroed. Rows: the r-th row of every head gathered at once (h rows a side); columns: row blocks, the
    h x h products of each of the d column offsets summed before their absolute value."""
    dots = np.zeros((h, h))
    nt, nb = np.zeros(h), np.zeros(h)
    if axis == 0:
        for r in range(d):                      # one product per row of a head (BLAS), h x h each
            index = np.arange(h, dtype=np.int64) * d + r
            x, y = _clean(st.block(0, h, index))[0], _clean(sb.block(0, h, index))[0]
            dots += np.abs(x @ y.T)
            nt += np.einsum("ij,ij->i", x, x)
            nb += np.einsum("ij,ij->i", y, y)
        return dots, nt, nb
    acc = np.zeros((d, h, h))
    step = _step(st.cols)
    for lo in range(0, st.rows, step):
        hi = min(st.rows, lo + step)
        x = _clean(st.block(lo, hi))[0].reshape(hi - lo, h, d)
        y = _clean(sb.block(lo, hi))[0].reshape(hi - lo, h, d)
        for r in range(d):
            acc[r] += x[:, :, r].T @ y[:, :, r]
        nt += np.einsum("bir,bir->i", x, x)
        nb += np.einsum("bir,bir->i", y, y)
    for r in range(d):
        dots += np.abs(acc[r])
    return dots, nt, nb


def fused_qkv_views(qkv: tuple[np.ndarray, np.ndarray], o: tuple[np.ndarray, np.ndarray],
                    head_dims: Sequence[int] = HEAD_DIMS) -> list[tuple[dict, tuple[int, ...]]]:
    """The ways a fused qkv projection (tuned, base) [rows, hidden] may split into ``q``, ``k``, ``v``,
    each as (``heads_permuted``'s ``mats``, the head sizes to try). The query rows are as many as the
    output projection ``o`` [hidden, q rows] has columns. Two layouts are in use: the three stacked
    (Phi-3's ``qkv_proj``, Falcon-7B's multi-query ``query_key_value``: q rows, then k, then v) and
    grouped by key/value head (GPT-NeoX's ``query_key_value``, one q, k and v per head; Falcon-40B's,
    each key/value head's queries, then its k and v), which depends on the head size. A layout that is
    not the model's finds no reordering (its "heads" mix rows of several), so trying each is safe.

    >>> t = np.arange(24.0).reshape(12, 2); views = fused_qkv_views((t, t), (np.ones((2, 4)), np.ones((2, 4))), (2,))
    >>> [(sorted(m), dims, m["k"][0][:, 0].tolist()) for m, dims in views]  # doctest: +NORMALIZE_WHITESPACE
    [(['k', 'o', 'q', 'v'], (2,), [8.0, 10.0, 12.0, 14.0]), (['k', 'o', 'q', 'v'], (2,), [4.0, 6.0, 16.0, 18.0])]
    """
    (qt, qb), (ot, ob) = qkv, o
    if qt.ndim != 2 or qt.shape != qb.shape or ot.ndim != 2 or ot.shape != ob.shape:
        return []
    rows, n_q = qt.shape[0], ot.shape[1]
    views: list[tuple[dict, tuple[int, ...]]] = []
    if rows > n_q and (rows - n_q) % 2 == 0:                 # stacked: [q; k; v]
        kv = (rows - n_q) // 2
        views.append(({"q": (qt[:n_q], qb[:n_q]), "k": (qt[n_q:n_q + kv], qb[n_q:n_q + kv]),
                       "v": (qt[n_q + kv:], qb[n_q + kv:]), "o": o}, tuple(head_dims)))
    for d in head_dims:                                      # grouped: [kv heads, queries per group + 2, d]
        if n_q % d or rows % d or n_q // d < 2:
            continue
        h, spare = n_q // d, rows // d - n_q // d
        if spare < 2 or spare % 2 or h % (spare // 2):
            continue
        kv = spare // 2
        g = h // kv
        if kv == 1:                                          # one key/value head: the stacked layout
            continue
        gt, gb = qt.reshape(kv, g + 2, d, -1), qb.reshape(kv, g + 2, d, -1)
        views.append(({"q": (gt[:, :g].reshape(n_q, -1), gb[:, :g].reshape(n_q, -1)),
                       "k": (gt[:, g].reshape(kv * d, -1), gb[:, g].reshape(kv * d, -1)),
                       "v": (gt[:, g + 1].reshape(kv * d, -1), gb[:, g + 1].reshape(kv * d, -1)), "o": o}, (d,)))
    return views


#: tuned rows sampled when rows are matched by cosine (a row reordered, then trained)
ROW_SAMPLE = 64
#: base rows per chunk of the cosine search (a float32 copy of at most this many rows at a time)
ROW_CHUNK = 4096


def rows_from_base(tuned: np.ndarray, base: np.ndarray, dtype_tuned: str, dtype_base: str,
                   min_share: float = 0.9, min_cosine: float = 0.5) -> bool:
    """Whether the rows of a tuned embedding or output head [rows, hidden] are the base's rows in another
    order or a subset of them (a tokenizer's ids remapped, a vocabulary trimmed), though row i is not base
    row i. ``tuned`` and ``base`` are 2-D arrays or ``rowmatch.RowTable``s (read in chunks, never whole
    in float32). First bitwise: at least ``min_share`` of the tuned rows are base rows, each base row
    used once at most. Else by cosine, on ``ROW_SAMPLE`` tuned rows spread over the table: each one's
    nearest base row at ``min_cosine`` or more for ``min_share`` of them, all different, and better than
    the base row at its own index. Rows of zeros (padding) are left out."""
    return rows_reordered(tuned, base, dtype_tuned, dtype_base, min_share, min_cosine)[0]


def rows_reordered(tuned: np.ndarray, base: np.ndarray, dtype_tuned: str, dtype_base: str,
                   min_share: float = 0.9, min_cosine: float = 0.5,
                   partial: bool = False) -> tuple[bool, np.ndarray | None]:
    """(``rows_from_base``'s answer, the base row each tuned row is when every tuned row, zeros
    included, is bitwise a base row: what the table is compared with once the order is undone; None
    when some row is not, as after training, whose rows are matched on a sample only). A row equal to
    the base row at its own index keeps it. ``partial``: on the bitwise path, the order even when some
    tuned rows are no base row, -1 at those (rows added to a remapped vocabulary: no order to undo, but
    enough to tell whether the embedding's and the head's rows follow one remapping)."""
    import hashlib

    from .rowmatch import as_table

    tuned, base = as_table(tuned), as_table(base)
    if tuned.ndim != 2 or base.ndim != 2 or tuned.shape[1] != base.shape[1] or not len(tuned) or len(base) < 2:
        return False, None
    if dtype_tuned == dtype_base and tuned.dtype == base.dtype:
        seen: dict[bytes, int] = {}
        digests: list[bytes] = []
        zero = set()
        for lo in range(0, len(base), ROW_CHUNK):
            chunk = np.ascontiguousarray(base[lo:lo + ROW_CHUNK])
            for i, row in enumerate(chunk):
                h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                digests.append(h)
                seen.setdefault(h, lo + i)
                if not row.view(np.uint8).any():
                    zero.add(h)
        base_live = len(seen) - len(zero)           # distinct non-zero base rows
        used: set[int] = set()
        hits = live = 0
        order = np.full(len(tuned), -1, np.int64)
        for lo in range(0, len(tuned), ROW_CHUNK):
            chunk = np.ascontiguousarray(tuned[lo:lo + ROW_CHUNK])
            nonzero = np.any(chunk.view(np.uint8).reshape(len(chunk), -1) != 0, axis=1)
            for i, (row, nz) in enumerate(zip(chunk, nonzero)):
                h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                j = seen.get(h)
                k = lo + i
                if j is not None:
                    order[k] = k if k < len(digests) and digests[k] == h else j
                if not nz:
                    continue
                live += 1
                if j is not None and j not in used:
                    used.add(j)
                    hits += 1
        # a share of the tuned rows, or of the base's when the tuned table is larger (ids remapped and tokens added:
        # a tokenizer swapped; 32 new rows beside 256 remapped ones read "unrelated: embeddings, head")
        if live and hits >= min_share * min(live, base_live):
            return True, (order if partial or bool(np.all(order >= 0)) else None)
    pick = np.unique(np.linspace(0, len(tuned) - 1, min(ROW_SAMPLE, len(tuned))).astype(np.int64))
    st = _unit_rows(_finite(_as_float32(np.ascontiguousarray(tuned[pick]), dtype_tuned).astype(np.float64))[0])
    live = np.einsum("ij,ij->i", st, st) > 0
    if not live.any():
        return False, None
    best = np.full(len(pick), -np.inf)
    arg = np.full(len(pick), -1, np.int64)
    own = np.full(len(pick), -np.inf)
    for lo in range(0, len(base), ROW_CHUNK):
        sb = _unit_rows(_finite(_as_float32(np.ascontiguousarray(base[lo:lo + ROW_CHUNK]), dtype_base)
                                .astype(np.float64))[0])
        sim = st @ sb.T
        k = np.argmax(sim, axis=1)
        top = sim[np.arange(len(pick)), k]
        better = top > best
        best[better], arg[better] = top[better], lo + k[better]
        mine = (pick >= lo) & (pick < lo + len(sb))
        own[mine] = sim[np.flatnonzero(mine), pick[mine] - lo]
    ok = live & (best >= min_cosine) & (best > own + 1e-6)
    return bool(ok.sum() >= min_share * live.sum() and len(set(arg[ok].tolist())) == int(ok.sum())), None
