"""A reordering found (MLP neurons, attention heads, experts, token rows) is undone before measuring.

The numbers of a reordered tensor were of its weights compared with other units' (relative change 1.4,
1 - cosine 0.9, "dense, rank 512" for a model that is the base with its neurons shuffled): a lawyer
quoting the headline quoted the shuffle. Each tensor of a reordering whose order is known exactly is
now measured against the base's units in the tuned model's order (``comparison.measure_undone``).

The reference: a fine-tune, then reordered, must measure exactly as the same fine-tune not reordered
(a permutation changes neither the delta's norm nor its singular values).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import write_checkpoint
from models import gpt2, llama, moe
from test_verdict_real import _fuse
from weightdiff import compare
from weightdiff.render.sentences import verdict_title

D = 16          # rows per attention head in these models


def _rows(heads, d: int = D) -> np.ndarray:
    return (np.asarray(heads)[:, None] * d + np.arange(d)).ravel()


def _fine_tune(t: dict, seed: int = 5, rel: float = 1e-2, skip: str = "$^") -> dict:
    rng = np.random.default_rng(seed)
    return {k: v if re.search(skip, k) else (v + rel * float(v.std() or 1) * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in t.items()}


def _mlp(t: dict) -> dict:
    order = np.random.default_rng(8).permutation(128)
    for i in range(3):
        p = f"model.layers.{i}.mlp."
        for k in ("gate_proj", "up_proj"):
            t[p + k + ".weight"] = t[p + k + ".weight"][order]
        t[p + "down_proj.weight"] = t[p + "down_proj.weight"][:, order]
    return t


def _heads(t: dict) -> dict:
    rows = _rows([2, 0, 3, 1])
    p = "model.layers.1.self_attn."
    for k in ("q_proj", "k_proj", "v_proj"):
        t[p + k + ".weight"] = t[p + k + ".weight"][rows]
    t[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, rows]
    return t


def _gqa(t: dict) -> dict:
    """Query heads swapped within their key/value group (two per group), o's columns following; k, v stay."""
    rows = _rows([1, 0, 3, 2, 5, 4, 7, 6])
    for i in range(3):
        p = f"model.layers.{i}.self_attn."
        t[p + "q_proj.weight"] = t[p + "q_proj.weight"][rows]
        t[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, rows]
    return t


def _gpt2_heads(t: dict) -> dict:
    cols = _rows([2, 3, 1, 0])
    p = "transformer.h.1.attn."
    w, b = t[p + "c_attn.weight"], t[p + "c_attn.bias"]
    t[p + "c_attn.weight"] = np.concatenate([w[:, i * 64:(i + 1) * 64][:, cols] for i in range(3)], axis=1)
    t[p + "c_attn.bias"] = np.concatenate([b[i * 64:(i + 1) * 64][cols] for i in range(3)])
    t[p + "c_proj.weight"] = t[p + "c_proj.weight"][cols]
    return t


