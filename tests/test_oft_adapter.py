"""PEFT's OFT adapters: each module measured as the weight PEFT's merge gives, W R^T (R the block-diagonal rotation
of the layer's inputs, from the saved skew-symmetric parameters by the Cayley transform or its Neumann series),
checked against PEFT 0.21's own rotation (``get_delta_weight``) and ``merge_and_unload()``."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.io.peft_adapter import AdapterConfig
from weightdiff.io.peft_oft import block_rotation, merge_rows, oft_layout
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _config(**kw) -> AdapterConfig:
    raw = {"r": 0, "oft_block_size": 0, "block_share": False, "coft": False, "eps": 6e-5, "use_cayley_neumann": True,
           "num_cayley_neumann_terms": 5, **kw}
    return AdapterConfig(raw["r"], 0.0, [], False, False, None, raw, peft_type="OFT")


CASES = [dict(zip(("rb", "block_share", "coft", "use_cayley_neumann", "num_cayley_neumann_terms"), c))
         for c in itertools.product([(0, 8), (4, 0), (0, 5), (3, 0), (0, 48)], [False, True], [False, True],
                                    [False, True], [1, 2, 3, 5, 6])]


def test_rotations_and_merges_are_peft_own_in_every_form():
    """On a 24 x 32 Linear in float64: r or oft_block_size (5 and 3 moved to a divisor, 48 past the width), one block
    shared, coft, the exact Cayley transform or 1-6 Neumann terms: the block-diagonal rotation is PEFT's
    ``get_delta_weight`` and the merged weight its ``merge_and_unload``'s, to float64 round-off (160 forms)."""
    worst = 0.0
    for case in CASES:
        (r, bs), kw = case["rb"], {k: v for k, v in case.items() if k != "rb"}
        eps = 0.5 if kw["coft"] else 6e-5
        torch.manual_seed(1)
        model = torch.nn.Sequential()
        model.add_module("q_proj", torch.nn.Linear(32, 24).double())
        w = model.q_proj.weight.detach().numpy().copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, peft.OFTConfig(r=r, oft_block_size=bs, target_modules=["q_proj"],
                                                           init_weights=False, eps=eps, **kw))
        layer = pm.base_model.model.q_proj
        vec = layer.oft_R["default"].weight.detach().numpy().copy()
        want = layer.get_delta_weight("default").detach().numpy()
        config = _config(r=r, oft_block_size=bs, eps=eps, **kw)
        blocks, b = oft_layout(config, 32)
        assert want.shape == (blocks * b, blocks * b) == (32, 32)
        rot = block_rotation(config, vec, blocks, b)
        got = np.zeros((32, 32))
        for k in range(blocks):
            got[k * b:(k + 1) * b, k * b:(k + 1) * b] = rot[k]
        pm.merge_and_unload()
        merged = model.q_proj.weight.detach().numpy()
        worst = max(worst, float(np.abs(got - want).max()), float(np.abs(merge_rows(w, rot, False) - merged).max()))
    assert worst < 1e-12, worst


def _llama(dtype):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval().to(dtype)


def _records(path_a, path_b):
    doc = weightdiff.compare(str(path_a), str(path_b)).to_dict()
    return doc, {r["name"]: r for r in doc["tensors"]}


