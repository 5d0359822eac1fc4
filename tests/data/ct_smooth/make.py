"""Write the SmoothQuant fixtures of tests/test_smoothing.py with llm-compressor's own oneshot (its
SmoothQuantModifier, QuantizationModifier and GPTQModifier, on CPU) and compressed-tensors' writer. Run once,
from this folder (llmcompressor is no dependency of weightdiff; it brings datasets and its own pins):

    pip install --target /tmp/llmc llmcompressor==0.14.0.1
    PYTHONPATH=/tmp/llmc python make.py

base/: a bf16 Llama (hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads), its norms random around 1;
sq-float/: the base smoothed (each norm divided by SmoothQuant's per-channel scales, the q/k/v and gate/up
columns multiplied by them), saved as bf16, nothing quantized; sq-w8a8/: smoothed, then W8A8 round to nearest
(int8 per-channel weights, compressed-tensors int-quantized); sq-gptq/: smoothed, then W8A8 by GPTQ;
ft-sq-w8a8/: a rank-4 update of relative size 1e-2 on every q_proj of the base, then smoothed and W8A8.
"""
import shutil

import datasets
import pyarrow as pa
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import SmoothQuantModifier

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def base():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**CFG))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m.to(torch.bfloat16)


def tuned():
    m = base().to(torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "q_proj" in n:
                d = torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g)
                p.add_(d * (1e-2 * p.norm() / d.norm()))
    return m.to(torch.bfloat16)


def calib():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (32,), generator=g).tolist() for _ in range(16)]
    datasets.disable_caching()
    ds = Dataset(pa.table({"input_ids": ids, "attention_mask": [[1] * 32 for _ in ids]}), fingerprint="calib")
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    return ds, PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0")


def write(folder, model, recipe=None):
    shutil.rmtree(folder, ignore_errors=True)
    if recipe is not None:
        ds, tok = calib()
        oneshot(model=model, recipe=recipe, dataset=ds, processor=tok, num_calibration_samples=16, max_seq_length=32)
    model.save_pretrained(folder, save_compressed=recipe is not None and len(recipe) > 1)


def sq():
    return SmoothQuantModifier(smoothing_strength=0.8)


def load(folder):
    # oneshot wants a model loaded from a folder (it reads its name_or_path)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


if __name__ == "__main__":
    write("base", base())
    write("/tmp/ct_smooth_ft", tuned())
    write("sq-float", load("base"), [sq()])
    write("sq-w8a8", load("base"), [sq(), QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])])
    write("sq-gptq", load("base"), [sq(), GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])])
    write("ft-sq-w8a8", load("/tmp/ct_smooth_ft"),
          [sq(), QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])])
