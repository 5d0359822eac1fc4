"""Mixture-of-experts tensors that store all their experts in one array, split into the experts' own.

gpt-oss and Llama 4 keep each layer's experts as ``mlp.experts.gate_up_proj`` [experts, m, n]
(with gpt-oss's biases ``gate_up_proj_bias`` [experts, n]); Granite MoE and JetMoE as
``input_linear.weight`` / ``output_linear.weight`` [experts, m, n]. Read as one matrix, such a
tensor's spectrum says nothing about any expert's change (every rank would be capped at the
number of experts), and a change to one expert would mark the whole layer's experts changed.
So every reader hands them out as the experts' own tensors, named by inserting the expert's
index before the last name component (``mlp.experts.gate_up_proj`` -> ``mlp.experts.3.gate_up_proj``,
``input_linear.weight`` -> ``input_linear.3.weight``), each a contiguous run of the stored bytes:
they read, pair, count and get their rank like the per-expert tensors of Mixtral or DeepSeek.
The rule is by name and shape only, so both sides of a comparison split the same way.

>>> expert_name("model.layers.0.mlp.experts.gate_up_proj", 3)
'model.layers.0.mlp.experts.3.gate_up_proj'
>>> fused_origin("model.layers.0.mlp.experts.3.gate_up_proj")
'model.layers.0.mlp.experts.gate_up_proj'
>>> is_fused("model.layers.0.mlp.experts.down_proj", (32, 2880, 2880)), is_fused("conv1.weight", (8, 4, 3))
(True, False)

mlx-lm stacks a layer's experts as ``mlp.switch_mlp.gate_proj.weight`` [experts, m, n] (its models' ``sanitize``;
with their ``scales`` and ``biases`` when quantized): split, they take the Hugging Face names they were stacked
from, ``mlp.experts.3.gate_proj.weight``, and Mixtral's ``block_sparse_moe.experts.3.w1.weight`` (w1, w2, w3 for
gate, down, up), so that they pair with the base's experts:

>>> expert_name("model.layers.0.block_sparse_moe.switch_mlp.down_proj.scales", 3)
'model.layers.0.block_sparse_moe.experts.3.w2.scales'
>>> switch_origin("model.layers.0.mlp.experts.3.up_proj.biases")
'model.layers.0.mlp.switch_mlp.up_proj.biases'
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["MAX_EXPERTS", "is_fused", "expert_name", "fused_origin", "switch_origin", "split_infos", "split_note",
           "count_note"]

#: (name suffix, dimensions of the fused tensor): matrices are [experts, m, n], biases [experts, n]
_MATRIX = (".experts.gate_up_proj", ".experts.down_proj", ".experts.gate_proj", ".experts.up_proj",
           ".input_linear.weight", ".output_linear.weight")
_BIAS = (".experts.gate_up_proj_bias", ".experts.down_proj_bias")
_SUFFIXES = _MATRIX + _BIAS
_SPLIT = re.compile(r"^(.+)\.(\d+)\.([^.]+)$")
#: mlx-lm's stacked experts (``SwitchGLU``), and the Hugging Face names they are split into
_SWITCH = re.compile(r"^(.+)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_SWITCH_SPLIT = re.compile(r"^(.+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(weight|scales|biases)$")
#: Mixtral's names of its experts' matrices (mlx-lm's mixtral ``sanitize``: w1 gate, w2 down, w3 up)
_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_SPLIT_ANY = None                 # split_note's pattern, compiled on first use

#: most experts a fused tensor is split into: released models have up to 512 (Qwen3-Next); a header that
#: claims millions of zero-size experts would otherwise make millions of tensors out of one entry
MAX_EXPERTS = 4096


def is_fused(name: str, shape: Sequence[int]) -> bool:
    """Whether stored tensor ``name`` of ``shape`` holds several experts side by side on its first axis
    (at most ``MAX_EXPERTS``, each of at least one element)."""
    if _SWITCH.match(name) is not None:
        return len(shape) == 3 and 2 <= int(shape[0]) <= MAX_EXPERTS and all(int(d) > 0 for d in shape[1:])
    if not name.endswith(_SUFFIXES) or not shape or not 2 <= int(shape[0]) <= MAX_EXPERTS:
        return False
    return len(shape) == (2 if name.endswith(_BIAS) else 3) and all(int(d) > 0 for d in shape[1:])


def expert_name(name: str, expert: int) -> str:
    """The name of expert ``expert``'s tensor cut from fused tensor ``name``."""
    m = _SWITCH.match(name)
    if m is not None:
        prefix, proj, leaf = m.groups()
        return f"{prefix}.experts.{expert}.{_MIXTRAL[proj] if prefix.endswith('block_sparse_moe') else proj}.{leaf}"
    stem, _, leaf = name.rpartition(".")
    return f"{stem}.{expert}.{leaf}"


