"""Hostile-input round 4 (readers): config.json integers past a float beside a GGUF, GGUF dimensions past
2**63 in an empty tensor, ONNX typed values stored one field each and millions of empty nodes, a quadratic
signature regex, QA-LoRA refused by name, GPTQ meta of non-strings, catastrophic compressed-tensors
patterns, a swapped GGUF vocabulary that read IDENTICAL, and LoRA GGUFs stripped of general.type."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.io import onnx_read
from weightdiff.io.safetensors_write import save_file as _save


def save_file(tensors: dict, path: Path) -> None:
    _save(path, tensors)


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, *expect: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# -- GGUF files written byte by byte -----------------------------------------------------------------

def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_f32(key: str, value: float) -> bytes:
    return _s(key) + struct.pack("<If", 6, value)


def _kv_strings(key: str, words: list[str]) -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, 8, len(words)) + b"".join(_s(w) for w in words)


def _ti(name: str, ne: list[int], offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", 0, offset)


def _gguf(path: Path, kvs: list[bytes], tis: list[bytes], data: bytes) -> Path:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tis), len(kvs)) + b"".join(kvs) + b"".join(tis)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


_EMB = np.ones((4, 64), np.float32)
_LLAMA = _kv_str("general.architecture", "llama")


# -- F01: a config.json integer too large for a float ------------------------------------------------

@pytest.mark.parametrize("key, value", [("rope_theta", 10 ** 400), ("rope_theta", -10 ** 400),
                                        ("max_position_embeddings", 10 ** 400 - 1)],
                         ids=["rope_theta", "negative_rope_theta", "max_position_embeddings"])
@pytest.mark.parametrize("gguf_is_base", [True, False])
def test_a_config_integer_past_a_float_is_a_differing_setting_not_a_crash(tmp_path, key, value, gguf_is_base):
    # float(10**400) raised OverflowError in the GGUF metadata comparison: exit 1, "internal error"
    g = _gguf(tmp_path / "m.gguf", [_LLAMA, _kv_f32("llama.rope.freq_base", 10000.0),
                                    _s("llama.context_length") + struct.pack("<II", 4, 4096)],
              [_ti("token_embd.weight", [64, 4], 0)], _EMB.tobytes())
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"model.embed_tokens.weight": _EMB}, hf / "model.safetensors")
    (hf / "config.json").write_text('{"model_type": "llama", "%s": %d}' % (key, value))
    out = tmp_path / "o.json"
    r = run("compare", *((g, hf) if gguf_is_base else (hf, g)), "--json", out, "-q")
    assert r.exit_code == 0, (r.stderr, r.exception)
    doc = json.loads(out.read_text())
    assert "gguf_metadata_differs" in doc["summary"]["flags"]
    want = "llama.rope.freq_base" if key == "rope_theta" else "llama.context_length"
    assert doc["summary"]["scope"]["gguf_metadata_differs"]["keys"] == [want]


# -- F02: an empty GGUF tensor whose other dimensions reach 2**63 -----------------------------------

@pytest.mark.parametrize("ne", [[0, 2 ** 63, 2 ** 63], [0, 2 ** 64 - 1], [2 ** 62, 4, 0]])
@pytest.mark.parametrize("command", ["compare", "inspect"])
def test_a_gguf_dimension_past_int64_is_refused_at_read(tmp_path, ne, command):
    # a 0 dimension makes the tensor hold no byte, so no size check bounded the others: accepted, carried
    # into the report, and --memo then died on the result's own consistency rule (exit 1)
    base = _gguf(tmp_path / "base.gguf", [_LLAMA], [_ti("token_embd.weight", [64, 4], 0)], _EMB.tobytes())
    tuned = _gguf(tmp_path / "tuned.gguf", [_LLAMA], [_ti("token_embd.weight", [64, 4], 0),
                                                      _ti("blk.0.ffn_up.weight", ne, 1024)], _EMB.tobytes())
    out = tmp_path / "o.json"
    args = ("compare", base, tuned, "--json", out, "--memo", tmp_path / "o.html") if command == "compare" \
        else ("inspect", tuned)
    one_error_line(run(*args), "tuned.gguf", "blk.0.ffn_up.weight", "2**63")
    assert not out.exists() and not (tmp_path / "o.html").exists()


def test_an_empty_gguf_tensor_of_ordinary_dimensions_still_reads(tmp_path):
    base = _gguf(tmp_path / "base.gguf", [_LLAMA], [_ti("token_embd.weight", [64, 4], 0)], _EMB.tobytes())
    tuned = _gguf(tmp_path / "tuned.gguf", [_LLAMA], [_ti("token_embd.weight", [64, 4], 0),
                                                      _ti("blk.0.ffn_up.weight", [0, 64], 1024)], _EMB.tobytes())
    r = run("compare", base, tuned, "-q", "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.stderr


# -- F13: a swapped vocabulary ----------------------------------------------------------------------

def _vocab_gguf(path: Path, words: list[str], extra: list[bytes] = ()) -> Path:
    return _gguf(path, [_LLAMA, _kv_strings("tokenizer.ggml.tokens", words), *extra],
                 [_ti("token_embd.weight", [64, 4], 0)], _EMB.tobytes())


def test_a_gguf_with_its_vocabulary_swapped_is_flagged_beside_identical(tmp_path):
    # string arrays were kept as "[4 strings]": a vocabulary of the same size with tokens swapped (another
    # id -> embedding row map, so another model) read IDENTICAL with no flag
    a = _vocab_gguf(tmp_path / "a.gguf", ["<s>", "hello", "world", "!"])
    b = _vocab_gguf(tmp_path / "b.gguf", ["<s>", "world", "hello", "!"])
    same = _vocab_gguf(tmp_path / "same.gguf", ["<s>", "hello", "world", "!"])
    out = tmp_path / "o.json"
    r = run("compare", a, b, "--json", out, "-q")
    assert r.exit_code == 0, r.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["verdict"] == "identical" and "gguf_metadata_differs" in s["flags"]
    assert s["scope"]["gguf_metadata_differs"]["keys"] == ["tokenizer.ggml.tokens"]
    r = run("compare", a, same, "--json", out, "-q")
    s = json.loads(out.read_text())["summary"]
    assert s["verdict"] == "identical" and "gguf_metadata_differs" not in s["flags"]


def test_long_numeric_gguf_arrays_are_compared_by_their_bytes(tmp_path):
    # scores and token types of a real vocabulary hold more than 4,096 numbers: kept as "[N numbers]"
    def scores(v: np.ndarray) -> bytes:
        return _s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, v.size) + v.astype("<f4").tobytes()

    v = np.arange(5000, dtype=np.float32)
    a = _vocab_gguf(tmp_path / "a.gguf", ["x"], [scores(v)])
    w = v.copy()
    w[[0, 1]] = w[[1, 0]]
    b = _vocab_gguf(tmp_path / "b.gguf", ["x"], [scores(w)])
    c = _vocab_gguf(tmp_path / "c.gguf", ["x"], [scores(v)])
    out = tmp_path / "o.json"
    assert run("compare", a, b, "--json", out, "-q").exit_code == 0
    assert json.loads(out.read_text())["summary"]["scope"]["gguf_metadata_differs"]["keys"] == \
        ["tokenizer.ggml.scores"]
    assert run("compare", a, c, "--json", out, "-q").exit_code == 0
    assert "gguf_metadata_differs" not in json.loads(out.read_text())["summary"]["flags"]


# -- F14: a llama.cpp LoRA GGUF without general.type ------------------------------------------------

@pytest.mark.parametrize("keys, evidence", [
    ([_kv_f32("adapter.lora.alpha", 8.0)], "adapter.lora.alpha"),
    ([_kv_str("general.type", "Adapter"), _kv_f32("adapter.lora.alpha", 8.0)], "general.type is `Adapter`"),
    ([], "LoRA factors: `blk.0.attn_q.weight.lora_a`")])
def test_a_lora_gguf_without_general_type_is_refused_as_an_adapter(tmp_path, keys, evidence):
    # read as a model, its factors were "added" tensors: "DERIVED: this base with tensors added and removed;
    # none of its own weights changed", although the adapter changes attn_q
    rng = np.random.default_rng(0)
    emb, q = (rng.normal(0, .02, (64, 64)).astype(np.float32) for _ in range(2))
    a, b = rng.normal(0, .02, (4, 64)).astype(np.float32), rng.normal(0, .02, (64, 4)).astype(np.float32)
    arch = _kv_str("general.architecture", "qwen2")
    base = _gguf(tmp_path / "base.gguf", [arch], [_ti("token_embd.weight", [64, 64], 0),
                                                  _ti("blk.0.attn_q.weight", [64, 64], 16384)],
                 emb.tobytes() + q.tobytes())
    lora = _gguf(tmp_path / "lora.gguf", [arch, *keys],
                 [_ti("token_embd.weight", [64, 64], 0), _ti("blk.0.attn_q.weight.lora_a", [64, 4], 16384),
                  _ti("blk.0.attn_q.weight.lora_b", [4, 64], 16384 + 1024)],
                 emb.tobytes() + a.tobytes() + b.tobytes())
    out = tmp_path / "o.json"
    # llama.cpp refuses it as an adapter too ("expect general.type to be 'adapter'"): refused, never a model
    one_error_line(run("compare", base, lora, "--json", out), "lora.gguf: looks like a llama.cpp adapter", evidence,
                   "not `adapter`", "convert_lora_to_gguf.py")
    assert not out.exists()
    one_error_line(run("inspect", lora), "looks like a llama.cpp adapter")


# -- ONNX: hand-written protobuf ----------------------------------------------------------------------

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wt: int) -> bytes:
    return _varint(num << 3 | wt)


def _ld(num: int, payload) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _key(num, 2) + _varint(len(payload)) + payload


def _vi(num: int, v: int) -> bytes:
    return _key(num, 0) + _varint(v & ((1 << 64) - 1))


def _onnx(path: Path, graph_fields: bytes) -> Path:
    path.write_bytes(_vi(1, 8) + _ld(7, _ld(2, "g") + graph_fields) + _ld(8, _ld(1, "") + _vi(2, 17)))
    return path


def _init(name: str, dims: list[int], dtype: int, values: bytes) -> bytes:
    return _ld(5, b"".join(_vi(1, d) for d in dims) + _vi(2, dtype) + _ld(8, name) + values)


def test_onnx_values_stored_one_field_each_are_bounded_and_named(tmp_path):
    # each unpacked float_data value became a Python tuple before any cap: a 100 MB file took 3.6 GB,
    # then a message blamed "varint fields"
    n = onnx_read.UNPACKED_MAX + 1
    vals = (_key(4, 5) + struct.pack("<f", 0.5)) * n
    p = _onnx(tmp_path / "model.onnx", _init("w", [n], 1, vals))
    one_error_line(run("inspect", p), "model.onnx", f"more than {onnx_read.UNPACKED_MAX:,} tensor values stored one "
                                                    "field each", "unpacked float_data", "raw_data")


def test_onnx_typed_values_unpacked_packed_and_mixed_read_as_stored(tmp_path):
    f = np.array([0.5, -1.25, 3.0, 7.5], np.float32)
    i8 = np.array([-128, -1, 0, 127, 5], np.int8)
    i64 = np.array([-(2 ** 63), -1, 0, 2 ** 63 - 1], np.int64)
    fields = (
        _init("f_unpacked", [4], 1, b"".join(_key(4, 5) + struct.pack("<f", v) for v in f))
        + _init("f_mixed", [4], 1, _ld(4, f[:2].tobytes()) + b"".join(_key(4, 5) + struct.pack("<f", v) for v in f[2:]))
        + _init("i8_unpacked", [5], 3, b"".join(_vi(5, int(v)) for v in i8))
        + _init("i8_packed", [5], 3, _ld(5, b"".join(_varint(int(v) & ((1 << 64) - 1)) for v in i8)))
        + _init("i64_mixed", [4], 7, _ld(7, b"".join(_varint(int(v) & ((1 << 64) - 1)) for v in i64[:3]))
                + _vi(7, int(i64[3])))
        + _init("h_unpacked", [2], 10, _vi(5, 15360) + _vi(5, 16384)))
    m = onnx_read.parse_onnx(_onnx(tmp_path / "model.onnx", fields))
    got = {k: t.held for k, t in m.tensors.items()}
    assert np.array_equal(got["f_unpacked"], f) and np.array_equal(got["f_mixed"], f)
    assert np.array_equal(got["i8_unpacked"], i8) and np.array_equal(got["i8_packed"], i8)
    assert np.array_equal(got["i64_mixed"], i64)
    assert np.array_equal(got["h_unpacked"], np.array([1.0, 2.0], np.float16))


def test_onnx_bool_in_int32_data_reads(tmp_path):
    # np.iinfo(bool) raised ValueError: exit 1 for a valid model
    m = onnx_read.parse_onnx(_onnx(tmp_path / "model.onnx", _init("mask", [3], 9, _ld(5, bytes([1, 0, 1])))))
    assert m.tensors["mask"].held.tolist() == [True, False, True]


@pytest.mark.parametrize("field, wt, why", [(4, 0, "float_data value with wire type 0"),
                                            (5, 5, "int32_data value with wire type 5")])
def test_onnx_a_typed_value_of_the_wrong_wire_type_is_refused(tmp_path, field, wt, why):
    value = _vi(field, 3) if wt == 0 else _key(field, 5) + struct.pack("<f", 1.0)
    one_error_line(run("inspect", _onnx(tmp_path / "model.onnx", _init("w", [1], 1 if field == 4 else 6, value))),
                   why)


def test_onnx_many_empty_nodes_are_capped(tmp_path):
    # 8 M empty NodeProtos in a 16 MB file took 2.75 GB and 70 s, with no cap on the node count
    w = _init("w", [16], 1, _ld(9, np.ones(16, np.float32).tobytes()))
    p = _onnx(tmp_path / "model.onnx", w + _ld(1, b"") * (onnx_read.MAX_NODES + 1))
    one_error_line(run("inspect", p), "model.onnx", f"more than {onnx_read.MAX_NODES:,} nodes")


def test_onnx_graph_signature_is_scanned_in_linear_time():
    # `^\s*...` under re.M: 40,000 newlines took 22 s (quadratic), and the 4 MB cap would take days
    text = "  p_w: PARAMETER target='m.w'\n" + " " * 64 + "\n\t b_x: BUFFER target='m.x'\n" + "\n" * 20_000
    t0 = time.perf_counter()
    got = onnx_read._signature(text)
    assert time.perf_counter() - t0 < 1.0
    assert got == ({"m.w"}, {"m.x"})
    t0 = time.perf_counter()
    assert onnx_read._signature("\n" * (4 << 20)) is None
    assert onnx_read._signature(" " * (4 << 20)) is None
    assert time.perf_counter() - t0 < 3.0


# -- adapters and quantization configs --------------------------------------------------------------

def _lora_pair(tmp_path: Path, extra: dict, a_cols: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base, ad = tmp_path / "base", tmp_path / "ad"
    base.mkdir()
    ad.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": rng.normal(0, .02, (64, 64)).astype(np.float32)},
              base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               rng.normal(0, .02, (4, a_cols)).astype(np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               rng.normal(0, .02, (64, 4)).astype(np.float32)}, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"], **extra}))
    return base, ad


@pytest.mark.parametrize("extra", [{"use_qalora": True, "qalora_group_size": 16}, {"use_qalora": True}])
def test_a_qalora_adapter_is_refused_by_name(tmp_path, extra):
    # A is [r, in / group]: refused as "do not fit the base weight ... (is this adapter for another base model?)"
    base, ad = _lora_pair(tmp_path, extra, 4)
    line = one_error_line(run("compare", base, ad), "adapter_config.json", "use_qalora", "QA-LoRA")
    assert "another base model" not in line


def test_a_qalora_adapter_of_group_one_reads_as_lora(tmp_path):
    # a mean over groups of one column is the identity: plain LoRA
    base, ad = _lora_pair(tmp_path, {"use_qalora": True, "qalora_group_size": 1}, 64)
    r = run("compare", base, ad, "-q", "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("who", [[1, 2], [None], ["GPTQModel:4.0", 7], {"a": 1}])
def test_gptq_meta_quantizer_of_any_json_is_read(who):
    from weightdiff.io.quantized import _minmax_gptq

    assert _minmax_gptq({"quant_method": "gptq", "sym": True, "meta": {"quantizer": who}}) in (True, False)
    assert _minmax_gptq({"meta": {"quantizer": ["gptqmodel:4.0", 7]}}) is True


def _ct_checkpoint(root: Path, module: str, ignore: list) -> Path:
    root.mkdir()
    save_file({f"{module}.weight": np.ones((64, 64), np.int8),
               f"{module}.weight_scale": np.full((64, 1), 0.01, np.float32)}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ignore,
        "config_groups": {"g": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}}}))
    return root


@pytest.mark.parametrize("pattern", ["re:(a+)+$", "re:(a|aa)*$", "re:(.*)*x", "re:(?=(a+)+$)a"])
def test_a_catastrophic_compressed_tensors_pattern_is_refused(tmp_path, pattern):
    # re.match ran the publisher's pattern on the publisher's module names: (a+)+$ on "a" * 32 + "!" took
    # minutes, doubling with each character
    ct = _ct_checkpoint(tmp_path / "ct", "a" * 22 + "!", [pattern])
    t0 = time.perf_counter()
    one_error_line(run("inspect", ct), "config.json", "quantization_config", "catastrophic backtracking")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("pattern, module, hit", [
    ("re:.*lm_head", "lm_head", True),
    ("re:.*mlp.gate$", "model.layers.0.mlp.gate", True),
    ("re:.*mlp.gate$", "model.layers.0.mlp.gate_proj", False),
    (r"re:model.layers.\d+.mlp.experts.*", "model.layers.12.mlp.experts.3.up_proj", True),
    ("re:.*self_attn.(k|v)_proj$", "model.layers.0.self_attn.v_proj", True),
    ("re:vision_tower.*", "model.layers.0.mlp.up_proj", False),
    ("lm_head", "lm_head", True),
    (r"re:(?!.*experts).*Linear", "model.layers.0.mlp.up_proj.Linear", True),
    (r"re:(?!.*experts).*up_proj", "model.layers.0.mlp.experts.1.up_proj", False),
    (r"re:(?!(?:lm_head|model\.embed_tokens)$)(?:.*)", "lm_head", False),
    ("Linear", "model.layers.0.mlp.up_proj", None)])
def test_llm_compressor_patterns_still_match(pattern, module, hit):
    from weightdiff.io.quantized import _ct_target

    assert _ct_target(pattern, module) is hit


def test_a_compressed_tensors_pattern_is_refused_only_when_too_costly_for_the_name():
    from weightdiff.errors import CheckpointError
    from weightdiff.io.quantized import _ct_target

    long = "model.language_model.layers.10.mlp.experts.gate_up_proj." + "x" * 60     # 116 characters
    assert _ct_target(r"re:.*layers\.\d+\.mlp.*", long) is True                        # 3 repetitions
    with pytest.raises(CheckpointError, match="too costly to match against a module name of 60 characters"):
        _ct_target("re:.*a.*a.*a.*a.*b", "a" * 60)        # polynomial, but C(65, 6) = 8e7 tries
