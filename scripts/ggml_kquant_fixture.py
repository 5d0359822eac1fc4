"""Write tests/data/ggml_kquants.npz: llama.cpp's own K-quant encoders' bytes for fixed inputs.

Usage: python scripts/ggml_kquant_fixture.py GGML_SRC [--check]

GGML_SRC is a checkout of https://github.com/ggml-org/ggml (src/ggml-quants.c, src/ggml-impl.h). The
reference functions (``nearest_int``, ``make_qx_quants``, ``make_qkx2_quants``, ``get_scale_min_k4``,
``quantize_row_q{4,5,6}_K_ref``) and the fp16 conversion are cut from those files by name, compiled
with ``gcc -O2 -ffp-contract=off`` (no fused multiply-add: the arithmetic the C source states) and
called through ctypes on the inputs of ``inputs()``. tests/test_quant_kernels.py holds
``kernels/ggml_encode.encode`` to these bytes, so the test needs neither the C source nor a compiler.
The fixture written from ggml d99724f2 is in the repository; ``--check`` compares instead of writing.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ggml_kquants.npz"
SIZES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
HEAD = """#include <stdint.h>
#include <string.h>
#include <math.h>
#include <assert.h>
#include <stdbool.h>
#define GGML_RESTRICT
#define QK_K 256
#define K_SCALE_SIZE 12
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define GROUP_MAX_EPS 1e-15f
typedef uint16_t ggml_fp16_t;
typedef uint16_t ggml_half;
static inline float fp32_from_bits(uint32_t w) { union { uint32_t u; float f; } v; v.u = w; return v.f; }
static inline uint32_t fp32_to_bits(float f) { union { float f; uint32_t u; } v; v.f = f; return v.u; }
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K/2]; } block_q4_K;
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K/8]; uint8_t qs[QK_K/2]; } block_q5_K;
typedef struct { uint8_t ql[QK_K/2]; uint8_t qh[QK_K/4]; int8_t scales[QK_K/16]; ggml_half d; } block_q6_K;
"""


def _function(src: str, signature: str) -> str:
    """The C function whose definition starts with ``signature``, to its closing brace at column 0."""
    start = src.index(signature)
    end = src.index("\n}\n", start) + 3
    return src[start:end]


def build(ggml: Path, folder: Path) -> ctypes.CDLL:
    quants = (ggml / "src" / "ggml-quants.c").read_text()
    impl = (ggml / "src" / "ggml-impl.h").read_text()
    fp16 = re.search(r"static inline float ggml_compute_fp16_to_fp32.*?#define GGML_FP32_TO_FP16\(x\)[^\n]*\n", impl,
                     re.S).group(0)
    parts = [HEAD, fp16] + [_function(quants, s) for s in (
        "static inline int nearest_int(", "static float make_qx_quants(", "static float make_qkx2_quants(",
        "static inline void get_scale_min_k4(", "void quantize_row_q4_K_ref(", "void quantize_row_q5_K_ref(",
        "void quantize_row_q6_K_ref(")]
    c = folder / "kq.c"
    c.write_text("\n".join(parts))
    lib = folder / "libkq.so"
    subprocess.run(["gcc", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(lib), str(c), "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def inputs() -> np.ndarray:
    """16 rows of 512: Gaussian at four scales, and adversarial rows (zeros, one value, one sign, values on
    sixteenths, a ramp, cubes, every seventh value zero)."""
    rng = np.random.default_rng(20261204)
    x = (rng.standard_normal((16, 512)) * rng.choice([1e-4, 0.02, 1.0, 50.0], (16, 1))).astype(np.float32)
    x[0] = 0
    x[1] = 0.25
    x[2] = np.abs(x[2])
    x[3] = -np.abs(x[3])
    x[4] = np.round(x[4] * 16) / 16
    x[5, :256] = np.linspace(-1, 1, 256)
    x[6] = x[6] ** 3
    x[7, ::7] = 0
    return x


def encode_c(lib: ctypes.CDLL, x: np.ndarray, qtype: str) -> np.ndarray:
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.zeros((flat.size // 256, SIZES[qtype]), np.uint8)
    getattr(lib, f"quantize_row_{qtype[:2].lower()}_K_ref")(flat.ctypes.data_as(ctypes.c_void_p),
                                                     out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(flat.size))
    return out


def main(argv: list[str]) -> int:
    ggml = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(ggml, Path(tmp))
        x = inputs()
        got = {"x": x, **{q: encode_c(lib, x, q) for q in SIZES}}
    if "--check" in argv:
        old = np.load(OUT)
        same = all(np.array_equal(old[k], v) for k, v in got.items())
        print("fixture current" if same else "fixture differs")
        return 0 if same else 1
    np.savez_compressed(OUT, **got)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
