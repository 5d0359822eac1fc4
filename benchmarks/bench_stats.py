"""Time weightdiff's stats pass against the naive torch baseline and the memory bandwidth.

    python benchmarks/bench_stats.py PAIR_DIR [--threads 2] [--window-mb 32] [--skip-naive]

``PAIR_DIR`` holds ``base/`` and ``tuned/`` (see make_pair.py). In one run, each part in
its own subprocess (so peak RSS is its own) and after reading both checkpoints once to
put them in the page cache:

1. ``startup``: ``python -c pass``, the interpreter start-up subtracted from process times;
2. ``bandwidth``: numpy ``sum`` over a large float64 array (best of 3), the read-bandwidth limit;
3. ``naive``: what a user would write: ``safetensors.torch.load_file`` on every shard of both
   models, then per tensor ``(t - b).float().norm()``, cosine and the unchanged fraction;
4. ``weightdiff``: ``weightdiff.io.checkpoint.locate`` on both folders, every tensor streamed in
   mmap windows through ``kernels.cpu.delta_stats`` and ``combine`` (one pass, all stats);
5. ``coldstart``: the first ``delta_stats`` call in a fresh process (import + compile) with an
   empty numba cache, then again with the cache warm.

Prints a table (GB/s over the bytes of both checkpoints, wall seconds, peak RSS) and the
ratios the issue asks for; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def child_bandwidth(args) -> dict:
    import numpy as np

    a = np.ones((args.bandwidth_mb << 20) // 8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return {"gbps": a.nbytes / best / 1e9, "bytes": a.nbytes}


def child_naive(args) -> dict:
    t_start = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base: dict = {}
    tuned: dict = {}
    for f in _shards(Path(args.pair) / "base"):
        base.update(load_file(f))
    for f in _shards(Path(args.pair) / "tuned"):
        tuned.update(load_file(f))
    t_load = time.perf_counter() - t0
    out = {}
    for name, b in base.items():
        t = tuned[name]
        bf, tf = b.float().flatten(), t.float().flatten()
        out[name] = ((t.float() - b.float()).norm().item(),
                     torch.nn.functional.cosine_similarity(bf, tf, dim=0).item(),
                     (t == b).float().mean().item())
    t_end = time.perf_counter()
    return {"pass_s": t_end - t0, "load_s": t_load, "import_s": t0 - t_start, "tensors": len(out),
            "rss_mb": _rss_mb()}


def child_weightdiff(args) -> dict:
    t_start = time.perf_counter()
    import numpy as np

    from weightdiff.io.checkpoint import locate
    from weightdiff.kernels import cpu

    cpu.set_threads(args.threads)
    t_imp = time.perf_counter()
    for n in (8, cpu.CHUNK + 1):   # load both entry points (one chunk, parallel) from the cache
        cpu.delta_stats(np.zeros(n, np.uint16), np.zeros(n, np.uint16), "BF16", "BF16")
        cpu.delta_stats(np.zeros(n, np.float32), np.zeros(n, np.uint16), "F32", "BF16")
    t0 = time.perf_counter()
    base, tuned = locate(Path(args.pair) / "base"), locate(Path(args.pair) / "tuned")
    window = (args.window_mb << 20) // 2
    nbytes = 0
    results = {}
    for name, info in base.tensors.items():
        tinfo = tuned.tensors[name]
        acc = None
        for wb, wt in zip(base.windows(name, window), tuned.windows(name, window)):
            part = cpu.delta_stats(wb, wt, info.dtype, tinfo.dtype)
            nbytes += wb.nbytes + wt.nbytes
            acc = part if acc is None else cpu.combine(acc, part)
        results[name] = cpu.finalize(acc)
    t_end = time.perf_counter()
    return {"pass_s": t_end - t0, "import_s": t_imp - t_start, "warmup_s": t0 - t_imp, "bytes": nbytes,
            "tensors": len(results), "rss_mb": _rss_mb(), "threads": cpu.get_threads()}


def child_coldstart(args) -> dict:
    t0 = time.perf_counter()
    import numpy as np

    from weightdiff.kernels import cpu

    t1 = time.perf_counter()
    cpu.delta_stats(np.zeros(8, np.uint16), np.zeros(8, np.uint16), "BF16", "BF16")
    t2 = time.perf_counter()
    cpu.delta_stats(np.zeros(cpu.CHUNK + 1, np.uint16), np.zeros(cpu.CHUNK + 1, np.uint16), "BF16", "BF16")
    return {"import_s": t1 - t0, "first_call_s": t2 - t1, "first_parallel_call_s": time.perf_counter() - t2}


CHILDREN = {"bandwidth": child_bandwidth, "naive": child_naive, "weightdiff": child_weightdiff,
            "coldstart": child_coldstart}


def run_child(kind: str, args, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, args.pair, "--child", kind, "--threads", str(args.threads),
           "--window-mb", str(args.window_mb), "--bandwidth-mb", str(args.bandwidth_mb)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def warm_page_cache(pair: Path) -> int:
    total = 0
    for side in ("base", "tuned"):
        for f in _shards(pair / side):
            with open(f, "rb") as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--window-mb", type=int, default=32, help="window per side and tensor (MB)")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    pair = Path(args.pair)
    threads_env = {"NUMBA_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    size = warm_page_cache(pair)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    startup = time.perf_counter() - t0
    res: dict = {"pair": str(pair), "bytes": size, "threads": args.threads, "startup_s": startup}
    with tempfile.TemporaryDirectory() as cache:
        env = {**threads_env, "NUMBA_CACHE_DIR": cache}
        res["cold"] = run_child("coldstart", args, env)
        res["warm"] = run_child("coldstart", args, env)
    res["bandwidth"] = run_child("bandwidth", args, threads_env)
    res["weightdiff"] = run_child("weightdiff", args, threads_env)
    if not args.skip_naive:
        res["naive"] = run_child("naive", args, threads_env)

    gb = size / 1e9
    bw = res["bandwidth"]["gbps"]
    wd = res["weightdiff"]
    rows = [("memory read (numpy sum)", None, None, bw)]
    wd_proc = wd["process_s"] - startup
    rows.append(("weightdiff stats pass", wd["pass_s"], wd["rss_mb"], gb / wd["pass_s"]))
    rows.append(("weightdiff whole process", wd_proc, wd["rss_mb"], gb / wd_proc))
    if "naive" in res:
        nv = res["naive"]
        rows.append(("naive torch (load_file + norms)", nv["pass_s"], nv["rss_mb"], gb / nv["pass_s"]))
        rows.append(("naive whole process", nv["process_s"] - startup, nv["rss_mb"],
                     gb / (nv["process_s"] - startup)))
    print(f"pair {pair}: {gb:.2f} GB (both sides), {args.threads} thread(s), "
          f"interpreter start-up {startup:.2f} s")
    print(f"{'':34} {'wall s':>8} {'peak RSS MB':>12} {'GB/s':>7}")
    for label, wall, rss, gbps in rows:
        w = f"{wall:8.2f}" if wall is not None else f"{'':8}"
        r = f"{rss:12.0f}" if rss is not None else f"{'':12}"
        print(f"{label:34} {w} {r} {gbps:7.2f}")
    for label in ("cold", "warm"):
        c = res[label]
        print(f"start-up, {'empty' if label == 'cold' else 'warm'} numba cache: import {c['import_s']:.2f} s, "
              f"first one-chunk call {c['first_call_s']:.2f} s, first parallel call {c['first_parallel_call_s']:.2f} s")
    ratios = {"pass_vs_bandwidth": (gb / wd["pass_s"]) / bw, "process_vs_bandwidth": (gb / wd_proc) / bw}
    if "naive" in res:
        nv = res["naive"]
        ratios.update(speedup_pass=nv["pass_s"] / wd["pass_s"],
                      speedup_process=(nv["process_s"] - startup) / wd_proc,
                      rss_ratio=wd["rss_mb"] / nv["rss_mb"])
    res["ratios"] = ratios
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
