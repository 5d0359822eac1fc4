"""Generate a synthetic Llama-shaped base/tuned checkpoint pair whose differences are known.

    python benchmarks/make_pair.py OUT --size 1b [--seed 0] [--shard-mb 500]
        [--lora-rank 8] [--lora-modules q_proj,v_proj] [--lora-blocks 0-7] [--lora-rel 0.02]
        [--sparse-blocks 8] [--sparse-frac 0.01] [--noise-blocks 9] [--noise-rel 0.01] [--cast]

writes ``OUT/base`` and ``OUT/tuned`` (Hugging Face folders: sharded bf16 safetensors with
``model.safetensors.index.json``) and ``OUT/ground_truth.json`` (per tensor: the change
applied, its rank or density, and the status weightdiff should report). Changes:

* ``lowrank``: W + s U V^T of rank ``--lora-rank`` on ``--lora-modules`` of ``--lora-blocks``,
  scaled so that ||s U V^T|| = lora_rel ||W|| (a merged LoRA);
* ``sparse``: ``--sparse-frac`` of the elements of every matrix of ``--sparse-blocks`` moved by
  half the weight scale;
* ``noise``: dense Gaussian noise of relative size ``--noise-rel`` on every tensor of ``--noise-blocks``;
* every other tensor is written with the base's exact bytes (``untouched``);
* ``--cast``: the base is stored in F32 and the tuned model in BF16, so untouched tensors
  become pure ``rounding`` (and the other changes ride on top of the cast).

Tensors are generated one at a time from per-tensor seeds and written shard by shard,
so memory stays near two shards whatever the model size. ``--size tiny`` is for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from weightdiff.fsutil import atomic_writer
from weightdiff.kernels.dtypes import decode
from weightdiff.io.safetensors_write import save_file, shard_groups, to_storage

#: (hidden, intermediate, layers, kv_dim, vocab)
SIZES = {
    "tiny": (64, 172, 4, 32, 512),
    "100m": (768, 2048, 12, 256, 32000),
    "1b": (2048, 5632, 22, 256, 32000),      # TinyLlama-1.1B shapes
    "7b": (4096, 11008, 32, 4096, 32000),    # Llama-2-7B shapes
    "mistral7b": (4096, 14336, 32, 1024, 32000),   # Mistral-7B shapes (8 KV heads)
    "70b-slice": (8192, 28672, 2, 1024, 1024),     # two Llama-2-70B layers, a token vocabulary of 1,024
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONVERT_CHUNK = 1 << 22


def layout(size: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, block index or None) in Hugging Face order (``layers`` overrides the size's count)."""
    h, inter, n_layers, kv, vocab = SIZES[size]
    layers = n_layers if layers is None else layers
    out: list[tuple[str, tuple[int, ...], int | None]] = [("model.embed_tokens.weight", (vocab, h), None)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h), i), (p + "self_attn.k_proj.weight", (kv, h), i),
                (p + "self_attn.v_proj.weight", (kv, h), i), (p + "self_attn.o_proj.weight", (h, h), i),
                (p + "mlp.gate_proj.weight", (inter, h), i), (p + "mlp.up_proj.weight", (inter, h), i),
                (p + "mlp.down_proj.weight", (h, inter), i),
                (p + "input_layernorm.weight", (h,), i), (p + "post_attention_layernorm.weight", (h,), i)]
    out += [("model.norm.weight", (h,), None), ("lm_head.weight", (vocab, h), None)]
    return out


def parse_blocks(spec: str | None) -> set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}."""
    out: set[int] = set()
    for part in (spec or "").split(","):
        if part.strip():
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _store(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage, converted in chunks so the temporaries stay small."""
    flat = x.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint16 if dtype == "BF16" else np.float32)
    for s in range(0, flat.size, CONVERT_CHUNK):
        out[s:s + CONVERT_CHUNK] = to_storage(flat[s:s + CONVERT_CHUNK], dtype)
    return out.reshape(x.shape)


