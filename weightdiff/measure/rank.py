"""Rank of the change: the ``rank`` block of a tensor record, from raw tensors or from LoRA factors.

``analyze_delta`` decodes a whole base/tuned matrix pair into one float32 delta (nonfinite
pairs count as 0, as in the stats pass), measures the storage-rounding noise floor,
picks a method and fills a ``RankRecord``. ``analyze_factors`` does the same for a PEFT
adapter (delta = scale x B @ A) without forming the m x n delta. The numbers are
defined in DESIGN.md; how they are bounded or estimated is in docs/rank.md.

Method per matrix (``r = min(m, n)`` after reshaping to ``shape[0] x prod(rest)``):

* ``r <= exact_max``: full spectrum, every field exact: LAPACK (``"exact"``) for small
  matrices, float64 Gram eigenvalues (``"gram"``) otherwise;
* larger: seeded randomized top-k (``"randomized"``); ``norm_delta_sq`` (exact, from the
  stats pass) turns the top k into bounds: see ``kernels.spectral.partial_spectrum_fields``.

Noise floor: rounding to a dtype leaves an error of variance ``ulp(|x|)^2 / 12`` at each
stored element. Both stored tensors are treated as rounded (we cannot know which one
was), so the delta carries the sum of both variances; for an ``m x n`` noise matrix with
variance ``v_ij`` the largest singular value is about ``sqrt(max_i sum_j v_ij) +
sqrt(max_j sum_i v_ij)`` (Bandeira and van Handel 2016), which is ``s (sqrt(m) + sqrt(n))``
when the magnitudes are even and stays right when a few rows or columns are much larger
(outlier features). ``numerical_rank`` counts singular values above
``noise_factor x noise_floor``.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import spectral
from ..kernels.blas import blas_threads
from ..kernels.dtypes import DTYPES, decode
from ..records import RankRecord
from .backend import CPU_SPECTRA as CPU, Backend, _sum_sq

__all__ = ["analyze_delta", "analyze_factors", "decode_delta", "noise_profile", "noise_floor",
           "DEFAULT_EXACT_MAX"]

#: smaller side up to which the CPU computes the full spectrum (see docs/rank.md for the timing)
DEFAULT_EXACT_MAX = 8192
_BLOCK = 1 << 20          # elements per row block of the bounded-memory loops
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def shape_2d(shape) -> tuple[int, int]:
    """``(shape[0], prod(shape[1:]))``; >2-D tensors are read as rows x rest."""
    if len(shape) < 2:
        raise ValueError(f"rank analysis needs a 2-D or larger shape, got {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def _bits(raw: np.ndarray, dtype: str, shape2: tuple[int, int]) -> np.ndarray:
    """``raw`` as its storage dtype, reshaped to ``shape2`` (no copy when contiguous)."""
    want = np.dtype(DTYPES[dtype].storage)
    raw = np.asarray(raw).reshape(-1)
    if raw.dtype != want:
        if raw.dtype.itemsize != want.itemsize:
            raise ValueError(f"raw array of {raw.dtype} cannot hold {dtype}")
        raw = raw.view(want)
    return raw.reshape(shape2)


def _rows(m: int, n: int) -> int:
    return max(1, _BLOCK // max(n, 1))


def _to_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode a block: float32 for 16/8-bit floats and F32 (the difference of two such values is
    then a single rounding), float64 otherwise."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32"):
        return raw.astype(np.float32)
    return decode(raw, dtype)


def decode_delta(base_raw: np.ndarray, tuned_raw: np.ndarray, dtype_base: str, dtype_tuned: str,
                 shape2: tuple[int, int]) -> np.ndarray:
    """float32 ``T - B`` as an ``m x n`` array; pairs with a non-finite side give 0.

    One pass of the numba ``kernels.cpu.decode_delta_f32`` (its numpy twin is
    ``kernels.reference.decode_delta_f32``), so the only full-size allocation is the result.
    """
    from ..kernels.cpu import decode_delta_f32

    out = np.empty(shape2, dtype=np.float32)
    b2, t2 = _bits(base_raw, dtype_base, shape2), _bits(tuned_raw, dtype_tuned, shape2)
    decode_delta_f32(b2.reshape(-1), t2.reshape(-1), dtype_base, dtype_tuned, out.reshape(-1))
    return out


_TABLES: dict[str, tuple[np.ndarray, int, int]] = {}


def _variance_table(dtype: str) -> tuple[np.ndarray, int, int]:
    """(table, shift, mask): rounding variance ``ulp^2 / 12`` indexed by ``(bits >> shift) & mask``.

    16- and 8-bit formats index every bit pattern; F32 and F64 their exponent field.
    Non-finite patterns get 0 (they are counted, not measured).
    """
    if dtype in _TABLES:
        return _TABLES[dtype]
    d = DTYPES[dtype]
    if d.bits <= 16:
        patterns = np.arange(1 << d.bits, dtype=np.uint64).astype(d.storage if d.storage != "float16"
                                                                  else np.uint16)
        with np.errstate(invalid="ignore"):
            x = np.abs(decode(patterns.view(d.storage), dtype))
        shift, mask = 0, (1 << d.bits) - 1
    else:
        ebits = {32: 8, 64: 11}[d.bits]
        shift, mask = d.bits - 1 - ebits, (1 << ebits) - 1
        e = np.arange(1 << ebits) - (mask >> 1)
        with np.errstate(over="ignore"):
            x = np.ldexp(1.0, e)
        x[0] = 0.0
        x[-1] = np.inf
    fin = np.isfinite(x)
    xs = np.where(fin, x, 0.0)
    ex = np.frexp(xs)[1].astype(np.int64) - 1
    ex = np.where(xs == 0, d.emin, np.maximum(ex, d.emin))
    with np.errstate(over="ignore"):
        table = np.where(fin, np.ldexp(1.0, 2 * (ex - d.mant_bits)) / 12.0, 0.0)
    _TABLES[dtype] = (table, shift, mask)
    return _TABLES[dtype]


def noise_profile(raw: np.ndarray, dtype: str, shape2: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Storage-rounding variance summed per row and per column: ``(float64[m], float64[n])``.

    Each sum takes its terms in flat (row-major) order (``kernels.cpu.noise_scatter``), so a
    matrix streamed in windows (``rank_stream.DeltaGram``) gets the same bits. Integer and
    bool dtypes store exactly: zeros.
    """
    m, n = shape2
    rows, cols = np.zeros(m), np.zeros(n)
    if DTYPES[dtype].kind != "float":
        return rows, cols
    table, shift, mask = _variance_table(dtype)
    bits = _bits(raw, dtype, shape2).reshape(-1)
    noise_kernel()(bits.view(_UINT[bits.dtype.itemsize]), shift, mask, table, 0, n, rows, cols)
    return rows, cols


