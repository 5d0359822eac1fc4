"""Tensors every model of a shape shares by construction are no evidence of relatedness, and a norm in a
container's name does not make an attention a norm (found by the architecture-zoo tester).

- Whisper's encoder position table is a fixed sinusoid: two independently initialised Whisper models
  read "PARTIAL: shared with this base: embeddings" on that table alone.
- DBRX keeps its attention under ``norm_attn_norm.attn.*``: every attention matrix was of kind ``norm``,
  left out of the relatedness numbers, so attention replaced by another model's read "a fine-tune,
  1 - cosine = 0".
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_checkpoint
from models import llama
from weightdiff import compare
from weightdiff.io.safetensors_write import to_storage
from weightdiff.judge.relatedness import FIXED_NOTE, is_sinusoid_table
from weightdiff.kernels.dtypes import decode
from weightdiff.pairing.names import parse_name


def _whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """transformers' ``sinusoids`` for Whisper's encoder (concatenated sin | cos), in float32."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    scaled = (np.arange(length, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float32)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _interleaved(length: int, channels: int) -> np.ndarray:
    """The "Attention is all you need" layout (sin and cos interleaved), as fairseq/Marian build it."""
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, channels, 2) * (-np.log(10000.0) / channels))
    t = np.zeros((length, channels))
    t[:, 0::2], t[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return t.astype(np.float32)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
@pytest.mark.parametrize("length,channels", [(64, 128), (1500, 384), (448, 64)])
def test_sinusoid_tables_are_recognised_in_every_layout_and_dtype(dtype, length, channels):
    for table in (_whisper_sinusoids(length, channels), _interleaved(length, channels)):
        stored = decode(to_storage(table.astype(np.float64), dtype), dtype).reshape(table.shape)
        assert is_sinusoid_table(stored, dtype)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_learned_or_damaged_tables_are_not_sinusoids(dtype, rng):
    table = _whisper_sinusoids(448, 128)
    learned = rng.normal(0, 0.02, table.shape)
    scaled_up = rng.uniform(-1, 1, table.shape)            # reaches 1, but no recurrence
    trained = table + 0.01 * rng.standard_normal(table.shape)  # a sinusoid init, trained: evidence again
    # trained a little and stored in bf16, whose ulp near 1 (7.8e-3) hides a 1e-3 deviation: it shows where
    # the values cross zero, which bf16 holds far finer (found by a tester verifying this round's fixes)
    slightly = table + 1e-3 * rng.standard_normal(table.shape)
    zeros = np.zeros_like(table)
    for t in (learned, scaled_up, trained, slightly, zeros, table[:4]):
        stored = decode(to_storage(np.asarray(t, np.float64), dtype), dtype).reshape(np.shape(t))
        assert not is_sinusoid_table(stored, dtype)


def _encoder(rng: np.random.Generator, positions: np.ndarray) -> dict:
    t = llama(rng, layers=2)
    t["model.encoder.embed_positions.weight"] = positions
    return t


def test_two_unrelated_models_sharing_a_sinusoid_table_read_unrelated(tmp_path):
    table = _whisper_sinusoids(64, 128)
    a = _encoder(np.random.default_rng(0), table)
    b = _encoder(np.random.default_rng(1), table)
    r = compare(write_checkpoint(tmp_path / "a", a), write_checkpoint(tmp_path / "b", b))
    assert r.summary.verdict == "unrelated", r.summary.verdict_reason
    pos = next(t for t in r.tensors if t.name == "model.encoder.embed_positions.weight")
    assert pos.status == "unchanged" and FIXED_NOTE in pos.note


def test_a_learned_position_table_shared_bitwise_is_still_evidence(tmp_path, rng):
    learned = rng.normal(0, 0.02, (2048, 128)).astype(np.float32)     # the larger part of the embeddings
    a = _encoder(np.random.default_rng(0), learned)
    b = _encoder(np.random.default_rng(1), learned)
    r = compare(write_checkpoint(tmp_path / "a", a), write_checkpoint(tmp_path / "b", b))
    assert r.summary.verdict == "partial"
    assert next(c for c in r.summary.components if c["component"] == "embeddings")["status"] == "shared"


def test_a_fine_tune_beside_a_sinusoid_table_reads_a_fine_tune(tmp_path, rng):
    base = _encoder(rng, _whisper_sinusoids(64, 128))
    tuned = {k: v if "positions" in k else (v + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in base.items()}
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert s.verdict == "derived" and s.tensors_by_status["changed"] == len(base) - 1


@pytest.mark.parametrize("name,kind", [
    ("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", "attn.qkv"),
    ("transformer.blocks.0.norm_attn_norm.attn.out_proj.weight", "attn.o"),
    ("transformer.blocks.0.norm_attn_norm.norm_1.weight", "norm"),
    ("transformer.blocks.0.norm_attn_norm.norm_2.weight", "norm"),
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("blocks.0.layer_norm.scale", "norm"),
])
def test_norm_kind_is_the_norms_own_not_its_containers(name, kind):
    assert parse_name(name)[2] == kind


def test_dbrx_attention_replaced_by_another_models_reads_partial(tmp_path, rng):
    def dbrx(r: np.random.Generator) -> dict:
        t = {"transformer.wte.weight": r.normal(0, 0.02, (512, 128)).astype(np.float32)}
        for i in range(2):
            p = f"transformer.blocks.{i}."
            t[p + "norm_attn_norm.norm_1.weight"] = np.ones(128, np.float32)
            t[p + "norm_attn_norm.attn.Wqkv.weight"] = r.normal(0, 0.02, (256, 128)).astype(np.float32)
            t[p + "norm_attn_norm.attn.out_proj.weight"] = r.normal(0, 0.02, (128, 128)).astype(np.float32)
            t[p + "norm_attn_norm.norm_2.weight"] = np.ones(128, np.float32)
            t[p + "ffn.experts.mlp.w1"] = r.normal(0, 0.02, (512, 128)).astype(np.float32)
            t[p + "ffn.experts.mlp.w2"] = r.normal(0, 0.02, (512, 128)).astype(np.float32)
        t["lm_head.weight"] = r.normal(0, 0.02, (512, 128)).astype(np.float32)
        return t

    base, other = dbrx(rng), dbrx(np.random.default_rng(99))
    tuned = {k: other[k] if ".attn." in k else v for k, v in base.items()}
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert s.verdict == "partial"
    unrelated = {c["component"] for c in s.components if c["status"] == "unrelated"}
    assert unrelated == {"blocks.0 attn", "blocks.1 attn"}


@pytest.mark.parametrize("name,kind", [
    ("model.layers.1.block_sparse_moe.input_linear.0.weight", "mlp.up"),      # GraniteMoE, split per expert
    ("model.layers.1.block_sparse_moe.output_linear.3.weight", "mlp.down"),
    ("model.layers.1.block_sparse_moe.router.layer.weight", "mlp.router"),
    ("transformer.blocks.0.ffn.experts.mlp.v1", "mlp.up"),                    # DBRX
    ("transformer.blocks.0.ffn.router.layer.weight", "mlp.router"),
    ("backbone.embeddings.weight", "embed"),                                  # Mamba, RWKV
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "mlp.gate"),
    # TransformerEngine's fused names: a QKV matrix and the MLP's, each with its norm beside it (every one
    # read as a norm; found by a tester verifying this round's fixes); Megatron-core's
    ("model.layers.0.self_attention.layernorm_qkv.weight", "attn.qkv"),
    ("model.layers.0.self_attention.layernorm_qkv.layer_norm_weight", "norm"),
    ("model.layers.0.layernorm_mlp.fc1_weight", "mlp.up"),
    ("model.layers.0.layernorm_mlp.fc2_weight", "mlp.down"),
    ("model.layers.0.layernorm_mlp.layer_norm_weight", "norm"),
    ("decoder.layers.0.self_attention.linear_qkv.weight", "attn.qkv"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "norm"),
    ("decoder.layers.0.self_attention.linear_proj.weight", "attn.o"),
    ("decoder.layers.0.mlp.linear_fc1.weight", "mlp.up"),
    ("decoder.layers.0.mlp.linear_fc2.weight", "mlp.down"),
    ("vit.encoder.layer.0.layernorm_before.weight", "norm"),       # not TransformerEngine's: ViT's norms
    ("vit.encoder.layer.0.layernorm_after.weight", "norm"),
])
def test_expert_slices_routers_and_ssm_tables_get_their_kind(name, kind):
    assert parse_name(name)[2] == kind


def _ssm(rng: np.random.Generator, vocab: int, prefix: str) -> dict:
    t = {f"{prefix}embeddings.weight": rng.normal(0, 0.02, (vocab, 128)).astype(np.float32)}
    for i in range(2):
        p = f"{prefix}layers.{i}.mixer."
        t[p + "in_proj.weight"] = rng.normal(0, 0.02, (512, 128)).astype(np.float32)
        t[p + "out_proj.weight"] = rng.normal(0, 0.02, (128, 256)).astype(np.float32)
        t[f"{prefix}layers.{i}.norm.weight"] = np.ones(128, np.float32)
    t["head.weight"] = rng.normal(0, 0.02, (vocab, 128)).astype(np.float32)
    return t


@pytest.mark.parametrize("prefix", ["backbone.", "rwkv."])
def test_ssm_vocabulary_resize_compares_the_shared_rows(tmp_path, rng, prefix):
    """Mamba's and RWKV's `embeddings.weight` (and RWKV's `head.weight`) grown by 8 tokens and trained: the
    shared rows were not compared (shape mismatch), and the summary read relative change 0."""
    base = _ssm(rng, 512, prefix)
    tuned = dict(base)
    for name in (f"{prefix}embeddings.weight", "head.weight"):
        grown = np.concatenate([base[name], rng.normal(0, 0.02, (8, 128)).astype(np.float32)])
        grown[:512] += 1e-3 * rng.standard_normal((512, 128)).astype(np.float32)
        tuned[name] = grown
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    assert "resized_embeddings" in s.flags and "shape_mismatch" not in s.flags
    assert s.relative_change > 0 and s.coverage["base"]["share"] == 1.0


def test_rows_added_beside_a_tensor_of_another_shape_is_not_called_a_fine_tune(tmp_path, rng):
    """BART: tokens added; `final_logits_bias` [1, vocab] is of another shape (not compared). Nothing was
    trained, but the title read "a fine-tune of this base", and the reason had two parentheses in a row."""
    base = llama(rng, layers=2)
    base["final_logits_bias"] = np.zeros((1, 512), np.float32)
    tuned = dict(base)
    tuned["model.embed_tokens.weight"] = np.concatenate([base["model.embed_tokens.weight"],
                                                         rng.normal(0, 0.02, (8, 128)).astype(np.float32)])
    tuned["final_logits_bias"] = np.zeros((1, 520), np.float32)
    s = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned)).summary
    from weightdiff.render.sentences import verdict_title

    title = verdict_title(s.to_dict())
    assert "fine-tune" not in title and "none of its other weights changed" in title, title
    assert ") (" not in s.verdict_reason and "only resized" in s.verdict_reason and "another shape" in s.verdict_reason


def test_depth_caption_does_not_count_a_reshaped_block_as_unchanged(tmp_path, rng):
    """Layer 0's MLP replaced by a wider one, layer 2 fine-tuned: the scope line says 1 of 4 blocks changed and
    1 holds tensors of another shape; Figure 1's caption said 3 blocks had no change at all (found by a tester
    verifying this round's fixes)."""
    from weightdiff.render.captions import caption_depth

    base = llama(rng)
    tuned = dict(base)
    for k, shape in (("gate_proj", (384, 128)), ("up_proj", (384, 128)), ("down_proj", (128, 384))):
        tuned[f"model.layers.0.mlp.{k}.weight"] = rng.normal(0, 0.02, shape).astype(np.float32)
    for k, v in base.items():
        if k.startswith("model.layers.2."):
            tuned[k] = (v + 1e-2 * float(v.std()) * rng.standard_normal(v.shape)).astype(np.float32)
    r = compare(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "t", tuned))
    text = caption_depth(r.to_dict())
    assert "block 0 holds tensors of another shape" in text, text
    assert "2 blocks with no change at all" in text, text
