"""Adapters of each kind on one 7B-shaped layer: `weightdiff compare base adapter` for LoRA, LoHa, LoKr, VeRA,
llama.cpp's LoRA GGUF, OFT, BOFT, HRA, trainable tokens, LoRA on fused MoE experts (target_parameters) and FourierFT.

    nice python benchmarks/bench_adapters.py [--dir /tmp/wd-adapters] [--r 16] [--vera-r 256] [--kinds HRA,OFT]

Writes a float32 base of one Mistral-7B layer's widest matrices (q_proj 4096 x 4096, up_proj 14336 x 4096,
down_proj 4096 x 14336; 0.5 GB) and one seeded adapter of each kind on the three, as PEFT shapes them (LoHa and
LoKr by ``peft_lycoris.expected_shapes``: LoKr's default split of 4096 is 64 x 64, so its w1 is whole and its
w2 of rank r, a delta of rank up to 64 r), then runs each comparison in a fresh process and reports wall time, peak
RSS, the time as a multiple of the LoRA run in the same invocation, and the numerical ranks found (every one exact,
from the factors: LoRA r, LoHa r^2, LoKr 64 r, VeRA r). The GGUF row is the LoRA's factors as llama.cpp's
convert_lora_to_gguf.py writes them (F32, q_proj's B rows permuted by the base config.json's 32 heads, put back in
order when read): its wall over the LoRA's is the cost of reading a GGUF adapter instead of PEFT's safetensors.
The OFT row rotates the same three matrices' inputs in blocks of 32 (PEFT's default): a dense change, measured as
the merged weights against the base's like a full fine-tune of those matrices (ranks found by the Gram/SVD path);
the BOFT row the same in blocks of 32 with one butterfly factor (as PEFT builds it on the CPU) and a scale per output.
The HRA row reflects the same inputs by r Householder reflections: a change of rank r, measured as the factor pair
W (H - I) (B from one pass over each base weight's rows), so its ranks are exact like LoRA's.
The TOKENS rows are on another base, Mistral 7B's token embedding alone (32,000 x 4,096, float32, 0.5 GB): 16 rows
trained (a TRAINABLE_TOKENS adapter), measured from the rows, then the merged table PEFT's merge gives, written out
and compared as a plain pair (`TOKENS merged`): the rows' path against the dense one on the same change.
The EXPERTS row is on a third base, one gpt-oss-20b layer's fused experts cut to 8 (gate_up_proj 2880 x 5760 and
down_proj 2880 x 2880 each, float32, 0.8 GB), and a LoRA of rank r on both (PEFT's target_parameters): 16 expert
matrices, each measured from its share of the factors against its own matrix (ranks r, exact); the 32 experts of
the real layer cost 4 times the wall, not more memory.
The FOURIERFT row puts PEFT's default 1,000 spectral coefficients on each of the three: a change of rank at most
2,000, measured exactly from its factor pair of cosines and sines (inner size 2,000, so it costs what a LoRA of
rank 2,000 costs; the places drawn with torch's randperm of out x in, as PEFT draws them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"model.layers.0.self_attn.q_proj": (4096, 4096), "model.layers.0.mlp.up_proj": (14336, 4096),
          "model.layers.0.mlp.down_proj": (4096, 14336)}
#: the child's own peak is its VmHWM: Linux carries the RSS a process had when it forked into the ru_maxrss of the
#: program it execs, so ru_maxrss read 2,083 MB for every child of this script (it had held the base it wrote)
CHILD = ("import sys\nfrom weightdiff.cli import main\ntry:\n    main(sys.argv[1:], standalone_mode=False)\n"
         "except SystemExit:\n    pass\nhwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
         "print('PEAK', hwm[0] // 1024, file=sys.stderr)")


def _adapter(folder: Path, kind: str, r: int, rng) -> None:
    import numpy as np

    from weightdiff.io.peft_lycoris import expected_shapes
    from weightdiff.io.safetensors_write import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict = {"peft_type": kind, "r": r, "target_modules": ["q_proj", "up_proj", "down_proj"]}
    t = {}
    pre = "base_model.model."
    if kind == "VERA":
        t["base_model.vera_A"] = rng.standard_normal((r, 14336)).astype(np.float32)
        t["base_model.vera_B"] = rng.standard_normal((14336, r)).astype(np.float32)
        for m, s in SHAPES.items():
            t[f"{pre}{m}.vera_lambda_b"] = (0.01 * rng.standard_normal(s[0])).astype(np.float32)
            t[f"{pre}{m}.vera_lambda_d"] = rng.standard_normal(r).astype(np.float32)
    elif kind == "BOFT":
        cfg.update(boft_block_size=r, boft_block_num=0, boft_n_butterfly_factor=1)
        for m, (o, i) in SHAPES.items():
            t[f"{pre}{m}.boft_R"] = (0.01 * rng.standard_normal((1, i // r, r, r))).astype(np.float32)
            t[f"{pre}{m}.boft_s"] = (1 + 0.01 * rng.standard_normal((o, 1))).astype(np.float32)
    elif kind == "OFT":
        cfg.update(r=0, oft_block_size=r, peft_version="0.21.2")
        for m, (o, i) in SHAPES.items():
            t[f"{pre}{m}.oft_R.weight"] = (0.01 * rng.standard_normal((i // r, r * (r - 1) // 2))).astype(np.float32)
    elif kind == "HRA":
        for m, (o, i) in SHAPES.items():
            t[f"{pre}{m}.hra_u"] = rng.standard_normal((i, r)).astype(np.float32)
    elif kind == "FOURIERFT":           # r coefficients per layer (PEFT's default n_frequency is 1000)
        cfg.update(n_frequency=r, scaling=150.0)
        for m in SHAPES:
            t[f"{pre}{m}.fourierft_spectrum"] = (1e-3 * rng.standard_normal(r)).astype(np.float32)
    elif kind == "LORA":
        cfg["lora_alpha"] = r
        for m, (o, i) in SHAPES.items():
            t[f"{pre}{m}.lora_A.weight"] = (0.01 * rng.standard_normal((r, i))).astype(np.float32)
            t[f"{pre}{m}.lora_B.weight"] = (0.01 * rng.standard_normal((o, r))).astype(np.float32)
    else:
        cfg["alpha"] = r
        for m, s in SHAPES.items():
            for role, shape in expected_shapes(kind, s, r, cfg).items():
                t[f"{pre}{m}.{role}"] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(folder / "adapter_model.safetensors", t)


#: the GGUF names of SHAPES' modules (gguf-py's TensorNameMap for llama)
GGUF_NAMES = {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight", "model.layers.0.mlp.up_proj": "blk.0.ffn_up.weight",
              "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight"}
HEADS = 32


def _gguf_adapter(path: Path, lora: Path, r: int) -> None:
    """The LoRA adapter in ``lora`` as convert_lora_to_gguf.py writes it (F32; Q's B rows permuted as
    ``LlamaModel.permute`` permutes them)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    t = load_file(str(lora / "adapter_model.safetensors"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r))
    for m, g in GGUF_NAMES.items():
        a, b = t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]
        if m.endswith("q_proj"):
            b = b.reshape(HEADS, 2, b.shape[0] // HEADS // 2, r).swapaxes(1, 2).reshape(b.shape)
        w.add_tensor(g + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(g + ".lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


EMBED = (32000, 4096)
TOKENS = 16


def _tokens(d: Path, rng) -> tuple[Path, Path, Path]:
    """A base of the embedding alone, a TRAINABLE_TOKENS adapter training ``TOKENS`` of its rows, and the merged
    table (the rows in place, as PEFT's merge writes them)."""
    import numpy as np

    from weightdiff.io.safetensors_write import save_file

    base, ad, merged = d / "embed_base", d / f"tokens{TOKENS}", d / "tokens_merged"
    for f in (base, ad, merged):
        f.mkdir(parents=True, exist_ok=True)
    w = (0.02 * rng.standard_normal(EMBED)).astype(np.float32)
    ids = rng.choice(EMBED[0], TOKENS, replace=False)
    rows = (w[ids] + 0.01 * rng.standard_normal((TOKENS, EMBED[1]))).astype(np.float32)
    save_file(base / "model.safetensors", {"model.embed_tokens.weight": w})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "TRAINABLE_TOKENS", "token_indices":
                                                        [int(i) for i in ids], "target_modules": ["embed_tokens"]}))
    save_file(ad / "adapter_model.safetensors", {"base_model.model.model.embed_tokens.trainable_tokens_delta": rows})
    w[ids] = rows
    save_file(merged / "model.safetensors", {"model.embed_tokens.weight": w})
    return base, ad, merged


