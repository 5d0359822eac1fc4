"""weightdiff survey and the split comparison, sequential and on a two-process Dask LocalCluster.

One cluster (127.0.0.1, no dashboard) serves the whole module. Every distributed result
is checked byte for byte against the sequential one: the tables, every model's JSON, and
a split comparison's JSON against an unsplit run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from weightdiff.survey import NAMES, read_csv, safe_name, survey, survey_task, to_csv

from conftest import write_checkpoint
from models import llama, low_rank_update

distributed = pytest.importorskip("distributed")


def _same_trees(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Byte-identical trees; on a difference, the first differing line of each file that differs (a
    one-off difference under heavy load was seen once and must be diagnosable from the CI log)."""
    assert sorted(got) == sorted(want)
    bad = []
    for name in sorted(got):
        if got[name] != want[name]:
            a, b = got[name].decode(errors="replace").splitlines(), want[name].decode(errors="replace").splitlines()
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append(f"{name} line {k + 1}:\n  got  {a[k] if k < len(a) else '<end>'}\n  want {b[k] if k < len(b) else '<end>'}")
    assert not bad, "\n".join(bad)


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A tiny bf16 base, three fine-tunes of growing depth, an untouched copy and a corrupt file."""
    root = tmp_path_factory.mktemp("survey-models")
    rng = np.random.default_rng(7)
    base = llama(rng, layers=2, hidden=64, inter=128, vocab=128)
    write_checkpoint(root / "base", base, dtype="BF16")
    tuned = []
    for i, mods in enumerate([("q_proj",), ("q_proj", "v_proj"), ("q_proj", "v_proj", "gate_proj", "up_proj")]):
        t = dict(base)
        for k in t:
            if any(f".{m}." in k for m in mods):
                t[k] = low_rank_update(rng, t[k], 2 + i, 0.02 * (i + 1))
        write_checkpoint(root / f"ft{i}", t, dtype="BF16")
        tuned.append(root / f"ft{i}")
    write_checkpoint(root / "copy", base, dtype="BF16")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    return {"root": root, "base": root / "base", "tuned": tuned + [root / "copy", root / "corrupt"]}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=50)
    cl = Client(cluster, set_as_default=False)
    yield cl
    cl.close()
    cluster.close()


@pytest.fixture(scope="module")
def sequential(models, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("survey-seq")
    return out, survey(models["base"], models["tuned"], out)


def test_sequential_survey_rows(models, sequential):
    out, res = sequential
    rows = {Path(r["tuned"]).name: r for r in res.rows}
    assert [r["tuned"] for r in res.rows] == sorted(r["tuned"] for r in res.rows)
    assert (res.computed, res.skipped, res.failed) == (4, 0, 1)
    assert rows["copy"]["verdict"] == "identical" and rows["copy"]["relative_change"] == 0.0
    depth = [rows[f"ft{i}"]["relative_change"] for i in range(3)]
    assert all(rows[f"ft{i}"]["verdict"] == "derived" for i in range(3)) and depth == sorted(depth)
    assert rows["ft2"]["blocks_changed"] == 2 and rows["ft2"]["form"] == "low_rank"
    assert rows["ft2"]["max_numerical_rank"] == 4
    bad = rows["corrupt"]
    assert bad["status"] == "error" and bad["verdict"] is None and bad["json"] is None
    assert bad["error"].startswith(f"{models['root'] / 'corrupt' / 'model.safetensors'}: ")
    assert "\n" not in bad["error"]
    # each ok row's JSON is the model's compare JSON, byte for byte
    for i in range(3):
        r = rows[f"ft{i}"]
        expected = weightdiff.compare(models["base"], models["tuned"][i]).to_json(include_run=False)
        assert (out / r["json"]).read_text() == expected
        assert r["json"] == f"models/{safe_name(r['tuned'])}.json"
        assert r["one_minus_cosine"] == max(0.0, 1 - json.loads(expected)["summary"]["relatedness_cosine"])
    assert read_csv(out / "survey.csv") == res.rows
    assert sorted(_tree(out)) == sorted(["survey.csv", "survey.parquet"] +
                                         [r["json"] for r in res.rows if r["json"]])


def test_parquet_holds_the_same_rows(sequential):
    import pyarrow.parquet as pq

    out, res = sequential
    table = pq.read_table(out / "survey.parquet")
    assert table.column_names == NAMES
    assert table.to_pylist() == res.rows


def test_dask_survey_is_byte_identical_to_sequential(models, sequential, client, tmp_path):
    out, _ = sequential
    res = survey(models["base"], list(reversed(models["tuned"])), tmp_path, client=client)
    assert (res.computed, res.failed) == (4, 1)
    _same_trees(_tree(tmp_path), _tree(out))


def test_resume_skips_done_rows_and_reruns_changed_or_failed(models, sequential, tmp_path):
    import shutil

    out, _ = sequential
    shutil.copytree(out, tmp_path / "s")
    calls = []

    def counting(base, tuned, options, hash_files):
        calls.append(Path(tuned).name)
        return survey_task(base, tuned, options, hash_files)

    before = _tree(tmp_path / "s")
    res = survey(models["base"], models["tuned"], tmp_path / "s", task=counting)
    assert calls == ["corrupt"] and res.skipped == 4 and _tree(tmp_path / "s") == before
    # another option is another survey: every model again
    calls.clear()
    survey(models["base"], models["tuned"][:2], tmp_path / "s", task=counting, rank_k=8)
    assert calls == ["ft0", "ft1"]
    # a model rewritten with another size is compared again; the rest is not
    calls.clear()
    rng = np.random.default_rng(1)
    write_checkpoint(models["root"] / "ft_new", llama(rng, layers=2, hidden=64, inter=128, vocab=128), dtype="F32")
    res = survey(models["base"], models["tuned"][:2] + [models["root"] / "ft_new"], tmp_path / "s", task=counting,
                 rank_k=8)
    assert calls == ["ft_new"]
    assert [Path(r["tuned"]).name for r in res.rows] == ["ft0", "ft1", "ft_new"]


def test_without_pyarrow_only_csv_and_a_notice(models, monkeypatch, tmp_path):
    from weightdiff import survey as survey_mod

    monkeypatch.setattr(survey_mod, "have_pyarrow", lambda: False)
    said = []
    res = survey(models["base"], models["tuned"][:1], tmp_path, say=said.append)
    assert not (tmp_path / "survey.parquet").exists() and (tmp_path / "survey.csv").exists()
    assert res.notices == ["survey.parquet not written: pyarrow is not installed "
                           "(pip install 'weightdiff[pandas]'); wrote survey.csv only"]
    assert res.notices[0] in said


def test_killed_worker_task_is_retried_with_the_same_result(models, sequential, client, tmp_path):
    out, _ = sequential
    flags = str(tmp_path / "flags")
    os.mkdir(flags)

    def waits_on_flag(base, tuned, options, hash_files):   # pickled by value: a closure
        import os as _os
        import time as _time

        from weightdiff.survey import survey_task as _task

        if tuned.endswith("ft1"):
            open(_os.path.join(flags, f"started-{_os.getpid()}"), "w").close()
            while not _os.path.exists(_os.path.join(flags, "go")):
                _time.sleep(0.02)
        return _task(base, tuned, options, hash_files)

    def started() -> list[int]:
        return [int(n.split("-")[1]) for n in os.listdir(flags) if n.startswith("started-")]

    def wait_for(cond, what: str) -> None:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < 120, f"timed out waiting for {what}"
            time.sleep(0.05)

    result = []
    th = threading.Thread(target=lambda: result.append(
        survey(models["base"], models["tuned"], tmp_path / "s", client=client, task=waits_on_flag)))
    th.start()
    try:
        wait_for(lambda: started(), "the task to start")
        victim = started()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(p != victim for p in started()), "the task to run again on a live worker")
    finally:
        open(os.path.join(flags, "go"), "w").close()
        th.join(180)
    assert not th.is_alive() and result
    assert (result[0].computed, result[0].failed) == (4, 1)
    _same_trees(_tree(tmp_path / "s"), _tree(out))


def test_split_compare_gives_the_unsplit_json(models, client, tmp_path, rng):
    from weightdiff.options import CompareOptions
    from weightdiff.split import compare as split_compare

    base = llama(rng, layers=3, hidden=64, inter=128, vocab=128)
    tuned = dict(base)
    tuned["model.layers.1.mlp.down_proj.weight"] = low_rank_update(rng, base["model.layers.1.mlp.down_proj.weight"], 3)
    tuned["model.layers.2.self_attn.o_proj.weight"] = base["model.layers.2.self_attn.o_proj.weight"] + \
        rng.normal(0, 1e-3, (64, 64)).astype(np.float32)
    tuned["model.embed_tokens.weight"] = np.concatenate([base["model.embed_tokens.weight"],
                                                         rng.normal(0, 0.02, (4, 64)).astype(np.float32)])
    tuned["score.weight"] = rng.normal(0, 0.02, (3, 64)).astype(np.float32)
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, shards=3)
    opts = CompareOptions()
    unsplit = weightdiff.compare(tmp_path / "b", tmp_path / "t", options=opts).to_json(include_run=False)
    said = []
    split = split_compare(tmp_path / "b", tmp_path / "t", options=opts, client=client, say=said.append)
    assert split.to_json(include_run=False) == unsplit
    assert said and "groups on Dask cluster" in said[0]


def test_balanced_groups_cover_every_pair_once():
    from weightdiff.split import balanced_groups

    w = [100, 1, 1, 50, 50, 0, 0, 30]
    groups = balanced_groups(w, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(w)))
    assert sorted(sum(w[i] for i in g) for g in groups) == [77, 78, 78] or \
        max(sum(w[i] for i in g) for g in groups) <= 100
    assert balanced_groups([1, 2], 8) == [[1], [0]]


def test_cli_survey_on_an_existing_scheduler(models, sequential, client, tmp_path):
    out, _ = sequential
    listing = tmp_path / "list.txt"
    listing.write_text("# fine-tunes\n" + "\n".join(str(p) for p in models["tuned"][1:]) + "\n\n")
    r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--from-file",
                                  str(listing), "--out", str(tmp_path / "s"), "--scheduler",
                                  client.scheduler.address, "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"5 models: 4 compared, 0 already done, 1 failed ({tmp_path / 's' / 'survey.csv'})\n"
    _same_trees(_tree(tmp_path / "s"), _tree(out))


def test_cli_split_compare_on_an_existing_scheduler(models, client, tmp_path):
    args = ["compare", str(models["base"]), str(models["tuned"][2]), "--json", "-"]
    local = CliRunner().invoke(main, args)
    split = CliRunner().invoke(main, args + ["--scheduler", client.scheduler.address])
    assert local.exit_code == split.exit_code == 0
    a, b = json.loads(local.stdout), json.loads(split.stdout)
    a.pop("run"), b.pop("run")
    assert a == b


def test_cli_bad_base_is_one_line_and_writes_nothing(models, tmp_path):
    r = CliRunner().invoke(main, ["survey", str(models["root"] / "corrupt"), str(models["tuned"][0]),
                                  "--out", str(tmp_path / "s")])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_to_csv_writes_null_as_empty_and_floats_round_trip():
    row = dict.fromkeys(NAMES)
    row.update(tuned="/m", name="m-1", status="ok", relative_change=0.1 + 0.2, blocks_changed=3)
    text = to_csv([row])
    assert text.splitlines()[1].startswith("/m,m-1,ok,,,,0.30000000000000004,,3,")


# --- the population figure and the memo's sentence ------------------------------------------------

def _rows(values: list[float | None]) -> list[dict]:
    rows = []
    for i, v in enumerate(values):
        rows.append({"tuned": f"/s/ft{i:02d}", "status": "ok" if v is not None else "error", "base": "/s/base",
                     "relative_change": v, "one_minus_cosine": None if v is None else v * v,
                     "delta_params_share": None if v is None else min(1.0, v * 3)})
    return rows


def test_population_sentence_places_the_model():
    from weightdiff.render.population import population_sentences

    rows = _rows([0.01 * (i + 1) for i in range(40)] + [None])
    data = {"tuned": {"path": "/elsewhere/mine"}, "base": [{"path": "/s/base"}],
            "summary": {"relative_change": 0.347, "relatedness_cosine": 1 - 0.347 ** 2, "delta_params_share": None}}
    s = population_sentences(data, rows)
    assert s[0] == ("By relative change (3.5e-1), this fine-tune is deeper than 34 of the 40 surveyed fine-tunes "
                    "of this base (median 2.1e-1).")
    assert s[1].startswith("By 1 − cosine (1.2e-1) it is further from the base than 34 of 40")
    assert len(s) == 2
    # its own row is left out; another base is named
    data["tuned"]["path"] = "/s/ft05"
    data["base"] = [{"path": "/other/base"}]
    s = population_sentences(data, rows)
    assert "of the 39 other surveyed fine-tunes of the base `/s/base`" in s[0]


def test_population_figure_bytes_are_stable_and_outliers_labelled(tmp_path):
    from weightdiff.render.population import outliers, save_population

    rows = _rows([0.01, 0.011, 0.012, 0.013, 0.014, 0.015, 0.9, 0.0, None])
    assert [r["tuned"] for r in outliers(rows, "relative_change")] == ["/s/ft06"]
    a = save_population(rows, tmp_path / "a")
    b = save_population(list(reversed(rows)), tmp_path / "b")
    assert [p.name for p in a] == ["population.png", "population.svg"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    svg = a[1].read_text()
    assert "ft06" in svg and "ft00" not in svg


def test_cli_survey_plot_and_report_population(models, sequential, tmp_path):
    import shutil

    out, res = sequential
    shutil.copytree(out, tmp_path / "s")
    r = CliRunner().invoke(main, ["survey", str(models["base"]), *map(str, models["tuned"]), "--out",
                                  str(tmp_path / "s"), "--plot"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "population.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 's' / 'population.svg'}" in r.stderr
    ft2 = next(x for x in res.rows if x["tuned"].endswith("ft2"))
    for table in ("survey.parquet", "survey.csv"):
        r = CliRunner().invoke(main, ["report", str(tmp_path / "s" / ft2["json"]), "--markdown",
                                      str(tmp_path / "memo.md"), "--population", str(tmp_path / "s" / table)])
        assert r.exit_code == 0, r.output
        line = ("By relative change (" + f"{ft2['relative_change']:.1e}".replace("e-0", "e-") + "), this fine-tune "
                "is deeper than 2 of the 2 other surveyed fine-tunes of this base")      # the copy is not one
        assert line in r.stdout
        assert "1 other surveyed model is left out" in r.stdout and "(1 identical)" in r.stdout
        assert line in (tmp_path / "memo.md").read_text()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "s" / ft2["json"]), "--population",
                                  str(tmp_path / "s" / "models" / Path(ft2["json"]).name)])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "not a weightdiff survey table" in r.stderr


def test_without_dask_workers_run_here_and_scheduler_is_an_error(models, sequential, monkeypatch, tmp_path):
    from weightdiff import cluster

    out, _ = sequential
    monkeypatch.setattr(cluster, "have_dask", lambda: False)
    said = []
    survey(models["base"], models["tuned"], tmp_path / "s", workers=2, say=said.append)
    _same_trees(_tree(tmp_path / "s"), _tree(out))
    assert said[0] == "Dask is not installed (pip install 'weightdiff[dask]'): --workers 2 ignored, running in this process"
    r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--out",
                                  str(tmp_path / "t"), "--scheduler", "tcp://127.0.0.1:8786"])
    assert r.exit_code == 2
    assert r.stderr == ("error: --scheduler needs Dask distributed, which is not installed "
                        "(pip install 'weightdiff[dask]')\n")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra,message", [
    (["--workers", "0"], "error: --workers must be at least 1 (got 0)\n"),
    (["--worker-memory", "1GB"], "error: --worker-memory sets the memory of the local workers: give --workers N too\n"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"],
     "error: give --scheduler or --workers, not both (--workers starts a local cluster; an existing cluster "
     "has its own workers)\n"),
])
def test_cluster_option_misuse_is_one_line_and_writes_nothing(models, tmp_path, extra, message):
    for cmd in (["survey", str(models["base"]), str(models["tuned"][0]), "--out", str(tmp_path / "s")],
                ["compare", str(models["base"]), str(models["tuned"][0]), "--json", str(tmp_path / "r.json")]):
        r = CliRunner().invoke(main, cmd + extra)
        assert (r.exit_code, r.stderr) == (2, message)
        assert not (tmp_path / "s").exists() and not (tmp_path / "r.json").exists()


def test_hash_records_the_sha256_of_the_inputs(models, tmp_path):
    import hashlib

    res = survey(models["base"], models["tuned"][:1], tmp_path, hash_files=True)
    row = res.rows[0]
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert row["tuned_sha256"] == sha(models["tuned"][0] / "model.safetensors")
    assert row["base_sha256"] == sha(models["base"] / "model.safetensors")
    assert row["tuned_bytes"] == (models["tuned"][0] / "model.safetensors").stat().st_size
    # --hash is part of the identity: without it the model is compared again, and has no digests
    res = survey(models["base"], models["tuned"][:1], tmp_path)
    assert res.computed == 1 and res.rows[0]["tuned_sha256"] is None


def test_a_path_that_is_not_here_is_made_absolute_and_is_an_error_row(models, monkeypatch, tmp_path):
    """A missing TUNED path kept its relative spelling in the `tuned` column, which docs/survey.md says
    holds absolute paths (lineage/provenance/survey tester); a Hub repo id is still kept as given."""
    monkeypatch.chdir(tmp_path)
    res = survey(models["base"], ["missing-model", models["tuned"][0]], tmp_path / "s")
    rows = {r["tuned"]: r for r in res.rows}
    gone = str(tmp_path / "missing-model")
    miss = rows[gone]
    assert (miss["status"], miss["error"]) == ("error", f"{gone}: no such file or directory")
    assert miss["name"] == safe_name(gone) and miss["tuned_files"] == 0
    assert rows[str(models["tuned"][0])]["status"] == "ok"


def test_relative_paths_reach_workers_that_run_elsewhere(models, client, tmp_path, monkeypatch):
    """The workers were started in another directory (as on a --scheduler cluster): a relative BASE
    reached them as given and every row failed ("B: no such file or directory"), exit 0. And one
    checkpoint given twice (a symlink to its folder) made two rows."""
    monkeypatch.chdir(models["root"])
    (tmp_path / "link").symlink_to(models["tuned"][0], target_is_directory=True)
    res = survey("base", ["ft0", str(tmp_path / "link"), "./ft1/"], tmp_path / "s", client=client)
    assert (res.computed, res.failed) == (2, 0), [r.get("error") for r in res.rows]
    assert sorted(r["tuned"] for r in res.rows) == [str(models["tuned"][0]), str(models["tuned"][1])]


def test_list_file_comments_after_a_path(tmp_path):
    from weightdiff.survey import read_list

    (tmp_path / "l.txt").write_text("# header\nft-a  # the first\n\n  ft-b\t#second\nft#c\n")
    assert read_list(tmp_path / "l.txt") == ["ft-a", "ft-b", "ft#c"]


def test_local_workers_print_nothing_about_port_8787(models, tmp_path):
    """The scheduler's HTTP routes wanted port 8787: with it taken (another cluster, a notebook),
    distributed warned "Port 8787 is already in use" on stderr, even with -q."""
    import socket
    import warnings

    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 8787))
        s.listen()
    except OSError:
        pass                                   # taken already: the case itself
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = survey(models["base"], [models["tuned"][0]], tmp_path / "s", workers=1)
    finally:
        s.close()
    assert res.computed == 1
    assert not [w for w in seen if "8787" in str(w.message)]


def test_population_leaves_out_rows_that_are_not_fine_tunes():
    # a bitwise copy and a model the survey judged unrelated were counted as "surveyed fine-tunes of this
    # base" and moved the medians
    from weightdiff.render.population import population_sentences

    rows = _rows([0.004, 0.0127, 0.0, 0.66])
    for r, v in zip(rows, ("derived", "derived", "identical", "unrelated")):
        r["verdict"] = v
    data = {"tuned": {"path": "/s/ft00"}, "base": [{"path": "/s/base"}],
            "summary": {"verdict": "derived", "relative_change": 0.004, "relatedness_cosine": None}}
    s = population_sentences(data, rows)
    assert s[0] == ("By relative change (4.0e-3), this fine-tune is deeper than 0 of the 1 other surveyed "
                    "fine-tunes of this base (median 1.3e-2).")
    assert s[-1] == ("2 other surveyed models are left out: by the survey's own verdicts, not fine-tunes of the "
                     "base (1 identical, 1 unrelated).")


# -- tester sv7: --cache, output targets and a second survey into one DIR ------------------------------------------

def _one_line(r, shown) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(shown) in lines[0], r.stderr
    return lines[0]


def test_a_relative_cache_is_the_parents_folder_on_a_cluster(models, client, tmp_path, monkeypatch):
    """The workers run in another directory: a relative --cache was resolved there, and the folder
    the user named stayed empty (compare created it empty; survey never looked at it)."""
    import shutil
    import uuid

    name = f"wd-cache-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, ["compare", str(models["base"]), str(models["tuned"][0]), "--json", "c.json",
                                      "--cache", name + "-c", "--scheduler", client.scheduler.address, "-q"])
        assert r.exit_code == 0, r.output
        res = survey(models["base"], models["tuned"][:1], tmp_path / "s", client=client, cache=name + "-s")
        assert res.computed == 1
        for suffix in ("-c", "-s"):
            assert list((tmp_path / (name + suffix) / "records").glob("*/*.json"))
    finally:
        for suffix in ("-c", "-s"):     # what a worker wrote into its own directory before the fix
            client.run(shutil.rmtree, name + suffix, True)


def test_survey_checks_the_cache_before_any_work(models, tmp_path):
    """--cache under a regular file: every model became an error row, exit 0."""
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--out",
                                  str(tmp_path / "s"), "--cache", str(tmp_path / "afile" / "sub")])
    assert "--cache" in _one_line(r, tmp_path / "afile" / "sub")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("make,extra,shown", [
    (lambda d: (d / "survey.csv").mkdir(parents=True), [], "survey.csv"),
    (lambda d: (d / "population.png").mkdir(parents=True), ["--plot"], "population.png"),
    (lambda d: (d.mkdir(), (d / "models").write_text("x")), [], "models"),
])
def test_survey_targets_are_checked_before_any_work(models, tmp_path, make, extra, shown):
    """A folder named survey.csv was an internal error (exit 1); population.png a folder failed
    after every model was compared and written; `models` a file named DIR, not DIR/models."""
    out = tmp_path / "s"
    make(out)
    before = _tree(out)
    r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--out", str(out),
                                  *extra])
    _one_line(r, out / shown)
    assert _tree(out) == before and not list(out.glob("models/*"))


def test_a_second_survey_into_the_same_dir_is_refused(models, tmp_path):
    """Two surveys into one DIR each rewrote survey.csv from the rows it read at start: rows lost."""
    import fcntl

    from weightdiff.errors import WeightdiffError

    out = tmp_path / "s"
    out.mkdir()
    with open(out / ".survey.lock", "w") as held:          # another survey holds it
        held.write("pid 1 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(WeightdiffError, match=r"being written by another survey \(pid 1 on elsewhere"):
            survey(models["base"], models["tuned"][:1], out)
        r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--out", str(out)])
        _one_line(r, ".survey.lock")
    assert not (out / "survey.csv").exists()
    res = survey(models["base"], models["tuned"][:1], out)     # released: it runs, and leaves no lock behind
    assert res.computed == 1 and not (out / ".survey.lock").exists()


def test_a_delta_params_bracket_is_a_range_in_the_table_and_in_the_sentence(tmp_path):
    """delta_params_share was the bracket's upper end shown as a point, and the memo said "larger
    than 2 of 2" where the ranges overlap (tester sv7, repro_7)."""
    from weightdiff.render.population import population_sentences, save_population
    from weightdiff.survey import row_from_result

    summary = {"verdict": "derived", "relative_change": 0.05, "relatedness_cosine": 0.99, "delta_params": 753664,
               "delta_params_lower": 79872, "delta_params_share": 753664 / 885888, "params_total": 885888}
    row = row_from_result({"summary": summary}, {"path": "/s/ftB", "files": []}, {"path": "/s/base", "files": []}, "k")
    assert row["delta_params_share_lower"] == 79872 / 885888
    assert "delta_params_share_lower" in to_csv([row]).splitlines()[0].split(",")
    others = [{"tuned": "/s/ftA", "status": "ok", "verdict": "derived", "base": "/s/base", "relative_change": 0.01,
               "one_minus_cosine": 0.001, "delta_params_share": 0.0092, "delta_params_share_lower": None},
              {"tuned": "/s/ftC", "status": "ok", "verdict": "derived", "base": "/s/base", "relative_change": 0.02,
               "one_minus_cosine": 0.002, "delta_params_share": 0.148, "delta_params_share_lower": 0.021}]
    data = {"tuned": {"path": "/s/ftB"}, "base": [{"path": "/s/base"}], "summary": summary}
    last = population_sentences(data, others)[2]
    assert last == ("By delta parameters (between 9.0% and 85.1%) it is larger than 1 of 2 "
                    "(median between 1.5% and 7.9%; 1 undecided (the ranges overlap)).")
    a = save_population(others + [row], tmp_path)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in save_population(others + [row], tmp_path)]


