"""Generate a seeded Mistral-7B-shaped bf16 pair on a GPU in seconds (make_pair.py takes hours on 2 cores).

    python benchmarks/gen_pair_torch.py OUT [--size mistral7b] [--layers N] [--rel 1e-2] [--device cuda]

Writes ``OUT/base`` and ``OUT/tuned`` (sharded safetensors with an index, 2 GB shards) and
``OUT/ground_truth.json`` (params, shapes), the same layout and names as ``make_pair.py``'s
sizes. Every 2-D tensor of every layer gets a dense Gaussian update of relative size
``--rel`` (the issue-15 benchmark: "every matrix changed"); embeddings, head and norms are
written unchanged. Values come from ``torch.Generator(device).manual_seed(seed + index)``,
so a rerun on the same device type gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_pair import SIZES, layout  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="mistral7b", choices=sorted(SIZES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rel", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    items = layout(args.size, args.layers)
    shard_bytes = int(args.shard_gb * 2**30)
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(items):
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    maps: dict[str, dict[str, str]] = {"base": {}, "tuned": {}}
    totals = {"base": 0, "tuned": 0}
    t0 = time.perf_counter()
    for side in ("base", "tuned"):
        (args.out / side).mkdir(parents=True, exist_ok=True)
    for k, g in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, dict] = {"base": {}, "tuned": {}}
        for i in g:
            name, shape, block = items[i]
            gen = torch.Generator(device=args.device).manual_seed(args.seed * 1_000_003 + i)
            if len(shape) == 1:
                b = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=args.device)
            else:
                b = 0.02 * torch.randn(shape, generator=gen, device=args.device)
            b = b.to(torch.bfloat16)
            t = b
            if block is not None and len(shape) == 2:
                d = torch.randn(shape, generator=gen, device=args.device) * (args.rel * 0.02)
                t = (b.float() + d).to(torch.bfloat16)
            shard["base"][name] = b.cpu()
            shard["tuned"][name] = t.cpu()
        for side in ("base", "tuned"):
            save_file(shard[side], str(args.out / side / fname), {"format": "pt"})
            for name, x in shard[side].items():
                maps[side][name] = fname
                totals[side] += x.numel() * 2
        print(f"shard {k}/{len(groups)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for side in ("base", "tuned"):
        (args.out / side / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": totals[side]}, "weight_map": maps[side]}, indent=1))
    params = totals["base"] // 2
    (args.out / "ground_truth.json").write_text(json.dumps(
        {"size": args.size, "layers": args.layers, "seed": args.seed, "params": params, "rel": args.rel,
         "generator": "gen_pair_torch.py", "tensors": [{"name": n, "shape": list(s)} for n, s, _ in items]}))
    print(f"{args.out}: {params:,} parameters per side in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
