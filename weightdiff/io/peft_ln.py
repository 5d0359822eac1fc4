"""PEFT's LN tuning adapters (``peft_type`` LN_TUNING): trained copies of whole layers, the norms by default.

``LNTuningLayer`` keeps a deep copy of each layer it targets (``ln_tuning_layers``) and trains that copy; its forward
runs the copy, and ``merge_and_unload()`` swaps the copy in for the base's layer. The adapter saves each copy's
parameters as ``base_model.model.<m>.ln_tuning_layers.<param>`` (the adapter's name stripped): the merged model's
``<m>.<param>`` is that tensor, so each is compared with the base's tensor of that name as a plain pair, as a
``modules_to_save`` copy is.

>>> from pathlib import Path
>>> cfg = parse_ln_config({"peft_type": "LN_TUNING", "target_modules": ["input_layernorm"]}, Path("a.json"))
>>> cfg.peft_type, cfg.target_modules
('LN_TUNING', ['input_layernorm'])
>>> ln_target("base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight")
'model.layers.0.input_layernorm.weight'
>>> ln_target("base_model.model.model.norm.weight") is None
True
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError, escape_name

#: a trained copy's parameter in an LN tuning adapter: ``[base_model.model.]<m>.ln_tuning_layers.<param>`` (a
#: wrapped model's whole state dict adds the adapter's name, ``ln_tuning_layers.default.weight``: not an adapter file)
_LN_RE = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.ln_tuning_layers\.(?P<param>[^.]+)$", re.S)

#: the segment that marks a trained copy (``_foreign_part``: such a tensor under another method's config)
SEGMENT = ".ln_tuning_layers."


def parse_ln_config(raw: dict, path: Path):
    """The AdapterConfig of an LN tuning adapter: ``target_modules`` (PEFT's per-architecture default when left
    out, here the modules the saved copies name)."""
    from .peft_adapter import AdapterConfig, _targets

    targets = _targets(path, raw)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(0, 0.0, targets, False, False, base if isinstance(base, str) else None, raw,
                         path=Path(path), peft_type="LN_TUNING")


def ln_target(name: str) -> str | None:
    """The base tensor a trained copy's parameter ``name`` stands for in the merged model, else None."""
    m = _LN_RE.match(name)
    return None if m is None else f"{m['mod']}.{m['param']}"


def check_ln_tensors(tensors: dict, where: Path) -> int:
    """Every tensor of an LN tuning adapter is a trained copy's parameter or a ``modules_to_save`` tensor, never
    another method's (PEFT would not load those into an LN tuning model); the number of copied layers."""
    from .peft_adapter import _IA3_RE, _LORA_RE, _foreign_part

    layers = set()
    for name in tensors:
        m = _LN_RE.match(name)
        if m is not None:
            layers.add(m["mod"])
            continue
        what = ("LoRA" if _LORA_RE.match(name) else "IA3" if ".ia3_l" in name and _IA3_RE.match(name)
                else _foreign_part(name))
        if what:
            raise CheckpointError(where, f"adapter holds {what} tensors (`{escape_name(name)}`) but "
                                         "adapter_config.json says peft_type LN_TUNING",
                                  "tensors and config from different adapters?")
        if ".ln_tuning_layers." in name or name.endswith(".ln_tuning_layers"):
            raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, which is no parameter of a trained "
                                         "layer copy (`<module>.ln_tuning_layers.<parameter>`, as PEFT saves one)")
    if not layers:
        raise CheckpointError(where, "adapter_config.json says peft_type LN_TUNING, but the adapter holds no trained "
                                     "layer copy (`<module>.ln_tuning_layers.<parameter>`)",
                              "tensors and config from different adapters?")
    return len(layers)