def test_workers_killed_for_memory_are_an_exit_2_with_a_hint(tmp_path):
    """Workers killed by their memory limit: `compare --workers 1 --worker-memory 100MB` exited 1 (the "bug,
    please report" code) with distributed's KilledWorker text and no word of memory."""
    pytest.importorskip("distributed")
    import numpy as np
    from distributed import KilledWorker

    import weightdiff
    from conftest import write_checkpoint
    from weightdiff.cluster import KILLED, Outcome, _one_line
    from weightdiff.errors import WeightdiffError
    from weightdiff.options import CompareOptions
    from weightdiff.split import distributed_compute

    assert _one_line(KilledWorker("weightdiff-split-x-0", None, 3)) == KILLED    # its own str() fails here

    class Killed:
        workers, description = 1, "a fake cluster"

        def map(self, fn, args, name="task"):
            yield Outcome(0, None, KILLED, killed=True)

    rng = np.random.default_rng(0)
    x = {"model.layers.0.mlp.up_proj.weight": rng.normal(0, 0.02, (32, 16)).astype(np.float32)}
    b, t = write_checkpoint(tmp_path / "b", x), write_checkpoint(tmp_path / "t", {k: v + 1e-3 for k, v in x.items()})
    compute = distributed_compute(Killed(), [str(b)], str(t), CompareOptions(), lambda m: None)
    with pytest.raises(WeightdiffError) as err:
        weightdiff.compare(b, t, compute=compute)
    assert err.value.exit_code == 2 and "give the workers more memory" in str(err.value)


