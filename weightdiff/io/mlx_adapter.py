"""mlx-lm's adapters (``mlx_lm.lora``: ``adapters.safetensors`` beside an ``adapter_config.json`` with
``fine_tune_type`` and ``lora_parameters``), read as mlx-lm's ``fuse`` applies them (this module follows mlx-lm
0.32, ``mlx_lm/tuner/lora.py`` and ``dora.py``).

- ``fine_tune_type: "lora"``: each adapted Linear saves ``<m>.lora_a`` [in, r] and ``<m>.lora_b`` [r, out]; its
  forward adds scale x (x @ lora_a) @ lora_b, and ``fuse`` adds scale x lora_b^T @ lora_a^T to the [out, in]
  weight (dequantized first when the base layer is quantized). scale is ``lora_parameters.scale`` itself (mlx-lm's
  default 20), not alpha / r. An Embedding saves ``lora_a`` [vocab, r] and ``lora_b`` [r, dims], and ``fuse`` adds
  scale x lora_a @ lora_b. Each is a factor pair measured exactly as a PEFT LoRA's (rank at most r).
- ``"dora"``: the same factors and ``<m>.m``, one magnitude per row of the weight; ``fuse`` scales each row of
  W + delta to it, as PEFT's DoRA does (``measure.rank.analyze_factors`` with the magnitude). mlx-lm before
  ``fine_tune_type`` saved ``use_dora: true`` (and ``lora_layers`` for ``num_layers``) and loaded the adapter by it;
  a config without ``fine_tune_type`` is read so.
- ``"full"``: ``adapters.safetensors`` holds the trained layers' own weights (mlx-lm loads them over the model's):
  each is compared with the base's tensor as a plain pair, the tensors it does not hold are the base's.

A mixture of experts' stacked ``switch_mlp`` layer (mlx-lm's ``SwitchLinear``, weight [experts, out, in]) saves
``lora_a`` [experts, r, in] and ``lora_b`` [experts, out, r], and ``fuse`` adds scale x lora_b[e] @ lora_a[e] to
expert e: the readers split the stacked weight into the experts' own (``mlp.experts.3.gate_proj.weight``, as the
Hugging Face checkpoints name them), and each expert's factor pair is measured against its own matrix.

A layer's kind (Linear or Embedding) is read from the factors' shapes against the base weight, or for a square
one from its name.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError, escape_name
from .experts import MAX_EXPERTS, expert_name
from .safetensors_read import TensorInfo

__all__ = ["is_mlx_config", "parse_mlx_config", "mlx_factors", "check_mlx", "MLX_WEIGHTS"]

#: the adapter file mlx-lm writes (and its checkpoints ``0000100_adapters.safetensors`` beside it)
MLX_WEIGHTS = "adapters.safetensors"
_PART_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_a|lora_b|m)\Z", re.S)
#: mlx-lm's default scale (``lora_parameters.scale``)
MLX_DEFAULT_SCALE = 20.0
_TYPES = ("lora", "dora", "full")


def is_mlx_config(raw: object) -> bool:
    """Whether an ``adapter_config.json`` is mlx-lm's (no ``peft_type``; its training arguments)."""
    return isinstance(raw, dict) and "peft_type" not in raw and ("fine_tune_type" in raw or "lora_parameters" in raw)


