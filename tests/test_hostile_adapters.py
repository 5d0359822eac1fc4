"""Hostile and broken PEFT adapters (issue 17): bad input is exit 2 with one line naming the file,
valid ones (GPT-2 ``fan_in_fan_out``, a safe regex ``alpha_pattern``) give the merged model's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file

PRE = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


def base_model(d: Path, rng, extra: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"{Q}.weight": rng.standard_normal((32, 32)).astype(np.float32),
               "model.embed_tokens.weight": rng.standard_normal((50, 32)).astype(np.float32)}
    tensors.update(extra or {})
    save_file(d / "model.safetensors", tensors)
    return d


def adapter(d: Path, config: dict | str, tensors: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file(d / "adapter_model.safetensors", {PRE + k: v for k, v in tensors.items()})
    return d


def lora(rng, out: int = 32, inp: int = 32, r: int = 4, mod: str = Q) -> dict:
    return {f"{mod}.lora_A.weight": rng.standard_normal((r, inp)).astype(np.float32),
            f"{mod}.lora_B.weight": rng.standard_normal((out, r)).astype(np.float32)}


CFG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def contract(args: list[str], names: str | Path, expect: str, tmp: Path) -> str:
    """exit 2, nothing on stdout, one stderr line naming ``names``, no file written anywhere under tmp."""
    before = sorted(str(p) for p in tmp.rglob("*"))
    out = tmp / "out"
    r = CliRunner().invoke(main, [*args, "--json", str(out / "r.json"), "--csv", str(out / "r.csv")])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(names) in lines[0] and expect in lines[0], lines[0]
    assert sorted(str(p) for p in tmp.rglob("*")) == before
    return lines[0]


def compare_bad(tmp_path, rng, config, tensors, expect, names_config=False):
    base = base_model(tmp_path / "base", rng)
    ad = adapter(tmp_path / "ad", config, tensors)
    name = ad / ("adapter_config.json" if names_config else "adapter_model.safetensors")
    return contract(["compare", str(base), str(ad)], name, expect, tmp_path)


# -- shapes against the base --------------------------------------------------------------------------------

def test_factors_that_do_not_fit_the_base_weight(tmp_path, rng):
    compare_bad(tmp_path, rng, CFG, lora(rng, 32, 17), "do not fit the base weight, which is [32, 32]")


def test_three_dimensional_lora_a(tmp_path, rng):
    t = lora(rng)
    t[f"{Q}.lora_A.weight"] = rng.standard_normal((4, 32, 2)).astype(np.float32)
    compare_bad(tmp_path, rng, CFG, t, "do not chain: A is [4, 32, 2], B is [32, 4]")


def test_embedding_factors_of_the_wrong_size(tmp_path, rng):
    t = {"model.embed_tokens.lora_embedding_A": rng.standard_normal((4, 49)).astype(np.float32),
         "model.embed_tokens.lora_embedding_B": rng.standard_normal((32, 4)).astype(np.float32)}
    compare_bad(tmp_path, rng, {**CFG, "target_modules": ["embed_tokens"]}, t,
                "`model.embed_tokens.weight` (A [4, 49], B [32, 4]) do not fit the base weight, which is [50, 32]")


def test_dora_on_an_embedding_is_refused_by_name_not_as_a_wrong_magnitude(tmp_path, rng):
    t = {"model.embed_tokens.lora_embedding_A": rng.standard_normal((4, 50)).astype(np.float32),
         "model.embed_tokens.lora_embedding_B": rng.standard_normal((32, 4)).astype(np.float32),
         "model.embed_tokens.lora_magnitude_vector": rng.standard_normal(32).astype(np.float32)}
    line = compare_bad(tmp_path, rng, {**CFG, "target_modules": ["embed_tokens"], "use_dora": True}, t,
                       "is DoRA on an embedding (use_dora with lora_embedding_A/B), which weightdiff does not read")
    assert "merge the adapter (merge_and_unload) and compare the merged model" in line


def test_adapter_with_no_tensors_is_not_identical(tmp_path, rng):
    compare_bad(tmp_path, rng, CFG, {}, "adapter holds no tensors (its config targets q_proj)")


def test_config_without_peft_type(tmp_path, rng):
    compare_bad(tmp_path, rng, {k: v for k, v in CFG.items() if k != "peft_type"}, lora(rng),
                "adapter config has no peft_type", names_config=True)


def test_saved_base_layer_of_another_width(tmp_path, rng):
    """PEFT loads ``<m>.base_layer.weight`` saved in the adapter over the base's weight: one that is not
    the base's table (rows added or cut is a resize) belongs to another model."""
    t = {"model.embed_tokens.lora_embedding_A": rng.standard_normal((4, 50)).astype(np.float32),
         "model.embed_tokens.lora_embedding_B": rng.standard_normal((31, 4)).astype(np.float32),
         "model.embed_tokens.base_layer.weight": rng.standard_normal((50, 31)).astype(np.float32)}
    compare_bad(tmp_path, rng, {**CFG, "target_modules": ["embed_tokens"]}, t,
                "base layer `base_model.model.model.embed_tokens.base_layer.weight` saved in the adapter is [50, 31]")


