"""LoRA on parameters: PEFT's ``target_parameters`` (``lora.ParamWrapper``), as gpt-oss's fine-tunes train the
experts that a layer stores fused in one ``nn.Parameter`` [experts, m, n] (OpenAI's gpt-oss fine-tuning recipe:
``target_parameters=["7.mlp.experts.gate_up_proj", "7.mlp.experts.down_proj", ...]``).

What PEFT saves (peft.tuners.lora.layer.ParamWrapper, checked against PEFT 0.21's own merge):

- One wrapper per adapted parameter, ``<m>.lora_A.weight`` [experts x r, in] and ``<m>.lora_B.weight``
  [out, experts x r] under the module ``<m>`` that holds the parameter. Several parameters of one module are
  wrapped one inside the other, in the order the module registers them: the first one innermost, saved as
  ``<m>.base_layer.lora_A.weight`` (``<m>.base_layer.base_layer...`` for a third), the last one as
  ``<m>.lora_A.weight``. Every transformers experts module registers ``gate_up_proj`` (or ``gate_proj``,
  ``up_proj``) before ``down_proj``; wrappers of other parameters of one module cannot be told apart and are
  refused.
- Expert e's factors are A_e = rows e r .. e r + r - 1 of A (``A.reshape(experts, r, in)[e]``) and B_e = columns
  e, e + experts, e + 2 experts, ... of B (``B.reshape(out, r, experts)[:, :, e]``), and its change is
  scale x B_e A_e, laid into the parameter as (B_e A_e)^T when PEFT read it [experts, in, out], as B_e A_e when it
  read it [experts, out, in]. Which one PEFT did depends on its version and on the transformers it ran with
  (0.17-0.18 read every parameter [experts, in, out]; later versions swap by the experts module's ``is_transposed``,
  which transformers' experts classes gained in v5, and PEFT's reading of it was reversed until huggingface/peft#3165),
  none of which the adapter records. The factors' shapes say which for a non-square expert; a square one
  (gpt-oss-20b's ``down_proj``, 2880 x 2880) takes the orientation of the adapter's non-square ones (one PEFT, one
  transformers, one experts class), and is refused when the adapter has none.
- A 2-D parameter (one expert) changes by scale x B @ A, as a Linear's weight.

The readers split a fused experts tensor into the experts' own (weightdiff.io.experts): each expert's factor pair
is paired with its expert's matrix and measured exactly as a LoRA's (rank at most r), so a gpt-oss adapter reads
as the merged model does, expert by expert.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .experts import MAX_EXPERTS, expert_name
from .safetensors_read import TensorInfo

__all__ = ["param_factors", "experts_apart", "check_param", "settle_orientation", "missing_param", "orientation_evidence", "expert_pair",
           "param_note", "BASE_LAYER"]

#: the wrapper segment of a parameter wrapped inside another's wrapper (PEFT strips every one of them)
BASE_LAYER = ".base_layer"
#: the order transformers' experts modules register their fused parameters in (PEFT nests the wrappers so)
_REGISTERED = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."


def _matches(module: str, param: str, target: str) -> bool:
    """PEFT's match of one target against ``<module>.<param>``: the whole key, or a dotted suffix of it."""
    key = f"{module}.{param}"
    return key == target or key.endswith("." + target)


def _candidates(module: str, targets: tuple) -> list[str]:
    """The parameter names ``target_parameters`` can adapt in ``module``, in the order its entries name them."""
    out: list[str] = []
    for t in targets:
        param = t.rpartition(".")[2]
        if param not in out and _matches(module, param, t):
            out.append(param)
    return out


