"""Peak memory and time of quantized comparisons at 70B widths (issue 15: at most 1 GB for 8192 x 28672 matrices,
whatever the rank method), next to the plain bf16 pair of the same shape in the same run.

    nice python benchmarks/bench_quant_wide.py [--shape 28672x8192] [--dir /tmp/wd-quant-wide] [--runs plain,fp8,gguf,gptq,lora]
        [--keep] [--cold-mb 1200] [--of base]

Writes one bf16 base matrix (``model.layers.0.mlp.up_proj.weight``) and a fine-tune of it (the base plus a
rank-4 update of relative size 5e-2), then each tuned side:

- ``plain``: the fine-tune in bf16 (the baseline: the streamed Gram path every float pair takes);
- ``fp8``: the fine-tune quantized to FP8 e4m3 with 128 x 128 block scales (DeepSeek-V3's and Qwen's FP8 builds:
  ``weight`` F8_E4M3 and ``weight_scale_inv``), so the pair is floor-tested and its change ranked above the
  modelled quantization noise;
- ``gguf``: the fine-tune as a GGUF Q8_0 (gguf-py's own quantizer and writer);
- ``gptq``: the fine-tune as AutoGPTQ packs it (4 bits, groups of 128, asymmetric; ``tests/quant_packers.gptq_pack``,
  a transcription of AutoGPTQ's ``QuantLinear.pack``), so the floor test is GPTQ's first-group one;
- ``gptq-comp``: the same as GPTQ quantizes it, with its error compensation (``quant_packers.gptq_quantize``,
  AutoGPTQ's lazy batches of 128 columns in float32; random calibration inputs whose columns differ in scale; about
  two minutes to build at the default shape): a third of the elements beyond half a step, so a release of the base
  is told from a fine-tune by the first-group test, as every published GPTQ build is; ``gptq3-comp`` the same at 3
  bits (32 codes in three words, AutoGPTQ's packing);
- ``lora``: a PEFT LoRA (r = 16) on the FP8 base, whose factor path reads the dequantized base weight;
- ``oft``, ``boft``, ``ia3``: PEFT adapters on the bf16 base whose change is dense (OFT's inputs rotated in blocks
  of 32; BOFT's the same with one butterfly factor and a scale per output; IA3's vector scaling the inputs), so each
  is measured merged, as ``merge_and_unload`` gives it, through the streamed Gram path of a plain pair;
- ``dora``, ``loha``, ``lokr``, ``vera``, ``hra``: PEFT adapters of r = 16 on the bf16 base measured from their
  factors (a DoRA's magnitudes; LoHa's and LoKr's Hadamard and Kronecker products; VeRA's shared projections; HRA's
  16 Householder reflections), the exact spectrum of each change; ``fourierft``: PEFT's default 1,000 spectral
  coefficients (a factor pair of cosines and sines of inner size 2,000; the places drawn with torch);
- ``embed``: a LoRA (r = 16) on a Llama-3-sized embedding (128,256 rows of the shape's second width, bf16; its own
  base) whose vocabulary the fine-tune grew by 8 rows, so PEFT saves the resized table as the module's base layer
  and the merge is that table plus the factors' product (``--shape 28672x4096``: Llama 3 8B's table);
- any name of ``tests/test_quant_checkpoint.BUILDERS`` (``awq``, ``ct-pack-int4``, ``ct-int8``, ``bnb-int8``, ...):
  the fine-tune packed by that test builder (AutoAWQ's, compressed-tensors' and bitsandbytes' layouts, transcribed
  in ``tests/quant_packers.py``); ``bnb-nf4-nested`` needs about 16 GB to build at the default shape.

``--of base`` (with its own ``--dir``): every tuned side is built from the base as released (its bf16 values) instead
of the fine-tune, so each pair is a quantized release of the base and should read "quantized only": no rank is
taken, and the floor test's rules that only such a pair reaches (the stored scales' tests) run.

Each ``weightdiff compare BASE TUNED --json`` runs in a fresh subprocess; reported: wall time, peak RSS
(``VmHWM``), the bytes it read from disk (``/proc/self/io`` ``read_bytes``, and as a multiple of the two inputs'
size), the tensor's numerical rank and whether it is exact, and wall and peak as multiples of the plain
pair's. Warm (the default) a second read of a byte is served by the page cache and not counted; ``--cold-mb N``
takes the two inputs' pages out of the page cache before each compare (the libraries' stay) and runs it in a
memory cgroup of N MB (root), so each pass over a byte is counted: a run that reads each byte once reads about 1x
its inputs. Generating the files takes about a minute and 2.2 GB of disk at the default shape.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

NAME = "model.layers.0.mlp.up_proj"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from weightdiff.cli import main
try:
    main({argv!r}, standalone_mode=False)
except SystemExit:
    pass
# VmHWM, not ru_maxrss: a child forked from the generator's 8 GB process reports that as its maxrss
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")]
io = dict(x.split(": ") for x in open("/proc/self/io").read().splitlines())   # bytes this process had read from disk
print("BENCH " + json.dumps({{"seconds": time.perf_counter() - t0,
      "peak_rss_mb": (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
      "read_mb": int(io["read_bytes"]) / 2 ** 20}}), file=sys.stderr)
"""