@pytest.mark.parametrize("shape", [(31,), (4,), (32, 2)])
def test_dora_magnitude_of_the_wrong_length(tmp_path, rng, shape):
    t = lora(rng)
    t[f"{Q}.lora_magnitude_vector"] = np.ones(shape, np.float32)
    compare_bad(tmp_path, rng, {**CFG, "use_dora": True}, t, "DoRA magnitude")


def test_rank_disagreeing_with_the_config(tmp_path, rng):
    compare_bad(tmp_path, rng, {**CFG, "r": 8}, lora(rng), "have rank 4 but adapter_config.json gives r = 8")


def test_integer_factors_refused(tmp_path, rng):
    t = lora(rng)
    t[f"{Q}.lora_A.weight"] = np.ones((4, 32), np.int32)
    compare_bad(tmp_path, rng, CFG, t, "is I32; expected a float dtype")


def test_lora_target_missing_from_the_base(tmp_path, rng):
    t = lora(rng, mod="model.layers.7.self_attn.q_proj")
    compare_bad(tmp_path, rng, CFG, t, "LoRA target `model.layers.7.self_attn.q_proj.weight` has no weight in the base")


# -- config values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, expect", [
    ({"lora_alpha": 10 ** 400}, "lora_alpha = 1000000000"),
    ({"lora_alpha": "abc"}, 'lora_alpha = "abc", expected a number'),
    ({"lora_alpha": None}, "lora_alpha = None, expected a number"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern = ['q_proj'], expected an object"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern[\"q_proj\"] = \"x\", expected a number"),
    ({"alpha_pattern": {"q_proj": 10 ** 400}}, "expected a finite number"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern[\"q_proj\"] = 2.5, expected a positive integer"),
    ({"rank_pattern": {"q_proj": 10 ** 30}}, "expected a positive integer"),
    ({"r": True}, "r = True, expected a positive integer"),
    ({"r": 10 ** 400}, "expected a positive integer"),
    ({"use_rslora": "false"}, 'use_rslora = "false", expected true or false'),
    ({"use_dora": 0}, "use_dora = 0, expected true or false"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ({"peft_type": "RANDLORA"}, 'peft_type "RANDLORA": only LoRA, AdaLoRA, LoHa, LoKr, VeRA, VBLoRA, FourierFT, DeLoRA, '
                                'OFT, BOFT, HRA, IA3, trainable-tokens and LN tuning adapters are supported'),
    ({"peft_type": 3}, "peft_type 3"),
    # LoRA variants read as a plain LoRA gave a confident wrong delta, or a refusal that blamed the file
    ({"kasa_config": {"beta": 1e-4, "gamma": 1e-3}}, "has kasa_config {'beta': 0.0001, 'gamma': 0.001}: KaSA "
                                                     "truncates the base weight"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora {'nblocks': 2}: block-diagonal LoRA"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication [[0, 2], [1, 2]]: PEFT builds the layers"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt and prefix tuning add virtual-token embeddings and change no model "
                                     "weight, so there is no weight delta to measure"),
    ({"peft_type": "PREFIX_TUNING"}, 'peft_type "PREFIX_TUNING": prompt and prefix tuning'),
    ({"target_modules": 7}, "target_modules = 7"),
    ({"target_modules": "(["}, 'target_modules = "([", not a regular expression'),
    ({"target_modules": "q" * 1001}, "not a regular expression (1,001 characters long"),
    ({"init_lora_weights": "olora"}, 'init_lora_weights "olora", which rewrites the base weights'),
    ({"init_lora_weights": "pissa_niter_4"}, 'init_lora_weights "pissa_niter_4", which rewrites the base weights'),
    ({"init_lora_weights": "loftq"}, 'init_lora_weights "loftq", which rewrites the base weights'),
    ({"init_lora_weights": "newfangled"}, "is an initialisation weightdiff does not know"),
    ({"init_lora_weights": 1}, "init_lora_weights = 1, expected true, false or the name"),
    ({"alpha_pattern": {"(x+x+)+y": 2}}, "nests one repetition inside another"),
    ({"alpha_pattern": {"(a|aa)*b": 2}}, "repeats an alternation"),
    ({"alpha_pattern": {"(a)\\1": 2}}, "back references"),
    ({"alpha_pattern": {"[": 2}}, "is not a regular expression"),
])
def test_bad_config_values(tmp_path, rng, patch, expect):
    line = compare_bad(tmp_path, rng, {**CFG, **patch}, lora(rng), expect, names_config=True)
    assert len(line) < 400
    # inspect reads the same config and fails the same way
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "ad")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr


