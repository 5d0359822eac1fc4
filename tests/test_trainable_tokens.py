"""PEFT's trainable tokens (a LoRA's ``trainable_token_indices``, a TRAINABLE_TOKENS adapter): the rows they train
replace the table's rows as PEFT's merge replaces them (``index_copy``, cast to the table's dtype), measured exactly
from those rows, never forming the table; checked against PEFT 0.21's own ``merge_and_unload()`` and against plain
numpy, and bad input refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file
from weightdiff.kernels import reference
from weightdiff.measure.rank import analyze_factors

from test_hostile_adapters import contract

PRE = "base_model.model."
EMB = "model.embed_tokens"
Q = "model.layers.0.self_attn.q_proj"


# -- the measure, against numpy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_rows_measure_as_the_dense_delta_numpy_computes(rng, dtype):
    """Rows 0, 7, 63 and 40 (unsorted, the table's first and last among them; one left as the base's) of a
    64 x 24 table: the statistics are those of the dense merged table, the singular values those of the dense
    delta, and the selector form gives what the one-hot factor pair gives."""
    from weightdiff.measure.compute import _stored

    w = reference.round_to(rng.standard_normal((64, 24)), dtype).reshape(64, 24)
    base_raw = _stored(w, dtype).reshape(64, 24)
    ids = np.array([7, 0, 63, 40])
    new = reference.round_to(w[ids] + rng.standard_normal((4, 24)) * 0.3, dtype).reshape(4, 24)
    new[3] = w[40]                                  # a row trained back to the base's: no change there
    a = new - w[ids]
    fields, rank = analyze_factors(a, None, 1.0, base_raw, dtype, (64, 24), rows=ids)
    merged = w.copy()
    merged[ids] = new
    dense = merged - w
    assert fields["norm_delta"] == pytest.approx(float(np.linalg.norm(dense)), rel=1e-12)
    cos = float(np.sum(w * merged) / np.linalg.norm(w) / np.linalg.norm(merged))
    assert fields["cosine"] == pytest.approx(cos, abs=1e-12)
    assert fields["frac_changed"] == pytest.approx(np.count_nonzero(dense) / dense.size)
    s = np.linalg.svd(dense, compute_uv=False)
    assert rank.numerical_rank == 3 and rank.exact
    np.testing.assert_allclose(rank.spectrum[:3], s[:3], rtol=1e-12)
    onehot = np.zeros((64, 4))
    onehot[ids, np.arange(4)] = 1.0
    f2, r2 = analyze_factors(a, onehot, 1.0, base_raw, dtype, (64, 24))
    for k in ("norm_delta", "cosine", "frac_changed", "frac_beyond_rounding", "max_abs_delta"):
        assert fields[k] == pytest.approx(f2[k], rel=1e-12, abs=1e-15), k
    assert (rank.numerical_rank, rank.energy_rank_99) == (r2.numerical_rank, r2.energy_rank_99)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_a_base_read_in_windows_gives_the_numbers_of_the_base_read_whole(rng, dtype):
    """``base_windows`` (the base read in row blocks, never held whole) against ``base_raw``: a LoRA pair, a DoRA
    magnitude and trainable rows give the same fields and rank, bit for bit (the noise profile is summed in the
    same flat order)."""
    from weightdiff.measure.compute import _stored

    m, n = 700, 96              # several row blocks, the last one short
    w = reference.round_to(rng.standard_normal((m, n)), dtype).reshape(m, n)
    raw = _stored(w, dtype).reshape(m, n)

    def windows(k):
        flat = raw.reshape(-1)
        for i in range(0, flat.size, k):
            yield flat[i:i + k].copy()

    a, b = rng.standard_normal((3, n)) * 0.01, rng.standard_normal((m, 3))
    cases = [dict(a=a, b=b), dict(a=a, b=b, magnitude=np.linalg.norm(w, axis=1) * 1.01),
             dict(a=rng.standard_normal((4, n)), b=None, rows=np.array([650, 3, 99, 400]))]
    for kw in cases:
        kw = dict(kw)
        aa, bb = kw.pop("a"), kw.pop("b")
        f1, r1 = analyze_factors(aa, bb, 2.0, raw, dtype, (m, n), **kw)
        f2, r2 = analyze_factors(aa, bb, 2.0, None, dtype, (m, n), base_windows=windows, **kw)
        assert f1 == f2 and r1.to_dict() == r2.to_dict()
    from weightdiff.measure.rank import noise_floor, noise_profile

    rows, cols = noise_profile(raw, dtype, (m, n))      # the whole matrix's profile, in one call
    assert r2.noise_floor == noise_floor(2 * rows, 2 * cols)[0] > 0


def test_rows_the_selector_cannot_place_are_a_programming_error(rng):
    a = rng.standard_normal((2, 4))
    for rows in ([1, 1], [0, 8], [-1, 2], [0]):
        with pytest.raises(ValueError):
            analyze_factors(a, None, 1.0, np.zeros((8, 4), np.float32), "F32", (8, 4), rows=np.array(rows))


# -- PEFT's own adapters, against PEFT's merge -------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama(tie: bool, dtype, vocab: int = 64):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie)).eval().to(dtype)


def _train(pm, seed: int = 1) -> None:
    """Move every trainable parameter (LoRA's B starts at zero, the token rows at the base's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _records(a, b):
    doc = weightdiff.compare(str(a), str(b)).to_dict()
    return doc, {r["name"]: r for r in doc["tensors"]}


def _saved(tmp_path, model, cfg, train=True):
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
        if train:
            _train(pm)
        pm.save_pretrained(tmp_path / "ad")
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_with_trainable_tokens_reads_as_its_merged_model(tmp_path, tie, dtype):
    """LoRA on q_proj plus rows 3, 5 and 60 of the embedding (``trainable_token_indices`` a list): the embedding
    reads as the merged model's, number for number (the rows cast to the table's dtype as PEFT casts them), its
    rank 3 exactly; with a tied head PEFT merges one table, and so does this."""
    base, ad, merged = _saved(tmp_path, _llama(tie, getattr(torch, dtype)), peft.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 60]))
    got, a = _records(base, ad)
    want, m = _records(base, merged)
    changed = sorted(n for n, r in m.items() if r["status"] == "changed")
    assert sorted(n for n, r in a.items() if r["status"] == "changed") == changed
    assert f"{EMB}.weight" in changed and "lm_head.weight" not in changed
    e, me = a[f"{EMB}.weight"], m[f"{EMB}.weight"]
    assert e["compared"] == "factors" and e["rank"]["numerical_rank"] == 3 == me["rank"]["numerical_rank"]
    for k in ("norm_delta", "norm_tuned", "cosine", "frac_changed", "frac_beyond_rounding", "max_abs_delta"):
        assert e[k] == pytest.approx(me[k], rel=1e-12, abs=1e-15), k
    assert e["note"].startswith("PEFT trainable tokens `base_model.model.model.embed_tokens.token_adapter."
                                "trainable_tokens_delta` (3 rows: token ids 3, 5, 60) in place of the base's rows, "
                                f"cast to {'F32' if dtype == 'float32' else 'BF16'}")
    assert got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"
    assert "adapter" in got["summary"]["flags"]
    assert any("trainable tokens, 3 rows of `model.embed_tokens.weight`" in x for x in got["plan"]["notes"])
    assert any("2 LoRA factor pairs, 0 other tensors" in x for x in got["plan"]["notes"])


