"""Survey benchmark: N generated fine-tunes of one Llama-shaped base, sequential and on Dask.

    python benchmarks/bench_survey.py DATA [--size 100m] [--models 20] [--workers 1,2] [--json out.json]

Writes (once) ``DATA/base`` and ``DATA/ft00``..``ft19``: bf16 single-file checkpoints made
with ``make_pair.make_tensor`` from one seed, so every fine-tune shares the base's bytes
except where its own change lands (merged low-rank updates of varied rank, size and
blocks; some add a sparse or a dense-noise block). Then, each in its own subprocess
after the files were read once into the page cache:

* ``sequential``: ``weightdiff.survey.survey`` in one process (no Dask), all cores per comparison;
* ``sequential-blas1``: the same with one BLAS thread, as Dask's nanny starts its workers;
* ``dask-N``: the same survey on a ``LocalCluster`` of N worker processes (one thread
  each, kernels with cores / N threads, as ``--workers N`` runs it).

Reported per run: wall time of the survey (cluster start-up apart), the peak RSS of the
parent and of each worker process (``getrusage`` in each), the tasks' compute time (Dask's
task stream), and the scheduling overhead per task: the round trip of a no-op task (submit
-> result, one at a time), the time per no-op task in a batch of 500, and the worker time
not spent computing, (workers x wall - sum of task compute times) / tasks, which adds the
parent's work per model (writing its JSON and the tables) and the idle tail of the last tasks.
Each run's files are compared with the sequential runs': the tables with ``sequential``, every
file (tables and models/*.json) with ``sequential-blas1``. LAPACK's SVD of the larger matrices
gives other last bits with another BLAS thread count, so a model's spectrum in ``sequential``
(all cores) may differ from the Dask runs' (one BLAS thread) in its last digits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_pair import SIZES, layout, make_tensor  # noqa: E402

from weightdiff.io.safetensors_write import save_file  # noqa: E402


def variants(n: int, layers: int) -> list[SimpleNamespace]:
    """n fine-tune recipes, deterministic and varied (two of them much deeper: outliers)."""
    out = []
    for k in range(n):
        lo = k % layers
        blocks = set(range(lo, min(layers, lo + 1 + k % 4)))
        v = SimpleNamespace(seed=0, cast=False, lora_modules=("q_proj", "v_proj") if k % 3 else
                            ("q_proj", "k_proj", "v_proj", "o_proj"),
                            lora_rank=(4, 8, 16, 32)[k % 4], lora_rel=0.004 * (1 + k % 5),
                            lora_blocks=blocks, sparse_blocks=set(), sparse_frac=0.01, noise_blocks=set(),
                            noise_rel=0.01)
        if k % 7 == 3:
            v.sparse_blocks = {(lo + 5) % layers}
        if k in (11, 17):            # the deep ones: a fully retrained (noised) block
            v.noise_blocks = {(lo + 3) % layers}
            v.noise_rel = 0.2
        out.append(v)
    return out


def generate(data: Path, size: str, n: int) -> None:
    items = layout(size)
    layers = SIZES[size][2]
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for k, args in enumerate(variants(n, layers)):
        target = data / f"ft{k:02d}" / "model.safetensors"
        if target.exists():
            continue
        base, tuned = {}, {}
        for i, (name, shape, block) in enumerate(items):
            b, t, tr = make_tensor(args, i, name, shape, block)
            base[name], tuned[name] = (tr["dtype_base"], b), (tr["dtype_tuned"], t)
        if not (data / "base" / "model.safetensors").exists():
            (data / "base").mkdir(exist_ok=True)
            save_file(data / "base" / "model.safetensors", base, {"format": "pt"})
        target.parent.mkdir(exist_ok=True)
        save_file(target, tuned, {"format": "pt"})
        print(f"ft{k:02d} written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def _noop(x):
    return x


def _maxrss_mb() -> float:
    """Peak RSS of this process: VmHWM (reset at exec, unlike ru_maxrss, which a subprocess
    inherits from the process that forked it), or getrusage where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(data: Path, workers: int, out: Path) -> dict:
    """One survey in this process (workers = 0) or on a fresh LocalCluster of ``workers`` processes."""
    from weightdiff.options import CompareOptions
    from weightdiff.survey import survey

    tuned = sorted(p for p in data.iterdir() if p.name.startswith("ft"))
    cores = os.cpu_count() or 1
    if workers == 0:
        t0 = time.perf_counter()
        res = survey(data / "base", tuned, out, options=CompareOptions(threads=cores))
        wall = time.perf_counter() - t0
        return {"mode": "sequential", "wall_s": wall, "tasks": len(tuned), "failed": res.failed,
                "parent_rss_mb": _maxrss_mb()}
    from distributed import Client, LocalCluster, get_task_stream

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=40)
    client = Client(cluster, set_as_default=False)
    startup = time.perf_counter() - t0
    try:
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            res = survey(data / "base", tuned, out, client=client,
                         options=CompareOptions(threads=max(1, cores // workers)))
            wall = time.perf_counter() - t0
        compute = sum(s["stop"] - s["start"] for t in ts.data for s in t.get("startstops", [])
                      if s.get("action") == "compute")
        rss = client.run(_maxrss_mb)
        t0 = time.perf_counter()
        for i in range(50):
            client.submit(_noop, i, pure=False).result()
        roundtrip = (time.perf_counter() - t0) / 50
        t0 = time.perf_counter()
        client.gather(client.map(_noop, range(500), pure=False))
        throughput = (time.perf_counter() - t0) / 500
    finally:
        client.close()
        cluster.close()
    return {"mode": f"dask-{workers}", "wall_s": wall, "cluster_start_s": startup, "tasks": len(tuned),
            "failed": res.failed, "task_compute_s": compute, "parent_rss_mb": _maxrss_mb(),
            "worker_rss_mb": sorted(rss.values()), "noop_roundtrip_ms": roundtrip * 1e3,
            "noop_batch_ms_per_task": throughput * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--size", choices=sorted(SIZES), default="100m")
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)     # internal: one run, JSON on stdout
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    data = Path(args.data)
    if args.one is not None:
        print(json.dumps(run_one(data, args.one, Path(args.out))))
        return 0
    generate(data, args.size, args.models)
    for p in sorted(data.rglob("*.safetensors")):      # into the page cache: every run reads warm files
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    results = []
    trees: dict[str, dict[str, bytes]] = {}
    # Dask's nanny starts workers with one BLAS thread (distributed.nanny.pre-spawn-environ); the
    # second sequential run does the same, so the comparison of the two modes is like for like
    blas1 = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    runs = [(0, "", {}), (0, "-blas1", blas1)] + [(int(x), "", {}) for x in args.workers.split(",") if x]
    for w, tag, env in runs:
        out = data / f"survey-{w}{tag}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, str(data), "--one", str(w), "--out", str(out)],
                              capture_output=True, text=True, check=True, env={**os.environ, **env})
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["mode"] += tag
        trees[r["mode"]] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                            if p.is_file()}
        # the tables, and every file (tables and each model's JSON): the exact SVD's last bits depend on
        # the BLAS thread count, so the like-for-like reference of a Dask run is sequential-blas1
        r["same_tables_as_sequential"] = trees[r["mode"]]["survey.csv"] == trees["sequential"]["survey.csv"]
        if "sequential-blas1" in trees:
            r["same_files_as_sequential_blas1"] = trees[r["mode"]] == trees["sequential-blas1"]
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    for r in results:
        if not r["mode"].startswith("dask-"):
            continue
        n = int(r["mode"].split("-")[1])
        r["idle_ms_per_task"] = (n * r["wall_s"] - r["task_compute_s"]) / r["tasks"] * 1e3
    params = sum(int(np.prod(s)) for _, s, _ in layout(args.size))
    report = {"size": args.size, "params": params, "models": args.models, "cores": os.cpu_count(),
              "results": results}
    text = json.dumps(report, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
