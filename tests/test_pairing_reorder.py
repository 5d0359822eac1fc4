"""Blocks reordered or repeated (layers swapped, SOLAR-style depth up-scaling): names line up
but the content is another base block's; ``align.reuse_blocks`` pairs them by content, a base
block allowed to serve several tuned blocks, and the verdict reads derived, not partial."""

from __future__ import annotations

import numpy as np

from conftest import write_checkpoint
from weightdiff import compare
from weightdiff.io.checkpoint import Checkpoint, locate
from weightdiff.pairing.plan import plan

SLOTS = {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64),
         "self_attn.v_proj.weight": (32, 64), "self_attn.o_proj.weight": (64, 64),
         "mlp.up_proj.weight": (128, 64), "mlp.gate_proj.weight": (128, 64), "mlp.down_proj.weight": (64, 128),
         "input_layernorm.weight": (64,)}


def _layer(rng) -> dict:
    return {s: (rng.normal(size=shape) * 0.05 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
            for s, shape in SLOTS.items()}


def _model(layers: list[dict]) -> dict:
    rng = np.random.default_rng(99)
    out = {"model.embed_tokens.weight": rng.normal(size=(256, 64)).astype(np.float32) * 0.05,
           "model.norm.weight": np.ones(64, np.float32),
           "lm_head.weight": rng.normal(size=(256, 64)).astype(np.float32) * 0.05}
    for k, layer in enumerate(layers):
        out.update({f"model.layers.{k}.{s}": v for s, v in layer.items()})
    return out


def _base_layers(n: int) -> list[dict]:
    return [_layer(np.random.default_rng(k)) for k in range(n)]


def test_swapped_layers_are_derived_and_paired_with_their_base_blocks(tmp_path):
    base = _base_layers(3)
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "swap", _model([base[1], base[0], base[2]]))
    p = plan([locate(b)], locate(t))
    got = {q.tuned_name: (q.base_name, q.paired_by) for q in p.pairs}
    assert got["model.layers.0.mlp.up_proj.weight"] == ("model.layers.1.mlp.up_proj.weight", "content")
    assert got["model.layers.1.input_layernorm.weight"] == ("model.layers.0.input_layernorm.weight", "content")
    assert got["model.layers.2.mlp.up_proj.weight"][1] == "name"
    assert any("tuned layers.0 is base layers.1" in n and "tuned layers.1 is base layers.0" in n for n in p.notes)
    s = compare(b, t, rank=False).summary
    assert s.verdict == "derived"
    assert not [c for c in s.components if c["status"] == "unrelated"]
    assert s.scope["blocks_moved"] == 2 and s.scope["tensors_changed"] == 0
    assert "base blocks at another position" in s.verdict_reason
    from weightdiff.render.sentences import verdict_title

    assert verdict_title(s.to_dict()) == "DERIVED: this base's blocks, reordered or repeated; none of its weights changed."


def test_depth_upscaled_copies_are_paired_not_added(tmp_path):
    base = _base_layers(4)
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "dus", _model([base[k] for k in (0, 1, 2, 1, 2, 3)]))
    p = plan([locate(b)], locate(t))
    got = {q.tuned_name: q for q in p.pairs if q.tuned_name}
    for tk, bk in ((3, 1), (4, 2), (5, 3)):
        q = got[f"model.layers.{tk}.mlp.down_proj.weight"]
        assert (q.kind, q.base_name, q.paired_by) == ("paired", f"model.layers.{bk}.mlp.down_proj.weight", "content")
    assert not [q for q in p.pairs if q.kind in ("added", "removed")]
    assert any("base blocks serving more than one tuned block: layers.1, layers.2" in n for n in p.notes)
    s = compare(b, t, rank=False).summary
    assert s.verdict == "derived" and s.scope["blocks_total"] == 6 and s.scope["blocks_moved"] == 3
    # a base block compared twice is still counted once: coverage never exceeds 100%
    assert s.coverage["base"]["share"] == 1.0 and s.coverage["tuned"]["share"] == 1.0
    assert not [c for c in s.components if c["status"] == "unrelated"]