#: the EXPERTS row's base: gpt-oss-20b's fused experts of one layer (hidden 2880, 2 x 2880 gate_up outputs), cut to
#: this many experts (the model has 32; each expert is measured on its own, so the peak does not grow with them)
EXPERTS, GPT_OSS = 8, 2880


def _experts(d: Path, r: int, rng) -> tuple[Path, Path]:
    """A base of one gpt-oss-20b layer's fused experts (float32 gate_up_proj [8, 2880, 5760], down_proj [8, 2880,
    2880]; config.json gpt_oss) and a LoRA on both parameters (target_parameters, as OpenAI's recipe trains them),
    the two wrappers nested as PEFT saves them."""
    import numpy as np

    from weightdiff.io.safetensors_write import save_file

    base, ad = d / "experts_base", d / f"experts{r}"
    for f in (base, ad):
        f.mkdir(parents=True, exist_ok=True)
    m, e = "model.layers.0.mlp.experts", EXPERTS
    if not (base / "model.safetensors").exists():
        save_file(base / "model.safetensors", {
            f"{m}.gate_up_proj": (0.02 * rng.standard_normal((e, GPT_OSS, 2 * GPT_OSS), np.float32)),
            f"{m}.down_proj": (0.02 * rng.standard_normal((e, GPT_OSS, GPT_OSS), np.float32))})
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                        "target_modules": [], "target_parameters":
                                                        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}))
    pre = f"base_model.model.{m}"
    save_file(ad / "adapter_model.safetensors", {      # gate_up_proj innermost (registered first), down_proj outer
        f"{pre}.base_layer.lora_A.weight": rng.standard_normal((e * r, GPT_OSS), np.float32),
        f"{pre}.base_layer.lora_B.weight": (0.01 * rng.standard_normal((2 * GPT_OSS, e * r), np.float32)),
        f"{pre}.lora_A.weight": rng.standard_normal((e * r, GPT_OSS), np.float32),
        f"{pre}.lora_B.weight": (0.01 * rng.standard_normal((GPT_OSS, e * r), np.float32))})
    return base, ad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wd-adapters"))
    ap.add_argument("--r", type=int, default=16, help="rank of the LoRA, LoHa and LoKr adapters")
    ap.add_argument("--vera-r", type=int, default=256, help="rank of the VeRA adapter (PEFT's default)")
    ap.add_argument("--oft-block", type=int, default=32, help="block size of the OFT and BOFT adapters (OFT's default)")
    ap.add_argument("--fourier-n", type=int, default=1000, help="coefficients of the FourierFT adapter (PEFT's "
                    "default n_frequency)")
    ap.add_argument("--kinds", default=None, help="comma-separated rows to run (LORA always runs, as the baseline); "
                    "default: every row")
    args = ap.parse_args()
    import numpy as np

    from weightdiff.io.safetensors_write import save_file

    rng = np.random.default_rng(0)
    base = args.dir / "base"
    if not (base / "model.safetensors").exists():
        base.mkdir(parents=True, exist_ok=True)
        save_file(base / "model.safetensors", {f"{m}.weight": (0.02 * rng.standard_normal(s)).astype(np.float32)
                                               for m, s in SHAPES.items()})
    (base / "config.json").write_text(json.dumps({"model_type": "mistral", "num_attention_heads": HEADS,
                                                  "num_key_value_heads": 8}))
    rows = []
    lora_s = None
    embed_base, tokens, merged = _tokens(args.dir, rng)
    wanted = None if args.kinds is None else {k.strip().upper() for k in args.kinds.split(",")} | {"LORA"}
    for kind, r in (("LORA", args.r), ("LOHA", args.r), ("LOKR", args.r), ("VERA", args.vera_r), ("GGUF", args.r),
                    ("OFT", args.oft_block), ("BOFT", args.oft_block), ("HRA", args.r), ("TOKENS", TOKENS),
                    ("TOKENS merged", TOKENS), ("EXPERTS", args.r), ("FOURIERFT", args.fourier_n)):
        if wanted is not None and kind.upper() not in wanted:
            continue
        folder = {"TOKENS": tokens, "TOKENS merged": merged}.get(kind, args.dir / f"{kind.lower()}{r}")
        against = embed_base if kind.startswith("TOKENS") else base
        if kind == "EXPERTS":
            against, folder = _experts(args.dir, r, rng)
        elif kind == "GGUF":
            folder.mkdir(parents=True, exist_ok=True)
            _gguf_adapter(folder / "lora.gguf", args.dir / f"lora{r}", r)
        elif not kind.startswith("TOKENS"):
            _adapter(folder, kind, r, rng)
        out = folder / "r.json"
        target = folder / "lora.gguf" if kind == "GGUF" else folder
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, "compare", str(against), str(target), "--json", str(out),
                            "-q"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = [x for x in p.stderr.splitlines() if x.startswith("PEAK ")]
        if p.returncode or not peak or not out.exists():
            raise SystemExit(p.stderr[-2000:])
        lora_s = wall if kind == "LORA" else lora_s
        ranks = [t["rank"]["numerical_rank"] for t in json.loads(out.read_text())["tensors"] if t.get("rank")]
        rows.append((kind, r, wall, int(peak[-1].split()[1]), wall / lora_s, ranks))
    print("| adapter | r | wall | peak RSS | wall / LoRA | numerical ranks (q, up, down; the embedding for TOKENS; "
          "each expert's gate_up, down for EXPERTS) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, r, wall, peak, ratio, ranks in rows:
        print(f"| {kind} | {r} | {wall:.1f} s | {peak} MB | {ratio:.2f} | {', '.join(map(str, ranks))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