def adapter_and_merged(tmp_path, model, cfg, back=None):
    """PEFT's adapter of ``model`` under ``cfg`` and its merged model (cast to ``back``) saved beside
    ``tmp_path / "base"``: the documents and records of each against it, and the tensors the merged model changes
    (the adapter's changed ones must be the same)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
        pm.save_pretrained(tmp_path / "ad")
        done = pm.merge_and_unload()
        (done if back is None else done.to(back)).save_pretrained(tmp_path / "merged")
    got, ad = _records(tmp_path / "base", tmp_path / "ad")
    want, merged = _records(tmp_path / "base", tmp_path / "merged")
    changed = sorted(n for n, r in merged.items() if r["status"] == "changed")
    assert sorted(n for n, r in ad.items() if r["status"] == "changed") == changed
    return got, ad, want, merged, changed


@pytest.mark.parametrize("dtype, config", [
    ("float32", dict(oft_block_size=8)),
    ("bfloat16", dict(oft_block_size=8)),
    ("float32", dict(r=4, oft_block_size=0, block_share=True)),
    ("float16", dict(oft_block_size=16, coft=True, eps=0.05, use_cayley_neumann=False)),
])
def test_oft_adapters_read_as_their_merged_model(tmp_path, dtype, config):
    torch.manual_seed(0)
    model = _llama(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "base")
    cfg = peft.OFTConfig(target_modules=["q_proj", "down_proj", "embed_tokens"], init_weights=False,
                         **{"r": 0, **config})
    got, ad, want, merged, changed = adapter_and_merged(tmp_path, model, cfg)
    assert len(changed) == 5
    for n in changed:
        a, m = ad[n], merged[n]
        assert a["note"].startswith("OFT rotation `base_model.model.") and "as PEFT merges it" in a["note"]
        if dtype == "float32":      # torch's float32 product against float64 rounded once: a last-bit difference
            assert a["norm_delta"] == pytest.approx(m["norm_delta"], rel=1e-6)
            assert a["cosine"] == pytest.approx(m["cosine"], abs=1e-7)
        elif dtype == "bfloat16":   # the product rounded to 8 bits: the same stored weights
            assert (a["norm_delta"], a["cosine"], a["frac_changed"]) == (m["norm_delta"], m["cosine"],
                                                                          m["frac_changed"])
        else:   # float16 under torch's float32 solve: a rotation entry may round to the neighbouring float16
            assert a["norm_delta"] == pytest.approx(m["norm_delta"], rel=1e-3)
            assert a["cosine"] == pytest.approx(m["cosine"], abs=1e-5)
    assert got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"
    assert "adapter" in got["summary"]["flags"]
    # the merged weights differ from the base in every direction; the adapter adds only its rotations' parameters
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        values = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if ".oft_" in k)
    assert got["summary"]["scope"]["oft"] == {"tensors": 5, "values": values}
    assert f"The adapter itself adds {values:,} numbers to the base (OFT rotations of the inputs of 5 layers)." in \
        got["summary"]["headline"]
    from weightdiff.render.sentences import plain_language

    assert any(x.startswith(f"The adapter itself adds {values:,} numbers to the base: OFT rotations of the inputs of "
                            "5 layers, each merged weight") for x in plain_language(got))
    assert any("5 OFT modules (each measured as the weight PEFT's merge gives" in x for x in got["plan"]["notes"])


def conv_records(tmp_path, config, out: int = 5) -> tuple[dict, dict]:
    """A Conv2d (4 channels in, ``out`` out, 3 x 3 kernels) and a head, adapted by PEFT with ``config``: the records
    of the adapter and of PEFT's merged model against the base."""
    torch.manual_seed(2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, out, 3)
            self.head = torch.nn.Linear(out, 3)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    net = Net().eval()
    (tmp_path / "base").mkdir()
    save_file(tmp_path / "base" / "model.safetensors", {k: v.numpy().copy() for k, v in net.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(net, config)
        pm.save_pretrained(tmp_path / "ad")
        merged = pm.merge_and_unload()
    (tmp_path / "merged").mkdir()
    save_file(tmp_path / "merged" / "model.safetensors", {k: v.numpy().copy() for k, v in merged.state_dict().items()})
    return _records(tmp_path / "base", tmp_path / "ad")[1], _records(tmp_path / "base", tmp_path / "merged")[1]


def test_a_conv2d_oft_reads_as_its_merged_model(tmp_path):
    """A Conv2d is rotated as PEFT views it, [out, in x k x k]: 3 x 3 kernels on 4 channels, 36 inputs in blocks
    of 9 (oft_block_size 8 moved to 9, the nearer divisor, as PEFT moves it)."""
    ad, mg = conv_records(tmp_path, peft.OFTConfig(oft_block_size=8, target_modules=["conv"], init_weights=False))
    assert "(144 values; 4 blocks of 9," in ad["conv.weight"]["note"]
    assert ad["conv.weight"]["norm_delta"] == pytest.approx(mg["conv.weight"]["norm_delta"], rel=1e-6)
    assert ad["conv.weight"]["cosine"] == pytest.approx(mg["conv.weight"]["cosine"], abs=1e-7)
    assert ad["head.weight"]["status"] == "unchanged"


def write_pair(tmp_path, rng, config: dict, tensors: dict, base_extra=None):
    """A base with a [16, 32] q_proj (and ``base_extra``) and an adapter of ``config`` and ``tensors``."""
    base = tmp_path / "base"
    base.mkdir(parents=True, exist_ok=True)
    save_file(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 32)).astype(
        np.float32), **(base_extra or {})})
    ad = tmp_path / "ad"
    ad.mkdir(parents=True, exist_ok=True)
    (ad / "adapter_config.json").write_text(json.dumps(config))
    save_file(ad / "adapter_model.safetensors", tensors)
    return base, ad


