"""weightdiff provenance: known-answer rankings on tiny Llama-shaped checkpoints, the CLI, the renders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.errors import CheckpointError, OptionsError
from weightdiff.options import Thresholds
from weightdiff.provenance import SCHEMA, provenance
from weightdiff.judge.relatedness import evidence, judge, sample_plan, sample_rows, screen_estimate
from weightdiff.render.memo_html import to_html
from weightdiff.render.memo_md import to_markdown
from weightdiff.render.sections import provenance_blocks
from weightdiff.render.provenance import (draw_provenance, provenance_figure, provenance_png,
                                          ranking_text)
from conftest import write_checkpoint
from models import gpt2, llama, low_rank_update

SHAPE = dict(layers=2, hidden=64, inter=128, vocab=256)


def finetune(tensors: dict, seed: int, rel: float = 0.02) -> dict:
    """Every matrix moved by dense noise of ``rel`` x its spread plus a rank-4 update; gains nudged."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tensors.items():
        if v.ndim == 2:
            w = v + rel * v.std() * rng.standard_normal(v.shape).astype(np.float32)
            out[k] = low_rank_update(rng, w, 4, rel=rel / 2)
        else:
            out[k] = (v + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
    return out


def permute_mlp(tensors: dict, seed: int) -> dict:
    """Shuffle the hidden neurons of every MLP: gate/up rows and down columns together."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for i in range(SHAPE["layers"]):
        p = rng.permutation(SHAPE["inter"])
        pre = f"model.layers.{i}.mlp."
        out[pre + "gate_proj.weight"] = tensors[pre + "gate_proj.weight"][p]
        out[pre + "up_proj.weight"] = tensors[pre + "up_proj.weight"][p]
        out[pre + "down_proj.weight"] = tensors[pre + "down_proj.weight"][:, p]
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = llama(np.random.default_rng(7), **SHAPE)
    models = {
        "base": base,
        "tuned": finetune(base, 1),
        "sibling": finetune(base, 2),
        "far_sibling": finetune(base, 3, rel=0.08),
        "independent": llama(np.random.default_rng(99), **SHAPE),
        "stranger": llama(np.random.default_rng(123), **SHAPE),
        "permuted": permute_mlp(finetune(base, 4, rel=0.01), 5),
        "short_base": {k: v for k, v in base.items() if ".layers.1." not in k},
        "other_width": llama(np.random.default_rng(7), layers=2, hidden=32, inter=64, vocab=256),
        "gpt2": gpt2(np.random.default_rng(7)),
    }
    paths = {name: str(write_checkpoint(root / name, t)) for name, t in models.items()}
    paths["bf16_base"] = str(write_checkpoint(root / "bf16_base", base, dtype="BF16"))
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    paths["garbage"] = str(root / "garbage.safetensors")
    return paths


def _by_path(result, zoo) -> dict:
    names = {v: k for k, v in zoo.items()}
    return {names[c["path"]]: c for c in result.candidates}


def test_finetune_ranks_its_true_base_first(zoo):
    r = provenance(zoo["tuned"], [zoo["independent"], zoo["sibling"], zoo["base"]], screen=False)
    order = [c["path"] for c in r.candidates]
    assert order == [zoo["base"], zoo["sibling"], zoo["independent"]]
    assert r.leading == zoo["base"]
    c = _by_path(r, zoo)
    assert [c[n]["verdict"] for n in ("base", "sibling", "independent")] == ["derived", "derived", "unrelated"]
    assert [c[n]["rank"] for n in ("base", "sibling", "independent")] == [1, 2, 3]
    # the fine-tune moved every matrix by about 2% (noise) and 1% (rank 4): sqrt(0.02^2 + 0.01^2)
    assert c["base"]["relative_change_large"] == pytest.approx(math.hypot(0.02, 0.01), rel=0.1)
    # a sibling is two independent fine-tunes away: about sqrt(2) times further
    assert c["sibling"]["relative_change_large"] / c["base"]["relative_change_large"] == pytest.approx(
        math.sqrt(2), rel=0.1)
    assert 1 - c["base"]["cosine_large"] < 1e-3
    assert c["independent"]["relative_change_large"] == pytest.approx(math.sqrt(2), rel=0.05)
    assert abs(c["independent"]["cosine_large"]) < 0.05
    # the norm gains are left out of relatedness, and the evidence says how much was left out
    assert c["base"]["excluded"]["vectors"] == 2 * SHAPE["layers"] + 1
    assert c["base"]["excluded"]["vector_params"] == (2 * SHAPE["layers"] + 1) * SHAPE["hidden"]
    assert "norm gains, biases" in r.to_dict()["relatedness"]
    assert c["base"]["coverage"] == 1.0 and c["base"]["identical_share"] == 0.0
    # compare's block labels and order (judge.aggregate), so the tables line up across commands
    assert [b["block"] for b in c["base"]["blocks"]] == ["embeddings", "layers.0", "layers.1", "head"]
    assert all(0.005 < b["rel_change"] < 0.05 for b in c["base"]["blocks"] if b["block"].startswith("layers"))
    assert c["base"]["permutation"]["groups_permuted"] == 0
    assert r.findings[0].startswith(f"`{zoo['base']}` ranks first")


def test_bitwise_copy_and_cast_of_the_base(zoo, tmp_path):
    r = provenance(zoo["base"], [zoo["bf16_base"], zoo["sibling"]], screen=False)
    c = _by_path(r, zoo)
    assert c["bf16_base"]["rank"] == 1 and c["bf16_base"]["verdict"] == "derived"
    assert c["bf16_base"]["relative_change_large"] < 0.01          # bf16 rounding only
    copy = str(write_checkpoint(tmp_path / "copy", llama(np.random.default_rng(7), **SHAPE)))
    r = provenance(zoo["base"], [copy], screen=False)
    assert r.candidates[0]["identical_share"] == 1.0 and r.candidates[0]["relative_change_large"] == 0.0


def test_unrelated_model_is_unrelated_against_every_candidate(zoo):
    r = provenance(zoo["stranger"], [zoo["base"], zoo["sibling"], zoo["independent"]], screen=False)
    assert [c["verdict"] for c in r.candidates] == ["unrelated"] * 3
    assert r.leading is None
    for c in r.candidates:
        assert c["relative_change_large"] == pytest.approx(math.sqrt(2), rel=0.05)
        assert abs(c["cosine_large"]) < 0.05
        assert c["permutation"]["groups_permuted"] == 0       # random models are never "aligned"
    assert r.findings[0].startswith("no candidate is a plausible base")


def test_permuted_mlp_neurons_plus_finetune_is_still_derived(zoo):
    r = provenance(zoo["permuted"], [zoo["independent"], zoo["base"]], screen=False)
    c = _by_path(r, zoo)
    assert r.leading == zoo["base"] and c["base"]["verdict"] == "derived"
    perm = c["base"]["permutation"]
    assert perm["groups_permuted"] == perm["groups_examined"] == SHAPE["layers"]
    assert perm["moved_share"] > 0.95
    assert all(g["matched_cosine"] > 0.99 for g in perm["groups"])
    assert c["base"]["relative_change_large"] == pytest.approx(math.hypot(0.01, 0.005), rel=0.15)
    assert any("permuted in 2 of 2 MLPs" in f for f in r.findings)
    # without undoing the permutation the MLP matrices look like independent ones
    raw = _by_path(provenance(zoo["permuted"], [zoo["base"]], screen=False, permutations=False), zoo)
    assert raw["base"]["relative_change_large"] > 0.5
    assert raw["base"]["permutation"] is None
    # and an unrelated candidate gets no permutation
    assert c["independent"]["verdict"] == "unrelated" and c["independent"]["permutation"]["groups_permuted"] == 0


def test_screening_agrees_with_the_full_ranking(zoo):
    cands = [zoo["independent"], zoo["far_sibling"], zoo["base"], zoo["sibling"]]
    full = provenance(zoo["tuned"], cands, screen=False)
    screened = provenance(zoo["tuned"], cands, full_top=1, sample_kib=8)
    s = screened.screening
    assert s is not None and s["candidates"] == 4 and s["full_top"] == 1
    # 8 KiB over the 10 non-MLP matrices: a few 256-byte rows of each, far fewer than all rows
    assert s["tensors"] == 10 and s["mlp_left_out"] is True
    assert s["bytes_per_checkpoint"] <= 8 * 1024 and s["rows"] < 1000
    by_screen = sorted(screened.candidates, key=lambda c: c["screen"]["relative_change_large"])
    assert [c["path"] for c in by_screen] == [c["path"] for c in full.candidates]
    assert [c["path"] for c in screened.candidates] == [c["path"] for c in full.candidates]
    assert [c["compared"] for c in screened.candidates] == ["full", "sample", "sample", "sample"]
    assert [c["verdict"] for c in screened.candidates] == [c["verdict"] for c in full.candidates]
    for a, b in zip(screened.candidates, full.candidates):
        assert a["screen"]["relative_change_large"] == pytest.approx(b["relative_change_large"], rel=0.5)
    # auto: more candidates than --full-top means screening
    assert provenance(zoo["tuned"], cands[:2], full_top=1, sample_kib=8).screening is not None
    assert provenance(zoo["tuned"], cands[:2]).screening is None


def test_other_shapes_are_compared_on_what_they_share_or_listed(zoo):
    r = provenance(zoo["tuned"], [zoo["short_base"], zoo["gpt2"], zoo["other_width"], zoo["garbage"]])
    c = _by_path(r, zoo)
    assert list(c) == ["short_base"]
    assert c["short_base"]["verdict"] == "derived"
    share = c["short_base"]["coverage"]
    assert 0.5 < share < 0.8 and c["short_base"]["params_shared"] < r.tuned["params"]
    assert any(f"shares {share:.1%}" in f for f in r.findings)
    why = {x["path"]: x["reason"] for x in r.incompatible}
    assert set(why) == {zoo["gpt2"], zoo["other_width"], zoo["garbage"]}
    assert why[zoo["gpt2"]].startswith("no tensor name in common with the tuned model")
    assert why[zoo["other_width"]].startswith("no large matrix of the same shape: `")
    assert why[zoo["garbage"]].startswith("cannot be read: ")
    assert sum(f.endswith(why[zoo["gpt2"]]) for f in r.findings) == 1


def test_bad_input_raises(zoo, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        provenance(zoo["tuned"], [str(tmp_path / "missing")])
    with pytest.raises(OptionsError, match="candidates: none given"):
        provenance(zoo["tuned"], [])
    with pytest.raises(OptionsError, match="full_top must be at least 1"):
        provenance(zoo["tuned"], [zoo["base"]], full_top=0)


def test_json_is_reproducible_and_follows_the_schema(zoo):
    a = provenance(zoo["tuned"], [zoo["sibling"], zoo["base"]], screen=True, sample_kib=8, full_top=1)
    b = provenance(zoo["tuned"], [zoo["sibling"], zoo["base"]], screen=True, sample_kib=8, full_top=1)
    assert a.to_json(include_run=False) == b.to_json(include_run=False)
    d = json.loads(a.to_json())
    assert d["schema"] == SCHEMA == "weightdiff.provenance/1"
    assert d["reference"]["relative_change"] == pytest.approx(math.sqrt(2)) and d["reference"]["cosine"] == 0
    assert d["leading"] == zoo["base"] and len(d["limits"]) >= 3
    assert {"candidates", "incompatible", "screening", "findings", "settings", "tuned", "run"} <= set(d)
    assert d["settings"]["thresholds"] == Thresholds().to_dict()


def test_evidence_on_hand_made_rows():
    t = Thresholds()

    def row(name, shape, nb, nd, cos, status="changed", block="layers.0"):
        n = math.prod(shape)
        return {"name": name, "status": status, "shape": list(shape), "numel": n, "numel_compared": n,
                "norm_base": nb, "norm_tuned": nb, "norm_delta": nd, "cosine": cos, "compared": "float",
                "block": block}

    rows = [row("model.layers.0.a.weight", (64, 64), 3.0, 0.3, 0.99),
            row("model.layers.0.b.weight", (64, 128), 4.0, 0.0, 1.0, "unchanged"),
            row("model.layers.0.g.weight", (64,), 8.0, 4.0, 0.9), row("s", (4, 4), 1.0, 1.0, 0.5, block=None),
            {"name": "new", "status": "added", "shape": [10, 10], "numel": 100, "numel_compared": 0,
             "compared": "none"}]
    e = evidence(rows, t, tuned_params=4096 + 8192 + 64 + 16 + 100)
    assert e["relative_change_large"] == pytest.approx(0.3 / 5.0)            # sqrt(0.09 / (9 + 16))
    assert e["relative_change"] == pytest.approx(math.sqrt((0.09 + 16 + 1) / (9 + 16 + 64 + 1)))
    assert e["cosine_large"] == pytest.approx((4096 * 0.99 + 8192 * 1.0) / (4096 + 8192))
    assert e["identical_share"] == 0.25 and e["tensors_compared"] == 4
    assert e["coverage"] == pytest.approx((4096 + 8192 + 64 + 16) / (4096 + 8192 + 64 + 16 + 100))
    assert e["excluded"] == {"vectors": 1, "vector_params": 64, "small_matrices": 1, "small_matrix_params": 16}
    # blocks as compare labels them (from the names): a tensor outside the blocks that does not embed is the head
    assert [b["block"] for b in e["blocks"]] == ["layers.0", "head"]
    assert e["identical_large_params"] == 8192 and e["large_params"] == 4096 + 8192
    assert judge(e["cosine_large"], e["relative_change_large"], t) == "derived"
    assert judge(0.1, 1.0, t) == "unrelated" and judge(0.1, 0.5, t) == "derived" and judge(0.3, 1.4, t) == "derived"


def test_screening_sample_math():
    assert sample_rows("w", 10, 3, 0).tolist() == sample_rows("w", 10, 3, 0).tolist()
    assert sample_rows("w", 10, 3, 0).tolist() != sample_rows("w", 10, 3, 1).tolist()
    assert sample_rows("w", 5, 9, 0).tolist() == [0, 1, 2, 3, 4]
    k = sample_plan({"a": (100, 64), "b": (10, 256)}, {"a": "F32", "b": "BF16"}, 2048)
    assert k == {"a": 4, "b": 2}      # 1024 bytes each: 4 rows of 256 B, 2 rows of 512 B
    assert sample_plan({"a": (100, 64)}, {"a": "F32"}, 1) == {"a": 1}
    # scaled sums: a tensor sampled at 1 of 4 rows weighs 4x
    est = screen_estimate({"a": np.array([1.0, 1.0, 0.04, 0.98]), "b": np.array([4.0, 4.0, 0.0, 4.0])},
                          {"a": 4.0, "b": 1.0}, {"a": 300, "b": 100})
    assert est["relative_change_large"] == pytest.approx(math.sqrt(4 * 0.04 / (4 + 4)))
    assert est["cosine_large"] == pytest.approx((300 * 0.98 + 100 * 1.0) / 400)


def test_renders(zoo, tmp_path):
    r = provenance(zoo["tuned"], [zoo["independent"], zoo["base"], zoo["gpt2"]], screen=False)
    d = r.to_dict()
    text = ranking_text(d)
    lines = text.splitlines()
    assert lines[0] == f"weightdiff provenance: {zoo['tuned']} ({d['tuned']['params']:,} parameters)"
    assert any(line.startswith(" 1  ") and "derived" in line for line in lines)
    assert any("(reference: unrelated)" in line and "1.4" in line for line in lines)
    assert "not compared:" in text and "what this cannot see:" in text and "attention heads" in text
    assert provenance_png(d) == provenance_png(d)
    fig = draw_provenance(d)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["Relative change", "1 − cosine"]
    fo, _ = provenance_figure(d)
    md = to_markdown(provenance_blocks(d, [fo]), {"provenance": "prov.png"})
    assert md.startswith("# Which base was") and "![Candidate bases](prov.png)" in md and "| 1 |" in md
    d["candidates"][0]["path"] = "<script>x</script>"
    page = to_html(provenance_blocks(d, [fo]))
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_cli(zoo, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["provenance", zoo["tuned"], "--candidates", zoo["independent"], zoo["base"],
                               "--json", "-", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    d = json.loads(res.stdout)
    assert d["leading"] == zoo["base"]
    out = tmp_path / "o"
    res = runner.invoke(main, ["provenance", zoo["tuned"], zoo["base"], "--no-screen", "--json", str(out / "p.json"),
                               "--plots", str(out), "--memo", str(out / "p.md")])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("weightdiff provenance: ")
    assert f"comparing {zoo['base']} in full" in res.stderr
    assert (out / "provenance.png").read_bytes()[:4] == b"\x89PNG"
    assert "](provenance.png)" in (out / "p.md").read_text()
    assert json.loads((out / "p.json").read_text())["schema"] == "weightdiff.provenance/1"
    for args, msg in ((["provenance", zoo["tuned"]], "expected TUNED --candidates A"),
                      (["provenance", zoo["tuned"], "--candidates", str(tmp_path / "nope")], "no such file"),
                      (["provenance", zoo["tuned"], zoo["base"], "--full-top", "0"], "--full-top must be")):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and res.stdout == ""
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: ") and msg in res.stderr


# ---------------------------------------------------------------- screening, ties, partial, NaN, duplicates

def _mlp_only_sibling(base: dict, seed: int, rel: float = 0.1) -> dict:
    """A fine-tune of ``base`` that changed its MLP matrices only (screening does not sample their rows)."""
    rng = np.random.default_rng(seed)
    out = dict(base)
    for k, w in base.items():
        if ".mlp." in k:
            n = rng.standard_normal(w.shape).astype(np.float32)
            out[k] = (w + rel * np.linalg.norm(w) / np.linalg.norm(n) * n).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def mlp_decoys(tmp_path_factory):
    """The tuned model changed q/v only; three decoys changed the base's MLPs only: on the sampled
    (non-MLP) rows the decoys and the true base are exactly as close. The base's folder sorts last."""
    root = tmp_path_factory.mktemp("decoys")
    base = llama(np.random.default_rng(11), **SHAPE)
    rng = np.random.default_rng(12)
    tuned = {k: (low_rank_update(rng, v, 4, rel=0.03) if ("q_proj" in k or "v_proj" in k) else v)
             for k, v in base.items()}
    paths = {"tuned": str(write_checkpoint(root / "tuned", tuned)), "base": str(write_checkpoint(root / "zz-base", base))}
    for i in range(3):
        paths[f"d{i}"] = str(write_checkpoint(root / f"mlp-ft{i}", _mlp_only_sibling(base, 20 + i)))
    (root / "a-base").symlink_to(root / "zz-base")
    paths["link"] = str(root / "a-base")
    return paths


@pytest.mark.parametrize("name", ["base", "link"])
def test_screening_never_hands_the_answer_to_a_decoy_by_its_path(mlp_decoys, name):
    cands = [mlp_decoys[name], mlp_decoys["d0"], mlp_decoys["d1"], mlp_decoys["d2"]]
    full = provenance(mlp_decoys["tuned"], cands, screen=False)
    for top in (1, 3):
        r = provenance(mlp_decoys["tuned"], cands, full_top=top, sample_kib=8)
        assert r.screening is not None
        assert r.leading == full.leading == mlp_decoys[name]
        assert [c["path"] for c in r.candidates] == [c["path"] for c in full.candidates]
        # the decoys tie with the base on the sample: all compared in full, none decided by the path
        assert [c["compared"] for c in r.candidates] == ["full"] * 4
        assert r.screening["compared_in_full"] == 4
        assert any("those the sample could not rule out" in f for f in r.findings)


def test_a_sampled_candidate_is_never_ranked_below_a_farther_full_one(zoo):
    cands = [zoo["independent"], zoo["far_sibling"], zoo["sibling"], zoo["base"]]
    r = provenance(zoo["tuned"], cands, full_top=1, sample_kib=8)
    values = [c["relative_change_large"] for c in r.candidates if c["verdict"] == "derived"]
    assert values == sorted(values)
    lead = r.candidates[0]
    assert lead["compared"] == "full" and lead["path"] == zoo["base"]
    for c in r.candidates[1:]:
        if c["compared"] == "sample" and c["verdict"] == "derived":
            assert c["screen"]["relative_change_floor"] > lead["relative_change_large"]


def test_duplicate_candidates_are_ranked_once(zoo, tmp_path):
    link = tmp_path / "base-link"
    link.symlink_to(zoo["base"])
    cands = [zoo["base"], zoo["base"] + "/", str(link), zoo["sibling"], zoo["sibling"] + "/."]
    r = provenance(zoo["tuned"], cands, screen=False)
    assert [c["path"] for c in r.candidates] == [zoo["base"], zoo["sibling"]]
    assert sum("is the same checkpoint as" in f for f in r.findings) == 3
    assert any(f.startswith(f"`{link}` is the same checkpoint as `{zoo['base']}`") for f in r.findings)


def test_near_tie_and_weak_evidence_are_hedged(zoo, tmp_path):
    base = llama(np.random.default_rng(7), **SHAPE)
    twin = {k: v.copy() for k, v in base.items()}
    k0 = "model.layers.0.self_attn.q_proj.weight"
    twin[k0] = twin[k0] + 1e-4 * twin[k0].std()           # the base, all but indistinguishable
    p_twin = str(write_checkpoint(tmp_path / "twin", twin))
    r = provenance(zoo["tuned"], [zoo["base"], p_twin], screen=False)
    assert r.answer["kind"] == "tie" and r.answer["tied"] and r.answer["ratio"] < 1.2
    assert "cannot be told apart from" in r.findings[0]
    d = r.to_dict()
    assert d["margins"]["near_tie_ratio"] == 1.2
    md = to_markdown(provenance_blocks(d), {})
    assert "the weights cannot tell them apart" in md
    # a model far from the base but not independent of it: "derived", flagged as weak evidence
    rng = np.random.default_rng(5)
    distilled = {k: (0.3 * v + v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
                 for k, v in base.items()}
    p_d = str(write_checkpoint(tmp_path / "distilled", distilled))
    r = provenance(p_d, [zoo["base"]], screen=False)
    c = r.candidates[0]
    assert c["verdict"] == "derived" and c["relative_change_large"] > 0.5
    assert r.answer["kind"] == "weak" and any("the evidence for" in f and "is weak" in f for f in r.findings)
    assert "WEAK EVIDENCE" in to_markdown(provenance_blocks(r.to_dict()), {})


def test_direction_is_never_claimed(zoo):
    # the base against its own fine-tune: "derived from" the child, with the caveat wherever it is stated
    r = provenance(zoo["base"], [zoo["tuned"], zoo["independent"]], screen=False)
    assert r.leading == zoo["tuned"]
    assert any("cannot show which of two related models came first" in f for f in r.findings)
    d = r.to_dict()
    assert any("which of two related models came first" in x for x in d["limits"])
    md = to_markdown(provenance_blocks(d), {})
    assert "the weights do not say which came first" in md


def test_shared_embeddings_only_read_partial(zoo, tmp_path):
    base = llama(np.random.default_rng(7), **SHAPE)
    fresh = llama(np.random.default_rng(31), **SHAPE)
    emb_only = {k: (base[k] if "embed_tokens" in k else v) for k, v in fresh.items()}
    emb_head = {k: (base[k] if ("embed_tokens" in k or "lm_head" in k) else v) for k, v in fresh.items()}
    for name, t, shared in (("emb_only", emb_only, "embeddings"), ("emb_head", emb_head, "embeddings, head")):
        p = str(write_checkpoint(tmp_path / name, t))
        r = provenance(p, [zoo["base"], zoo["independent"]], screen=False)
        c = _by_path(r, zoo)["base"]
        assert c["compare_verdict"] == "partial" and c["verdict"] == "partial", name
        assert c["components"]["shared"][0] == "embeddings"
        assert r.leading is None and r.answer["kind"] == "partial"
        assert f"`{zoo['base']}` is partially derived: the tuned model shares {shared} with it" in r.findings[0]
        md = to_markdown(provenance_blocks(r.to_dict()), {})
        assert f"PARTIALLY DERIVED from {zoo['base']}: shares {shared} with it" in md
        assert "NO CANDIDATE" not in md


def test_nonfinite_weights_do_not_crash_the_permutation_search(zoo, tmp_path):
    t = finetune(llama(np.random.default_rng(7), **SHAPE), 8, rel=0.01)
    t = {k: v.copy() for k, v in t.items()}
    t["model.layers.0.mlp.up_proj.weight"][:, 3] = np.inf
    t["model.layers.1.mlp.gate_proj.weight"][5, 7] = np.nan
    t["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.nan
    p = str(write_checkpoint(tmp_path / "nan", t))
    r = provenance(p, [zoo["base"], zoo["independent"]], screen=False)
    c = _by_path(r, zoo)["base"]
    assert r.leading == zoo["base"] and c["verdict"] == "derived"
    assert c["nonfinite"] > 0 and c["permutation"]["nonfinite_left_out"] > 0
    assert any("non-finite values (NaN or Inf) were found" in f for f in r.findings)
    res = CliRunner().invoke(main, ["provenance", p, "--candidates", zoo["base"], "-q", "--json", "-"])
    assert res.exit_code == 0, res.output


def test_permuted_neurons_of_a_fused_gate_up_are_undone_in_both_halves(tmp_path):
    """Phi-3 keeps gate and up as one ``gate_up_proj`` [2 x inter, hidden]: provenance matched no neurons
    there (a fused MLP was left alone), so a reordered fine-tune's MLPs read as another model's; undoing
    must move the gate rows and the up rows alike."""
    def fused(t: dict) -> dict:
        out = {k: v for k, v in t.items() if ".mlp.gate_proj" not in k and ".mlp.up_proj" not in k}
        for i in range(SHAPE["layers"]):
            pre = f"model.layers.{i}.mlp."
            out[pre + "gate_up_proj.weight"] = np.concatenate([t[pre + "gate_proj.weight"], t[pre + "up_proj.weight"]])
        return out

    base = llama(np.random.default_rng(7), **SHAPE)
    b = write_checkpoint(tmp_path / "base", fused(base))
    t = write_checkpoint(tmp_path / "tuned", fused(permute_mlp(finetune(base, 4, rel=0.01), 5)))
    r = provenance(str(t), [str(b)], screen=False)
    c = r.candidates[0]
    assert c["verdict"] == "derived"
    assert c["permutation"]["groups_permuted"] == c["permutation"]["groups_examined"] == SHAPE["layers"]
    assert c["relative_change_large"] == pytest.approx(math.hypot(0.01, 0.005), rel=0.15)
