"""The memo a reader files: page one, labels and date, the format by extension (HTML, Markdown,
Word; anything else refused before any work), one document from compare + provenance + lineage,
and the notebook face of a comparison (repr, HTML card, pandas)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_checkpoint
from models import llama, low_rank_update
from render_sample import cached_result
from weightdiff.cli import main
from weightdiff.render.report import write_report


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base -> sft -> dpo, tiny, and an unrelated model."""
    root = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(3)
    base = llama(rng, layers=2, hidden=64, inter=128)
    sft = dict(base)
    for k in [k for k in base if k.endswith("q_proj.weight")]:
        sft[k] = low_rank_update(rng, base[k], 2)
    dpo = dict(sft)
    k = next(k for k in base if k.endswith("v_proj.weight"))
    dpo[k] = low_rank_update(rng, sft[k], 2)
    other = llama(np.random.default_rng(99), layers=2, hidden=64, inter=128)
    return [str(write_checkpoint(root / n, t, dtype="BF16")) for n, t in
            (("base", base), ("sft", sft), ("dpo", dpo), ("other", other))], root


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_labels_date_and_page_one(chain, tmp_path):
    (base, sft, *_), _ = chain
    r = _run("compare", base, sft, "--base-label", "Base 7B", "--tuned-label", "Acme chat v2", "--json",
             tmp_path / "c.json", "--report", tmp_path / "memo.html", "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"weightdiff 0.1.0: {base}  vs  {sft}")          # BASE vs TUNED, as given
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["base"][0]["label"] == "Base 7B" and d["tuned"]["label"] == "Acme chat v2"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d["run"]["date"])
    page = (tmp_path / "memo.html").read_text()
    one, rest = page.split('<div class="pagebreak">', 1)
    day, time = d["run"]["date"][:10], d["run"]["date"][11:16]
    assert "<h1>How far is Acme chat v2 from Base 7B?</h1>" in one and f"{day} {time} UTC" in one
    assert one.index('class="verdict"') < one.index("In plain words") < one.index('class="keyfigs"')
    assert one.index('class="keyfigs"') < one.index("Figure 1. Depth profile.") < one.index(
        "Figure 2. Reference scale.")
    assert '<aside class="caveats">' in one and 'href="#limits"' in one and 'id="limits"' in rest
    assert 'id="methodology"' in rest and "Thresholds used" in rest and "Most changed tensors" in rest
    keyfigs = one.split('class="keyfigs"')[1].split("</table>")[0]
    assert keyfigs.count("<tr>") == 6                                             # header + five rows
    para = one.split("In plain words</h2>")[1].split("</p>")[0]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", para.replace("<p>", "").strip()) if s]
    assert 4 <= len(sentences) <= 6, sentences
    assert "legal status" in para and "Acme chat v2" in para
    for word in ("infring", "lawful", "unlawful", "copyright violation", "is a derivative work"):
        assert word not in para.lower()


def test_memo_extension_is_checked_before_any_work(chain, tmp_path):
    (base, sft, *_), _ = chain
    for name in ("memo.pdf", "memo.txt", "memo"):
        r = _run("compare", base, sft, "--report", tmp_path / name)
        assert r.exit_code == 2 and r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --report ") and "FILE.docx" in lines[0]
        assert "plan:" not in r.stderr                                 # refused before the comparison
    assert "print the HTML memo" in _run("compare", base, sft, "--memo", tmp_path / "m.pdf").stderr
    assert not list(tmp_path.iterdir())                                # nothing written
    r = _run("report", "nope.json", "--memo", tmp_path / "m.odt")
    assert r.exit_code == 2 and "--report" in r.stderr and not list(tmp_path.iterdir())


def test_markdown_and_word_memo_hold_every_figure_and_table(tmp_path):
    docx = pytest.importorskip("docx")
    data = cached_result()
    out = write_report(data, memo=tmp_path / "memo.docx", markdown=tmp_path / "memo.md", plots=tmp_path / "p")
    doc = docx.Document(str(tmp_path / "memo.docx"))
    md = (tmp_path / "memo.md").read_text()
    assert len(doc.inline_shapes) == len(out.figures) == md.count("![")
    assert len(doc.tables) == md.count("\n| --- ")
    styles = {p.style.name for p in doc.paragraphs}
    assert {"Heading 1", "Heading 2", "Caption", "List Bullet", "Intense Quote"} <= styles
    assert all(t.style.name == "Table Grid" for t in doc.tables)
    text = "\n".join(p.text for p in doc.paragraphs)
    assert "What these numbers show, and what they do not" in text and "Figure 2. Reference scale." in text
    assert "Base: " in text and "Tuned: " in text and "What this cannot show" in text and "['" not in text
    quotes = [p.text for p in doc.paragraphs if p.style.name == "Intense Quote"]
    assert quotes[0] == "DERIVED: a fine-tune of this base. " + data["summary"]["verdict_reason"]
    assert any(r.style.name == "Code" for p in doc.paragraphs for r in p.runs)


