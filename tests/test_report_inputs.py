"""``weightdiff report`` on saved results as a user may hand them over: hand-edited provenance, lineage and
compare JSONs refused in one line (exit 2, nothing written), a byte order mark accepted, several results
combined without a path nobody typed, and one result redrawn as its own command drew it."""

from __future__ import annotations

import copy
import json
import re

import pytest
from click.testing import CliRunner

from render_sample import cached_result
from weightdiff.cli import main

THRESHOLDS = {"rounding_frac": 0.0, "unrelated_cosine": 0.2, "unrelated_rel_change": 0.9,
              "independent_cosine": 0.05, "large_matrix_numel": 4096}
RUN = {"date": "2026-01-02T03:04:05Z", "seconds": 1.0, "command": "weightdiff provenance tuned --candidates base",
       "versions": {"weightdiff": "0.1.0"}}


def _candidate(path: str, verdict: str, rank: int, rel: float, cos: float) -> dict:
    return {"path": path, "format": "safetensors", "params": 1000, "verdict": verdict, "compared": "full",
            "compare_verdict": verdict, "relative_change": rel / 2, "relative_change_large": rel,
            "cosine_large": cos, "large_params": 900, "identical_large_params": 600 if verdict == "derived" else 0,
            "identical_share": 0.5, "identical_params_share": 0.6, "tensors_compared": 9, "params_shared": 1000,
            "coverage": 1.0, "blocks": [{"block": "layers.0", "rel_change": rel, "params": 500}],
            "components": {"shared": ["layers.0"], "unrelated": []}, "nonfinite": 0,
            "permutation": {"groups_examined": 1, "groups_permuted": 0, "neurons": 64, "moved": 0,
                            "moved_share": 0.0, "groups": []}, "negated": None, "screen": None, "rank": rank}


def provenance_result() -> dict:
    """A ``weightdiff.provenance/1`` result of the shape ``provenance --json`` writes (two candidates)."""
    return {"schema": "weightdiff.provenance/1", "tool": {"name": "weightdiff", "version": "0.1.0"},
            "settings": {"seed": 0, "device": "cpu", "include": [], "exclude": [], "thresholds": dict(THRESHOLDS)},
            "tuned": {"path": "tuned", "format": "safetensors", "params": 1000,
                      "files": [{"name": "model.safetensors", "bytes": 4000}]},
            "reference": {"relative_change": 2 ** 0.5, "cosine": 0.0,
                          "what": "two independently initialized models of the same shape"},
            "relatedness": "relatedness uses large matrices only", "leading": "base",
            "answer": {"kind": "derived", "leading": "base", "tied": [], "separated": [], "ratio": None,
                       "weak": False, "weak_by": [], "not_compared": 0},
            "margins": {"near_tie_ratio": 1.2, "weak_rel_change": 0.5, "weak_cosine": 0.5},
            "candidates": [_candidate("base", "derived", 1, 3e-3, 0.99999),
                           _candidate("other", "unrelated", 2, 1.41, 0.001)],
            "incompatible": [], "screening": None, "findings": ["`base` ranks first"],
            "limits": ["Evidence is about weights."], "run": dict(RUN)}


def _step(a: str, b: str, rel: float) -> dict:
    return {"from": a, "to": b, "verdict": "derived", "relative_change": rel, "norm_delta": rel * 10,
            "relatedness_cosine": 0.999, "one_minus_cosine": 1e-3, "tensors_changed": 2, "tensors_total": 9,
            "blocks_changed": 1, "blocks_total": 2, "blocks_reshaped": 0, "params_compared": 1000,
            "delta_params": 100, "delta_params_share": 0.1, "delta_params_lower": None, "form": "dense",
            "flags": [], "blocks": {"layers.0": rel, "layers.1": 0.0}}


def lineage_result() -> dict:
    """A ``weightdiff.lineage/1`` result of the shape ``lineage --json`` writes (base -> sft -> dpo)."""
    steps = [dict(_step("base", "sft", 1e-3), share_of_path=0.25), dict(_step("sft", "dpo", 3e-3), share_of_path=0.75)]
    return {"schema": "weightdiff.lineage/1", "tool": {"name": "weightdiff", "version": "0.1.0"},
            "settings": {"thresholds": dict(THRESHOLDS)}, "paths": ["base", "sft", "dpo"], "steps": steps,
            "end_to_end": dict(_step("base", "dpo", 3.5e-3), straightness=0.9),
            "blocks": [{"block": "layers.0", "steps": [1e-3, 3e-3], "end_to_end": 3.5e-3},
                       {"block": "layers.1", "steps": [0.0, 0.0], "end_to_end": 0.0}],
            "findings": ["end to end: relative change 3.5e-3"], "run": dict(RUN)}


def _report(*args):
    return CliRunner().invoke(main, ["report", *[str(a) for a in args]])


def _refused(r, tmp_path, *needles: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output)
    line = r.stderr.strip()
    assert r.stderr.count("\n") == 1 and line.startswith("error: ") and "internal error" not in line, r.stderr
    for n in needles:
        assert n in line, line
    assert not (tmp_path / "m.html").exists()


