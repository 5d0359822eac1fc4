r"""PEFT's OFT adapters (``peft_type`` OFT), read as the weights PEFT's merge gives.

OFT trains, for each adapted layer, ``r`` blocks of a block-diagonal rotation of the layer's inputs: each
block a ``b x b`` matrix made from ``b (b - 1) / 2`` parameters, the upper triangle of a skew-symmetric Q,
saved as ``<m>.oft_R.weight`` [r, b (b - 1) / 2] (one row under ``block_share``; ``<m>.oft_embedding_R.weight``
for an embedding). PEFT (0.14 and later; this module follows 0.21) turns each Q into a rotation by the Cayley
transform R = (I - Q)(I + Q)^-1, or by default by its Neumann series I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)
(``use_cayley_neumann``, n = ``num_cayley_neumann_terms``, 5), after projecting Q into a ball of radius
eps / sqrt(blocks) under ``coft``. Its merge gives a Linear layer W R^T (R the block-diagonal rotation,
``in_features`` wide: ``torch.mm(R, W.t()).t()``), a Conv2d its weight viewed [out, in x k x k] times R^T
(square kernels: PEFT views it with ``kernel_size[0]`` twice), an embedding W R, each computed in the
adapter's dtype and stored in the weight's.

Such a change is dense (W (R^T - I) has the rank of W), so it is measured as IA3's is: the merged weight
against the base's, as a plain pair (``measure.compute._compute_oft``), each record's note beginning
``OFT_NOTE`` (flag ``adapter``). r and b are derived from the base layer as PEFT derives them
(``oft_layout``: either ``r`` or ``oft_block_size`` is set, and an invalid one is moved to the nearest divisor
of the layer's inputs by ``adjust_oft_parameters``); the saved tensor must have the shape PEFT builds from them.

>>> import numpy as np
>>> r = rotations(np.array([[0.5]]), 2, cayley_neumann=False, terms=5, coft=False, eps=6e-5)
>>> bool(np.allclose(r[0] @ r[0].T, np.eye(2)))          # the exact transform: a rotation
True
>>> rotations(np.array([[0.5]]), 2, cayley_neumann=True, terms=2, coft=False, eps=6e-5)[0].tolist()
[[1.0, 1.0], [-1.0, 1.0]]
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from ..records import OFT_NOTE
from .safetensors_read import TensorInfo

__all__ = ["parse_oft_config", "oft_factors", "oft_layout", "check_oft", "check_oft_values", "rotations",
           "block_rotation", "merge_rows", "in_features", "old_peft", "OFT_NOTE", "MERGE_DTYPES"]

_PREFIX = "base_model.model."
_OFT_RE = re.compile(r"^(?P<mod>.+)\.oft_(?P<emb>embedding_)?R\.weight\Z", re.S)
#: the tensors of PEFT's OFT before 0.14 (``oft_r`` [r, b, b]), which PEFT 0.14 and later refuse to load
_OLD_RE = re.compile(r"^(?P<mod>.+)\.oft_r(?:\.weight)?\Z", re.S)
#: peft.OFTConfig's defaults
DEFAULTS = {"r": 0, "oft_block_size": 32, "coft": False, "eps": 6e-5, "block_share": False,
            "use_cayley_neumann": True, "num_cayley_neumann_terms": 5}
_TERMS_CAP = 64
_BLOCK_CAP = 1 << 16


def parse_oft_config(raw: dict, path: Path):
    """The AdapterConfig of an OFT config, typed as PEFT's dataclass types it (``r`` and ``oft_block_size``
    integers, exactly one of them non-zero; booleans real JSON booleans; ``eps`` a finite number; the number of
    Neumann terms a non-negative integer); the settings stay in ``raw`` with PEFT's defaults filled in."""
    from .peft_adapter import AdapterConfig, _bool, _number, _show, _targets

    if "oft_block_size" not in raw:
        # PEFT 0.14 changed OFT's parametrization and its check_kwargs refuses a config without the key
        raise CheckpointError(path, "OFT adapter config has no oft_block_size: an adapter from PEFT before 0.14, "
                                    "whose weights PEFT itself no longer loads (its OFT changed)",
                              "merge it with the PEFT it was trained with (0.13) and compare the merged model")
    got = {}
    for key in ("r", "oft_block_size", "num_cayley_neumann_terms"):
        v = raw.get(key, DEFAULTS[key])
        cap = _TERMS_CAP if key == "num_cayley_neumann_terms" else _BLOCK_CAP * _BLOCK_CAP
        if type(v) is not int or not 0 <= v <= cap:
            raise CheckpointError(path, f"adapter config has {key} = {_show(v)}, expected an integer from 0 to {cap:,}")
        got[key] = v
    if (got["r"] == 0) == (got["oft_block_size"] == 0):
        raise CheckpointError(path, f"adapter config has r = {got['r']} and oft_block_size = {got['oft_block_size']}: "
                                    "OFT takes exactly one of them (PEFT refuses the config)")
    for key in ("coft", "block_share", "use_cayley_neumann"):
        got[key] = _bool(path, raw, key) if key in raw else DEFAULTS[key]
    got["eps"] = _number(path, "eps", raw.get("eps", DEFAULTS["eps"]))
    fan = _bool(path, raw, "fan_in_fan_out")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(got["r"], 0.0, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, **got}, fan_in_fan_out=fan, path=Path(path), peft_type="OFT")


