"""PEFT's FourierFT adapters (spectral coefficients at places drawn from a seed): measured exactly as the factor pair
real(ifft2(S)) x scaling makes, against PEFT 0.21's own ``get_delta_weight`` and ``merge_and_unload()`` on a Llama
(Linear) and a GPT-2 (Conv1D) model, against numpy's ifft2, and bad input refused in one line."""

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
from test_vblora_adapter import _gpt2, _llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _saved(tmp_path, make, **config):
    """(base, adapter, merged, PEFT's deltas in float64 by module) of a FourierFT adapter with ``config``."""
    make().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.FourierFTConfig(init_weights=False, **config))
        torch.manual_seed(1)
        for n, p in pm.named_parameters():          # coefficients of a realistic size (PEFT's randn is huge x 150)
            if "fourierft_spectrum" in n:
                p.data = torch.randn_like(p) * 0.01
        pm.save_pretrained(tmp_path / "ad")
        deltas = {}
        for name, mod in pm.named_modules():
            if hasattr(mod, "fourierft_spectrum") and "default" in getattr(mod, "fourierft_spectrum", {}):
                s = mod.fourierft_spectrum["default"].detach().double()
                idx = mod.indices["default"]
                dense = torch.zeros(mod.out_features, mod.in_features, dtype=torch.float64)
                dense[idx[0], idx[1]] = s
                d = torch.fft.ifft2(dense).real * mod.fourierft_scaling["default"]
                deltas[name.removeprefix("base_model.model.") + ".weight"] = \
                    (d.T if mod.fan_in_fan_out else d).numpy()
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "ad", tmp_path / "merged", deltas


def _read_as_merged(base, ad, merged, deltas):
    """Each changed matrix measured from the factors: the norm of PEFT's own delta (computed in float64) to 1e-9,
    its exact rank, and the merged model's norm and cosine (PEFT merges in float32); the same verdict, flag adapter."""
    got = weightdiff.compare(str(base), str(ad)).to_dict()
    want = weightdiff.compare(str(base), str(merged)).to_dict()
    g, w = ({t["name"]: t for t in d["tensors"]} for d in (got, want))
    changed = sorted(n for n, t in g.items() if t["status"] == "changed")
    assert changed == sorted(deltas)
    for n in changed:
        d = deltas[n]
        assert g[n]["compared"] == "factors" and g[n]["rank"]["exact"]
        assert g[n]["norm_delta"] == pytest.approx(np.linalg.norm(d), rel=1e-9)
        assert g[n]["rank"]["numerical_rank"] == np.linalg.matrix_rank(d)
        assert g[n]["norm_delta"] == pytest.approx(w[n]["norm_delta"], rel=1e-4)
        assert g[n]["cosine"] == pytest.approx(w[n]["cosine"], abs=1e-6)
        assert g[n]["note"].startswith("FourierFT `base_model.model.")
    assert got["summary"]["verdict"] == want["summary"]["verdict"] and "adapter" in got["summary"]["flags"]
    assert any(x.startswith("adapter: 4 FourierFT modules (each measured exactly") for x in got["plan"]["notes"])
    return got, {n: g[n] for n in changed}


def test_a_llama_adapter_reads_as_peft_merges_it(tmp_path):
    _, recs = _read_as_merged(*_saved(tmp_path, _llama, n_frequency=8, scaling=150.0,
                                      target_modules=["q_proj", "down_proj"]))
    # 8 coefficients: rank at most 16, and the down projection's 32 x 48 reaches more of it than the square q_proj
    assert all(r["rank"]["numerical_rank"] <= 16 for r in recs.values())


def test_more_coefficients_than_the_factors_save(tmp_path):
    """2 n above the smaller side (24 coefficients of a 32 x 32 layer: 48 factor columns): still exact."""
    _, recs = _read_as_merged(*_saved(tmp_path, _llama, n_frequency=24, scaling=10.0,
                                      target_modules=["q_proj", "o_proj"], random_loc_seed=5))
    assert max(r["rank"]["numerical_rank"] for r in recs.values()) > 24      # more than n: both halves of the pair


def test_gpt2_conv1d_reads_transposed(tmp_path):
    """GPT-2's Conv1D stores [in, out]: PEFT draws the places in [out, in] and adds the transpose (fan_in_fan_out)."""
    _, recs = _read_as_merged(*_saved(tmp_path, _gpt2, n_frequency=6, scaling=50.0, target_modules=["c_attn", "c_fc"],
                                      fan_in_fan_out=True))
    assert all("(GPT-2 Conv1D: transposed)" in r["note"] for r in recs.values())