def test_adalora_with_trainable_tokens_reads_as_its_merged_model(tmp_path):
    """AdaLoraConfig is a LoraConfig: its trainable_token_indices are saved and merged as a LoRA's are (they were
    refused as another method's tensors under an AdaLoRA config)."""
    base, ad, merged = _saved(tmp_path, _llama(False, torch.float32), peft.AdaLoraConfig(
        init_r=4, target_modules=["q_proj"], total_step=10, trainable_token_indices=[3, 5]))
    got, a = _records(base, ad)
    _, m = _records(base, merged)
    assert sorted(n for n, r in a.items() if r["status"] == "changed") == \
        sorted(n for n, r in m.items() if r["status"] == "changed")
    assert a[f"{EMB}.weight"]["norm_delta"] == pytest.approx(m[f"{EMB}.weight"]["norm_delta"], rel=1e-12)
    assert any("2 AdaLoRA factor triples" in x for x in got["plan"]["notes"])


def test_a_trainable_tokens_adapter_on_a_tied_model_measures_the_table_once(tmp_path):
    """peft_type TRAINABLE_TOKENS on a tied Llama saves the rows twice, for the embedding and for the head PEFT
    ties to it: one table, measured once, as merged; the head's copy differing from the embedding's is refused."""
    base, ad, merged = _saved(tmp_path, _llama(True, torch.float32),
                              peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 2]))
    from safetensors.numpy import load_file

    assert len(load_file(str(ad / "adapter_model.safetensors"))) == 2
    got, a = _records(base, ad)
    _, m = _records(base, merged)
    assert [n for n, r in a.items() if r["status"] != "unchanged"] == [f"{EMB}.weight"]
    assert a[f"{EMB}.weight"]["norm_delta"] == pytest.approx(m[f"{EMB}.weight"]["norm_delta"], rel=1e-12)
    assert any("are the tied copy of the embedding's" in x for x in got["plan"]["notes"])
    assert got["summary"]["verdict"] == "derived" and "adapter" in got["summary"]["flags"]
    sd = load_file(str(ad / "adapter_model.safetensors"))
    sd[PRE + "lm_head.trainable_tokens_delta"] = sd[PRE + "lm_head.trainable_tokens_delta"] + np.float32(1)
    save_file(ad / "adapter_model.safetensors", sd)
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", "differ from the embedding's",
             tmp_path)