def _module_target(module: str, a_rows: int, config) -> bool:
    """Whether ``target_modules`` adapts module ``module`` as a layer (PEFT refuses to wrap a parameter of a module it
    targets so: a bare ``target_parameters`` name such as ``gate_up_proj`` must not claim a q_proj's LoRA). A list
    matches a whole name or a dotted suffix, a string is a pattern the name must match, ``all-linear`` takes the
    Linear layers: a LoRA whose A has r rows (a fused parameter's has experts x r)."""
    raw = config.raw.get("target_modules")
    if isinstance(raw, list):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in raw)
    if not isinstance(raw, str):
        return False
    if raw.lower() == "all-linear":
        return a_rows == int(config.pattern("rank_pattern", module, config.r))
    from .peft_adapter import _MATCH_BUDGET, _pattern_repeats

    if max(len(module), 2) ** (_pattern_repeats(config.path, "target_modules", raw) + 1) > _MATCH_BUDGET:
        raise CheckpointError(config.path, f"target_modules `{escape_name(raw[:60])}` is a regular expression too "
                                           f"costly to match against a module name of {len(module):,} characters",
                              "give a list of module names")
    return re.fullmatch(raw, module) is not None


def param_factors(parts: dict[str, dict[str, str]], tensors: dict[str, TensorInfo], where: Path, config
                  ) -> tuple[list, dict[str, dict[str, str]]]:
    """(the factors of the parameters ``config.target_parameters`` adapts, the LoRA modules left over). ``parts``:
    LoRA module name -> its tensors (``A``, ``B``, ...) as ``peft_adapter.lora_factors`` groups them."""
    from .peft_adapter import LoraFactor, _is_float

    targets = tuple(config.target_parameters)
    wrapped: dict[str, dict[int, str]] = {}         # unwrapped module -> nesting depth -> the saved module name
    rest: dict[str, dict[str, str]] = {}
    for mod, got in parts.items():
        inner = mod.removeprefix(_PREFIX)
        depth = 0
        while inner.endswith(BASE_LAYER):
            inner, depth = inner[:-len(BASE_LAYER)], depth + 1
        inner = inner.replace(BASE_LAYER + ".", ".")
        a = got.get("A")
        if not _candidates(inner, targets) or _module_target(inner, int(tensors[a].shape[0]) if a else 0, config):
            rest[mod] = got             # a LoRA module of target_modules: PEFT wraps no parameter of it as well
            continue
        if set(got) - {"A", "B"}:
            raise CheckpointError(where, f"LoRA module `{escape_name(mod)}` adapts a parameter (target_parameters) "
                                         "but holds other tensors than lora_A/lora_B (embedding factors or a DoRA "
                                         "magnitude), which PEFT's ParamWrapper does not have",
                                  "config and tensors from different adapters?")
        wrapped.setdefault(inner, {})[depth] = mod
    out: list = []
    for module, by_depth in wrapped.items():
        params = _candidates(module, targets)
        n = len(by_depth)
        if sorted(by_depth) != list(range(n)):
            raise CheckpointError(where, f"the LoRA wrappers of `{escape_name(module)}` are nested "
                                         f"{sorted(by_depth)} deep: PEFT nests one per adapted parameter, the "
                                         "outermost saved without `.base_layer`, each next one under one more")
        if n != len(params):
            raise CheckpointError(where, f"`{escape_name(module)}` has {n} LoRA factor pairs but target_parameters "
                                         f"names {len(params)} of its parameters ({', '.join(params)}): which pair "
                                         "adapts which parameter is not known",
                                  "config and tensors from different adapters?")
        if n > 1:
            unknown = [p for p in params if p not in _REGISTERED]
            if unknown:
                raise CheckpointError(where, f"`{escape_name(module)}` has {n} LoRA factor pairs for parameters "
                                             f"{', '.join(params)}: PEFT nests them in the order the module registers "
                                             f"its parameters, which is not known for {', '.join(unknown)}",
                                      "merge the adapter (merge_and_unload) and compare the merged model")
            params = sorted(params, key=_REGISTERED.index)
        for depth, mod in by_depth.items():
            param = params[n - 1 - depth]           # the first registered innermost
            key = f"{module}.{param}"
            got = parts[mod]
            a, b = got.get("A"), got.get("B")
            if a is None or b is None:
                raise CheckpointError(where, f"LoRA module `{escape_name(mod)}` has only one of its A/B factors")
            sa, sb = tuple(tensors[a].shape), tuple(tensors[b].shape)
            for name in (a, b):
                if not _is_float(tensors[name]):
                    raise CheckpointError(where, f"LoRA tensor `{escape_name(name)}` is {tensors[name].dtype}; "
                                                 "expected a float dtype")
            r = int(config.pattern("rank_pattern", key, config.r))
            alpha = float(config.pattern("alpha_pattern", key, config.lora_alpha))
            if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or sa[0] == 0 or sa[0] % r:
                raise CheckpointError(where, f"LoRA factors of parameter `{escape_name(key)}` (A {list(sa)}, B "
                                             f"{list(sb)}) are not PEFT's ParamWrapper's for r = {r}: A [experts x r, "
                                             "in], B [out, experts x r]", "config and tensors from different adapters?")
            experts = sa[0] // r
            if experts > MAX_EXPERTS:       # a hostile header: no million factor pairs of one row each
                raise CheckpointError(where, f"LoRA factors of parameter `{escape_name(key)}` (A {list(sa)}) stack "
                                             f"{experts:,} experts of rank {r}: more than the {MAX_EXPERTS:,} a fused "
                                             "experts tensor is read with", "config and tensors from different adapters?")
            scale = config.scale_for(alpha, r)
            if experts == 1:
                out.append(LoraFactor(key, a, b, None, r, scale, param=key))
            else:
                out.extend(LoraFactor(expert_name(key, e), a, b, None, r, scale, param=key, expert=e, experts=experts)
                           for e in range(experts))
    return out, rest


