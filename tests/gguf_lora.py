"""Write llama.cpp LoRA adapters the way llama.cpp's convert_lora_to_gguf.py does, with gguf's own writer.

``lora_to_gguf(path, factors, arch, ...)`` takes a PEFT adapter's factor pairs by Hugging Face module name
(``{"model.layers.0.self_attn.q_proj": (A [r, in], B [out, r])}``; an embedding's as PEFT stores it,
``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r]) and writes what the converter writes:

- ``general.type`` ``adapter``, ``adapter.type`` ``lora``, ``adapter.lora.alpha`` (``LoraModel.set_type``,
  ``set_gguf_parameters``), the architecture's name (``GGUFWriter(arch=...)``), no head counts;
- each pair under the base tensor's GGUF name (gguf-py's ``TensorNameMap``, the converter's own map) with
  ``.lora_a`` / ``.lora_b``, after the architecture's ``modify_tensors`` ran on the ``LoraTorchTensor``:
  ``LlamaModel.permute`` on Q/K reshapes and swaps B's rows only (A's shape is [.., r, in] throughout),
  ``torch.stack`` of the experts stacks A's and B's (``LoraTorchTensor.__torch_function__``), and
  ``token_embd``'s lora_a is written transposed (``lora_a = lora_a.T``);
- the dtype ``ModelBase.prepare_tensors`` picks for a 2-D tensor under ``--outtype`` (F32, F16, BF16, or
  Q8_0 falling back to F16 where a row is not whole blocks, as its ``QuantError`` handler does);
- mergekit-extract-lora's norm weights as F32 under their GGUF names (``norms``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf
from gguf.quants import quantize

from gguf_build import ARCH, LLAMA_PERMUTED, permute, stack_experts

Q = gguf.GGMLQuantizationType


def _stack(factors: dict) -> dict:
    """The converter's expert merge on LoRA pairs (``LoraTorchTensor.__torch_function__`` on ``torch.stack``): the
    A's and the B's of each ``...experts.{x}.{w}`` stacked over x, as ``gguf_build.stack_experts`` stacks weights."""
    a = stack_experts({f"{m}.weight": ab[0] for m, ab in factors.items()})
    b = stack_experts({f"{m}.weight": ab[1] for m, ab in factors.items()})
    return {m.removesuffix(".weight"): (a[m], b[m]) for m in a}


def _store(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, data)
    elif qtype == Q.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        try:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
        except gguf.QuantError:          # prepare_tensors: "falling back to F16"
            w.add_tensor(name, data.astype(np.float16))


def lora_to_gguf(path: Path, factors: dict, arch: str = "llama", alpha: float | None = 16.0, n_head: int = 4,
                 n_kv: int | None = None, qtype=Q.F32, layers: int = 64, norms: dict | None = None,
                 adapter_type: str | None = "lora", general_type: str | None = "adapter",
                 extra: dict | None = None) -> Path:
    """Write ``factors`` (HF module name -> (A, B)) as llama.cpp's LoRA GGUF of ``arch``; returns ``path``."""
    tmap = gguf.TensorNameMap(ARCH[arch], layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH[arch]])
    if general_type is not None:
        w.add_string("general.type", general_type)
    if adapter_type is not None:
        w.add_string("adapter.type", adapter_type)
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for k, v in (extra or {}).items():
        w.add_key_value(k, v[0], v[1], *v[2:]) if isinstance(v, tuple) else w.add_string(k, v)
    for module, (a, b) in _stack(factors).items():
        new = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        assert new is not None, module
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if arch in LLAMA_PERMUTED and module.endswith("q_proj"):
            b = permute(b, n_head, n_head)
        if arch in LLAMA_PERMUTED and module.endswith("k_proj"):
            b = permute(b, n_head, n_kv)
        if new == "token_embd.weight":
            a = a.T                      # see llm_build_inp_embd()
        _store(w, new + ".lora_a", a, qtype)
        _store(w, new + ".lora_b", b, qtype)
    for name, v in (norms or {}).items():
        new = tmap.get_name(name, try_suffixes=(".weight",))
        w.add_tensor(new, np.asarray(v, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
