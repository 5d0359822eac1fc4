"""The assignment solver and MLP neuron permutation detection on plain numpy arrays."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from weightdiff.kernels.assignment import assignment_cost, linear_assignment
from weightdiff.measure.permutation import (find_permutation, keep_matched, match_neurons, members_follow, mlp_groups, undo,
                                           undo_member)


def _brute(cost: np.ndarray) -> float:
    n, m = cost.shape
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def test_assignment_hand_worked_example():
    # row 0 takes column 1 (cost 1), row 1 column 0 (2), row 2 column 2 (2): total 5
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    col = linear_assignment(cost)
    assert col.tolist() == [1, 0, 2]
    assert assignment_cost(cost, col) == 5.0


def test_assignment_matches_brute_force(rng):
    for _ in range(150):
        n = int(rng.integers(1, 6))
        m = n + int(rng.integers(0, 3))
        cost = rng.integers(-3, 5, (n, m)).astype(float)     # many ties on purpose
        col = linear_assignment(cost)
        assert len(set(col.tolist())) == n and col.min() >= 0 and col.max() < m
        assert assignment_cost(cost, col) == pytest.approx(_brute(cost))


def test_assignment_maximize_recovers_a_permutation(rng):
    n = 300
    p = rng.permutation(n)
    sim = np.zeros((n, n))
    sim[np.arange(n), p] = 1.0
    sim += 0.3 * rng.random((n, n))
    assert (linear_assignment(sim, maximize=True) == p).all()


def test_assignment_edge_cases():
    assert linear_assignment(np.zeros((0, 3))).tolist() == []
    assert linear_assignment(np.zeros((1, 1))).tolist() == [0]
    with pytest.raises(ValueError, match="more rows than columns"):
        linear_assignment(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        linear_assignment(np.array([[np.nan]]))


def _mlp(rng, n=96, d=32):
    return {"gate": rng.standard_normal((n, d)), "up": rng.standard_normal((n, d)),
            "down": rng.standard_normal((d, n))}


def _permuted(m, p, noise, rng):
    # tuned neuron i is base neuron p[i]: gate/up rows and down columns move together
    return {"gate": m["gate"][p] + noise * rng.standard_normal(m["gate"].shape),
            "up": m["up"][p] + noise * rng.standard_normal(m["up"].shape),
            "down": m["down"][:, p] + noise * rng.standard_normal(m["down"].shape)}


def _members(m):
    return [(m["gate"], 0), (m["up"], 0), (m["down"], 1)]


@pytest.mark.parametrize("exact_max", [2048, 0])      # 0 forces the projection path
def test_find_permutation_recovers_shuffled_neurons(rng, exact_max):
    base = _mlp(rng)
    p = rng.permutation(96)
    tuned = _permuted(base, p, 0.02, rng)
    f = find_permutation(_members(tuned), _members(base), exact_max=exact_max, group="g")
    assert f.applied and (f.perm == p).all()
    assert f.method == ("exact" if exact_max else "projection")
    assert f.matched_cosine > 0.99 and f.identity_cosine < 0.2
    assert f.moved == int(np.count_nonzero(p != np.arange(96)))
    # undoing puts every tuned neuron back where the base has it
    aligned = undo(tuned["gate"], f.perm, 0)
    assert np.abs(aligned - base["gate"]).max() < 0.2
    assert np.allclose(undo(tuned["down"], f.perm, 1), base["down"], atol=0.2)


def test_identity_is_not_reported(rng):
    base = _mlp(rng)
    tuned = _permuted(base, np.arange(96), 0.02, rng)
    f = find_permutation(_members(tuned), _members(base))
    assert not f.applied and f.moved == 0 and f.matched_cosine == f.identity_cosine > 0.99


def test_unrelated_models_are_never_aligned(rng):
    a, b = _mlp(rng), _mlp(rng)
    for exact_max in (2048, 0):
        f = find_permutation(_members(a), _members(b), exact_max=exact_max)
        assert not f.applied and f.moved == 0 and abs(f.matched_cosine) < 0.2


def test_zero_neurons_do_not_break_matching(rng):
    base = _mlp(rng)
    base["gate"][:5] = 0
    base["up"][:5] = 0
    base["down"][:, :5] = 0
    p = rng.permutation(96)
    f = find_permutation(_members(_permuted(base, p, 0.0, rng)), _members(base))
    assert f.applied
    live = np.flatnonzero(np.abs(base["gate"]).sum(1) > 0)
    assert (f.perm[np.isin(p, live)] == p[np.isin(p, live)]).all()


def test_match_neurons_projection_resolves_conflicts(rng):
    # two near-duplicate base neurons: nearest-neighbour alone would map both tuned rows to one
    sb = rng.standard_normal((50, 16))
    sb[1] = sb[0] + 1e-3
    st = sb[::-1].copy()
    perm, method = match_neurons(sig_tuned=st, sig_base=sb, exact_max=0)
    assert method == "projection" and len(set(perm.tolist())) == 50


def test_mlp_groups_by_family():
    shapes = {
        "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16), "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "transformer.h.0.mlp.c_fc.weight": (8, 32), "transformer.h.0.mlp.c_fc.bias": (32,),
        "transformer.h.0.mlp.c_proj.weight": (32, 8), "transformer.h.0.attn.c_proj.weight": (8, 8),
        "encoder.layer.1.intermediate.dense.weight": (32, 8), "encoder.layer.1.intermediate.dense.bias": (32,),
        "encoder.layer.1.output.dense.weight": (8, 32), "encoder.layer.1.attention.output.dense.weight": (8, 8),
        "model.layers.1.mlp.gate_up_proj.weight": (32, 8), "model.layers.1.mlp.down_proj.weight": (8, 16),
    }
    groups = {g.prefix: g for g in mlp_groups(shapes)}
    assert sorted(groups) == ["encoder.layer.1", "model.layers.0.mlp", "model.layers.1.mlp", "transformer.h.0.mlp"]
    assert groups["model.layers.0.mlp"].neurons == 16
    # Phi-3's fused gate_up: 32 rows are 16 neurons' gate rows, then their up rows
    assert groups["model.layers.1.mlp"].neurons == 16
    assert sorted(groups["model.layers.1.mlp"].members) == [
        ("model.layers.1.mlp.down_proj.weight", 1, "out"), ("model.layers.1.mlp.gate_up_proj.weight", 0, "in:2")]
    # an odd row count cannot be two halves: no group
    assert not mlp_groups({"m.mlp.gate_up_proj.weight": (33, 8), "m.mlp.down_proj.weight": (8, 16)})
    assert sorted(groups["transformer.h.0.mlp"].members) == [
        ("transformer.h.0.mlp.c_fc.bias", 0, "bias"), ("transformer.h.0.mlp.c_fc.weight", 1, "in"),
        ("transformer.h.0.mlp.c_proj.weight", 0, "out")]
    assert groups["encoder.layer.1"].neurons == 32


@pytest.mark.parametrize("exact_max", [2048, 0])
def test_fused_gate_up_neurons_move_as_one_and_undo_puts_both_halves_back(rng, exact_max):
    base = _mlp(rng)
    p = rng.permutation(96)
    tuned = _permuted(base, p, 0.02, rng)
    fused = lambda m: [(np.concatenate([m["gate"], m["up"]]), 0), (m["down"], 1)]   # noqa: E731
    f = find_permutation(fused(tuned), fused(base), exact_max=exact_max, roles=["in:2", "out"])
    assert f.applied and (f.perm == p).all() and f.neurons == 96
    back = undo_member(np.concatenate([tuned["gate"], tuned["up"]]), f.perm, 0, "in:2")
    assert np.allclose(back, np.concatenate([base["gate"], base["up"]]), atol=0.2)
    pairs = [(np.concatenate([tuned["gate"], tuned["up"]]), np.concatenate([base["gate"], base["up"]]), 0, "in:2"),
             (tuned["down"], base["down"], 1)]
    assert members_follow(pairs, f.perm)
    # a new gate half beside the base's up rows: the fused tensor as a whole keeps cosine ~0.7, each part
    # is judged alone
    pairs[0] = (np.concatenate([rng.standard_normal((96, 32)), tuned["up"]]), pairs[0][1], 0, "in:2")
    assert not members_follow(pairs, f.perm)


def test_rows_from_base_finds_remapped_trimmed_and_trained_rows_and_nothing_else(rng):
    from weightdiff.measure.permutation import rows_from_base

    b = rng.standard_normal((300, 32)).astype(np.float32)
    bf = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)      # noqa: E731  (bf16 storage, truncated)
    p = rng.permutation(300)
    assert rows_from_base(b[p], b, "F32", "F32")
    assert rows_from_base(bf(b[p]), bf(b), "BF16", "BF16")              # bitwise, in the stored dtype
    assert rows_from_base(b[np.sort(rng.choice(300, 160, replace=False))], b, "F32", "F32")
    assert rows_from_base(b[p] + 0.05 * rng.standard_normal(b.shape).astype(np.float32), b, "F32", "F32")
    assert rows_from_base(bf(b[p]), b, "BF16", "F32")                   # other dtypes: by cosine
    assert not rows_from_base(rng.standard_normal((300, 32)).astype(np.float32), b, "F32", "F32")
    assert not rows_from_base(np.repeat(b[:1], 300, 0), b, "F32", "F32")     # one base row, many times
    assert not rows_from_base(b[:, :16], b, "F32", "F32")                    # another width
    half = b[p].copy()
    half[::2] = rng.standard_normal((150, 32))                                # half the rows new
    assert not rows_from_base(half, b, "F32", "F32")


@pytest.mark.parametrize("exact_max", [2048, 0])
def test_neurons_flipped_in_sign_are_never_shuffled_into_a_reordering(rng, exact_max):
    # up rows and down columns of a few neurons times -1 (SwiGLU computes the same): the assignment pairs
    # those neurons among themselves at cosine ~0 (better than their own -1/3), and a mean over the
    # 90 untouched neurons accepted it: "neurons reordered" and an untouched gate_proj "changed"
    base = _mlp(rng)
    s = np.ones(96)
    s[rng.choice(96, 10, replace=False)] = -1.0
    tuned = {"gate": base["gate"].copy(), "up": base["up"] * s[:, None], "down": base["down"] * s[None, :]}
    f = find_permutation(_members(tuned), _members(base), exact_max=exact_max)
    assert not f.applied and f.moved == 0
    # the same flips beside a real reordering: every neuron is found where it went, the flipped ones too (each
    # member counts up to its sign; with the vectors concatenated a flipped neuron summed to a cosine of -1/3 and
    # stayed put, and the model read "a fine-tune" with up and down far from the base)
    p = rng.permutation(96)
    shuffled = {k: (v[p] if k != "down" else v[:, p]) for k, v in tuned.items()}
    f = find_permutation(_members(shuffled), _members(base), exact_max=exact_max)
    assert f.applied and (f.perm == p).all() and f.matched_cosine > 0.999
    # flipped, rescaled and reordered, with some noise: still every neuron
    c = s * rng.uniform(0.5, 2.0, 96)
    scaled = {"gate": base["gate"][p], "up": (base["up"] * c[:, None])[p], "down": (base["down"] / c[None, :])[:, p]}
    scaled = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in scaled.items()}
    f = find_permutation(_members(scaled), _members(base), exact_max=exact_max)
    assert f.applied and (f.perm == p).all()
    # counting signs away does not align two unrelated MLPs
    f = find_permutation(_members(_mlp(np.random.default_rng(5))), _members(base), exact_max=exact_max)
    assert not f.applied and f.matched_cosine < 0.3


def test_keep_matched_keeps_a_bijection(rng):
    for _ in range(50):
        n = int(rng.integers(1, 40))
        perm = rng.permutation(n)
        good = rng.random(n) < 0.5
        kept = keep_matched(perm, good)
        assert sorted(kept.tolist()) == list(range(n))
        assert (kept[good] == perm[good]).all()
        # a unit that is not good stays where it stands whenever its own place is free
        taken = set(perm[good].tolist())
        for i in np.flatnonzero(~good):
            if i not in taken:
                assert kept[i] == i


def test_many_unmatched_neurons_keep_their_order_in_bounded_memory(rng, monkeypatch):
    # two unrelated MLPs, 14,336 neurons each in a 7B model: the neurons the mutual nearest neighbours leave were
    # matched greedily on a [rest, rest] float64 matrix (1.6 GB); past GREEDY_MAX they keep their order
    import weightdiff.measure.permutation as P

    monkeypatch.setattr(P, "GREEDY_MAX", 8)
    st, sb = rng.standard_normal((64, 16)), rng.standard_normal((64, 16))
    perm, method = P.match_neurons(sig_tuned=[st, st], sig_base=[sb, sb], exact_max=0)
    assert method == "projection" and sorted(perm.tolist()) == list(range(64))      # a bijection still
    # a real reordering is still found whole (every neuron a mutual nearest neighbour)
    p = rng.permutation(64)
    perm, _ = P.match_neurons(sig_tuned=[sb[p], sb[p]], sig_base=[sb, sb], exact_max=0)
    assert (perm == p).all()


def _narrow_mlp_model(rng, order=None, scale: float = 1.0) -> dict:
    """Three blocks; block 1's MLP is 8 wide with 200 neurons (the others 64 wide): up, down, q, a norm."""
    out = {}
    for layer, (h, f) in enumerate(((64, 200), (8, 200), (64, 128))):
        up, down = rng.standard_normal((f, h)) * 0.02, rng.standard_normal((h, f)) * 0.02
        if order is not None and layer == 1:
            up, down = up[order], down[:, order]
        out[f"model.layers.{layer}.mlp.up_proj.weight"] = up * scale
        out[f"model.layers.{layer}.mlp.down_proj.weight"] = down * scale
        out[f"model.layers.{layer}.self_attn.q_proj.weight"] = rng.standard_normal((h, h)) * 0.02
        out[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(h)
    return out


def test_an_mlp_eight_wide_of_another_model_is_no_reordering(tmp_path):
    """Two independent models whose block-1 MLP is 8 wide: 199 of its 200 neurons matched base neurons above the
    0.5 cut (the best of 200 random 8-number vectors is near 0.8), it read "the base's MLP neurons in another
    order", and the block "shared" in a verdict of partial. The cut is now above chance for the vectors' length."""
    from conftest import write_checkpoint
    from weightdiff import compare

    base = _narrow_mlp_model(np.random.default_rng(50))
    other = _narrow_mlp_model(np.random.default_rng(51))
    res = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", other))
    assert res.summary.verdict == "unrelated", res.summary.verdict_reason
    assert not any("neurons in this model's order" in (t.note or "") for t in res.tensors)
    # the base's own neurons in another order are still found at this width (their cosine is 1)
    order = np.random.default_rng(52).permutation(200)
    rng = np.random.default_rng(50)
    shuffled = _narrow_mlp_model(rng, order=order)
    res = compare(write_checkpoint(tmp_path / "b2", base), write_checkpoint(tmp_path / "s", shuffled))
    assert res.summary.verdict == "identical" or "permuted_units" in res.summary.flags, res.summary.verdict_reason
