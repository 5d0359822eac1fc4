"""Per-tensor overhead: a `weightdiff compare` of two checkpoints with many one-byte tensors.

    nice python benchmarks/bench_many.py [--tensors 100000] [--dir /tmp/wd-many]

Writes two safetensors files of N one-element U8 (or ``--dtype``) tensors named like a mixture-of-experts model
(``model.layers.L.experts.E.w``; a third of them differ), then runs ``weightdiff compare A B
--json out.json`` in a fresh subprocess and reports wall time, peak RSS and the cost per tensor,
and the same for ``--no-rank`` and for the header alone (``weightdiff inspect``), each also as a
multiple of a fixed pure-Python calibration loop timed in the same run (the machine's Python speed).
The goal of issue 15 is 100,000 tensors in at most 5 s and 400 MB.

``--dtype F8_E4M3``: DeepSeek-V3's layout instead, "twice that with their scale tensors": N/2 block-scaled FP8
16 x 16 expert matrices and their N/2 ``weight_scale_inv`` tensors per side (folders ``a/`` and ``b/`` with the
``quantization_config`` of a ``config.json``; a third of the matrices trained by a dense 2e-3 update), so each
matrix is dequantized, tested against its quantization floor and ranked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from weightdiff.cli import main
try:
    main({argv!r}, standalone_mode=False)
except SystemExit:
    pass
print("BENCH " + json.dumps({{"seconds": time.perf_counter() - t0,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}), file=sys.stderr)
"""


def make(folder: Path, n: int, dtype: str = "U8") -> None:
    import numpy as np

    from weightdiff.io.safetensors_write import save_file, to_storage

    folder.mkdir(parents=True, exist_ok=True)
    if dtype == "F8_E4M3":
        _make_fp8(folder, n)
        return
    for side in ("a", "b"):
        if dtype == "U8":
            t = {f"model.layers.{i // 100}.experts.{i % 100}.w":
                 ("U8", np.array([i % 7 if side == "a" or i % 3 else 9], np.uint8)) for i in range(n)}
        else:      # float tensors: each has its own cast-rounding floor
            t = {f"model.layers.{i // 100}.experts.{i % 100}.w":
                 (dtype, to_storage(np.array([(i % 7 + 1) * 0.01 * (1 if side == "a" or i % 3 else 1.5)]), dtype))
                 for i in range(n)}
        save_file(folder / f"{side}.safetensors", t, {"format": "pt"})


def _make_fp8(folder: Path, n: int) -> None:
    import numpy as np

    from weightdiff.io.safetensors_write import save_file, to_storage

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (n // 2, 16, 16))
    update = 0.002 * rng.standard_normal((n // 2, 16, 16))
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}}
    for side in ("a", "b"):
        x = w.copy()
        if side == "b":
            x[::3] += update[::3]
        scale = np.abs(x).max(axis=(1, 2)) / 448.0
        codes = to_storage((x / scale[:, None, None]).reshape(-1), "F8_E4M3").reshape(x.shape)
        t = {}
        for i in range(n // 2):
            name = f"model.layers.{i // 100}.mlp.experts.{i % 100}.gate_proj."
            t[name + "weight"] = ("F8_E4M3", codes[i])
            t[name + "weight_scale_inv"] = ("F32", np.array([[scale[i]]], np.float32))
        (folder / side).mkdir(exist_ok=True)
        save_file(folder / side / "model.safetensors", t, {"format": "pt"})
        (folder / side / "config.json").write_text(json.dumps(config))


#: a fixed pure-Python workload (a record-like object and a dict lookup per step, like the per-tensor
#: stages), timed in its own process: the machine's Python speed in the same run, so the per-tensor
#: figures can be compared across machines and hours (this 2-vCPU machine varied by 2x within hours)
CALIBRATE = r"""
import json, sys, time
class R:
    __slots__ = ("name", "shape", "status")
    def __init__(self, name, shape, status):
        self.name, self.shape, self.status = name, shape, status
t0 = time.perf_counter()
seen = {}
for i in range(1_000_000):
    r = R(f"model.layers.{i // 100}.w", (i % 7,), "changed" if i % 3 else "unchanged")
    seen[r.name] = seen.get(r.name, 0) + len(r.shape)
print("BENCH " + json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": 0}), file=sys.stderr)
"""


#: the children's environment: weightdiff's modules read from bytecode, as an installed package's are (pip compiles
#: them). A machine that sets PYTHONDONTWRITEBYTECODE (this project's does) compiled every module from source in
#: every child, 0.2-0.3 s of the 100,000-tensor run that no installed copy pays; the bytecode goes to a folder of
#: the benchmark's own (``--dir``/pycache), written by a first, untimed import
ENV: dict[str, str] = {}


def bytecode_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    subprocess.run([sys.executable, "-c", "import weightdiff.cli, weightdiff.comparison, weightdiff.inspect"],
                   env=env, check=True)
    return env


def run(argv: list[str] | None, code: str | None = None) -> dict:
    p = subprocess.run([sys.executable, "-c", code or CHILD.format(argv=argv)], capture_output=True, text=True,
                       env=ENV or None)
    line = [x for x in p.stderr.splitlines() if x.startswith("BENCH ")]
    if not line:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(line[-1][6:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wd-many"))
    ap.add_argument("--dtype", default="U8", help="U8 (default), a float dtype such as BF16, or F8_E4M3 (block-scaled "
                    "FP8 matrices and their scale tensors, as DeepSeek-V3 stores them)")
    args = ap.parse_args()
    # in a child: a parent holding the 100,000 arrays would lend its RSS to every child's
    # ru_maxrss (Linux keeps the pre-exec high-water mark of a forked process)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import bench_many; bench_many.make(__import__('pathlib').Path({str(args.dir)!r}), "
                    f"{args.tensors}, {args.dtype!r})"], check=True)
    a, b = (str(args.dir / x) for x in (("a", "b") if args.dtype == "F8_E4M3" else ("a.safetensors", "b.safetensors")))
    ENV.update(bytecode_env(args.dir))
    rows = [("compare --json", run(["compare", a, b, "-q", "--json", str(args.dir / "out.json")])),
            ("compare --no-rank --json", run(["compare", a, b, "-q", "--no-rank", "--json", str(args.dir / "o2.json")])),
            ("inspect (header, plan only)", run(["inspect", b])),
            ("start-up (--help)", run(["--help"]))]
    cal = run(None, CALIBRATE)["seconds"]
    print(f"{args.tensors:,} {args.dtype} tensors per side; Python speed: the calibration loop (1M steps) "
          f"took {cal:.2f} s; the last column divides by it")
    print("| run | wall | peak RSS | per tensor | wall / calibration |\n| --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(f"| {label} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB | "
              f"{r['seconds'] / args.tensors * 1e6:.0f} us | {r['seconds'] / cal:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
