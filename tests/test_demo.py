"""``weightdiff demo``: builds the documented pair, and compare + report find the documented answer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff import demo
from weightdiff.cli import main
from weightdiff.render.plots import FIGURES, figure_bytes


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "out dir"
    r = CliRunner().invoke(main, ["demo", str(d)])
    assert r.exit_code == 0, (r.output, r.exception)
    return d, r, json.loads((d / "out.json").read_text())


def test_demo_writes_every_file_and_says_where(ran):
    d, r, _ = ran
    for rel in ("out.json", "memo.html", "memo.md", "ground_truth.json", "plots/rank.png", "plots/heatmap.svg",
                "plots/figures.json", "base/model.safetensors", "tuned/model.safetensors"):
        assert (d / rel).is_file(), rel
    assert f"memo (HTML):      {d / 'memo.html'}" in r.stdout
    assert "DERIVED" in r.stdout                              # the terminal summary comes first
    assert json.loads((d / "ground_truth.json").read_text()) == demo.GROUND_TRUTH


def test_compare_finds_the_ground_truth(ran):
    _, _, data = ran
    gt = demo.GROUND_TRUTH
    s = data["summary"]
    assert s["verdict"] == "derived"
    assert s["blocks_total"] == demo.BLOCKS and s["blocks_changed"] == len(gt["blocks_changed"])
    changed_idx = sorted(b["index"] for b in data["blocks"] if b["index"] is not None and b["tensors_changed"])
    assert changed_idx == gt["blocks_changed"]
    by_name = {t["name"]: t for t in data["tensors"]}
    for i in gt["low_rank_update"]["blocks"]:
        for m in gt["low_rank_update"]["modules"]:
            t = by_name[f"model.layers.{i}.{m}.weight"]
            assert t["status"] == "changed"
            assert t["rank"]["numerical_rank"] == gt["low_rank_update"]["rank"]
            assert t["rank"]["energy_rank_99"] <= gt["low_rank_update"]["rank"]
    retrained = [t for n, t in by_name.items() if n.startswith(f"model.layers.{gt['retrained_block']}.")]
    assert retrained and all(t["status"] == "changed" for t in retrained)
    assert all(t["rank"]["energy_rank_90"] > 40 for t in retrained if t["rank"])           # dense, not low rank
    assert by_name["score.weight"]["status"] == "added"
    for name, (old, new) in gt["resized"].items():
        t = by_name[name]
        assert t["status"] == "resized" and t["base_shape"][0] == old and t["shape"][0] == new
    touched = {f"model.layers.{i}.{m}.weight" for i in gt["low_rank_update"]["blocks"]
               for m in gt["low_rank_update"]["modules"]} | {t["name"] for t in retrained} \
        | set(gt["added"]) | set(gt["resized"])
    assert all(t["status"] == "unchanged" for n, t in by_name.items() if n not in touched)
    assert set(s["flags"]) >= {"added_tensors", "resized_embeddings"}
    assert data["tuned"]["files"][0]["sha256"] and data["base"][0]["files"][0]["sha256"]    # hashed for the memo


def test_memo_carries_the_headline_and_figures(ran):
    d, _, data = ran
    page = (d / "memo.html").read_text().replace("<wbr>", "")
    for sentence in data["summary"]["headline"]:
        assert sentence.replace("'", "&#x27;") in page
    assert page.count("data:image/svg+xml;base64,") == 6
    md = (d / "memo.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (d / link).is_file()


def test_report_redraws_the_same_figures_from_the_json(ran):
    d, _, data = ran
    for name in ("depth_profile", "rank"):
        fig = FIGURES[name][1](data)
        assert figure_bytes(fig, "svg") == (d / "plots" / f"{name}.svg").read_bytes(), name


def test_demo_pair_is_seeded_and_stored_in_bf16(tmp_path):
    a_base, a_tuned = demo.demo_tensors()
    b_base, _ = demo.demo_tensors()
    assert all(np.array_equal(a_base[k], b_base[k]) for k in a_base)
    w = a_base["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(w.view(np.uint32) & 0xFFFF, np.zeros_like(w.view(np.uint32)))   # bf16-exact
    delta = a_tuned["model.layers.6.self_attn.q_proj.weight"] - a_base["model.layers.6.self_attn.q_proj.weight"]
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    assert s[7] > 10 * s[8]                    # rank 8 plus bf16 rounding noise, as documented


def test_readme_example_output_is_what_the_demo_prints_today(ran):
    """The README shows `weightdiff demo weightdiff-demo`; refresh with scripts/refresh_example.py."""
    from pathlib import Path

    from weightdiff.render.terminal import render_text

    _, _, data = ran
    data = json.loads(json.dumps(data))
    data["base"][0]["path"] = "weightdiff-demo/base"
    data["tuned"]["path"] = "weightdiff-demo/tuned"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- demo-output -->\n```\n\$ weightdiff demo weightdiff-demo\n(.*?)```\n<!-- /demo-output -->",
                      readme, re.S)
    assert block, "README lost its example output block"
    assert block.group(1) == render_text(data), "README example output is stale: run scripts/refresh_example.py"
