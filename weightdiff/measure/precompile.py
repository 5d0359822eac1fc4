"""The numba kernels a comparison needs, compiled in a child process before it starts.

numba compiles a kernel the first time a process calls it with new argument types and keeps the compile's
LLVM state for the life of that process: about 100 MB for one parallel kernel (measured: a fresh process
compiling the bf16 statistics driver grows by 104 MB, one loading the same kernel from numba's cache by 48 MB;
a stats pass over a 1.1B bf16 pair peaks at 344 MB on a first run and 227 MB after). A first run after
installing or upgrading compiles what it meets, so it could pass the 1 GB a 70B-width comparison otherwise
stays under. Here a child process calls every kernel of the plan's dtype pairs on a few zeros
(``kernels.cpu.precompile``; the GGML dequantizers of a GGUF side's block types; the linear assignment before
the first matching of reordered units);
numba writes the machine code to its cache, the child's memory leaves with it,
and the comparison loads the kernels from the cache. The time is the same (the child compiles what the
comparison would have); only the memory moves.

A marker file beside numba's cached kernels records each dtype pair done, keyed by numba's and Python's
versions, the CPU and the kernel source's size and modification time (what numba's own cache keys on), so
later runs start no child. Only comparisons of at least ``CHILD_ELEMENTS`` (a billion elements a side), or with a
matrix at least ``CHILD_GRAM_SIDE`` (4,096) wide on its smaller side, do this: a smaller one compiles in its own
process, which is faster on a first run and far from the memory bound.
``WEIGHTDIFF_PRECOMPILE=1`` does it for any size, ``=0`` never; a child that fails changes nothing (the
comparison compiles in its own process, as before).

    python -m weightdiff.measure.precompile BF16:BF16 F32:BF16 assignment ggml:Q4_K
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: the pair kinds whose values a comparison measures with the kernels (added/removed/mismatch read nothing)
_MEASURED = ("paired", "resized", "inherited", "lora")
#: the longest a child may compile (all kernels of a dtype pair take 10-30 s on a 2-core machine); past it the
#: child is killed and the comparison compiles what it needs itself
CHILD_SECONDS = 900
#: the size from which a comparison compiles in a child (unless ``WEIGHTDIFF_PRECOMPILE`` says otherwise): a
#: billion elements a side, 2 GB in bf16. Below it a first run compiles in its own process, faster (every kernel
#: of a dtype pair in a child costs ~10 s, where a small run compiles only the few it calls: a 27 MB quantized
#: pair's first run took 44 s with children, 14 s without; the demo 13 s against 9 s) and far from any memory
#: bound (the same runs peak at 360-440 MB); from it on the run takes minutes and its peak is the one the bound is for
CHILD_ELEMENTS = 1_000_000_000
#: ... or one of whose matrices is at least this wide on its smaller side: its Gram matrix alone is 128 MB (537 MB
#: at 70B's 8,192), and such a run peaks within ~100 MB of the 1 GB bound, which an in-process compile (~130 MB for
#: a dtype pair's parallel kernels) then crossed: a 28672 x 8192 GPTQ fine-tune's first run peaked at 1,104 MB
#: against 971 MB with the kernels cached, though the pair is 235M elements a side
CHILD_GRAM_SIDE = 4096
_large = False                              # the comparison under way is large (note_size)
#: the key of the linear assignment (the matching of reordered units: one kernel, float64 costs)
ASSIGNMENT = "assignment"
#: the prefix of a GGML block type's key (``ggml:Q4_K``: ``kernels.ggml``'s dequantizer of that type)
GGML = "ggml:"
#: the peak resident set of each child this process ran, in MB (its own ``VmHWM``: ``getrusage`` of a child
#: counts the pages it shared with this process until it started Python, up to this process's own peak)
peaks: list[int] = []
_PEAK = "precompile: VmHWM "
_done: set[str] = set()                     # this process: keys known compiled (a marker seen or written)


def needed(pairs: Iterable) -> list[str]:
    """The ``"BASE:TUNED"`` dtype pairs of a plan's pairs that kernels measure, sorted."""
    from ..kernels.dtypes import DTYPES

    out = set()
    # the distinct (kind, dtypes) first: one tuple per pair, 100,000 pairs in ~10 ms
    for kind, db, dt in {(p.kind, p.dtype_base, p.dtype_tuned) for p in pairs}:
        if kind not in _MEASURED or db not in DTYPES or dt not in DTYPES:
            continue
        if kind == "inherited":
            dt = db                             # the base against itself
        if DTYPES[db].decodable and DTYPES[dt].decodable or db == dt:
            out.add(f"{db}:{dt}")
    return sorted(out)


