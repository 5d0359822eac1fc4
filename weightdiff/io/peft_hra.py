r"""PEFT's HRA adapters (``peft_type`` HRA: Householder reflection adaptation), read as the factor pair they make.

HRA trains, for each adapted Linear or Conv2d layer, ``r`` vectors of the layer's inputs, saved as ``<m>.hra_u``
[in, r] (a Conv2d's inputs are in x k x k, its kernel taken as square). PEFT (this module follows 0.21) makes the
layer's weight W H, H the product of the reflections I - 2 u_i u_i^T of the columns normalized, in their order
(``HRALayer.get_delta_weight``), or, under ``apply_GS``, I - 2 V V^T with V the columns orthonormalized by modified
Gram-Schmidt; its merge is ``torch.mm(W, H)`` (a Conv2d's weight viewed [out, in x k x k]).

H - I has rank at most r, so the change W (H - I) is a factor pair B @ A of rank at most r, measured exactly as a
LoRA's is (``measure.rank.analyze_factors``): with P = W U (the normalized columns, one pass over W's rows) and
G = U^T U, applying the reflections in turn gives W H = W + sum_i c_i u_i^T with
c_i = -2 (P_i + sum_{j<i} c_j G_ji), so B = [c_0 ... c_{r-1}] and A = U^T; under ``apply_GS``, B = -2 W V and
A = V^T. A record's ``compared`` is ``factors`` (flag ``adapter``).

>>> import numpy as np
>>> w = np.arange(6.0).reshape(2, 3)
>>> u = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
>>> a = reflections(u, apply_gs=False)
>>> b = factor_b(w @ a.T, a)
>>> h = np.eye(3)
>>> for i in range(2):
...     v = a[i][:, None]
...     h = h - 2 * h @ v @ v.T
>>> bool(np.allclose(w + b @ a, w @ h))
True
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_hra_config", "hra_factors", "check_hra", "reflections", "factor_b", "hra_note"]

_PREFIX = "base_model.model."
_HRA_RE = re.compile(r"^(?P<mod>.+)\.hra_u\Z", re.S)


def parse_hra_config(raw: dict, path: Path):
    """The AdapterConfig of an HRA config: ``r`` (PEFT's default 8) a positive integer, ``apply_GS`` a boolean."""
    from .peft_adapter import AdapterConfig, _bool, _rank, _targets

    r = _rank(path, "r", raw.get("r", 8))
    gs = _bool(path, raw, "apply_GS")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, 0.0, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, "r": r, "apply_GS": gs}, path=Path(path), peft_type="HRA")


def is_hra(name: str) -> bool:
    return _HRA_RE.match(name) is not None


def hra_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind HRA, its ``hra_u`` tensor in ``parts``) per adapted module."""
    from .peft_adapter import LoraFactor, _is_float, own_tensors

    out = []
    for name, info, m in own_tensors(tensors, where, _HRA_RE, ".hra_u", "HRA", "hra_u", "HRA"):
        if not _is_float(info) or len(info.shape) != 2:
            raise CheckpointError(where, f"HRA tensor `{escape_name(name)}` is {info.dtype} {list(info.shape)}; "
                                         "expected a float matrix [inputs, r]")
        if int(info.shape[1]) != config.r:
            raise CheckpointError(where, f"HRA tensor `{escape_name(name)}` holds {int(info.shape[1]):,} vectors, but "
                                         f"adapter_config.json says r = {config.r} (PEFT builds r)",
                                  "tensors and config from different adapters?")
        out.append(LoraFactor(m["mod"].removeprefix(_PREFIX) + ".weight", name, name, None, config.r, 1.0,
                              kind="HRA", parts={"hra_u": name}, apply_gs=bool(config.raw.get("apply_GS"))))
    return out


def check_hra(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """The ``hra_u`` tensor must be what PEFT builds on this base layer (headers only): a Linear's [in, r], a
    Conv2d's [in x k x k, r] (square kernels; PEFT builds no grouped one)."""
    from .peft_adapter import float_base_shape
    from .peft_boft import linear_or_conv2d_inputs

    t = f"`{escape_name(factor.target)}`"
    shape = float_base_shape("HRA", "Linear and Conv2d", factor, base, where)
    inputs = linear_or_conv2d_inputs("HRA", factor, shape, where)
    got = tuple(int(d) for d in tensors[factor.parts["hra_u"]].shape)
    if got[0] != inputs:
        raise CheckpointError(where, f"HRA tensor `{escape_name(factor.parts['hra_u'])}` is {list(got)}, but PEFT "
                                     f"builds [{inputs:,}, {got[1]:,}] on {t} (its {inputs:,} inputs)",
                              "is this adapter for another base model?")
    factor.cols = inputs


