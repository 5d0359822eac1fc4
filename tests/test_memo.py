"""The memo: headline, figures, tables, methodology, limits, reproducibility, and escaping of names."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from render_sample import cached_result
from weightdiff.render import captions as cap
from weightdiff.render.memo import md_escape
from weightdiff.render.report import write_report

HOSTILE = "model.layers.10.<script>alert(1)</script>|x`y$z\u202e\n.weight"
HOSTILE_PATH = "tuned/<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("memo")
    data = cached_result()
    q10 = next(t for t in data["tensors"] if t["name"] == "model.layers.10.self_attn.q_proj.weight")
    q10["name"] = HOSTILE
    data["tuned"]["path"] = HOSTILE_PATH
    source = {"path": "out.json", "sha256": "ef" * 32, "command": "weightdiff report out.json"}
    out = write_report(data, html=d / "memo.html", markdown=d / "memo.md", plots=d / "figs", source=source)
    page = out.html.read_text(encoding="utf-8")
    assert "layers.<wbr>10" in page          # long names may wrap after a dot; the tests read past the hints
    return data, out, page.replace("<wbr>", ""), out.markdown.read_text(encoding="utf-8")


def test_html_is_self_contained(written):
    _, out, page, _ = written
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/svg+xml;base64,') == 6
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "@media print" in page and "break-inside: avoid" in page


def test_html_escapes_every_name(written):
    _, _, page, _ = written
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "\u202e" not in page and "\\u202e" in page          # bidi override shown, not applied
    assert "\\n" in page


def test_html_has_headline_verdict_figures_and_tables(written):
    data, out, page, _ = written
    for sentence in cap.headline_sentences(data):
        assert html.escape(sentence.replace("\u202e", "\\u202e")).split(" tuned/")[0] in page
    assert "87.6% of parameters are bitwise unchanged" in page
    assert "2 of 12 blocks changed" in page
    assert '<p class="verdict"><strong>derived</strong>' in page
    for i, fo in enumerate(out.figures, start=1):
        assert f"Figure {i}. {fo.title}." in page
        assert html.escape(fo.caption) in page
    # most changed blocks: layers.10 first (rel change 0.0161), then layers.11 (0.0142)
    blocks = page.split("Most changed blocks")[1].split("Most changed tensors")[0]
    assert blocks.index("layers.10") < blocks.index("layers.11")
    assert "1.6e-2" in blocks
    tensors = page.split("Most changed tensors")[1]
    first_row = tensors.split("<tbody><tr>")[1].split("</tr>")[0]   # block 10's q: rel change 0.113
    assert "&lt;script&gt;" in first_row and ">1.1e-1<" in first_row and ">4<" in first_row
    assert "score.weight" in page and "added" in page          # structural table


def test_verdict_thresholds_methodology_limits_reproducibility(written):
    data, _, page, md = written
    for name, value in data["settings"]["thresholds"].items():
        assert f"<code>{name}</code>" in page
    for term in ("stable_rank = ‖D‖² / s1²", "energy_rank_p = smallest k", "rel_change = ‖D‖ / ‖B‖",
                 "Marchenko-Pastur", "Roy and Vetterli", "Halko", "Biderman", "BitDelta", "Hu et al."):
        assert term in page and term in md.replace("\\_", "_")
    assert "draws no legal conclusion" in page and "draws no legal conclusion" in md
    assert "describe weights only" in page
    assert "weightdiff compare base/ tuned/ --json out.json" in page      # the exact command
    assert "ab" * 32 in page and "cd" * 32 in page                         # sha256 of each input file
    assert "ef" * 32 in page                                              # sha256 of the JSON itself
    assert "numpy" in page and "weightdiff.compare/1" in page


def test_markdown_links_existing_images_and_escapes(written):
    _, out, _, md = written
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 6
    for link in links:
        assert (out.markdown.parent / link).is_file()
    # outside code spans (which CommonMark shows literally) no raw tag survives
    prose = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", md)
    assert "<img" not in prose and "<script" not in prose and "<" not in prose.replace("&lt;", "")
    assert "`tuned/<img src=x onerror=alert(1)>`" in md
    row = next(line for line in md.splitlines() if "alert(1)</script>" in line)
    # the pipe inside the hostile name is escaped: the row keeps its 9 cells
    assert len(re.findall(r"(?<!\\)\|", row)) == 10
    assert "\u202e" not in md


def test_md_escape_neutralises_markup():
    assert md_escape("[a](http://x) *b* _c_ `d` $e$") == r"\[a\](http://x) \*b\* \_c\_ \`d\` \$e\$"
    assert md_escape("<b>&") == "&lt;b>&amp;"
    assert md_escape("# title") == r"\# title" and md_escape("1. item") == r"1\. item"
    assert md_escape("a|b", table=True) == r"a\|b" and md_escape("a|b") == "a|b"


def test_same_data_same_memo_bytes(tmp_path):
    data = cached_result()
    a = write_report(data, html=tmp_path / "a.html", markdown=tmp_path / "a.md", plots=tmp_path / "fa")
    b = write_report(data, html=tmp_path / "b.html", markdown=tmp_path / "b.md", plots=tmp_path / "fb")
    assert a.html.read_bytes() == b.html.read_bytes()
    assert a.markdown.read_text().replace("fa/", "") == b.markdown.read_text().replace("fb/", "")


def test_figures_index_keeps_captions(tmp_path):
    import json

    data = cached_result()
    out = write_report(data, plots=tmp_path / "p")
    index = json.loads((tmp_path / "p" / "figures.json").read_text())
    assert [f["name"] for f in index] == [f.name for f in out.figures]
    assert index[0]["caption"] == cap.caption_depth(data)
    assert index[0]["files"] == {"png": "depth_profile.png", "svg": "depth_profile.svg"}
    assert not list(Path(tmp_path / "p").glob(".*.tmp"))      # atomic writes leave no temporaries


def test_relatedness_is_reported_as_one_minus_cosine(written):
    """DESIGN: report 1 - cosine in scientific notation, never a cosine that reads 1.000."""
    data, _, page, md = written
    from weightdiff.render.formats import sci
    from weightdiff.render.reference import one_minus_cosine_of

    expected = sci(one_minus_cosine_of(data))     # the one source every output prints it from
    assert "1 − cosine (large matrices)" in md and expected in md
    assert "relatedness cosine" not in page


def test_quantized_only_memo_names_neither_a_fine_tune_nor_dtype_rounding(tmp_path):
    # page one called a base's own quantization "this fine-tune" (Figure 2) whose blocks "differ only by
    # dtype rounding" (Figure 1): the JSON says quantized_only, every differing tensor quantized
    from weightdiff.render.captions import caption_depth, caption_reference
    from weightdiff.render.reference import reference_scale

    rows = [{"name": f"model.layers.{i}.mlp.up_proj.weight", "block": f"layers.{i}", "status": "quantized",
             "compared": "float", "cosine": 0.999, "module": "mlp.up", "shape": [8, 8], "numel": 64,
             "numel_compared": 64, "norm_base": 3.0, "norm_tuned": 3.0, "norm_delta": 0.1, "rel_change": 0.033,
             "rounding_floor": {"BF16": 0.01, "F16": 0.001}} for i in range(2)]
    data = {"tensors": rows, "summary": {"verdict": "quantized_only"},
            "blocks": [{"block": f"layers.{i}", "index": i, "rel_change": 0.033, "tensors_changed": 0,
                        "params_changed": 0} for i in range(2)],
            "settings": {"thresholds": {"large_matrix_numel": 1}}}
    data["reference"] = reference_scale(data)
    assert "within their quantization noise floor" in caption_depth(data)
    assert "dtype rounding" not in caption_depth(data)
    assert [p["label"] for p in data["reference"]["points"] if p["key"] == "model"] == ["this model"]
    assert "fine-tune" not in caption_reference(data)


def test_depth_caption_agrees_verb_and_subject():
    # "The head (after block 2) differ only by dtype rounding"
    from weightdiff.render.captions import caption_depth

    rows = [{"name": "model.layers.0.w", "block": "layers.0", "status": "unchanged"},
            {"name": "lm_head.weight", "block": "head", "status": "rounding"},
            {"name": "model.embed_tokens.weight", "block": "embeddings", "status": "rounding"}]
    blocks = [{"block": "embeddings", "index": None, "rel_change": 1e-3, "tensors_changed": 0, "params_changed": 0},
              {"block": "layers.0", "index": 0, "rel_change": 0.0, "tensors_changed": 0, "params_changed": 0},
              {"block": "layers.1", "index": 1, "rel_change": 0.0, "tensors_changed": 0, "params_changed": 0},
              {"block": "head", "index": None, "rel_change": 2e-3, "tensors_changed": 0, "params_changed": 0}]
    text = caption_depth({"tensors": rows, "blocks": blocks, "summary": {}})
    assert "The embeddings (before block 0) differ only by dtype rounding" in text, text
    assert "The head (after block 1) differs only by dtype rounding" in text, text


def test_counts_of_one_read_in_the_singular():
    # "for all 1 changed matrices" and "1 block (1) differs only by NaN" (the index unlabelled), a tester found
    from weightdiff.render.formats import summary_tensors_text
    from weightdiff.render.provenance import caption_provenance

    from weightdiff.render.plots import pick_rank_matrices

    def rank_caption(d):
        return cap.caption_rank(d, pick_rank_matrices(cap.changed_matrices(d)))

    data = cached_result()
    mats = cap.changed_matrices(data)
    one = dict(data, tensors=[t for t in data["tensors"] if t not in mats or t is mats[0]])
    assert "for the 1 changed matrix" in rank_caption(one) and "all 1 " not in rank_caption(one)
    assert f"for all {len(mats)} changed matrices" in rank_caption(data)
    assert cap._blocks_named([{"index": 1}]) == "block 1"
    assert cap._blocks_named([{"index": 1}, {"index": 4}]) == "2 blocks (1 and 4)"
    prov = {"settings": {"thresholds": {"unrelated_rel_change": 0.9, "unrelated_cosine": 0.2}},
            "reference": {"relative_change": 1.41, "cosine": 0.0},
            "candidates": [{"path": "base", "relative_change_large": 1e-3, "cosine_large": 0.999}]}
    assert caption_provenance(prov).startswith("The 1 compared candidate against the tuned model")
    assert summary_tensors_text({"coverage": {"tuned": {"compared": 0}}, "scope": {"tensors_total": 1}}) == \
        "the one tensor could not be compared"


def test_a_nan_only_block_is_named_by_its_index_in_the_depth_caption():
    data = json_copy(cached_result())
    b = next(b for b in data["blocks"] if b.get("index") is not None and b.get("tensors_changed"))
    for t in data["tensors"]:
        if t.get("block") == b["block"] and t["status"] == "changed":
            t.update(norm_delta=0.0, rel_change=0.0, cosine=1.0, nonfinite=3)
    text = cap.caption_depth(data)
    assert f"; block {b['index']} differs only by NaN or infinite values" in text, text


def json_copy(d):
    import json

    return json.loads(json.dumps(d))


def test_partial_plain_words_name_the_shared_and_the_unrelated_parts():
    # page one said only "2 of its 4 blocks were changed": never that they are unrelated to the base, and with no
    # reference the docs promise
    from weightdiff.render.sentences import plain_language

    data = json_copy(cached_result())
    s = data["summary"]
    s["verdict"] = "partial"
    s["components"] = [
        {"component": "embeddings", "status": "shared", "cosine": 1.0, "rel_change": 0.0, "identical": True},
        {"component": "layers.0", "status": "shared", "cosine": 1.0, "rel_change": 2e-3, "identical": False},
        {"component": "layers.1", "status": "unrelated", "cosine": 0.001, "rel_change": 1.41, "identical": False},
        {"component": "layers.2", "status": "unrelated", "cosine": -0.002, "rel_change": 1.42, "identical": False}]
    data["reference"] = {"points": [{"key": "BF16", "label": "bfloat16 rounding", "rel_change": 1.7e-3,
                                     "one_minus_cosine": 1.4e-6},
                                    {"key": "unrelated", "label": "unrelated model", "rel_change": 1.41,
                                     "one_minus_cosine": 1.0}]}
    words = " ".join(plain_language(data))
    assert "It shares embeddings, block layers.0 with base/, whose large matrices moved by at most 2.0e-3" in words
    assert "the rounding a cast to bfloat16 would cause" in words
    assert "2 blocks (layers.1 to layers.2) are unrelated to base/" in words
    assert "as an independently initialised model of the same shape would" in words


def test_the_reference_scale_draws_a_model_that_reads_zero():
    # only tensors added: the model reads 0, which a log axis cannot hold, and the figure dropped it
    from weightdiff.render.figures_reference import draw_reference
    from weightdiff.render.reference import reference_scale

    data = json_copy(cached_result())
    ref = reference_scale(data)
    for p in ref["points"]:
        if p["key"] == "model":
            p.update(rel_change=0.0, one_minus_cosine=0.0)
    data["reference"] = ref
    fig = draw_reference(data)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert labels.count("this model\n0 (no change)") == 2, labels


def test_a_blank_label_names_nothing():
    # `--base-label "   "` titled the memo "from    ?" and wrote `**Base:** ****`
    from weightdiff.comparison import _labelled
    from weightdiff.render.sentences import model_label

    assert model_label({"path": "base/", "label": "   "}) == "base/"
    assert model_label({"path": "base/", "label": " Acme "}) == " Acme "
    assert "label" not in _labelled({"path": "base/"}, " \t")
    assert _labelled({"path": "base/"}, "Acme")["label"] == "Acme"
