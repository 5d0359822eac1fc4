"""Peak RSS and bytes read of `weightdiff compare` when the checks after the pass run (folded norms, rescaled units).

    nice python benchmarks/bench_detectors.py DATA [--layers 2] [--runs cold] [--json out.json]

Builds in DATA a Mistral-7B-shaped pair of ``--layers`` blocks (``make_pair.py``: bf16, hidden 4096, MLP 14336,
8 KV heads; ~1.4 GB a side with two blocks) and variants of its tuned side that drive the checks which run on
the records after the streaming pass and may read matrices again:

* ``matrices``: every matrix changed (dense, relative 1e-2), the norms as the base's: the baseline, nothing
  read again;
* ``norms_too``: the same and every norm trained too, as every full fine-tune does (``folded_norms`` then tests
  each matrix that reads a changed norm: it read each again whole, in float64, before this benchmark);
* ``mlp_only``: the MLP trained, attention and norms as the base's (``rescaled_units`` tests up and down);
* ``folded``: the base with every norm's gains folded into the matrices that read it, the norms set to ones
  (a fold is there: the whole-matrix test must run, in row blocks);
* ``rotated``: the base as QuaRot leaves it: norms folded, then the residual stream rotated by an orthogonal R
  (64 random 128 x 128 blocks, then the hidden units permuted: dense enough that no matrix is near the base's);
  the Procrustes fit of d x d matrices runs and every matrix is measured again beneath R. Slow: each output
  matrix's d x d cross sums are computed several times (``--variants`` to leave it out).

Each variant is compared in a fresh subprocess (``bench_7b.child``), cold when run as root (page cache dropped
first), and the table gives wall time, peak RSS against the 1 GB bound and against the baseline, and the bytes
read from the block device against the pair's size (1.00x: each byte read once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_7b import COMPARE, child, drop_caches  # noqa: E402


def _load(folder: Path) -> dict:
    """name -> raw bf16 bits (uint16), as stored."""
    from weightdiff.io.checkpoint import locate

    ck = locate(folder)
    return {k: np.asarray(ck.read(k)).view(np.uint16).reshape(tuple(ck.tensors[k].shape)) for k in ck.tensors}


def _save(folder: Path, like: Path, tensors: dict) -> None:
    """``tensors`` (name -> uint16 bf16 bits or float32) as one safetensors file beside ``like``'s config.json."""
    from weightdiff.io.safetensors_write import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for f in like.glob("*.json"):
        if not f.name.endswith("index.json"):
            shutil.copy(f, folder / f.name)
    save_file(folder / "model.safetensors", {k: ("BF16", v) for k, v in tensors.items()})


def _bf16(x: np.ndarray) -> np.ndarray:
    from weightdiff.io.safetensors_write import to_storage

    return to_storage(np.asarray(x, np.float32), "BF16")


def _f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def build(data: Path, layers: int) -> dict[str, Path]:
    here = Path(__file__).resolve().parent
    if not (data / "base").exists():
        subprocess.run([sys.executable, str(here / "make_pair.py"), str(data), "--size", "mistral7b", "--layers",
                        str(layers), "--lora-blocks", "", "--sparse-blocks", "", "--noise-blocks",
                        f"0-{layers - 1}", "--noise-rel", "1e-2", "--shard-mb", "4000"], check=True)
    out = {"norms_too": data / "tuned"}
    todo = [v for v in VARIANTS[1:] if not (data / v / "model.safetensors").exists()]
    if not todo:
        return {**out, **{v: data / v for v in VARIANTS[1:]}}
    base, tuned = _load(data / "base"), _load(data / "tuned")
    for v in todo:
        t = {}
        for k, b in base.items():
            if v == "matrices":
                t[k] = tuned[k] if b.ndim == 2 else b
            elif v == "mlp_only":
                t[k] = tuned[k] if ".mlp." in k else b
            else:
                t[k] = b
        if v in ("folded", "rotated"):
            for i in range(layers):
                p = f"model.layers.{i}."
                for norm, kinds in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                                    ("post_attention_layernorm", ("gate_proj", "up_proj"))):
                    g = _f32(base[p + norm + ".weight"]).astype(np.float64)
                    for kind in kinds:
                        name = p + ("self_attn." if kind[0] in "qkv" else "mlp.") + kind + ".weight"
                        t[name] = _bf16(_f32(base[name]) * g[None, :])
                    t[p + norm + ".weight"] = _bf16(np.ones_like(g))
        if v == "rotated":
            _rotate(t, base)
        _save(data / v, data / "tuned", t)
        out[v] = data / v
    return {**out, **{v: data / v for v in VARIANTS[1:]}}


