"""Each caption's numbers against what its figure draws, the heatmap's colour scale on a narrow
range, greyscale safety, hatched cells, the depth profile's ends and the experts view."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.patches import Rectangle

from render_sample import cached_result
from weightdiff.render import captions as cap
from weightdiff.render import plots
from weightdiff.render.figstyle import HEAT, distinct_ticks, log_limits
from weightdiff.render.figures_blocks import UNCHANGED_HATCH
from weightdiff.render.formats import num, sci, share


def _mesh(fig):
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, QuadMesh) and c.norm.vmin is not None
            and c.get_cmap() is HEAT][0]


def _lum(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heatmap_narrow_range_gets_one_decade_and_distinct_ticks():
    data = copy.deepcopy(cached_result())
    for b in data["blocks"]:
        b["modules"] = {k: (0.497 if i % 2 else 0.502) if v else v for i, (k, v) in enumerate(b["modules"].items())}
        if b.get("index") == 0:
            b["modules"] = {k: 0.497 if i % 2 else 0.502 for i, k in enumerate(b["modules"])}
    fig = plots.draw_heatmap(data)
    mesh = _mesh(fig)
    lo, hi = mesh.norm.vmin, mesh.norm.vmax
    assert hi / lo == pytest.approx(10.0) and lo < 0.497 < 0.502 < hi
    a, b = (np.array(mesh.cmap(mesh.norm(v))) for v in (0.497, 0.502))
    assert np.abs(a - b).max() < 0.02                    # nearly the same colour, not navy and yellow
    cbar = fig.axes[-1]
    labels = [t.get_text() for t in cbar.get_yticklabels() if t.get_text()]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)
    assert log_limits(1e-4, 1e-1) == (1e-4, 1e-1)       # a wide range keeps its data limits


def test_distinct_ticks_add_digits_until_labels_differ():
    ticks, labels = distinct_ticks(0.4985, 0.5015, lambda v, d: num(v, d))
    assert len(set(labels)) == len(labels) == len(ticks) >= 2


def test_greyscale_largest_change_is_darkest_and_unchanged_cells_hatched():
    assert _lum(HEAT(1.0)) < 0.25                        # the largest change prints darkest
    assert _lum(HEAT(0.0)) < 0.85                        # even the smallest is darker than white
    data = cached_result()
    fig = plots.draw_heatmap(data)
    zeros = sum(1 for b in cap.layered_blocks(data) for v in (b.get("modules") or {}).values() if v == 0)
    hatched = [p for p in fig.axes[0].patches if isinstance(p, Rectangle) and p.get_hatch() == UNCHANGED_HATCH]
    assert zeros > 0 and len(hatched) == zeros
    assert cap.caption_heatmap(data).count("Hatched white cells did not change")


def test_heatmap_caption_largest_cell_is_the_drawn_maximum():
    data = cached_result()
    mesh = _mesh(plots.draw_heatmap(data))
    drawn = float(np.nanmax(np.ma.filled(mesh.get_array(), np.nan)))
    assert f"({sci(drawn)})" in cap.caption_heatmap(data)


def test_depth_profile_draws_embeddings_and_head_at_the_ends_as_captioned():
    data = cached_result()
    fig = plots.draw_depth(data)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "emb." and labels[-1] == "head"
    points = cap.depth_points(data)
    assert points[0]["group"] == "embed" and points[-1]["group"] == "head" and points[-2]["group"] == "final_norm"
    ys = [y for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() != "white"
          for y in line.get_ydata()]
    text = cap.caption_depth(data)
    assert f"({sci(max(ys))})" in text                  # the caption's largest block is the drawn maximum
    assert "embeddings (before block 0)" in text and "head (after block 11)" in text


def test_cosine_caption_lines_are_the_drawn_lines():
    data = cached_result()
    ax = plots.draw_cosine(data).axes[0]
    dashed = [line.get_ydata()[0] for line in ax.get_lines()
              if line.get_linestyle() == "--" and line.get_color() == plots.OKABE_ITO["vermillion"]]
    band = [p.get_y() for p in ax.patches]                                  # axhspan: a rectangle from cut up
    cut = 1.0 - data["settings"]["thresholds"]["unrelated_cosine"]
    text = cap.caption_cosine(data)
    assert dashed == [1.0] and "dashed line at 1 " in text
    assert band and band[0] == pytest.approx(cut) and f"shaded band from {num(cut)} up" in text


def test_params_caption_shares_are_the_drawn_bars():
    data = cached_result()
    ax = plots.draw_params(data).axes[0]
    widths = [p.get_width() / 100 for p in ax.patches if p.get_width() > 0]
    text = cap.caption_params(data)
    for w in widths:
        assert share(w) in text


def test_reference_caption_values_are_the_drawn_points():
    data = copy.deepcopy(cached_result())
    for t in data["tensors"]:
        if t.get("compared") == "float" and t.get("norm_base"):
            t["rounding_floor"] = {"BF16": t["norm_base"] * 2e-3, "F16": t["norm_base"] * 2.5e-4, "F16_overflow": 0}
    fig = plots.draw_reference(data)
    drawn = sorted(float(line.get_xdata()[0]) for ax in fig.axes for line in ax.get_lines()
                   if len(line.get_xdata()) == 1)
    text = cap.caption_reference(data)
    assert len(drawn) == 8                                                   # 4 points x 2 axes
    for v in drawn:
        assert sci(v) in text, (v, text)
    pts = {p["key"]: p for p in data.get("reference", {}).get("points", [])} or \
        {p["key"]: p for p in __import__("weightdiff.render.reference", fromlist=["x"]).reference_scale(data)["points"]}
    assert pts["BF16"]["rel_change"] == pytest.approx(2e-3)                 # floor / norm, over the large matrices
    assert pts["F16"]["one_minus_cosine"] == pytest.approx(2.5e-4 ** 2 / 2)


def _moe(data: dict) -> dict:
    data = copy.deepcopy(data)
    blocks = cap.layered_blocks(data)[:3]
    for b in blocks:
        for e in range(4):
            nd = 0.0 if e != 2 else 0.05 * (1 + b["index"])
            data["tensors"].append({"name": f"model.layers.{b['index']}.block_sparse_moe.experts.{e}.w1.weight",
                                    "status": "changed" if nd else "unchanged", "shape": [8, 8], "numel": 64,
                                    "compared": "float", "block": b["block"], "module": "mlp.gate",
                                    "norm_base": 1.0, "norm_tuned": 1.0, "norm_delta": nd, "cosine": 1.0})
    return data


def test_moe_gets_an_expert_by_block_view_matching_its_caption():
    assert "experts" not in [fo.name for fo, _ in plots.render_figures(cached_result(), (), only=("experts",))]
    data = _moe(cached_result())
    grid = cap.expert_grid(data)
    assert grid["experts"] == [0, 1, 2, 3] and len(grid["blocks"]) == 3
    assert grid["grid"][2][2] == pytest.approx(0.15) and grid["grid"][0][0] == 0.0
    mesh = _mesh(plots.draw_experts(data))
    drawn = float(np.nanmax(np.ma.filled(mesh.get_array(), np.nan)))
    text = cap.caption_experts(data)
    assert "4 experts" in text and f"expert 2 in block {grid['blocks'][2]} ({sci(drawn)})" in text
    names = [fo.name for fo, _ in plots.render_figures(data, (), only=("experts",))]
    assert names == ["experts"]


def test_every_caption_number_appears_in_its_figure_data_or_the_json():
    """A sweep: every number a caption prints is one the JSON holds (formatted the same way)."""
    data = cached_result()
    known = set()
    for t in data["tensors"]:
        for k in ("rel_change",):
            known.add(sci(t.get(k)))
        known.add(sci(cap.one_minus_cosine(t)))
    for b in data["blocks"]:
        known.add(sci(b.get("rel_change")))
        known.update(sci(v) for v in (b.get("modules") or {}).values())
    for fn in (cap.caption_depth, cap.caption_heatmap):
        for number in re.findall(r"\((\d\.\de-?\d+)\)", fn(data)):
            assert number in known, (fn.__name__, number)
    assert not math.isnan(len(known))


def test_cast_floor_points_cover_the_elements_the_norms_cover(tmp_path, rng):
    """An f32 base with ten values of 1e6 cast to float16 (infinite there): the norms leave those pairs out,
    the base's bfloat16 floor counted them, and the bfloat16 point read a relative change of 1,190 (1 - cosine
    709,339): compare --report was refused by the memo's own checks and `report` refused the JSON (found by
    the tester of the memo's consistency checks)."""
    from conftest import write_checkpoint
    from weightdiff import compare
    from weightdiff.render.reference import reference_scale

    t = {f"model.layers.{i}.mlp.down_proj.weight": rng.normal(0, 0.02, (64, 128)).astype(np.float32) for i in range(2)}
    t["model.layers.0.mlp.down_proj.weight"][0, :10] = 1e6
    r = compare(write_checkpoint(tmp_path / "b", t), write_checkpoint(tmp_path / "t", t, dtype="F16"))
    data = r.to_dict()
    points = {p["key"]: p for p in reference_scale(data)["points"]}
    assert points["BF16"]["rel_change"] < 2.0 ** -8 and points["BF16"]["one_minus_cosine"] < 1e-4
    assert points["F16"]["rel_change"] < points["BF16"]["rel_change"]
    from weightdiff.render.validate import check_result
    check_result(data, "result")            # the memo's consistency checks accept compare's own result


@pytest.mark.parametrize("what", ["final norm", "head matrix"])
def test_the_depth_caption_names_the_final_norm_when_only_it_changed(tmp_path, what):
    """The head group holds the final norm: with only that norm trained the caption read "The head (after
    block 2) changed", which a reader takes for the output layer."""
    from conftest import write_checkpoint
    from models import llama
    from weightdiff import compare

    base = llama(np.random.default_rng(3), layers=3, hidden=64, inter=128, vocab=128)
    tuned = dict(base)
    key = "model.norm.weight" if what == "final norm" else "lm_head.weight"
    tuned[key] = (base[key] * 1.02).astype(np.float32)
    data = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).to_dict()
    text = cap.caption_depth(data)
    if what == "final norm":
        assert "The final norm (after block 2) changed" in text and "The head (after block 2)" not in text, text
        assert "The output head's matrices did not change." in text
    else:
        assert "The head (after block 2) changed" in text and "final norm" not in text, text
