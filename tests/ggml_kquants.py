"""K-quant GGUF tensors for the tests: llama.cpp's reference Q4_K / Q5_K / Q6_K encoders.

They live in ``weightdiff.kernels.ggml_encode`` (the product tries a base's K-quant round trip with them),
held bit for bit to the bytes of ggml's own C (tests/test_quant_kernels.py, tests/data/ggml_kquants.npz).
``quantize(x, "Q4_K")`` returns raw GGUF block bytes per row, which ``gguf.quants.dequantize`` decodes.
"""
import numpy as np

from weightdiff.kernels.ggml_encode import encode


def quantize(x, name):
    x = np.ascontiguousarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    return encode(rows, name).reshape(rows.shape[0], -1)
