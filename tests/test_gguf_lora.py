"""llama.cpp LoRA adapters in GGUF (convert_lora_to_gguf.py): measured as the factor pairs llama.cpp applies.

The adapters are written as llama.cpp's converter writes them (``gguf_lora.lora_to_gguf``: gguf's writer, the
converter's name map, ``LlamaModel.permute`` on Q/K's B, the experts stacked, ``token_embd``'s A transposed).
The reference is the PEFT adapter the converter read: with the same factors, its records (measured by the
LoRA path, itself checked against PEFT's merge) must be the GGUF adapter's, number for number, against a
Hugging Face base and against the base's own GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gguf
import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file

from conftest import write_checkpoint
from gguf_build import to_gguf
from gguf_lora import Q, lora_to_gguf
from models import llama, moe
from test_hostile_adapters import contract

HEADS, KV = 4, 2
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "num_attention_heads": HEADS, "num_key_value_heads": KV}
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.down_proj": (64, 128)}


def _base(tmp_path, rng, config=True, make=None):
    t = (make or (lambda: llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)))()
    base = write_checkpoint(tmp_path / "base", t)
    if config:
        (base / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return t, base


def _factors(rng, layers=2, embedding=True, head=True):
    out = {}
    for i in range(layers):
        for m, (o, n) in SHAPES.items():
            r = 2 if m == "mlp.down_proj" else 4          # one module of another rank: its own scale
            out[f"model.layers.{i}.{m}"] = (rng.normal(0, .1, (r, n)).astype(np.float32),
                                            rng.normal(0, .1, (o, r)).astype(np.float32))
    if embedding:     # PEFT's lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
        out["model.embed_tokens"] = (rng.normal(0, .1, (4, 96)).astype(np.float32),
                                     rng.normal(0, .1, (64, 4)).astype(np.float32))
    if head:
        out["lm_head"] = (rng.normal(0, .1, (4, 64)).astype(np.float32), rng.normal(0, .1, (96, 4)).astype(np.float32))
    return out


def _peft(d, factors, alpha=8.0, dtype=None):
    """The PEFT adapter the converter read: every module at r = 4 except down_proj (rank_pattern), one alpha."""
    d.mkdir(parents=True, exist_ok=True)
    st = {}
    for m, (a, b) in factors.items():
        a, b = (x if dtype is None else x.astype(dtype) for x in (a, b))
        if m.endswith("embed_tokens"):
            st[f"base_model.model.{m}.lora_embedding_A"], st[f"base_model.model.{m}.lora_embedding_B"] = a, b
        else:
            st[f"base_model.model.{m}.lora_A.weight"], st[f"base_model.model.{m}.lora_B.weight"] = a, b
    save_file(d / "adapter_model.safetensors", st)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in factors})
    ranks = {m.rsplit(".", 1)[-1]: int(a.shape[0]) for m, (a, _) in factors.items()}
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": alpha, "target_modules": leaves,
        "rank_pattern": {k: v for k, v in ranks.items() if v != 4}}))
    return d


def _records(result):
    return {r["name"]: {k: v for k, v in r.items() if k not in ("base_name", "tuned_name")}
            for r in result.to_dict()["tensors"]}


def _same(a, b):
    ra, rb = _records(a), _records(b)
    assert set(ra) == set(rb)
    diff = {n: sorted(k for k in ra[n] if ra[n][k] != rb[n].get(k)) for n in ra if ra[n] != rb[n]}
    assert not diff, diff
    sa, sb = a.to_dict()["summary"], b.to_dict()["summary"]
    assert (sa["verdict"], sa["headline"]) == (sb["verdict"], sb["headline"])


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_a_gguf_lora_reads_as_the_peft_adapter_it_was_converted_from(tmp_path, rng, outtype):
    t, base = _base(tmp_path, rng)
    fac = _factors(rng)
    qtype, dtype = (Q.F32, None) if outtype == "f32" else (Q.F16, np.float16)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV, qtype=qtype)
    peft = _peft(tmp_path / "peft", fac, dtype=dtype)
    want = weightdiff.compare(str(base), str(peft))
    got = weightdiff.compare(str(base), str(lora))
    _same(want, got)
    # against the base's own GGUF (its Q/K un-permuted by its metadata's head counts): the same numbers
    gbase = to_gguf(tmp_path / "base.gguf", t, n_head=HEADS, n_kv=KV)
    _same(want, weightdiff.compare(str(gbase), str(lora)))
    rec = got.tensor("model.layers.1.self_attn.k_proj.weight")
    assert rec.to_dict()["compared"] == "factors" and rec.rank.numerical_rank == 4 and rec.rank.exact
    assert "adapter" in got.to_dict()["summary"]["flags"]


def test_the_rows_of_q_and_k_are_put_back_by_the_base_head_counts(tmp_path, rng):
    """Norms do not see a row permutation; the cosine with the base does. Read with the query's head count for
    the keys (4 where the base has 2), k_proj's B would sit in the wrong rows and its cosine differ."""
    import weightdiff.io.gguf_adapter as ga

    t, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV)
    want = _records(weightdiff.compare(str(base), str(_peft(tmp_path / "peft", fac))))
    doc = dict(LLAMA_CONFIG, num_key_value_heads=HEADS)
    (base / "config.json").write_text(json.dumps(doc))
    got = _records(weightdiff.compare(str(base), str(lora)))
    assert [n for n in want if want[n] != got[n]] == ["model.layers.0.self_attn.k_proj.weight"]
    assert want["model.layers.0.self_attn.k_proj.weight"]["cosine"] != got["model.layers.0.self_attn.k_proj.weight"]["cosine"]
    assert ga.resolve_rows is not None


