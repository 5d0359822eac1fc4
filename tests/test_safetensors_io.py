"""The reader against the safetensors library, window contract, truncation, fallbacks."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightdiff.errors import CheckpointError
from weightdiff.kernels.dtypes import DTYPES, byte_length
from weightdiff.io.safetensors_read import SafetensorsFile, TensorInfo, parse_bytes, storage_of
from weightdiff.io.safetensors_write import encode, save_file, to_storage

NUMPY_DTYPES = set(safetensors.numpy._TYPES)          # the dtypes the library hands out as numpy


@st.composite
def tensor_specs(draw):
    """(name, dtype, shape, raw bytes) with a valid length for every safetensors dtype."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    bits = DTYPES[dtype].bits
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    if (bits * math.prod(shape)) % 8:                  # packed formats need whole bytes
        shape = shape + [8]
    nbytes = byte_length(dtype, math.prod(shape))
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if dtype == "BOOL":
        data = bytes(b & 1 for b in data)
    return dtype, tuple(shape), data


@st.composite
def files(draw):
    """A whole valid safetensors file, tensors laid out in a random order (so often unaligned)."""
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=6, unique=True))
    specs = {n: draw(tensor_specs()) for n in names if n != "__metadata__"}
    layout = draw(st.permutations(list(specs)))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    offsets, pos = {}, 0
    for n in layout:
        offsets[n] = (pos, pos + len(specs[n][2]))
        pos += len(specs[n][2])
    for n in specs:                                     # header order differs from data order
        dtype, shape, _ = specs[n]
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets[n])}
    h = json.dumps(header).encode()
    h += b" " * draw(st.integers(0, 7))
    blob = struct.pack("<Q", len(h)) + h + b"".join(specs[n][2] for n in layout)
    return blob, specs


def _collect(windows) -> bytes:
    return b"".join(w.tobytes() for w in windows)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files(), st.integers(1, 9), st.booleans(), st.randoms(use_true_random=False))
def test_round_trip_against_safetensors(tmp_path, file, step, use_mmap, rnd):
    blob, specs = file
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(blob)
    lib = {name: spec for name, spec in safetensors.deserialize(blob)}
    lib_np = safetensors.numpy.load_file(path) if all(s[0] in NUMPY_DTYPES for s in specs.values()) else None
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        assert set(f.tensors) == set(lib)
        starts = [t.start for t in f.tensors.values()]
        assert starts == sorted(starts)                 # file (offset) order
        for name, info in f.tensors.items():
            ref = lib[name]
            assert (info.dtype, list(info.shape)) == (ref["dtype"], ref["shape"])
            assert info.nbytes == len(ref["data"])
            full = f.read(name)
            assert full.dtype == storage_of(info.dtype)
            assert full.tobytes() == bytes(ref["data"])
            if not info.packed:
                assert full.shape == info.shape
            assert _collect(f.windows(name, step)) == bytes(ref["data"])
            n = info.flat_length
            a = rnd.randint(0, n)
            b = rnd.randint(a, n)
            item = full.dtype.itemsize
            assert _collect(f.windows(name, step, a, b)) == bytes(ref["data"])[a * item:b * item]
            if lib_np is not None:
                assert full.tobytes() == np.ascontiguousarray(lib_np[name]).tobytes()
                assert full.dtype == lib_np[name].dtype and full.shape == lib_np[name].shape
            if info.shape and not info.packed and info.shape[0]:
                rows = [rnd.randrange(info.shape[0]) for _ in range(3)]
                assert f.read_rows(name, rows).tobytes() == full[rows].tobytes()
        assert f.metadata == json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]]).get("__metadata__", {})