def gguf_keys(checkpoints: Iterable) -> list[str]:
    """``"ggml:TYPE"`` for each GGML block type with a numba dequantizer (``kernels.ggml``) that a GGUF
    checkpoint among these stores, sorted."""
    from ..kernels.ggml import BLOCKS

    out = set()
    for ck in checkpoints:
        if getattr(ck, "format", None) == "gguf" or getattr(ck, "gguf_lora", None) is not None:   # (Q8_0 factors)
            out.update(f"{GGML}{info.scheme}" for info in ck.tensors.values() if info.scheme in BLOCKS)
    return sorted(out)


def _source(key: str) -> str:
    """The source file of a key's kernels (numba's cache is keyed by its size and modification time)."""
    if key == ASSIGNMENT:
        from ..kernels import assignment

        return assignment.__file__
    if key.startswith(GGML):
        from ..kernels import ggml

        return ggml.__file__
    from ..kernels import cpu

    return cpu.__file__


def _marker_dir() -> Path | None:
    """Where numba caches ``kernels/``' kernels (markers live beside them: removing that cache removes them too);
    None when numba says nothing of it."""
    from ..kernels import cpu

    try:
        return Path(cpu._stats_driver.stats.cache_path) / "weightdiff-precompiled"
    except Exception:       # noqa: BLE001  (a numba without ``stats``: no markers, a child each run)
        return None


def _marker(key: str) -> str:
    import llvmlite.binding as llvm
    import numba

    st = os.stat(_source(key))
    stamp = "\n".join([numba.__version__, sys.version, llvm.get_host_cpu_name(), str(st.st_size),
                       str(st.st_mtime_ns), key])
    return f"{key.replace(':', '-')}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"


def missing(keys: Sequence[str]) -> list[str]:
    """The keys no marker says are compiled."""
    folder = _marker_dir()
    out = []
    for key in keys:
        if key in _done:
            continue
        if folder is not None and (folder / _marker(key)).exists():
            _done.add(key)
            continue
        out.append(key)
    return out


def note_size(elements: int, side: int = 0) -> None:
    """The elements the comparison under way measures (one side) and the smaller side of its widest matrix: a child
    compiles for it only from ``CHILD_ELEMENTS`` or ``CHILD_GRAM_SIDE`` on (``enabled``)."""
    global _large
    _large = int(elements) >= CHILD_ELEMENTS or int(side) >= CHILD_GRAM_SIDE


def gram_side(shapes: Iterable) -> int:
    """The largest smaller side of the matrices among these shapes (a 3-d stack of experts counts its last two
    axes; vectors and None count 0)."""
    return max((min(s[-2:]) for s in shapes if s is not None and len(s) >= 2), default=0)


def checkpoint_elements(checkpoints: Iterable) -> int:
    """The elements of the largest of these checkpoints (its tensors' shapes)."""
    return max((sum(math.prod(info.shape or ()) for info in ck.tensors.values()) for ck in checkpoints), default=0)


def checkpoint_side(checkpoints: Iterable) -> int:
    """``gram_side`` of every tensor of these checkpoints."""
    return max((gram_side(info.shape for info in ck.tensors.values()) for ck in checkpoints), default=0)