def test_quantized_factors_read_dequantized(tmp_path, rng):
    """--outtype q8_0: A (rows of 64) in Q8_0, B (rows of r = 4, not whole 32-element blocks) in F16, as the
    converter falls back; measured from the factors gguf's own dequantizer gives."""
    from gguf.quants import dequantize, quantize

    _, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV, qtype=Q.Q8_0)
    seen = {t.name: t.tensor_type for t in gguf.GGUFReader(str(lora)).tensors}
    assert seen["blk.0.attn_q.weight.lora_a"] == Q.Q8_0 and seen["blk.0.attn_q.weight.lora_b"] == Q.F16
    from weightdiff.io.checkpoint import locate
    from weightdiff.measure import precompile

    with locate(lora) as ck:        # its numba dequantizer compiled in a child first, as a GGUF model's
        assert precompile.gguf_keys([ck]) == ["ggml:Q8_0"]
    ref = {m: (dequantize(quantize(a, Q.Q8_0), Q.Q8_0).astype(np.float32), b.astype(np.float16).astype(np.float32))
           for m, (a, b) in fac.items()}
    _same(weightdiff.compare(str(base), str(_peft(tmp_path / "peft", ref))), weightdiff.compare(str(base), str(lora)))


def test_lora_on_stacked_experts_reads_as_each_expert_pair(tmp_path, rng):
    """A Mixtral adapter on the experts: the converter stacks the experts' A's and B's into [experts, r, in] and
    [experts, out, r] (llama.cpp applies them with mul_mat_id); each expert's pair is read back."""
    t = moe(rng, "mixtral", layers=1, hidden=64, inter=64, experts=4, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    (base / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, model_type="mixtral")))
    fac = {}
    for x in range(4):
        for w, (o, n) in (("w1", (64, 64)), ("w2", (64, 64)), ("w3", (64, 64))):
            fac[f"model.layers.0.block_sparse_moe.experts.{x}.{w}"] = (rng.normal(0, .1, (4, n)).astype(np.float32),
                                                                       rng.normal(0, .1, (o, 4)).astype(np.float32))
    fac["model.layers.0.self_attn.q_proj"] = (rng.normal(0, .1, (4, 64)).astype(np.float32),
                                              rng.normal(0, .1, (64, 4)).astype(np.float32))
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV)
    names = {x.name: list(x.shape) for x in gguf.GGUFReader(str(lora)).tensors}
    assert names["blk.0.ffn_up_exps.weight.lora_a"] == [64, 4, 4]          # ne: [in, r, experts]
    want = weightdiff.compare(str(base), str(_peft(tmp_path / "peft", fac)))
    _same(want, weightdiff.compare(str(base), str(lora)))
    gbase = to_gguf(tmp_path / "base.gguf", t, n_head=HEADS, n_kv=KV)
    _same(want, weightdiff.compare(str(gbase), str(lora)))


