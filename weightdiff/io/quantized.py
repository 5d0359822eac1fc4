"""Quantized safetensors checkpoints: recognise them and fold each quantized weight's stored
tensors (packed codes, scales, zero points, group index, absmax, block exponents) into one
logical float32 tensor, dequantized window by window through ``kernels.quant``.

Unlike ``checkpoint`` (which lists what the files hold), this module decides what the
model *is*: after folding, ``Checkpoint.tensors`` names the logical weights (a GPTQ
``q_proj.qweight``/``qzeros``/``scales``/``g_idx`` becomes ``q_proj.weight`` with shape
[out, in]), so companions are never paired, never reported as added and never counted
as parameters. Recognition uses the tensors' names, dtypes and shapes, checked against
``quantization_config`` in ``config.json`` where the folder has one. Anything
inconsistent (a scale grid that does not cover the weight, a missing companion, an
unsupported bit width or packing) is a ``CheckpointError`` naming the file and tensor.

>>> split_name("model.layers.0.mlp.down_proj.weight_scale_inv")
('model.layers.0.mlp.down_proj', 'weight_scale_inv')
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CheckpointError, escape_name
from ..kernels import quant as K
from ..kernels.dtypes import DTYPES
from .experts import expert_name, is_fused, switch_origin
from .files import load_json, read_beside
from .quant_sources import AWQ, CTFP4, FP8, GPTQ, MLX, MXFP4, Bitmask, BnB4, BnB8, IntGrid, Read, Source
from .safetensors_read import QuantScheme, TensorInfo

#: the most backtracking steps a `re:` entry may cost on one module name (as peft_adapter's)
_MATCH_BUDGET = 10_000_000

__all__ = ["QuantScheme", "fold", "read_quant_config", "split_name", "ACTIVATION_SCALES"]

#: stored beside quantized weights for activations or the KV cache, not part of any weight
ACTIVATION_SCALES = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale",
                     "v_scale", "input_global_scale", "q_scale", "weight_format")
_CONFIG_CAP = 16 << 20
#: leaves that only ever sit beside a quantized weight (an error when that weight is missing)
_COMPANIONS = ("weight_scale_inv", "weight_zero_point", "weight_g_idx", "weight_shape", "qzeros", "g_idx", "SCB")
#: leaves that are companions when the folder's config says the model is quantized
_COMPANIONS_IF_QUANTIZED = ("weight_scale", "scales", "absmax", "quant_map")

def split_name(name: str) -> tuple[str, str]:
    """(module, leaf) of a stored tensor name."""
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def _q(name: str) -> str:
    return f"`{escape_name(name)}`"


def read_quant_config(root: Path, read=None) -> dict | None:
    """``quantization_config`` of ``root/config.json`` (or ``quantize_config.json``), or None.
    ``read(name)`` gives the parsed JSON of a file beside the weights (None when absent) for a
    checkpoint that is not on disk (a streamed Hub repo)."""
    for fname, key in (("config.json", "quantization_config"), ("quantize_config.json", None),
                       (MODELOPT_CONFIG, "quantization")):
        if read is not None:
            path, doc = f"{root}/{fname}", read(fname)
            if doc is None:
                continue
        else:
            got = read_beside(root, fname, _CONFIG_CAP)       # refused when it resolves out of root
            if got is None:
                continue
            path, raw = got
            doc = load_json(raw, path, fname)
        mlx = _mlx_config(doc) if fname == "config.json" else None
        if mlx is not None:
            return {**mlx, "_path": str(path)}
        qc = doc.get(key) if key and isinstance(doc, dict) else doc
        if isinstance(qc, dict):
            if key is None:
                qc = {"quant_method": "gptq", **qc}
            elif fname == MODELOPT_CONFIG:       # NVIDIA ModelOpt's own file, when config.json names no method
                qc = {"quant_method": "modelopt", **qc}
            out = {**qc, "_path": str(path)}
            if qc.get("quant_method") == "compressed-tensors" and read is None:
                out["_recipe"] = recipe_modifiers(root)
            return out
    return None


#: NVIDIA ModelOpt's quantization file beside the weights (``export_hf_checkpoint``): {"producer", "quantization":
#: {"quant_algo", "exclude_modules", ...}}; newer exports repeat it in config.json as quant_method ``modelopt``
MODELOPT_CONFIG = "hf_quant_config.json"
#: ModelOpt algorithms read: fp8 weights with a per-tensor, per-channel or block scale, and NVFP4
MODELOPT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4")


def _mlx_config(doc: object) -> dict | None:
    """mlx-lm's quantization (``mlx_lm.convert -q``, ``mlx_lm.utils.quantize_model``): ``config.json``'s
    ``quantization`` {group_size, bits, mode} with per-module entries ({...} or false) by module path, written
    again as ``quantization_config`` with no ``quant_method`` (the Hugging Face configs' key). None for any
    other config (one whose ``quantization_config`` names a method: AWQ, GPTQ, gpt-oss's MXFP4 as released)."""
    if not isinstance(doc, dict):
        return None
    q, hf = doc.get("quantization"), doc.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q and "group_size" not in q and "mode" not in q or "quant_algo" in q:
        return None
    if isinstance(hf, dict) and hf.get("quant_method") is not None:
        return None
    return {**q, "quant_method": "mlx"}


#: llm-compressor's recipe.yaml beside the model: its modifiers say how the weights were quantized
RECIPE = "recipe.yaml"
_MODIFIER = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*Modifier)[ \t]*:", re.M)


def recipe_modifiers(root) -> list[str] | None:
    """The modifiers llm-compressor's ``recipe.yaml`` beside the weights names (``QuantizationModifier``,
    ``GPTQModifier``, ...), in order, or None without a recipe (or one naming none). Read as text: each
    modifier is a mapping key ending in ``Modifier``.

    >>> _MODIFIER.findall("default_stage:\\n  default_modifiers:\\n    QuantizationModifier:\\n      scheme: W4A16\\n")
    ['QuantizationModifier']
    """
    got = read_beside(root, RECIPE, _CONFIG_CAP)
    if got is None:
        return None
    names = list(dict.fromkeys(_MODIFIER.findall(got[1].decode("utf-8", "replace"))))
    return names or None


def rounded_to_nearest(qc: dict) -> bool:
    """Whether a compressed-tensors model's integer weights were rounded to nearest, with no error
    compensation: its recipe (``recipe_modifiers``) names ``QuantizationModifier`` and no other modifier
    (GPTQModifier compensates errors; AWQ, SmoothQuant, SpinQuant and the like change the weights before
    quantizing), no config group records a GPTQ ``actorder``, and no transform was applied. False when
    that cannot be told (no recipe: a Hub checkpoint streamed, a folder without it)."""
    recipe = qc.get("_recipe")
    if not recipe or set(recipe) != {"QuantizationModifier"} or qc.get("transform_config"):
        return False
    return not any(w.get("actorder") not in (None, False, "", "none", "None") for w in _ct_weights(qc))


# -- recognition -------------------------------------------------------------------------

def _gptq_order(qc: dict) -> bool | str:
    """The column order a GPTQ config records: False (in order), True (``desc_act``: the first group
    of ``g_idx`` holds the first column), or "unknown": GPTQModel's ``act_group_aware`` (its default
    since 5.x; ``meta.act_group_aware`` or top level) reorders the groups and the columns within them
    while writing a plain ``g_idx``, and ``static_groups`` with ``desc_act`` fixes the groups before
    the reordering; neither stores the order."""
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    if any(_truthy(d.get("act_group_aware")) for d in (qc, meta)):
        return "unknown"
    if _truthy(qc.get("desc_act")):
        return "unknown" if any(_truthy(d.get("static_groups")) for d in (qc, meta)) else True
    return False


#: config keys of quantizers that write the GPTQ layout with learned, not min/max, scales (AutoRound)
_LEARNED_SCALE_KEYS = ("autoround", "auto_round", "iters", "minmax_lr", "enable_minmax_tuning")


def _minmax_gptq(qc: dict) -> bool:
    """Whether the config names a GPTQ run whose group scales are min/max of the weights it read
    (GPTQModel, AutoGPTQ, optimum: ``Quantizer.find_params`` without the ``mse`` clipping search):
    then the first group it set up reproduces from the base. False for an ``mse`` search, a
    quantizer that learns its scales (AutoRound writes this layout too), or one GPTQModel's
    ``meta.quantizer`` does not name."""
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    if qc.get("mse") or meta.get("mse"):
        return False
    keys = " ".join(str(k).lower() for k in (*qc, *meta))
    if any(k in keys for k in _LEARNED_SCALE_KEYS):
        return False
    who = meta.get("quantizer")
    if who is not None:
        names = " ".join(map(str, who)) if isinstance(who, list) else str(who)    # a list may hold anything
        return "gptqmodel" in names.lower()
    return True


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() == "true") or (type(v) is int and v == 1)


