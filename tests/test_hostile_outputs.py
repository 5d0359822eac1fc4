"""Issue 17: ``weightdiff report`` on malformed JSON, all-or-nothing outputs, signals, devices and FIFOs,
CSV injection and terminal escapes. Bad input: exit 2, one stderr line naming the file, nothing written."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from render_sample import cached_result
from weightdiff.cli import main
from weightdiff.fsutil import Interrupted, OutputSet, write_text
from weightdiff.render.tabular import to_csv
from weightdiff.io.safetensors_write import save_file


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def one_error(r, names) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(names) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def pair(tmp_path, rng):
    base = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "model.layers.1.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    tuned = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_file(tmp_path / "base.safetensors", base)
    save_file(tmp_path / "tuned.safetensors", tuned)
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


# -- report on malformed JSON ------------------------------------------------------------------------------------

def _set(path: str, value):
    def mutate(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return mutate


def _first_ranked(d) -> int:
    return next(i for i, t in enumerate(d["tensors"]) if t.get("rank"))


MALFORMED = [
    ("base", [1], "`base[0]` should be an object"),
    ("summary.scope", "x", "`summary.scope` should be an object or null"),
    ("run", "x", "`run` should be an object or null"),
    ("summary.form", ["low_rank"], "`summary.form` should be an object or null"),
    ("summary.form.matrices_compensated", "4", "`summary.form.matrices_compensated` should be an integer or null"),
    ("summary.flags", 3, "`summary.flags` should be a list or null"),
    ("settings.thresholds", 3, "`settings.thresholds` should be an object or null"),
    ("settings.thresholds.unrelated_cosine", "x", "`settings.thresholds.unrelated_cosine` should be a number"),
    ("summary.params_total", 10 ** 30, "`summary.params_total` should be an integer or null (found an integer too large)"),
    ("summary.relative_change", 1e300, "`summary.relative_change` should be a number or null"),
    ("tuned.path", ["a"], "`tuned.path` should be a string or null"),
    ("tuned.files", [{"name": 3}], "`tuned.files[0].name` should be a string or null"),
    ("blocks.0.modules", [1], "`blocks[0].modules` should be an object or null"),
    ("summary.headline", [1], "`summary.headline[0]` should be a string"),
    ("summary.verdict", "\ud800", "lone UTF-16 surrogate"),
    ("run.versions", {"a": {"b": 1}}, "`run.versions.a` should be"),
    ("tool", "weightdiff", "`tool` should be an object or null"),
]


@pytest.mark.parametrize("path, value, expect", MALFORMED)
def test_malformed_field_is_bad_input_and_writes_nothing(tmp_path, path, value, expect):
    data = cached_result()
    _set(path, value)(data)
    src = tmp_path / "in" / "bad.json"
    src.parent.mkdir()
    src.write_text(json.dumps(data))
    out = tmp_path / "out"
    line = one_error(run("report", src, "--plots", out / "figs", "--html", out / "m.html"), src)
    assert expect in line, line
    assert not out.exists()


@pytest.mark.parametrize("where, value, expect", [
    ("shape_2d", ["a", 3], "shape_2d[0]` should be an integer"),
    ("energy_captured", "0.9", "energy_captured` should be a number or null"),
    ("spectrum", [1, "x"], "spectrum[1]` should be a number"),
    ("exact", "no", "exact` should be true or false"),
])
def test_malformed_rank_fields(tmp_path, where, value, expect):
    data = cached_result()
    data["tensors"][_first_ranked(data)]["rank"][where] = value
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(data))
    assert expect in one_error(run("report", src, "--plots", tmp_path / "figs"), src)
    assert tree(tmp_path) == ["bad.json"]


@pytest.mark.parametrize("edit, expect", [
    (lambda r: r["points"].__setitem__(0, True), "`reference.points[0]` should be an object"),
    (lambda r: r["points"][-1].__setitem__("rel_change", "x"), "].rel_change` should be a number"),
    (lambda r: r.__setitem__("points", 5), "`reference.points` should be a list"),
    (lambda r: r["points"][-1].__setitem__("key", 0), "].key` should be one of"),
    (lambda r: r["points"][-1].__setitem__("key", "F32"), "].key` should be one of"),
    (lambda r: r["points"][0].pop("one_minus_cosine"), "`reference.points[0].one_minus_cosine` should be"),
])
def test_a_malformed_reference_scale_is_bad_input(tmp_path, edit, expect):
    """The top-level ``reference`` (the reference figure's points) was not validated: a hand-edited one was an
    internal error (exit 1) where every other part of a result is exit 2 naming the field."""
    from weightdiff.render.reference import reference_scale

    data = cached_result()
    data["reference"] = reference_scale(data)          # as compare writes it
    assert data["reference"]["points"]
    edit(data["reference"])
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(data))
    assert expect in one_error(run("report", src, "--plots", tmp_path / "figs"), src)
    assert tree(tmp_path) == ["bad.json"]


def test_json_nested_100000_deep(tmp_path):
    src = tmp_path / "deep.json"
    src.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_error(run("report", src), src)
    data = cached_result()
    deep: list = []
    for _ in range(50):
        deep = [deep]
    data["settings"]["extra"] = deep           # free-form settings: bounded depth too
    src.write_text(json.dumps(data))
    assert "nested more than" in one_error(run("report", src), src)


def test_5000_digit_integer(tmp_path):
    src = tmp_path / "big.json"
    text = json.dumps(cached_result()).replace('"params_total": ', '"params_total": ' + "9" * 5000 + ", \"x\": ", 1)
    src.write_text(text)
    assert "not a usable JSON file" in one_error(run("report", src), src)
    assert tree(tmp_path) == ["big.json"]


def test_report_never_overwrites_its_input(tmp_path):
    src = tmp_path / "r.html"
    src.write_text(json.dumps(cached_result()))
    before = src.read_bytes()
    assert "is an input of this command" in one_error(run("report", src), src)
    assert src.read_bytes() == before
    assert "is an input" in one_error(run("report", src, "--memo", src), src)
    # (a --markdown path ending .html exits 2 too, on its extension, before any writing)
    one_error(run("report", src, "--markdown", src), src)
    assert tree(tmp_path) == ["r.html"]


def test_report_writes_no_warnings_on_stderr(tmp_path):
    data = cached_result()
    for t in data["tensors"]:              # values that make matplotlib and numpy complain
        if t.get("rank"):
            t["rank"]["spectrum"] = [0.0, -1.0, 0.0]
        t["rel_change"] = 0.0
    for b in data["blocks"]:
        b["rel_change"] = 0.0
    src = tmp_path / "r.json"
    src.write_text(json.dumps(data))
    r = subprocess.run([sys.executable, "-W", "default", "-m", "weightdiff.cli", "report", str(src), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_report_plots_then_unwritable_html_writes_nothing(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(cached_result()))
    (tmp_path / "afile").write_text("x")
    line = one_error(run("report", src, "--plots", tmp_path / "figs", "--html", tmp_path / "afile" / "m.html"),
                     tmp_path / "afile")
    assert "is not a folder" in line
    assert tree(tmp_path) == ["afile", "r.json"]


# -- all-or-nothing outputs of compare ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--report", "--csv", "--plots"])
def test_parent_that_is_a_file_fails_before_anything_is_written(tmp_path, pair, flag):
    (tmp_path / "afile").write_text("x")
    before = tree(tmp_path)
    target = tmp_path / "afile" / ("figs" if flag == "--plots" else "m.html")
    r = run("compare", *pair, "--json", tmp_path / "out" / "r.json", flag, target, "-q")
    line = one_error(r, tmp_path / "afile")
    assert "is not a folder" in line and "File exists" not in line
    assert tree(tmp_path) == before


def test_same_target_twice_is_bad_input(tmp_path, pair):
    before = tree(tmp_path)
    line = one_error(run("compare", *pair, "--json", tmp_path / "x", "--csv", tmp_path / "x", "-q"), tmp_path / "x")
    assert "is given for two outputs" in line
    assert tree(tmp_path) == before
    r = run("compare", *pair, "--json", "-", "--csv", "-", "-q")
    assert r.exit_code == 2 and "stdout is given for two outputs" in r.stderr


@pytest.mark.parametrize("exists", [False, True], ids=["dangling", "existing"])
def test_two_outputs_that_are_one_file_through_a_symlink(tmp_path, pair, exists):
    # the CSV silently replaced the JSON (exit 0) when one output was a symlink to the other
    out = tmp_path / "o"
    out.mkdir()
    if exists:
        (out / "target.json").write_text("{}")
    (out / "link.json").symlink_to(out / "target.json")
    before = tree(tmp_path)
    line = one_error(run("compare", *pair, "--json", out / "target.json", "--csv", out / "link.json", "-q"),
                     out / "link.json")
    assert "is given for two outputs" in line
    assert tree(tmp_path) == before


def test_output_over_an_input_is_refused(tmp_path, pair):
    before = pair[0].read_bytes()
    assert "is an input" in one_error(run("compare", *pair, "--json", pair[0], "-q"), pair[0])
    assert pair[0].read_bytes() == before


def test_all_outputs_appear_together(tmp_path, pair):
    out = tmp_path / "out"
    r = run("compare", *pair, "--json", out / "r.json", "--csv", out / "r.csv", "--report", out / "m.md",
            "--plots", out / "figs", "-q")
    assert r.exit_code == 0, r.output
    files = tree(out)
    assert {"r.json", "r.csv", "m.md", "figs/rank.png", "figs/figures.json"} <= set(files)
    assert not [f for f in files if f.endswith(".tmp")]


def test_character_device_is_written_into_not_replaced(tmp_path, pair):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("mknod needs root")
    r = run("compare", *pair, "--json", dev, "--csv", "/dev/null", "-q")
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.stat(dev).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert tree(tmp_path) == ["base.safetensors", "null", "tuned.safetensors"]


def test_fifo_with_a_reader_receives_the_json_and_stays_a_fifo(tmp_path, pair):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # the JSON (a few kB) fits the pipe buffer
    try:
        r = run("compare", *pair, "--json", fifo, "-q")
        assert r.exit_code == 0, r.output
        got = os.read(reader, 1 << 20)
    finally:
        os.close(reader)
    assert json.loads(got)["schema"] == "weightdiff.compare/2"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_fifo_without_a_reader_is_bad_input(tmp_path, pair):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "FIFO with no reader" in one_error(run("compare", *pair, "--json", fifo, "-q"), fifo)


def test_output_set_removes_temporaries_on_a_signal(tmp_path):
    with pytest.raises(Interrupted) as exc:
        with OutputSet():
            write_text(tmp_path / "sub" / "a.json", "{}")
            write_text(tmp_path / "b.csv", "x")
            assert len(tree(tmp_path)) == 3                   # the folder and two temporaries
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.exit_code == 143
    assert tree(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


_SCRIPT = """
import os, signal, sys, ctypes
import weightdiff.render.plots as plots
from weightdiff.cli import main
real = plots.figure_bytes
calls = []
def figure_bytes(fig, fmt):
    calls.append(fmt)
    if len(calls) == 3:
        if {how!r} == "ctypes":
            # a signal whose KeyboardInterrupt is swallowed, as in numba's compiler callbacks
            cb = ctypes.CFUNCTYPE(None)(lambda: os.kill(os.getpid(), signal.SIGINT))
            cb()
        else:
            os.kill(os.getpid(), {sig})
    return real(fig, fmt)
plots.figure_bytes = figure_bytes
sys.argv = ["weightdiff", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("how, sig, code", [("kill", signal.SIGINT, 130), ("kill", signal.SIGTERM, 143),
                                            ("ctypes", signal.SIGINT, 130)])
def test_signal_while_writing_leaves_nothing(tmp_path, pair, how, sig, code):
    out = tmp_path / "out"
    script = textwrap.dedent(_SCRIPT.format(how=how, sig=int(sig)))
    r = subprocess.run([sys.executable, "-c", script, "compare", *map(str, pair), "--json", str(out / "r.json"),
                        "--plots", str(out / "figs"), "-q"], capture_output=True, text=True, timeout=180,
                       cwd=tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.splitlines()[-1] == "interrupted"
    assert not out.exists(), tree(out)


def test_a_process_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, pair):
    """A background job of a non-interactive shell starts with SIGINT ignored, and a Ctrl-C in the terminal must not
    stop it: Python keeps it ignored, but the output set installed its own handler, and the run stopped
    "interrupted" at exit 130 with nothing written."""
    out = tmp_path / "out"
    script = textwrap.dedent(_SCRIPT.format(how="kill", sig=int(signal.SIGINT)))
    r = subprocess.run([sys.executable, "-c", script, "compare", *map(str, pair), "--json", str(out / "r.json"),
                        "--plots", str(out / "figs"), "-q"], capture_output=True, text=True, timeout=180,
                       cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert json.loads((out / "r.json").read_text())["schema"] == "weightdiff.compare/2"


# -- CSV injection and terminal escapes --------------------------------------------------------------------------

def test_csv_cells_cannot_be_formulas_or_terminal_escapes():
    names = ["=cmd|' /C calc'!A0", "+SUM(1,2)", "-2+3+cmd|' /C calc'!A0", "@SUM(1)", "\tx", "\rx",
             "a\x1b[2Jb", "evil\u202eftp.exe", "ok.weight"]
    data = {"tensors": [{"name": n, "status": "changed", "shape": [2, 2], "rel_change": -0.5, "note": n}
                        for n in names]}
    rows = to_csv(data).splitlines()[1:]
    import csv as _csv

    cells = [next(_csv.reader([r])) for r in rows]
    for c, n in zip(cells, names):
        assert c[0][0] not in "=+-@\t\r", c[0]
        assert "\x1b" not in c[0] and "\u202e" not in c[0]
    assert cells[0][0] == "'=cmd|' /C calc'!A0"
    assert cells[6][0] == "a\\x1b[2Jb" and cells[7][0] == "evil\\u202eftp.exe"
    assert cells[-1][0] == "ok.weight"
    assert all(c[12] == "-0.5" for c in cells)              # numbers stay numbers


def test_stdout_json_on_a_terminal_escapes_esc_and_bidi(tmp_path, rng, monkeypatch):
    names = {"a\x1b[31mred": rng.standard_normal((4, 4)).astype(np.float32),
             "b\u202egnp.exe": rng.standard_normal((4, 4)).astype(np.float32)}
    save_file(tmp_path / "b.safetensors", names)
    save_file(tmp_path / "t.safetensors", {k: v + 1 for k, v in names.items()})
    import weightdiff.cli_options as cli_options

    monkeypatch.setattr(cli_options, "_stdout_is_terminal", lambda: True)
    for flag in ("--json", "--csv"):
        r = CliRunner().invoke(main, ["compare", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                                      flag, "-", "-q"])
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
        if flag == "--json":
            assert {t["name"] for t in json.loads(r.stdout)["tensors"]} == set(names)


def test_output_over_a_file_inside_an_input_folder_is_refused(tmp_path, rng):
    from weightdiff.io.safetensors_write import save_checkpoint

    base = save_checkpoint(tmp_path / "base", {"w": rng.standard_normal((4, 4)).astype(np.float32)})
    tuned = save_checkpoint(tmp_path / "tuned", {"w": rng.standard_normal((4, 4)).astype(np.float32)})
    target = tuned / "model.safetensors"
    before = target.read_bytes()
    assert "is an input" in one_error(run("compare", base, tuned, "--json", target, "-q"), target)
    assert target.read_bytes() == before


def test_symlinked_output_replaces_the_file_it_points_to_not_the_link(tmp_path, pair):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    r = run("compare", *pair, "--json", link, "-q")
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and json.loads(real.read_text())["schema"] == "weightdiff.compare/2"


@pytest.mark.parametrize("flag", ["--report", "--plots"])
def test_dash_is_stdout_only_for_json_and_csv(tmp_path, pair, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    r = run("compare", *pair, flag, "-", "-q")
    assert r.exit_code == 2 and f"{flag}" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("target,expect", [("", "was given an empty path"), ("  ", "was given an empty path"),
                                           ("out/r.json/", "ends with a path separator")])
def test_an_empty_or_folder_like_output_path_is_bad_input(tmp_path, pair, target, expect):
    """``--json ""`` was silently ignored and ``--json out/r.json/`` wrote the file ``r.json``."""
    before = tree(tmp_path)
    r = run("compare", *pair, "--json", f"{tmp_path}/{target}" if target.startswith("out") else target,
            "--csv", tmp_path / "t.csv", "-q")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and expect in r.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag,value,expect", [("--seed", str(2 ** 80), "must be below 2**63"),
                                               ("--seed", "-1", "must be non-negative"),
                                               ("--rank-k", str(2 ** 70), "must be below 2**63"),
                                               ("--exact-svd-max", str(2 ** 70), "must be below 2**63")])
def test_integer_options_a_result_cannot_hold_are_refused_before_any_work(tmp_path, pair, flag, value, expect):
    """A seed of 2**80 ran the whole comparison, and the report reader then refused its JSON."""
    before = tree(tmp_path)
    r = run("compare", *pair, "--json", tmp_path / "r.json", flag, value, "-q")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and expect in r.stderr
    assert tree(tmp_path) == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_device_output_that_fails_at_the_end_leaves_no_other_output_and_announces_none(tmp_path, pair):
    """Device targets are written before any regular file is put in place, and "wrote" lines come
    only once every output is: --csv /dev/full left the JSON behind and announced the memo."""
    before = tree(tmp_path)
    r = run("compare", *pair, "--json", tmp_path / "x.json", "--csv", "/dev/full", "--report", tmp_path / "m.html")
    assert r.exit_code == 2 and "/dev/full" in r.stderr and "wrote" not in r.stderr
    assert tree(tmp_path) == before
    r = run("compare", *pair, "--json", tmp_path / "x.json", "--report", tmp_path / "m.html")
    assert r.exit_code == 0 and f"wrote {tmp_path / 'm.html'}" in r.stderr


def test_a_rename_rule_that_makes_two_tuned_names_one_is_refused(tmp_path):
    """``--rename weight=bias`` turned `q.weight` into a second `q.bias`: one read as resized, the
    real bias as added. Two names made one by a rule is bad usage, before any work."""
    from weightdiff.io.safetensors_write import save_file

    p = tmp_path / "m.safetensors"
    save_file(p, {"q.weight": ("F32", np.ones((4, 4), np.float32)), "q.bias": ("F32", np.ones(4, np.float32))})
    r = run("compare", p, p, "--rename", "weight=bias", "-q")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "both `q.bias`" in r.stderr and "`q.weight`" in r.stderr and "rename makes" in r.stderr
    assert run("compare", p, p, "--rename", "q.=p.", "-q").exit_code == 0      # distinct names stay fine


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_folder_that_refuses_files_fails_before_any_work(tmp_path, pair, monkeypatch):
    """/proc passes ``os.access`` for root, so the failure came after the whole run; a temporary
    file made and removed at claim time finds it first."""
    from weightdiff import comparison

    def never(*a, **k):
        raise AssertionError("the comparison ran")
    monkeypatch.setattr(comparison, "compute_all", never)
    r = run("compare", *pair, "--json", tmp_path / "x.json", "--report", "/proc/memo.html", "-q")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "/proc" in r.stderr
    assert not (tmp_path / "x.json").exists() and not [p for p in os.listdir(tmp_path) if "probe" in p]


def test_temporaries_a_killed_run_left_are_swept_by_the_next(tmp_path, pair):
    # SIGKILL while writing leaves `.r.json.PID.XXXXXXXX.tmp`; nothing can catch it, so the next run that
    # writes the same output removes them, unless their writer is still alive
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    stale = out / f".r.json.{dead.pid}.abcd1234.tmp"
    live = out / f".r.json.{os.getppid()}.efgh5678.tmp"
    other = out / f".notes.txt.{dead.pid}.abcd1234.tmp"
    for p in (stale, live, other):
        p.write_text("partial")
    r = run("compare", *pair, "--json", out / "r.json", "-q")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and other.exists()
    assert json.loads((out / "r.json").read_text())["schema"] == "weightdiff.compare/2"


@pytest.mark.parametrize("cmd", ["compare", "lineage"])
def test_an_output_naming_the_markdown_memos_figure_folder_fails_before_any_work(tmp_path, pair, cmd):
    """`--csv m_figures --memo m.md`: the memo's figures go to m_figures/, which the CSV had taken. The command
    measured everything, wrote the JSON and printed the summary, then failed: all-or-nothing broken. The figure
    folder is claimed with the other outputs, so the clash is one line before any work."""
    out = tmp_path / "out"
    out.mkdir()
    r = run(cmd, *pair, "--no-rank", "--json", out / "a.json", "--csv", out / "m_figures", "--memo", out / "m.md")
    one_error(r, "m_figures")
    assert tree(out) == []
    r = run(cmd, *pair, "--no-rank", "--json", out / "a.json", "--memo", out / "m.md", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "m.md").is_file() and (out / "a.json").is_file()


# -- every output claimed up front, and the renames all or nothing (tester sv7) ---------------------------------

@pytest.mark.parametrize("args,shown", [
    (["--json", "out/figures.json", "--plots", "out"], "out/figures.json"),
    (["--csv", "out/rank.svg", "--plots", "out"], "out/rank.svg"),
    (["--json", "memo_figures/heatmap.png", "--report", "memo.md"], "memo_figures/heatmap.png"),
    (["--json", "out/r.json", "--csv", "out/table", "--cache", "out/table"], "out/table"),
    (["--json", "out/x", "--cache", "out/x/c"], "out/x"),
])
def test_an_output_that_another_output_writes_is_refused_before_any_work(tmp_path, pair, monkeypatch, args, shown):
    """A figure (or its captions) silently replaced --json/--csv (exit 0); --cache on an output's path
    ran the whole comparison, then exit 2 with the JSON already in place."""
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    line = one_error(run("compare", *pair, *args, "-q"), shown)
    assert "given for two outputs" in line or "lies inside" in line
    assert tree(tmp_path) == before


def test_report_refuses_an_output_that_a_figure_writes(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(cached_result()))
    before = tree(tmp_path)
    one_error(run("report", src, "--plots", tmp_path / "p", "--html", tmp_path / "p" / "figures.json"),
              "figures.json")
    assert tree(tmp_path) == before


def test_a_commit_that_fails_part_way_puts_the_old_files_back(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    with pytest.raises(Exception):
        with OutputSet():
            write_text(tmp_path / "a.txt", "new a")
            write_text(tmp_path / "b.txt", "new b")
            write_text(tmp_path / "c.txt", "new c")
            (tmp_path / "c.txt").mkdir()             # becomes a folder while the work runs
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert tree(tmp_path) == ["a.txt", "b.txt", "c.txt"]    # no temporary left

    real = os.replace

    def failing(src, dst):          # the second rename fails (a full quota, an I/O error)
        if str(dst).endswith("b.txt"):
            raise OSError(5, "Input/output error")
        return real(src, dst)
    import weightdiff.fsutil as fsutil

    fsutil.os.replace = failing
    try:
        with pytest.raises(Exception, match="b.txt"):
            with OutputSet():
                write_text(tmp_path / "a.txt", "new a")
                write_text(tmp_path / "b.txt", "new b")
                write_text(tmp_path / "d.txt", "new d")
    finally:
        fsutil.os.replace = real
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert tree(tmp_path) == ["a.txt", "b.txt", "c.txt"]


def test_side_inputs_are_regular_files_under_a_cap(tmp_path):
    """The survey's --from-file list, a --population table and --cache records were read with no check:
    a FIFO hung, /dev/zero filled the memory (exit 1 MemoryError), a deeply nested record crashed every rerun,
    a survey cell that is not a number or is over csv's field limit was an internal error."""
    import os

    import pytest

    from weightdiff.errors import WeightdiffError
    from weightdiff.measure.cache import RecordCache
    from weightdiff.render.report import load_population
    from weightdiff.survey import read_list

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.csv"
    zero.symlink_to("/dev/zero")
    for bad in (fifo, zero):
        with pytest.raises(WeightdiffError, match="not a regular file"):
            read_list(bad)
        with pytest.raises(WeightdiffError, match="not a regular file"):
            load_population(bad)
    head = "tuned,status,base,verdict,relative_change,one_minus_cosine,delta_params_share\n"
    for cell, why in (("abc", "could not convert"), ("1" * 200_000, "field larger than field limit")):
        t = tmp_path / "t.csv"
        t.write_text(head + f"m,ok,b,derived,{cell},0.1,0.2\n")
        with pytest.raises(WeightdiffError, match=why):
            load_population(t)
    cache = RecordCache(tmp_path / "c", {})
    for k, body in (("a" * 64, "[" * 100_000 + "]" * 100_000), ("b" * 64, None)):
        p = cache._path(k)
        p.parent.mkdir(parents=True, exist_ok=True)
        if body is None:
            os.mkfifo(p)
        else:
            p.write_text(body)
        assert cache.get(k) is None                       # a miss, never a hang or a crash


def test_json_to_dev_stdout_into_a_pipe(tmp_path):
    """`--json /dev/stdout` when stdout is a pipe: /dev/stdout resolves to /proc/PID/fd/pipe:[N], no path,
    and the run was refused with "cannot write here (No such file or directory)". It writes into the pipe."""
    import subprocess
    import sys

    import numpy as np

    from conftest import write_checkpoint

    x = {"model.layers.0.a.weight": np.ones((8, 8), np.float32)}
    b = write_checkpoint(tmp_path / "b", x)
    t = write_checkpoint(tmp_path / "t", {k: v * 1.01 for k, v in x.items()})
    p = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(b), str(t), "--no-rank", "-q",
                        "--json", "/dev/stdout"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert '"summary"' in p.stdout and '"verdict": "derived"' in p.stdout


@pytest.mark.parametrize("side, name", [("t", "config.json"), ("b", "config.json"), ("t", "tokenizer.json"),
                                        ("t", "model.safetensors.index.json"), ("a", "adapter_config.json"),
                                        ("t", "vocab.json"), ("t", "merges.txt"), ("t", "vocab.txt"),
                                        ("t", "chat_template.jinja"), ("t", "added_tokens.json")])
@pytest.mark.parametrize("flag", ["--json", "--csv", "--memo"])
def test_an_output_over_a_checkpoint_sidecar_is_refused(tmp_path, side, name, flag):
    """Outputs were checked against the weights files only: --json over the tuned folder's config.json (or an
    adapter's adapter_config.json, which decides the LoRA scale) replaced it and exited 0."""
    rng = np.random.default_rng(0)
    w = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    for d in ("b", "t"):
        (tmp_path / d).mkdir()
        save_file(tmp_path / d / "model.safetensors", w)
        (tmp_path / d / "config.json").write_text('{"model_type": "llama"}')
    for n in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "added_tokens.json"):
        (tmp_path / "t" / n).write_text("{}")
    (tmp_path / "t" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.layers.0.mlp.up_proj.weight": "model.safetensors"}}))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"]}))
    save_file(tmp_path / "a" / "adapter_model.safetensors",
              {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((2, 8), np.float32),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((16, 2), np.float32)})
    tuned = tmp_path / ("a" if side == "a" else "t")
    target = tmp_path / side / name
    if flag == "--memo":
        if name != "config.json":
            pytest.skip("one memo case per side: a memo is .md, .html or .docx")
        target = target.with_name("README.md")
        target.write_text("# my model\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = run("compare", tmp_path / "b", tuned, flag, target)
    assert "writing there would overwrite it" in one_error(r, target)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # a file of the user's own beside the model (an earlier run's result) stays writable
    r = run("compare", tmp_path / "b", tuned, "--json", tmp_path / side / "result.json")
    assert r.exit_code == 0 and (tmp_path / side / "result.json").is_file()


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("how", ["replace", "link", "signal"])
def test_an_interrupt_at_any_step_of_the_commit_leaves_all_old_outputs(tmp_path, monkeypatch, step, how):
    """Ctrl-C/SIGTERM between a rename and its bookkeeping (resume tester): the roll-back took the just
    renamed file for not placed and left it new beside the other outputs put back, a mix of old and new.
    Here the exception or the signal comes right after the step-th rename (or hard link of an old file)."""
    import weightdiff.fsutil as fsutil

    names = ["a.json", "b.csv", "c.html"]
    for n in names:
        (tmp_path / n).write_text(f"old {n}")
    calls = {"n": 0}
    real = getattr(os, how if how != "signal" else "replace")

    def then_interrupt(src, dst):
        real(src, dst)
        calls["n"] += 1
        if calls["n"] == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)      # the handler runs at the next bytecode
            else:
                raise fsutil.Interrupted(signal.SIGINT) if step != 2 else KeyboardInterrupt()

    monkeypatch.setattr(fsutil.os, "link" if how == "link" else "replace", then_interrupt)
    with pytest.raises((fsutil.Interrupted, KeyboardInterrupt)):
        with OutputSet():
            for n in names:
                write_text(tmp_path / n, f"new {n}")
    monkeypatch.undo()
    assert [(tmp_path / n).read_text() for n in names] == [f"old {n}" for n in names]
    assert tree(tmp_path) == sorted(names)          # no temporary, no kept link left


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_signal_after_every_output_is_in_place_is_held_and_the_run_completes(tmp_path, monkeypatch, step):
    """Ctrl-C while the old files' hard links were removed (every new output already in place) exited 130
    "interrupted" and left the links behind (verify tester): a script reading exit 130 as "nothing changed"
    found every output replaced. The signal is held to the end of the clean-up and dropped."""
    import weightdiff.fsutil as fsutil

    names = ["a.json", "b.csv", "c.html"]
    for n in names:
        (tmp_path / n).write_text(f"old {n}")
    calls = {"n": 0}
    real = os.unlink

    def then_signal(path, *a, **k):
        real(path, *a, **k)
        if not all((tmp_path / n).read_text() == f"new {n}" for n in names):
            return                                      # not yet the clean-up after the renames
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)          # the handler runs at the next bytecode

    monkeypatch.setattr(fsutil.os, "unlink", then_signal)
    with OutputSet():
        for n in names:
            write_text(tmp_path / n, f"new {n}")
    monkeypatch.undo()
    assert calls["n"] >= step
    assert [(tmp_path / n).read_text() for n in names] == [f"new {n}" for n in names]
    assert tree(tmp_path) == sorted(names)          # no kept link left
