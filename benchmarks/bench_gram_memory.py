"""Peak memory and time of the streamed exact-rank path on one matrix of a given shape (70B widths).

    nice python benchmarks/bench_gram_memory.py 28672x8192 8192x28672 [--rel 1e-2] [--spectrum count]

For each shape, in a fresh subprocess: a bf16 base and tuned pair is made window by window
(16M elements, like weightdiff.compute; the tuned side is the base plus a dense update of relative
size ``--rel``), fed to ``weightdiff.measure.rank_stream.DeltaGram`` as the stats pass would, and the
rank record finished. Reports wall time, peak RSS (``ru_maxrss``; the two windows of raw data
are included, nothing else of the matrix is ever whole in memory), whether the wide delta was
spilled to a temporary file, and the numerical rank with its bracket. ``--spectrum count`` finishes
the record as ``compare --spectrum count`` does (two LDL^T inertia counts instead of the eigenvalues).
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from weightdiff.measure.rank_stream import DeltaGram
from weightdiff.io.safetensors_write import to_storage
m, n, rel = {m}, {n}, {rel}
W = 1 << 24
t0 = time.perf_counter()
gen = 0.0
g = DeltaGram((m, n), "BF16", "BF16", count={count})
g.activate()
rng = np.random.default_rng(0)
nd2 = 0.0
for p in range(0, m * n, W):
    k = min(W, m * n - p)
    tg = time.perf_counter()
    b = np.empty(k, np.uint16)
    t = np.empty(k, np.uint16)
    for q in range(0, k, 1 << 20):          # small pieces: the generator's temporaries stay ~20 MB
        w = rng.standard_normal(min(1 << 20, k - q), dtype=np.float32) * np.float32(0.02)
        b[q:q + w.size] = to_storage(w, "BF16")
        t[q:q + w.size] = to_storage(w + rng.standard_normal(w.size, dtype=np.float32) * np.float32(0.02 * rel), "BF16")
        d = (t[q:q + w.size].astype(np.uint32) << 16).view(np.float32).astype(np.float64) \
            - (b[q:q + w.size].astype(np.uint32) << 16).view(np.float32)
        nd2 += float(d @ d)
    del w, d
    gen += time.perf_counter() - tg
    g.feed(b, t, True)
spilled = g.spilled
fed = time.perf_counter() - t0 - gen
tf = time.perf_counter()
rec = g.finish(nd2, 1.5, 64)
print("RESULT " + json.dumps({{"shape": [m, n], "seconds": fed + time.perf_counter() - tf, "feed_seconds": fed,
      "generate_seconds": gen, "method": rec.method, "count_error_bound": rec.extra.get("count_error_bound"),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "spilled": spilled,
      "numerical_rank": rec.numerical_rank, "bounds": rec.bounds.get("numerical_rank"),
      "eig_dtype": rec.extra.get("eig_dtype", "-"), "eig_error_bound": rec.extra.get("eig_error_bound"),
      "noise_floor": rec.noise_floor, "s1": rec.spectrum[0]}}))
"""


def main() -> int:
    shapes = [a for a in sys.argv[1:] if "x" in a] or ["28672x8192", "8192x28672"]
    rel = 1e-2
    if "--rel" in sys.argv:
        rel = float(sys.argv[sys.argv.index("--rel") + 1])
    count = "--spectrum" in sys.argv and sys.argv[sys.argv.index("--spectrum") + 1] == "count"
    rows = []
    for s in shapes:
        m, n = (int(v) for v in s.split("x"))
        p = subprocess.run([sys.executable, "-c", CHILD.format(m=m, n=n, rel=rel, count=count)],
                           capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        r = json.loads(line[0][7:])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("| shape | method | wall (feed + finish) | peak RSS | wide delta | numerical rank | eigen dtype |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rank = r["numerical_rank"] if not r["bounds"] else f"{r['bounds'][0]}-{r['bounds'][1]}"
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['method']} | {r['seconds']:.0f} s ({r['feed_seconds']:.0f} + "
              f"{r['seconds'] - r['feed_seconds']:.0f}) | {r['peak_rss_mb']:.0f} MB | "
              f"{'temporary file' if r['spilled'] else 'in memory' if r['shape'][0] < r['shape'][1] else '-'} | "
              f"{rank} | {r['eig_dtype']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