def test_factor_pair_against_numpy_ifft2():
    """The factor pair of random coefficients at random places of odd and even sides (the phases reduced in
    integers) against numpy's ifft2 of the dense spectrum, in both layouts."""
    from weightdiff.io.peft_fourierft import spectrum_pair

    rng = np.random.default_rng(3)
    for out, inn, n in ((7, 5, 3), (64, 48, 40), (33, 128, 200), (1, 9, 4)):
        flat = rng.choice(out * inn, n, replace=False)
        s = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))
        dense = np.zeros((out, inn))
        dense[flat // inn, flat % inn] = s
        want = np.fft.ifft2(dense).real
        for conv in (False, True):
            a, b = spectrum_pair((out, inn), conv, s, flat)
            assert np.abs(b @ a - (want.T if conv else want)).max() <= 1e-12 * np.abs(want).max()


def test_inspect_names_the_spectrum(tmp_path):
    _, ad, _, _ = _saved(tmp_path, _llama, n_frequency=8, scaling=150.0, target_modules=["q_proj", "down_proj"])
    r = CliRunner().invoke(main, ["inspect", str(ad)])
    assert r.exit_code == 0 and "format      PEFT FourierFT adapter, 1 file" in r.output, r.output
    assert "adapter     FourierFT n_frequency=8 scaling=150 random_loc_seed=777, 4 modules" in r.output
    a = json.loads(CliRunner().invoke(main, ["inspect", str(ad), "--json"]).output)["adapter"]
    assert sorted(a.pop("target_modules")) == ["down_proj", "q_proj"]
    assert a == {"peft_type": "FOURIERFT", "n_frequency": 8, "scaling": 150.0, "random_loc_seed": 777,
                 "fan_in_fan_out": False, "base_model": None, "modules": 4}


def test_a_worker_measures_the_modules_as_the_parent_does(tmp_path):
    from test_lycoris_adapter import assert_worker_matches

    base, ad, _, _ = _saved(tmp_path, _llama, n_frequency=8, scaling=150.0, target_modules=["q_proj", "down_proj"])
    assert_worker_matches(base, ad, 4)


# -- bad input -----------------------------------------------------------------------------------------------------

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _write(tmp_path, config=None, tensors=None, base_dtype=np.float32):
    b, ad = tmp_path / "base", tmp_path / "ad"
    for f in (b, ad):
        f.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file(b / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight":
                                        (rng.standard_normal((8, 6)) * 10).astype(base_dtype)})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT", "n_frequency": 4, "scaling": 1.0,
                                                        "target_modules": ["q_proj"], **(config or {})}))
    save_file(ad / "adapter_model.safetensors",
              tensors if tensors is not None else {Q + ".fourierft_spectrum": np.ones(4, np.float32)})
    return b, ad


@pytest.mark.parametrize("config, tensors, base_dtype, names_config, expect", [
    ({"n_frequency": 5}, None, np.float32, False, "holds 4 coefficients, but adapter_config.json gives this module "
                                                  "n_frequency 5"),
    ({"n_frequency_pattern": {"q_proj": 3}}, None, np.float32, False, "gives this module n_frequency 3"),
    ({"random_loc_seed": 1.5}, None, np.float32, True, "random_loc_seed = 1.5, expected an integer"),
    ({"scaling": "x"}, None, np.float32, True, "scaling"),
    ({}, {Q + ".fourierft_spectrum": np.ones((2, 2), np.float32)}, np.float32, False, "expected a float vector"),
    ({}, {Q + ".fourierft_spectrum": np.array([1, np.nan, 0, 0], np.float32)}, np.float32, False, "NaN or Inf"),
    ({"n_frequency": 49}, {Q + ".fourierft_spectrum": np.ones(49, np.float32)}, np.float32, False,
     "has 49 coefficients, more than its 8 x 6 spectrum holds"),
    ({}, None, np.int8, False, "the base weight is quantized or not float (I8)"),
    ({}, {Q + ".fourierft_spectrum": np.ones(4, np.float32), Q + ".lora_A.weight": np.ones((2, 6), np.float32)},
     np.float32, False, "which is not FourierFT's (fourierft_spectrum), but adapter_config.json says peft_type "
                        "FOURIERFT"),
    ({"scaling": 1e300}, {Q + ".fourierft_spectrum": np.full(4, 1e30, np.float32)}, np.float32, False,
     "too large to measure"),
])
def test_refused(tmp_path, config, tensors, base_dtype, names_config, expect):
    b, ad = _write(tmp_path, config, tensors, base_dtype)
    contract(["compare", str(b), str(ad)], ad / ("adapter_config.json" if names_config else "adapter_model.safetensors"),
             expect, tmp_path)


def test_fourierft_tensors_under_a_lora_config_are_refused(tmp_path):
    b, ad = _write(tmp_path)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    contract(["compare", str(b), str(ad)], ad / "adapter_model.safetensors", "FourierFT", tmp_path)