@pytest.mark.parametrize("patch", [{"kasa_config": {"beta": 1e-4}}, {"use_bdlora": {"nblocks": 2}},
                                   {"peft_type": "RANDLORA"}])
def test_refused_lora_variants_and_other_types_say_to_compare_the_merged_model(tmp_path, rng, patch):
    line = compare_bad(tmp_path, rng, {**CFG, **patch}, lora(rng), "adapter config has", names_config=True)
    assert "merge the adapter (merge_and_unload) and compare the merged model" in line


def test_a_lora_bias_the_config_does_not_declare_or_of_the_wrong_size_is_refused(tmp_path, rng):
    t = {**lora(rng), f"{Q}.lora_B.bias": rng.standard_normal(32).astype(np.float32)}
    compare_bad(tmp_path / "a", rng, CFG, t, "does not set lora_bias: true, so PEFT would not load it")
    t[f"{Q}.lora_B.bias"] = rng.standard_normal(31).astype(np.float32)
    compare_bad(tmp_path / "b", rng, {**CFG, "lora_bias": True}, t, "expected 32 floats, one per output feature")
    # a base whose bias is an integer tensor (a buffer, never a weight): there is no float bias to merge into
    t[f"{Q}.lora_B.bias"] = rng.standard_normal(32).astype(np.float32)
    base = base_model(tmp_path / "c" / "base", rng, {f"{Q}.bias": np.arange(32, dtype=np.int32)})
    ad = adapter(tmp_path / "c" / "ad", {**CFG, "lora_bias": True}, t)
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", "but the base has no such bias",
             tmp_path / "c")


def test_catastrophic_pattern_against_a_long_module_name_does_not_hang(tmp_path, rng):
    mod = "model.layers.0." + "x" * 40 + "z"
    base = base_model(tmp_path / "base", rng, {mod + ".weight": np.ones((8, 8), np.float32)})
    ad = adapter(tmp_path / "ad", {**CFG, "alpha_pattern": {"(x+x+)+y": 2}}, lora(rng, 8, 8, mod=mod))
    t0 = time.perf_counter()
    contract(["compare", str(base), str(ad)], ad / "adapter_config.json", "catastrophic", tmp_path)
    assert time.perf_counter() - t0 < 10


