"""The GGUF noise floor (weightdiff/io/gguf_floor.py) against the formats' own encoders on weights
that make the encoders misbehave: blocks so small that the fp16 scale is subnormal or 0 (the
untrained vocabulary rows of Llama-3), outlier input channels that shrink a K-quant sub-block's
6-bit / int8 scale to a few units (or 0) next to a large one, zero and constant blocks, heavy tails.
A clean quantization of such weights must never stand beyond the floor; a 1e-2 fine-tune must."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from weightdiff.io.gguf_floor import TOL, floor  # noqa: E402

import ggml_kquants  # noqa: E402

Q = gguf.GGMLQuantizationType


def _adversarial(rng, rows: int = 48, cols: int = 512) -> np.ndarray:
    x = rng.normal(0, 0.02, (rows, cols)).astype(np.float32)
    x[:, rng.choice(cols, 3, replace=False)] *= 30                # outlier input channels
    x[0:6] = rng.normal(0, 2e-5, (6, cols))                       # fp16-subnormal block scales
    x[6:9] = rng.normal(0, 1e-8, (3, cols))                       # scales that round to fp16 0
    x[9] = 0                                                      # zero blocks
    x[10] = 0.0123                                                # constant blocks, both signs
    x[11] = -0.0123
    x[12:18] = 0.02 * rng.standard_t(2, (6, cols))                # heavy tails
    x[18:22] *= rng.random((4, cols)) < 0.05                      # sparse
    x[22, ::32] = 3.0                                             # one large element per block
    x[23:26, :] *= np.logspace(-6, 0, cols, dtype=np.float32)     # scales over six decades
    return x.astype(np.float32)


def _quant(x: np.ndarray, q) -> np.ndarray:
    if q in (Q.Q4_K, Q.Q6_K):
        return ggml_kquants.quantize(x, q.name)
    return quantize(x, q)


def _floor_of(raw: np.ndarray, q):
    bs, ts = gguf.GGML_QUANT_SIZES[q]
    values = dequantize(raw, q).astype(np.float32)
    fl = floor(raw.reshape(-1, ts), values.reshape(-1, bs), q.name, bs)
    return values, fl.reshape(values.shape)


def test_ggml_kquants_transcription_decodes_with_gguf(rng):
    x = rng.normal(0, 0.02, (4, 512)).astype(np.float32)
    for q, err in ((Q.Q4_K, 0.12), (Q.Q6_K, 0.03)):
        raw = ggml_kquants.quantize(x, q.name)
        assert raw.shape == (4, 2 * gguf.GGML_QUANT_SIZES[q][1])
        back = dequantize(raw, q)
        assert np.linalg.norm(back - x) / np.linalg.norm(x) < err


@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_clean_quantization_of_adversarial_weights_stays_within_the_floor(rng, q):
    x = _adversarial(rng)
    raw = _quant(x, q)
    values, fl = _floor_of(raw, q)
    err = np.abs(x - values)
    assert np.all(err <= fl), (q.name, float(np.max(err / np.maximum(fl, 1e-30))), np.argwhere(err > fl)[:5])
    if q in (Q.Q8_0, Q.Q4_0):
        # the rows the old floor failed on: a relative 2^-10 for the fp16 scale, no absolute part
        bs, ts = gguf.GGML_QUANT_SIZES[q]
        d = raw[:6].reshape(-1, ts)[:, :2].copy().view(np.float16).astype(np.float32)
        assert np.all(np.abs(d) < 2.0 ** -14)                     # subnormal scales
        old = np.abs(np.repeat(d, bs, axis=1)).reshape(6, -1) * 0.5 * (1 + TOL) + np.abs(values[:6]) * TOL
        assert np.any(err[:6] > old)


@pytest.mark.parametrize("q", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_kquant_floor_covers_scale_rounding_next_to_outliers(rng, q):
    """Sub-blocks next to an outlier get a 6-bit (Q4_K) / int8 (Q6_K) scale of a few units, or 0:
    their values overrun the code range by several steps, or all decode to one value."""
    x = rng.normal(0, 0.02, (64, 512)).astype(np.float32)
    x[:, rng.choice(512, 3, replace=False)] *= 30
    x[:, 7] *= 300                                                # scales that round to 0
    raw = _quant(x, q)
    values, fl = _floor_of(raw, q)
    assert np.all(np.abs(x - values) <= fl)
    bs, ts = gguf.GGML_QUANT_SIZES[q]
    blocks = raw.reshape(-1, ts)
    sc = blocks[:, 192:208].view(np.int8) if q == Q.Q6_K else blocks[:, 4:8] & 63
    assert np.any(sc == 0) and np.any((sc > 0) & (sc < 8))       # the cases this test is about


@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("kind", ["dense", "rank4"])
def test_a_fine_tune_then_quantized_stands_beyond_the_floor(rng, q, kind):
    x = rng.normal(0, 0.02, (64, 512)).astype(np.float32)
    x[:, rng.choice(512, 3, replace=False)] *= 30
    x[-4:] = rng.normal(0, 2e-5, (4, 512))
    if kind == "dense":
        delta = rng.normal(0, 1, x.shape)
    else:
        delta = rng.normal(0, 1, (64, 4)) @ rng.normal(0, 1, (4, 512))
    tuned = (x + 1e-2 * np.linalg.norm(x) / np.linalg.norm(delta) * delta).astype(np.float32)
    values, fl = _floor_of(_quant(tuned, q), q)
    beyond = np.abs(x - values) > fl
    assert beyond.sum() >= 50, int(beyond.sum())


@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("kind", ["gauss", "outliers"])
def test_noise_model_energy_matches_the_real_error(rng, q, kind):
    """The rank analysis takes the quantization error as uniform within ``floor(noise=True)``: its
    energy must be near the encoder's real error energy (too large hides a change as noise, too
    small reads noise as change), and never above the bound."""
    x = rng.normal(0, 0.02, (32, 1024)).astype(np.float32)
    if kind == "outliers":
        x[:, rng.choice(1024, 4, replace=False)] *= 30
    raw = _quant(x, q)
    bs, ts = gguf.GGML_QUANT_SIZES[q]
    values = dequantize(raw, q).astype(np.float32)
    args = (raw.reshape(-1, ts), values.reshape(-1, bs), q.name, bs)
    model, bound = floor(*args, noise=True).astype(np.float64), floor(*args).astype(np.float64)
    assert np.all(model <= bound)
    real = float(np.sum((x.astype(np.float64) - values) ** 2))
    ratio = real / float(np.sum(model ** 2 / 3))
    # outlier columns leave most of a 4-bit block far inside half a step (Q4_0: 0.48): the model
    # overstates there, as any model that does not know the weights' distribution within a step
    assert (0.6 if kind == "gauss" else 0.4) <= ratio <= 1.05, ratio


# -- importance-matrix K-quants: clamped past the grid at the end codes only ----------

def test_imatrix_q4_k_transcription_is_ggml_c_byte_for_byte():
    """``ggml_imatrix`` against the bytes of ggml's own ``quantize_row_q4_K_impl`` (compiled from
    ggml-quants.c without contraction) on heavy tails, an outlier, a zero sub-block and row, fp16-subnormal
    scales and an importance matrix with unused columns."""
    import ggml_imatrix
    from pathlib import Path

    ref = np.load(Path(__file__).parent / "data" / "ggml_q4k_imatrix.npz")
    assert np.array_equal(ggml_imatrix.quantize(ref["x"], ref["qw"]), ref["blocks"])


def _imatrix_case(rng):
    import ggml_imatrix

    x = (rng.standard_t(2.5, (256, 512)) * 0.02).astype(np.float32)
    qw = ggml_imatrix.importance(512, 3, zero=0.1)                # 10% of the columns never activated
    return x, qw, ggml_imatrix.quantize(x, qw)


def test_imatrix_q4_k_clamps_past_the_floor_only_at_the_end_codes(rng):
    """With an importance matrix the weighted search leaves low-importance elements many steps past the
    end of their grid (beyond the reach of the reference search the floor allows); every element past the
    floor is then at an end code with the plain value past that end, which ``clamped_beyond`` counts."""
    from weightdiff.io.gguf_floor import ends
    from weightdiff.measure.quant_floor import clamped_beyond

    x, qw, raw = _imatrix_case(rng)
    values, fl = _floor_of(raw, Q.Q4_K)
    beyond = np.abs(x - values) > fl
    assert beyond.sum() >= 3                                      # the case this test is about
    assert float(np.max(np.abs(x - values) / fl)) > 1.5
    e = ends(raw.reshape(-1, 144), values.reshape(-1, 256), "Q4_K").reshape(x.shape)
    assert set(np.unique(e[beyond]).tolist()) <= {-1.0, 1.0, 2.0}
    assert clamped_beyond(x.ravel(), values.ravel(), fl.ravel(), e.ravel()) == int(beyond.sum())
    # a fine-tune of relative size 1e-2, quantized the same way, moves interior codes past the floor
    import ggml_imatrix

    delta = rng.normal(0, 1, x.shape)
    tuned = (x + 1e-2 * np.linalg.norm(x) / np.linalg.norm(delta) * delta).astype(np.float32)
    traw = ggml_imatrix.quantize(tuned, qw)
    tv, tfl = _floor_of(traw, Q.Q4_K)
    te = ends(traw.reshape(-1, 144), tv.reshape(-1, 256), "Q4_K").reshape(x.shape)
    n = int(np.count_nonzero(np.abs(x - tv) > tfl))
    assert n - clamped_beyond(x.ravel(), tv.ravel(), tfl.ravel(), te.ravel()) >= 50


def test_ends_mark_the_codes_the_floor_reads(rng):
    from weightdiff.io.gguf_floor import ends

    x = _adversarial(rng)
    for q, top in ((Q.Q4_K, 15), (Q.Q6_K, 31)):
        raw = _quant(x, q)
        bs, ts = gguf.GGML_QUANT_SIZES[q]
        values = dequantize(raw, q).astype(np.float32).reshape(-1, bs)
        e = ends(raw.reshape(-1, ts), values, q.name)
        assert e.shape == values.shape and set(np.unique(e).tolist()) <= {-1.0, 0.0, 1.0, 2.0}
        assert np.any(e == 1) and np.any(e == -1) and np.any(e == 0)
    assert ends(np.zeros((1, 34), np.uint8), np.zeros((1, 32), np.float32), "Q8_0") is None