@pytest.mark.parametrize("hash_files", [False, True])
def test_a_model_rewritten_in_place_with_its_size_and_mtime_is_surveyed_again(tmp_path, hash_files):
    """Resume skipped a model by paths, names and sizes only: one rewritten in place with the same size (a
    re-trained fine-tune) kept its stale row, with --hash a sha256 the file no longer has (resume tester).
    Files are identified as --cache identifies them (inode, mtime, ctime): touch -d cannot restore a ctime."""
    import hashlib

    rng = np.random.default_rng(3)
    base = llama(rng, layers=1, hidden=32, inter=64, vocab=64)
    write_checkpoint(tmp_path / "base", base, dtype="BF16")
    t = tmp_path / "t1"
    write_checkpoint(t, {k: low_rank_update(rng, v, 2, 0.05) if "q_proj" in k else v for k, v in base.items()},
                     dtype="BF16")
    out = tmp_path / "s"
    first = survey(tmp_path / "base", [t], out, hash_files=hash_files).rows[0]
    assert first["verdict"] != "identical"
    shard = t / "model.safetensors"
    st = shard.stat()
    shard.write_bytes((tmp_path / "base" / "model.safetensors").read_bytes())     # same size: the base itself
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    res = survey(tmp_path / "base", [t], out, hash_files=hash_files)
    assert (res.computed, res.skipped) == (1, 0)
    assert res.rows[0]["verdict"] == "identical"
    if hash_files:
        assert res.rows[0]["tuned_sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    # unchanged: skipped
    assert survey(tmp_path / "base", [t], out, hash_files=hash_files).skipped == 1


def test_with_hash_a_row_whose_sha256_the_files_no_longer_have_is_surveyed_again(tmp_path):
    """With --hash a done row is skipped only when its files still have the sha256 it states (a change that
    left no trace in stat: here the row's digest is made wrong instead)."""
    rng = np.random.default_rng(4)
    base = llama(rng, layers=1, hidden=32, inter=64, vocab=64)
    write_checkpoint(tmp_path / "base", base, dtype="BF16")
    write_checkpoint(tmp_path / "t1", {k: v + 0.01 for k, v in base.items()}, dtype="BF16")
    out = tmp_path / "s"
    want = survey(tmp_path / "base", [tmp_path / "t1"], out, hash_files=True).rows[0]["tuned_sha256"]
    # the row is rebuilt from the model's JSON (the table's cells are not trusted): its digest is made wrong there
    (js,) = (out / "models").glob("*.json")
    assert want in js.read_text()
    js.write_text(js.read_text().replace(want, "0" * 64))
    res = survey(tmp_path / "base", [tmp_path / "t1"], out, hash_files=True)
    assert (res.computed, res.skipped) == (1, 0) and res.rows[0]["tuned_sha256"] == want
    assert survey(tmp_path / "base", [tmp_path / "t1"], out, hash_files=True).skipped == 1


# -- lineage/provenance/survey tester: a cluster that cannot be reached or goes away; inputs spelled twice ------------

def _unreachable(monkeypatch):
    """distributed.Client refusing at once, as an unreachable --scheduler does after its 15 s timeout."""
    def refuse(*args, **kwargs):
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:1 after 15 s")

    monkeypatch.setattr(distributed, "Client", refuse)


def test_an_unreachable_scheduler_writes_nothing_in_a_fresh_dir(models, monkeypatch, tmp_path):
    """`survey base A --out fresh --scheduler tcp://127.0.0.1:1` exited 2 but had written fresh/survey.csv,
    survey.parquet and models/ (the tables were written before the runner connected)."""
    _unreachable(monkeypatch)
    r = CliRunner().invoke(main, ["survey", str(models["base"]), str(models["tuned"][0]), "--out",
                                  str(tmp_path / "fresh"), "--scheduler", "tcp://127.0.0.1:1"])
    line = _one_line(r, "cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert line.startswith("error: cannot reach") and not (tmp_path / "fresh").exists()


def test_an_unreachable_scheduler_leaves_an_existing_survey_as_it_was(models, monkeypatch, tmp_path):
    """A rerun with a model to compare again and an unreachable scheduler exited 2 and rewrote survey.csv
    without that model's row."""
    out = tmp_path / "s"
    survey(models["base"], models["tuned"][:2], out)
    before = _tree(out)
    _unreachable(monkeypatch)
    r = CliRunner().invoke(main, ["survey", str(models["base"]), *map(str, models["tuned"][:2]), "--hash",
                                  "--out", str(out), "--scheduler", "tcp://127.0.0.1:1"])
    _one_line(r, "cannot reach the Dask scheduler")
    assert _tree(out) == before and sorted(os.listdir(out)) == ["models", "survey.csv", "survey.parquet"]


SLOW_TASK = '''
import time
from weightdiff.survey import survey_task

def task(*args):
    time.sleep(0.4)
    return survey_task(*args)
'''

SLOW_CLI = ("import functools, slow_task, weightdiff.survey as s; "
            "s.survey = functools.partial(s.survey, task=slow_task.task); "
            "from weightdiff.cli import main; main()")


def test_a_scheduler_lost_mid_survey_is_one_line_exit_2_and_blames_no_model(models, tmp_path):
    """The scheduler stopped mid-survey: exit 0, a 48-line distributed traceback on stderr, and an error row
    "worker failed: FutureCancelledError ..." for every model not done. Now: one line, exit 2, the rows
    done kept, no row for the others, and the rerun compares only those."""
    import socket
    import subprocess
    import sys

    (tmp_path / "slow_task.py").write_text(SLOW_TASK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": tmp_path}
    sched = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], **quiet)
    worker = None
    out = tmp_path / "s"
    try:
        worker = subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1",
                                   "--nthreads", "1", "--no-dashboard"], **quiet)
        cli = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "survey", str(models["base"]),
                                *map(str, models["tuned"][:4]), "--out", str(out), "--scheduler", address],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while not (out / "models").is_dir() or not os.listdir(out / "models"):
            assert time.monotonic() - t0 < 120 and cli.poll() is None, "no model was done"
            time.sleep(0.05)
        sched.kill()
        stdout, stderr = cli.communicate(timeout=120)
    finally:
        for p in (sched, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert cli.returncode == 2, stderr
    assert stdout == "" and "Traceback" not in stderr and "distributed" not in stderr, stderr
    errors = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: lost the connection to the Dask cluster at {address} "
                                                     "(the scheduler stopped, or the network to it failed)"), stderr
    assert stderr.splitlines()[-1] == errors[0]
    rows = read_csv(out / "survey.csv")
    assert rows and len(rows) < 4 and all(r["status"] == "ok" for r in rows), rows
    res = survey(models["base"], models["tuned"][:4], out)
    assert (res.skipped, res.computed + res.failed) == (len(rows), 4 - len(rows))


