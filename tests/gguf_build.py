"""Write small GGUF files the way llama.cpp's convert_hf_to_gguf.py does, with gguf's own writer.

``to_gguf(path, tensors, arch, ...)`` takes a Hugging Face state dict (name -> float32
array), maps the names with gguf-py's ``TensorNameMap`` (the converter's own map),
applies the converter's value transforms (``LlamaModel.permute`` on Q/K for llama, the
Conv1D transpose for gpt2, ``+ 1`` on Gemma norms), stores 1-D tensors and norms as F32
(``ModelBase.prepare_tensors``) and everything else in ``qtype`` through
``gguf.quants.quantize``, then writes the file with ``gguf.GGUFWriter``. Tests then read
it back through weightdiff and expect the Hugging Face tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import gguf
from gguf.quants import quantize

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma": gguf.MODEL_ARCH.GEMMA,
        "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3,
        "gpt2": gguf.MODEL_ARCH.GPT2, "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
        "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE, "smollm3": gguf.MODEL_ARCH.SMOLLM3, "arcee": gguf.MODEL_ARCH.ARCEE,
        "granite": gguf.MODEL_ARCH.GRANITE, "llama-embed": gguf.MODEL_ARCH.LLAMA_EMBED,
        "mistral3": gguf.MODEL_ARCH.MISTRAL3, "granitemoe": gguf.MODEL_ARCH.GRANITE_MOE,
        "deci": gguf.MODEL_ARCH.DECI}
#: the converter classes that run ``LlamaModel.modify_tensors`` with ``undo_permute`` True (Q/K permuted);
#: granitemoe and deci permute too, but weightdiff maps neither (tests of unmapped architectures)
LLAMA_PERMUTED = ("llama", "arcee", "smollm3", "granite", "llama-embed", "mistral3", "granitemoe", "deci")

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def stack_experts(tensors: dict) -> dict:
    """The converter's expert merge (``LlamaModel``/``Qwen2MoeModel.modify_tensors``): every
    ``...experts.{x}.{w}.weight`` stacked over x (``torch.stack(datas, dim=0)``) as
    ``...experts.{w}.weight``, in the place of the first expert's tensor."""
    out: dict = {}
    groups: dict[str, dict[int, np.ndarray]] = {}
    for name, w in tensors.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = w
            continue
        key = f"{m.group(1)}.{m.group(3)}.weight"
        out.setdefault(key, None)
        groups.setdefault(key, {})[int(m.group(2))] = w
    for key, g in groups.items():
        out[key] = np.stack([np.asarray(g[x], np.float32) for x in range(len(g))])
    return out


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute, in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int | None) -> np.ndarray:
    """The converter's modify_tensors for the architectures weightdiff maps."""
    if arch in LLAMA_PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
        w = permute(w, n_head, n_head)
    if arch in LLAMA_PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
        w = permute(w, n_head, n_kv)
    if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        w = w.T
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        w = w + np.float32(1)
    return np.ascontiguousarray(w, dtype=np.float32)


def to_gguf(path: Path, tensors: dict, arch: str = "llama", qtype=gguf.GGMLQuantizationType.F32,
            n_head: int = 4, n_kv: int | None = None, layers: int = 64, extra: dict | None = None,
            order: list[str] | None = None, imatrix=None, types: dict | None = None, split_max_tensors: int = 0,
            small_first_shard: bool = False) -> Path:
    """Write ``tensors`` (HF names) as a GGUF of ``arch``; returns the path. ``imatrix(cols, i)``: the
    importance of each column of the i-th tensor written, for Q4_K as ``llama-quantize --imatrix`` makes
    it (``ggml_imatrix``), with the ``quantize.imatrix.*`` keys llama-quantize writes. ``types``: the GGML
    type of some tensors by their GGUF name prefix (``{"blk.1.": Q.MXFP4}``), as a llama-quantize mix.
    ``split_max_tensors``: split into parts of at most that many tensors, as convert_hf_to_gguf.py
    --split-max-tensors does (``small_first_shard``: the first part the metadata only, as
    --no-tensor-first-split); the parts are ``PATH-STEM-0000K-of-0000N.gguf`` beside ``path`` and the
    first one's path is returned."""
    tmap = gguf.TensorNameMap(ARCH[arch], layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH[arch]], split_max_tensors=split_max_tensors,
                        small_first_shard=small_first_shard)
    w.add_block_count(layers)
    w.add_head_count(n_head)
    if n_kv is not None:
        w.add_head_count_kv(n_kv)
    if imatrix is not None:
        w.add_string("quantize.imatrix.file", "imatrix.dat")
        w.add_string("quantize.imatrix.dataset", "calibration_datav3.txt")
    for k, v in (extra or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    tensors = stack_experts(tensors)
    for i, name in enumerate(order or list(tensors)):
        if arch == "gemma" and name == "lm_head.weight":
            continue                                     # GemmaModel skips the tied head
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        data = convert(name, tensors[name], arch, n_head, n_kv)
        q = next((t for p, t in (types or {}).items() if new.startswith(p)), qtype)
        if data.ndim <= 1 or new.endswith("_norm.weight"):
            q = gguf.GGMLQuantizationType.F32
        if q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, data)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(new, data.astype(np.float16))
        elif q.name == "Q4_K" and imatrix is not None:
            import ggml_imatrix
            w.add_tensor(new, ggml_imatrix.quantize(data, imatrix(data.shape[-1], i)), raw_dtype=q)
        elif q.name in ("Q4_K", "Q6_K"):                  # gguf has no K-quant encoder
            import ggml_kquants
            w.add_tensor(new, ggml_kquants.quantize(data, q.name), raw_dtype=q)
        else:
            w.add_tensor(new, quantize(data, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(path))[0]


def raw_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, "gguf.GGMLQuantizationType"]],
             arch: str = "llama") -> Path:
    """A GGUF holding the given GGUF-named tensors as given (raw quantized bytes or floats)."""
    w = gguf.GGUFWriter(str(path), arch)
    for name, (data, q) in tensors.items():
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=q)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