def test_polynomial_pattern_against_a_huge_module_name_is_refused(tmp_path, rng):
    mod = "m." + "x" * 5000
    base = base_model(tmp_path / "base", rng, {mod + ".weight": np.ones((8, 8), np.float32)})
    ad = adapter(tmp_path / "ad", {**CFG, "alpha_pattern": {".*x.*y": 2}}, lora(rng, 8, 8, mod=mod))
    t0 = time.perf_counter()
    contract(["compare", str(base), str(ad)], ad / "adapter_config.json", "too costly to match", tmp_path)
    assert time.perf_counter() - t0 < 10


# -- values LAPACK must never see ------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [np.inf, -np.inf, np.nan])
def test_nonfinite_factors(tmp_path, rng, fill):
    t = lora(rng)
    t[f"{Q}.lora_B.weight"][3, 1] = fill
    compare_bad(tmp_path, rng, CFG, t, "holds NaN or Inf values")


def test_huge_alpha_is_refused_before_lapack_prints(tmp_path, rng):
    """lora_alpha 1e308 overflowed into LAPACK, which printed DLASCL complaints on stdout."""
    base = base_model(tmp_path / "base", rng)
    ad = adapter(tmp_path / "ad", {**CFG, "lora_alpha": 1e308}, lora(rng))
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(base), str(ad), "--json", "-",
                        "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "is too large to measure" in r.stderr
    assert str(ad / "adapter_model.safetensors") in r.stderr


def test_string_false_is_not_true(tmp_path, rng):
    """use_rslora "false" used to be truthy and rescale every delta."""
    base = base_model(tmp_path / "base", rng)
    ad = adapter(tmp_path / "ad", {**CFG, "use_rslora": False}, lora(rng))
    r = weightdiff.compare(str(base), str(ad))
    t = r.tensor(f"{Q}.weight")
    assert t.note.startswith("LoRA adapter (r=4, scale=2)")


# -- valid adapters ---------------------------------------------------------------------------------------------

def test_safe_regex_alpha_pattern_applies_as_in_peft(tmp_path, rng):
    base = base_model(tmp_path / "base", rng)
    ad = adapter(tmp_path / "ad", {**CFG, "alpha_pattern": {r"layers\.\d+\.self_attn\.q_proj": 12}}, lora(rng))
    r = weightdiff.compare(str(base), str(ad))
    assert "scale=3" in r.tensor(f"{Q}.weight").note


def test_regex_keys_match_like_peft_get_pattern_key(tmp_path):
    peft_other = pytest.importorskip("peft.utils.other")
    from weightdiff.io.peft_adapter import AdapterConfig

    keys = {"q_proj": 1, r"layers\.1\..*v_proj": 2, "mlp.down_proj": 3, "up": 4}
    cfg = AdapterConfig(4, 8.0, [], False, False, None, {"alpha_pattern": keys})
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.v_proj",
                   "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj", "up", "x.up", "xup"]:
        key = peft_other.get_pattern_key(list(keys), module)
        assert cfg.pattern("alpha_pattern", module, None) == keys.get(key), module