def test_library_written_file_bf16_fp8(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    t = {"bf": torch.randn(7, 3).to(torch.bfloat16), "e4": torch.randn(5).to(torch.float8_e4m3fn),
         "e5": torch.randn(4, 1).to(torch.float8_e5m2), "f": torch.tensor([float("nan"), float("inf"), -0.0])}
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(t, path, metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert [f.tensors[k].dtype for k in ("bf", "e4", "e5", "f")] == ["BF16", "F8_E4M3", "F8_E5M2", "F32"]
        for k, v in t.items():
            want = v.contiguous().view(torch.uint8).numpy().tobytes()
            assert f.read(k).tobytes() == want
            assert _collect(f.windows(k, 4)) == want
        assert f.read("bf").dtype == np.uint16 and f.read("e4").dtype == np.uint8


def test_nan_inf_zero_size_and_0d_read_fine(tmp_path):
    path = save_file(tmp_path / "m.safetensors", {
        "special": np.array([np.nan, np.inf, -np.inf, -0.0], np.float32),
        "empty": np.zeros((3, 0), np.float16), "scalar": np.float64(2.5),
        "bf_nan": ("BF16", to_storage(np.array([np.nan, np.inf], np.float32), "BF16"))})
    with SafetensorsFile(path) as f:
        s = f.read("special")
        assert np.isnan(s[0]) and s[1] == np.inf and s[2] == -np.inf and np.signbit(s[3])
        assert f.read("empty").shape == (3, 0) and list(f.windows("empty")) == []
        assert f.read("scalar").shape == () and float(f.read("scalar")) == 2.5
        assert [w.tolist() for w in f.windows("scalar")] == [[2.5]]
        assert f.read("bf_nan").tolist() == [0x7FC0, 0x7F80]
        assert f.read_rows("empty", [2, 0]).shape == (2, 0)


def test_window_boundaries_depend_only_on_range_and_step(tmp_path):
    path = save_file(tmp_path / "m.safetensors", {"a": np.arange(10, dtype=np.float32),
                                                 "b": ("BF16", np.arange(10, dtype=np.uint16))})
    with SafetensorsFile(path) as f:
        la = [len(w) for w in f.windows("a", 3, 1, 9)]
        lb = [len(w) for w in f.windows("b", 3, 1, 9)]
        assert la == lb == [3, 3, 2]
        pairs = [(a.tolist(), b.tolist()) for a, b in zip(f.windows("a", 4), f.windows("b", 4))]
        assert pairs[0] == ([0.0, 1.0, 2.0, 3.0], [0, 1, 2, 3]) and len(pairs) == 3
        with pytest.raises(ValueError):
            f.windows("a", 3, 5, 11)
        with pytest.raises(ValueError):
            f.windows("a", 0)
        with pytest.raises(KeyError):
            f.windows("nope")


def test_default_window_is_bounded(tmp_path, monkeypatch):
    import weightdiff.io.safetensors_read as sio

    monkeypatch.setattr(sio, "WINDOW_BYTES", 64)
    path = save_file(tmp_path / "m.safetensors", {"a": np.zeros(100, np.float32)})
    with SafetensorsFile(path) as f:
        assert [len(w) for w in f.windows("a")] == [16] * 6 + [4]


def test_windows_are_read_only_and_aligned(tmp_path):
    # a 3-byte tensor first puts the F32 tensor at an odd offset
    path = save_file(tmp_path / "m.safetensors", {"odd": np.zeros(3, np.uint8), "f": np.arange(6, dtype=np.float32)})
    with SafetensorsFile(path) as f:
        assert f.tensors["f"].start % 4 != 0
        for use_mmap in (True, False):
            f.use_mmap = use_mmap
            for w in f.windows("f", 4):
                assert w.flags.aligned and not w.flags.writeable
                with pytest.raises(ValueError):
                    w[0] = 1
        assert _collect(f.windows("f")) == np.arange(6, dtype=np.float32).tobytes()


def test_mmap_windows_are_views_of_a_mapping(tmp_path):
    from weightdiff.io.safetensors_read import _MAP_MIN

    path = save_file(tmp_path / "m.safetensors", {"f": np.arange(_MAP_MIN // 4, dtype=np.float32),
                                                  "s": np.arange(8, dtype=np.float32)})
    with SafetensorsFile(path) as f:
        w = next(f.windows("f"))
        assert isinstance(w.base, memoryview) and isinstance(w.base.obj, mmap.mmap)
        small = list(f.windows("s", 3))        # small windows are read, each an array of its own
        assert all(x.base is None and not x.flags.writeable for x in small)
        np.testing.assert_array_equal(np.concatenate(small), np.arange(8, dtype=np.float32))


def _resident_kb(addr: int) -> int | None:
    """The resident kB of the mapping of this process holding ``addr`` (/proc/self/smaps), None if unmapped."""
    hit = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                hit = lo <= addr < hi
            elif hit and head[0] == "Rss:":
                return int(head[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_DONTNEED"),
                    reason="Linux smaps and madvise")
def test_a_window_held_past_the_next_leaves_the_resident_set(tmp_path):
    """``for a, b in zip(...)`` keeps the last windows bound while the next are mapped and read: each side had
    two windows resident at once. A held window's pages now leave the resident set when the next is asked for,
    and reading it again still gives the file's values (read back from the page cache)."""
    from weightdiff.io.safetensors_read import _MAP_MIN

    n = _MAP_MIN          # floats: four map-sized windows of 1 MB
    values = np.arange(4 * n, dtype=np.float32)
    path = save_file(tmp_path / "m.safetensors", {"f": values})
    with SafetensorsFile(path) as f:
        it = f.windows("f", n)
        first = next(it)
        assert float(first.sum(dtype=np.float64)) == float(values[:n].sum(dtype=np.float64))   # every page read
        addr = first.ctypes.data
        assert _resident_kb(addr) >= _MAP_MIN // 1024 * 3 // 4
        second = next(it)                      # ``first`` is still held
        assert _resident_kb(addr) < 64
        np.testing.assert_array_equal(first, values[:n])      # read back, the same bytes
        np.testing.assert_array_equal(second, values[n:2 * n])
        del first, second
        assert _collect(it) == values[2 * n:].tobytes()


def test_unmappable_input_falls_back_to_reads(tmp_path, monkeypatch):
    from weightdiff.io.safetensors_read import _MAP_MIN

    n = _MAP_MIN // 4 * 3
    path = save_file(tmp_path / "m.safetensors", {"f": np.arange(n, dtype=np.float32)})

    def no_mmap(*a, **kw):
        raise OSError(19, "No such device")
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    with SafetensorsFile(path) as f:
        got = [w.copy() for w in f.windows("f", n // 2 + 1)]
        assert not f.use_mmap
    np.testing.assert_array_equal(np.concatenate(got), np.arange(n, dtype=np.float32))


@pytest.mark.parametrize("use_mmap", [True, False])
def test_truncated_while_reading_is_an_error_not_sigbus(tmp_path, use_mmap):
    path = save_file(tmp_path / "m.safetensors", {"f": np.arange(1 << 16, dtype=np.float32)})
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        it = f.windows("f", 1 << 12)
        first = next(it)
        assert first[5] == 5
        del first
        os.truncate(path, 1000)
        with pytest.raises(CheckpointError, match=r"file changed while being read: it held 262,\d+ bytes, now 1,000"):
            next(it)
        with pytest.raises(CheckpointError, match="file changed while being read"):
            f.read("f")


def test_closed_file(tmp_path):
    path = save_file(tmp_path / "m.safetensors", {"f": np.zeros(2, np.float32)})
    f = SafetensorsFile(path)
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read("f")


def test_read_rows(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    path = save_file(tmp_path / "m.safetensors", {"x": x, "v": np.ones(3, np.int16)})
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.read_rows("x", [4, 0, 1, 2, 2]), x[[4, 0, 1, 2, 2]])
        assert f.read_rows("x", []).shape == (0, 3, 4)
        np.testing.assert_array_equal(f.read_rows("v", np.array([2])), np.ones(1, np.int16))
        with pytest.raises(IndexError):
            f.read_rows("x", [5])


def test_read_rows_of_some_columns(tmp_path):
    """``read_rows(name, rows, (c0, c1))``: those columns of those rows, as numpy's slice gives them: one segment a
    row under half a row (a band of a packed ``qweight``), sliced from whole rows from half a row on; empty ranges;
    what is not a 2-D tensor's columns, and rows out of range, are refused."""
    x = (np.arange(7 * 40, dtype=np.int64).reshape(7, 40) * 2654435761 % 2 ** 31).astype(np.int32)
    path = save_file(tmp_path / "m.safetensors", {"x": x, "b": to_storage(x[:, :9] * 1e-12, "BF16"),
                                                  "v": np.ones(3, np.int16)})
    with SafetensorsFile(path) as f:
        for rows in ([4, 0, 1, 2, 2], [], range(7), [6]):
            for c0, c1 in ((0, 1), (3, 11), (39, 40), (5, 5), (0, 40), (10, 31)):
                got = f.read_rows("x", rows, (c0, c1))
                np.testing.assert_array_equal(got, x[list(rows)][:, c0:c1])
                assert got.dtype == np.int32 and got.shape == (len(list(rows)), c1 - c0)
        np.testing.assert_array_equal(f.read_rows("b", [1, 3], (2, 4)), f.read("b")[[1, 3], 2:4])
        for bad in (("x", [0], (3, 41)), ("x", [0], (5, 4)), ("v", [0], (0, 1))):
            with pytest.raises(ValueError, match="columns"):
                f.read_rows(*bad)
        with pytest.raises(IndexError):
            f.read_rows("x", [7], (0, 1))


def test_tensor_info_properties():
    t = TensorInfo("w", "F4", (4, 6), Path("x"), 10, 22)
    assert (t.numel, t.nbytes, t.packed, t.flat_length, t.decodable) == (24, 12, True, 12, False)
    p = TensorInfo("w", "BF16", (2, 3), Path("x"), None, None)
    assert (p.numel, p.nbytes, p.flat_length, p.decodable) == (6, 12, 6, True)


def test_parse_bytes_matches_file_reader():
    blob = encode({"a": np.ones(3, np.float32), "b": ("BF16", np.zeros(2, np.uint16))}, {"k": "v"})
    tensors, meta = parse_bytes(blob)
    assert meta == {"k": "v"}
    assert [(t.name, t.dtype, t.shape, t.end - t.start) for t in tensors.values()] == [
        ("a", "F32", (3,), 12), ("b", "BF16", (2,), 4)]


def test_fast_header_parse_is_the_strict_parse_or_declines():
    """The C-decoder shortcut of the header parse gives exactly the strict parse's result, and
    declines (None) whenever a key could have been repeated or anything is unusual."""
    import json as _json
    import random

    from pathlib import Path

    from weightdiff.errors import CheckpointError
    from weightdiff.io.safetensors_read import _fast_infos, _strict_infos

    def entry(i):
        return '{"dtype": "F32", "shape": [%d, 2], "data_offsets": [%d, %d]}' % (i, 8 * i * i, 8 * i * (i + 1))

    plain = "{" + ", ".join('"t.%d": %s' % (i, entry(i)) for i in range(5)) + ', "__metadata__": {"format": "pt"}}'
    cases = [
        plain, plain.replace(" ", ""),
        '{"a": %s, "a": %s}' % (entry(1), entry(2)),                                  # repeated name
        '{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',  # repeated field
        '{"__metadata__": {"k": "1", "k": "2"}, "a": %s}' % entry(1),                # repeated metadata key
        '{"__metadata__": {"k": ":x"}, "a": %s}' % entry(1),                         # a value with a colon
        '{"a\\"b": %s}' % entry(1), '{"a\\u0041": %s}' % entry(1),                     # escapes
        '{"a" : %s}' % entry(1), '{"a":%s,"b" :%s}' % (entry(1), entry(2)),            # space before a colon
        '{"__metadata__": {"k": {"x": "y"}}, "a": %s}' % entry(1),                   # nested metadata
        '{"a": {"dtype": "F32", "shape": [{"x": 1}], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
        '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "[]", "{}", '{"a": 1}',
        '\ufeff{"a": %s}' % entry(1), '{"a": %s}' % entry(1).replace("F32", "F99"),
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
        '{"é": %s, "ü": %s}' % (entry(1), entry(2)),
    ]
    rng = random.Random(0)
    for _ in range(300):        # random headers, some with a repeated key somewhere
        names = [rng.choice("abc") + str(rng.randint(0, 3)) for _ in range(rng.randint(0, 6))]
        meta = {rng.choice("xy"): rng.choice(["pt", ":", "a:b"]) for _ in range(rng.randint(0, 2))}
        body = ", ".join('"%s": %s' % (n, entry(rng.randint(0, 4))) for n in names)
        if meta:
            body += (", " if body else "") + '"__metadata__": ' + _json.dumps(meta)
        cases.append("{" + body + "}")
    cases += ['{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',            # wrong size
              '{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
              '{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
              '{"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}',
              '{"__metadata__": "pt", "a": %s}' % entry(1), '{"__metadata__": {"k": 1}}']
    declined = 0
    p = Path("h.safetensors")
    for text in cases:
        raw = text.encode("utf-8")
        fast = _fast_infos(raw, 8 + len(raw), p)
        if fast is None:
            declined += 1
            continue
        try:
            strict = _strict_infos(raw, p, 8 + len(raw), p)
        except CheckpointError as exc:
            raise AssertionError(f"the shortcut took a header the strict parse refuses: {text} ({exc})")
        assert fast == strict and [type(x) for x in fast[1].values()] == [type(x) for x in strict[1].values()], text
    assert _fast_infos(plain.encode(), 100, p) is not None and 20 < declined < len(cases)


def test_compact_header_parse_is_the_strict_parse_or_declines(tmp_path):
    """The regular-expression parse of the writers' compact header form gives exactly the strict
    parse's result (names, metadata, order, shapes), and declines whatever else could differ."""
    import random

    from weightdiff.errors import CheckpointError
    from weightdiff.io.safetensors_read import _compact_infos, _fast_infos, _strict_infos

    def entry(i, dtype="F32"):
        return '{"dtype":"%s","shape":[%d,2],"data_offsets":[%d,%d]}' % (dtype, i, 8 * i * i, 8 * i * (i + 1))

    p = Path("h.safetensors")
    taken = [
        '{"t.0":%s}' % entry(0), '{"__metadata__":{"format":"pt"},"a":%s,"b":%s}' % (entry(1), entry(2)),
        '{"__metadata__":{},"a":%s}   ' % entry(1), '{"__metadata__":{"k":"x},y","":"{"},"a":%s}' % entry(1),
        '{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', '{"é {x}:":%s,"\x7f":%s}' % (entry(1), entry(2)),
        '{"a":{"dtype":"F32","shape":[0,10],"data_offsets":[5,5]}}',
    ]
    declined = [
        '{"a":%s,"a":%s}' % (entry(1), entry(2)), '{"__metadata__":{"k":"1","k":"2"},"a":%s}' % entry(1),
        '{"a":%s,"__metadata__":{"k":"1"}}' % entry(1), '{"__metadata__":%s}' % entry(1),
        '{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}', '{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}',
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}',
        '{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', '{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
        '{"a":{"shape":[1],"dtype":"F32","data_offsets":[0,4]}}', '{"a": %s}' % entry(1), ' {"a":%s}' % entry(1),
        '{"a":%s}x' % entry(1), '{"a\tb":%s}' % entry(1), '{"a\\u0041":%s}' % entry(1), "{}", '{"__metadata__":{}}',
        '{"a":%s,}' % entry(1), '{"a":%s' % entry(1),
    ]
    rng = random.Random(1)
    for _ in range(300):
        names = [rng.choice(["a", "b", "c", "__metadata__", "x:{", "é"]) + str(rng.randint(0, 3))
                 for _ in range(rng.randint(1, 6))]
        body = ",".join('"%s":%s' % (n, entry(rng.randint(0, 4), rng.choice(["F32", "BF16", "F99"]))) for n in names)
        if rng.random() < 0.5:
            meta = ",".join('"%s":"%s"' % (rng.choice("kl"), rng.choice(["pt", ":", "a}b", ""]))
                            for _ in range(rng.randint(0, 2)))
            body = '"__metadata__":{%s},' % meta + body
        taken.append("{" + body + "}" + " " * rng.randint(0, 7))
    n_taken = 0
    for text in taken + declined:
        raw = text.encode("utf-8")
        got = _compact_infos(text, 8 + len(raw), p)
        if got is None:
            assert text not in taken[:7], text
            continue
        assert text not in declined, text
        n_taken += 1
        try:
            strict = _strict_infos(raw, p, 8 + len(raw), p)
        except CheckpointError as exc:
            raise AssertionError(f"the compact parse took a header the strict parse refuses: {text} ({exc})")
        assert got == strict and _fast_infos(raw, 8 + len(raw), p) == strict, text
        assert all(type(v) is str for v in got[1].values()), text
    assert n_taken > 40          # the seeded random headers: 46 taken, the rest repeat a name or use F99
    # what the writers produce (padded with spaces) is taken
    from weightdiff.io.safetensors_write import save_file

    save_file(tmp_path / "m.safetensors", {"a.w": ("F32", np.ones((2, 3), np.float32)),
                                           "b.w": ("U8", np.ones(3, np.uint8))}, {"format": "pt"})
    blob = (tmp_path / "m.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert _compact_infos(blob[8:8 + n].decode(), 8 + n, p) == _strict_infos(blob[8:8 + n], p, 8 + n, p)


def test_identical_checkpoints_with_empty_tensors_read_identical(tmp_path, rng):
    # a [0] or [3, 0] tensor holds nothing that could differ: it read "changed" (no share of changed
    # elements to take), so two byte-identical checkpoints read "DERIVED: a fine-tune"
    from weightdiff.comparison import compare

    t = {"w": rng.normal(0, 1, (16, 16)).astype(np.float32), "extra.bias": np.zeros(0, np.float32),
         "empty": np.zeros((3, 0), np.float16)}
    a, b = save_file(tmp_path / "a.safetensors", t), save_file(tmp_path / "b.safetensors", t)
    r = compare(a, b)
    assert r.summary.verdict == "identical"
    assert {x.name: x.status for x in r.tensors} == {"w": "unchanged", "extra.bias": "unchanged", "empty": "unchanged"}


def test_changes_that_are_only_nan_are_inconclusive_not_a_fine_tune(tmp_path, rng):
    # a matrix replaced by NaN read "DERIVED: a fine-tune", relative change 0 (norms skip non-finite values)
    from weightdiff.comparison import compare

    t = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(0, 1, (32, 16)).astype(np.float32) for i in range(3)}
    a = save_file(tmp_path / "a.safetensors", t)
    broken = dict(t)
    broken["model.layers.0.mlp.up_proj.weight"] = np.full((32, 16), np.nan, np.float32)
    r = compare(a, save_file(tmp_path / "nan.safetensors", broken))
    assert r.summary.verdict == "inconclusive"
    assert "nonfinite_changes" in r.summary.flags
    assert "only differences are non-finite values" in r.summary.verdict_reason
    # beside a real change: derived, and the broken tensor is named as not measured
    broken["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"] + np.float32(0.01)
    r = compare(a, save_file(tmp_path / "both.safetensors", broken))
    assert r.summary.verdict == "derived"
    assert "1 of the changed tensors differs only by NaN or infinite values" in r.summary.verdict_reason


@pytest.mark.parametrize("where", ["offset", "shape"])
def test_a_huge_integer_in_a_compact_header_is_one_line(tmp_path, where):
    # the compact-form fast parse converted a 5,000-digit integer itself: Python's int() refused it with an
    # internal error (exit 1) where the strict parse names the problem
    import struct

    from weightdiff.errors import CheckpointError
    from weightdiff.io.safetensors_read import SafetensorsFile

    big = "9" * 5000
    text = ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,%s]}}' if where == "offset" else
            '{"a":{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}}') % big
    h = text.encode()
    h += b" " * (-len(h) % 8)
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(CheckpointError, match="more than 4,300 digits"):
        SafetensorsFile(p)
