"""Hostile inputs, round five: what a mutation campaign found after four rounds (each an internal error or a
confident wrong verdict from a file the contract says gets one line and exit 2, or a measurement).

- A tuned checkpoint whose embedding and one output projection hold values near float32's largest, one of them
  NaN (a shifted GGUF data section did it): the reparametrisation checks fitted a rotation on cross sums that
  were not finite, and LAPACK's SVD failed to converge: "internal error: LinAlgError", exit 1.
- Singular values whose squares underflow (an adapter whose lora_alpha is 1e-320): the stable rank divided 0 by
  0: "internal error: ZeroDivisionError", exit 1.
- A GGUF whose head count is a per-layer list (llama.cpp allows it) or that gives no embedding length: the check
  that k's rows are the KV heads times the head size was skipped, so a wrong head_count_kv un-permuted k into other
  rows and the base's own bytes read "DERIVED: a fine-tune of this base".
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from weightdiff import compare
from weightdiff.cli import main
from weightdiff.kernels.spectral import partial_spectrum_fields, spectrum_fields
from weightdiff.measure.rotation import Rotation


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_values_whose_cross_sums_are_not_finite_fit_no_rotation(tmp_path):
    rng = np.random.default_rng(0)
    h = 16
    base = {}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[f"model.layers.{i}.self_attn.{p}.weight"] = rng.standard_normal((h, h)).astype(np.float32)
        base[f"model.layers.{i}.input_layernorm.weight"] = np.ones(h, np.float32)
    base["model.embed_tokens.weight"] = rng.standard_normal((32, h)).astype(np.float32)
    base["model.norm.weight"] = np.ones(h, np.float32)
    tuned = {k: v.copy() for k, v in base.items()}
    r = np.random.default_rng(1)
    for n in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"):
        w = tuned[n]
        m = r.random(w.shape) < 0.1
        w[m] = (r.standard_normal(m.sum()) * 5e37).astype(np.float32)
    tuned["model.layers.1.self_attn.o_proj.weight"][0, 0] = np.nan
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "out"
    res = _run("compare", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--json", out / "r.json",
               "-q")
    assert res.exit_code == 0, res.output
    d = json.loads((out / "r.json").read_text())
    rows = {t["name"]: t for t in d["tensors"]}
    assert rows["model.layers.1.self_attn.o_proj.weight"]["nonfinite"] == 1
    assert rows["model.embed_tokens.weight"]["status"] == "changed"
    # and the terminal's 1 - cosine of a matrix 1e37 times the base's size is 1 - its cosine, not the 0 that the
    # norms' cancelling squares gave
    from weightdiff.render.terminal import render_text

    text = render_text(d)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("model.embed_tokens.weight"))
    assert "9.9e-1" in line, line


def test_a_rotation_fit_on_sums_that_are_not_finite_is_none():
    fit = Rotation(3)
    fit.add(np.array([[1.0, 0, 0], [0, np.nan, 0], [0, 0, 1.0]]))
    assert fit.solve() is None
    fit = Rotation(2)
    fit.add(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert np.allclose(fit.solve(), [[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize("scale", [1e-160, 1e-170, 1e-250])
def test_rank_fields_of_a_spectrum_whose_squares_underflow_are_those_of_the_scaled_one(scale):
    s = np.array([2.0, 1.0, 0.5, 0.0])
    want, got = spectrum_fields(s, 0.75), spectrum_fields(s * scale, 0.75 * scale)
    for key in ("stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99", "numerical_rank"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    want = partial_spectrum_fields(np.array([2.0, 1.0]), 6.0, 5, 0.75)
    got = partial_spectrum_fields(np.array([2.0, 1.0]) * scale, 6.0 * scale * scale, 5, 0.75 * scale)
    assert got["stable_rank"] is not None and got["numerical_rank"] == want["numerical_rank"]


def test_rank_fields_of_subnormal_singular_values_do_not_divide_by_zero():
    got = spectrum_fields(np.array([2.0, 1.0]) * 5e-320, 1e-320)
    assert got["stable_rank"] is not None and got["numerical_rank"] >= 1


def test_an_adapter_scaled_by_a_subnormal_alpha_is_measured(tmp_path):
    rng = np.random.default_rng(0)
    q = "model.layers.0.self_attn.q_proj"
    save_file({f"{q}.weight": rng.standard_normal((16, 16)).astype(np.float32)}, str(tmp_path / "base.safetensors"))
    ad = tmp_path / "adapter"
    ad.mkdir()
    save_file({f"base_model.model.{q}.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               f"base_model.model.{q}.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 1e-320,
                                                        "target_modules": ["q_proj"]}))
    res = _run("compare", tmp_path / "base.safetensors", ad, "--json", tmp_path / "o" / "r.json", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "r.json").read_text())["summary"]["verdict"]


def _gguf(path, tensors, heads, heads_kv, embedding: int | None):
    gguf = pytest.importorskip("gguf")
    from gguf_build import ARCH, convert

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    if embedding is not None:
        w.add_embedding_length(embedding)
    vt = gguf.GGUFValueType
    if isinstance(heads, list):
        w.add_key_value("llama.attention.head_count", heads, vt.ARRAY, sub_type=vt.UINT32)
    else:
        w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    tmap = gguf.TensorNameMap(ARCH["llama"], 2)
    for name, arr in tensors.items():
        w.add_tensor(tmap.get_name(name, try_suffixes=(".weight",)), convert(name, arr, "llama", 4, None))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("heads,embedding", [([4, 4], 16), (4, None), ([4, 4], None)])
def test_a_wrong_kv_head_count_is_refused_however_the_head_size_is_given(tmp_path, heads, embedding):
    """The file's k rows were permuted for 4 heads of 4; its head_count_kv says 8. With a plain head count and an
    embedding length this was refused; with the count per layer, or no embedding length, it read as a fine-tune."""
    rng = np.random.default_rng(0)
    t = {f"model.layers.{i}.self_attn.{p}.weight": rng.standard_normal((16, 16)).astype(np.float32)
         for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    t["model.embed_tokens.weight"] = rng.standard_normal((32, 16)).astype(np.float32)
    save_file(t, str(tmp_path / "base.safetensors"))
    bad = _gguf(tmp_path / "bad.gguf", t, heads, 8, embedding)
    res = _run("compare", tmp_path / "base.safetensors", bad, "--json", tmp_path / "o" / "r.json", "-q")
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and "bad.gguf" in res.stderr
    assert "16 rows, but the metadata's 8 heads of 4 need 32" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()
    good = _gguf(tmp_path / "good.gguf", t, heads, 4, embedding)
    assert compare(tmp_path / "base.safetensors", good).summary.verdict == "identical"
