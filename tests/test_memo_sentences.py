"""Sentences of the verdict, the headline and the memo, read as a lawyer reads them (the tester of the memo's
sentences, t-memo): each test builds a small model whose truth is known by construction and checks that no text
claims more than was established, and that page one, the figures and the title tell one story."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.render.sentences import verdict_title


def _grown(table: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """``table`` with ``rows`` new rows appended, as ``resize_token_embeddings`` adds tokens."""
    new = np.random.default_rng(seed).normal(0, float(table.std()), (rows, table.shape[1])).astype(table.dtype)
    return np.concatenate([table, new])


@pytest.mark.parametrize("head", ["follows", "base_order"])
def test_remapped_and_grown_token_tables_say_whether_the_base_is_computed(tmp_path, head):
    """Embedding rows remapped, then 8 token rows added to both tables, nothing trained. With the head in the
    base's order (it does not follow the remapping), the reason said "on the remapped tokens the model computes
    what the base computes" (``rows_consistent`` was never computed when rows were added) and the title "a
    fine-tune". Now the consistency is read from the rows bitwise, and the title says nothing was trained."""
    base = llama(np.random.default_rng(81), layers=2, hidden=64, inter=128, vocab=256)
    order = np.random.default_rng(82).permutation(256)
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = _grown(base["model.embed_tokens.weight"][order], 8, 83)
    tuned["lm_head.weight"] = _grown(base["lm_head.weight"][order] if head == "follows" else base["lm_head.weight"], 8, 84)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    r = compare(tmp_path / "b", tmp_path / "t")
    s = r.summary
    title = verdict_title(r.to_dict()["summary"])
    assert s.verdict == "derived" and "a fine-tune" not in title, title
    assert "none of its other weights changed" in title, title
    if head == "follows":
        assert s.scope["permuted_units"]["rows_consistent"] is True
        assert "computes what the base computes" in s.verdict_reason
    else:
        assert s.scope["permuted_units"]["rows_consistent"] is False
        assert "computes what the base computes" not in s.verdict_reason
        assert "computes something else than the base" in title and "computes something else" in s.verdict_reason


def test_trimmed_head_beside_a_remapped_embedding_is_not_a_fine_tune(tmp_path):
    """Embedding trimmed and remapped, head trimmed in the base's order, nothing trained: the title read "a
    fine-tune" beside "0 of 39 tensors changed (1 of them only resized ...)"."""
    base = llama(np.random.default_rng(81), layers=2, hidden=64, inter=128, vocab=256)
    keep = np.random.default_rng(85).permutation(256)[:240]
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][keep]
    tuned["lm_head.weight"] = base["lm_head.weight"][:240]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    r = compare(tmp_path / "b", tmp_path / "t")
    title = verdict_title(r.to_dict()["summary"])
    assert "a fine-tune" not in title and "computes something else than the base" in title, title
    assert "0 of" in r.summary.verdict_reason and "of them only resized" not in r.summary.verdict_reason
    assert "1 more only trimmed: rows removed" in r.summary.verdict_reason


def _with_config(path, tie: bool):
    import json

    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "tie_word_embeddings": tie}))
    return path


@pytest.mark.parametrize("base_tied", [False, True])
def test_a_missing_untied_head_is_inconclusive_and_figure_1_says_so(tmp_path, base_tied):
    """The tuned model's config unties its LM head and stores none. Beside a base that stores its head, the removed
    head made the verdict "derived" first and the title read "this base with tensors added or removed; none of its
    own weights changed"; with either base Figure 1 said the head "did not change"."""
    from weightdiff.render.captions import caption_depth

    base = llama(np.random.default_rng(91), layers=2, hidden=64, inter=128, vocab=256, tied=base_tied)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    b = _with_config(write_checkpoint(tmp_path / "b", base), base_tied)
    t = _with_config(write_checkpoint(tmp_path / "t", tuned), False)
    r = compare(b, t)
    data = r.to_dict()
    s = r.summary
    assert s.verdict == "inconclusive" and "head_missing" in s.flags, (s.verdict, s.flags)
    title = verdict_title(data["summary"])
    assert "LM head" in title and "random" in title and "added or removed" not in title, title
    caption = caption_depth(data)
    assert "did not change" not in caption.split("The head")[-1] and "head (after block 1) did not" not in caption
    assert "The head (after block 1) is not stored" in caption, caption


