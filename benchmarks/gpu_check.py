"""One-shot GPU check: torch-CUDA kernels against numba, then stats-pass throughput.

    python benchmarks/gpu_check.py                  # on a CUDA machine, ~1-3 minutes
    python benchmarks/gpu_check.py --device cpu --tiny   # the same code path on CPU torch

Needs numpy, numba, torch (CUDA build) and weightdiff installed; no network, no files.
Part 1 compares ``kernels.cuda.delta_stats`` on the device with ``kernels.cpu`` for every
decodable dtype pair used in the tests, on random values, raw random bits (NaN, Inf,
subnormals, huge) and window lengths around the chunk size; counts and max must be
equal, float sums within rtol 1e-9; then windows of several pieces, run twice (the bits
must repeat), and the streamed path. Part 2 builds a ~1.1B-parameter bf16 pair in memory
(windows of 16M elements, like weightdiff.measure.compute) and times: the streamed GPU pass
(pinned buffers, copy/compute overlap), its two copies alone (host into pinned memory,
pinned to device), the GPU compute alone (data already on the device), and the numba CPU
pass, in the same run. Exit status 1 if any parity check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _pairs():
    from weightdiff.kernels.dtypes import DTYPES

    dec = [n for n, d in DTYPES.items() if d.decodable]
    mixed = [("BF16", "F32"), ("F32", "BF16"), ("F16", "F32"), ("F64", "F32"), ("BF16", "F8_E4M3"),
             ("F8_E5M2", "BF16"), ("I64", "F32"), ("U8", "F16"), ("BOOL", "I8"), ("U64", "F64")]
    return [(d, d) for d in dec] + mixed


def _make(rng, n: int, dtype: str, values: np.ndarray) -> np.ndarray:
    from weightdiff.kernels.dtypes import DTYPES
    from weightdiff.io.safetensors_write import to_storage

    d = DTYPES[dtype]
    st = np.dtype(d.storage)
    if d.kind == "bool":
        raw = values > 0
    elif d.kind == "int":
        info = np.iinfo(st)
        raw = np.clip(np.round(values * 50), info.min, info.max).astype(st)
    else:
        with np.errstate(all="ignore"):
            raw = to_storage(values, dtype)
    k = n // 20                                          # 5% raw random bit patterns
    if k:
        idx = rng.choice(n, k, replace=False)
        junk = rng.integers(0, 256, k * st.itemsize, dtype=np.uint8).view(st)
        raw[idx] = junk if d.kind != "bool" else junk.astype(bool)
    return raw


def parity(device, lengths) -> list[str]:
    from weightdiff.kernels import cpu, cuda
    from weightdiff.kernels.reference import IDX

    exact = [IDX[k] for k in ("count", "n_changed", "n_beyond", "max_abs", "nonfinite_b", "nonfinite_t",
                               "sign_flips")]
    sums = [IDX[k] for k in ("sum_b2", "sum_t2", "sum_d2")]
    failures = []
    rng = np.random.default_rng(0)
    for db, dt in _pairs():
        for n in lengths:
            v = rng.standard_normal(n) * 0.05
            w = v + np.where(rng.random(n) < 0.3, rng.standard_normal(n) * 0.01, 0.0)
            b, t = _make(rng, n, db, v), _make(rng, n, dt, w)
            want = cpu.delta_stats(b, t, db, dt)
            got = cuda.delta_stats(b, t, db, dt, device=device)
            ok = np.array_equal(got[exact], want[exact])
            ok &= bool(np.allclose(got[sums], want[sums], rtol=1e-9, atol=0, equal_nan=True))
            with np.errstate(all="ignore"):
                scale = np.sqrt(want[IDX["sum_b2"]] * want[IDX["sum_t2"]])
            atol = 1e-9 * scale if np.isfinite(scale) else 0.0
            ok &= bool(np.allclose(got[IDX["dot"]], want[IDX["dot"]], rtol=1e-9, atol=atol, equal_nan=True))
            if not ok:
                failures.append(f"{db}-{dt} n={n}: cuda {got.tolist()} numba {want.tolist()}")
    # pieces combined in order (a small PIECE), and the same bits on a second run
    piece = cuda.PIECE
    try:
        cuda.PIECE = 1 << 20
        for db, dt in [("BF16", "BF16"), ("F32", "BF16"), ("F16", "F16"), ("F64", "F32")]:
            n = 3 * cuda.PIECE + 12_345 if max(lengths) > cpu.CHUNK + 1 else 2 * cuda.PIECE + 7
            v = rng.standard_normal(n) * 0.05
            b, t = _make(rng, n, db, v), _make(rng, n, dt, v + rng.standard_normal(n) * 1e-3)
            want = cpu.delta_stats(b, t, db, dt)
            got = cuda.delta_stats(b, t, db, dt, device=device)
            again = cuda.delta_stats(b, t, db, dt, device=device)
            if not (np.array_equal(got[exact], want[exact]) and np.allclose(got, want, rtol=1e-9, equal_nan=True)):
                failures.append(f"pieces {db}-{dt} n={n}: cuda {got.tolist()} numba {want.tolist()}")
            if got.tobytes() != again.tobytes():
                failures.append(f"not deterministic {db}-{dt} n={n}: {got.tolist()} then {again.tolist()}")
    finally:
        cuda.PIECE = piece
    # the streamed path gives the per-window results, in order
    wins = [(rng.integers(0, 1 << 15, n, dtype=np.uint16), rng.integers(0, 1 << 15, n, dtype=np.uint16),
             "BF16", "BF16") for n in (5, 1 << 20, 3, 1 << 21)]
    for (b, t, db, dt), got in zip(wins, cuda.stream_delta_stats(iter(wins), device=device)):
        want = cpu.delta_stats(b, t, db, dt)
        if not (np.array_equal(got[exact], want[exact]) and np.allclose(got, want, rtol=1e-9)):
            failures.append(f"stream n={b.size}: cuda {got.tolist()} numba {want.tolist()}")
    return failures


def throughput(device, params: int, window: int, threads: int | None) -> list[tuple]:
    import torch

    from weightdiff.kernels import cpu, cuda, cuda_stream

    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    base = (rng.integers(0, 1 << 16, params, dtype=np.uint16) & 0x1FFF) | 0x3C00   # finite, |x| in [2^-7, 2^1)
    tuned = base.copy()
    flip = rng.random(params, dtype=np.float32) < 0.3
    tuned[flip] ^= 1
    del flip
    gen = time.perf_counter() - t0
    wins = [(base[s:s + window], tuned[s:s + window], "BF16", "BF16") for s in range(0, params, window)]
    nbytes = base.nbytes + tuned.nbytes
    rows = [("generate pair (numpy)", gen, None, None)]

    def total(parts):
        acc = None
        for p in parts:
            acc = p if acc is None else cpu.combine(acc, p)
        return acc

    cuda.delta_stats(base[:1000], tuned[:1000], "BF16", "BF16", device=device)        # warm-up
    dev = cuda.resolve_device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    g = total(cuda.stream_delta_stats(iter(wins), device=device))
    sync()
    dt = time.perf_counter() - t0
    rows.append((f"torch {dev.type}: streamed from host", dt, nbytes / dt / 1e9, g))
    if dev.type == "cuda":   # where the streamed time goes: the host copy, the PCIe copy
        host = torch.empty(window * base.itemsize, dtype=torch.uint8, pin_memory=True)
        t0 = time.perf_counter()
        for b, t, _, _ in wins:
            for a in (b, t):
                cuda_stream.host_copy(host.numpy()[:a.nbytes], a.view(np.uint8))
        dt = time.perf_counter() - t0
        rows.append((f"host copy into pinned, {cuda_stream._copy_workers()} threads", dt, nbytes / dt / 1e9, None))
        devbuf = torch.empty(host.numel(), dtype=torch.uint8, device=dev)
        sync()
        t0 = time.perf_counter()
        for _ in range(2 * len(wins)):
            devbuf.copy_(host, non_blocking=True)
        sync()
        dt = time.perf_counter() - t0
        rows.append(("host-to-device copy only (pinned)", dt, nbytes / dt / 1e9, None))
        del host, devbuf
        free = torch.cuda.mem_get_info(dev)[0]
        if free > 3 * nbytes:
            bt = torch.from_numpy(base.view(np.int16)).to(dev)
            tt = torch.from_numpy(tuned.view(np.int16)).to(dev)
            sync()
            t0 = time.perf_counter()
            parts = [cuda._stats_tensor(bt[s:s + window], tt[s:s + window], "BF16", "BF16")
                     for s in range(0, params, window)]
            sync()
            dt = time.perf_counter() - t0
            rows.append(("torch cuda: compute only (on device)", dt, nbytes / dt / 1e9,
                         total(p.cpu().numpy() for p in parts)))
            del bt, tt
    cpu.set_threads(threads)
    cpu.delta_stats(base[:1000], tuned[:1000], "BF16", "BF16")
    t0 = time.perf_counter()
    c = total(cpu.delta_stats(b, t, db, dt_) for b, t, db, dt_ in wins)
    dt = time.perf_counter() - t0
    rows.append((f"numba cpu, {cpu.get_threads()} threads", dt, nbytes / dt / 1e9, c))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small sizes, for a CPU smoke test")
    ap.add_argument("--params", type=int, default=1_100_000_000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch

    from weightdiff.kernels import cpu, cuda
    from weightdiff.kernels.reference import finalize

    cuda.require_device(args.device)
    name = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, numba threads {cpu.get_threads()}")
    lengths = [0, 1, cpu.CHUNK - 1, cpu.CHUNK + 1] + ([] if args.tiny else [3 * cpu.CHUNK, 5_000_003])
    t0 = time.perf_counter()
    failures = parity(args.device, lengths)
    print(f"parity: {len(_pairs())} dtype pairs x {len(lengths)} lengths + streamed windows: "
          f"{'OK' if not failures else f'{len(failures)} FAILED'} ({time.perf_counter() - t0:.1f} s)")
    for f in failures[:10]:
        print("  " + f)
    params = 3_000_000 if args.tiny else args.params
    window = 1 << (18 if args.tiny else 24)
    rows = throughput(args.device, params, window, args.threads)
    print(f"stats pass over a {params / 1e6:,.0f}M-parameter bf16 pair ({4 * params / 1e9:.2f} GB both sides):")
    print(f"  {'':40} {'s':>7} {'GB/s':>7}  norm_delta")
    ref_nd = None
    for label, secs, gbps, stats in rows:
        nd = finalize(stats)["norm_delta"] if stats is not None else None
        ref_nd = ref_nd if nd is None or ref_nd is not None else nd
        g = f"{gbps:7.2f}" if gbps is not None else f"{'':7}"
        print(f"  {label:40} {secs:7.2f} {g}  {'' if nd is None else f'{nd:.12g}'}")
    nds = [finalize(s)["norm_delta"] for _, _, _, s in rows if s is not None]
    agree = all(abs(x - nds[0]) <= 1e-9 * abs(nds[0]) for x in nds)
    print(f"norm_delta agrees across backends: {'yes' if agree else 'NO'}")
    return 0 if not failures and agree else 1


if __name__ == "__main__":
    sys.exit(main())