def test_a_freshly_initialised_layer_still_reads_unrelated(tmp_path):
    base = _base_layers(3)
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "fresh", _model([base[0], _layer(np.random.default_rng(1234)), base[2]]))
    p = plan([locate(b)], locate(t))
    assert all(q.paired_by != "content" for q in p.pairs)
    s = compare(b, t, rank=False).summary
    assert s.verdict == "partial"
    comps = {c["component"]: c["status"] for c in s.components}
    assert comps["layers.1"] == "unrelated" and comps["layers.0"] == "shared"


def test_a_layer_inserted_anywhere_reads_as_one_appended(tmp_path):
    """A fresh layer inserted in the middle (or first) kept the name pair with the base block it displaced,
    which content pairing had matched with the next tuned block: that base block served twice, the new
    layer read "unrelated" and the model PARTIAL, where the same layer appended read "tensors added"."""
    from weightdiff.render.sentences import verdict_title

    base = _base_layers(4)
    new = _layer(np.random.default_rng(4321))
    b = write_checkpoint(tmp_path / "base", _model(base))
    seen = {}
    for where in (0, 2, 4):
        layers = base[:where] + [new] + base[where:]
        t = write_checkpoint(tmp_path / f"at{where}", _model(layers))
        p = plan([locate(b)], locate(t))
        got = {q.tuned_name: q for q in p.pairs if q.tuned_name}
        assert {got[f"model.layers.{where}.{slot}"].kind for slot in SLOTS} == {"added"}
        for tk in range(5):
            if tk != where:
                q = got[f"model.layers.{tk}.mlp.down_proj.weight"]
                assert q.base_name == f"model.layers.{tk - (tk > where)}.mlp.down_proj.weight"
        if where < 4:
            assert any(f"tuned layers.{where} is new" in n for n in p.notes)
        s = compare(b, t, rank=False).summary
        seen[where] = (s.verdict, s.tensors_by_status["added"], s.tensors_by_status["changed"],
                       verdict_title(s.to_dict()).replace(f"layers.{where}:", "layers.N:"))
        assert not [c for c in s.components if c["status"] == "unrelated"]
    assert len(set(seen.values())) == 1, seen
    assert seen[4] == ("derived", len(SLOTS), 0,
                       f"DERIVED: this base with 1 block added (layers.N: {len(SLOTS)} tensors with no counterpart in "
                       "the base); none of its own weights changed.")


def test_nothing_reordered_reads_one_matrix_per_block_and_moves_nothing(tmp_path, monkeypatch):
    base = _base_layers(4)
    rng = np.random.default_rng(7)
    tuned = [{s: v + (rng.normal(size=v.shape) * 0.01).astype(np.float32) for s, v in layer.items()} for layer in base]
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "ft", _model(tuned))
    reads: list[str] = []
    orig = Checkpoint.read_rows

    def counting(self, name, rows):
        reads.append(name)
        return orig(self, name, rows)

    monkeypatch.setattr(Checkpoint, "read_rows", counting)
    p = plan([locate(b)], locate(t))
    assert all(q.paired_by == "name" for q in p.pairs)
    # the probe: one matrix per block (the one with the fewest columns), once on each side
    assert len(reads) == 2 * 4 and set(reads) == {f"model.layers.{k}.self_attn.k_proj.weight" for k in range(4)}
    reads.clear()
    plan([locate(b)], locate(t), content=False)
    assert reads == []


