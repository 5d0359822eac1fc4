"""Meta / Mistral consolidated checkpoints (``consolidated.safetensors`` / ``consolidated.00.pth`` with
``params.json``) read under Hugging Face names with the query/key rows in Hugging Face's order
(weightdiff.io.meta_layout).

The reference is transformers' own converter: ``permute_for_rope`` and the key map below are
transformers' ``convert_mistral_weights_to_hf.py`` (commit 15ea02a2), which the transformers wheel does
not ship. A consolidated checkpoint and the converter's output of it must read identical, and a
fine-tune published in either layout must measure exactly as the same fine-tune in the other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

import weightdiff  # noqa: E402
from weightdiff.cli import main  # noqa: E402
from weightdiff.io.checkpoint import locate  # noqa: E402
from weightdiff.io.meta_layout import hf_of, interleaved_rows  # noqa: E402


# -- transformers' converter (convert_mistral_weights_to_hf.py), the reference ---------------------
STATE_DICT_MAPPING = {
    r"^output.weight": r"lm_head.weight",
    r"^norm.weight": r"model.norm.weight",
    r"^tok_embeddings.weight": r"model.embed_tokens.weight",
    r"^layers.(\d+).attention_norm.weight": r"model.layers.\1.input_layernorm.weight",
    r"^layers.(\d+).ffn_norm.weight": r"model.layers.\1.post_attention_layernorm.weight",
    r"^layers.(\d+).attention.w(q|k|v|o).weight": r"model.layers.\1.self_attn.\2_proj.weight",
    r"^layers.(\d+).feed_forward.w1.weight": r"model.layers.\1.mlp.gate_proj.weight",
    r"^layers.(\d+).feed_forward.w2.weight": r"model.layers.\1.mlp.down_proj.weight",
    r"^layers.(\d+).feed_forward.w3.weight": r"model.layers.\1.mlp.up_proj.weight",
}


def map_old_key_to_new(old_key):
    for pattern, replacement in STATE_DICT_MAPPING.items():
        new_key, n_replace = re.subn(pattern, replacement, old_key)
        if n_replace > 0:
            return new_key
    raise ValueError(old_key)


def permute_for_rope(tensor, n_heads, dim1, dim2):
    tensor = tensor.view(n_heads, dim1 // n_heads // 2, 2, dim2)
    tensor = tensor.transpose(1, 2)
    tensor = tensor.reshape(dim1, dim2)
    return tensor


def convert_state_dict(original_state_dict, n_heads, n_kv, head_dim, hidden):
    new_dict = {}
    for old_key, tensor in original_state_dict.items():
        new_key = map_old_key_to_new(old_key)
        if "q_proj" in new_key:
            tensor = tensor.view(n_heads, head_dim, hidden).reshape(head_dim * n_heads, hidden)
            tensor = permute_for_rope(tensor, n_heads, head_dim * n_heads, hidden)
        elif "k_proj" in new_key:
            tensor = tensor.view(n_kv, head_dim, hidden).reshape(head_dim * n_kv, hidden)
            tensor = permute_for_rope(tensor, n_kv, head_dim * n_kv, hidden)
        new_dict[new_key] = tensor.contiguous()
    return new_dict


# -- builders ------------------------------------------------------------------------------------------
DIM, HEADS, KV, HEAD_DIM, LAYERS, VOCAB, FFN = 32, 4, 2, 8, 2, 50, 64
PARAMS = {"dim": DIM, "n_layers": LAYERS, "head_dim": HEAD_DIM, "hidden_dim": FFN, "n_heads": HEADS,
          "n_kv_heads": KV, "norm_eps": 1e-5, "vocab_size": VOCAB, "rope_theta": 1e6}


def meta_tensors(seed=0, dim=DIM, heads=HEADS, kv=KV, head_dim=HEAD_DIM, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return (0.05 * torch.randn(*s, generator=g)).to(dtype)

    t = {"tok_embeddings.weight": r(VOCAB, dim), "norm.weight": r(dim), "output.weight": r(VOCAB, dim)}
    for i in range(LAYERS):
        t.update({f"layers.{i}.attention.wq.weight": r(heads * head_dim, dim),
                  f"layers.{i}.attention.wk.weight": r(kv * head_dim, dim),
                  f"layers.{i}.attention.wv.weight": r(kv * head_dim, dim),
                  f"layers.{i}.attention.wo.weight": r(dim, heads * head_dim),
                  f"layers.{i}.feed_forward.w1.weight": r(FFN, dim),
                  f"layers.{i}.feed_forward.w2.weight": r(dim, FFN),
                  f"layers.{i}.feed_forward.w3.weight": r(FFN, dim),
                  f"layers.{i}.attention_norm.weight": r(dim), f"layers.{i}.ffn_norm.weight": r(dim)})
    return t


def write_meta(d: Path, tensors, params=PARAMS, pickle=False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(tensors, d / "consolidated.00.pth")
    else:
        save_file(tensors, str(d / "consolidated.safetensors"))
    if params is not None:
        (d / "params.json").write_text(json.dumps(params))
    return d


def write_hf(d: Path, tensors, heads=HEADS, kv=KV, head_dim=HEAD_DIM, dim=DIM) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(convert_state_dict(tensors, heads, kv, head_dim, dim), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "tie_word_embeddings": False}))
    return d


def fine_tune(tensors, seed=1, names=("layers.1.attention.wq.weight", "layers.0.attention.wk.weight",
                                      "layers.0.feed_forward.w2.weight")):
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for n in names:
        t = out[n].float()
        u, v = torch.randn(t.shape[0], 2, generator=g), torch.randn(2, t.shape[1], generator=g)
        out[n] = (t + 0.002 * u @ v).to(t.dtype if tensors[n].dtype == torch.float32 else tensors[n].dtype)
    return out


def run(*args):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def records(result):
    return {t["name"]: t for t in json.loads(result.to_json())["tensors"]}


# -- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pickle", [False, True], ids=["safetensors", "pth"])
def test_the_converters_output_reads_identical_to_its_input(tmp_path, pickle):
    t = meta_tensors()
    meta = write_meta(tmp_path / "meta", t, pickle=pickle)
    hf = write_hf(tmp_path / "hf", t)
    for a, b in ((hf, meta), (meta, hf)):
        r = weightdiff.compare(str(a), str(b))
        assert r.summary.verdict == "identical", r.summary.reason
        recs = records(r)
        assert all(x["status"] == "unchanged" for x in recs.values())
        assert "model.layers.1.self_attn.q_proj.weight" in recs and len(recs) == len(t)


def test_a_fine_tune_in_meta_layout_measures_as_the_same_fine_tune_converted(tmp_path):
    base, tuned = meta_tensors(), fine_tune(meta_tensors())
    hf_base = write_hf(tmp_path / "hf_base", base)
    hf_tuned = write_hf(tmp_path / "hf_tuned", tuned)
    meta_base = write_meta(tmp_path / "meta_base", base)
    meta_tuned = write_meta(tmp_path / "meta_tuned", tuned)
    want = records(weightdiff.compare(str(hf_base), str(hf_tuned)))
    for a, b in ((hf_base, meta_tuned), (meta_base, hf_tuned), (meta_base, meta_tuned)):
        r = weightdiff.compare(str(a), str(b))
        got = records(r)
        assert got == want, (a.name, b.name)
        assert r.summary.verdict == "derived"
    changed = sorted(n for n, x in want.items() if x["status"] == "changed")
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                       "model.layers.1.self_attn.q_proj.weight"]
    assert all(want[n]["rank"]["numerical_rank"] == 2 for n in changed)


@pytest.mark.parametrize("pickle", [False, True], ids=["safetensors", "pth"])
def test_windows_rows_and_reads_follow_the_converters_order(tmp_path, pickle):
    t = meta_tensors(seed=3, dtype=torch.float32)
    conv = convert_state_dict(t, HEADS, KV, HEAD_DIM, DIM)
    rng = np.random.default_rng(0)
    with locate(write_meta(tmp_path / "m", t, pickle=pickle)) as ck:
        assert set(ck.tensors) == set(conv)
        assert sorted(ck.row_order) == sorted(n for n in conv if "q_proj" in n or "k_proj" in n)
        assert ck.plain_span("model.layers.0.self_attn.q_proj.weight") is None
        for name, want in conv.items():
            want = want.numpy()
            assert np.array_equal(ck.read(name).view(np.float32), want), name
            for size in (1, 7, 31, 64, 1000):
                flat = np.concatenate([w.view(np.float32) for w in ck.windows(name, size)])
                assert np.array_equal(flat, want.reshape(-1)), (name, size)
            part = np.concatenate([w.view(np.float32) for w in ck.windows(name, 13, start=5, stop=want.size - 3)])
            assert np.array_equal(part, want.reshape(-1)[5:want.size - 3])
            rows = rng.integers(0, want.shape[0], 9) if want.ndim == 2 else None
            if rows is not None:
                assert np.array_equal(ck.read_rows(name, rows).view(np.float32), want[rows])
                got = ck.read_rows_many([(name, rows), ("model.embed_tokens.weight", [0, 2])])
                assert np.array_equal(got[0].view(np.float32), want[rows])
        with pytest.raises(IndexError):
            ck.read_rows("model.layers.0.self_attn.k_proj.weight", [KV * HEAD_DIM])


def test_interleaved_rows_inverts_permute_for_rope():
    for heads, hd in ((1, 2), (4, 8), (3, 128)):
        w = torch.arange(heads * hd, dtype=torch.float64)[:, None]
        hf = permute_for_rope(w, heads, heads * hd, 1)[:, 0].numpy().astype(np.int64)
        assert np.array_equal(interleaved_rows(np.arange(heads * hd), hd), hf)


def test_head_dim_other_than_dim_over_heads_and_gqa(tmp_path):
    # Mistral NeMo's shape: head_dim given, not dim / n_heads
    params = dict(PARAMS, head_dim=16)
    t = meta_tensors(head_dim=16)
    tuned = fine_tune(t)
    hf = write_hf(tmp_path / "hf", t, head_dim=16)
    r = weightdiff.compare(str(hf), str(write_meta(tmp_path / "m", tuned, params)))
    want = records(weightdiff.compare(str(hf), str(write_hf(tmp_path / "hf_t", tuned, head_dim=16))))
    assert records(r) == want
    assert want["model.layers.1.self_attn.q_proj.weight"]["shape"] == [64, 32]


def test_config_json_gives_the_heads_when_there_is_no_params_json(tmp_path):
    t = meta_tensors()
    m = write_meta(tmp_path / "m", t, params=None)
    (m / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV,
                                               "hidden_size": DIM, "head_dim": HEAD_DIM}))
    r = weightdiff.compare(str(write_hf(tmp_path / "hf", t)), str(m))
    assert r.summary.verdict == "identical"
    assert any("heads from config.json" in n for n in r.plan["notes"])


def test_without_head_counts_q_and_k_stay_unpaired_and_the_verdict_says_why(tmp_path):
    t = meta_tensors()
    hf = write_hf(tmp_path / "hf", t)
    m = write_meta(tmp_path / "m", t, params=None)
    rc, out, err = run("compare", str(hf), str(m), "--json", str(tmp_path / "o.json"))
    assert rc == 0, err
    d = json.loads((tmp_path / "o.json").read_text())
    s = d["summary"]
    assert s["verdict"] == "inconclusive" and "meta_layout_unmapped" in s["flags"]
    unpaired = sorted(x["name"] for x in d["tensors"] if x["status"] == "added")
    assert unpaired == [f"layers.{i}.attention.w{k}.weight" for i in range(LAYERS) for k in "kq"]
    assert all(x["status"] == "unchanged" for x in d["tensors"] if x["status"] not in ("added", "removed"))
    assert "params.json" in s["verdict_reason"] and "Hugging Face's order" in s["verdict_reason"]
    assert "params.json" in out and "fused" not in out.split("\n")[2]
    # two checkpoints of that layout without params.json still pair every tensor by name
    m2 = write_meta(tmp_path / "m2", fine_tune(t), params=None)
    r = weightdiff.compare(str(m), str(m2))
    assert r.summary.verdict == "derived"
    assert not {x["status"] for x in records(r).values()} & {"added", "removed"}


def test_rope_freqs_of_a_llama2_consolidated_file_is_left_out(tmp_path):
    t = meta_tensors()
    m = write_meta(tmp_path / "m", {**t, "rope.freqs": torch.arange(4, dtype=torch.float32)}, pickle=True)
    r = weightdiff.compare(str(write_hf(tmp_path / "hf", t)), str(m))
    assert r.summary.verdict == "identical"
    assert any("rope.freqs left out" in n for n in r.plan["notes"])


@pytest.mark.parametrize("case, words", [
    ("shard", "one of 2 model-parallel shards"),
    ("heads", "4 heads of 8 need 32"),
    ("string", "`n_heads` is not a positive integer"),
    ("odd", "heads of 7 (odd)"),
    ("list", "is not a JSON object"),
    ("noheads", "gives no `n_heads`"),
    ("width", "is [16, 32], not [16, 64]"),
])
def test_params_that_do_not_describe_the_weights_are_refused_in_one_line(tmp_path, case, words):
    t = meta_tensors()
    params = dict(PARAMS)
    if case == "shard":        # consolidated.00.pth of a 2-way model-parallel release: half of each head split
        t = {k: (v[:v.shape[0] // 2] if re.search(r"w[qkv13]\.", k) else v) for k, v in t.items()}
    elif case == "heads":      # layer 0's query projection has 3 heads' rows, params.json says 4
        t = {**t, "layers.0.attention.wq.weight": t["layers.0.attention.wq.weight"][:24]}
    elif case == "string":
        params["n_heads"] = "4"
    elif case == "odd":
        params["head_dim"] = 7
    elif case == "noheads":
        del params["n_heads"]
    elif case == "width":      # params.json of a wider model
        params["dim"] = 64
    m = write_meta(tmp_path / "m", t, params)
    if case == "list":
        (m / "params.json").write_text("[1, 2]")
    hf = write_hf(tmp_path / "hf", meta_tensors())
    rc, out, err = run("compare", str(hf), str(m), "--json", str(tmp_path / "o.json"))
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "o.json").exists()


def test_a_params_json_linked_from_outside_the_folder_is_refused(tmp_path):
    m = write_meta(tmp_path / "m", meta_tensors(), params=None)
    (tmp_path / "elsewhere.json").write_text(json.dumps(PARAMS))
    os.symlink(tmp_path / "elsewhere.json", m / "params.json")
    rc, _, err = run("compare", str(write_hf(tmp_path / "hf", meta_tensors())), str(m))
    assert rc == 2 and "params.json" in err and err.count("\n") == 1, err


def test_the_cache_keys_the_row_order(tmp_path):
    # the same bytes read with other head counts are other values: a cached record must not serve them
    t = meta_tensors()
    hf = write_hf(tmp_path / "hf", t)
    m = write_meta(tmp_path / "m", t)
    cache = tmp_path / "cache"
    rc, _, err = run("compare", str(hf), str(m), "--cache", str(cache), "--json", str(tmp_path / "a.json"), "-q")
    assert rc == 0, err
    (m / "params.json").write_text(json.dumps(dict(PARAMS, n_heads=2, head_dim=16, n_kv_heads=1)))
    rc, _, err = run("compare", str(hf), str(m), "--cache", str(cache), "--json", str(tmp_path / "b.json"), "-q")
    assert rc == 0, err
    b = {x["name"]: x for x in json.loads((tmp_path / "b.json").read_text())["tensors"]}
    assert b["model.layers.0.self_attn.q_proj.weight"]["status"] == "changed"
    assert b["model.layers.0.self_attn.v_proj.weight"]["status"] == "unchanged"


def test_mixture_of_experts_names_of_mistral_inference():
    assert hf_of("layers.2.feed_forward.gate.weight") == ("model.layers.2.block_sparse_moe.gate.weight", None)
    assert hf_of("layers.2.feed_forward.experts.7.w3.weight") == (
        "model.layers.2.block_sparse_moe.experts.7.w3.weight", None)
    assert hf_of("layers.2.attention.wk.weight") == ("model.layers.2.self_attn.k_proj.weight", "k")
    assert hf_of("vision_encoder.transformer.layers.0.attention.wq.weight") is None
    assert hf_of("layers.0.attention.wq.lora_A.weight") is None


def test_mistrals_one_file_layout_reads_the_hugging_face_file(tmp_path):
    """A Mistral repo of a model that fits one file holds model.safetensors, config.json,
    consolidated.safetensors and params.json: refused as "2 .safetensors files and no index, ambiguous",
    where beside an index the Hugging Face files already won. model.safetensors is read; inspect lists the
    consolidated file as ignored."""
    t = meta_tensors()
    both = write_hf(write_meta(tmp_path / "both", t), t)
    hf = write_hf(tmp_path / "hf", t)
    r = weightdiff.compare(str(hf), str(both))
    assert r.summary.verdict == "identical"
    code, out, err = run("inspect", str(both))
    assert code == 0, err
    assert "consolidated.safetensors (model.safetensors beside it is read)" in out
    tuned = fine_tune(t)
    r = weightdiff.compare(str(hf), str(write_hf(write_meta(tmp_path / "tuned", tuned), tuned)))
    assert r.summary.verdict == "derived" and r.summary.scope["tensors_changed"] == 3
    # any other pair of .safetensors files without an index stays ambiguous
    (both / "consolidated.safetensors").rename(both / "extra.safetensors")
    code, out, err = CliRunner().invoke(main, ["inspect", str(both)]).exit_code, None, None
    assert code == 2