def parse_mlx_config(raw: dict, path: Path):
    """The AdapterConfig of an mlx-lm adapter: ``fine_tune_type`` lora (mlx-lm's default), dora or full;
    ``lora_parameters`` an object whose ``rank`` is a positive integer and ``scale`` a number (mlx-lm's defaults 8
    and 20), unless full."""
    from .peft_adapter import AdapterConfig, _number, _rank

    if "fine_tune_type" in raw:
        kind = raw["fine_tune_type"]
    else:       # older mlx-lm saved use_dora: true for DoRA, and loaded the adapter by that key
        legacy = raw.get("use_dora", False)
        if not isinstance(legacy, bool):
            raise CheckpointError(path, f"mlx-lm adapter config has use_dora = {escape_name(repr(legacy))[:40]}, "
                                        "expected true or false")
        kind = "dora" if legacy else "lora"
    if kind not in _TYPES:
        raise CheckpointError(path, f"mlx-lm adapter config has fine_tune_type {escape_name(repr(kind))[:40]}: only "
                                    "lora, dora and full are read", "fuse the adapter (mlx_lm.fuse --de-quantize) and "
                                                                   "compare the fused model")
    params = raw.get("lora_parameters", {}) if kind != "full" else (raw.get("lora_parameters") or {})
    if not isinstance(params, dict):
        raise CheckpointError(path, "mlx-lm adapter config has lora_parameters that is not an object")
    r = _rank(path, "lora_parameters.rank", params.get("rank", 8)) if kind != "full" else 0
    scale = _number(path, "lora_parameters.scale", params.get("scale", MLX_DEFAULT_SCALE)) if kind != "full" else 0.0
    keys = params.get("keys")
    targets = sorted({str(k) for k in keys}) if isinstance(keys, list) else []
    model = raw.get("model")
    return AdapterConfig(r, scale, targets, False, kind == "dora", model if isinstance(model, str) else None,
                         {**raw, "fine_tune_type": kind}, path=Path(path), source="mlx-lm")


def mlx_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor per adapted layer of a lora or dora adapter (``mlx`` "linear" until ``check_mlx`` reads the
    layer's kind against the base); none for a full fine-tune, whose tensors are the trained weights."""
    from .peft_adapter import LoraFactor, _is_float

    if config.raw.get("fine_tune_type") == "full":
        return []
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        if name.endswith((".lora_a_scales", ".lora_b_scales")):
            raise CheckpointError(where, f"mlx-lm adapter holds `{escape_name(name)}`: its factors are quantized for "
                                         "inference (mlx-lm's QuantizedLoRALinear packs lora_a and lora_b with scales), "
                                         "which weightdiff does not read", "compare the adapter as trained, or fuse it "
                                                                           "(mlx_lm.fuse --de-quantize) and compare the "
                                                                           "fused model")
        m = _PART_RE.match(name)
        if m is not None:
            parts.setdefault(m["mod"], {})[m["part"]] = name
    out = []
    for mod, got in parts.items():
        if "lora_a" not in got and "lora_b" not in got:
            continue                    # a tensor named `.m` that belongs to no factor pair: compared as it is
        a, b = got.get("lora_a"), got.get("lora_b")
        if a is None or b is None:
            raise CheckpointError(where, f"mlx-lm LoRA layer `{escape_name(mod)}` has only one of lora_a and lora_b")
        sa, sb = tuple(tensors[a].shape), tuple(tensors[b].shape)
        switch = len(sa) == 3
        if switch and (len(sb) != 3 or sa[0] != sb[0] or sa[1] != sb[2] or not sa[1] or not 1 <= sa[0] <= MAX_EXPERTS):
            raise CheckpointError(where, f"mlx-lm LoRA factors of `{escape_name(mod)}` do not chain: lora_a is "
                                         f"{list(sa)}, lora_b {list(sb)} (a stacked experts layer's are lora_a "
                                         f"[experts, r, in], lora_b [experts, out, r], at most {MAX_EXPERTS:,} experts)")
        if not switch and (len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] or not sa[1]):
            raise CheckpointError(where, f"mlx-lm LoRA factors of `{escape_name(mod)}` do not chain: lora_a is "
                                         f"{list(sa)}, lora_b {list(sb)} (expected lora_a [in, r], lora_b [r, out])")
        for n in (a, b, got.get("m")):
            if n is not None and not _is_float(tensors[n]):
                raise CheckpointError(where, f"mlx-lm LoRA tensor `{escape_name(n)}` is {tensors[n].dtype}; expected a "
                                             "float dtype")
        r = int(sa[1])
        if r != config.r:
            raise CheckpointError(where, f"mlx-lm LoRA factors of `{escape_name(mod)}` have rank {r} but "
                                         f"adapter_config.json gives lora_parameters.rank {config.r}",
                                  "factors and config from different adapters?")
        mag = got.get("m")
        if mag is not None and not config.use_dora:
            raise CheckpointError(where, f"mlx-lm adapter holds the DoRA magnitude `{escape_name(mag)}` but "
                                         "adapter_config.json makes it LoRA, not DoRA (fine_tune_type lora, or "
                                         "no use_dora: true)", "tensors and config from different adapters?")
        if config.use_dora and mag is None:
            raise CheckpointError(where, f"mlx-lm DoRA layer `{escape_name(mod)}` has no magnitude `{escape_name(mod)}.m`")
        if switch:
            if mag is not None:
                raise CheckpointError(where, f"mlx-lm layer `{escape_name(mod)}` is DoRA on stacked experts, which "
                                             "mlx-lm does not build", "tensors and config from different adapters?")
            n = int(sa[0])
            out.extend(LoraFactor(expert_name(mod + ".weight", e), a, b, None, r, float(config.lora_alpha), mlx="switch",
                                  expert=e, experts=n) for e in range(n))
            continue
        out.append(LoraFactor(mod + ".weight", a, b, mag, r, float(config.lora_alpha), mlx="linear"))
    return out