#: a fused experts parameter of transformers' (its leaf) -> the per-expert tensors a checkpoint keeps it as, their
#: rows concatenated in this order (transformers' conversion mapping: ``qwen2_moe``'s, for Qwen2/Qwen3 MoE, DeepSeek
#: V2/V3, GLM-4 MoE, OLMoE and others; ``mixtral``'s, for Mixtral and MiniMax, under ``block_sparse_moe``)
_APART = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",)),
          "gate_proj": (("gate_proj",), ("w1",)), "up_proj": (("up_proj",), ("w3",))}


#: GraniteMoE's checkpoints keep each layer's experts fused under their old names, which transformers v5 renames
#: (``block_sparse_moe.input_linear.weight`` -> ``block_sparse_moe.experts.gate_up_proj``); the readers split them
_GRANITE = {"gate_up_proj": "input_linear", "down_proj": "output_linear"}


def _apart_names(param: str, e: int) -> list[list[str]]:
    """The lists of tensors a checkpoint may keep expert ``e`` of fused ``param`` as (each list's rows concatenated)."""
    stem, _, leaf = param.rpartition(".")
    if stem.endswith(".block_sparse_moe.experts") and leaf in _GRANITE:
        return [[f"{stem[:-len('.experts')]}.{_GRANITE[leaf]}.{e}.weight"]]
    if leaf not in _APART or not stem.endswith(".experts"):
        return []
    own, mixtral = _APART[leaf]
    out = [[f"{stem}.{e}.{p}.weight" for p in own]]
    if stem.endswith(".mlp.experts"):
        moe = stem[:-len(".mlp.experts")] + ".block_sparse_moe.experts"
        out.append([f"{moe}.{e}.{p}.weight" for p in mixtral])
    return out


def experts_apart(factors: list, bases, notes: list[str]) -> list:
    """``factors`` with each expert whose fused tensor no base holds retargeted at the expert's own tensors where a
    base keeps them apart, as transformers fuses them when it loads the model (Qwen3 MoE's
    ``mlp.experts.3.gate_proj.weight`` and ``up_proj.weight``, rows 0..m-1 and m..2m-1 of the fused gate_up_proj's
    expert 3; Mixtral's ``block_sparse_moe.experts.3.w1.weight`` and ``w3``): one factor per tensor, its ``rows`` of
    the expert's change. Experts found neither way are left as they are (``missing_param`` names them)."""
    from dataclasses import replace

    out, moved = [], set()
    for f in factors:
        if f.expert is None or f.param is None or any(f.target in b.tensors for b in bases):
            out.append(f)
            continue
        for names in _apart_names(f.param, f.expert):
            shapes = {tuple(b.tensors[n].shape) for n in names for b in bases if n in b.tensors}
            if len(shapes) != 1 or not all(any(n in b.tensors for b in bases) for n in names):
                continue
            m, n = next(iter(shapes)) if len(next(iter(shapes))) == 2 else (0, 0)
            if not m:
                continue
            if len(names) == 1:
                out.append(replace(f, target=names[0]))
            else:
                out.extend(replace(f, target=t, rows=(k * m, k * m + m), virtual=(len(names) * m, n))
                           for k, t in enumerate(names))
            moved.add(f.param)
            break
        else:
            out.append(f)
    if moved:
        n = len(moved)
        notes.append(f"adapter: {n} fused experts parameter{'s' if n != 1 else ''} measured against the experts the "
                     "base keeps apart or under older names, as transformers joins or renames them when it loads the "
                     "model (a gate_up_proj expert kept as gate_proj and up_proj: their rows, gate first)")
    return out