def noise_kernel():
    """``kernels.cpu.noise_scatter`` (numba), or its numpy twin where numba cannot load."""
    try:
        from ..kernels.cpu import noise_scatter as fn
    except ImportError:    # pragma: no cover - numba is a core dependency
        from ..kernels.reference import noise_scatter as fn
    return fn


#: ``extra.note_copy`` of a float64 pair's rank (``copy_noise``)
COPY_NOTE = ("float64 values: the rank counts directions above float32's rounding of the delta (ulp^2 / 12 an "
             "element, in the noise floor with the stored values' own): the spectrum is of a float32 copy of the "
             "delta, or, where it is of the float64 delta, its computation's own error is above the stored values' "
             "rounding")


def copy_rounds(dtype_base: str, dtype_tuned: str) -> bool:
    """Whether this pair is ranked at float32's resolution of its delta (``copy_noise``): a float64 side. The
    difference of two 16-bit or float32 weights of similar size is exact in float32 (Sterbenz); of two float64
    weights, almost never."""
    return "F64" in (dtype_base, dtype_tuned)


def copy_noise(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rounding of a float32 copy of the delta ``d`` (float32 or float64), ``ulp32(d_ij)^2 / 12``, summed per row
    and per column (``float64[m]``, ``float64[n]``), row block by row block. Added to the storage profile of a
    float64 pair: the copy's rounding is 2^-24 of each difference where the stored values' is 2^-53 of each value,
    and counted as directions of the change it made a rank-2 update of a float64 matrix read rank min(m, n),
    "dense"; where the spectrum is of the float64 delta (a tall streamed Gram, a device with room), the SVD's or
    Gram's own error, about 2^-53 of the largest singular value, is still above the stored values' rounding, so
    such a pair is ranked at float32's resolution on every path, with the same floor."""
    m, n = d.shape
    rows, cols = np.zeros(m), np.zeros(n)
    step = _rows(m, n)
    for i in range(0, m, step):
        sp = np.spacing(np.abs(d[i:i + step]).astype(np.float32)).astype(np.float64)
        v = sp * sp / 12.0
        rows[i:i + step] = v.sum(axis=1)
        cols += v.sum(axis=0)
    return rows, cols


def noise_floor(rows: np.ndarray, cols: np.ndarray) -> tuple[float, float]:
    """(noise_floor, rms) from per-row and per-column variance sums.

    >>> noise_floor(np.full(4, 4 * 0.25), np.full(4, 4 * 0.25))   # s = 0.5, m = n = 4
    (2.0, 0.5)
    """
    if rows.size == 0 or cols.size == 0:
        return 0.0, 0.0
    rms = math.sqrt(float(rows.sum()) / (rows.size * cols.size))
    return math.sqrt(float(rows.max())) + math.sqrt(float(cols.max())), rms


def _record(s: np.ndarray, method: str, norm_sq: float, shape2: tuple[int, int], k: int,
            floor: float, noise_factor: float, extra: dict, caps: np.ndarray | None = None,
            d_float32: bool = True) -> RankRecord:
    """The rank block from a spectrum ``s``; ``d_float32``: the delta it was taken of was rounded to
    float32 (the Gram matrix's error bound then includes that copy's rounding)."""
    r = min(shape2)
    thr = noise_factor * floor
    full = method != "randomized"
    fields = (spectral.spectrum_fields(s, thr) if full
              else spectral.partial_spectrum_fields(s, norm_sq, r, thr, caps=caps))
    if method == "gram":     # certify the count against the error bound of the float32 delta's Gram
        from ..kernels import gram as kgram

        lam = np.asarray(s, dtype=np.float64) ** 2
        delta = kgram.eig_error_bound(r, max(shape2), max(norm_sq, float(lam.sum())) if norm_sq == norm_sq
                                      else float(lam.sum()), float(np.sqrt(np.sum(lam * lam))), np.float64,
                                      d_float32=d_float32)
        _, lo, hi = kgram.certified_count(lam, thr * thr, delta)
        extra["eig_error_bound"] = delta
        fields["numerical_rank"] = lo
        if lo != hi:
            fields["bounds"] = {"numerical_rank": [lo, hi]}
    top = np.sort(np.asarray(s, dtype=np.float64))[::-1][:k]
    captured = float(np.sum(top * top)) / norm_sq if norm_sq > 0 else None
    return RankRecord(
        stable_rank=fields["stable_rank"], effective_rank=fields["effective_rank"],
        energy_rank_90=fields["energy_rank_90"], energy_rank_99=fields["energy_rank_99"],
        numerical_rank=fields["numerical_rank"], noise_floor=floor, spectrum=[float(v) for v in top],
        energy_captured=captured, method=method, shape_2d=shape2,
        exact=not fields["bounds"] and not fields["estimated"],
        extra=extra, bounds=fields["bounds"], estimated=fields["estimated"])


#: ``rank.extra["note_noise"]`` of a rank counted above a modelled quantization noise
NOISE_NOTE = "numerical rank counted above the quantization noise, modelled as uniform within each element's floor"


def analyze_delta(base_raw: np.ndarray, tuned_raw: np.ndarray, dtype_base: str, dtype_tuned: str,
                  shape: tuple[int, ...], norm_delta_sq: float, *, k: int = 64, seed: int = 0,
                  exact_max: int = DEFAULT_EXACT_MAX, backend: Backend | None = None, noise_factor: float = 1.5,
                  subspace: bool = False, direct: bool = False,
                  extra_var: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None) -> RankRecord:
    """The ``rank`` block of one changed matrix from its whole base and tuned tensors.

    ``direct``: the full spectrum by an SVD of the delta itself, whatever its size (``Backend.spectrum``).

    ``extra_var``: noise the stored values carry beyond their dtype's rounding (a quantized side:
    ``measure.quant_floor.quant_noise_var``), as a per-element variance (flat float64 of ``m n``)
    or its (row, column) sums; added to the rounding profile before the floor is taken, so
    ``numerical_rank`` counts singular values above that noise too. A model, not a bound: the
    record says so (``extra["noise_model"] = "quantization"``).

    ``norm_delta_sq`` is the exact squared Frobenius norm of the delta from the stats pass
    (NaN or a negative value: recomputed here). Memory: one float32 copy of the matrix
    plus row-block temporaries (two copies with ``subspace``).
    """
    shape2 = shape_2d(shape)
    rows_b, cols_b = noise_profile(base_raw, dtype_base, shape2)
    rows_t, cols_t = noise_profile(tuned_raw, dtype_tuned, shape2)
    rows_v, cols_v = rows_b + rows_t, cols_b + cols_t
    if extra_var is not None:
        er, ec = _var_sums(extra_var, shape2)
        rows_v, cols_v = rows_v + er, cols_v + ec
    d = decode_delta(base_raw, tuned_raw, dtype_base, dtype_tuned, shape2)
    copied = copy_rounds(dtype_base, dtype_tuned)
    if copied:
        cr, cc = copy_noise(d)
        rows_v, cols_v = rows_v + cr, cols_v + cc
    floor, rms = noise_floor(rows_v, cols_v)
    extra: dict = {"noise_rms": rms}
    if extra_var is not None:
        extra["noise_model"] = "quantization"
        extra["note_noise"] = NOISE_NOTE
    if copied:
        extra["note_copy"] = COPY_NOTE
    if not (norm_delta_sq >= 0 and math.isfinite(norm_delta_sq)):
        norm_delta_sq = _sum_sq(d)
        extra["note"] = "norm_delta recomputed from the decoded delta (non-finite values count as 0)"
    if norm_delta_sq == 0:
        s, method, caps = np.zeros(min(shape2)), "exact", None
    else:
        s, method, caps = (backend or CPU).spectrum(d, k, seed, exact_max, norm_delta_sq, direct=direct)
    del d
    rec = _record(s, method, norm_delta_sq, shape2, k, floor, noise_factor, extra, caps)
    if extra_var is not None:
        _explained(rec, norm_delta_sq, float(rows_v.sum()))
    if not rec.exact:
        extra["note_bounds"] = (f"top {len(rec.spectrum)} of {min(shape2)} singular values: "
                                "fields in `bounds` are lower bounds, those in `estimated` approximate")
    if subspace:
        extra.update(weight_subspace(base_raw, tuned_raw, dtype_base, dtype_tuned, shape2, k=k, seed=seed,
                                     exact_max=exact_max, backend=backend))
    return rec


def analyze_device_delta(dd, norm_delta_sq: float, *, k: int = 64, seed: int = 0,
                         exact_max: int = DEFAULT_EXACT_MAX, backend: Backend, noise_factor: float = 1.5) -> RankRecord:
    """``analyze_delta`` of a matrix whose delta the stats pass kept on the device
    (``kernels.cuda.DeviceDelta``): the same record, without reading the checkpoint again."""
    rows_v, cols_v = dd.profile()
    d = dd.matrix()
    copied = copy_rounds(*dd.dtypes)
    if copied:
        cr, cc = _copy_noise_torch(d)
        rows_v, cols_v = rows_v + cr, cols_v + cc
    floor, rms = noise_floor(rows_v, cols_v)
    extra: dict = {"noise_rms": rms}
    if copied:
        extra["note_copy"] = COPY_NOTE
    if not (norm_delta_sq >= 0 and math.isfinite(norm_delta_sq)):
        import torch

        norm_delta_sq = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        extra["note"] = "norm_delta recomputed from the decoded delta (non-finite values count as 0)"
    if norm_delta_sq == 0:
        s, method, caps = np.zeros(min(dd.shape2)), "exact", None
    else:
        s, method, caps = backend.spectrum(d, k, seed, exact_max, norm_delta_sq)
    del d
    f32 = dd.fdtype != dd.torch.float64
    rec = _record(s, method, norm_delta_sq, dd.shape2, k, floor, noise_factor, extra, caps, d_float32=f32)
    if not rec.exact:
        extra["note_bounds"] = (f"top {len(rec.spectrum)} of {min(dd.shape2)} singular values: "
                                "fields in `bounds` are lower bounds, those in `estimated` approximate")
    return rec


def _copy_noise_torch(d) -> tuple[np.ndarray, np.ndarray]:
    """``copy_noise`` of a device tensor (float32 or float64), computed there (the ulp as the step to the next
    float32 up)."""
    import torch

    m, n = d.shape
    rows, cols = torch.zeros(m, dtype=torch.float64, device=d.device), torch.zeros(n, dtype=torch.float64,
                                                                                   device=d.device)
    step = _rows(m, n)
    for i in range(0, m, step):
        a = d[i:i + step].abs().to(torch.float32)
        sp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).to(torch.float64)
        v = sp * sp / 12.0
        rows[i:i + step] = v.sum(dim=1)
        cols += v.sum(dim=0)
    return rows.cpu().numpy(), cols.cpu().numpy()


