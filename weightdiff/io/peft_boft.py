r"""PEFT's BOFT adapters (``peft_type`` BOFT), read as the weights PEFT's merge gives.

BOFT (butterfly orthogonal fine-tuning) trains, for each adapted Linear or Conv2d layer, ``N`` butterfly factors
of ``D`` blocks of ``H x H`` matrices, saved whole as ``<m>.boft_R`` [N, D, H, H], and a scale per output,
``<m>.boft_s`` ([out, 1] for a Linear, [1, out] for a Conv2d). PEFT (this follows 0.21) makes each block a
rotation by the Cayley transform of its skew-symmetric part, R = (I - S)(I + S)^-1 with S = (A - A^T) / 2, in
the adapter's dtype; factor i is the block-diagonal of its D rotations conjugated by a butterfly permutation,
T_i = P_i B_i P_i^T (P_0 = I), and the rotation is M = T_{N-1} ... T_1 T_0. Its merge gives a Linear layer
(W M^T) s (``torch.mm(M, W.t()).t() * boft_s``), a Conv2d its weight viewed [out, in x k x k] the same (PEFT
views it with ``kernel_size[0]`` twice), computed in the adapter's dtype and stored in the weight's.

Without PEFT's CUDA extension (``fbd_cuda``), PEFT builds one factor whatever ``boft_n_butterfly_factor`` says
(it sets the factor to 1 "to speed up the finetuning process"): adapters trained so have N = 1, and those
trained with it N = ``boft_n_butterfly_factor``; each is measured as PEFT merges it where it was built.

Such a change is dense, as OFT's is, so each module is measured as the merged weight against the base's, as a
plain pair (``measure.compute._compute_oft``), each record's note beginning ``BOFT_NOTE`` (flag ``adapter``;
``summary.scope.oft`` counts the adapter's own values).

>>> butterfly_perm(8, 1, 2, 1).tolist()                    # PEFT's block_butterfly_perm(8, 1, 2, 1)
[0, 1, 4, 5, 2, 3, 6, 7]
>>> import numpy as np
>>> r = cayley(np.array([[[0.0, 1.0], [-1.0, 0.0]]]))
>>> bool(np.allclose(r[0] @ r[0].T, np.eye(2)))
True
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from ..records import BOFT_NOTE
from .safetensors_read import TensorInfo

__all__ = ["parse_boft_config", "boft_factors", "check_boft", "check_boft_values", "cayley", "butterfly_perm",
           "merge_boft_rows", "BOFT_NOTE"]

_PREFIX = "base_model.model."
_BOFT_RE = re.compile(r"^(?P<mod>.+)\.boft_(?P<k>R|s)\Z", re.S)
#: peft.BOFTConfig's defaults
DEFAULTS = {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1}
_CAP = 1 << 24
#: a block entry above this is no trained adapter's (the Cayley solve of 1e300 entries overflows)
_VALUE_CAP = 1e15
_MERGE = "merge the adapter (merge_and_unload) and compare the merged model"


def parse_boft_config(raw: dict, path: Path):
    """The AdapterConfig of a BOFT config, typed as PEFT's dataclass types it (exactly one of ``boft_block_size``
    and ``boft_block_num`` non-zero, ``boft_n_butterfly_factor`` a positive integer); the settings stay in ``raw``
    with PEFT's defaults filled in."""
    from .peft_adapter import AdapterConfig, _bool, _show, _targets

    got = {}
    for key in DEFAULTS:
        v = raw.get(key, DEFAULTS[key])
        if type(v) is not int or not 0 <= v <= _CAP or (key == "boft_n_butterfly_factor" and v < 1):
            low = 1 if key == "boft_n_butterfly_factor" else 0
            raise CheckpointError(path, f"adapter config has {key} = {_show(v)}, expected an integer from {low} to "
                                        f"{_CAP:,}")
        got[key] = v
    if (got["boft_block_size"] == 0) == (got["boft_block_num"] == 0):
        raise CheckpointError(path, f"adapter config has boft_block_size = {got['boft_block_size']} and "
                                    f"boft_block_num = {got['boft_block_num']}: BOFT takes exactly one of them (PEFT "
                                    "refuses the config)")
    fan = _bool(path, raw, "fan_in_fan_out")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(0, 0.0, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, **got}, fan_in_fan_out=fan, path=Path(path), peft_type="BOFT")