def test_alpha_zero_or_missing_is_scale_one_as_llama_cpp_reads_it(tmp_path, rng):
    _, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    fac = {m: ab for m, ab in fac.items() if m.endswith(("v_proj", "down_proj"))}
    # alpha = r for every module gives scale 1: a PEFT adapter at alpha = r (4), down_proj at alpha 2
    st = _peft(tmp_path / "peft", fac, alpha=4.0)
    cfg = json.loads((st / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"down_proj": 2}
    (st / "adapter_config.json").write_text(json.dumps(cfg))
    want = weightdiff.compare(str(base), str(st))
    for alpha in (0.0, None):
        lora = lora_to_gguf(tmp_path / f"lora{alpha}.gguf", fac, alpha=alpha, n_head=HEADS, n_kv=KV)
        _same(want, weightdiff.compare(str(base), str(lora)))


def test_norm_weights_are_skipped_as_llama_cpp_skips_them_and_said(tmp_path, rng):
    _, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    norm = {"model.layers.0.input_layernorm.weight": np.full(64, 2.0, np.float32)}
    tokens = ("adapter.alora.invocation_tokens", ([5, 6, 7], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32))
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV, norms=norm,
                        extra=dict([tokens]))
    got = weightdiff.compare(str(base), str(lora))
    _same(weightdiff.compare(str(base), str(_peft(tmp_path / "peft", fac))), got)
    notes = " ".join(got.to_dict()["plan"]["notes"])
    assert "1 norm weight in the adapter (`blk.0.attn_norm.weight`" in notes and "llama.cpp skips them" in notes
    assert "activated LoRA (aLoRA)" in notes and "3-token invocation sequence" in notes


def test_inspect_names_a_llama_cpp_adapter(tmp_path, rng):
    fac = _factors(rng, layers=1, embedding=True, head=False)
    card = {"general.base_model.0.name": "Llama 3.2 1B", "general.base_model.0.organization": "Meta Llama",
            "general.base_model.0.repo_url": "https://huggingface.co/meta-llama/Llama-3.2-1B"}
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV, extra=card)
    r = CliRunner().invoke(main, ["inspect", str(lora)])
    assert r.exit_code == 0, r.output
    assert "llama.cpp LoRA adapter (GGUF)" in r.output
    r0 = r.output
    assert "adapter     llama.cpp LoRA alpha=8 (scale alpha / each module's rank), 6 LoRA factor pairs (ranks 2, 4)" \
        in r.output
    r = CliRunner().invoke(main, ["inspect", str(lora), "--json"])
    doc = json.loads(r.stdout)
    assert doc["format"] == "adapter" and doc["adapter"]["source"] == "llama.cpp"
    assert doc["adapter"]["lora_alpha"] == 8.0 and doc["adapter"]["factors"] == 6
    assert doc["adapter"]["base_model"] == "meta-llama/Llama-3.2-1B" and "base model  meta-llama/Llama-3.2-1B" in r0
    # the model card's base is a claim, reported beside the verdict
    _, base = _base(tmp_path, rng)
    got = weightdiff.compare(str(base), str(lora)).to_dict()
    declared = got["summary"]["declared"]
    assert declared["tuned_declares_base"] == "meta-llama/Llama-3.2-1B"


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    _, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    assert_worker_matches(base, lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV), 5)


# -- refused in one line ------------------------------------------------------------------------------------

def _one(rng):
    return {"model.layers.0.self_attn.q_proj": (rng.normal(0, .1, (4, 64)).astype(np.float32),
                                                rng.normal(0, .1, (64, 4)).astype(np.float32))}


@pytest.mark.parametrize("kw, expect", [
    ({"general_type": None}, "looks like a llama.cpp adapter (metadata `adapter.type`), but its general.type is "
                             "missing, not `adapter`"),
    ({"general_type": "model"}, "but its general.type is `model`"),
    ({"adapter_type": "control_vector"}, "adapter.type is `control_vector`: weightdiff reads LoRA adapters"),
    ({"adapter_type": None}, "adapter.type is missing"),
    ({"alpha": float("nan")}, "adapter.lora.alpha is nan, not a finite number"),
    ({"extra": {"adapter.lora.alpha": "16"}}, "adapter.lora.alpha is '16', not a finite number"),
])
def test_headers_llama_cpp_refuses_are_refused(tmp_path, rng, kw, expect):
    _, base = _base(tmp_path, rng)
    args = dict(alpha=8.0, n_head=HEADS, n_kv=KV)
    if "extra" in kw:
        args["alpha"] = None
    lora = lora_to_gguf(tmp_path / "lora.gguf", _one(rng), **{**args, **kw})
    contract(["compare", str(base), str(lora)], lora, expect, tmp_path)


