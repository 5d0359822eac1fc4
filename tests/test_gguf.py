"""GGUF: dequantization against gguf's own dequantizers, llama.cpp names and transforms undone,
pairing with the safetensors base, and hostile files refused in one line."""

from __future__ import annotations

import builtins
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from weightdiff.io.checkpoint import locate  # noqa: E402
from weightdiff.cli import main  # noqa: E402
from weightdiff.comparison import compare  # noqa: E402
from weightdiff.errors import CheckpointError  # noqa: E402
from weightdiff.io import gguf_read  # noqa: E402
from weightdiff.io.gguf_names import ARCHITECTURES, hf_name  # noqa: E402
from weightdiff.pairing.plan import plan  # noqa: E402
from weightdiff.render.sentences import verdict_title  # noqa: E402

from conftest import write_checkpoint  # noqa: E402
from gguf_build import ARCH, permute, raw_gguf, to_gguf  # noqa: E402
from models import gpt2, llama, moe  # noqa: E402
from test_bad_input import bad  # noqa: E402

Q = gguf.GGMLQuantizationType
#: types gguf-py can dequantize (every quant class it defines, plus F32/F16)
DEQUANT = [Q.F32, Q.F16] + sorted(gguf.quants._type_traits, key=lambda t: t.value)
QUANTIZABLE = [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _blocks(rng, q, rows: int, blocks: int) -> np.ndarray:
    """``rows`` rows of ``blocks`` random quant blocks of type ``q`` (raw bytes)."""
    _, ts = gguf.GGML_QUANT_SIZES[q]
    return rng.integers(0, 256, (rows, blocks * ts), dtype=np.uint8)


# -- dequantization: bit-exact against gguf.quants.dequantize ---------------------

@pytest.mark.parametrize("q", DEQUANT, ids=lambda q: q.name)
def test_dequantize_matches_gguf(tmp_path, rng, q, monkeypatch):
    bs, ts = gguf.GGML_QUANT_SIZES[q]
    nb = 2 if bs > 1 else 64
    raw = _blocks(rng, q, 3, nb)
    if q in (Q.F32, Q.F16):
        raw = rng.normal(0, 1, (3, nb)).astype(np.float32 if q == Q.F32 else np.float16)
    path = raw_gguf(tmp_path / "q.gguf", {"blk.0.ffn_up.weight": (raw, q)})
    with np.errstate(all="ignore"):                  # random scales: NaN and Inf are part of the test
        ref = dequantize(raw, q) if raw.dtype == np.uint8 else raw.astype(np.float32)
    monkeypatch.setattr(gguf_read, "DECODE_ELEMENTS", max(1, bs))   # exercise the chunked decode
    with locate(path) as ck:
        name = "model.layers.0.mlp.up_proj.weight"
        info = ck.tensors[name]
        assert info.shape == (3, nb * bs)
        native = q in (Q.F32, Q.F16, Q.BF16)
        assert info.scheme == (None if native else q.name)
        got = ck.read(name)
        if q == Q.F16:
            got = got.astype(np.float32)
        elif q == Q.BF16:
            got = (got.astype(np.uint32) << 16).view(np.float32)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), ref.reshape(info.shape).view(np.uint32))
        # odd windows crossing block and row boundaries give the same values
        flat = np.concatenate([w.copy() for w in ck.windows(name, 37, 5, info.numel - 3)])
        assert np.array_equal(flat.view(np.uint8), ck.read(name).reshape(-1)[5:-3].view(np.uint8))
        rows = ck.read_rows(name, [2, 0, 1, 2])
        assert np.array_equal(rows.view(np.uint8), ck.read(name)[[2, 0, 1, 2]].view(np.uint8))


def test_quantized_by_gguf_reads_back_bit_exact(tmp_path, rng):
    w = rng.normal(0, 0.02, (8, 256)).astype(np.float32)
    for q in QUANTIZABLE:
        data = quantize(w, q)
        path = raw_gguf(tmp_path / f"{q.name}.gguf", {"blk.0.ffn_down.weight": (data, q)})
        with locate(path) as ck:
            got = ck.read("model.layers.0.mlp.down_proj.weight")
            if q == Q.BF16:
                got = (got.astype(np.uint32) << 16).view(np.float32)
            assert np.array_equal(got, dequantize(data, q)), q.name


def test_long_rows_decoded_in_bounded_chunks(tmp_path, rng, monkeypatch):
    data = quantize(rng.normal(0, 1, (2, 4096)).astype(np.float32), Q.Q8_0)
    path = raw_gguf(tmp_path / "long.gguf", {"blk.0.ffn_down.weight": (data, Q.Q8_0)})
    monkeypatch.setattr(gguf_read, "DECODE_ELEMENTS", 100)
    with locate(path) as ck:
        assert np.array_equal(ck.read("model.layers.0.mlp.down_proj.weight"), dequantize(data, Q.Q8_0))


# -- names and transforms --------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_name_tables_agree_with_gguf_tensor_name_map(arch):
    tmap = gguf.TensorNameMap(ARCH[arch], 4)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[ARCH[arch]]}
    for key, hf in ARCHITECTURES[arch].items():
        if key.replace("{}", "{bid}") not in known:
            continue                              # e.g. gemma's `output`: the converter never writes it
        g, h = key.format(2), hf.format(2, x="{x}")
        assert tmap.get_name(h.replace(".{x}", "")) == g, (arch, h)    # experts: the stacked tensor's name
        assert hf_name(arch, g + ".weight", {f"{arch}.attention.head_count": 4}).name == h + ".weight"


def test_unknown_names_and_architectures_kept():
    assert hf_name("llama", "blk.0.weird.weight", {}).name == "blk.0.weird.weight"
    assert hf_name("mamba", "blk.0.attn_q.weight", {}).name == "blk.0.attn_q.weight"


def _llama_pair(tmp_path, rng, qtype=Q.F32, n_kv=2, **kw):
    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    path = to_gguf(tmp_path / f"m-{qtype.name}.gguf", t, "llama", qtype, n_head=4, n_kv=n_kv, layers=2, **kw)
    return t, base, path


def test_llama_gguf_pairs_every_tensor_and_reads_identical(tmp_path, rng):
    t, base, path = _llama_pair(tmp_path, rng)
    with locate(path) as ck, locate(base) as bk:
        assert ck.format == "gguf" and set(ck.tensors) == set(t)
        for name, arr in t.items():
            assert np.array_equal(ck.read(name), arr), name      # un-permuted Q/K included
        p = plan([bk], ck)
        assert {x.kind for x in p.pairs} == {"paired"} and len(p.pairs) == len(t)
        assert "4 Q/K row permutations undone" in ck.metadata["gguf.transforms"]
    assert compare(base, path).summary.verdict == "identical"


