"""On a CUDA device: ``kernels.cuda.DeviceDelta`` against the host decoders and noise profile, every float
dtype pair the stats pass keeps a delta for, windows of odd sizes (tests/test_device_delta.py runs the same
on torch's cpu device). Prints one line per pair and exits 1 on any disagreement.

    python benchmarks/device_delta_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels import cuda
    from weightdiff.measure import rank
    from weightdiff.measure.rank_stream import _decoder

    dec64, dec32 = _decoder()
    rng = np.random.default_rng(0)
    m, n = 1031, 1777
    bad = 0
    pairs = [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("F64", "F64"), ("BF16", "F32"), ("F16", "BF16"),
             ("F8_E4M3", "BF16"), ("F8_E5M2", "F16")]
    for db, dt in pairs:
        x = rng.normal(0, 0.05, (m, n))
        y = x + rng.normal(0, 1e-3, (m, n))
        x.flat[::9973], y.flat[::7919] = np.nan, np.inf
        b, t = to_storage(x.astype(np.float32), db), to_storage(y.astype(np.float32), dt)
        fb, ft = b.reshape(-1), t.reshape(-1)
        for f64 in (True, False):
            dd = cuda.DeviceDelta((m, n), db, dt, [rank._variance_table(d) for d in (db, dt)], args.device, float64=f64)
            pos = 0
            for size in (1, 1776, 1 << 20, 3, m * n):
                dd.add(fb[pos:pos + size], ft[pos:pos + size])
                pos = min(pos + size, m * n)
            got = dd.matrix().cpu().numpy().reshape(-1)
            want = np.empty(m * n, np.float64 if f64 else np.float32)
            (dec64 if f64 else dec32)(fb, ft, db, dt, want)
            rows, cols = dd.profile()
            rb, cb = rank.noise_profile(b, db, (m, n))
            rt, ct = rank.noise_profile(t, dt, (m, n))
            equal = bool(np.array_equal(got, want))
            er = float(np.max(np.abs(rows - (rb + rt)) / np.maximum(rb + rt, 1e-300)))
            ec = float(np.max(np.abs(cols - (cb + ct)) / np.maximum(cb + ct, 1e-300)))
            ok = equal and er < 1e-12 and ec < 1e-12
            bad += not ok
            print(f"{db:>8} -> {dt:<8} float64={f64!s:5} delta equal={equal} noise sums rel err rows {er:.1e} "
                  f"cols {ec:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
