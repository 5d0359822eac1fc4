"""Pairing plans from headers: prefixes, tied heads, resized vocabularies, composites, adapters, odd names.

Small fake checkpoints (names, shapes, dtypes only) pin each rule; real checkpoints
written with tests/conftest.py, and tiny transformers/peft models saved with
save_pretrained where those are installed, check the rules on real layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from conftest import write_checkpoint
from weightdiff.errors import OptionsError
from weightdiff.pairing.plan import Pair, Plan, is_embedding, is_lm_head, plan


@dataclass
class Info:
    name: str
    dtype: str
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Factor:
    target: str
    a_name: str
    b_name: str
    magnitude_name: str | None = None
    r: int = 4
    scale: float = 2.0


@dataclass
class Fake:
    tensors: dict
    format: str = "safetensors"
    lora: list = field(default_factory=list)
    adapter: object = None


def fake(spec: dict, dtype: str = "F32", **kw) -> Fake:
    return Fake({n: Info(n, dtype, tuple(s)) for n, s in spec.items()}, **kw)


def llama_names(prefix: str = "model.", layers: int = 2, vocab: int = 10, d: int = 4, head: bool = True) -> dict:
    spec = {f"{prefix}embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            spec[f"{prefix}layers.{i}.self_attn.{m}.weight"] = (d, d)
        spec[f"{prefix}layers.{i}.input_layernorm.weight"] = (d,)
    spec[f"{prefix}norm.weight"] = (d,)
    if head:
        spec["lm_head.weight"] = (vocab, d)
    return spec


def kinds(p: Plan) -> list[tuple]:
    return [(x.kind, x.tuned_name, x.base_name) for x in p.pairs]


# ---------------------------------------------------------------- exact names and prefixes

def test_exact_names_pair_in_tuned_order_then_removed_in_base_order():
    base = fake({"a.weight": (2, 2), "gone.weight": (3,), "b.weight": (2,), "gone2.weight": (1,)})
    tuned = fake({"b.weight": (2,), "new.weight": (5,), "a.weight": (2, 2)})
    p = plan([base], tuned)
    assert kinds(p) == [("paired", "b.weight", "b.weight"), ("added", "new.weight", None),
                        ("paired", "a.weight", "a.weight"), ("removed", None, "gone.weight"),
                        ("removed", None, "gone2.weight")]
    assert p.alignment == [{"base": 0, "tuned_prefix": "", "base_prefix": "", "matched": 2, "base_tensors": 4,
                            "subtree": ""}]
    c = p.counts
    assert c["tensors"] == {"paired": 2, "added": 1, "removed": 2}
    assert c["params"] == {"paired": 6, "added": 5, "removed": 4}


@pytest.mark.parametrize("tuned_prefix,base_prefix,found", [
    ("model.", "", ("model.", "")),                                   # LlamaForCausalLM vs LlamaModel
    ("base_model.model.model.", "model.", ("base_model.model.", "")),  # a PEFT merge saved with its wrapper
    ("", "model.", ("", "model.")),                                   # the other way round
])
def test_prefix_alignment_is_found_and_reported(tuned_prefix, base_prefix, found):
    base = fake(llama_names(base_prefix, head=False))
    tuned = fake(llama_names(tuned_prefix, head=False))
    p = plan([base], tuned)
    assert {x.kind for x in p.pairs} == {"paired"}
    assert all(x.tuned_name[len(tuned_prefix):] == x.base_name[len(base_prefix):] for x in p.pairs)
    a = p.alignment[0]
    assert (a["tuned_prefix"], a["base_prefix"], a["matched"]) == (*found, len(base.tensors))
    assert any("aligned with base" in n for n in p.notes)


def test_gpt2_transformer_prefix_and_lm_head_outside_it():
    base = fake({"wte.weight": (50, 8), "h.0.attn.c_attn.weight": (8, 24), "ln_f.weight": (8,)})
    tuned = fake({"transformer.wte.weight": (50, 8), "transformer.h.0.attn.c_attn.weight": (8, 24),
                  "transformer.ln_f.weight": (8,), "lm_head.weight": (50, 8)})
    p = plan([base], tuned)
    assert p.alignment[0]["tuned_prefix"] == "transformer." and p.alignment[0]["base_prefix"] == ""
    # the tuned head exists, the base ties it to wte: compare it with the base embedding
    head = p.pairs[-1]
    assert (head.kind, head.tuned_name, head.base_name, head.tied) == ("paired", "lm_head.weight", "wte.weight", False)
    assert any("ties its LM head" in n for n in p.notes)


def test_tied_tuned_head_is_the_tuned_embedding_against_the_base_head():
    base = fake(llama_names())
    tuned = fake(llama_names(head=False))
    p = plan([base], tuned)
    tied = [x for x in p.pairs if x.tied]
    assert len(tied) == 1 and not [x for x in p.pairs if x.kind == "removed"]
    t = tied[0]
    assert (t.kind, t.tuned_name, t.base_name, t.tuned_source) == (
        "paired", "lm_head.weight", "lm_head.weight", "model.embed_tokens.weight")
    # placed right after the embedding it reads
    i = p.pairs.index(t)
    assert p.pairs[i - 1].tuned_name == "model.embed_tokens.weight"
    assert p.counts["tied"] == 1


def test_resized_vocabulary_grown_and_shrunk():
    base = fake({"model.embed_tokens.weight": (100, 8), "lm_head.weight": (100, 8), "lm_head.bias": (100,),
                 "model.x.weight": (8, 8)})
    tuned = fake({"model.embed_tokens.weight": (150, 8), "lm_head.weight": (90, 8), "lm_head.bias": (150,),
                  "model.x.weight": (8, 9)})
    p = plan([base], tuned)
    by = {x.tuned_name: x for x in p.pairs}
    assert (by["model.embed_tokens.weight"].kind, by["model.embed_tokens.weight"].overlap_rows) == ("resized", 100)
    assert (by["lm_head.weight"].kind, by["lm_head.weight"].overlap_rows) == ("resized", 90)
    assert by["lm_head.bias"].kind == "resized"
    assert (by["model.x.weight"].kind, by["model.x.weight"].overlap_rows) == ("mismatch", None)
    assert any("vocabulary grew" in n for n in p.notes) and any("vocabulary shrank" in n for n in p.notes)
    special = {d["tuned_name"] for d in p.to_dict()["special"]}
    assert special == set(by)


def test_a_non_vocabulary_row_change_is_a_mismatch_not_a_resize():
    base = fake({"layers.0.mlp.up_proj.weight": (16, 8)})
    tuned = fake({"layers.0.mlp.up_proj.weight": (32, 8)})
    assert plan([base], tuned).pairs[0].kind == "mismatch"


def test_dtype_changes_are_counted_not_fatal():
    base = fake({"a.weight": (2, 2), "b.weight": (2,)}, dtype="F32")
    tuned = fake({"a.weight": (2, 2), "b.weight": (2,)}, dtype="BF16")
    p = plan([base], tuned)
    assert p.counts["dtype_changes"] == {"F32 -> BF16": 2}
    assert any("F32 -> BF16" in n for n in p.notes)


# ---------------------------------------------------------------- composite models

def _vit(prefix: str) -> dict:
    spec = {f"{prefix}embeddings.cls_token": (1, 1, 8), f"{prefix}embeddings.patch_embeddings.projection.weight": (8, 3, 2, 2)}
    for i in range(2):
        for m in ("query", "key", "value"):
            spec[f"{prefix}encoder.layer.{i}.attention.attention.{m}.weight"] = (8, 8)
        spec[f"{prefix}encoder.layer.{i}.output.dense.weight"] = (8, 32)
    spec[f"{prefix}layernorm.weight"] = (8,)
    return spec


def _gpt2(prefix: str, cross: bool = False) -> dict:
    spec = {f"{prefix}wte.weight": (30, 8)}
    for i in range(2):
        spec[f"{prefix}h.{i}.attn.c_attn.weight"] = (8, 24)
        spec[f"{prefix}h.{i}.mlp.c_fc.weight"] = (8, 32)
        if cross:
            spec[f"{prefix}h.{i}.crossattention.c_attn.weight"] = (8, 16)
            spec[f"{prefix}h.{i}.crossattention.q_attn.weight"] = (8, 8)
    spec[f"{prefix}ln_f.weight"] = (8,)
    return spec


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_composite_vit_gpt2_each_base_claims_its_subtree(order):
    vit, gpt = fake(_vit("vit.")), fake(_gpt2("transformer."))
    tuned = fake({**{"encoder." + k[4:]: v for k, v in _vit("vit.").items()},
                  **_gpt2("decoder.transformer.", cross=True)})
    bases = [vit, gpt] if order == (0, 1) else [gpt, vit]
    p = plan(bases, tuned)
    vi, gi = order
    al = {a["base"]: a for a in p.alignment}
    assert (al[vi]["tuned_prefix"], al[vi]["base_prefix"], al[vi]["matched"]) == ("encoder.", "vit.", len(vit.tensors))
    assert (al[gi]["tuned_prefix"], al[gi]["base_prefix"], al[gi]["matched"]) == ("decoder.", "", len(gpt.tensors))
    added = [x.tuned_name for x in p.pairs if x.kind == "added"]
    assert added == [f"decoder.transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("crossattention.c_attn", "crossattention.q_attn")]
    for x in p.pairs:
        if x.kind == "paired":
            assert x.base_index == (vi if x.tuned_name.startswith("encoder.") else gi)
    assert [x.tuned_name for x in p.pairs] == list(tuned.tensors)   # tuned order kept


def test_a_base_that_matches_nothing_is_reported():
    p = plan([fake({"a.weight": (2,)}), fake({"zzz.qqq": (3,)})], fake({"a.weight": (2,)}))
    assert p.alignment[1]["tuned_prefix"] is None and p.alignment[1]["matched"] == 0
    assert any("base 1 shares no tensor name" in n for n in p.notes)
    assert kinds(p) == [("paired", "a.weight", "a.weight"), ("removed", None, "zzz.qqq")]


# ---------------------------------------------------------------- adapters

def test_adapter_lora_pairs_modules_to_save_and_inherited_in_base_order():
    base = fake({"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (8, 8),
                 "score.weight": (3, 8), "model.norm.weight": (8,)})
    pre = "base_model.model."
    tuned = fake({pre + "model.layers.0.self_attn.q_proj.lora_A.weight": (4, 8),
                  pre + "model.layers.0.self_attn.q_proj.lora_B.weight": (8, 4),
                  pre + "score.modules_to_save.default.weight": (3, 8),
                  pre + "model.missing.lora_A.weight": (4, 8), pre + "model.missing.lora_B.weight": (8, 4)},
                 format="adapter",
                 lora=[Factor("model.layers.0.self_attn.q_proj.weight", pre + "model.layers.0.self_attn.q_proj.lora_A.weight",
                              pre + "model.layers.0.self_attn.q_proj.lora_B.weight"),
                       Factor("model.missing.weight", pre + "model.missing.lora_A.weight",
                              pre + "model.missing.lora_B.weight")])
    p = plan([base], tuned)
    assert kinds(p) == [("lora", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
                        ("inherited", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight"),
                        ("paired", "score.weight", "score.weight"),
                        ("inherited", "model.norm.weight", "model.norm.weight"),
                        ("added", "model.missing.weight", None)]
    lo, _, keep, _, miss = p.pairs
    assert lo.lora is tuned.lora[0] and lo.shape_tuned == (8, 8)
    assert keep.tuned_source == pre + "score.modules_to_save.default.weight"
    assert miss.lora is tuned.lora[1]
    assert any("has no base tensor" in n for n in p.notes)
    assert p.to_dict()["counts"]["tensors"] == {"paired": 1, "added": 1, "lora": 1, "inherited": 2}


# ---------------------------------------------------------------- filters, odd names, determinism

def test_include_exclude_globs_apply_to_tuned_and_removed_names():
    base = fake(llama_names())
    tuned = fake({k: v for k, v in llama_names().items() if "k_proj" not in k})
    p = plan([base], tuned, include=["*.layers.1.*"], exclude=["*norm*"])
    assert [x.tuned_name or x.base_name for x in p.pairs] == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    assert p.pairs[-1].kind == "removed"
    assert any("left out" in n for n in p.notes)


ODD = ["", ".", "..", "a..b", "0", "0.weight", "lm_head.weight\n", "x\u202e.weight", "emoji.\U0001F600.w",
       "model.layers.99999999999999999999.q.weight", "[weird]*?.weight", "model."]


def test_odd_names_never_crash_and_stay_deterministic():
    base = fake({n: (2,) for n in ODD})
    tuned = fake({("model." + n if i % 2 else n): (2,) for i, n in enumerate(ODD)})
    p1, p2 = plan([base], tuned), plan([base], tuned)
    assert kinds(p1) == kinds(p2)
    assert len([x for x in p1.pairs if x.kind != "removed"]) == len(tuned.tensors)
    assert all("\n" not in n and "\u202e" not in n for n in p1.notes)
    p1.to_dict()
    with pytest.raises(OptionsError, match=r"^include '\[', '\*\[' matches none of the 12 tuned tensors"):
        plan([base], tuned, include=["[", "*["], exclude=["]"])
    with pytest.raises(OptionsError, match=r"^exclude '\*' leaves none") as e:
        plan([base], tuned, exclude=["*"])
    assert e.value.option == "exclude"


def test_nothing_in_common_and_empty_inputs():
    p = plan([fake({"a.b.c": (2,)})], fake({"x.y.z": (2,)}))
    assert kinds(p) == [("added", "x.y.z", None), ("removed", None, "a.b.c")]
    assert plan([fake({})], fake({})).pairs == []


def test_name_helpers():
    assert is_embedding("transformer.wte.weight") and is_embedding("bert.embeddings.word_embeddings.weight")
    assert not is_embedding("model.embed_tokens.bias")
    assert is_lm_head("cls.predictions.decoder.weight") and is_lm_head("gpt_neox.embed_out.weight")
    assert not is_lm_head("model.layers.0.attention.output.weight")


def test_pair_to_dict_is_json_ready():
    import json

    p = plan([fake(llama_names())], fake(llama_names(head=False)))
    json.dumps(p.to_dict())
    d = [x.to_dict() for x in p.pairs if x.tied][0]
    assert d["shape_tuned"] == [10, 4] and d["tied"] is True


# ---------------------------------------------------------------- real checkpoints

def test_real_checkpoints_with_prefix_tie_and_resize(tmp_path):
    from weightdiff.io.checkpoint import locate

    rng = np.random.default_rng(0)
    base_t = {"embed_tokens.weight": rng.normal(size=(20, 4)).astype(np.float32),
              "layers.0.mlp.up_proj.weight": rng.normal(size=(8, 4)).astype(np.float32),
              "norm.weight": np.ones(4, np.float32)}
    tuned_t = {"model." + k: v for k, v in base_t.items()}
    tuned_t["model.embed_tokens.weight"] = np.concatenate([base_t["embed_tokens.weight"], np.zeros((5, 4), np.float32)])
    tuned_t["lm_head.weight"] = rng.normal(size=(25, 4)).astype(np.float32)
    b = write_checkpoint(tmp_path / "b", base_t)
    t = write_checkpoint(tmp_path / "t", tuned_t, shards=2, dtype="BF16")
    with locate(b) as bc, locate(t) as tc:
        p = plan([bc], tc)
    by = {x.tuned_name: x for x in p.pairs}
    assert by["model.embed_tokens.weight"].kind == "resized" and by["model.embed_tokens.weight"].overlap_rows == 20
    assert by["lm_head.weight"].base_name == "embed_tokens.weight" and by["lm_head.weight"].kind == "resized"
    assert by["model.norm.weight"].dtype_tuned == "BF16" and by["model.norm.weight"].dtype_base == "F32"
    assert p.alignment[0]["tuned_prefix"] == "model."


def test_real_transformers_composite_and_peft_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from weightdiff.io.checkpoint import locate

    torch.manual_seed(0)
    enc = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4)
    dec = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    vit = transformers.ViTModel(enc)
    gpt = transformers.GPT2LMHeadModel(dec)
    vit.save_pretrained(tmp_path / "vit")
    gpt.save_pretrained(tmp_path / "gpt2")
    ved = transformers.VisionEncoderDecoderModel(encoder=vit, decoder=transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**dec.to_dict(), "add_cross_attention": True, "is_decoder": True})))
    ved.save_pretrained(tmp_path / "ved")
    with locate(tmp_path / "vit") as v, locate(tmp_path / "gpt2") as g, locate(tmp_path / "ved") as t:
        p = plan([v, g], t)
        n_bases = len(v.tensors) + len(g.tensors)
    added = [x.tuned_name for x in p.pairs if x.kind == "added"]
    assert added and all("crossattention" in n or "ln_cross_attn" in n for n in added)
    assert not [x for x in p.pairs if x.kind in ("removed", "mismatch")]
    assert sum(1 for x in p.pairs if x.kind == "paired") == n_bases
    assert {a["tuned_prefix"] for a in p.alignment} == {"encoder.", "decoder."}

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    llama = transformers.LlamaForCausalLM(cfg)
    llama.save_pretrained(tmp_path / "llama")
    pm = peft.get_peft_model(llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]))
    pm.save_pretrained(tmp_path / "adapter")
    with locate(tmp_path / "llama") as b, locate(tmp_path / "adapter") as a:
        p = plan([b], a)
        n_base = len(b.tensors)
    c = p.counts["tensors"]
    assert c == {"paired": 1, "lora": 4, "inherited": n_base - 5}
    assert [x.tuned_name for x in p.pairs if x.kind == "paired"] == ["lm_head.weight"]
    assert all(x.base_name == x.tuned_name for x in p.pairs)


@pytest.mark.parametrize("names", [
    ["model.layers.0.q.weight", "model.layers.1.q.weight", "lm_head.weight"],
    ["a.x.w", "a.y.w", "x.w", "y.w"],                                  # a prefix map matches as much
    ["0.auto_model.layer.0.w", "0.auto_model.layer.1.w", "auto_model.layer.0.w", "layer.0.w"],
    [f"model.layers.{i}.experts.{j}.w" for i in range(3) for j in range(4)],
])
def test_the_identity_shortcut_gives_what_the_search_gives(names):
    from weightdiff.pairing.align import _search, best_mapping

    base = {n: (i % 3 + 1, 2) for i, n in enumerate(names)}
    for items in ([(n, base[n]) for n in names], [(n, base[n]) for n in names[1:]],
                  [(n, None, True) for n in names]):
        assert best_mapping(items, base) == _search(list(items), base)
    items = [(n, (9, 9)) for n in names]           # shapes differ: no shortcut, the search decides
    assert best_mapping(items, base) == _search(items, base)
