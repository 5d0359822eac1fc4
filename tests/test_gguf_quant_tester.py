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


def _fine_tune_q4(tmp_path, rng):
    """Layer 1's q_proj moved by 10% (beyond any floor), its k_proj by 1e-4 (within Q4_0's floor), in Q4_0."""
    t = _base(rng)
    base = write_checkpoint(tmp_path / "base", t)
    ft = dict(t)
    for n, rel in (("model.layers.1.self_attn.q_proj.weight", 0.1), ("model.layers.1.self_attn.k_proj.weight", 1e-4)):
        ft[n] = t[n] + rel * np.linalg.norm(t[n]) / np.sqrt(t[n].size) * rng.normal(0, 1, t[n].shape).astype(np.float32)
    path = to_gguf(tmp_path / "ft.gguf", ft, "llama", Q.Q4_0, n_head=4, n_kv=2, layers=2)
    return base, path


def test_counts_are_lower_bounds_and_delta_params_no_bound_when_tensors_sit_within_the_floor(tmp_path, rng):
    """A fine-tune partly below the quantization floor: the tensors within it are not counted as changed, so
    "N of M tensors changed" is a lower bound and "at most K numbers" bounds only the tensors beyond the floor
    (a Q4_1 copy of a dense fine-tune of 7 tensors read "1 of 21 tensors changed", "at most 65,536 numbers")."""
    from weightdiff.render import sentences
    from weightdiff.render.terminal import render_text
    base, path = _fine_tune_q4(tmp_path, rng)
    r = compare(base, path)
    s = r.summary
    assert s.verdict == "derived"
    assert [x.name for x in r.tensors if x.status == "changed"] == ["model.layers.1.self_attn.q_proj.weight"]
    hidden = s.scope["within_quant_floor"]
    assert hidden["tensors"] == sum(1 for x in r.tensors if x.status == "quantized") and hidden["blocks"] == 1
    assert "quant_floor_lower_bounds" in s.flags
    data = r.to_dict()
    reason = data["summary"]["verdict_reason"]
    assert "at least 1 of " in reason and "at least 1 of 2 blocks" in reason, reason
    plain = " ".join(sentences.plain_language(data))
    assert "Writing the change down takes at most" not in plain
    assert "no bound for the whole model" in plain and "beyond the quantization noise floor" in plain, plain
    text = render_text(data)
    assert "at least 1 of 2 blocks changed; at least 1 of " in text and "for the tensors beyond the quantization" in text
    from weightdiff.render.memo import key_figures
    rows = {str(r[0]): " ".join(map(str, r[1:])) for r in key_figures(data)}
    assert rows["blocks changed"].startswith("at least 1 of 2")
    assert "beyond the quantization noise floor only" in rows["parameters to write the change down"]


def test_memo_does_not_present_quantization_noise_as_movement(tmp_path, rng):
    """In Q4_0 the large matrices' relative change is mostly the quantization's noise (an untouched copy reads
    about the same): "moved by 9.0e-2 of their size, about 54 times the rounding a cast to bfloat16 would cause"
    presented that noise as the fine-tune's movement. The figure is said to include it, with its level."""
    from weightdiff.render import sentences
    from weightdiff.render.memo import key_figures
    base, path = _fine_tune_q4(tmp_path, rng)
    data = compare(base, path).to_dict()
    plain = " ".join(sentences.plain_language(data))
    assert "moved by" not in plain and "times the rounding" not in plain, plain
    assert "includes the noise of the quantization" in plain and "within their quantization noise floor" in plain
    rows = {str(r[0]): " ".join(map(str, r[1:])) for r in key_figures(data)}
    note = rows["relative change (large matrices)"]
    assert "quantization noise included" in note and "bfloat16 rounding alone" not in note, note


def test_depth_caption_names_the_quantization_floor_of_quantized_embeddings_and_agrees_in_number(tmp_path, rng):
    """Figure 1's caption said quantized embeddings and head "differ only by dtype rounding (9.1e-2)" (their
    status is ``quantized``), and "1 block differ only within their", "1 block with no change at all sit"."""
    from weightdiff.render.captions import caption_depth
    base, path = _fine_tune_q4(tmp_path, rng)
    data = compare(base, path).to_dict()
    assert {t["status"] for t in data["tensors"] if t["name"] in ("model.embed_tokens.weight", "lm_head.weight")} \
        == {"quantized"}
    text = caption_depth(data)
    assert "dtype rounding" not in text, text
    assert "The embeddings (before block 0) differ only within their quantization noise floor" in text, text
    assert "The head (after block 1) differs only within its quantization noise floor" in text, text
    assert "1 block differs only within its quantization noise floor" in text, text
    assert "1 block differ " not in text and " sit as" not in text.replace("sit as hollow circles", "")
