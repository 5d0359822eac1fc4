"""llm-compressor's integer files (compressed-tensors ``pack-quantized``), built here with
compressed-tensors' own ``calculate_qparams`` and packer as llm-compressor calls them: the scales of
every group are min/max scales of the weights it read, set up before any rounding (``QuantizationModifier``
rounds to nearest with them; ``GPTQModifier`` compensates errors with them). A fine-tune that leaves
one column untouched left that column clean, and the first-group test, meant for GPTQ, read such a
file ``quantized_only``. With the recipe beside the model naming ``QuantizationModifier`` the exact
per-element bound decides; without a recipe, or under GPTQ, the stored scales must come back from
the base's weights in every group."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from weightdiff import compare  # noqa: E402

import test_quant_checkpoint as T  # noqa: E402

ROWS, COLS, GROUP, BITS = 256, 256, 128, 4

RTN_RECIPE = """default_stage:
  default_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
"""
GPTQ_RECIPE = """default_stage:
  default_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
      block_size: 128
      dampening_frac: 0.01
      actorder: null
"""


def _args(sym=True):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=BITS, type="int", symmetric=sym, strategy="group", group_size=GROUP)


def _config(actorder=None, sym=True) -> dict:
    weights = {"num_bits": BITS, "type": "int", "symmetric": sym, "strategy": "group", "group_size": GROUP,
               "observer": "memoryless_minmax", "dynamic": False, "actorder": actorder}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "sparsity_config": {}, "transform_config": {}}


def _scales(x, sym=True, in_float32=False):
    """llm-compressor's ``memoryless_minmax`` observer and compressed-tensors' ``calculate_qparams``, in
    the weights' dtype (bf16); ``in_float32``: on the weights in float32 (a model held in float32 while it is
    quantized, or an observer called on ``W.float()``), the scale then stored in bf16."""
    from compressed_tensors.quantization.utils import calculate_qparams

    v = (x.float() if in_float32 else x).reshape(x.shape[0], -1, GROUP)
    scale, zp = calculate_qparams(v.amin(-1), v.amax(-1), _args(sym))
    return scale.to(x.dtype), zp


def _gptq_codes(x, scale, hess):
    """GPTQ's column loop in order (llm-compressor's ``actorder: null``) with the scales set up before it
    from the weights, as llm-compressor's GPTQModifier does: each column rounded with its group's scale,
    its error pushed onto the later columns through the inverse Hessian's Cholesky factor."""
    W = x.double().numpy().copy()
    s = scale.double().numpy()
    n = W.shape[1]
    H = hess + 0.01 * np.mean(np.diag(hess)) * np.eye(n)
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    half = 1 << (BITS - 1)
    q = np.zeros(W.shape, np.int8)
    for i in range(n):
        si = s[:, i // GROUP]
        qi = np.clip(np.round(W[:, i] / si), -half, half - 1)
        q[:, i] = qi
        err = (W[:, i] - qi * si) / hinv[i, i]
        W[:, i + 1:] -= np.outer(err, hinv[i, i + 1:])
    return torch.from_numpy(q)


def _save(folder, weights: dict, others: dict, gptq_hess=None, recipe: str | None = None, actorder=None,
          sym=True, in_float32=False):
    """A pack-quantized model of ``weights`` (bf16 tensors), the recipe beside it when given: rounded to
    nearest by compressed-tensors' own compressor, or GPTQ's codes (symmetric) packed by its packer."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationScheme

    stored = dict(others)
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    for name, x in weights.items():
        m = name[: -len(".weight")]
        scale, zp = _scales(x, sym, in_float32)
        if gptq_hess is not None:
            q = _gptq_codes(x, scale, gptq_hess)
            stored.update({f"{m}.weight_packed": pack_to_int32(q, BITS), f"{m}.weight_scale": scale,
                           f"{m}.weight_shape": torch.tensor(list(x.shape), dtype=torch.int64)})
        else:
            packed = comp.compress({"weight": x, "weight_scale": scale, "weight_zero_point": zp},
                                   QuantizationScheme(targets=["Linear"], weights=_args(sym)))
            stored.update({f"{m}.{k}": v for k, v in packed.items()})
    T._save(folder, stored, _config(actorder, sym))
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe)
    return folder


@pytest.fixture(scope="module")
def models():
    """A bf16 base of four 256x256 linears and a fine-tune of it: rank 4, relative size 2e-2, that leaves
    column 0 of every matrix as it was (the column GPTQ rounds first, untouched by compensation)."""
    rng = np.random.default_rng(11)
    names = [f"{m}.weight" for m in T.LINEARS]
    base = {n: (torch.from_numpy(rng.standard_normal((ROWS, COLS)) * 0.02).float()).to(torch.bfloat16)
            for n in names}
    tuned = {}
    for n, w in base.items():
        u, v = rng.standard_normal((ROWS, 4)), rng.standard_normal((4, COLS))
        v[:, 0] = 0
        d = u @ v
        wf = w.double().numpy()
        tuned[n] = torch.from_numpy(wf + d * 2e-2 * np.linalg.norm(wf) / np.linalg.norm(d)).to(torch.bfloat16)
    others = {"model.norm.weight": torch.ones(COLS, dtype=torch.bfloat16)}
    x = rng.standard_normal((512, COLS)) * np.exp(rng.standard_normal(COLS) * 0.5)
    return base, tuned, others, x.T @ x


def _run(tmp_path, base, others, folder):
    b = T._save(tmp_path / "base", {**base, **others}, None)
    r = compare(b, folder, rank=False)
    return r, [t.quant for t in r.tensors if t.quant]


def test_round_to_nearest_by_its_recipe_is_judged_by_the_bound(tmp_path, models):
    """QuantizationModifier (the recipe says so): every element within half a step, else changed. The
    fine-tune's untouched column 0 read the whole file quantized_only under the first-group test."""
    base, tuned, others, _ = models
    r, q = _run(tmp_path, base, others, _save(tmp_path / "ft", tuned, others, recipe=RTN_RECIPE))
    assert r.summary.verdict == "derived", r.summary.verdict_reason
    assert len(q) == 4 and all(x["test"] == "bound" and not x["within"] and x["beyond"] > 0 for x in q)
    assert all("round to nearest" in x["scheme"] for x in q)
    r, q = _run(tmp_path, base, others, _save(tmp_path / "bq", base, others, recipe=RTN_RECIPE))
    assert r.summary.verdict == "quantized_only", r.summary.verdict_reason
    assert all(x["test"] == "bound" and x["within"] and x["beyond"] == 0 for x in q)


@pytest.mark.parametrize("sym", [True, False], ids=["symmetric", "asymmetric"])
def test_without_a_recipe_every_groups_scale_must_come_back_from_the_base(tmp_path, models, sym):
    """No recipe: the lenient first-group test, and every stored group scale must equal the scale of the
    base's group (bf16(max |w| / 7.5); asymmetric: bf16(bf16(max - min) / 15), and its zero point): all of
    them for a copy of the base, far fewer for the fine-tune."""
    base, tuned, others, _ = models
    r, q = _run(tmp_path, base, others, _save(tmp_path / "ft", tuned, others, sym=sym))
    assert r.summary.verdict == "derived", r.summary.verdict_reason
    assert all(x["test"] == "first-group" and x["first_group_min_beyond"] == 0 for x in q)
    assert all(x["first_group_scales"] < 0.9 and not x["within"] for x in q), [x["first_group_scales"] for x in q]
    r, q = _run(tmp_path, base, others, _save(tmp_path / "bq", base, others, sym=sym))
    assert r.summary.verdict == "quantized_only", r.summary.verdict_reason
    assert all(x["first_group_scales"] == 1.0 and x["within"] for x in q)


def test_asymmetric_scales_computed_in_float32_come_back_from_the_base(tmp_path, models):
    """Asymmetric scales computed in float32 and stored in bf16 (one rounding) are one bf16 step off the
    bf16-computed ones (bf16(bf16(max - min) / 15)) in many groups: an unchanged base so quantized read DERIVED."""
    base, tuned, others, _ = models
    r, q = _run(tmp_path, base, others, _save(tmp_path / "bq", base, others, sym=False, in_float32=True))
    assert r.summary.verdict == "quantized_only", r.summary.verdict_reason
    assert all(x["first_group_scales"] == 1.0 and x["within"] for x in q)
    r, q = _run(tmp_path, base, others, _save(tmp_path / "ft", tuned, others, sym=False, in_float32=True))
    assert r.summary.verdict == "derived", r.summary.verdict_reason
    assert all(x["first_group_scales"] < 0.9 and not x["within"] for x in q), [x["first_group_scales"] for x in q]


def test_gptq_modifier_scales_catch_a_fine_tune_its_first_column_hides(tmp_path, models):
    """GPTQModifier compensates errors (a base copy has elements well beyond half a step, so the bound
    cannot decide), but its scales were set up from the weights before: a copy of the base gives them all
    back, a fine-tune whose column 0 is clean (processed first, within the bound) does not."""
    base, tuned, others, hess = models
    r, q = _run(tmp_path, base, others, _save(tmp_path / "bq", base, others, hess, GPTQ_RECIPE))
    assert r.summary.verdict == "quantized_only", r.summary.verdict_reason
    assert all(x["test"] == "first-group" and x["beyond"] > 0 and x["first_group_scales"] == 1.0 for x in q)
    r, q = _run(tmp_path, base, others, _save(tmp_path / "ft", tuned, others, hess, GPTQ_RECIPE))
    assert r.summary.verdict == "derived", r.summary.verdict_reason
    assert all(x["first_group_min_beyond"] == 0 and x["first_group_scales"] < 0.9 for x in q)


def test_recipe_modifiers_read_as_text(tmp_path):
    from weightdiff.io.quantized import recipe_modifiers, rounded_to_nearest

    (tmp_path / "recipe.yaml").write_text(RTN_RECIPE)
    assert recipe_modifiers(tmp_path) == ["QuantizationModifier"]
    qc = {**_config(), "_recipe": ["QuantizationModifier"]}
    assert rounded_to_nearest(qc)
    assert not rounded_to_nearest({**qc, "_recipe": ["AWQModifier", "QuantizationModifier"]})
    assert not rounded_to_nearest({**qc, "_recipe": None})
    assert not rounded_to_nearest(_config("static") | {"_recipe": ["QuantizationModifier"]})
    (tmp_path / "recipe.yaml").write_text(GPTQ_RECIPE)
    assert recipe_modifiers(tmp_path) == ["GPTQModifier"]
    assert json.loads(json.dumps(recipe_modifiers(tmp_path / "nowhere"))) is None


def test_two_round_to_nearest_builds_of_different_weights_are_not_quantized_only(tmp_path, models):
    """Both sides rounded to nearest by compressed-tensors' own compressor (the recipe says so), of a bf16 base
    and of a dense fine-tune of its linears of relative size 1e-2: every value within the two floors (about a step),
    and the pair read "QUANTIZED ONLY: explained by quantizing the same weights twice", though one quantizer given
    the same weights stores the same codes and a few percent of them moved. Inconclusive, saying why; the same
    weights twice stay bitwise equal, and the same weights under another scheme stay quantized only."""
    base, _, others, _ = models
    rng = np.random.default_rng(12)
    lin = {}
    for n, w in base.items():
        wf = w.double().numpy()
        d = rng.standard_normal(wf.shape)
        lin[n] = torch.from_numpy(wf + d * 1e-2 * np.linalg.norm(wf) / np.linalg.norm(d)).to(torch.bfloat16)
    qb = _save(tmp_path / "qb", base, others, recipe=RTN_RECIPE)
    r = compare(qb, _save(tmp_path / "ql", lin, others, recipe=RTN_RECIPE), rank=False)
    s = r.summary
    assert s.verdict == "inconclusive" and "quant_both_moved" in s.flags, (s.verdict, s.flags, s.verdict_reason)
    assert "quant_both_compensated" not in s.flags
    q = [t.quant for t in r.tensors if t.quant]
    assert len(q) == 4 and all(x["side"] == "both" and x["beyond"] == 0 and x["within"] is None for x in q)
    assert all(x["codes_moved"] > 0.005 * x["elements"] for x in q), [x["codes_moved"] for x in q]
    from weightdiff.render.sentences import verdict_title

    assert verdict_title(r.to_dict()["summary"]).startswith("INCONCLUSIVE: both models are quantized the same way")
    assert "moved by about a step" in s.verdict_reason and "unquantized model" in s.verdict_reason
    # nothing found changed is not "0 of 1 blocks changed": the untested tensors may hide a change
    assert "quant_floor_lower_bounds" in s.flags and s.scope["within_quant_floor"]["untested"] == 4, s.scope
    from weightdiff.render.formats import at_least

    assert at_least(r.to_dict()["summary"]) == "at least "
    assert compare(qb, _save(tmp_path / "qb2", base, others, recipe=RTN_RECIPE), rank=False).summary.verdict \
        == "identical"
    s = compare(qb, _save(tmp_path / "qa", base, others, recipe=RTN_RECIPE, sym=False), rank=False).summary
    assert s.verdict == "quantized_only" and "quant_both_moved" not in s.flags, (s.verdict, s.flags)