def test_the_fixtures_are_accepted(tmp_path):
    for name, data in (("p.json", provenance_result()), ("l.json", lineage_result())):
        (tmp_path / name).write_text(json.dumps(data))
        r = _report(tmp_path / name, "--html", tmp_path / f"{name}.html", "-q")
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["candidates"][0].update(relative_change_large="0.1"), "`candidates[0].relative_change_large` should"),
    (lambda d: d["candidates"][0].update(cosine_large="x"), "`candidates[0].cosine_large` should be a number"),
    (lambda d: d["candidates"].__setitem__(0, "x"), "`candidates[0]` should be an object"),
    (lambda d: d["candidates"][0].update(verdict="maybe"), "`candidates[0].verdict` should be one of"),
    (lambda d: d.update(reference={}), "`reference.relative_change` should be a number"),
    (lambda d: d.update(settings={}), "`settings.thresholds` should be an object"),
    (lambda d: d.update(run="x"), "`run` should be an object or null"),
    (lambda d: d.update(answer="x"), "`answer` should be an object or null"),
    (lambda d: d["answer"].update(kind="probably"), "`answer.kind` should be one of"),
    (lambda d: d["candidates"][1].update(coverage=4.0), "`candidates[1].coverage` is 4.0, outside [0, 1]"),
    (lambda d: d["candidates"][0].update(relative_change_large=-1.0), "`candidates[0].relative_change_large` is "
                                                                      "negative"),
])
def test_a_hand_edited_provenance_result_is_refused_naming_the_file_and_key(tmp_path, edit, key):
    # each of these was "error: internal error: TypeError ..." with exit 1 and no file or key named
    d = provenance_result()
    edit(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    _refused(_report(tmp_path / "p.json", "--html", tmp_path / "m.html"), tmp_path, "p.json: ", key)


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["steps"][0].update(relative_change="0.1"), "`steps[0].relative_change` should be a number"),
    (lambda d: d["steps"][1].update(verdict="maybe"), "`steps[1].verdict` should be one of"),
    (lambda d: d["end_to_end"].update(blocks_changed=5), "`end_to_end.blocks_changed` is 5, more than"),
    (lambda d: d["blocks"][0].update(steps=[1e-3]), "`blocks[0].steps` holds 1 values for 2 steps"),
    (lambda d: d.update(paths=["base", 3]), "`paths[1]` should be a string"),
])
def test_a_hand_edited_lineage_result_is_refused_naming_the_file_and_key(tmp_path, edit, key):
    # a string relative change printed n/a, as if weightdiff had measured nothing
    d = lineage_result()
    edit(d)
    (tmp_path / "l.json").write_text(json.dumps(d))
    _refused(_report(tmp_path / "l.json", "--html", tmp_path / "m.html"), tmp_path, "l.json: ", key)


def _with_reference(d: dict) -> dict:
    from weightdiff.render.reference import reference_scale

    d["reference"] = reference_scale(d)         # as compare writes it
    return d["reference"]


def _edit_tensor(d: dict, which: str, **values) -> None:
    next(t for t in d["tensors"] if t["status"] == which).update(values)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["summary"].update(blocks_changed=99), "`summary.blocks_changed` is 99, more than "
                                                       "`summary.blocks_total`"),
    (lambda d: d["summary"].update(blocks_total=0, blocks_changed=5), "`summary.blocks_changed` is 5, more than"),
    (lambda d: [t.update(frac_changed=7.0) for t in d["tensors"]], "frac_changed` is 7.0, outside [0, 1]"),
    (lambda d: [p.update(rel_change=-1) for p in _with_reference(d)["points"]], "`reference.points[0].rel_change` "
                                                                                "is negative"),
    (lambda d: _edit_tensor(d, "changed", rel_change=-1), "rel_change` is negative (-1)"),
    (lambda d: _edit_tensor(d, "changed", status="unchanged"), "`summary.tensors_by_status.changed` is"),
    (lambda d: _edit_tensor(d, "changed", cosine=1.5), "cosine` is 1.5, outside [-1, 1]"),
    (lambda d: d["summary"]["params_by_status"].update(unchanged=1), "`summary.params_by_status` sums to"),
    (lambda d: d["blocks"][0].update(params_changed=d["blocks"][0]["params"] + 1), "`blocks[0].params_changed` is"),
    (lambda d: d["summary"]["scope"].update(tensors_changed=10 ** 6), "`summary.scope.tensors_changed` is 1000000, "
                                                                      "more than"),
    (lambda d: d["tensors"][0].update(status="tweaked"), "`tensors[0].status` is `tweaked`, not one of"),
    (lambda d: d["run"].update(date=12345), "`run.date` should be a string or null"),
])
def test_a_compare_result_with_impossible_values_is_refused(tmp_path, edit, words):
    # drawn as fact before: "blocks changed 99 of 2", a share of 70.9% with 95.8% of it in unchanged tensors,
    # "moved by -1.0 of their size", "No tensor changed" under a verdict that counted one
    d = copy.deepcopy(cached_result())
    edit(d)
    (tmp_path / "e.json").write_text(json.dumps(d))
    _refused(_report(tmp_path / "e.json", "--html", tmp_path / "m.html"), tmp_path, "e.json: ", words)


