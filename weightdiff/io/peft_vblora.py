r"""PEFT's VBLoRA adapters (``peft_type`` VBLORA: LoRA factors composed from a shared vector bank), read as factors.

VBLoRA keeps one bank of ``num_vectors`` vectors of ``vector_length`` values (``base_model.vblora_vector_bank``
[N, L]) and, per adapted layer, logits that pick each L-long piece of its LoRA factors as a mixture of the bank's
vectors: ``<m>.vblora_logits_A`` [r, in / L, N] and ``<m>.vblora_logits_B`` [out / L, r, N]. Each piece is the
softmax of its ``topk`` largest logits times those vectors, summed (``VBLoRALayer._get_low_rank_matrix``); A is
[r, in] and B, its pieces transposed, [out, r]; the change is B @ A (no scale; transposed for GPT-2's Conv1D under
``fan_in_fan_out``), a factor pair of rank at most r, measured exactly as a LoRA's is. Under
``save_only_topk_weights`` the adapter saves, instead of the logits, each piece's top-k indices
(``..._topk_indices``) and the first k - 1 of their softmax weights (``..._topk_weights``); PEFT's load restores
the last as 1 minus their sum, and the piece is the same mixture.

>>> import numpy as np
>>> bank = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
>>> mix(bank, 2, logits=np.array([[[0.0, 0.0, -9.0]]])).tolist()          # two equal logits: half and half
[[[0.5, 0.5]]]
>>> mix(bank, 2, indices=np.array([[[2, 0]]]), weights=np.array([[[0.25]]])).tolist()
[[[2.0, 1.25]]]
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_vblora_config", "vblora_factors", "check_vblora", "check_vblora_values", "mix", "vblora_product",
           "vblora_note", "is_vblora"]

_PREFIX = "base_model.model."
BANK = "base_model.vblora_vector_bank"
_PART_RE = re.compile(r"^(?P<mod>.+)\.vblora_logits_(?P<ab>A|B)(?P<topk>_topk_indices|_topk_weights)?\Z", re.S)


def parse_vblora_config(raw: dict, path: Path):
    """The AdapterConfig of a VBLoRA config: ``r``, ``topk``, ``num_vectors`` and ``vector_length`` positive integers
    (PEFT's defaults 4, 2, 256, 256), ``save_only_topk_weights`` and ``fan_in_fan_out`` booleans."""
    from .peft_adapter import AdapterConfig, _bool, _rank, _targets

    got = {k: _rank(path, k, raw.get(k, d)) for k, d in (("r", 4), ("topk", 2), ("num_vectors", 256),
                                                           ("vector_length", 256))}
    if got["topk"] > got["num_vectors"]:
        raise CheckpointError(path, f"adapter config has topk = {got['topk']} above num_vectors = "
                                    f"{got['num_vectors']}: there are not that many vectors to mix")
    flags = {k: _bool(path, raw, k) for k in ("save_only_topk_weights", "fan_in_fan_out")}
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(got["r"], 0.0, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, **got, **flags}, fan_in_fan_out=flags["fan_in_fan_out"], path=Path(path),
                         peft_type="VBLORA")


def is_vblora(name: str) -> bool:
    return name == BANK or _PART_RE.match(name) is not None


