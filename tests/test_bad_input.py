"""Every malformed or hostile input: exit code 2, one stderr line naming the file, no traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.io.safetensors_write import encode, save_checkpoint, save_file


def raw_file(header: dict | bytes, data: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def bad(target: Path | str, expect: str, names: Path | str | None = None) -> str:
    """Run `weightdiff inspect target`, check the failure contract, return the stderr line."""
    parent = Path(target).parent
    before = sorted(os.listdir(parent)) if parent.is_dir() else None
    r = CliRunner().invoke(main, ["inspect", str(target)])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    line = lines[0]
    assert line.startswith("error: ")
    assert str(names if names is not None else target) in line, line
    assert expect in line, line
    if before is not None:
        assert sorted(os.listdir(parent)) == before       # nothing written beside the input
    return line


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_empty_file(tmp_path):
    bad(write(tmp_path / "m.safetensors", b""), "empty file (0 bytes)")


def test_truncated_header(tmp_path):
    bad(write(tmp_path / "m.safetensors", b"\x10\x00\x00"), "file is 3 bytes, too short")


def test_header_length_past_end(tmp_path):
    blob = struct.pack("<Q", 5000) + b'{"a": 1}'
    bad(write(tmp_path / "m.safetensors", blob), "header length 5,000 runs past the end of the file (16 bytes")


def test_absurd_header_length(tmp_path):
    blob = struct.pack("<Q", 2**63 + 5) + b"{}"
    bad(write(tmp_path / "m.safetensors", blob), "exceeds the 100,000,000-byte cap")


def test_100mb_header_refused_without_reading_it(tmp_path):
    path = tmp_path / "m.safetensors"
    n = 100 << 20
    with open(path, "wb") as fh:                      # sparse: 100 MiB of header costs no disk
        fh.write(struct.pack("<Q", n) + b"{")
        fh.truncate(8 + n)
    t0 = time.perf_counter()
    bad(path, "header length 104,857,600 exceeds the 100,000,000-byte cap")
    assert time.perf_counter() - t0 < 5


def test_non_json_header(tmp_path):
    bad(write(tmp_path / "m.safetensors", raw_file(b"{not json}")), "header is not valid JSON")


def test_non_object_header(tmp_path):
    bad(write(tmp_path / "m.safetensors", raw_file(b"[1, 2]")), "header is a JSON list, expected an object")


def test_bad_utf8(tmp_path):
    bad(write(tmp_path / "m.safetensors", raw_file(b'{"\xff\xfe": 1}')),
        "header is not valid UTF-8 (byte 0xff at position 2)")


def test_nan_constant_in_header(tmp_path):
    bad(write(tmp_path / "m.safetensors", raw_file(b'{"a": NaN}')), "NaN is not valid JSON")


def test_offsets_out_of_bounds(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 16)),
        "header declares 4,000 bytes of tensor data but the file holds 16 (truncated download?)")


def test_offsets_inverted(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)), "expected [begin, end]")


def test_overlapping_offsets(tmp_path):
    header = {"a": ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 12)),
        "tensors `a` and `b` overlap (data bytes 4-8)")


def test_gap_between_tensors(tmp_path):
    header = {"a": ENTRY, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 16)),
        "4 data bytes after tensor `a` belong to no tensor")


def test_shape_length_mismatch(tmp_path):
    header = {"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 8]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)),
        "tensor `w` is BF16 [3, 2], which needs 12 bytes, but its data_offsets span 8")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], "2", [[2]]])
def test_bad_shape(tmp_path, shape):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)), "expected a list of non-negative integers")


@pytest.mark.parametrize("shape", [[2.0, 1], [True, 2], [2, 1.0]])
@pytest.mark.parametrize("compact", [True, False])
def test_a_float_or_bool_shape_after_its_integer_twin_is_refused(tmp_path, shape, compact):
    """The header parse checked each distinct shape once, keyed by its tuple: (2.0, 1) and (True, 2) equal (2, 1)
    and (1, 2) as keys, so after an integer twin they were taken (the safetensors library refuses both)."""
    twin = [int(d) for d in shape]
    header = {"a": {"dtype": "F32", "shape": twin, "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": shape, "data_offsets": [8, 16]}}
    text = json.dumps(header, separators=(",", ":") if compact else (", ", ": ")).encode()
    bad(write(tmp_path / "m.safetensors", raw_file(text, b"\0" * 16)), "expected a list of non-negative integers")


def test_packed_dtype_not_whole_bytes(tmp_path):
    header = {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 2)), "12 bits is not a whole number of bytes")


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}
    line = bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)), "tensor `w` has unknown dtype `F12`")
    assert "F8_E4M3FNUZ" in line and "F6_E3M2" in line


def test_missing_entry_key(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2]}}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)), "tensor `w` has no data_offsets")


def test_bad_metadata(tmp_path):
    header = {"__metadata__": {"epoch": 3}, "w": ENTRY}
    bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)), "`__metadata__` must map strings to strings")


def test_duplicate_names(tmp_path):
    h = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
        b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    bad(write(tmp_path / "m.safetensors", raw_file(h, b"\0" * 8)), "header repeats the key `w`")


def test_deeply_nested_json(tmp_path):
    depth = 200_000
    h = b'{"w": ' + b"[" * depth + b"]" * depth + b"}"
    t0 = time.perf_counter()
    bad(write(tmp_path / "m.safetensors", raw_file(h)), "header JSON is nested too deeply")
    assert time.perf_counter() - t0 < 5


def test_trailing_bytes(tmp_path):
    blob = encode({"w": np.ones(2, np.float32)}) + b"junk"
    bad(write(tmp_path / "m.safetensors", blob), "4 trailing bytes after the last tensor's data")


def test_truncated_data(tmp_path):
    blob = encode({"w": np.ones(1000, np.float32)})
    bad(write(tmp_path / "m.safetensors", blob[:-100]),
        "header declares 4,000 bytes of tensor data but the file holds 3,900 (truncated download?)")


def _sharded(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ck", {f"model.layers.{i}.w": np.full(4, i, np.float32) for i in range(3)},
                           shards=3)


def test_missing_shard(tmp_path):
    d = _sharded(tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    bad(d, "shard model-00002-of-00003.safetensors is listed but missing", d / "model.safetensors.index.json")


def test_tensor_missing_from_its_shard(tmp_path):
    d = _sharded(tmp_path)
    save_file(d / "model-00002-of-00003.safetensors", {"other": np.zeros(4, np.float32)})
    bad(d, "tensor `model.layers.1.w` is listed in the index for this shard but the shard does not hold it",
        d / "model-00002-of-00003.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["other"] = "model-00002-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    bad(d, "tensor `model.layers.1.w` is listed in the index for this shard but the shard does not hold it",
        d / "model-00002-of-00003.safetensors")


def test_tensor_in_two_shards(tmp_path):
    d = _sharded(tmp_path)
    save_file(d / "model-00002-of-00003.safetensors", {"model.layers.0.w": np.zeros(4, np.float32),
                                                       "model.layers.1.w": np.zeros(4, np.float32)})
    bad(d, "tensor `model.layers.0.w` is stored in both model-00001-of-00003.safetensors and "
           "model-00002-of-00003.safetensors", d / "model-00002-of-00003.safetensors")


def test_unlisted_shard_of_the_series(tmp_path):
    d = _sharded(tmp_path)
    save_file(d / "model-00004-of-00003.safetensors", {"x": np.zeros(1, np.float32)})
    bad(d, "shard model-00004-of-00003.safetensors is in the folder but not in the index",
        d / "model.safetensors.index.json")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors"])
def test_index_points_outside(tmp_path, target):
    d = _sharded(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.w"] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    bad(d, "outside the checkpoint folder", d / "model.safetensors.index.json")


def test_index_without_weight_map(tmp_path):
    d = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    bad(d, "index has no weight_map object", d / "model.safetensors.index.json")


def test_symlink_loop(tmp_path):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    bad(tmp_path / "a.safetensors", "symlink loop")


def test_symlink_loop_inside_folder(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    bad(d, "symlink loop", d / "model.safetensors")


def test_broken_symlink_shard(tmp_path):
    d = _sharded(tmp_path)
    shard = d / "model-00002-of-00003.safetensors"
    shard.unlink()
    shard.symlink_to("../../blobs/abc")
    bad(d, "broken symlink to ../../blobs/abc (incomplete download?)", shard)


def test_directory_with_no_weights(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    bad(d, "no checkpoint here: expected model.safetensors, model.safetensors.index.json, a .gguf or a .onnx "
           "file (the folder is empty)")
    (d / "config.json").write_text("{}")
    bad(d, "(found config.json)")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    bad(d, "is not a readable ONNX model: the model has no graph", names=d / "model.onnx")


def test_huge_integer_in_a_header_and_one_unclaimed_byte(tmp_path):
    # Python's "use sys.set_int_max_str_digits()" advice leaked into the message; "1 data bytes"
    line = bad(write(tmp_path / "big.safetensors", raw_file(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 +
                                                            b'], "data_offsets": [0, 4]}}', b"\0" * 4)),
               "holds an integer of more than 4,300 digits")
    assert "set_int_max_str_digits" not in line
    bad(write(tmp_path / "gap.safetensors", raw_file({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}},
                                                      b"\0\0")), "1 data byte at the start of the data belongs to no tensor")


def test_missing_path(tmp_path):
    bad(tmp_path / "nope", "no such file or directory")


def test_unreadable_file(tmp_path, monkeypatch):
    path = save_file(tmp_path / "m.safetensors", {"w": np.ones(2, np.float32)})
    if os.geteuid() != 0:
        path.chmod(0)
    else:   # root reads anything: make the open fail as it would for another user
        real_open = os.open

        def deny(p, *a, **kw):
            if Path(p) == path:
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *a, **kw)
        monkeypatch.setattr(os, "open", deny)
    bad(path, "permission denied")


def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    bad(fifo, "is a FIFO, not a regular file")


def test_fifo_as_shard(tmp_path):
    d = _sharded(tmp_path)
    shard = d / "model-00002-of-00003.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    bad(d, "is a FIFO, not a regular file", shard)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    bad(device, "is a character device, not a regular file")


def test_directory_named_like_a_file(tmp_path):
    d = tmp_path / "ck"
    (d / "model.safetensors").mkdir(parents=True)
    bad(d, "is a directory, not a regular file", d / "model.safetensors")


def test_several_safetensors_without_index(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for n in ("a.safetensors", "b.safetensors"):
        save_file(d / n, {"w": np.ones(1, np.float32)})
    bad(d, "2 .safetensors files and no index, so which is the model is ambiguous: a.safetensors, b.safetensors")


def test_control_and_bidi_names_escaped(tmp_path):
    name = "evil\x1b[31m\u202eq\nline"
    header = {name: {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}
    line = bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)),
               "tensor `evil\\x1b[31m\\u202eq\\nline` has unknown dtype")
    assert "\x1b" not in line and "\u202e" not in line


def test_an_onnx_file_is_named_as_such_not_as_a_bad_safetensors_header(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07\x12\x07pytorch" + b"\0" * 64)
    line = bad(p, "is not a readable ONNX model")
    assert "header" not in line


def test_invisible_characters_in_names_are_escaped(tmp_path):
    """A zero-width space (or joiner, soft hyphen, tag character) prints as nothing: a name
    holding one would look like another name."""
    from weightdiff.errors import escape_name, terminal_safe

    name = "q\u200bproj\u00ad\u2060\U000e0041"
    header = {name: {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}
    line = bad(write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8)),
               "tensor `q\\u200bproj\\u00ad\\u2060\\U000e0041` has unknown dtype")
    assert "\u200b" not in line and "\U000e0041" not in line
    assert terminal_safe('{"a\u200d": 1}') == '{"a\\u200d": 1}' and escape_name("plain.name") == "plain.name"


def test_an_error_line_has_a_bounded_length_and_keeps_its_start_and_end(tmp_path):
    """A 70,000-character tensor name (or a shape of 100,000 dimensions) made a 300 KB error line."""
    from weightdiff.errors import LINE_MAX, CheckpointError

    name = "w" * 70_000
    header = {name: {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}
    path = write(tmp_path / "m.safetensors", raw_file(header, b"\0" * 8))
    line = bad(path, "has unknown dtype")
    assert len(line) <= LINE_MAX + 80 and str(path) in line and "characters left out" in line
    e = CheckpointError("f.safetensors", "x" * 5000, "the hint")
    assert str(e).startswith("f.safetensors: xxx") and str(e).endswith("(the hint)") and len(str(e)) < LINE_MAX + 80
    assert str(CheckpointError("f", "short", "h")) == "f: short (h)"


def test_control_chars_in_file_name(tmp_path):
    path = tmp_path / "bad\x1b\u202ename.safetensors"
    path.write_bytes(b"")
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "bad\\x1b\\u202ename.safetensors: empty file" in r.stderr
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr


# -- pickles -------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a marker file (os.system would work the same way)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_payload_is_refused(tmp_path):
    pytest.importorskip("torch")
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=2))
    line = bad(path, "refused: the pickle carries code")
    assert not marker.exists()
    # and through a folder, in a real process: no traceback, marker still absent
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "inspect", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert str(path) in r.stderr and "refused" in r.stderr
    assert not marker.exists()
    assert line.endswith("(it names the global io.open) (convert it to safetensors with a trusted tool)")


@pytest.mark.parametrize("payload", ["benign", "code"])
def test_a_plain_pickle_is_named_for_what_it_is(tmp_path, payload):
    """pickle.dump of protocol 4 or later (not torch.save): refused with torch's "unsupported operand 149", read
    as "carries code" even for a plain dict of tensors; the line now says it is a plain pickle."""
    torch = pytest.importorskip("torch")
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    obj = {"w": torch.zeros(4, 4)} if payload == "benign" else {"w": _Payload(str(marker))}
    path.write_bytes(pickle.dumps(obj, protocol=4))
    line = bad(path, "refused: a plain pickle (protocol 4 or later")
    assert "operand" not in line and "carries code" not in line
    assert not marker.exists()


class _SystemPayload:
    """Pickles as os.system (posix.system), a global of a module torch blocks outright."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_refusal_names_a_blocked_modules_global(tmp_path):
    """torch 2.13 words it "unsupported GLOBAL posix.system whose module posix is blocked":
    the line still names the global and never relays torch's advice to set weights_only=False."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _SystemPayload(str(marker))}, path)
    line = bad(path, "refused: the pickle carries code")
    assert f"(it names the global {os.system.__module__}.system)" in line, line
    assert "weights_only" not in line and "Re-running" not in line
    assert not marker.exists()


@pytest.mark.parametrize("cycle", [1, 2])
def test_a_pickled_dict_that_holds_itself_is_refused_not_looped_on(tmp_path, cycle):
    """``d["model"] = d`` is a legal weights-only pickle (a memo reference): unwrapping {"model": {...}} followed
    the one inner dict forever (100% CPU, no output, no exit)."""
    torch = pytest.importorskip("torch")
    d: dict = {}
    if cycle == 1:
        d["model"] = d
    else:
        d["model"] = {"state_dict": d}
    path = tmp_path / "pytorch_model.bin"
    torch.save(d, path)
    bad(path, "holds no tensors, only dictionaries that contain themselves")


def test_pickle_with_code_payload_in_zip_format(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, path)
    bad(path, "refused: the pickle carries code")
    assert not marker.exists()


def test_pickle_broadcast_view_refused_without_materializing(tmp_path):
    """``ones(1).expand(n, n)`` is a legal weights-only pickle of a few KB whose tensor claims
    n*n*4 bytes: refused naming the tensor, before anything is copied (inspect reads no data)."""
    torch = pytest.importorskip("torch")
    import resource

    path = tmp_path / "pytorch_model.bin"
    torch.save({"model.w": torch.ones(1).expand(4096, 4096), "model.b": torch.ones(3)}, path)
    assert path.stat().st_size < 4096
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    line = bad(path, "tensor `model.w` is a broadcast or overlapping view of 4 bytes of storage")
    assert "67,108,864 bytes; not a plain checkpoint tensor" in line
    assert time.perf_counter() - t0 < 20
    # 64 MiB would be the copy; the peak of this process grows by far less (KiB on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024


def test_pickle_strided_tensor_copied_only_when_read(tmp_path):
    """A transposed (non-contiguous, within its storage) tensor is accepted, read lazily and
    right; the arrays of a pickle are views until one is asked for."""
    torch = pytest.importorskip("torch")
    from weightdiff.io.pickle_read import load_pickle

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "model.pt"
    torch.save({"w": w.t(), "v": w}, path)
    infos, arrays = load_pickle(path)
    assert infos["w"].shape == (4, 3) and sorted(arrays) == ["v", "w"]
    assert np.array_equal(arrays["w"].reshape(4, 3), w.t().numpy())
    assert np.array_equal(arrays["v"].reshape(3, 4), w.numpy())


def test_pickle_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04K\x01.")
    monkeypatch.setitem(sys.modules, "torch", None)
    bad(tmp_path, "install weightdiff[torch]", path)


def test_corrupt_pickle(tmp_path):
    pytest.importorskip("torch")
    bad(write(tmp_path / "model.pt", b"PK\x03\x04garbage"), "not a readable PyTorch checkpoint")


# -- adapters ------------------------------------------------------------------

def test_adapter_config_without_weights(tmp_path):
    # a config without r takes PEFT's default (r = 8, test_hostile_adapters); without weights it is refused
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    bad(d, "adapter folder has adapter_config.json but no adapter_model.safetensors", d)


@pytest.mark.parametrize("config, expect", [
    ('{"peft_type": "LORA", "r": null}', "adapter config has r = None"),
    # PEFT refuses a config without peft_type; it was read as LoRA
    ('{"r": 2, "lora_alpha": 4}', "adapter config has no peft_type"),
])
def test_adapter_config_refused(tmp_path, config, expect):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(config)
    save_file(d / "adapter_model.safetensors", {"base_model.model.l.q.lora_A.weight": np.zeros((2, 3), np.float32),
                                                "base_model.model.l.q.lora_B.weight": np.zeros((3, 2), np.float32)})
    bad(d, expect, d / "adapter_config.json")


def test_adapter_with_no_tensors(tmp_path):
    """An adapter file holding nothing read IDENTICAL, exit 0: a broken save, not a statement about the base."""
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"]}')
    save_file(d / "adapter_model.safetensors", {})
    bad(d, "adapter holds no tensors (its config targets q_proj, v_proj)", d / "adapter_model.safetensors")


def test_adapter_with_one_factor(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    save_file(d / "adapter_model.safetensors",
              {"base_model.model.l.q.lora_A.weight": np.zeros((2, 3), np.float32)})
    bad(d, "LoRA module `base_model.model.l.q` has only one of its A/B factors", d / "adapter_model.safetensors")


def test_real_process_no_traceback(tmp_path):
    """The one-line contract holds outside CliRunner too (real stderr, real exit code)."""
    path = write(tmp_path / "m.safetensors", raw_file(b"[]"))
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "inspect", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"error: {path}: header is a JSON list, expected an object\n"
    assert r.stdout == ""


@pytest.mark.parametrize("filler", [b"[" + b"{}," * 2000 + b"{}]", b"[" + b'"a",' * 2000 + b'"a"]',
                                    b"[" + b"[1]," * 2000 + b"[1]]"])
def test_bulk_nested_json_is_refused_before_it_is_parsed(tmp_path, monkeypatch, filler):
    """Tens of MB of ``[{},{},...]`` (or short strings, or tiny lists) under one key cost an object
    per few bytes: a 93 MB header took 4.4 GB. Checked before parsing (here from 1 KB on)."""
    from weightdiff.io import files

    monkeypatch.setattr(files, "DENSE_CHECK_BYTES", 1024)
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "junk": ' + filler + b"}}"
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    bad(p, "bulk nested data")
    # a header of many ordinary entries passes the same check
    entries = {f"model.layers.{i}.w": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]}
               for i in range(200)}
    text = json.dumps({"__metadata__": {"format": "pt", "note": "[{},{},{}] in a string is text"}, **entries})
    assert len(text) > 1024
    files.load_json(text.encode(), p, "header")


@pytest.mark.parametrize("scale", [1e40, 1e60, 1e300])
def test_float64_values_past_float32_or_float64_squares(tmp_path, scale):
    """Valid F64 weights of 1e40 or more: the rank pass (float32 where its error analysis allows) gave a
    spectrum of infinities, written as nulls and read as "numerical rank 0", and --report refused its own
    result ("should be a number (found a number)"); at 1e300 LAPACK printed to stdout ahead of the JSON.
    Past float32 the rank is not computed, and said so; past what float64 can square, the tensor is bad
    input, named in one line, and nothing is written."""
    a = np.random.default_rng(0).standard_normal((8, 8))
    for name, arr in (("base", a * scale), ("tuned", a * scale * 1.5 + np.eye(8) * scale)):
        write(tmp_path / f"{name}.safetensors",
              raw_file({"w": {"dtype": "F64", "shape": [8, 8], "data_offsets": [0, 512]}}, arr.tobytes()))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compare", "-q", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                                  "--json", str(out / "r.json"), "--report", str(out / "memo.html")])
    if scale < 1e150:
        assert r.exit_code == 0, r.output
        t = json.loads((out / "r.json").read_text())["tensors"][0]
        assert t["rank"] is None and "beyond float32's range (3.4e38): the rank of the change is not computed" in t["note"]
        assert t["cosine"] == pytest.approx(0.966, abs=0.01) and (out / "memo.html").exists()
    else:
        assert r.exit_code == 2 and r.stdout == "" and not out.exists(), r.output
        assert r.stderr.splitlines() == [f"error: {tmp_path / 'base.safetensors'}: tensor `w` holds values too large to "
                                         "measure: the sum of their squares overflows float64 (values of 1e154 or more)"]


def test_a_non_finite_number_is_named_so_by_the_result_validator():
    from weightdiff.render.validate import _kind

    assert (_kind(float("nan")), _kind(float("inf")), _kind(1.5)) == ("nan", "inf", "a number")
