"""Where a weightdiff command's memory peak is: run the CLI in this process, sample the resident set every
``--every`` seconds on a side thread, and keep every thread's stack at the highest sample.

    python benchmarks/peak_stack.py [--every 0.02] [--log peak.txt] [--maps] -- compare base/ tuned/ --json o.json --quiet

Prints the kernel's high-water mark (``VmHWM``: the exact peak, whatever the sampling missed), the highest
sample with its anonymous and file-backed parts, the stacks at that sample, with ``--maps`` the mappings of 4 MB
or more resident then (``/proc/self/smaps``: a numpy array of more than a megabyte is a mapping of its own, so
the arrays alive are listed by size), the largest child process's peak (a first run compiles its numba kernels
in one: ``weightdiff.measure.precompile``), and a line every 5 s (RSS, the main thread's innermost frame). Linux only
(``/proc/self/status``).

The sampler holds no frame past a sample: ``sys._current_frames()`` hands out live frame objects, and a
frame still referenced when its function returns keeps that function's locals alive. An earlier version
of this script kept the last sampled frame until its next sample, up to 5 s: caught inside the eigen-solve
it held the 537 MB Gram matrix past the solve, beside the next matrix's, and reported peaks of 1.0-1.4 GB
for a run whose true peak (``VmHWM``, and ``/usr/bin/time -v`` without the sampler) was under 0.9 GB.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback


def status() -> dict:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in MB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def big_mappings(least_mb: int = 4) -> list[tuple[int, int, str]]:
    """(resident MB, size MB, name) of each mapping of this process with at least ``least_mb`` resident, largest
    first, from ``/proc/self/smaps``: a numpy array of more than a few MB is a mapping of its own, so this lists the
    large arrays alive (by size) and the files mapped (by path) at the moment it is read."""
    out, cur = [], None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = [0, (hi - lo) >> 20, head[5] if len(head) > 5 else "[anon]"]
                out.append(cur)
            elif head and head[0] == "Rss:" and cur is not None:
                cur[0] = int(head[1]) >> 10
    return sorted((tuple(m) for m in out if m[0] >= least_mb), reverse=True)


def stacks(main_id: int, only_main: bool = False, depth: int = 10) -> str:
    """Every other thread's innermost ``depth`` frames as text (or the main thread's innermost frame):
    the frames are dropped before this returns (see the module's docstring)."""
    me = threading.get_ident()
    frames = sys._current_frames()
    try:
        if only_main:
            f = frames.get(main_id)
            top = traceback.extract_stack(f)[-1] if f is not None else None
            return f"{os.path.basename(top.filename)}:{top.lineno} {top.name}" if top else ""
        return "\n====\n".join("".join(traceback.format_stack(f)[-depth:])
                               for t, f in frames.items() if t != me)
    finally:
        frames.clear()
        del frames


class Sampler:
    def __init__(self, every: float, maps: bool = False) -> None:
        self.every, self.maps = every, maps
        self.best_maps: list = []
        self.main_id = threading.get_ident()
        self.best: tuple[int, dict, str] = (0, {}, "")
        self.log: list[tuple[int, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = last = time.monotonic()
        while not self._stop.is_set():
            st = status()
            if st["VmRSS"] > self.best[0]:
                if self.maps and st["VmRSS"] > self.best[0] + 4:
                    self.best_maps = big_mappings()
                self.best = (st["VmRSS"], st, stacks(self.main_id))
            now = time.monotonic()
            if now - last >= 5:
                self.log.append((round(now - t0), st["VmRSS"], stacks(self.main_id, only_main=True)))
                last = now
            self._stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.02, help="seconds between samples (default 0.02)")
    ap.add_argument("--log", help="also write the report to this file")
    ap.add_argument("--maps", action="store_true",
                    help="at the highest sample, also list the mappings of 4 MB or more resident (arrays, files)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the weightdiff command line, after --")
    a = ap.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        ap.error("give the weightdiff command line after --")
    from weightdiff.cli import main as cli

    rc = 0
    t0 = time.monotonic()
    with Sampler(a.every, a.maps) as s:
        try:
            cli(args, standalone_mode=False)
        except SystemExit as exc:        # pragma: no cover - click's exit on bad input
            rc = int(exc.code or 0)
    wall = time.monotonic() - t0
    peak, st, where = s.best
    lines = [f"wall {wall:.1f} s; VmHWM {status()['VmHWM']} MB (the exact peak); highest sample {peak} MB "
             f"(anon {st.get('RssAnon')} MB, file {st.get('RssFile')} MB); stacks there:", where]
    from weightdiff.measure import precompile

    if precompile.peaks:    # a first run's kernel compile: its own process, its own peak (its VmHWM; getrusage
        # of a child counts the pages it shared with this one until it started Python: this process's peak then)
        lines.insert(1, f"numba compiled in {len(precompile.peaks)} child process(es) first (a first run): "
                        f"their peaks {', '.join(f'{p} MB' for p in precompile.peaks)}")
    if s.best_maps:
        lines += ["mappings there (resident MB, size MB, name):"] + [f"  {r:>6} {z:>6}  {n}" for r, z, n in s.best_maps]
    lines += ["every 5 s:"]
    lines += [f"  {t:>5} s {r:>6} MB  {top}" for t, r, top in s.log]
    text = "\n".join(lines) + "\n"
    sys.stderr.write(text)
    if a.log:
        with open(a.log, "w") as fh:
            fh.write(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