def test_a_result_saved_with_a_byte_order_mark_is_read(tmp_path):
    # Notepad re-saves UTF-8 with a BOM: refused as "not valid JSON ... (was the file cut short?)"
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(cached_result()).encode())
    r = _report(p, "--html", tmp_path / "m.html", "-q")
    assert r.exit_code == 0, r.output and (tmp_path / "m.html").is_file()


def test_combined_results_name_each_model_as_recorded_under_the_title(tmp_path):
    # the caution printed each model's resolved absolute path (`os.path.realpath` of whatever existed where
    # report ran: a home directory nobody typed, and bytes that depend on the working folder), above the title
    real = tmp_path / "real-model"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    a, b = copy.deepcopy(cached_result()), copy.deepcopy(cached_result())
    a["tuned"]["path"] = str(tmp_path / "link")
    b["tuned"].update(path="other", label="Acme v2", files=[{"name": "model.safetensors", "bytes": 1, "sha256": "9" * 64}])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    r = _report(tmp_path / "a.json", tmp_path / "b.json", "--markdown", tmp_path / "m.md", "-q")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "m.md").read_text()
    caution = next(line for line in md.splitlines() if line.startswith("Caution:"))
    assert "real-model" not in md
    assert "link" in caution and "Acme v2" in caution and "`other`" not in caution
    assert md.index("# How far is") < md.index("Caution:") < md.index("**Run:**") + 200
    assert md.index("Caution:") < md.index("> **DERIVED") if "> **DERIVED" in md else True


def test_one_provenance_result_is_redrawn_with_its_commands_names(tmp_path):
    # `report prov.json` named the figure 1-provenance.png where `provenance --report` wrote provenance.png,
    # and titled the document after the JSON file instead of the model
    (tmp_path / "p.json").write_text(json.dumps(provenance_result()))
    r = _report(tmp_path / "p.json", "--markdown", tmp_path / "m.md", "--html", tmp_path / "m.html", "--plots",
                tmp_path / "figs", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["provenance.png", "provenance.svg"]
    assert "(figs/provenance.png)" in (tmp_path / "m.md").read_text()
    assert re.search(r"<title>weightdiff provenance: tuned</title>", (tmp_path / "m.html").read_text())
    (tmp_path / "l.json").write_text(json.dumps(lineage_result()))
    r = _report(tmp_path / "l.json", "--html", tmp_path / "l.html", "-q")
    assert "<title>weightdiff lineage: base -&gt; sft -&gt; dpo</title>" in (tmp_path / "l.html").read_text()


def test_compares_own_result_breaking_a_rule_is_an_internal_error_not_bad_input(tmp_path, rng):
    """compare --report validates the result it just computed: a rule it breaks is weightdiff's bug, so the
    CLI says "internal error" (exit 1), not "was it written by weightdiff?" (exit 2); a saved file breaking
    the same rule stays bad input."""
    from conftest import write_checkpoint
    from models import llama
    from weightdiff import compare
    from weightdiff.errors import WeightdiffError
    from weightdiff.records import plain_rows
    from weightdiff.render.report import render_outputs, write_report

    base = llama(rng, layers=2)
    tuned = {k: v * 1.01 for k, v in base.items()}
    data = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).to_dict()
    plain_rows(data)
    data["summary"]["blocks_changed"] = 99
    with pytest.raises(RuntimeError, match="own result breaks a consistency rule"):
        render_outputs(data, report=tmp_path / "m.md")
    with pytest.raises(WeightdiffError):
        write_report(data, memo=tmp_path / "m2.md")


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"])
def test_a_non_finite_number_in_a_result_reads_as_null_however_spelled(tmp_path, literal):
    """weightdiff writes a non-finite value as null. A hand-edited result holding Python's `Infinity` or `NaN` read
    as null while the same infinity spelled as a JSON number past float64's range (1e999) was refused ("should be a
    number or null (found inf)"): each reads as null, the result the same as with null there."""
    from weightdiff.render.report import load_result

    d = copy.deepcopy(cached_result())
    changed = next(t for t in d["tensors"] if t["status"] == "changed")
    changed["norm_delta"] = 123456.789
    text = json.dumps(d)
    assert text.count("123456.789") == 1
    (tmp_path / "e.json").write_text(text.replace("123456.789", literal))
    changed["norm_delta"] = None
    (tmp_path / "n.json").write_text(json.dumps(d))
    assert load_result(tmp_path / "e.json")[0] == load_result(tmp_path / "n.json")[0]
    if literal == "1e999":
        r = _report(tmp_path / "e.json", "--markdown", tmp_path / "e.md", "-q")
        assert r.exit_code == 0 and (tmp_path / "e.md").is_file(), r.output