def test_rows_of_an_untied_head_and_embedding_named_apart(tmp_path):
    """``trainable_token_indices`` an object: rows 4 and 9 of the embedding, 2 of the untied head, each its own
    table, each as merged."""
    base, ad, merged = _saved(tmp_path, _llama(False, torch.float32), peft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4, 9], "lm_head": [2]}))
    got, a = _records(base, ad)
    _, m = _records(base, merged)
    for n, rows in ((f"{EMB}.weight", 2), ("lm_head.weight", 1)):
        assert a[n]["status"] == "changed" and a[n]["rank"]["numerical_rank"] == rows
        assert a[n]["norm_delta"] == pytest.approx(m[n]["norm_delta"], rel=1e-12)
        assert a[n]["cosine"] == pytest.approx(m[n]["cosine"], abs=1e-15)


def test_a_resized_vocabulary_is_the_saved_table_with_its_rows_replaced(tmp_path):
    """Vocabulary grown from 64 to 70 rows, then rows 3 and 65 trained: PEFT saves the grown table beside the
    rows and loads it over the base's; the merged table is compared as a resize, as the merged model reads."""
    model = _llama(False, torch.float32)
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(70, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                       trainable_token_indices=[3, 65]))
        pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        _train(pm)
        pm.save_pretrained(tmp_path / "ad")
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    got, a = _records(tmp_path / "base", tmp_path / "ad")
    _, m = _records(tmp_path / "base", tmp_path / "merged")
    e, me = a[f"{EMB}.weight"], m[f"{EMB}.weight"]
    assert e["status"] == me["status"] == "resized" and e["shape"] == [70, 32]
    for k in ("norm_delta", "cosine", "frac_changed"):
        assert e[k] == pytest.approx(me[k], rel=1e-12), k
    assert "written into the base layer the adapter saves" in e["note"]
    assert "adapter" in got["summary"]["flags"]


def test_inspect_names_the_rows(tmp_path):
    _, ad, _ = _saved(tmp_path, _llama(False, torch.float32), peft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5]), train=False)
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0, r.output
    assert "adapter     r=2 lora_alpha=8 scale=4, 2 LoRA factor pairs (ranks 2)" in r.output
    assert "tokens      2 rows of model.embed_tokens.weight (trainable tokens: rows replaced)" in r.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)
    assert doc["adapter"]["trainable_tokens"] == {"model.embed_tokens.weight": 2}


def test_an_untrained_adapter_is_the_base(tmp_path):
    """Rows saved as PEFT initialises them (the base's own) and B = 0: nothing changed."""
    base, ad, _ = _saved(tmp_path, _llama(False, torch.bfloat16), peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[0, 63]), train=False)
    got, a = _records(base, ad)
    assert a[f"{EMB}.weight"]["status"] == "unchanged" and a[f"{EMB}.weight"]["norm_delta"] == 0


