"""Issue 11: a verdict that is never silently wrong, on checkpoints written by real libraries.

Tiny BERT (a MiniLM-shaped encoder) and Llama models from transformers, saved as they
come: a sentence-transformers layout (keys renamed as sentence-transformers saves them,
since the package is not installed), a torch ONNX export with its raw initializer names
(``onnx::MatMul_*``, transposed) converted to safetensors, a cousin sharing only its word
embeddings, a student keeping its teacher's embeddings with re-initialised blocks, a
layer-dropped slice, tied and untied heads, buffers added or dropped, filters matching
nothing, an adapter given as BASE, a declared base that names another model, and a
randomized-spectrum run whose bounds must print as bounds everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_checkpoint
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.render.memo import build, to_markdown
from weightdiff.render.tabular import to_csv
from weightdiff.render.terminal import render_text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS = 6


def _bert(seed: int, layers: int = LAYERS):
    """A tiny BERT whose every parameter (biases and norms too) is random, as after training."""
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(seed)
    m = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _state(m) -> dict:
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items() if v.dtype.is_floating_point}


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert") / "base"
    m = _bert(0)
    m.save_pretrained(d)
    return d, m


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def _paired_by(res) -> dict:
    return res.plan["counts"]["paired_by"]


@pytest.mark.parametrize("prefix", ["0.auto_model.", "model.0.auto_model."])
def test_sentence_transformers_layout_reads_identical(tmp_path, bert_base, prefix):
    base_dir, m = bert_base
    tensors = {prefix + k: v for k, v in _state(m).items()}
    tensors["2.linear.weight"] = np.ones((4, 4), np.float32)     # a Dense module sentence-transformers may add
    tuned = write_checkpoint(tmp_path / "st", tensors)
    res = compare(base_dir, tuned, rank=False)
    s = res.summary
    assert s.verdict == "derived"       # a tensor was added, so not identical, but every shared one is equal
    assert s.scope["tensors_changed"] == 1 and s.params_by_status["changed"] == 0
    assert _paired_by(res) == {"prefix": len(_state(m))}
    assert s.coverage["base"]["share"] == 1.0 and s.scope["base_blocks_paired"] == LAYERS
    assert [b.block for b in res.blocks if b.index is not None][:LAYERS] == [f"encoder.layer.{i}" for i in range(LAYERS)]
    del tensors["2.linear.weight"]
    res = compare(base_dir, write_checkpoint(tmp_path / "st2", tensors), rank=False)
    assert res.summary.verdict == "identical" and res.summary.coverage["tuned"]["share"] == 1.0


def test_rename_flag_maps_what_no_prefix_explains(tmp_path, bert_base):
    base_dir, m = bert_base
    tensors = {k.replace("encoder.layer.", "blocks.").replace("attention.self.", "attn."): v
               for k, v in _state(m).items()}
    tuned = write_checkpoint(tmp_path / "renamed", tensors)
    res = compare(base_dir, tuned, rank=False, rename=("blocks.=encoder.layer.", "attn.=attention.self."))
    assert res.summary.verdict == "identical"
    assert _paired_by(res) == {"name": 5 + 2, "rename": LAYERS * 16}
    r = _run("compare", base_dir, tuned, "--rename", "blocks", "-q")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--rename" in r.stderr


def _onnx_to_safetensors(model, out_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            out = self.m(input_ids=ids)
            return out.last_hidden_state, out.pooler_output

    path = tmp_path / "model.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(model), (torch.ones(1, 8, dtype=torch.long),), str(path), input_names=["ids"],
                          dynamo=False, do_constant_folding=True)
    tensors = {i.name: numpy_helper.to_array(i).copy() for i in onnx.load(str(path)).graph.initializer}
    tensors = {k: v for k, v in tensors.items() if v.dtype == np.float32 and v.ndim >= 1}
    return write_checkpoint(out_dir, tensors), tensors


def test_onnx_export_pairs_by_prefix_and_content(tmp_path, bert_base):
    base_dir, m = bert_base
    tuned, tensors = _onnx_to_safetensors(m, tmp_path / "onnx", tmp_path)
    assert any(k.startswith("onnx::MatMul_") for k in tensors)
    res = compare(base_dir, tuned, rank=False)
    s = res.summary
    by = _paired_by(res)
    n_matmul = sum(1 for k in tensors if k.startswith("onnx::"))
    assert by.get("content") == n_matmul and by.get("prefix", 0) + by["content"] == len(tensors)
    assert "content_paired" in s.flags
    transposed = [p for p in res.plan["special"] if p.get("transposed")]
    assert transposed                       # MatMul initializers are the transposed Linear weights
    # every exported parameter is the base's own: the only difference is what the export left out
    assert s.params_by_status["changed"] == 0 and s.params_by_status["unchanged"] == s.coverage["tuned"]["params"]
    assert s.coverage["tuned"]["share"] == 1.0 and s.verdict in ("identical", "derived")
    if s.verdict == "derived":
        assert s.tensors_by_status["removed"] > 0 and s.scope["tensors_changed"] == 0


def test_cousin_sharing_only_word_embeddings_is_partial(tmp_path, bert_base):
    base_dir, m = bert_base
    cousin = _state(_bert(7, layers=3))
    cousin["embeddings.word_embeddings.weight"] = _state(m)["embeddings.word_embeddings.weight"]
    res = compare(base_dir, write_checkpoint(tmp_path / "cousin", cousin), rank=False)
    s = res.summary
    assert s.verdict == "partial"
    comps = {c["component"]: c["status"] for c in s.components}
    assert comps["embeddings"] == "shared"
    assert [comps[f"encoder.layer.{i}"] for i in range(3)] == ["unrelated"] * 3
    assert [comps[f"encoder.layer.{i}"] for i in range(3, 6)] == ["base_only"] * 3
    assert (s.scope["base_blocks_paired"], s.scope["base_blocks_total"]) == (3, 6)
    assert "Shared with this base: embeddings" in s.verdict_reason
    assert "encoder.layer.0" in s.verdict_reason and "PARTIAL" in render_text(res.to_dict())
    # the pooled cosine alone (dominated by the shared table) says derived: it must not decide
    assert s.relatedness_cosine > 0.5


def test_student_keeping_teacher_embeddings_with_fresh_blocks_is_partial(tmp_path, bert_base):
    base_dir, m = bert_base
    student = _state(_bert(11))
    for k, v in _state(m).items():
        if k.startswith("embeddings."):
            student[k] = v
    res = compare(base_dir, write_checkpoint(tmp_path / "student", student), rank=False)
    s = res.summary
    assert s.verdict == "partial" and s.coverage["base"]["share"] == 1.0
    comps = {c["component"]: c for c in s.components}
    assert comps["embeddings"]["status"] == "shared" and comps["embeddings"]["identical"]
    assert all(comps[f"encoder.layer.{i}"]["status"] == "unrelated" for i in range(LAYERS))


def test_layer_dropped_slice_is_derived_and_counts_base_blocks(tmp_path, bert_base):
    base_dir, m = bert_base
    kept = {k: v for k, v in _state(m).items() if not re.match(r"encoder\.layer\.[345]\.", k)}
    res = compare(base_dir, write_checkpoint(tmp_path / "slice", kept), rank=False)
    s = res.summary
    assert s.verdict == "derived" and s.scope["tensors_changed"] == 0
    assert (s.scope["base_blocks_paired"], s.scope["base_blocks_total"]) == (3, 6)
    assert "3 of 6 base blocks have a counterpart" in s.verdict_reason
    assert s.coverage["tuned"]["share"] == 1.0 and s.coverage["base"]["share"] < 0.8
    assert "Compared: " in s.verdict_reason


def test_only_a_token_type_table_pairs_is_inconclusive(tmp_path, bert_base):
    base_dir, m = bert_base
    other = {f"net.{k}": v for k, v in _state(_bert(3)).items()}
    other = {k: v for k, v in other.items() if v.ndim < 2}                       # nothing content can pair
    other.update({f"net.w{i}": np.random.default_rng(i).normal(size=(64, 96)).astype(np.float32) for i in range(6)})
    other["embeddings.token_type_embeddings.weight"] = _state(m)["embeddings.token_type_embeddings.weight"]
    res = compare(base_dir, write_checkpoint(tmp_path / "tt", other), rank=False)
    s = res.summary
    assert s.verdict == "inconclusive"
    assert s.coverage["base"]["large_share"] == 0 and s.coverage["tuned"]["large_share"] == 0
    text = render_text(res.to_dict())
    assert "INCONCLUSIVE" in text and "large matrices are" not in text and "large matrices keep" not in text
    assert s.verdict_reason.startswith("Only 0% of the base's large-matrix parameters")


@pytest.mark.parametrize("flag", [("--include", "nomatch*"), ("--exclude", "*")])
def test_filters_matching_nothing_exit_2(tmp_path, bert_base, flag):
    base_dir, _ = bert_base
    out = tmp_path / "r.json"
    r = _run("compare", base_dir, base_dir, *flag, "--json", out)
    assert r.exit_code == 2 and r.stdout == "" and not out.exists()
    assert r.stderr.startswith(f"error: {flag[0]} '{flag[1]}' ") and "nothing to compare" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def _llama(tied: bool, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def test_tied_and_untied_heads_compare_the_effective_heads(tmp_path):
    untied = _llama(False)
    untied.save_pretrained(tmp_path / "untied")
    tied = _llama(True)
    with torch.no_grad():      # the same trunk, but its head is its embedding table
        for (k, p), (_, q) in zip(tied.named_parameters(), untied.named_parameters()):
            if "lm_head" not in k:
                p.copy_(q)
    tied.save_pretrained(tmp_path / "tied")
    res = compare(tmp_path / "untied", tmp_path / "tied", rank=False)
    s = res.summary
    # not identical: the effective head (the embedding) differs from the base head; derived, as re-tying is
    assert s.verdict == "derived" and "tied_lm_head" in s.flags
    assert _paired_by(res).get("tied") == 1
    assert {c["component"]: c["status"] for c in s.components}["head"] == "tied"
    assert any(h.startswith("The tuned model ties `lm_head.weight` to its embedding") for h in s.headline)
    # the other way round: the untied head is a copy of the embedding, so every effective parameter is equal
    # (bitwise: the head is the embedding saved twice, an alias, not a head to compare again)
    copy = _llama(False)
    with torch.no_grad():
        for (k, p), (_, q) in zip(copy.named_parameters(), tied.named_parameters()):
            p.copy_(q)
        copy.lm_head.weight.copy_(tied.model.embed_tokens.weight)
    copy.save_pretrained(tmp_path / "copy")
    res = compare(tmp_path / "tied", tmp_path / "copy", rank=False)
    assert res.summary.verdict == "identical" and [a["name"] for a in res.plan["aliases"]] == ["lm_head.weight"]


def test_buffers_are_set_apart_and_never_decide(tmp_path, bert_base):
    base_dir, m = bert_base
    state = _state(m)
    with_buffers = dict(state)
    with_buffers["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    with_buffers["encoder.layer.0.attention.self.rotary.inv_freq"] = np.ones(8, np.float32)
    with_buffers["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    base = write_checkpoint(tmp_path / "with", with_buffers)
    res = compare(base, base_dir, rank=False)          # the re-saved model dropped them
    s = res.summary
    assert s.verdict == "identical" and "removed_tensors" not in s.flags
    assert sorted(b["name"] for b in s.buffers) == ["embeddings.position_ids", "encoder.layer.0.attention.self.rotary.inv_freq",
                                                    "h.0.attn.bias"]
    assert all(b["side"] == "base" for b in s.buffers)
    assert s.params_total == sum(v.size for v in state.values())
    res = compare(base_dir, base, rank=False)
    assert res.summary.verdict == "identical" and res.plan["counts"]["buffers"] == 3


def test_adapter_given_as_base_exits_2_with_a_swap_hint(tmp_path):
    peft = pytest.importorskip("peft")
    model = _llama(False)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    r = _run("compare", tmp_path / "adapter", tmp_path / "base", "-q")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "is a PEFT adapter" in r.stderr and "swap the arguments" in r.stderr


def test_declared_base_mismatch_is_a_flag_not_a_verdict(tmp_path, bert_base):
    base_dir, m = bert_base
    tuned = write_checkpoint(tmp_path / "t", _state(m))
    (tuned / "config.json").write_text(json.dumps({"_name_or_path": "google-bert/bert-base-uncased"}))
    base = write_checkpoint(tmp_path / "b", _state(m))
    (base / "config.json").write_text(json.dumps({"_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}))
    s = compare(base, tuned, rank=False).summary
    assert s.verdict == "identical" and "declared_base_mismatch" in s.flags
    assert s.declared == {"base_names": ["sentence-transformers/all-MiniLM-L6-v2"],
                          "tuned_declares_base": "google-bert/bert-base-uncased", "mismatch": True}
    (base / "config.json").write_text(json.dumps({"_name_or_path": "/data/bert-base-uncased"}))
    assert "declared_base_mismatch" not in compare(base, tuned, rank=False).summary.flags


BOUND = re.compile(r"^[≥≤]")


def test_partial_spectrum_values_are_never_printed_bare(tmp_path):
    rng = np.random.default_rng(0)
    base = {f"layers.{i}.w.weight": rng.normal(size=(96, 80)).astype(np.float32) for i in range(2)}
    tuned = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}   # dense, full rank
    res = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned),
                  rank_k=8, exact_svd_max=16)
    d = res.to_dict()
    assert "partial_spectrum" in d["summary"]["flags"]
    bounded = [t for t in d["tensors"] if (t.get("rank") or {}).get("bounds", {}).get("numerical_rank")]
    assert bounded
    # terminal: the model's largest rank is a bracket (issue 15's format), each tensor's a bound
    text = render_text(d)
    lo, hi = d["summary"]["form"]["max_numerical_rank_bounds"]
    assert d["summary"]["form"]["max_numerical_rank"] is None and hi > lo
    assert f"largest numerical rank {lo}-{hi}" in text
    for line in text.splitlines():
        if "layers." in line and "changed" in line:
            assert line.split()[-1].startswith("≥") or line.split()[-2] == "≥", line
    # CSV: every bounded rank cell carries its sign
    rows = list(csv.DictReader(io.StringIO(to_csv(d))))
    for row in rows:
        t = next(t for t in d["tensors"] if t["name"] == row["name"])
        for field in (t.get("rank") or {}).get("bounds", {}):
            # an estimate (effective_rank: the even spread, the upper end of its range) prints ~value
            estimated = field in ((t.get("rank") or {}).get("estimated") or [])
            assert (row[field].startswith("~") if estimated else BOUND.match(row[field])), (field, row[field])
    # memo: the rank columns carry their sign, the summary row the bracket
    md = to_markdown(build(d, []), {})
    assert f"{lo}-{hi}" in md and "≥ " in md


# -- changes no number measures, and modules grafted from elsewhere (a tester's architecture round) ----

def _llama_pair(tmp_path, edit, seed: int = 3, **shape):
    from models import llama

    base = llama(np.random.default_rng(seed), **(shape or dict(layers=4, hidden=64, inter=128, vocab=256)))
    tuned = edit({k: v.copy() for k, v in base.items()})
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    return compare(tmp_path / "b", tmp_path / "t")


def test_matrices_set_to_zero_are_said_and_never_read_as_keeping_their_direction(tmp_path):
    """Every block matrix zeroed read "DERIVED: a fine-tune of this base ... the large matrices keep 1 - cosine
    = 1.1e-16": the zero matrices have no cosine, so the pooled one came from the embeddings and head alone."""
    def zero_blocks(t):
        return {k: (np.zeros_like(v) if ".layers." in k and v.ndim == 2 else v) for k, v in t.items()}

    r = _llama_pair(tmp_path, zero_blocks)
    s = r.summary
    assert s.verdict == "derived" and "zeroed_matrices" in s.flags
    assert s.scope["matrices_zeroed"] == {"tuned": 28, "base": 0, "params": 4 * (4 * 64 * 64 + 3 * 64 * 128)}
    assert s.headline[0] == s.verdict_reason
    data = r.to_dict()
    from weightdiff.render.sentences import verdict_title

    title = verdict_title(data["summary"])
    assert title == "DERIVED: this base with most of its weights set to zero; none of its other weights changed."
    assert "28 matrices are all zero in the tuned model (set to zero: erased)" in s.verdict_reason
    assert "a zero matrix has no direction, so that cosine leaves them out" in s.verdict_reason
    assert "a fine-tune" not in title

    def zero_one_and_tune(t):       # beside a real fine-tune: the usual title, the zeroed matrix still said
        t["model.layers.1.mlp.down_proj.weight"][:] = 0
        t["model.layers.2.self_attn.q_proj.weight"] += 0.01
        return t

    r = _llama_pair(tmp_path / "2", zero_one_and_tune)
    assert verdict_title(r.to_dict()["summary"]) == \
        "DERIVED: a fine-tune of this base, with some of its matrices set to zero."
    assert "1 matrix is all zero in the tuned model" in r.summary.verdict_reason