def old_peft(config) -> bool:
    """Whether the adapter was saved by a PEFT before 0.18 with the Neumann series on: PEFT 0.18 changed that
    series (it warns and computes its own), so the weights the adapter was trained with differ."""
    if not config.raw.get("use_cayley_neumann"):
        return False
    v = config.raw.get("peft_version")
    if not isinstance(v, str):
        return True
    m = re.match(r"(\d+)\.(\d+)", v.partition("@")[0])
    return m is None or (int(m[1]), int(m[2])) < (0, 18)


def oft_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind OFT, its ``oft_R`` tensor in ``parts``) per adapted module."""
    from .peft_adapter import LoraFactor, _is_float, refuse_other_method

    out = []
    for name, info in tensors.items():
        m = _OFT_RE.match(name) if ".oft_" in name else None
        if m is None:
            if ".oft_r" in name and _OLD_RE.match(name):
                raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, PEFT's OFT before 0.14, whose "
                                             "weights PEFT itself no longer loads",
                                      "merge it with the PEFT it was trained with (0.13) and compare the merged "
                                      "model")
            refuse_other_method(name, where, "OFT", "oft_R", "OFT")
            continue
        if not _is_float(info) or len(info.shape) != 2:
            raise CheckpointError(where, f"OFT tensor `{escape_name(name)}` is {info.dtype} {list(info.shape)}; "
                                         "expected a float matrix [blocks, b (b - 1) / 2]")
        mod = m["mod"]
        saved = f"{mod}.base_layer.weight"
        if saved in tensors and not _is_float(tensors[saved]):
            raise CheckpointError(where, f"base layer `{escape_name(saved)}` saved in the adapter is "
                                         f"{tensors[saved].dtype}; expected a float dtype")
        out.append(LoraFactor(mod.removeprefix(_PREFIX) + ".weight", name, name, None, int(info.shape[0]), 1.0,
                              embedding=bool(m["emb"]), kind="OFT", parts={"oft_R": name},
                              base_layer_name=saved if saved in tensors else None))
    return out


def _adjust(features: int, params: int) -> int:
    """PEFT's ``OFTLayer.adjust_oft_parameters``: ``params`` moved to a divisor of ``features`` (the nearer of
    the next one up and the next one down, the lower on a tie; ``features`` itself when ``params`` is not below
    it). Divisors are found up to the square root, not by PEFT's step-by-one walk (a prime width of 10^9)."""
    if params >= features:
        return features
    divs = set()
    i = 1
    while i * i <= features:
        if features % i == 0:
            divs.update((i, features // i))
        i += 1
    higher = min((d for d in divs if d >= params), default=features + 1)
    lower = max((d for d in divs if d <= params), default=1)
    return lower if params - lower <= higher - params else higher


def in_features(factor, shape: tuple) -> int | None:
    """The width OFT rotates for a base weight of ``shape``: a Linear's and an embedding's second side, a Conv2d's
    in_channels x k x k (None for a kernel that is not square, which PEFT's merge cannot view)."""
    if len(shape) == 4:
        return int(shape[1]) * int(shape[2]) * int(shape[3]) if shape[2] == shape[3] else None
    return int(shape[1]) if len(shape) == 2 else None


def oft_layout(config, features: int) -> tuple[int, int]:
    """(blocks, block size) PEFT builds on a layer rotating ``features`` inputs (``OFTLayer.update_layer``)."""
    r, b = config.raw.get("r", 0), config.raw.get("oft_block_size", DEFAULTS["oft_block_size"])
    if r == 0:
        if features % b or b > features:
            b = _adjust(features, b)
        return features // b, b
    if features % r or r > features:
        r = _adjust(features, r)
    return r, features // r


def check_oft(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """The ``oft_R`` tensor must be what PEFT builds on this base layer (headers only)."""
    t = f"`{escape_name(factor.target)}`"
    from .peft_adapter import saved_layer_shape

    shape = saved_layer_shape(factor, tensors, tuple(int(d) for d in base.shape), where)
    leaf = factor.target.removesuffix(".weight").rsplit(".", 1)[-1]
    if leaf in ("c_attn", "c_proj", "c_fc", "q_attn") and not factor.embedding and len(shape) == 2:
        raise CheckpointError(where, f"OFT module {t} is GPT-2's Conv1D, which PEFT's OFT does not build (it takes "
                                     "torch's Linear, Conv2d and Embedding)", "is this adapter for another base model?")
    if factor.embedding and len(shape) != 2 or len(shape) not in (2, 4):
        raise CheckpointError(where, f"OFT module {t}: the base weight is {list(shape)}, not a Linear, Conv2d or "
                                     "Embedding weight PEFT's OFT builds on")
    features = in_features(factor, shape)
    if features is None:
        raise CheckpointError(where, f"OFT module {t} is a Conv2d of kernel {list(shape[2:])}, which PEFT's merge "
                                     "cannot view (it takes the kernel as square)", "compare the model it computes")
    blocks, b = oft_layout(config, features)
    want = (1 if config.raw.get("block_share") else blocks, b * (b - 1) // 2)
    got = tuple(int(d) for d in tensors[factor.parts["oft_R"]].shape)
    if got != want:
        raise CheckpointError(where, f"OFT tensor `{escape_name(factor.parts['oft_R'])}` is {list(got)}, but PEFT "
                                     f"builds {list(want)} on {t} ({features:,} inputs in {blocks:,} blocks of {b:,}, "
                                     "from adapter_config.json's r / oft_block_size)",
                              "is this adapter for another base model, or its config from another adapter?")
    factor.r = blocks
    factor.cols = b


def _skew(vec: np.ndarray, b: int) -> np.ndarray:
    rows, cols = np.triu_indices(b, 1)          # torch.triu_indices(b, b, 1): the same row-major order
    q = np.zeros((vec.shape[0], b, b))
    q[:, rows, cols] = vec
    return q - q.transpose(0, 2, 1)


def rotations(vec: np.ndarray, b: int, cayley_neumann: bool, terms: int, coft: bool, eps: float) -> np.ndarray:
    """The float64 rotation blocks [n, b, b] of OFT parameters ``vec`` [n, b (b - 1) / 2], as
    ``OFTRotationModule.get_weight`` makes them (``_project_batch`` under coft, then ``_cayley_batch``)."""
    vec = np.asarray(vec, np.float64)
    if coft:
        q = _skew(vec, b)
        # eps * 1 / torch.sqrt(torch.tensor(blocks)): a float32 square root, and a float32 quotient
        radius = float(np.float32(eps) / np.sqrt(np.float32(q.shape[0])))
        norm = np.linalg.norm(q, axis=(1, 2), keepdims=True)
        with np.errstate(all="ignore"):
            q = np.where(norm <= radius, q, radius * (q / norm))
        rows, cols = np.triu_indices(b, 1)
        vec = q[:, rows, cols]
    q = _skew(vec, b)
    eye = np.broadcast_to(np.eye(b), q.shape)
    if not cayley_neumann:
        # torch.linalg.solve(I + Q, I - Q, left=False): X (I + Q) = I - Q
        return np.linalg.solve((eye + q).transpose(0, 2, 1), (eye - q).transpose(0, 2, 1)).transpose(0, 2, 1)
    r = eye.copy()
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            sq = q @ q
            r = r + 2.0 * sq
            power = sq
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            power = power @ q
            r = r + power
    return r


def block_rotation(config, values: np.ndarray, blocks: int, b: int) -> np.ndarray:
    """The rotation blocks [blocks, b, b] (float64) of one module's saved ``oft_R`` ``values``: one block
    repeated under ``block_share``."""
    raw = config.raw
    rot = rotations(values, b, bool(raw.get("use_cayley_neumann")), int(raw.get("num_cayley_neumann_terms", 5)),
                    bool(raw.get("coft")), float(raw.get("eps", DEFAULTS["eps"])))
    if raw.get("block_share"):
        rot = np.broadcast_to(rot[:1], (blocks, b, b))
    return rot


def merge_rows(w: np.ndarray, rot: np.ndarray, embedding: bool) -> np.ndarray:
    """Rows ``w`` [n, blocks x b] (float64) merged with block-diagonal ``rot``: W R^T for a Linear or a Conv2d
    (PEFT's ``torch.mm(R, W.t()).t()``), W R for an embedding (``torch.mm(W, R)``)."""
    n = w.shape[0]
    blocks, b = rot.shape[0], rot.shape[1]
    x = w.reshape(n, blocks, b)
    spec = "nkc,kdc->nkd" if not embedding else "nkc,kcd->nkd"    # row . R_k^T, or row . R_k
    return np.einsum(spec, x, rot, optimize=True).reshape(n, blocks * b)


#: the float dtypes an OFT merge is reproduced in (a quantized or integer base is refused, as for IA3)
MERGE_DTYPES = ("F16", "BF16", "F32", "F64")
#: a rotation block with a Frobenius norm above this is no rotation of any trained adapter (a Q of 1e30: its
#: Neumann series would overflow the merged weight)
_ROTATION_CAP = 1e15


def check_oft_values(factor, values: np.ndarray, config, base: TensorInfo, quantized: bool, where: Path) -> None:
    """Before the plan is shown: the base weight must be a float one PEFT's merge rotates (not quantized), and the
    saved parameters must make finite rotations of a sane size."""
    t = f"`{escape_name(factor.target)}`"
    if base.dtype not in MERGE_DTYPES or quantized:
        raise CheckpointError(where, f"OFT module {t} rotates the base's weight, which is "
                                     f"{'quantized' if quantized else base.dtype}: weightdiff merges OFT into float16, "
                                     "bfloat16, float32 or float64 weights only",
                              "merge the adapter (merge_and_unload) and compare the merged model")
    name = factor.parts["oft_R"]
    if not np.isfinite(values).all():
        raise CheckpointError(where, f"OFT tensor `{escape_name(name)}` holds NaN or Inf values, so the change of "
                                     f"{t} cannot be measured")
    with np.errstate(all="ignore"):
        rot = block_rotation(config, values.reshape(values.shape[0], -1), factor.r, factor.cols)
        size = float(np.linalg.norm(rot, axis=(1, 2)).max()) if rot.size else 0.0
    if not math.isfinite(size) or size > _ROTATION_CAP:
        raise CheckpointError(where, f"OFT tensor `{escape_name(name)}` makes rotation blocks of norm "
                                     f"{size:.3g}, where a rotation's is sqrt({factor.cols}): its parameters are not "
                                     "a trained adapter's", "is the adapter file corrupt?")