def _rotation(d: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """R = B[:, perm], B block-diagonal of d / 128 random 128 x 128 orthogonal blocks: orthogonal, cheap to apply."""
    rng = np.random.default_rng(seed)
    blocks = np.stack([np.linalg.qr(rng.standard_normal((128, 128)))[0] for _ in range(d // 128)])
    return blocks, rng.permutation(d)


def _times_r(w: np.ndarray, rot: tuple) -> np.ndarray:
    """w @ R for w [rows, d] (float32 in, float32 out), in row blocks."""
    blocks, perm = rot
    out = np.empty(w.shape, np.float32)
    for lo in range(0, w.shape[0], 4096):
        x = w[lo:lo + 4096].astype(np.float64).reshape(-1, len(blocks), 128)
        out[lo:lo + 4096] = np.einsum("rbi,bij->rbj", x, blocks).reshape(-1, w.shape[1])[:, perm]
    return out


def _rotate(t: dict, base: dict) -> None:
    """``t`` (norms folded already) with its residual stream rotated: readers and the embedding times R, writers
    R^T times, the final norm folded into the head."""
    d = int(base["model.embed_tokens.weight"].shape[1])
    rot = _rotation(d)
    for k in list(t):
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            t[k] = _bf16(_times_r(np.ascontiguousarray(_f32(t[k]).T), rot).T)
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                         "embed_tokens.weight")):
            t[k] = _bf16(_times_r(_f32(t[k]), rot))
    if "lm_head.weight" in t:
        g = _f32(base["model.norm.weight"])
        t["lm_head.weight"] = _bf16(_times_r(_f32(base["lm_head.weight"]) * g[None, :], rot))
        t["model.norm.weight"] = _bf16(np.ones_like(g))


VARIANTS = ("norms_too", "matrices", "mlp_only", "folded", "rotated")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--runs", default="cold", help="cold, warm or both (cold,warm)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which tuned sides, comma-separated")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    data = args.data.resolve()
    if args.build_only:
        build(data, args.layers)
        return 0
    # built in a process of its own: a child inherits its parent's resident size into ru_maxrss (the variants
    # held whole while written made every run's peak read 7 GB)
    subprocess.run([sys.executable, __file__, str(data), "--layers", str(args.layers), "--build-only"], check=True)
    variants = {"norms_too": data / "tuned", **{v: data / v for v in VARIANTS[1:]}}
    chosen = [v for v in ("matrices", "norms_too", "mlp_only", "folded", "rotated") if v in args.variants.split(",")]
    side = sum(f.stat().st_size for f in (data / "base").glob("*.safetensors"))
    report: dict = {"layers": args.layers, "base_bytes": side, "cpus": os.cpu_count(), "runs": []}
    for run in [r for r in args.runs.split(",") if r]:
        for name in chosen:
            tuned = variants[name]
            pair = side + sum(f.stat().st_size for f in tuned.glob("*.safetensors"))
            note = ""
            if run == "cold":
                note = "page cache dropped" if drop_caches() else "not root: NOT cold"
            out = data / f"out-{name}.json"
            r = child(COMPARE.format(argv=["compare", str(data / "base"), str(tuned), "--json", str(out)]))
            if r.get("rc") or not out.exists():
                raise SystemExit(f"{name}: compare exited {r.get('rc')}:\n{r['stderr_tail']}")
            s = json.loads(out.read_text())["summary"]
            row = {"run": run, "variant": name, "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                   "read_share": r["read_bytes"] / pair, "verdict": s.get("verdict"),
                   "flags": [f for f in s.get("flags", []) if f in ("folded_norms", "rescaled_units", "rotated_residual")],
                   "note": note}
            report["runs"].append(row)
    base_rss = {r["run"]: r["peak_rss_mb"] for r in report["runs"] if r["variant"] == "matrices"}
    print(f"{'run':5} {'variant':10} {'wall':>7} {'peak RSS':>9} {'/ 1 GB':>7} {'/ base':>7} {'read':>6}  verdict")
    for r in report["runs"]:
        print(f"{r['run']:5} {r['variant']:10} {r['seconds']:6.1f}s {r['peak_rss_mb']:7.0f}MB "
              f"{r['peak_rss_mb'] / 1024:6.2f}x {r['peak_rss_mb'] / base_rss.get(r['run'], r['peak_rss_mb']):6.2f}x "
              f"{r['read_share']:5.2f}x  {r['verdict']} {','.join(r['flags'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