def test_tensors_of_another_shape_are_never_counted_as_a_measured_fine_tune(tmp_path):
    """MLPs replaced by narrower ones (of an unrelated model) read "a fine-tune of this base ... relative
    change 0": the 12 reshaped tensors were never compared."""
    rng = np.random.default_rng(9)

    def narrow_mlps(t):
        for k in list(t):
            if ".mlp." in k:
                t[k] = rng.normal(0, 0.02, tuple(64 if d == 128 else d for d in t[k].shape)).astype(np.float32)
        return t

    r = _llama_pair(tmp_path, narrow_mlps)
    from weightdiff.render.sentences import verdict_title

    assert r.summary.verdict == "derived" and "shape_mismatch" in r.summary.flags
    assert r.summary.scope["tensors_reshaped"] == {"tensors": 12, "params_base": 12 * 64 * 128,
                                                   "params_tuned": 12 * 64 * 64}
    assert verdict_title(r.to_dict()["summary"]) == \
        "DERIVED: this base with some tensors of another shape (not compared); none of its other weights changed."
    # counted apart from the changed tensors (no number measured them), and so are their blocks
    assert "0 of 39 tensors changed (12 others are of another shape than in the base, 98,304 base parameters: not "\
           "compared" in r.summary.verdict_reason
    assert "in 0 of 4 blocks (4 others hold tensors of another shape than in the base, not compared)" in \
        r.summary.verdict_reason
    assert (r.summary.blocks_changed, r.summary.scope["blocks_reshaped"], r.summary.scope["tensors_changed"]) == (0, 4, 0)
    # the components (the memo's table) show the MLPs apart as reshaped, not inside "shared" blocks
    status = {c["component"]: c["status"] for c in r.summary.components}
    assert all(status[f"layers.{i} mlp"] == "reshaped" and status[f"layers.{i} attn"] == "shared" for i in range(4))


