"""records.dumps: the fast encoder writes exactly the bytes of the standard library's."""

from __future__ import annotations

import numpy as np
import pytest

from weightdiff import compare
from weightdiff.records import dumps, dumps_reference


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.5, float("nan"), float("inf"), -0.0, 1e300, 5e-324], "b": {}, "c": [], "d": (1, (2, "x")),
     "é": "ünï\u2028\"\\\n\t", 3: None, "n": np.float64(0.1), "i": np.int64(7), "f32": np.float32(0.3),
     "t": True, "deep": [[[[{"k": [{}]}]]]], "bool_key": {True: 1}},
    [], {}, "s", 1.5, None, [[]], [float("-inf")],
])
def test_fast_dumps_is_the_standard_encoders_bytes(obj):
    assert dumps(obj) == dumps_reference(obj)


def test_fast_dumps_on_a_whole_comparison(tmp_path, rng):
    from conftest import write_checkpoint
    from models import llama

    base = llama(rng, layers=1, hidden=32, inter=48, vocab=64)
    tuned = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert dumps(d) == dumps_reference(d)


def test_what_json_cannot_hold_is_still_a_type_error():
    with pytest.raises(TypeError):
        dumps({"x": object()})
