"""Matrices that are, bit for bit, other tensors of the base under these names: q and k swapped, or every kind of
matrix shifted between layers by its own offset. Each looks unrelated to the base matrix of its name (cosine near
0), and the second read "PARTIAL: ... Unrelated to it (near-orthogonal, as independent initialisations): layers.0,
layers.1, layers.2, layers.3" for a model whose every weight is the base's. ``comparison.mark_moved_tensors`` finds
them (the tuned norm equal to another base tensor's, then the bytes) and the verdict says what was done."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

import weightdiff.measure.compute as compute
from conftest import write_checkpoint
from test_verdict_properties import _model
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.render.sentences import verdict_title

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
         "mlp.down_proj", "mlp.gate_proj")


def _base():
    return _model(np.random.default_rng(11), 64, 128, 4, 128, False, True)


def _shifted(base: dict) -> dict:
    t = dict(base)
    for off, kind in zip((1, 2, 3, 1, 2, 3, 1), KINDS):
        for i in range(4):
            t[f"model.layers.{i}.{kind}.weight"] = base[f"model.layers.{(i + off) % 4}.{kind}.weight"]
    return t


def test_matrices_shifted_between_layers_are_the_bases_not_unrelated_blocks(tmp_path):
    base = _base()
    s = compare(write_checkpoint(tmp_path / "b", base, dtype="BF16"),
                write_checkpoint(tmp_path / "t", _shifted(base), dtype="BF16")).to_dict()["summary"]
    assert s["verdict"] == "derived" and s["flags"] == ["moved_tensors"], (s["verdict"], s["verdict_reason"])
    assert s["scope"]["moved_tensors"] == {"tensors": 28, "params": 163840}
    assert verdict_title(s) == ("DERIVED: this base with 28 tensors that are bit for bit other tensors of the base, "
                                "under other names (moved or swapped between modules or layers: not training, and the "
                                "model computes something else than the base); none of its other weights changed.")
    assert "Unrelated" not in s["verdict_reason"]


def test_q_and_k_swapped_and_one_matrix_copied_beside_a_fine_tune(tmp_path):
    base = _base()
    t = dict(base)
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    t[q], t[k] = base[k], base[q]
    res = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", t))
    s = res.to_dict()["summary"]
    assert s["scope"]["moved_tensors"]["tensors"] == 2
    assert verdict_title(s).startswith("DERIVED: this base with 2 tensors that are bit for bit other tensors")
    assert res.tensor(q).note.startswith("bit for bit another tensor of the base: the base's "
                                         "`model.layers.1.self_attn.k_proj.weight`")
    t = dict(base)
    t["model.layers.1.mlp.up_proj.weight"] = base["model.layers.2.mlp.up_proj.weight"]
    t["model.layers.0.mlp.down_proj.weight"] = base["model.layers.0.mlp.down_proj.weight"] * 1.01
    s = compare(write_checkpoint(tmp_path / "b2", base), write_checkpoint(tmp_path / "t2", t)).to_dict()["summary"]
    assert verdict_title(s).startswith("DERIVED: a fine-tune of this base, with 1 tensor that is bit for bit another "
                                       "tensor of the base, under another name")


def test_independent_models_and_fine_tunes_read_no_bytes_for_it(tmp_path, monkeypatch):
    """The norms decide first: two independent models (every matrix near-orthogonal) compare no bytes."""
    calls = []
    real = compute._same_bytes
    monkeypatch.setattr(compute, "_same_bytes", lambda *a: calls.append(a) or real(*a))
    base, other = _base(), _model(np.random.default_rng(12), 64, 128, 4, 128, False, True)
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "o", other)).summary
    assert s.verdict == "unrelated" and "moved_tensors" not in s.flags and calls == []
    tuned = {k: v * (1 + 0.02 * np.random.default_rng(13).standard_normal(v.shape)) for k, v in base.items()}
    s = compare(write_checkpoint(tmp_path / "b2", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert s.verdict == "derived" and "moved_tensors" not in s.flags


def test_the_flag_survives_a_cached_rerun_and_the_report(tmp_path):
    base = _base()
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", _shifted(base))
    out, runs = tmp_path / "o.json", []
    for _ in range(2):
        r = CliRunner().invoke(main, ["compare", str(b), str(t), "--json", str(out), "--cache", str(tmp_path / "c"),
                                      "-q"])
        assert r.exit_code == 0, r.stderr
        d = json.loads(out.read_text())
        d.pop("run")
        runs.append(d)
    assert runs[0] == runs[1] and "moved_tensors" in runs[0]["summary"]["flags"]
    r = CliRunner().invoke(main, ["report", str(out), "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0 and "bit for bit other tensors of the base" in (tmp_path / "m.md").read_text()


def test_the_headline_and_the_memo_count_the_moved_parameters_apart(tmp_path):
    """"N% of parameters are bitwise unchanged" stood alone beside a title that said every weight is a base tensor:
    the moved ones are counted apart, in the headline, the memo's plain words and its key figures."""
    from weightdiff.render.sentences import headline

    base = _base()
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", _shifted(base))
    d = compare(b, t).to_dict()
    lines = headline(d)
    i = next(k for k, x in enumerate(lines) if "bitwise unchanged" in x)
    assert lines[i + 1].startswith("A further ") and lines[i + 1].endswith(
        "of parameters (28 tensors) are bit for bit other tensors of the base, under other names."), lines
    r = CliRunner().invoke(main, ["compare", str(b), str(t), "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.stderr
    memo = (tmp_path / "m.md").read_text()
    plain = memo.split("## In plain words", 1)[1].split("|", 1)[0]
    assert "(28 tensors) are bit for bit other tensors of the base, under other names." in plain
    row = next(x for x in memo.splitlines() if x.startswith("| parameters bit for bit unchanged"))
    assert "a further" in row and "(28 tensors) are bit for bit other tensors of the base" in row
