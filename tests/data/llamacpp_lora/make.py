"""Write the llama.cpp LoRA fixtures of tests/test_gguf_lora.py with llama.cpp's own tools.

llama.cpp's tree is the one vendored in the llama-cpp-python 0.3.36 sdist (its converters and
``llama-export-lora``). Run once, from this folder:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    LCPP=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $LCPP -B /tmp/lcpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF
    ninja -C /tmp/lcpp-build llama-export-lora
    pip install --target /tmp/sp sentencepiece
    PYTHONPATH=/tmp/sp LCPP=$LCPP EXPORT_LORA=/tmp/lcpp-build/bin/llama-export-lora python make.py

base/: a float32 transformers Llama (2 layers, width 32, 4 heads, 2 KV heads, vocab 48), given a sentencepiece
tokenizer while convert_hf_to_gguf.py runs (it needs one; removed after); ad/: a PEFT LoRA of it (r 4, lora_alpha 8;
q, k, v, o, down_proj, embed_tokens and lm_head, B random; the embedding's A [r, vocab] the converter writes
transposed); base-f32.gguf: convert_hf_to_gguf.py --outtype f32 of base/ (Q/K permuted by its heads); lora-f32.gguf
and lora-q8_0.gguf: convert_lora_to_gguf.py --base base/ of ad/; merged-f32.gguf: llama-export-lora of base-f32.gguf
with lora-f32.gguf (llama.cpp's own merge: W + alpha / r B A in its order of rows); moe/: the same for a Mixtral's
experts (``moe``).
"""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import torch
import transformers

HERE = Path(__file__).resolve().parent
LCPP = Path(os.environ["LCPP"])


def main() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for d in ("base", "ad"):
        shutil.rmtree(HERE / d, ignore_errors=True)
    model.save_pretrained(HERE / "base")
    (HERE / "base" / "generation_config.json").unlink(missing_ok=True)
    import sentencepiece as spm

    random.seed(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "and", "then", "slept", "under", "tree"]
    corpus = HERE / "corpus.txt"
    corpus.write_text("\n".join(" ".join(random.choice(words) for _ in range(12)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(HERE / "base" / "tokenizer"), vocab_size=40,
                                   model_type="bpe")
    corpus.unlink()
    (HERE / "base" / "tokenizer.vocab").unlink()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]))
    pm.save_pretrained(HERE / "ad")
    (HERE / "ad" / "README.md").unlink(missing_ok=True)
    py = [sys.executable]
    subprocess.run([*py, LCPP / "convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", HERE / "base-f32.gguf",
                    HERE / "base"], check=True)
    for t in ("f32", "q8_0"):
        subprocess.run([*py, LCPP / "convert_lora_to_gguf.py", "--base", HERE / "base", "--outtype", t, "--outfile",
                        HERE / f"lora-{t}.gguf", HERE / "ad"], check=True)
    subprocess.run([os.environ["EXPORT_LORA"], "-m", HERE / "base-f32.gguf", "--lora", HERE / "lora-f32.gguf",
                    "-o", HERE / "merged-f32.gguf"], check=True)
    moe(py)
    (HERE / "base" / "tokenizer.model").unlink()        # its vocabulary is in base-f32.gguf; the tests need none
    print(json.dumps({p.name: p.stat().st_size for p in sorted(HERE.rglob("*")) if p.is_file()}, indent=1))


def moe(py: list) -> None:
    """moe/: a Mixtral of 1 layer (width 32, 4 experts of 32) as transformers saves it (one matrix per expert), a LoRA
    of its experts' w1, w2, w3 and k_proj written as PEFT names them (r 4, lora_alpha 8), converted
    (moe-lora.gguf: the experts' factors stacked into ffn_*_exps) and merged by llama-export-lora into
    moe-base.gguf (moe-merged.gguf)."""
    import numpy as np
    from safetensors.numpy import save_file

    torch.manual_seed(1)
    cfg = transformers.MixtralConfig(vocab_size=48, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    d = HERE / "moe"
    shutil.rmtree(d, ignore_errors=True)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(d / "base")
    (d / "base" / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(HERE / "base" / "tokenizer.model", d / "base" / "tokenizer.model")
    rng = np.random.default_rng(0)
    t = {}
    for m, (o, i) in [*((f"block_sparse_moe.experts.{x}.{w}", (32, 32)) for x in range(4) for w in ("w1", "w2", "w3")),
                      ("self_attn.k_proj", (16, 32))]:
        pre = f"base_model.model.model.layers.0.{m}"
        t[pre + ".lora_A.weight"] = rng.normal(0, .1, (4, i)).astype(np.float32)
        t[pre + ".lora_B.weight"] = rng.normal(0, .1, (o, 4)).astype(np.float32)
    (d / "ad").mkdir()
    save_file(t, str(d / "ad" / "adapter_model.safetensors"))
    (d / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["w1", "w2", "w3", "k_proj"]}))
    subprocess.run([*py, LCPP / "convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", d / "moe-base.gguf",
                    d / "base"], check=True)
    subprocess.run([*py, LCPP / "convert_lora_to_gguf.py", "--base", d / "base", "--outfile", d / "moe-lora.gguf",
                    d / "ad"], check=True)
    subprocess.run([os.environ["EXPORT_LORA"], "-m", d / "moe-base.gguf", "--lora", d / "moe-lora.gguf", "-o",
                    d / "moe-merged.gguf"], check=True)
    (d / "base" / "tokenizer.model").unlink()


if __name__ == "__main__":
    main()
