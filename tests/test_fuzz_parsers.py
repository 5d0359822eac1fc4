"""Fuzz smoke tests: the header and index parsers only ever raise CheckpointError."""

from __future__ import annotations

import json
import struct
import uuid

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightdiff.io.checkpoint import locate
from weightdiff.errors import CheckpointError
from weightdiff.io.safetensors_read import SafetensorsFile, parse_bytes
from weightdiff.io.safetensors_write import encode, save_checkpoint

SEED = encode({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": ("BF16", np.ones(4, np.uint16)),
               "c": np.zeros(0, np.int8)}, {"format": "pt"})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)

entries = st.fixed_dictionaries(
    {},
    optional={"dtype": st.sampled_from(["F32", "BF16", "F4", "C64", "BOOL", "X", 3]) | json_values,
              "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
              "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | json_values})

headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5)


def _check(blob: bytes) -> None:
    try:
        tensors, meta = parse_bytes(blob)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    # a header that passes describes exactly the bytes present
    data_start = 8 + struct.unpack("<Q", blob[:8])[0]
    assert sum(t.nbytes for t in tensors.values()) == len(blob) - data_start
    assert all(isinstance(v, str) for v in meta.values())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(blob):
    _check(blob)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_file(data):
    blob = bytearray(SEED)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "len"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del blob[pos:pos + data.draw(st.integers(1, 16))]
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    _check(bytes(blob))


@settings(max_examples=300, deadline=None)
@given(headers, st.binary(max_size=64))
def test_structured_headers(header, data):
    _check(struct.pack("<Q", len(h := json.dumps(header).encode())) + h + data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(json_values, st.fixed_dictionaries(
    {}, optional={"weight_map": st.dictionaries(st.text(max_size=8), st.sampled_from(
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "../x.safetensors",
         "/abs.safetensors", "missing.safetensors", "", "a/../b"]) | json_values, max_size=5),
        "metadata": json_values})))
def test_index_parser(tmp_path, index):
    d = tmp_path / uuid.uuid4().hex
    save_checkpoint(d, {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}, shards=2)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        with locate(d) as c:
            assert set(c.tensors) == {"a", "b"}       # only the true layout can pass
    except CheckpointError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=120))
def test_file_reader_on_random_files(tmp_path, blob):
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(blob)
    try:
        with SafetensorsFile(path) as f:
            for name in f.tensors:
                f.read(name)
    except CheckpointError:
        pass
