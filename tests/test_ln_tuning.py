"""PEFT's LN tuning adapters (``peft_type`` LN_TUNING): trained copies of whole layers, which PEFT's merge swaps in
for the base's; each copied tensor compared with the base's tensor it replaces, checked against PEFT 0.21's own
``merge_and_unload()``, and bad input refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _saved(tmp_path, model, targets=None):
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LNTuningConfig(target_modules=targets))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        pm.save_pretrained(tmp_path / "ad")
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged"


def _llama(dtype):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval().to(dtype)


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


def _same_as_merged(base, ad, merged):
    got = weightdiff.compare(str(base), str(ad)).to_dict(include_run=False)
    want = weightdiff.compare(str(base), str(merged)).to_dict(include_run=False)
    g, w = ({t["name"]: t for t in d["tensors"]} for d in (got, want))
    assert g.keys() == w.keys()
    changed = sorted(n for n, t in w.items() if t["status"] == "changed")
    assert changed and sorted(n for n, t in g.items() if t["status"] == "changed") == changed
    for n in changed:
        assert {k: v for k, v in g[n].items() if k != "note"} == {k: v for k, v in w[n].items() if k != "note"}, n
        assert g[n]["note"].startswith("LN tuning: the adapter's trained copy `base_model.model."), g[n]["note"]
        assert ".ln_tuning_layers." in g[n]["note"] and w[n].get("note") is None
    assert got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"
    assert "adapter" in got["summary"]["flags"] and "adapter" not in want["summary"]["flags"]
    for k in ("tensors_by_status", "params_by_status", "relative_change", "delta_params"):
        assert got["summary"][k] == want["summary"][k], k
    return got, changed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_norm_copies_read_as_the_merged_model(tmp_path, dtype):
    """PEFT's default targets for Llama (every RMSNorm): each copy, compared with the base's norm weight, gives the
    merged model's record, field for field."""
    got, changed = _same_as_merged(*_saved(tmp_path, _llama(getattr(torch, dtype))))
    assert len(changed) == 5 and "model.norm.weight" in changed          # 2 layers x 2 norms, and the final one
    assert any(x.startswith("adapter: LN tuning, 5 tensors of the trained layer copies") for x in got["plan"]["notes"])


def test_gpt2_layer_norm_copies_with_their_biases(tmp_path):
    """GPT-2's LayerNorms hold a weight and a bias: both copied, both compared with the base's."""
    got, changed = _same_as_merged(*_saved(tmp_path, _gpt2(), ["ln_1", "ln_f"]))
    assert changed == sorted(["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.h.1.ln_1.weight",
                              "transformer.h.1.ln_1.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"])


