"""The shared rows of a resized table (a vocabulary grown with ``resize_token_embeddings``, then
trained) get the rank analysis of a changed matrix of shape (shared rows x the rest): through the
direct path when small, through the streamed Gram matrix of the stats pass when large (never reading
the whole tables), and on the torch backend from the delta it keeps. Before, a resized tensor had no
rank, so the form read "undecided ... no rank analysis (--no-rank, or a NaN or infinity ...)" and
delta_params priced it at m x n (found by the real-checkpoints tester)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_checkpoint
from weightdiff import compare
from weightdiff.io.safetensors_write import to_storage
from weightdiff.kernels.dtypes import decode
from weightdiff.measure import compute

N = 64          # hidden size
NEW = 4         # rows added


def _bf16(x: np.ndarray) -> np.ndarray:
    """``x`` as bf16 values, in float64 (what the checkpoint stores, decoded)."""
    return decode(to_storage(x.astype(np.float32), "BF16"), "BF16").reshape(x.shape)


def _tables(rng, vocab: int, rank: int, rows_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A base table [vocab, N] and its resized tuned table [vocab + NEW, N] whose shared rows got a
    rank-``rank`` update (rows before ``rows_from`` untouched), both already bf16 values."""
    base = _bf16(rng.normal(0, 0.02, (vocab, N)))
    u = rng.normal(0, 0.1, (vocab, rank))
    u[:rows_from] = 0.0
    shared = _bf16(base + u @ rng.normal(0, 0.1, (rank, N)))
    new = _bf16(rng.normal(0, 0.02, (NEW, N)))
    return base, np.concatenate([shared, new])


def _model(rng, vocab: int) -> dict:
    """The rest of a small Llama-like model (unchanged in the tuned one)."""
    return {"model.layers.0.self_attn.q_proj.weight": _bf16(rng.normal(0, 0.02, (N, N))),
            "model.layers.0.mlp.up_proj.weight": _bf16(rng.normal(0, 0.02, (96, N))),
            "model.norm.weight": np.ones(N)}


def _write(tmp_path, base: dict, tuned: dict):
    f32 = lambda d: {k: v.astype(np.float32) for k, v in d.items()}
    return (write_checkpoint(tmp_path / "base", f32(base), dtype="BF16"),
            write_checkpoint(tmp_path / "tuned", f32(tuned), dtype="BF16"))


