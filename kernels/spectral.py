"""Singular values of a weight delta: exact, Gram-eigen, randomized, and from low-rank factors.

Pure array code: no dtype, file or name knowledge (``weightdiff.measure.rank`` decodes, picks the
method and fills the record). Every function works on the *tall* orientation of its
matrix (a wide ``m x n`` is handled as its transpose view), because LAPACK and torch are
several times slower on the wide one, and returns singular values in float64, descending.

* ``svdvals_exact(x)``: LAPACK SVD of a float64 copy. Small matrices only.
* ``svdvals_gram(x)``: eigenvalues of the float64 Gram matrix ``x^T x`` of the smaller
  side, accumulated over row blocks of the float32 input (no full-size float64 copy);
  ``s_i = sqrt(max(lambda_i, 0))``. About 3x cheaper than the SVD and, in float64,
  exact for every singular value above ``~1e-7 s_1``.
* ``randomized_svd(x, k, seed=...)``: Halko, Martinsson and Tropp (2011), algorithm 4.4:
  a seeded Gaussian sketch of ``k + oversample`` columns, ``n_iter`` power iterations
  with re-orthonormalization after every product (two passes of float64 Gram-eigen
  orthonormalization: large products only, see ``_orth``), then the SVD of the small
  projected matrix in float64. Same seed, same input, same bits.
* ``factors_svd(b, a, scale)``: singular values of ``scale * b @ a`` (``b``: m x r,
  ``a``: r x n) without forming it: ``b = Qb Rb``, ``a^T = Qa Ra``, so
  ``scale * b @ a = Qb (scale * Rb Ra^T) Qa^T`` and the singular values are those of the
  r x r core.
* ``spectrum_fields`` / ``partial_spectrum_fields``: the rank numbers of DESIGN.md from a
  full spectrum, or from a top-k spectrum plus the exact total energy (bounds).

The ``*_torch`` functions do the same on torch tensors (any device), with the sketch
drawn by numpy from the same seed, so CPU and CUDA runs start from the same matrix.

>>> x = np.diag([3.0, 2.0, 0.0]).astype(np.float32)
>>> svdvals_exact(x).tolist(), svdvals_gram(x).tolist()
([3.0, 2.0, 0.0], [3.0, 2.0, 0.0])
>>> factors_svd(np.array([[1.0], [0.0]]), np.array([[0.0, 2.0]]), 0.5).tolist()
[1.0]
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .blas import blas_threads, single_blas_thread

#: rows per block when accumulating a Gram matrix (bounded float64 temporaries)
GRAM_BLOCK_ELEMENTS = 1 << 21
#: unit roundoff of float64 and float32
U64 = 2.0 ** -53
U32 = 2.0 ** -24


def tall(x):
    """The tall orientation of a 2-D array (a transpose view when wide; works for torch too)."""
    return x if x.shape[0] >= x.shape[1] else x.T


@single_blas_thread
def svdvals_exact(x: np.ndarray) -> np.ndarray:
    """Singular values by LAPACK on a float64 copy of the tall orientation, descending."""
    x = np.asarray(x)
    if x.size == 0:
        return np.zeros(0)
    return np.linalg.svd(np.asarray(tall(x), dtype=np.float64), compute_uv=False)


def gram(x: np.ndarray) -> np.ndarray:
    """float64 ``x^T x`` of the tall orientation, summed over row blocks in row order."""
    t = tall(np.asarray(x))
    m, n = t.shape
    g = np.zeros((n, n))
    step = max(1, GRAM_BLOCK_ELEMENTS // max(n, 1))
    for i in range(0, m, step):
        blk = np.asarray(t[i:i + step], dtype=np.float64)
        g += blk.T @ blk
    return g


@single_blas_thread
def svdvals_gram(x: np.ndarray) -> np.ndarray:
    """Singular values as square roots of the float64 Gram eigenvalues, descending.

    >>> svdvals_gram(np.ones((4, 2), np.float32)).round(12).tolist()
    [2.828427124746, 0.0]
    """
    x = np.asarray(x)
    if x.size == 0:
        return np.zeros(0)
    w = np.linalg.eigvalsh(gram(x))
    return np.sqrt(np.clip(w[::-1], 0.0, None))


def sketch(n: int, width: int, seed: int) -> np.ndarray:
    """The seeded Gaussian test matrix (float32, n x width) shared by both backends."""
    return np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)


#: eigenvalues of a Gram matrix below this share of the largest are dropped (singular values
#: below ~1e-7 of the largest: float32 noise in the products that build it)
GRAM_DROP = 1e-14


def _orth(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis (float32) of the column space of a thin matrix, by two passes of
    Gram-eigen orthonormalization in float64 (``Y V W^-1/2`` with ``Y^T Y = V W V^T``).

    The first pass leaves an orthogonality error of about eps64 x cond(Y)^2 (at most 1e-2
    after dropping directions below ``GRAM_DROP``), the second removes it. Unlike
    Householder QR, which OpenBLAS runs as many small multithreaded calls (several times
    slower, and far slower still on a busy machine), this is two large products per pass.
    Directions with no energy are dropped, so the basis may be narrower than ``y``.
    """
    z = np.asarray(y, dtype=np.float64)
    for _ in range(2):
        w, v = np.linalg.eigh(z.T @ z)
        if not w.size or not w[-1] > 0:
            return np.zeros((z.shape[0], 0), dtype=np.float32)
        keep = w > w[-1] * GRAM_DROP
        z = z @ (v[:, keep] / np.sqrt(w[keep]))
    return z.astype(np.float32)


