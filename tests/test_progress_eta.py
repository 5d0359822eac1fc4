"""The progress line's ETA (``RateEstimate``) and the post-pass's progress, with fake clocks: no timed test.

The ETA was the average rate since the progress line was made: it counted the start-up (hashing every file for
--memo, planning) and the first windows' latency, so it read "ETA 1,002 s" at 96 s of a run done at 118 s. And the
tensors measured again after the pass (10-20 minutes at 70B widths) showed only their stage's name.
"""
from __future__ import annotations

import io

import pytest

import weightdiff.render.terminal as term
from weightdiff.render.terminal import ProgressLine, RateEstimate


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(term.time, "monotonic", c)
    return c


def test_the_start_up_before_the_first_window_is_not_in_the_rate():
    """80 s of start-up (hashing for the memo), then 20 elements a second: at 96 s the old average said 195 s
    left; the rate from the first sample on says the 33.5 s that are left."""
    e = RateEstimate()
    total, t, done = 1000, 80.0, 10
    e.add(t, done)
    while t < 96.0:
        t += 0.5
        done += 10
        e.add(t, done)
    assert e.eta(total) == pytest.approx((total - done) / 20.0, rel=1e-9)
    assert (total - done) * t / done > 5 * e.eta(total)             # what the average since t = 0 said


def test_a_slow_start_fades_out_of_the_window():
    """The first tensors slow (a rank solve, a compile: 1 element a second for 30 s), then 100 a second: once the
    window has passed the slow part, the ETA is the fast rate's."""
    e = RateEstimate(window=20.0)
    total, t, done = 20_000, 0.0, 0
    e.add(t, done)
    for _ in range(300):
        t += 0.1
        done += 0.1
        e.add(t, done)
    slow = e.eta(total)
    for _ in range(250):            # 25 s fast: the window (20 s) holds only fast samples now
        t += 0.1
        done += 10
        e.add(t, done)
    assert e.rate() == pytest.approx(100.0, rel=1e-6)
    assert e.eta(total) == pytest.approx((total - done) / 100.0, rel=1e-6)
    assert slow is None or slow > 10 * e.eta(total)
    assert len(e.samples) < 300                                      # old samples are let go


def test_the_window_grows_with_the_run():
    """A quarter of the time measured so far when that is longer than the window: a long run's rate does not
    swing with each tensor's own pace."""
    e = RateEstimate(window=20.0)
    e.add(0.0, 0)
    for i in range(1, 4001):        # 400 s: 10 elements a second, then a pause of 10 s at the end
        e.add(i * 0.1, i)
    e.add(410.0, 4000)
    # the window is 102.5 s, not 20 s: 10 s of 102.5 measured nothing, not half of 20
    assert e.rate() == pytest.approx((4000 - 3075) / 102.5, rel=0.01)


def test_no_eta_until_enough_time_and_elements_have_passed():
    e = RateEstimate(min_seconds=5.0, min_share=0.02)
    assert e.eta(100) is None and e.rate() is None
    e.add(10.0, 1)
    e.add(12.0, 3)
    assert e.rate() == pytest.approx(1.0) and e.eta(1000) is None        # 2 s: too soon
    e.add(16.0, 10)
    assert e.eta(1000) is None                                           # 9 of 1000 measured: too few
    e.add(17.0, 40)
    assert e.eta(1000) == pytest.approx(960 / (39 / 7.0))
    e.add(18.0, 1000)
    assert e.eta(1000) == 0.0


def test_elements_from_a_cache_count_as_done_not_as_measured():
    """A resumed run: 90% of the elements come back from the cache at once, then 1 element a second. The rate
    is 1 a second, not 900 in the first instant."""
    e = RateEstimate()
    e.add(0.0, 900, cached=900)
    for i in range(1, 31):
        e.add(float(i), 900 + i)
    assert e.rate() == pytest.approx(1.0)
    assert e.eta(1000) == pytest.approx(70.0)


def test_the_progress_line_in_a_log_says_when_the_eta_is_not_yet_known(clock):
    log = io.StringIO()
    p = ProgressLine(stream=log, bytes_per_element=2.0)
    clock.t += 96                                   # start-up before the first window
    p(10_000_000, 1_000_000_000, "model.embed_tokens.weight")
    assert "ETA not yet known" in log.getvalue()
    for _ in range(60):                             # then 20M elements a second
        clock.t += 0.5
        p(p.estimate.done + 10_000_000, 1_000_000_000, "model.layers.0.mlp.up_proj.weight")
    last = log.getvalue().splitlines()[-1]
    # 610M done at 126 s, 20M a second: 19.5 s left (the average since the start said 80 s)
    assert last.endswith("ETA 20 s; model.layers.0.mlp.up_proj.weight"), last
    assert "0.08 GB/s" in last                      # 20M elements x 2 sides x 2 bytes


