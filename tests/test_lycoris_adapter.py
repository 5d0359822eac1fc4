"""PEFT's LoHa and LoKr adapters: each module measured exactly as the factor pair its Hadamard or Kronecker product
is, checked against PEFT itself (the delta ``get_delta_weight`` builds for Linear, Conv1d, Conv2d, grouped and 1x1
layers under every form PEFT builds, and the model ``merge_and_unload`` saves), the shapes PEFT expects from a base
and a config, and hostile adapters refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import weightdiff
from weightdiff.io.peft_lycoris import expected_shapes, factorization, lycoris_product
from weightdiff.io.safetensors_write import save_file

from test_hostile_adapters import contract

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(24, 40)
        self.c1 = torch.nn.Conv1d(6, 8, 3)
        self.c2 = torch.nn.Conv2d(6, 8, 3)
        self.p = torch.nn.Conv2d(6, 8, 1)
        self.g = torch.nn.Conv2d(8, 12, 3, groups=2)
        self.sq = torch.nn.Linear(64, 64)

    def forward(self, x):
        return x


_LAYERS = ["lin", "c1", "c2", "p", "g", "sq"]


def _configs():
    out = []
    for eff in (False, True):
        for r in (1, 2, 40):
            out.append(("LOHA", peft.LoHaConfig(r=r, alpha=3, target_modules=_LAYERS, init_weights=False,
                                                use_effective_conv2d=eff)))
            for both, f in ((False, -1), (True, -1), (True, 4), (False, 3)):
                out.append(("LOKR", peft.LoKrConfig(r=r, alpha=3, target_modules=_LAYERS, init_weights=False,
                                                    use_effective_conv2d=eff, decompose_both=both,
                                                    decompose_factor=f)))
    return out


def test_the_factor_pair_is_the_delta_peft_builds_for_every_layer_and_form():
    """scale x B @ A against ``get_delta_weight`` (float32) on 180 layer x config cases, and the shapes
    ``expected_shapes`` derives from the base and the config against the tensors PEFT creates."""
    from peft.utils import get_peft_model_state_dict

    cases = 0
    for kind, cfg in _configs():
        torch.manual_seed(0)
        pm = peft.get_peft_model(_Net(), cfg)
        sd = get_peft_model_state_dict(pm)
        for mod in _LAYERS:
            layer = getattr(pm.base_model.model, mod)
            parts = {k.rsplit(".", 1)[1]: v.double().numpy() for k, v in sd.items()
                     if k.startswith(f"base_model.model.{mod}.")}
            shape = tuple(layer.base_layer.weight.shape)
            assert {k: v.shape for k, v in parts.items()} == expected_shapes(kind, shape, cfg.r, cfg.to_dict())
            a, b = lycoris_product(kind, parts)
            assert layer.scaling["default"] == cfg.alpha / cfg.r          # the scale lycoris_factors gives
            got = layer.scaling["default"] * (b @ a)
            if kind == "LOKR" and "lokr_t2" in parts and len(shape) == 3:
                # PEFT's own merge fails here (torch.kron of its [a, c, 1, 1] and [b, d, k, 1]): the reference is
                # that Kronecker product in numpy, the weight any working kron gives
                w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
                w2 = np.einsum("ijkl,ip,jr->prkl", parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
                want = layer.scaling["default"] * np.kron(w1[:, :, None, None], w2).reshape(shape)
            else:
                want = layer.get_delta_weight("default").detach().double().numpy()
            want = want.reshape(shape[0], -1)
            assert got.shape == want.shape
            assert a.shape[0] <= min(want.shape)            # the pair is never wider than the matrix
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=f"{kind} {mod}")
            cases += 1
    assert cases == 180


def test_factorization_is_pefts():
    from peft.tuners.lokr.layer import factorization as theirs

    for d in list(range(1, 200)) + [4096, 11008, 14336, 28672, 32000, 65521, 151936, 999983]:
        for f in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(d, f) == theirs(d, f), (d, f)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("cfg, ranks", [
    (dict(peft_type="LOHA", r=2, alpha=4, rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 1}),
     {"q_proj": 4, "down_proj": 9}),
    (dict(peft_type="LOKR", r=2, alpha=4), {"q_proj": 16, "down_proj": 8}),
    (dict(peft_type="LOKR", r=1, alpha=2, decompose_both=True, decompose_factor=2), {"q_proj": 2, "down_proj": 2}),
])
def test_llama_adapters_read_as_their_merged_model(tmp_path, cfg, ranks):
    kind = cfg.pop("peft_type")
    conf = (peft.LoHaConfig if kind == "LOHA" else peft.LoKrConfig)(
        target_modules=["q_proj", "down_proj"], init_weights=False, **cfg)
    model = _llama()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, conf)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter")
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    assert r.summary.verdict == dense.summary.verdict == "derived" and "adapter" in r.summary.flags
    changed = [t for t in dense.tensors if t.status == "changed"]
    assert len(changed) == 4
    for t in changed:
        a = r.tensor(t.name)
        assert a.compared == "factors" and a.status == "changed"
        assert a.norm_delta == pytest.approx(t.norm_delta, rel=1e-6)       # PEFT merges in float32
        assert a.cosine == pytest.approx(t.cosine, rel=1e-6)
        assert a.rank.numerical_rank == t.rank.numerical_rank == ranks[t.name.split(".")[-2]], t.name
        assert a.rank.exact and a.note.startswith(("LoHa adapter (r=", "LoKr adapter (r="))
    assert {t.name for t in r.tensors if t.status == "unchanged"} == \
        {t.name for t in dense.tensors if t.status == "unchanged"}
    label = {"LOHA": "LoHa", "LOKR": "LoKr"}[kind]
    assert f"adapter: 4 {label} modules (each measured exactly" in " ".join(r.plan["notes"])


def test_a_convolutional_model_under_the_effective_form_reads_as_its_merge(tmp_path):
    from safetensors.torch import save_file as torch_save

    torch.manual_seed(3)
    net = _Net()
    (tmp_path / "base").mkdir()
    torch_save({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    pm = peft.get_peft_model(net, peft.LoHaConfig(r=2, alpha=40, target_modules=["c1", "c2", "g", "lin"],
                                                  init_weights=False, use_effective_conv2d=True))
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    (tmp_path / "merged").mkdir()
    torch_save({k: v.contiguous() for k, v in merged.state_dict().items()},
               str(tmp_path / "merged" / "model.safetensors"))
    r = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "adapter"))
    dense = weightdiff.compare(str(tmp_path / "base"), str(tmp_path / "merged"))
    for name in ("c1.weight", "c2.weight", "g.weight", "lin.weight"):
        a, t = r.tensor(name), dense.tensor(name)
        assert a.compared == "factors" and a.norm_delta == pytest.approx(t.norm_delta, rel=1e-6), name
        assert a.rank.numerical_rank == t.rank.numerical_rank <= 4, name
    assert "use_effective_conv2d" in r.tensor("c2.weight").note
    assert r.tensor("p.weight").status == r.tensor("sq.weight").status == "unchanged"


PRE = "base_model.model."
Q, D = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
LOHA = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj", "down_proj"]}


def _pair(tmp_path, rng, config=None, parts=None):
    (tmp_path / "base").mkdir()
    save_file(tmp_path / "base" / "model.safetensors",
              {f"{Q}.weight": rng.standard_normal((16, 16)).astype(np.float32),
               f"{D}.weight": rng.standard_normal((16, 32)).astype(np.float32)})
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(LOHA if config is None else config))
    f = {}
    for mod, n in ((Q, 16), (D, 32)):
        for i in "12":
            f[f"{mod}.hada_w{i}_a"] = rng.standard_normal((16, 2)).astype(np.float32)
            f[f"{mod}.hada_w{i}_b"] = rng.standard_normal((2, n)).astype(np.float32)
    f.update(parts or {})
    save_file(tmp_path / "ad" / "adapter_model.safetensors", {PRE + k: v for k, v in f.items() if v is not None})
    return tmp_path / "base", tmp_path / "ad"


def test_a_written_loha_is_measured_from_its_factors(tmp_path, rng):
    base, ad = _pair(tmp_path, rng)
    r = weightdiff.compare(str(base), str(ad))
    from safetensors.numpy import load_file

    f = load_file(ad / "adapter_model.safetensors")
    w = {k.rsplit(".", 1)[1]: f[k].astype(np.float64) for k in f if k.startswith(PRE + D)}
    delta = 2.0 * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    t = r.tensor(f"{D}.weight")
    assert t.norm_delta == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
    s = np.linalg.svd(delta, compute_uv=False)
    assert t.rank.spectrum == pytest.approx(list(s[:4]), rel=1e-9) and t.rank.numerical_rank == 4
    assert r.summary.verdict == "derived" and "adapter" in r.summary.flags


@pytest.mark.parametrize("config, parts, expect", [
    (None, {f"{Q}.hada_w2_b": None}, "LoHa module `base_model.model.model.layers.0.self_attn.q_proj` has hada_w1_a, "
                                      "hada_w1_b, hada_w2_a; expected"),
    (None, {f"{Q}.hada_w2_b": np.ones((2, 17), np.float32)},
     "LoHa tensors of `model.layers.0.self_attn.q_proj.weight` (hada_w1_a [16, 2], hada_w1_b [2, 16], hada_w2_a "
     "[16, 2], hada_w2_b [2, 17]) are not those PEFT builds on the base weight [16, 16] with r=2"),
    ({**LOHA, "r": 3}, None, "are not those PEFT builds on the base weight"),
    (None, {f"{Q}.hada_w1_a": np.full((16, 2), np.nan, np.float32)}, "LoHa tensor `base_model.model.model.layers.0."
                                                                       "self_attn.q_proj.hada_w1_a` holds NaN"),
    (None, {f"{Q}.hada_w1_a": np.ones((16, 2), np.int8)}, "hada_w1_a` is I8; expected a float dtype"),
    ({**LOHA, "alpha": 1e300}, {f"{Q}.hada_w1_a": np.full((16, 2), 1e30, np.float32)}, "LoHa delta of `model.layers"
                                                                                       ".0.self_attn.q_proj.weight` is "
                                                                                       "too large to measure"),
    (None, {"model.layers.0.self_attn.k_proj.hada_w1_a": np.ones((16, 2), np.float32),
            "model.layers.0.self_attn.k_proj.hada_w1_b": np.ones((2, 16), np.float32),
            "model.layers.0.self_attn.k_proj.hada_w2_a": np.ones((16, 2), np.float32),
            "model.layers.0.self_attn.k_proj.hada_w2_b": np.ones((2, 16), np.float32)},
     "LoHa target `model.layers.0.self_attn.k_proj.weight` has no weight in the base"),
    (None, {f"{Q}.lora_A.weight": np.ones((2, 16), np.float32)}, "which is not LoHa's"),
    (None, {f"{Q}.lokr_w1": np.ones((4, 4), np.float32)}, "which is not LoHa's"),
    ({"peft_type": "LORA", "r": 2}, None, "adapter holds LyCORIS (LoHa/LoKr) factors"),
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, None, "adapter holds LyCORIS (LoHa/LoKr) factors"),
    ({**LOHA, "peft_type": "LOKR"}, None, "which is not LoKr's"),
    ({**LOHA, "alpha": "4"}, None, 'alpha = "4", expected a number'),
    ({**LOHA, "r": 0}, None, "r = 0, expected a positive integer"),
    ({**LOHA, "use_effective_conv2d": "true"}, None, 'use_effective_conv2d = "true", expected true or false'),
    ({**LOHA, "peft_type": "LOKR", "decompose_factor": 2.5}, None, "decompose_factor = 2.5, expected -1 or a"),
    ({**LOHA, "rank_pattern": {"(a+)+": 2}}, None, "rank_pattern"),
])
def test_hostile_lycoris_adapters_are_one_line_exit_2(tmp_path, rng, config, parts, expect):
    base, ad = _pair(tmp_path, rng, config, parts)
    contract(["compare", str(base), str(ad)], ad, expect, tmp_path)


def test_a_lokr_on_a_layer_peft_cannot_adapt_is_refused(tmp_path, rng):
    (tmp_path / "base").mkdir()
    save_file(tmp_path / "base" / "model.safetensors", {"norm.weight": np.ones(16, np.float32)})
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**LOHA, "peft_type": "LOKR"}))
    save_file(tmp_path / "ad" / "adapter_model.safetensors", {f"{PRE}norm.lokr_w1": np.ones((4, 4), np.float32),
                                                              f"{PRE}norm.lokr_w2": np.ones((4, 4), np.float32)})
    contract(["compare", str(tmp_path / "base"), str(tmp_path / "ad")], tmp_path / "ad",
             "PEFT builds LoKr on Linear, Conv1d and Conv2d layers only", tmp_path)


def test_inspect_names_the_modules(tmp_path, rng):
    from click.testing import CliRunner

    from weightdiff.cli import main

    _, ad = _pair(tmp_path, rng, {**LOHA, "rank_pattern": {"down_proj": 2}})
    out = CliRunner().invoke(main, ["inspect", str(ad)])
    assert out.exit_code == 0 and "PEFT LoHa adapter" in out.stdout
    assert "adapter     LoHa r=2 alpha=4 scale=2, 2 modules (ranks 2)" in out.stdout
    j = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).stdout)
    assert j["adapter"] == {"peft_type": "LOHA", "r": 2, "alpha": 4.0, "scale": 2.0,
                            "target_modules": ["q_proj", "down_proj"], "base_model": None, "modules": 2, "ranks": [2],
                            "use_effective_conv2d": False}


def assert_worker_matches(base, ad, modules: int) -> None:
    """A Dask worker plans again from the headers (``split.measure_task``) and runs the adapter's checks as the
    parent does: its records of the factor pairs are the parent's (the block and module a record sits in are filled
    in by the parent, after every record is back)."""
    from weightdiff.comparison import check_adapter_plan
    from weightdiff.io.checkpoint import locate
    from weightdiff.options import CompareOptions
    from weightdiff.pairing.plan import plan as make_plan
    from weightdiff.split import measure_task, plan_digest

    local = weightdiff.compare(str(base), str(ad))
    with locate(base) as b, locate(ad) as t:
        parent = make_plan([b], t)
        check_adapter_plan(parent, [b], t)
        digest = plan_digest(parent)
    idx = [i for i, p in enumerate(parent.pairs) if p.lora is not None]
    status, records = measure_task([str(base)], str(ad), CompareOptions(), idx, digest)
    assert status == "ok" and len(records) == modules, records
    for r in records:
        want = local.tensor(r.name).to_dict()
        assert {k for k, v in r.to_dict().items() if want.get(k) != v} <= {"block", "module"}


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path, rng):
    assert_worker_matches(*_pair(tmp_path, rng), 2)


def test_a_rank_past_the_matrix_never_makes_a_pair_wider_than_it(rng):
    """LoHa's r1 r2 or a LoKr side's r past the shorter side (PEFT builds both): the pair is the product itself
    times an identity, never factors wider than the matrix (r = 4096 on a 4096-wide layer would be 550 GB)."""
    w = {"hada_w1_a": rng.standard_normal((12, 9)), "hada_w1_b": rng.standard_normal((9, 20)),
         "hada_w2_a": rng.standard_normal((12, 9)), "hada_w2_b": rng.standard_normal((9, 20))}
    a, b = lycoris_product("LOHA", w)
    assert a.shape[0] <= 12
    np.testing.assert_allclose(b @ a, (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]),
                               rtol=1e-12, atol=1e-12)
    k = {"lokr_w1_a": rng.standard_normal((2, 20)), "lokr_w1_b": rng.standard_normal((20, 64)),
         "lokr_w2_a": rng.standard_normal((3, 7)), "lokr_w2_b": rng.standard_normal((7, 5))}
    a, b = lycoris_product("LOKR", k)
    assert a.shape[0] <= 2 * 3
    want = np.kron(k["lokr_w1_a"] @ k["lokr_w1_b"], k["lokr_w2_a"] @ k["lokr_w2_b"])
    np.testing.assert_allclose(b @ a, want, rtol=1e-12, atol=1e-12)


def test_a_loha_of_rank_past_the_layer_reads_as_its_delta(tmp_path, rng):
    r = 64                                          # r^2 = 4096 against a 16 x 32 layer
    parts = {}
    for mod, n in ((Q, 16), (D, 32)):
        for i in "12":
            parts[f"{mod}.hada_w{i}_a"] = (0.1 * rng.standard_normal((16, r))).astype(np.float32)
            parts[f"{mod}.hada_w{i}_b"] = (0.1 * rng.standard_normal((r, n))).astype(np.float32)
    base, ad = _pair(tmp_path, rng, {**LOHA, "r": r, "alpha": r}, parts)
    t = weightdiff.compare(str(base), str(ad)).tensor(f"{D}.weight")
    w = {k.rsplit(".", 1)[1]: v.astype(np.float64) for k, v in parts.items() if k.startswith(D)}
    delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    assert t.norm_delta == pytest.approx(float(np.linalg.norm(delta)), rel=1e-12)
    assert t.rank.numerical_rank == 16 and t.rank.exact