def _experts(t: dict, style: str = "mixtral") -> dict:
    order = [2, 3, 1, 0]
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe." if style == "mixtral" else f"model.layers.{i}.mlp."
        t[p + "gate.weight"] = t[p + "gate.weight"][order]
        old = {k: v for k, v in t.items() if k.startswith(p + "experts.")}
        for new, was in enumerate(order):
            for k in (("w1", "w2", "w3") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")):
                t[p + f"experts.{new}.{k}.weight"] = old[p + f"experts.{was}.{k}.weight"]
    return t


CASES = {
    # name: (base, how the tuned model is reordered, block -> kinds found)
    "mlp": (lambda: llama(np.random.default_rng(3), layers=3, hidden=64, inter=128, vocab=256), _mlp,
            {f"layers.{i}": ["mlp"] for i in range(3)}),
    "heads": (lambda: llama(np.random.default_rng(3), layers=3, hidden=64, inter=128, vocab=256), _heads,
              {"layers.1": ["attn"]}),
    "phi3": (lambda: llama(np.random.default_rng(31), layers=3, hidden=64, inter=128, vocab=256),
             lambda t: _mlp(_heads(t)), {"layers.0": ["mlp"], "layers.1": ["attn", "mlp"], "layers.2": ["mlp"]}),
    "neox": (lambda: llama(np.random.default_rng(31), layers=3, hidden=64, inter=128, vocab=256, kv=32),
             lambda t: _mlp(t), {f"layers.{i}": ["mlp"] for i in range(3)}),
    # trained after the swap, q and o look like other matrices while k and v keep the attention related
    "gqa": (lambda: llama(np.random.default_rng(3), layers=3, hidden=128, inter=256, vocab=256, kv=64), _gqa,
            {f"layers.{i}": ["attn"] for i in range(3)}),
    "gpt2": (lambda: gpt2(np.random.default_rng(41), layers=3, hidden=64), _gpt2_heads, {"h.1": ["attn"]}),
    "experts": (lambda: moe(np.random.default_rng(12), layers=2, hidden=64, inter=64, experts=4), _experts,
                {"layers.0": ["experts"], "layers.1": ["experts"]}),
    # a shared expert beside the routed ones (Qwen2-MoE, DeepSeek) kept the block reading shared: its MLP
    # was checked for reordered neurons, never for reordered experts ("PARTIAL ... mlp unrelated")
    "shared_expert": (lambda: moe(np.random.default_rng(12), style="qwen", layers=2, hidden=64, inter=64, experts=4,
                                  shared=128), lambda t: _experts(t, "qwen"),
                      {"layers.0": ["experts"], "layers.1": ["experts"]}),
}


def _write(path, t: dict, case: str) -> None:
    write_checkpoint(path, _fuse(t, case, D) if case in ("phi3", "neox") else t)


def watch_reads(monkeypatch, step: str, watched, table) -> list[int]:
    """While ``comparison.<step>`` runs with arguments that ``watched`` accepts, no tensor that ``table`` accepts may
    be read whole (``Checkpoint.read``) or decoded whole (``rotation.values``); returns the row counts of each of
    their ``read_rows`` calls then. The main pass reads small tensors whole: only the step is watched."""
    from weightdiff import comparison
    from weightdiff.io.located import Checkpoint
    from weightdiff.measure import rotation

    seen: list[int] = []
    inside = [False]
    read, read_rows, values, run = Checkpoint.read, Checkpoint.read_rows, rotation.values, getattr(comparison, step)

    def whole(self, name):
        assert not (inside[0] and table(name)), f"{name} read whole"
        return read(self, name)

    def decoded(ck, name):
        assert not (inside[0] and table(name)), f"{name} decoded whole"
        return values(ck, name)

    def rows(self, name, which):
        if inside[0] and table(name):
            seen.append(len(np.asarray(which).reshape(-1)))
        return read_rows(self, name, which)

    def step_run(*args, **kwargs):
        inside[0] = bool(watched(*args, **kwargs))
        try:
            return run(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(comparison, step, step_run)
    monkeypatch.setattr(Checkpoint, "read", whole)
    monkeypatch.setattr(Checkpoint, "read_rows", rows)
    monkeypatch.setattr(rotation, "values", decoded)
    return seen


def _fields(rec) -> tuple:
    rank = rec.rank.numerical_rank if rec.rank is not None else None
    return rec.status, rank


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_reordered_fine_tune_measures_as_the_same_fine_tune_in_the_bases_order(tmp_path, case):
    make, reorder, blocks = CASES[case]
    base = make()
    tuned = _fine_tune(base)
    _write(tmp_path / "b", base, case)
    _write(tmp_path / "t", tuned, case)
    _write(tmp_path / "r", reorder({k: v.copy() for k, v in tuned.items()}), case)
    plain = compare(tmp_path / "b", tmp_path / "t")
    moved = compare(tmp_path / "b", tmp_path / "r")
    s, ref = moved.summary, plain.summary
    assert s.verdict == ref.verdict == "derived" and s.scope["permuted_units"]["blocks"] == blocks, s.verdict_reason
    assert s.scope["permuted_units"]["undone"] == {b: sorted(k) for b, k in blocks.items()}
    # every tensor measures as in the base's order: the same status, norms, cosine and rank
    want = {r.name: r for r in plain.tensors}
    undone = 0
    for r in moved.tensors:
        # an expert reordered is the tuned expert the plain fine-tune holds at the base index it is compared with
        w = want[re.sub(r"\.experts\.\d+\.", re.search(r"\.experts\.\d+\.", r.base_name).group(0), r.name)
                 if ".experts." in r.name else r.name]
        assert _fields(r) == _fields(w), r.name
        for key in ("norm_delta", "rel_change", "cosine", "frac_changed", "max_abs_delta"):
            if getattr(w, key) is None:
                assert getattr(r, key) is None
                continue
            assert getattr(r, key) == pytest.approx(getattr(w, key), rel=1e-9, abs=1e-12), (r.name, key)
        undone += (r.note or "").startswith("compared with")
    assert undone == s.scope["permuted_units"]["tensors_undone"] > 0
    assert s.relative_change == pytest.approx(ref.relative_change, rel=1e-9)
    assert s.relatedness_cosine == pytest.approx(ref.relatedness_cosine, rel=1e-9)
    assert s.delta_params == ref.delta_params and s.form == ref.form
    assert s.params_by_status == ref.params_by_status
    assert "numbers here are of what changed beneath the reordering" in s.verdict_reason
    assert verdict_title(moved.to_dict()["summary"]).startswith("DERIVED: a fine-tune of this base, with ")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_reordering_alone_measures_as_no_change(tmp_path, case):
    """The base with units reordered and nothing else: relative change 0 and every parameter unchanged
    once the order is undone; derived (the files differ), titled so, never "identical"."""
    make, reorder, blocks = CASES[case]
    base = make()
    _write(tmp_path / "b", base, case)
    _write(tmp_path / "r", reorder({k: v.copy() for k, v in base.items()}), case)
    r = compare(tmp_path / "b", tmp_path / "r")
    s = r.summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == blocks, s.verdict_reason
    assert s.relative_change == 0 and s.params_by_status["unchanged"] == s.params_total
    assert s.scope["permuted_units"]["tensors_changed"] == 0 and s.delta_params == 0
    title = verdict_title(r.to_dict()["summary"])
    assert title.startswith("DERIVED: this base with ") and title.endswith("; none of its other weights changed."), title
    assert "once the units found reordered are put back in the base's order" in " ".join(s.headline)


def test_query_heads_swapped_within_their_group_measure_as_no_change(tmp_path):
    """Grouped-query attention: only q and o move (k, v stay); o's columns follow q's rows."""
    rows = _rows([1, 0, 3, 2, 5, 4, 7, 6])
    p = "model.layers.2.self_attn."
    base = llama(np.random.default_rng(3), layers=3, hidden=128, inter=256, vocab=256, kv=64)
    tuned = {k: v.copy() for k, v in base.items()}
    tuned[p + "q_proj.weight"] = tuned[p + "q_proj.weight"][rows]
    tuned[p + "o_proj.weight"] = tuned[p + "o_proj.weight"][:, rows]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.scope["permuted_units"]["blocks"] == {"layers.2": ["attn"]} and s.relative_change == 0
    assert s.scope["permuted_units"]["tensors_undone"] == 2          # q and o; k and v were never moved


@pytest.mark.parametrize("how", ["remapped", "trimmed"])
def test_token_rows_remapped_or_trimmed_are_compared_with_the_rows_they_are(tmp_path, how):
    """Every tuned row bitwise a base row (bf16, ids remapped or a vocabulary trimmed), the blocks
    fine-tuned: the tables measure as unchanged; the blocks measure as the fine-tune."""
    base = llama(np.random.default_rng(71), layers=3, hidden=64, inter=128, vocab=256)
    tuned = _fine_tune(base, skip=r"embed_tokens|lm_head")
    rng = np.random.default_rng(72)
    idx = np.sort(rng.choice(256, 160, replace=False)) if how == "trimmed" else rng.permutation(256)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tuned[k] = base[k][idx]
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    r = compare(tmp_path / "b", tmp_path / "t")
    s = r.summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["undone"] == {"embeddings": ["rows"], "head": ["rows"]}
    tables = {t.name: t for t in r.tensors if t.module in ("embed", "lm_head")}
    assert {t.status for t in tables.values()} == {"unchanged"}, {n: t.status for n, t in tables.items()}
    assert all(t.shape == [len(idx), 64] for t in tables.values())
    assert s.scope["permuted_units"].get("tensors_trimmed", 0) == (2 if how == "trimmed" else 0)
    assert "each row is compared with the base row it is" in s.verdict_reason
    assert s.scope["permuted_units"]["rows_consistent"] is True and "computes what the base computes" in s.verdict_reason
    title = verdict_title(r.to_dict()["summary"])
    assert title == ("DERIVED: a fine-tune of this base, with the token rows of its embeddings and head reordered"
                     + (" or trimmed." if how == "trimmed" else ".")), title


@pytest.mark.parametrize("how", ["two_orders", "embedding_only"])
def test_token_tables_in_different_orders_are_not_a_remapped_tokenizer(tmp_path, how):
    """An untied model whose embedding rows are in one order and whose head rows are in another (or left
    alone) computes something else than the base under every remapping of the ids: the reason said "on the
    remapped tokens the model computes what the base computes" (top-1 agreement with the base was 0)."""
    base = llama(np.random.default_rng(71), layers=2, hidden=64, inter=128, vocab=256)
    rng = np.random.default_rng(73)
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][rng.permutation(256)]
    if how == "two_orders":
        tuned["lm_head.weight"] = base["lm_head.weight"][rng.permutation(256)]
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    r = compare(tmp_path / "b", tmp_path / "t")
    s = r.summary
    assert s.scope["permuted_units"]["rows_consistent"] is False
    assert "computes what the base computes" not in s.verdict_reason
    assert "no remapping of the tokenizer's ids gives the base's computation" in s.verdict_reason
    assert "computes something else than the base" in verdict_title(r.to_dict()["summary"])


@pytest.mark.parametrize("how", ["remapped", "trimmed"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_token_rows_remapped_or_trimmed_then_trained_measure_as_the_same_fine_tune(tmp_path, how, dtype):
    """Ids remapped or a vocabulary trimmed, then the whole model fine-tuned (no row bitwise a base row):
    each row is matched to its base row by cosine and the tables measure as the same fine-tune of the
    base's rows in this order (they read rel. change 1.41, 1 - cosine 1 against other tokens' rows)."""
    base = llama(np.random.default_rng(71), layers=3, hidden=64, inter=128, vocab=256)
    rng = np.random.default_rng(72)
    idx = np.sort(rng.choice(256, 160, replace=False)) if how == "trimmed" else rng.permutation(256)
    ref_base = {k: (v[idx] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in base.items()}
    tuned = _fine_tune(ref_base)          # the same fine-tune, measured against the base's rows in this order
    write_checkpoint(tmp_path / "b", base, dtype=dtype)
    write_checkpoint(tmp_path / "rb", ref_base, dtype=dtype)
    write_checkpoint(tmp_path / "t", tuned, dtype=dtype)
    r, ref = compare(tmp_path / "b", tmp_path / "t"), compare(tmp_path / "rb", tmp_path / "t")
    s = r.summary
    assert s.scope["permuted_units"]["undone"] == {"embeddings": ["rows"], "head": ["rows"]}, s.verdict_reason
    want = {t.name: t for t in ref.tensors}
    for t in r.tensors:
        for key in ("norm_delta", "norm_base", "rel_change", "cosine", "frac_changed", "max_abs_delta"):
            assert getattr(t, key) == pytest.approx(getattr(want[t.name], key), rel=1e-9, abs=1e-12), (t.name, key)
        assert _fields(t) == _fields(want[t.name]), t.name
    tables = [t for t in r.tensors if t.module in ("embed", "lm_head")]
    assert all(t.rel_change < 0.02 and "matched by cosine" in t.note for t in tables), [t.note for t in tables]
    assert s.relative_change == pytest.approx(ref.summary.relative_change, rel=1e-9)
    assert s.relatedness_cosine == pytest.approx(ref.summary.relatedness_cosine, rel=1e-9)
    assert "each row is compared with the base row it is" in s.verdict_reason
    title = verdict_title(r.to_dict()["summary"])
    assert title.startswith("DERIVED: a fine-tune of this base, with the token rows"), title


def test_a_reordering_found_only_on_a_sample_keeps_its_hedge(tmp_path):
    """Token rows remapped and trained, a few of them new (no base row): matched on 64 sampled rows, but
    no order for every row, so not undone; the reason still says so."""
    base = llama(np.random.default_rng(71), layers=3, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    rng = np.random.default_rng(72)
    idx = rng.permutation(256)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tuned[k] = (base[k][idx] + rng.normal(0, 0.004, base[k].shape)).astype(np.float32)
        tuned[k][[5, 77, 140]] = rng.normal(0, 0.02, (3, 64))            # new tokens' rows
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.scope["permuted_units"]["blocks"] == {"embeddings": ["rows"], "head": ["rows"]}
    assert "undone" not in s.scope["permuted_units"]
    assert "numbers here are of rows compared with other tokens' rows" in s.verdict_reason


def test_undo_reorderings_false_keeps_the_stored_order(tmp_path):
    make, reorder, blocks = CASES["mlp"]
    base = make()
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "r", reorder({k: v.copy() for k, v in base.items()}))
    s = compare(tmp_path / "b", tmp_path / "r", undo_reorderings=False).summary
    assert s.scope["permuted_units"]["blocks"] == blocks and "undone" not in s.scope["permuted_units"]
    assert s.relative_change > 0.3 and "numbers here are of the reordered weights" in s.verdict_reason


@pytest.mark.parametrize("whole", [1 << 30, 0])
def test_the_gathered_side_reads_windows_rows_and_columns_as_the_gathered_array(tmp_path, monkeypatch, whole):
    """``GatheredSide`` against numpy's ``take``: windows that split rows, every axis, a 1-D tensor; the
    source read whole and row by row."""
    from weightdiff.io.checkpoint import locate
    from weightdiff.measure import compute
    from weightdiff.measure.compute import GatheredSide

    monkeypatch.setattr(compute, "GATHER_WHOLE_BYTES", whole)

    rng = np.random.default_rng(0)
    t = {"w": rng.standard_normal((37, 11)).astype(np.float32), "b": rng.standard_normal(37).astype(np.float32)}
    write_checkpoint(tmp_path / "c", t)
    with locate(tmp_path / "c") as ck:
        for name, axis, index in (("w", 0, rng.permutation(37)), ("w", 1, rng.permutation(11)),
                                  ("w", 0, np.sort(rng.choice(37, 20, replace=False))), ("b", 0, rng.permutation(37))):
            side = GatheredSide(ck, "x", name, axis, index)
            want = np.take(t[name], index, axis=axis)
            assert side.tensors["x"].shape == want.shape
            for step in (1, 7, 11, 50, 10_000):
                got = np.concatenate(list(side.windows("x", step))).view(np.float32)
                assert np.array_equal(got, want.reshape(-1)), (name, axis, step)
            assert np.array_equal(side.read("x").view(np.float32), want)
            assert np.array_equal(side.read_rows("x", [3, 0]).view(np.float32).reshape(2, -1),
                                  want.reshape(len(want), -1)[[3, 0]])
        other = GatheredSide(ck, "x", "b")                     # another tensor as stored (an expert's)
        assert np.array_equal(other.read("x").view(np.float32), t["b"])


def test_token_rows_reordered_and_grown_are_not_called_trimmed(tmp_path):
    """A tokenizer swapped (ids remapped and rows added) read "reordered or trimmed" (nothing was trimmed), and with
    more than a tenth of the rows new, PARTIAL "unrelated to it: embeddings, head" (the bitwise row match wanted
    nine tenths of the tuned rows to be base rows, not of the base's)."""
    base = llama(np.random.default_rng(71), layers=2, hidden=64, inter=128, vocab=256)
    rng = np.random.default_rng(74)
    order = rng.permutation(256)
    tuned = dict(base)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tuned[k] = np.concatenate([base[k][order], base[k].mean(0, keepdims=True).repeat(32, 0)]).astype(np.float32)
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    r = compare(tmp_path / "b", tmp_path / "t")
    title = verdict_title(r.to_dict()["summary"])
    assert r.summary.verdict == "derived" and not [c for c in r.summary.components if c["status"] == "unrelated"]
    assert r.summary.scope["permuted_units"].get("tensors_grown") == 2
    assert "with rows added" in title and "trimmed" not in title, title
    assert "a vocabulary grown" in r.summary.verdict_reason and "trimmed" not in r.summary.verdict_reason


def _with_vectors(t: dict, width: str) -> dict:
    """Biases on q, k, v, o, gate, up and down (Qwen2 has q/k/v ones, OPT fc1/fc2 ones), per-channel
    q_norm/k_norm gains: over the whole q and k width (OLMo-2, ``width="full"``) or one head long and shared
    by every head (Qwen3, ``width="head"``), and one attention sink per query head (gpt-oss)."""
    rng = np.random.default_rng(17)
    for i in range(3):
        p = f"model.layers.{i}."
        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            t[p + k + ".bias"] = rng.normal(0, 0.5, t[p + k + ".weight"].shape[0]).astype(np.float32)
        for k in ("q", "k"):
            n = t[p + f"self_attn.{k}_proj.weight"].shape[0] if width == "full" else D
            t[p + f"self_attn.{k}_norm.weight"] = (1 + rng.normal(0, 0.3, n)).astype(np.float32)
        t[p + "self_attn.sinks"] = rng.normal(0, 1, t[p + "self_attn.q_proj.weight"].shape[0] // D).astype(np.float32)
    return t


def _heads_vectors(t: dict, follow: bool) -> dict:
    """``_heads``, and the vectors indexed by those heads reordered alike (``follow``) or left as stored."""
    rows = _rows([2, 0, 3, 1])
    p = "model.layers.1.self_attn."
    moved = [p + k + ".bias" for k in ("q_proj", "k_proj", "v_proj")]
    moved += [p + f"{k}_norm.weight" for k in ("q", "k") if t[p + f"{k}_norm.weight"].shape[0] == len(rows)]
    t = _heads(t)
    for k in moved if follow else ():
        t[k] = t[k][rows]
    if follow:
        t[p + "sinks"] = t[p + "sinks"][[2, 0, 3, 1]]
    return t


def _mlp_vectors(t: dict, follow: bool) -> dict:
    order = np.random.default_rng(8).permutation(128)
    t = _mlp(t)
    for i in range(3):
        for k in ("gate_proj", "up_proj") if follow else ():
            k = f"model.layers.{i}.mlp.{k}.bias"
            t[k] = t[k][order]
    return t


@pytest.mark.parametrize("width", ["full", "head"])
@pytest.mark.parametrize("kind", ["heads", "mlp"])
@pytest.mark.parametrize("follow", [True, False])
def test_a_vector_indexed_by_reordered_units_is_compared_in_their_order(tmp_path, kind, follow, width):
    """F9/F10: units reordered with a bias (q/k/v, gate/up), OLMo-2's q_norm/k_norm gains or gpt-oss's
    sinks left in the old order pair each unit with another's offset or gain: the model computes something else, yet those
    vectors, compared as stored, equalled the base's and the model read "0 tensors changed ... a reordering
    alone changes nothing". Compared in the units' order they read changed when they stayed and unchanged
    when they followed. An output projection's bias (o, down: indexed by the hidden size) and Qwen3's
    one-head q_norm/k_norm (shared by every head) are not indexed by the units and stay unchanged either way."""
    base = _with_vectors(llama(np.random.default_rng(3), layers=3, hidden=64, inter=128, vocab=256), width)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "r", (_heads_vectors if kind == "heads" else _mlp_vectors)(
        {k: v.copy() for k, v in base.items()}, follow))
    r = compare(tmp_path / "b", tmp_path / "r")
    s = r.summary
    blocks = {"layers.1": ["attn"]} if kind == "heads" else {f"layers.{i}": ["mlp"] for i in range(3)}
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == blocks, s.verdict_reason
    if kind == "heads":
        p = "model.layers.1.self_attn."
        stale = {p + k + ".bias" for k in ("q_proj", "k_proj", "v_proj")} | {p + "sinks"}
        stale |= {p + f"{k}_norm.weight" for k in ("q", "k")} if width == "full" else set()
    else:
        stale = {f"model.layers.{i}.mlp.{k}.bias" for i in range(3) for k in ("gate_proj", "up_proj")}
    changed = {t.name for t in r.tensors if t.status != "unchanged"}
    assert changed == (set() if follow else stale), changed
    for t in r.tensors:
        if t.name in stale:
            assert (t.note or "").startswith("compared with the base's"), t.name
    assert s.scope["permuted_units"]["tensors_undone"] == sum(
        (t.note or "").startswith("compared with") for t in r.tensors)
    if follow:
        assert s.relative_change == 0 and s.delta_params == 0
    else:
        assert s.scope["tensors_changed"] == len(stale) and s.delta_params > 0


@pytest.mark.parametrize("trained", [False, True])
def test_the_token_row_check_reads_its_tables_by_rows_never_whole(tmp_path, monkeypatch, trained):
    """The reordered-token-rows check read and decoded both whole tables of each pair (1.6 GB peak at Mistral-7B's
    32,000 x 4,096, bf16): the bitwise hashing, the sampled cosine test and the cosine match now read them in row
    blocks (shrunk here to 32 rows so that 256 rows take several), with the same answer."""
    from weightdiff.measure import permutation, rowmatch

    base = llama(np.random.default_rng(71), layers=2, hidden=64, inter=128, vocab=256)
    idx = np.random.default_rng(72).permutation(256)
    ref_base = {k: (v[idx] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in base.items()}
    tuned = _fine_tune(ref_base) if trained else ref_base
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    want = compare(tmp_path / "b", tmp_path / "t").to_dict()
    monkeypatch.setattr(permutation, "ROW_CHUNK", 32)
    monkeypatch.setattr(rowmatch, "BLOCK", 32)
    seen = watch_reads(monkeypatch, "_reordered", lambda kind, *a, **k: kind == "rows",
                       lambda name: name in ("model.embed_tokens.weight", "lm_head.weight"))
    got = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert got["summary"]["scope"]["permuted_units"]["undone"] == {"embeddings": ["rows"], "head": ["rows"]}
    assert got["summary"]["verdict"] == want["summary"]["verdict"]
    assert [t["rel_change"] for t in got["tensors"]] == [t["rel_change"] for t in want["tensors"]]
    assert seen and max(seen) <= 96, sorted(set(seen))          # at most 3 candidates x 32 rows at a time


def test_each_side_measured_again_is_let_go_before_the_next(tmp_path, monkeypatch):
    """The tensors measured again kept every side to the end of the stage: a gathered side holds its source whole
    (a 32,000-token table: 256 MB), a rotated one its last row block (up to 128 MB), and a Mistral-7B-shaped pair
    rotated peaked at 1.6 GB. When a tensor is measured again, no side of an earlier one holds data."""
    import weakref

    from weightdiff.measure import compute

    base = llama(np.random.default_rng(71), layers=3, hidden=64, inter=128, vocab=256)
    idx = np.random.default_rng(72).permutation(256)
    ref_base = {k: (v[idx] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", _fine_tune(_mlp(ref_base)))
    sides: list = []
    made, again = compute.GatheredSide.__init__, compute.remeasure
    held: list[int] = []

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        sides.append(weakref.ref(self))

    def remeasure(pair, side, *args, **kwargs):
        held.append(sum(1 for w in sides if w() is not None and w() is not side and w()._whole is not None))
        return again(pair, side, *args, **kwargs)

    monkeypatch.setattr(compute.GatheredSide, "__init__", init)
    monkeypatch.setattr(compute, "remeasure", remeasure)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert {"rows"} <= set(s.scope["permuted_units"]["undone"]["embeddings"])
    assert len(held) >= 4 and max(held) == 0, held


def test_a_fused_qkv_is_checked_for_reordered_heads_in_row_blocks(tmp_path, monkeypatch):
    """The heads check decoded a fused qkv projection (Phi-3's ``qkv_proj``, Falcon's ``query_key_value``) whole to
    float32 on each side before splitting it (a Falcon-40B qkv, 9,216 x 8,192: 600 MB); q, k and v are now the rows
    of each, read in row blocks (``fused_qkv_sources``), with the same heads found."""
    make, reorder, blocks = CASES["phi3"]
    base = make()
    _write(tmp_path / "b", base, "phi3")
    _write(tmp_path / "t", reorder(_fine_tune(dict(base))), "phi3")
    watch_reads(monkeypatch, "_reordered", lambda kind, *a, **k: kind == "attn", lambda name: "qkv_proj" in name)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.scope["permuted_units"]["undone"]["layers.1"] == ["attn", "mlp"], s.scope["permuted_units"]