#: the energy left outside the resolved directions may be at most this share of the modelled noise
#: energy for the noise to explain it (the uniform-within-floor model overstates the noise: its
#: variance was 1.2-1.4x the real error's for Q8_0, Q4_0, FP8, Q4_K and Q6_K, up to 2x for 4-bit
#: blocks with an outlier)
RESIDUAL_MAX = 1.0


def _explained(rec: RankRecord, norm_sq: float, noise_energy: float) -> None:
    """Whether the modelled quantization noise explains the change outside its top
    ``numerical_rank`` directions: ``extra["residual_energy_ratio"]`` (that energy over the noise
    energy) and ``extra["noise_explains_rest"]`` (at least one direction resolved, ratio at most
    ``RESIDUAL_MAX``). When it does not (a dense change whose bulk pokes just above the noise edge,
    or nothing above it at all), the numerical rank does not describe the change."""
    nr = rec.numerical_rank or 0
    top = np.sort(np.asarray(rec.spectrum, dtype=np.float64))[::-1][:nr]
    if norm_sq >= 0 and math.isfinite(norm_sq) and noise_energy > 0:
        rec.extra["energy_ratio"] = norm_sq / noise_energy       # the whole change's energy over the noise's
    if not (norm_sq >= 0 and math.isfinite(norm_sq)) or noise_energy <= 0 or nr > len(rec.spectrum):
        rec.extra["noise_explains_rest"] = False
        if nr > len(top) > 0 and norm_sq >= 0 and math.isfinite(norm_sq) and noise_energy > 0:
            # more directions above the noise than the spectrum kept: the energy outside them lies between what the
            # kept ones leave and that less the rest's largest possible share (each at most the last kept value)
            held = float(np.sum(top * top))
            rec.extra["residual_energy_ratio_bounds"] = [
                max(0.0, norm_sq - held - (nr - len(top)) * float(top[-1]) ** 2) / noise_energy,
                max(0.0, norm_sq - held) / noise_energy]
        return
    ratio = max(0.0, norm_sq - float(np.sum(top * top))) / noise_energy
    rec.extra["residual_energy_ratio"] = ratio
    rec.extra["noise_explains_rest"] = bool(nr >= 1 and ratio <= RESIDUAL_MAX)


