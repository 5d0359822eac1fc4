"""A whole `weightdiff compare` of a 7B-shaped pair (or any pair), cold and warm, next to a naive torch script.

    python benchmarks/make_pair.py DATA --size mistral7b --lora-blocks "" --sparse-blocks "" \\
        --noise-blocks 0-31 --noise-rel 1e-2 --shard-mb 2000        # ~29 GB, every block's matrices changed
    nice python benchmarks/bench_7b.py DATA [--runs cold,warm] [--naive-layers 2] [--json out.json] \\
        [-- extra compare flags]

Each measured run is a fresh subprocess; it reports wall time, peak RSS (``ru_maxrss``; and the peak of
each part, anonymous, file-backed and shared, sampled every 50 ms from ``/proc/self/status``) and the
bytes it read from the block device (``/proc/self/io`` ``read_bytes``: page-cache hits are not
counted, so a cold run that reads each byte once shows about the pair's size). ``cold`` drops the
page cache first when run as root (``/proc/sys/vm/drop_caches``); otherwise the run is cold only
as far as the pair is larger than the RAM, and the table says so. From the JSON the run wrote:
how many matrices have an exact ``numerical_rank``, the widest bracket, and the summary's largest
rank. With ``-- --device cuda`` it also measures what torch and the CUDA runtime hold on their own
(context, cuBLAS, cuSOLVER, the CLI imported): the part of the peak weightdiff does not choose.
``naive``: what a user would write with torch (load both tensors of every layer, norms of the
delta, ``torch.linalg.svdvals`` of each changed matrix in float32) on the first ``--naive-layers``
layers, extrapolated to the whole pair by parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, threading, time
t0 = time.perf_counter()
peaks = {{"RssAnon": 0, "RssFile": 0, "RssShmem": 0}}
stop = threading.Event()

def sample():   # the peak of each part of the resident set (ru_maxrss is their sum's peak)
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]))
        if stop.wait(0.05):
            return

threading.Thread(target=sample, daemon=True).start()
rc = 0
try:
    {body}
except SystemExit as exc:
    rc = exc.code or 0
stop.set()
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("BENCH " + json.dumps({{"seconds": time.perf_counter() - t0, "rc": rc,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "peak_parts_mb": {{k: v / 1024 for k, v in peaks.items()}},
      "read_bytes": int(io["read_bytes"])}}), file=sys.stderr)
"""

#: what torch and the CUDA runtime hold before weightdiff does anything: a context, cuBLAS and
#: cuSOLVER loaded (a matrix product and an eigen-solve), the CLI imported
RUNTIME = """import torch
    import weightdiff.cli, weightdiff.kernels.cuda
    x = torch.randn(512, 512, dtype=torch.float64, device="cuda")
    torch.linalg.eigvalsh(x @ x.T)
    torch.linalg.svdvals(x)
    torch.cuda.synchronize()"""

COMPARE = """from weightdiff.cli import main
    main({argv!r}, standalone_mode=False)"""

NAIVE = """import torch
    from safetensors import safe_open
    torch.set_num_threads(os.cpu_count())
    layers = {layers}
    files = {{}}
    for side in ("base", "tuned"):
        idx = json.load(open(os.path.join({data!r}, side, "model.safetensors.index.json")))["weight_map"]
        files[side] = idx
    names = [n for n in files["tuned"] if any(f"layers.{{i}}." in n for i in range(layers))]
    done = 0
    for name in names:
        with safe_open(os.path.join({data!r}, "base", files["base"][name]), "pt") as fb, \
             safe_open(os.path.join({data!r}, "tuned", files["tuned"][name]), "pt") as ft:
            b = fb.get_tensor(name).float(); t = ft.get_tensor(name).float()
        d = t - b
        norms = (b.norm(), t.norm(), d.norm())
        if d.ndim == 2 and bool((d != 0).any()):
            s = torch.linalg.svdvals(d)
        done += b.numel()
    print("NAIVE_PARAMS", done, file=sys.stderr)"""