def _written(tmp_path, rng, config=None, tensors=None, base_extra=None):
    cfg = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj"], "peft_version": "0.21.2"}
    t = {"base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight": (0.1 * rng.standard_normal((4, 28))).astype(
        np.float32)} if tensors is None else tensors
    return write_pair(tmp_path, rng, cfg if config is None else {**cfg, **config}, t, base_extra)


def test_a_written_oft_is_measured_as_numpy_merges_it(tmp_path, rng):
    base, ad = _written(tmp_path, rng)
    rec = weightdiff.compare(str(base), str(ad)).tensor("model.layers.0.self_attn.q_proj.weight")
    from safetensors.numpy import load_file

    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    q = load_file(str(ad / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"].astype(np.float64)
    rows, cols = np.triu_indices(8, 1)
    rot = np.zeros((32, 32))
    for k in range(4):
        s = np.zeros((8, 8))
        s[rows, cols] = q[k]
        s = s - s.T
        s2 = s @ s
        rot[8 * k:8 * k + 8, 8 * k:8 * k + 8] = np.eye(8) + 2 * s + 2 * s2 + 2 * s2 @ s + s2 @ s2
    merged = (w @ rot.T).astype(np.float32).astype(np.float64)
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(merged - w)), rel=1e-6)
    assert rec.to_dict()["compared"] != "factors" and rec.rank.numerical_rank == 16      # dense: W's rank


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("config, tensors, base_extra, expect", [
    ({"oft_block_size": None}, None, None, "oft_block_size = None, expected an integer"),
    ({"r": 4, "oft_block_size": 8}, None, None, "OFT takes exactly one of them"),
    ({"r": 0, "oft_block_size": 0}, None, None, "OFT takes exactly one of them"),
    ({"r": "4", "oft_block_size": 0}, None, None, "r = \"4\", expected an integer"),
    ({"num_cayley_neumann_terms": -1}, None, None, "num_cayley_neumann_terms = -1"),
    ({"coft": "true"}, None, None, "coft = \"true\", expected true or false"),
    ({"eps": 10 ** 400}, None, None, "expected a finite number"),
    (None, {f"{Q}.oft_R.weight": np.zeros((4, 27), np.float32)}, None,
     "is [4, 27], but PEFT builds [4, 28] on `model.layers.0.self_attn.q_proj.weight` (32 inputs in 4 blocks of 8"),
    ({"block_share": True}, None, None, "is [4, 28], but PEFT builds [1, 28]"),
    (None, {f"{Q}.oft_R.weight": np.full((4, 28), np.nan, np.float32)}, None, "holds NaN or Inf values"),
    (None, {f"{Q}.oft_R.weight": np.full((4, 28), 1e30, np.float32)}, None, "makes rotation blocks of norm"),
    (None, {f"{Q}.oft_R.weight": np.zeros((4, 28), np.int32)}, None, "is I32 [4, 28]; expected a float matrix"),
    (None, {f"{Q}.oft_r": np.zeros((4, 8, 8), np.float32)}, None, "PEFT's OFT before 0.14"),
    (None, {f"{Q}.oft_R.weight": np.zeros((4, 28), np.float32), f"{Q}.lora_A.weight": np.zeros((2, 32), np.float32)},
     None, "which is not OFT's (oft_R)"),
    (None, {"base_model.model.model.layers.9.mlp.oft_R.weight": np.zeros((4, 28), np.float32)}, None,
     "has no weight in the base"),
    (None, {"base_model.model.transformer.h.0.attn.c_proj.oft_R.weight": np.zeros((4, 28), np.float32)},
     {"transformer.h.0.attn.c_proj.weight": np.zeros((32, 32), np.float32)}, "GPT-2's Conv1D"),
    (None, {"base_model.model.conv.oft_R.weight": np.zeros((4, 28), np.float32)},
     {"conv.weight": np.zeros((4, 2, 4, 2), np.float32)}, "a Conv2d of kernel [4, 2]"),
])
def test_hostile_oft_adapters_are_one_line_exit_2(tmp_path, rng, config, tensors, base_extra, expect):
    if config and config.get("oft_block_size", 1) is None:
        config = {**config}
        config.pop("oft_block_size")
        base, ad = _written(tmp_path, rng, tensors=tensors, base_extra=base_extra)
        raw = json.loads((ad / "adapter_config.json").read_text())
        raw.pop("oft_block_size")
        (ad / "adapter_config.json").write_text(json.dumps(raw))
        expect = "has no oft_block_size: an adapter from PEFT before 0.14"
    else:
        base, ad = _written(tmp_path, rng, config, tensors, base_extra)
    contract(["compare", str(base), str(ad)], ad, expect, tmp_path)


