"""Terminal rendering: the compare JSON dict -> the plain-text summary on stdout.

Reads only the JSON dict (so ``weightdiff report result.json`` prints the same text
without the checkpoints). No colour, fixed column widths, every name escaped: the
text can be pasted into an e-mail or a ticket as it is. The pairing plan and the
progress line are diagnostics and go to stderr (``plan_text``, ``ProgressLine``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from ..errors import escape_name
from .captions import one_minus_cosine
from .reference import nonfinite_only, one_minus_cosine_of, only_nonfinite, unmeasured_blocks
from .formats import (count, delta_params_count, delta_params_text, floor_clause, max_rank, nothing_compared,
                      rank_text, sci, share, summary_blocks_text, summary_tensors_text, tuned_params,
                      within_floor)
from .sentences import coverage_sentence, matrices_phrase, plural, verdict_title

STATUS_ORDER = ("unchanged", "rounding", "quantized", "changed", "resized", "added", "removed")


def _one_minus_cos(t: dict) -> str:
    v = one_minus_cosine(t)
    return sci(None if v is None else max(0.0, v))


def _shape(s: Any) -> str:
    return "-" if s is None else "x".join(str(v) for v in s) or "scalar"


def _table(rows: list[list[str]], header: list[str], aligns: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = []
        for c, w, a in zip(cells, widths, aligns):
            out.append(c.ljust(w) if a == "l" else c.rjust(w))
        return "  " + "  ".join(out).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _trim(name: str, width: int = 56) -> str:
    name = escape_name(name)
    return name if len(name) <= width else "..." + name[-(width - 3):]


def render_text(result: dict, top: int = 10) -> str:
    """The human summary of a compare result dict (see ``docs/cli.md`` for an example)."""
    s = result["summary"]
    lines = []
    bases = ", ".join(escape_name(b["path"]) for b in result["base"])
    lines.append(f"weightdiff {result['tool']['version']}: {bases}  vs  {escape_name(result['tuned']['path'])}")
    lines.append("")
    lines.append(f"verdict   {verdict_title(s)}")
    if s.get("verdict_reason"):
        lines.append(f"          {s['verdict_reason']}")
    sc = s.get("scope") or {}
    # (the tensor count holds added tensors too: said so, where the headline counts them apart)
    lines.append(f"scope     {summary_blocks_text(s)}; {summary_tensors_text(s)}")
    if s.get("verdict") == "quantized_only":
        # nothing beyond the floor: the counts are of changes larger than the quantization noise, not "none"
        lines[-1] += " changed beyond the quantization noise floor (a change smaller than it would not show)"
    if within_floor(s):
        w = within_floor(s)
        lines[-1] += (f" ({count(w.get('tensors'))} more within their quantization noise floor may have changed "
                      f"by less than it{'; so may ' + count(w['blocks']) + (' more block' if w['blocks'] == 1 else ' more blocks') if w.get('blocks') else ''})")
    if sc.get("base_blocks_total") and sc.get("base_blocks_paired", 0) < sc["base_blocks_total"]:
        lines[-1] += f"; {count(sc['base_blocks_paired'])} of {count(sc['base_blocks_total'])} base blocks have a counterpart"
    cover = coverage_sentence(s)
    if cover and cover not in (s.get("verdict_reason") or ""):
        lines.append(f"coverage  {cover}")
    form = s.get("form") or {}
    if form.get("kind"):
        extra = ""
        if form.get("max_numerical_rank") is not None or form.get("max_numerical_rank_bounds"):
            extra = f" (largest numerical rank {max_rank(form)})"
        sh = form.get("shares") or {}
        if form["kind"] == "mixed":
            extra = f" ({share(sh.get('low_rank'))} low-rank, {share(sh.get('dense'))} dense, by parameters)" + extra
        elif form["kind"] == "undecided" and sh.get("without_rank") and sh["without_rank"] >= sh.get("undecided", 0):
            extra = (f" ({share(sh.get('without_rank'))} of the changed matrices' parameters have no rank "
                     f"analysis)" + extra)
        elif form["kind"] == "undecided":
            extra = (f" ({share(sh.get('undecided'))} of the changed matrices' parameters have a rank that cannot "
                     f"decide it)" + extra)
        lines.append(f"form      {form['kind']}{extra}")
    comps = s.get("components") or []
    if s.get("verdict") == "partial" or any(c.get("status") in ("unrelated", "faint") for c in comps):
        for status in ("shared", "unrelated", "faint", "unmeasured", "reshaped", "base_only", "tuned_only"):
            names = [escape_name(c["component"]) for c in comps if c.get("status") == status]
            if names:
                # under an inconclusive verdict (a faint trace of the base) the components' rule is not the
                # model's answer: "unrelated: embeddings, layers.0, ..." was quoted beside it
                label = "near-orthogonal" if status == "unrelated" and s.get("verdict") != "unrelated" \
                    and "faint_relatedness" in (s.get("flags") or []) else "faint trace" if status == "faint" \
                    else status.replace('_', ' ')
                lines.append(f"          {label}: {', '.join(names[:8])}"
                             + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    if s.get("flags"):
        lines.append(f"flags     {', '.join(s['flags'])}")
    lines.append("")
    # shares of the tuned model, as the headline's (a pruned model's table read "unchanged 79.5%" beside the
    # bullet's 100%); the removed base parameters are no part of it: no share
    total = tuned_params(s)
    rows = []
    for st in STATUS_ORDER:
        n = (s.get("params_by_status") or {}).get(st, 0)
        if n or st in ("unchanged", "changed"):
            rows.append([st, count(n), share(n / total if total and st != "removed" else None),
                         count((s.get("tensors_by_status") or {}).get(st, 0))])
    # each row is whole tensors of one status and their parameters: headed "parameters ... count", "unchanged 0" stood
    # above "0.97% of parameters are bitwise unchanged" (counted number by number, in changed tensors too)
    lines += _table(rows, ["tensor status", "parameters", "share", "tensors"], "lrrr")
    lines.append("")
    if only_nonfinite(result):
        # 0 over the finite values, which are the base's: not a measurement of the change
        lines.append("relative change   n/a   (the models differ only by NaN or infinite values: not measured)")
        lines.append("1 - cosine        n/a")
    else:
        lines.append(f"relative change   {sci(s.get('relative_change'))}   "
                     "(norm of all deltas / norm of the base, paired tensors)")
        if s.get("relatedness_cosine") is not None:
            pooled = "; pooled, see the components" if s.get("verdict") == "partial" else ""
            lines.append(f"1 - cosine        {sci(one_minus_cosine_of(result))}   "
                         f"(parameter-weighted over the {matrices_phrase(s)}{pooled})")
    if nothing_compared(s):   # the whole tuned model, written down against nothing measured: no claim
        lines.append(f"delta params      {delta_params_text(s)}")
    else:
        lines.append(f"delta params      {delta_params_count(s)}   "
                     f"({share(s.get('delta_params_share'))} of the model: parameters needed to write the change down"
                     f"{floor_clause(s)}"
                     + ("; beyond the quantization noise floor" if s.get("verdict") == "quantized_only" else "") + ")")

    blocks = [b for b in result.get("blocks", []) if (b.get("params_changed") or 0) > 0]
    blocks.sort(key=lambda b: (-(b.get("rel_change") or 0.0), b["block"]))
    if blocks:
        lines.append("")
        indexed = sum(1 for b in blocks if b.get("index") is not None)
        others = len(blocks) - indexed
        label = plural(indexed, "block") + (f" and {plural(others, 'other group')}" if others else "")
        lines.append(f"most changed blocks ({label} changed)")
        nan_only = unmeasured_blocks(result)
        rows = [[_trim(b["block"], 32), "n/a" if b["block"] in nan_only else sci(b.get("rel_change")),
                 count(b.get("params_changed")),
                 count(b.get("params")), max_rank(b, missing="-")]
                for b in blocks[:top]]
        lines += _table(rows, ["block", "rel change", "params changed", "params", "max rank"], "lrrrr")

    tensors = [t for t in result.get("tensors", []) if t["status"] in ("changed", "resized")]
    tensors.sort(key=lambda t: (-(t.get("rel_change") or 0.0), t["name"]))
    if tensors:
        lines.append("")
        lines.append(f"most changed tensors ({len(tensors)} changed or resized)")
        rows = []
        for t in tensors[:top]:
            r = t.get("rank") or {}
            nan_only = nonfinite_only(t)    # NaN/Inf only: 0 over the finite values measures nothing
            rows.append([_trim(t["name"]), t["status"], _shape(t.get("shape")),
                         "n/a" if nan_only else sci(t.get("rel_change")),
                         "n/a" if nan_only else _one_minus_cos(t), share(t.get("frac_beyond_rounding")),
                         "-" if r.get("energy_rank_99") is None else rank_text(r, "energy_rank_99"),
                         "-" if not r else rank_text(r, "numerical_rank")])
        lines += _table(rows, ["tensor", "status", "shape", "rel change", "1-cos", "beyond rnd", "rank99",
                               "num rank"], "lllrrrrr")
    added = [t for t in result.get("tensors", []) if t["status"] in ("added", "removed")]
    if added:
        lines.append("")
        lines.append(f"added or removed tensors ({len(added)})")
        rows = [[_trim(t["name"]), t["status"], _shape(t.get("shape")), count(t.get("numel"))] for t in added[:top]]
        lines += _table(rows, ["tensor", "status", "shape", "params"], "lllr")
        if len(added) > top:
            lines.append(f"  ... and {len(added) - top} more (see --json)")
    headline = [h for h in s.get("headline") or [] if h != s.get("verdict_reason")]
    if headline:
        lines.append("")
        lines += [f"  * {h}" for h in headline]
    # every line is safe on a terminal whatever a checkpoint's names or a JSON's sentences hold (an adapter's
    # declared base with an OSC escape reached stdout raw): control characters print as escapes; escape_name
    # leaves text it already escaped as it is
    return "\n".join(escape_name(line) for line in lines) + "\n"


def plan_text(plan: Any) -> str:
    """One or two lines about the pairing plan, shown before any heavy compute."""
    d = plan.to_dict() if hasattr(plan, "to_dict") else plan
    counts = d.get("counts") or {}
    tensors = counts.get("tensors") or {}
    parts = [f"{v} {k}" for k, v in tensors.items() if v]
    text = "plan: " + (", ".join(parts) if parts else "nothing to compare")
    by = counts.get("paired_by") or {}
    if by:
        text += "; paired by " + ", ".join(f"{k} {v}" for k, v in by.items())
    if counts.get("buffers"):
        text += f"; {counts['buffers']} buffers set apart"
    if counts.get("aliases"):
        text += f"; {counts['aliases']} tied aliases saved twice set apart"
    for note in d.get("notes", [])[:5]:
        text += "\n  " + escape_name(str(note))
    sources = getattr(plan, "sources", None) or []      # where a Hub-like spelling was read from
    return "".join(f"source: {escape_name(str(s))}\n" for s in sources) + text


class RateEstimate:
    """Elements per second and the time left, from ``(time, done)`` samples: what a progress line's ETA says.

    The average since the progress line was made was a bad guess early: it counted the start-up (locating,
    hashing, planning) and the first windows' latency (a compile, a rank solve) as if the rest would go as slowly
    (ETA 1,002 s printed at 96 s of a run done at 118 s). So:

    * the clock starts at the first sample, not before it (what came before measured nothing);
    * the rate is over the last ``window`` seconds (or a quarter of the time measured so far, when longer): a slow
      start fades out of it, and so does a fast one;
    * elements taken from a cache (``cached``) count as done but not as measured: a resumed run's first records
      come back at once and said nothing about how fast the rest will go;
    * there is no ETA (None) until ``min_seconds`` have passed since the first sample and ``min_share`` of the
      total has been measured since it.

    Pure: the caller gives the times (``time.monotonic()``, or a fake clock in a test).
    """

    def __init__(self, window: float = 20.0, min_seconds: float = 5.0, min_share: float = 0.02,
                 spacing: float = 0.1):
        self.window, self.min_seconds, self.min_share, self.spacing = window, min_seconds, min_share, spacing
        self.samples: list[tuple[float, float]] = []     # (time, elements measured), at least ``spacing`` apart
        self.head: tuple[float, float] | None = None     # the latest sample
        self.cached = 0.0                                # elements done that came from a cache
        self.done = 0.0

    def add(self, now: float, done: float, cached: float = 0.0) -> None:
        """``done`` elements in all at ``now``, of which ``cached`` more than before came from a cache (added before
        or with this sample)."""
        self.cached += cached
        self.done = done
        head = (now, done - self.cached)
        if not self.samples:
            self.samples.append(head)
        elif now - self.samples[-1][0] >= self.spacing:
            self.samples.append(head)
            cut = now - max(self.window, 0.25 * (now - self.samples[0][0]))
            # the anchor: the last sample at or before the window's start (the first sample stays: it is the start)
            first = 1
            while first + 1 < len(self.samples) and self.samples[first + 1][0] <= cut:
                first += 1
            if first > 1:
                del self.samples[1:first]
        self.head = head

    def _anchor(self) -> tuple[float, float] | None:
        if self.head is None:
            return None
        now = self.head[0]
        cut = now - max(self.window, 0.25 * (now - self.samples[0][0]))
        anchor = self.samples[0]
        for smp in self.samples:
            if smp[0] <= cut:
                anchor = smp
            else:
                break
        return anchor

    def rate(self) -> float | None:
        """Elements measured per second over the window, or None with less than two samples' time between them."""
        anchor = self._anchor()
        if anchor is None or self.head[0] <= anchor[0]:
            return None
        return max(0.0, self.head[1] - anchor[1]) / (self.head[0] - anchor[0])

    def eta(self, total: float) -> float | None:
        """Seconds left for ``total`` elements at the rate over the window; None until there is enough to tell."""
        if self.head is None:
            return None
        left = max(0.0, total - self.done)
        if left == 0:
            return 0.0
        start = self.samples[0]
        if self.head[0] - start[0] < self.min_seconds or self.head[1] - start[1] < self.min_share * total:
            return None
        rate = self.rate()
        return left / rate if rate else None