def child(body: str) -> dict:
    code = CHILD.format(body=body)
    # from a neutral folder: run from the repository root, `import weightdiff` would find the source folder
    # (whose kernels live at the top, not in it) before the installed package
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    out = {}
    for line in p.stderr.splitlines():
        if line.startswith("BENCH "):
            out.update(json.loads(line[6:]))
        elif line.startswith("NAIVE_PARAMS "):
            out["params"] = int(line.split()[1])
    if not out:
        raise SystemExit(f"child failed:\n{p.stderr[-3000:]}")
    out["stderr_tail"] = p.stderr[-1500:]
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def pair_bytes(data: Path) -> int:
    return sum(f.stat().st_size for side in ("base", "tuned") for f in (data / side).glob("*.safetensors"))


def rank_summary(path: Path) -> dict:
    res = json.loads(path.read_text())
    ranked = [t for t in res["tensors"] if t.get("rank")]
    exact = [t for t in ranked if not t["rank"]["bounds"].get("numerical_rank")]
    widths = [(b[1] - b[0]) / max(b[1], 1) for t in ranked for b in [t["rank"]["bounds"].get("numerical_rank")] if b]
    methods: dict[str, int] = {}
    for t in ranked:
        methods[t["rank"]["method"]] = methods.get(t["rank"]["method"], 0) + 1
    return {"matrices_ranked": len(ranked), "numerical_rank_exact": len(exact),
            "widest_bracket_share": max(widths, default=0.0), "methods": methods,
            "max_numerical_rank": res["summary"]["form"].get("max_numerical_rank"),
            "max_numerical_rank_bounds": res["summary"]["form"].get("max_numerical_rank_bounds"),
            "verdict": res["summary"]["verdict"], "tensors": len(res["tensors"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--naive-layers", type=int, default=2, help="0: skip the torch baseline")
    ap.add_argument("--json", type=Path)
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    data = args.data.resolve()
    size = pair_bytes(data)
    gt = json.loads((data / "ground_truth.json").read_text())
    params = gt["params"]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    report: dict = {"pair": str(data), "pair_bytes": size, "params": params, "ram_bytes": ram,
                    "cpus": os.cpu_count(), "runs": {}}
    print(f"pair {size / 1e9:.1f} GB ({params:,} parameters per side), RAM {ram / 1e9:.1f} GB, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for run in [r for r in args.runs.split(",") if r]:
        note = ""
        if run == "cold":
            note = "page cache dropped" if drop_caches() else (
                "not root: cold only as far as the pair exceeds RAM" if size > ram else "not root: NOT cold")
        out = Path(f"/tmp/bench7b-{run}.json")
        argv = ["compare", str(data / "base"), str(data / "tuned"), "--json", str(out), *args.extra]
        r = child(COMPARE.format(argv=argv))
        if r.get("rc") or not out.exists():
            raise SystemExit(f"{run}: compare exited {r.get('rc')} without its JSON:\n{r['stderr_tail']}")
        r.update(note=note, read_share=r["read_bytes"] / size, load=os.getloadavg()[0], **rank_summary(out))
        report["runs"][run] = r
        print(f"{run}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB, read {r['read_bytes'] / 1e9:.1f} GB "
              f"({r['read_share']:.2f}x the pair), ranks exact {r['numerical_rank_exact']}/{r['matrices_ranked']}, "
              f"widest bracket {r['widest_bracket_share']:.1%}, max rank {r['max_numerical_rank']} "
              f"{r['max_numerical_rank_bounds'] or ''} ({note}); RSS parts {r['peak_parts_mb']}", file=sys.stderr)
    if "--device" in args.extra and args.extra[args.extra.index("--device") + 1] == "cuda":
        r = child(RUNTIME)
        report["runs"]["cuda_runtime"] = r
        print(f"torch + CUDA runtime alone (context, cuBLAS, cuSOLVER, CLI imported): peak RSS "
              f"{r['peak_rss_mb']:.0f} MB {r['peak_parts_mb']}", file=sys.stderr)
    if args.naive_layers:
        r = child(NAIVE.format(layers=args.naive_layers, data=str(data)))
        r["extrapolated_seconds"] = r["seconds"] * params / max(r["params"], 1)
        report["runs"]["naive_torch"] = r
        print(f"naive torch, {args.naive_layers} layers ({r['params']:,} params): {r['seconds']:.0f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB -> {r['extrapolated_seconds']:.0f} s for the pair", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