_EMBED_LEAVES = ("embed_tokens", "wte", "word_embeddings", "embeddings", "tok_embeddings", "embed")


def check_mlx(factor, tensors: dict[str, TensorInfo], base: TensorInfo, where: Path) -> None:
    """The factors must fit the base weight as mlx-lm's Linear (lora_a [in, r], lora_b [r, out] on a weight [out,
    in]) or Embedding (lora_a [vocab, r], lora_b [r, dims] on [vocab, dims]) LoRA builds them; sets ``mlx`` to the
    kind (a square weight by its name: an embedding table's, else a Linear). A DoRA magnitude has one value per
    row of the weight."""
    sa, sb = tuple(tensors[factor.a_name].shape), tuple(tensors[factor.b_name].shape)
    shape = tuple(int(d) for d in base.shape)
    t = f"`{escape_name(factor.target)}`"
    if factor.mlx == "switch":              # expert e of lora_a [experts, r, in], lora_b [experts, out, r]
        if shape != (sb[1], sa[2]):
            raise CheckpointError(where, f"mlx-lm LoRA factors of {t} (expert {factor.expert} of lora_a {list(sa)}, "
                                         f"lora_b {list(sb)}) do not fit the expert's weight, which is {list(shape)}",
                                  "is this adapter for another base model?")
        return
    linear = len(shape) == 2 and shape == (sb[1], sa[0])
    table = len(shape) == 2 and shape == (sa[0], sb[1])
    if not (linear or table):
        raise CheckpointError(where, f"mlx-lm LoRA factors of {t} (lora_a {list(sa)}, lora_b {list(sb)}) do not fit the "
                                     f"base weight, which is {list(shape)}", "is this adapter for another base model?")
    if linear and table:
        leaf = factor.target.removesuffix(".weight").rsplit(".", 1)[-1]
        linear = leaf not in _EMBED_LEAVES
    factor.mlx = "linear" if linear else "embedding"
    if factor.magnitude_name is not None:
        m = tensors[factor.magnitude_name]
        if m.numel != shape[0] or len([d for d in m.shape if d != 1]) > 1:
            raise CheckpointError(where, f"mlx-lm DoRA magnitude `{escape_name(factor.magnitude_name)}` is "
                                         f"{list(m.shape)}; expected {shape[0]} values, one per row of {t}")


def mlx_pair(factor, a, b):
    """(A [r, n], B [m, r]) of the stored [m, n] weight from the saved lora_a and lora_b (decoded; a stacked
    experts layer's as [experts, r x in] and [experts, out x r])."""
    if factor.mlx == "switch":              # fuse: scale x lora_b[e] @ lora_a[e]
        r, e = factor.r, factor.expert
        return a[e].reshape(r, -1).copy(), b[e].reshape(-1, r).copy()
    if factor.mlx == "embedding":           # fuse: scale x lora_a @ lora_b
        return b.copy(), a.copy()
    return a.T.copy(), b.T.copy()           # fuse: scale x lora_b^T @ lora_a^T