def orientation_evidence(factor, tensors: dict[str, TensorInfo], base: TensorInfo) -> bool | None:
    """Whether a fused parameter's expert factors fit their expert's matrix read [in, out] (True) or [out, in]
    (False); None when both fit (a square expert) or neither does. An expert kept apart: its whole [m, n]."""
    sa, sb = tuple(tensors[factor.a_name].shape), tuple(tensors[factor.b_name].shape)
    shape = factor.virtual or tuple(base.shape)
    io, oi = shape == (sa[1], sb[0]), shape == (sb[0], sa[1])
    return True if io and not oi else False if oi and not io else None


def settle_orientation(pairs, tuned, bases) -> None:
    """Set ``in_out`` of the square experts' factors from the adapter's non-square ones (one PEFT and one transformers
    read every fused parameter of a model's experts class one way); two ways at once is refused. The base's model type
    does not say (gpt-oss's experts read [experts, in, out] under PEFT 0.18 and [experts, out, in] under a PEFT that
    swaps by an ``is_transposed`` the transformers of the day did not set), so without a non-square parameter a square
    one stays unsettled and ``check_param`` refuses it."""
    seen = {}
    for p in pairs:
        found = orientation_evidence(p.lora, tuned.tensors, bases[p.base_index].tensors[p.base_name])
        if found is not None:
            seen.setdefault(found, p.lora.param)
    if len(seen) > 1:
        raise CheckpointError(tuned.files[0], f"the LoRA factors of `{escape_name(seen[True])}` fit its experts read "
                                              f"[experts, in, out] and those of `{escape_name(seen[False])}` fit its "
                                              "experts read [experts, out, in]: PEFT reads all of a model's fused "
                                              "experts one way", "is this adapter for another base model?")
    way = next(iter(seen), None)
    if way is not None:
        for p in pairs:
            p.lora.in_out = way


def _experts_held(param: str, tensors) -> int:
    """How many experts of fused parameter ``param`` a checkpoint holds (the readers' split names 0, 1, ...)."""
    n = 0
    while n <= MAX_EXPERTS and expert_name(param, n) in tensors:
        n += 1
    return n


def missing_param(factor, bases, where: Path, shown: str) -> CheckpointError:
    """The error for a parameter (or expert) the adapter adapts and the base does not hold under that name."""
    if factor.expert is None:
        return CheckpointError(where, f"LoRA on parameter `{escape_name(factor.param)}` (target_parameters): the base "
                                      f"({escape_name(shown)}) has no such parameter to modify",
                               "is this adapter for another base model?")
    held = max(_experts_held(factor.param, b.tensors) for b in bases)
    fused = any(factor.param in b.tensors or any(n.startswith(factor.param + "_") for n in b.tensors) for b in bases)
    why = (f"has it as {held} experts, not {factor.experts}" if held else
           "stores it as one tensor that weightdiff does not split into its experts" if fused else
           "holds no such tensor (transformers may fuse its per-expert matrices into this parameter when it loads the "
           "model, which weightdiff does not reproduce)")
    return CheckpointError(where, f"LoRA on fused experts parameter `{escape_name(factor.param)}` (target_parameters, "
                                  f"{factor.experts} experts): the base ({escape_name(shown)}) {why}, so expert "
                                  f"{factor.expert}'s matrix `{escape_name(factor.target)}` cannot be found",
                           "merge the adapter (merge_and_unload) and compare the merged model")