def make(folder: Path, m: int, n: int, runs: list[str], of_base: bool = False) -> None:
    import numpy as np

    from weightdiff.io.safetensors_write import save_file, to_storage

    rng = np.random.default_rng(0)
    w = rng.standard_normal((m, n), dtype=np.float32) * np.float32(0.02)
    for side in ("base", "plain", "fp8"):
        (folder / side).mkdir(parents=True, exist_ok=True)
    save_file(folder / "base" / "model.safetensors", {NAME + ".weight": ("BF16", to_storage(w, "BF16"))})
    d = rng.standard_normal((m, 4), dtype=np.float32) @ rng.standard_normal((4, n), dtype=np.float32)
    if not of_base:
        w += d * np.float32(0.05 * np.linalg.norm(w) / np.linalg.norm(d))
    else:                       # --of base: every tuned side is built from the base as released (its bf16 values)
        w = (to_storage(w, "BF16").astype(np.uint32) << 16).view(np.float32)
    del d
    if "plain" in runs:
        save_file(folder / "plain" / "model.safetensors", {NAME + ".weight": ("BF16", to_storage(w, "BF16"))})
    if "fp8" in runs or "lora" in runs:
        # 128 x 128 block scales as DeepSeek-V3's FP8 checkpoints store them (weight_scale_inv: value = code x scale)
        bm, bn = -(-m // 128), -(-n // 128)
        pad = np.zeros((bm * 128, bn * 128), np.float32)
        pad[:m, :n] = w
        blocks = pad.reshape(bm, 128, bn, 128)
        scale = (np.abs(blocks).max(axis=(1, 3)) / 448.0).astype(np.float32)
        scale[scale == 0] = 1.0
        codes = np.empty((m, n), np.uint8)
        for r0 in range(0, m, 4096):             # a slab at a time: the codes' temporaries stay small
            r1 = min(m, r0 + 4096)
            s = np.repeat(np.repeat(scale[r0 // 128:-(-r1 // 128)], 128, axis=0), 128, axis=1)
            s = s[r0 - (r0 // 128) * 128:r0 - (r0 // 128) * 128 + (r1 - r0), :n]
            codes[r0:r1] = to_storage((w[r0:r1] / s).reshape(-1), "F8_E4M3").reshape(r1 - r0, n)
        del pad, blocks
        save_file(folder / "fp8" / "model.safetensors", {NAME + ".weight": ("F8_E4M3", codes),
                                                         NAME + ".weight_scale_inv": ("F32", scale)})
        (folder / "fp8" / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3",
                                    "activation_scheme": "dynamic"}}))
    if "gguf" in runs:
        import gguf
        from gguf.quants import quantize

        q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
        wr = gguf.GGUFWriter(str(folder / "tuned-Q8_0.gguf"), "llama")
        wr.add_block_count(1)
        wr.add_tensor("blk.0.ffn_up.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    if "gptq" in runs:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import quant_packers

        g_idx = (np.arange(n) // 128).astype(np.int32)
        qw, qz, sc, _ = quant_packers.gptq_pack(w, g_idx, 4, True)
        _save_gptq(folder / "gptq", qw, qz, sc, g_idx)
        del qw, qz, sc, _
    for kind, bits in (("gptq-comp", 4), ("gptq3-comp", 3)):
        if kind not in runs:
            continue
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import quant_packers

        # calibration inputs whose columns differ in scale, as activations do: the Hessian GPTQ compensates through
        xr = np.random.default_rng(7)           # its own generator: the other runs' files stay the same
        x = xr.standard_normal((512, n), dtype=np.float32) * np.exp(xr.standard_normal(n)).astype(np.float32)
        qw, qz, sc, g_idx = quant_packers.gptq_quantize(w, x, bits, 128, block=128, dtype=np.float32)
        _save_gptq(folder / kind, qw, qz, sc, g_idx, bits)
        del qw, qz, sc, x
    builders = [r for r in runs if r not in ("plain", "fp8", "gguf", "gptq", "gptq-comp", "gptq3-comp", "lora", "embed")
                + ADAPTERS]
    if builders:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import test_quant_checkpoint as T

        T.LINEARS, T.OUT, T.IN = [NAME], m, n
        for kind in builders:
            stored, qc, _ = T.BUILDERS[kind]({NAME + ".weight": w})
            del _
            T._save(folder / kind, stored, qc)
            del stored
    if "lora" in runs:
        ad = folder / "lora"
        ad.mkdir(exist_ok=True)
        save_file(ad / "adapter_model.safetensors", {
            f"base_model.model.{NAME}.lora_A.weight": rng.standard_normal((16, n), dtype=np.float32) * np.float32(0.01),
            f"base_model.model.{NAME}.lora_B.weight": rng.standard_normal((m, 16), dtype=np.float32) * np.float32(0.01)})
        (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                            "target_modules": ["up_proj"]}))
    for kind in (r for r in runs if r in ADAPTERS):
        _dense_adapter(folder / kind, kind, m, n, rng)
    if "embed" in runs:
        _embedding(folder, n, rng)


def _save_gptq(folder: Path, qw, qz, sc, g_idx, bits: int = 4) -> None:
    """A GPTQ checkpoint folder (``bits``, groups of 128, asymmetric, in column order) of the one matrix."""
    from safetensors.numpy import save_file as st_save

    folder.mkdir(parents=True, exist_ok=True)
    st_save({NAME + ".qweight": qw, NAME + ".qzeros": qz, NAME + ".scales": sc, NAME + ".g_idx": g_idx},
            str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": 128, "desc_act": False,
                                "sym": False, "checkpoint_format": "gptq"}}))