def _shape_pair(t: TensorInfo, read, what: str) -> tuple[int, int]:
    """The two non-negative integers stored tensor ``t`` holds (``what``: the shape they give); CheckpointError
    naming it otherwise."""
    if not t.dtype.startswith(("I", "U")) or math.prod(t.shape) != 2:
        raise _err(t, f"{_q(t.name)} is {t.dtype} {list(t.shape)}, expected two integers ({what})")
    shape = tuple(int(v) for v in read(t.name).reshape(-1))
    if min(shape) < 0:
        raise _err(t, f"{_q(t.name)} = {list(shape)} is not a shape (a negative dimension)")
    return shape


def _err(info: TensorInfo, problem: str, hint: str | None = None) -> CheckpointError:
    return CheckpointError(info.path, problem, hint)


def _scheme(fmt: str, label: str, bits: int, group: str, calibrated: bool, parts: Sequence[TensorInfo]) -> QuantScheme:
    return QuantScheme(fmt, label, bits, group, calibrated, tuple(p.name for p in parts),
                       sum(p.nbytes for p in parts))


def _int_cfg(qc: dict, key: str, default=None):
    v = qc.get(key, default)
    return v if v is None or (isinstance(v, int) and not isinstance(v, bool)) else default


def _ct_weights(qc: dict) -> list[dict]:
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    return [g["weights"] for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)]


def _ct_target(target: object, mod: str, path: str | None = None) -> bool | None:
    """Whether a compressed-tensors ``targets`` / ``ignore`` entry names module ``mod``: a ``re:``
    pattern (``re.match``, as compressed-tensors matches it) or a module name; None for what may be a
    class name (``Linear``), which the names of a checkpoint cannot decide. The publisher writes both the
    pattern and the names it runs on: a pattern whose backtracking could blow up (``(a+)+$``: a repetition
    inside a repetition, a repeated alternation, back references; look-aheads are walked as groups) is a
    CheckpointError (file ``path``),
    as is one too costly for a module name this long; llm-compressor's own (``re:.*lm_head``,
    ``re:model.layers.\\d+.mlp.experts.*``) match as they did."""
    if not isinstance(target, str):
        return False
    if target.startswith("re:"):
        try:
            reps = _ct_repeats(target, path)
        except re.error:
            return False
        # the backtracking of reps unnested repetitions over n characters tries at most about
        # C(n + reps, reps + 1) splits: n ** 3 / 6 for re:model.layers.\d+.mlp.experts.* (reps = 2)
        if math.comb(len(mod) + reps, reps + 1) > _MATCH_BUDGET:
            raise CheckpointError(path, f"quantization_config pattern `{escape_name(target[:60])}` is a regular "
                                        f"expression too costly to match against a module name of {len(mod):,} "
                                        "characters", _CT_HINT)
        return re.match(target[3:], mod) is not None
    return True if target == mod else (False if "." in target else None)


_CT_HINT = "list module names, or patterns without nested repetition"


@functools.lru_cache(maxsize=256)
def _ct_repeats(target: str, path: str | None) -> int:
    """The repetitions in ``re:`` entry ``target`` (checked safe to backtrack); re.error when Python cannot
    compile it (compressed-tensors would fail on it too: it names no module)."""
    from .peft_adapter import _pattern_repeats

    re.compile(target[3:])
    return _pattern_repeats(Path(path) if path else None, "", target[3:],
                            f"quantization_config targets/ignore entry `{escape_name(target[:60])}`", _CT_HINT,
                            lookarounds=True)


def _ct_args(qc: dict, mod: str, kind: str) -> list[dict]:
    """The ``weights`` quantization args of the compressed-tensors config groups that may apply to
    module ``mod`` with ``type`` ``kind`` ("int" or "float"): none when ``ignore`` names the module,
    and a group whose every target is a name or pattern that misses the module does not count."""
    if qc.get("quant_method") != "compressed-tensors":
        return []
    ignore = qc.get("ignore") if isinstance(qc.get("ignore"), list) else []
    if any(_ct_target(t, mod, qc.get("_path")) for t in ignore):
        return []
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    out = []
    for g in groups.values():
        if not (isinstance(g, dict) and isinstance(g.get("weights"), dict)):
            continue
        targets = g.get("targets") if isinstance(g.get("targets"), list) else []
        if targets and all(_ct_target(t, mod, qc.get("_path")) is False for t in targets):
            continue
        if str(g["weights"].get("type") or "int") == kind:
            out.append(g["weights"])
    return out


def _shown(v: object) -> str:
    """A config or JSON value for a message, cut short, control and bidirectional characters escaped."""
    r = escape_name(repr(v))
    return r if len(r) <= 40 else r[:37] + "..."


def _block_size(qc: dict, want: object, key: str) -> tuple[int, int] | None:
    """``weight_block_size`` / ``block_structure`` of quantization_config as two positive
    integers, or None when absent."""
    if want is None:
        return None
    if not (isinstance(want, list) and len(want) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in want)):
        raise CheckpointError(qc.get("_path"), f"quantization_config {key} {_shown(want)} is not two positive integers")
    return int(want[0]), int(want[1])


