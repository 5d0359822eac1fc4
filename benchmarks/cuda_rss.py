"""Where the CUDA path's whole-process memory goes: ``peak_stack.py --maps`` on a weightdiff command with the
CUDA stream's pipeline depth and window size set in this process (a measurement knob, not an option).

    python benchmarks/cuda_rss.py [--depth 3] [--window 16777216] --log F -- compare base/ tuned/ --device cuda ...

Also prints the resident set broken into anonymous, file-backed and shared (pinned) memory at the end, and
whether numba was imported (the CUDA path should not need its compiler).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--log", required=True)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    from weightdiff.kernels import cuda
    from weightdiff.measure import compute

    if a.depth is not None:
        d = list(cuda.stream_delta_stats.__defaults__)
        d[1] = a.depth
        cuda.stream_delta_stats.__defaults__ = tuple(d)
    if a.window is not None:
        compute.WINDOW_ELEMENTS = a.window
    import peak_stack

    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    rc = peak_stack.main(["--maps", "--log", a.log, "--", *args])
    with open("/proc/self/status") as fh:
        keys = ("VmHWM", "RssAnon", "RssFile", "RssShmem")
        st = {ln.split(":")[0]: ln.split()[1] for ln in fh if ln.startswith(keys)}
    line = (f"depth {a.depth} window {a.window}: VmHWM {int(st['VmHWM']) >> 10} MB; at the end anon "
            f"{int(st['RssAnon']) >> 10} file {int(st['RssFile']) >> 10} shmem {int(st['RssShmem']) >> 10} MB; "
            f"numba imported: {'numba' in sys.modules}; llvmlite: {'llvmlite.binding' in sys.modules}")
    print(line)
    with open(a.log, "a") as fh:
        fh.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