def test_figure_1_reads_the_effective_head_of_a_tie_added_on_one_side(tmp_path):
    """The base stores its head; the tuned model drops it and ties the head to its embedding: the reason says the
    effective head differs (relative change 1.4), Figure 1 said the head "did not change"."""
    from weightdiff.render.captions import caption_depth

    base = llama(np.random.default_rng(92), layers=2, hidden=64, inter=128, vocab=256)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    b = _with_config(write_checkpoint(tmp_path / "b", base), False)
    t = _with_config(write_checkpoint(tmp_path / "t", tuned), True)
    caption = caption_depth(compare(b, t).to_dict())
    assert "and the head (after block 1) did not change" not in caption, caption
    assert "The head (after block 1) is tied to the embeddings on one side only" in caption, caption


def test_the_memo_has_the_notes_its_sentences_point_to(tmp_path):
    """The reason says "(see the notes)" (a head that loads at random, blocks paired by content): the memo had no
    notes, only the JSON and stderr did. Markdown and Word now carry a Notes section with the plan's notes; a
    comparison without notes gets none."""
    import io

    docx = pytest.importorskip("docx")
    from weightdiff.render.memo import build, to_markdown
    from weightdiff.render.memo_docx import to_docx

    base = llama(np.random.default_rng(93), layers=2, hidden=64, inter=128, vocab=256)
    tuned = {k: v for k, v in base.items() if k != "lm_head.weight"}
    b = _with_config(write_checkpoint(tmp_path / "b", base), False)
    t = _with_config(write_checkpoint(tmp_path / "t", tuned), False)
    data = compare(b, t).to_dict()
    assert "see the notes" in data["summary"]["verdict_reason"]
    md = to_markdown(build(data, []), {})
    assert "### Notes" in md and "it stores no LM head: transformers initialises that head at random" in md
    assert "base `lm_head.weight` is removed" in md           # a tensor's name as code
    text = [p.text for p in docx.Document(io.BytesIO(to_docx(build(data, []), "memo"))).paragraphs]
    assert "Notes" in text and any("stores no LM head" in p for p in text[text.index("Notes"):])
    same = compare(b, b).to_dict()
    assert not same["plan"]["notes"] and "### Notes" not in to_markdown(build(same, []), {})


def _page_one(data: dict) -> tuple[str, str, list]:
    """(the plain-words paragraph, Figure 1's caption, the key-figure rows) as the memo prints them."""
    from weightdiff.render.captions import caption_depth
    from weightdiff.render.memo import key_figures
    from weightdiff.render.sentences import plain_language

    return " ".join(plain_language(data)), caption_depth(data), key_figures(data)


