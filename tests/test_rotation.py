"""A rotated residual stream (QuaRot, SpinQuant, a permuted hidden dimension) is measured beneath the rotation.

Folding each RMSNorm's gains into the matrices that read it and multiplying the hidden dimension by an
orthogonal R leaves what a Llama computes as it was (checked against transformers by the tester who found it),
yet every matrix moves: as stored the model read "UNRELATED: not derived from this base" and provenance ranked the
true base behind an independent model. The reference: the base rotated reads derived with nothing changed beneath
the rotation; a fine-tune rotated measures as the fine-tune; two independent models still read unrelated.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.measure import rotation as rot
from weightdiff.render.sentences import verdict_title

READ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITE = ("self_attn.o_proj", "mlp.down_proj")


def _orthogonal(d: int, seed: int = 42) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def _rotated(t: dict, r: np.ndarray, layers: int = 4, fold: bool = True) -> dict:
    """QuaRot's fold and rotation, in float64 then stored as float32."""
    o = {k: v.astype(np.float64) for k, v in t.items()}
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, kinds in (("input_layernorm", READ[:3]), ("post_attention_layernorm", READ[3:])):
            g = o[p + norm + ".weight"]
            for k in kinds:
                o[p + k + ".weight"] = (o[p + k + ".weight"] * g[None, :] if fold else o[p + k + ".weight"]) @ r
            if fold:
                o[p + norm + ".weight"] = np.ones_like(g)
        for k in WRITE:
            o[p + k + ".weight"] = r.T @ o[p + k + ".weight"]
    g = o["model.norm.weight"]
    o["lm_head.weight"] = (o["lm_head.weight"] * g[None, :] if fold else o["lm_head.weight"]) @ r
    if fold:
        o["model.norm.weight"] = np.ones_like(g)
    o["model.embed_tokens.weight"] = o["model.embed_tokens.weight"] @ r
    return {k: v.astype(np.float32) for k, v in o.items()}


def _tuned(t: dict, rel: float = 2e-2, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rel * float(v.std()) * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
            for k, v in t.items()}


def test_procrustes_and_the_rotated_side_agree_with_numpy(rng):
    r = _orthogonal(16)
    e = rng.standard_normal((40, 16))
    w = rng.standard_normal((16, 24))
    fit = rot.Rotation(16)
    fit.add(e.T @ (e @ r))              # what in_cross sums: B^T T for tuned = B R
    fit.add(w @ (r.T @ w).T)            # what out_cross sums: B T^T for tuned = R^T B
    assert np.allclose(fit.solve(), r, atol=1e-12) and fit.pairs == 2
    g = rng.random(16) + 0.5
    x = rng.standard_normal((8, 16))
    assert np.allclose(rot.apply("in", x, r, g), (x * g) @ r)
    assert np.allclose(rot.apply("out", w, r), r.T @ w)
    assert rot.small_rotation(np.eye(8)) and not rot.small_rotation(_orthogonal(8))


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_the_base_rotated_reads_derived_with_nothing_changed_beneath(tmp_path, rng, dtype):
    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    t = write_checkpoint(tmp_path / "rot", _rotated(base, _orthogonal(128)), dtype=dtype)
    s = compare(b, t).summary
    assert s.verdict == "derived" and "rotated_residual" in s.flags
    sc = s.scope["rotated_residual"]
    assert sc["tensors"] == 30 and sc["tensors_changed"] == 0 and sc["norms_folded"] == 9
    assert sc["matrices_held_out"] == 4 and sc["cosine_held_out"] > 0.999
    assert not s.tensors_by_status.get("changed")              # the folded norms measured beneath the fold too
    title = verdict_title(s.to_dict())
    assert "residual stream rotated" in title and "none of its other weights changed" in title
    assert "unrelated" not in (s.verdict_reason or "").lower()
    assert not any(c["status"] == "unrelated" for c in s.components)


def test_a_permuted_hidden_dimension_is_a_rotation(tmp_path, rng):
    """Every column a base column, every norm the base's gains in the same new order: nothing changed beneath it.
    Norms left in the base's order scale other coordinates than their own: the model computes something else."""
    base = llama(rng)
    order = np.random.default_rng(5).permutation(128)
    p = np.eye(128)[order]
    permuted = _rotated(base, p, fold=False)
    b = write_checkpoint(tmp_path / "b", base)
    s = compare(b, write_checkpoint(tmp_path / "left", permuted)).summary
    assert s.verdict == "derived" and s.scope["rotated_residual"]["tensors_changed"] == 0
    assert s.scope["rotated_residual"]["norms_unfolded"] == 9
    assert "computes something else" in verdict_title(s.to_dict())
    for k, v in base.items():
        if k.endswith("norm.weight"):
            permuted[k] = (p.T @ v.astype(np.float64)).astype(np.float32)      # the gains follow their channels
    s = compare(b, write_checkpoint(tmp_path / "p", permuted)).summary
    assert s.verdict == "derived" and s.scope["rotated_residual"]["tensors_changed"] == 0
    assert s.scope["rotated_residual"]["norms_unfolded"] == 0 and s.tensors_by_status.get("changed", 0) == 0
    assert "computes something else" not in verdict_title(s.to_dict())


def test_a_fine_tune_rotated_measures_as_the_fine_tune(tmp_path, rng):
    base = llama(rng)
    ft = _tuned(base)
    b = write_checkpoint(tmp_path / "b", base)
    plain = compare(b, write_checkpoint(tmp_path / "ft", ft)).summary
    s = compare(b, write_checkpoint(tmp_path / "rft", _rotated(ft, _orthogonal(128)))).summary
    assert s.verdict == "derived" and s.scope["rotated_residual"]["tensors_changed"] == 30
    assert "a fine-tune of this base" in verdict_title(s.to_dict())
    # beneath the rotation: the fine-tune's own distance (the whole model's counts the folded norms too)
    assert s.relatedness_rel_change == pytest.approx(plain.relatedness_rel_change, rel=0.02)
    assert s.relatedness_cosine == pytest.approx(plain.relatedness_cosine, abs=1e-5)