def _var_sums(var, shape2: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row sums, column sums) of a per-element variance given flat (``m n``) or already summed."""
    m, n = shape2
    if isinstance(var, tuple):
        r, c = (np.asarray(x, dtype=np.float64).reshape(-1) for x in var)
    else:
        v = np.asarray(var, dtype=np.float64).reshape(m, n)
        r, c = v.sum(axis=1), v.sum(axis=0)
    if r.size != m or c.size != n:
        raise ValueError(f"extra_var sums of sizes {r.size}, {c.size} do not fit a {m} x {n} matrix")
    return r, c


def _decode_matrix(raw: np.ndarray, dtype: str, shape2: tuple[int, int]) -> np.ndarray:
    """One stored matrix as float32 (non-finite values as 0), row block by row block."""
    m, n = shape2
    bits = _bits(raw, dtype, shape2)
    out = np.empty(shape2, dtype=np.float32)
    step = _rows(m, n)
    for i in range(0, m, step):
        v = _to_float(bits[i:i + step], dtype)
        out[i:i + step] = np.where(np.isfinite(v), v, 0)
    return out


def weight_subspace(base_raw: np.ndarray, tuned_raw: np.ndarray, dtype_base: str, dtype_tuned: str,
                    shape2: tuple[int, int], *, k: int = 64, seed: int = 0,
                    exact_max: int = DEFAULT_EXACT_MAX, backend: Backend | None = None) -> dict:
    """Rank of the weights themselves and how far the fine-tune turned their top-k subspaces.

    For base W and tuned W': effective and stable rank of each (full spectrum when
    ``min(m, n) <= exact_max``, else estimated from the top k and the exact norm), and the
    principal angles between the top-k left (output) and right (input) singular
    subspaces: ``cos theta_i`` = singular values of ``U_k^T U'_k``. ``overlap`` is the mean
    ``cos^2`` (1: same subspace; ``k / min(m, n)`` expected for unrelated random ones).
    Both sides use the same sketch, so identical weights give overlap exactly 1.
    """
    backend = backend or CPU
    out: dict = {}
    vecs = []
    for side, raw, dtype in (("base", base_raw, dtype_base), ("tuned", tuned_raw, dtype_tuned)):
        w = _decode_matrix(raw, dtype, shape2)
        total = _sum_sq(w)
        s_full, method, _ = (backend.spectrum(w, k, seed, exact_max) if min(shape2) <= exact_max
                             else (None, "randomized", None))
        u, s, vt = backend.top_vectors(w, k, seed)
        del w
        f = (spectral.spectrum_fields(s_full, 0.0) if s_full is not None
             else spectral.partial_spectrum_fields(s, total, min(shape2), 0.0))
        out[f"effective_rank_{side}"] = f["effective_rank"]
        out[f"stable_rank_{side}"] = f["stable_rank"]
        out[f"rank_method_{side}"] = method
        vecs.append((u, vt))
    (ub, vb), (ut, vt_) = vecs
    kk = min(ub.shape[1], ut.shape[1])
    for name, x, y in (("left", ub[:, :kk], ut[:, :kk]), ("right", vb[:kk].T, vt_[:kk].T)):
        with blas_threads(1):
            c = np.clip(np.linalg.svd(x.T @ y, compute_uv=False), 0.0, 1.0)
        out[f"subspace_overlap_{name}"] = float(np.mean(c * c)) if kk else None
        out[f"principal_angles_deg_{name}"] = [float(v) for v in np.degrees(np.arccos(c))]
    out["subspace_k"] = kk
    return out


# --- PEFT adapters ---------------------------------------------------------------------------

#: a DoRA change ranked whole (``analyze_factors(dora_whole=...)``) of at most this many elements is held (32 MB of
#: float64) and ranked by an SVD of its delta, as ``compute.refine_rank`` ranks a plain pair whose Gram matrix could
#: only bracket its rank (a float32 base's floor lies below the Gram matrix's resolution); a larger one streams its Gram
DORA_DIRECT_MAX = 1 << 22


def analyze_factors(a: np.ndarray, b: np.ndarray, scale: float, base_raw: np.ndarray | None,
                    dtype_base: str, shape, *, k: int = 64, noise_factor: float = 1.5,
                    dtype_adapter: str = "F32", magnitude: np.ndarray | None = None,
                    dtype_magnitude: str | None = None, rows: np.ndarray | None = None,
                    base_windows=None, dora_whole: dict | None = None) -> tuple[dict, RankRecord]:
    """Exact stats and rank of a LoRA delta ``scale * b @ a`` (b: m x r, a: r x n), never whole.

    ``base_windows`` (in place of ``base_raw``): ``base_windows(k)`` iterates over the base's stored values in
    flat windows of ``k`` elements (``Checkpoint.windows``), each valid until the next: the base is read in
    row blocks, never held whole (a 128,256-row embedding is 1 GB in bfloat16), with the same numbers.

    ``rows`` (distinct row indices, one per row of ``a``; ``b`` None): b selects those rows, the delta is
    ``scale * a[j]`` in row ``rows[j]`` and zero elsewhere (PEFT's trainable tokens), never formed as an m x r
    matrix; its singular values are those of ``scale * a``.

    The spectrum comes from the r x r core (``kernels.spectral.factors_svd``); the stats
    (the keys of ``kernels.reference.finalize``) from the notional merged weight
    ``W + delta`` in float64, row block by row block. ``noise_floor`` is the floor the
    same delta would have after merging and saving in the base's dtype; without a base,
    0, and ``numerical_rank`` counts values above ``s_1 r eps`` of ``dtype_adapter``.

    DoRA (``magnitude``, one value per output row): the merged weight is
    ``diag(c) (W + scale b a)`` with ``c = magnitude / rownorm(W + scale b a)``; the stats
    are exact for that merged weight, the spectrum is exact for the direction update
    ``diag(c) scale b a`` only, and the row rescaling ``diag(c - 1) W`` (full rank) is
    reported in ``extra`` but not in the spectrum: ``exact`` is then False.

    ``dora_whole`` (``{"seed", "count", "exact_max"}``, a DoRA on a base, its smaller side at most ``exact_max``):
    the spectrum and ranks are the whole change's instead, ``diag(c) (W + scale b a) - W``, exact as a plain pair's
    (the same floor): a matrix of at most ``DORA_DIRECT_MAX`` elements by an SVD of its delta, a larger one from the
    float64 Gram matrix of its delta summed as the row blocks pass (``rank_stream.DeltaGram``; its certified count,
    or ``count`` its inertia), never the m x n delta held whole. The rescaled rows make such a change full rank
    whenever they move beyond the floor, so the direction term's spectrum alone bracketed the rank, [4, 8192] at 70B
    widths.

    A row whose factor ``c`` is within ``dora_tolerance`` of 1 (the rounding of PEFT's own norm,
    computed in the weight's dtype, and of the stored magnitude, ``dtype_magnitude``) takes
    ``c = 1``: PEFT's merge of an untrained DoRA gives the base back, and float64 arithmetic on
    the same numbers must not call that rounding a change (``extra["dora"]["rows_within_rounding"]``).
    """
    from ..kernels import reference

    m, n = shape_2d(shape)
    a = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if b is not None or magnitude is not None or rows.size != a.shape[0] or a.shape[1] != n or \
                (rows.size and (rows.min() < 0 or rows.max() >= m or np.unique(rows).size != rows.size)):
            raise ValueError(f"rows {rows.size} for a {a.shape}: not distinct rows of a {m} x {n} delta")
        order = np.argsort(rows, kind="stable")
        rows, a = rows[order], a[order]
        b = np.eye(a.shape[0])          # the spectrum of the selected rows: the selector's columns are orthonormal
    if not (getattr(b, "row_blocks", False) and magnitude is None):    # (a FourierFT B: its rows when read)
        b = np.asarray(b, dtype=np.float64).reshape(b.shape[0], -1)
    if rows is None and (b.shape[0] != m or a.shape[1] != n or b.shape[1] != a.shape[0]):
        raise ValueError(f"factors b {b.shape} @ a {a.shape} do not make a {m} x {n} delta")
    step = _rows(m, n)
    has_base = base_raw is not None or base_windows is not None
    if base_windows is not None:
        windows = iter(base_windows(step * n))
        block_of = lambda i: _bits(next(windows), dtype_base, (min(step, m - i), n))      # noqa: E731
    elif base_raw is not None:
        base2 = _bits(base_raw, dtype_base, (m, n))
        block_of = lambda i: base2[i:i + step]      # noqa: E731
    prof_rows, prof_cols = np.zeros(m), np.zeros(n)
    noisy = has_base and DTYPES[dtype_base].kind == "float"
    if noisy:
        table, shift, mask = _variance_table(dtype_base)
        scatter = noise_kernel()
    acc = None
    c_all = np.ones(m) if magnitude is not None else None
    mag_term = 0.0
    tol = dora_tolerance(n, dtype_base, dtype_magnitude or dtype_adapter, dtype_adapter)
    snapped = 0
    whole = dora_whole if magnitude is not None and has_base and dora_whole is not None and \
        min(m, n) <= dora_whole.get("exact_max", DEFAULT_EXACT_MAX) else None
    held = gram = None
    if whole is not None:
        if m * n <= DORA_DIRECT_MAX:
            held = np.zeros((m, n))
        else:
            from .rank_stream import DeltaGram

            gram = DeltaGram((m, n), "F64", "F64", count=bool(whole.get("count")), seed=int(whole.get("seed", 0)))
            gram.copied = False         # (its floor is given, finish_at: no float32 copy noise summed for it)
            gram.activate()
    for i in range(0, m, step):
        if rows is None:
            dblk = float(scale) * (b[i:i + step] @ a)
        else:
            dblk = np.zeros((min(step, m - i), n))
            lo, hi = np.searchsorted(rows, (i, i + step))
            dblk[rows[lo:hi] - i] = float(scale) * a[lo:hi]
        bblk = block_of(i) if has_base else None
        wb = np.zeros_like(dblk) if bblk is None else decode(bblk, dtype_base)
        if noisy:   # the base's storage rounding per row and column, in flat order: noise_profile's bits
            flat = bblk.reshape(-1)
            scatter(flat.view(_UINT[flat.dtype.itemsize]), shift, mask, table, i * n, n, prof_rows, prof_cols)
        if magnitude is not None:
            merged = wb + dblk
            c, near = _dora_factor(merged, np.asarray(magnitude, dtype=np.float64).reshape(-1)[i:i + step], tol)
            snapped += near
            c_all[i:i + step] = c
            mag_term += float(np.sum(((c - 1.0)[:, None] * wb) ** 2))
            tuned = c[:, None] * merged
            if held is not None:
                held[i:i + step] = tuned - wb
            elif gram is not None:         # (its decoder takes tuned - wb in float64, as above)
                gram.feed_delta(wb, tuned)
        else:
            tuned = wb + dblk
        part = (reference.delta_stats(wb, tuned, "F64", "F64") if bblk is None
                else reference.delta_stats(bblk, tuned, dtype_base, "F64"))
        acc = part if acc is None else reference.combine(acc, part)
    if acc is None:
        acc = reference.delta_stats(np.zeros(0), np.zeros(0), "F64", "F64")
    stats = reference.finalize(acc)
    if not has_base:
        for key in ("norm_base", "norm_tuned", "rel_change", "cosine", "frac_beyond_rounding", "frac_sign_flips"):
            stats[key] = None
        stats["sign_flips"] = 0
    b_dir = b if c_all is None else c_all[:, None] * b
    s = spectral.factors_svd(b_dir, a, scale)
    extra: dict = {"rank_r": int(a.shape[0])}
    if has_base:
        floor, rms = noise_floor(2 * prof_rows, 2 * prof_cols)
        extra["noise_rms"] = rms
        thr = noise_factor * floor
    else:
        floor = 0.0
        eps = 2.0 ** -DTYPES[dtype_adapter].mant_bits if DTYPES[dtype_adapter].kind == "float" else 2.0 ** -52
        thr = (float(s[0]) * max(a.shape[0], 1) * eps) if s.size else 0.0
        extra["note"] = "no base: numerical_rank counts singular values above s_1 * r * eps(adapter dtype)"
    norm_sq = float(np.sum(s * s))
    fields = spectral.spectrum_fields(s, thr)
    top = s[:k]
    exact = magnitude is None
    if magnitude is not None:
        extra["dora"] = {"magnitude_term_norm": math.sqrt(mag_term), "direction_term_norm": math.sqrt(norm_sq),
                         "rows_within_rounding": snapped, "rounding_tolerance": tol,
                         "note": "spectrum and ranks describe the low-rank direction update diag(c)*scale*B@A; "
                                 "the row rescaling diag(c-1)*W is full rank and is in the stats only; rows whose "
                                 "c is within rounding_tolerance of 1 take c = 1"}
    total = norm_sq if magnitude is None else (stats["norm_delta"] or 0.0) ** 2
    if whole is not None:
        extra["dora"]["note"] = ("spectrum and ranks describe the whole change diag(c)*(W + scale*B@A) - W, the "
                                 "direction term and the row rescaling; rows whose c is within rounding_tolerance "
                                 "of 1 take c = 1")
        if gram is not None:
            rec = gram.finish_at(total, noise_factor, k, floor, extra)
        else:
            s_all, method, caps = CPU.spectrum(held, k, int(whole.get("seed", 0)), min(m, n), total, direct=True)
            del held
            rec = _record(s_all, method, total, (m, n), k, floor, noise_factor, extra, caps)
        return stats, rec
    bounds: dict = {}
    estimated: list[str] = []
    if magnitude is not None:
        fields, bounds = _dora_bounds(s, math.sqrt(mag_term), total, thr, min(m, n), fields)
        estimated = ["stable_rank", "effective_rank"]
    rec = RankRecord(
        stable_rank=fields["stable_rank"], effective_rank=fields["effective_rank"],
        energy_rank_90=fields["energy_rank_90"], energy_rank_99=fields["energy_rank_99"],
        numerical_rank=fields["numerical_rank"], noise_floor=floor, spectrum=[float(v) for v in top],
        energy_captured=float(np.sum(top * top)) / total if total > 0 else None, method="factors",
        shape_2d=(m, n), exact=exact, extra=extra, bounds=bounds, estimated=estimated)
    return stats, rec


def _dora_factor(merged: np.ndarray, mag: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
    """DoRA's row factor c = magnitude / rownorm(merged), 1 within ``tol`` of 1, and how many rows took it."""
    norms = np.sqrt(np.einsum("ij,ij->i", merged, merged))
    c = np.divide(mag, norms, out=np.ones_like(norms), where=norms > 0)
    near = np.abs(c - 1.0) <= tol
    count = int(np.count_nonzero(near & (c != 1.0)))
    c[near] = 1.0
    return c, count


def merged_factor_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, magnitude: np.ndarray | None,
                         dtype_base: str, dtype_magnitude: str | None = None, dtype_adapter: str = "F32") -> np.ndarray:
    """The merged weight ``W + scale b a`` (DoRA: ``diag(c) (W + scale b a)``, c as ``analyze_factors``
    takes it) in float64, whole: for a module whose adapter saves its own base layer ``w`` [m, n]."""
    m, n = w.shape
    merged = np.asarray(w, dtype=np.float64) + float(scale) * (np.asarray(b, np.float64).reshape(m, -1)
                                                               @ np.asarray(a, np.float64).reshape(-1, n))
    if magnitude is not None:
        tol = dora_tolerance(n, dtype_base, dtype_magnitude or dtype_adapter, dtype_adapter)
        c, _ = _dora_factor(merged, np.asarray(magnitude, dtype=np.float64).reshape(-1), tol)
        merged *= c[:, None]
    return merged


def _unit_roundoff(dtype: str | None, default: float) -> float:
    d = DTYPES.get(dtype or "")
    return 2.0 ** -(d.mant_bits + 1) if d is not None and d.kind == "float" else default


def dora_tolerance(n: int, dtype_base: str, dtype_magnitude: str | None, dtype_adapter: str | None = None) -> float:
    """How far a DoRA factor ``magnitude / ||W + scale B A||`` (rows of ``n`` values) may sit from 1
    by rounding alone. PEFT computes the norm in the weight's dtype (rounding W + scale B A and the
    result: twice its unit roundoff ``u_w``), accumulating in float32 at least, and stores the magnitude
    in its own dtype (``u_m``); weightdiff recomputes the norm in float64. Bound:
    ``2 u_w + u_m + 2 sqrt(n) u_acc`` (``u_acc``: float32's, float64's when every dtype is F64). A base
    stored in an integer or packed format is dequantized by PEFT to 16 bits: bfloat16's ``u_w``.

    >>> round(dora_tolerance(64, "F32", "F32") * 1e6, 3), round(dora_tolerance(64, "BF16", "F32") * 1e3, 3)
    (1.132, 7.814)
    """
    u_w = _unit_roundoff(dtype_base, 2.0 ** -8)
    u_m = _unit_roundoff(dtype_magnitude, 2.0 ** -8)
    wide = all(d == "F64" for d in (dtype_base, dtype_magnitude, dtype_adapter or "F64"))
    u_acc = 2.0 ** -53 if wide else 2.0 ** -24
    return 2.0 * u_w + u_m + 2.0 * math.sqrt(max(n, 1)) * u_acc


def _dora_bounds(s: np.ndarray, mag_norm: float, total: float, thr: float, r: int,
                 fields: dict) -> tuple[dict, dict]:
    """Certified ranges of the ranks of a DoRA delta ``D + M`` from the exact spectrum ``s`` of
    its direction term ``D`` (rank at most the adapter's r) and the Frobenius norm of its
    magnitude term ``M = diag(c - 1) W`` (full rank): ``(fields, bounds)``.

    The top-j singular values form a unitarily invariant norm (Ky Fan (j, 2)), so
    ``sqrt(S_j(D + M))`` lies within ``||M||_F`` of ``sqrt(S_j(D))`` (``S_j``: the sum of the j
    largest squared singular values); with the exact ``total`` = ``||D + M||_F^2`` that brackets
    each energy rank. Weyl: ``s_i(D + M) >= s_i(D) - ||M||_2``, so the values of ``D`` above
    ``thr + ||M||_F`` count towards ``numerical_rank``, and so, from the energy, do at least
    ``(total - r thr^2) / ((s_1(D) + ||M||_F)^2 - thr^2)`` values; the upper end is ``min(m, n)``. Fields
    hold the lower ends, as for every partial spectrum (``judge.status.rank_upper`` reads the
    upper ends, which claims such as "low-rank" must hold for)."""
    fields = dict(fields)
    bounds: dict = {}
    sq = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    root = np.sqrt(sq)
    for q, key in ((0.9, "energy_rank_90"), (0.99, "energy_rank_99")):
        if not total > 0:
            break
        need = q * total
        caps = (root + mag_norm) ** 2 * (1.0 + 1e-9)           # margin for the rounding of these sums
        floors = np.clip(root - mag_norm, 0.0, None) ** 2 * (1.0 - 1e-9)
        lo = int(np.argmax(caps >= need)) + 1 if np.any(caps >= need) else min(len(sq) + 1, r)
        hi = int(np.argmax(floors >= need)) + 1 if np.any(floors >= need) else r
        lo = min(lo, hi)
        fields[key] = lo
        if lo != hi:
            bounds[key] = [lo, hi]
    lo_n = int(np.count_nonzero(np.asarray(s) > thr + mag_norm))
    # the energy says more when the magnitude term dominates: every singular value of D + M is at most
    # s_1(D) + ||M||_F, so total <= count x that^2 + (r - count) x thr^2 for the count above thr. A DoRA
    # module changed by half its norm read numerical_rank [0, 64], "at least 0", for a changed matrix.
    top = (float(s[0]) if len(s) else 0.0) + mag_norm
    if total > r * thr * thr and top > thr:
        need = (total * (1.0 - 1e-9) - r * thr * thr) / (top * top * (1.0 + 1e-9) - thr * thr)
        lo_n = max(lo_n, min(r, math.ceil(need - 1e-9)))
    fields["numerical_rank"] = lo_n
    if lo_n != r:
        bounds["numerical_rank"] = [lo_n, r]
    return fields, bounds

