"""Kernels compiled in a child process before a comparison (issue 15, item 3: a first run's compile memory).

The integration test runs in a subprocess with an empty numba cache of its own: the comparison must then
compile nothing itself (every kernel dispatcher's cache misses zero: all loaded from what the child wrote),
and a kernel of a dtype pair the plan did not have still compiles in-process (the count can see a compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from weightdiff.measure import precompile


def _pair(kind, db, dt):
    return SimpleNamespace(kind=kind, dtype_base=db, dtype_tuned=dt)


def test_needed_takes_the_measured_dtype_pairs_once_each():
    pairs = [_pair("paired", "BF16", "BF16"), _pair("paired", "BF16", "BF16"), _pair("added", None, "F32"),
             _pair("removed", "F16", None), _pair("paired", "F32", "BF16"), _pair("inherited", "F16", "F16"),
             _pair("mismatch", "I8", "I8"), _pair("paired", "C64", "C64"), _pair("paired", "C64", "F4"),
             _pair("resized", "F16", "F16"), _pair("paired", "NOPE", "BF16")]
    assert precompile.needed(pairs) == ["BF16:BF16", "C64:C64", "F16:F16", "F32:BF16"]


def test_switched_off_or_failing_child_leaves_the_comparison_to_compile(monkeypatch):
    ran = []
    monkeypatch.setattr(precompile.subprocess, "run", lambda *a, **k: ran.append(a) or SimpleNamespace(returncode=1))
    monkeypatch.setattr(precompile, "_done", set())
    monkeypatch.setattr(precompile, "missing", lambda pairs: list(pairs))
    monkeypatch.setenv("WEIGHTDIFF_PRECOMPILE", "0")
    assert precompile.ensure([_pair("paired", "BF16", "BF16")]) is False and not ran
    monkeypatch.setenv("WEIGHTDIFF_PRECOMPILE", "1")
    said = []
    assert precompile.ensure([_pair("paired", "BF16", "BF16")], said.append) is False     # the child failed
    assert len(ran) == 1 and "BF16:BF16" in ran[0][0] and "compiling the numba kernels for BF16" in said[0]
    assert precompile._done == set()          # not taken as compiled: asked again next time

    for nothing in (None, ""):                # sys.executable of an embedding interpreter: no child is tried
        monkeypatch.setattr(precompile.sys, "executable", nothing)
        assert precompile.ensure([_pair("paired", "BF16", "BF16")]) is False and len(ran) == 1
    monkeypatch.undo()
    monkeypatch.setenv("WEIGHTDIFF_PRECOMPILE", "1")
    monkeypatch.setattr(precompile, "_done", set())
    monkeypatch.setattr(precompile, "missing", lambda pairs: list(pairs))
    for error in (OSError("no such interpreter"), subprocess.TimeoutExpired("python", 900)):
        def no_child(*a, _e=error, **k):
            raise _e

        monkeypatch.setattr(precompile.subprocess, "run", no_child)
        assert precompile.ensure([_pair("paired", "BF16", "BF16")]) is False


def test_only_a_large_comparison_compiles_in_a_child_unless_told(monkeypatch):
    monkeypatch.delenv("WEIGHTDIFF_PRECOMPILE", raising=False)
    monkeypatch.setattr(precompile, "_large", False)
    precompile.note_size(precompile.CHILD_ELEMENTS - 1)
    assert not precompile.enabled()
    precompile.note_size(precompile.CHILD_ELEMENTS)
    assert precompile.enabled()
    # a small comparison with one wide matrix: its Gram matrix brings the run near the bound, so a child too
    precompile.note_size(10, precompile.CHILD_GRAM_SIDE - 1)
    assert not precompile.enabled()
    precompile.note_size(10, precompile.CHILD_GRAM_SIDE)
    assert precompile.enabled()
    side = precompile.CHILD_GRAM_SIDE
    assert precompile.gram_side([None, (side * 8,), [3, side], (side * 7, side - 1), (8, side, side)]) == side
    assert precompile.gram_side([None, (10 ** 9,), ()]) == 0
    monkeypatch.setenv("WEIGHTDIFF_PRECOMPILE", "0")
    assert not precompile.enabled()
    monkeypatch.setenv("WEIGHTDIFF_PRECOMPILE", "1")
    precompile.note_size(10)
    assert precompile.enabled()
    ck = SimpleNamespace(tensors={"a": SimpleNamespace(shape=[3, 4]), "b": SimpleNamespace(shape=[5]),
                                  "c": SimpleNamespace(shape=[])})
    assert precompile.checkpoint_elements([ck, SimpleNamespace(tensors={})]) == 18
    assert precompile.checkpoint_side([ck, SimpleNamespace(tensors={})]) == 3


def test_a_comparison_with_a_wide_matrix_asks_for_a_child(tmp_path, monkeypatch):
    """compute_some tells note_size the widest measured matrix: a 4096-wide one is large however few its elements
    (what counts is the pair as measured: an added matrix reads nothing)."""
    from weightdiff.measure import compute

    seen = []
    monkeypatch.setattr(precompile, "note_size", lambda elements, side=0: seen.append((elements, side)))
    monkeypatch.setattr(precompile, "ensure", lambda *a, **k: False)
    from weightdiff.pairing.pairs import Pair

    pairs = [Pair("a", "a", 0, "paired", (2, 4096), (2, 4096), "BF16", "BF16"),
             Pair("b", None, 0, "added", (4096, 4096), None, "BF16", None),
             Pair(None, "c", 0, "inherited", None, (5000, 4096), None, "BF16")]
    plan = SimpleNamespace(pairs=pairs)
    with pytest.raises(AttributeError):       # no backend: stops right after the size is told
        compute.compute_some(plan, range(3), [], None, SimpleNamespace(cache=None), None, None)
    assert seen == [(4096 * 2 + 5000 * 4096, 4096)]


def test_the_child_rejects_arguments_it_cannot_read(capsys):
    assert precompile.main(["BF16"]) == 2 and precompile.main(["BF16:F16:F32"]) == 2
    assert "usage" in capsys.readouterr().err


SCRIPT = r"""
import json, sys
KEYS = json.loads(sys.argv.pop(1))
import numpy as np
import pytest
from numba.core.registry import CPUDispatcher
from weightdiff.cli import main
from weightdiff.kernels import assignment, cpu, ggml
from weightdiff.measure import permutation, precompile