def test_report_merges_compare_provenance_and_lineage(chain, tmp_path):
    (base, sft, dpo, other), _ = chain
    assert _run("compare", base, dpo, "--json", tmp_path / "c.json", "-q").exit_code == 0
    r = _run("provenance", dpo, "--candidates", other, base, "--json", tmp_path / "p.json", "--csv",
             tmp_path / "p.csv", "-q")
    assert r.exit_code == 0, r.output
    assert _run("lineage", base, sft, dpo, "--no-rank", "--json", tmp_path / "l.json", "--csv", tmp_path / "l.csv",
                "-q").exit_code == 0
    assert (tmp_path / "p.csv").read_text().startswith("rank,path,verdict")
    assert len((tmp_path / "l.csv").read_text().splitlines()) == 1 + 2 + 1          # header, 2 steps, end to end
    r = _run("report", tmp_path / "c.json", tmp_path / "p.json", tmp_path / "l.json", "--html", tmp_path / "all.html",
             "--markdown", tmp_path / "all.md")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "all.html").read_text()
    h1 = re.findall(r"<h1[^>]*>(.*?)</h1>", page)
    assert len(h1) == 3 and h1[0].startswith("How far is") and h1[1].startswith("Which base was")
    assert h1[2].startswith("How did the weights move along")
    numbers = [int(n) for n in re.findall(r"<strong>Figure (\d+)\.", page)]
    assert numbers == list(range(1, len(numbers) + 1)) and "Candidate bases" in page
    md = (tmp_path / "all.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / link).is_file()
    r = _run("report", tmp_path / "p.json")                          # one provenance JSON alone: a document
    assert r.exit_code == 0 and (tmp_path / "p.html").read_text().startswith("<!DOCTYPE html>")
    assert "Caution: these results are not about one model" not in page          # all about dpo
    # a provenance of another model merged in: the memo says so up front (it read as one story)
    assert _run("provenance", sft, "--candidates", base, "--json", tmp_path / "p2.json", "-q").exit_code == 0
    r = _run("report", tmp_path / "c.json", tmp_path / "p2.json", "--html", tmp_path / "mixed.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "mixed.html").read_text()
    assert "Caution: these results are not about one model" in page
    # under the document's title and the first section's model lines, before its verdict (it sat above the title)
    assert page.index("<h1") < page.index("Caution:") < page.index("<h1", page.index("<h1") + 1)


def test_provenance_memo_is_a_complete_document(chain, tmp_path):
    (base, sft, _, other), _ = chain
    r = _run("provenance", sft, "--candidates", other, base, "--report", tmp_path / "p.html", "--plots",
             tmp_path / "figs", "-q")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "p.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "data:image/svg+xml;base64," in page and (tmp_path / "figs" / "provenance.png").is_file()
    assert "What this method cannot see" in page


def test_provenance_chart_has_titles_axis_labels_and_legend_outside(chain):
    from weightdiff import provenance
    from weightdiff.render.provenance import draw_provenance

    (base, sft, _, other), _ = chain
    fig = draw_provenance(provenance(sft, [other, base], screen=False).to_dict())
    ax1, ax2 = fig.axes[:2]
    assert ax1.get_title() == "Relative change" and ax2.get_title() == "1 − cosine"
    assert ax1.get_xlabel() and ax2.get_xlabel() and ax1.get_ylabel()
    assert not ax1.get_legend() and not ax2.get_legend() and fig.legends          # outside the axes


class _Checker(HTMLParser):
    VOID = {"br", "img", "meta", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.ok = True

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.ok = False


def test_notebook_repr_card_and_pandas(chain):
    import weightdiff

    for name in ("compare", "provenance", "lineage"):
        assert name in dir(weightdiff) and name in weightdiff.__all__
    (base, sft, *_), _ = chain
    r = weightdiff.compare(base, sft, tuned_label="sft")
    assert len(repr(r)) < 200 and repr(r).startswith("<Comparison derived:")
    card = r._repr_html_()
    assert len(card.encode()) < 50_000
    checker = _Checker()
    checker.feed(card)
    assert checker.ok and not checker.stack
    assert "DERIVED" in card and "data:image/png;base64," in card and "relative change" in card
    assert "spectrum" not in card and "norm_base" not in card                 # no raw per-tensor data
    data = r.to_dict()
    tensors, blocks = r.to_pandas(), r.to_pandas("blocks")
    assert len(tensors) == len(data["tensors"]) and len(blocks) == len(data["blocks"])
    assert "rank.numerical_rank" in tensors.columns
    with pytest.raises(weightdiff.WeightdiffError):
        r.to_pandas("modules")
    assert callable(weightdiff.provenance) and callable(weightdiff.lineage)
    import weightdiff.provenance as module                                       # the module is callable too

    assert module(sft, [base], screen=False).to_dict()["leading"] == base


def test_word_memo_is_the_same_bytes_every_time(tmp_path):
    # python-docx stamps each zip entry with the time of writing: two runs gave different files
    pytest.importorskip("docx")
    import time
    import zipfile

    data = cached_result()
    write_report(data, memo=tmp_path / "a.docx")
    time.sleep(2.1)                                   # zip times have a 2 s resolution
    write_report(data, memo=tmp_path / "b.docx")
    assert (tmp_path / "a.docx").read_bytes() == (tmp_path / "b.docx").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.docx") as z:
        assert z.testzip() is None and "word/document.xml" in z.namelist()


@pytest.mark.parametrize("with_limits", [True, False])
def test_the_verdicts_more_link_points_at_a_section_the_memo_has(with_limits):
    """The provenance memo's first page linked to "#limits", a section only the compare memo has: a dead link in
    Markdown and HTML (and a pointer to nothing in Word)."""
    import io as _io
    import re as _re

    from weightdiff.render.memo import Block
    from weightdiff.render.memo_docx import to_docx
    from weightdiff.render.memo_html import to_html
    from weightdiff.render.memo_md import to_markdown

    blocks = [Block("h1", "Memo"), Block("verdict", "DERIVED", ("a reason", ["a caveat"]))]
    if with_limits:
        blocks.append(Block("h2", "What these numbers show, and what they do not", "limits"))
    html, md = to_html(blocks), to_markdown(blocks, {})
    ids = set(_re.findall(r'id="([^"]+)"', html))
    assert all(h in ids for h in _re.findall(r'href="#([^"]+)"', html))
    assert ("#limits" in html) == with_limits
    assert ("More in [What these numbers show" in md) == with_limits
    docx = pytest.importorskip("docx")
    doc = docx.Document(_io.BytesIO(to_docx(blocks, "Memo")))
    assert any("More in" in p.text for p in doc.paragraphs) == with_limits


def test_combined_results_are_told_apart_by_their_files_not_by_how_a_path_was_spelled():
    """`report cmp.json prov.json` compared the path strings the results recorded: `tuned` and `./tuned`, one model,
    opened the memo with "Caution: these results are not about one model"; two different models both spelled
    `tuned` (run from two folders) got none. Files' hashes decide where both have them, else their names and
    sizes beside the spelling."""
    from weightdiff.render.report import _mixed_subjects

    def item(kind, path, files):
        return (f"{kind}.json", kind, {"tuned": {"path": path, "files": files}}, None)

    hashed = [{"name": "model.safetensors", "bytes": 10, "sha256": "a" * 64}]
    sized = [{"name": "model.safetensors", "bytes": 10}]
    other = [{"name": "model.safetensors", "bytes": 12}]
    assert _mixed_subjects([item("compare", "tuned", hashed), item("provenance", "./tuned", sized)]) is None
    assert _mixed_subjects([item("compare", "tuned", hashed), item("provenance", "tuned", other)]) is not None
    assert _mixed_subjects([item("compare", "x/tuned", hashed),
                            item("compare", "y/tuned", [dict(hashed[0], sha256="b" * 64)])]) is not None
    assert _mixed_subjects([item("compare", "x/tuned", hashed), item("compare", "y/t", hashed)]) is None


def test_one_minus_cosine_is_one_number_everywhere_near_zero(tmp_path):
    # one matrix scaled by 1.01: 1 - cosine is float64 noise (~1e-16); the verdict sentence, the tables, the
    # plain-words paragraph and the terminal printed 0 in some places and 8.4e-17 in others (a tester found it)
    from weightdiff.cli import main as cli

    r = np.random.default_rng(0)
    b = {f"model.layers.{i}.mlp.up_proj.weight": (r.standard_normal((64, 64)) * .02).astype(np.float32)
         for i in range(4)}
    t = dict(b)
    t["model.layers.3.mlp.up_proj.weight"] = b["model.layers.3.mlp.up_proj.weight"] * np.float32(1.01)
    base, tuned = write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "t", t)
    res = CliRunner().invoke(cli, ["compare", str(base), str(tuned), "--json", str(tmp_path / "r.json"),
                                   "--report", str(tmp_path / "m.md")])
    assert res.exit_code == 0, res.stderr
    text = (tmp_path / "m.md").read_text() + res.stdout
    values = re.findall(r"1 [-−] cosine = ([0-9][0-9.e+-]*)", text)              # sentences, plain words
    values += re.findall(r"1 [-−] cosine \(large matrices\) \| ([0-9][0-9.e+-]*)", text)   # tables
    values += re.findall(r"^1 - cosine +([0-9][0-9.e+-]*)", text, re.M)            # the terminal summary
    assert len(values) >= 5 and len(set(values)) == 1, values


def test_relative_change_prints_as_sci_in_the_far_from_base_and_faint_sentences():
    from weightdiff.render.sentences import verdict_title

    s = {"verdict": "derived", "flags": ["far_from_base"], "relatedness_cosine": 0.3,
         "relatedness_rel_change": 0.7931, "coverage": {}}
    title = verdict_title(s)
    assert "relative change 7.9e-1" in title and "0.793" not in title, title


def test_provenance_findings_print_their_paths_as_code_not_backticks():
    from weightdiff.render.memo_md import to_markdown
    from weightdiff.render.sections import _spans
    from weightdiff.render.memo import Block

    assert _spans("`b` ranks first") == [("code", "b"), ("", " ranks first")]
    assert _spans("a ` lone backtick") == [("", "a ` lone backtick")]
    md = to_markdown([Block("ul", [_spans("`b<x>` ranks first")])], {})
    assert "\\\\`" not in md and "`b<x>` ranks first" in md, md


def test_the_word_memo_is_a4_and_dated_by_its_run(tmp_path):
    # python-docx's template said created 2013-12-23 on US Letter; the HTML memo is laid out for A4
    pytest.importorskip("docx")
    import docx

    from weightdiff.render.report import render_outputs

    data = json.loads(json.dumps(cached_result()))
    data.setdefault("run", {})["date"] = "2026-03-04T05:06:07Z"
    render_outputs(data, report=tmp_path / "m.docx")
    d = docx.Document(str(tmp_path / "m.docx"))
    assert d.core_properties.created.isoformat().startswith("2026-03-04T05:06:07")
    assert round(d.sections[0].page_width.cm, 1) == 21.0 and round(d.sections[0].page_height.cm, 1) == 29.7


def test_one_block_and_one_value_read_in_the_singular(tmp_path):
    from weightdiff import compare
    from weightdiff.render import captions
    from weightdiff.render.sentences import plain_language, headline

    r = np.random.default_rng(1)
    b = {"model.layers.0.mlp.up_proj.weight": r.standard_normal((64, 64)).astype(np.float32),
         "model.layers.0.mlp.down_proj.weight": r.standard_normal((64, 64)).astype(np.float32)}
    b["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
    t = {k: v.copy() for k, v in b.items()}
    t["model.layers.0.mlp.up_proj.weight"] += np.float32(0.01)
    t["model.layers.0.mlp.down_proj.weight"][0, 0] = 0.5          # the NaN repaired: one non-finite value
    data = json.loads(compare(str(write_checkpoint(tmp_path / "b", b)),
                              str(write_checkpoint(tmp_path / "t", t))).to_json())
    text = " ".join(plain_language(data) + headline(data) + [c for c in captions.headline_sentences(data)])
    assert "1 of its 1 blocks" not in text and "its one block was changed" in text, text
    assert "1 non-finite value (NaN or Inf) was found" in text and "1 non-finite values" not in text, text
