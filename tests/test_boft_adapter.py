"""PEFT's BOFT adapters: each module measured as the weight PEFT's merge gives, (W M^T) s (M the butterfly rotation
of the layer's inputs: Cayley blocks, block-diagonal per factor, conjugated by PEFT's butterfly permutations; s a
scale per output), checked against PEFT 0.21's own permutations, ``get_delta_weight`` and ``merge_and_unload()``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import weightdiff
from weightdiff.io.peft_boft import butterfly_perm, cayley, merge_boft_rows
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract
from test_oft_adapter import _records

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _layer(features: int = 32, block_size: int = 4):
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(features, 24).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.BOFTConfig(boft_block_size=block_size, target_modules=["q_proj"],
                                                       init_weights=False))
    return model, pm.base_model.model.q_proj


@pytest.mark.parametrize("n, b, r, factors", [(32, 8, 2, 1), (32, 4, 2, 2), (64, 16, 1, 3), (48, 6, 2, 1),
                                              (16, 2, 4, 1), (12, 3, 2, 0)])
def test_butterfly_permutations_are_peft_own(n, b, r, factors):
    _, layer = _layer()
    want = layer.block_butterfly_perm(n, b, r, factors).numpy()
    assert butterfly_perm(n, b, r, factors).tolist() == want.tolist()


def test_one_factor_is_peft_own_rotation_and_merge():
    """On the CPU PEFT builds one butterfly factor: its rotation M (``get_delta_weight``) and merged weight, in
    float64, are this module's to round-off."""
    torch.manual_seed(1)
    model, layer = _layer()
    w = model.q_proj.base_layer.weight.detach().numpy().copy() if hasattr(model.q_proj, "base_layer") else None
    w = layer.get_base_layer().weight.detach().numpy().copy()
    blocks = layer.boft_R["default"].detach().numpy().copy()
    s = layer.boft_s["default"].detach().numpy().copy()
    m_peft, _ = layer.get_delta_weight("default")
    rots = cayley(blocks.reshape(-1, 4, 4)).reshape(blocks.shape)
    perms = [butterfly_perm(32, 8, 2, 0)]
    got = merge_boft_rows(np.eye(32), rots, perms)          # I M^T
    np.testing.assert_allclose(got.T, m_peft.detach().numpy(), atol=1e-13)
    layer.merge()
    merged = layer.get_base_layer().weight.detach().numpy()
    np.testing.assert_allclose(merge_boft_rows(w, rots, perms) * s, merged, atol=1e-12)