#: Llama 3's vocabulary, and the rows the fine-tune of the ``embed`` run adds to it
VOCAB, ADDED = 128256, 8
EMBED = "model.embed_tokens"


def _embedding(folder: Path, n: int, rng) -> None:
    """The ``embed`` run's base (a bf16 table of VOCAB x n) and its LoRA adapter, whose saved base layer is the table
    with ADDED rows more, written a slab of rows at a time."""
    import numpy as np

    from weightdiff.io.safetensors_write import save_file, to_storage

    table = np.empty((VOCAB + ADDED, n), np.uint16)
    for r0 in range(0, VOCAB + ADDED, 8192):
        r1 = min(VOCAB + ADDED, r0 + 8192)
        table[r0:r1] = to_storage(rng.standard_normal((r1 - r0, n), dtype=np.float32) * np.float32(0.02), "BF16")
    (folder / "embed-base").mkdir(parents=True, exist_ok=True)
    save_file(folder / "embed-base" / "model.safetensors", {EMBED + ".weight": ("BF16", table[:VOCAB])})
    ad = folder / "embed"
    ad.mkdir(exist_ok=True)
    pre = f"base_model.model.{EMBED}."
    save_file(ad / "adapter_model.safetensors", {
        pre + "base_layer.weight": ("BF16", table),
        pre + "lora_embedding_A": rng.standard_normal((16, VOCAB + ADDED), dtype=np.float32) * np.float32(0.01),
        pre + "lora_embedding_B": rng.standard_normal((n, 16), dtype=np.float32) * np.float32(0.01)})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                        "target_modules": ["embed_tokens"]}))


#: the adapters measured merged on the bf16 base (a dense change each), and those measured from their factors
ADAPTERS = ("oft", "boft", "ia3", "dora", "loha", "lokr", "vera", "hra", "fourierft")