def _gpt2(torch, transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_fan_in_fan_out_adapter_matches_peft_merge(tmp_path, dora):
    """GPT-2 Conv1D stores weights [in, out]; the adapter's delta is (B @ A).T (fan_in_fan_out)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _gpt2(torch, transformers)
    model.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          init_lora_weights=False, use_dora=dora)
    pm = peft.get_peft_model(model, cfg)
    if dora:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.1)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    lora_t = [t for t in r.tensors if t.compared == "factors"]
    assert len(lora_t) == 4
    for t in lora_t:
        d = dense.tensor(t.name)
        assert t.shape == d.shape and t.shape[0] != t.shape[1]       # stored [in, out]
        assert t.norm_delta == pytest.approx(d.norm_delta, rel=1e-4)
        assert t.cosine == pytest.approx(d.cosine, rel=1e-6)
        assert t.max_abs_delta == pytest.approx(d.max_abs_delta, rel=1e-3)
        if not dora:
            assert t.rank.numerical_rank == d.rank.numerical_rank == 4
            np.testing.assert_allclose(t.rank.spectrum[:4], d.rank.spectrum[:4], rtol=1e-3)
    assert r.summary.verdict == dense.summary.verdict == "derived"
    assert r.summary.relative_change == pytest.approx(dense.summary.relative_change, rel=1e-4)


def test_gpt2_adapter_through_the_cli_exits_0(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _gpt2(torch, transformers, seed=1)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                    fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "base"), str(tmp_path / "adapter"), "--json", "-", "-q"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["summary"]["verdict"] == "derived"


def test_untrained_adapter_reads_identical_without_a_dtype_change(tmp_path, rng):
    # lora_B = 0 (a fresh adapter): the base tensors it leaves alone are the base's own, in their own
    # dtype; they read "stored in another dtype (F32 -> None)"
    base = base_model(tmp_path / "base", rng)
    t = lora(rng)
    t[f"{Q}.lora_B.weight"][:] = 0
    ad = adapter(tmp_path / "ad", CFG, t)
    r = CliRunner().invoke(main, ["compare", str(base), str(ad), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["verdict"] == "identical"
    assert all(x["dtype_tuned"] == x["dtype_base"] == "F32" for x in doc["tensors"])
    assert "None" not in r.stdout and "another dtype" not in r.stdout


def test_adapter_memo_says_the_parameters_are_base_plus_adapter():
    # "Of the 405,120 parameters of m/hf_adapter, 83.8% are bit for bit the same": the adapter folder holds
    # its factors only; the count is of the base with the adapter applied
    from weightdiff.render.sentences import plain_language

    data = {"tuned": {"path": "ad"}, "base": [{"path": "base"}],
            "summary": {"verdict": "derived", "flags": ["adapter"], "params_total": 100,
                        "params_by_status": {"unchanged": 80, "changed": 20}, "blocks_total": 2, "blocks_changed": 1}}
    text = plain_language(data)[0]
    assert text.startswith("Of the 100 parameters of the model ad adapts (its base with the adapter applied), 80.0%")



def test_an_adapter_never_claims_to_have_been_trained_on_the_base_it_is_given(tmp_path, rng):
    """A LoRA adapter trained on one model, compared with an unrelated model of the same shapes, read "DERIVED: a
    fine-tune of this base": the factors apply to any base of their shapes, so the merged model is that base
    changed by construction. The title and reason now say which base it was trained on is not measured, and
    name the base it declares."""
    from weightdiff import compare
    from weightdiff.render.sentences import verdict_title

    b = base_model(tmp_path / "b", rng)
    a = adapter(tmp_path / "a", {**CFG, "base_model_name_or_path": "org/other-model"}, lora(rng))
    d = compare(b, a).to_dict()
    s = d["summary"]
    assert s["verdict"] == "derived" and "adapter" in s["flags"]
    # this random adapter moves its base far (relative change ~2): the title says that too
    assert "far_from_base" in s["flags"]
    assert verdict_title(s).startswith("DERIVED: this base with the adapter applied; the result is changed far more")
    assert verdict_title(s).endswith("an adapter holds only a change, which fits any base of its shapes, so which "
                                     "base it was trained on is not measured (it declares `org/other-model`).")
    assert s["verdict_reason"].endswith("which base it was trained on is not measured.")


def test_a_declared_base_holding_terminal_escapes_is_printed_escaped(tmp_path, rng):
    """An adapter's ``base_model_name_or_path`` is quoted in the verdict; holding an OSC sequence (set the window
    title, write the clipboard) it reached stdout raw. Every terminal line is escaped, and the memo's too."""
    evil = "\x1b]0;PWNED\x07\x1b]52;c;cm0gLXJmIH4K\x07\u202eorg/model"
    b = base_model(tmp_path / "b", rng)
    a = adapter(tmp_path / "a", {**CFG, "base_model_name_or_path": evil}, lora(rng))
    memo = tmp_path / "m.md"
    r = CliRunner().invoke(main, ["compare", str(b), str(a), "--memo", str(memo)])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "it declares `\\x1b]0;PWNED\\x07" in r.stdout
    for text in (r.stdout, r.stderr, memo.read_text()):
        assert not any(c in text for c in "\x1b\x07\u202e")


