"""Mixture-of-experts models written by transformers' own classes (save_pretrained), experts reordered.

Qwen2-MoE and DeepSeek-V3 keep a shared expert beside the routed ones (``mlp.shared_expert.*`` with
``mlp.shared_expert_gate``; ``mlp.shared_experts.*``), and DeepSeek's router a per-expert
``e_score_correction_bias``. Their experts reordered with the router rows following (outputs exactly the
base's) read "PARTIAL ... layers.1 mlp unrelated" and "changed far more than a fine-tune": the shared
expert kept the block reading shared, so its MLP was checked for reordered neurons, never for reordered
experts. Skipped when transformers/torch are not installed. Tiny configs: seconds each.
"""

from __future__ import annotations

import pytest

import weightdiff
from weightdiff.render.sentences import verdict_title

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PERM = [2, 0, 3, 1]
COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32, tie_word_embeddings=False, intermediate_size=32)


def _model(kind: str, experts: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    T = transformers
    if kind == "qwen2moe":
        m = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                   num_experts=experts, num_experts_per_tok=2, **COMMON))
    elif kind == "deepseekv3":      # layer 0 dense, layer 1 MoE with a shared expert
        m = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            moe_intermediate_size=32, n_routed_experts=experts, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, **COMMON))
        with torch.no_grad():       # trained models have a non-zero correction bias; it must follow the experts
            m.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.randn(experts))
    elif kind == "mixtral":
        m = T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **COMMON))
    else:
        raise ValueError(kind)
    return m.eval()


def _moe(m):
    layer = m.model.layers[1]
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


def _reorder(m, router: bool = True):
    x = _moe(m)
    perm = torch.tensor(PERM)
    with torch.no_grad():
        x.experts.gate_up_proj.copy_(x.experts.gate_up_proj[perm].clone())
        x.experts.down_proj.copy_(x.experts.down_proj[perm].clone())
        if router:
            x.gate.weight.copy_(x.gate.weight[perm].clone())
            if hasattr(x.gate, "e_score_correction_bias"):
                x.gate.e_score_correction_bias.copy_(x.gate.e_score_correction_bias[perm].clone())
    return m


def _logits(m):
    ids = torch.arange(24).reshape(2, 12) % 128
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("kind", ["qwen2moe", "deepseekv3"])
def test_experts_reordered_beside_a_shared_expert_are_found_and_undone(tmp_path, kind):
    m = _model(kind)
    m.save_pretrained(tmp_path / "b")
    before = _logits(m)
    _reorder(m)
    assert torch.allclose(before, _logits(m), atol=1e-6)       # the truth: the base's outputs exactly
    m.save_pretrained(tmp_path / "r")
    r = weightdiff.compare(tmp_path / "b", tmp_path / "r")
    s = r.summary
    assert s.verdict == "derived" and "far_from_base" not in s.flags, verdict_title(r.to_dict()["summary"])
    assert s.scope["permuted_units"]["blocks"] == {"layers.1": ["experts"]}, s.scope["permuted_units"]
    assert s.scope["permuted_units"]["undone"] == {"layers.1": ["experts"]}
    assert s.relative_change == 0 and s.params_by_status["unchanged"] == s.params_total and s.blocks_changed == 0
    assert all(c["status"] != "unrelated" for c in s.components)
    assert verdict_title(r.to_dict()["summary"]) == ("DERIVED: this base with the experts of some mixture-of-experts "
                                                     "layers reordered; none of its other weights changed.")
    # the router's rows (and DeepSeek's correction bias) are compared in the experts' new order
    router = [t for t in r.tensors if t.name.startswith("model.layers.1.mlp.gate.")]
    assert router and all(t.status == "unchanged" and "router rows in this model's expert order" in (t.note or "")
                          for t in router), [(t.name, t.status, t.note) for t in router]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2moe"])
