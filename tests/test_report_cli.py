"""``weightdiff report``: exit 0 and the files on a valid JSON; exit 2 and one stderr line otherwise."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from render_sample import cached_result
from weightdiff.cli import main
from weightdiff.errors import WeightdiffError
from weightdiff.render.captions import headline_sentences
from weightdiff.render.report import load_result, render_outputs


@pytest.fixture
def result_json(tmp_path):
    p = tmp_path / "result.json"
    p.write_text(json.dumps(cached_result()))
    return p


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_report_writes_html_markdown_and_plots(tmp_path, result_json):
    r = _run("report", result_json, "--html", tmp_path / "m.html", "--markdown", tmp_path / "m.md",
             "--plots", tmp_path / "figs", "--pdf")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == headline_sentences(cached_result())
    assert (tmp_path / "m.html").is_file() and (tmp_path / "m.md").is_file()
    for name in ("depth_profile", "reference_scale", "heatmap", "param_share", "rank", "cosine"):
        for ext in ("png", "svg", "pdf"):
            assert (tmp_path / "figs" / f"{name}.{ext}").is_file()
    wrote = [line for line in r.stderr.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 6 * 3 + 3                       # figures, figures.json, memo.html, memo.md
    import hashlib

    html = (tmp_path / "m.html").read_text().replace("<wbr>", "")
    assert str(result_json) in html                                  # the memo says what it was drawn from
    assert hashlib.sha256(result_json.read_bytes()).hexdigest() in html


def test_report_without_options_writes_html_beside_the_json(result_json):
    r = _run("report", result_json, "-q")
    assert r.exit_code == 0, r.output
    assert result_json.with_suffix(".html").is_file()
    assert r.stderr == ""


def _one_error_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_malformed_json_exits_2_with_one_line(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('{"schema": "weightdiff.compare/1", "summary": {')
    line = _one_error_line(_run("report", p))
    assert "cut.json: not valid JSON (line 1" in line and "was the file cut short?" in line


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(schema="weightdiff.compare/3"),
     "expected schema `weightdiff.compare/2` (or `weightdiff.compare/1`), found schema `weightdiff.compare/3`"),
    (lambda d: d.pop("schema"), "found no `schema` key"),
    (lambda d: d.pop("summary"), "`summary` should be an object (found null)"),
    (lambda d: d["tensors"][3].update(rel_change="big"), "`tensors[3].rel_change` should be a number or null (found a string)"),
    (lambda d: d["blocks"][2].update(index="2"), "`blocks[2].index` should be an integer or null"),
    (lambda d: d["tensors"][5]["rank"].update(spectrum=[1.0, "x"]) if d["tensors"][5]["rank"] else
     d["tensors"][5].update(rank=[]), "`tensors[5].rank"),
    (lambda d: d["summary"]["params_by_status"].update(changed=True), "`summary.params_by_status.changed` should be an integer"),
])
def test_wrong_shape_json_exits_2_naming_the_key(tmp_path, mutate, needle):
    data = cached_result()
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    line = _one_error_line(_run("report", p))
    assert needle in line and "bad.json" in line


def test_not_an_object_missing_file_and_directory(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    assert "expected a JSON object written by weightdiff (a comparison result), found a list" in _one_error_line(_run("report", p))
    assert "nope.json: no such file" in _one_error_line(_run("report", tmp_path / "nope.json"))
    assert "is a directory" in _one_error_line(_run("report", tmp_path))
    b = tmp_path / "bin.json"
    b.write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8" in _one_error_line(_run("report", b))


def test_hostile_schema_value_stays_on_one_line(tmp_path):
    p = tmp_path / "evil.json"
    p.write_text(json.dumps({"schema": "x\n\x1b[31mred\u202e"}))
    line = _one_error_line(_run("report", p))
    assert "\\n" in line and "\\x1b" in line and "\u202e" not in line


def test_pdf_needs_a_figure_folder(tmp_path, result_json):
    line = _one_error_line(_run("report", result_json, "--html", tmp_path / "m.html", "--pdf"))
    assert line.startswith("error: --pdf figures are written as files")


def test_markdown_alone_puts_figures_beside_it(tmp_path, result_json):
    r = _run("report", result_json, "--markdown", tmp_path / "out" / "memo.md")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "memo_figures" / "rank.png").is_file()
    assert "](memo_figures/rank.png)" in (tmp_path / "out" / "memo.md").read_text()


def test_render_outputs_for_compare_report_flag(tmp_path):
    data = cached_result()
    written = render_outputs(data, report=tmp_path / "memo.md", plots_dir=tmp_path / "p")
    assert tmp_path / "memo.md" in written and (tmp_path / "p" / "cosine.svg") in written
    written = render_outputs(data, report=tmp_path / "memo.html")
    assert written == [tmp_path / "memo.html"]


def test_load_result_returns_data_and_digest(result_json):
    import hashlib

    data, digest = load_result(result_json)
    assert data["schema"] == "weightdiff.compare/1"
    assert digest == hashlib.sha256(result_json.read_bytes()).hexdigest()
    with pytest.raises(WeightdiffError):
        load_result(result_json.parent / "missing.json")


def test_help_has_an_example():
    r = _run("report", "--help")
    assert r.exit_code == 0 and "Example:" in r.output and "weightdiff report result.json" in r.output
    r = _run("demo", "--help")
    assert r.exit_code == 0 and "Example:" in r.output and "weightdiff demo" in r.output


def test_worked_example_in_docs_is_a_valid_result_with_its_figures():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs" / "example"
    data, _ = load_result(root / "out.json")
    assert data["summary"]["verdict"] == "derived"
    md = (root / "memo.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 6 and all((root / link).is_file() for link in links)
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_500_000


@pytest.mark.parametrize("flag,name", [("--html", "g.md"), ("--markdown", "h.html"), ("--html", "w.docx")])
def test_a_flag_and_an_extension_that_disagree_exit_2_and_write_nothing(tmp_path, result_json, flag, name):
    """`report --html g.md` wrote Markdown (and PNGs beside it), `--markdown h.html` an HTML page: the extension
    won over the flag the user gave. Which one was meant cannot be told: one line, exit 2, nothing written."""
    out = tmp_path / "o"
    out.mkdir()
    r = CliRunner().invoke(main, ["report", str(result_json), flag, str(out / name), "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "the extension says" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("flag,name", [("--html", "x.txt"), ("--markdown", "m"), ("--html", "r.json")])
def test_a_flag_given_a_path_of_no_memo_format_is_named(tmp_path, result_json, flag, name):
    """`report --html x.txt` said "--report x.txt: cannot tell the memo's format", naming a flag not given."""
    out = tmp_path / "o"
    out.mkdir()
    r = CliRunner().invoke(main, ["report", str(result_json), flag, str(out / name), "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {flag} ") and "--report" not in r.stderr, r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("edit, words", [
    ({"verdict": "maybe"}, "`summary.verdict` is `maybe`, not one of"),
    ({"verdict": "identical"}, "`summary.verdict` is `identical`, but `summary.tensors_by_status` counts"),
    ({"delta_params": -5}, "`summary.delta_params` is negative"),
    ({"delta_params_share": 3.5}, "`summary.delta_params_share` is 3.5, outside [0, 1]"),
])
def test_a_summary_no_comparison_writes_is_refused(tmp_path, edit, words):
    # a hand-edited JSON rendered "IDENTICAL ... 15 of 76 tensors changed" with exit 0 (a tester found it)
    d = json.loads(json.dumps(cached_result()))
    assert d["summary"]["tensors_by_status"]["changed"] > 0
    d["summary"].update(edit)
    (tmp_path / "e.json").write_text(json.dumps(d))
    r = CliRunner().invoke(main, ["report", str(tmp_path / "e.json"), "--memo", str(tmp_path / "m.md")])
    assert r.exit_code == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "m.md").exists()