def fused_origin(name: str) -> str | None:
    """The fused tensor a split name was cut from (None when ``name`` is not such a name)."""
    m = _SPLIT.match(name)
    if m is None:
        return None
    origin = f"{m.group(1)}.{m.group(3)}"
    return origin if origin.endswith(_SUFFIXES) else None


def switch_origin(name: str) -> str | None:
    """The mlx-lm stack (``switch_mlp``) a split name could have been cut from: any per-expert name of that form,
    so only where the stack is known to exist (a sharded index that lists it, an MLX config entry), as Mixtral's
    and Qwen-MoE's own checkpoints are named so too."""
    m = _SWITCH_SPLIT.match(name)
    if m is None:
        return None
    prefix, _, proj, leaf = m.groups()
    if proj.startswith("w"):
        if not prefix.endswith("block_sparse_moe"):
            return None
        proj = next(k for k, v in _MIXTRAL.items() if v == proj)
    return f"{prefix}.switch_mlp.{proj}.{leaf}"


def split_infos(infos: list[TensorInfo], path) -> tuple[list[TensorInfo], dict[str, tuple[str, int]]] | None:
    """``infos`` (one file's tensors, in file order) with every fused expert tensor replaced by its
    experts' tensors, and for each such tensor (fused name, expert index); None when there is none to
    split. With a byte range, each expert's is its contiguous run of it; without one (a pickle's), none
    (the reader slices the array). A fused tensor whose experts do not each fill whole bytes (packed 4-
    or 6-bit floats) is kept whole."""
    if not any(t.name.endswith(_SUFFIXES) or ".switch_mlp." in t.name for t in infos):
        return None
    names = {t.name for t in infos}
    out: list[TensorInfo] = []
    cut: dict[str, tuple[str, int]] = {}
    for t in infos:
        experts = int(t.shape[0]) if t.shape else 1
        nbytes = t.nbytes
        if not is_fused(t.name, t.shape) or t.packed or nbytes % experts:
            out.append(t)
            continue
        each, shape = nbytes // experts, tuple(t.shape[1:])
        for e in range(experts):
            name = expert_name(t.name, e)
            if name in names:
                raise CheckpointError(path, f"tensor `{escape_name(name)}` is stored both on its own and inside "
                                            f"the fused experts tensor `{escape_name(t.name)}`")
            at = None if t.start is None else t.start + e * each
            out.append(replace(t, name=name, shape=shape, start=at, end=None if at is None else at + each))
            cut[name] = (t.name, e)
    return (out, cut) if cut else None


def split_note(names) -> str | None:
    """What a checkpoint's metadata says (key ``weightdiff.experts``, shown by ``inspect``) when its
    reader split fused expert tensors: one regular-expression scan over all the names."""
    global _SPLIT_ANY
    if _SPLIT_ANY is None:
        alts = "|".join(re.escape(s.rpartition(".")[2]) for s in _SUFFIXES)
        _SPLIT_ANY = re.compile(r"^(.+)\.\d+\.(" + alts + r")$", re.M)
    joined = "\n".join(names)
    if not any(s.rpartition(".")[2] in joined for s in _SUFFIXES):       # most checkpoints: no scan
        return None
    origins = {f"{a}.{b}" for a, b in _SPLIT_ANY.findall(joined)}
    fused = sum(1 for o in origins if o.endswith(_SUFFIXES))
    return count_note(fused) if fused else None


def count_note(fused: int) -> str:
    """``split_note``'s text for a reader that knows how many fused tensors it split."""
    return f"{fused:,} fused expert tensor{'s' if fused != 1 else ''} split into the experts' own"