def misses():
    return {k: sum(v.stats.cache_misses.values()) for m in (cpu, assignment, ggml) for k, v in vars(m).items()
            if isinstance(v, CPUDispatcher) and sum(v.stats.cache_misses.values())}

try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit as e:
    assert not e.code, e.code
# the matching of reordered units (measure.permutation): its kernel compiled in a child too
assert permutation.linear_assignment(np.array([[1.0, 2.0], [2.0, 3.0]])).tolist() == [0, 1]
during = misses()
hits = sum(sum(v.stats.cache_hits.values()) for v in vars(cpu).values() if isinstance(v, CPUDispatcher))
left = precompile.missing(KEYS)
peaks = precompile.peaks
# a width pair the plan did not have: compiled here, and the count sees it
cpu.delta_stats(np.zeros(3, np.uint64), np.zeros(3, np.uint8), "F64", "U8")
print("RESULT " + json.dumps({"during": during, "hits": hits, "left": left, "after": misses(), "peaks": peaks}))
"""


def _run(tmp_path, base, tuned, keys):
    """``compare BASE TUNED --json`` in a fresh process with an empty numba cache of its own: what it compiled
    itself, what it loaded, the keys still without a marker, and a compile after the run."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "WEIGHTDIFF_PRECOMPILE": "1"}   # any size
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(keys), "compare", str(base), str(tuned),
                          "--json", str(tmp_path / "o.json"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def test_a_first_run_compiles_nothing_in_its_own_process(tmp_path):
    """A safetensors pair of two dtype pairs, then, in the same numba cache (a dtype pair costs about 20 s to
    compile, so the two runs share the F32 one), a GGUF side whose dequantizers are compiled in the child too."""
    from weightdiff.io.safetensors_write import save_file, to_storage

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (300, 300))          # 90,000 elements: more than one chunk (the parallel drivers)
    v = rng.normal(1, 0.1, 300)
    low = 1e-2 * np.outer(rng.normal(size=300), rng.normal(size=300)) * 0.02
    base = {"model.layers.0.mlp.down_proj.weight": ("BF16", to_storage(w, "BF16")),
            "model.layers.0.input_layernorm.weight": ("BF16", to_storage(v, "BF16")),
            "model.layers.0.mlp.up_proj.weight": ("F32", w[:64].astype(np.float32)),
            "model.layers.0.post_attention_layernorm.weight": ("BF16", to_storage(v, "BF16"))}
    tuned = {"model.layers.0.mlp.down_proj.weight": ("BF16", to_storage(w + low, "BF16")),
             "model.layers.0.input_layernorm.weight": ("BF16", to_storage(v * 1.01, "BF16")),
             "model.layers.0.mlp.up_proj.weight": ("F32", (w[:64] + 1e-3).astype(np.float32)),
             "model.layers.0.post_attention_layernorm.weight": ("BF16", to_storage(v, "BF16"))}
    for side, t in (("base", base), ("tuned", tuned)):
        (tmp_path / side).mkdir()
        save_file(tmp_path / side / "model.safetensors", t, {"format": "pt"})
    got = _run(tmp_path, tmp_path / "base", tmp_path / "tuned", ["BF16:BF16", "F32:F32", "assignment"])
    assert got["during"] == {}, got                 # every kernel of the run loaded from the child's cache
    assert got["hits"] > 0 and got["left"] == []    # ... it did load some; markers written for both dtype pairs
    assert got["after"], got                        # and a compile in this process is seen by the count
    assert len(got["peaks"]) == 2 and all(50 < p < 2000 for p in got["peaks"]), got   # the child's own VmHWM, MB
    doc = json.loads((tmp_path / "o.json").read_text())
    ranked = [t for t in doc["tensors"] if t.get("rank")]
    assert ranked and {t["status"] for t in doc["tensors"]} >= {"changed", "unchanged"}

    gguf = pytest.importorskip("gguf")
    from gguf_build import to_gguf
    from models import llama

    from conftest import write_checkpoint
    from weightdiff.io.checkpoint import locate

    Q = gguf.GGMLQuantizationType
    t = llama(np.random.default_rng(1), layers=2, hidden=64, inter=128, vocab=96, kv=32)
    base = write_checkpoint(tmp_path / "gbase", t)
    path = to_gguf(tmp_path / "m.gguf", t, "llama", Q.Q8_0, n_head=4, n_kv=2, layers=2, types={"blk.1.": Q.Q4_0})
    with locate(path) as ck:
        assert precompile.gguf_keys([ck]) == ["ggml:Q4_0", "ggml:Q8_0"]
    got = _run(tmp_path, base, path, ["F32:F32", "ggml:Q4_0", "ggml:Q8_0"])
    assert got["during"] == {} and got["hits"] > 0 and got["left"] == [], got   # the dequantizers too


def test_the_child_never_imports_from_the_current_folder(tmp_path):
    """A checkpoint folder (the current folder of a run) holding a ``weightdiff`` package of its own: the child
    must not run it (``python -m`` and ``-c`` put the current folder first on the path)."""
    planted = tmp_path / "here" / "weightdiff" / "measure"
    planted.mkdir(parents=True)
    proof = tmp_path / "ran"
    for folder in (planted.parent, planted):
        (folder / "__init__.py").write_text(f"open({str(proof)!r}, 'w').write('planted')\n")
    (planted / "precompile.py").write_text(f"open({str(proof)!r}, 'w').write('planted')\n")
    code = ("import os, sys\nfrom weightdiff.measure import precompile\nos.chdir(sys.argv[1])\n"
            "print('RAN', precompile.ensure_keys([precompile.ASSIGNMENT]))")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "WEIGHTDIFF_PRECOMPILE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "here")], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAN True" in out.stdout and not proof.exists()      # the real child ran; the planted one never did
