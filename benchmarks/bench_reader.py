"""Reader benchmark: stream every tensor of a multi-GB sharded bf16 checkpoint.

Writes a Llama-3.2-1B-shaped bf16 checkpoint (hidden 2048, MLP 8192, 16 layers, vocab
128,256, untied head: about 1.5 B parameters, 3 GB in 4 shards) with
``weightdiff.io.safetensors_write.save_checkpoint`` under /tmp, warms the page cache, and
reads every tensor through

  * ``weightdiff``        ``locate(dir).windows(name)`` (mapped 64 MiB windows),
  * ``weightdiff-pread``  ``SafetensorsFile(..., use_mmap=False)`` (the preadv fallback),
  * ``safe_open``         a plain ``safetensors.safe_open(framework="pt")`` loop,

each in its own process, each window or tensor consumed by the same numba sum (as the
kernels would). Reports GB/s and peak RSS (``ru_maxrss``, mapped pages included, as
``/usr/bin/time`` reports it), then deletes the checkpoint.

    nice python benchmarks/bench_reader.py                 # the full 3 GB run
    python benchmarks/bench_reader.py --layers 1 --vocab 8192   # a quick smoke run
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

METHODS = ("weightdiff", "weightdiff-pread", "safe_open")


def build(directory: Path, layers: int, hidden: int, mlp: int, vocab: int, kv: int, shards: int) -> int:
    """Write the checkpoint; tensors of one shape share one array, so memory stays ~1 shard."""
    from weightdiff.io.safetensors_write import save_checkpoint

    rng = np.random.default_rng(0)
    arrays: dict[tuple[int, int], np.ndarray] = {}

    def bits(shape: tuple[int, int]) -> tuple[str, np.ndarray]:
        if shape not in arrays:
            arrays[shape] = rng.integers(0, 0x7F80, size=shape, dtype=np.uint16)
        return ("BF16", arrays[shape])

    t: dict = {"model.embed_tokens.weight": bits((vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (mlp, hidden)), ("mlp.up_proj", (mlp, hidden)),
                            ("mlp.down_proj", (hidden, mlp))):
            t[f"{p}.{name}.weight"] = bits(shape)
        t[f"{p}.input_layernorm.weight"] = ("BF16", np.full(hidden, 0x3F80, np.uint16))
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", np.full(hidden, 0x3F80, np.uint16))
    t["model.norm.weight"] = ("BF16", np.full(hidden, 0x3F80, np.uint16))
    t["lm_head.weight"] = bits((vocab, hidden))
    save_checkpoint(directory, t, shards=shards)
    return sum(v[1].nbytes for v in t.values())


def child(method: str, directory: Path) -> dict:
    """Read every tensor once with ``method``; runs in a fresh process."""
    import numba

    @numba.njit(cache=False, nogil=True)
    def total(a):
        s = np.uint64(0)
        for i in range(a.size):
            s += a[i]
        return s

    total(np.zeros(4, np.uint16))                       # compile before the clock starts
    ro = np.zeros(4, np.uint16)
    ro.flags.writeable = False
    total(ro)
    if method == "safe_open":                           # imports stay outside the clock
        import torch
        from safetensors import safe_open
    else:
        from weightdiff.io.checkpoint import locate
        from weightdiff.io.safetensors_read import SafetensorsFile
    acc, nbytes = 0, 0
    t0 = time.perf_counter()
    if method == "weightdiff":
        with locate(directory) as ckpt:
            for name, info in ckpt.tensors.items():
                for w in ckpt.windows(name):
                    acc += int(total(w))
                nbytes += info.nbytes
    elif method == "weightdiff-pread":
        for path in sorted(directory.glob("*.safetensors")):
            with SafetensorsFile(path, use_mmap=False) as f:
                for name, info in f.tensors.items():
                    for w in f.windows(name):
                        acc += int(total(w))
                    nbytes += info.nbytes
    else:
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    a = t.view(torch.int16).numpy().view(np.uint16).reshape(-1)
                    acc += int(total(a))
                    nbytes += a.nbytes
                    del t, a
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "seconds": secs, "bytes": nbytes, "gb_s": nbytes / secs / 1e9,
            "peak_rss_mb": rss / 2**20, "checksum": acc}


def run_child(method: str, directory: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(directory)]
    timed = ["/usr/bin/time", "-f", "%M"] + cmd if os.path.exists("/usr/bin/time") else cmd
    r = subprocess.run(timed, capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if timed is not cmd:
        out["time_maxrss_mb"] = int(r.stderr.strip().splitlines()[-1]) / 1024
    return out


def warm(directory: Path) -> None:
    buf = bytearray(16 << 20)
    for p in directory.iterdir():
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per method; the best is reported")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a new folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    directory = args.dir or Path(tempfile.mkdtemp(prefix="weightdiff-bench-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        size = build(directory, args.layers, args.hidden, args.mlp, args.vocab, args.kv, args.shards)
        print(f"wrote {size / 1e9:.2f} GB in {len(list(directory.glob('*.safetensors')))} shards "
              f"to {directory} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        warm(directory)
        results = []
        for method in METHODS:
            runs = [run_child(method, directory) for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r["gb_s"])
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            results.append(best)
        assert len({r["checksum"] for r in results}) == 1, "methods read different data"
        print(f"{'method':<18}{'GB/s':>8}{'seconds':>9}{'peak RSS MB':>13}  (warm page cache, "
              f"{size / 1e9:.2f} GB bf16, best of {args.repeat})")
        for r in results:
            print(f"{r['method']:<18}{r['gb_s']:>8.2f}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}")
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