def _small_svd(small: np.ndarray, vectors: bool):
    """SVD of a short wide float64 matrix (width x n) through the eigenvalues of its
    width x width Gram matrix: values descending, and ``(ub, s, vt)`` with ``vectors``."""
    w, v = np.linalg.eigh(small @ small.T)
    w, v = w[::-1], v[:, ::-1]
    s = np.sqrt(np.clip(w, 0.0, None))
    if not vectors:
        return s
    floor = s[0] * 1e-7 if s.size else 0.0
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > floor)
    return v, s, (v.T @ small) * inv[:, None]


@single_blas_thread
def randomized_svd(x: np.ndarray, k: int, *, oversample: int = 16, n_iter: int = 3, seed: int = 0,
                   vectors: bool = False):
    """Top-``k`` singular values (and optionally vectors) of ``x`` by a seeded randomized SVD.

    Returns ``s`` (float64[k'], descending, ``k' = min(k, m, n)``; zeros past the numerical
    rank) or, with ``vectors=True``, ``(u, s, vt)`` with ``u``: m x k', ``vt``: k' x n for
    ``x`` itself (not its tall form). Work is float32 products; orthonormalization and the
    final small SVD are float64. Ritz values never exceed the true singular values, so
    top-k energy is a lower bound.
    """
    x = np.asarray(x)
    wide = x.shape[0] < x.shape[1]
    a = x.T if wide else x
    m, n = a.shape
    kk = min(k, n)
    width = min(n, kk + oversample)
    a32 = a if a.dtype == np.float32 else a.astype(np.float32)
    q = _orth(a32 @ sketch(n, width, seed)) if kk else np.zeros((m, 0), np.float32)
    for _ in range(n_iter):
        q = _orth(a32 @ _orth(a32.T @ q))
    small = np.asarray(q.T @ a32, dtype=np.float64)           # width' x n
    got = min(kk, small.shape[0])
    if not vectors:
        return np.concatenate([_small_svd(small, False)[:got], np.zeros(kk - got)])
    ub, s, vt = _small_svd(small, True)
    u = np.zeros((m, kk))
    u[:, :got] = q.astype(np.float64) @ ub[:, :got]
    s = np.concatenate([s[:got], np.zeros(kk - got)])
    v = np.zeros((kk, n))
    v[:got] = vt[:got]
    return (v.T, s, u.T) if wide else (u, s, v)


#: a factor larger than this is reduced to its R in row blocks of about this size (``tall_r``)
TSQR_BYTES = 64 << 20


