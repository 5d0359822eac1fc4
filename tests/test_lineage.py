"""weightdiff lineage: a base -> SFT -> DPO chain reports each step and the end-to-end change."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.errors import OptionsError
from weightdiff.lineage import SCHEMA, lineage
from weightdiff.render.memo_md import to_markdown
from weightdiff.render.provenance import lineage_text
from weightdiff.render.sections import lineage_blocks
from conftest import write_checkpoint
from models import llama, low_rank_update

SHAPE = dict(layers=3, hidden=64, inter=128, vocab=256)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """SFT changes block 0 (rank 4, 5%); DPO then changes block 2 (rank 2, 2%)."""
    root = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(11)
    base = llama(rng, **SHAPE)
    sft = dict(base)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"):
        k = f"model.layers.0.{m}.weight"
        sft[k] = low_rank_update(rng, base[k], 4, rel=0.05)
    dpo = dict(sft)
    for m in ("self_attn.q_proj", "self_attn.v_proj"):
        k = f"model.layers.2.{m}.weight"
        dpo[k] = low_rank_update(rng, sft[k], 2, rel=0.02)
    return [str(write_checkpoint(root / n, t)) for n, t in (("base", base), ("sft", sft), ("dpo", dpo))]


def test_three_step_chain_reports_each_step(chain):
    r = lineage(chain, rank=False)
    assert [(s["from"], s["to"]) for s in r.steps] == [(chain[0], chain[1]), (chain[1], chain[2])]
    assert (r.end_to_end["from"], r.end_to_end["to"]) == (chain[0], chain[2])
    assert [s["verdict"] for s in r.steps] == ["derived", "derived"] and r.end_to_end["verdict"] == "derived"
    assert [s["tensors_changed"] for s in r.steps] == [3, 2] and r.end_to_end["tensors_changed"] == 5
    assert [s["blocks_changed"] for s in r.steps] == [1, 1] and r.end_to_end["blocks_changed"] == 2
    blocks = {b["block"]: b for b in r.blocks}
    # which step injected what: block 0 only in step 1, block 2 only in step 2, block 1 never
    assert blocks["layers.0"]["steps"][0] > 0.01 and blocks["layers.0"]["steps"][1] == 0.0
    assert blocks["layers.2"]["steps"][0] == 0.0 and blocks["layers.2"]["steps"][1] > 0.001
    assert blocks["layers.1"]["steps"] == [0.0, 0.0] and blocks["layers.1"]["end_to_end"] == 0.0
    assert blocks["layers.0"]["end_to_end"] == pytest.approx(blocks["layers.0"]["steps"][0])
    # step norms add in quadrature here (disjoint tensors), so the chain is not straight
    n1, n2 = (s["norm_delta"] for s in r.steps)
    assert r.end_to_end["norm_delta"] == pytest.approx(math.hypot(n1, n2), rel=1e-6)
    assert r.steps[0]["share_of_path"] == pytest.approx(n1 / (n1 + n2))
    assert r.end_to_end["straightness"] == pytest.approx(math.hypot(n1, n2) / (n1 + n2))
    assert r.findings[0].startswith(f"step 1 (`{chain[0]}` -> `{chain[1]}`): derived")
    assert "step 1 moved the weights most" in r.findings[-1]
    # one quantity, one string: the findings print the relative change as the table does (sci)
    from weightdiff.render.formats import sci
    assert f"relative change {sci(r.steps[0]['relative_change'])}," in r.findings[0]


def test_lineage_json_and_renders(chain):
    a = lineage(chain, rank=False)
    assert a.to_json(include_run=False) == lineage(chain, rank=False).to_json(include_run=False)
    d = json.loads(a.to_json())
    assert d["schema"] == SCHEMA == "weightdiff.lineage/1" and d["paths"] == chain
    text = lineage_text(d)
    assert text.splitlines()[0] == "weightdiff lineage: " + " -> ".join(chain)
    assert any(line.startswith("step 1 ") for line in text.splitlines())
    assert any(line.startswith("end to end ") for line in text.splitlines())
    assert any(line.startswith("layers.2 ") for line in text.splitlines())
    md = to_markdown(lineage_blocks(d), {})
    assert md.startswith("# How did the weights move along") and "| end to end | `" in md and "| `derived` |" in md


def test_two_step_chain_and_bad_input(chain):
    r = lineage(chain[:2], rank=False)
    assert len(r.steps) == 1 and r.end_to_end["norm_delta"] == r.steps[0]["norm_delta"]
    with pytest.raises(OptionsError, match="a lineage needs at least two checkpoints"):
        lineage(chain[:1])


def test_cli(chain, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["lineage", *chain, "--no-rank", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith("weightdiff lineage: ")
    res = runner.invoke(main, ["lineage", *chain, "--no-rank", "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["schema"] == "weightdiff.lineage/1"
    assert f"comparing {chain[0]} -> {chain[2]} (end to end)" in res.stderr
    for args, msg in ((["lineage", chain[0]], "at least two checkpoints"),
                      (["lineage", chain[0], str(tmp_path / "nope")], "nope")):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and res.stdout == ""
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: ") and msg in res.stderr


def test_a_chain_out_of_order_is_flagged(chain):
    """sft, base, dpo: the ends (sft -> dpo) are closer than step 2 (base -> dpo): the chain doubles
    back; lineage said nothing."""
    base, sft, dpo = chain
    assert not any("doubles back" in f for f in lineage(chain, rank=False).findings)
    r = lineage([sft, base, dpo], rank=False)
    assert any("the chain doubles back, so its order may not be the order the models were made in" in f
               for f in r.findings), r.findings


def test_lineage_html_footer_points_to_no_missing_section():
    # the footer said 'see "What these numbers show, and what they do not"', a section the lineage memo lacks
    from weightdiff.render.memo import Block
    from weightdiff.render.memo_html import to_html as render_html

    html = render_html([Block("h1", "Lineage"), Block("p", [("", "text")])], "t")
    assert "What these numbers show" not in html and "weights only.</p>" in html
    html = render_html([Block("h1", "M"), Block("h2", "What these numbers show, and what they do not", "limits")], "t")
    assert "see “What these numbers show, and what they do not”." in html


def test_a_chain_that_returns_to_its_start_doubles_back(chain):
    """base -> sft -> base: the end to end is identical (norm 0) while step 1 moved 5e-2; the finding
    required 0 < end-to-end norm, so the strongest case of doubling back got none."""
    base, sft, _ = chain
    r = lineage([base, sft, base + "/model.safetensors"], rank=False)
    assert r.end_to_end["verdict"] == "identical" and r.end_to_end["norm_delta"] == 0
    assert any(f.startswith(f"the chain ends where it began: `{base}` and `{base}/model.safetensors` are identical, "
                            "although step ") and "the steps' changes cancel out exactly" in f
               for f in r.findings), r.findings
    # the repeated checkpoint is named, whatever its spelling
    assert f"`{base}` and `{base}/model.safetensors` (positions 1 and 3) are the same checkpoint: steps 1 to 2 " \
           "lead from it back to it" in r.findings
    assert not any("same checkpoint" in f for f in lineage(chain, rank=False).findings)


def test_a_step_from_a_checkpoint_to_itself_is_refused(chain, tmp_path):
    """`lineage base base` and `lineage base ./base/` ran a step that measures nothing, without comment."""
    base, sft, _ = chain
    for paths in ([base, base], [base, base + "/", sft], [sft, base, base + "/model.safetensors"]):
        with pytest.raises(OptionsError, match="are the same checkpoint: a step from a model to itself measures"):
            lineage(paths, rank=False)
    (tmp_path / "link").symlink_to(base)
    res = CliRunner().invoke(main, ["lineage", base, str(tmp_path / "link"), "-q"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == (f"error: `{base}` and `{tmp_path / 'link'}` (positions 1 and 2 of the chain) are the same "
                          "checkpoint: a step from a model to itself measures nothing (list each model once where "
                          "the chain passes it; to compare two copies of one model, use weightdiff compare)\n")


def test_a_step_where_nothing_was_compared_claims_no_changed_block(chain, tmp_path):
    """sft -> a model of another width: the step read "inconclusive, relative change n/a, 3 of 3 blocks
    changed", the table 3/3 and a path share of 0% though nothing of it was compared."""
    narrow = str(write_checkpoint(tmp_path / "narrow", llama(np.random.default_rng(5), layers=3, hidden=32,
                                                                 inter=64, vocab=256)))
    base, sft, _ = chain
    r = lineage([base, sft, narrow], rank=False)
    s = r.steps[1]
    assert (s["blocks_changed"], s["blocks_reshaped"], s["params_compared"], s["share_of_path"]) == (0, 3, 0, None)
    assert r.steps[0]["share_of_path"] is None and r.end_to_end["straightness"] is None
    assert f"step 2 (`{sft}` -> `{narrow}`): inconclusive, relative change n/a, none of the 3 blocks could be " \
           "compared" in r.findings
    assert "end to end: relative change n/a; path length not measured (step 2 could not be compared)" in r.findings
    assert "step 2: no element of the two models could be compared, so the chain is not measured there" in r.findings
    d = json.loads(r.to_json())
    rows = {line.split()[0] + line.split()[1]: line for line in lineage_text(d).splitlines() if line.startswith("step")}
    assert rows["step2"].split()[-2:] == ["n/a", "n/a"] and "1/3" in rows["step1"]
    md = to_markdown(lineage_blocks(d), {})
    assert "| n/a (none could be compared) |" in md