@pytest.mark.parametrize("arch", ["smollm3", "granite", "arcee", "mistral3", "llama-embed"])
def test_architectures_converted_as_llama_undo_the_permutation(tmp_path, rng, arch):
    # convert_hf_to_gguf.py converts these through LlamaModel.modify_tensors (permuted Q/K, llama names)
    # under their own general.architecture: unmapped, an unchanged model read DERIVED, "tensors added,
    # removed or changed beyond recognition"
    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    if arch == "arcee":                           # ArceeForCausalLM's MLP is up/down only
        t = {k: v for k, v in t.items() if "gate_proj" not in k}
    base = write_checkpoint(tmp_path / "base", t)
    path = to_gguf(tmp_path / f"{arch}.gguf", t, arch, Q.F32, n_head=4, n_kv=2, layers=2)
    with locate(path) as ck:
        assert set(ck.tensors) == set(t) and "4 Q/K row permutations undone" in ck.metadata["gguf.transforms"]
    r = compare(base, path)
    assert r.summary.verdict == "identical" and "gguf_unmapped" not in r.summary.flags


def test_an_unmapped_architecture_is_inconclusive_never_derived(tmp_path, rng):
    # deci (DeciModel) permutes Q/K as llama does but has no name map: the permuted rows pair with nothing,
    # which read "DERIVED: ... changed beyond recognition" for an unchanged model
    from models import low_rank_update

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    same = to_gguf(tmp_path / "same.gguf", t, "deci", Q.F32, n_head=4, n_kv=2, layers=2)
    r = compare(base, same)
    s = r.summary
    assert s.verdict == "inconclusive" and "gguf_unmapped" in s.flags
    assert s.scope["gguf_unmapped"] == {"architectures": ["deci"]}
    title = verdict_title(s.to_dict())
    assert title.startswith("INCONCLUSIVE") and "`deci`" in title and "no name map" in title
    assert "llama.cpp's names" in s.verdict_reason and "`deci`" in s.verdict_reason
    tuned = dict(t)
    for name in [n for n in t if n.endswith(("o_proj.weight", "v_proj.weight"))]:
        tuned[name] = low_rank_update(rng, t[name], 4, rel=0.05)
    ft = to_gguf(tmp_path / "ft.gguf", tuned, "deci", Q.F32, n_head=4, n_kv=2, layers=2)
    assert compare(base, ft).summary.verdict == "inconclusive"
    # one converter on both sides: llama.cpp's names pair as they are, and a change is a change
    both = compare(same, ft).summary
    assert both.verdict == "derived" and "gguf_unmapped" not in both.flags
    assert compare(same, same).summary.verdict == "identical"


def test_llama_f16_gguf_is_cast_only_and_a_fine_tune_differs(tmp_path, rng):
    t, base, path = _llama_pair(tmp_path, rng, Q.F16)
    assert compare(base, path).summary.verdict == "cast_only"
    tuned = dict(t)
    k = "model.layers.1.self_attn.k_proj.weight"
    tuned[k] = t[k] + rng.normal(0, 0.01, t[k].shape).astype(np.float32)
    ft = to_gguf(tmp_path / "ft.gguf", tuned, "llama", Q.F32, n_head=4, n_kv=2, layers=2)
    r = compare(base, ft)
    assert r.summary.verdict == "derived"
    changed = [x.name for x in r.tensors if x.status == "changed"]
    assert changed == [k]


def test_q8_gguf_windows_equal_dequantized_converter_output(tmp_path, rng):
    t, base, path = _llama_pair(tmp_path, rng, Q.Q8_0)
    with locate(path) as ck:
        name = "model.layers.0.self_attn.q_proj.weight"
        stored = quantize(permute(t[name], 4, 4), Q.Q8_0)
        d = dequantize(stored, Q.Q8_0)                        # undo LlamaModel.permute by hand
        want = d.reshape(4, 8, 2, 64).swapaxes(1, 2).reshape(d.shape)
        assert ck.tensors[name].scheme == "Q8_0"
        assert np.array_equal(ck.read(name), want)
        flat = np.concatenate([w.copy() for w in ck.windows(name, 100)])
        assert np.array_equal(flat, want.reshape(-1))
        assert np.array_equal(ck.read_rows(name, [63, 1, 2]), want[[63, 1, 2]])
        p = plan([locate(base)], ck)
        assert {x.kind for x in p.pairs} == {"paired"}


def test_gpt2_transposed_and_tied_head(tmp_path, rng):
    t = gpt2(rng, layers=2, hidden=32, vocab=50, positions=16)
    base = write_checkpoint(tmp_path / "base", t)
    order = list(t)
    t2 = {**t, "lm_head.weight": t["transformer.wte.weight"]}     # the converter's tied output copy
    path = to_gguf(tmp_path / "g.gguf", t2, "gpt2", Q.F32, n_head=4, layers=2, order=order + ["lm_head.weight"])
    with locate(path) as ck:
        for name, arr in t.items():
            assert ck.tensors[name].shape == arr.shape
            assert np.array_equal(ck.read(name), arr), name
        w = "transformer.h.1.mlp.c_fc.weight"
        assert np.array_equal(np.concatenate([x.copy() for x in ck.windows(w, 77)]), t[w].reshape(-1))
        assert np.array_equal(ck.read_rows(w, [5, 3, 4]), t[w][[5, 3, 4]])
        p = plan([locate(base)], ck)
        assert {x.kind for x in p.pairs} == {"paired"}
        # the converter's output copy is bitwise the embedding: a tied alias, compared once
        assert [a["name"] for a in p.aliases] == ["lm_head.weight"]
    assert compare(base, path).summary.verdict == "identical"


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "qwen2", "phi3"])
def test_other_architectures_read_back_exact(tmp_path, rng, arch):
    h, layers = 32, 2
    t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (40, h)).astype(np.float32),
         "model.norm.weight": rng.normal(0, 0.1, h).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rng.normal(0, 0.1, h).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = rng.normal(0, 0.1, h).astype(np.float32)
        if arch == "phi3":
            t[p + "self_attn.qkv_proj.weight"] = rng.normal(0, 0.02, (3 * h, h)).astype(np.float32)
            t[p + "mlp.gate_up_proj.weight"] = rng.normal(0, 0.02, (4 * h, h)).astype(np.float32)
        else:
            for m in ("q_proj", "k_proj", "v_proj"):
                t[p + f"self_attn.{m}.weight"] = rng.normal(0, 0.02, (h, h)).astype(np.float32)
            t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.02, (2 * h, h)).astype(np.float32)
            t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.02, (2 * h, h)).astype(np.float32)
        if arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = rng.normal(0, 0.02, h).astype(np.float32)
        if arch == "gemma2":
            t[p + "pre_feedforward_layernorm.weight"] = rng.normal(0, 0.1, h).astype(np.float32)
            t[p + "post_feedforward_layernorm.weight"] = rng.normal(0, 0.1, h).astype(np.float32)
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.02, (h, h)).astype(np.float32)
        t[p + "mlp.down_proj.weight"] = rng.normal(0, 0.02, (h, 2 * h)).astype(np.float32)
    base = write_checkpoint(tmp_path / "base", t)
    path = to_gguf(tmp_path / f"{arch}.gguf", t, arch, Q.F32, n_head=4, layers=layers)
    with locate(path) as ck:
        assert set(ck.tensors) == set(t)
        for name, arr in t.items():
            got = ck.read(name)
            if arch.startswith("gemma") and name.endswith("norm.weight"):
                assert np.array_equal(got, (arr + np.float32(1)) - np.float32(1)), name
                assert np.abs(got - arr).max() <= 2 ** -24
            else:
                assert np.array_equal(got, arr), name
        p = plan([locate(base)], ck)
        assert {x.kind for x in p.pairs} == {"paired"}
    if arch.startswith("gemma"):
        assert "norm weights stored as 1 + w restored" in locate(path).metadata["gguf.transforms"]
        # 1 + w in float32, minus 1, does not give back an F32 weight's bits: the cast test reproduces
        # the storage ("5 of 20 tensors changed", derived, for an unchanged model before)
        s = compare(base, path).summary
        assert s.verdict == "cast_only" and "cast_offset" in s.flags, s.verdict_reason
        assert "1 + w as F32" in s.verdict_reason
        from weightdiff.render.sentences import verdict_title
        assert "storing weights as 1 + w" in verdict_title(s.to_dict())
        # a change of one norm still reads derived
        t2 = dict(t)
        t2["model.norm.weight"] = (t["model.norm.weight"] + np.float32(1e-3)).astype(np.float32)
        moved = to_gguf(tmp_path / f"{arch}-ft.gguf", t2, arch, Q.F32, n_head=4, layers=layers)
        s = compare(base, moved).summary
        assert s.verdict == "derived" and s.scope["tensors_changed"] == 1


