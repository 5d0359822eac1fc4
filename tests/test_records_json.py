"""records.dumps: the fast encoder writes exactly the bytes of the standard library's."""

from __future__ import annotations

import numpy as np
import pytest

from weightdiff import compare
from weightdiff.records import dumps, dumps_reference


def _compared(tmp_path, rng, layers=1, noise=1e-3, base_dtype="BF16"):
    """A small llama-shaped pair, every weight nudged by ``noise``, compared."""
    from conftest import write_checkpoint
    from models import llama

    base = llama(rng, layers=layers, hidden=32, inter=48, vocab=64)
    tuned = {k: v + rng.normal(0, noise, v.shape).astype(np.float32) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base, dtype=base_dtype)
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    return compare(tmp_path / "b", tmp_path / "t")


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.5, float("nan"), float("inf"), -0.0, 1e300, 5e-324], "b": {}, "c": [], "d": (1, (2, "x")),
     "é": "ünï\u2028\"\\\n\t", 3: None, "n": np.float64(0.1), "i": np.int64(7), "f32": np.float32(0.3),
     "t": True, "deep": [[[[{"k": [{}]}]]]], "bool_key": {True: 1}},
    [], {}, "s", 1.5, None, [[]], [float("-inf")],
])
def test_fast_dumps_is_the_standard_encoders_bytes(obj):
    assert dumps(obj) == dumps_reference(obj)


def test_fast_dumps_on_a_whole_comparison(tmp_path, rng):
    d = _compared(tmp_path, rng).to_dict()
    assert dumps(d) == dumps_reference(d)


def test_what_json_cannot_hold_is_still_a_type_error():
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_each_tensor_record_is_one_line_and_to_json_matches_the_dict(tmp_path, rng):
    import json

    result = _compared(tmp_path, rng)
    text = result.to_json()
    assert text == dumps(result.to_dict()) == dumps_reference(result.to_dict())
    lines = text.splitlines()
    for t in result.tensors:      # `grep name` finds the whole record on one line
        (line,) = [x for x in lines if f'"name": "{t.name}"' in x]
        assert json.loads(line.strip().rstrip(",")) == json.loads(dumps(t.to_dict()))


def test_a_record_with_nan_or_an_added_attribute_is_written_like_its_dict():
    from weightdiff.records import RankRecord, TensorRecord

    rank = RankRecord(stable_rank=float("nan"), effective_rank=1.0, energy_rank_90=1, energy_rank_99=1,
                      numerical_rank=1, noise_floor=float("inf"), spectrum=[1.0, float("nan")],
                      energy_captured=None, shape_2d=(2, 3))
    rec = TensorRecord(name="w", base_name="w", status="changed", shape=[2, 3], base_shape=[2, 3],
                       dtype_base="F32", dtype_tuned="F32", numel=6, norm_base=np.float64(2.0),
                       cosine=float("-inf"), rank=rank, quant={"n": np.int64(3)})
    odd = TensorRecord(name="v", base_name=None, status="added", shape=[1], base_shape=None,
                       dtype_base=None, dtype_tuned="BF16", numel=1)
    odd.scratch = "not a field"          # not in the contract: never written
    for records in ([rec], [rec, odd]):
        got = dumps({"tensors": records, "x": 1})
        want = dumps_reference({"tensors": [r.to_dict() for r in records], "x": 1})
        assert got == want
        assert "scratch" not in got and "NaN" not in got and "Infinity" not in got


