"""The benchmark pair generator writes what its ground truth says, checked with the kernels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from weightdiff.kernels import cpu
from weightdiff.kernels.reference import IDX
from weightdiff.io.safetensors_read import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tensors(folder: Path) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = {f: SafetensorsFile(folder / f) for f in set(index["weight_map"].values())}
    return {n: (files[f].tensors[n].dtype, files[f].read(n)) for n, f in index["weight_map"].items()}


@pytest.mark.parametrize("cast", [False, True])
def test_make_pair_ground_truth(tmp_path, cast):
    make_pair = _load("make_pair")
    argv = [str(tmp_path), "--size", "tiny", "--shard-mb", "0", "--lora-blocks", "0-1", "--lora-rank", "3"]
    assert make_pair.main(argv + (["--cast"] if cast else [])) == 0
    gt = json.loads((tmp_path / "ground_truth.json").read_text())
    base, tuned = _tensors(tmp_path / "base"), _tensors(tmp_path / "tuned")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1          # sharded
    assert gt["params"] == sum(v[1].size for v in base.values())
    kinds = {t["change"] for t in gt["tensors"]}
    assert kinds == {"lowrank", "sparse", "noise", "none"}
    for t in gt["tensors"]:
        (db, b), (dt, tr) = base[t["name"]], tuned[t["name"]]
        assert (db, dt) == ((("F32", "BF16") if cast else ("BF16", "BF16")))
        s = cpu.delta_stats(b, tr, db, dt)
        if t["change"] == "none":
            assert s[IDX["n_beyond"]] == 0
            assert (s[IDX["n_changed"]] == 0) == (not cast)
            assert t["expected_status"] == ("rounding" if cast else "unchanged")
        elif t["expected_status"] == "changed":
            assert s[IDX["n_beyond"]] > 0
        if t["change"] == "lowrank":
            from weightdiff.kernels.dtypes import decode

            d = decode(tr, dt).reshape(b.shape) - decode(b, db).reshape(b.shape)
            sv = np.linalg.svd(d, compute_uv=False)
            # rank 3 carries nearly all the energy; bf16 rounding spreads a little over the rest
            assert np.sum(sv[:3] ** 2) / np.sum(sv ** 2) > 0.95
            np.testing.assert_allclose(np.sqrt(s[IDX["sum_d2"]]) / np.sqrt(s[IDX["sum_b2"]]), t["rel"], rtol=0.1)
        if t["change"] == "sparse" and not cast:
            assert s[IDX["n_changed"]] <= t["count"]


def test_gpu_check_smoke_on_cpu(capsys):
    pytest.importorskip("torch")
    gpu_check = _load("gpu_check")
    gpu_check.parity = lambda device, lengths: []          # parity itself is tested in test_kernels_torch
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "norm_delta agrees across backends: yes" in out and "numba cpu" in out


def test_peak_stack_keeps_no_frame_alive():
    """benchmarks/peak_stack.py samples every thread's stack, and a frame it kept past a sample would keep its
    function's locals alive after the function returned (a kept frame inside the eigen-solve held a 537 MB Gram
    matrix beside the next one: peaks of 1.0-1.4 GB reported for a run that peaked under 0.9 GB)."""
    import threading
    import weakref

    peak_stack = _load("peak_stack")

    class Big:
        pass

    refs, inside, go = [], threading.Event(), threading.Event()

    def holds_big():
        big = Big()
        refs.append(weakref.ref(big))
        inside.set()
        go.wait(10)

    t = threading.Thread(target=holds_big)
    t.start()
    assert inside.wait(10)
    text = peak_stack.stacks(threading.get_ident())
    go.set()
    t.join()
    assert "holds_big" in text
    assert refs[0]() is None          # the sampled frame let go: `big` died with its function

    refs.clear()
    inside.clear()
    go.clear()
    with peak_stack.Sampler(0.001) as s:
        t = threading.Thread(target=holds_big)
        t.start()
        assert inside.wait(10)
        while s.best[0] == 0 or "holds_big" not in s.best[2]:
            s.best = (0, {}, "")          # ask for a sample taken while the thread is inside
            s._stop.wait(0.005)
        go.set()
        t.join()
        assert refs[0]() is None
    assert s.best[1]["VmHWM"] >= s.best[1]["VmRSS"] > 0


def test_peak_stack_lists_the_large_arrays_alive():
    """``--maps``: the mappings resident at the highest sample, a numpy array of tens of MB one of its own: what
    made a peak is read by size (a 537 MB Gram, a 67 MB block), not guessed from the stacks."""
    import numpy as np

    peak_stack = _load("peak_stack")
    before = {z for r, z, n in peak_stack.big_mappings() if n == "[anon]"}
    a = np.ones(48 << 17)                       # 48 MB, every page touched
    got = peak_stack.big_mappings()
    assert any(r >= 47 and n == "[anon]" for r, z, n in got) and got == sorted(got, reverse=True)
    del a
    assert {z for r, z, n in peak_stack.big_mappings() if n == "[anon]" and r >= 47} <= before
