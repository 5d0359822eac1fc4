"""Hub benchmark: streamed reads against a local Hub-compatible server, and the bytes a
provenance screen reads.

Writes a Llama-shaped bf16 base and a fine-tune of it (``--layers`` blocks of hidden
``--hidden``; the defaults give about 0.5 GB per model in 2 shards) plus three more
candidates, serves them from tests/hub_server.py on 127.0.0.1 (the server in this process,
every client in its own process, so the two do not share a GIL), and measures:

  * ``read``       every window of every tensor of the tuned model read through the
                   streamed reader (``locate(id, HubOptions(download=False)).windows``), no compute;
  * ``compare``    ``weightdiff compare base tuned --stream --no-rank`` end to end, and the
                   same pair from local files, for the cost of the network path;
  * ``provenance`` ``weightdiff provenance tuned --candidates 4 ids --stream --full-top 1``:
                   bytes the server sent per candidate (header + sampled rows for the three
                   screened out) against the file sizes.

For the two commands, the server's count of calls on the resolve route, of requests to the storage origin and
of connections each origin accepted (a reader resolves each file once and keeps its connections).

Reports MB/s, seconds, peak RSS (``ru_maxrss`` of the client process) and bytes.

    nice python benchmarks/bench_hub.py                     # ~0.5 GB per model
    python benchmarks/bench_hub.py --layers 2 --hidden 512  # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_READ = r"""
