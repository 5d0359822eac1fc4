"""PEFT LoRA adapters: ``adapter_config.json`` and the A/B factor pairs of each module.

PEFT saves a LoRA update of module ``m`` as ``base_model.model.<m>.lora_A.weight`` [r, in]
and ``...lora_B.weight`` [out, r] (embeddings: ``lora_embedding_A`` [r, vocab] and
``lora_embedding_B`` [dim, r], whose product is the transposed delta), plus
``lora_magnitude_vector`` for DoRA. The delta of ``<m>.weight`` is scale x B @ A with
scale = alpha / r (alpha / sqrt(r) under rsLoRA), where ``rank_pattern`` and
``alpha_pattern`` override r and alpha per module. r is read from A's shape.

>>> AdapterConfig(8, 16.0, ["q_proj"], False, False, None, {}).scale
2.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, escape_name
from .files import load_json, read_small
from .safetensors_read import TensorInfo

__all__ = ["AdapterConfig", "LoraFactor", "read_adapter_config", "lora_factors", "JSON_CAP"]

#: largest adapter config / index accepted
JSON_CAP = 100_000_000
_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<mod>.+)\.(?:lora_(?P<ab>A|B)\.weight|lora_embedding_(?P<eab>A|B)"
                      r"|lora_magnitude_vector(?:\.weight)?)$")


@dataclass
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that shape the delta."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    use_rslora: bool
    use_dora: bool
    base_model: str | None
    raw: dict = field(repr=False)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.scale_for(self.lora_alpha, self.r)

    def scale_for(self, alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def pattern(self, key: str, module: str, default):
        """Per-module override from ``rank_pattern``/``alpha_pattern``, matched as PEFT does."""
        for pat, value in (self.raw.get(key) or {}).items():
            try:
                if re.match(rf"(.*\.)?({pat})$", module):
                    return value
            except re.error:
                continue
        return default


@dataclass
class LoraFactor:
    """One LoRA pair: delta of ``target`` = scale x B @ A (transposed when ``embedding``:
    PEFT stores embedding factors as A [r, vocab], B [dim, r])."""

    target: str
    a_name: str
    b_name: str
    magnitude_name: str | None
    r: int
    scale: float
    embedding: bool = False



def read_adapter_config(path: Path) -> AdapterConfig:
    raw = load_json(read_small(path, JSON_CAP), path, "adapter config")
    if not isinstance(raw, dict):
        raise CheckpointError(path, "adapter config is not a JSON object")
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if type(r) is not int or r < 1:
        raise CheckpointError(path, f"adapter config has r = {r!r}, expected a positive integer",
                              "only LoRA adapters are supported")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(path, f"adapter config has lora_alpha = {alpha!r}, expected a number")
    targets = raw.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, float(alpha), targets, bool(raw.get("use_rslora", False)),
                         bool(raw.get("use_dora", False)), base if isinstance(base, str) else None, raw)



def lora_factors(tensors: dict[str, TensorInfo], where: Path, config: AdapterConfig) -> list[LoraFactor]:
    """The A/B (and DoRA magnitude) tensors of each adapted module, paired and checked."""
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _LORA_RE.match(name)
        if m:
            key = m["ab"] or (f"E{m['eab']}" if m["eab"] else "M")
            parts.setdefault(m["mod"], {})[key] = name
    out = []
    for mod, got in parts.items():
        emb = "EA" in got or "EB" in got
        a, b = (got.get("EA"), got.get("EB")) if emb else (got.get("A"), got.get("B"))
        if a is None or b is None:
            raise CheckpointError(where, f"LoRA module `{escape_name(mod)}` has only one of its A/B factors")
        sa, sb = tensors[a].shape, tensors[b].shape
        if len(sa) < 2 or len(sb) < 2 or sb[1] != sa[0]:
            raise CheckpointError(where, f"LoRA factors of `{escape_name(mod)}` do not chain: "
                                         f"A is {list(sa)}, B is {list(sb)}")
        module = mod.removeprefix(_PEFT_PREFIX)
        alpha = float(config.pattern("alpha_pattern", module, config.lora_alpha))
        r = int(sa[0])
        if r == 0:
            raise CheckpointError(where, f"LoRA factors of `{escape_name(mod)}` have rank 0")
        out.append(LoraFactor(module + ".weight", a, b, got.get("M"), r, config.scale_for(alpha, r), emb))
    return out