def _eta(eta: float | None, tty: bool) -> str:
    if eta is None:
        return "ETA  ...  " if tty else "ETA not yet known"
    return f"ETA {eta:4.0f}s" if tty else f"ETA {eta:,.0f} s"


def _heartbeat(ref, stop: threading.Event, wake: float) -> None:
    """``ProgressLine``'s heartbeat thread: ``beat`` every ``wake`` seconds while the line lives and says go on."""
    while not stop.wait(wake):
        line = ref()
        if line is None or not line.beat():
            return
        del line


class ProgressLine:
    """Progress on stderr: elements done / total, GB/s, ETA.

    On a terminal, one line redrawn in place (at most ten times a second), after ``delay``
    seconds so short runs print nothing. Elsewhere (a log file, a CI job, a notebook), a
    whole line every ``interval`` seconds (30 by default; the first after ``interval``), and
    one final 100% line when any was printed. ``enabled=False`` (``--quiet``) prints nothing.
    The rate and the ETA are ``RateEstimate``'s: from the first tensor on, over the last 20 s or so, none
    until 5 s and 2% have been measured (then ``ETA not yet known``); elements taken from a cache (``skip``)
    are not in the rate. The rank analysis runs tensor by tensor inside the same pass (its Gram matrix is
    summed from the streamed windows), so the rate includes it. Once every tensor has streamed, calls with a
    tensor's name are the rank solves still running ("finishing the rank analysis"); ``(total, total, "")``
    is the end.
    ``bytes_per_element``: bytes read per element and side (the caller sets ``bpe`` from the plan's
    dtypes: 4 for fp32, 2 for bf16).

    The steps after the pass (``stage``): a check whose length is not known in advance shows its time so far;
    tensors measured again (``stage(what, total)``, then ``advance(n)`` as their windows stream) show
    done / total, GB/s and an ETA for them as the pass does. Their size is known once the checks before them
    have run, or before the pass when ``--cache`` holds a previous run's checks of the same inputs (``expect``):
    the pass's ETA then counts them at its rate ("with the tensors measured again after the pass").
    """

    def __init__(self, stream: IO[str] | None = None, bytes_per_element: float = 2.0, delay: float = 1.0,
                 enabled: bool | None = None, interval: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = True if enabled is None else enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bpe = bytes_per_element
        self.t0 = time.monotonic()
        self.delay = delay if self.tty else interval
        self.interval = interval
        self.last = 0.0
        self.drawn = False
        self.ended = False          # the final 100% line is printed once
        self.estimate = RateEstimate()
        self._skipped = 0           # elements of the next call taken from a cache
        self._lock = threading.RLock()
        self.later = 0              # elements known to be measured again after the pass (``expect``)
        self._state: tuple[int, int, str, float] | None = None   # the pass's last call: done, total, name, when
        self._pass_over = False     # the pass's final call came: the heartbeat stops
        self._heart: tuple[threading.Event, threading.Thread] | None = None

    def expect(self, n: int) -> None:
        """``n`` elements will be measured again after the pass (a previous run's checks found them): the pass's ETA
        counts them at its rate, until the stage that measures them starts."""
        self.later = int(n)

    def skip(self, n: int) -> None:
        """``n`` elements of the next call were taken from a cache: done, but not measured at the pass's rate."""
        self._skipped += n

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = done >= total and not name
        with self._lock:
            self.estimate.add(now, done, self._skipped)
            self._skipped = 0
            self._state = (done, total, name, now)
            if final:
                self._pass_over = True
            elif self._heart is None:
                self._start_heart()
            el = now - self.t0
            if self.ended or el < self.delay or (now - self.last < (0.1 if self.tty else self.interval) and not final):
                return
            if not self.tty and final and not self.drawn:
                return        # a run shorter than the interval stays silent in a log
            self.ended = final
            self._write_pass(done, total, name, now, None)

    def _start_heart(self) -> None:
        """The pass's heartbeat: a line (a log: every ``interval`` s; a terminal: every second) while no call comes.
        One 70B-width matrix's rank solve, or a large tensor's first window, is minutes without a call: a log showed
        nothing for 3 to 8 minutes after "finishing the rank analysis". The line says how long since the last step;
        the rate and the ETA count the time without one. The thread holds the line weakly: it ends with the pass,
        ``close``/``stop_heartbeat``, or the line's being dropped."""
        import weakref

        stop = threading.Event()
        thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), stop, 1.0 if self.tty else
                                                            min(self.interval, 5.0)),
                                  name="weightdiff-heartbeat", daemon=True)
        self._heart = (stop, thread)
        thread.start()

    def beat(self) -> bool:
        """One heartbeat: the pass's line again when no call came for a period (a log: ``interval``; a terminal:
        a second) and none was written in it; False once the pass is over (the heartbeat then ends)."""
        period = 1.0 if self.tty else self.interval
        with self._lock:
            if self._pass_over or self.ended:
                return False
            if getattr(self, "_stage", None) is not None or self._state is None:
                return True
            done, total, name, at = self._state
            now = time.monotonic()
            if now - self.t0 < self.delay or now - self.last < period or now - at < period:
                return True
            self.estimate.add(now, done)
            try:
                self._write_pass(done, total, name, now, now - at)
            except (OSError, ValueError):       # stderr closed under us: nothing more to say
                return False
            return True

    def _write_pass(self, done: int, total: int, name: str, now: float, quiet: float | None) -> None:
        """One line of the pass (``quiet``: seconds since its last step, from the heartbeat)."""
        el = now - self.t0
        final = done >= total and not name
        self.last = now
        phase = "measuring" if done < total else "done" if final else "finishing the rank analysis"
        since = "" if quiet is None else f", {quiet:,.0f} s since the last step"
        per_s = self.estimate.rate()
        rate = (per_s or 0.0) * 2 * self.bpe / 1e9
        eta = self.estimate.eta(total)
        later = ""
        if eta is not None and self.later and per_s:
            eta += self.later / per_s
            later = " (with the tensors measured again after the pass)"
        told = _eta(eta, self.tty)
        if not self.tty and done >= total and not final:
            told = "ETA not known (rank solves still running)"      # not "ETA 0 s" for minutes of solves
        elif not self.tty and quiet is not None and eta is None:
            told = "ETA not known while this step runs"
        if not self.tty:
            pct = 100.0 * done / total if total else 100.0
            self.stream.write(f"progress: {phase}, {pct:.1f}% of {total / 1e9:,.2f}B params "
                              f"(~{done * 2 * self.bpe / 1e9:,.1f} of {total * 2 * self.bpe / 1e9:,.1f} GB read), "
                              f"{rate:.2f} GB/s, {el:,.0f} s so far, {told}{later}"
                              f"{'; ' + escape_name(_trim(name, 60)) if name else ''}{since}\n")
            self.stream.flush()
            self.drawn = True
            return
        pct = 100.0 * done / total if total else 100.0
        msg = (f"\r{pct:5.1f}%  {done / 1e6:,.0f}M / {total / 1e6:,.0f}M params  {rate:5.2f} GB/s  "
               f"{told}  {_trim(name, 40)}{'' if quiet is None else f'  {quiet:,.0f} s'}")
        self.stream.write(msg[:160].ljust(100))
        self.stream.flush()
        self.drawn = True

    def advance(self, n: int, cached: bool = False) -> None:
        """``n`` more elements of the measured stage done (``cached``: taken from a cache, not measured)."""
        st = getattr(self, "_measured", None)
        if st is None:
            return
        with self._lock:
            st["done"] += n
            st["estimate"].add(time.monotonic(), st["done"], n if cached else 0)

    def _stage_text(self, what: str, started: float) -> str:
        """The line of the running stage: its time so far, and for a measured stage done / total, GB/s, ETA."""
        now = time.monotonic()
        el = now - started
        st = getattr(self, "_measured", None)
        if st is None:
            if self.tty:
                return f"\r{_trim(what, 80)}  {el:,.0f} s".ljust(100)[:160]
            return f"progress: {escape_name(what)}, {el:,.0f} s so far ({now - self.t0:,.0f} s in all)\n"
        with self._lock:
            done, total = st["done"], st["total"]
            per_s, eta = st["estimate"].rate(), st["estimate"].eta(total)
        pct = 100.0 * done / total if total else 100.0
        rate = (per_s or 0.0) * 2 * self.bpe / 1e9
        if self.tty:
            return (f"\r{_trim(what, 60)}  {pct:5.1f}%  {rate:5.2f} GB/s  {_eta(eta, True)}  {el:,.0f} s"
                    .ljust(100)[:160])
        return (f"progress: {escape_name(what)}, {pct:.1f}% of {total / 1e9:,.2f}B params "
                f"(~{done * 2 * self.bpe / 1e9:,.1f} of {total * 2 * self.bpe / 1e9:,.1f} GB read), {rate:.2f} GB/s, "
                f"{el:,.0f} s so far ({now - self.t0:,.0f} s in all), {_eta(eta, False)}\n")

    def stage(self, what: str | None, total: int | None = None) -> None:
        """A step after the measuring pass (the checks for reordered units, a rotated residual stream, folded norms;
        the tensors measured again beneath what they found): on a log, a line ``progress: WHAT, N s so far`` every
        ``interval`` seconds while it runs (it took minutes at 70B widths after a "done, ETA 0 s" line, with nothing
        on stderr); on a terminal, one line redrawn every second. ``total``: the elements the stage measures
        (tensors measured again), told as they stream with ``advance``: the line then shows done / total, GB/s and
        the ETA of the stage (``RateEstimate``, started with the stage). ``None`` ends it. Lines come from a daemon
        thread, which stops with the stage."""
        old = getattr(self, "_stage", None)
        if old is not None:
            old[1].set()
            old[2].join()
            self._stage = None
        self._measured = None
        if total is not None:
            self.later = 0          # what was expected after the pass is measured now, and shown so
        if not self.enabled or what is None:
            if what is None and old is not None and self.tty and self.drawn:
                self.stream.write("\r" + " " * 100 + "\r")
                self.stream.flush()
            return
        if total is not None:
            self._measured = {"done": 0, "total": int(total), "estimate": RateEstimate()}
        stop = threading.Event()
        started = time.monotonic()

        def beat() -> None:
            period = 1.0 if self.tty else self.interval
            while not stop.wait(period):
                try:
                    self.stream.write(self._stage_text(what, started))
                    self.stream.flush()
                    self.drawn = True
                except (OSError, ValueError):     # stderr closed under us: nothing more to say
                    return

        thread = threading.Thread(target=beat, name="weightdiff-progress", daemon=True)
        self._stage = (what, stop, thread)
        thread.start()

    def stop_heartbeat(self) -> None:
        """No more heartbeat lines of the pass (it ended, or the command failed): the thread is stopped and joined."""
        with self._lock:
            self._pass_over = True
            heart, self._heart = self._heart, None
        if heart is not None:
            heart[0].set()
            heart[1].join()

    def close(self) -> None:
        self.stop_heartbeat()
        self.stage(None)
        if self.drawn and self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
