"""Hostile inputs of the commands that read what weightdiff wrote: ``report`` on a hand-edited result, a survey
resumed from a damaged or edited table, outputs that would overwrite an input. Each was an internal error (exit 1)
or a file overwritten or published unchecked, found by a campaign on these commands.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_checkpoint
from models import llama, low_rank_update
from render_sample import cached_result
from weightdiff.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_2(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(3)
    base = llama(rng, layers=2, hidden=32, inter=64, vocab=64)
    tuned = {k: (low_rank_update(rng, w, 2, 0.02) if w.ndim == 2 else w) for k, w in base.items()}
    return write_checkpoint(root / "base", base), write_checkpoint(root / "tuned", tuned)


@pytest.fixture
def result_json(tmp_path):
    p = tmp_path / "result.json"
    p.write_text(json.dumps(cached_result()))
    return p


def _edited(tmp_path, edit) -> Path:
    d = cached_result()
    edit(d)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("what", ["schema a list", "schema an object", "scope object a list", "scope object a number"])
def test_report_refuses_a_hand_edited_result_in_one_line(tmp_path, what):
    def edit(d):
        if what == "schema a list":
            d["schema"] = []
        elif what == "schema an object":
            d["schema"] = {"a": 1}
        elif what == "scope object a list":
            d["summary"]["scope"]["permuted_units"] = [None]
        else:
            d["summary"]["scope"]["tensors_reshaped"] = 3
    p = _edited(tmp_path, edit)
    res = _run("report", p, "--html", tmp_path / "m.html", "-q")
    _one_line_2(res, "edited.json")
    assert not (tmp_path / "m.html").exists()


def test_report_reads_a_null_base_list_as_none(tmp_path):
    p = _edited(tmp_path, lambda d: d.__setitem__("base", None))
    res = _run("report", p, "--markdown", tmp_path / "m.md", "-q")
    assert res.exit_code == 0, res.output


def test_report_never_overwrites_the_survey_table_it_reads(tmp_path, result_json, pair):
    res = _run("survey", *pair, "--out", tmp_path / "s", "-q")
    assert res.exit_code == 0, res.output
    table = (tmp_path / "s" / "survey.csv").read_bytes()
    pop = tmp_path / "pop.md"
    pop.write_bytes(table)
    _one_line_2(_run("report", result_json, "--memo", pop, "--population", pop, "-q"), "pop.md", "--population")
    assert pop.read_bytes() == table
    (tmp_path / "p").mkdir()
    inside = tmp_path / "p" / "figures.json"
    inside.write_bytes(table)
    _one_line_2(_run("report", result_json, "--plots", tmp_path / "p", "--population", inside, "-q"), "figures.json")
    assert inside.read_bytes() == table


def test_a_survey_never_overwrites_its_list_of_models(tmp_path, pair):
    out = tmp_path / "s"
    out.mkdir()
    listed = out / "survey.csv"
    listed.write_text(f"{pair[1]}\n")
    _one_line_2(_run("survey", pair[0], "--from-file", listed, "--out", out, "-q"), "survey.csv",
                "list of models this command reads")
    assert listed.read_text() == f"{pair[1]}\n"


@pytest.mark.parametrize("link", ["models", "survey.csv"])
def test_a_survey_never_writes_through_a_link_in_its_folder(tmp_path, pair, link):
    out, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim.csv"
    victim.write_text("PRECIOUS")
    (out / link).symlink_to(elsewhere if link == "models" else victim)
    _one_line_2(_run("survey", *pair, "--out", out, "-q"), link, "symbolic link")
    assert victim.read_text() == "PRECIOUS" and sorted(p.name for p in elsewhere.iterdir()) == ["victim.csv"]


def _rewrite(table: Path, column: str, value: str) -> None:
    rows = list(csv.reader(table.open(newline="")))
    rows[1][rows[0].index(column)] = value
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    table.write_text(buf.getvalue())


@pytest.mark.parametrize("damage", ["not a number", "not UTF-8", "a field past csv's limit"])
def test_a_damaged_survey_table_is_measured_again_not_an_internal_error(tmp_path, pair, damage):
    out = tmp_path / "s"
    assert _run("survey", *pair, "--out", out, "-q").exit_code == 0
    table = out / "survey.csv"
    if damage == "not a number":
        _rewrite(table, "blocks_changed", "abc")
    elif damage == "not UTF-8":
        with table.open("ab") as fh:
            fh.write(b"\xff\xfe\n")
    else:
        with table.open("a") as fh:
            fh.write("x" * 200_000 + "\n")
    res = _run("survey", *pair, "--out", out)
    assert res.exit_code == 0, res.output
    assert "1 compared, 0 already done" in res.stdout
    assert [r["verdict"] for r in csv.DictReader(table.open(newline=""))] == ["derived"]


def test_a_resumed_survey_rebuilds_done_rows_from_their_json_not_the_tables_cells(tmp_path, pair):
    out = tmp_path / "s"
    assert _run("survey", *pair, "--out", out, "-q").exit_code == 0
    table = out / "survey.csv"
    before = list(csv.DictReader(table.open(newline="")))
    _rewrite(table, "verdict", "unrelated")
    _rewrite(table, "relative_change", "nan")
    res = _run("survey", *pair, "--out", out)
    assert res.exit_code == 0 and "0 compared, 1 already done" in res.stdout, res.output
    assert list(csv.DictReader(table.open(newline=""))) == before
    # a json cell naming a file outside the folder: measured again
    _rewrite(table, "json", os.path.relpath("/etc/passwd", out))
    res = _run("survey", *pair, "--out", out)
    assert res.exit_code == 0 and "1 compared, 0 already done" in res.stdout, res.output
    assert list(csv.DictReader(table.open(newline=""))) == before