def test_a_narrower_student_is_inconclusive_for_the_reason_that_holds(tmp_path):
    """Every name pairs but every shape differs: the reason said "the names do not match ... --rename"."""
    from models import llama

    write_checkpoint(tmp_path / "b", llama(np.random.default_rng(1), layers=2, hidden=64, inter=128, vocab=256))
    write_checkpoint(tmp_path / "t", llama(np.random.default_rng(2), layers=2, hidden=32, inter=64, vocab=256))
    r = compare(tmp_path / "b", tmp_path / "t")
    assert r.summary.verdict == "inconclusive"
    assert "tensors pair by name with a base tensor of another shape (the models differ in width or size" in \
        r.summary.verdict_reason
    assert "--rename" not in r.summary.verdict_reason
    assert {c["status"] for c in r.summary.components} == {"reshaped"}


def test_mlps_of_an_unrelated_model_grafted_into_every_block_read_partial(tmp_path):
    """Each block's attention kept it "shared", so a graft of another model's MLPs (54% of the parameters)
    read "DERIVED: a fine-tune of this base" with 1 - cosine = 0.55."""
    from models import llama

    other = llama(np.random.default_rng(77), layers=4, hidden=64, inter=128, vocab=256)

    def graft(t):
        return {k: (other[k] if ".mlp." in k else v) for k, v in t.items()}

    r = _llama_pair(tmp_path, graft)
    s = r.summary
    assert s.verdict == "partial", s.verdict_reason
    status = {c["component"]: c["status"] for c in s.components}
    assert all(status[f"layers.{i} mlp"] == "unrelated" and status[f"layers.{i} attn"] == "shared" for i in range(4))
    assert status["embeddings"] == status["head"] == "shared" and "layers.0" not in status
    assert "Unrelated to it (near-orthogonal, as independent initialisations): layers.0 mlp" in s.verdict_reason

    def tune(t):                     # a fine-tune of every matrix keeps whole blocks, as before
        return {k: v + 0.05 * np.abs(v).mean() * np.random.default_rng(5).normal(size=v.shape).astype(np.float32)
                if v.ndim == 2 else v for k, v in t.items()}

    r = _llama_pair(tmp_path / "ft", tune)
    assert r.summary.verdict == "derived"
    assert [c["component"] for c in r.summary.components] == ["embeddings"] + [f"layers.{i}" for i in range(4)] + ["head"]


def test_components_of_a_model_with_layers_dropped_and_renumbered_name_the_base_blocks_gone(tmp_path):
    """Layers 2 and 5 of 8 dropped and the rest renumbered: the removed base blocks were merged into the
    tuned blocks of the same numbers, so the component list named no block as gone."""
    from models import llama

    base = llama(np.random.default_rng(4), layers=8, hidden=64, inter=128, vocab=256)
    keep = [0, 1, 3, 4, 6, 7]
    tuned = {k: v for k, v in base.items() if ".layers." not in k}
    for new, old in enumerate(keep):
        tuned.update({k.replace(f".layers.{old}.", f".layers.{new}."): v for k, v in base.items()
                      if f".layers.{old}." in k})
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    status = {c["component"]: c["status"] for c in s.components}
    assert {k for k, v in status.items() if v == "base_only"} == {"layers.2 (base)", "layers.5 (base)"}
    assert all(status[f"layers.{i}"] == "shared" for i in range(6)) and s.verdict == "derived"


def test_mlp_neurons_or_attention_heads_in_another_order_are_the_base_not_another_model(tmp_path):
    """Judging a block per module kind read a model whose MLP neurons (or attention heads) were put in
    another order, which computes exactly what the base computes, as PARTIAL, "MLPs unrelated, as
    independent initialisations"; the reordering is recognised and named instead."""
    from weightdiff.render.sentences import verdict_title

    order = np.random.default_rng(8).permutation(128)

    def shuffle_neurons(t):
        for i in range(4):
            p = f"model.layers.{i}.mlp."
            for k in ("gate_proj", "up_proj"):
                t[p + k + ".weight"] = t[p + k + ".weight"][order]
            t[p + "down_proj.weight"] = t[p + "down_proj.weight"][:, order]
        return t

    r = _llama_pair(tmp_path / "mlp", shuffle_neurons)
    s = r.summary
    assert s.verdict == "derived" and "permuted_units" in s.flags, s.verdict_reason
    # measured with the order undone (tests/test_reorder_undo.py): nothing changed beneath the reordering
    assert s.scope["permuted_units"] == {"blocks": {f"layers.{i}": ["mlp"] for i in range(4)}, "tensors_changed": 0,
                                         "undone": {f"layers.{i}": ["mlp"] for i in range(4)}, "tensors_undone": 12}
    assert verdict_title(r.to_dict()["summary"]) == ("DERIVED: this base with the neurons of some MLPs reordered; none "
                                                     "of its other weights changed.")
    assert "the MLP neurons of 4 blocks are the base's in another order" in s.verdict_reason
    assert [c["component"] for c in s.components] == ["embeddings"] + [f"layers.{i}" for i in range(4)] + ["head"]

    heads = np.arange(64).reshape(4, 16)[[1, 0, 3, 2]].reshape(-1)     # heads of 16 rows, swapped in pairs

    def swap_heads(t):
        p = "model.layers.1.self_attn."
        for k in ("q_proj", "k_proj", "v_proj"):
            t[p + k + ".weight"] = t[p + k + ".weight"][heads]
        t[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, heads]
        return t

    r = _llama_pair(tmp_path / "attn", swap_heads)
    s = r.summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == {"layers.1": ["attn"]}, s.verdict_reason
    assert "the attention heads of 1 block are the base's in another order (layers.1; a reordering alone" in \
        s.verdict_reason

    other = np.random.default_rng(66)

    def new_attention(t):          # re-initialised, not reordered: still another model's attention
        for k in list(t):
            if ".layers.1.self_attn." in k:
                t[k] = other.normal(0, 0.02, t[k].shape).astype(np.float32)
        return t

    r = _llama_pair(tmp_path / "new", new_attention)
    assert r.summary.verdict == "partial" and "permuted_units" not in r.summary.flags
    assert r.summary.scope["heads_checked"] == ["layers.1 attn"]      # looked for, not found: no hedge
    assert "in another order" not in r.summary.verdict_reason