@pytest.mark.parametrize("factors, blocks, size", [(2, 8, 4), (3, 8, 2), (2, 4, 8), (4, 16, 2)])
def test_several_factors_multiply_as_peft_builds_them(factors, blocks, size, rng):
    """PEFT builds N > 1 factors with its CUDA extension only: M = T_{N-1} ... T_0, T_i = P_i B_i P_i^T with P_i
    PEFT's own permutation matrices (``perm2mat(block_butterfly_perm(...))``, as ``update_layer`` makes them) and B_i
    ``torch.block_diag`` of the factor's rotations, against this module's gathers and block products."""
    _, layer = _layer()
    n = blocks * size
    a = rng.standard_normal((factors, blocks, size, size))
    rots = cayley(a.reshape(-1, size, size)).reshape(a.shape)
    perms, m = [], torch.eye(n, dtype=torch.float64)
    for i in range(factors):
        perm = layer.block_butterfly_perm(n, blocks // 2 ** i, size // 2, factors - 1)
        p = layer.perm2mat(perm).double()
        b = torch.block_diag(*[torch.from_numpy(x) for x in rots[i]])
        m = (p @ b @ p.T) @ m
        perms.append(butterfly_perm(n, blocks // 2 ** i, size // 2, factors - 1))
    w = rng.standard_normal((5, n))
    np.testing.assert_allclose(merge_boft_rows(w, rots, perms), w @ m.numpy().T, atol=1e-12)


def _llama(dtype):
    from test_oft_adapter import _llama as llama

    torch.manual_seed(0)
    return llama(dtype)


@pytest.mark.parametrize("dtype, config", [
    ("float32", dict(boft_block_size=8)),
    ("bfloat16", dict(boft_block_size=4)),
    ("float32", dict(boft_block_size=0, boft_block_num=4)),
    ("float16", dict(boft_block_size=16)),
])
def test_boft_adapters_read_as_their_merged_model(tmp_path, dtype, config):
    model = _llama(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "base")
    from test_oft_adapter import adapter_and_merged

    # PEFT's Cayley solve runs in float32 (not in half precision): the adapter is trained on the float32 model
    got, ad, want, merged, changed = adapter_and_merged(tmp_path, model.float(), peft.BOFTConfig(
        target_modules=["q_proj", "down_proj"], init_weights=False, **config), getattr(torch, dtype))
    assert len(changed) == 4
    for n in changed:
        a, m = ad[n], merged[n]
        assert a["note"].startswith("BOFT rotation `base_model.model.") and "as PEFT merges it" in a["note"]
        # torch's float32 Cayley solve is not correctly rounded: the rotations differ from these in their last
        # float32 bits, and a merged value near a half-precision rounding boundary may round to its neighbour
        half = dtype != "float32"
        assert a["norm_delta"] == pytest.approx(m["norm_delta"], rel=2e-3 if half else 1e-5)
        assert a["cosine"] == pytest.approx(m["cosine"], abs=1e-4 if half else 1e-6)
    assert got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"
    assert "adapter" in got["summary"]["flags"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        values = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert got["summary"]["scope"]["oft"] == {"tensors": 4, "values": values, "method": "BOFT"}
    assert (f"The adapter itself adds {values:,} numbers to the base (BOFT butterfly rotations of the inputs and "
            "scales of the outputs of 4 layers).") in got["summary"]["headline"]
    assert any("4 BOFT modules (each measured as the weight PEFT's merge gives" in x for x in got["plan"]["notes"])


def test_a_float32_adapter_on_a_float32_base_is_peft_merge_to_float32_round_off(tmp_path):
    """Merged in float32 as PEFT merges (rotations rounded to float32, the product, then the scales): every value
    within float32 round-off of PEFT's, relative to the weight's scale (torch's float32 solve and product round in
    other places)."""
    model = _llama(torch.float32)
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj"],
                                                       init_weights=False))
        pm.save_pretrained(tmp_path / "ad")
        want = pm.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach().numpy()
    from weightdiff.io.checkpoint import locate
    from weightdiff.measure.compute import _boft_merged
    from weightdiff.pairing.plan import plan
    from weightdiff.comparison import check_adapter_plan

    with locate(tmp_path / "base") as b, locate(tmp_path / "ad") as t:
        p = plan([b], t)
        check_adapter_plan(p, [b], t)
        pair = next(x for x in p.pairs if x.lora is not None and x.base_name.startswith("model.layers.0."))
        info, rows = _boft_merged(pair, b, t)
        got = rows(0, info.shape[0])
    assert np.max(np.abs(got.view(np.float32) - want)) < 2e-6 * np.max(np.abs(want))


def test_a_conv2d_boft_reads_as_its_merged_model(tmp_path):
    """A Conv2d is rotated as PEFT views it, [out, in x k x k], its scales saved [1, out]."""
    from test_oft_adapter import conv_records

    ad, mg = conv_records(tmp_path, peft.BOFTConfig(boft_block_size=4, target_modules=["conv"], init_weights=False),
                          out=6)
    assert "9 blocks of 4" in ad["conv.weight"]["note"]
    assert ad["conv.weight"]["norm_delta"] == pytest.approx(mg["conv.weight"]["norm_delta"], rel=1e-6)
    assert ad["head.weight"]["status"] == "unchanged"


def test_an_untrained_adapter_is_the_base(tmp_path):
    """init_weights true: R zero (M = I) and s one: the merged weight is the base's, bit for bit."""
    model = _llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model.float(), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
        pm.save_pretrained(tmp_path / "ad")
    doc, ad = _records(tmp_path / "base", tmp_path / "ad")
    assert all(r["status"] == "unchanged" for r in ad.values())


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _written(tmp_path, rng, config=None, tensors=None, base_extra=None):
    from test_oft_adapter import write_pair

    cfg = {"peft_type": "BOFT", "boft_block_size": 8, "boft_block_num": 0, "boft_n_butterfly_factor": 1,
           "target_modules": ["q_proj"]}
    t = {f"{Q}.boft_R": (0.1 * rng.standard_normal((1, 4, 8, 8))).astype(np.float32),
         f"{Q}.boft_s": (1 + 0.1 * rng.standard_normal((16, 1))).astype(np.float32)} if tensors is None else tensors
    return write_pair(tmp_path, rng, cfg if config is None else {**cfg, **config}, t, base_extra)


def test_a_written_boft_is_measured_as_numpy_merges_it(tmp_path, rng):
    base, ad = _written(tmp_path, rng)
    from safetensors.numpy import load_file

    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    t = load_file(str(ad / "adapter_model.safetensors"))
    a, s = t[f"{Q}.boft_R"].astype(np.float64)[0], t[f"{Q}.boft_s"].astype(np.float64)
    m = np.zeros((32, 32))
    for k in range(4):
        sk = 0.5 * (a[k] - a[k].T)
        m[8 * k:8 * k + 8, 8 * k:8 * k + 8] = (np.eye(8) - sk) @ np.linalg.inv(np.eye(8) + sk)
    merged = ((w @ m.T) * s).astype(np.float32).astype(np.float64)
    rec = weightdiff.compare(str(base), str(ad)).tensor("model.layers.0.self_attn.q_proj.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(merged - w)), rel=1e-6)
    assert rec.to_dict()["compared"] != "factors" and rec.rank.numerical_rank == 16


def test_a_two_factor_adapter_is_measured_as_peft_with_its_extension_merges_it(tmp_path, rng):
    """boft_n_butterfly_factor 2, saved as PEFT builds it with its CUDA extension ([2, 4, 8, 8]): the butterfly
    product of both factors."""
    a = (0.1 * rng.standard_normal((2, 4, 8, 8))).astype(np.float32)
    s = (1 + 0.1 * rng.standard_normal((16, 1))).astype(np.float32)
    base, ad = _written(tmp_path, rng, {"boft_n_butterfly_factor": 2}, {f"{Q}.boft_R": a, f"{Q}.boft_s": s})
    from safetensors.numpy import load_file

    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    _, layer = _layer()
    m = torch.eye(32, dtype=torch.float64)
    for i in range(2):
        p = layer.perm2mat(layer.block_butterfly_perm(32, 4 // 2 ** i, 4, 1)).double()
        blocks = [torch.from_numpy(x) for x in cayley(a[i].astype(np.float64))]
        m = (p @ torch.block_diag(*blocks) @ p.T) @ m
    merged = ((w @ m.numpy().T) * s).astype(np.float32).astype(np.float64)
    rec = weightdiff.compare(str(base), str(ad)).tensor("model.layers.0.self_attn.q_proj.weight")
    assert rec.norm_delta == pytest.approx(float(np.linalg.norm(merged - w)), rel=1e-5)


@pytest.mark.parametrize("config, tensors, base_extra, expect", [
    ({"boft_block_size": 8, "boft_block_num": 4}, None, None, "takes exactly one of them"),
    ({"boft_block_size": 0, "boft_block_num": 0}, None, None, "takes exactly one of them"),
    ({"boft_n_butterfly_factor": 0}, None, None, "boft_n_butterfly_factor = 0"),
    ({"boft_block_size": "8"}, None, None, "boft_block_size = \"8\""),
    ({"boft_block_size": 4}, None, None, "is [1, 4, 8, 8], but PEFT builds [1, 8, 4, 4]"),
    ({"boft_block_size": 5}, None, None, "not divisible by boft_block_size 5"),
    (None, {f"{Q}.boft_R": np.zeros((1, 4, 8, 8), np.float32)}, None, "only one of boft_R and boft_s"),
    (None, {f"{Q}.boft_R": np.zeros((3, 4, 8, 8), np.float32), f"{Q}.boft_s": np.ones((16, 1), np.float32)}, None,
     "PEFT builds [1, 4, 8, 8]"),
    ({"boft_n_butterfly_factor": 4}, {f"{Q}.boft_R": np.zeros((4, 4, 8, 8), np.float32),
                                      f"{Q}.boft_s": np.ones((16, 1), np.float32)}, None,
     "holds 4 butterfly factors of 4 blocks of 8, which PEFT does not build"),
    (None, {"base_model.model.h.0.attn.c_proj.boft_R": np.zeros((1, 4, 8, 8), np.float32),
            "base_model.model.h.0.attn.c_proj.boft_s": np.ones((16, 1), np.float32)},
     {"h.0.attn.c_proj.weight": np.zeros((16, 32), np.float32)}, "GPT-2's Conv1D"),
    (None, {f"{Q}.boft_R": np.zeros((1, 4, 8, 8), np.float32), f"{Q}.boft_s": np.ones((1, 16), np.float32)}, None,
     "one scale per output"),
    (None, {f"{Q}.boft_R": np.zeros((4, 8, 8), np.float32), f"{Q}.boft_s": np.ones((16, 1), np.float32)}, None,
     "expected float blocks"),
    (None, {f"{Q}.boft_R": np.zeros((1, 4, 8, 8), np.float16), f"{Q}.boft_s": np.ones((16, 1), np.float32)}, None,
     "does not run in it"),
    (None, {f"{Q}.boft_R": np.full((1, 4, 8, 8), np.nan, np.float32), f"{Q}.boft_s": np.ones((16, 1), np.float32)},
     None, "NaN or Inf"),
    (None, {f"{Q}.boft_R": np.full((1, 4, 8, 8), 1e30, np.float32), f"{Q}.boft_s": np.ones((16, 1), np.float32)},
     None, "values up to 1e+30"),
    (None, {f"{Q}.boft_R": np.zeros((1, 4, 8, 8), np.float32), f"{Q}.boft_s": np.ones((16, 1), np.float32),
            f"{Q}.lora_A.weight": np.zeros((2, 32), np.float32)}, None, "not BOFT's"),
    (None, {"base_model.model.conv.boft_R": np.zeros((1, 3, 8, 8), np.float32),
            "base_model.model.conv.boft_s": np.ones((1, 6), np.float32)},
     {"conv.weight": np.zeros((6, 4, 3, 2), np.float32)}, "a Conv2d of kernel [3, 2]"),
])
def test_hostile_boft_adapters_are_one_line_exit_2(tmp_path, rng, config, tensors, base_extra, expect):
    base, ad = _written(tmp_path, rng, config, tensors, base_extra)
    in_config = expect.startswith(("takes exactly one", "boft_n_butterfly_factor =", "boft_block_size ="))
    name = ad / ("adapter_config.json" if in_config else "adapter_model.safetensors")
    contract(["compare", str(base), str(ad)], name, expect, tmp_path)


def test_a_quantized_base_is_refused(tmp_path, rng):
    from weightdiff.io.safetensors_write import to_storage

    base, ad = _written(tmp_path, rng)
    save_file(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": (
        "F8_E4M3", to_storage(rng.standard_normal((16, 32)) * 0.1, "F8_E4M3"))})
    contract(["compare", str(base), str(ad)], ad / "adapter_model.safetensors", "which is F8_E4M3", tmp_path)


def test_inspect_names_the_settings(tmp_path, rng):
    from click.testing import CliRunner
    from weightdiff.cli import main

    _, ad = _written(tmp_path, rng)
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0, r.output
    assert "adapter     BOFT boft_block_size=8, 1 butterfly factor, 1 module" in r.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert doc["peft_type"] == "BOFT" and doc["boft_block_size"] == 8 and doc["modules"] == 1


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    from test_lycoris_adapter import assert_worker_matches

    assert_worker_matches(*_written(tmp_path, rng), 1)