def test_sparse_upcycled_experts_all_pair_with_the_dense_mlp(tmp_path):
    """Sparse upcycling: every expert of each MoE layer starts as that layer's dense MLP. Content
    pairing gave each dense matrix to one expert and left the other experts `added` (half the
    model "new"); a base matrix may now serve several tuned ones, so only the routers are added."""
    base = _base_layers(2)
    b = write_checkpoint(tmp_path / "base", _model(base))
    rng = np.random.default_rng(5)
    moe = {}
    for k, layer in enumerate(base):
        for s, v in layer.items():
            if not s.startswith("mlp."):
                moe[f"model.layers.{k}.{s}"] = v
        for e in range(4):
            for new, old in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                w = layer[f"mlp.{old}.weight"]
                moe[f"model.layers.{k}.block_sparse_moe.experts.{e}.{new}.weight"] = \
                    (w + rng.normal(size=w.shape) * 0.002).astype(np.float32)
        moe[f"model.layers.{k}.block_sparse_moe.gate.weight"] = rng.normal(size=(4, 64)).astype(np.float32)
    rest = _model([])
    t = write_checkpoint(tmp_path / "moe", {**rest, **moe})
    p = plan([locate(b)], locate(t))
    got = {q.tuned_name: q for q in p.pairs if q.tuned_name}
    for k in range(2):
        for e in range(4):
            q = got[f"model.layers.{k}.block_sparse_moe.experts.{e}.w2.weight"]
            assert (q.kind, q.base_name, q.paired_by) == ("paired", f"model.layers.{k}.mlp.down_proj.weight", "content")
    assert sorted(q.tuned_name for q in p.pairs if q.kind == "added") == \
        ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"]
    assert any("that another tensor also copies" in n for n in p.notes)
    s = compare(b, t, rank=False).summary
    assert s.verdict == "derived" and s.tensors_by_status["added"] == 2
    assert s.coverage["base"]["share"] == 1.0


def test_a_large_low_rank_change_is_not_an_independent_initialisation(tmp_path):
    """A rank-4 update ten times the size of the weights moves them far (1 - cosine near 1, relative
    change 10): the unrelated rule alone read "unrelated ... as independent initialisations". Two
    independent inits differ by a full-rank matrix; base + rank 4 is derived, however large."""
    base = _base_layers(2)
    rng = np.random.default_rng(3)
    tuned_layers = []
    for layer in base:
        new = dict(layer)
        for s, w in layer.items():
            if w.ndim == 2:
                d = rng.normal(size=(w.shape[0], 4)) @ rng.normal(size=(4, w.shape[1]))
                new[s] = (w + d * 10 * np.linalg.norm(w) / np.linalg.norm(d)).astype(np.float32)
        tuned_layers.append(new)
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "big", _model(tuned_layers))
    s = compare(b, t).summary
    assert s.verdict == "derived", s.verdict_reason
    assert {c["component"]: c["status"] for c in s.components}["layers.0"] == "shared"
    assert s.form["kind"] in ("low_rank", "mixed")     # (rank 4 of a 32-wide k_proj is not low-rank)
    s = compare(b, t, rank=False).summary          # without ranks the rule stands: a faint trace (cosine ~0.1),
    comps = {c["component"]: c["status"] for c in s.components}      # beside the embeddings shared bitwise
    assert comps["layers.0"] == "faint" and comps["embeddings"] == "shared"
    assert s.verdict == "derived" and "keep only a faint trace of this base" in s.verdict_reason


def test_depth_up_scaled_then_trained_says_so_in_the_title(tmp_path):
    """SOLAR-style up-scaling (or LLaMA-Pro's inserted blocks) then trained read only "a fine-tune of this base":
    the blocks the base does not have were in the reason alone."""
    from weightdiff.render.sentences import verdict_title

    base = _base_layers(4)
    rng = np.random.default_rng(5)
    grown = [{s: (v + rng.normal(size=v.shape).astype(np.float32) * 5e-4) for s, v in base[k].items()}
             for k in (0, 1, 2, 1, 2, 3)]
    b = write_checkpoint(tmp_path / "base", _model(base))
    t = write_checkpoint(tmp_path / "dus", _model(grown))
    s = compare(b, t, rank=False).summary
    title = verdict_title(s.to_dict())
    assert s.verdict == "derived" and "a fine-tune of this base" in title
    assert "2 blocks more than the base's 4" in title, title