def reflections(u: np.ndarray, apply_gs: bool) -> np.ndarray:
    """A [r, in]: the unit vectors of the reflections, as rows (the columns of ``u`` normalized; under
    ``apply_gs`` orthonormalized by modified Gram-Schmidt, as PEFT's loop does). A zero column (no reflection:
    PEFT divides by its norm) is bad input, refused by ``check_hra_values`` first."""
    u = np.asarray(u, np.float64)
    if not apply_gs:
        return (u / np.linalg.norm(u, axis=0)).T.copy()
    out = []
    for i in range(u.shape[1]):
        x = u[:, i].copy()
        for v in out:
            x -= (v @ x) * v
        out.append(x / np.linalg.norm(x))
    return np.array(out).reshape(u.shape[1], u.shape[0])


def factor_b(p: np.ndarray, a: np.ndarray, apply_gs: bool = False) -> np.ndarray:
    """B [out, r] with W (H - I) = B @ A, from P = W A^T [out, r] and the reflections A [r, in]."""
    p = np.asarray(p, np.float64)
    if apply_gs:
        return -2.0 * p
    g = a @ a.T
    b = np.empty_like(p)
    for i in range(p.shape[1]):
        b[:, i] = -2.0 * (p[:, i] + b[:, :i] @ g[:i, i])
    return b


def check_hra_values(factor, u: np.ndarray, where: Path, apply_gs: bool) -> None:
    """Finite vectors, none of them zero (PEFT normalizes each: a zero one gives NaN), and under ``apply_GS`` none in
    the span of those before it (its Gram-Schmidt remainder is zero)."""
    name = factor.parts["hra_u"]
    if not np.isfinite(u).all():
        raise CheckpointError(where, f"HRA tensor `{escape_name(name)}` holds NaN or Inf values, so the delta of "
                                     f"`{escape_name(factor.target)}` cannot be measured")
    with np.errstate(all="ignore"):
        scale = np.abs(u).max(axis=0)
        unit = u / np.where(scale > 0, scale, 1.0)
        norms = np.linalg.norm(unit, axis=0)
    if (scale == 0).any() or not np.isfinite(norms).all():
        i = int(np.flatnonzero(scale == 0)[0]) if (scale == 0).any() else 0
        raise CheckpointError(where, f"HRA tensor `{escape_name(name)}` has vector {i} all zero: PEFT normalizes each "
                              "vector, and that one gives NaN in the merged weight")
    if apply_gs:
        q, r = np.linalg.qr(unit / norms)
        weak = np.abs(np.diag(r)) < 1e-12
        if weak.any():
            raise CheckpointError(where, f"HRA tensor `{escape_name(name)}` has vector {int(np.flatnonzero(weak)[0])} "
                                         "in the span of those before it: under apply_GS, PEFT's Gram-Schmidt divides "
                                         "by its zero remainder (NaN in the merged weight)")


def hra_note(factor, apply_gs: bool) -> str:
    r = factor.r
    how = "orthonormalized (apply_GS): H = I - 2 V V^T" if apply_gs else "applied in turn"
    return (f"HRA `{factor.parts['hra_u']}` ({r} Householder reflection{'s' if r != 1 else ''} of the inputs, {how}) "
            f"measured exactly as the factor pair W (H - I) = B @ A that PEFT's merge W H adds, rank at most {r}")
