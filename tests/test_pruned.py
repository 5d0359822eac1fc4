"""Weights pruned element by element (magnitude, 2:4, heads zeroed in place) with no training read as pruning.

Every changed element set to exactly 0 and every other element the base's read "DERIVED: a fine-tune of this
base", dense, 75% of the model "to write the change down", and at 90% "a merge with another model, long
further training" (found by the function-preserving tester). The records' norms single out the candidates
(||base||^2 = ||tuned||^2 + ||delta||^2 and cosine = ||tuned|| / ||base||); the elements decide.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.render.sentences import verdict_title


def _pruned(t: dict, how: str) -> dict:
    out = dict(t)
    for k, v in t.items():
        if v.ndim != 2 or "layers" not in k:
            continue
        a = np.abs(v)
        if how == "magnitude":
            keep = a >= np.median(a)
        elif how == "2:4":
            g = a.reshape(v.shape[0], -1, 4)
            keep = (g >= np.sort(g, axis=-1)[..., 2:3]).reshape(v.shape)
        elif how == "heads" and "o_proj" in k:
            keep = np.ones(v.shape, bool)
            keep[:, :32] = False                        # the first head's columns of o
        elif how == "extreme":
            keep = a >= np.quantile(a, 0.995)
        else:
            continue
        out[k] = np.where(keep, v, 0).astype(v.dtype)
    return out


@pytest.mark.parametrize("how", ["magnitude", "2:4", "heads", "extreme"])
def test_pruning_without_training_reads_pruned(tmp_path, rng, how):
    base = llama(rng)
    r = compare(write_checkpoint(tmp_path / "b", base, dtype="BF16"),
                write_checkpoint(tmp_path / "p", _pruned(base, how), dtype="BF16"))
    s = r.summary
    assert s.verdict == "derived" and "pruned_elements" in s.flags and "far_from_base" not in s.flags
    n = {"magnitude": 28, "2:4": 28, "heads": 4, "extreme": 28}[how]
    assert s.scope["pruned_elements"]["tensors"] == n
    title = verdict_title(s.to_dict())
    assert "some of its weights pruned" in title and "none of its other weights changed" in title, title
    assert all("pruned:" in t.note for t in r.tensors if t.status == "changed")


def test_a_fine_tune_and_pruning_then_training_are_not_pruning(tmp_path, rng):
    base = llama(rng)
    tuned = {k: (v + 1e-2 * float(v.std()) * np.random.default_rng(3).standard_normal(v.shape)).astype(np.float32)
             for k, v in base.items()}
    b = write_checkpoint(tmp_path / "b", base)
    s = compare(b, write_checkpoint(tmp_path / "t", tuned)).summary
    assert "pruned_elements" not in s.flags
    trained = {k: (v + 1e-3 * float(np.abs(v).max()) * (v != 0)).astype(np.float32) for k, v in
               _pruned(base, "magnitude").items()}
    s = compare(b, write_checkpoint(tmp_path / "pt", trained)).summary
    assert "pruned_elements" not in s.flags and "a fine-tune" in verdict_title(s.to_dict())


def test_pruning_then_a_cast_reads_pruned(tmp_path, rng):
    """A pruned f32 model stored in bf16 read "a fine-tune": the kept elements are the base's rounded."""
    base = llama(rng)
    r = compare(write_checkpoint(tmp_path / "b", base),
                write_checkpoint(tmp_path / "p", _pruned(base, "magnitude"), dtype="BF16"))
    s = r.summary
    assert "pruned_elements" in s.flags and s.scope["pruned_elements"]["tensors"] == 28
    assert s.scope["pruned_elements"]["cast"] is True
    assert "the base's cast to the tuned dtype" in verdict_title(s.to_dict())
