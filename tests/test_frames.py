"""The detectors' tests on whole matrices run in row blocks, and a sample of rows decides first.

Folded norms, units rescaled and a rotated residual stream were checked on whole matrices decoded to float64,
several copies at once: a 7B-shaped fine-tune that trained its norms (as every full fine-tune does) peaked at
1.6 GB against 0.84 GB for the same change with its norms untouched, and read each matrix that reads the residual
stream a second time. ``measure.rotation``'s ``Frame``, ``frame_sums``, ``in_cross``, ``out_cross`` and
``RotatedSide`` now work in row blocks of ``BLOCK_BYTES``; the reference is plain numpy on the whole matrices. A
sample of rows (``SAMPLE_ROWS``) ends a fold or rescale test that cannot pass before any matrix is read whole.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.io.checkpoint import locate
from weightdiff.measure import rotation as rot


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few rows and a sample of a few rows, so that every path crosses block boundaries."""
    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * 40 * 3)
    monkeypatch.setattr(rot, "SAMPLE_ROWS", 7)


def _pair(tmp_path, rng, dtype="F32", shape=(37, 40)):
    b = rng.standard_normal(shape).astype(np.float32)
    t = (b + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    t[3, :5] = 0.0
    bc = locate(write_checkpoint(tmp_path / "b", {"w": b, "v": b[:, 0].copy()}, dtype=dtype))
    tc = locate(write_checkpoint(tmp_path / "t", {"w": t, "v": t[:, 0].copy()}, dtype=dtype))
    return bc, tc, rot.values(bc, "w").astype(np.float64), rot.values(tc, "w").astype(np.float64)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_frames_in_blocks_equal_the_whole_matrix_reference(tmp_path, rng, tiny_blocks, dtype):
    bc, tc, b, t = _pair(tmp_path, rng, dtype)
    r_in, r_out = np.linalg.qr(rng.standard_normal((40, 40)))[0], np.linalg.qr(rng.standard_normal((37, 37)))[0]
    g_in, g_rows = rng.random(40) + 0.5, rng.random(37) - 0.5
    perm_rows, perm_cols = rng.permutation(37), rng.permutation(40)
    cases = [(rot.Frame(bc, "w", "in", r_in, g_in), (b * g_in) @ r_in),
             (rot.Frame(bc, "w", "in"), b),
             (rot.Frame(bc, "w", "out", r_out), r_out.T @ b),
             (rot.Frame(bc, "w", "rows", None, g_rows), b * g_rows[:, None]),
             (rot.Frame(bc, "w", "rows", None, g_rows, (0, perm_rows)), b[perm_rows] * g_rows[:, None]),
             (rot.Frame(bc, "w", "in", None, g_in, (1, perm_cols)), b[:, perm_cols] * g_in)]
    pick = np.array([36, 0, 5, 5, 17])
    for frame, want in cases:
        assert len(frame.blocks()) > 3
        got = np.concatenate([frame.block(lo, hi) for lo, hi in frame.blocks()])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(frame.block(0, 0, pick), want[pick], rtol=1e-12, atol=1e-12)
        # the side ``compute.remeasure`` reads: windows of any size and span, rows, whole
        side = rot.RotatedSide(bc, "w", "w", frame.kind, frame.r, frame.gain,
                               None if frame._rows_index is None and frame._cols_index is None else
                               ((0, frame._rows_index) if frame._rows_index is not None else (1, frame._cols_index)))
        flat = want.reshape(-1)
        for size, start, stop in ((None, 0, None), (7, 0, None), (333, 11, 1200), (10_000, 5, 6)):
            got = np.concatenate(list(side.windows("w", size, start, stop)))
            np.testing.assert_allclose(got, flat[start:stop], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(side.read("w"), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(side.read_rows("w", pick), want[pick], rtol=1e-12, atol=1e-12)
    # a vector (a bias, a norm) is one column
    v = rot.Frame(bc, "v", "out", r_out)
    np.testing.assert_allclose(v.block(0, 37), r_out.T @ b[:, :1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_frame_sums_and_crosses_equal_numpy(tmp_path, rng, tiny_blocks, dtype):
    bc, tc, b, t = _pair(tmp_path, rng, dtype)
    g = rng.random(40) + 0.5
    sums = rot.frame_sums([rot.Frame(bc, "w"), rot.Frame(bc, "w", "in", None, g)], tc, "w")

    def cos(x, y):
        return float(np.vdot(x, y) / np.sqrt(np.vdot(x, x) * np.vdot(y, y)))

    assert sums.cosines() == pytest.approx([cos(b, t), cos(b * g, t)], rel=1e-12)
    kept = t != 0
    assert sums.cosines(kept=True) == pytest.approx([cos(np.where(kept, b, 0), t),
                                                     cos(np.where(kept, b * g, 0), t)], rel=1e-12)
    assert sums.zeros_tuned == int(np.count_nonzero(t == 0)) and sums.zeros_base == int(np.count_nonzero(b == 0))
    rows = rot.sample_rows(37)
    assert len(rows) == 7 and rows[0] == 0 and rows[-1] == 36
    some = rot.frame_sums([rot.Frame(bc, "w")], tc, "w", rows)
    assert some.cosines()[0] == pytest.approx(cos(b[rows], t[rows]), rel=1e-12)
    upto = rot.frame_sums([rot.Frame(bc, "w")], tc, "w", upto=20)
    assert upto.cosines()[0] == pytest.approx(cos(b[:20], t[:20]), rel=1e-12)
    c, nb, nt = rot.out_cross(bc, "w", tc, "w")
    np.testing.assert_allclose(c, b @ t.T, rtol=1e-10, atol=1e-10)
    assert (nb, nt) == pytest.approx((np.linalg.norm(b), np.linalg.norm(t)), rel=1e-12)
    c, nb, nt = rot.in_cross(bc, "w", tc, "w", upto=30)
    np.testing.assert_allclose(c, b[:30].T @ t[:30], rtol=1e-10, atol=1e-10)
    idx = rng.permutation(37)[:25]
    c, nb, nt = rot.in_cross(bc, "w", tc, "w", index=idx)
    np.testing.assert_allclose(c, b[idx].T @ t[:25], rtol=1e-10, atol=1e-10)
    # the cosine of R^T B with T from the cross, for an orthogonal R, is the one of the whole matrices
    r = np.linalg.qr(rng.standard_normal((37, 37)))[0]
    c, nb, nt = rot.out_cross(bc, "w", tc, "w")
    assert float(np.sum(r * c)) / (nb * nt) == pytest.approx(cos(r.T @ b, t), rel=1e-10)


def _fold(t: dict, layers: int = 4) -> dict:
    """Every norm's gains folded into the matrices that read it, the norms set to ones (QuaRot's first step)."""
    o = dict(t)
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, kinds in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = t[p + norm + ".weight"].astype(np.float64)
            for k in kinds:
                o[p + k + ".weight"] = (t[p + k + ".weight"] * g[None, :]).astype(np.float32)
            o[p + norm + ".weight"] = np.ones_like(g, dtype=np.float32)
    return o


def test_the_sample_decides_without_reading_whole_matrices_and_misses_no_fold(tmp_path, rng, tiny_blocks,
                                                                             monkeypatch):
    """A full fine-tune (norms trained too) and a fine-tune of the MLP alone read no matrix whole again; a fold,
    a rescale and a rotation are still found, in blocks, with the same verdicts as before."""
    passes = []
    whole, values = rot.Frame.blocks, rot.values
    monkeypatch.setattr(rot.Frame, "blocks", lambda self: passes.append(self.name) or whole(self))

    def spied(ck, name):
        got = values(ck, name)
        if len(ck.tensors[name].shape) >= 2:        # a matrix decoded whole (a vector is read whole anyway)
            passes.append(name)
        return got

    monkeypatch.setattr(rot, "values", spied)
    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    # every matrix and every norm trained
    ft = {k: (v + 1e-2 * rng.standard_normal(v.shape) * (v.std() if v.ndim == 2 else 1.0)).astype(np.float32)
          for k, v in base.items()}
    s = compare(b, write_checkpoint(tmp_path / "ft", ft)).summary
    assert s.verdict == "derived" and "folded_norms" not in s.flags and passes == []
    # the MLP alone trained (attention unchanged: the rescale test runs on up and down)
    mlp = {k: (v + 1e-2 * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if ".mlp." in k else v
           for k, v in base.items()}
    s = compare(b, write_checkpoint(tmp_path / "mlp", mlp)).summary
    assert s.verdict == "derived" and "rescaled_units" not in s.flags and passes == []
    # a fold is still a fold, found by the whole-matrix pass after the sample
    s = compare(b, write_checkpoint(tmp_path / "fold", _fold(base))).summary
    assert s.verdict == "derived" and "folded_norms" in s.flags and passes
    assert s.scope["folded_norms"]["tensors_changed"] == 0
    # a fold with a fine-tune beneath it, on every row, is measured beneath the fold
    under = {k: (v + 1e-3 * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
             for k, v in _fold(base).items()}
    s = compare(b, write_checkpoint(tmp_path / "under", under)).summary
    assert "folded_norms" in s.flags and s.scope["folded_norms"]["tensors_changed"] > 0
    # up's rows and down's columns rescaled: found through the sample
    c = np.random.default_rng(9).uniform(0.5, 2.0, 256)
    sc = dict(base)
    for i in (1, 2):
        p = f"model.layers.{i}.mlp."
        sc[p + "up_proj.weight"] = (base[p + "up_proj.weight"] * c[:, None]).astype(np.float32)
        sc[p + "down_proj.weight"] = (base[p + "down_proj.weight"] / c[None, :]).astype(np.float32)
    s = compare(b, write_checkpoint(tmp_path / "sc", sc)).summary
    assert "rescaled_units" in s.flags and s.scope["rescaled_units"]["tensors_changed"] == 0


def test_a_rotation_found_in_blocks_reads_as_it_did_whole(tmp_path, rng, monkeypatch):
    """The rotated residual stream, its fit and its remeasure in blocks of a few rows, against one block: the same
    verdict, flags and scope, the numbers within float64 summation order."""
    base = llama(rng)
    r = np.linalg.qr(np.random.default_rng(42).standard_normal((128, 128)))[0]
    o = {k: v.astype(np.float64) for k, v in _fold(base).items()}
    for i in range(4):
        p = f"model.layers.{i}."
        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            o[p + k + ".weight"] = o[p + k + ".weight"] @ r
        for k in ("self_attn.o_proj", "mlp.down_proj"):
            o[p + k + ".weight"] = r.T @ o[p + k + ".weight"]
    o["lm_head.weight"] = (o["lm_head.weight"] * o["model.norm.weight"][None, :]) @ r
    o["model.norm.weight"] = np.ones(128)
    o["model.embed_tokens.weight"] = o["model.embed_tokens.weight"] @ r
    o = {k: (v + 1e-3 * v.std() * rng.standard_normal(v.shape) if k.endswith("layers.2.mlp.down_proj.weight") else v)
         .astype(np.float32) for k, v in o.items()}
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", o)
    one = compare(b, t).to_dict()
    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * 256 * 5)
    many = compare(b, t).to_dict()
    assert one["summary"]["verdict"] == many["summary"]["verdict"] == "derived"
    assert one["summary"]["flags"] == many["summary"]["flags"] and "rotated_residual" in one["summary"]["flags"]
    a, z = one["summary"]["scope"], many["summary"]["scope"]
    assert set(a) == set(z) and all(a[k] == z[k] for k in a if k != "rotated_residual"), (a, z)
    ra, rz = a["rotated_residual"], z["rotated_residual"]
    assert set(ra) == set(rz)
    for k in ra:
        assert ra[k] == (pytest.approx(rz[k], rel=1e-9) if isinstance(ra[k], float) else rz[k]), (k, ra[k], rz[k])
    by = {x["name"]: x for x in many["tensors"]}
    for x in one["tensors"]:
        assert x["status"] == by[x["name"]]["status"], x["name"]
        if x.get("rel_change") is not None:
            assert by[x["name"]]["rel_change"] == pytest.approx(x["rel_change"], rel=1e-6, abs=1e-12)
    changed = [x["name"] for x in one["tensors"] if x["status"] == "changed"]
    assert changed == ["model.layers.2.mlp.down_proj.weight"], changed


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_cross_sums_into_a_fit_and_inner_products_hold_no_d_by_d_array(tmp_path, rng, monkeypatch, dtype):
    """The fit's cross sums go into its one d x d array (``into=``), each block's product in column tiles, and the
    held-out cosines sum trace(R^T B T^T) block by block (``out_inner``, ``in_inner``): at d = 8,192 a d x d
    temporary is 512 MB, and the fit of a 70B-width rotated pair held three of them beside R (1.9 GB). Checked
    against numpy on the whole matrices, and by the largest allocation tracemalloc sees while they run."""
    import tracemalloc

    d, n = 512, 600
    bc, tc, b, t = _pair(tmp_path, rng, dtype, shape=(n, d))
    ob, ot = b[:300].T.copy(), t[:300].T.copy()               # [d, 300] output matrices
    obc = locate(write_checkpoint(tmp_path / "ob", {"w": ob.astype(np.float32)}, dtype="F32"))
    otc = locate(write_checkpoint(tmp_path / "ot", {"w": ot.astype(np.float32)}, dtype="F32"))
    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * d * 8)        # blocks and tiles of 8 rows / columns: 32 KB
    r = np.linalg.qr(rng.standard_normal((d, d)))[0]
    dd = 8 * d * d                                            # 2 MB

    def largest(fn):
        tracemalloc.start()
        try:
            got = fn()
            return got, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    sums = np.zeros((d, d))
    (c, nb, nt), peak = largest(lambda: rot.in_cross(bc, "w", tc, "w", into=sums))
    assert c is sums and peak < dd / 4
    np.testing.assert_allclose(sums, b.T @ t, rtol=1e-10, atol=1e-10)
    assert (nb, nt) == pytest.approx((np.linalg.norm(b), np.linalg.norm(t)), rel=1e-12)
    fresh = rot.in_cross(bc, "w", tc, "w")[0]
    assert np.array_equal(fresh, sums)                        # the same bits into a fit's sums as on its own
    (c2, _, _), peak = largest(lambda: rot.out_cross(obc, "w", otc, "w", into=sums))
    assert c2 is sums and peak < dd / 4
    np.testing.assert_allclose(sums, b.T @ t + ob @ ot.T, rtol=1e-10, atol=1e-10)

    (s, nb, nt), peak = largest(lambda: rot.out_inner(obc, "w", otc, "w", r))
    assert peak < dd / 4
    assert s == pytest.approx(float(np.sum(r * (ob @ ot.T))), rel=1e-10)
    assert (nb, nt) == pytest.approx((np.linalg.norm(ob), np.linalg.norm(ot)), rel=1e-12)
    idx = rng.permutation(n)[:200]
    (s, nb, nt), peak = largest(lambda: rot.in_inner(bc, "w", tc, "w", r, index=idx))
    assert peak < dd / 4
    assert s == pytest.approx(float(np.sum(r * (b[idx].T @ t[:200]))), rel=1e-10)
    assert (nb, nt) == pytest.approx((np.linalg.norm(b[idx]), np.linalg.norm(t[:200])), rel=1e-12)
    with pytest.raises(ValueError, match="float64"):
        rot.in_cross(bc, "w", tc, "w", into=np.zeros((d, d), np.float32))


def test_the_blocked_passes_hold_one_block_of_each_side(tmp_path, rng, monkeypatch):
    """A name rebound to the next block keeps the previous one until the new one is made: the output matrices' pass
    held two of B's blocks (128 MB each at 70B widths) and the fit's cross sums reached 1.05 GB. Each block is let
    go before the next is read: at most one block of B's rows and one of T's, beside pieces being decoded."""
    import tracemalloc

    d, n = 512, 300
    ob, ot = (rng.standard_normal((d, n)).astype(np.float32) for _ in range(2))
    obc = locate(write_checkpoint(tmp_path / "ob", {"w": ob}, dtype="F32"))
    otc = locate(write_checkpoint(tmp_path / "ot", {"w": ot}, dtype="F32"))
    monkeypatch.setattr(rot, "BLOCK_BYTES", 8 * n * 32)       # T's blocks 32 rows, B's 128 (four budgets)
    monkeypatch.setattr(rot, "OUT_BUDGETS", 4)
    monkeypatch.setattr(rot, "DECODE_PIECE", 1024)
    big = 8 * n * 128

    def peak(fn) -> float:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1] / big
        finally:
            tracemalloc.stop()
    assert peak(lambda: rot._out_pass(obc, "w", otc, "w", lambda *a: None)) < 1.75          # (2.36 before)
    assert peak(lambda: rot._in_pass(obc, "w", otc, "w", None, None, lambda b, t: None)) < 0.7     # (0.81)