def test_experts_reordered_without_their_router_rows_read_as_a_changed_block(tmp_path, kind):
    """The router's rows left in place send tokens to other experts: the model computes something else. The
    title said "none of its other weights changed", the figures "0 of 2 blocks changed"; the router is now
    compared with the base's rows in the experts' new order and counts as changed."""
    m = _model(kind)
    m.save_pretrained(tmp_path / "b")
    before = _logits(m)
    _reorder(m, router=False)
    assert not torch.allclose(before, _logits(m), atol=1e-4)   # the truth: other outputs
    m.save_pretrained(tmp_path / "r")
    r = weightdiff.compare(tmp_path / "b", tmp_path / "r")
    s = r.summary
    title = verdict_title(r.to_dict()["summary"])
    assert s.verdict == "derived" and s.blocks_changed == 1 and s.relative_change > 0, title
    pu = s.scope["permuted_units"]
    assert pu["blocks"] == {"layers.1": ["router", "experts"]} and pu["undone"] == {"layers.1": ["experts", "router"]}
    assert pu["routers_changed"] == 1 == s.tensors_by_status["changed"]
    router = next(t for t in r.tensors if t.name.endswith("layers.1." + ("block_sparse_moe" if kind == "mixtral"
                                                                          else "mlp") + ".gate.weight"))
    assert router.status == "changed" and "not reordered with the experts" in router.note
    # every expert is the base expert it is
    assert all(t.status == "unchanged" for t in r.tensors if ".experts." in t.name)
    assert title == ("DERIVED: this base with the experts of some mixture-of-experts layers reordered without their "
                     "router's rows, so those layers route tokens to other experts than the base's; none of its other "
                     "weights changed."), title
    assert "that block computes something else" in s.verdict_reason
    assert "a reordering alone changes nothing the model computes)" not in s.verdict_reason


def _upcycle(m, kind: str, experts: int = 6):
    """The base with experts added (copies of its first ones plus noise) and router rows for them."""
    import copy

    cfg = copy.deepcopy(m.config)
    setattr(cfg, "num_local_experts" if kind == "mixtral" else "n_routed_experts", experts)
    torch.manual_seed(5)
    big = type(m)(cfg)
    new = big.state_dict()
    for k, v in m.state_dict().items():
        extra = new[k].shape[0] - v.shape[0] if v.ndim else 0
        new[k] = v.clone() if not extra else torch.cat([v, v[:extra] + 1e-3 * torch.randn_like(v[:extra])])
    big.load_state_dict(new)
    return big.eval()


@pytest.mark.parametrize("kind", ["mixtral", "deepseekv3"])
def test_upcycled_experts_compare_the_routers_shared_rows(tmp_path, kind):
    """4 -> 6 experts: the router [4, h] -> [6, h] was "not a vocabulary resize, so not compared", though its
    first 4 rows are the base's (and a title of "tensors of another shape (not compared)"). Its shared rows are
    compared now, so a router trained beneath the upcycling is seen."""
    m = _model(kind)
    m.save_pretrained(tmp_path / "b")
    big = _upcycle(m, kind)
    big.save_pretrained(tmp_path / "u")
    r = weightdiff.compare(tmp_path / "b", tmp_path / "u")
    s = r.summary
    routers = [t for t in r.tensors if t.name.startswith("model.layers.1.mlp.gate.") or ".gate.weight" in t.name
               and "block_sparse_moe" in t.name]
    assert routers and all(t.status == "resized" and t.compared == "float" and t.frac_changed == 0
                           and "shared rows are compared" in t.note for t in routers), \
        [(t.name, t.status, t.compared, t.note) for t in routers]
    assert "shape_mismatch" not in s.flags and "resized_embeddings" not in s.flags, s.flags
    assert any("experts added: the router" in n for n in r.plan["notes"]), r.plan["notes"]
    assert verdict_title(r.to_dict()["summary"]) == (
        "DERIVED: this base with tensors added or removed and rows added to or removed from some of its tensors "
        "(their shared rows unchanged); none of its own weights changed.")
    # the router's base rows trained as well: seen in its shared rows
    with torch.no_grad():
        _moe(big).gate.weight[:4] += 0.05 * torch.randn_like(_moe(big).gate.weight[:4])
    big.save_pretrained(tmp_path / "t")
    r = weightdiff.compare(tmp_path / "b", tmp_path / "t")
    router = next(t for t in r.tensors if t.name.endswith("layers.1." + ("block_sparse_moe" if kind == "mixtral"
                                                                          else "mlp") + ".gate.weight"))
    assert router.status == "resized" and router.frac_changed == 1 and router.rel_change > 0.1, router
    assert verdict_title(r.to_dict()["summary"]) == "DERIVED: a fine-tune of this base."