def test_a_copy_of_another_layer_type_reads_as_merged(tmp_path):
    """LN tuning copies whatever module it targets: a Linear (q_proj) copy is its whole weight, a dense change."""
    got, changed = _same_as_merged(*_saved(tmp_path, _llama(torch.float32), ["q_proj"]))
    assert changed == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_inspect_names_the_copies(tmp_path):
    _, ad, _ = _saved(tmp_path, _gpt2(), ["ln_1", "ln_f"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0, r.output
    assert "format      PEFT LN tuning adapter, 1 file" in r.output
    assert "adapter     LN tuning, 3 trained layer copies (6 tensors), each swapped in for the base's layer" in r.output
    r = CliRunner().invoke(main, ["inspect", str(ad), "--json"])
    a = json.loads(r.output)["adapter"]
    assert a == {"peft_type": "LN_TUNING", "target_modules": ["ln_1", "ln_f"], "base_model": None, "layers": 3,
                 "tensors": 6}


def test_a_rerun_from_the_record_cache_gives_the_same_json(tmp_path):
    base, ad, _ = _saved(tmp_path, _llama(torch.float32))
    out = []
    for i in range(2):
        r = CliRunner().invoke(main, ["compare", str(base), str(ad), "--cache", str(tmp_path / "c"), "-q",
                                      "--json", str(tmp_path / f"{i}.json")])
        assert r.exit_code == 0, r.output
        doc = json.loads((tmp_path / f"{i}.json").read_text())
        doc.pop("run")
        out.append(doc)
    assert out[0] == out[1]


# -- bad input ---------------------------------------------------------------------------------------------------

PRE = "base_model.model."
NORM = "model.layers.0.input_layernorm"


def _write(tmp_path, tensors):
    base = tmp_path / "base"
    base.mkdir()
    save_file(base / "model.safetensors", {f"{NORM}.weight": np.ones(32, np.float32),
                                           "model.layers.0.self_attn.q_proj.weight": np.eye(32, dtype=np.float32)})
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LN_TUNING", "target_modules": ["input_layernorm"]}))
    save_file(ad / "adapter_model.safetensors", tensors)
    return base, ad


@pytest.mark.parametrize("tensors, expect", [
    ({f"{PRE}{NORM}.ln_tuning_layers.weight": np.ones(32, np.float32),
      f"{PRE}model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32)},
     "adapter holds LoRA tensors (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) but "
     "adapter_config.json says peft_type LN_TUNING"),
    ({f"{PRE}{NORM}.weight": np.ones(32, np.float32)}, "but the adapter holds no trained layer copy"),
    ({f"{PRE}{NORM}.ln_tuning_layers.default.weight": np.ones(32, np.float32)},
     "which is no parameter of a trained layer copy"),
    ({f"{PRE}model.layers.7.input_layernorm.ln_tuning_layers.weight": np.ones(32, np.float32)},
     "replaces `model.layers.7.input_layernorm.weight`, which the base"),
    ({f"{PRE}{NORM}.ln_tuning_layers.weight": np.ones(31, np.float32)},
     "replaces `model.layers.0.input_layernorm.weight`, which the base has as [32], not [31]"),
    ({f"{PRE}{NORM}.ln_tuning_layers.bias": np.ones(32, np.float32)},
     "replaces `model.layers.0.input_layernorm.bias`, which the base"),
])
def test_bad_ln_tuning_adapters_are_refused_in_one_line(tmp_path, tensors, expect):
    base, ad = _write(tmp_path, tensors)
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", expect, tmp_path)


def test_ln_tuning_copies_under_a_lora_config_are_refused(tmp_path):
    base, ad = _write(tmp_path, {f"{PRE}{NORM}.ln_tuning_layers.weight": np.ones(32, np.float32)})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                        "target_modules": ["q_proj"]}))
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", "LN tuning", tmp_path)


def test_a_worker_measures_the_copies_as_the_parent_does(tmp_path):
    """A Dask worker plans again from the headers (``split.measure_task``): its records of the copied tensors, note
    included, are the parent's (the block and module are filled in by the parent)."""
    from weightdiff.comparison import check_adapter_plan
    from weightdiff.io.checkpoint import locate
    from weightdiff.options import CompareOptions
    from weightdiff.pairing.plan import plan as make_plan
    from weightdiff.split import measure_task, plan_digest

    base, ad, _ = _saved(tmp_path, _gpt2(), ["ln_1"])
    local = weightdiff.compare(str(base), str(ad))
    with locate(base) as b, locate(ad) as t:
        parent = make_plan([b], t)
        check_adapter_plan(parent, [b], t)
        digest = plan_digest(parent)
    idx = [i for i, p in enumerate(parent.pairs) if p.tuned_source and ".ln_tuning_layers." in p.tuned_source]
    status, records = measure_task([str(base)], str(ad), CompareOptions(), idx, digest)
    assert status == "ok" and len(records) == 4, records
    for r in records:
        want = local.tensor(r.name).to_dict()
        assert r.note.startswith("LN tuning: the adapter's trained copy")
        assert {k for k, v in r.to_dict().items() if want.get(k) != v} <= {"block", "module"}
