"""``measure.rowmatch.match_rows``: every tuned row's base row, or no order at all when one is ambiguous."""
from __future__ import annotations

import numpy as np
import pytest

from weightdiff.measure import rowmatch
from weightdiff.measure.rowmatch import match_rows


def _table(rng, n=600, h=48):
    return rng.standard_normal((n, h)).astype(np.float32)


def _trained(rng, x, rel=1e-2):
    return (x + rel * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize("keep", [600, 350])
def test_the_order_of_rows_remapped_or_trimmed_then_trained(rng, keep):
    b = _table(rng)
    idx = rng.permutation(600)[:keep]
    m = match_rows(_trained(rng, b[idx], 0.3), b, "F32", "F32")
    assert m.order is not None and m.order.tolist() == idx.tolist() and m.matched == keep and m.why == ""
    assert 0.85 < m.worst_cosine < 1                                  # a heavy change (rel. 0.3) still matches


def test_bf16_tables_and_a_float_base(rng):
    b = _table(rng)
    idx = rng.permutation(600)
    bf = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)      # noqa: E731  (bf16 storage, truncated)
    assert match_rows(bf(_trained(rng, b[idx])), bf(b), "BF16", "BF16").order.tolist() == idx.tolist()
    assert match_rows(bf(_trained(rng, b[idx])), b, "BF16", "F32").order.tolist() == idx.tolist()


def test_blocks_smaller_than_the_table_give_the_same_order(rng, monkeypatch):
    b = _table(rng)
    t = _trained(rng, b[rng.permutation(600)])
    whole = match_rows(t, b, "F32", "F32")
    monkeypatch.setattr(rowmatch, "BLOCK", 7)
    monkeypatch.setattr(rowmatch, "SIM_ELEMENTS", 1000)
    small = match_rows(t, b, "F32", "F32")
    assert small.order.tolist() == whole.order.tolist() and small.worst_cosine == pytest.approx(whole.worst_cosine)


def test_no_order_when_a_row_is_new_zero_or_ambiguous(rng):
    b = _table(rng)
    idx = rng.permutation(600)
    new = _trained(rng, b[idx])
    new[3] = rng.standard_normal(48)                          # a new token's row: no base row near it
    m = match_rows(new, b, "F32", "F32")
    assert m.order is None and m.matched == 599 and m.why == "1 of 600 rows have no unambiguous base row"
    zero = _trained(rng, b[idx])
    zero[9] = 0
    m = match_rows(zero, b, "F32", "F32")
    assert m.order is None and "(1 of them all zero)" in m.why
    twin = b.copy()
    twin[idx[-1]] = b[idx[4]] * 1.5 + 1e-4                  # a base row not kept, pointing the same way
    assert match_rows(_trained(rng, b[idx[:300]]), b, "F32", "F32").order is not None
    m = match_rows(_trained(rng, b[idx[:300]]), twin, "F32", "F32")
    assert m.order is None and m.why == "1 of 300 rows have no unambiguous base row"
    # two tuned rows from one base row: each unambiguous, but the order would use that row twice
    dup = _trained(rng, b[np.r_[idx[:300], idx[:1]]])
    m = match_rows(dup, b, "F32", "F32")
    assert m.order is None and m.why == "some base rows are the nearest of several tuned rows"


def test_unrelated_tables_get_no_order(rng):
    assert match_rows(_table(rng), _table(rng), "F32", "F32").order is None
    assert match_rows(_table(rng)[:, :8], _table(rng), "F32", "F32").order is None      # another width


def test_rows_alike_in_the_base_are_one_row_for_the_match(rng, monkeypatch):
    """Reserved tokens initialised to one vector and padding rows of zeros (Llama 3's reserved special tokens,
    a padded vocabulary): a tuned row between two base rows stored alike is not ambiguous, since either gives the
    same measure; the alike rows are spread over the tuned rows matched to them. The order stopped there, and a
    trimmed, trained table fell back to rows compared with other tokens' rows."""
    b = _table(rng)
    b[500:540] = b[500]                                # 40 reserved rows, one vector
    b[590:] = 0                                        # 10 padding rows
    idx = np.concatenate([rng.permutation(500)[:300], np.arange(500, 520), np.arange(590, 595)])
    rng.shuffle(idx)
    t = _trained(rng, b[idx])
    t[np.isin(idx, np.arange(590, 600))] = 0           # padding stays zero
    monkeypatch.setattr(rowmatch, "BLOCK", 64)
    m = match_rows(t, b, "F32", "F32")
    assert m.order is not None, m.why
    got = m.order
    assert np.array_equal(b[got], b[idx])              # each tuned row against a row alike its own
    assert len(np.unique(got)) == len(got)             # no base row twice
    # more tuned rows than alike base rows: no order
    t2 = _trained(rng, np.concatenate([b[:100], np.repeat(b[500:501], 41, axis=0)]))
    assert match_rows(t2, b, "F32", "F32").order is None


def test_a_row_table_reads_rows_locally_and_a_streamed_table_once(rng):
    """Local: rows by ``read_rows``, never the whole table. Streamed from the Hub: the match gathers thousands of
    scattered rows at a time (one HTTP range each), so the table is read once, whole; the same order either way."""
    from types import SimpleNamespace

    from weightdiff.measure.rowmatch import RowTable

    b = _table(rng)
    idx = rng.permutation(600)
    t = _trained(rng, b[idx])
    calls = {"read": 0, "rows": []}

    def ck(x, streamed):
        def read(name):
            calls["read"] += 1
            return x.copy()

        def read_rows(name, rows):
            calls["rows"].append(len(rows))
            return x[np.asarray(rows, np.int64)]
        return SimpleNamespace(tensors={"w": SimpleNamespace(shape=x.shape)}, read=read, read_rows=read_rows,
                               streamed=streamed)

    local = match_rows(RowTable.stored(ck(t, False), "w"), RowTable.stored(ck(b, False), "w"), "F32", "F32")
    assert local.order.tolist() == idx.tolist() and calls["read"] == 0
    assert calls["rows"] and max(calls["rows"]) <= rowmatch.BLOCK
    calls["rows"].clear()
    streamed = match_rows(RowTable.stored(ck(t, True), "w"), RowTable.stored(ck(b, True), "w"), "F32", "F32")
    assert streamed.order.tolist() == idx.tolist() and calls["read"] == 2 and not calls["rows"]
    first = RowTable.stored(ck(t, False), "w", rows=10)
    assert first.shape == (10, 48) and np.array_equal(first[-1:], t[9:10]) and np.array_equal(first[:], t[:10])
    with pytest.raises(IndexError):
        first[np.array([10])]