def test_a_quantized_base_is_refused(tmp_path, rng):
    from gguf_build import to_gguf
    import gguf

    t = {"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    gbase = to_gguf(tmp_path / "base.gguf", t, qtype=gguf.GGMLQuantizationType.Q8_0, n_head=4)
    _, ad = _written(tmp_path, rng)
    contract(["compare", str(gbase), str(ad)], ad, "which is quantized: weightdiff merges OFT into float16", tmp_path)


def test_an_adapter_from_before_peft_0_18_says_which_series_is_measured(tmp_path, rng):
    base, ad = _written(tmp_path, rng, {"peft_version": "0.17.1"})
    rec = weightdiff.compare(str(base), str(ad)).tensor("model.layers.0.self_attn.q_proj.weight")
    assert "saved by a PEFT before 0.18, whose Cayley-Neumann series differed" in rec.note


def test_inspect_names_the_rotation(tmp_path, rng):
    _, ad = _written(tmp_path, rng, {"coft": True, "eps": 0.01})
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0, r.output
    assert "PEFT OFT adapter" in r.output and "adapter     OFT oft_block_size=8, Cayley-Neumann 5 terms, coft " \
                                              "eps=0.01, 1 module" in r.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).stdout)["adapter"]
    assert doc["peft_type"] == "OFT" and doc["oft_block_size"] == 8 and doc["coft"] is True and doc["modules"] == 1


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_written(tmp_path, rng), 1)


def test_a_wrapped_oft_state_dict_is_inconclusive(tmp_path):
    """An OFT-wrapped model saved whole (``m.base_layer.weight`` beside ``m.oft_R.default.weight``) computes the
    rotated weight; read by name it was the base's unchanged plus one tensor added."""
    from safetensors.torch import save_file as torch_save

    torch.manual_seed(3)
    model = _llama(torch.float32)
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"],
                                                       init_weights=False))
    (tmp_path / "wrapped").mkdir()
    torch_save({k: v.contiguous() for k, v in pm.base_model.model.state_dict().items()},
               str(tmp_path / "wrapped" / "model.safetensors"))
    doc = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "wrapped")).to_dict()
    assert doc["summary"]["verdict"] == "inconclusive" and "unmerged_adapter" in doc["summary"]["flags"]