def _fp8_block(w: TensorInfo, s: TensorInfo, want: Sequence[int] | None,
               infer: str = "even") -> tuple[int, int] | None:
    """The block (bh, bw) of a scale grid over an fp8 weight, or None for channel/tensor scales. Without a
    block size in the config, the grid is DeepSeek's 128x128 (transformers' default) or the block the
    shapes give, as ``infer`` allows: ``"any"`` (compressed-tensors, whose group and block layouts its
    config's strategy then checks), ``"even"`` (a block that divides the weight evenly), ``"none"``
    (fbgemm_fp8, which has no block scales: per channel or per tensor). Any other grid is refused: a
    [7, 1] ``weight_scale`` over [256, 512] read as "37x512 block scales", a layout no writer produces."""
    R, C = w.shape[-2], w.shape[-1]
    ss = s.shape
    if 0 in ss:
        raise _err(s, f"scale {_q(s.name)} has shape {list(ss)}, with no scales along a dimension "
                      f"(fp8 weight {_q(w.name)} {list(w.shape)})")
    if want and all(x > 0 for x in want) and tuple(ss) == (*w.shape[:-2], -(-R // want[0]), -(-C // want[1])):
        return int(want[0]), int(want[1])    # the grid the config asks for, even one block ([1, 1]: R, C <= 128)
    if math.prod(ss) == 1 or (len(ss) <= 2 and len(w.shape) == 2 and ss[0] == R and math.prod(ss[1:]) == 1):
        if want:
            raise _err(s, f"{_q(s.name)} has shape {list(ss)}, but quantization_config asks for "
                          f"{list(want)} blocks over {_q(w.name)} {list(w.shape)}")
        return None
    blocks = [tuple(want)] if want else ([] if infer == "none" else [(128, 128)])
    if not want and infer != "none" and len(ss) >= 2:
        bh, bw = -(-R // ss[-2]), -(-C // ss[-1])
        if infer == "any" or (R % bh == 0 and C % bw == 0):
            blocks.append((bh, bw))
    for bh, bw in blocks:
        if bh > 0 and bw > 0 and tuple(ss) == (*w.shape[:-2], -(-R // bh), -(-C // bw)):
            return int(bh), int(bw)
    raise _err(s, f"scale {_q(s.name)} {list(ss)} does not tile fp8 weight {_q(w.name)} {list(w.shape)}"
                  + (f" in {list(want)} blocks" if want else
                     " per channel ([rows, 1]) or per tensor (fbgemm_fp8 has no block scales)" if infer == "none" else
                     " in 128x128 blocks or blocks that divide it evenly, per channel ([rows, 1]) or per tensor"
                     if infer == "even" else " in blocks, per channel or per tensor"))


def _fp8_strategy(qc: dict, w: TensorInfo, s: TensorInfo, block: tuple[int, int] | None, kind: str) -> None:
    """A compressed-tensors fp8 model's scale must be one its config's strategies gives: a per-tensor scalar
    under ``strategy: channel`` is a scale that does not belong to this config (a corrupt or mixed export),
    and read as one it would dequantize every row with one number. Only when every config group names a
    strategy this reader knows (``targets`` are not matched to modules here, so any group's may be this
    weight's)."""
    if qc.get("quant_method") != "compressed-tensors":
        return
    said = {wt.get("strategy") for wt in _ct_weights(qc)}
    if not said or not said <= {"tensor", "channel", "block"}:
        return
    rows = w.shape[-2]
    fits = {"block"} if block else {"tensor"} | ({"channel"} if rows == 1 else set()) \
        if math.prod(s.shape) == 1 else {"channel"}
    if not fits & said:
        raise _err(s, f"{_q(s.name)} has shape {list(s.shape)} ({kind} over {_q(w.name)} {list(w.shape)}), but "
                      f"quantization_config's strategy is {' or '.join(sorted(said))}")


def _fp8(mod: str, leaves: dict, qc: dict) -> Source:
    w = leaves["weight"]
    s = leaves.get("weight_scale_inv") or leaves.get("weight_scale")
    method = qc.get("quant_method") or ("fp8" if "weight_scale_inv" in leaves else "fbgemm_fp8")
    want = _block_size(qc, qc.get("weight_block_size"), "weight_block_size")
    if want is None:
        raw = next((wt["block_structure"] for wt in _ct_weights(qc) if wt.get("block_structure")), None)
        want = _block_size(qc, raw, "block_structure")
    if len(w.shape) < 2:
        raise _err(w, f"fp8 weight {_q(w.name)} has shape {list(w.shape)}, expected a matrix")
    block = _fp8_block(w, s, want, infer="any" if method == "compressed-tensors" else
                       "none" if qc.get("quant_method") == "fbgemm_fp8" else "even")
    if block is None and len(w.shape) != 2:
        raise _err(s, f"per-channel scale {_q(s.name)} over a {len(w.shape)}-D weight is not supported")
    kind = f"{block[0]}x{block[1]} block scales" if block else \
        "per-tensor scale" if math.prod(s.shape) == 1 else "per-channel scales"
    _fp8_strategy(qc, w, s, block, kind)
    fmt = "F8_E4M3" if w.dtype.startswith("F8_E4M3") else "e5m2"
    label = f"fp8 {'e4m3' if fmt == 'F8_E4M3' else 'e5m2'}, {kind}"
    group = f"{block[0]}x{block[1]}" if block else ("tensor" if math.prod(s.shape) == 1 else "channel")
    sch = _scheme(method, label, 8, group, False, [w, s])
    return FP8(w, s, block, sch)


def _check_index(info: TensorInfo, g: np.ndarray, groups: int) -> None:
    if info.dtype not in ("I32", "I64", "I16", "U8", "I8") or (g.size and (g.min() < 0 or g.max() >= groups)):
        raise _err(info, f"{_q(info.name)} must index the {groups} scale groups with integers in "
                         f"[0, {groups}); found {info.dtype} values "
                         f"{'outside that range' if info.dtype.startswith(('I', 'U')) else ''}".rstrip())


def _gptq_awq(mod: str, leaves: dict, qc: dict, read: Read) -> Source:
    qw = leaves["qweight"]
    missing = [k for k in ("qzeros", "scales") if k not in leaves]
    if missing:
        raise _err(qw, f"{_q(qw.name)} has no {', '.join(_q(mod + '.' + k) for k in missing)} beside it")
    qz, sc, gi = leaves["qzeros"], leaves["scales"], leaves.get("g_idx")
    for t in (qw, qz):
        if t.dtype != "I32" or len(t.shape) != 2:
            raise _err(t, f"{_q(t.name)} is {t.dtype} {list(t.shape)}, expected a 2-D I32 packed tensor")
    if len(sc.shape) != 2 or sc.dtype not in ("F16", "BF16", "F32"):
        raise _err(sc, f"{_q(sc.name)} is {sc.dtype} {list(sc.shape)}, expected 2-D float scales")
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        method = "gptq" if gi is not None or sc.shape[1] == qw.shape[1] else "awq"
    bits = _int_cfg(qc, "bits") or _int_cfg(qc, "w_bit")
    if method == "gptq":
        if bits is None and gi is not None and gi.shape and (32 * qw.shape[0]) % gi.shape[0] == 0:
            bits = 32 * qw.shape[0] // gi.shape[0]
        if bits not in (2, 3, 4, 8):
            raise _err(qw, f"GPTQ weight {_q(qw.name)}: {bits}-bit packing is not supported (2, 3, 4 or 8 bits)"
                       if bits else f"GPTQ weight {_q(qw.name)}: bit width unknown (no bits in quantization_config)")
        codes, words = K.gptq_unit(bits)       # 32/bits codes a word; at 3 bits 32 codes in three words
        if qw.shape[0] % words:
            raise _err(qw, f"GPTQ weight {_q(qw.name)} {list(qw.shape)}: 3-bit codes are packed 32 to three int32 "
                           "words, not a whole number of them")
        out_f, in_f = qw.shape[1], qw.shape[0] * codes // words
        G = sc.shape[0]
        if sc.shape[1] != out_f or out_f % codes or qz.shape != (G, out_f // codes * words):
            raise _err(sc, f"GPTQ tensors of {_q(mod)} disagree: qweight {list(qw.shape)}, qzeros "
                           f"{list(qz.shape)}, scales {list(sc.shape)} at {bits} bits")
        gs = _int_cfg(qc, "group_size")
        if gi is not None and gi.shape != (in_f,):
            n = gi.shape[0] if len(gi.shape) == 1 else None
            # the scales decide which of the two is short: AutoGPTQ's QuantLinear has
            # ceil(in / group_size) scale rows, and g_idx one entry per input
            if n and n % codes == 0 and (G == -(-n // gs) if gs and gs > 0 else gs == -1 and G == 1):
                raise _err(qw, f"{_q(qw.name)} has shape {list(qw.shape)}, packing {in_f} inputs at {bits} bits, "
                               f"but {_q(gi.name)} and {_q(sc.name)} {list(sc.shape)} give {n} inputs "
                               f"(expected [{n // codes * words}, {out_f}])")
            raise _err(gi, f"{_q(gi.name)} has shape {list(gi.shape)}, expected [{in_f}] (one group per input "
                           f"of {_q(qw.name)} {list(qw.shape)} at {bits} bits)")
        if gi is not None:
            _check_index(gi, read(gi.name), G)
        if gi is not None and gs is not None and G != (-(-in_f // gs) if gs > 0 else 1 if gs == -1 else -1):
            # AutoGPTQ / GPTQModel / transformers build ceil(in / group_size) scale rows (one with -1):
            # a config that disagrees does not load there
            want = f"{-(-in_f // gs)}" if gs > 0 else "1" if gs == -1 else "no valid grouping"
            raise _err(sc, f"{_q(sc.name)} has {G} group rows over {in_f} inputs, but quantization_config's "
                           f"group_size {gs} gives {want}")
        group = in_f if gs in (None, -1) and G == 1 else gs
        if gi is None and (not group or in_f % group or in_f // group != G):
            raise _err(sc, f"group size {group} does not give the {G} scale rows of {_q(sc.name)} "
                           f"over {in_f} inputs")
        layout = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if layout not in ("gptq", "gptq_v2"):
            # GPTQModel's gptq_p (planar), marlin, bitblas, qqq... keep the tensor names and shapes but
            # not the packing: read as classic GPTQ, every value would be wrong
            raise CheckpointError(qc.get("_path"), f"GPTQ checkpoint_format {layout!r} is not supported (its packing "
                                                   "differs from the classic gptq / gptq_v2 layouts)",
                                  "convert it to checkpoint_format gptq or gptq_v2, or compare the unquantized model")
        v1 = layout != "gptq_v2"
        order = _gptq_order(qc)
        desc = {"unknown": ", column order not recorded", True: ", desc_act"}.get(order, "")
        sym = {True: ", sym", False: ", asym"}.get(qc.get("sym"), "")
        label = f"int{bits} group {group if group and group < in_f else 'channel'}{desc}{sym}, " \
                f"{'v1 zeros (+1)' if v1 else 'v2 zeros'}"
        sch = _scheme("gptq", label, bits, str(group), True, [t for t in (qw, qz, sc, gi) if t is not None])
        sym = qc.get("sym") if isinstance(qc.get("sym"), bool) else None
        return GPTQ(mod + ".weight", (out_f, in_f), sch, qw.path, qw, qz, sc, gi, bits, v1, group, actorder=order,
                    sym=sym, minmax=sym is not None and _minmax_gptq(qc))
    bits = bits or 4
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(qc.get("_path"), f"AWQ version {version!r} is not supported (GEMM packing only)")
    if bits != 4:
        raise _err(qw, f"AWQ weight {_q(qw.name)}: {bits}-bit GEMM packing is not supported (4 bits)")
    in_f, out_f = qw.shape[0], qw.shape[1] * 8
    G = sc.shape[0]
    if sc.shape[1] != out_f or qz.shape != (G, qw.shape[1]) or G == 0 or in_f % G:
        raise _err(sc, f"AWQ tensors of {_q(mod)} disagree: qweight {list(qw.shape)}, qzeros "
                       f"{list(qz.shape)}, scales {list(sc.shape)}")
    group = in_f // G
    gs = _int_cfg(qc, "group_size") or _int_cfg(qc, "q_group_size")
    if gs not in (None, -1) and gs != group:
        raise _err(sc, f"{_q(sc.name)} has {G} groups over {in_f} inputs (group {group}), but "
                       f"quantization_config says group_size {gs}")
    sch = _scheme("awq", f"int4 group {group}, asym, GEMM order", 4, str(group), True, [qw, qz, sc])
    return AWQ(mod + ".weight", (out_f, in_f), sch, qw.path, qw, qz, sc, 4, group)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _ct_layout(qc: dict, args: dict, R: int, C: int) -> tuple[str, int | None, tuple | None, tuple] | None:
    """(strategy, group size, block, the scale shape compressed-tensors gives it) of one config group's
    weights over a logical [R, C] weight (``initialize_qparams``: groups and blocks rounded up), or None
    when the group names no strategy this reader knows."""
    st = args.get("strategy")
    if st == "tensor":
        return "tensor", None, None, (1,)
    if st == "channel":
        return "channel", None, None, (R, 1)
    if st == "group":
        gs = args.get("group_size")
        if not _pos_int(gs):
            raise CheckpointError(qc.get("_path"), f"quantization_config group_size {_shown(gs)} of a group "
                                                   "strategy is not a positive integer")
        return "group", gs, None, (R, -(-C // gs))
    if st == "block":
        bh, bw = _block_size(qc, args.get("block_structure"), "block_structure") or (0, 0)
        if not bh:
            raise CheckpointError(qc.get("_path"), "quantization_config block strategy has no block_structure")
        return "block", None, (bh, bw), (-(-R // bh), -(-C // bw))
    return None


def _ct_int(mod: str, leaves: dict, qc: dict, read: Read) -> Source:
    """compressed-tensors integer weights. The config's ``num_bits``, ``strategy``/``group_size`` and
    ``symmetric`` win, as in compressed-tensors' own decompressor: tensors that disagree with them
    are refused, not reinterpreted."""
    packed = "weight_packed" in leaves
    codes = leaves["weight_packed" if packed else "weight"]
    sc = leaves.get("weight_scale")
    if sc is None:
        raise _err(codes, f"{_q(codes.name)} has no {_q(mod + '.weight_scale')} beside it")
    zp, gi = leaves.get("weight_zero_point"), leaves.get("weight_g_idx")
    args = _ct_args(qc, mod, "int")
    if packed:
        ws = leaves.get("weight_shape")
        if ws is None:
            raise _err(codes, f"{_q(codes.name)} has no {_q(mod + '.weight_shape')} beside it")
        shape = _shape_pair(ws, read, "the logical [rows, columns]")
        if len(shape) != 2 or codes.dtype != "I32" or len(codes.shape) != 2 or shape[0] != codes.shape[0]:
            raise _err(ws, f"{_q(ws.name)} = {list(shape)} does not match {_q(codes.name)} "
                           f"{codes.dtype} {list(codes.shape)}")
        words = codes.shape[1]
        cands = [b for b in range(1, 9) if -(-shape[1] * b // 32) == words]
        cfg_bits = sorted({a["num_bits"] for a in args if _pos_int(a.get("num_bits"))})
        if cfg_bits:
            fit = [b for b in cfg_bits if b in cands]
            if not fit:     # the config wins: a weight_shape or word count that disagrees is bad input
                need = " or ".join(f"{-(-shape[1] * b // 32)} at {b} bits" for b in cfg_bits)
                raise _err(codes, f"{_q(codes.name)} has {words} int32 words per row, but {_q(ws.name)} = "
                                  f"{list(shape)} needs {need} (num_bits of quantization_config)")
        else:
            fit = cands
        if len(fit) != 1:
            raise _err(codes, f"{_q(codes.name)}: bit width unknown ({words} words per row of "
                              f"{shape[1]} codes; no num_bits in quantization_config matches)")
        bits = fit[0]
        args = [a for a in args if a.get("num_bits") == bits] if cfg_bits else args
        parts = [codes, ws]
    else:
        shape, bits, parts = codes.shape, 8, [codes]
        if len(shape) != 2:
            raise _err(codes, f"{_q(codes.name)} is {codes.dtype} {list(shape)}, expected a matrix")
    if zp is None and args and all(a.get("symmetric", True) is False for a in args):
        raise _err(codes, f"{_q(codes.name)} has no {_q(mod + '.weight_zero_point')} beside it, but "
                          "quantization_config says its weights are asymmetric (symmetric: false)")
    parts += [t for t in (sc, zp, gi) if t is not None]
    R, C = shape
    ss = sc.shape
    block = None
    layouts = [lay for a in args if (lay := _ct_layout(qc, a, R, C)) is not None]
    if gi is not None and gi.shape != (C,):
        raise _err(gi, f"{_q(gi.name)} has shape {list(gi.shape)}, expected [{C}]")
    if layouts and len(layouts) == len(args):
        # every config group that may hold this weight names its strategy: the scale must be its shape
        fit = [lay for lay in layouts if (math.prod(ss) == 1 if lay[0] == "tensor" else tuple(ss) == lay[3])]
        if not fit:
            said = " or ".join(f"{lay[0]}" + (f" {lay[1]}" if lay[1] else f" {list(lay[2])}" if lay[2] else "")
                               + f": {list(lay[3])}" for lay in layouts)
            raise _err(sc, f"{_q(sc.name)} has shape {list(ss)}, but quantization_config's strategy for "
                           f"{_q(codes.name)} of logical shape {[R, C]} gives {said}")
        strategy, group, block = fit[0][:3]
        if group and C % group:
            raise _err(sc, f"quantization_config's group_size {group} does not divide the {C} columns of "
                           f"{_q(codes.name)} (compressed-tensors quantizes whole groups only)")
        if gi is not None:
            if strategy != "group":
                raise _err(gi, f"{_q(gi.name)} is a group index, but quantization_config's strategy is {strategy}")
            group = None
            _check_index(gi, read(gi.name), ss[1])
    elif gi is not None:
        strategy, group = "group", None
        if len(ss) != 2 or ss[0] != R:
            raise _err(sc, f"{_q(sc.name)} has shape {list(ss)}, expected [{R}, groups]")
        _check_index(gi, read(gi.name), ss[1])
    elif math.prod(ss) == 1:
        strategy, group = "tensor", None
    elif len(ss) == 2 and ss[0] == R and ss[1] == 1:
        strategy, group = "channel", None
    elif len(ss) == 2 and ss[0] == R and ss[1] > 1 and C % ss[1] == 0:
        strategy, group = "group", C // ss[1]
    else:
        want = _block_size(qc, next((w["block_structure"] for w in _ct_weights(qc) if w.get("block_structure")),
                                    None), "block_structure")
        if not (want and len(ss) == 2 and ss == (-(-R // want[0]), -(-C // want[1]))):
            raise _err(sc, f"scale {_q(sc.name)} {list(ss)} fits no group, channel, tensor or block "
                           f"layout over {_q(codes.name)} of logical shape {[R, C]}")
        strategy, group, block = "block", None, (int(want[0]), int(want[1]))
    if zp is not None:
        # compressed-tensors packs group and channel zero points along the rows, 32 / bits per int32
        # word (pack_quantized ``compress``); otherwise they have the scale's shape
        if packed and strategy in ("group", "channel"):
            want_z, how = (-(-R * bits // 32), ss[1]), f" ({R} rows of {bits}-bit zero points packed " \
                f"{32 // bits} per int32, x {ss[1]} {'groups' if strategy == 'group' else 'column'})"
            ok = zp.dtype == "I32" and tuple(zp.shape) == want_z
        else:
            want_z, how = tuple(ss), " (the shape of its scale)"
            ok = zp.dtype.startswith(("I", "U")) and (tuple(zp.shape) == want_z or
                                                      (strategy == "tensor" and math.prod(zp.shape) == 1))
        if not ok:
            raise _err(zp, f"{_q(zp.name)} is {zp.dtype} {list(zp.shape)}, expected "
                           f"{'I32 ' if packed and strategy in ('group', 'channel') else 'integer '}"
                           f"{list(want_z)}{how}")
    fmt = qc.get("format") or "pack-quantized" if packed else (qc.get("format") or "int-quantized")
    what = {"group": f"group {group}" if group else "group (g_idx)", "channel": "per-channel",
            "tensor": "per-tensor", "block": f"{block[0]}x{block[1]} blocks" if block else ""}[strategy]
    rtn = rounded_to_nearest(qc)
    label = f"int{bits} {'asym' if zp is not None else 'sym'}, {what} ({fmt}{', round to nearest' if rtn else ''})"
    sch = _scheme("compressed-tensors", label, bits, str(group or strategy), not rtn, parts)
    # llm-compressor records its GPTQ column order as `actorder` (null, "group", "static", "weight")
    actorder = any(w.get("actorder") not in (None, False, "", "none", "None") for w in _ct_weights(qc))
    return IntGrid(mod + ".weight", (R, C), sch, codes.path, codes, bits, sc, zp, gi, strategy, group,
                   block, packed, actorder, minmax=_ct_minmax(qc, args))


#: llm-compressor's observers whose weight scales are the min/max of the weights (``memoryless_minmax``
#: its default since 0.9; ``minmax`` before); ``mse`` searches a clipping range instead
_MINMAX_OBSERVERS = (None, "minmax", "memoryless_minmax", "static_minmax")


def _ct_minmax(qc: dict, args: list[dict]) -> bool:
    """Whether every config group that may hold a compressed-tensors integer weight sets its scales as
    ``calculate_qparams`` does from the min/max of the weights it read: int, a min/max observer,
    no scale dtype of its own, no transform (a rotation quantizes other weights than the base's)."""
    if not args or qc.get("transform_config"):
        return False
    return all(str(a.get("type") or "int") == "int"
               and a.get("observer") in _MINMAX_OBSERVERS and a.get("scale_dtype") is None
               and not a.get("observer_kwargs") for a in args)


#: compressed-tensors' sparse formats this reader decodes (lossless: the non-zero values and where they stand)
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")


def _sparsity_format(qc: dict) -> str | None:
    """The ``sparsity_config.format`` of a compressed-tensors config when it compresses the weights
    (``sparse-bitmask``, ``sparse-24-bitmask``), None when it does not (absent, empty, ``dense``);
    CheckpointError for a sparse format this reader does not decode, or one stacked on quantization
    (its values would be codes)."""
    sp = qc.get("sparsity_config")
    if not sp:
        return None
    fmt = sp.get("format") if isinstance(sp, dict) else None
    if fmt in (None, "", "dense"):
        return None
    if fmt not in SPARSE_FORMATS:
        raise CheckpointError(qc.get("_path"), f"compressed-tensors sparsity_config format {_shown(fmt)} is not "
                                               "supported", "supported: sparse-bitmask, sparse-24-bitmask "
                                                            "(unquantized); or compare the dense model")
    if _ct_weights(qc):
        raise CheckpointError(qc.get("_path"), f"compressed-tensors sparsity_config format {fmt!r} together with "
                                               "quantization (config_groups) is not supported",
                              "compare the dense or the quantized-only model")
    return fmt


def _bitmask(mod: str, leaves: dict, fmt: str, read: Read) -> Source:
    """One weight of a compressed-tensors sparse model: ``m.compressed``, ``m.bitmask``, ``m.shape``
    (and ``m.row_offsets`` for ``sparse-bitmask``), checked as ``bitmask_decompress`` needs them."""
    missing = [k for k in ("compressed", "bitmask", "shape") if k not in leaves]
    some = leaves.get("compressed") or leaves.get("bitmask")
    if missing:
        raise _err(some, f"{_q(some.name)} has no {', '.join(_q(mod + '.' + k) for k in missing)} beside it "
                         f"({fmt})")
    vals, mask, sh = leaves["compressed"], leaves["bitmask"], leaves["shape"]
    shape = _shape_pair(sh, read, "the dense [rows, columns]")
    R, C = shape
    if mask.dtype != "U8" or tuple(mask.shape) != (R, -(-C // 8)):
        raise _err(mask, f"{_q(mask.name)} is {mask.dtype} {list(mask.shape)}, expected U8 {[R, -(-C // 8)]} "
                         f"(one bit per element of {_q(sh.name)} = {list(shape)})")
    if vals.dtype not in ("BF16", "F16", "F32", "F64"):
        raise _err(vals, f"{_q(vals.name)} is {vals.dtype}: sparse values other than float (a quantized sparse "
                         "model) are not supported")
    if fmt == "sparse-24-bitmask" and tuple(vals.shape) != (R, C // 2):
        raise _err(vals, f"{_q(vals.name)} has shape {list(vals.shape)}, expected {[R, C // 2]} (2:4: half of "
                         f"each row of {list(shape)})")
    if fmt == "sparse-bitmask" and len(vals.shape) != 1:
        raise _err(vals, f"{_q(vals.name)} has shape {list(vals.shape)}, expected the flat non-zero values")
    parts = [vals, mask, sh] + ([leaves["row_offsets"]] if "row_offsets" in leaves else [])
    sch = _scheme("compressed-tensors", f"{fmt}, lossless", DTYPES_BITS.get(vals.dtype, 16), "element", False,
                  parts)
    return Bitmask(mod + ".weight", (R, C), sch, vals.path, vals, mask)


DTYPES_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64}


_BNB_MARKER = ".quant_state.bitsandbytes__"


def _bnb4(qs_name: str, tensors: dict, read: Read) -> tuple[Source, list[str]]:
    qs = tensors[qs_name]
    prefix, _, kind = qs_name.partition(_BNB_MARKER)
    if kind not in ("nf4", "fp4"):
        raise _err(qs, f"{_q(qs_name)} is not a bitsandbytes quant state name "
                       "(<weight>.quant_state.bitsandbytes__nf4 or __fp4)")
    w = tensors.get(prefix)
    if w is None:
        raise _err(qs, f"bitsandbytes quant state {_q(qs_name)} has no weight {_q(prefix)} beside it")
    if qs.dtype != "U8" or len(qs.shape) != 1:
        raise _err(qs, f"{_q(qs_name)} is {qs.dtype} {list(qs.shape)}, expected the U8 bytes of a JSON quant state")
    meta = load_json(bytes(read(qs_name).reshape(-1).view(np.uint8)), qs.path, f"quant state {_q(qs_name)}")
    names = {k: prefix + "." + k for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
    if names["absmax"] not in tensors or names["quant_map"] not in tensors:
        raise _err(w, f"bitsandbytes weight {_q(prefix)} has no "
                      f"{_q(names['absmax'] if names['absmax'] not in tensors else names['quant_map'])}")
    shape = meta.get("shape") if isinstance(meta, dict) else None
    bs = meta.get("blocksize") if isinstance(meta, dict) else None
    if not (isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape) and isinstance(bs, int)
            and bs > 0 and meta.get("quant_type") in ("nf4", "fp4")):
        raise _err(qs, f"{_q(qs_name)}: quant state lacks a valid shape, blocksize or quant_type")
    n = math.prod(shape)
    am, qm = tensors[names["absmax"]], tensors[names["quant_map"]]
    # bitsandbytes' packed state keeps nested_blocksize / nested_offset / nested_dtype in the JSON and
    # stores the absmax as U8 codes when it double-quantizes: any of these says the weight is nested
    nested = any(str(k).startswith("nested_") for k in meta) or am.dtype == "U8" or \
        names["nested_absmax"] in tensors or names["nested_quant_map"] in tensors
    if w.nbytes * 2 < n or am.numel != -(-n // bs) or qm.numel != 16:
        raise _err(w, f"bitsandbytes weight {_q(prefix)} of shape {shape} disagrees with its companions: "
                      f"{w.nbytes:,} packed bytes, {am.numel} absmax for blocks of {bs}, {qm.numel} codes")
    parts = [w, qs, am, qm]
    nest = None
    if nested:
        lacks = [_q(names[k]) for k in ("nested_absmax", "nested_quant_map") if names[k] not in tensors] + \
            [f"{k} in {_q(qs_name)}" for k in ("nested_blocksize", "nested_offset") if k not in meta]
        if lacks:
            keys = [str(k) for k in meta if str(k).startswith("nested_")]
            why = f"its quant state has {keys[0]}" if keys else f"its absmax is {am.dtype}" if am.dtype == "U8" \
                else "nested tensors are stored beside it"
            raise _err(w, f"bitsandbytes weight {_q(prefix)} is double-quantized ({why}) but has no "
                          f"{', '.join(lacks)}")
        nbs, off = meta["nested_blocksize"], meta["nested_offset"]
        finite = isinstance(off, float) and math.isfinite(off) or \
            isinstance(off, int) and not isinstance(off, bool) and abs(off) < 2 ** 53
        if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs <= 0 or not finite:
            raise _err(qs, f"{_q(qs_name)}: nested_blocksize {_shown(nbs)} / nested_offset {_shown(off)} are not a "
                           "positive integer and a finite number")
        nest = (tensors[names["nested_absmax"]], tensors[names["nested_quant_map"]])
        # every length the dequantization indexes by, up front: one nested absmax per nested block of the
        # absmax codes, a code book for every U8 code (bitsandbytes' dynamic map: 256); short, they were
        # an IndexError (exit 1) in the middle of the comparison
        need = -(-am.numel // nbs)
        bad = (nest[0], f"has {nest[0].numel} values, {am.numel} absmax codes in nested blocks of {nbs} need "
                        f"{need}") if nest[0].numel != need else \
            (nest[1], f"has {nest[1].numel} codes, bitsandbytes' dynamic map has 256") if nest[1].numel != 256 else \
            (am, f"is {am.dtype}, the codes of a double-quantized absmax are U8") if am.dtype != "U8" else None
        if bad is not None:
            raise _err(bad[0], f"bitsandbytes weight {_q(prefix)} is double-quantized but {_q(bad[0].name)} {bad[1]}")
        parts += list(nest)
    label = f"{meta['quant_type']} block {bs}{', nested absmax' if nest else ''}"
    sch = _scheme("bitsandbytes", label, 4, str(bs), False, parts)
    return BnB4(prefix, tuple(shape), sch, w.path, w, am, qm, nest, meta), [p.name for p in parts]


def _mxfp4(prefix: str, b: TensorInfo, s: TensorInfo, qc: dict) -> list[Source]:
    """The logical tensors of one MXFP4 pair: the experts' own [G*32, R] matrices when ``prefix`` names
    fused experts (weightdiff.io.experts), else the [E, G*32, R] tensor whole."""
    if b.dtype != "U8" or s.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16 or s.shape != b.shape[:-1]:
        raise _err(b, f"MXFP4 pair {_q(b.name)} {b.dtype} {list(b.shape)} / {_q(s.name)} {s.dtype} "
                      f"{list(s.shape)}: expected U8 [E, R, G, 16] and U8 [E, R, G]")
    E, R, G, _ = b.shape
    out = "BF16"
    sch = _scheme("mxfp4", "fp4 e2m1, 32-element blocks, e8m0 scales", 4, "32", False, [b, s])
    if not is_fused(prefix, (E, G * 32, R)):
        return [MXFP4(prefix, (E, G * 32, R), sch, b.path, b, s, out)]
    each = replace(sch, stored_bytes=sch.stored_bytes // E)     # the experts share the stored pair evenly
    return [MXFP4(expert_name(prefix, e), (G * 32, R), each, b.path, b, s, out, expert=e) for e in range(E)]


def _ct_fp4(mod: str, leaves: dict[str, TensorInfo], qc: dict) -> Source:
    """compressed-tensors' ``nvfp4-pack-quantized`` (e4m3 scales per 16 and a global scale: llm-compressor's
    NVFP4 / NVFP4A16) and ``mxfp4-pack-quantized`` (e8m0 scales per 32): the packed codes' two per byte give the
    columns, the scales' columns the group; a config group of another type, bit width, or group size for the
    module is bad input, as the decompressor would misread the codes."""
    w, sc, gs = leaves["weight_packed"], leaves.get("weight_scale"), leaves.get("weight_global_scale")
    if sc is None:
        raise _err(w, f"{_q(w.name)} has no {_q(mod + '.weight_scale')} beside it")
    if len(w.shape) != 2 or len(sc.shape) != 2 or sc.shape[0] != w.shape[0] or not sc.shape[1] \
            or (w.shape[1] * 2) % sc.shape[1]:
        raise _err(w, f"{_q(w.name)} U8 {list(w.shape)} and {_q(sc.name)} {sc.dtype} {list(sc.shape)} are not packed "
                      "fp4 codes (two a byte) with a scale per group of columns")
    R, C = w.shape[0], w.shape[1] * 2
    group = C // sc.shape[1]
    nv = sc.dtype == "F8_E4M3"
    if not nv and sc.dtype != "U8":
        raise _err(sc, f"{_q(sc.name)} is {sc.dtype}: packed fp4 weights have e4m3 (nvfp4) or e8m0 U8 (mxfp4) scales")
    if nv and (gs is None or gs.dtype not in ("F32", "BF16", "F16") or math.prod(gs.shape) != 1):
        raise _err(w, f"{_q(w.name)} has e4m3 (nvfp4) scales but no one-number "
                      f"{_q(mod + '.weight_global_scale')} beside it")
    for a in _ct_args(qc, mod, "float"):
        if a.get("num_bits") not in (None, 4) or (_pos_int(a.get("group_size")) and a["group_size"] != group):
            raise _err(sc, f"{_q(sc.name)} gives groups of {group} 4-bit codes, but quantization_config's float group "
                           f"for {_q(w.name)} says num_bits {_shown(a.get('num_bits'))}, group_size "
                           f"{_shown(a.get('group_size'))}")
    label = "fp4 e2m1, 16-element groups, e4m3 scales and a global scale" if nv else \
        f"fp4 e2m1, {group}-element groups, e8m0 scales"
    sch = _scheme("compressed-tensors", label, 4, str(group), False, [w, sc] + ([gs] if nv else []))
    return CTFP4(mod + ".weight", (R, C), sch, w.path, w, sc, gs if nv else None, group)


def _modelopt_fp4(mod: str, leaves: dict[str, TensorInfo], qc: dict) -> Source:
    """NVIDIA ModelOpt's NVFP4 (``export_hf_checkpoint``, nvidia's FP4 releases): ``m.weight`` U8 [R, C / 2] (two
    e2m1 codes a byte, low nibble first), ``m.weight_scale`` F8_E4M3 per 16 columns, ``m.weight_scale_2`` F32 (the
    tensor's scale, multiplied: ``NVFP4QTensor.dequantize``)."""
    w, sc, s2 = leaves["weight"], leaves["weight_scale"], leaves.get("weight_scale_2")
    if str(qc.get("quant_algo")).upper() != "NVFP4":
        raise _err(w, f"{_q(w.name)} is U8 beside {_q(sc.name)}, but ModelOpt's quant_algo is "
                      f"{_shown(qc.get('quant_algo'))}, not NVFP4")
    if sc.dtype != "F8_E4M3" or s2 is None or s2.dtype not in ("F32", "BF16", "F16") or math.prod(s2.shape) != 1:
        raise _err(w, f"{_q(w.name)} U8 with {_q(sc.name)} {sc.dtype}: ModelOpt's NVFP4 stores e4m3 block scales and "
                      f"a one-number {_q(mod + '.weight_scale_2')} beside them")
    if len(w.shape) != 2 or len(sc.shape) != 2 or sc.shape[0] != w.shape[0] or not sc.shape[1] \
            or (w.shape[1] * 2) % sc.shape[1] or (w.shape[1] * 2) // sc.shape[1] != 16:
        raise _err(w, f"{_q(w.name)} U8 {list(w.shape)} and {_q(sc.name)} {list(sc.shape)} are not NVFP4 codes (two a "
                      "byte) with an e4m3 scale per 16 columns")
    sch = _scheme("modelopt", "nvfp4: fp4 e2m1, 16-element blocks, e4m3 scales times a tensor scale", 4, "16", False,
                  [w, sc, s2])
    return CTFP4(mod + ".weight", (w.shape[0], w.shape[1] * 2), sch, w.path, w, sc, s2, 16, multiply=True)


def _mlx(mod: str, leaves: dict[str, TensorInfo], qc: dict) -> Source:
    """One of mlx-lm's quantized layers (``QuantizedLinear``, ``QuantizedEmbedding``, a ``SwitchLinear`` of
    stacked experts): ``m.weight`` U32 [..., C * bits / 32], ``m.scales`` [..., C / group] (``m.biases`` beside
    them in the affine mode). Group size, bits and mode are the config's (its entry for this module path
    first: mixed recipes give some layers more bits): the shapes alone cannot tell 4 bits in groups of 64
    from 8 bits in groups of 32."""
    w, s, b = leaves["weight"], leaves["scales"], leaves.get("biases")
    if qc.get("quant_method") != "mlx":
        raise _err(w, f"{_q(w.name)} is U32 beside {_q(s.name)}: an MLX quantized weight (mlx-lm), but config.json "
                      "has no `quantization` (group size and bits) to read it with",
                   "put the model's config.json, as mlx-lm wrote it, beside the weights")
    # the config's entry for this module path: mlx-lm's own (``mlp.switch_mlp.gate_proj``) for a split expert
    stacked = (switch_origin(w.name) or "").rpartition(".")[0]
    own = qc.get(stacked) if stacked and stacked in qc else qc.get(mod)
    cfg = {**{k: qc.get(k) for k in ("group_size", "bits", "mode")}, **(own if isinstance(own, dict) else {})}
    mode = cfg.get("mode") or "affine"
    if not isinstance(mode, str) or mode not in ("affine", *K.MLX_FP_MODES):
        raise _err(w, f"{_q(w.name)}: the config's MLX quantization mode {_shown(mode)} is not one weightdiff reads",
                   "supported: affine, mxfp4, mxfp8")
    if mode == "nvfp4":
        raise _err(w, f"{_q(w.name)}: MLX's nvfp4 mode (e4m3 scales per 16) is not read: its scales round to zero "
                      "for typical weights, so no noise floor bounds what they leave", "compare an affine build")
    group, bits = (_int_cfg(cfg, "group_size"), _int_cfg(cfg, "bits")) if mode == "affine" else K.MLX_FP_MODES[mode][:2]
    if mode == "affine" and (bits not in (2, 3, 4, 5, 6, 8) or not group or group < 1):
        raise _err(w, f"{_q(w.name)}: the config's MLX quantization (bits {_shown(cfg.get('bits'))}, group "
                      f"size {_shown(cfg.get('group_size'))}) is not one MLX writes (2-6 or 8 bits, a positive "
                      "group size)")
    nd = len(w.shape)
    words = w.shape[-1] if nd else 0
    cols = words * 32 // bits if words * 32 % bits == 0 else None
    want = (*w.shape[:-1], cols // group) if cols and cols % group == 0 else None
    if nd < 2 or want is None or tuple(s.shape) != want:
        raise _err(w, f"{_q(w.name)} U32 {list(w.shape)} and {_q(s.name)} {s.dtype} {list(s.shape)} do not hold "
                      f"{bits}-bit codes in groups of {group} (the config's MLX quantization): the scales should be "
                      f"{list(want) if want else '[..., C / group]'}")
    fp = mode != "affine"
    if fp and (s.dtype != "U8" or b is not None):
        raise _err(s, f"{_q(s.name)} is {s.dtype}{' beside ' + _q(b.name) if b is not None else ''}: MLX's {mode} "
                      "mode stores U8 scales and no biases")
    if not fp and (s.dtype not in ("BF16", "F16", "F32") or b is None or b.dtype != s.dtype
                   or tuple(b.shape) != tuple(s.shape)):
        missing = "" if b is not None else ", and " + _q(mod + ".biases") + " is missing"
        raise _err(s, f"{_q(s.name)} {s.dtype} {list(s.shape)}: MLX's affine mode stores float scales and biases of "
                      f"one dtype and shape{missing}")
    label = f"int{bits} affine, groups of {group}, {s.dtype.lower()} scales and biases" if not fp else \
        {"mxfp4": "fp4 e2m1, 32-element blocks, e8m0 scales", "mxfp8": "fp8 e4m3, 32-element blocks, e8m0 scales"}[mode]
    sch = _scheme("mlx", label, bits, str(group), False, [w, s] + ([b] if b is not None else []))
    return MLX(w.name, (*w.shape[:-1], cols), sch, w.path, w, s, b, bits, group, mode)


def _special_names(tensors: dict, joined: str | None = None) -> bool:
    """Whether any stored name is one ``fold`` acts on (a quantized weight, a companion, an
    activation scale, an MXFP4 block, a bitsandbytes state): one regular-expression search over
    all the names instead of a split per name. A false positive only costs the full pass."""
    global _SPECIAL
    joined = "\n".join(tensors) if joined is None else joined
    if not any(word in joined for word in _WORDS):     # substring scans: most checkpoints stop here
        return False
    if _SPECIAL is None:
        _SPECIAL = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, _LEAVES)) + r")$|_blocks$|"
                              r"\.quant_state\.bitsandbytes__|\._data$", re.M)
    return _SPECIAL.search(joined) is not None


_QUANTO = re.compile(r"(.+?)(?:\._data)+", re.S)


def _refuse_quanto(tensors: dict[str, TensorInfo]) -> None:
    """optimum-quanto's own files store each quantized weight as ``m.weight._data`` (I8 or fp8 codes;
    ``m.weight._data._data``: packed 4-bit U8) beside ``m.weight._scale`` (and ``._shift``), with no ``quantization_config``: read as
    plain tensors, its codes would be compared as weights. weightdiff does not dequantize it."""
    # name by name, not a search of the names joined by newlines: a name may hold a newline itself, and its
    # second line was taken for a tensor's name (an internal error, KeyError)
    for name in (n for n in tensors if n.endswith("._data")):
        m = _QUANTO.fullmatch(name)
        if m is not None and m.group(1) + "._scale" in tensors:
            raise _err(tensors[m.group(0)], f"{_q(m.group(0))} and {_q(m.group(1) + '._scale')} are an "
                       "optimum-quanto quantized weight, which weightdiff does not dequantize",
                       "save the model's float weights (quanto's dequantize, or the checkpoint it was "
                       "quantized from) and compare those")


#: quantized formats weightdiff does not dequantize, known by the leaves their files store per module
#: ``m``: (the format, the leaf that marks it, the leaves one of which must be beside it, which of the two holds
#: integer codes: "mark" or "beside"). Their files need no ``quantization_config`` to be loaded by their own
#: libraries (an EXL2 build from before exllamav2 wrote one, a file passed on its own), and without it they read
#: as the base with every linear weight removed and other tensors added: "DERIVED: this base with tensors added
#: and removed; none of its own weights changed". The codes are integers in every one of these formats, which a
#: model's own float parameter of such a name (an attention's ``W_q`` beside a ``scale``) is not
_FOREIGN = (
    ("EXL2 (exllamav2)", "q_weight", ("q_scale", "q_scale_max", "q_invperm", "q_perm", "q_groups"), "mark"),
    ("EXL3 (exllamav3)", "trellis", ("suh", "svh", "su", "sv", "mcg", "mul1"), "mark"),
    ("AQLM", "codebooks", ("codes",), "beside"),
    ("HQQ", "W_q", ("scale", "zero", "meta", "nbits", "shape", "group_size", "offload_meta"), "mark"),
    ("VPTQ", "indices", ("centroids.weight",), "mark"),
    ("QuIP#", "Qidxs", ("SU", "SV", "Wscale"), "mark"),
    ("SpQR", "dense_weights", ("col_vals", "row_offsets", "in_perm"), "mark"),
    # EETQ's int8 weight, stored transposed and interleaved for its CUDA kernel, beside per-column scales
    ("EETQ", "weight_scales", ("weight",), "beside"),
)


def _int_codes(info: TensorInfo) -> bool:
    return info.dtype in DTYPES and DTYPES[info.dtype].kind == "int"


def _refuse_foreign(tensors: dict[str, TensorInfo], joined: str) -> None:
    """CheckpointError naming the first quantized weight of a format in ``_FOREIGN`` (one substring scan
    of the joined names when none is there)."""
    if not any("." + f[1] in joined for f in _FOREIGN):
        return
    by_mark = {f[1]: f for f in _FOREIGN}
    for name in tensors:            # name by name: a name may hold a newline, so no search of the joined names
        mod, dot, mark = name.rpartition(".")
        if not dot or mark not in by_mark:
            continue
        fmt, _, companions, codes = by_mark[mark]
        beside = [mod + "." + c for c in companions if mod + "." + c in tensors]
        if codes == "beside":
            beside = [b for b in beside if _int_codes(tensors[b])]
        if not beside or (codes == "mark" and not _int_codes(tensors[name])):
            continue
        raise _err(tensors[name], f"{_q(name)} and {_q(beside[0])} hold a weight quantized in the {fmt} "
                                        "format, which weightdiff does not dequantize",
                   "compare the float checkpoint it was quantized from; docs/formats.md lists the quantized formats "
                   "weightdiff reads")


_SPECIAL = None
#: the stored leaves of one weight of compressed-tensors' sparse formats
_BITMASK_LEAVES = {"compressed", "bitmask", "shape"}
_LEAVES = sorted({"qweight", "weight_packed", "SCB", "weight_scale", "weight_scale_inv", "bitmask",
                  *ACTIVATION_SCALES, *_COMPANIONS, *_COMPANIONS_IF_QUANTIZED})
#: every name the expression matches contains one of these (the leaves, ``_blocks``, the bnb state)
_WORDS = (*_LEAVES, "_blocks", ".quant_state.bitsandbytes__", "._data")


def _refuse_bare_codes(mod: str, w: TensorInfo, qc: dict) -> None:
    """An fp8 or int8 ``weight`` with no scale beside it where quantization_config says the weight is
    quantized: its codes would be read as the weight's values. A plain F8/I8 tensor of a model with no
    quantization_config (or one the config leaves unquantized) stays a tensor."""
    method = qc.get("quant_method")
    fp8 = w.dtype.startswith("F8_") and w.dtype != "F8_E8M0"
    if fp8 and method in ("fp8", "fbgemm_fp8"):
        need = "weight_scale_inv" if method == "fp8" else "weight_scale"
    elif fp8 and _ct_args(qc, mod, "float"):
        need = "weight_scale"
    elif w.dtype == "I8" and method == "bitsandbytes" and \
            any(_truthy(qc.get(k)) for k in ("load_in_8bit", "_load_in_8bit")):
        need = "SCB"
    elif w.dtype == "I8" and _ct_args(qc, mod, "int"):
        need = "weight_scale"
    else:
        return
    raise _err(w, f"{_q(w.name)} is {w.dtype} but has no {_q(mod + '.' + need)} beside it (quantization_config "
                  f"of {method} says it is quantized)")


def _refuse_empty(src: Source) -> None:
    """A quantized weight of no elements is refused before anything is dequantized: no quantizer
    writes one, and its stored parts then hold no byte, so nothing bounds its other dimensions (a
    345-byte file declaring [0, 1e9] made the column-wise unpacking allocate gigabytes)."""
    if math.prod(src.shape) == 0:
        raise CheckpointError(src.path, f"quantized weight {_q(src.name)} declares shape {list(src.shape)}, "
                                        "which holds no elements (a quantizer never writes an empty weight)")


def fold(tensors: dict[str, TensorInfo], qc: dict | None, read: Read
         ) -> tuple[dict[str, TensorInfo], dict[str, Source], list[str]]:
    """(logical tensors, their sources, folded-away activation/KV scales) of a checkpoint's
    stored tensors; the order follows the first stored tensor of each logical one."""
    qc = qc or {}
    method = qc.get("quant_method")
    if method not in (None, "fp8", "fbgemm_fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes", "mxfp4", "mlx",
                      "modelopt"):
        raise CheckpointError(qc.get("_path"), f"quantization method {str(method)!r} is not supported",
                              "supported: fp8, fbgemm_fp8, compressed-tensors, gptq, awq, bitsandbytes, mxfp4, "
                              "modelopt (FP8, NVFP4), and mlx-lm's quantization")
    if method == "modelopt" and str(qc.get("quant_algo")).upper() not in MODELOPT_ALGOS:
        raise CheckpointError(qc.get("_path"), f"ModelOpt quant_algo {_shown(qc.get('quant_algo'))} is not supported",
                              "supported: " + ", ".join(MODELOPT_ALGOS))
    if method == "compressed-tensors" and str(qc.get("format", "")) not in \
            ("", "pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "mixed-precision",
             "nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        raise CheckpointError(qc.get("_path"), f"compressed-tensors format {qc.get('format')!r} is not supported",
                              "supported: pack-quantized, int-quantized, float-quantized, naive-quantized, "
                              "nvfp4-pack-quantized, mxfp4-pack-quantized")
    sparse = _sparsity_format(qc) if method == "compressed-tensors" else None
    joined = "\n".join(tensors)
    _refuse_foreign(tensors, joined)
    if not method and not _special_names(tensors, joined):    # nothing to fold (most checkpoints): the same tensors
        return dict(tensors), {}, []
    _refuse_quanto(tensors)
    sources: dict[str, Source] = {}
    owner: dict[str, str] = {}                  # stored name -> logical name
    group: dict[str, list[str]] = {}            # the first of several logical tensors from one stored set -> all
    hidden: list[str] = []
    for name in tensors:
        if _BNB_MARKER in name:
            src, parts = _bnb4(name, tensors, read)
            if src.name in sources:
                raise _err(tensors[name], f"bitsandbytes weight {_q(src.name)} has two quant states")
            sources[src.name] = src
            owner.update({p: src.name for p in parts})
        elif name.endswith("_blocks") and name[:-7] + "_scales" in tensors:
            made = _mxfp4(name[:-7], tensors[name], tensors[name[:-7] + "_scales"], qc)
            for src in made:
                if src.name in tensors:
                    raise _err(tensors[src.name], f"tensor {_q(src.name)} is stored both plain and quantized")
                sources[src.name] = src
            owner.update({name: made[0].name, name[:-7] + "_scales": made[0].name})
            group.update({made[0].name: [m.name for m in made]})
    by_mod: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        if name not in owner:
            mod, leaf = split_name(name)
            by_mod.setdefault(mod, {})[leaf] = info
    for mod, leaves in by_mod.items():
        w = leaves.get("weight")
        src = None
        if w is not None and w.dtype == "U32" and "scales" in leaves:
            src = _mlx(mod, leaves, qc)
        elif sparse and ("compressed" in leaves or "bitmask" in leaves):
            src = _bitmask(mod, leaves, sparse, read)
        elif not sparse and w is None and _BITMASK_LEAVES <= leaves.keys() and leaves["bitmask"].dtype == "U8":
            # a sparse model's weights without its config (a model.safetensors copied out): the names say it
            src = _bitmask(mod, leaves, "sparse-24-bitmask" if len(leaves["compressed"].shape) == 2
                           else "sparse-bitmask", read)
        elif "qweight" in leaves:
            src = _gptq_awq(mod, leaves, qc, read)
        elif method == "modelopt" and w is not None and w.dtype == "U8" and "weight_scale" in leaves:
            src = _modelopt_fp4(mod, leaves, qc)
        elif "weight_packed" in leaves and leaves["weight_packed"].dtype == "U8":
            src = _ct_fp4(mod, leaves, qc)
        elif "weight_packed" in leaves:
            src = _ct_int(mod, leaves, qc, read)
        elif w is not None and w.dtype.startswith("F8_") and w.dtype != "F8_E8M0" and \
                ("weight_scale_inv" in leaves or "weight_scale" in leaves):
            src = _fp8(mod, leaves, qc)
        elif w is not None and w.dtype == "I8" and "SCB" in leaves:
            scb = leaves["SCB"]
            if len(w.shape) != 2 or scb.shape not in ((w.shape[0],), (w.shape[0], 1)):
                raise _err(scb, f"{_q(scb.name)} {list(scb.shape)} is not one scale per row of "
                                f"{_q(w.name)} {list(w.shape)}")
            sch = _scheme("bitsandbytes", "int8 row-wise (LLM.int8)", 8, "channel", False, [w, scb])
            src = BnB8(w.name, w.shape, sch, w.path, w, scb)
        elif w is not None and w.dtype == "I8" and "weight_scale" in leaves:
            src = _ct_int(mod, leaves, qc, read)
        elif w is not None:
            _refuse_bare_codes(mod, w, qc)
        if src is not None:
            sources[src.name] = src
            owner.update({n: src.name for n in src.scheme.stored})
        for leaf, info in leaves.items():
            if info.name in owner:
                continue
            if leaf in ACTIVATION_SCALES:
                hidden.append(info.name)
            elif src is None and (leaf in _COMPANIONS or (qc and leaf in _COMPANIONS_IF_QUANTIZED)):
                raise _err(info, f"{_q(info.name)} is a quantization companion, but its weight is missing "
                                 f"or not quantized ({_q(mod + '.weight')})")
    for src in sources.values():
        _refuse_empty(src)
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in hidden:
            continue
        if name in owner:
            for logical in group.get(owner[name], (owner[name],)):
                src = sources[logical]
                if src.name not in out:
                    lossless = isinstance(src, Bitmask)      # decoded, not dequantized: a plain tensor
                    out[src.name] = TensorInfo(src.name, src.dtype if lossless else "F32", tuple(src.shape),
                                               src.path, None, None, quant=None if lossless else src.scheme)
            continue
        if name in out:
            raise _err(info, f"tensor {_q(name)} is stored both plain and quantized")
        out[name] = info
    return out, sources, hidden