def _raw(path, tensors, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for name, v in tensors.items():
        w.add_tensor(name, np.asarray(v, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


A4, B4 = np.ones((4, 64)), np.ones((64, 4))


@pytest.mark.parametrize("tensors, expect", [
    ({"blk.0.attn_q.weight.lora_a": A4}, "`blk.0.attn_q.weight.lora_a` has no `.lora_b` beside it"),
    ({"blk.0.attn_q.weight.lora_b": B4}, "`blk.0.attn_q.weight.lora_b` has no `.lora_a` beside it"),
    ({"blk.0.attn_q.weight.lora_a": A4, "blk.0.attn_q.weight.lora_b": B4, "blk.0.attn_q.weight": np.ones((64, 64))},
     "tensor `blk.0.attn_q.weight` of a llama.cpp LoRA adapter is neither a factor"),
    ({"blk.0.attn_q.weight.lora_a": np.ones(64), "blk.0.attn_q.weight.lora_b": B4}, "has 1 dimensions, not 2"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((4, 63)), "blk.0.attn_q.weight.lora_b": B4},
     "do not fit the base weight, which is [64, 64]"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((3, 64)), "blk.0.attn_q.weight.lora_b": B4}, "do not chain"),
    ({"blk.0.attn_q.weight.lora_a": np.full((4, 64), np.nan), "blk.0.attn_q.weight.lora_b": B4}, "NaN"),
    ({"blk.7.attn_q.weight.lora_a": A4, "blk.7.attn_q.weight.lora_b": B4}, "has no weight in the base"),
])
def test_broken_factors_are_refused(tmp_path, rng, tensors, expect):
    _, base = _base(tmp_path, rng)
    lora = _raw(tmp_path / "lora.gguf", tensors)
    contract(["compare", str(base), str(lora)], lora, expect, tmp_path)


def test_a_base_without_head_counts_is_refused_for_q_and_k_only(tmp_path, rng):
    _, base = _base(tmp_path, rng, config=False)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV)
    contract(["compare", str(base), str(lora)], lora, "are in llama.cpp's rotary order, put back in Hugging Face's "
             "by the base's head count, but the base", tmp_path)
    vo = {m: ab for m, ab in fac.items() if not m.endswith(("q_proj", "k_proj"))}
    lora2 = lora_to_gguf(tmp_path / "vo.gguf", vo, alpha=8.0, n_head=HEADS, n_kv=KV)
    _same(weightdiff.compare(str(base), str(_peft(tmp_path / "peft", vo))), weightdiff.compare(str(base), str(lora2)))


def test_a_base_gguf_of_another_architecture_is_refused(tmp_path, rng):
    t, _ = _base(tmp_path, rng)
    gbase = to_gguf(tmp_path / "base.gguf", t, arch="qwen2", n_head=HEADS, n_kv=KV)
    lora = lora_to_gguf(tmp_path / "lora.gguf", _one(rng), alpha=8.0, n_head=HEADS, n_kv=KV)
    contract(["compare", str(gbase), str(lora)], lora, "adapter for architecture `llama`, but the base", tmp_path)


def test_gpt2_conv1d_factors_and_an_adapter_as_base_are_refused(tmp_path, rng):
    lora = _raw(tmp_path / "g.gguf", {"blk.0.attn_qkv.weight.lora_a": np.ones((4, 64)),
                                      "blk.0.attn_qkv.weight.lora_b": np.ones((192, 4))}, arch="gpt2")
    r = CliRunner().invoke(main, ["inspect", str(lora)])
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert str(lora) in r.stderr and "GPT-2's Conv1D weight" in r.stderr and "llama-export-lora" in r.stderr
    _, base = _base(tmp_path, rng)
    ok = lora_to_gguf(tmp_path / "lora.gguf", _one(rng), alpha=8.0, n_head=HEADS, n_kv=KV)
    contract(["compare", str(ok), str(base)], ok, "is a llama.cpp LoRA adapter, not a base model", tmp_path)


