"""Terminal summary, plan line, CSV and progress line: exact text from a fixed result dict."""

from __future__ import annotations

import csv
import io

from render_sample import sample_result

from weightdiff.render.tabular import COLUMNS, to_csv
from weightdiff.render.terminal import ProgressLine, plan_text, render_text


def test_summary_has_the_facts_a_reader_acts_on():
    data = sample_result()
    text = render_text(data)
    s = data["summary"]
    assert text.startswith(f"weightdiff {data['tool']['version']}: ")
    assert "verdict   DERIVED: a fine-tune of this base." in text
    assert f"scope     {s['blocks_changed']} of {s['blocks_total']} blocks changed" in text
    assert f"delta params      {s['delta_params']:,}" in text
    for st, n in s["params_by_status"].items():
        if n:
            assert f"{n:,}" in text, st
    # the most changed blocks are the LoRA blocks, most changed first
    blocks = text.split("most changed blocks")[1].splitlines()
    assert blocks[2].split()[0] in ("layers.10", "layers.11")
    assert "score.weight" in text.split("added or removed tensors")[1]
    assert text == render_text(data)                      # deterministic
    assert all(len(line) <= 140 for line in text.splitlines())


def test_hostile_names_are_escaped_in_the_summary():
    data = sample_result()
    data["tensors"][0]["status"] = "added"
    data["tensors"][0]["name"] = "evil\x1b[2J\u202ename\nnext"
    text = render_text(data)
    assert "\x1b" not in text and "\u202e" not in text
    assert "evil\\x1b[2J\\u202ename\\nnext" in text


def test_plan_text_counts_and_notes():
    plan = {"counts": {"tensors": {"paired": 10, "added": 1, "removed": 0}},
            "notes": ["vocabulary grew: `emb` has 508 rows"]}
    assert plan_text(plan) == "plan: 10 paired, 1 added\n  vocabulary grew: `emb` has 508 rows"
    assert plan_text({"counts": {}, "notes": []}) == "plan: nothing to compare"


def test_csv_has_one_row_per_tensor_and_rank_columns():
    data = sample_result()
    rows = list(csv.reader(io.StringIO(to_csv(data))))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == len(data["tensors"]) + 1
    ranked = [t for t in data["tensors"] if t.get("rank")]
    row = next(r for r in rows if r[0] == ranked[0]["name"])
    assert int(row[COLUMNS.index("numerical_rank")]) == ranked[0]["rank"]["numerical_rank"]
    assert "x" in row[COLUMNS.index("shape")]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_logs_whole_lines_off_a_terminal_and_draws_on_one(monkeypatch):
    log = io.StringIO()
    p = ProgressLine(stream=log, delay=0.0)          # a log gets a line only every 30 s
    p(5, 10, "x")
    assert log.getvalue() == ""
    clock = [1000.0]
    monkeypatch.setattr("weightdiff.render.terminal.time.monotonic", lambda: clock[0])
    p = ProgressLine(stream=log)
    clock[0] += 31
    p(3_000_000_000, 12_000_000_000, "model.layers.3.mlp.up_proj.weight")
    p(3_100_000_000, 12_000_000_000, "model.layers.3.mlp.up_proj.weight")   # too soon: nothing
    clock[0] += 31
    p(6_000_000_000, 12_000_000_000, "model.layers.9.mlp.up_proj.weight")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("progress: measuring, 25.0% of 12.00B params") and "of 48.0 GB read" in lines[0]
    # the rate starts at the first window (not at the line's making): none to tell from one sample
    assert "ETA not yet known" in lines[0] and "ETA 62 s" in lines[1] and "layers.9" in lines[1]
    p.close()
    assert log.getvalue().count("\n") == 2
    quiet = io.StringIO()
    p = ProgressLine(stream=quiet, enabled=False)
    clock[0] += 100
    p(5, 10, "x")
    assert quiet.getvalue() == ""
    tty = _Tty()
    p = ProgressLine(stream=tty, delay=0.0)
    p(5_000_000, 10_000_000, "model.layers.0.mlp.up_proj.weight")
    out = tty.getvalue()
    assert out.startswith("\r") and " 50.0%" in out and "GB/s" in out and "ETA" in out
    p.close()
    assert tty.getvalue().endswith("\r")


def test_progress_line_waits_for_its_delay():
    tty = _Tty()
    p = ProgressLine(stream=tty, delay=60.0)
    p(1, 2, "x")
    assert tty.getvalue() == ""