def test_a_pass_resumed_from_the_cache_does_not_count_its_records_in_the_rate(clock):
    log = io.StringIO()
    p = ProgressLine(stream=log, interval=1.0)
    p.skip(900)
    p(900, 1000, "a")                               # 900 elements from the cache at once
    for _ in range(40):
        clock.t += 0.5
        p(p.estimate.done + 1, 1000, "b")           # then 2 a second
    assert log.getvalue().splitlines()[-1].endswith("ETA 30 s; b")


def test_the_tensors_measured_again_show_done_total_and_an_eta(clock):
    """``stage(what, total)`` then ``advance(n)``: the post-pass line shows its share done, its GB and an ETA of
    its own rate; a check (no total) shows its time so far only."""
    log = io.StringIO()
    p = ProgressLine(stream=log, bytes_per_element=4.0, interval=3600)      # no beat during the test
    p(100, 100, "")
    p.stage("checking for reparametrisations")
    clock.t += 40
    assert p._stage_text("checking for reparametrisations", clock.t - 40).startswith(
        "progress: checking for reparametrisations, 40 s so far")
    p.stage("measuring 30 tensors again", total=1_000_000_000)
    started = clock.t
    p.advance(400_000_000, cached=True)             # from --cache: done, not in the rate
    for _ in range(20):
        clock.t += 0.5
        p.advance(10_000_000)
    text = p._stage_text("measuring 30 tensors again", started)
    assert text.startswith("progress: measuring 30 tensors again, 60.0% of 1.00B params (~4.8 of 8.0 GB read)")
    assert "10 s so far" in text and text.rstrip().endswith("ETA 20 s"), text        # 400M left at 20M a second
    p.stage(None)
    tty = type("Tty", (io.StringIO,), {"isatty": lambda self: True})()
    q = ProgressLine(stream=tty)
    q.stage("measuring 3 tensors again", total=100)
    assert "0.0%" in q._stage_text("measuring 3 tensors again", clock.t) and "ETA  ..." in \
        q._stage_text("measuring 3 tensors again", clock.t)
    q.close()


def test_compare_reports_the_post_pass_by_elements(tmp_path, rng):
    """A library progress object with ``stage`` and ``advance`` is told the total of the tensors measured again,
    then each one's elements; the CLI's wrapper forwards both (and ``skip``)."""
    from conftest import write_checkpoint
    from models import llama
    from test_rotation import _orthogonal, _rotated, _tuned
    from weightdiff import compare
    from weightdiff.cli_options import _checked

    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    t = write_checkpoint(tmp_path / "t", _rotated(_tuned(base), _orthogonal(128)))
    seen: list = []

    class Progress:
        def __call__(self, done, total, name):
            pass

        def stage(self, what, total=None):
            seen.append(("stage", what, total))

        def advance(self, n, cached=False):
            seen.append(("advance", n, cached))

        def skip(self, n):
            seen.append(("skip", n))

    wrapped = _checked(Progress())
    assert all(hasattr(wrapped, k) for k in ("stage", "advance", "skip"))
    compare(b, t, progress=wrapped)
    stages = [i for i, s in enumerate(seen) if s[0] == "stage" and s[2] is not None]
    assert [seen[i][1] for i in stages] == ["measuring 30 tensors again beneath the reparametrisations found",
                                            "measuring 9 norms again beneath the gains folded"]
    for i, j in zip(stages, stages[1:] + [len(seen)]):
        steps = [s[1] for s in seen[i + 1:j] if s[0] == "advance"]
        assert steps and sum(steps) == seen[i][2]
    assert seen[-1] == ("stage", None, None)
    # with --cache, a rerun's post-pass comes back from it: told as cached
    compare(b, t, cache=str(tmp_path / "cache"), progress=Progress())
    seen.clear()
    compare(b, t, cache=str(tmp_path / "cache"), progress=Progress())
    steps = [s for s in seen if s[0] == "advance"]
    assert len(steps) == 39 and all(s[2] for s in steps)
    assert sum(s[1] for s in seen if s[0] == "skip") > 0
    # a progress object with ``stage`` alone hears the stages' names, as before
    names: list = []

    def plain(done, total, name):
        pass
    plain.stage = names.append
    compare(b, t, progress=plain)
    assert "measuring 30 tensors again beneath the reparametrisations found" in names and names[-1] is None


