"""The neuron matching and its follow-up check read stored matrices in row blocks, never whole.

At 70B width (28,672 neurons x 8,192) a member decoded whole is 940 MB in float32 and 1.9 GB in float64; the
matcher held several such copies (tuned, base, the base gathered) and the follow-up check as many again: a
permuted MLP ran to 12.8 GB. Here blocks are a few rows, and every array a reader hands back is counted.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from weightdiff.io.checkpoint import locate
from weightdiff.measure import rotation as rot
from weightdiff.measure.permutation import (detect_permutations, find_permutation, members_follow,
                                            members_follow_stored)

N, H = 300, 24


def _mlp(rng, fused: bool):
    g, u = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    d = rng.standard_normal((H, N))
    if fused:
        return {"m.layers.0.mlp.gate_up_proj.weight": np.concatenate([g, u]).astype(np.float32),
                "m.layers.0.mlp.down_proj.weight": d.astype(np.float32)}
    return {"m.layers.0.mlp.gate_proj.weight": g.astype(np.float32),
            "m.layers.0.mlp.up_proj.weight": u.astype(np.float32),
            "m.layers.0.mlp.down_proj.weight": d.astype(np.float32)}


def _permuted(base: dict, perm: np.ndarray, rng) -> dict:
    out = {}
    for k, v in base.items():
        if "down" in k:
            v = v[:, perm] + 1e-2 * rng.standard_normal(v.shape)
        elif "gate_up" in k:
            v = np.concatenate([v[:N][perm], v[N:][perm]])
        else:
            v = v[perm]
        out[k] = np.asarray(v, np.float32)
    return out


def _spied(ck, seen: list):
    """``ck`` with every array its readers return recorded as (name, elements)."""
    read, read_rows, windows = ck.read, ck.read_rows, ck.windows

    def r(name, *a, **k):
        got = read(name, *a, **k)
        seen.append((name, np.asarray(got).size, "read"))
        return got

    def rr(name, rows, *a, **k):
        got = read_rows(name, rows, *a, **k)
        seen.append((name, np.asarray(got).size, "read_rows"))
        return got

    def w(name, *a, **k):
        for got in windows(name, *a, **k):
            seen.append((name, np.asarray(got).size, "windows"))
            yield got

    ck.read, ck.read_rows, ck.windows = r, rr, w
    return ck


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("exact_max", [64, 2048])
def test_permuted_neurons_are_found_in_row_blocks(tmp_path, rng, monkeypatch, fused, exact_max):
    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * H * 16)          # 16 rows of gate/up, 5 of a fused one's columns
    base = _mlp(rng, fused)
    perm = rng.permutation(N)
    tuned = _permuted(base, perm, rng)
    seen: list = []
    bc = _spied(locate(write_checkpoint(tmp_path / "b", base)), seen)
    tc = _spied(locate(write_checkpoint(tmp_path / "t", tuned)), seen)
    names = {k: k for k in base}
    (f,) = detect_permutations(bc, tc, names, exact_max=exact_max)
    assert f.applied and f.moved > N * 0.9
    # the same answer as the matrices held whole
    mats = [(n, ax, role) for n, ax, role in f.members]
    whole = find_permutation([(tuned[n], ax) for n, ax, _ in mats], [(base[n], ax) for n, ax, _ in mats],
                             exact_max=exact_max, group=f.group, roles=[r for _, _, r in mats])
    assert np.array_equal(whole.perm, f.perm) and whole.method == f.method
    assert whole.matched_cosine == pytest.approx(f.matched_cosine, rel=1e-9)
    assert members_follow_stored(tc, bc, [(n, n, ax, role) for n, ax, role in mats], f.perm)
    assert members_follow([(tuned[n], base[n], ax, role) for n, ax, role in mats], f.perm)
    # a new down projection beside the base's gate and up is no reordering of the base's MLP
    assert not members_follow_stored(tc, bc, [(n, n, ax, role) for n, ax, role in mats], np.arange(N))
    # no reader handed back a whole matrix (nor a quarter of one)
    assert seen and all(kind != "read" for _, _, kind in seen), {n for n, _, k in seen if k == "read"}
    largest = max(size for _, size, _ in seen)
    assert largest <= N * H // 4, largest


def test_permuted_heads_are_found_in_row_blocks(tmp_path, rng, monkeypatch):
    from weightdiff.measure.permutation import expand_units, heads_order, member_sources

    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * 64 * 4)
    hid, d, h, kv = 48, 16, 8, 2
    base = {"q": rng.standard_normal((h * d, hid)), "k": rng.standard_normal((kv * d, hid)),
            "v": rng.standard_normal((kv * d, hid)), "o": rng.standard_normal((hid, h * d))}
    base = {f"m.layers.0.self_attn.{k}_proj.weight": v.astype(np.float32) for k, v in base.items()}
    pq = rng.permutation(h)
    rows = expand_units(pq, d)
    tuned = {k: (v[:, rows] if ".o_proj" in k else v[rows] if ".q_proj" in k else v)
             + 1e-3 * rng.standard_normal(v.shape) for k, v in base.items()}
    tuned = {k: v.astype(np.float32) for k, v in tuned.items()}
    seen: list = []
    bc = _spied(locate(write_checkpoint(tmp_path / "b", base)), seen)
    tc = _spied(locate(write_checkpoint(tmp_path / "t", tuned)), seen)
    mats, whole = {}, {}
    for part in "qkvo":
        name = f"m.layers.0.self_attn.{part}_proj.weight"
        (t,), (b,) = member_sources(tc, bc, [(name, name, 0)])
        mats[part], whole[part] = (t, b), (tuned[name], base[name])
    got, want = heads_order(mats), heads_order(whole)
    assert got and want and got.d == want.d == d and np.array_equal(got.q, want.q) and np.array_equal(got.q, pq)
    assert (got.kv is None) == (want.kv is None)
    assert seen and all(kind != "read" for _, _, kind in seen)
    assert max(size for _, size, _ in seen) <= h * d * hid // 4


def test_permuted_experts_are_found_in_row_blocks(tmp_path, rng, monkeypatch):
    from weightdiff.measure.permutation import experts_permuted, member_sources

    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * 32 * 16)
    e, n, hid = 4, 40, 32
    base = {}
    for i in range(e):
        base[f"m.layers.0.mlp.experts.{i}.w1.weight"] = rng.standard_normal((n, hid)).astype(np.float32)
        base[f"m.layers.0.mlp.experts.{i}.w2.weight"] = rng.standard_normal((hid, n)).astype(np.float32)
    perm = np.array([2, 0, 3, 1])
    tuned = {k: (base[k.replace(f"experts.{k.split('.')[5]}.", f"experts.{perm[int(k.split('.')[5])]}.")]
                 + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    seen: list = []
    bc = _spied(locate(write_checkpoint(tmp_path / "b", base)), seen)
    tc = _spied(locate(write_checkpoint(tmp_path / "t", tuned)), seen)
    names = {i: [f"m.layers.0.mlp.experts.{i}.{w}.weight" for w in ("w1", "w2")] for i in range(e)}
    stored = {i: list(zip(*member_sources(tc, bc, [(x, x, 0) for x in v]))) for i, v in names.items()}
    whole = {i: [(tuned[x], base[x]) for x in v] for i, v in names.items()}
    got, want = experts_permuted(stored), experts_permuted(whole)
    assert np.array_equal(got, want) and np.array_equal(got, perm)
    assert seen and all(kind != "read" for _, _, kind in seen)
    assert max(size for _, size, _ in seen) < n * hid