def test_progress_in_a_log_ends_once_and_names_the_rank_tail(monkeypatch):
    """The 100% line came twice (the second with no name), and the rank solves that run after the
    stream said "measuring" (tester sv7, repro_9)."""
    clock = [1000.0]
    monkeypatch.setattr("weightdiff.render.terminal.time.monotonic", lambda: clock[0])
    log = io.StringIO()
    p = ProgressLine(stream=log, bytes_per_element=4.0)
    clock[0] += 31
    p(50_000_000, 100_000_000, "model.layers.2.self_attn.o_proj.weight")
    clock[0] += 31
    p(100_000_000, 100_000_000, "model.layers.3.mlp.up_proj.weight")      # streamed; its rank still solving
    clock[0] += 1
    p(100_000_000, 100_000_000, "")                                      # the end
    p(100_000_000, 100_000_000, "")
    lines = log.getvalue().splitlines()
    assert [x.split(",")[0] for x in lines] == ["progress: measuring", "progress: finishing the rank analysis",
                                                "progress: done"]
    assert "(~0.4 of 0.8 GB read)" in lines[0]                           # 4 bytes per element and side
    assert lines[2].endswith("ETA 0 s")                                  # no empty tensor name


def test_compare_counts_the_bytes_of_the_plans_dtypes(monkeypatch, tmp_path):
    """The progress line assumed 2 bytes per element: an fp32 pair showed half its GB and GB/s."""
    import numpy as np
    from click.testing import CliRunner

    import weightdiff.render.terminal as term
    from weightdiff.cli import main
    from weightdiff.io.safetensors_write import save_file

    seen = []

    class Line(term.ProgressLine):
        def close(self) -> None:
            seen.append(self.bpe)
            super().close()
    monkeypatch.setattr(term, "ProgressLine", Line)
    rng = np.random.default_rng(0)
    base = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    save_file(tmp_path / "b.safetensors", base)
    save_file(tmp_path / "t.safetensors", {k: v + 0.01 for k, v in base.items()})
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-q"])
    assert r.exit_code == 0, r.output
    assert seen == [4.0]


def test_the_steps_after_the_pass_log_a_line_while_they_run(tmp_path, rng):
    """The checks after the measuring pass (reordered units, a rotation, folds) and the tensors measured again took
    minutes at 70B widths after "done, ETA 0 s", with nothing on stderr: a stage logs a line every interval while it
    runs, and stops with it; ``--quiet`` prints nothing; ``compare`` names its stages to a progress that has one."""
    import time

    import numpy as np

    from conftest import write_checkpoint
    from models import llama
    from weightdiff import compare
    from weightdiff.cli_options import _checked

    out = io.StringIO()
    line = ProgressLine(stream=out, interval=0.05)
    line.stage("checking for reparametrisations")
    time.sleep(0.4)
    line.stage("measuring 3 tensors again")
    time.sleep(0.3)
    line.stage(None)
    text = out.getvalue()
    assert text.count("progress: checking for reparametrisations, ") >= 2, text
    assert "progress: measuring 3 tensors again, " in text and text.endswith("in all)\n")
    time.sleep(0.2)
    assert out.getvalue() == text                       # the stage ended: no more lines
    quiet = io.StringIO()
    off = ProgressLine(stream=quiet, interval=0.05, enabled=False)
    off.stage("x")
    time.sleep(0.2)
    off.close()
    assert quiet.getvalue() == ""
    # the CLI's wrapper hands the stage on; compare names its steps, and ends them
    seen = []

    def progress(done, total, name):
        pass

    progress.stage = seen.append
    assert _checked(progress).stage == seen.append
    base = llama(rng, layers=2)
    tuned = dict(base)
    perm = np.random.default_rng(5).permutation(256)
    for k in ("gate_proj", "up_proj"):
        tuned[f"model.layers.1.mlp.{k}.weight"] = base[f"model.layers.1.mlp.{k}.weight"][perm]
    tuned["model.layers.1.mlp.down_proj.weight"] = base["model.layers.1.mlp.down_proj.weight"][:, perm]
    compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned), progress=progress)
    assert seen[0].startswith("checking for reparametrisations") and seen[-1] is None, seen
    assert any(s and s.startswith("measuring 3 tensors again") for s in seen), seen