def test_the_places_are_torch_randperm_first_entries():
    """``first_of_randperm`` reproduces torch's CPU generator and randperm's forward shuffle without the permutation:
    sizes from 1 to a 7B layer's, n up to the whole size, seeds torch takes (negative, above 32 bits)."""
    from weightdiff.io.peft_fourierft import first_of_randperm

    rng = np.random.default_rng(0)
    cases = [(1, 1, 5), (2, 2, 1), (10, 10, 0), (5000, 5000, 3), (1000, 7, -1), (1000, 7, (1 << 64) - 1),
             (1000, 7, -(1 << 63)), (1000, 7, (1 << 32) + 5), (14336 * 4096, 1000, 777)]
    cases += [(int(s), int(rng.integers(1, min(s, 300) + 1)), int(rng.integers(0, 1 << 40)))
              for s in rng.integers(1, 100_000, 20)]
    for size, n, seed in cases:
        want = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].numpy()
        assert np.array_equal(first_of_randperm(size, seed, n), want), (size, n, seed)


def test_the_places_of_a_70b_layer_hold_no_permutation():
    """From uint32's largest / 20 elements on, torch's randperm shuffles "inside out" with 64-bit draws (a 70B
    layer, 28672 x 8192, is past it): the first entries the same as torch's at the switch, and a 70B layer's drawn
    without the 1.9 GB permutation PEFT builds (2.1 GB at the peak of a FourierFT comparison at that width)."""
    import tracemalloc

    from weightdiff.io.peft_fourierft import _RANDPERM_SPLIT, first_of_randperm

    want = torch.randperm(_RANDPERM_SPLIT, generator=torch.Generator().manual_seed(777), dtype=torch.int32)[:500]
    assert np.array_equal(first_of_randperm(_RANDPERM_SPLIT, 777, 500), want.numpy().astype(np.int64))
    del want
    tracemalloc.start()
    got = first_of_randperm(28672 * 8192, 5, 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20 and len(np.unique(got)) == 1000 and got.max() < 28672 * 8192


def test_a_large_factor_is_computed_by_row_blocks(tmp_path, monkeypatch):
    """B of a large layer (more than 64 MB: 459 MB at 70B widths) is a ``WaveRows``, its rows computed as the factor
    paths read them: every slice the held factor's rows, and a comparison's records byte for byte those of the held
    factor (here every B made one, with several row blocks)."""
    from weightdiff.io import peft_fourierft as F
    from weightdiff.measure import rank

    rng = np.random.default_rng(4)
    flat, s = rng.choice(300 * 40, 50, replace=False), rng.standard_normal(50)
    a, held = F.spectrum_pair((300, 40), False, s, flat)
    monkeypatch.setattr(F, "_HELD_BYTES", 0)
    a2, rows = F.spectrum_pair((300, 40), False, s, flat)
    assert isinstance(rows, F.WaveRows) and rows.shape == held.shape and np.array_equal(a, a2)
    for lo, hi in ((0, 300), (7, 8), (299, 300), (10, 10), (250, 400), (-5, None)):
        assert np.array_equal(rows[lo:hi], held[lo:hi]), (lo, hi)
    assert np.array_equal(np.asarray(rows), held) and np.array_equal(rows[[3, 1]], held[[3, 1]])
    base, ad, _, _ = _saved(tmp_path, _llama, n_frequency=8, scaling=150.0, target_modules=["q_proj", "down_proj"])
    monkeypatch.setattr(rank, "_BLOCK", 100)
    made = []
    init = F.WaveRows.__init__
    monkeypatch.setattr(F.WaveRows, "__init__", lambda self, *x: (made.append(1), init(self, *x))[1])
    got = weightdiff.compare(str(base), str(ad)).to_dict()["tensors"]
    monkeypatch.setattr(F, "_HELD_BYTES", 64 << 20)
    want = weightdiff.compare(str(base), str(ad)).to_dict()["tensors"]
    assert made and json.dumps(got) == json.dumps(want)
    # a tall B (the tiny model's are square enough to be factorized whole): the stats and the QR read row blocks only
    from weightdiff.kernels import spectral

    monkeypatch.setattr(spectral, "TSQR_BYTES", 1 << 12)
    a, held = F.spectrum_pair((3000, 40), False, s, flat)
    monkeypatch.setattr(F, "_HELD_BYTES", 0)
    _, rows = F.spectrum_pair((3000, 40), False, s, flat)
    monkeypatch.setattr(F.WaveRows, "__array__", lambda self, *x, **k: pytest.fail("B built whole"))
    w = np.random.default_rng(5).standard_normal((3000, 40)).astype(np.float32)
    assert rank.analyze_factors(a, rows, 150.0, w, "F32", (3000, 40)) == \
        rank.analyze_factors(a, held, 150.0, w, "F32", (3000, 40))
