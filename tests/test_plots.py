"""Figures and captions from the compare JSON: reproducible bytes, labels, numbers, edge cases."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from render_sample import LORA_BLOCKS, cached_result
from weightdiff.render import captions as cap
from weightdiff.render import plots

NAMES = ["depth_profile", "reference_scale", "heatmap", "param_share", "rank", "cosine"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    data = cached_result()
    a = plots.save_figures(data, tmp_path_factory.mktemp("a"), ("png", "svg", "pdf"))
    b = plots.save_figures(data, tmp_path_factory.mktemp("b"), ("png", "svg", "pdf"))
    return a, b


def _svg_text(fo) -> str:
    return fo.files["svg"].read_text(encoding="utf-8")


def test_saving_twice_gives_identical_bytes(saved):
    a, b = saved
    assert [f.name for f in a] == NAMES
    for fa, fb in zip(a, b):
        assert set(fa.files) == {"png", "svg", "pdf"}
        for fmt in fa.files:
            assert fa.files[fmt].read_bytes() == fb.files[fmt].read_bytes(), (fa.name, fmt)


def test_no_clock_or_build_stamp_in_files(saved):
    for fo in saved[0]:
        svg = _svg_text(fo)
        assert "<dc:date>" not in svg
        pdf = fo.files["pdf"].read_bytes()
        assert b"/CreationDate" not in pdf and b"/Producer" not in pdf
        assert b"Software" not in fo.files["png"].read_bytes()[:4096]


def test_png_is_300_dpi_at_column_width(saved):
    for fo in saved[0]:
        raw = fo.files["png"].read_bytes()
        width = struct.unpack(">I", raw[16:20])[0]
        assert width == round(plots.WIDTH * 300)
        i = raw.index(b"pHYs")
        ppm_x, ppm_y, unit = struct.unpack(">IIB", raw[i + 4:i + 13])
        assert unit == 1 and round(ppm_x * 0.0254) == 300 == round(ppm_y * 0.0254)


def test_svg_is_well_formed_and_carries_titles_labels_and_units(saved):
    by = {f.name: _svg_text(f) for f in saved[0]}
    for svg in by.values():
        ET.fromstring(svg)
    assert "Depth profile: how much each block changed" in by["depth_profile"]
    assert "block 0 (nearest the input)" in by["depth_profile"] and ">emb.<" in by["depth_profile"]
    assert "0 (no change)" in by["depth_profile"]
    assert "relative change ‖ΔW‖ / ‖W‖" in by["depth_profile"]
    assert "unchanged (bitwise)" in by["depth_profile"]
    for kind in ("attn.q", "attn.v", "mlp.down", "norm"):
        assert f">{kind}<" in by["heatmap"]
    assert "relative change" in by["heatmap"] and "(log)" in by["heatmap"]          # colour bar label
    assert "87.6%" in by["param_share"] and "resized: 9.7% (64,000)" in by["param_share"]
    assert "share of ‖ΔW‖² captured" in by["rank"] and "full rank (k = side)" in by["rank"]
    assert "block 10 attn.q" in by["rank"]
    assert "1 − cosine (log scale)" in by["cosine"] and "unrelated models: cosine ~ 0" in by["cosine"]


def test_colour_blind_safe_palette_is_used(saved):
    by = {f.name: _svg_text(f).lower() for f in saved[0]}
    assert plots.OKABE_ITO["blue"].lower() in by["depth_profile"]
    assert plots.STATUS_STYLE["resized"][0].lower() in by["param_share"]
    assert plots.STYLE["image.cmap"] == "cividis"


def test_captions_carry_the_numbers():
    data = cached_result()
    depth = cap.caption_depth(data)
    assert "2 of 12 blocks changed" in depth and "block 10" in depth and "10 blocks with no change" in depth
    assert "embed" in depth and "head" in depth      # changed blocks outside the numbered ones are named
    params = cap.caption_params(data)
    # 578,112 of 659,712 parameters unchanged = 87.63%; 64,000 shared rows resized = 9.701%; 192 + 1,024 added = 0.1843%
    assert "659,712 parameters" in params and "87.6% unchanged" in params
    assert "9.7% resized" in params and "0.184% added" in params
    rank = cap.caption_rank(data, plots.pick_rank_matrices(cap.changed_matrices(data)))
    assert "reaches 90% at rank 4 and 99% at rank 4" in rank and "all 4 changed matrices" in rank
    heat = cap.caption_heatmap(data)
    assert "4 of 96 block-module cells changed" in heat and "attn.q in block 10" in heat
    cos = cap.caption_cosine(data)
    assert "86 paired matrices" in cos and "4 matrices moved" in cos and "the shaded band from 0.8" in cos and "dashed line at 1" in cos


def test_headline_sentences_from_the_numbers():
    from weightdiff.render import sentences

    data = cached_result()
    lines = sentences.headline(data)
    assert lines[0] == data["summary"]["verdict_reason"]
    assert any(x.startswith("87.6% of parameters are bitwise unchanged") for x in lines)
    assert "2 of 12 blocks changed." in lines
    assert any("3,264 parameters (0.495% of the model)" in x for x in lines)
    assert any("low-rank" in x and "rank 4" in x for x in lines)
    assert cap.headline_sentences(data) == lines          # no headline in the JSON: written here
    data["summary"]["headline"] = ["given by compare"]
    assert cap.headline_sentences(data) == ["given by compare"]


def test_one_minus_cosine_keeps_digits_near_one():
    # B = (1, 0), T = (1, 1e-6): 1 - cos = 5e-13, lost to cancellation in 1 - cosine
    nb, nt, nd = 1.0, (1 + 1e-12) ** 0.5, 1e-6
    t = {"norm_base": nb, "norm_tuned": nt, "norm_delta": nd, "cosine": 1 / nt, "shape": [2, 2], "base_shape": [2, 2]}
    assert cap.one_minus_cosine(t) == pytest.approx(5e-13, rel=1e-3)
    assert cap.one_minus_cosine({"cosine": 0.25, "shape": [2, 2]}) == 0.75
    assert cap.one_minus_cosine({"norm_delta": 0.0, "cosine": 0.9999999999999999}) == 0.0


def test_identical_model_and_no_rank_draw_without_error(tmp_path):
    data = cached_result()
    for t in data["tensors"]:
        if t["status"] != "unchanged":
            t.update(status="unchanged", norm_delta=0.0, rel_change=0.0, cosine=1.0, rank=None,
                     norm_tuned=t["norm_base"])
    for b in data["blocks"]:
        b.update(params_changed=0, tensors_changed=0, rel_change=0.0, modules={k: 0.0 for k in b["modules"]})
    s = data["summary"]
    s["params_by_status"] = {"unchanged": s["params_total"]}
    s["verdict"], s["blocks_changed"] = "identical", 0
    out = plots.save_figures(data, tmp_path, ("svg",))
    assert len(out) == 6
    assert "0 of 12 blocks changed" in cap.caption_depth(data)
    assert "no changed matrix has a spectrum" in cap.caption_rank(data, [])
    assert "No matrix moved" in cap.caption_cosine(data)
    assert "100% unchanged" in cap.caption_params(data)


def test_no_blocks_and_empty_model_draw_placeholders(tmp_path):
    data = cached_result()
    data["blocks"], data["tensors"] = [], []
    data["summary"]["params_total"] = 0
    out = plots.save_figures(data, tmp_path, ("svg",))
    assert "no numbered blocks" in out[0].files["svg"].read_text()
    assert "no numbered blocks" in cap.caption_depth(data)


def test_unrelated_model_caption_and_rounding_blocks(tmp_path):
    data = cached_result()
    for t in data["tensors"]:
        if cap.is_matrix(t) and t["cosine"] is not None:
            t.update(cosine=0.01, norm_delta=None, rel_change=1.4)
    data["blocks"][3].update(params_changed=0, tensors_changed=0, rel_change=1e-4)   # rounding only
    text = cap.caption_cosine(data)
    assert "86 inside the shaded band" in text
    assert "1 block differs only by dtype rounding" in cap.caption_depth(data)   # one block: singular
    svg = plots.save_figures(data, tmp_path, ("svg",))[0].files["svg"].read_text()
    assert "rounding only" in svg


def test_hostile_names_neither_crash_nor_break_the_svg(tmp_path):
    data = cached_result()
    changed = [t for t in data["tensors"] if t["status"] == "changed"]
    changed[0]["block"], changed[0]["module"] = "x", "$\\frac{a}{b}$ <b>&\x1b"
    changed[0]["name"] = "a$b$c<script>\u202e"
    data["blocks"][1]["modules"]["$evil$ <i>"] = 0.5
    for fo in plots.save_figures(data, tmp_path, ("svg", "png")):
        svg = fo.files["svg"].read_text()
        ET.fromstring(svg)
        assert "<script>" not in svg and "\x1b" not in svg and "\u202e" not in svg
    assert r"\$evil\$" in plots.text("$evil$")


def test_library_leaves_pyplot_alone():
    code = ("import sys; sys.path.insert(0, 'tests'); import render_sample; "
            "from weightdiff.render import plots; plots.draw_depth(render_sample.sample_result()); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_svg_bytes_do_not_depend_on_which_formats_were_asked(saved, tmp_path):
    alone = plots.save_figures(cached_result(), tmp_path, ("svg",))
    for fa, fb in zip(alone, saved[0]):
        assert fa.files["svg"].read_bytes() == fb.files["svg"].read_bytes(), fa.name


@pytest.mark.parametrize("grid", [[[1e-320, 2e-320]], [[1e308, float("inf")]], [[float("inf"), 0.0]],
                                  [[0.5, 0.5]], [[1e-310, 1e300]]])
def test_heatmap_draws_extreme_and_non_finite_changes(grid):
    """Colour limits stay finite and positive whatever the JSON holds (a fuzz-found LogNorm crash)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from weightdiff.render.figures_blocks import _grid_figure

    FigureCanvasAgg(_grid_figure("t", ["a"], ["0", "1"], np.array(grid, dtype=float), "y")).draw()


def test_depth_caption_calls_appended_blocks_new_not_changed(tmp_path):
    """Two fresh layers appended: the caption read "2 of 6 blocks changed; the largest change is in block 4
    (n/a)" for blocks the base does not have."""
    import json

    import numpy as np

    import weightdiff
    from conftest import write_checkpoint
    from models import llama
    from weightdiff.render.captions import caption_depth

    base = llama(np.random.default_rng(1), layers=4)
    more = llama(np.random.default_rng(2), layers=6)
    tuned = {**base, **{k: v for k, v in more.items() if ".layers.4." in k or ".layers.5." in k}}
    r = weightdiff.compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned), rank=False)
    text = caption_depth(json.loads(r.to_json()))
    assert "n/a" not in text and "0 of 6 blocks changed" in text
    assert "2 blocks (4 and 5) are not in the base, with no change to measure" in text
    assert "4 blocks with no change at all" in text