def test_bf16_gemma_norms_come_back_bitwise(tmp_path, rng):
    """bf16 -> f32 -> +1 -> -1 is exact for |w| >= 2**-16 (the converter adds in float32)."""
    w = rng.normal(0, 0.3, 64).astype(np.float32)
    w = ((w.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)       # bf16 values
    path = raw_gguf(tmp_path / "g.gguf", {"output_norm.weight": (w + np.float32(1), Q.F32)}, arch="gemma")
    with locate(path) as ck:
        assert np.array_equal(ck.read("model.norm.weight"), w)


@pytest.mark.parametrize("qtype", ["I8", "I32", "F64"])
def test_a_gemma_norm_in_a_plain_type_gguf_cannot_decode_is_named_without_upgrade_advice(tmp_path, qtype):
    """A Gemma norm (stored as 1 + w) in an integer or F64 type: bad input, not "upgrade gguf"."""
    dt = {"I8": np.int8, "I32": np.int32, "F64": np.float64}[qtype]
    path = raw_gguf(tmp_path / "g.gguf", {"output_norm.weight": (np.ones(64, dt), getattr(Q, qtype))}, arch="gemma")
    with pytest.raises(CheckpointError) as err:
        with locate(path) as ck:
            ck.read("model.norm.weight")
    assert "1 + w" in str(err.value) and "upgrade" not in str(err.value)


# -- locating --------------------------------------------------------------------

def test_locate_by_magic_and_in_folders(tmp_path, rng):
    _, base, path = _llama_pair(tmp_path, rng)
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(path.read_bytes())
    assert locate(odd).format == "gguf"
    one = tmp_path / "one"
    one.mkdir()
    (one / "model-Q8_0.gguf").write_bytes(path.read_bytes())
    assert locate(one).format == "gguf"
    (one / "mmproj-F16.gguf").write_bytes(path.read_bytes())
    bad(one, "2 .gguf files, so which is the model is ambiguous: mmproj-F16.gguf, model-Q8_0.gguf")
    r = CliRunner().invoke(main, ["compare", str(base), str(path)])
    assert r.exit_code == 0 and "IDENTICAL" in r.stdout
    # a folder's .gguf that is a symlink out of it is refused, as for every other kind (it was followed)
    link = tmp_path / "link"
    link.mkdir()
    os.symlink(path, link / "model.gguf")
    bad(link, "refusing to follow the symlink")
    os.symlink("/etc/hostname", tmp_path / "one" / "zz.gguf")
    (one / "mmproj-F16.gguf").unlink()
    (one / "model-Q8_0.gguf").unlink()
    bad(one, "refusing to follow the symlink")


def test_a_large_power_of_two_alignment_is_read(tmp_path):
    """llama.cpp takes any power of two; a cap at 2**20 refused 2**21 saying "expected a power of two"."""
    blob = _gguf(kv=(("general.architecture", 8, _s("llama")), ("general.alignment", 4, struct.pack("<I", 1 << 21))),
                 data=b"")
    blob += b"\0" * (-len(blob) % (1 << 21)) + b"\0" * 16
    with locate(_write(tmp_path / "big.gguf", blob)) as ck:
        assert ck.read("t.weight").tolist() == [0, 0, 0, 0]
    past = _gguf(kv=(("general.architecture", 8, _s("llama")), ("general.alignment", 4, struct.pack("<I", 1 << 31))))
    bad(_write(tmp_path / "past.gguf", past), "starts past the end of the file")


def test_gguf_named_file_without_magic(tmp_path):
    bad(_write(tmp_path / "m.gguf", b"\x00" * 64), "not a GGUF file (no GGUF magic)")
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "model.gguf", b"GGUX" + b"\x00" * 60)
    bad(d, "not a GGUF file (no GGUF magic)", names=d / "model.gguf")


def test_legacy_ggml_refused(tmp_path):
    bad(_write(tmp_path / "old.bin", b"tjgg" + b"\0" * 64), "legacy llama.cpp GGJT file")


def test_missing_extra_names_it(tmp_path, rng, monkeypatch):
    _, _, path = _llama_pair(tmp_path, rng)
    real = builtins.__import__

    def no_gguf(name, *a, **kw):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("no gguf")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    line = bad(path, "is a GGUF file; reading it needs the gguf package")
    assert "pip install 'weightdiff[gguf]'" in line
    with pytest.raises(CheckpointError):
        locate(path)


# -- hostile files ---------------------------------------------------------------

def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _gguf(tensors=(("t.weight", (4,), 0, 0),), kv=(("general.architecture", 8, _s("llama")),),
          version=3, n_tensors=None, n_kv=None, data: bytes = b"\0" * 16, magic=b"GGUF") -> bytes:
    """A GGUF built field by field: tensors as (name, ne, type, offset), kv as (key, type, value bytes)."""
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kv) if n_kv is None else n_kv)
    for k, t, v in kv:
        out += _s(k) + struct.pack("<I", t) + v
    for name, ne, typ, off in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", typ, off)
    out += b"\0" * (-len(out) % 32)
    return out + data


def test_handmade_gguf_is_valid(tmp_path):
    for version in (2, 3):                      # v2 and v3 share the layout (v3 added big-endian files)
        with locate(_write(tmp_path / f"ok{version}.gguf", _gguf(version=version))) as ck:
            assert list(ck.tensors) == ["t.weight"] and ck.read("t.weight").tolist() == [0, 0, 0, 0]


