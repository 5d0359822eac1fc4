r"""PEFT's DeLoRA adapters (``peft_type`` DELORA: decoupled low-rank adaptation), read as the factor pair they make.

DeLoRA trains, for each adapted Linear layer, ``<m>.delora_A`` [r, in], ``<m>.delora_B`` [out, r] and a scalar
``<m>.delora_lambda`` [1], and saves ``<m>.delora_w_norm`` [in], the norms of the base weight's columns taken when
the adapter was made (a persistent buffer). PEFT (this module follows 0.21, ``DeloraLayer._compute_delta``) adds
B diag(lambda / r / (|A_i| |B^i|)) A, each column then scaled by w_norm: each rank-one term normalized (row norms of
A and column norms of B, clamped below at 1e-4) and bounded by lambda. That is the factor pair
B' = B diag(lambda / r / (|A_i| |B^i|)), A' = A diag(w_norm), of rank at most r, measured exactly as a LoRA's is.

>>> import numpy as np
>>> from types import SimpleNamespace
>>> rng = np.random.default_rng(0)
>>> a, b, w = rng.standard_normal((2, 5)), rng.standard_normal((3, 2)), rng.uniform(1, 2, 5)
>>> a2, b2 = delora_product(SimpleNamespace(r=2), {"A": a, "B": b, "lambda": np.array([3.0]), "w_norm": w})
>>> d = np.diag(3.0 / 2 / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=0)))
>>> bool(np.allclose(b2 @ a2, (b @ d @ a) * w[None, :]))
True
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_delora_config", "delora_factors", "check_delora", "delora_product", "delora_note", "is_delora"]

_PREFIX = "base_model.model."
_PART_RE = re.compile(r"^(?P<mod>.+)\.delora_(?P<part>A|B|lambda|w_norm)\Z", re.S)
_ROLES = ("A", "B", "lambda", "w_norm")
#: PEFT's clamp of the factors' norms
NORM_MIN = 1e-4


def parse_delora_config(raw: dict, path: Path):
    """The AdapterConfig of a DeLoRA config: ``r`` (PEFT's default 8) a positive integer, ``rank_pattern`` checked as
    LoRA's (lambda is a trained tensor of the adapter; the config's ``delora_lambda`` is only its start)."""
    from .peft_adapter import AdapterConfig, _patterns, _rank, _targets

    r = _rank(path, "r", raw.get("r", 8))
    repeats = _patterns({k: raw[k] for k in ("rank_pattern",) if k in raw}, path)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, 0.0, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, "r": r}, path=Path(path), repeats=repeats, peft_type="DELORA")


def is_delora(name: str) -> bool:
    return _PART_RE.match(name) is not None


def delora_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind DELORA, its four tensors in ``parts``) per adapted module."""
    from .peft_adapter import LoraFactor, _is_float, module_parts

    mods = module_parts(tensors, where, _PART_RE, ".delora_", "part", "DeLoRA",
                        "delora_A, delora_B, delora_lambda, delora_w_norm", "DELORA")
    out = []
    for mod, got in mods.items():
        missing = [f"delora_{k}" for k in _ROLES if k not in got]
        if missing:
            raise CheckpointError(where, f"DeLoRA module `{escape_name(mod)}` lacks {', '.join(missing)} (PEFT saves "
                                         "delora_A, delora_B, delora_lambda and delora_w_norm for each)")
        for n in got.values():
            if not _is_float(tensors[n]):
                raise CheckpointError(where, f"DeLoRA tensor `{escape_name(n)}` is {tensors[n].dtype}; expected a float "
                                             "dtype")
        sa, sb = tuple(tensors[got["A"]].shape), tuple(tensors[got["B"]].shape)
        sl, sw = tuple(tensors[got["lambda"]].shape), tuple(tensors[got["w_norm"]].shape)
        module = mod.removeprefix(_PREFIX)
        r = int(config.pattern("rank_pattern", module, config.r))
        if len(sa) != 2 or len(sb) != 2 or sa[0] != r or sb[1] != r or sw != (sa[1],) or int(np.prod(sl)) != 1:
            raise CheckpointError(where, f"DeLoRA tensors of `{escape_name(mod)}` are delora_A {list(sa)}, delora_B "
                                         f"{list(sb)}, delora_lambda {list(sl)}, delora_w_norm {list(sw)}; PEFT builds "
                                         f"[{r}, in], [out, {r}], [1] and [in] (r = {r} by adapter_config.json)",
                                  "tensors and config from different adapters?")
        out.append(LoraFactor(module + ".weight", got["A"], got["B"], None, r, 1.0, kind="DELORA", parts=dict(got)))
    return out


def check_delora(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """The factors must fit the Linear weight [out, in] PEFT builds DeLoRA on (headers only; GPT-2's Conv1D, which
    PEFT's DeLoRA does not build on, refused by name)."""
    t = f"`{escape_name(factor.target)}`"
    shape = tuple(int(d) for d in base.shape)
    leaf = factor.target.removesuffix(".weight").rsplit(".", 1)[-1]
    if leaf in ("c_attn", "c_proj", "c_fc", "q_attn"):
        raise CheckpointError(where, f"DeLoRA module {t} is GPT-2's Conv1D, which PEFT's DeLoRA does not build (it "
                                     "takes torch's Linear)", "is this adapter for another base model?")
    sa, sb = tuple(tensors[factor.parts["A"]].shape), tuple(tensors[factor.parts["B"]].shape)
    if shape != (sb[0], sa[1]):
        raise CheckpointError(where, f"DeLoRA factors of {t} (delora_A {list(sa)}, delora_B {list(sb)}) do not fit the "
                                     f"base weight, which is {list(shape)}", "is this adapter for another base model?")


def delora_product(factor, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A' [r, in], B' [out, r]) in float64 with PEFT's DeLoRA change = B' @ A' (``peft_adapter.factor_pair``)."""
    a = np.asarray(values["A"], np.float64).reshape(factor.r, -1)
    b = np.asarray(values["B"], np.float64).reshape(-1, factor.r)
    lam = float(np.asarray(values["lambda"], np.float64).reshape(-1)[0])
    w = np.asarray(values["w_norm"], np.float64).reshape(-1)
    an = np.maximum(np.linalg.norm(a, axis=1), NORM_MIN)
    bn = np.maximum(np.linalg.norm(b, axis=0), NORM_MIN)
    return a * w[None, :], b * (lam / factor.r / (an * bn))[None, :]


def delora_note(factor) -> str:
    return (f"DeLoRA `{factor.parts['A']}` and `{factor.parts['B']}` (r={factor.r}, each rank-one term normalized and "
            f"bounded by `{factor.parts['lambda']}`, the columns scaled by the base's column norms saved in "
            f"`{factor.parts['w_norm']}`) measured exactly as the factor pair PEFT's merge adds, rank at most {factor.r}")
