"""The one set of number formats (render.formats), and one string per quantity across outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.render import formats as fmt
from weightdiff.render.tabular import to_csv
from weightdiff.render.terminal import render_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("x, text", [(0.0, "0%"), (1.0, "100%"), (0.9123, "91.2%"), (0.0004, "0.04%"),
                                     (0.99996, "99.996%"), (4e-7, "0.00004%"), (0.0123456, "1.2%"),
                                     (0.10904, "10.9%"), (0.9999999999, "99.99999999%"), (None, "n/a"),
                                     (float("nan"), "n/a")])
def test_share_never_rounds_a_partial_share_to_0_or_100(x, text):
    assert fmt.share(x) == text


@pytest.mark.parametrize("x, text", [(0.0045512, "4.6e-3"), (0.0542, "5.4e-2"), (1.41, "1.4"), (14.1, "1.4e1"), (0, "0"),
                                     (None, "n/a"), (float("inf"), "n/a"), (-2.5e-7, "-2.5e-7")])
def test_sci_has_no_exponent_padding(x, text):
    assert fmt.sci(x) == text


def test_count_num_and_bounds():
    assert fmt.count(6912000) == "6,912,000" and fmt.count(None) == "n/a" and fmt.count(True) == "n/a"
    assert fmt.num(12.345) == "12.3" and fmt.num(0.0423) == "0.0423" and fmt.num(12345.0) == "1.23e4"
    assert fmt.num(180.7, 2) == "181" and fmt.num(-999.6, 2) == "-1000" and fmt.num(12.5, 2) == "12"  # never "1.8e+02"
    assert fmt.bound(64, "lower") == "≥ 64" and fmt.bound(3, "upper") == "≤ 3" and fmt.bound(5, None) == "5"
    exact = {"numerical_rank": 8}
    partial = {"numerical_rank": 64, "bounds": {"numerical_rank": [64, 4096]}}
    assert fmt.rank_text(exact) == "8" and fmt.rank_text(partial) == "≥ 64" and fmt.rank_text(None) == "n/a"
    # stable rank: a float; from a Ritz s_1 (partial spectra) it is flagged estimated and never printed as exact
    assert fmt.rank_text({"stable_rank": 3.25}, "stable_rank", fmt.num) == "3.25"
    assert fmt.rank_text({"stable_rank": 1234.5, "estimated": ["stable_rank", "effective_rank"]},
                         "stable_rank", fmt.num) == "~1.23e3"


def test_no_other_module_formats_shares_or_scientific_numbers_itself():
    """Percent and exponent formatting of measured quantities lives in render/formats.py only."""
    offenders = []
    for path in sorted((ROOT / "weightdiff").rglob("*.py")):
        if path.name == "formats.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\{[^{}]*:[^{}]*\.\d+e\}", line) or re.search(r"\{100 ?\* ?[^{}]*:\.\d+f\}%", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    r = CliRunner().invoke(main, ["demo", str(d)])
    assert r.exit_code == 0, r.output
    data = json.loads((d / "out.json").read_text())
    return data, {"terminal": render_text(data), "memo.md": (d / "memo.md").read_text(),
                  "memo.html": (d / "memo.html").read_text()}


def test_every_output_prints_a_shared_quantity_the_same_way(demo_outputs):
    data, texts = demo_outputs
    s = data["summary"]
    total = s["params_total"]
    shared = {
        "delta share": fmt.share(s["delta_params_share"]),
        "1 - cosine": fmt.sci(max(0.0, 1 - s["relatedness_cosine"])),
        "relative change": fmt.sci(s["relative_change"]),
        "delta params": fmt.count(s["delta_params"]),
        "unchanged share": fmt.share(s["params_by_status"]["unchanged"] / total),
    }
    for where, text in texts.items():
        for what, string in shared.items():
            assert string in text, f"{where} does not print {what} as {string!r}"
    csv_text = to_csv(data)
    assert str(s["params_total"]) not in ("",) and csv_text.count("\n") == len(data["tensors"]) + 1


def test_readme_example_prints_the_demo_quantities_the_same_way(demo_outputs):
    data, _ = demo_outputs
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- demo-output -->\n```\n(.+?)\n```", readme, re.S).group(1)
    s = data["summary"]
    for string in (fmt.share(s["delta_params_share"]), fmt.sci(max(0.0, 1 - s["relatedness_cosine"])),
                   fmt.sci(s["relative_change"]), fmt.count(s["delta_params"])):
        assert string in block, f"README example lacks {string!r}: run python scripts/refresh_example.py"
