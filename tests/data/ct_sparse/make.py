"""Write the compressed-tensors sparse fixtures of tests/test_ct_sparse.py with compressed-tensors' own
ModelCompressor (0.12.2: 0.20 dropped the legacy sparse compressors), and its own decompression of each
(``ref.npz``: what weightdiff must read). Run once, from this folder:

    pip install --target /tmp/ct12 --no-deps compressed-tensors==0.12.2
    PYTHONPATH=/tmp/ct12 python make.py

base/: a bf16 model of three linears, a norm and an embedding; lossless-bitmask/: the base as
sparse-bitmask (nothing zero: every bit set); pruned-bitmask/ and pruned-24/: the base with 2 of every 4
weights of each linear zeroed (smallest magnitude), as sparse-bitmask and sparse-24-bitmask;
holes-bitmask/: random zeros (a third) and one all-zero row, as sparse-bitmask (rows of unequal length).
"""
import json
import os
import shutil

import numpy as np
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import save_file

LINEARS = {"model.layers.0.self_attn.q_proj": (32, 64), "model.layers.0.mlp.down_proj": (64, 36),
           "model.layers.0.mlp.up_proj": (36, 64)}


def base_state(g):
    sd = {f"{n}.weight": (torch.randn(out, inp, generator=g) * 0.05).to(torch.bfloat16)
          for n, (out, inp) in LINEARS.items()}
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    sd["model.embed_tokens.weight"] = (torch.randn(40, 64, generator=g) * 0.05).to(torch.bfloat16)
    return sd


def save(folder, sd, sparsity=None):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if sparsity is None:
        save_file(sd, f"{folder}/model.safetensors")
    else:
        sc = SparsityCompressionConfig.load_from_registry(
            sparsity, targets=["Linear"], ignore=["lm_head"],
            sparsity_structure="2:4" if sparsity == "sparse-24-bitmask" else "unstructured", global_sparsity=0.5)
        mc = ModelCompressor(sparsity_config=sc)
        compressed = mc.sparsity_compressor.compress(dict(sd), compression_targets=set(LINEARS))
        save_file({k: v.contiguous() for k, v in compressed.items()}, f"{folder}/model.safetensors")
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": sc.model_dump(),
                                      "version": "0.12.2"}
    with open(f"{folder}/config.json", "w") as fh:
        json.dump(cfg, fh, indent=1)
    if sparsity is not None:        # compressed-tensors' own reading of what it wrote
        return {n: t.float().numpy() for n, t in ModelCompressor(sparsity_config=sc).sparsity_compressor
                .decompress(folder) if n[: -len(".weight")] in LINEARS}
    return {}


def prune24(sd):
    out = dict(sd)
    for n in LINEARS:
        w = sd[f"{n}.weight"].clone().view(-1, 4)
        w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0)
        out[f"{n}.weight"] = w.view(sd[f"{n}.weight"].shape)
    return out


def holes(sd, g):
    out = dict(sd)
    for n in LINEARS:
        w = sd[f"{n}.weight"].clone()
        w[torch.rand(w.shape, generator=g) < 1 / 3] = 0
        w[3] = 0
        out[f"{n}.weight"] = w
    return out


if __name__ == "__main__":
    g = torch.Generator().manual_seed(7)
    base = base_state(g)
    ref = {}
    save("base", base)
    for folder, sd, fmt in (("lossless-bitmask", base, "sparse-bitmask"),
                            ("pruned-bitmask", prune24(base), "sparse-bitmask"),
                            ("pruned-24", prune24(base), "sparse-24-bitmask"),
                            ("holes-bitmask", holes(base, g), "sparse-bitmask")):
        got = save(folder, sd, fmt)
        assert sorted(got) == sorted(f"{n}.weight" for n in LINEARS), sorted(got)
        for n, v in got.items():
            assert np.array_equal(v, sd[n].float().numpy()), (folder, n)
            ref[f"{folder}/{n}"] = v
    np.savez_compressed("ref.npz", **ref)
