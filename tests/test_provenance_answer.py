"""weightdiff provenance: how the answer is stated when the pooled number is not the whole story.

Near ties that the blocks break (one layer retrained, layers added), runs that compared nothing,
the tuned model or a copy of it among the candidates, one checkpoint spelled as its folder and its
file, the weak-evidence sentence, and block labels shared with compare.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.comparison import compare
from weightdiff.errors import CheckpointError, OptionsError
from weightdiff.provenance import provenance
from weightdiff.render.memo_md import to_markdown
from weightdiff.render.sections import provenance_blocks
from conftest import save_file, write_checkpoint
from models import llama
from test_provenance import SHAPE, finetune


def _retrain(tensors: dict, layer: int, rel: float, seed: int, start: dict | None = None) -> dict:
    """Every matrix of one layer moved by dense noise of ``rel`` (from ``start``'s values when given)."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for k, v in (start or tensors).items():
        if f".layers.{layer}." in k and v.ndim == 2:
            out[k] = (v + rel * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
    return out


def _md(r) -> str:
    return to_markdown(provenance_blocks(r.to_dict()), {})


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = llama(np.random.default_rng(7), **SHAPE)
    a = finetune(base, 1)
    m = {"base": base, "A": a, "A_l1": _retrain(a, 1, 0.3, 3),
         "U": llama(np.random.default_rng(99), **SHAPE), "scaled3": {k: 3 * v for k, v in base.items()}}
    # A with two layers added after its own (copies of its layers, moved a little)
    rng = np.random.default_rng(4)
    deeper = dict(a)
    for i in range(SHAPE["layers"]):
        for k, v in a.items():
            if k.startswith(f"model.layers.{i}."):
                deeper[k.replace(f".layers.{i}.", f".layers.{i + SHAPE['layers']}.")] = \
                    (v + 0.15 * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
    m["A_deeper"] = deeper
    paths = {k: str(write_checkpoint(root / k, v)) for k, v in m.items()}
    paths["base_copy"] = str(write_checkpoint(root / "base_copy", base))
    paths["base_bf16"] = str(write_checkpoint(root / "base_bf16", base, dtype="BF16"))
    paths["narrow"] = str(write_checkpoint(root / "narrow", llama(np.random.default_rng(7), layers=2, hidden=32,
                                                                      inter=64, vocab=256)))
    return paths


# ---------------------------------------------------------------- finding 1: near ties the blocks break

@pytest.mark.parametrize("order", [("base", "A"), ("A", "base")])
def test_one_layer_retrained_is_derived_from_its_parent_not_a_tie(family, order):
    """A with one of its two layers retrained by 30%: the pooled change is nearly the same against A and
    against A's base (the retrained layer dominates both), but every other block is bitwise A's."""
    r = provenance(family["A_l1"], [family[n] for n in order], screen=False)
    by = {c["path"]: c for c in r.candidates}
    a, b = by[family["A"]], by[family["base"]]
    assert b["relative_change_large"] / a["relative_change_large"] < 1.2        # the old rule's tie
    ans = r.answer
    assert ans["kind"] == "derived" and ans["leading"] == family["A"] and ans["tied"] == []
    why = ans["separated"][0]
    assert why["path"] == family["base"] and why["closer"] == ["embeddings", "layers.0", "head"]
    assert why["bitwise"] == why["closer"] and why["blocks"] == 4
    assert why["identical_large_params"] > 0 and why["other_identical_large_params"] == 0
    assert r.findings[1].startswith(f"`{family['base']}` is within the 1.2x margin of `{family['A']}` on the "
                                    "pooled relative change (")
    assert "but the weights single out" in r.findings[1] and "bitwise equal in 3 of them" in r.findings[1]
    assert not any("cannot be told apart" in f for f in r.findings)
    md = _md(r)
    assert f"**DERIVED from {family['A']}**".replace("_", "\\_") in md and "cannot tell them apart" not in md


def test_the_candidate_the_blocks_single_out_ranks_first_even_when_the_pooled_number_favours_the_other(tmp_path):
    """A changed its layer 1 by 10% and the rest by 0.5%; the tuned model is A with layer 1 retrained from
    the base's values: pooled, the base is a little closer (the retrained layer carries A's 10% too), but
    everything else is bitwise A's and no block is closer to the base by the margin."""
    base = llama(np.random.default_rng(7), **SHAPE)
    rng = np.random.default_rng(2)
    a = {k: (v + (0.1 if ".layers.1." in k else 0.005) * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
         if v.ndim == 2 else v for k, v in base.items()}
    tuned = _retrain(a, 1, 0.3, 3, start=base)
    p = {n: str(write_checkpoint(tmp_path / n, t)) for n, t in (("base", base), ("A", a), ("tuned", tuned))}
    r = provenance(p["tuned"], [p["base"], p["A"]], screen=False)
    by = {c["path"]: c for c in r.candidates}
    assert by[p["base"]]["relative_change_large"] < by[p["A"]]["relative_change_large"]
    assert [c["path"] for c in r.candidates] == [p["A"], p["base"]] and r.leading == p["A"]
    assert r.answer["kind"] == "derived" and r.answer["separated"][0]["path"] == p["base"]
    assert "(" in r.findings[1] and "% closer)" in r.findings[1]


def test_added_layers_are_derived_from_the_parent(family):
    r = provenance(family["A_deeper"], [family["base"], family["U"], family["A"]], screen=False)
    assert r.answer["ratio"] < 1.2                  # the added layers dominate both pooled numbers
    assert r.answer["kind"] == "derived" and r.leading == family["A"]
    assert [s["path"] for s in r.answer["separated"]] == [family["base"]]


def test_a_true_tie_stays_a_tie(family, tmp_path):
    """Two candidates the tuned model is equally far from in every block: nothing singles one out."""
    base = llama(np.random.default_rng(7), **SHAPE)
    twin = dict(base)
    k0 = "model.layers.0.self_attn.q_proj.weight"
    twin[k0] = base[k0] + 1e-4 * base[k0].std()
    p_twin = str(write_checkpoint(tmp_path / "twin", twin))
    r = provenance(family["A"], [family["base"], p_twin], screen=False)
    assert r.answer["kind"] == "tie" and r.answer["separated"] == []
    assert "no block singles out one of them" in r.findings[0]


# ---------------------------------------------------------------- finding 3: nothing compared

def _adapter(tmp_path, base_path: str):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": base_path}))
    rng = np.random.default_rng(0)
    h = SHAPE["hidden"]
    save_file(d / "adapter_model.safetensors", {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
            (0.05 * rng.standard_normal((2, h) if ab == "A" else (h, 2))).astype(np.float32)
        for i in range(SHAPE["layers"]) for ab in "AB"})
    return d


def _bad(args, *expect, out=None):
    res = CliRunner().invoke(main, ["provenance", *args, "-q"] + (["--json", str(out)] if out else []))
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: ")
    for e in expect:
        assert e in res.stderr
    assert out is None or not out.exists()
    return res.stderr


def test_an_adapter_as_tuned_is_refused_with_what_to_run(family, tmp_path):
    ad = _adapter(tmp_path, family["base"])
    with pytest.raises(CheckpointError, match="is a PEFT adapter"):
        provenance(str(ad), [family["base"]])
    _bad([str(ad), "--candidates", family["base"]], "is a PEFT adapter", "weightdiff compare BASE ADAPTER",
         f"names `{family['base']}` as its base", out=tmp_path / "p.json")
    # an adapter among the candidates is not compared, with the reason, and never reads "unrelated"
    r = provenance(family["A"], [str(ad), family["base"]], screen=False)
    assert r.incompatible == [{"path": str(ad), "reason": "a PEFT adapter (a change), not a model's weights: "
                                                          "give it merged into its base"}]


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_filters_that_leave_nothing_are_bad_input(family, tmp_path, flag):
    glob = "nomatch*" if flag == "--include" else "*"
    with pytest.raises(OptionsError, match="nothing to compare"):
        provenance(family["A"], [family["base"]], **{flag[2:]: (glob,)})
    verb = "matches none" if flag == "--include" else "leaves none"
    _bad([family["A"], "--candidates", family["base"], flag, glob], f"error: {flag} '{glob}' {verb} of the",
         out=tmp_path / "p.json")


def test_nothing_compared_is_inconclusive_not_no_candidate(family):
    r = provenance(family["A"], [family["narrow"]])
    assert r.candidates == [] and r.answer["kind"] == "inconclusive" and r.answer["not_compared"] == 1
    assert r.findings[0].startswith("nothing was compared: the candidate could not be compared")
    md = _md(r)
    assert "INCONCLUSIVE: no candidate could be compared" in md and "NO CANDIDATE" not in md
    assert "is a base of this model" not in md
    # unrelated candidates beside one not compared: "none of the compared", and the other not judged
    r = provenance(family["A"], [family["narrow"], family["U"]], screen=False)
    assert r.answer["kind"] == "none" and r.answer["not_compared"] == 1
    assert r.findings[0].endswith("; 1 could not be compared and is not judged")
    md = _md(r)
    assert "NO CANDIDATE: none of the compared candidates is a base" in md
    assert "1 could not be compared and is not judged" in md


# ---------------------------------------------------------------- finding 4: itself, a copy, a cast

def test_the_tuned_model_among_its_candidates_is_dropped_with_a_finding(family, tmp_path):
    for spelling in (family["A"], family["A"] + "/model.safetensors"):
        r = provenance(family["A"], [spelling, family["base"]], screen=False)
        assert [c["path"] for c in r.candidates] == [family["base"]]
        assert f"`{spelling}` is the tuned model itself (same weight files); left out of the ranking" in r.findings
    with pytest.raises(OptionsError, match="every candidate is the tuned model itself"):
        provenance(family["A"], [family["A"]])
    _bad([family["A"], "--candidates", family["A"] + "/"], "--candidates: every candidate is the tuned model itself",
         out=tmp_path / "p.json")


def test_a_bitwise_copy_is_identical_and_a_cast_is_a_cast(family):
    r = provenance(family["base"], [family["base_copy"], family["U"]], screen=False)
    assert r.answer["kind"] == "identical" and r.leading == family["base_copy"]
    assert r.findings[0] == (f"`{family['base_copy']}` ranks first: it holds the same weights as the tuned model "
                             "(every compared tensor bitwise equal)")
    assert not any("fine-tune in one direction" in f for f in r.findings)
    md = _md(r)
    assert "IDENTICAL to" in md and "the same weights" in md and "related by a fine-tune" not in md
    r = provenance(family["base"], [family["base_bf16"], family["U"]], screen=False)
    assert r.answer["kind"] == "cast_only" and r.leading == family["base_bf16"]
    assert "the same weights as the tuned model at another precision" in r.findings[0]
    md = _md(r)
    assert "CAST of" in md and "related by a fine-tune" not in md
    # the exact one outranks a candidate within the margin that is not exact
    r = provenance(family["base"], [family["base_bf16"], family["base_copy"]], screen=False)
    assert r.leading == family["base_copy"] and r.answer["kind"] == "identical"


# ---------------------------------------------------------------- finding 5: one checkpoint, two spellings

def test_a_folder_and_its_weights_file_are_one_candidate(family):
    a = family["A"]
    r = provenance(family["A_l1"], [a, a + "/model.safetensors", family["base"]], screen=False)
    assert [c["path"] for c in r.candidates] == [a, family["base"]]
    assert f"`{a}/model.safetensors` is the same checkpoint as `{a}` (same weight files); ranked once, as `{a}`" \
        in r.findings
    assert r.answer["kind"] == "derived" and r.answer["tied"] == []


# ---------------------------------------------------------------- finding 8: weak evidence names its number

def test_weak_evidence_names_only_the_number_near_the_reference(family):
    r = provenance(family["scaled3"], [family["base"]], screen=False)
    assert r.answer["kind"] == "weak" and r.answer["weak_by"] == ["relative_change"]
    weak = next(f for f in r.findings if "is weak" in f)
    assert "relative change 2.0 is nearer the unrelated reference (1.4) than a fine-tune's" in weak
    assert "; 1 - cosine " in weak and " is not;" in weak and "are nearer" not in weak
    assert "its relative change is nearer two independent models" in _md(r)


# ---------------------------------------------------------------- finding 13: compare's block labels

def test_blocks_are_labelled_and_measured_as_compare_does(family):
    r = provenance(family["A"], [family["base"]], screen=False)
    ours = [(b["block"], b["rel_change"]) for b in r.candidates[0]["blocks"]]
    theirs = [(b.block, b.rel_change) for b in compare(family["base"], family["A"], rank=False).blocks]
    assert [b for b, _ in ours] == [b for b, _ in theirs] == ["embeddings", "layers.0", "layers.1", "head"]
    for (_, x), (_, y) in zip(ours, theirs):
        assert x == pytest.approx(y, rel=1e-12)
    assert not math.isnan(ours[0][1])


def test_near_tie_rule_on_hand_made_rows():
    """A model assembled from two candidates (each closer in some blocks) stays tied; exactness decides first."""
    from weightdiff.judge.ties import promote, singles_out

    def row(path, values, verdict="derived", ident=0):
        return {"path": path, "verdict": "derived", "compare_verdict": verdict, "identical_large_params": ident,
                "relative_change_large": 0.1, "blocks": [{"block": f"layers.{i}", "rel_change": v}
                                                        for i, v in enumerate(values)]}

    x, y = row("x", [0.0, 0.0, 0.2, 0.2], ident=10), row("y", [0.2, 0.2, 0.0, 0.0], ident=10)
    assert singles_out(x, y) is None and singles_out(y, x) is None and promote([y, x]) == [y, x]
    # closer in half the blocks and nowhere farther: not a majority, and both hold bitwise matrices
    z = row("z", [0.1, 0.1, 0.1, 0.1], ident=5)
    w = row("w", [0.1, 0.1, 0.3, 0.3], ident=5)
    assert singles_out(z, w) is None
    # ... but bitwise large matrices on one side only decide it
    w["identical_large_params"] = 0
    assert singles_out(z, w)["closer"] == ["layers.2", "layers.3"] and promote([w, z]) == [z, w]
    # a bitwise copy beats anything within the margin, even a candidate closer in no block
    c = row("c", [0.1, 0.1, 0.1, 0.1], verdict="identical")
    assert singles_out(c, z)["exact"] == "identical" and singles_out(z, c) is None


def test_the_answer_does_not_depend_on_the_candidate_order(family):
    one = provenance(family["A_l1"], [family["base"], family["A"]], screen=False)
    two = provenance(family["A_l1"], [family["A"], family["base"]], screen=False)
    assert one.to_json(include_run=False) == two.to_json(include_run=False)