def tall_r(x: np.ndarray) -> np.ndarray:
    """R of the QR factorization of a tall m x k matrix (min(m, k) x k; ``np.linalg.qr(x, mode="r")`` up to the
    signs of its rows, so the same singular values). Above ``TSQR_BYTES``, a tall-skinny QR: the R of each row block
    stacked under the R so far, so that only one block is copied at a time, not the whole factor (backward stable
    as Householder QR is).

    >>> x = np.random.default_rng(0).standard_normal((5000, 40))
    >>> bool(np.allclose(np.abs(np.diag(tall_r(x))), np.abs(np.diag(np.linalg.qr(x, mode="r")))))
    True
    """
    m, k = x.shape
    if x.nbytes <= TSQR_BYTES or m <= 2 * k:
        return np.linalg.qr(x, mode="r")
    rows = max(k, TSQR_BYTES // (8 * max(k, 1)))
    r = None
    for i in range(0, m, rows):
        blk = x[i:i + rows]
        r = np.linalg.qr(blk if r is None else np.vstack([r, blk]), mode="r")
    return r


@single_blas_thread
def factors_svd(b: np.ndarray, a: np.ndarray, scale: float, vectors: bool = False):
    """Exact singular values of ``scale * b @ a`` from its factors (float64), descending.

    ``b``: m x r, ``a``: r x n. Cost O((m + n) r^2); the m x n product is never formed.
    With ``vectors=True`` returns ``(u, s, vt)`` (u: m x r', vt: r' x n, r' = min(r, m, n)).
    """
    if vectors or not getattr(b, "row_blocks", False):   # (a factor that computes its rows as they are read)
        b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if not vectors:
        # R alone, no Q formed (a FourierFT pair of inner size 2,000 on a 14,336-row layer held another 229 MB
        # for its Q), and of a large factor in row blocks (LAPACK copies what it factorizes)
        rb, ra = tall_r(b), tall_r(a.T)
        return np.linalg.svd(float(scale) * (rb @ ra.T), compute_uv=False)
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    core = float(scale) * (rb @ ra.T)
    uc, s, vct = np.linalg.svd(core)
    return qb @ uc, s, (qa @ vct.T).T


# --- rank numbers from a spectrum -------------------------------------------------------

def effective_rank(s: np.ndarray) -> float | None:
    """Roy and Vetterli (2007): exp of the entropy of ``p_i = s_i / sum(s)``; None for s = 0.

    >>> round(effective_rank(np.array([1.0, 1.0, 1.0, 0.0])), 12)
    3.0
    """
    s = np.asarray(s, dtype=np.float64)
    total = float(s.sum())
    if not total > 0:
        return None
    p = s[s > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def energy_rank(s2_cumsum: np.ndarray, total: float, q: float) -> int:
    """Smallest k with ``s_1^2 + ... + s_k^2 >= q * total`` (0 when total is 0)."""
    if not total > 0:
        return 0
    k = int(np.searchsorted(s2_cumsum, q * total, side="left")) + 1
    return min(k, len(s2_cumsum))


def _squares_underflow(s1: float) -> bool:
    """Whether the square of the largest singular value is 0 or subnormal (it is positive and finite)."""
    return 0.0 < s1 < math.inf and s1 * s1 < sys.float_info.min


def spectrum_fields(s: np.ndarray, noise_threshold: float) -> dict:
    """Rank numbers of a *full* spectrum: every value exact.

    >>> f = spectrum_fields(np.array([2.0, 1.0, 0.0]), 0.5)
    >>> f["stable_rank"], f["energy_rank_90"], f["numerical_rank"]
    (1.25, 2, 2)
    """
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    if s.size and _squares_underflow(float(s[0])):
        # every field is the same for the spectrum scaled by 1 / s_1 (the threshold with it); the squares of values
        # this small are 0 or subnormal (a change of 1e-160, an adapter scaled by lora_alpha = 1e-320: 0 / 0)
        scale = float(s[0])
        return spectrum_fields(s / scale, noise_threshold / scale)
    c = np.cumsum(s * s)
    total = float(c[-1]) if c.size else 0.0
    s1 = float(s[0]) if s.size else 0.0
    return {
        "stable_rank": total / (s1 * s1) if s1 > 0 else None,
        "effective_rank": effective_rank(s),
        "energy_rank_90": energy_rank(c, total, 0.90),
        "energy_rank_99": energy_rank(c, total, 0.99),
        "numerical_rank": int(np.count_nonzero(s > noise_threshold)),
        "bounds": {},
        "estimated": [],
    }


def partial_spectrum_fields(s_top: np.ndarray, total: float, r: int, noise_threshold: float,
                            count_hi: int | None = None, caps: np.ndarray | None = None) -> dict:
    """Rank numbers from the top ``k`` singular values and the exact total energy.

    ``r = min(m, n)``. The top values are Ritz values, each at most the true one, so every sum of
    them is a lower bound and ``tail = total - sum(s_top^2)`` is at least the true energy past the
    top k. Upper ends: the top k reach ``q`` at ``energy_rank(top)``; otherwise, with
    ``need = q total - sum(s_top^2)``, ``energy_rank_q <= k + ceil(need / (tail / (r - k)))`` (the
    tail's largest values hold at least their even share). Lower ends need upper bounds on the
    partial sums ``s_1^2 + ... + s_j^2``: ``caps`` (``caps[j]``, j = 0..r, from ``frobenius_caps``
    and ``ritz_caps``) gives them, certified, and the lower end is ``lower_rank(caps)``. Without
    ``caps`` the lower end is the Ritz estimate ``k + ceil(need / s_k^2)`` (a low ``s_k`` raises it:
    not a certificate; callers that have no caps use it for display only), and the top k's own
    energy rank is taken as exact. The field holds the lower end and ``bounds`` both. ``numerical_rank`` is
    bounded by ``k + floor(tail / threshold^2)`` when all k values pass the threshold.
    ``effective_rank`` is *estimated* with the tail spread evenly over the remaining
    directions (the entropy's largest value for that tail, so it tends high; right for a
    noise-floor tail); ``bounds["effective_rank"]`` gives the range from the tail packed
    into as few directions as ``s_k`` allows to the even spread.
    ``stable_rank`` uses the exact total and the top value, a Ritz value at most the true ``s_1``:
    *estimated* too (high by a few % on a flat spectrum, within ~1e-5 where ``s_1`` stands apart),
    unless ``caps[1]`` (an upper bound on ``s_1^2``) is within ``STABLE_CERTIFIED`` of it: then the
    exact value lies between ``total / caps[1]`` and the reported one, and it is reported as exact.

    ``count_hi``: an upper bound on the number of singular values above ``noise_threshold``
    (``--spectrum count`` certifies it). The values past it are each at most the threshold, so
    values ``k+1 .. count_hi`` hold at least ``avail = tail - (r - count_hi) threshold^2`` and their
    largest hold at least their even share of it: when ``need <= avail``,
    ``energy_rank_q <= k + ceil(need / (avail / (count_hi - k)))``, which can be far below the bound
    that spreads the tail over all ``r - k`` directions (a change of rank 150 in a 4096-wide matrix).
    """
    s = np.sort(np.asarray(s_top, dtype=np.float64))[::-1]
    k = len(s)
    if k and _squares_underflow(float(s[0])):
        # scaled by 1 / s_1 as ``spectrum_fields`` does: energies (the total, the caps) by 1 / s_1^2, in two steps
        scale = float(s[0])
        return partial_spectrum_fields(s / scale, float(total) / scale / scale, r, noise_threshold / scale, count_hi,
                                       None if caps is None else np.asarray(caps, np.float64) / scale / scale)
    c = np.cumsum(s * s)
    top = float(c[-1]) if k else 0.0
    total = max(float(total), top)
    tail = total - top
    rest = max(r - k, 0)
    if rest == 0 or not tail > 0:
        return spectrum_fields(s, noise_threshold) | {"stable_rank": total / s[0] ** 2 if k and s[0] > 0 else None}
    out: dict = {"stable_rank": total / float(s[0]) ** 2 if s[0] > 0 else None, "bounds": {}, "estimated": []}
    for q, key in ((0.90, "energy_rank_90"), (0.99, "energy_rank_99")):
        if top >= q * total:
            hi = energy_rank(c, total, q)
            lo = hi if caps is None else min(lower_rank(caps, total, q), hi)
        else:
            need = q * total - top
            sk2 = float(s[-1]) ** 2
            hi = k + _ceil(need / (tail / rest))
            if count_hi is not None and count_hi > k:
                avail = tail - (r - count_hi) * noise_threshold ** 2
                if avail > 0 and need <= avail:
                    hi = min(hi, k + _ceil(need / (avail / (count_hi - k))))
            hi = min(hi, r)
            lo = (k + (_ceil(need / sk2) if sk2 > 0 else rest)) if caps is None else lower_rank(caps, total, q)
            lo = min(lo, hi)
        out[key] = lo
        if lo != hi:
            out["bounds"][key] = [lo, hi]
    n_num = int(np.count_nonzero(s > noise_threshold))
    out["numerical_rank"] = n_num
    if k and n_num == k:
        hi = k + (int(tail // (noise_threshold ** 2)) if noise_threshold > 0 else rest)
        out["bounds"]["numerical_rank"] = [k, min(hi, r)]
    spread = effective_rank(np.concatenate([s, np.full(rest, math.sqrt(tail / rest))]))
    out["effective_rank"] = spread
    if s[-1] > 0:
        # the other extreme: the tail packed into as few directions as s_k allows
        full_n = min(int(tail // float(s[-1]) ** 2), rest)
        left = max(tail - full_n * float(s[-1]) ** 2, 0.0)
        packed = np.concatenate([s, np.full(full_n, s[-1]), [math.sqrt(left)] if full_n < rest else []])
        out["bounds"]["effective_rank"] = [effective_rank(packed), spread]
    # s_1 is a Ritz value (at most the true s_1): the stable rank is at most the one reported, a few %
    # high on a flat spectrum whose top has not converged; certified where caps[1] bounds s_1^2 closely
    certified = caps is not None and s[0] > 0 and float(caps[1]) <= float(s[0]) ** 2 * (1.0 + STABLE_CERTIFIED)
    out["estimated"] = ["effective_rank"] if certified else ["stable_rank", "effective_rank"]
    return out


#: a stable rank from a top-k spectrum is reported as exact when the certified upper bound on s_1^2
#: is within this share of the Ritz value (the exact stable rank then lies within it of the value)
STABLE_CERTIFIED = 1e-6


# --- certified caps on the sum of the largest eigenvalues -----------------------------------

def _envelope(u: np.ndarray, total: float) -> np.ndarray:
    """``u`` made a valid cap for the sums ``S_j`` of a PSD spectrum with trace ``total``: at most
    ``total``, 0 at ``j = 0``, and non-decreasing from the right (``S_j <= S_j' <= u_j'`` for
    ``j' >= j``)."""
    u = np.minimum(np.asarray(u, dtype=np.float64), total)
    u[0] = 0.0
    return np.minimum.accumulate(u[::-1])[::-1]


def frobenius_caps(r: int, total: float, frob2: float, total_err: float = 0.0) -> np.ndarray:
    """``caps[j]`` (j = 0..r): an upper bound on the sum ``S_j`` of the ``j`` largest of ``r``
    non-negative reals whose sum is ``total`` and whose squares sum to at most ``frob2``.

    By Cauchy-Schwarz, ``S_j^2 <= j sum_{i<=j} x_i^2 <= j (frob2 - (total - S_j)^2 / (r - j))``, so
    ``S_j <= (j total + sqrt(j (r - j) (r frob2 - total^2))) / r``. For a Gram matrix
    (``x_i = s_i^2``, ``total = ||D||_F^2``, ``frob2 = ||D^T D||_F^2``) this costs no eigenvalue at
    all and is tight on a flat spectrum (``S_j = j total / r``). ``total_err``: ``total`` is known
    only to within it (the caps then hold for every sum in that range).

    >>> frobenius_caps(4, 4.0, 4.0).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    if r <= 0:
        return np.zeros(1)
    j = np.arange(r + 1, dtype=np.float64)
    hi, lo = float(total) + float(total_err), max(float(total) - float(total_err), 0.0)
    disc = max(r * float(frob2) - lo * lo, 0.0)
    return _envelope((j * hi + np.sqrt(j * (r - j) * disc)) / r, hi)


def count_caps(r: int, total: float, count_lo: int, thr2: float) -> np.ndarray:
    """``caps[j]`` (j = 0..r) from a certified count: at least ``count_lo`` of the ``r`` eigenvalues
    exceed ``thr2`` (``--spectrum count``'s inertia), so the values ``j+1 .. count_lo`` hold more than
    ``(count_lo - j) thr2`` and ``S_j <= total - max(count_lo - j, 0) thr2``. On a dense fine-tune,
    whose values mostly clear the noise threshold, this pins the 99% lower end close to the count.

    >>> count_caps(4, 10.0, 3, 1.0).tolist()
    [0.0, 8.0, 9.0, 10.0, 10.0]
    """
    j = np.arange(r + 1, dtype=np.float64)
    return _envelope(float(total) - np.maximum(int(count_lo) - j, 0.0) * max(float(thr2), 0.0), float(total))


def ritz_caps(theta: np.ndarray, r: int, tail: float, frob2_tail: float | None, resid_fro: float,
              resid_nuclear: float) -> np.ndarray:
    """``caps[j]`` (j = 0..r): upper bounds on the sums ``S_j`` of the ``j`` largest eigenvalues of an
    ``r x r`` PSD matrix ``G`` from a Rayleigh-Ritz step on an orthonormal basis ``Y`` (k columns).

    In the basis ``[Y, Y_perp]``, ``G = [[T, B], [B^T, C]]`` with ``eig(T) = theta``,
    ``tail = trace(C)``, ``frob2_tail >= ||C||_F^2`` (None: unknown) and ``B`` the residual
    ``G Y - Y T`` (``||B||_F = resid_fro``; its nuclear norm at most ``resid_nuclear``, the sum of
    the residual columns' norms). Ky Fan: ``S_j(G) <= S_j(diag(T, C)) + S_j([[0, B], [B^T, 0]])``;
    the first is ``max_a sum(theta[:a]) + S_{j-a}(C)`` with ``S_b(C)`` capped by ``frobenius_caps``
    (or by ``tail``), the second is at most ``min(sqrt(min(j, k)) resid_fro, resid_nuclear)``. Where
    the top stands apart (converged Ritz pairs, tiny residuals) the caps sit on the Ritz sums.
    Exact arithmetic: callers add the rounding of ``theta`` and the residual.
    """
    theta = np.sort(np.asarray(theta, dtype=np.float64))[::-1]
    k = min(len(theta), r)
    theta = theta[:k]
    big_n = r - k
    tail = max(float(tail), 0.0)
    if frob2_tail is None:
        uc = np.full(big_n + 1, tail)
        uc[0] = 0.0
    else:
        uc = frobenius_caps(big_n, tail, max(float(frob2_tail), 0.0))
    cum = np.concatenate([[0.0], np.cumsum(theta)])
    caps = np.full(r + 1, -np.inf)
    for a in range(k + 1):
        np.maximum(caps[a:a + big_n + 1], cum[a] + uc, out=caps[a:a + big_n + 1])
    j = np.arange(r + 1, dtype=np.float64)
    caps = caps + np.minimum(np.sqrt(np.minimum(j, k)) * float(resid_fro), float(resid_nuclear))
    c_max = float(uc[1]) if big_n else 0.0           # largest eigenvalue of C at most
    if k and r and theta[0] > c_max:
        # where s_1 stands apart the first-order residual term is far too coarse: Li and Li (2005),
        # |lambda_1(G) - theta_1| <= 2 ||B||^2 / (eta + sqrt(eta^2 + 4 ||B||^2)) <= ||B||^2 / eta
        # with eta = theta_1 - lambda_max(C), the gap to the other block's spectrum
        caps[1] = min(caps[1], float(theta[0]) + float(resid_fro) ** 2 / (float(theta[0]) - c_max))
    return _envelope(caps, float(cum[-1]) + tail)


def ritz_step_caps(q: np.ndarray, gq: np.ndarray, trace_g: float, frob_g: float | None, slack: float) -> np.ndarray:
    """``caps`` (j = 0..n) for the sums of the largest eigenvalues of a computed PSD matrix ``g``
    (n x n) from a basis ``q`` (n x k, orthonormal to rounding) and the product ``gq = g q``:
    the Rayleigh-Ritz step, its residual and ``ritz_caps``. ``trace_g``: the trace of ``g``;
    ``frob_g``: its Frobenius norm (None: unknown, the complement is then capped by its trace);
    ``slack``: a bound on the rounding of one eigenvalue of this step (added ``j`` times, and to
    the tail and residual). The caller adds what separates ``g`` from the exact matrix."""
    n, kk = q.shape
    t = q.T @ gq
    theta, z = np.linalg.eigh((t + t.T) * 0.5)
    theta, z = theta[::-1], z[:, ::-1]
    q, gq = q @ z, gq @ z
    resid = gq - q * theta
    col = np.sqrt(np.einsum("ij,ij->j", resid, resid))
    resid_fro = math.sqrt(float(np.sum(col * col)))
    tail = float(trace_g) - float(np.sum(theta)) + kk * slack
    frob2_tail = None
    if frob_g is not None:
        frob2_tail = frob_g * frob_g * (1.0 + 4.0 * n * U64) - float(np.sum(theta * theta)) \
            - 2.0 * resid_fro ** 2 + 2.0 * kk * slack * (frob_g + slack)
    caps = ritz_caps(theta, n, tail, frob2_tail, resid_fro + kk * slack, float(col.sum()) + kk * slack)
    return caps + np.arange(n + 1, dtype=np.float64) * slack


def randomized_caps(x: np.ndarray, vectors: np.ndarray, total: float) -> np.ndarray:
    """``caps`` (j = 0..r) for the squared singular values of the float32 delta ``x`` (m x n, exact
    total energy ``total``) from the top singular vectors of its smaller side (``vectors``: r x k,
    the right singular vectors of the tall orientation), for the randomized path: two float64
    products over row blocks of ``x`` as stored (``G q = x^T (x q)`` in one pass for a tall ``x``,
    ``x (x^T q)`` in two for a wide one), never the Gram matrix itself.
    ``||G||_F`` is unknown here, so the complement is capped by its trace (``ritz_caps``): tight
    where the top stands apart, far below the truth on a flat spectrum (honest lower ends, not
    informative ones). ``x`` may be a rounded float32 copy of the exact delta: its Gram matrix is
    within ``3 u32 total`` (Frobenius), which moves ``S_j`` by ``sqrt(j)`` times that."""
    x = np.asarray(x)
    wide = x.shape[0] < x.shape[1]
    m, n = tall(x).shape
    if n == 0 or vectors.shape[1] == 0:
        return _envelope(np.full(n + 1, float(total)), float(total))
    with blas_threads(1):
        q, _ = np.linalg.qr(np.asarray(vectors, dtype=np.float64))
        step = max(1, GRAM_BLOCK_ELEMENTS // max(x.shape[1], 1))
        blocks = range(0, x.shape[0], step)                 # row blocks of x as stored (contiguous)
        trace = 0.0
        if not wide:                                        # G q = x^T (x q), one pass
            gq = np.zeros_like(q)
            for i in blocks:
                blk = np.asarray(x[i:i + step], dtype=np.float64)
                gq += blk.T @ (blk @ q)
                trace += float(np.vdot(blk, blk))
        else:                                               # G = x x^T: w = x^T q, then G q = x w
            w = np.zeros((x.shape[1], q.shape[1]))
            for i in blocks:
                blk = np.asarray(x[i:i + step], dtype=np.float64)
                w += blk.T @ q[i:i + step]
                trace += float(np.vdot(blk, blk))
            gq = np.concatenate([np.asarray(x[i:i + step], dtype=np.float64) @ w for i in blocks])
        slack = 4.0 * (m + n + q.shape[1]) * U64 * trace
        caps = ritz_step_caps(q, gq, trace, None, slack)
    j = np.arange(n + 1, dtype=np.float64)
    return _envelope(caps + np.sqrt(j) * 3.0 * U32 * max(float(total), trace), float(total))


def randomized_caps_torch(x, vectors: np.ndarray, total: float) -> np.ndarray:
    """``randomized_caps`` with the two products on ``x``'s torch device (float64), the rest in numpy."""
    import torch

    wide = x.shape[0] < x.shape[1]
    m, n = tall(x).shape
    if n == 0 or vectors.shape[1] == 0:
        return _envelope(np.full(n + 1, float(total)), float(total))
    q, _ = np.linalg.qr(np.asarray(vectors, dtype=np.float64))
    tq = torch.from_numpy(q).to(x.device)
    step = max(1, GRAM_BLOCK_ELEMENTS // max(x.shape[1], 1))
    blocks = range(0, x.shape[0], step)
    trace = 0.0
    if not wide:
        gq = torch.zeros_like(tq)
        for i in blocks:
            blk = x[i:i + step].to(torch.float64)
            gq += blk.T @ (blk @ tq)
            trace += float((blk * blk).sum())
    else:
        w = torch.zeros((x.shape[1], tq.shape[1]), dtype=torch.float64, device=x.device)
        for i in blocks:
            blk = x[i:i + step].to(torch.float64)
            w += blk.T @ tq[i:i + step]
            trace += float((blk * blk).sum())
        gq = torch.cat([x[i:i + step].to(torch.float64) @ w for i in blocks])
    slack = 4.0 * (m + n + q.shape[1]) * U64 * trace
    caps = ritz_step_caps(q, gq.cpu().numpy(), trace, None, slack)
    j = np.arange(n + 1, dtype=np.float64)
    return _envelope(caps + np.sqrt(j) * 3.0 * U32 * max(float(total), trace), float(total))


def lower_rank(caps: np.ndarray, total: float, q: float) -> int:
    """The smallest ``j`` with ``caps[j] >= q total``: a certified lower bound on ``energy_rank_q``
    when ``caps`` bounds the partial sums from above (``caps`` non-decreasing)."""
    if not total > 0:
        return 0
    j = int(np.searchsorted(caps, q * total, side="left"))
    return max(1, min(j, len(caps) - 1))


def _ceil(x: float) -> int:
    """ceil that forgives the float32 noise of randomized values: 26.0001 -> 26."""
    return math.ceil(x * (1.0 - 1e-5) - 1e-9)


# --- torch versions ----------------------------------------------------------------------

def svdvals_exact_torch(x) -> np.ndarray:
    """``svdvals_exact`` on a torch tensor: float64 ``torch.linalg.svdvals`` of the tall form."""
    import torch

    if x.numel() == 0:
        return np.zeros(0)
    return torch.linalg.svdvals(tall(x).to(torch.float64)).cpu().numpy()


def svdvals_gram_torch(x) -> np.ndarray:
    """``svdvals_gram`` on a torch tensor: float64 Gram over row blocks, ``eigvalsh``."""
    import torch

    if x.numel() == 0:
        return np.zeros(0)
    t = tall(x)
    m, n = t.shape
    g = torch.zeros((n, n), dtype=torch.float64, device=t.device)
    step = max(1, GRAM_BLOCK_ELEMENTS // max(n, 1))
    for i in range(0, m, step):
        blk = t[i:i + step].to(torch.float64)
        g += blk.T @ blk
    w = torch.linalg.eigvalsh(g).cpu().numpy()
    return np.sqrt(np.clip(w[::-1], 0.0, None))


def _orth_torch(y):
    """``_orth`` in torch (float64 Gram-eigen, two passes); float32 result."""
    import torch

    z = y.to(torch.float64)
    for _ in range(2):
        w, v = torch.linalg.eigh(z.T @ z)
        if w.numel() == 0 or not float(w[-1]) > 0:
            return torch.zeros((z.shape[0], 0), dtype=torch.float32, device=z.device)
        keep = w > w[-1] * GRAM_DROP
        z = z @ (v[:, keep] / torch.sqrt(w[keep]))
    return z.to(torch.float32)


def randomized_svd_torch(x, k: int, *, oversample: int = 16, n_iter: int = 3, seed: int = 0,
                         vectors: bool = False):
    """``randomized_svd`` on a torch tensor (float32 products on its device); numpy results."""
    import torch

    wide = x.shape[0] < x.shape[1]
    a = (x.T if wide else x).to(torch.float32)
    m, n = a.shape
    kk = min(k, n)
    width = min(n, kk + oversample)
    omega = torch.from_numpy(sketch(n, width, seed)).to(a.device)
    q = _orth_torch(a @ omega) if kk else torch.zeros((m, 0), dtype=torch.float32, device=a.device)
    for _ in range(n_iter):
        q = _orth_torch(a @ _orth_torch(a.T @ q))
    small = (q.T @ a).to(torch.float64).cpu().numpy()
    got = min(kk, small.shape[0])
    if not vectors:
        return np.concatenate([_small_svd(small, False)[:got], np.zeros(kk - got)])
    ub, s, vt = _small_svd(small, True)
    u = np.zeros((m, kk))
    u[:, :got] = q.to(torch.float64).cpu().numpy() @ ub[:, :got]
    s = np.concatenate([s[:got], np.zeros(kk - got)])
    v = np.zeros((kk, n))
    v[:got] = vt[:got]
    return (v.T, s, u.T) if wide else (u, s, v)


def factors_svd_torch(b, a, scale: float) -> np.ndarray:
    """``factors_svd`` (values only) on torch tensors, in float64."""
    import torch

    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    return torch.linalg.svdvals(float(scale) * (rb @ ra.T)).cpu().numpy()