def test_an_error_row_is_one_line():
    """distributed's cancellation message holds a newline; it reached the error column."""
    from weightdiff.cluster import _one_line
    from weightdiff.survey import row_from_result

    tid = {"path": "/m/ft", "files": []}
    row = row_from_result(None, tid, {"path": "/m/base", "files": []}, "k", "worker failed: x.\nClient lost it\r\n")
    assert row["error"] == "worker failed: x. Client lost it"
    assert _one_line(RuntimeError("a\n  b\n")) == "worker failed: RuntimeError: a b"


def test_one_checkpoint_spelled_as_its_folder_and_its_file_is_one_row(models, tmp_path):
    """`survey base A A/model.safetensors` wrote two rows for one file; both counted in the population."""
    ft0 = models["tuned"][0]
    said = []
    for i, order in enumerate(([ft0, ft0 / "model.safetensors"], [ft0 / "model.safetensors", ft0])):
        res = survey(models["base"], order, tmp_path / f"s{i}", say=said.append)
        assert [r["tuned"] for r in res.rows] == [str(ft0)]
    assert _tree(tmp_path / "s0") == _tree(tmp_path / "s1")
    assert f"{ft0 / 'model.safetensors'}: the same checkpoint as {ft0} (the same weight files): surveyed once" in said