def test_experts_of_a_moe_layer_in_another_order_are_the_base_not_another_model(tmp_path):
    """Experts reordered with their router rows compute what the base computes; each expert compared with
    another made whole blocks read "unrelated, as independent initialisations" (PARTIAL)."""
    from weightdiff.render.sentences import verdict_title

    rng = np.random.default_rng(12)
    base = {"model.embed_tokens.weight": rng.normal(0, 0.02, (256, 64)).astype(np.float32),
            "lm_head.weight": rng.normal(0, 0.02, (256, 64)).astype(np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[p + f"self_attn.{k}.weight"] = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
        base[p + "block_sparse_moe.gate.weight"] = rng.normal(0, 0.02, (4, 64)).astype(np.float32)
        for e in range(4):
            for k, shape in (("w1", (128, 64)), ("w3", (128, 64)), ("w2", (64, 128))):
                base[p + f"block_sparse_moe.experts.{e}.{k}.weight"] = rng.normal(0, 0.02, shape).astype(np.float32)
    order = [2, 3, 1, 0]                     # no expert keeps its place
    tuned = dict(base)
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe."
        tuned[p + "gate.weight"] = base[p + "gate.weight"][order]
        for new, old in enumerate(order):
            for k in ("w1", "w2", "w3"):
                tuned[p + f"experts.{new}.{k}.weight"] = base[p + f"experts.{old}.{k}.weight"]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    r = compare(tmp_path / "b", tmp_path / "t")
    s = r.summary
    assert s.verdict == "derived", s.verdict_reason
    assert s.scope["permuted_units"]["blocks"] == {"layers.0": ["experts"], "layers.1": ["experts"]}
    assert verdict_title(r.to_dict()["summary"]) == (
        "DERIVED: this base with the experts of some mixture-of-experts layers reordered; none of its other weights "
        "changed.")
    assert {c["status"] for c in s.components} == {"shared"}


def test_a_reordering_is_named_only_where_every_member_is_the_bases(tmp_path):
    """Heads and MLP neurons both reordered in one block read it "unrelated" whole (PARTIAL); and a
    reordering must not hide new weights beside it: queries reordered with new keys and values, or gate and
    up reordered with a new down projection, were called "the base's in another order"."""
    heads = np.arange(64).reshape(4, 16)[[2, 3, 0, 1]].reshape(-1)
    neurons = np.random.default_rng(21).permutation(128)
    rng = np.random.default_rng(22)

    def both(t):
        p = "model.layers.1."
        for k in ("q_proj", "k_proj", "v_proj"):
            t[p + f"self_attn.{k}.weight"] = t[p + f"self_attn.{k}.weight"][heads]
        t[p + "self_attn.o_proj.weight"] = t[p + "self_attn.o_proj.weight"][:, heads]
        for k in ("gate_proj", "up_proj"):
            t[p + f"mlp.{k}.weight"] = t[p + f"mlp.{k}.weight"][neurons]
        t[p + "mlp.down_proj.weight"] = t[p + "mlp.down_proj.weight"][:, neurons]
        return t

    s = _llama_pair(tmp_path / "both", both).summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == {"layers.1": ["attn", "mlp"]}, \
        s.verdict_reason

    def new_kv(t):
        p = "model.layers.1.self_attn."
        t[p + "q_proj.weight"] = t[p + "q_proj.weight"][heads]
        t[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, heads]
        for k in ("k_proj", "v_proj"):
            t[p + f"{k}.weight"] = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
        return t

    s = _llama_pair(tmp_path / "kv", new_kv).summary
    assert s.verdict == "partial" and "permuted_units" not in s.flags, s.verdict_reason

    def new_down(t):
        p = "model.layers.1.mlp."
        for k in ("gate_proj", "up_proj"):
            t[p + f"{k}.weight"] = t[p + f"{k}.weight"][neurons]
        t[p + "down_proj.weight"] = rng.normal(0, 0.02, (64, 128)).astype(np.float32)
        return t

    s = _llama_pair(tmp_path / "down", new_down).summary
    assert "permuted_units" not in s.flags, s.verdict_reason


def _fuse(t: dict, layout: str, d: int = 16) -> dict:
    """A llama state dict in a fused layout: ``phi3`` (qkv_proj = [q; k; v], gate_up_proj = [gate; up]) or
    ``neox`` (query_key_value grouped by key/value head: each group's queries, then its k and v rows)."""
    out = {}
    for k, v in t.items():
        m = re.match(r"(model\.layers\.\d+\.)self_attn\.q_proj\.weight$", k)
        if m:
            p = m.group(1) + "self_attn."
            q, kk, vv = t[p + "q_proj.weight"], t[p + "k_proj.weight"], t[p + "v_proj.weight"]
            if layout == "phi3":
                out[p + "qkv_proj.weight"] = np.concatenate([q, kk, vv])
            else:
                kv = kk.shape[0] // d
                g = q.shape[0] // d // kv
                parts = [np.concatenate([q.reshape(kv, g * d, -1)[i], kk.reshape(kv, d, -1)[i],
                                         vv.reshape(kv, d, -1)[i]]) for i in range(kv)]
                out[p + "qkv_proj.weight"] = np.concatenate(parts)
        elif re.search(r"self_attn\.[kv]_proj|mlp\.up_proj", k):
            continue
        elif k.endswith("mlp.gate_proj.weight"):
            out[k.replace("gate_proj", "gate_up_proj")] = np.concatenate([v, t[k.replace("gate_proj", "up_proj")]])
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("layout,kv", [("phi3", None), ("phi3", 32), ("neox", None), ("neox", 32)])
def test_heads_and_neurons_reordered_inside_fused_projections_are_the_base(tmp_path, layout, kv):
    """A fused qkv (Phi-3's stacked [q; k; v], with grouped-query k/v too; the per-group layout of GPT-NeoX
    and Falcon) with its heads reordered read PARTIAL, "attention unrelated, as independent
    initialisations", hedged only by "weightdiff could not check there"; a fused gate_up with
    its neurons reordered read the same for the MLPs. Both are the base computing the same function."""
    from models import llama

    d, h = 16, 4
    base = llama(np.random.default_rng(31), layers=3, hidden=64, inter=128, vocab=256, kv=kv)
    tuned = {k: v.copy() for k, v in base.items()}
    heads = np.arange(4)[[2, 0, 3, 1]]
    kvh = (kv or 64) // d
    neurons = np.random.default_rng(32).permutation(128)
    p = "model.layers.1."
    rows = (heads[:, None] * d + np.arange(d)).ravel()
    tuned[p + "self_attn.q_proj.weight"] = base[p + "self_attn.q_proj.weight"][rows]
    tuned[p + "self_attn.o_proj.weight"] = base[p + "self_attn.o_proj.weight"][:, rows]
    if kvh == h:                        # one key/value head per query head: they move together
        for k in ("k_proj", "v_proj"):
            tuned[p + f"self_attn.{k}.weight"] = base[p + f"self_attn.{k}.weight"][rows]
    else:                               # two query heads per key/value head: swap within each group
        heads = np.array([1, 0, 3, 2])
        rows = (heads[:, None] * d + np.arange(d)).ravel()
        tuned[p + "self_attn.q_proj.weight"] = base[p + "self_attn.q_proj.weight"][rows]
        tuned[p + "self_attn.o_proj.weight"] = base[p + "self_attn.o_proj.weight"][:, rows]
    q = "model.layers.2.mlp."
    for k in ("gate_proj", "up_proj"):
        tuned[q + f"{k}.weight"] = base[q + f"{k}.weight"][neurons]
    tuned[q + "down_proj.weight"] = base[q + "down_proj.weight"][:, neurons]
    write_checkpoint(tmp_path / "b", _fuse(base, layout, d))
    write_checkpoint(tmp_path / "t", _fuse(tuned, layout, d))
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "derived" and "permuted_units" in s.flags, s.verdict_reason
    # queries swapped within their key/value group leave k and v as they were: the block reads shared, and
    # is looked at because q and o moved with their norms kept exactly
    assert s.scope["permuted_units"]["blocks"] == {"layers.1": ["attn"], "layers.2": ["mlp"]}
    assert "could not check" not in s.verdict_reason

    # new queries beside the base's keys and values, reordered or not, are not the base's heads
    other = np.random.default_rng(33)
    tuned[p + "self_attn.q_proj.weight"] = other.normal(0, 0.02, (64, 64)).astype(np.float32)
    tuned[q + "gate_proj.weight"] = other.normal(0, 0.02, (128, 64)).astype(np.float32)   # a new gate half
    write_checkpoint(tmp_path / "t2", _fuse(tuned, layout, d))
    s = compare(tmp_path / "b", tmp_path / "t2").summary
    assert "permuted_units" not in s.flags and s.verdict != "derived", s.verdict_reason
    assert "could not check" not in s.verdict_reason
    if kvh == h:                       # (with grouped k/v the new queries are a third of the qkv: not suspect)
        assert "layers.1 attn" in s.scope["heads_checked"]


def test_heads_reordered_in_gpt2_conv1d_attention_are_the_base(tmp_path):
    """GPT-2 stores c_attn as [hidden, 3 x hidden] (Conv1D: inputs first): the heads are columns of each
    third, and c_proj's rows. Heads reordered there read as an unrelated attention, hedged as unchecked."""
    from models import gpt2

    base = gpt2(np.random.default_rng(41), layers=3, hidden=64)
    tuned = {k: v.copy() for k, v in base.items()}
    cols = (np.array([2, 3, 1, 0])[:, None] * 16 + np.arange(16)).ravel()     # four heads of 16, all moved
    p = "transformer.h.1.attn."
    w, b = base[p + "c_attn.weight"], base[p + "c_attn.bias"]
    tuned[p + "c_attn.weight"] = np.concatenate([w[:, i * 64:(i + 1) * 64][:, cols] for i in range(3)], axis=1)
    tuned[p + "c_attn.bias"] = np.concatenate([b[i * 64:(i + 1) * 64][cols] for i in range(3)])
    tuned[p + "c_proj.weight"] = base[p + "c_proj.weight"][cols]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == {"h.1": ["attn"]}, s.verdict_reason


@pytest.mark.parametrize("rel", [0.05, 1.0])
def test_a_rank_8_change_of_grouped_query_projections_is_low_rank(tmp_path, rel):
    """A rank-8 LoRA merged into every linear of a model with 64 x 128 key/value projections (grouped-query
    attention): "a tenth of the shorter side" (6.4) called k and v dense, the form "mixed (88.9% low-rank,
    11.1% dense)", and with a strong update the reason offered "a merge with another model ... or two models
    trained apart", which a rank-8 change everywhere rules out. Rank-8 factors of a 64 x 128 matrix take 1,536
    of its 8,192 parameters: low-rank by the rule's own saving (a fifth of the parameters at most)."""
    from models import llama, low_rank_update

    rng = np.random.default_rng(71)
    base = llama(rng, layers=2, hidden=128, inter=256, vocab=256, kv=64)
    tuned = {k: low_rank_update(rng, w, 8, rel) if w.ndim == 2 and ("self_attn" in k or "mlp" in k) else w
             for k, w in base.items()}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = d["summary"]
    ranks = {t["name"]: t["rank"]["numerical_rank"] for t in d["tensors"] if t["status"] == "changed"}
    assert len(ranks) == 14 and set(ranks.values()) == {8}, ranks
    assert any(t["shape"] == [64, 128] for t in d["tensors"] if t["name"] in ranks)
    assert s["form"]["kind"] == "low_rank", s["form"]
    assert s["verdict"] == "derived"
    if rel > 0.5:
        assert "far_from_base" in s["flags"]
        assert "not a merge or a model trained apart" in s["verdict_reason"]
        assert "a merge with another model, long further training" not in s["verdict_reason"]


@pytest.mark.parametrize("w", [0.0, 0.15])
def test_a_component_with_a_faint_trace_is_not_called_unrelated(tmp_path, w):
    """Attention that is w x this base + (1 - w) x an independent model's, the rest the base's. At w = 0.15 its
    cosine is about 0.18, a hundred times an independent model's: it read PARTIAL, "Unrelated to it
    (near-orthogonal, as independent initialisations)", and the memo "those parts were not made from the base",
    where the same mix applied to every matrix reads INCONCLUSIVE (a faint trace). At w = 0 it is unrelated."""
    from models import llama
    from weightdiff.render.sentences import plain_language

    shape = dict(layers=2, hidden=64, inter=128, vocab=256)
    base, other = llama(np.random.default_rng(61), **shape), llama(np.random.default_rng(62), **shape)
    tuned = {k: ((w * base[k] + (1 - w) * other[k]) if "self_attn" in k else base[k]).astype(np.float32)
             for k in base}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = d["summary"]
    attn = {c["component"]: c for c in s["components"] if c["component"].endswith(" attn")}
    assert set(attn) == {"layers.0 attn", "layers.1 attn"}
    plain = " ".join(plain_language(d))
    if w:
        assert all(c["status"] == "faint" and 0.1 < c["cosine"] < 0.2 for c in attn.values()), attn
        assert s["verdict"] == "derived", s["verdict_reason"]
        assert "2 modules (layers.0 attn to layers.1 attn) keep only a faint trace of this base" in s["verdict_reason"]
        assert "keep only a faint trace" in plain and "not made from the base" not in plain
        text = render_text(d)
        assert "faint trace: layers.0 attn, layers.1 attn" in text and "unrelated:" not in text
    else:
        assert all(c["status"] == "unrelated" and abs(c["cosine"]) < 0.05 for c in attn.values()), attn
        assert s["verdict"] == "partial" and "faint" not in s["verdict_reason"]
        assert "were not made from the base" in plain


@pytest.mark.parametrize("w,verdict", [(0.0, "unrelated"), (0.1, "inconclusive"), (0.15, "inconclusive")])
def test_a_faint_trace_of_the_base_is_not_called_unrelated(tmp_path, w, verdict):
    """A model that is w x this base + (1 - w) x an independent one keeps a size-weighted cosine of about
    w / sqrt(w^2 + (1 - w)^2): 0.11 at w = 0.1, a hundred times an independent model's. It read
    "UNRELATED: not derived from this base ... as between independently initialised models"."""
    from models import llama
    from weightdiff.render.sentences import verdict_reason, verdict_title

    shape = dict(layers=4, hidden=64, inter=128, vocab=256)
    base, other = llama(np.random.default_rng(51), **shape), llama(np.random.default_rng(52), **shape)
    tuned = {k: (w * base[k] + (1 - w) * other[k]).astype(np.float32) for k in base}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    r = compare(tmp_path / "b", tmp_path / "t")
    s, d = r.summary, r.to_dict()
    assert s.verdict == verdict, s.verdict_reason
    assert ("faint_relatedness" in s.flags) == (verdict == "inconclusive")
    if verdict == "inconclusive":
        assert s.relatedness_cosine == pytest.approx(w / math.hypot(w, 1 - w), abs=0.02)
        assert verdict_title(d["summary"]).startswith("INCONCLUSIVE: the large matrices keep a faint trace of this base")
        assert "not orthogonal to it" in verdict_reason(d) and "below 0.05" in verdict_reason(d)
        # the terminal's component line must not say "unrelated:" (nor "near-orthogonal") under an inconclusive
        # verdict: each component keeps the same faint trace the whole model does
        from weightdiff.render.terminal import render_text
        text = render_text(d)
        assert "faint trace: embeddings" in text and "unrelated: embeddings" not in text
        assert "near-orthogonal: embeddings" not in text
        assert {c["status"] for c in d["summary"]["components"]} == {"faint"}
    else:
        assert abs(s.relatedness_cosine) < 0.01


@pytest.mark.parametrize("how", ["merge", "noise"])
def test_a_change_far_beyond_a_fine_tune_is_derived_but_not_called_a_fine_tune(tmp_path, how):
    """A 50/50 merge with an unrelated model (cosine 0.71) and the base plus noise as large as itself read
    "DERIVED: a fine-tune of this base", as a tiny edit does."""
    from models import llama
    from weightdiff.render.sentences import verdict_reason, verdict_title

    shape = dict(layers=4, hidden=64, inter=128, vocab=256)
    base, other = llama(np.random.default_rng(61), **shape), llama(np.random.default_rng(62), **shape)
    noise = np.random.default_rng(63)
    tuned = {k: ((base[k] + other[k]) / 2 if how == "merge" else
                 base[k] + noise.normal(0, float(base[k].std()) or 0.01, base[k].shape)).astype(np.float32) for k in base}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = d["summary"]
    assert s["verdict"] == "derived" and "far_from_base" in s["flags"], s["verdict_reason"]
    assert verdict_title(s).startswith("DERIVED: built on this base, but changed far more than a fine-tune changes it")
    assert "far more than fine-tunes move" in verdict_reason(d)

    small = {k: (v + noise.normal(0, 1e-3 * (float(v.std()) or 1), v.shape)).astype(np.float32) for k, v in base.items()}
    write_checkpoint(tmp_path / "s", small)
    s = compare(tmp_path / "b", tmp_path / "s").to_dict()["summary"]
    assert s["verdict"] == "derived" and "far_from_base" not in s["flags"]
    assert verdict_title(s) == "DERIVED: a fine-tune of this base."


@pytest.mark.parametrize("how", ["remapped", "trimmed", "remapped_trained", "new"])
def test_token_rows_remapped_or_trimmed_are_the_base_not_another_model(tmp_path, how):
    """Embedding and head rows that are the base's rows in another order (a tokenizer's ids remapped) or a
    subset of them (a vocabulary trimmed) read PARTIAL, "embeddings, head unrelated, as independent
    initialisations", though every row is a base row. New tables stay unrelated."""
    from models import llama
    from weightdiff.render.sentences import verdict_title

    base = llama(np.random.default_rng(71), layers=3, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    rng = np.random.default_rng(72)
    idx = np.sort(rng.choice(256, 160, replace=False)) if how == "trimmed" else rng.permutation(256)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tuned[k] = base[k][idx]
        if how == "remapped_trained":
            tuned[k] = (tuned[k] + rng.normal(0, 0.004, tuned[k].shape)).astype(np.float32)
        if how == "new":
            tuned[k] = rng.normal(0, 0.02, base[k].shape).astype(np.float32)
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = d["summary"]
    if how == "new":
        assert s["verdict"] == "partial" and "permuted_units" not in s["flags"], s["verdict_reason"]
        return
    assert s["verdict"] == "derived", s["verdict_reason"]
    assert s["scope"]["permuted_units"]["blocks"] == {"embeddings": ["rows"], "head": ["rows"]}
    assert {c["status"] for c in s["components"]} == {"shared"}
    assert "the token rows of the embeddings and head are the base's rows in another order" in s["verdict_reason"]
    title = verdict_title(s)
    if how == "trimmed":           # every row bitwise a base row: compared with the rows they are
        assert s["scope"]["permuted_units"]["tensors_trimmed"] == 2
        assert title == ("DERIVED: this base with the token rows of its embeddings and head reordered or trimmed; "
                         "none of its other weights changed.")
    elif how == "remapped":
        assert title == ("DERIVED: this base with the token rows of its embeddings and head reordered; none of its "
                         "other weights changed.")
    else:                          # trained after the remap: every row matched by cosine, compared with its base row
        assert s["scope"]["permuted_units"]["undone"] == {"embeddings": ["rows"], "head": ["rows"]}
        assert title == "DERIVED: a fine-tune of this base, with the token rows of its embeddings and head reordered."


@pytest.mark.parametrize("how", ["rows_added", "rows_removed", "head_tied"])
def test_no_training_is_not_titled_a_fine_tune(tmp_path, how):
    """Token rows appended or cut, or an output head replaced by the tied embedding, with every other weight
    bitwise the base's, were titled "DERIVED: a fine-tune of this base" (the re-tied head even beside "0 of
    56 tensors changed, relative change 0"), where a block appended reads "none of its own weights changed"."""
    from models import llama
    from weightdiff.render.sentences import verdict_title

    base = llama(np.random.default_rng(81), layers=3, hidden=64, inter=128, vocab=256)
    tuned = dict(base)
    if how == "rows_added":
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            tuned[k] = np.concatenate([base[k], np.random.default_rng(82).normal(0, 0.02, (32, 64)).astype(np.float32)])
    elif how == "rows_removed":
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            tuned[k] = base[k][:224]
    else:
        del tuned["lm_head.weight"]
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").to_dict()["summary"]
    assert s["verdict"] == "derived", s["verdict_reason"]
    want = ("DERIVED: this base with its output head tied to its input embeddings on one side only (there the head's "
            "weights are the embedding's); none of its other weights changed.") if how == "head_tied" else \
        "DERIVED: this base with its vocabulary resized (token rows added or removed); none of its own weights changed."
    assert verdict_title(s) == want
    if how == "head_tied":
        # the counts leave the tied head row out: the reason and the bitwise share must say it differs
        assert "not counting the tuned model's effective head" in s["verdict_reason"], s["verdict_reason"]
        assert any("not counting the effective head, which differs" in h for h in s["headline"]), s["headline"]
    # one trained weight besides: a fine-tune again
    tuned["model.layers.1.mlp.up_proj.weight"] = (tuned["model.layers.1.mlp.up_proj.weight"] * 1.01).astype(np.float32)
    write_checkpoint(tmp_path / "t2", tuned)
    s = compare(tmp_path / "b", tmp_path / "t2").to_dict()["summary"]
    assert verdict_title(s) == "DERIVED: a fine-tune of this base."


def test_query_heads_reordered_within_their_group_are_found_by_their_kept_norms(tmp_path):
    """Grouped-query attention: query heads swapped within their key/value group (o following) compute what
    the base computes, but k and v are unchanged, so the block reads shared and was never checked: "DERIVED:
    a fine-tune", dense at full rank. A permutation keeps each matrix's norm exactly, which training never
    does; such matrices are checked. A real fine-tune's norms move, and nothing is read again for it."""
    rows = (np.array([1, 0, 3, 2, 5, 4, 7, 6])[:, None] * 16 + np.arange(16)).ravel()   # 8 query heads, 4 k/v
    p = "model.layers.2.self_attn."

    def swap(t):
        t[p + "q_proj.weight"] = t[p + "q_proj.weight"][rows]
        t[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, rows]
        return t

    shape = dict(layers=3, hidden=128, inter=256, vocab=256, kv=64)     # k and v large matrices too
    s = _llama_pair(tmp_path / "gqa", swap, **shape).summary
    assert s.verdict == "derived" and s.scope["permuted_units"]["blocks"] == {"layers.2": ["attn"]}, s.verdict_reason
    noise = np.random.default_rng(92)
    s = _llama_pair(tmp_path / "ft", lambda t: {k: (v + noise.normal(0, 1e-3, v.shape)).astype(np.float32)
                                                for k, v in t.items()}, **shape).summary
    assert "permuted_units" not in s.flags and "heads_checked" not in s.scope


def _torch_roundtrip(w: np.ndarray, bits: int, group: int | None, sym: bool, dtype) -> np.ndarray:
    """An independent round trip (torch, as a quantize-then-dequantize script writes it), stored in ``dtype``."""
    import torch

    x = torch.from_numpy(w.astype(np.float32)).reshape(-1, group or w.shape[1])
    if sym:
        s = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        dq = torch.round(x / s) * s
    else:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        s = (hi - lo) / (2 ** bits - 1)
        z = torch.round(-lo / s)
        dq = (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s
    return dq.reshape(w.shape).to(dtype).float().numpy()


@pytest.mark.parametrize("bits,group,sym,dtype,base_dtype", [
    (8, None, True, "BF16", None), (8, None, True, "F16", None), (4, 32, False, "BF16", None),
    (4, 128, True, "BF16", None), (8, None, True, "BF16", "BF16"), (4, 32, False, "BF16", "BF16")])
def test_a_quantize_dequantize_round_trip_stored_in_16_bits_is_quantization_not_a_fine_tune(
        tmp_path, bits, group, sym, dtype, base_dtype):
    """A base quantized to nearest (int8 per row, as LLM.int8; int4 in groups) and dequantized back to bf16 or
    fp16 read "DERIVED: a fine-tune", dense: the 16-bit rounding blurs the grid the export test looks for. The
    base's own round trip is tested instead; a fine-tune stored the same way still reads derived."""
    import torch

    from models import llama

    tdt = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels.dtypes import decode

    base = llama(np.random.default_rng(95), layers=2, hidden=128, inter=256, vocab=256)
    if base_dtype:                      # a bf16 base: its values as stored, quantized from those
        base = {k: decode(to_storage(v, base_dtype), base_dtype).astype(np.float32) for k, v in base.items()}
    tuned = {k: (_torch_roundtrip(v, bits, group, sym, tdt) if v.ndim == 2 else v) for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base, dtype=base_dtype)
    write_checkpoint(tmp_path / "t", tuned, dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "quantized_only", s.verdict_reason
    noise = np.random.default_rng(96)
    ft = {k: (v + noise.normal(0, 2e-3, v.shape)).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "f", ft, dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "f").summary
    assert s.verdict == "derived" and s.tensors_by_status.get("quantized", 0) == 0, s.verdict_reason


def test_a_dense_model_fused_on_one_side_is_not_explained_by_mixture_of_experts(tmp_path):
    """The relayout reason (same parameters added and removed in every block) always cited transformers 5's
    fused experts, also for a dense model whose qkv and gate_up are fused on one side only."""
    from models import llama
    from weightdiff.render.sentences import verdict_reason

    base = llama(np.random.default_rng(97), layers=2, hidden=64, inter=128, vocab=256)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", _fuse(base, "phi3"))
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    assert d["summary"]["verdict"] == "inconclusive" and "relayout" in d["summary"]["flags"]
    text = verdict_reason(d)
    assert "one qkv or gate_up projection on one side, its parts on the other" in text and "expert" not in text


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 64, True)])
def test_a_fine_tune_of_a_base_already_on_a_grid_is_not_a_round_trip(tmp_path, bits, group, sym):
    """A base whose weights already sit on a round-to-nearest grid (quantization-aware training, a dequantized
    release in bf16) comes back as itself from the round trip, so a copy with 0.4% of its elements edited
    "matched" it and read QUANTIZED ONLY. The round trip must move the base to be evidence."""
    import torch

    from models import llama

    raw = llama(np.random.default_rng(98), layers=2, hidden=128, inter=256, vocab=256)
    base = {k: (_torch_roundtrip(v, bits, group, sym, torch.bfloat16) if v.ndim == 2 else v) for k, v in raw.items()}
    rng = np.random.default_rng(99)
    tuned = {}
    for k, v in base.items():
        t = v.copy()
        if v.ndim == 2:
            flat = t.reshape(-1)
            idx = rng.choice(flat.size, max(1, flat.size // 250), replace=False)
            step = float(np.abs(v).max()) / (2 ** (bits - 1) - 1)
            flat[idx] += (rng.choice([-0.3, 0.3], idx.size) * step).astype(np.float32)   # under half a step
        tuned[k] = t
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", tuned, dtype="BF16")
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "derived" and s.tensors_by_status.get("quantized", 0) == 0, s.verdict_reason


@pytest.mark.parametrize("kind,dtype", [("Q8_0", "F16"), ("Q8_0", "BF16"), ("Q4_0", "F16"), ("Q5_0", "BF16"),
                                        ("Q4_1", "F16"), ("Q5_1", "BF16")])
def test_a_gguf_dequantized_back_to_16_bits_is_quantization_not_a_fine_tune(tmp_path, kind, dtype):
    """A bf16 base converted to a GGUF (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1: blocks of 32 with fp16 scales, no
    search) and dequantized back to fp16 or bf16 (a "dequantized from GGUF" release) read "DERIVED: a
    fine-tune of this base", dense. The base's own GGUF round trip (by the gguf package's own quantizer
    here) is tested; a fine-tune then converted the same way still reads derived."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    from models import llama
    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels.dtypes import decode

    t = getattr(gguf.GGMLQuantizationType, kind)
    raw = llama(np.random.default_rng(101), layers=2, hidden=128, inter=256, vocab=256)
    base = {k: decode(to_storage(v, "BF16"), "BF16").astype(np.float32) for k, v in raw.items()}

    def gguf_trip(m):
        return {k: quants.dequantize(quants.quantize(v, t), t).reshape(v.shape).astype(np.float32) if v.ndim == 2
                else v for k, v in m.items()}

    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", gguf_trip(base), dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "quantized_only", s.verdict_reason
    noise = np.random.default_rng(102)
    ft = {k: (v + noise.normal(0, 2e-3, v.shape)).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "f", gguf_trip(ft), dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "f").summary
    assert s.verdict == "derived" and s.tensors_by_status.get("quantized", 0) == 0, s.verdict_reason


@pytest.mark.parametrize("kind,dtype", [("Q4_K", "F16"), ("Q4_K", "BF16"), ("Q5_K", "F16"), ("Q6_K", "F16")])
def test_a_kquant_gguf_dequantized_back_to_16_bits_is_quantization_not_a_fine_tune(tmp_path, kind, dtype):
    """A bf16 base quantized by llama.cpp's K-quant encoders (no importance matrix) and dequantized back read "a
    fine-tune". The base's own round trip is tested, the match counted per block of 256 so that the 1-2% of
    blocks a build with fused multiply-adds quantizes otherwise do not hide it (simulated here: 3% of the blocks
    quantized from values moved by 1e-6, another legitimate quantization of the same weights)."""
    from models import llama
    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels import ggml_encode
    from weightdiff.kernels.dtypes import decode

    raw = llama(np.random.default_rng(103), layers=2, hidden=256, inter=512, vocab=256)
    base = {k: decode(to_storage(v, "BF16"), "BF16").astype(np.float32) for k, v in raw.items()}
    other = np.random.default_rng(104)

    def gguf_trip(m):
        out = {}
        for k, v in m.items():
            if v.ndim != 2:
                out[k] = v
                continue
            blocks = v.reshape(-1, 256)
            dq = ggml_encode.round_trip(blocks, kind)[0]
            redo = other.random(len(blocks)) < 0.03
            dq[redo] = ggml_encode.round_trip(blocks[redo] * np.float32(1 + 1e-6), kind)[0]
            out[k] = dq.reshape(v.shape)
        return out

    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "t", gguf_trip(base), dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "quantized_only", s.verdict_reason
    noise = np.random.default_rng(105)
    ft = {k: (v + noise.normal(0, 2e-3, v.shape)).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "f", gguf_trip(ft), dtype=dtype)
    s = compare(tmp_path / "b", tmp_path / "f").summary
    assert s.verdict == "derived" and s.tensors_by_status.get("quantized", 0) == 0, s.verdict_reason


def test_vectors_alone_never_decide_derived_or_unrelated(tmp_path):
    """`--include '*norm*'` left only norm vectors: an independently drawn model read "DERIVED: a fine-tune of
    this base" (norm weights near 1 on both sides), with nothing in the reason. Vectors alone are inconclusive;
    bitwise equal ones still read identical."""
    from models import llama
    from weightdiff.render.sentences import verdict_title

    shape = dict(layers=2, hidden=64, inter=128, vocab=256)
    base, other = llama(np.random.default_rng(111), **shape), llama(np.random.default_rng(112), **shape)
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", other)
    assert compare(tmp_path / "b", tmp_path / "t").summary.verdict == "unrelated"
    d = compare(tmp_path / "b", tmp_path / "t", include=["*norm*"]).to_dict()
    s = d["summary"]
    assert s["verdict"] == "inconclusive" and "vectors_only" in s["flags"], s["verdict_reason"]
    assert verdict_title(s).startswith("INCONCLUSIVE: only vectors were compared")
    assert s["verdict_reason"].startswith("Only vectors were compared")
    write_checkpoint(tmp_path / "same", base)
    assert compare(tmp_path / "b", tmp_path / "same", include=["*norm*"]).summary.verdict == "identical"


def test_bounds_stay_bounds_in_the_survey_the_lineage_and_the_population_paragraph(tmp_path):
    """A partial spectrum makes `delta_params` an upper bound and the largest numerical rank a bracket. The survey
    CSV wrote both bare (and lost the bracket: it read a `form.bounds` key compare never writes), the lineage JSON
    and CSV wrote `delta_params` bare, and the population paragraph printed the share with no ≤."""
    from weightdiff.lineage import lineage
    from weightdiff.render.population import population_sentences
    from weightdiff.render.tabular import lineage_csv
    from weightdiff.survey import row_from_result

    rng = np.random.default_rng(0)
    base = {f"layers.{i}.w.weight": rng.normal(size=(96, 80)).astype(np.float32) for i in range(2)}
    tuned = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    b, t = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)
    d = compare(b, t, rank_k=8, exact_svd_max=16).to_dict()
    s = d["summary"]
    lo, hi = s["form"]["max_numerical_rank_bounds"]
    assert s["delta_params_lower"] is not None and s["delta_params_lower"] < s["delta_params"]
    row = row_from_result(d, {"path": str(t), "files": []}, {"path": str(b), "files": []}, "k")
    assert (row["max_numerical_rank"], row["max_numerical_rank_bound"], row["max_numerical_rank_upper"]) == \
        (lo, "lower", hi)
    assert row["delta_params_lower"] == s["delta_params_lower"]
    chain = lineage([b, t], rank_k=8, exact_svd_max=16).to_dict()
    step = chain["steps"][0]
    assert step["delta_params_lower"] == s["delta_params_lower"]
    head, first = list(csv.reader(io.StringIO(lineage_csv(chain))))[:2]
    assert first[head.index("delta_params_lower")] == str(s["delta_params_lower"])
    others = [dict(row, tuned=f"other{i}", verdict="derived", delta_params_share=x) for i, x in enumerate((0.1, 0.9))]
    text = " ".join(population_sentences(d, others))
    assert "delta parameters (between " in text, text       # a bracket is shown as the range it is


def test_a_dense_change_at_the_rounding_noise_is_not_called_low_rank(tmp_path):
    """A few small full fine-tune steps stored in fp32 over a bf16 base (every element moved by about the bf16
    rounding): the few singular values above the modelled noise hold little of the change, yet the form read
    "low_rank (largest numerical rank 1)", "the kind LoRA leaves". It is undecided; a LoRA update of the same
    size class stored the same way still reads low-rank."""
    from models import llama
    from weightdiff.io.safetensors_write import to_storage
    from weightdiff.kernels.dtypes import decode

    raw = llama(np.random.default_rng(121), layers=2, hidden=128, inter=256, vocab=256)
    base = {k: decode(to_storage(v, "BF16"), "BF16").astype(np.float32) for k, v in raw.items()}
    rng = np.random.default_rng(122)
    dense = {k: (v + rng.normal(0, 3e-5, v.shape)).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    lora = {k: (v + 2e-2 * float(v.std()) * (rng.normal(size=(v.shape[0], 4)) @ rng.normal(size=(4, v.shape[1])))
                / 2.0).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base, dtype="BF16")
    write_checkpoint(tmp_path / "d", dense, dtype="F32")
    write_checkpoint(tmp_path / "l", lora, dtype="F32")
    s = compare(tmp_path / "b", tmp_path / "d").summary
    assert s.verdict == "derived" and s.form["kind"] != "low_rank", s.form
    assert "low-rank:" not in " ".join(s.headline)
    s = compare(tmp_path / "b", tmp_path / "l").summary
    assert s.form["kind"] == "low_rank" and s.form["max_numerical_rank"] == 4, s.form


def test_two_roundings_of_one_original_are_not_called_a_cast_of_the_base(tmp_path):
    """A bf16 base and an fp16 copy of the same fp32 weights read "CAST ONLY ... (BF16 -> F16)": a cast from BF16
    to F16 is exact, so a differing fp16 value cannot be one. Both are roundings of the same weights."""
    from models import llama

    w = llama(np.random.default_rng(131), layers=2, hidden=64, inter=128, vocab=256)
    write_checkpoint(tmp_path / "b", w, dtype="BF16")
    write_checkpoint(tmp_path / "t", w, dtype="F16")
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert s.verdict == "cast_only", s.verdict_reason
    assert "BF16 and F16 roundings of the same weights" in s.verdict_reason and "BF16 -> F16" not in s.verdict_reason
    write_checkpoint(tmp_path / "t32", w, dtype="F32")
    write_checkpoint(tmp_path / "t16", w, dtype="BF16")
    s = compare(tmp_path / "t32", tmp_path / "t16").summary
    assert "F32 -> BF16" in s.verdict_reason, s.verdict_reason


def test_a_large_low_rank_change_is_not_offered_a_merge_as_its_cause(tmp_path):
    """A rank-4 update as large as the weights reads far from the base; its reason offered "a merge with another
    model", which would change every direction, not four."""
    from models import llama

    base = llama(np.random.default_rng(141), layers=2, hidden=128, inter=256, vocab=256)
    rng = np.random.default_rng(142)
    tuned = {k: (v + 3 * float(v.std()) * (rng.normal(size=(v.shape[0], 4)) @ rng.normal(size=(4, v.shape[1]))) / 2
                 ).astype(np.float32) if v.ndim == 2 else v for k, v in base.items()}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    s = compare(tmp_path / "b", tmp_path / "t").summary
    assert "far_from_base" in s.flags and s.form["kind"] == "low_rank", (s.flags, s.form["kind"])
    assert "a merge with another model" not in s.verdict_reason and "yet the change is low-rank" in s.verdict_reason


def _roundtrip_pair(tmp_path, train_after: float = 0.0):
    """A tiny Llama and the same model after peft's merge_adapter + unmerge_adapter of a trained LoRA: the
    weights come back with float32 round-off (relative change ~1e-8), as the tester found."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)         # a trained adapter's size: BA about 1e-2 of W
    pm.merge_adapter()
    pm.unmerge_adapter()
    plain = pm.unload()
    if train_after:
        with torch.no_grad():
            w = plain.model.layers[1].self_attn.o_proj.weight
            w += train_after * torch.randn(w.shape[0], 1) @ torch.randn(1, w.shape[1])
    plain.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_float32_round_off_of_a_merge_and_unmerge_is_not_called_a_fine_tune(tmp_path):
    base, tuned = _roundtrip_pair(tmp_path)
    r = compare(str(base), str(tuned))
    s = r.summary
    assert s.verdict == "derived" and "rounding_level" in s.flags, (s.verdict, s.flags)
    assert s.tensors_by_status["changed"] >= 1 and s.relative_change < 1e-6
    text = render_text(json.loads(r.to_json()))
    assert "changed only at the level of floating-point rounding" in text and "a fine-tune" not in text
    assert "the weights alone do not show whether the model was trained further" in s.verdict_reason
    assert "far smaller than training" not in s.verdict_reason


def test_a_real_change_beside_round_off_keeps_the_fine_tune_title(tmp_path):
    base, tuned = _roundtrip_pair(tmp_path, train_after=1e-3)
    s = compare(str(base), str(tuned)).summary
    assert s.verdict == "derived" and "rounding_level" not in s.flags
    # a changed vector has no rank to test: a norm trained alone keeps the ordinary title
    w = {k: v.copy() for k, v in _load(base).items()}
    w["model.norm.weight"] = w["model.norm.weight"] * np.float32(1.001)
    d = write_checkpoint(tmp_path / "norm", w)
    s = compare(str(base), str(d)).summary
    assert s.verdict == "derived" and "rounding_level" not in s.flags


def _load(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_narrower_student_claims_no_changed_block_and_no_cost(tmp_path):
    """Nothing compared (another width), yet the scope line read "4 of 4 blocks changed; 39 of 39 tensors" and
    "delta params 430,944 (100% of the model: parameters needed to write the change down)"."""
    from models import llama
    from weightdiff.render.sentences import headline
    from weightdiff.render.terminal import render_text

    write_checkpoint(tmp_path / "b", llama(np.random.default_rng(1), layers=2, hidden=64, inter=128, vocab=256))
    write_checkpoint(tmp_path / "t", llama(np.random.default_rng(2), layers=2, hidden=32, inter=64, vocab=256))
    d = compare(tmp_path / "b", tmp_path / "t").to_dict()
    s = d["summary"]
    assert (s["blocks_changed"], s["scope"]["blocks_changed"], s["scope"]["tensors_changed"]) == (0, 0, 0)
    assert s["scope"]["blocks_reshaped"] == 2 and s["scope"]["changed_blocks"] == []
    assert all(b["params_changed"] == 0 and b["tensors_changed"] == 0 for b in d["blocks"])
    n = s["scope"]["tensors_reshaped"]["tensors"]
    text = render_text(d)
    assert f"scope     none of the 2 blocks could be compared; none of the {n} tensors could be compared ({n} of " \
           "another shape than in the base)\n" in text
    assert "delta params      n/a (nothing was compared: no change was measured to write down)\n" in text
    assert "blocks changed" not in text and "write the change down" not in text.replace("no change was measured to write down", "")
    lines = headline(d)
    assert "None of the 2 blocks could be compared." in lines
    assert not any("Writing the change down" in x or "blocks changed" in x for x in lines), lines


def test_one_minus_cosine_of_zero_says_what_changed_is_outside_it(tmp_path):
    """Only a matrix below the 4,096-element "large" line changed (a sentence-transformers Dense head, one small
    expert, a grouped-query k_proj): "a fine-tune ... the large matrices keep 1 - cosine = 0" read as nothing
    changed. The reason says the changed tensors are outside that figure."""
    from models import llama

    base = llama(np.random.default_rng(81), layers=2, hidden=64, inter=128, vocab=128, kv=16)
    tuned = dict(base)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert base[k].size < 4096
    tuned[k] = (base[k] + np.random.default_rng(82).normal(0, 2e-3, base[k].shape)).astype(np.float32)
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert s.verdict == "derived", s.verdict_reason
    assert "keep 1 - cosine = 0 with the base (every tensor that changed is a vector or a matrix of fewer than " \
           "4,096 elements, which that figure leaves out)" in s.verdict_reason, s.verdict_reason


def test_one_minus_cosine_of_zero_beside_a_large_zeroed_matrix_says_only_what_is_true(tmp_path):
    """The only change is a large matrix all zero in the base (trained from zero): the cosine leaves it out, and the
    reason said "every tensor that changed is a vector or a matrix of fewer than 4,096 elements", which it is
    not. The zero-matrix phrase says why it is left out; the false parenthesis is gone."""
    from models import llama

    base = llama(np.random.default_rng(83), layers=2, hidden=64, inter=128, vocab=128, kv=16)
    up = "model.layers.0.mlp.up_proj.weight"
    assert base[up].size >= 4096
    base[up] = np.zeros_like(base[up])
    tuned = dict(base)
    tuned[up] = np.random.default_rng(84).normal(0, 2e-2, base[up].shape).astype(np.float32)
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert s.verdict == "derived", s.verdict_reason
    assert "keep 1 - cosine = 0 with the base; 1 matrix is all zero in the base" in s.verdict_reason, s.verdict_reason
    assert "every tensor that changed is a vector" not in s.verdict_reason