def enabled() -> bool:
    """``WEIGHTDIFF_PRECOMPILE``: ``0`` never, ``1`` always, unset (or anything else) for a comparison of at least
    ``CHILD_ELEMENTS`` elements or a matrix at least ``CHILD_GRAM_SIDE`` wide on its smaller side (``note_size``)."""
    if getattr(sys, "frozen", False):
        return False
    how = os.environ.get("WEIGHTDIFF_PRECOMPILE", "")
    return how == "1" or (how != "0" and _large)


def ensure(pairs: Iterable, stage=None, checkpoints: Iterable = ()) -> bool:
    """Compile the kernels for the dtype pairs of ``pairs`` (a plan's pairs), and the GGML dequantizers of the GGUF
    files among ``checkpoints``, in a child process unless markers say they are compiled; ``stage(text)`` is told
    when a child starts. True when a child ran and succeeded."""
    return ensure_keys(needed(pairs) + gguf_keys(checkpoints), stage)


def ensure_keys(keys: Sequence[str], stage=None) -> bool:
    """``ensure`` for keys: ``"BASE:TUNED"`` dtype pairs, or ``ASSIGNMENT`` (the matching of reordered units)."""
    if not enabled() or all(k in _done for k in keys):
        return False
    todo = missing(keys)
    if not todo:
        return False
    if stage is not None:
        shown = sorted({k if k == ASSIGNMENT else k[len(GGML):] if k.startswith(GGML)
                        else k.split(":")[0] if len(set(k.split(":"))) == 1 else k.replace(":", "/") for k in todo})
        stage("compiling the numba kernels for " + ", ".join(shown)
              + " (a first run; kept in numba's cache for later runs)")
    if not sys.executable:      # an embedding interpreter that cannot say where its program is (None or ''):
        return False            # the comparison compiles in its own process
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, *todo],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False, timeout=CHILD_SECONDS)
    except (OSError, ValueError, subprocess.SubprocessError):   # no interpreter to start, or a child past its time
        return False
    if done.returncode != 0:
        return False            # the comparison compiles in its own process, as it always could
    _done.update(todo)
    for line in done.stderr.decode(errors="replace").splitlines():
        if line.startswith(_PEAK):
            peaks.append(int(line[len(_PEAK):].split()[0]) // 1024)
    return True


#: the child's program: weightdiff from where this process found it, never from the current folder (``python -m``
#: and ``-c`` put it first on the path: a checkpoint folder holding a ``weightdiff/`` package would run its code)
_CHILD = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
          "from weightdiff.measure.precompile import main; sys.exit(main(sys.argv[1:]))")


def _write_markers(keys: Sequence[str]) -> None:
    folder = _marker_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for key in keys:
            (folder / _marker(key)).touch()
    except OSError:
        pass                    # a read-only cache: a child again next run, nothing worse


def main(argv: Sequence[str]) -> int:
    from ..kernels import assignment, cpu, ggml

    pairs = [tuple(a.split(":")) for a in argv if a != ASSIGNMENT and not a.startswith(GGML)]
    blocks = [a[len(GGML):] for a in argv if a.startswith(GGML)]
    if any(len(p) != 2 for p in pairs) or any(b not in ggml.BLOCKS for b in blocks):
        print(f"usage: python -m weightdiff.measure.precompile BASE:TUNED ... [{ASSIGNMENT}] [{GGML}TYPE ...]",
              file=sys.stderr)
        return 2
    cpu.precompile(pairs)
    ggml.precompile(blocks)
    if ASSIGNMENT in argv:
        assignment.precompile()
    _write_markers(argv)
    try:                        # this process's own peak (its rusage after exec counts the parent's pages too)
        with open("/proc/self/status") as fh:
            hwm = next((ln.split()[1] for ln in fh if ln.startswith("VmHWM:")), None)
    except OSError:
        hwm = None
    if hwm is not None:
        print(f"{_PEAK}{hwm} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