HOSTILE = {
    "bad_version": (dict(version=7), "unknown GGUF version 7"),
    "big_endian": (dict(version=3 << 24), "big-endian"),
    "version_1": (dict(version=1), "GGUF version 1 is not supported"),
    "absurd_tensor_count": (dict(n_tensors=1 << 60), "header declares 1,152,921,504,606,846,976 tensors"),
    "absurd_kv_count": (dict(n_kv=1 << 40), "metadata entries"),
    "offset_past_eof": (dict(tensors=(("t.weight", (4,), 0, 1 << 40),)), "runs past the end of the"),
    "size_past_eof": (dict(tensors=(("t.weight", (1 << 20,), 0, 0),)), "runs past the end of the"),
    "too_many_dims": (dict(tensors=(("t.weight", (1, 1, 1, 1, 1), 0, 0),)), "has 5 dimensions; GGUF allows at most 4"),
    "unknown_type": (dict(tensors=(("t.weight", (4,), 99, 0),)), "has unknown type 99 (gguf "),
    # a metadata count one short: the last key is read where the first tensor entry belongs
    "kv_count_short": (dict(kv=(("general.name", 8, struct.pack("<Q", 1) + b"x"),
                                ("general.alignment", 4, struct.pack("<I", 32))), n_kv=1),
                       "the header declares 1 metadata entries, but `general.alignment`, a metadata key, follows "
                       "them where the first tensor entry belongs"),
    "q8_k_stored": (dict(tensors=(("t.weight", (256,), 15, 0),), data=b"\0" * 292),
                    "is stored as Q8_K, a type ggml uses only for the activations of its dot products"),
    "misaligned": (dict(tensors=(("t.weight", (2,), 0, 4),)), "not a multiple of the alignment 32"),
    "partial_block": (dict(tensors=(("t.weight", (16,), 8, 0),)), "not a whole number of 32-element blocks"),
    "duplicate": (dict(tensors=(("t.weight", (2,), 0, 0), ("t.weight", (2,), 0, 0))), "appears twice"),
    "overlap": (dict(tensors=(("a.weight", (4,), 0, 0), ("b.weight", (4,), 0, 0))), "overlap"),
    "huge_string": (dict(kv=(("general.name", 8, struct.pack("<Q", 1 << 62)),)), "runs past the end of the file"),
    "huge_array": (dict(kv=(("x", 9, struct.pack("<IQ", 4, 1 << 60)),)), "runs past the end of the file"),
    "unknown_value_type": (dict(kv=(("x", 77, b""),)), "unknown value type 77"),
    "bad_alignment": (dict(kv=(("general.alignment", 4, struct.pack("<I", 3)),)), "expected a power of two"),
    "split": (dict(kv=(("split.count", 2, struct.pack("<H", 3)),)), "part of a GGUF split into 3 files"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf(tmp_path, case):
    kw, expect = HOSTILE[case]
    bad(_write(tmp_path / "m.gguf", _gguf(**kw)), expect)


def test_truncated_gguf_everywhere(tmp_path, rng):
    _, _, path = _llama_pair(tmp_path, rng, Q.Q8_0)
    blob = path.read_bytes()
    for cut in (3, 10, 30, 100, 300, len(blob) // 2, len(blob) - 1):
        line = bad(_write(tmp_path / "cut.gguf", blob[:cut]), "")
        assert "truncated" in line or "too short" in line or "not a GGUF" in line, line


def test_inspect_names_scheme(tmp_path, rng):
    _, _, path = _llama_pair(tmp_path, rng, Q.Q4_0)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0
    assert "GGUF (llama.cpp)" in r.stdout and "Q4_0" in r.stdout and "F32 (dequantized)" in r.stdout
    j = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).stdout)
    assert j["format"] == "gguf" and j["schemes"]["Q4_0"]["tensors"] == 16


def test_benchmark_q4_k_encoder_writes_valid_blocks(tmp_path, rng):
    """benchmarks/bench_gguf.py's round-to-nearest Q4_K encoder: gguf decodes it, error ~ 4-bit."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_gguf import q4_k_quantize

    x = rng.normal(0, 0.02, (16, 512)).astype(np.float32)
    data = q4_k_quantize(x)
    back = dequantize(data, Q.Q4_K)
    assert data.shape == (16, 2 * 144)
    assert 0.02 < np.linalg.norm(back - x) / np.linalg.norm(x) < 0.1
    path = raw_gguf(tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (data, Q.Q4_K)})
    with locate(path) as ck:
        assert np.array_equal(ck.read("model.layers.0.mlp.up_proj.weight"), back)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
def test_numba_dequantizers_bitwise_equal_gguf(rng, name):
    """kernels/ggml.py against gguf.quants on random blocks, with NaN, Inf, subnormal and zero scales."""
    from weightdiff.kernels import ggml

    bs, ts = ggml.BLOCKS[name]
    raw = rng.integers(0, 256, (64, 5 * ts), dtype=np.uint8)
    specials = np.array([np.nan, np.inf, -np.inf, 6e-8, -0.0, 0.0, 65504], np.float16).view(np.uint8).reshape(-1, 2)
    blocks = raw.reshape(-1, ts)
    at = {"Q6_K": [208]}.get(name, [0, 2] if name in ("Q4_K", "Q5_K") else [0])
    for k, sp in enumerate(specials):
        for off in at:
            blocks[k, off:off + 2] = sp
    with np.errstate(all="ignore"):
        ref = dequantize(raw, Q[name])
    got = ggml.dequantize(raw, name)
    assert got.shape == ref.shape == (64, 5 * bs)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert ggml.dequantize(raw[:0], name).shape == (0, 5 * bs)


# -- quantization scheme and noise floor (QuantScheme / floor_windows) --------------

@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K])
def test_floor_bounds_round_to_nearest_and_flags_a_fine_tune(tmp_path, rng, q):
    x = rng.normal(0, 0.02, (24, 512)).astype(np.float32)
    x[3, 7] = 0.2                                                   # an outlier sets one block's scale
    if q == Q.Q4_K:
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        from bench_gguf import q4_k_quantize
        data = q4_k_quantize(x)
    else:
        data = quantize(x, q)
    path = raw_gguf(tmp_path / "f.gguf", {"blk.0.ffn_up.weight": (data, q)})
    name = "model.layers.0.mlp.up_proj.weight"
    with locate(path) as ck:
        info = ck.tensors[name]
        assert (info.quant.format, info.quant.scheme, info.quant.calibrated) == ("gguf", q.name, False)
        assert info.quant.stored == ("blk.0.ffn_up.weight",) and info.nbytes == data.nbytes
        values = ck.read(name)
        fl = np.concatenate([w.copy() for w in ck.floor_windows(name, 1000)]).reshape(x.shape)
        assert np.all(np.abs(x - values) <= fl)                    # quantizing x itself stays within
        tuned = x + 0.01 * rng.normal(0, 1, x.shape).astype(np.float32)   # a fine-tune of half the scale
        assert np.mean(np.abs(tuned - values) > fl) > 0.2
        assert np.all(fl[np.abs(values) > 0] > 0)


def test_floor_windows_follow_the_permutation_and_skip_plain_tensors(tmp_path, rng):
    t, _, path = _llama_pair(tmp_path, rng, Q.Q8_0)
    name = "model.layers.0.self_attn.k_proj.weight"
    with locate(path) as ck:
        values = ck.read(name)
        fl = np.concatenate([w.copy() for w in ck.floor_windows(name, 333)]).reshape(values.shape)
        assert np.all(np.abs(t[name] - values) <= fl)              # HF order, rows un-permuted
        assert ck.floor_windows("model.norm.weight") is None        # stored F32
    iq = raw_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (_blocks(rng, Q.IQ4_NL, 2, 8), Q.IQ4_NL)})
    with locate(iq) as ck:                                          # quantized, floor unknown
        assert ck.tensors["model.layers.0.mlp.up_proj.weight"].quant.scheme == "IQ4_NL"
        assert ck.floor_windows("model.layers.0.mlp.up_proj.weight") is None
    meta = {"quantize.imatrix.file": "x.dat"}
    from weightdiff.io.gguf_floor import scheme_of
    assert scheme_of("Q4_0", 32, 18, 18, "w", meta).calibrated
    assert scheme_of("Q4_K", 256, 144, 144, "w", meta).calibrated       # quantize_row_q4_K_impl: clamps
    assert not scheme_of("Q4_K", 256, 144, 144, "w", {}).calibrated
    assert scheme_of("IQ2_XXS", 256, 66, 66, "w", {}).bits == 2


# -- the verdict: quantizing the base is not fine-tuning ----------------------------

@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0])
def test_gguf_of_the_base_is_quantized_only_and_of_a_fine_tune_derived(tmp_path, rng, q):
    from models import low_rank_update

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    plain = to_gguf(tmp_path / "plain.gguf", t, "llama", q, n_head=4, n_kv=2, layers=2)
    r = compare(base, plain)
    assert r.summary.verdict == "quantized_only"
    tuned = dict(t)
    for name in [n for n in t if n.endswith(("q_proj.weight", "v_proj.weight"))]:
        tuned[name] = low_rank_update(rng, t[name], 4, rel=0.05)
    ft = to_gguf(tmp_path / "ft.gguf", tuned, "llama", q, n_head=4, n_kv=2, layers=2)
    r = compare(base, ft)
    assert r.summary.verdict == "derived"
    moved = {x.name for x in r.tensors if x.status == "changed"}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved)


def test_a_gguf_pair_streams_in_the_quantized_formats_windows(tmp_path, rng, monkeypatch):
    """A quantized side is streamed in an eighth of the plain window (its values and floors come out as float32, a
    block of rows dequantized at a time); a GGUF tensor's scheme sits on its tensor entry, not in a ``quant`` map,
    so GGUF pairs took the plain 16M-element windows, each side's current and next held: a 70B-width pair of Q8_0
    builds peaked at 1,086 MB with its Gram matrix (908 MB now). Every GGUF pair, one side or both, now takes the
    quantized window; a plain pair keeps the plain one."""
    from models import low_rank_update
    from weightdiff.measure import compute

    t = llama(rng, layers=1, hidden=256, inter=512, vocab=96, kv=128)    # MLP matrices past the small-tensor batch
    tuned = {k: (low_rank_update(rng, v, 2, rel=0.05) if v.ndim == 2 else v) for k, v in t.items()}
    base = write_checkpoint(tmp_path / "base", t)
    plain = write_checkpoint(tmp_path / "plain", tuned)
    qb = to_gguf(tmp_path / "b.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=1)
    qt = to_gguf(tmp_path / "t.gguf", tuned, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=1)
    seen: dict = {}
    stream = compute._stream_stats

    def spy(*a, **k):
        seen[a[2]] = a[12] if len(a) > 12 else k.get("window")
        return stream(*a, **k)

    monkeypatch.setattr(compute, "_stream_stats", spy)
    for a, b, quantized in ((base, plain, False), (base, qt, True), (qb, qt, True), (qb, plain, True)):
        seen.clear()
        compare(a, b, rank=False)
        mats = [w for name, w in seen.items() if ".mlp." in name]
        assert mats and all(w == compute.WINDOW_ELEMENTS // (8 if quantized else 1) for w in mats), (a, b, seen)


def test_two_gguf_quantizations_of_one_scheme_whose_codes_moved_are_inconclusive(tmp_path, rng):
    # Q8_0 of a base and Q8_0 of a dense fine-tune of its linears (relative 1e-3), both by gguf's own quantizer:
    # every value within the two floors, and the pair read "QUANTIZED ONLY: explained by quantizing the same
    # weights twice", though Q8_0 rounds to nearest and the same weights give the same codes. Against a Q4_0
    # of the same base (another scheme) it stays quantized only; Q8_0 of the base twice is identical
    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    lin = dict(t)
    for name in [n for n in t if n.endswith("proj.weight")]:
        d = rng.standard_normal(t[name].shape)
        lin[name] = (t[name] + d * 1e-3 * np.linalg.norm(t[name]) / np.linalg.norm(d)).astype(np.float32)
    qb = to_gguf(tmp_path / "b.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2)
    r = compare(qb, to_gguf(tmp_path / "l.gguf", lin, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2), rank=False)
    s = r.summary
    assert s.verdict == "inconclusive" and "quant_both_moved" in s.flags, (s.verdict, s.flags, s.verdict_reason)
    moved = [x.quant for x in r.tensors if (x.quant or {}).get("codes_moved")]
    assert moved and all(q["beyond"] == 0 and q["scheme"] == "Q8_0" for q in moved)
    assert "Q8_0" in s.verdict_reason and "calibration data" in s.verdict_reason
    s = compare(qb, to_gguf(tmp_path / "q4.gguf", t, "llama", Q.Q4_0, n_head=4, n_kv=2, layers=2), rank=False).summary
    assert s.verdict == "quantized_only", (s.verdict, s.flags, s.verdict_reason)
    assert compare(qb, to_gguf(tmp_path / "b2.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2),
                   rank=False).summary.verdict == "identical"
    # one quantizer is the same format, scheme, bits, group and calibration: an importance matrix on one side only
    # is another quantizer, whose codes differ on the same weights
    from weightdiff.io.gguf_floor import scheme_of
    from weightdiff.measure.quant_floor import same_scheme

    plain, im = scheme_of("Q4_K", 256, 144, 144, "w", {}), scheme_of("Q4_K", 256, 144, 144, "w", {"quantize.imatrix.file": "x"})
    assert same_scheme(plain, plain) and same_scheme(im, im) and not same_scheme(plain, im)
    assert not same_scheme(plain, scheme_of("Q6_K", 256, 210, 210, "w", {})) and not same_scheme(plain, None)
    # beside a changed norm: derived, the moved tensors counted as untested for that reason (not "a format whose
    # noise floor weightdiff cannot compute")
    norm = next(n for n in t if n.endswith("norm.weight"))
    lin[norm] = t[norm] * 1.01
    s = compare(qb, to_gguf(tmp_path / "n.gguf", lin, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2), rank=False).summary
    assert s.verdict == "derived" and "quant_both_moved" in s.flags, (s.verdict, s.flags)
    assert "quantized the same way on both sides with codes moved by a step, untested" in s.verdict_reason, \
        s.verdict_reason


def test_two_legacy_schemes_of_a_fine_tune_keep_their_blocks_largest_values(tmp_path, rng):
    """Q4_0 of a base against Q5_0 (or Q4_1, Q8_0) of a dense 1e-2 fine-tune of its linears read "QUANTIZED ONLY":
    a fine-tune's change is far below a 4-bit step, so every value stayed within the two floors. But each legacy
    encoder keeps its block's largest magnitude (d = max / -8, max / -16, amax / 127; min + 15 d), within a scale's
    fp16 rounding: those moved, so derived (``quant.extremes_differ``). The same weights under two schemes, and
    a float32 original against its bf16 copy under two schemes, stay quantized only."""
    from weightdiff.kernels import reference as ref
    from weightdiff.measure.quant_floor import extremes_differ

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    lin = dict(t)
    for name in [n for n in t if n.endswith("proj.weight")]:
        d = rng.standard_normal(t[name].shape)
        lin[name] = (t[name] + d * 1e-2 * np.linalg.norm(t[name]) / np.linalg.norm(d)).astype(np.float32)
    b16 = {k: ref.round_to(v, "BF16").reshape(v.shape).astype(np.float32) for k, v in t.items()}
    g = lambda name, w, q: to_gguf(tmp_path / name, w, "llama", q, n_head=4, n_kv=2, layers=2)
    qb = g("b4_0.gguf", t, Q.Q4_0)
    for q in (Q.Q5_0, Q.Q4_1, Q.Q8_0):
        r = compare(qb, g(f"l{q.name}.gguf", lin, q), rank=False)
        s = r.summary
        assert s.verdict == "derived", (q.name, s.verdict, s.flags, s.verdict_reason)
        moved = [x.quant for x in r.tensors if (x.quant or {}).get("extremes_differ")]
        # (Q8_0's own floor is fine enough to catch the change element by element)
        assert all(m["within"] is False for m in moved) and (moved or q == Q.Q8_0), q.name
    for q, same in ((Q.Q5_0, t), (Q.Q5_0, b16), (Q.Q4_1, b16)):
        s = compare(qb, g(f"s{q.name}{id(same)}.gguf", same, q), rank=False).summary
        assert s.verdict in ("quantized_only", "inconclusive"), (q.name, s.verdict, s.flags)
    # the rule itself: a block's largest magnitude moved beyond both roundings and half a bf16 ulp
    e = (2.0 ** -11, 0.0)
    assert extremes_differ(np.array([1.0, 0.1]), np.array([1.0 + 2 ** -8, 0.0]), e, e, 2) == (0, 1)
    assert extremes_differ(np.array([1.0, 0.1]), np.array([1.0 + 2 ** -7, 0.0]), e, e, 2) == (1, 1)
    assert extremes_differ(np.array([-1.0, 0.1, 0.5]), np.array([0.9, 1.0, 0.5]), e, e, 2) == (0, 2)


def test_two_q4_k_of_one_model_with_and_without_an_importance_matrix_are_not_derived(tmp_path, rng):
    # a Q4_K made with an importance matrix against a plain Q4_K of the same weights (two uploaders' quantizations
    # of one model) read DERIVED: each side's scales were checked against the other side's values, and the
    # importance-matrix side's clamp pulls low-importance extremes inside the weights' range. Those checks cannot
    # be made against such a side: untested, inconclusive. A fine-tune quantized the same way still reads derived
    import ggml_imatrix
    from models import low_rank_update

    t = llama(rng, layers=2, hidden=256, inter=512, vocab=256, kv=128)
    t = {k: (rng.standard_t(2.5, v.shape) * 0.02).astype(np.float32) if v.ndim == 2 else v for k, v in t.items()}

    def imatrix(cols, i):
        return ggml_imatrix.importance(cols, i, zero=0.1)

    im = to_gguf(tmp_path / "im.gguf", t, "llama", Q.Q4_K, n_head=4, n_kv=2, layers=2, imatrix=imatrix)
    plain = to_gguf(tmp_path / "plain.gguf", t, "llama", Q.Q4_K, n_head=4, n_kv=2, layers=2)
    for a, b in ((plain, im), (im, plain)):
        r = compare(a, b, rank=False)
        s = r.summary
        assert s.verdict == "inconclusive", (s.verdict, s.flags, s.verdict_reason)
        assert "importance-matrix quantization" in s.verdict_reason, s.verdict_reason
        assert not any(x.quant.get("scales_beyond_base") for x in r.tensors if x.quant)
    ft = dict(t)
    for name in [n for n in t if n.endswith(("q_proj.weight", "v_proj.weight"))]:
        ft[name] = low_rank_update(rng, t[name], 4, rel=0.05)
    s = compare(im, to_gguf(tmp_path / "ft.gguf", ft, "llama", Q.Q4_K, n_head=4, n_kv=2, layers=2, imatrix=imatrix),
                rank=False).summary
    assert s.verdict == "derived", (s.verdict, s.flags, s.verdict_reason)


def test_a_q4_k_made_with_an_importance_matrix_is_quantized_only_and_a_fine_tune_derived(tmp_path, rng):
    # llama-quantize --imatrix clamps low-importance elements to the end codes many steps past the grid,
    # beyond the reach of the reference search the floor allows: the unchanged base read "DERIVED: a
    # fine-tune ... then quantized" (a tenth of the columns never activated, as unseen channels are)
    import ggml_imatrix

    t = llama(rng, layers=2, hidden=256, inter=512, vocab=256, kv=128)
    t = {k: (rng.standard_t(2.5, v.shape) * 0.02).astype(np.float32) if v.ndim == 2 else v for k, v in t.items()}
    base = write_checkpoint(tmp_path / "base", t)

    def imatrix(cols, i):
        return ggml_imatrix.importance(cols, i, zero=0.1)

    path = to_gguf(tmp_path / "im.gguf", t, "llama", Q.Q4_K, n_head=4, n_kv=2, layers=2, imatrix=imatrix)
    r = compare(base, path)
    clamped = [x.quant["beyond_clamped"] for x in r.tensors if x.quant and x.quant.get("beyond_clamped")]
    assert r.summary.verdict == "quantized_only", [(x.name, x.quant) for x in r.tensors if x.status == "changed"]
    assert clamped, "no element was clamped past the floor: the case this test is about"
    tuned = {k: (v + 1e-2 * v.std() * rng.normal(0, 1, v.shape)).astype(np.float32) if v.ndim == 2 and
             "embed" not in k and "lm_head" not in k else v for k, v in t.items()}
    ft = to_gguf(tmp_path / "ft.gguf", tuned, "llama", Q.Q4_K, n_head=4, n_kv=2, layers=2, imatrix=imatrix)
    r = compare(base, ft)
    assert r.summary.verdict == "derived"
    assert {x.name for x in r.tensors if x.status == "changed"} == {
        k for k, v in t.items() if v.ndim == 2 and "embed" not in k and "lm_head" not in k}


def test_a_vocab_only_gguf_says_it_holds_no_tensors(tmp_path):
    """convert_hf_to_gguf.py --vocab-only (llama.cpp's models/ggml-vocab-*.gguf): no tensors and no
    data padding after the header; it was refused as "truncated download?"."""
    from weightdiff.errors import CheckpointError
    from weightdiff.io.checkpoint import locate

    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<s>", "</s>", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"vocab.gguf: holds no tensors \(a vocab-only GGUF"):
        locate(tmp_path / "vocab.gguf")


@pytest.mark.parametrize("style,arch,shared", [("mixtral", "llama", 0), ("qwen", "qwen2moe", 48),
                                               ("qwen", "qwen3moe", 0)])
def test_stacked_experts_read_as_each_experts_matrix(tmp_path, rng, style, arch, shared):
    # llama.cpp's converter stacks every expert's matrix into blk.N.ffn_{gate,up,down}_exps [experts, m, n]:
    # read back, each expert is the Hugging Face tensor it was stacked from, under its own name, so the
    # GGUF pairs with the safetensors model tensor by tensor
    t = moe(rng, style, shared=shared)
    base = write_checkpoint(tmp_path / "base", t)
    path = to_gguf(tmp_path / "m.gguf", t, arch, Q.F32, n_head=4, n_kv=2, layers=2)
    with locate(path) as ck, locate(base) as bk:
        assert set(ck.tensors) == set(t)
        for name, arr in t.items():
            assert np.array_equal(ck.read(name), arr), name
        w = next(n for n in t if ".experts.2." in n)
        assert np.array_equal(np.concatenate([x.copy() for x in ck.windows(w, 100)]), t[w].reshape(-1))
        assert np.array_equal(ck.read_rows(w, [5, 0, 1]), t[w][[5, 0, 1]])
        assert "6 stacked expert tensors split" in ck.metadata["gguf.transforms"]
        assert {x.kind for x in plan([bk], ck).pairs} == {"paired"}
    assert compare(base, path).summary.verdict == "identical"


def test_one_expert_fine_tuned_in_a_quantized_moe_gguf(tmp_path, rng):
    # a rank-2 change of one expert, in a Q8_0 GGUF: that expert reads changed and low-rank (as one
    # 3-D tensor its rank was capped by the number of experts), the rest within Q8_0's floor
    t = moe(rng, "mixtral", inter=128, hidden=128, kv=64)
    base = write_checkpoint(tmp_path / "base", t)
    q8 = to_gguf(tmp_path / "q8.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2)
    r = compare(base, q8)
    assert r.summary.verdict == "quantized_only"
    tuned = dict(t)
    w = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    u, v = rng.normal(0, 1, (128, 2)), rng.normal(0, 1, (2, 128))
    tuned[w] = (t[w] + 0.2 * np.linalg.norm(t[w]) * (u @ v) / np.linalg.norm(u @ v)).astype(np.float32)
    ft = to_gguf(tmp_path / "ft.gguf", tuned, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2)
    r = compare(base, ft)
    assert r.summary.verdict == "derived"
    changed = [x for x in r.tensors if x.status == "changed"]
    assert [x.name for x in changed] == [w]
    assert changed[0].rank is not None and changed[0].rank.numerical_rank == 2
    rec = {x.name: x for x in r.tensors}
    assert rec["model.layers.1.block_sparse_moe.experts.2.w1.weight"].status == "quantized"


def test_header_that_does_not_describe_the_data_is_refused(tmp_path, rng):
    # a tensor count one short: the last tensor info was taken for padding and every tensor read from
    # shifted bytes ("UNRELATED", exit 0); data appended after the last tensor, or a gap no tensor
    # claims, is refused the same way
    t, base, path = _llama_pair(tmp_path, rng)
    raw = bytearray(path.read_bytes())
    n = struct.unpack_from("<Q", raw, 8)[0]
    short = bytearray(raw)
    struct.pack_into("<Q", short, 8, n - 1)
    bad(_write(tmp_path / "short.gguf", bytes(short)), "not zero padding")
    bad(_write(tmp_path / "tail.gguf", bytes(raw) + b"\0" * 4096), "4,096 bytes after the last tensor belong to no tensor")
    assert compare(base, path).summary.verdict == "identical"        # the file as written reads fine


def test_permuted_tensor_of_zero_dimensions_is_refused(tmp_path):
    path = raw_gguf(tmp_path / "z.gguf", {"blk.0.attn_q.weight": (np.zeros((), np.float32), Q.F32)})
    line = bad(path, "cannot undo llama.cpp's Q/K permutation of a tensor of 0 dimensions")
    assert "blk.0.attn_q.weight" in line


def test_head_counts_that_do_not_describe_the_k_rows_are_refused(tmp_path, rng, monkeypatch):
    """A Llama GGUF whose metadata lacks head_count_kv (2 KV heads of 16, stored permuted per those heads):
    the fallback to head_count (4) split k's 32 rows into 4 heads of 8 and the un-permuted k read "changed"
    though its bytes are the base's. The metadata's head size (embedding_length / head_count) says 4 heads
    need 64 rows: bad input, as llama.cpp refuses it."""
    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, n: None)
    path = to_gguf(tmp_path / "nokv.gguf", t, "llama", Q.F32, n_head=4, n_kv=2, layers=2,
                   extra={"llama.embedding_length": 64})
    line = bad(path, "32 rows, but the metadata's 4 heads of 16 need 64 (head_count_kv missing or wrong?)")
    assert "blk.0.attn_k.weight" in line
    monkeypatch.undo()
    good = to_gguf(tmp_path / "kv.gguf", t, "llama", Q.F32, n_head=4, n_kv=2, layers=2,
                   extra={"llama.embedding_length": 64})
    assert compare(base, good).summary.verdict == "identical"


def test_a_metadata_array_past_the_string_cap_is_refused_before_it_is_walked(tmp_path):
    """2^24 empty strings in one array (134 MB, sparse on disk) were walked one by one (~25 s) before the
    refusal; the cap is 2^22 items, checked before any is walked."""
    from weightdiff.io import gguf_header

    n = gguf_header.MAX_STRINGS + 1
    head = bytearray(b"GGUF") + struct.pack("<IQQ", 3, 0, 1)
    key = b"tokenizer.ggml.tokens"
    head += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, n)
    p = tmp_path / "strings.gguf"
    with open(p, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + 8 * n)            # n zero-length strings: a sparse file
    bad(p, f"metadata arrays hold over {gguf_header.MAX_STRINGS:,} items")


@pytest.mark.parametrize("kind", ["lora", "alora", None])
def test_a_llama_cpp_adapter_is_measured_or_refused_in_one_line(tmp_path, rng, kind):
    # convert_lora_to_gguf.py writes general.type `adapter` and the factors: it read INCONCLUSIVE "the names do
    # not match ...; map the names with --rename FROM=TO", which no renaming helps. A LoRA one is measured as
    # llama.cpp applies it (tests/test_gguf_lora.py); another adapter.type is refused, as llama.cpp refuses it
    t = llama(rng, layers=1, hidden=64, inter=128, vocab=96)
    base = write_checkpoint(tmp_path / "base", t)
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    w = gguf.GGUFWriter(str(tmp_path / "lora.gguf"), "llama")
    w.add_string("general.type", "adapter")
    if kind:
        w.add_string("adapter.type", kind)
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", rng.normal(0, 0.01, (8, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", rng.normal(0, 0.01, (64, 8)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(base), str(tmp_path / "lora.gguf"), "--json", str(out), "-q"])
    if kind == "lora":
        assert r.exit_code == 0, r.output
        rec = next(x for x in json.loads(out.read_text())["tensors"] if x["status"] == "changed")
        assert rec["name"] == "model.layers.0.self_attn.q_proj.weight" and rec["compared"] == "factors"
        return
    assert r.exit_code == 2 and not out.exists()
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in r.output
    shown = {"alora": "`alora`", None: "missing"}[kind]
    assert f"lora.gguf: is a llama.cpp adapter whose adapter.type is {shown}: weightdiff reads LoRA" in line
    assert "llama-export-lora" in line and "--rename" not in line


def test_identical_weights_with_other_inference_metadata_say_so(tmp_path, rng):
    # a long-context re-release changes the RoPE base and the context length, not a weight: it read
    # "IDENTICAL: every tensor is bitwise equal to the base" with no word of either
    t, base, path = _llama_pair(tmp_path, rng)
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 10000.0,
                                                   "max_position_embeddings": 4096}))
    same = to_gguf(tmp_path / "same.gguf", t, "llama", Q.F32, n_head=4, n_kv=2, layers=2,
                   extra={"llama.rope.freq_base": 10000, "llama.context_length": 4096})
    long = to_gguf(tmp_path / "long.gguf", t, "llama", Q.F32, n_head=4, n_kv=2, layers=2,
                   extra={"llama.rope.freq_base": 1000000, "llama.context_length": 32768,
                          "tokenizer.chat_template": "{{ messages }}", "general.name": "renamed"})
    s = compare(same, long).summary
    assert s.verdict == "identical" and "gguf_metadata_differs" in s.flags
    assert s.scope["gguf_metadata_differs"] == {
        "keys": ["llama.context_length", "llama.rope.freq_base", "tokenizer.chat_template"]}   # not general.name
    title = verdict_title(s.to_dict())
    assert title.startswith("IDENTICAL") and "`llama.rope.freq_base`" in title and "may not compute" in title
    r = compare(base, long)                        # config.json's rope_theta against the GGUF's
    assert r.summary.verdict == "identical"
    assert r.summary.scope["gguf_metadata_differs"] == {"keys": ["llama.rope.freq_base", "llama.context_length"]}
    assert any("`llama.rope.freq_base` `10000.0` in the base, `1000000` in the tuned model" in n
               for n in r.plan["notes"])
    for a, b in ((base, same), (same, same)):
        s = compare(a, b).summary
        assert s.verdict == "identical" and "gguf_metadata_differs" not in s.flags


def test_a_format_without_a_floor_beside_one_with_is_named_alone_and_counted_apart(tmp_path, rng):
    # layer 1 in MXFP4 (no floor), layer 0 in Q8_0 (tested): the reason said "a format whose noise floor
    # weightdiff cannot compute (MXFP4, Q8_0)", and a fine-tune's "N more stand within their quantization
    # noise floor" counted the untested MXFP4 tensors among them
    from models import low_rank_update

    t, base, _ = _llama_pair(tmp_path, rng)
    mix = {"blk.1.": Q.MXFP4}
    tuned = {k: (v + 0.02 * v.std() * rng.normal(0, 1, v.shape)).astype(np.float32)
             if ".layers.1." in k and v.ndim == 2 else v for k, v in t.items()}
    layer1 = to_gguf(tmp_path / "l1.gguf", tuned, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2, types=mix)
    s = compare(base, layer1).summary
    assert s.verdict == "inconclusive" and "quant_untested" in s.flags
    assert "cannot compute (MXFP4)," in s.verdict_reason
    tuned = dict(t)
    for name in [n for n in t if n.endswith(("q_proj.weight", "v_proj.weight")) and ".layers.0." in n]:
        tuned[name] = low_rank_update(rng, t[name], 4, rel=0.05)
    r4 = to_gguf(tmp_path / "r4.gguf", tuned, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2, types=mix)
    s = compare(base, r4).summary
    assert s.verdict == "derived" and s.scope["within_quant_floor"]["untested"] == 7
    assert "7 more stand within their quantization noise floor" in s.verdict_reason     # embed, head, 5 of layer 0
    assert "7 more are quantized in a format whose noise floor weightdiff cannot compute" in s.verdict_reason


def test_two_roundings_of_one_original_across_a_gguf_are_a_cast(tmp_path, rng):
    """A bf16 copy of a model stored as float32 against a GGUF of its float16 copy stored as F32: both sides rounded,
    each through its own dtype, which only the whole-model witness admits. The GGUF reader gives the Hugging Face
    names, so the witness finds the pair's other tensors: CAST ONLY, both sides' roundings named; the same files
    with the GGUF side fine-tuned by 1e-3 first stay derived."""
    from weightdiff.kernels import reference as ref

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)

    def routed(tensors, via):
        return {k: ref.chain_apply(v, "F32", (via,)).astype(np.float32).reshape(v.shape) for k, v in tensors.items()}

    base = write_checkpoint(tmp_path / "bf16-as-f32", routed(t, "BF16"))
    path = to_gguf(tmp_path / "f16-as-f32.gguf", routed(t, "F16"), "llama", Q.F32, n_head=4, n_kv=2, layers=2)
    r = compare(base, path, rank=False)
    assert r.summary.verdict == "cast_only", (r.summary.verdict, r.summary.flags)
    assert "cast_both_rounded" in r.summary.flags
    q = r.tensor("model.layers.1.mlp.up_proj.weight")
    assert q.status == "rounding" and q.cast["vias"] == {"base": ["BF16"], "tuned": ["F16"]}, q.cast
    moved = {k: (v * (1 + 1e-3 * rng.standard_normal(v.shape))).astype(np.float32) for k, v in t.items()}
    ft = to_gguf(tmp_path / "ft.gguf", routed(moved, "F16"), "llama", Q.F32, n_head=4, n_kv=2, layers=2)
    assert compare(base, ft, rank=False).summary.verdict == "derived"