def test_a_rerun_from_the_record_cache_gives_the_same_json(tmp_path, rng):
    """--cache keys a record by the bytes it read: a factor's byte range and, for Q/K's B, the head size its rows
    were put back in order by (a base of other head counts reads other values from the same bytes)."""
    _, base = _base(tmp_path, rng)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, alpha=8.0, n_head=HEADS, n_kv=KV)
    docs = []
    for i in range(2):
        r = CliRunner().invoke(main, ["compare", str(base), str(lora), "--cache", str(tmp_path / "c"), "-q",
                                      "--json", str(tmp_path / f"r{i}.json")])
        assert r.exit_code == 0, r.output
        docs.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    assert docs[0]["tensors"] == docs[1]["tensors"]
    (base / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, num_key_value_heads=HEADS)))
    r = CliRunner().invoke(main, ["compare", str(base), str(lora), "--cache", str(tmp_path / "c"), "-q",
                                  "--json", str(tmp_path / "r2.json")])
    assert r.exit_code == 0, r.output
    other = {x["name"]: x for x in json.loads((tmp_path / "r2.json").read_text())["tensors"]}
    k = "model.layers.0.self_attn.k_proj.weight"
    assert other[k]["cosine"] != {x["name"]: x for x in docs[0]["tensors"]}[k]["cosine"]


def test_provenance_refuses_a_gguf_adapter_as_tuned_and_as_a_candidate(tmp_path, rng):
    _, base = _base(tmp_path, rng)
    lora = lora_to_gguf(tmp_path / "lora.gguf", _one(rng), alpha=8.0, n_head=HEADS, n_kv=KV)
    r = CliRunner().invoke(main, ["provenance", str(lora), "--candidates", str(base)])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert "lora.gguf: is a llama.cpp LoRA adapter (a change, not a model's weights)" in r.stderr


def test_an_architecture_converted_without_permutation_needs_no_head_counts(tmp_path, rng):
    """Qwen2's converter leaves Q/K as they are: its adapter reads against a base with no config.json."""
    _, base = _base(tmp_path, rng, config=False)
    fac = _factors(rng, layers=1, embedding=False, head=False)
    lora = lora_to_gguf(tmp_path / "lora.gguf", fac, arch="qwen2", alpha=8.0, n_head=HEADS, n_kv=KV)
    _same(weightdiff.compare(str(base), str(_peft(tmp_path / "peft", fac))), weightdiff.compare(str(base), str(lora)))


def test_an_unmapped_architecture_pairs_with_its_gguf_base_only(tmp_path, rng):
    """An architecture weightdiff has no name map for keeps llama.cpp's names: against that architecture's GGUF it is
    measured; against a Hugging Face base it is refused in one line saying why, not "for another base model"."""
    t, base = _base(tmp_path, rng)
    a, b = rng.normal(0, .1, (4, 64)).astype(np.float32), rng.normal(0, .1, (64, 4)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "mamba9")
    w.add_tensor("blk.0.attn_q.weight", t["model.layers.0.self_attn.q_proj.weight"])
    w.add_tensor("blk.0.attn_v.weight", t["model.layers.0.self_attn.v_proj.weight"])
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    lora = _raw(tmp_path / "lora.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b},
                arch="mamba9")
    got = weightdiff.compare(str(tmp_path / "base.gguf"), str(lora))
    rec = got.tensor("blk.0.attn_q.weight")
    delta = 2.0 * b.astype(np.float64) @ a.astype(np.float64)
    assert rec.to_dict()["compared"] == "factors" and rec.rank.numerical_rank == 4
    assert rec.rank.spectrum[:4] == pytest.approx(list(np.linalg.svd(delta, compute_uv=False)[:4]), rel=1e-9)
    contract(["compare", str(base), str(lora)], lora, "architecture `mamba9`, whose GGUF names weightdiff does not "
             "map back to Hugging Face's", tmp_path)