# -- bad input ---------------------------------------------------------------------------------------------------

def _write(tmp_path, rng, config=None, tensors=None, base_dtype=np.float32):
    base = tmp_path / "base"
    base.mkdir(parents=True, exist_ok=True)
    save_file(base / "model.safetensors", {f"{EMB}.weight": rng.standard_normal((50, 32)).astype(base_dtype),
                                           f"{Q}.weight": rng.standard_normal((32, 32)).astype(np.float32)})
    ad = tmp_path / "ad"
    ad.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "TRAINABLE_TOKENS", "target_modules": ["embed_tokens"], "token_indices": [3, 7]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg if config is None else {**cfg, **config}))
    t = {f"{PRE}{EMB}.trainable_tokens_delta": rng.standard_normal((2, 32)).astype(np.float32)} \
        if tensors is None else tensors
    save_file(ad / "adapter_model.safetensors", t)
    return base, ad


def test_a_written_adapter_is_measured_as_numpy_merges_it(tmp_path, rng):
    base, ad = _write(tmp_path, rng)
    from safetensors.numpy import load_file

    w = load_file(str(base / "model.safetensors"))[f"{EMB}.weight"].astype(np.float64)
    rows = load_file(str(ad / "adapter_model.safetensors"))[f"{PRE}{EMB}.trainable_tokens_delta"]
    merged = w.copy()
    merged[[3, 7]] = rows
    rec = weightdiff.compare(str(base), str(ad)).tensor(f"{EMB}.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(merged - w)), rel=1e-12)
    assert rec.rank.numerical_rank == 2 and rec.frac_changed == pytest.approx(64 / 1600)


@pytest.mark.parametrize("config, tensors, where, expect", [
    ({"token_indices": [3, 3]}, None, "config", "listing token 3 twice"),
    ({"token_indices": [-1, 3]}, None, "config", "expected token ids"),
    ({"token_indices": [3.0, 4]}, None, "config", "expected token ids"),
    ({"token_indices": []}, None, "config", "non-empty list of token ids"),
    ({"token_indices": {"embed_tokens": [1]}}, None, "config", "takes a list"),
    ({"token_indices": None}, None, "config", "no token_indices"),
    ({"token_indices": [3, 50]}, None, "model", "token id 50 is outside `model.embed_tokens.weight`, which has 50"),
    ({"token_indices": [3, 7, 9]}, None, "model", "expected a float matrix of 3 rows"),
    (None, {f"{PRE}{EMB}.trainable_tokens_delta": np.zeros((2, 16), np.float32)}, "model", "rows of 16 values"),
    (None, {f"{PRE}{EMB}.trainable_tokens_delta": np.zeros((2, 32), np.int32)}, "model", "expected a float matrix"),
    (None, {f"{PRE}{EMB}.trainable_tokens_delta": np.full((2, 32), np.nan, np.float32)}, "model", "NaN or Inf"),
    (None, {f"{PRE}model.other.trainable_tokens_delta": np.zeros((2, 32), np.float32)}, "model",
     "has no weight in the base"),
    (None, {f"{PRE}{Q}.lora_A.weight": np.zeros((2, 32), np.float32)}, "model", "not a trainable tokens tensor"),
    (None, {f"{PRE}{Q}.weight": np.zeros((2, 32), np.float32)}, "model", "holds no trainable token rows"),
])
def test_bad_trainable_tokens_are_refused_in_one_line(tmp_path, rng, config, tensors, where, expect):
    base, ad = _write(tmp_path, rng, config, tensors)
    name = ad / ("adapter_config.json" if where == "config" else "adapter_model.safetensors")
    contract(["compare", str(base), str(ad)], name, expect, tmp_path)


@pytest.mark.parametrize("config, tensors, expect", [
    # rows without the config that says which ids they are: read as an added tensor, a confident "derived"
    ({}, {f"{PRE}{EMB}.token_adapter.trainable_tokens_delta": np.zeros((2, 32), np.float32)},
     "sets no trainable_token_indices"),
    ({"trainable_token_indices": [1, 2]}, {}, "holds no trainable token rows"),
    ({"trainable_token_indices": {"lm_head": [1, 2]}},
     {f"{PRE}{EMB}.token_adapter.trainable_tokens_delta": np.zeros((2, 32), np.float32)}, "gives that module no token"),
    ({"trainable_token_indices": {"q_proj": [1, 2]}},
     {f"{PRE}{Q}.token_adapter.trainable_tokens_delta": np.zeros((2, 32), np.float32)}, "both LoRA factors and "),
])
def test_a_lora_whose_rows_and_config_disagree_is_refused(tmp_path, rng, config, tensors, expect):
    lora = {f"{PRE}{Q}.lora_A.weight": rng.standard_normal((2, 32)).astype(np.float32),
            f"{PRE}{Q}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)}
    base, ad = _write(tmp_path, rng, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
                                      "token_indices": None, **config}, {**lora, **tensors})
    where = "adapter_model.safetensors"
    contract(["compare", str(base), str(ad)], ad / where, expect, tmp_path)


def test_a_table_of_another_dtype_is_refused(tmp_path, rng):
    from weightdiff.io.safetensors_write import to_storage

    base, ad = _write(tmp_path, rng)
    save_file(base / "model.safetensors", {f"{EMB}.weight": ("F8_E4M3", to_storage(
        rng.standard_normal((50, 32)) * 0.1, "F8_E4M3"))})
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", "a F8_E4M3 table", tmp_path)


def test_a_gguf_base_reads_as_the_model_it_was_converted_from(tmp_path, rng):
    """Against the base's GGUF: an F32 table gives the records of the Hugging Face base it was converted from,
    every field; an F16 one gives rows measured against its own float16 values (the rows cast to float16, as
    PEFT's merge casts them into a float16 table) and numpy's delta; a Q8_0 table is refused, as any quantized
    table."""
    gguf = pytest.importorskip("gguf")
    from gguf_build import to_gguf
    from models import llama

    from conftest import write_checkpoint

    t = llama(rng, layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "base", t)
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "TRAINABLE_TOKENS",
                                                        "token_indices": [3, 95, 7]}))
    rows = rng.normal(0, 0.02, (3, 64)).astype(np.float32)
    save_file(ad / "adapter_model.safetensors", {f"{PRE}{EMB}.trainable_tokens_delta": rows})
    Q = gguf.GGMLQuantizationType
    want = weightdiff.compare(str(base), str(ad)).to_dict(include_run=False)
    f32 = to_gguf(tmp_path / "f32.gguf", t, "llama", Q.F32, n_head=4, n_kv=2, layers=2)
    got = weightdiff.compare(str(f32), str(ad)).to_dict(include_run=False)
    assert got["tensors"] == want["tensors"] and got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"

    f16 = to_gguf(tmp_path / "f16.gguf", t, "llama", Q.F16, n_head=4, n_kv=2, layers=2)
    rec = weightdiff.compare(str(f16), str(ad)).tensor(f"{EMB}.weight")
    w = t[f"{EMB}.weight"].astype(np.float16).astype(np.float64)
    delta = rows.astype(np.float16).astype(np.float64) - w[[3, 95, 7]]
    assert rec.compared == "factors" and rec.rank.numerical_rank == 3
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
    np.testing.assert_allclose(rec.rank.spectrum[:3], np.linalg.svd(delta, compute_uv=False), rtol=1e-10)

    q8 = to_gguf(tmp_path / "q8.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2)
    contract(["compare", str(q8), str(ad)], ad / "adapter_model.safetensors", "which the base stores quantized",
             tmp_path)


def test_a_worker_measures_the_rows_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_write(tmp_path, rng), 1)


def test_ids_are_checked_in_one_pass():
    """2M ids with a duplicate at the end: found without a quadratic scan (the check took hours that way)."""
    import time
    from pathlib import Path

    from weightdiff.errors import CheckpointError
    from weightdiff.io.peft_tokens import token_indices

    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="listing token 5 twice"):
        token_indices({"token_indices": [*range(1 << 22 - 1), 5]}, Path("adapter_config.json"), "token_indices")
    assert time.perf_counter() - t0 < 30