def vblora_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind VBLORA, its logits, or top-k indices and weights, and the bank in ``parts``) per module."""
    from .peft_adapter import LoraFactor, _is_float, refuse_other_method

    raw = config.raw
    topk_only = raw["save_only_topk_weights"]
    mods: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _PART_RE.match(name) if ".vblora_logits_" in name else None
        if m is not None:
            mods.setdefault(m["mod"], {})[m["ab"] + (m["topk"] or "")] = name
        elif name != BANK:
            refuse_other_method(name, where, "VBLoRA", "vblora_logits_A, vblora_logits_B, vblora_vector_bank",
                                "VBLORA")
    if not mods:
        return []
    if BANK not in tensors:
        raise CheckpointError(where, f"VBLoRA adapter has no vector bank (`{BANK}`), which every module's factors mix")
    bank = tensors[BANK]
    want = (raw["num_vectors"], raw["vector_length"])
    if not _is_float(bank) or tuple(int(d) for d in bank.shape) != want:
        raise CheckpointError(where, f"VBLoRA vector bank `{BANK}` is {bank.dtype} {list(bank.shape)}; expected a "
                                     f"float matrix {list(want)} (num_vectors x vector_length in adapter_config.json)")
    roles = ("A_topk_indices", "A_topk_weights", "B_topk_indices", "B_topk_weights") if topk_only else ("A", "B")
    out = []
    for mod, got in mods.items():
        if set(got) != set(roles):
            have = ", ".join(sorted(got))
            raise CheckpointError(where, f"VBLoRA module `{escape_name(mod)}` holds {have}, but adapter_config.json "
                                         f"has save_only_topk_weights {str(topk_only).lower()}, for which PEFT loads "
                                         f"{', '.join(roles)}", "tensors and config from different adapters?")
        for role, n in got.items():
            info = tensors[n]
            ok = (info.dtype.startswith(("U", "I")) if role.endswith("indices") else _is_float(info))
            if not ok or len(info.shape) != 3:
                kind = "an integer" if role.endswith("indices") else "a float"
                raise CheckpointError(where, f"VBLoRA tensor `{escape_name(n)}` is {info.dtype} {list(info.shape)}; "
                                             f"expected {kind} tensor of 3 dimensions")
        a = got["A_topk_weights" if topk_only else "A"]
        b = got["B_topk_weights" if topk_only else "B"]
        out.append(LoraFactor(mod.removeprefix(_PREFIX) + ".weight", a, b, None, raw["r"], 1.0, kind="VBLORA",
                              parts={**got, "bank": BANK}, r_topk=raw["topk"]))
    return out


def check_vblora(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """The module's tensors must be those PEFT builds on this base weight (headers only), and set its orientation:
    a Linear's [out, in], or GPT-2's Conv1D [in, out] under ``fan_in_fan_out``."""
    raw = config.raw
    t = f"`{escape_name(factor.target)}`"
    r, n, length, k = raw["r"], raw["num_vectors"], raw["vector_length"], raw["topk"]
    shapes = {role: tuple(int(d) for d in tensors[name].shape) for role, name in factor.parts.items() if role != "bank"}
    tiles_in = shapes["A_topk_weights" if "A_topk_weights" in shapes else "A"][1]
    tiles_out = shapes["B_topk_weights" if "B_topk_weights" in shapes else "B"][0]
    last = {"A": n, "B": n, "A_topk_indices": k, "B_topk_indices": k, "A_topk_weights": k - 1, "B_topk_weights": k - 1}
    want = {role: ((r, tiles_in, last[role]) if role.startswith("A") else (tiles_out, r, last[role])) for role in shapes}
    if shapes != want:
        show = ", ".join(f"{role} {list(s)}" for role, s in sorted(shapes.items()))
        raise CheckpointError(where, f"VBLoRA tensors of {t} ({show}) are not those PEFT builds with r={r}, topk={k}, "
                                     f"num_vectors={n}", "tensors and config from different adapters?")
    inputs, outputs = tiles_in * length, tiles_out * length
    shape = tuple(int(d) for d in base.shape)
    conv1d = factor.target.removesuffix(".weight").rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc", "q_attn")
    if config.fan_in_fan_out and shape == (inputs, outputs) and (inputs != outputs or conv1d):
        factor.transposed = True            # GPT-2's Conv1D: the weight stored [in, out]
    elif shape == (outputs, inputs):
        factor.transposed = False
    else:
        raise CheckpointError(where, f"VBLoRA factors of {t} make a change of {outputs:,} outputs x {inputs:,} inputs "
                                     f"({tiles_out} x {tiles_in} pieces of {length}), but the base weight is "
                                     f"{list(shape)}" + (" (fan_in_fan_out)" if config.fan_in_fan_out else ""),
                              "is this adapter for another base model?")


def mix(bank: np.ndarray, topk: int, logits: np.ndarray | None = None, indices: np.ndarray | None = None,
        weights: np.ndarray | None = None) -> np.ndarray:
    """Each piece [..., L] as PEFT mixes it: the softmax of its ``topk`` largest ``logits`` times those bank vectors,
    summed; or, from a top-k-only adapter, its ``indices`` and first k - 1 ``weights`` (the last 1 minus their sum)."""
    bank = np.asarray(bank, np.float64)
    if logits is not None:
        logits = np.asarray(logits, np.float64)
        indices = np.argsort(-logits, axis=-1, kind="stable")[..., :topk]
        top = np.take_along_axis(logits, indices, -1)
        w = np.exp(top - top[..., :1])
        w /= w.sum(-1, keepdims=True)
    else:
        indices = np.asarray(indices, np.int64)
        first = np.asarray(weights, np.float64)
        w = np.concatenate([first, 1.0 - first.sum(-1, keepdims=True)], -1)
    return np.einsum("...k,...kl->...l", w, bank[indices])


def vblora_product(factor, values: dict[str, np.ndarray], topk: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) in float64 from a module's saved values (role -> values, the bank's under "bank")."""
    bank = values["bank"]
    if "A" in values:
        pa = mix(bank, topk, logits=values["A"])
        pb = mix(bank, topk, logits=values["B"])
    else:
        pa = mix(bank, topk, indices=values["A_topk_indices"], weights=values["A_topk_weights"])
        pb = mix(bank, topk, indices=values["B_topk_indices"], weights=values["B_topk_weights"])
    a = pa.reshape(pa.shape[0], -1)                                   # [r, in / L, L] -> [r, in]
    b = pb.transpose(0, 2, 1).reshape(-1, pb.shape[1])                # [out / L, r, L] -> [out, r]
    return a, b