def test_straightness_is_not_stated_when_the_ends_compare_more_than_a_step(tmp_path, rng):
    """A -> B trims the vocabulary from 256 to 240 rows (and tunes q a little), B -> C grows it back: the ends
    compare the 16 new rows against A's, which no step could, and straightness read 71.6 ("7160.6%" of the
    path); `report` then refused the JSON lineage wrote (found by the tester of the memo's consistency checks)."""
    from conftest import write_checkpoint
    from models import llama

    a = llama(rng, layers=2, vocab=256)
    b = {k: v[:240] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in a.items()}
    b["model.layers.0.self_attn.q_proj.weight"] = a["model.layers.0.self_attn.q_proj.weight"] * 1.01
    c = dict(b)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        c[k] = np.concatenate([b[k], rng.normal(0, 0.02, (16, 128)).astype(np.float32)])
    paths = [write_checkpoint(tmp_path / n, m) for n, m in (("a", a), ("b", b), ("c", c))]
    r = lineage(paths)
    assert r.end_to_end["straightness"] is None
    assert any(f.startswith("straightness not measured") for f in r.findings)
    out = tmp_path / "l.json"
    res = CliRunner().invoke(main, ["lineage", *map(str, paths), "--json", str(out), "--report", str(tmp_path / "l.md"),
                                    "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(out), "--memo", str(tmp_path / "again.md"), "-q"])
    assert res.exit_code == 0, res.output


def test_steps_of_equal_length_are_not_ranked(tmp_path):
    """The same update applied to two blocks, one per step: the scale tester's chain read "step 1 moved the weights
    most" on a 50.001% / 49.999% split. Steps within 1% of the longest are named together."""
    rng = np.random.default_rng(21)
    base = llama(rng, **SHAPE)
    a, b = dict(base), {}
    k0, k2 = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    delta = low_rank_update(rng, base[k0], 4, rel=0.05) - base[k0]
    a[k0] = base[k0] + delta
    b = dict(a)
    b[k2] = base[k2] + delta
    paths = [str(write_checkpoint(tmp_path / n, t)) for n, t in (("base", base), ("a", a), ("b", b))]
    r = lineage(paths, rank=False)
    assert "steps 1 and 2 moved the weights about equally (50.0% and 50.0% of the path length" in r.findings[-1], \
        r.findings[-1]
    assert "moved the weights most" not in r.findings[-1]


def test_each_comparison_of_a_chain_or_a_provenance_run_shows_progress(chain):
    """Scale tester 2: provenance, lineage printed one line per candidate or step, then nothing while a comparison
    ran (69 minutes for one 70B-width candidate). Each comparison now gets its own progress line, closed at its end;
    the CLI makes them unless --quiet."""
    import io

    from weightdiff.cli_options import _measure_progress
    from weightdiff.provenance import provenance
    from weightdiff.render.terminal import ProgressLine

    made = []

    def make():
        buf = io.StringIO()
        line = ProgressLine(stream=buf, delay=0.0, interval=0.0)
        made.append(buf)
        return line

    lineage(chain, rank=False, measure_progress=make)
    assert len(made) == 3 and all("progress:" in b.getvalue() and "100" in b.getvalue() for b in made), \
        [b.getvalue() for b in made]
    made.clear()
    provenance(chain[2], [chain[0]], measure_progress=make)
    assert len(made) == 1 and "progress:" in made[0].getvalue()
    assert _measure_progress(True) is None and callable(_measure_progress(False)().close)