def test_base_listed_as_a_tuned_model_is_left_out_with_a_notice(models, monkeypatch, tmp_path):
    """`survey base base A` surveyed BASE against itself silently (an `identical` row)."""
    monkeypatch.chdir(models["root"])
    r = CliRunner().invoke(main, ["survey", "base", "base", "./base/model.safetensors", "ft0", "--out",
                                  str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "base: the BASE itself (the same weight files): not surveyed\n" in r.stderr
    assert "./base/model.safetensors: the BASE itself (the same weight files): not surveyed\n" in r.stderr
    assert [x["tuned"] for x in read_csv(tmp_path / "s" / "survey.csv")] == [str(models["tuned"][0])]
    r = CliRunner().invoke(main, ["survey", "base", "base/", "--out", str(tmp_path / "t")])
    _one_line(r, "no tuned models to survey")
    assert not (tmp_path / "t").exists()


def test_population_figure_shows_the_memos_population_and_labels_no_near_median_dot(tmp_path):
    """The figure was titled "8 surveyed fine-tunes of one base" with unrelated, identical and cast_only rows
    in its strips and medians (the memo leaves them out), and with a zero interquartile range a dot 0.07%
    from the others was labelled as an outlier."""
    from weightdiff.render.population import outliers, save_population

    rows = _rows([0.01, 0.011, 0.012, 0.013, 0.014, 0.0, 0.9, 0.02])
    for r, v in zip(rows, ["derived"] * 5 + ["identical", "unrelated", "cast_only"]):
        r["verdict"] = v
        r["delta_params_share"] = 0.9984
    rows[4]["delta_params_share"] = 1.0
    svg = save_population(rows, tmp_path)[1].read_text()
    assert "Population: 5 surveyed fine-tunes of one base" in svg
    # wrapped to the figure's width (the one line ran past both edges), the verdicts in words
    assert "(3 other surveyed models left out, by their verdicts not fine-tunes of the base:" in svg
    assert "1 cast only, 1 identical, 1 unrelated)" in svg
    assert "ft06" not in svg and "ft04" not in svg             # the unrelated model is not in the strips
    assert outliers(rows[:5], "delta_params_share") == []      # 1.0 among 0.9984s is not unusual
    rows[4]["delta_params_share"] = 1e-3                        # a LoRA among dense fine-tunes still is
    assert [r["tuned"] for r in outliers(rows[:5], "delta_params_share")] == ["/s/ft04"]


def test_the_survey_heartbeat_says_models_bytes_and_an_eta():
    """A survey printed one line per model and nothing between (its comparisons run in worker processes): at 70B
    width an hour of silence. Between rows, every ``BEAT_SECONDS``, a line with the models and bytes done, the time
    since the last row and an ETA from the bytes finished per second."""
    from weightdiff.survey import Heartbeat

    now = [0.0]
    said: list[str] = []
    h = Heartbeat(said.append, [10_000_000_000, 20_000_000_000, 30_000_000_000], every=30.0, clock=lambda: now[0])
    assert h.line(10.0).endswith("ETA not yet known (no model done)")
    now[0] = 29.0
    h.beat()
    assert said == []                                       # not 30 s yet
    now[0] = 31.0
    h.beat()
    assert said == ["survey: 0 of 3 models compared (0.0 of 60.0 GB of tuned weights), 31 s so far, 31 s since the "
                    "last one, ETA not yet known (no model done)"]
    now[0] = 100.0
    h.finished(1)
    now[0] = 129.0
    h.beat()
    assert len(said) == 1                                   # a row was said at 100 s
    now[0] = 130.0
    h.beat()
    # 20 GB in 130 s, 40 GB left: 260 s
    assert said[-1] == ("survey: 1 of 3 models compared (20.0 of 60.0 GB of tuned weights), 130 s so far, 30 s since "
                        "the last one, ETA 260 s (from the models done)")
    hub = Heartbeat(said.append, [0, 5], clock=lambda: now[0])        # a Hub id's size is not known here: by number
    hub.finished(0)
    assert hub.line(now[0] + 10).endswith("1 of 2 models compared, 10 s so far, 10 s since the last one, ETA 10 s "
                                          "(from the models done)")


def test_a_survey_between_rows_prints_its_heartbeat(models, tmp_path, monkeypatch):
    import weightdiff.survey as sv

    monkeypatch.setattr(sv, "BEAT_SECONDS", 0.2)

    def slow(*args):
        time.sleep(1.5)
        return survey_task(*args)

    said: list[str] = []
    survey(models["base"], models["tuned"][:2], tmp_path / "s", say=said.append, task=slow)
    beats = [m for m in said if m.startswith("survey: ")]
    assert any(m.startswith("survey: 0 of 2 models compared") for m in beats), said
    assert any(m.startswith("survey: 1 of 2 models compared") and "ETA" in m for m in beats), said
    assert not any(t.name == "weightdiff-survey-progress" for t in threading.enumerate())