def _reference(base: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """Singular values of the shared rows' delta, float64 numpy SVD."""
    return np.linalg.svd(tuned[:base.shape[0]] - base, compute_uv=False)


def _pair_of_tables(tmp_path, vocab: int, rank: int, seed: int, rows_from: int = 0, emb_changed: bool = True):
    rng = np.random.default_rng(seed)
    rest = _model(rng, vocab)
    eb, et = _tables(rng, vocab, rank, rows_from)
    if not emb_changed:
        et = np.concatenate([eb, et[vocab:]])
    hb, ht = _tables(rng, vocab, rank, rows_from)
    base = {**rest, "model.embed_tokens.weight": eb, "lm_head.weight": hb}
    tuned = {**rest, "model.embed_tokens.weight": et, "lm_head.weight": ht}
    return _write(tmp_path, base, tuned), {"model.embed_tokens.weight": (eb, et), "lm_head.weight": (hb, ht)}


def test_resized_shared_rows_read_their_rank_as_a_numpy_svd_does(tmp_path):
    """A rank-3 update of the shared rows of both tables: numerical rank 3, the spectrum of the
    (shared rows x n) delta as numpy's float64 SVD gives it, shape_2d the shared rows."""
    vocab, r = 300, 3
    (b, t), tables = _pair_of_tables(tmp_path, vocab, r, seed=1)
    res = compare(b, t, seed=0)
    for name, (eb, et) in tables.items():
        rec = res.tensor(name)
        assert rec.status == "resized" and rec.numel_compared == vocab * N
        assert rec.rank is not None, name
        assert tuple(rec.rank.shape_2d) == (vocab, N)
        assert rec.rank.method == "exact" and rec.rank.exact
        s = _reference(eb, et)
        assert rec.rank.numerical_rank == r == int(np.sum(s > 1.5 * rec.rank.noise_floor))
        np.testing.assert_allclose(rec.rank.spectrum, s[:len(rec.rank.spectrum)], rtol=1e-9, atol=1e-12)
        assert rec.rank.energy_rank_99 <= r


def test_a_large_resized_table_goes_through_the_streamed_gram_path(tmp_path, monkeypatch):
    """4,200 shared rows x 64 is over ``LAPACK_MAX_ELEMENTS``: the rank comes from the Gram matrix summed
    as the stats pass streams the shared rows (small windows here, the first ones unchanged), never from
    a read of the whole tables, and equals the direct path's (both tables read, sliced)."""
    from weightdiff.measure import backend

    vocab, r = 4200, 5
    assert vocab * N > backend.LAPACK_MAX_ELEMENTS
    (b, t), tables = _pair_of_tables(tmp_path, vocab, r, seed=2, rows_from=1400)
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 10_000)        # windows end mid-row; stop is mid-window
    real = compute._analyze
    direct = []
    monkeypatch.setattr(compute, "_analyze", lambda *a, **k: direct.append(a[4]) or real(*a, **k))
    streamed = compare(b, t, seed=0)
    assert direct == []                                            # no table read for its rank
    monkeypatch.setattr(compute, "streamed_rank_sink", lambda *a, **k: None)
    reread = compare(b, t, seed=0)
    assert sorted(map(tuple, direct)) == [(vocab, N)] * 2         # the direct path: the shared rows only
    for name, (eb, et) in tables.items():
        x, y = streamed.tensor(name).rank, reread.tensor(name).rank
        assert x.method == "gram" and tuple(x.shape_2d) == (vocab, N) == tuple(y.shape_2d)
        assert x.exact and x.numerical_rank == y.numerical_rank == r
        s = _reference(eb, et)
        np.testing.assert_allclose(x.spectrum[:r], s[:r], rtol=1e-9)
        np.testing.assert_allclose(x.spectrum[:r], y.spectrum[:r], rtol=1e-9)
        assert x.noise_floor == pytest.approx(y.noise_floor, rel=1e-12)


def _llama_like(tmp_path, seed: int = 3):
    """The tester's case without transformers: a 512-token table and untied head grown to 516 rows,
    both trained (a dense change of their shared rows, as Adam leaves), everything else untouched."""
    rng = np.random.default_rng(seed)
    vocab = 512
    rest = _model(rng, vocab)
    base, tuned = dict(rest), dict(rest)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        x = _bf16(rng.normal(0, 0.02, (vocab, N)))
        moved = _bf16(x + rng.normal(0, 1e-3, (vocab, N)))
        base[name], tuned[name] = x, np.concatenate([moved, _bf16(rng.normal(0, 0.02, (NEW, N)))])
    return _write(tmp_path, base, tuned)


def test_the_testers_resized_tables_have_a_form_not_undecided_for_want_of_a_rank(tmp_path):
    from weightdiff.render.sentences import headline

    b, t = _llama_like(tmp_path)
    data = json.loads(compare(b, t).to_json(include_run=False))
    form = data["summary"]["form"]
    assert form["matrices_changed"] == 2 and form["matrices_without_rank"] == 0
    assert form["shares"]["without_rank"] == 0
    assert form["kind"] == "dense" and form["basis"] == "spectrum"
    text = " ".join(headline(data))
    assert "no rank analysis" not in text and "The change is dense" in text
    assert all(row["rank"]["shape_2d"] == [512, N] for row in data["tensors"] if row["status"] == "resized")