def check_vblora_values(factor, values: dict[str, np.ndarray], where: Path, topk: int) -> None:
    """What PEFT's top-k needs to give one answer: no tie at the k-th largest logit of a piece (torch picks either
    vector, and the mixtures differ), indices of the bank, distinct within a piece, and top-k weights that leave the
    last one at least 0 (PEFT takes its logarithm)."""
    n = values["bank"].shape[0]
    t = f"`{escape_name(factor.target)}`"
    for side in ("A", "B"):
        if side in values:
            x = np.sort(values[side], axis=-1)
            if x.shape[-1] > topk and (x[..., -topk] == x[..., -topk - 1]).any():
                raise CheckpointError(where, f"VBLoRA logits `{escape_name(factor.parts[side])}` of {t} tie at a "
                                             f"piece's {topk}-th largest value: which vectors PEFT's top-k mixes is "
                                             "then not defined")
            continue
        idx = np.asarray(values[f"{side}_topk_indices"], np.int64)
        name = factor.parts[f"{side}_topk_indices"]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise CheckpointError(where, f"VBLoRA indices `{escape_name(name)}` point outside the vector bank of {n}")
        s = np.sort(idx, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            raise CheckpointError(where, f"VBLoRA indices `{escape_name(name)}` repeat a vector within a piece (PEFT "
                                         "scatters each weight to its index: a repeated one keeps one of them)")
        w = np.asarray(values[f"{side}_topk_weights"], np.float64)
        if (w < 0).any() or (w.sum(-1) > 1 + 1e-6).any():
            raise CheckpointError(where, f"VBLoRA weights `{escape_name(factor.parts[side + '_topk_weights'])}` are "
                                         "not the first k - 1 of a softmax (negative, or summing past 1: PEFT takes the "
                                         "logarithm of 1 minus their sum)")


def vblora_note(factor, r: int) -> str:
    form = "top-k indices and weights" if "A_topk_indices" in factor.parts else "logits"
    return (f"VBLoRA adapter (r={r}) analysed exactly from its factors: each piece of A and B the softmax-weighted "
            f"top-k mixture of the shared vector bank `{BANK}` its {form} pick (its rank is at most r)")