def _mlp_reordered(tmp_path, seed: int, block: int) -> dict:
    """The JSON of a two-block Llama against itself with block ``block``'s MLP neurons reordered, nothing trained
    (the base from ``seed``, the order from ``seed + 1``)."""
    base = llama(np.random.default_rng(seed), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    order = np.random.default_rng(seed + 1).permutation(128)
    p = f"model.layers.{block}.mlp."
    for k in ("gate_proj", "up_proj"):
        tuned[p + k + ".weight"] = base[p + k + ".weight"][order]
    tuned[p + "down_proj.weight"] = base[p + "down_proj.weight"][:, order]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    return compare(tmp_path / "b", tmp_path / "t").to_dict()


def test_page_one_keeps_the_qualifier_of_a_reordering_undone(tmp_path):
    """MLP neurons of one block reordered, nothing trained: the headline says "100% ... bitwise unchanged, once
    the units found reordered are put back in the base's order"; page one said "100% are bit for bit the same"
    and the key figure "numbers not touched at all", though the neurons' numbers sit at other positions."""
    data = _mlp_reordered(tmp_path, 94, 1)
    assert data["summary"]["scope"]["permuted_units"]["tensors_undone"] == 3
    plain, caption, keys = _page_one(data)
    once = "once the units found reordered are put back in the base's order"
    assert once in plain and once in caption, (plain, caption)
    assert keys[0][2] == "numbers not touched, " + once


def test_page_one_and_figure_1_repeat_that_the_model_computes_something_else(tmp_path):
    """Embedding rows remapped, the head left in the base's order, nothing trained: the title says the model
    computes something else than the base; page one said "100% ... 0 of its 2 blocks were changed" and Figure 1
    "the embeddings ... and the head ... did not change", with no caveat."""
    base = llama(np.random.default_rng(96), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][np.random.default_rng(97).permutation(256)]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    data = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert data["summary"]["scope"]["permuted_units"]["rows_consistent"] is False
    plain, caption, _ = _page_one(data)
    for text in (plain, caption):
        assert "not in one order, so the model computes something else than the base" in text, text


def test_whole_blocks_appended_read_as_added_everywhere(tmp_path):
    """Two freshly initialised blocks appended, nothing else changed: page one said "2 of its 6 blocks were
    changed" and Figure 1 "0 of 6 blocks changed", the title "tensors added or removed" (nothing was removed)."""
    from weightdiff.render.formats import summary_blocks_text

    base = llama(np.random.default_rng(98), layers=2, hidden=64, inter=128, vocab=256)
    other = llama(np.random.default_rng(99), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    for k, v in other.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            tuned[k.replace(f"model.layers.{i}.", f"model.layers.{i + 2}.", 1)] = v
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    data = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = data["summary"]
    assert s["scope"]["blocks_added"] == {"blocks": ["layers.2", "layers.3"], "tensors": 18}
    title = verdict_title(s)
    assert title == ("DERIVED: this base with 2 blocks added (layers.2, layers.3: 18 tensors with no counterpart in "
                     "the base); none of its own weights changed."), title
    plain, caption, keys = _page_one(data)
    assert "0 of its 4 blocks were changed and 2 were added (not in the base)" in plain, plain
    assert "0 of 4 blocks changed" in caption
    assert summary_blocks_text(s) == "0 of 4 blocks changed, 2 added (not in the base)"
    assert keys[1][1] == "0 of 4, 2 added (not in the base)"
    assert "in 0 of 4 blocks; 2 blocks added" in s["verdict_reason"]


def test_rescaled_units_are_counted_by_pair_and_by_unit(tmp_path):
    """Up rows times c and down columns divided by c in one block, c = -1 for 13 of 128 neurons: the reason said
    "2 matrices are the base's with each row or column times its own factor (26 of them negative ...), and the
    matrix that reads those units" (read as 3 or 4 matrices, and 26 flipped units out of 128 with 13 flipped)."""
    base = llama(np.random.default_rng(100), layers=2, hidden=64, inter=128, vocab=256)
    c = np.ones(128)
    c[np.random.default_rng(101).choice(128, 13, replace=False)] = -1.0
    tuned = dict(base)
    p = "model.layers.1.mlp."
    tuned[p + "up_proj.weight"] = (base[p + "up_proj.weight"] * c[:, None]).astype(np.float32)
    tuned[p + "down_proj.weight"] = (base[p + "down_proj.weight"] / c[None, :]).astype(np.float32)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.scope["rescaled_units"]["tensors"] == 2 and s.scope["rescaled_units"]["negative"] == 26
    assert "in 1 pair of matrices the first's rows (up, v)" in s.verdict_reason, s.verdict_reason
    assert "(13 units have a negative factor: their signs flipped)" in s.verdict_reason
    assert "26" not in s.verdict_reason and "2 matrices are" not in s.verdict_reason


def test_the_terminal_table_says_it_counts_whole_tensors(tmp_path):
    """A fine-tune of one block: the table's first column was headed "parameters" and its "unchanged" row counted
    the parameters of tensors left entirely unchanged, beside a bullet that counts parameters number by number
    (a rotated model read "unchanged 0 0%" above "0.97% of parameters are bitwise unchanged")."""
    from weightdiff.render.terminal import render_text

    base = llama(np.random.default_rng(102), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    tuned["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"] * np.float32(1.01)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    text = render_text(compare(tmp_path / "b", tmp_path / "t").to_dict())
    header = next(line for line in text.splitlines() if "share" in line and "tensors" in line)
    assert header.split()[:3] == ["tensor", "status", "parameters"], header


def test_page_one_says_remapped_rows_compared_with_other_rows_measure_no_change(tmp_path):
    """Both token tables remapped alike, then 8 rows added, nothing trained: no order to undo, so their numbers are
    of rows compared with other tokens' rows. The reason says so; page one said "its large weight matrices moved
    by 6.0e-1 of their size, about 363 times the rounding a cast to bfloat16 would cause" and nothing else."""
    from weightdiff.render.sentences import plain_language

    base = llama(np.random.default_rng(103), layers=2, hidden=64, inter=128, vocab=256)
    order = np.random.default_rng(104).permutation(256)
    tuned = dict(base)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tuned[k] = _grown(base[k][order], 8, 105)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    data = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert "rows" not in (data["summary"]["scope"]["permuted_units"].get("undone") or {}).get("embeddings", ())
    plain = " ".join(plain_language(data))
    assert "moved by" in plain
    assert ("These figures include the token rows of the embeddings and head, which are the base's rows in another "
            "order and were compared here with other tokens' rows") in plain, plain
    form = [h for h in data["summary"]["headline"] if "directions" in h or "rank" in h]
    assert form and all("for those tables it measures no change" in h for h in form), form


def test_page_one_says_blocks_are_repeated_copies(tmp_path):
    """SOLAR-style depth up-scaling (base blocks 0-1 then 0-1 again), nothing trained: page one said only "100% are
    bit for bit the same ... and 0 of its 4 blocks were changed", not that the model is deeper, made of copies."""
    from weightdiff.render.sentences import plain_language

    base = llama(np.random.default_rng(106), layers=2, hidden=64, inter=128, vocab=256)
    tuned = {k: v for k, v in base.items() if not k.startswith("model.layers.")}
    for new, old in enumerate((0, 1, 0, 1)):
        for k, v in base.items():
            if k.startswith(f"model.layers.{old}."):
                tuned[k.replace(f"model.layers.{old}.", f"model.layers.{new}.", 1)] = v
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    data = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert data["summary"]["scope"]["blocks_moved"] == 2
    plain = " ".join(plain_language(data))
    assert ("2 of its blocks are base blocks at another position (repeated or reordered; the Notes say which), and it "
            "has 4 blocks where the base has 2") in plain, plain


def test_pruning_is_said_as_a_mask_not_a_change_spread_over_directions(tmp_path):
    """Half the elements of one block's matrices set to zero by magnitude, the rest exactly the base's: page one
    said "The change is spread over many directions: writing it down takes ... numbers"."""
    from weightdiff.render.sentences import plain_language

    base = llama(np.random.default_rng(107), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    for k, v in base.items():
        if k.startswith("model.layers.1.") and v.ndim == 2:
            tuned[k] = np.where(np.abs(v) < np.median(np.abs(v)), np.float32(0), v).astype(np.float32)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    data = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert data["summary"]["scope"]["pruned_elements"]["tensors"] == 7
    plain = " ".join(plain_language(data))
    assert "spread over many directions" not in plain, plain
    assert "elements of 7 matrices to zero and leaves the rest exactly the base's (pruning)" in plain, plain


def test_the_delta_parameters_key_figure_does_not_call_a_reordering_injected(tmp_path):
    """MLP neurons reordered, nothing trained: the key figure read "0 ... how much was injected, written compactly",
    though rebuilding the model from the base takes the new order."""
    _, _, keys = _page_one(_mlp_reordered(tmp_path, 108, 0))
    assert keys[-1][2] == ("how much differs once the units found reordered are put back in the base's order, written "
                           "compactly (what was undone is not counted in it)"), keys[-1]


@pytest.mark.parametrize("head", ["follows", "base_order"])
def test_a_trimmed_vocabulary_keeps_the_base_whole(tmp_path, head):
    """Embedding trimmed from 256 to 240 rows and remapped (the head alike, or trimmed in the base's order): the
    base was counted as 30,720 + ... parameters short of its file, the rows the embedding lost vanishing from
    every count ("Compared: 99.4% of the base's parameters (713,856 of 717,952)" of a 722,048-parameter base)."""
    base = llama(np.random.default_rng(110), layers=2, hidden=64, inter=128, vocab=256)
    keep = np.random.default_rng(111).permutation(256)[:240]
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][keep]
    tuned["lm_head.weight"] = base["lm_head.weight"][keep if head == "follows" else slice(0, 240)]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    whole = sum(v.size for v in base.values())
    assert s.params_total == whole and s.coverage["base"]["params"] == whole, (s.params_total, s.coverage)
    assert s.params_by_status["removed"] == 2 * 16 * 64


def test_the_memo_defines_and_cites_the_transformation_its_verdict_names(tmp_path):
    """A model with MLP neurons reordered: the verdict box says "reordered", "units"; the method section defined
    only D = T - B and the sources cited none of the work on such transformations."""
    from weightdiff.render.memo import build, to_markdown

    base = llama(np.random.default_rng(112), layers=2, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    order = np.random.default_rng(113).permutation(128)
    p = "model.layers.1.mlp."
    for k in ("gate_proj", "up_proj"):
        tuned[p + k + ".weight"] = base[p + k + ".weight"][order]
    tuned[p + "down_proj.weight"] = base[p + "down_proj.weight"][:, order]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    md = to_markdown(build(compare(tmp_path / "b", tmp_path / "t").to_dict(), []), {})
    method = md.split("How the numbers are computed")[1]
    assert "D = T − f(B)" in method and "Units reordered:" in method
    assert "Git Re-Basin" in method.split("Sources")[1]
    plain = compare(tmp_path / "b", tmp_path / "b").to_dict()
    assert "D = T − f(B)" not in to_markdown(build(plain, []), {})


def test_a_fold_is_not_read_as_vector_tuning_on_page_one(tmp_path, rng):
    """QuaRot's fold alone (each norm's gains moved into the matrices that read it, the norms set to ones): the title
    says so, page one said "The change is in vectors only (norm weights or biases)", which reads as norm tuning."""
    from test_rotation import _rotated
    from weightdiff.render.sentences import plain_language

    base = llama(rng)
    b = write_checkpoint(tmp_path / "base", base)
    data = compare(b, write_checkpoint(tmp_path / "fold", _rotated(base, np.eye(128)))).to_dict()
    assert "folded_norms" in data["summary"]["flags"]
    plain = " ".join(plain_language(data))
    if "in vectors only" in plain:
        assert "in vectors only (among them 9 norms whose gains were moved into the matrices that read them" in plain


def test_a_fine_tune_that_drops_the_head_its_config_unties_says_so(tmp_path):
    """Beside other changes the missing head kept the title "a fine-tune" alone: a lawyer read a usable fine-tune
    whose head, loaded with transformers, is random."""
    base = llama(np.random.default_rng(93), layers=2, hidden=64, inter=128, vocab=256)
    rng = np.random.default_rng(94)
    tuned = {k: (v + 0.02 * float(v.std()) * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
             for k, v in base.items() if k != "lm_head.weight"}
    b = _with_config(write_checkpoint(tmp_path / "b", base), False)
    t = _with_config(write_checkpoint(tmp_path / "t", tuned), False)
    s = compare(b, t).summary
    assert s.verdict == "derived" and "head_missing" in s.flags, (s.verdict, s.flags)
    title = verdict_title(s.to_dict())
    assert "a fine-tune" in title and "that head is random" in title, title
    # a fine-tune that keeps its head says nothing of it
    kept = dict(tuned, **{"lm_head.weight": base["lm_head.weight"]})
    s = compare(b, _with_config(write_checkpoint(tmp_path / "k", kept), False)).summary
    assert "head_missing" not in s.flags and "random" not in verdict_title(s.to_dict())

