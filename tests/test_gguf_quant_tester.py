"""Findings of the quantized-formats tester: a GGUF of a base with tokens added, counts and bounds when part
of a fine-tune sits below the quantization floor, quantization noise in the memo's words and Figure 1."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from weightdiff.comparison import compare  # noqa: E402
from weightdiff.render.sentences import verdict_title  # noqa: E402

from conftest import write_checkpoint  # noqa: E402
from gguf_build import to_gguf  # noqa: E402
from models import llama  # noqa: E402

Q = gguf.GGMLQuantizationType


def _base(rng):
    return llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_vocabulary_resized_in_gguf_reads_resized_not_a_fine_tune(tmp_path, rng, qtype):
    """8 token rows added to an untouched base, written as GGUF: the shared rows are within the cast (F16) or
    the quantization floor (Q8_0), so nothing was trained; the new rows are the whole change. It read "a
    fine-tune" (and in Q8_0 delta params 18% of the model, a lower bound above the truth)."""
    t = _base(rng)
    base = write_checkpoint(tmp_path / "base", t)
    grown = dict(t)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[n] = np.concatenate([t[n], rng.normal(0, 0.02, (8, 64)).astype(np.float32)])
    path = to_gguf(tmp_path / "grown.gguf", grown, "llama", qtype, n_head=4, n_kv=2, layers=2)
    r = compare(base, path)
    s = r.summary
    assert s.verdict == "derived"
    assert s.delta_params == 2 * 8 * 64 and s.delta_params_lower in (None, 2 * 8 * 64)
    assert s.scope["tensors_only_resized"] == 2
    title = verdict_title(r.to_dict()["summary"])
    assert "vocabulary resized" in title and "a fine-tune" not in title, title
    if qtype == Q.Q8_0:
        assert "quantization noise floor" in title