import json, resource, sys, time
from weightdiff.io.checkpoint import locate
from weightdiff.options import HubOptions
t0 = time.perf_counter()
n = 0
with locate(sys.argv[1], HubOptions(download=False)) as ck:
    for name in ck.tensors:
        for w in ck.windows(name, 1 << 24):
            n += w.nbytes
    reader = ck.hub_run["reader"]
    out = {"seconds": time.perf_counter() - t0, "bytes": n, "requests": reader.requests,
           "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(out))
"""


def build(root: Path, layers: int, hidden: int, inter: int, vocab: int) -> dict[str, Path]:
    """Base, a fine-tune (rank-8 updates on attention, one block retrained), a sibling, two strangers."""
    from weightdiff.io.safetensors_write import save_checkpoint, to_storage

    def model(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (vocab, hidden)).astype(np.float32)}
        for i in range(layers):
            p = f"model.layers.{i}."
            for k, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                             ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                             ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                             ("mlp.down_proj", (hidden, inter))):
                t[p + k + ".weight"] = rng.normal(0, 0.02, shape).astype(np.float32)
            t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t["lm_head.weight"] = rng.normal(0, 0.02, (vocab, hidden)).astype(np.float32)
        return t

    def tune(t: dict, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        out = dict(t)
        for k, v in t.items():
            if "self_attn" in k:
                out[k] = v + 0.01 * (rng.normal(0, 1, (v.shape[0], 8)) @ rng.normal(0, 1, (8, v.shape[1]))
                                     ).astype(np.float32) / 8
        return out

    base = model(0)
    models = {"base": base, "tuned": tune(base, 1), "sibling": tune(base, 2), "stranger": model(7),
              "stranger2": model(8)}
    paths = {}
    for name, t in models.items():
        paths[name] = save_checkpoint(root / name, {k: ("BF16", to_storage(v, "BF16")) for k, v in t.items()},
                                      shards=2)
    return paths


def client(args: list[str], env: dict, code: str | None = None) -> tuple[float, dict | None, int]:
    """Run the CLI (or a snippet) in a fresh process; (seconds, JSON it printed or None, peak RSS MiB)."""
    cmd = [sys.executable, "-c", code] + args if code else \
        [sys.executable, "-c", "from weightdiff.cli import main; main()"] + args
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"client failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        data = None
    return dt, data, 0


def _traffic(srv) -> dict:
    """What the server saw since its log was reset: calls on the Hub's resolve route, requests to the storage (the
    "CDN" origin the resolve answers redirect to), and connections each origin accepted."""
    return {"resolves": sum(1 for _, p in srv.requests if "/resolve/" in p), "storage_requests": len(srv.cdn_log),
            "connections": dict(srv.connections)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sample-kib", type=int, default=1024)
    ap.add_argument("--json", dest="json_out", help="Also write the figures as JSON here.")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer

    root = Path(tempfile.mkdtemp(prefix="wd-bench-hub-"))
    srv = HubServer()
    try:
        paths = build(root / "models", a.layers, a.hidden, a.inter, a.vocab)
        sizes = {}
        for name, d in paths.items():
            files = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
            srv.commit(f"bench/{name}", files)
            sizes[name] = sum(len(v) for k, v in files.items() if k.endswith(".safetensors"))
        env = dict(os.environ, HF_ENDPOINT=srv.url, HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
                   PYTHONPATH=str(ROOT))
        env.pop("HF_TOKEN", None)
        res: dict = {"model_bytes": sizes["tuned"], "params_shape": vars(a)}

        srv.reset_log()
        dt, out, _ = client(["bench/tuned"], env, code=_READ)
        res["read"] = {**out, "MB_per_s": out["bytes"] / out["seconds"] / 1e6,
                       "server_bytes": srv.bytes_sent("bench/tuned")}

        srv.reset_log()
        dt, _, _ = client(["compare", "bench/base", "bench/tuned", "--stream", "--no-rank", "-q",
                           "--json", str(root / "stream.json")], env)
        run = json.loads((root / "stream.json").read_text())["run"]
        res["compare_stream"] = {"seconds": dt, "compare_seconds": run["seconds"],
                                 "bytes": srv.bytes_sent("bench/base") + srv.bytes_sent("bench/tuned"),
                                 "MB_per_s": (sizes["base"] + sizes["tuned"]) / dt / 1e6, **_traffic(srv)}
        dt, _, _ = client(["compare", str(paths["base"]), str(paths["tuned"]), "--no-rank", "-q",
                           "--json", str(root / "local.json")], env)
        res["compare_local"] = {"seconds": dt, "MB_per_s": (sizes["base"] + sizes["tuned"]) / dt / 1e6}
        a_, b_ = (json.loads((root / f).read_text()) for f in ("stream.json", "local.json"))
        res["same_numbers"] = a_["tensors"] == b_["tensors"] and a_["summary"] == b_["summary"]
        res["stored_bytes"] = sum(p.stat().st_size for p in (root / "hf_home").rglob("*") if p.is_file()) \
            if (root / "hf_home").exists() else 0

        srv.reset_log()
        cands = ["bench/stranger", "bench/sibling", "bench/base", "bench/stranger2"]
        dt, out, _ = client(["provenance", "bench/tuned", "--candidates", *cands, "--stream", "--full-top", "1",
                             "--sample-kib", str(a.sample_kib), "--no-permutations", "--json", "-"], env)
        res["provenance"] = {
            "seconds": dt, "leading": out["leading"], **_traffic(srv), "sample_bytes_per_checkpoint":
                out["screening"]["bytes_per_checkpoint"],
            "bytes_per_candidate": {c: srv.bytes_sent(c) for c in cands},
            "candidate_file_bytes": {c: sizes[c.split("/")[1]] for c in cands}}
    finally:
        srv.close()
        shutil.rmtree(root, ignore_errors=True)

    r = res
    print(f"model: {r['model_bytes'] / 1e6:,.0f} MB per checkpoint (bf16, 2 shards)")
    print(f"streamed read     {r['read']['MB_per_s']:8.1f} MB/s  ({r['read']['bytes'] / 1e6:,.0f} MB in "
          f"{r['read']['seconds']:.2f} s, {r['read']['requests']} range requests, peak RSS "
          f"{r['read']['rss_mb']:,.0f} MiB)")
    print(f"compare --stream  {r['compare_stream']['seconds']:8.2f} s  ({r['compare_stream']['MB_per_s']:.1f} MB/s "
          f"of both models; local files: {r['compare_local']['seconds']:.2f} s); same numbers: {r['same_numbers']}; "
          f"bytes stored under HF_HOME: {r['stored_bytes']}")
    for k in ("compare_stream", "provenance"):
        c = r[k]
        print(f"  {k}: {c['resolves']:,} resolve calls, {c['storage_requests']:,} storage requests, connections "
              f"{c['connections']}")
    p = r["provenance"]
    print(f"provenance screen {p['seconds']:8.2f} s, leading {p['leading']}, sample "
          f"{p['sample_bytes_per_checkpoint'] / 2**10:,.0f} KiB per checkpoint")
    for c, n in p["bytes_per_candidate"].items():
        print(f"  {c:18} read {n / 2**10:10,.0f} KiB of {p['candidate_file_bytes'][c] / 2**20:8,.0f} MiB")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