def _dense_adapter(ad: Path, kind: str, m: int, n: int, rng) -> None:
    import numpy as np

    from weightdiff.io.safetensors_write import save_file

    ad.mkdir(parents=True, exist_ok=True)
    pre, b = f"base_model.model.{NAME}.", 32
    cfg: dict = {"peft_type": kind.upper(), "target_modules": ["up_proj"]}
    if kind == "oft":
        cfg.update(r=0, oft_block_size=b, peft_version="0.21.2")
        t = {pre + "oft_R.weight": (0.01 * rng.standard_normal((n // b, b * (b - 1) // 2))).astype(np.float32)}
    elif kind == "boft":
        cfg.update(r=b, boft_block_size=b, boft_block_num=0, boft_n_butterfly_factor=1)
        t = {pre + "boft_R": (0.01 * rng.standard_normal((1, n // b, b, b))).astype(np.float32),
             pre + "boft_s": (1 + 0.01 * rng.standard_normal((m, 1))).astype(np.float32)}
    elif kind == "ia3":
        cfg.update(feedforward_modules=["up_proj"])
        t = {pre + "ia3_l": (1 + 0.1 * rng.standard_normal((1, n))).astype(np.float32)}
    elif kind == "dora":
        cfg.update(peft_type="LORA", r=16, lora_alpha=32, use_dora=True)
        t = {pre + "lora_A.weight": (0.01 * rng.standard_normal((16, n))).astype(np.float32),
             pre + "lora_B.weight": (0.01 * rng.standard_normal((m, 16))).astype(np.float32),
             pre + "lora_magnitude_vector": (0.02 * np.sqrt(n) * (1 + 0.01 * rng.standard_normal(m))).astype(np.float32)}
    elif kind == "vera":
        cfg.update(r=256)
        t = {"base_model.vera_A": rng.standard_normal((256, n)).astype(np.float32),
             "base_model.vera_B": rng.standard_normal((m, 256)).astype(np.float32),
             pre + "vera_lambda_b": (0.01 * rng.standard_normal(m)).astype(np.float32),
             pre + "vera_lambda_d": rng.standard_normal(256).astype(np.float32)}
    elif kind == "hra":
        cfg.update(r=16)
        t = {pre + "hra_u": rng.standard_normal((n, 16)).astype(np.float32)}
    elif kind == "fourierft":           # PEFT's default 1,000 coefficients: a factor pair of inner size 2,000
        cfg.update(n_frequency=1000, scaling=150.0)
        t = {pre + "fourierft_spectrum": (1e-3 * rng.standard_normal(1000)).astype(np.float32)}
    else:                               # LoHa, LoKr: the tensors PEFT builds for rank 16
        from weightdiff.io.peft_lycoris import expected_shapes

        cfg.update(r=16, alpha=16)
        t = {pre + role: (0.05 * rng.standard_normal(shape)).astype(np.float32)
             for role, shape in expected_shapes(kind.upper(), (m, n), 16, cfg).items()}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(ad / "adapter_model.safetensors", t)


def cold_group(limit_mb: int) -> str:
    """A memory cgroup of ``limit_mb`` (its page cache counts against it), made once; the path of the file a
    process joins it by. Needs root (v1 ``memory`` controller or v2 ``memory.max``)."""
    for base, limit, procs in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "cgroup.procs"),
                               ("/sys/fs/cgroup", "memory.max", "cgroup.procs")):
        group = Path(base) / "weightdiff-bench"
        try:
            if not (Path(base) / procs).exists():
                continue
            group.mkdir(exist_ok=True)
            (group / limit).write_text(str(limit_mb << 20))
            return str(group / procs)
        except OSError:
            continue
    raise SystemExit("--cold-mb needs root and a cgroup memory controller (v1 or v2) it can write")


def evict(paths: list[Path]) -> None:
    """The inputs' pages out of the page cache (``POSIX_FADV_DONTNEED``; clean pages, so they go), and nothing
    else: Python's, numpy's and numba's files stay cached, so ``read_bytes`` counts the checkpoints' bytes only
    (a dropped cache made each child read about 240 MB of libraries first)."""
    import os

    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def run(argv: list[str], group: str | None = None, inputs: list[Path] | None = None) -> dict:
    if group is not None:
        evict(inputs or [])
    join = (lambda: Path(group).write_text(str(__import__("os").getpid()))) if group else None
    p = subprocess.run([sys.executable, "-c", CHILD.format(argv=argv)], capture_output=True, text=True,
                       preexec_fn=join)
    line = [x for x in p.stderr.splitlines() if x.startswith("BENCH ")]
    if not line:
        raise SystemExit(p.stderr[-2000:])
    return {**json.loads(line[-1][6:]), "stderr": p.stderr[-2000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--dir", default="/tmp/wd-quant-wide")
    ap.add_argument("--runs", default="plain,fp8,gguf,gptq,lora")
    ap.add_argument("--keep", action="store_true", help="reuse the files of an earlier run in --dir")
    ap.add_argument("--cold-mb", type=int, default=None,
                    help="each compare cold: its inputs' pages dropped from the page cache first, and run in a "
                         "memory cgroup of this many MB (its page cache included), so a second read of a byte comes from the disk again: the "
                         "read column then counts every pass (needs root)")
    ap.add_argument("--of", choices=("tuned", "base"), default="tuned",
                    help="base: the quantized (and plain) tuned sides are the base's own weights, not a fine-tune's: "
                         "each pair is a release of the base in that format, which should read 'quantized only' "
                         "(the scale test then reads the plain side; use another --dir)")
    a = ap.parse_args()
    group = cold_group(a.cold_mb) if a.cold_mb else None
    m, n = (int(v) for v in a.shape.split("x"))
    runs = a.runs.split(",")
    folder = Path(a.dir)
    if not (a.keep and (folder / "base").exists()):
        make(folder, m, n, runs, a.of == "base")
    else:                   # the adapters need only the base's shape
        import numpy as np

        for kind in (r for r in runs if r in ADAPTERS and not (folder / r).exists()):
            _dense_adapter(folder / kind, kind, m, n, np.random.default_rng(1))
        if "embed" in runs and not (folder / "embed").exists():
            _embedding(folder, n, np.random.default_rng(1))
        # the rest need the base's fine-tune: made again from the same seed (the base rewritten with the same values)
        made = {"plain": folder / "plain" / "model.safetensors", "fp8": folder / "fp8" / "model.safetensors",
                "gguf": folder / "tuned-Q8_0.gguf"}
        missing = [r for r in runs if r not in ADAPTERS and r != "embed" and not made.get(r, folder / r).exists()]
        if missing:
            make(folder, m, n, missing, a.of == "base")
    tuned = {"plain": folder / "plain", "fp8": folder / "fp8", "gguf": folder / "tuned-Q8_0.gguf",
             "gptq": folder / "gptq", "lora": folder / "lora"}
    tuned.update({r: folder / r for r in runs if r not in tuned})
    rows = []
    for kind in runs:
        base = folder / ("fp8" if kind == "lora" else "embed-base" if kind == "embed" else "base")
        out = folder / f"{kind}.json"
        out.unlink(missing_ok=True)
        r = run(["compare", str(base), str(tuned[kind]), "--json", str(out), "--quiet"], group, [base, tuned[kind]])
        r["inputs_mb"] = sum(f.stat().st_size for p in (base, tuned[kind])
                             for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2 ** 20
        err = r.pop("stderr")
        if not out.exists():               # (the compare failed: its one line says why)
            raise SystemExit(f"{kind}: no JSON written\n{err}")
        t = json.loads(out.read_text())["tensors"][0]       # one tensor a side
        rank = t.get("rank") or {}
        r.update(kind=kind, numerical_rank=rank.get("numerical_rank"), exact=rank.get("exact"),
                 method=rank.get("method"), bounds=(rank.get("bounds") or {}).get("numerical_rank"))
        rows.append(r)
        print(json.dumps(r), flush=True)
    ref = next((r for r in rows if r["kind"] == "plain"), None)
    print(f"\n{m} x {n}, one matrix a side" + (f"; cold, in a {a.cold_mb} MB memory cgroup" if group else "; warm"))
    print("| tuned side | wall | peak RSS | wall / plain | peak / plain | read from disk (x inputs) | numerical rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rank = "-" if r["numerical_rank"] is None else (
            f"{r['numerical_rank']}" + (" (exact)" if r["exact"] else f" in {r['bounds']}") + f", {r['method']}")
        rel = (f"{r['seconds'] / ref['seconds']:.2f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "- | -")
        read = f"{r['read_mb']:,.0f} MB ({r['read_mb'] / r['inputs_mb']:.2f})"
        print(f"| {r['kind']} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB | {rel} | {read} | {rank} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
