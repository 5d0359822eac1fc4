"""The compute loop's window streaming: the torch path (pinned, overlapped on CUDA) adds up
to the same numbers as the numba path, window by window, with progress for every element."""

from __future__ import annotations

import numpy as np
import pytest

import weightdiff.measure.compute as compute
from conftest import write_checkpoint
from weightdiff.io.checkpoint import locate
from weightdiff.measure.backend import Backend
from weightdiff.measure.compute import _stream_stats
from weightdiff.kernels import cpu


def test_torch_streaming_branch_matches_numba(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from weightdiff.kernels import cuda

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.02, size=(300, 70)).astype(np.float32)
    write_checkpoint(tmp_path / "b", {"w": x}, dtype="BF16")
    write_checkpoint(tmp_path / "t", {"w": x + rng.normal(0, 1e-3, x.shape).astype(np.float32)}, dtype="BF16")
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 4096)      # several windows, a partial last one
    with locate(tmp_path / "b") as b, locate(tmp_path / "t") as t:
        seen: list[int] = []
        got = _stream_stats(Backend("cuda", cuda, "cpu"), b, "w", "BF16", t, "w", "BF16", None, seen.append)
        want = _stream_stats(Backend("cpu", cpu), b, "w", "BF16", t, "w", "BF16", None, lambda n: None)
    assert sum(seen) == x.size and len(seen) == -(-x.size // 4096)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == want[0] and got[5] == want[5]           # counts exact


def test_small_pairs_read_in_batches_give_the_windowed_records(tmp_path, monkeypatch):
    from weightdiff import compare
    from weightdiff.io.safetensors_write import save_file, to_storage
    from weightdiff.measure import compute

    rng = np.random.default_rng(5)
    base, tuned = {}, {}
    for i in range(60):      # odd-sized U8 tensors between the floats put some at unaligned offsets
        dt = ("BF16", "F32", "U8", "F16", "F64")[i % 5]
        shape = (3, 5) if i % 3 else (7,) if i % 4 else (1100,)     # (1100,): more than one sub-block
        v = rng.normal(size=shape).astype(np.float32) if dt != "U8" else rng.integers(0, 9, shape).astype(np.uint8)
        if dt != "U8" and i % 7 == 0:     # non-finite values, a subnormal and a huge one among them
            v.flat[:4] = [np.nan, np.inf, 1e-42, 3e38]
        w = v if i % 2 else (v + (rng.normal(size=shape) * 0.01 if dt != "U8" else 1)).astype(v.dtype)
        base[f"model.layers.{i}.w"] = (dt, to_storage(v, dt) if dt != "U8" else v)
        tuned[f"model.layers.{i}.w"] = (dt, to_storage(w, dt) if dt != "U8" else w)
    save_file(tmp_path / "b.safetensors", base)
    save_file(tmp_path / "t.safetensors", tuned)
    seen = []
    real = compute.compute_pair
    monkeypatch.setattr(compute, "compute_pair", lambda *a, **k: seen.append(a[8] is not None) or real(*a, **k))
    batched = compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors").to_json(include_run=False)
    assert seen and all(seen)
    seen.clear()
    monkeypatch.setattr(compute, "SMALL_ELEMENTS", 0)
    windowed = compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors").to_json(include_run=False)
    assert not any(seen)
    assert batched == windowed


def test_small_reads_stay_bounded_when_gaps_separate_the_small_tensors(tmp_path, monkeypatch):
    """Tiny tensors each followed by a large one: a read never spans more than the batch budget."""
    from weightdiff import compare
    from weightdiff.io.located import Checkpoint
    from weightdiff.io.safetensors_write import save_file

    tensors = {}
    for i in range(12):      # base: each small tensor followed by a 60 KB one (a gap small enough to merge)
        tensors[f"model.layers.{i}.a"] = ("F32", np.full((3,), i, np.float32))
        tensors[f"model.layers.{i}.big"] = ("F32", np.zeros((15000,), np.float32))
    save_file(tmp_path / "b.safetensors", tensors)
    tensors["model.layers.5.a"] = ("F32", np.full((3,), 99, np.float32))
    order = [k for k in tensors if k.endswith(".a")] + [k for k in tensors if k.endswith(".big")]
    save_file(tmp_path / "t.safetensors", {k: tensors[k] for k in order})   # tuned: the small ones first
    monkeypatch.setattr(compute, "SMALL_ELEMENTS", 1000)       # the 60 KB tensors take the windowed path
    monkeypatch.setattr(compute, "SMALL_BATCH_BYTES", 100_000)
    spans = []
    real = Checkpoint.read_span
    monkeypatch.setattr(Checkpoint, "read_span", lambda self, p, lo, hi: spans.append(hi - lo) or real(self, p, lo, hi))
    result = compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert len(spans) > 2 and max(spans) <= 100_000         # the base side needed several bounded reads
    assert [t.status for t in result.tensors if t.name.endswith(".a")].count("changed") == 1


@pytest.mark.parametrize("seed,budget", [(s, b) for s in range(3) for b in (300, 5_000, 1 << 25)])
def test_small_reads_are_the_pair_by_pair_runs(monkeypatch, seed, budget):
    """``_read_side`` finds its runs with arrays: the same reads (file, first byte, end byte) as the loop
    over the sorted pairs, and every pair's bytes where it says; with several files and bases, gaps,
    pairs sharing bytes, and runs cut by the byte budget."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(compute, "SMALL_BATCH_BYTES", budget)
    files = {}

    class Side:
        def __init__(self, name):
            self.name = name

        def read_span(self, path, lo, hi):
            reads.append((self.name, str(path), lo, hi))
            return files[path][lo:hi].copy()

    from pathlib import Path

    paths = [Path(f"/x/f{k}.safetensors") for k in range(3)]
    for p in paths:
        files[p] = rng.integers(0, 255, 200_000, dtype=np.uint8)
    bases, tuned = [Side("b0"), Side("b1")], Side("t")
    spans = []
    for _ in range(int(rng.integers(1, 400))):
        sb, st = int(rng.integers(0, 199_000)), int(rng.integers(0, 199_000))
        if spans and rng.random() < 0.4:           # right after the last one, or sharing its bytes
            sb = spans[-1][3] if rng.random() < 0.8 else spans[-1][2]
        n = int(rng.integers(1, 40))
        spans.append((int(rng.integers(0, 2)), paths[int(rng.integers(0, 3))], sb, sb + n, None,
                      paths[int(rng.integers(0, 2))], st, st + n, None))
    batch = list(range(len(spans)))
    for side in (0, 1):
        at = 1 + 4 * side
        reads = []
        packed, begin, length = compute._read_side(spans, batch, side, bases, tuned)
        got_reads = reads
        # the loop it replaces
        reads = []
        order = sorted(batch, key=lambda i: (spans[i][0] if side == 0 else 0, str(spans[i][at]), spans[i][at + 1]))
        j = 0
        while j < len(order):
            i0 = order[j]
            ck = bases[spans[i0][0]] if side == 0 else tuned
            path, lo, hi = spans[i0][at], spans[i0][at + 1], spans[i0][at + 2]
            k = j + 1
            while k < len(order):
                s = spans[order[k]]
                if ((bases[s[0]] if side == 0 else tuned) is not ck or s[at] != path or s[at + 1] - hi > (1 << 16)
                        or max(hi, s[at + 2]) - lo > budget):
                    break
                hi = max(hi, s[at + 2])
                k += 1
            ck.read_span(path, lo, hi)
            j = k
        assert got_reads == reads
        for k, i in enumerate(batch):
            s = spans[i]
            want = files[s[at]][s[at + 1]:s[at + 2]]
            assert length[k] == len(want) and np.array_equal(packed[begin[k]:begin[k] + length[k]], want)


@pytest.mark.parametrize("size", [(64, 128), (600, 700)])     # batched small pair / streamed Gram
def test_values_that_become_non_finite_leave_the_change_without_a_rank(tmp_path, size):
    """A matrix whose only change is a patch of NaN read "low_rank (largest numerical rank 0)" with
    delta_params 0: the rank of the finite part is not the rank of the change."""
    from weightdiff import compare

    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.02, size).astype(np.float32)
    y = x.copy()
    y[:4, :32] = np.nan
    base = write_checkpoint(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": x, "model.norm.weight": x[0]})
    tuned = write_checkpoint(tmp_path / "t", {"model.layers.0.mlp.up_proj.weight": y, "model.norm.weight": x[0]})
    r = compare(base, tuned)
    rec = next(t for t in r.tensors if t.name.endswith("up_proj.weight"))
    assert rec.status == "changed" and rec.rank is None
    assert "128 non-finite values in the tuned tensor, 0 in the base" in rec.note
    assert r.summary.form["kind"] != "low_rank" and r.summary.delta_params == 256


@pytest.mark.parametrize("dtype, share", [("F64", 4), ("F32", 1), ("BF16", 1)])
def test_a_float64_side_streams_in_windows_a_quarter_as_long(tmp_path, monkeypatch, dtype, share):
    """A float64 side (a base seen beneath a rotation, a fold or a rescale is float64 values; a float64 checkpoint)
    reads windows of a quarter of ``WINDOW_ELEMENTS``: no window passes 32 MB a side. At 128 MB, two held at once
    beside the block being computed, a rotated 7B-shaped pair's remeasure passed 1 GB."""
    from weightdiff import compare

    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.02, size=(300, 70)).astype(np.float32)
    write_checkpoint(tmp_path / "b", {"w": x}, dtype=dtype)
    write_checkpoint(tmp_path / "t", {"w": x + rng.normal(0, 1e-3, x.shape).astype(np.float32)}, dtype="F32")
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 4096)
    monkeypatch.setattr(compute, "SMALL_ELEMENTS", 16)          # streamed, not read in a small batch
    seen: list = []
    real = compute._stream_stats
    monkeypatch.setattr(compute, "_stream_stats", lambda *a, **k: seen.append(a[12] if len(a) > 12 else None)
                        or real(*a, **k))
    assert compare(tmp_path / "b", tmp_path / "t").summary.tensors_by_status.get("changed") == 1
    assert seen == [4096 // share]
