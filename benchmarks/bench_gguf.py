"""Time reading GGUF Q8_0 and Q4_K files against their bf16 safetensors base.

    nice python benchmarks/bench_gguf.py DIR [--size 1b] [--threads 1] [--json FILE]

Writes, unless already there: ``DIR/base`` (a Llama-shaped bf16 checkpoint with make_pair.py's
shapes and per-tensor seeds, sharded safetensors), then ``DIR/base-Q8_0.gguf`` and
``DIR/base-Q4_K.gguf``: the base converted the way llama.cpp's convert_hf_to_gguf.py does
(llama.cpp names, ``LlamaModel.permute`` on Q/K, norms and 1-D tensors in F32, the rest
quantized). Q8_0 comes from ``gguf.quants.quantize``; gguf-py cannot quantize K-quants, so
Q4_K comes from ``q4_k_quantize`` below, a plain round-to-nearest Q4_K encoder (llama.cpp's
``quantize_row_q4_K`` searches its scales; the file format and the dequantization are the
same). Tensors are converted one at a time and written with ``GGUFWriter``'s streaming calls.

Then, for each GGUF, each part in its own subprocess (peak RSS is its own) after the files
were read once into the page cache:

1. ``dequant``: every tensor of the GGUF streamed through ``Checkpoint.windows`` (16M-element
   windows, dequantized to float32) and nothing else;
2. ``pass``: the stats pass of ``compare``: every pair from ``plan`` streamed base and GGUF side
   by side through ``kernels.cpu.delta_stats``;
3. ``compare``: ``weightdiff.compare(base, gguf, rank=False)``, the whole library call;

and once ``pass`` of the base against itself (bf16 vs bf16), the reference under the same load.

GB/s count the stored bytes of both checkpoints (bf16 base + GGUF file); "elements/s" the
parameters of one side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QTYPES = ("Q8_0", "Q4_K")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- inputs ------------------------------------------------------------------------

def make_base(out: Path, size: str, seed: int = 0, shard_mb: int = 500) -> None:
    """The base side of make_pair.py (same shapes, seeds and bf16 values), shard by shard."""
    sys.path.insert(0, str(HERE))
    from make_pair import layout, make_tensor

    from weightdiff.fsutil import atomic_writer
    from weightdiff.io.safetensors_write import save_file, shard_groups

    args = argparse.Namespace(seed=seed, cast=False, lora_blocks=set(), lora_modules=(), sparse_blocks=set(),
                              noise_blocks=set())
    items = layout(size)
    groups = shard_groups([2 * int(np.prod(s)) for _, s, _ in items], shard_mb << 20)
    out.mkdir(parents=True, exist_ok=True)
    wmap, total = {}, 0
    for k, g in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for i in g:
            name, shape, block = items[i]
            raw, _, truth = make_tensor(args, i, name, shape, block)
            shard[name] = (truth["dtype_base"], raw)
            wmap[name] = fname
            total += raw.nbytes
        save_file(out / fname, shard, {"format": "pt"})
        print(f"base shard {k}/{len(groups)}", file=sys.stderr)
    with atomic_writer(out / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, fh)


def q4_k_quantize(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q4_K of float32 rows whose length is a multiple of 256 -> raw bytes.

    Per 256-element super-block: 8 sub-blocks of 32 with x ~ d*sc*q - dmin*m (q in 0..15,
    sc and m 6-bit, d and dmin fp16), packed as gguf.quants.Q4_K.dequantize_blocks reads them:
    d, dmin, 12 bytes of scales/mins, then 128 bytes holding sub-blocks 2g (low nibbles) and
    2g+1 (high nibbles) of each 32-byte group g.
    """
    rows = x.shape[0]
    b = x.reshape(-1, 8, 32).astype(np.float32)
    n = b.shape[0]
    lo = np.minimum(b.min(-1), 0)
    scale = (np.maximum(b.max(-1), 0) - lo) / 15
    mn = -lo
    d16 = (scale.max(-1) / 63).astype(np.float16)
    m16 = (mn.max(-1) / 63).astype(np.float16)
    df, mf = d16.astype(np.float32)[:, None], m16.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / np.where(df > 0, df, 1)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mn / np.where(mf > 0, mf, 1)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.clip(np.rint((b + (mf * m)[..., None]) / np.where(step > 0, step, 1)), 0, 15).astype(np.uint8)
    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = m16.view(np.uint8).reshape(n, 2)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out[:, 16:] = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)
    return out.reshape(rows, -1)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(base: Path, out: Path, qname: str, size: str) -> None:
    """Convert ``base`` to a GGUF of ``qname`` tensor by tensor (memory: about one tensor)."""
    import gguf
    from gguf.quants import quantize

    sys.path.insert(0, str(HERE))
    from make_pair import SIZES

    from weightdiff.io.checkpoint import locate
    from weightdiff.kernels.dtypes import decode

    h, _, layers, kv, _ = SIZES[size]
    n_head = max(1, h // 64)
    n_kv = max(1, kv // 64)
    q = gguf.GGMLQuantizationType[qname]
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, layers)
    ck = locate(base)
    names = list(ck.tensors)
    plan = []
    for name in names:
        info = ck.tensors[name]
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        qt = gguf.GGMLQuantizationType.F32 if len(info.shape) <= 1 or new.endswith("_norm.weight") else q
        for fallback in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16):
            if info.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:   # rows that are not whole blocks
                qt = fallback
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        nbytes = info.numel // bs * ts
        plan.append((name, new, qt, info, nbytes))
    w = gguf.GGUFWriter(str(out) + ".part", "llama")
    w.add_block_count(layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qname == "Q8_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, new, qt, info, nbytes in plan:
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor_info(new, info.shape, np.dtype(np.float32 if qt == 0 else np.float16), nbytes)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(new, (*info.shape[:-1], info.shape[-1] // bs * ts), np.dtype(np.uint8), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for name, new, qt, info, nbytes in plan:
        x = decode(ck.read(name), info.dtype).astype(np.float32).reshape(info.shape)
        if name.endswith("q_proj.weight"):
            x = _permute(x, n_head)
        elif name.endswith("k_proj.weight"):
            x = _permute(x, n_kv)
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.write_tensor_data(np.ascontiguousarray(x, dtype=np.float32 if qt == 0 else np.float16))
            continue
        _, ts = gguf.GGML_QUANT_SIZES[qt]
        data = np.empty((x.shape[0], nbytes // x.shape[0]), np.uint8)
        for r in range(0, x.shape[0], 256):           # row chunks keep the quantizer's temporaries small
            chunk = x[r:r + 256]
            data[r:r + 256] = q4_k_quantize(chunk) if qt == gguf.GGMLQuantizationType.Q4_K else quantize(chunk, qt)
        w.write_tensor_data(data)
    w.close()
    os.replace(str(out) + ".part", out)
    print(f"{out.name}: {len(plan)} tensors in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


# -- measured parts (each in its own process) --------------------------------------

def child_dequant(args) -> dict:
    from weightdiff.io.checkpoint import locate

    t0 = time.perf_counter()
    ck = locate(args.gguf)
    n = 0
    for name in ck.tensors:
        for w in ck.windows(name):
            n += w.size
    return {"pass_s": time.perf_counter() - t0, "elements": n, "rss_mb": _rss_mb()}


def child_pass(args) -> dict:
    import numpy as np

    from weightdiff.io.checkpoint import locate
    from weightdiff.measure.compute import WINDOW_ELEMENTS
    from weightdiff.kernels import cpu
    from weightdiff.pairing.plan import plan

    cpu.set_threads(args.threads)
    for n in (8, cpu.CHUNK + 1):      # compile (or load) the kernels outside the timing: windows are read-only
        for a, b, da, db in ((np.uint16, np.float32, "BF16", "F32"), (np.uint16, np.uint16, "BF16", "BF16")):
            x, y = np.zeros(n, a), np.zeros(n, b)
            x.flags.writeable = y.flags.writeable = False
            cpu.delta_stats(x, y, da, db)
    t0 = time.perf_counter()
    base, tuned = locate(args.base), locate(args.gguf)
    pairs = [p for p in plan([base], tuned).pairs if p.kind == "paired"]
    n = 0
    for p in pairs:
        acc = None
        for wb, wt in zip(base.windows(p.base_name, WINDOW_ELEMENTS), tuned.windows(p.tuned_name, WINDOW_ELEMENTS)):
            part = cpu.delta_stats(wb, wt, p.dtype_base, p.dtype_tuned)
            acc = part if acc is None else cpu.combine(acc, part)
            n += wt.size
    return {"pass_s": time.perf_counter() - t0, "pairs": len(pairs), "elements": n, "rss_mb": _rss_mb()}


def child_compare(args) -> dict:
    import weightdiff

    t0 = time.perf_counter()
    r = weightdiff.compare(args.base, args.gguf, rank=False, threads=args.threads)
    s = r.summary
    return {"pass_s": time.perf_counter() - t0, "verdict": s.verdict, "rss_mb": _rss_mb(),
            "tensors": len(r.tensors)}


def child_make(args) -> dict:
    """Write the inputs (in a child, so that the parent's RSS, which forked children
    inherit as their starting ru_maxrss on Linux, stays small)."""
    d = Path(args.dir)
    if not (d / "base" / "model.safetensors.index.json").exists():
        make_base(d / "base", args.size)
    for qname in QTYPES:
        if not (d / f"base-{qname}.gguf").exists():
            make_gguf(d / "base", d / f"base-{qname}.gguf", qname, args.size)
    return {}


CHILDREN = {"dequant": child_dequant, "pass": child_pass, "compare": child_compare, "make": child_make}


def run_child(kind: str, args, gguf_path: Path) -> dict:
    cmd = [sys.executable, __file__, args.dir, "--child", kind, "--threads", str(args.threads),
           "--gguf", str(gguf_path), "--size", args.size]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed (its stderr is above)")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def _warm(paths: list[Path]) -> int:
    total = 0
    for f in paths:
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--size", default="1b", help="make_pair.py size: tiny, 100m, 1b, 7b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    d = Path(args.dir)
    args.base = str(d / "base")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    run_child("make", args, d)
    base_files = sorted((d / "base").glob("*.safetensors"))
    res: dict = {"size": args.size, "threads": args.threads, "results": {}}
    _warm(base_files)
    res["reference"] = run_child("pass", args, d / "base")       # bf16 vs bf16, same load
    print(f"reference bf16 pass: {json.dumps(res['reference'])}", file=sys.stderr)
    for qname in QTYPES:
        g = d / f"base-{qname}.gguf"
        nbytes = _warm(base_files + [g])
        r = {"bytes": nbytes, "gguf_bytes": g.stat().st_size}
        for kind in ("dequant", "pass", "compare"):
            r[kind] = run_child(kind, args, g)
            print(f"{qname} {kind}: {json.dumps(r[kind])}", file=sys.stderr)
        res["results"][qname] = r
    print(f"{'':12} {'part':8} {'wall s':>8} {'GB/s':>6} {'Melem/s':>8} {'peak RSS MB':>12}")
    ref = res["reference"]
    ref_bytes = 2 * sum(f.stat().st_size for f in base_files)
    print(f"{'bf16 vs bf16':12} {'pass':8} {ref['pass_s']:8.2f} {ref_bytes / ref['pass_s'] / 1e9:6.2f} "
          f"{ref['elements'] / ref['pass_s'] / 1e6:8.0f} {ref['rss_mb']:12.0f}")
    for qname, r in res["results"].items():
        for kind in ("dequant", "pass", "compare"):
            x = r[kind]
            nb = r["gguf_bytes"] if kind == "dequant" else r["bytes"]
            elems = x.get("elements") or r["dequant"]["elements"]
            print(f"{qname:12} {kind:8} {x['pass_s']:8.2f} {nb / x['pass_s'] / 1e9:6.2f} "
                  f"{elems / x['pass_s'] / 1e6:8.0f} {x['rss_mb']:12.0f}"
                  + (f"   verdict {x['verdict']}" if "verdict" in x else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