def test_independent_models_and_a_new_embedding_are_not_rotations(tmp_path, rng):
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    other = compare(b, write_checkpoint(tmp_path / "o", llama(np.random.default_rng(99)))).summary
    assert other.verdict == "unrelated" and "rotated_residual" not in other.flags
    # a fine-tune whose token embedding was initialised anew: R fits the identity, nothing is rotated
    new = dict(_tuned(base))
    new["model.embed_tokens.weight"] = np.random.default_rng(7).normal(0, 0.02, (512, 128)).astype(np.float32)
    s = compare(b, write_checkpoint(tmp_path / "n", new)).summary
    assert "rotated_residual" not in s.flags and s.verdict in ("derived", "partial")


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_norms_folded_without_a_rotation_read_as_a_fold(tmp_path, rng, dtype):
    """QuaRot's first step alone (each RMSNorm's gains folded into the matrices that read it, the norms set to
    ones) computes what the base computes, yet read "a fine-tune of this base", dense, 61% of the model."""
    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    s = compare(b, write_checkpoint(tmp_path / "fold", _rotated(base, np.eye(128)), dtype=dtype)).summary
    assert s.verdict == "derived" and "folded_norms" in s.flags and "rotated_residual" not in s.flags
    assert s.scope["folded_norms"] == {"norms": 9, "tensors": 21, "tensors_changed": 0}
    title = verdict_title(s.to_dict())
    assert "gains of 9 norms folded" in title and "none of its other weights changed" in title, title
    # a fine-tune with its norms reset to ones is no fold: its matrices were not multiplied by the gains
    ft = _tuned(base)
    for k in ft:
        if k.endswith("norm.weight"):
            ft[k] = np.ones_like(ft[k])
    s = compare(b, write_checkpoint(tmp_path / "reset", ft)).summary
    assert "folded_norms" not in s.flags and "a fine-tune" in verdict_title(s.to_dict())