def test_the_pass_eta_counts_what_a_previous_run_measured_again(clock):
    """``expect(n)``: a previous run's checks (``--cache``) say n elements are measured again after the pass; the
    pass's ETA counts them at its rate, until the stage that measures them starts."""
    log = io.StringIO()
    p = ProgressLine(stream=log, interval=1.0)
    p.expect(400)
    p(0, 1000, "a")
    for _ in range(20):
        clock.t += 0.5
        p(p.estimate.done + 10, 1000, "a")          # 20 a second
    last = log.getvalue().splitlines()[-1]
    # 800 left in the pass and 400 after it, at 20 a second
    assert "ETA 60 s (with the tensors measured again after the pass)" in last, last
    p.stage("measuring 30 tensors again", total=400)
    assert p.later == 0
    p.stage(None)


def test_a_long_step_without_a_call_still_gets_a_line_in_a_log(clock):
    """One 70B-width matrix's rank solve is minutes without a call: the log showed nothing for 3 to 8 minutes after
    "finishing the rank analysis". The heartbeat writes the pass's line again, saying how long since the last step,
    and not "ETA 0 s" while rank solves are left."""
    log = io.StringIO()
    p = ProgressLine(stream=log, interval=30.0)
    p(0, 1000, "a")
    for _ in range(20):
        clock.t += 0.5
        p(p.estimate.done + 10, 1000, "a")
    clock.t += 31
    p(400, 1000, "model.layers.0.mlp.down_proj.weight")
    before = log.getvalue()
    clock.t += 10
    assert p.beat() and log.getvalue() == before             # too soon: nothing
    clock.t += 25
    assert p.beat()
    line = log.getvalue()[len(before):]
    assert line.startswith("progress: measuring, 40.0%") and line.rstrip().endswith(
        "model.layers.0.mlp.down_proj.weight, 35 s since the last step"), line
    assert "ETA not known while this step runs" in line      # 35 s of nothing: the last 20 s measured nothing
    p(1000, 1000, "model.layers.1.mlp.down_proj.weight")    # streamed; its rank solving
    clock.t += 120
    assert p.beat()
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("progress: finishing the rank analysis, 100.0%") and "120 s since the last step" in last
    assert "ETA not known (rank solves still running)" in last and "ETA 0 s" not in last
    p(1000, 1000, "")                                       # the end: the heartbeat stops
    assert not p.beat()


def test_the_heartbeat_thread_writes_and_ends_with_the_line():
    import gc
    import threading
    import time

    log = io.StringIO()
    p = ProgressLine(stream=log, interval=0.2, delay=0.0)
    p(1, 10, "x")
    deadline = time.monotonic() + 20
    while "since the last step" not in log.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "since the last step" in log.getvalue()
    p.close()
    assert not any(t.name == "weightdiff-heartbeat" and t.is_alive() for t in threading.enumerate()
                   if p._heart is not None and t is p._heart[1])
    q = ProgressLine(stream=io.StringIO(), interval=0.2, delay=0.0)
    q(1, 10, "x")
    thread = q._heart[1]
    del q
    gc.collect()
    thread.join(20)
    assert not thread.is_alive()                            # a line dropped without close: its thread ends too


def test_hashing_the_inputs_is_a_stage_of_its_own(tmp_path, rng):
    """--hash (which --memo turns on) hashed every input file after the pass with nothing on stderr (56 to 93 s for
    a 7B pair): a stage names it, with the bytes to hash, before the pass too when --cache keys records by it."""
    from conftest import write_checkpoint
    from models import llama
    from weightdiff import compare

    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    t = write_checkpoint(tmp_path / "t", {k: v * 1.01 for k, v in base.items()})
    names: list = []

    def progress(done, total, name):
        pass
    progress.stage = lambda what, total=None: names.append(what)
    compare(b, t, progress=progress, hash_files=True)
    hashing = [n for n in names if n and n.startswith("hashing the input files (sha256 of ")]
    assert len(hashing) == 1 and names[names.index(hashing[0]) + 1] is None, names
    names.clear()
    compare(b, t, progress=progress, hash_files=False)
    assert not any(n and n.startswith("hashing") for n in names), names
    compare(b, t, progress=progress, hash_files=True, cache=str(tmp_path / "c"))
    assert sum(1 for n in names if n and n.startswith("hashing")) == 1        # hashed once, before the pass