@pytest.mark.parametrize("left_out", ["lora_alpha", "r", "both"])
def test_a_config_without_r_or_lora_alpha_takes_peft_defaults(tmp_path, rng, left_out):
    """PEFT's LoraConfig defaults are r = 8, lora_alpha = 8: an adapter_config.json without lora_alpha was read
    with alpha = r (an r = 2 adapter 4x too small), and one without r was refused where PEFT loads it."""
    r = 2 if left_out == "lora_alpha" else 8
    cfg = {k: v for k, v in {**CFG, "r": r}.items()
           if not (left_out in ("lora_alpha", "both") and k == "lora_alpha")
           and not (left_out in ("r", "both") and k == "r")}
    factors = lora(rng, r=r)
    b = base_model(tmp_path / "b", rng)
    a = adapter(tmp_path / "a", cfg, factors)
    alpha = 8 if left_out in ("lora_alpha", "both") else CFG["lora_alpha"]
    from safetensors.numpy import load_file

    base_w = load_file(str(b / "model.safetensors"))[f"{Q}.weight"]
    merged = base_w + (alpha / r) * factors[f"{Q}.lora_B.weight"] @ factors[f"{Q}.lora_A.weight"]
    got = weightdiff.compare(b, a).tensor(f"{Q}.weight")
    want = float(np.linalg.norm(merged.astype(np.float64) - base_w) / np.linalg.norm(base_w))
    assert got.status == "changed" and got.rel_change == pytest.approx(want, rel=1e-5)


def test_fan_in_fan_out_on_a_linear_model_is_ignored_as_peft_ignores_it(tmp_path):
    """adapter_config.json saying fan_in_fan_out true for a Llama's square q/v: PEFT warns, resets the flag for an
    nn.Linear and merges untransposed; weightdiff transposed the deltas and its numbers differed from PEFT's merge."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    conf = tmp_path / "adapter" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "fan_in_fan_out": True}))
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    lora_t = [t for t in r.tensors if t.compared == "factors"]
    assert len(lora_t) == 4
    for t in lora_t:
        assert t.shape[0] == t.shape[1]
        assert t.cosine == pytest.approx(dense.tensor(t.name).cosine, rel=1e-6)
        assert t.norm_delta == pytest.approx(dense.tensor(t.name).norm_delta, rel=1e-4)


def test_monteclora_sampler_state_is_not_model_weights_and_alora_says_it_is_conditional(tmp_path, rng):
    """MonteCLoRA's sampler tensors were counted as added model tensors (PEFT uses them in training only);
    an aLoRA adapter read as an unconditional change with no word that PEFT applies it after its invocation
    tokens only."""
    from weightdiff.comparison import compare

    base = base_model(tmp_path / "base", rng)
    t = lora(rng)
    sampler = {f"{Q}.lora_monteclora_sampler.{k}": rng.standard_normal(4).astype(np.float32)
               for k in ("expert_weights", "std_prior")}
    ad = adapter(tmp_path / "mc", {**CFG, "monteclora_config": {"num_samples": 8}}, {**t, **sampler})
    r = compare(base, ad)
    assert not r.plan["added"] and r.summary.tensors_by_status["added"] == 0
    assert any("2 tensors of MonteCLoRA's sampler state" in n for n in r.plan["notes"])
    # without the config that explains them, they are what they look like: tensors the base does not have
    ad = adapter(tmp_path / "plain", CFG, {**t, **sampler})
    assert len(compare(base, ad).plan["added"]) == 2
    ad = adapter(tmp_path / "alora", {**CFG, "alora_invocation_tokens": [5, 6]}, t)
    r = compare(base, ad)
    assert any("alora_invocation_tokens (aLoRA)" in n and "not on every input" in n for n in r.plan["notes"])