@pytest.mark.parametrize("how", ["signs", "scales"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_units_rescaled_or_sign_flipped_one_by_one_are_measured_beneath(tmp_path, rng, how, dtype):
    """Up rows times c and down columns divided by c (a gated MLP computes the same), or c = -1 for some neurons:
    as stored "a fine-tune, dense", and the sign flips were taken for a reordering."""
    base = llama(rng)
    tuned = dict(base)
    r = np.random.default_rng(9)
    c = np.where(r.random(256) < 0.2, -1.0, 1.0) if how == "signs" else r.uniform(0.5, 2.0, 256)
    for i in (1, 2):
        p = f"model.layers.{i}.mlp."
        tuned[p + "up_proj.weight"] = (base[p + "up_proj.weight"] * c[:, None]).astype(np.float32)
        tuned[p + "down_proj.weight"] = (base[p + "down_proj.weight"] / c[None, :]).astype(np.float32)
    b = write_checkpoint(tmp_path / "b", base, dtype=dtype)
    s = compare(b, write_checkpoint(tmp_path / "t", tuned, dtype=dtype)).summary
    assert s.verdict == "derived" and "rescaled_units" in s.flags and "permuted_units" not in s.flags
    assert s.scope["rescaled_units"]["tensors"] == 4 and s.scope["rescaled_units"]["tensors_changed"] == 0
    assert (s.scope["rescaled_units"]["negative"] > 0) == (how == "signs")
    title = verdict_title(s.to_dict())
    assert "rescaled" in title and "none of its other weights changed" in title, title
    # a dense fine-tune of every matrix reads nothing again and is no rescale
    s = compare(b, write_checkpoint(tmp_path / "ft", _tuned(base), dtype=dtype)).summary
    assert "rescaled_units" not in s.flags
    # up's rows scaled with down left alone (a DoRA magnitude trained) changes what the model computes: a change
    alone = dict(base)
    alone["model.layers.1.mlp.up_proj.weight"] = tuned["model.layers.1.mlp.up_proj.weight"]
    s = compare(b, write_checkpoint(tmp_path / "alone", alone, dtype=dtype)).summary
    assert "rescaled_units" not in s.flags and s.tensors_by_status.get("changed") == 1


def test_the_rotation_fit_survives_a_retrained_block_and_is_not_skewed(tmp_path, rng):
    """From the verification round: one block replaced after the rotation vetoed the whole fit (UNRELATED for a
    model three quarters the base rotated); two matrices fine-tuned after it skewed R so that every untouched
    matrix read changed; a fine-tune never rotated, with a new embedding, was taken for a rotation."""
    base = llama(rng)
    r = _orthogonal(128)
    b = write_checkpoint(tmp_path / "b", base)
    rotated = _rotated(base, r)
    other = llama(np.random.default_rng(77))
    replaced = dict(rotated)
    for k in other:
        if k.startswith("model.layers.3."):
            replaced[k] = other[k]
    s = compare(b, write_checkpoint(tmp_path / "rep", replaced)).summary
    assert "rotated_residual" in s.flags and s.verdict in ("derived", "partial")
    assert s.scope["rotated_residual"]["matrices_explained"] < s.scope["rotated_residual"]["matrices_held_out"]
    two = dict(rotated)
    for k in ("model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        two[k] = (two[k] + 0.2 * float(two[k].std()) * rng.standard_normal(two[k].shape)).astype(np.float32)
    s = compare(b, write_checkpoint(tmp_path / "two", two)).summary
    assert s.scope["rotated_residual"]["tensors_changed"] == 2
    never = _tuned(base)
    never["model.embed_tokens.weight"] = np.random.default_rng(8).normal(0, 0.02, (512, 128)).astype(np.float32)
    for k in other:
        if k.startswith("model.layers.2."):
            never[k] = other[k]
    s = compare(b, write_checkpoint(tmp_path / "never", never)).summary
    assert "rotated_residual" not in s.flags


def test_units_reordered_and_flipped_or_rescaled_are_measured_beneath_both(tmp_path, rng):
    """Neurons reordered and their up rows and down columns negated or rescaled alike (a gated MLP computes the
    same), and attention heads reordered with v rows and o columns rescaled: read "a fine-tune" with up and down
    far from the base (the matcher counted a flipped neuron's gate, up and down together, cosine -1/3, so it
    stayed put, and the rescaled pairs were never looked at beneath a reordering)."""
    import json

    base = llama(rng)
    bases = {dtype: write_checkpoint(tmp_path / f"b{dtype}", base, dtype=dtype) for dtype in ("F32", "BF16")}
    b = bases["F32"]
    r = np.random.default_rng(9)

    def edit(signs: bool, gate: bool = False, heads: bool = False) -> dict:
        t = dict(base)
        for i in range(4):
            p = f"model.layers.{i}."
            perm = r.permutation(256)
            c = np.where(r.random(256) < 0.3, -1.0, 1.0) if signs else r.uniform(0.5, 2.0, 256)
            g = np.where(r.random(256) < 0.3, -1.0, 1.0) if gate else np.ones(256)
            t[p + "mlp.gate_proj.weight"] = (base[p + "mlp.gate_proj.weight"] * g[:, None])[perm]
            t[p + "mlp.up_proj.weight"] = (base[p + "mlp.up_proj.weight"] * c[:, None])[perm]
            t[p + "mlp.down_proj.weight"] = (base[p + "mlp.down_proj.weight"] / c[None, :])[:, perm]
            if heads:       # 4 heads of 32 rows: reordered in q, k, v and o, then v's rows times c, o's columns / c
                rows = (r.permutation(4)[:, None] * 32 + np.arange(32)).reshape(-1)
                cv = r.uniform(0.5, 2.0, 128) * np.where(r.random(128) < 0.3, -1.0, 1.0)
                for k in ("q", "k"):
                    t[p + f"self_attn.{k}_proj.weight"] = base[p + f"self_attn.{k}_proj.weight"][rows]
                t[p + "self_attn.v_proj.weight"] = (base[p + "self_attn.v_proj.weight"][rows] * cv[:, None])
                t[p + "self_attn.o_proj.weight"] = (base[p + "self_attn.o_proj.weight"][:, rows] / cv[None, :])
        return {k: v.astype(np.float32) for k, v in t.items()}

    for name, dtype, tuned in (("signs", "BF16", edit(True)), ("scales", "F32", edit(False)),
                               ("heads", "F32", edit(True, heads=True))):
        s = compare(bases[dtype], write_checkpoint(tmp_path / name, tuned, dtype=dtype)).summary
        assert s.verdict == "derived" and {"permuted_units", "rescaled_units"} <= set(s.flags), (name, s.flags)
        assert "far_from_base" not in s.flags and not s.tensors_by_status.get("changed"), (name, s.tensors_by_status)
        assert s.scope["rescaled_units"]["tensors"] == (16 if name == "heads" else 8)
        assert (s.scope["rescaled_units"]["negative"] > 0) == (name != "scales")
        assert s.scope["permuted_units"]["tensors_undone"] >= 12
        title = verdict_title(s.to_dict())
        assert "reordered" in title and "rescaled" in title and "none of its other weights changed" in title, title
    # a gate's rows negated too is no reparametrisation (SiLU is not odd): the gates read changed, nothing else
    s = compare(b, write_checkpoint(tmp_path / "gate", edit(True, gate=True))).summary
    assert s.tensors_by_status.get("changed") == 4 and "a fine-tune" in verdict_title(s.to_dict())
    assert all(".gate_proj." in t.name for t in compare(b, tmp_path / "gate").tensors if t.status == "changed")
    # an MLP with no gate (GELU) applies its activation to up's output: a scale moved changes what it computes
    gelu = {k.replace("mlp.up_proj", "mlp.fc1").replace("mlp.down_proj", "mlp.fc2"): v for k, v in base.items()
            if ".gate_proj." not in k}
    bg = write_checkpoint(tmp_path / "bg", gelu)
    moved = dict(gelu)
    c = r.uniform(0.5, 2.0, 256)
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        moved[p + "fc1.weight"] = (gelu[p + "fc1.weight"] * c[:, None]).astype(np.float32)
        moved[p + "fc2.weight"] = (gelu[p + "fc2.weight"] / c[None, :]).astype(np.float32)
    tg = write_checkpoint(tmp_path / "tg", moved)
    s = compare(bg, tg).summary
    assert "rescaled_units" not in s.flags and s.tensors_by_status.get("changed") == 8
    # ... unless its config names ReLU, positively homogeneous, and every factor is positive; the base's config too
    # (a config switched to relu beside a GELU base passed: the model computes something else)
    (tg / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    assert "rescaled_units" not in compare(bg, tg).summary.flags
    (bg / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    s = compare(bg, tg).summary
    assert "rescaled_units" in s.flags and not s.tensors_by_status.get("changed")


def test_a_pair_scaled_alike_is_not_a_scale_moved(tmp_path, rng):
    """v rows and o columns both times 0.985 (what weight decay leaves) changes what the model computes: it
    passed as "scaled inversely" within eight times the rounding bound."""
    base = llama(rng)
    tuned = dict(base)
    for k in ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        tuned[k] = (base[k] * 0.985).astype(np.float32)
    s = compare(write_checkpoint(tmp_path / "b", base, dtype="BF16"),
                write_checkpoint(tmp_path / "t", tuned, dtype="BF16")).summary
    assert "rescaled_units" not in s.flags and s.tensors_by_status.get("changed") == 2


def _rotated32(t: dict, r: np.ndarray) -> dict:
    """QuaRot's fold in float64, then the rotation as a float32 matmul computes it (float32 products and sums)."""
    folded = _rotated(t, np.eye(r.shape[0]))
    r32 = r.astype(np.float32)
    return {k: v if v.ndim != 2 else r32.T @ v if any(w in k for w in WRITE) else v @ r32 for k, v in folded.items()}


def test_a_rotation_computed_in_float32_is_rounding_not_a_fine_tune(tmp_path, rng):
    """From the tester of the memo's sentences: the residual stream rotated with a float32 matmul (stored float32)
    leaves round-off of about sqrt(n) 2^-24 relative, just above the bound of one rounding (2^-24): every matrix
    read changed, "a fine-tune ... spread over many directions". A real change of 1e-4 still reads changed."""
    base = llama(rng)
    t = _rotated32(base, _orthogonal(128))
    b = write_checkpoint(tmp_path / "b", base)
    s = compare(b, write_checkpoint(tmp_path / "r32", t)).summary
    assert "rotated_residual" in s.flags and s.scope["rotated_residual"]["tensors_changed"] == 0
    title = verdict_title(s.to_dict())
    assert "a fine-tune" not in title and "none of its other weights changed" in title, title
    k = "model.layers.1.mlp.down_proj.weight"
    t[k] = (t[k] + 1e-4 * float(np.linalg.norm(t[k])) / np.sqrt(t[k].size)
            * np.random.default_rng(4).standard_normal(t[k].shape)).astype(np.float32)
    s = compare(b, write_checkpoint(tmp_path / "r32ft", t)).summary
    assert s.scope["rotated_residual"]["tensors_changed"] == 1


@pytest.mark.parametrize("rows, f32", [(520, False), (480, False), (520, True)])
def test_a_rotated_model_with_token_rows_added_or_trimmed_reads_rotated(tmp_path, rng, rows, f32):
    """From the tester of the memo's sentences: QuaRot's rotation, then 8 token rows appended to the embedding and
    the head (``resize_token_embeddings``), read "UNRELATED ... no sign that one was made from the other": the
    rotation was looked for only with the embedding at the base's shape. R is fitted on the shared rows; the tables
    read as resized (rows added or removed), their shared rows unchanged beneath the rotation (a float32 rotation's
    round-off too)."""
    base = llama(rng)
    t = dict((_rotated32 if f32 else _rotated)(base, _orthogonal(128)))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = np.random.default_rng(11).normal(0, 0.02, (max(0, rows - 512), 128)).astype(np.float32)
        t[k] = np.concatenate([t[k][:rows], extra])
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", t)).summary
    assert s.verdict == "derived" and {"rotated_residual", "resized_embeddings"} <= set(s.flags), (s.verdict, s.flags)
    sc = s.scope["rotated_residual"]
    assert sc["tensors"] == 30 and sc["tensors_changed"] == 0 and sc["norms_folded"] == 9
    assert s.scope["tensors_only_resized"] == 2
    title = verdict_title(s.to_dict())
    assert "residual stream rotated" in title and "none of its other weights changed" in title, title
    assert "a fine-tune" not in title and "rows added" in title
    assert "unrelated" not in (s.verdict_reason or "").lower()


def test_a_tied_base_rotated_with_its_head_untied_reads_rotated(tmp_path, rng):
    """From the tester of the memo's sentences: QuaRot on a base that ties its head (Llama-3.2): the head is untied
    (a copy of the embedding, the final norm's gains folded in) and rotated. Paired with the base's embedding but
    measured as stored, it read "PARTIAL ... head is unrelated". It is measured in the rotated frame, its gains
    found; the title says the head was untied."""
    base = llama(rng, tied=True)
    t = dict(base)
    t["lm_head.weight"] = base["model.embed_tokens.weight"].copy()
    t = _rotated(t, _orthogonal(128))
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", t)).summary
    assert s.verdict == "derived" and "rotated_residual" in s.flags, (s.verdict, s.flags)
    sc = s.scope["rotated_residual"]
    assert sc["tensors"] == 30 and sc["tensors_changed"] == 0 and sc["norms_folded"] == 9 and sc["head_untied"]
    assert not any(c["status"] == "unrelated" for c in s.components)
    title = verdict_title(s.to_dict())
    assert "head untied" in title and "none of its other weights changed" in title, title


def test_pruned_beneath_a_rotation_reads_pruned_not_a_fine_tune(tmp_path, rng):
    """From the tester of the memo's sentences: rotated, then 50% magnitude pruning of one block's matrices in the
    rotated frame (nothing trained) read "a fine-tune", dense: the pruning test compared the kept elements bitwise
    with the stored base, and the rotated base is float64 values. Pruned beneath a rotation is the rotated base with
    exact zeros, the kept elements within the rotation's rounding; a rotated fine-tune, then pruned, is not."""
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)

    def pruned(t: dict) -> dict:
        t = dict(t)
        for k in READ + WRITE:
            w = t[f"model.layers.1.{k}.weight"].copy()
            w[np.abs(w) <= np.median(np.abs(w))] = 0.0
            t[f"model.layers.1.{k}.weight"] = w
        return t

    s = compare(b, write_checkpoint(tmp_path / "p", pruned(_rotated(base, _orthogonal(128))))).summary
    assert s.verdict == "derived" and {"rotated_residual", "pruned_elements"} <= set(s.flags), s.flags
    assert s.scope["pruned_elements"]["tensors"] == 7 and s.scope["pruned_elements"]["beneath"] == 7
    title = verdict_title(s.to_dict())
    assert "a fine-tune" not in title and "pruned" in title and "beneath the rotation" in title, title
    assert "none of its other weights changed" in title, title
    s = compare(b, write_checkpoint(tmp_path / "ftp", pruned(_rotated(_tuned(base, rel=1e-2), _orthogonal(128))))).summary
    assert "pruned_elements" not in s.flags and "a fine-tune" in verdict_title(s.to_dict())
    # the norms' gains folded, nothing rotated, then pruned: q, k, v, gate and up pruned beneath the fold
    s = compare(b, write_checkpoint(tmp_path / "fp", pruned(_rotated(base, np.eye(128))))).summary
    assert "pruned_elements" in s.flags and s.scope["pruned_elements"]["beneath"] == 5, s.scope.get("pruned_elements")
    assert "beneath the fold" in verdict_title(s.to_dict()) and "a fine-tune" not in verdict_title(s.to_dict())


@pytest.mark.parametrize("config", [True, False])
def test_v_and_o_rescaled_under_grouped_query_heads_are_a_rescale(tmp_path, rng, config):
    """From the tester of the memo's sentences: v's rows times a factor and o's columns divided by the factor of the
    v row each reads, with 4 query heads on 2 key-value heads (every current Llama), read "a fine-tune", dense: the
    rescale was looked for one to one. o's columns are matched through the group map, the head size from config.json
    or, without one, the one divisor that fits; o's columns divided by the factors in another order is a change (the
    order of head size 64 against a config that says 32; without a config, an order no head size gives)."""
    import json

    base = llama(rng, kv=64)
    s_v = np.exp(0.5 * np.random.default_rng(7).standard_normal(64))
    j = np.arange(128)
    cols = s_v[((j // 32) // 2) * 32 + j % 32]
    tuned = dict(base)
    p = "model.layers.1.self_attn."
    tuned[p + "v_proj.weight"] = (base[p + "v_proj.weight"] * s_v[:, None]).astype(np.float32)
    tuned[p + "o_proj.weight"] = (base[p + "o_proj.weight"] / cols[None, :]).astype(np.float32)
    b = write_checkpoint(tmp_path / "b", base)
    t = write_checkpoint(tmp_path / "t", tuned)
    if config:
        (t / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2}))
    s = compare(b, t).summary
    assert s.verdict == "derived" and "rescaled_units" in s.flags, s.flags
    assert s.scope["rescaled_units"]["tensors"] == 2 and s.scope["rescaled_units"]["tensors_changed"] == 0
    title = verdict_title(s.to_dict())
    assert "rescaled" in title and "a fine-tune" not in title, title
    wrong = dict(tuned)
    other = np.tile(s_v, 2) if config else cols[np.random.default_rng(8).permutation(128)]
    wrong[p + "o_proj.weight"] = (base[p + "o_proj.weight"] / other[None, :]).astype(np.float32)
    w = write_checkpoint(tmp_path / "w", wrong)
    if config:
        (w / "config.json").write_text((t / "config.json").read_text())
    s = compare(b, w).summary
    assert "rescaled_units" not in s.flags and s.tensors_by_status.get("changed") == 2


def test_a_rotated_model_whose_token_rows_moved_and_grew_is_not_unrelated(tmp_path, rng):
    """The tables' first rows are not the base's rows rotated (ids remapped, then tokens added): they skewed R or
    failed it (UNRELATED). R is then fitted on the output matrices alone, held out as ever, and the tables' rows are
    matched to the base's rows rotated: the model reads rotated with its token rows reordered and rows added (the
    embedding's and the head's orders compared, as unrotated); an independent model with its vocabulary grown
    still reads unrelated."""
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    for alike in (True, False):
        t = dict(_rotated(base, _orthogonal(128)))
        for seed, k in enumerate(("model.embed_tokens.weight", "lm_head.weight")):
            order = np.random.default_rng(12 if alike else 12 + seed).permutation(512)
            t[k] = np.concatenate([t[k][order], np.random.default_rng(11).normal(0, 0.02, (8, 128)).astype(np.float32)])
        s = compare(b, write_checkpoint(tmp_path / f"t{alike}", t)).summary
        assert s.verdict == "derived" and {"rotated_residual", "permuted_units"} <= set(s.flags), (s.verdict, s.flags)
        assert s.scope["rotated_residual"]["embedding_fitted"] is False
        assert s.scope["rotated_residual"]["tensors_changed"] == 0
        assert s.scope["permuted_units"]["rows_consistent"] is alike
        assert "fitted on the output matrices of half the blocks alone" in s.verdict_reason
        title = verdict_title(s.to_dict())
        assert "reordered, with rows added" in title and "residual stream rotated" in title, title
        assert ("computes something else" in title) is not alike and "a fine-tune" not in title, title
    other = llama(np.random.default_rng(99))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        other[k] = np.concatenate([other[k], np.random.default_rng(11).normal(0, 0.02, (8, 128)).astype(np.float32)])
    s = compare(b, write_checkpoint(tmp_path / "o", other)).summary
    assert s.verdict == "unrelated" and "rotated_residual" not in s.flags


def test_the_rotated_token_row_match_reads_the_tables_by_rows(tmp_path, rng, monkeypatch):
    """The token rows matched beneath R (the embedding left out of the fit) decoded both whole tables and rotated
    the base's whole, vocab x d float64 (1 GB at 32,000 x 4,096, beside two float32 copies): each is now read, and
    the base's rotated, ``rowmatch.BLOCK`` rows at a time (shrunk to 32 here), with the same order found."""
    from test_reorder_undo import watch_reads
    from weightdiff.measure import rowmatch

    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    t = dict(_rotated(base, _orthogonal(128)))
    order = np.random.default_rng(12).permutation(512)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = np.concatenate([t[k][order], np.random.default_rng(11).normal(0, 0.02, (8, 128)).astype(np.float32)])
    tp = write_checkpoint(tmp_path / "t", t)
    want = compare(b, tp).to_dict()
    monkeypatch.setattr(rowmatch, "BLOCK", 32)
    monkeypatch.setattr(rot, "BLOCK_BYTES", 32 * 8 * 128)         # the fit's own row blocks: 32 rows of 128 too
    seen = watch_reads(monkeypatch, "rotated_residual", lambda *a, **k: True,
                       lambda name: name in ("model.embed_tokens.weight", "lm_head.weight"))
    got = compare(b, tp).to_dict()
    assert got["summary"]["scope"]["rotated_residual"]["embedding_fitted"] is False
    assert got["summary"]["verdict"] == want["summary"]["verdict"] == "derived"
    assert got["summary"]["scope"]["permuted_units"] == want["summary"]["scope"]["permuted_units"]
    assert [t["rel_change"] for t in got["tensors"]] == pytest.approx([t["rel_change"] for t in want["tensors"]],
                                                                      rel=1e-9, abs=1e-15)
    assert seen and max(seen) <= 96, sorted(set(seen))


def test_a_rescale_needs_its_bias_scaled_and_units_rows_not_conv1d_columns(tmp_path, rng):
    """From the verification tester: fc1's rows and fc2's columns rescaled with fc1's bias left as it was (the
    logits 0.06 away) read "nothing changed"; with the bias scaled too, the bias read changed; GPT-2's Conv1D
    c_fc (stored [in, out]) was rescaled along its inputs and read "nothing changed" (logits 0.85 away); one neuron
    scaled by 60 beside a reordering read PARTIAL, "mlp unrelated"."""
    import json

    base = {k.replace("mlp.up_proj", "mlp.fc1").replace("mlp.down_proj", "mlp.fc2"): v for k, v in llama(rng).items()
            if ".gate_proj." not in k}
    for i in range(4):
        base[f"model.layers.{i}.mlp.fc1.bias"] = rng.normal(0, 0.02, 256).astype(np.float32)
    cfg = json.dumps({"hidden_act": "relu"})
    b = write_checkpoint(tmp_path / "b", base)
    (b / "config.json").write_text(cfg)
    c = np.random.default_rng(3).uniform(0.5, 2.0, 256)

    def scaled(bias: bool) -> Path:
        t = dict(base)
        for i in range(2):
            p = f"model.layers.{i}.mlp."
            t[p + "fc1.weight"] = (base[p + "fc1.weight"] * c[:, None]).astype(np.float32)
            t[p + "fc2.weight"] = (base[p + "fc2.weight"] / c[None, :]).astype(np.float32)
            if bias:
                t[p + "fc1.bias"] = (base[p + "fc1.bias"] * c).astype(np.float32)
        out = write_checkpoint(tmp_path / f"s{bias}", t)
        (out / "config.json").write_text(cfg)
        return out

    s = compare(b, scaled(True)).summary
    assert "rescaled_units" in s.flags and not s.tensors_by_status.get("changed"), s.tensors_by_status
    assert s.scope["rescaled_units"]["tensors"] == 4
    s = compare(b, scaled(False)).summary
    assert "rescaled_units" not in s.flags and s.tensors_by_status.get("changed") == 4

    # GPT-2's Conv1D: c_fc [hidden, 4 hidden] scaled along its rows (inputs), c_proj's columns divided
    from models import gpt2

    g = gpt2(np.random.default_rng(5), layers=2, hidden=64)
    bg = write_checkpoint(tmp_path / "g", g)
    (bg / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    t = dict(g)
    k = np.random.default_rng(6).uniform(0.5, 2.0, 64)
    for i in range(2):
        p = f"transformer.h.{i}.mlp."
        t[p + "c_fc.weight"] = (g[p + "c_fc.weight"] * k[:, None]).astype(np.float32)
        t[p + "c_proj.weight"] = (g[p + "c_proj.weight"] / k[None, :]).astype(np.float32)
    tg = write_checkpoint(tmp_path / "tg", t)
    (tg / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    assert "rescaled_units" not in compare(bg, tg).summary.flags

    # a gated MLP reordered with one neuron scaled by 60 (and its down column by 1/60): the same function
    ll = llama(np.random.default_rng(8))
    bl = write_checkpoint(tmp_path / "bl", ll)
    t = dict(ll)
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        perm = np.random.default_rng(i).permutation(256)
        f = np.ones(256)
        f[7] = 60.0
        t[p + "gate_proj.weight"] = ll[p + "gate_proj.weight"][perm]
        t[p + "up_proj.weight"] = (ll[p + "up_proj.weight"] * f[:, None])[perm].astype(np.float32)
        t[p + "down_proj.weight"] = (ll[p + "down_proj.weight"] / f[None, :])[:, perm].astype(np.float32)
    s = compare(bl, write_checkpoint(tmp_path / "spike", t)).summary
    assert s.verdict == "derived" and {"permuted_units", "rescaled_units"} <= set(s.flags), s.verdict_reason
    assert not s.tensors_by_status.get("changed")


def _block2_and_embedding_tuned_then_rotated(tmp_path, rng) -> tuple:
    """(base folder, tuned folder): block 2's matrices and the token embedding changed (relative 1e-2), then the
    whole model rotated."""
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    t = dict(base)
    rr = np.random.default_rng(11)
    for k, v in base.items():
        if (k.startswith("model.layers.2.") and v.ndim == 2) or k == "model.embed_tokens.weight":
            t[k] = (v + 1e-2 * float(v.std()) * rr.standard_normal(v.shape)).astype(np.float32)
    return b, write_checkpoint(tmp_path / "t", _rotated(t, _orthogonal(128)))


def test_an_embedding_fine_tuned_after_the_rotation_does_not_skew_it(tmp_path, rng):
    """From the verification tester: a rotated model with block 2 and the token embedding fine-tuned (relative 1e-2)
    read "30 of 39 tensors changed, in 4 of 4 blocks": the embedding, always in the fit, pulled R off every untouched
    matrix. It is left out of the refit when it fits far worse than the output matrices, and its rows, each its own,
    are no remapping."""
    b, tuned = _block2_and_embedding_tuned_then_rotated(tmp_path, rng)
    s = compare(b, tuned).summary
    assert s.verdict == "derived" and "rotated_residual" in s.flags and "permuted_units" not in s.flags, s.flags
    assert s.scope["blocks_changed"] == 1, s.verdict_reason
    assert s.scope["rotated_residual"]["tensors_changed"] == 8          # block 2's seven matrices, the embedding



def test_the_embedding_cross_sums_computed_again_give_the_same_json(tmp_path, rng, monkeypatch):
    """Beyond ``E_CROSS_KEPT`` (d > 4096) the embedding's d x d sums are not kept between the fits but computed
    again: the same numbers, byte for byte, as when kept (and the fit's sums are never the kept copy itself)."""
    import weightdiff.comparison as cmp
    from weightdiff.records import dumps

    b, tuned = _block2_and_embedding_tuned_then_rotated(tmp_path, rng)
    kept = compare(b, tuned).to_dict(include_run=False)
    calls = []
    real = rot.in_cross
    monkeypatch.setattr(rot, "in_cross", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(cmp, "E_CROSS_KEPT", 0)
    again = compare(b, tuned).to_dict(include_run=False)
    assert calls.count("model.embed_tokens.weight") >= 2
    assert dumps(again) == dumps(kept) and "rotated_residual" in kept["summary"]["flags"]


@pytest.mark.parametrize("vocab", [16, 64])
def test_a_one_block_model_narrower_in_tokens_than_wide_reads_rotated(tmp_path, rng, vocab):
    """One block, a vocabulary narrower than the width: the fit on the embedding alone left R undetermined and the
    base rotated, nothing else changed, read UNRELATED (the scale tester's one-layer 70B-width slice, 512 tokens, 8192
    wide). One output matrix now fits beside the embedding, the other is held out; independent models still read
    unrelated, a fine-tune rotated reads as the fine-tune, and no cosine passes 1."""
    base = llama(rng, layers=1, hidden=128, vocab=vocab)
    b = write_checkpoint(tmp_path / "b", base)
    s = compare(b, write_checkpoint(tmp_path / "t", _rotated(base, _orthogonal(128), layers=1))).summary
    assert s.verdict == "derived" and "rotated_residual" in s.flags, s.verdict_reason
    sc = s.scope["rotated_residual"]
    assert sc["tensors_changed"] == 0 and sc["matrices_held_out"] == 1 and sc["matrices_explained"] == 1
    assert 0.999 < sc["cosine_held_out"] <= 1.0
    ft = compare(b, write_checkpoint(tmp_path / "ft", _rotated(_tuned(base), _orthogonal(128), layers=1))).summary
    assert ft.verdict == "derived" and ft.scope["rotated_residual"]["tensors_changed"] == 9
    other = llama(np.random.default_rng(9), layers=1, hidden=128, vocab=vocab)
    for name, t in (("o", other), ("or", _rotated(other, _orthogonal(128), layers=1))):
        s = compare(b, write_checkpoint(tmp_path / name, t)).summary
        assert s.verdict == "unrelated" and "rotated_residual" not in s.flags, name


def test_independent_models_are_turned_away_before_the_fit(tmp_path, rng, monkeypatch):
    """Every independent model of the base's shapes went through the d x d Procrustes fit (at the 70B width 30-40
    minutes and 1.3-1.8 GB, scale tester 2, F1: a survey row, a provenance candidate). A rotated writer's columns keep
    their inner products, an independent model's share nothing with the base's: the fit now runs only when the
    sampled column Gram matrices correlate; rotated models, fine-tuned too, still pass (the rest of this file)."""
    base = llama(rng, layers=2)
    other = llama(np.random.default_rng(77), layers=2)
    b = write_checkpoint(tmp_path / "b", base)
    with rot_spy(monkeypatch) as fits:
        s = compare(b, write_checkpoint(tmp_path / "o", _rotated(other, _orthogonal(128), layers=2))).summary
        assert s.verdict == "unrelated" and not fits
        s = compare(b, write_checkpoint(tmp_path / "r", _rotated(_tuned(base, rel=0.3), _orthogonal(128), layers=2)))
        assert s.summary.verdict == "derived" and "rotated_residual" in s.summary.flags and fits
    from weightdiff.io.checkpoint import locate

    with locate(b) as cb, locate(tmp_path / "o") as co, locate(tmp_path / "r") as cr:
        name = "model.layers.1.mlp.down_proj.weight"
        assert abs(rot.column_gram_correlation(cb, name, co, name)) < 0.1
        assert rot.column_gram_correlation(cb, name, cr, name) > 0.5
        assert rot.column_gram_correlation(cb, name, cb, name) == pytest.approx(1.0)


class rot_spy:
    """Records each Procrustes fit started (``Rotation`` made) while in use."""

    def __init__(self, monkeypatch):
        self.mp, self.fits = monkeypatch, []

    def __enter__(self):
        real = rot.Rotation
        self.mp.setattr(rot, "Rotation", lambda d: self.fits.append(d) or real(d))
        return self.fits

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_rows_of_decodes_a_block_piece_by_piece_to_the_same_values(tmp_path, monkeypatch, dtype):
    """``rows_of`` decodes a block into its float64 rows a piece at a time (a bf16 block decoded whole went through
    uint32 and float32 copies of its size): the same values as decoding the whole tensor, for blocks that split
    rows and pieces anywhere."""
    from weightdiff.io.checkpoint import locate
    from weightdiff.kernels.dtypes import decode

    monkeypatch.setattr(rot, "DECODE_PIECE", 7)
    x = np.random.default_rng(3).standard_normal((23, 9)).astype(np.float32)
    write_checkpoint(tmp_path / "c", {"w": x}, dtype=dtype)
    with locate(tmp_path / "c") as ck:
        want = np.asarray(decode(np.asarray(ck.read("w")).reshape(-1), ck.tensors["w"].dtype), np.float64).reshape(23, 9)
        for r0, r1 in ((0, 23), (3, 4), (5, 17), (22, 23), (4, 4)):
            got = rot.rows_of(ck, "w", r0, r1)
            assert got.dtype == np.float64 and got.shape == (r1 - r0, 9)
            assert np.array_equal(got, want[r0:r1]), (r0, r1)
        assert np.array_equal(rot.rows_of(ck, "w", 0, 3, np.array([5, 0, 22])), want[[5, 0, 22]])


def test_a_rotated_side_holds_no_block_through_its_rank_solve(tmp_path, rng, monkeypatch):
    """A side measured again kept its last row block (up to 128 MB for an output matrix) through the rank solve,
    beside an 8,192-wide Gram's 537 MB at 70B widths: ``compute_pair`` lets it go once the stream ends."""
    import weakref

    from weightdiff.measure import backend, rank_stream

    monkeypatch.setattr(backend, "LAPACK_MAX_ELEMENTS", 0)         # every matrix ranked from its streamed Gram
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    t = write_checkpoint(tmp_path / "t", _rotated(_tuned(base), _orthogonal(128)))
    sides: list = []
    made, finish = rot.RotatedSide.__init__, rank_stream.DeltaGram.finish
    held: list[int] = []

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        sides.append(weakref.ref(self))

    def solve(self, *args, **kwargs):
        held.append(sum(1 for w in sides if w() is not None and w()._cached is not None))
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(rot.RotatedSide, "__init__", init)
    monkeypatch.setattr(rank_stream.DeltaGram, "finish", solve)
    s = compare(b, t).summary
    assert "rotated_residual" in s.flags
    assert len(held) >= 10 and max(held) == 0, held


def _spill_cases(tmp_path, rng):
    """(name, base folder, tuned folder) of the paths a rotation takes: a fine-tune beneath it (output and input
    matrices measured again), a permutation (its |R| turns the norms), token rows remapped (matched to the base's
    rows rotated), pruned beneath it (the rotated base read whole)."""
    yield ("fine-tuned", *_block2_and_embedding_tuned_then_rotated(tmp_path / "ft", rng))
    base = llama(rng)
    b = write_checkpoint(tmp_path / "b", base)
    p = np.eye(128)[np.random.default_rng(5).permutation(128)]
    perm = _rotated(base, p, fold=False)
    yield "permuted", b, write_checkpoint(tmp_path / "perm", perm)
    t = dict(_rotated(base, _orthogonal(128)))
    order = np.random.default_rng(12).permutation(512)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = np.concatenate([t[k][order], np.random.default_rng(11).normal(0, 0.02, (8, 128)).astype(np.float32)])
    yield "rows remapped", b, write_checkpoint(tmp_path / "rows", t)
    t = dict(_rotated(base, _orthogonal(128)))
    for k in READ + WRITE:
        w = t[f"model.layers.1.{k}.weight"].copy()
        w[np.abs(w) <= np.median(np.abs(w))] = 0.0
        t[f"model.layers.1.{k}.weight"] = w
    yield "pruned", b, write_checkpoint(tmp_path / "pruned", t)


def test_a_rotation_kept_in_temporary_files_gives_the_same_json(tmp_path, rng, monkeypatch):
    """Beyond ``spill.SPILL_BYTES`` (d > 5,792: the 70B width) R waits in temporary files while tensors are measured
    beneath it, and the polar iteration's iterate while its inverse is computed: the same JSON, byte for byte, as
    with both in memory, on every path a rotation takes; and from the cache, whose checks' outcome is read back
    into a temporary file too."""
    from weightdiff.measure import spill
    from weightdiff.records import dumps

    made, stashed = [], []
    real_of, real_put = spill.Spilled.of.__func__, spill.Stash.put
    for name, b, t in _spill_cases(tmp_path, rng):
        monkeypatch.setattr(spill, "SPILL_BYTES", 256 << 20)
        kept = compare(b, t).to_dict(include_run=False)
        assert "rotated_residual" in kept["summary"]["flags"], name
        monkeypatch.setattr(spill, "SPILL_BYTES", 0)
        monkeypatch.setattr(spill.Spilled, "of", classmethod(lambda cls, a: made.append(name) or real_of(cls, a)))
        monkeypatch.setattr(spill.Stash, "put", lambda self, a: stashed.append(name) or real_put(self, a))
        cache = tmp_path / f"cache-{len(made)}"
        first = compare(b, t, cache=str(cache)).to_dict(include_run=False)    # spilled, and its records cached
        assert dumps(first) == dumps(kept), name
        before = len(made)
        again = compare(b, t, cache=str(cache)).to_dict(include_run=False)
        assert dumps(first) == dumps(again) == dumps(kept), name
        assert len(made) > before, name           # the rotation read back from the cache went to a file again
        assert name in made and name in stashed
