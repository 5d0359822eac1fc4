"""Across a cast (an fp32 base, a bf16 release) every element differs by the rounding. Those differences are
the base rounded, which costs nothing to write down, and they are not a sparse or a dense change: a 1% edit read
"sparse: 1.0% differ" beside "84% of the model" in bf16 (1.7% in fp32), and a dense change below the bf16 step
read "sparse" from the few elements that tipped over a rounding boundary (found by the real-checkpoints tester)."""

from __future__ import annotations

import numpy as np

import weightdiff
from conftest import write_checkpoint
from weightdiff.render.sentences import form_sentence


def _base(rng):
    return {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(0, 0.02, (128, 256)).astype(np.float32)
            for i in range(2)}


def test_a_sparse_edit_costs_the_same_written_down_whatever_the_release_dtype(tmp_path):
    rng = np.random.default_rng(1)
    base = _base(rng)
    edited = {k: v.copy() for k, v in base.items()}
    for v in edited.values():
        v[rng.random(v.shape) < 0.01] += 0.05
    b = write_checkpoint(tmp_path / "b", base)
    f32 = weightdiff.compare(b, write_checkpoint(tmp_path / "f32", edited)).summary
    bf16 = weightdiff.compare(b, write_checkpoint(tmp_path / "bf16", edited, dtype="BF16")).summary
    assert f32.form["kind"] == bf16.form["kind"] == "sparse"
    n = sum(int(np.count_nonzero(edited[k] != base[k])) for k in base)
    assert f32.delta_params == bf16.delta_params == 2 * n           # position and value per edited element
    assert f32.form["differing_element_share"] == f32.form["changed_element_share"]
    assert bf16.form["differing_element_share"] > 0.99
    text = form_sentence(bf16.form)
    assert "differ beyond rounding" in text and "the rest by the rounding of the dtype change" in text
    assert "beyond rounding" not in form_sentence(f32.form)


def test_a_dense_change_below_the_bf16_step_is_not_called_sparse(tmp_path):
    rng = np.random.default_rng(2)
    base = _base(rng)
    tuned = {k: (v + 1e-5 * np.sign(rng.normal(size=v.shape))).astype(np.float32) for k, v in base.items()}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned,
                                                                                      dtype="BF16"))
    s = r.summary
    assert s.verdict == "derived" and "rounding_level" in s.flags
    assert s.form["changed_element_share"] < 0.5          # only the elements that tipped over a boundary
    assert s.form["kind"] == "undecided"                  # was "sparse"
    # the tipped elements are what must be written down, not every element the cast rounded
    tipped = sum(t.frac_beyond_rounding * t.numel_compared for t in r.tensors if t.status == "changed")
    assert s.delta_params == 2 * round(tipped)
    assert "training stored in a 16-bit format at a small learning rate" in s.verdict_reason