def test_delta_params_prices_the_shared_rows_by_their_rank(tmp_path):
    """r (m + n) per table for the shared rows, the new rows at their elements: not m x n, and no
    lower bound (nothing left without a rank)."""
    vocab, r = 300, 2
    (b, t), _ = _pair_of_tables(tmp_path, vocab, r, seed=4)
    res = compare(b, t)
    data = json.loads(res.to_json(include_run=False))
    scope = data["summary"]["scope"]
    e99 = [res.tensor(name).rank.energy_rank_99 for name in ("model.embed_tokens.weight", "lm_head.weight")]
    assert all(1 <= e <= r for e in e99)
    assert scope["delta_params_changed"] == sum(e * (vocab + N) for e in e99) <= 2 * r * (vocab + N)
    assert scope["delta_params_changed"] < vocab * N
    assert scope["delta_params_added"] == 2 * NEW * N
    assert data["summary"]["delta_params"] == scope["delta_params_changed"] + scope["delta_params_added"]
    assert data["summary"]["delta_params_lower"] is None


def test_only_new_rows_get_no_rank_beside_a_table_whose_shared_rows_changed(tmp_path):
    """The embedding only grew (its shared rows bitwise the base's): no rank, nothing to write down but
    its new rows; the head's shared rows changed: ranked."""
    vocab, r = 300, 3
    (b, t), _ = _pair_of_tables(tmp_path, vocab, r, seed=5, emb_changed=False)
    res = compare(b, t)
    emb, head = res.tensor("model.embed_tokens.weight"), res.tensor("lm_head.weight")
    assert emb.status == head.status == "resized"
    assert emb.frac_changed == 0 and emb.rank is None
    assert head.rank is not None and head.rank.numerical_rank == r
    form = res.summary.form
    assert form["matrices_changed"] == 1 and form["matrices_without_rank"] == 0 and form["kind"] == "low_rank"
    assert res.summary.scope["delta_params_changed"] == head.rank.energy_rank_99 * (vocab + N)


def test_no_rank_names_no_rank_as_its_cause(tmp_path):
    """With --no-rank the resized tables have no rank, and the sentence says why in those words alone;
    with rank on a sentence about changes without a rank names the kinds no rank is taken of, not --no-rank."""
    from weightdiff.render.sentences import form_sentence, headline

    b, t = _llama_like(tmp_path)
    data = json.loads(compare(b, t, rank=False).to_json(include_run=False))
    assert all(row["rank"] is None for row in data["tensors"] if row["status"] == "resized")
    text = " ".join(headline(data))
    assert "no rank analysis (--no-rank)," in text and "NaN" not in text
    form = data["summary"]["form"]
    on = form_sentence(form, True)
    assert "--no-rank" not in on and "experts fused in one tensor" in on and "NaN" in on
    assert "--no-rank, or" in form_sentence(form)          # an older JSON, no settings: both


def test_the_torch_backend_ranks_the_shared_rows_from_the_kept_delta(tmp_path, monkeypatch):
    """``device_rank_sink`` keeps a resized table's shared-row delta as the stats pass (stopping at the
    shared rows) streams it, and ranks it there: the numba path's rank, no second read (torch's cpu device)."""
    pytest.importorskip("torch")
    from weightdiff.kernels import cuda
    from weightdiff.measure import backend

    (b, t), tables = _pair_of_tables(tmp_path, 300, 3, seed=6)
    cpu = compare(b, t, seed=0)
    monkeypatch.setitem(backend.BACKENDS, "cuda", lambda threads: backend.Backend("cuda", cuda, "cpu"))
    monkeypatch.setattr(compute, "_analyze", lambda *a, **k: pytest.fail("the rank pass read the table again"))
    got = compare(b, t, device="cuda", seed=0)
    for name in tables:
        x, y = got.tensor(name).rank, cpu.tensor(name).rank
        assert x is not None and tuple(x.shape_2d) == (300, N)
        assert x.numerical_rank == y.numerical_rank == 3
        np.testing.assert_allclose(x.spectrum, y.spectrum, rtol=1e-5)
