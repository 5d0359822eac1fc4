"""A tensor whose bytes are the base's under another dtype label of the same width (bf16 bits in a header that says
F16, a converter's mistake): no cast gives its values, and as labelled they are other numbers. It read "DERIVED:
built on this base, but changed far more than a fine-tune changes it ... a merge with another model, long further
training ... weightdiff cannot tell which" (bf16 read as float16 keeps a cosine near 0.86), where the bytes say
exactly what happened. It now reads flag ``dtype_relabelled`` with its own title, and such tensors are no evidence
of relatedness (read as labelled, a cosine that may fall below the unrelated rule's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_checkpoint
from test_verdict_properties import _model
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.io.safetensors_write import to_storage
from weightdiff.render.sentences import verdict_title

VIEW = {"F16": np.float16, "BF16": np.uint16}


def _pair(tmp_path, a: str, b: str, names=None, fine_tune: str | None = None, tag: str = ""):
    base = _model(np.random.default_rng(7), 64, 128, 2, 128, False, True)
    bs = {k: (a, to_storage(v, a)) for k, v in base.items()}
    ts = dict(bs)
    for k in names or list(base):
        ts[k] = (b, to_storage(base[k], a).view(VIEW[b]))
    if fine_tune:
        w = base[fine_tune]
        ts[fine_tune] = (a, to_storage(w * (1 + 0.02 * np.random.default_rng(8).standard_normal(w.shape)), a))
    return write_checkpoint(tmp_path / f"b{tag}", bs), write_checkpoint(tmp_path / f"t{tag}", ts)


@pytest.mark.parametrize("a, b", [("BF16", "F16"), ("F16", "BF16")])
def test_the_bases_bytes_under_another_label_are_named_not_far_from_the_base(tmp_path, a, b):
    s = compare(*_pair(tmp_path, a, b)).to_dict()["summary"]
    assert s["verdict"] == "derived" and "dtype_relabelled" in s["flags"] and "far_from_base" not in s["flags"]
    assert s["scope"]["dtype_relabelled"] == {"tensors": 21, "params": 98624, "labels": [f"{a} as {b}"]}
    title = verdict_title(s)
    assert title.startswith("DERIVED: this base with 21 tensors holding the base's bytes under another dtype label "
                            f"({a} as {b}: read as labelled, other numbers;"), title
    assert title.endswith("none of its other weights changed."), title


def test_one_mislabelled_tensor_beside_a_fine_tune(tmp_path):
    res = compare(*_pair(tmp_path, "BF16", "F16", ["model.layers.1.mlp.up_proj.weight"],
                         fine_tune="model.layers.0.mlp.down_proj.weight"))
    s = res.to_dict()["summary"]
    assert verdict_title(s).startswith("DERIVED: a fine-tune of this base, with 1 tensor holding the base's bytes")
    rec = res.tensor("model.layers.1.mlp.up_proj.weight")
    assert rec.status == "changed" and rec.rank is None and rec.note.startswith("the base's bytes under another dtype")
    assert res.tensor("model.layers.0.mlp.down_proj.weight").rank is not None


def test_a_real_cast_and_a_fine_tune_stored_in_another_dtype_are_not_relabels(tmp_path):
    base = _model(np.random.default_rng(9), 64, 128, 2, 128, False, True)
    from weightdiff.kernels.dtypes import decode

    b = write_checkpoint(tmp_path / "b", base, dtype="BF16")
    as16 = {k: decode(to_storage(v, "BF16"), "BF16") for k, v in base.items()}
    s = compare(b, write_checkpoint(tmp_path / "f16", as16, dtype="F16")).to_dict()["summary"]
    assert s["verdict"] == "cast_only" and "dtype_relabelled" not in s["flags"]
    tuned = {k: v * (1 + 0.02 * np.random.default_rng(10).standard_normal(v.shape)) for k, v in as16.items()}
    s = compare(b, write_checkpoint(tmp_path / "ft", tuned, dtype="F16")).to_dict()["summary"]
    assert s["verdict"] == "derived" and "dtype_relabelled" not in s["flags"]


def test_the_flag_survives_the_json_the_report_and_a_cached_rerun(tmp_path):
    b, t = _pair(tmp_path, "BF16", "F16")
    out, cache = tmp_path / "o.json", tmp_path / "cache"
    runs = []
    for i in range(2):          # the second run takes every record from the cache
        r = CliRunner().invoke(main, ["compare", str(b), str(t), "--json", str(out), "--cache", str(cache), "-q"])
        assert r.exit_code == 0, r.stderr
        d = json.loads(out.read_text())
        d.pop("run")
        runs.append(d)
    assert runs[0] == runs[1] and "dtype_relabelled" in runs[0]["summary"]["flags"]
    r = CliRunner().invoke(main, ["report", str(out), "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.stderr
    assert "under another dtype label" in (tmp_path / "m.md").read_text()


def test_the_headline_says_whose_bytes_they_are(tmp_path):
    """A wholly relabelled model read "0% of parameters are bitwise unchanged", alone, in the headline and the
    memo: its bytes are all the base's, and they say so now beside that count (which is of the values as read)."""
    from weightdiff.render.sentences import headline, same_bytes_words

    b, t = _pair(tmp_path, "BF16", "F16")
    d = compare(b, t).to_dict()
    lines = headline(d)
    assert "0% of parameters are bitwise unchanged." in lines
    assert "A further 100% of parameters (21 tensors) hold the base's bytes under another dtype label." in lines
    r = CliRunner().invoke(main, ["compare", str(b), str(t), "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.stderr
    plain = (tmp_path / "m.md").read_text().split("## In plain words", 1)[1].split("|", 1)[0]
    assert "A further 100% of parameters (21 tensors) hold the base's bytes under another dtype label." in plain
    # one relabelled tensor beside unchanged ones: its share, and nothing for a model with none
    b1, t1 = _pair(tmp_path, "BF16", "F16", ["model.layers.1.mlp.up_proj.weight"], tag="1")
    s1 = compare(b1, t1).to_dict()["summary"]
    assert same_bytes_words(s1, 98624) == ("8.3% of parameters (1 tensor) hold the base's bytes under another "
                                           "dtype label")
    assert same_bytes_words({"scope": {}}, 98624) == ""
