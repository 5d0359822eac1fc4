"""The twin test's cost: two roundings of one original (each side through its own chain) against a fine-tune.

    nice python benchmarks/bench_twin.py [--rows 4096] [--cols 4096] [--matrices 4] [--dir /tmp/wd-twin]

Writes, for each route below, a base and a tuned safetensors file of ``--matrices`` float matrices drawn from one
float64 original (N(0, 0.02)), and one fine-tune pair (the same base, every value moved by a dense 1e-3 update), then
times in this process, each the best of ``--repeat`` runs:

- ``kernel``: ``kernels.cpu.twin_counts`` over one whole matrix for the pair of chains the record names, and for every
  pair of chains that explains the first ``PROBE`` elements (what ``twin_test`` counted past its probe before stop
  33), next to ``kernels.cpu.delta_stats`` over the same windows (the statistics pass every changed tensor gets: the
  baseline of the same run);
- ``compare``: ``weightdiff.compare(..., rank=False)`` of the twin pair and of the fine-tune pair of the same dtypes
  (the twin test stops a fine-tune in its first 4,096 elements, so the fine-tune pair is the cost without it).

Routes: float16 exports of a model and of its bf16 copy (F16 / F16 through BF16), a float32 model against its float16
release loaded as bf16 and saved as float32 (F32 / F32 through F16 then BF16), a bf16 release against a float16
release upcast to float32 (BF16 / F32 through F16). Each figure is also given in ns per element.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROUTES = {
    "F16 / F16 through BF16": (("F16", ()), ("F16", ("BF16",))),
    "F32 / F32 through F16, BF16": (("F32", ()), ("F32", ("F16", "BF16"))),
    "BF16 / F32 through F16": (("BF16", ()), ("F32", ("F16",))),
}


def make(folder: Path, rows: int, cols: int, matrices: int) -> dict:
    """The route's files (``folder/<i>-base.safetensors``, ``-tuned``, ``-ft``) -> {route: (base, tuned, ft)}."""
    from weightdiff.io.safetensors_write import save_file, to_storage
    from weightdiff.kernels import reference as ref

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    originals = [rng.normal(0, 0.02, rows * cols) for _ in range(matrices)]
    out = {}
    for i, (route, ((db, vb), (dt, vt))) in enumerate(ROUTES.items()):
        paths = tuple(folder / f"{i}-{side}.safetensors" for side in ("base", "tuned", "ft"))
        if not all(p.exists() for p in paths):
            for path, dtype, vias, moved in ((paths[0], db, vb, 0.0), (paths[1], dt, vt, 0.0), (paths[2], dt, (), 1e-3)):
                t = {}
                for j, x in enumerate(originals):
                    v = x * (1 + moved * np.random.default_rng(j).standard_normal(x.size)) if moved else x
                    t[f"model.layers.{j}.mlp.up_proj.weight"] = \
                        (dtype, to_storage(ref.chain_apply(v, dtype, vias).reshape(rows, cols), dtype))
                save_file(path, t, {"format": "pt"})
        out[route] = paths
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wd-twin"))
    args = ap.parse_args()

    import weightdiff
    from weightdiff.kernels import cpu
    from weightdiff.measure import recast

    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels import reference as ref

    files = make(args.dir, args.rows, args.cols, args.matrices)
    first = np.random.default_rng(0).normal(0, 0.02, args.rows * args.cols)      # the original of matrix 0
    n = args.rows * args.cols
    name = "model.layers.0.mlp.up_proj.weight"
    print(f"{args.matrices} matrices of {args.rows} x {args.cols} a side; {cpu.get_threads()} threads; "
          "best of", args.repeat)
    print("| route | stats kernel | twin, named pair | twin, pairs alive past the probe | compare twin | "
          "compare fine-tune | twin / fine-tune |\n| --- | --- | --- | --- | --- | --- | --- |")
    for route, (pb, pt, pf) in files.items():
        (db, vb), (dt, vt) = ROUTES[route]
        wb, wt = to_storage(ref.chain_apply(first, db, vb), db), to_storage(ref.chain_apply(first, dt, vt), dt)
        r = weightdiff.compare(str(pb), str(pt), rank=False)
        cast = r.tensor(name).cast or {}
        if not cast.get("vias"):
            raise SystemExit(f"{route}: the matrix was not read as two roundings ({r.summary.verdict}, {cast})")
        key = (tuple(cast["vias"]["base"]), tuple(cast["vias"]["tuned"]))
        keys = recast.twin_chains(db, dt)
        head = cpu.twin_counts(wb[:recast.PROBE], wt[:recast.PROBE], db, dt, keys)
        alive = [k for k, row in zip(keys, head.tolist()) if row[0] == 0]
        stats = best(lambda: cpu.delta_stats(wb, wt, db, dt), args.repeat)
        one = best(lambda: cpu.twin_counts(wb, wt, db, dt, [key]), args.repeat)
        many = best(lambda: cpu.twin_counts(wb, wt, db, dt, alive), args.repeat)
        twin = best(lambda: weightdiff.compare(str(pb), str(pt), rank=False), args.repeat)
        ft = best(lambda: weightdiff.compare(str(pb), str(pf), rank=False), args.repeat)
        ns = 1e9 / n
        total = 1e9 / (n * args.matrices)
        print(f"| {route} | {stats:.2f} s ({stats * ns:.1f} ns) | {one:.2f} s ({one * ns:.1f} ns) | "
              f"{many:.2f} s, {len(alive)} pairs ({many * ns:.1f} ns) | {twin:.2f} s ({twin * total:.1f} ns) | "
              f"{ft:.2f} s ({ft * total:.1f} ns) | {twin / ft:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
