"""Benchmark of the rank pass: per-shape cost of randomized vs exact spectra, and a whole 1.1B pair.

Two parts, both on matrices generated in memory (nothing is written to disk):

* ``shapes``: for 4096 x 4096, 4096 x 14336 and 14336 x 4096 float32 deltas (a rank-64
  decaying part plus dense Gaussian noise), the time of the randomized top-k
  (``kernels.spectral.randomized_svd``) against exact singular values (float64 Gram
  eigenvalues; LAPACK ``svd`` too on the square shape with ``--lapack``) and the relative
  error of the top-k energy.
* ``model``: every matrix of a TinyLlama-1.1B-shaped bf16 pair (22 layers of q, k, v, o,
  gate, up, down; embeddings and LM head: 156 matrices, 1.1B parameters), base ~ N(0, 0.02),
  tuned = base + a rank-16 update (1% of the norm) + dense noise (0.5%), merged and saved
  in bf16. Times ``weightdiff.measure.rank.analyze_delta`` (decode, noise floor, spectrum, record)
  per matrix at the default ``exact_max`` and the numba stats pass beside it; the cost at
  another ``exact_max`` is estimated from one matrix per shape.

Run (figures in docs/rank.md): ``nice .venv/bin/python benchmarks/bench_rank.py``;
``--quick`` for a small smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

from weightdiff.measure import rank
from weightdiff.kernels import spectral
from weightdiff.io.safetensors_write import to_storage


def _delta(rng, m: int, n: int, dense_share: float) -> np.ndarray:
    """float32 m x n: rank-64 part (singular values decaying 1 -> 0.05) plus Gaussian noise
    holding ``dense_share`` of the energy."""
    u = rng.standard_normal((m, 64), dtype=np.float32) * np.geomspace(1, 0.05, 64).astype(np.float32)
    d = u @ rng.standard_normal((64, n), dtype=np.float32)
    low = float(np.linalg.norm(d))
    noise = rng.standard_normal((m, n), dtype=np.float32)
    noise *= low * math.sqrt(dense_share / (1 - dense_share)) / float(np.linalg.norm(noise))
    d += noise
    return d


def _clock(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def bench_shapes(shapes, k: int, lapack: bool, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for m, n in shapes:
        for label, share in (("low-rank+noise", 0.02), ("dense", 0.7)):
            d = _delta(rng, m, n, share)
            (u, top, vt), t_rand = _clock(spectral.randomized_svd, d, k, seed=seed, vectors=True)
            full, t_gram = _clock(spectral.svdvals_gram, d)
            total = float(np.sum(full ** 2))
            # the certified caps of the energy ranks' lower ends: one more float64 pass (A^T (A V))
            caps, t_caps = _clock(spectral.randomized_caps, d, u if m < n else vt.T, total)
            got = spectral.partial_spectrum_fields(top, total, min(m, n), 0.0, caps=caps)
            truth = spectral.spectrum_fields(full, 0.0)
            e_exact = float(np.sum(full[:k] ** 2))
            row = {"shape": f"{m}x{n}", "delta": label, "k": k, "randomized_s": t_rand, "caps_s": t_caps,
                   "gram_s": t_gram, "speedup_vs_gram": t_gram / (t_rand + t_caps),
                   "energy_captured_exact": e_exact / total,
                   "energy_rel_err": 1 - float(np.sum(top ** 2)) / e_exact,
                   "energy_rank_99": truth["energy_rank_99"],
                   "energy_rank_99_bracket": got["bounds"].get("energy_rank_99", [got["energy_rank_99"]] * 2)}
            if lapack and m == n and label == "low-rank+noise":
                _, t_svd = _clock(spectral.svdvals_exact, d)
                row["lapack_s"], row["speedup_vs_lapack"] = t_svd, t_svd / t_rand
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del d
    return rows


def tinyllama_shapes(layers: int = 22, hidden: int = 2048, inter: int = 5632, kv: int = 256,
                     vocab: int = 32000) -> list[tuple[str, tuple[int, int]]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    return out + [("lm_head.weight", (vocab, hidden))]


def _pair(rng, m: int, n: int):
    w = rng.standard_normal((m, n), dtype=np.float32)
    w *= 0.02
    base = to_storage(w, "BF16")
    wb = (base.astype(np.uint32) << 16).view(np.float32).reshape(m, n)
    norm = float(np.linalg.norm(wb))
    u = rng.standard_normal((m, 16), dtype=np.float32)
    upd = u @ rng.standard_normal((16, n), dtype=np.float32)
    upd *= 0.01 * norm / float(np.linalg.norm(upd))
    noise = rng.standard_normal((m, n), dtype=np.float32)
    noise *= 0.005 * norm / float(np.linalg.norm(noise))
    upd += noise
    upd += wb
    tuned = to_storage(upd, "BF16")
    return base, tuned


def bench_model(shapes, k: int, exact_max: int, compare_exact_max: int | None, seed: int) -> dict:
    from weightdiff.kernels import cpu

    rng = np.random.default_rng(seed)
    per_shape: dict = defaultdict(lambda: {"count": 0, "rank_s": 0.0, "method": None})
    t_rank = t_stats = t_gen = 0.0
    other: dict = {}
    params = 0
    for name, (m, n) in shapes:
        (base, tuned), dt = _clock(_pair, rng, m, n)
        t_gen += dt
        stats, dt = _clock(cpu.delta_stats, base, tuned, "BF16", "BF16")
        t_stats += dt
        nd2 = float(stats[3])
        rec, dt = _clock(rank.analyze_delta, base, tuned, "BF16", "BF16", (m, n), nd2, k=k, seed=seed,
                         exact_max=exact_max)
        t_rank += dt
        params += m * n
        s = per_shape[f"{m}x{n}"]
        s["count"] += 1
        s["rank_s"] += dt
        s["method"] = rec.method
        s.setdefault("numerical_rank", rec.numerical_rank)
        s.setdefault("energy_captured", rec.energy_captured)
        if compare_exact_max is not None and f"{m}x{n}" not in other:
            rec2, dt2 = _clock(rank.analyze_delta, base, tuned, "BF16", "BF16", (m, n), nd2, k=k, seed=seed,
                               exact_max=compare_exact_max)
            other[f"{m}x{n}"] = {"seconds_each": dt2, "method": rec2.method,
                                 "energy_rank_99": rec2.energy_rank_99, "numerical_rank": rec2.numerical_rank}
        del base, tuned
    out = {"matrices": len(shapes), "params": params, "k": k, "exact_max": exact_max,
           "rank_pass_s": t_rank, "stats_pass_s": t_stats, "generation_s": t_gen,
           "per_shape": {key: dict(v) for key, v in per_shape.items()}}
    if other:
        est = sum(other[key]["seconds_each"] * v["count"] for key, v in per_shape.items())
        out["estimate_at_exact_max"] = {"exact_max": compare_exact_max, "rank_pass_s_estimated": est,
                                        "per_shape": other}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and a 2-layer model")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--exact-max", type=int, default=rank.DEFAULT_EXACT_MAX)
    ap.add_argument("--compare-exact-max", type=int, default=2048)
    ap.add_argument("--lapack", action="store_true", help="also time LAPACK svd on the square shape")
    ap.add_argument("--skip", choices=("shapes", "model"), default=None)
    ap.add_argument("--shape", action="append", default=None, metavar="MxN", help="shapes to time (repeatable)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shapes = [(512, 512), (512, 1792), (1792, 512)] if a.quick else [(4096, 4096), (4096, 14336), (14336, 4096)]
    if a.shape:
        shapes = [tuple(int(v) for v in x.lower().split("x")) for x in a.shape]
    model = (tinyllama_shapes(layers=2, hidden=512, inter=1408, kv=64, vocab=4000) if a.quick
             else tinyllama_shapes())
    result = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if a.skip != "shapes":
        result["shapes"] = bench_shapes(shapes, a.k, a.lapack, a.seed)
    if a.skip != "model":
        result["model"] = bench_model(model, a.k, a.exact_max, a.compare_exact_max, a.seed)
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
