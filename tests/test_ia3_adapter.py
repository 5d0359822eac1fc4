"""PEFT (IA)³ adapters: each vector measured as the weight PEFT's merge gives (W x l, and b x l for the bias of a
layer whose outputs it scales), checked against what peft itself merges (Llama's linear layers in float32 and
bfloat16, GPT-2's Conv1D with biases, grouped Conv2d in float16, a classifier head in modules_to_save), the rounding
against torch's own ``mul`` and casts, and hostile configs and vectors refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import weightdiff
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FIELDS = ("status", "norm_base", "norm_tuned", "norm_delta", "max_abs_delta", "frac_changed", "cosine",
          "dtype_tuned", "shape")


def _trained(model, cfg, seed: int = 0):
    """``model`` with an IA3 adapter whose vectors moved off 1 (and a modules_to_save head shifted)."""
    g = torch.Generator().manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "ia3_l" in n:
                t.copy_(1 + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype))
            elif "modules_to_save" in n:
                t.add_(0.1)
    return pm


def _save_plain(module, folder):
    from safetensors.torch import save_file as torch_save

    folder.mkdir(parents=True)
    torch_save({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))


def _same_as_merged(tmp_path, base, adapter, merged):
    """The adapter's records are the merged model's, field for field (the same floats, not approximately)."""
    got = weightdiff.compare(str(base), str(adapter))
    want = weightdiff.compare(str(base), str(merged))
    rows = {t.name: t.to_dict() for t in got.tensors}
    for t in want.tensors:
        row = rows[t.name]
        for f in FIELDS:
            assert row[f] == t.to_dict()[f], (t.name, f, row[f], t.to_dict()[f], row["note"])
    assert len(rows) == len(want.tensors)
    assert got.summary.verdict == want.summary.verdict == "derived"
    assert "adapter" in got.summary.flags and "adapter" not in want.summary.flags
    return got


def _llama(dtype):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_ia3_adapter_reads_as_its_merged_model(tmp_path, dtype):
    model = _llama(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "base")
    pm = _trained(model, peft.IA3Config(task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    got = _same_as_merged(tmp_path, tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    scaled = [t for t in got.tensors if (t.note or "").startswith("IA3 vector")]
    assert len(scaled) == 6 and all(t.status == "changed" and t.compared == "float" for t in scaled)
    # k_proj, v_proj [8, 16] scale outputs; down_proj [16, 32] its 32 inputs
    assert got.summary.scope["ia3"] == {"tensors": 6, "vectors": 6, "values": 2 * (8 + 8 + 32)}
    assert "The adapter itself adds 96 numbers to the base (6 IA3 vectors" in " ".join(got.summary.headline)
    assert any("6 IA3 vectors (2 scaling a layer's inputs, 4 its outputs)" in n for n in got.plan["notes"])
    assert got.summary.headline[0].startswith("Derived from this base")
    assert got.to_json(include_run=False) == weightdiff.compare(str(tmp_path / "base"),
                                                                 str(tmp_path / "adapter")).to_json(include_run=False)


def test_gpt2_conv1d_ia3_scales_the_right_axis_and_the_bias(tmp_path):
    """GPT-2's Conv1D stores [in, out] (fan_in_fan_out): c_attn's vector scales its 48 outputs, the columns, and
    its bias; the MLP's c_proj scales its 64 inputs, the rows, and leaves its bias alone."""
    torch.manual_seed(1)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64,
                                                             n_positions=32))
    with torch.no_grad():
        for n, t in g.named_parameters():
            if n.endswith(".bias"):         # GPT-2 starts its biases at zero, which any scale leaves alone
                t.normal_()
    g.save_pretrained(tmp_path / "base")
    pm = _trained(g, peft.IA3Config(task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    got = _same_as_merged(tmp_path, tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    changed = sorted(t.name for t in got.tensors if t.status == "changed")
    assert changed == ["transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_attn.weight",
                       "transformer.h.0.mlp.c_proj.weight"]
    assert got.tensor("transformer.h.0.attn.c_attn.bias").note.startswith(
        "IA3 vector `base_model.model.transformer.h.0.attn.c_attn.ia3_l` merged into the base's bias (b x l")
    assert got.summary.scope["ia3"] == {"tensors": 3, "vectors": 2, "values": 48 + 64}

    # a Dask worker plans again and must orient the vectors (and LoRA factors) as the parent did
    from weightdiff.comparison import check_adapter_plan
    from weightdiff.io.checkpoint import locate
    from weightdiff.options import CompareOptions
    from weightdiff.pairing.plan import plan as make_plan
    from weightdiff.split import measure_task, plan_digest

    with locate(tmp_path / "base") as b, locate(tmp_path / "adapter") as t:
        parent = make_plan([b], t)
        check_adapter_plan(parent, [b], t)
        digest = plan_digest(parent)
    idx = [i for i, p in enumerate(parent.pairs) if p.ia3 is not None or p.ia3_bias is not None]
    status, records = measure_task([str(tmp_path / "base")], str(tmp_path / "adapter"), CompareOptions(), idx,
                                   digest)
    assert status == "ok"
    for r in records:
        assert r.norm_delta == got.tensor(r.name).norm_delta and r.max_abs_delta == got.tensor(r.name).max_abs_delta


def test_grouped_conv2d_ia3_in_float16_reads_as_its_merged_model(tmp_path):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 3, groups=4)
            self.conv3 = nn.Conv2d(8, 6, 1, groups=2)
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return self.lin(self.conv3(self.conv2(self.conv1(x))).mean((2, 3)))

    torch.manual_seed(3)
    net = Net().half()
    _save_plain(net, tmp_path / "base")
    pm = _trained(net, peft.IA3Config(target_modules=["conv1", "conv2", "conv3", "lin"],
                                      feedforward_modules=["conv2", "conv3", "lin"]))
    pm.save_pretrained(tmp_path / "adapter")
    _save_plain(pm.merge_and_unload(), tmp_path / "merged")
    got = _same_as_merged(tmp_path, tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    # conv1 scales its outputs, so its bias too; the others their inputs (conv2 and conv3 one vector per group)
    assert {t.name for t in got.tensors if t.status == "changed"} == {
        "conv1.weight", "conv1.bias", "conv2.weight", "conv3.weight", "lin.weight"}
    assert got.summary.scope["ia3"]["values"] == 8 + 8 + 8 + 6


def test_a_classifier_head_in_modules_to_save_is_compared_beside_the_vectors(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0)
    m = transformers.LlamaForSequenceClassification(cfg)
    m.save_pretrained(tmp_path / "base")
    pm = _trained(m, peft.IA3Config(task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    got = _same_as_merged(tmp_path, tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert got.tensor("score.weight").status == "changed" and got.tensor("score.weight").note is None


@pytest.mark.parametrize("tie", [True, False])
def test_ia3_on_the_lm_head_scales_the_copy_peft_saves_and_a_tied_table(tmp_path, tie):
    """IA3 on lm_head: PEFT saves `lm_head.base_layer.weight` beside the vector (read as another tensor, it made
    an untied head read as a head added and a tied one be refused as "no weight in the base"); on a base that
    ties its head, the merge scales the one table the head and the embedding read (the merged model stays tied)."""
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "base")
    pm = _trained(m, peft.IA3Config(target_modules=["lm_head", "k_proj"], feedforward_modules=[]))
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    got = _same_as_merged(tmp_path, tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert got.tensor(head).status == "changed" and got.tensor(head).note.startswith(
        "IA3 vector `base_model.model.lm_head.ia3_l` (64 values)")
    assert [t.name for t in got.tensors if t.status == "changed"] == sorted(
        [head, "model.layers.0.self_attn.k_proj.weight"], key=[t.name for t in got.tensors].index)
    assert any("scales the base embedding" in n for n in got.plan["notes"]) == tie


DT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@pytest.mark.parametrize("wdt", list(DT))
@pytest.mark.parametrize("ldt", list(DT))
def test_the_merge_rounds_as_torch_mul_and_cast(wdt, ldt):
    """``torch.mul(W, l).to(W.dtype)``, bit for bit, on values spread over the formats' ranges (subnormals,
    products past the largest float16, ties)."""
    from weightdiff.kernels import reference
    from weightdiff.measure.compute import _cast_chain, _promoted

    rng = np.random.default_rng(hash((wdt, ldt)) % 2**32)
    w = torch.tensor(np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
                                     [65504.0, -65504.0, 6e-8, 1.0, 3.0, 0.0, -0.0]])).to(DT[wdt])
    l = torch.tensor(np.concatenate([1 + rng.standard_normal(2000) * 0.3, [1.5, -2.0, 0.5, 1 + 2 ** -8,
                                                                          1 + 3 * 2 ** -9, 7.0, -1.0]])).to(DT[ldt])
    want = torch.mul(w, l).to(DT[wdt]).double().numpy()
    assert _promoted(wdt, ldt) == {v: k for k, v in DT.items()}[torch.promote_types(DT[wdt], DT[ldt])]
    w64, l64 = w.double().numpy(), l.double().numpy()
    got = _cast_chain(w64 * l64, _promoted(wdt, ldt), wdt)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(got, want)
    assert reference.round_to(got, wdt).tolist() == got.tolist()


# -- hostile ------------------------------------------------------------------------------------------------------

PRE = "base_model.model."
K, D = "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"
CFG = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


def _pair(tmp_path, rng, config=None, vectors=None, base_extra=None):
    (tmp_path / "base").mkdir()
    base = {f"{K}.weight": rng.standard_normal((8, 16)).astype(np.float32),
            f"{D}.weight": rng.standard_normal((16, 32)).astype(np.float32)}
    base.update(base_extra or {})
    save_file(tmp_path / "base" / "model.safetensors", base)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CFG if config is None else config))
    vec = {f"{K}.ia3_l": (1 + 0.1 * rng.standard_normal((8, 1))).astype(np.float32),
           f"{D}.ia3_l": (1 + 0.1 * rng.standard_normal((1, 32))).astype(np.float32)}
    vec.update(vectors or {})
    save_file(tmp_path / "ad" / "adapter_model.safetensors", {PRE + k: v for k, v in vec.items() if v is not None})
    return tmp_path / "base", tmp_path / "ad"


def test_a_regex_feedforward_modules_and_a_bias_in_float64(tmp_path, rng):
    base, ad = _pair(tmp_path, rng, {**CFG, "feedforward_modules": r".*\.mlp\.down_proj"},
                     base_extra={f"{K}.bias": rng.standard_normal(8)})
    r = weightdiff.compare(str(base), str(ad))
    assert r.summary.verdict == "derived" and r.summary.scope["ia3"] == {"tensors": 3, "vectors": 2, "values": 40}
    b = r.tensor(f"{K}.bias")
    assert b.dtype_tuned == "F64" and b.status == "changed"
    # the merged bias is b x l in float64
    from safetensors.numpy import load_file
    l = load_file(ad / "adapter_model.safetensors")[f"{PRE}{K}.ia3_l"].astype(np.float64).ravel()
    bias = load_file(base / "model.safetensors")[f"{K}.bias"]
    assert b.norm_delta == pytest.approx(float(np.linalg.norm(bias * l - bias)), rel=1e-12)


@pytest.mark.parametrize("config, vectors, base_extra, expect", [
    (None, {f"{D}.ia3_l": np.ones((32, 1), np.float32)}, None,
     "is [32, 1], as PEFT stores a module that scales its outputs, but feedforward_modules lists"),
    ({**CFG, "feedforward_modules": ["o_proj"]}, None, None,
     "is [1, 32], as PEFT stores a module that scales its inputs, but feedforward_modules does not list"),
    (None, {f"{K}.ia3_l": np.full((8, 1), np.nan, np.float32)}, None, "holds NaN or Inf values"),
    (None, {f"{K}.ia3_l": np.ones((9, 1), np.float32)}, None, "does not fit the base weight"),
    (None, {f"{K}.ia3_l": np.ones((8, 1), np.int32)}, None, "is I32; expected float16, bfloat16, float32 or"),
    # a float8 vector or bias: torch has no promotion to reproduce (it reached the merge as an internal error)
    (None, {f"{K}.ia3_l": ("F8_E4M3", np.full((8, 1), 0x38, np.uint8))}, None, "is F8_E4M3; expected float16"),
    (None, None, {f"{K}.bias": ("F8_E4M3", np.full(8, 0x38, np.uint8))}, "is F8_E4M3 [8], not 8 floats"),
    (None, {f"{K}.ia3_l": np.ones((2, 4, 1), np.float32)}, None, "PEFT stores [1, in] or [out, 1]"),
    (None, {"model.layers.0.self_attn.q_proj.ia3_l": np.ones((8, 1), np.float32)}, None,
     "IA3 target `model.layers.0.self_attn.q_proj.weight` has no weight in the base"),
    ({**CFG, "feedforward_modules": "(a+)+$"}, None, None, "feedforward_modules nests one repetition"),
    ({**CFG, "feedforward_modules": 3}, None, None, "feedforward_modules = 3, expected a list"),
    ({**CFG, "feedforward_modules": None}, {"model.conv.ia3_l": np.ones((1, 4, 1, 1), np.float32)},
     {"model.conv.weight": np.ones((4, 2, 3, 3), np.float32)}, "no feedforward_modules to say whether"),
    (None, None, {f"{K}.bias": np.ones(7, np.float32)}, "not 8 floats"),
    ({**CFG, "init_ia3_weights": "yes"}, None, None, "init_ia3_weights = \"yes\", expected true or false"),
    (None, {f"{K}.base_layer.weight": np.ones((9, 16), np.float32)}, None,
     "base layer `base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight` saved in the adapter is "
     "[9, 16] but the base weight"),
    (None, {f"{K}.base_layer.weight": np.ones((8, 16), np.int8)}, None,
     "saved in the adapter is I8; expected float16, bfloat16, float32 or float64"),
    (None, {f"{K}.ia3_l": None, f"{D}.ia3_l": None, f"{K}.weight": np.ones((8, 16), np.float32)}, None,
     "IA3 adapter holds no IA3 vectors (`<module>.ia3_l`) among its 1 tensors"),
    (None, {f"{K}.lora_A.weight": np.ones((2, 16), np.float32)}, None,
     "adapter holds LoRA factors (`base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight`) but"),
    ({"peft_type": "LORA", "r": 2}, None, None, "adapter holds IA3 vectors (`base_model.model.model.layers.0"),
])
def test_hostile_ia3_adapters_are_one_line_exit_2(tmp_path, rng, config, vectors, base_extra, expect):
    base, ad = _pair(tmp_path, rng, config, vectors, base_extra)
    contract(["compare", str(base), str(ad)], ad, expect, tmp_path)


def test_a_quantized_base_weight_is_refused(tmp_path, rng):
    from weightdiff.io.safetensors_write import to_storage

    base, ad = _pair(tmp_path, rng)
    w = rng.standard_normal((8, 16))
    shutil.rmtree(base)
    base.mkdir()
    save_file(base / "model.safetensors", {f"{K}.weight": ("F8_E4M3", to_storage(w, "F8_E4M3")),
                                           f"{D}.weight": rng.standard_normal((16, 32)).astype(np.float32)})
    contract(["compare", str(base), str(ad)], ad, "which is F8_E4M3: weightdiff merges IA3 vectors into float16",
             tmp_path)


def test_inspect_names_the_vectors(tmp_path, rng):
    from click.testing import CliRunner

    from weightdiff.cli import main

    _, ad = _pair(tmp_path, rng)
    r = CliRunner().invoke(main, ["inspect", str(ad), "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)["adapter"]
    assert a == {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"],
                 "base_model": None, "vectors": 2, "scaling_inputs": 1}
    text = CliRunner().invoke(main, ["inspect", str(ad)]).stdout
    assert "adapter     IA3, 2 vectors (1 scaling a layer's inputs, 1 its outputs)" in text
    assert "format      PEFT IA3 adapter, 1 file" in text


def test_module_names_holding_a_newline_are_read_as_modules(tmp_path, rng):
    """A name may hold any character: `c\\nx.ia3_l` was not read as a vector (the pattern stopped at the newline),
    so an IA3 adapter read as one tensor added; so were LoRA factors under such a module."""
    m = "model.c\nx"
    base, ad = _pair(tmp_path, rng, {**CFG, "target_modules": ["k_proj", "down_proj", "x"]},
                     vectors={f"{m}.ia3_l": (1 + 0.1 * rng.standard_normal((4, 1))).astype(np.float32)},
                     base_extra={f"{m}.weight": rng.standard_normal((4, 6)).astype(np.float32)})
    r = weightdiff.compare(str(base), str(ad))
    assert r.tensor(f"{m}.weight").status == "changed" and not r.summary.tensors_by_status.get("added")
    assert r.summary.scope["ia3"]["vectors"] == 3

    lo = tmp_path / "lora"
    lo.mkdir()
    (lo / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file(lo / "adapter_model.safetensors", {
        f"{PRE}{m}.lora_A.weight": rng.standard_normal((2, 6)).astype(np.float32),
        f"{PRE}{m}.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32)})
    r = weightdiff.compare(str(base), str(lo))
    t = r.tensor(f"{m}.weight")
    assert t.compared == "factors" and t.rank.numerical_rank == 2 and not r.summary.tensors_by_status.get("added")


def test_an_adapter_that_changes_nothing_says_so_in_its_title(tmp_path, rng):
    """IA3 vectors all ones (as PEFT initialises them) and a LoRA whose B is all zero: the merged model is the
    base, bit for bit; the title said "every tensor is bitwise equal to the base", as if the adapter's own tensors
    were the base's."""
    base, ad = _pair(tmp_path, rng, vectors={f"{K}.ia3_l": np.ones((8, 1), np.float32),
                                             f"{D}.ia3_l": np.ones((1, 32), np.float32)})
    s = weightdiff.compare(str(base), str(ad)).summary
    title = "IDENTICAL: this base with the adapter applied is bitwise this base: the adapter changes no weight."
    assert s.verdict == "identical" and "adapter" in s.flags and s.headline[0] != title
    from weightdiff.render.sentences import verdict_title

    assert verdict_title(s.to_dict()) == title
    lo = tmp_path / "lora"
    lo.mkdir()
    (lo / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(lo / "adapter_model.safetensors", {f"{PRE}{K}.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
                                                 f"{PRE}{K}.lora_B.weight": np.zeros((8, 2), np.float32)})
    s = weightdiff.compare(str(base), str(lo)).summary
    assert s.verdict == "identical" and verdict_title(s.to_dict()) == title