def test_a_control_vector_is_named_and_refused(tmp_path, rng):
    """llama-cvector-generator's GGUF (architecture `controlvector`, `direction.N`) read INCONCLUSIVE, "a GGUF of an
    architecture weightdiff has no name map for ... the conversion may explain it": it holds no weights at all."""
    _, base = _base(tmp_path, rng)
    w = gguf.GGUFWriter(str(tmp_path / "cv.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 2)
    for i in (1, 2):
        w.add_tensor(f"direction.{i}", np.ones(64, np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    contract(["compare", str(base), str(tmp_path / "cv.gguf")], tmp_path / "cv.gguf",
             "is a llama.cpp control vector for `llama` (general.architecture `controlvector`)", tmp_path)


# -- files from llama.cpp's own tools (tests/data/llamacpp_lora/make.py) ------------------------------------------

REAL = Path(__file__).parent / "data" / "llamacpp_lora"


def test_llama_cpp_own_converter_output_reads_as_the_peft_adapter():
    """convert_lora_to_gguf.py's own output (llama.cpp as vendored in llama-cpp-python 0.3.36) of a PEFT LoRA of a
    transformers Llama (4 heads, 2 KV heads): every record is the PEFT adapter's, against the Hugging Face base; and
    against the base as convert_hf_to_gguf.py writes it (Q/K permuted by its heads), the same numbers."""
    want = weightdiff.compare(str(REAL / "base"), str(REAL / "ad"))
    _same(want, weightdiff.compare(str(REAL / "base"), str(REAL / "lora-f32.gguf")))
    got = {r["name"]: r for r in weightdiff.compare(str(REAL / "base-f32.gguf"), str(REAL / "lora-f32.gguf"))
           .to_dict()["tensors"]}
    ref = {r["name"]: r for r in want.to_dict()["tensors"]}
    assert set(got) == set(ref) and sum(r["status"] == "changed" for r in ref.values()) == 12
    for n, r in ref.items():
        assert {k: got[n][k] for k in ("status", "norm_delta", "cosine", "rel_change", "compared")} == \
            {k: r[k] for k in ("status", "norm_delta", "cosine", "rel_change", "compared")}, n


def test_the_adapter_measures_what_llama_export_lora_merges():
    """llama-export-lora's own merge (W + alpha / r B A, in llama.cpp's row order, float32) against the base GGUF
    reads as the adapter does: the same tensors changed, by the same amounts, to float32's merge round-off."""
    merged = {r.name: r for r in weightdiff.compare(str(REAL / "base-f32.gguf"), str(REAL / "merged-f32.gguf")).tensors}
    lora = {r.name: r for r in weightdiff.compare(str(REAL / "base-f32.gguf"), str(REAL / "lora-f32.gguf")).tensors}
    changed = sorted(n for n, r in merged.items() if r.status == "changed")
    assert len(changed) == 12 and changed == sorted(n for n, r in lora.items() if r.status == "changed")
    assert "model.embed_tokens.weight" in changed           # token_embd's A, stored transposed
    for n in changed:
        assert lora[n].norm_delta == pytest.approx(merged[n].norm_delta, rel=1e-5), n
        assert lora[n].cosine == pytest.approx(merged[n].cosine, abs=1e-6), n
        assert lora[n].rank.numerical_rank == 4


def test_llama_cpp_q8_0_factors_read_dequantized():
    f32 = {r.name: r for r in weightdiff.compare(str(REAL / "base"), str(REAL / "lora-f32.gguf")).tensors}
    q8 = {r.name: r for r in weightdiff.compare(str(REAL / "base"), str(REAL / "lora-q8_0.gguf")).tensors}
    for n, r in f32.items():
        if r.status == "changed":
            assert q8[n].norm_delta == pytest.approx(r.norm_delta, rel=2e-3), n


def test_a_mixtral_expert_lora_measures_what_llama_export_lora_merges():
    """The converter stacks the experts' factors ([in, r, experts]); llama-export-lora merges them into the stacked
    expert weights: each expert's record from the adapter is the merged model's, and the adapter's own records are
    the PEFT adapter's it was converted from."""
    moe_dir = REAL / "moe"
    merged = {r.name: r for r in weightdiff.compare(str(moe_dir / "moe-base.gguf"), str(moe_dir / "moe-merged.gguf"))
              .tensors}
    lora = {r.name: r for r in weightdiff.compare(str(moe_dir / "moe-base.gguf"), str(moe_dir / "moe-lora.gguf"))
            .tensors}
    changed = sorted(n for n, r in merged.items() if r.status == "changed")
    assert len(changed) == 13 and changed == sorted(n for n, r in lora.items() if r.status == "changed")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in changed
    for n in changed:
        assert lora[n].norm_delta == pytest.approx(merged[n].norm_delta, rel=1e-5), n
        assert lora[n].cosine == pytest.approx(merged[n].cosine, abs=1e-6), n
    _same(weightdiff.compare(str(moe_dir / "base"), str(moe_dir / "ad")),
          weightdiff.compare(str(moe_dir / "base"), str(moe_dir / "moe-lora.gguf")))