def _decode32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return raw.astype(np.float32, copy=True)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def make_tensor(args, idx: int, name: str, shape: tuple[int, ...], block: int | None):
    """(base_raw, tuned_raw, truth) for one tensor."""
    rng = np.random.default_rng([args.seed, idx])
    db, dt = ("F32", "BF16") if args.cast else ("BF16", "BF16")
    if len(shape) == 1:
        base = (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    else:
        base = rng.standard_normal(shape, dtype=np.float32)
        base *= 0.02
    base_raw = _store(base, db)
    base = _decode32(base_raw, db)
    module = next((m for m in MODULES if f".{m}." in name), None)
    truth = {"name": name, "shape": list(shape), "block": block, "change": "none",
             "dtype_base": db, "dtype_tuned": dt}
    delta = None
    if block in args.lora_blocks and module in args.lora_modules and len(shape) == 2:
        m, n = shape
        r = args.lora_rank
        u = rng.standard_normal((m, r), dtype=np.float32)
        v = rng.standard_normal((n, r), dtype=np.float32)
        fro = float(np.sum((u.T @ u) * (v.T @ v))) ** 0.5      # ||U V^T||_F without forming it
        scale = args.lora_rel * float(np.linalg.norm(base)) / fro
        delta = (u * np.float32(scale)) @ v.T
        truth.update(change="lowrank", rank=r, rel=args.lora_rel)
    elif block in args.sparse_blocks and len(shape) == 2:
        k = max(1, int(args.sparse_frac * base.size))
        delta = np.zeros(shape, np.float32)
        delta.reshape(-1)[rng.choice(base.size, k, replace=False)] = 0.01 * rng.choice([-1.0, 1.0], k)
        truth.update(change="sparse", frac=k / base.size, count=k)
    elif block in args.noise_blocks:
        std = float(np.std(base)) if len(shape) == 2 else 1.0
        delta = rng.standard_normal(shape, dtype=np.float32) * np.float32(args.noise_rel * std)
        truth.update(change="noise", rel=args.noise_rel)
    if delta is None:
        tuned_raw = base_raw if db == dt else _store(base, dt)
        truth["expected_status"] = "unchanged" if db == dt else "rounding"
    else:
        tuned_raw = _store(base + delta, dt)
        same = db == dt and np.array_equal(tuned_raw, base_raw)   # a change lost to rounding
        truth["expected_status"] = "unchanged" if same else "changed"
    return base_raw, tuned_raw, truth


def generate(args) -> dict:
    out = Path(args.out)
    items = layout(args.size, args.layers)
    shard_bytes = args.shard_mb << 20
    groups = shard_groups([2 * int(np.prod(shape)) for _, shape, _ in items], shard_bytes)
    n = len(groups)
    maps: dict[str, dict[str, str]] = {"base": {}, "tuned": {}}
    totals = {"base": 0, "tuned": 0}
    truth = []
    t0 = time.perf_counter()
    for k, g in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        shard: dict[str, dict] = {"base": {}, "tuned": {}}
        for i in g:
            name, shape, block = items[i]
            b, t, tr = make_tensor(args, i, name, shape, block)
            shard["base"][name] = (tr["dtype_base"], b)
            shard["tuned"][name] = (tr["dtype_tuned"], t)
            truth.append(tr)
        for side in ("base", "tuned"):
            (out / side).mkdir(parents=True, exist_ok=True)
            save_file(out / side / fname, shard[side], {"format": "pt"})
            for name, (_, raw) in shard[side].items():
                maps[side][name] = fname
                totals[side] += raw.nbytes
        del shard
        print(f"shard {k}/{n} written ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for side in ("base", "tuned"):
        with atomic_writer(out / side / "model.safetensors.index.json", "w") as fh:
            json.dump({"metadata": {"total_size": totals[side]}, "weight_map": maps[side]}, fh, indent=2)
    params = sum(int(np.prod(s)) for _, s, _ in items)
    gt = {"size": args.size, "seed": args.seed, "params": params, "cast": args.cast,
          "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if k != "out"},
          "tensors": truth}
    with atomic_writer(out / "ground_truth.json", "w") as fh:
        json.dump(gt, fh, indent=1)
    return gt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fewer (or more) layers than the size has")
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-modules", default="q_proj,v_proj")
    ap.add_argument("--lora-blocks", default=None, help="default: the first half of the blocks")
    ap.add_argument("--lora-rel", type=float, default=0.02)
    ap.add_argument("--sparse-blocks", default=None, help="default: the block after the LoRA blocks")
    ap.add_argument("--sparse-frac", type=float, default=0.01)
    ap.add_argument("--noise-blocks", default=None, help="default: the block after that")
    ap.add_argument("--noise-rel", type=float, default=1e-2)
    ap.add_argument("--cast", action="store_true", help="base in F32, tuned in BF16")
    args = ap.parse_args(argv)
    layers = SIZES[args.size][2] if args.layers is None else args.layers
    half = max(1, layers // 2)
    args.lora_blocks = parse_blocks(args.lora_blocks) if args.lora_blocks is not None else set(range(half))
    args.sparse_blocks = parse_blocks(args.sparse_blocks) if args.sparse_blocks is not None else {half}
    args.noise_blocks = parse_blocks(args.noise_blocks) if args.noise_blocks is not None else {half + 1}
    args.lora_modules = tuple(m for m in args.lora_modules.split(",") if m)
    gt = generate(args)
    print(f"{args.out}: {gt['params']:,} parameters per side", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