def check_param(factor, tensors: dict[str, TensorInfo], base: TensorInfo, where: Path) -> None:
    """Check that a parameter's factors fit its (expert's) base matrix, and settle the expert's orientation
    (``factor.in_out``, which ``comparison.check_adapter_plan`` may have set from the other experts' evidence)."""
    sa, sb = tuple(tensors[factor.a_name].shape), tuple(tensors[factor.b_name].shape)
    shape = factor.virtual or tuple(base.shape)
    what = f"`{escape_name(factor.param)}`" + (f" (expert {factor.expert})" if factor.expert is not None else "")
    if factor.expert is None:
        if shape != (sb[0], sa[1]):
            raise CheckpointError(where, f"LoRA factors of parameter {what} (A {list(sa)}, B {list(sb)}) do not fit "
                                         f"it: the base has it as {list(shape)}", "is this adapter for another base "
                                                                                 "model?")
        factor.in_out = False
        return
    found = orientation_evidence(factor, tensors, base)
    if found is None and shape not in ((sa[1], sb[0]), (sb[0], sa[1])):
        raise CheckpointError(where, f"LoRA factors of parameter {what} (A {list(sa)}, B {list(sb)}: "
                                     f"{factor.experts} experts of rank {factor.r}) do not fit the expert's matrix, "
                                     f"which the base has as {list(shape)}", "is this adapter for another base model?")
    if found is not None:
        factor.in_out = found
    elif factor.in_out is None:
        raise CheckpointError(where, f"LoRA factors of parameter {what} fit its square {shape[0]} x {shape[1]} "
                                     "experts either way: whether PEFT read them [experts, in, out] or [experts, out, "
                                     "in] depends on the PEFT and transformers versions it ran with, which the adapter "
                                     "does not record, and it adapts no non-square parameter that would say",
                              "merge the adapter (merge_and_unload) and compare the merged model")


def expert_pair(factor, a64: np.ndarray, b64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, n], B [m, r]) of one expert from its parameter's whole factors (A [experts x r, in], B [out,
    experts x r]): its change of the stored [m, n] matrix is scale x B @ A (as PEFT's ``get_delta_weight``)."""
    r, e = factor.r, factor.expert
    a_e = a64.reshape(factor.experts, r, -1)[e]                     # PEFT's A.reshape(experts, -1, in)
    b_e = b64.reshape(b64.shape[0], r, factor.experts)[:, :, e]     # PEFT's B.reshape(out, -1, experts)
    a, b = (b_e.T, a_e.T) if factor.in_out else (a_e, b_e)     # "o r e, e r i -> e i o": (B_e A_e)^T = A_e^T B_e^T
    if factor.rows is not None:             # the rows of the expert's change this tensor holds (gate_proj, up_proj)
        b = b[factor.rows[0]:factor.rows[1]]
    return np.array(a, order="C"), np.array(b, order="C")       # copies: the whole factors are shared


def param_note(factor) -> str:
    """The record note of a parameter's (expert's) LoRA factors."""
    if factor.expert is None:
        return (f"LoRA on parameter `{factor.param}` (target_parameters, r={factor.r}, scale={factor.scale:g}) "
                f"analysed exactly from its factors `{factor.b_name}` @ `{factor.a_name}`")
    r, e, n = factor.r, factor.expert, factor.experts
    cols = ", ".join(str(e + k * n) for k in range(min(r, 3))) + (", ..." if r > 3 else "")
    return (f"LoRA on parameter `{factor.param}` (target_parameters, r={r} per expert, scale={factor.scale:g}): "
            f"expert {e} of {n}, its factors rows {e * r}-{e * r + r - 1} of `{factor.a_name}` and columns {cols} "
            f"of `{factor.b_name}`, analysed exactly as " + ("(B_e @ A_e)^T (the experts read [experts, in, out])"
                                                             if factor.in_out else "B_e @ A_e")
            + (f", rows {factor.rows[0]}-{factor.rows[1] - 1} of it (the base keeps this part of the fused "
               f"[{factor.virtual[0]}, {factor.virtual[1]}] expert apart)" if factor.rows is not None else ""))
