"""A tensor that differs only by NaN or infinity has a relative change of 0 over its finite values (the base's):
every output printed that 0 as if it were a measurement ("relative change 0", "the largest change is in block 1
(0)", a heatmap cell hatched as unchanged). They print n/a and say the values are not measured."""

from __future__ import annotations

import re

import numpy as np
import pytest

from weightdiff.io.safetensors_write import save_file


@pytest.fixture()
def pair(tmp_path, rng):
    t = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(0, 1, (64, 32)).astype(np.float32) for i in range(3)}
    t["model.embed_tokens.weight"] = rng.normal(0, 1, (100, 32)).astype(np.float32)
    base = save_file(tmp_path / "base.safetensors", t)
    broken = dict(t)
    w = t["model.layers.1.mlp.up_proj.weight"].copy()
    w[3, 4] = np.nan
    broken["model.layers.1.mlp.up_proj.weight"] = w
    nan_only = save_file(tmp_path / "nan.safetensors", broken)
    both = dict(broken)
    both["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"] * np.float32(1.05)
    mixed = save_file(tmp_path / "mixed.safetensors", both)
    return base, nan_only, mixed


def _data(base, tuned):
    from weightdiff.comparison import compare

    return compare(base, tuned).to_dict()


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_only_nan_changes_print_not_measured_everywhere(pair):
    from weightdiff.render import captions
    from weightdiff.render.memo import build, key_figures, to_markdown
    from weightdiff.render.notebook import short_repr
    from weightdiff.render.terminal import render_text

    base, nan_only, _ = pair
    d = _data(base, nan_only)
    assert d["summary"]["verdict"] == "inconclusive" and d["summary"]["relative_change"] == 0.0
    text = render_text(d)
    assert "relative change   n/a   (the models differ only by NaN or infinite values: not measured)" in text
    assert "1 - cosine        n/a" in text
    block_row = next(x for x in text.splitlines() if x.strip().startswith("layers.1 "))
    assert _cells(block_row)[1] == "n/a"
    tensor_row = next(x for x in text.splitlines() if x.strip().startswith("model.layers.1.mlp.up_proj.weight"))
    assert _cells(tensor_row)[3:5] == ["n/a", "n/a"]

    figs = {row[0]: row[1] for row in key_figures(d)}
    assert figs["relative change (large matrices)"] == "n/a"
    assert figs["1 − cosine (large matrices)"] == "n/a"
    md = to_markdown(build(d, []), {})
    assert "| model relative change | n/a |" in md
    assert "| `layers.1` | 2,048 | 2,048 | n/a |" in md
    assert "largest change" not in captions.caption_depth(d)
    assert "1 of 3 blocks changed; block 1 differs only by NaN or infinite values" in captions.caption_depth(d)
    assert "It reads 0" not in captions.caption_reference(d)
    assert "only by NaN or infinite values" in captions.caption_reference(d)
    assert "1 cell (mlp.up in block 1) differs only by NaN" in captions.caption_heatmap(d)
    assert "(1 kind, the rows)" in captions.caption_heatmap(d)
    assert short_repr(d).endswith("relative change n/a>")
    states = {p["label"]: p["state"] for p in captions.depth_points(d)}
    assert states["1"] == "nonfinite" and states["0"] == "unchanged"


def test_nan_beside_a_real_change_keeps_the_measured_numbers(pair):
    from weightdiff.render import captions
    from weightdiff.render.formats import sci
    from weightdiff.render.terminal import render_text

    base, _, mixed = pair
    d = _data(base, mixed)
    s = d["summary"]
    assert s["verdict"] == "derived" and s["relative_change"] > 0
    assert "1 of the changed tensors differs only by NaN or infinite values" in s["verdict_reason"]
    text = render_text(d)
    assert f"relative change   {sci(s['relative_change'])}   " in text
    rows = {_cells(x)[0]: _cells(x) for x in text.splitlines() if x.strip().startswith("model.layers.")}
    assert rows["model.layers.1.mlp.up_proj.weight"][3] == "n/a"
    assert rows["model.layers.2.mlp.up_proj.weight"][3] == sci(next(
        t["rel_change"] for t in d["tensors"] if t["name"] == "model.layers.2.mlp.up_proj.weight"))
    depth = captions.caption_depth(d)
    assert "the largest change is in block 2" in depth and "; block 1 differs only by NaN" in depth


def test_figures_draw_nan_only_cells_apart(pair):
    from weightdiff.render.figures_blocks import draw_depth, draw_heatmap

    base, nan_only, _ = pair
    d = _data(base, nan_only)
    for fig in (draw_depth(d), draw_heatmap(d)):
        labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert "NaN/Inf only (not measured)" in labels


def test_plain_words_pool_only_measured_matrices_and_count_blocks_as_the_summary(pair):
    """The NaN-only matrix was pooled as a change of 0 ("the 2 matrices that changed moved by 2.8e-2" where the
    only measured change was 4.9e-2), and Figure 1 counted one block fewer than the summary (verify tester)."""
    from weightdiff.render import captions
    from weightdiff.render.formats import sci
    from weightdiff.render.sentences import plain_language

    base, _, mixed = pair
    d = _data(base, mixed)
    words = " ".join(plain_language(d))
    rel = next(t["rel_change"] for t in d["tensors"] if t["name"] == "model.layers.2.mlp.up_proj.weight")
    assert "2 matrices that changed" not in words
    assert f"the 1 matrix that changed moved by {sci(rel)} of its size" in words
    n = d["summary"]["blocks_changed"]
    assert f"{n} of 3 blocks changed" in captions.caption_depth(d)