def boft_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind BOFT, its ``boft_R`` and ``boft_s`` in ``parts``) per adapted module."""
    from .peft_adapter import LoraFactor, _is_float, module_parts

    parts = module_parts(tensors, where, _BOFT_RE, ".boft_", "k", "BOFT", "boft_R, boft_s", "BOFT")
    out = []
    for mod, got in parts.items():
        if set(got) != {"R", "s"}:
            raise CheckpointError(where, f"BOFT module `{escape_name(mod)}` has only one of boft_R and boft_s")
        r, s = tensors[got["R"]], tensors[got["s"]]
        if not _is_float(r) or len(r.shape) != 4 or r.shape[2] != r.shape[3] or not all(r.shape):
            raise CheckpointError(where, f"BOFT tensor `{escape_name(got['R'])}` is {r.dtype} {list(r.shape)}; "
                                         "expected float blocks [factors, blocks, b, b]")
        if r.dtype not in ("F32", "F64"):
            raise CheckpointError(where, f"BOFT tensor `{escape_name(got['R'])}` is {r.dtype}: PEFT's Cayley "
                                         "transform (torch.linalg.solve) does not run in it", _MERGE)
        if not _is_float(s) or len(s.shape) != 2:
            raise CheckpointError(where, f"BOFT tensor `{escape_name(got['s'])}` is {s.dtype} {list(s.shape)}; "
                                         "expected a float scale per output, [out, 1] or [1, out]")
        out.append(LoraFactor(mod.removeprefix(_PREFIX) + ".weight", got["R"], got["s"], None, int(r.shape[1]), 1.0,
                              kind="BOFT", parts={"boft_R": got["R"], "boft_s": got["s"]}))
    return out


def features_of(shape: tuple) -> int | None:
    """The width BOFT rotates for a base weight of ``shape``: a Linear's inputs, a Conv2d's in_channels x k x k
    (None for a kernel that is not square, which PEFT's merge cannot view)."""
    if len(shape) == 4:
        return int(shape[1]) * int(shape[2]) * int(shape[3]) if shape[2] == shape[3] else None
    return int(shape[1]) if len(shape) == 2 else None


def linear_or_conv2d_inputs(label: str, factor, shape: tuple, where: Path) -> int:
    """The inputs of a base weight of ``shape`` that a method PEFT builds on torch's Linear and Conv2d only (BOFT,
    HRA) transforms (``features_of``); GPT-2's Conv1D, another layer and a non-square Conv2d kernel (PEFT's merge
    views the kernel as square) refused."""
    t = f"`{escape_name(factor.target)}`"
    leaf = factor.target.removesuffix(".weight").rsplit(".", 1)[-1]
    if leaf in ("c_attn", "c_proj", "c_fc", "q_attn") and len(shape) == 2:
        raise CheckpointError(where, f"{label} module {t} is GPT-2's Conv1D, which PEFT's {label} does not build (it "
                                     "takes torch's Linear and Conv2d)", "is this adapter for another base model?")
    if len(shape) not in (2, 4):
        raise CheckpointError(where, f"{label} module {t}: the base weight is {list(shape)}, not a Linear or Conv2d "
                                     f"weight PEFT's {label} builds on", "is this adapter for another base model?")
    features = features_of(shape)
    if features is None:
        raise CheckpointError(where, f"{label} module {t} is a Conv2d of kernel {list(shape[2:])}, which PEFT's "
                                     "merge cannot view (it takes the kernel as square)", _MERGE)
    return features


def check_boft(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """``boft_R`` and ``boft_s`` must be what PEFT builds on this base layer (headers only)."""
    t = f"`{escape_name(factor.target)}`"
    shape = tuple(int(d) for d in base.shape)
    features = linear_or_conv2d_inputs("BOFT", factor, shape, where)
    raw = config.raw
    size, num = raw["boft_block_size"], raw["boft_block_num"]
    n, d, h = (int(x) for x in tensors[factor.parts["boft_R"]].shape[:3])
    want_d, want_h = (features // size, size) if size else (num, features // num if num else 0)
    if (size and features % size) or (num and features % num):
        raise CheckpointError(where, f"BOFT module {t}: its {features:,} inputs are not divisible by "
                                     f"{'boft_block_size ' + str(size) if size else 'boft_block_num ' + str(num)} "
                                     "(PEFT refuses to build it)", "is this adapter for another base model?")
    butterfly = n - 1
    ok = (d, h) == (want_d, want_h) and n in (1, raw["boft_n_butterfly_factor"])
    if ok and butterfly and not (d % 2 == 0 and h % 2 == 0 and butterfly <= int(math.log2(d))
                                 and d % (1 << butterfly) == 0 and features >= h * (1 << butterfly)):
        raise CheckpointError(where, f"BOFT tensor `{escape_name(factor.parts['boft_R'])}` holds {n} butterfly factors "
                                     f"of {d} blocks of {h}, which PEFT does not build on {t} (several factors need "
                                     f"an even number of blocks, a multiple of 2^{butterfly}, of an even size)",
                              "is this adapter for another base model, or its config from another adapter?")
    if not ok:
        nb = raw["boft_n_butterfly_factor"]
        factors = "1" if nb == 1 else f"1 or {nb}"
        raise CheckpointError(where, f"BOFT tensor `{escape_name(factor.parts['boft_R'])}` is {[n, d, h, h]}, but "
                                     f"PEFT builds [{factors}, {want_d}, {want_h}, "
                                     f"{want_h}] on {t} ({features:,} inputs, from adapter_config.json's "
                                     "boft_block_size / boft_block_num and boft_n_butterfly_factor)",
                              "is this adapter for another base model, or its config from another adapter?")
    s = tuple(int(x) for x in tensors[factor.parts["boft_s"]].shape)
    if s != ((shape[0], 1) if len(shape) == 2 else (1, shape[0])):
        raise CheckpointError(where, f"BOFT tensor `{escape_name(factor.parts['boft_s'])}` is {list(s)}; PEFT "
                                     f"builds one scale per output of {t}, "
                                     f"{[shape[0], 1] if len(shape) == 2 else [1, shape[0]]}",
                              "is this adapter for another base model?")
    factor.r, factor.cols = d, h


def check_boft_values(factor, values: dict, base: TensorInfo, quantized: bool, where: Path) -> None:
    """Before the plan is shown: a float base weight PEFT's merge rotates (not quantized), finite values of a
    trained adapter's size."""
    from .peft_oft import MERGE_DTYPES

    t = f"`{escape_name(factor.target)}`"
    if base.dtype not in MERGE_DTYPES or quantized:
        raise CheckpointError(where, f"BOFT module {t} rotates the base's weight, which is "
                                     f"{'quantized' if quantized else base.dtype}: weightdiff merges BOFT into "
                                     "float16, bfloat16, float32 or float64 weights only", _MERGE)
    for role in ("boft_R", "boft_s"):
        x = values[factor.parts[role]]
        with np.errstate(all="ignore"):
            big = float(np.max(np.abs(x))) if x.size else 0.0
        if not np.isfinite(x).all() or big > _VALUE_CAP:
            raise CheckpointError(where, f"BOFT tensor `{escape_name(factor.parts[role])}` holds "
                                         f"{'NaN or Inf values' if not np.isfinite(x).all() else f'values up to {big:.3g}'}"
                                         f", so the change of {t} cannot be measured", "is the adapter file corrupt?")


def cayley(blocks: np.ndarray) -> np.ndarray:
    """The rotations [n, b, b] (float64) PEFT's ``cayley_batch`` makes of blocks [n, b, b]: the skew-symmetric part
    S = (A - A^T) / 2, then (I - S)(I + S)^-1 (``torch.linalg.solve(I + S, I - S, left=False)``)."""
    a = np.asarray(blocks, np.float64)
    s = 0.5 * (a - a.transpose(0, 2, 1))
    eye = np.broadcast_to(np.eye(a.shape[1]), a.shape)
    return np.linalg.solve((eye + s).transpose(0, 2, 1), (eye - s).transpose(0, 2, 1)).transpose(0, 2, 1)


def butterfly_perm(n: int, b: int, r: int, factors: int) -> np.ndarray:
    """PEFT's ``block_butterfly_perm(n, b, r, n_butterfly_factor)``: the identity when ``factors`` is 0, else
    within each of ``b`` blocks of ``n / b`` the runs of ``r`` in the order even runs first, then odd ones."""
    if factors == 0:
        return np.arange(n)
    size = n // b
    step = size // r
    order = np.concatenate([np.arange(0, step, 2), np.arange(1, step, 2)])
    sorted_order = (order[:, None] * r + np.arange(r)[None, :]).reshape(-1)
    return (np.arange(0, n, size)[:, None] + sorted_order[None, :]).reshape(-1)


def merge_boft_rows(w: np.ndarray, rots: np.ndarray, perms: list[np.ndarray]) -> np.ndarray:
    """Rows ``w`` [n, features] (float64) times M^T, M = T_{N-1} ... T_0, T_i = P_i B_i P_i^T (B_i the
    block-diagonal of ``rots[i]`` [D, b, b], P_i the permutation matrix of ``perms[i]``: P[j, perm[j]] = 1):
    x T_i^T = ((x P_i) B_i^T) P_i^T, each a gather or a block product."""
    n = w.shape[0]
    x = w
    for rot, perm in zip(rots, perms):
        d, b = rot.shape[0], rot.shape[1]
        x = x[:, np.argsort(perm)]                                   # x P
        x = np.einsum("nkc,kdc->nkd", x.reshape(n, d, b), rot, optimize=True).reshape(n, d * b)   # . B^T
        x = x[:, perm]                                               # . P^T
    return x


def rotations_of(factor, values: np.ndarray, features: int, config) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rotations [N, D, b, b] (float64) and the N permutations of a module's saved ``boft_R`` ``values``."""
    n, d, h = values.shape[:3]
    rots = cayley(values.reshape(n * d, h, h)).reshape(n, d, h, h)
    perms = [butterfly_perm(features, d // (1 << i), h // 2, n - 1) for i in range(n)]
    return rots, perms


def boft_note(factor, values: int, base_layer: str | None = None) -> str:
    """The record note of a base weight a BOFT adapter rotates and scales (``BOFT_NOTE`` first)."""
    return (f"{BOFT_NOTE} `{factor.parts['boft_R']}` and scales `{factor.parts['boft_s']}` ({values} value"
            f"{'s' if values != 1 else ''}; {factor.r} blocks of {factor.cols}) merged into the base's weight "
            "((W M^T) s, M the butterfly rotation of its inputs), as PEFT merges it")