def test_tensor_row_views_read_and_write_like_the_rows(tmp_path, rng):
    """``TensorRow`` views (what explain and the CLI read) equal each record's ``to_dict()`` row,
    write the same JSON bytes, and give the same sentences, reference scale and terminal text."""
    from conftest import write_checkpoint
    from models import llama

    from weightdiff.comparison import explain
    from weightdiff.records import TensorRow, plain_rows
    from weightdiff.render import sentences
    from weightdiff.render.reference import reference_scale
    from weightdiff.render.terminal import render_text

    base = llama(rng, layers=2, hidden=32, inter=48, vocab=64)
    tuned = {k: v + rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in base.items()}
    tuned["extra.weight"] = rng.normal(size=(8, 8)).astype(np.float32)              # an added tensor
    del tuned[next(k for k in base if "layers.1" in k)]                             # a removed one
    write_checkpoint(tmp_path / "b", base, dtype="F32")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    result = compare(tmp_path / "b", tmp_path / "t")
    views, rows = result.to_dict(_views=True), result.to_dict()
    assert any(t.rank is not None for t in result.tensors) and any(t.rounding_floor for t in result.tensors)
    for v, r in zip(views["tensors"], rows["tensors"]):
        assert type(v) is TensorRow and v == r and dict(v) == r and list(v) == list(r)
        assert v.get("rank") == r["rank"] and v["shape"] == r["shape"] and v.get("nope", 7) == 7
        with pytest.raises(KeyError):
            v["nope"]
    assert dumps(views) == dumps(rows) == dumps_reference(rows)
    assert render_text(views) == render_text(rows)
    for data in (views, rows):
        data.pop("reference")
    assert reference_scale(views) == reference_scale(rows)
    assert sentences.verdict_reason(views) == sentences.verdict_reason(rows)
    assert sentences.headline(views) == sentences.headline(rows)
    assert explain(result).summary.headline == sentences.headline(rows)
    assert plain_rows(views)["tensors"] == rows["tensors"] and all(type(t) is dict for t in views["tensors"])


