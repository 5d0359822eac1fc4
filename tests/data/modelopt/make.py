"""Writes the ModelOpt checkpoints tests/test_modelopt.py reads (kept in the repository, so that the suite needs
neither nvidia-modelopt nor the scipy it brings, which numba then imports: the test environment stays the core
install's). Run from this folder with nvidia-modelopt, torch and transformers installed:

    python make.py            # nvidia-modelopt 0.47.0, torch 2.13.0 (CPU), transformers 5.25.0 wrote these

A tiny Llama (bf16, seeded) saved by ``save_pretrained`` as ``base/``; the same quantized by ModelOpt itself
(``mtq.quantize`` with FP8_DEFAULT_CFG and NVFP4_DEFAULT_CFG, one calibration batch) and written by
``export_hf_checkpoint`` as ``FP8/`` and ``NVFP4/``; a fine-tune of it (every value projection moved by a rank-4
update of 30% of its norm) so quantized as ``tuned/``; and ``reference.npz``: ``NVFP4QTensor.dequantize`` of every
NVFP4 weight of ``NVFP4/`` (bf16 values as float32), the values weightdiff must give bit for bit.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, architectures=["LlamaForCausalLM"])


def model(tune: bool = False):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    if tune:
        g = torch.Generator().manual_seed(5)
        for layer in m.model.layers:
            w = layer.self_attn.v_proj.weight
            d = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g)
            w.data += (d * 0.3 * w.float().norm() / d.norm()).to(w.dtype)
    return m


def export(folder: Path, algo: str, tune: bool = False) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    cfg = {"FP8": mtq.FP8_DEFAULT_CFG, "NVFP4": mtq.NVFP4_DEFAULT_CFG}[algo]
    torch.manual_seed(1)
    m = mtq.quantize(model(tune), cfg, lambda mm: mm(torch.randint(0, CONFIG["vocab_size"], (2, 16))))
    shutil.rmtree(folder, ignore_errors=True)
    export_hf_checkpoint(m, export_dir=str(folder))


def reference(folder: Path) -> dict[str, np.ndarray]:
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    out = {}
    for name, w in t.items():
        if name.endswith(".weight") and w.dtype == torch.uint8:
            mod = name[:-len(".weight")]
            q = NVFP4QTensor(torch.Size((w.shape[0], w.shape[1] * 2)), torch.bfloat16, w)
            out[name] = q.dequantize(dtype=torch.bfloat16, scale=t[mod + ".weight_scale"],
                                     double_scale=t[mod + ".weight_scale_2"], block_sizes={-1: 16}).float().numpy()
    return out


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    warnings.simplefilter("ignore")
    shutil.rmtree(here / "base", ignore_errors=True)
    model().save_pretrained(str(here / "base"))
    export(here / "FP8", "FP8")
    export(here / "NVFP4", "NVFP4")
    export(here / "tuned", "NVFP4", tune=True)
    np.savez_compressed(here / "reference.npz", **reference(here / "NVFP4"))