@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 2500])
def test_many_rows_are_written_as_one_row_per_line(n):
    """Rows are joined a thousand at a time before they are handed on: the same text at every count."""
    from weightdiff.records import dump_chunks

    obj = {"a": 1, "tensors": [{"name": f"t{i}", "x": i / 3, "nested": {"k": [i, None]}} for i in range(n)], "z": []}
    pieces: list[str] = []
    dump_chunks(obj, pieces.append, 1000)
    assert dumps(obj) == dumps_reference(obj) == "".join(pieces)
    assert dumps(obj).count("\n") == n + 6


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_json_written_in_pieces_is_the_same_bytes(tmp_path, rng, chunk):
    """``dump_chunks`` hands on exactly ``dumps``' text, and ``write_text_pieces`` writes exactly
    ``write_text``'s bytes, lone surrogates (backslash-escaped) included."""
    from weightdiff.fsutil import write_text, write_text_pieces
    from weightdiff.records import dump_chunks

    obj = {"tensors": [{"name": "a\ud800b\U0001f600", "x": 1.5}, {"name": "ü", "x": None}],
           "deep": [[{"k": "\udc00"}]], "n": float("nan")}
    pieces: list[str] = []
    dump_chunks(obj, pieces.append, chunk)
    assert "".join(pieces) == dumps(obj)
    assert chunk > 100 or len(pieces) > 3
    write_text(tmp_path / "whole.json", dumps(obj))
    write_text_pieces(tmp_path / "pieces.json", lambda write: dump_chunks(obj, write, chunk))
    assert (tmp_path / "pieces.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    assert b"\\ud800" in (tmp_path / "pieces.json").read_bytes()


def test_a_failing_piece_writer_leaves_nothing(tmp_path):
    from weightdiff.fsutil import write_text_pieces

    def produce(write):
        write("{")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_text_pieces(tmp_path / "out.json", produce)
    assert list(tmp_path.iterdir()) == []


def test_block_and_summary_dicts_are_asdict(tmp_path, rng):
    """The fast ``to_dict`` of blocks and the summary is ``dataclasses.asdict``, copies included."""
    from dataclasses import asdict

    result = _compared(tmp_path, rng, layers=2, noise=1e-2, base_dtype="F32")
    for rec in [*result.blocks, result.summary]:
        got, want = rec.to_dict(), asdict(rec)
        assert got == want and list(got) == list(want)
        assert dumps(got) == dumps(want)
    s = result.summary.to_dict()
    s["scope"]["changed_blocks"].append("x")
    s["components"][0]["status"] = "x"
    assert "x" not in result.summary.scope["changed_blocks"] and result.summary.components[0]["status"] != "x"


def test_rows_with_non_finite_top_level_or_nested_floats_write_like_the_reference():
    """``_row``'s shortcut nulls top-level non-finite floats and retries the C encoder; a
    non-finite value nested deeper (the rounding floor) still takes the full clean."""
    from weightdiff.records import TensorRecord

    def rec(**kw):
        return TensorRecord(name="w", base_name="w", status="changed", shape=[1], base_shape=[1],
                            dtype_base="U8", dtype_tuned="U8", numel=1, numel_compared=1, norm_base=0.0,
                            norm_delta=9.0, **kw)

    rows = [rec(rel_change=float("inf"), cosine=float("nan")),
            rec(rel_change=float("-inf"), rounding_floor={"BF16": float("nan"), "F16": 0.0}),
            rec(rel_change=1.5, quant={"within": True, "x": [float("inf"), 2.0]}),
            rec(rel_change=np.float64("inf"), max_abs_delta=np.float32(2.5))]
    got = dumps({"tensors": rows})
    assert got == dumps_reference({"tensors": [r.to_dict() for r in rows]})
    assert "NaN" not in got and "Infinity" not in got and got.count("null") >= 6


def test_records_keep_cpythons_key_sharing():
    """Every TensorRecord's __dict__ shares its keys with the others only while a record has at most
    29 attributes (CPython 3.11): a 30th field (``cast``, as first added) cost 1.2 KB per tensor,
    +120 MB of peak RSS for 100,000 tensors (benchmarks/bench_many.py)."""
    import sys
    from dataclasses import fields

    from weightdiff.records import TensorRecord

    assert len(fields(TensorRecord)) <= 29
    recs = [TensorRecord(f"t{i}", None, "changed", [1], None, "U8", "U8", 1) for i in range(3)]
    assert sys.getsizeof(recs[1].__dict__) < 600          # split (shared-key) dict: 296 B; combined 1584


def test_a_comparison_adds_no_attribute_to_its_records(tmp_path):
    """Changed vectors go through the cast test; one that finds no cast must not leave ``cast = None``
    on the record: a 30th attribute ends the key sharing (1.2 KB per record) and sends the record's
    JSON row and view down their slow paths (a third of a 100,000-tensor comparison's records)."""
    import numpy as np

    from weightdiff.comparison import compare
    from weightdiff.io.safetensors_write import save_file
    from weightdiff.records import _TENSOR_FIELDS

    for side, k in (("a", 0), ("b", 1)):
        save_file(tmp_path / f"{side}.safetensors",
                  {f"layers.{i}.norm.weight": ("F32", np.full(4, 1.0 + k * (i % 2) * 0.25, np.float32))
                   for i in range(4)} | {"x.w": ("U8", np.array([1, 2 + k], np.uint8))}, {"format": "pt"})
    result = compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rank=False)
    assert {r.status for r in result.tensors} == {"changed", "unchanged"}
    assert all(list(r.__dict__) == list(_TENSOR_FIELDS) for r in result.tensors)


def test_cast_is_in_a_row_only_when_set():
    import json

    from weightdiff.records import TensorRecord, TensorRow, _row

    rec = TensorRecord("w", "w", "rounding", [2], [2], "F32", "BF16", 2)
    assert "cast" not in json.loads(_row(rec)) and TensorRow(rec).get("cast") is None and "cast" not in rec.to_dict()
    rec.cast = {"chain": ["F32", "F16", "BF16"], "through": "F16", "elements": 2, "unexplained": 0}
    row = json.loads(_row(rec))
    assert row["cast"]["through"] == "F16" and list(row)[-1] == "cast"
    assert TensorRow(rec)["cast"] == rec.cast and "cast" in TensorRow(rec) and dict(TensorRow(rec)) == rec.to_dict()
