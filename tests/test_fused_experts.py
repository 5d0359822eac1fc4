"""Fused mixture-of-experts tensors (gpt-oss, Llama 4, Granite MoE; llama.cpp's stacked experts of an
architecture it maps no names for) read as the experts' own tensors: values, windows and rows against
numpy slices of the stored array, sharded indexes that list the fused name, MXFP4 experts against
transformers' own dequantizer, and one expert's change found, with its rank, among unchanged ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_checkpoint
from test_bad_input import bad
from weightdiff import compare
from weightdiff.io.checkpoint import locate
from weightdiff.io.experts import expert_name, fused_origin, is_fused, split_note

L = "model.layers.0.mlp.experts."


def _gpt_oss(rng, experts=4, hidden=24, inter=16) -> dict:
    """One gpt-oss-shaped layer: fused experts (transformers' layout: gate_up [E, hidden, 2 inter],
    down [E, inter, hidden]) with their biases, a router, attention, and a convolution (3-D, not experts)."""
    f = np.float32
    return {"model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (hidden, hidden)).astype(f),
            "model.layers.0.mlp.router.weight": rng.normal(0, 0.02, (experts, hidden)).astype(f),
            L + "gate_up_proj": rng.normal(0, 0.02, (experts, hidden, 2 * inter)).astype(f),
            L + "gate_up_proj_bias": rng.normal(0, 0.02, (experts, 2 * inter)).astype(f),
            L + "down_proj": rng.normal(0, 0.02, (experts, inter, hidden)).astype(f),
            L + "down_proj_bias": rng.normal(0, 0.02, (experts, hidden)).astype(f),
            "model.layers.1.block_sparse_moe.input_linear.weight": rng.normal(0, 0.02, (3, 10, 8)).astype(f),
            "audio.conv1.weight": rng.normal(0, 0.02, (8, 4, 3)).astype(f)}


def _split(t: dict) -> dict:
    out = {}
    for name, arr in t.items():
        if is_fused(name, arr.shape):
            out.update({expert_name(name, e): arr[e] for e in range(arr.shape[0])})
        else:
            out[name] = arr
    return out


def test_names():
    assert expert_name(L + "down_proj_bias", 7) == L + "7.down_proj_bias"
    assert fused_origin(L + "7.down_proj_bias") == L + "down_proj_bias"
    assert fused_origin("model.layers.0.block_sparse_moe.experts.3.w1.weight") is None      # Mixtral's own
    assert fused_origin("m.input_linear.2.weight") == "m.input_linear.weight"
    assert not is_fused(L + "gate_up_proj", (1, 4, 4))        # one expert: nothing to split
    assert not is_fused(L + "gate_up_proj", (4, 16))          # a matrix leaf must be 3-D
    assert not is_fused(L + "gate_up_proj_bias", (4, 4, 4))
    assert not is_fused("model.layers.0.conv.weight", (4, 4, 4))
    assert not is_fused(L + "gate_up_proj", (10 ** 8, 1, 0))    # a hostile header: no 10^8 tensors of nothing
    assert not is_fused(L + "gate_up_proj", (5000, 2, 2)) and is_fused(L + "gate_up_proj", (4096, 2, 2))
    assert split_note([L + "0.gate_up_proj", L + "1.gate_up_proj", "x.input_linear.0.weight"]) == \
        "2 fused expert tensors split into the experts' own"
    assert split_note(["model.layers.0.mlp.down_proj.weight"]) is None


@pytest.mark.parametrize("shards", [1, 3])
def test_fused_tensors_read_as_each_experts_tensor(tmp_path, rng, shards):
    t = _gpt_oss(rng)
    want = _split({k: v for k, v in t.items()})
    write_checkpoint(tmp_path / "m", t, shards=shards, dtype="BF16")
    ref = write_checkpoint(tmp_path / "ref", want, dtype="BF16")       # what each expert was, on its own
    with locate(tmp_path / "m") as ck, locate(ref) as rk:
        assert sorted(ck.tensors) == sorted(want)
        assert ck.tensors[L + "2.gate_up_proj"].shape == (24, 32)
        assert ck.tensors[L + "3.down_proj_bias"].shape == (24,)
        assert ck.tensors["audio.conv1.weight"].shape == (8, 4, 3)
        assert ck.metadata["weightdiff.experts"] == "5 fused expert tensors split into the experts' own"
        for name in want:
            got = ck.read(name)
            assert np.array_equal(got, rk.read(name)), name
            assert np.array_equal(np.concatenate([w.copy() for w in ck.windows(name, 7)]), got.reshape(-1))
        assert np.array_equal(ck.read_rows(L + "1.down_proj", [15, 0, 1]), rk.read_rows(L + "1.down_proj", [15, 0, 1]))
    # the fused and the split checkpoint are the same model, tensor by tensor
    assert compare(ref, tmp_path / "m").summary.verdict == "identical"


def test_one_expert_changed_is_found_with_its_rank(tmp_path, rng):
    # a rank-2 change of expert 2's gate_up (read as one [4, 24 x 32] matrix it was "rank at most 4", and
    # every expert of the layer read changed): only that expert changes, with rank 2
    t = _gpt_oss(rng)
    tuned = {k: v.copy() for k, v in t.items()}
    u, v = rng.normal(0, 1, (24, 2)), rng.normal(0, 1, (2, 32))
    tuned[L + "gate_up_proj"][2] += (0.05 * u @ v / np.linalg.norm(u @ v) * np.linalg.norm(t[L + "gate_up_proj"][2])
                                     ).astype(np.float32)
    tuned[L + "down_proj_bias"][1, 3] += 0.5
    write_checkpoint(tmp_path / "b", t, dtype="F32")
    write_checkpoint(tmp_path / "t", tuned, dtype="F32", shards=2)
    r = compare(tmp_path / "b", tmp_path / "t")
    changed = {x.name: x for x in r.tensors if x.status != "unchanged"}
    assert sorted(changed) == [L + "1.down_proj_bias", L + "2.gate_up_proj"]
    assert changed[L + "2.gate_up_proj"].rank.numerical_rank == 2
    assert r.summary.delta_params == 2 * (24 + 32) + 2           # the bias: one position and one value
    assert len(r.tensors) == len(_split(t))


def test_mxfp4_base_against_its_bf16_fine_tune(tmp_path, rng):
    # gpt-oss as released (MXFP4 experts) against a fine-tune saved in bf16 (transformers dequantizes
    # on load): the unchanged experts are the same numbers; the one changed expert is the quantized values,
    # moved (not a quantization of other weights), and has the rank of its change
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    E, R, G = 3, 16, 2                                     # gate_up: [E, hidden = G*32, 2 inter = R]
    blocks = rng.integers(0, 256, (E, R, G, 16)).astype(np.uint8)
    scales = rng.integers(120, 126, (E, R, G)).astype(np.uint8)
    bias = rng.normal(0, 0.02, (E, R)).astype(np.float32)
    q = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
    (tmp_path / "base").mkdir()
    save_file({L + "gate_up_proj_blocks": torch.from_numpy(blocks), L + "gate_up_proj_scales": torch.from_numpy(scales),
               L + "gate_up_proj_bias": torch.from_numpy(bias).bfloat16(),
               "model.layers.0.self_attn.q_proj.weight": torch.from_numpy(q).bfloat16()},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}))
    w = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    assert tuple(w.shape) == (E, G * 32, R)
    (tmp_path / "same").mkdir()
    save_file({L + "gate_up_proj": w.contiguous(), L + "gate_up_proj_bias": torch.from_numpy(bias).bfloat16(),
               "model.layers.0.self_attn.q_proj.weight": torch.from_numpy(q).bfloat16()},
              str(tmp_path / "same" / "model.safetensors"))
    r = compare(tmp_path / "base", tmp_path / "same", rank=False)
    assert r.summary.verdict == "identical"
    # the quantized tensors are named as such, not as "stored in another dtype (F32 -> BF16)"
    assert "3 are the base's quantized (mxfp4) tensors, dequantized exactly and stored as BF16" in \
        r.summary.verdict_reason and "F32" not in r.summary.verdict_reason
    assert r.to_dict()["base"][0]["dtypes"]["mxfp4"] == E * G * 32 * R
    w = w.clone()
    u, v = torch.randn(G * 32, 1, generator=torch.Generator().manual_seed(0)), torch.ones(1, R)
    w[1] = (w[1].float() + 0.02 * (u @ v) * w[1].float().norm() / (u @ v).norm()).bfloat16()
    (tmp_path / "tuned").mkdir()
    save_file({L + "gate_up_proj": w.contiguous(), L + "gate_up_proj_bias": torch.from_numpy(bias).bfloat16(),
               "model.layers.0.self_attn.q_proj.weight": torch.from_numpy(q).bfloat16()},
              str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    r = compare(tmp_path / "base", tmp_path / "tuned")
    status = {x.name: x.status for x in r.tensors}
    assert status[L + "1.gate_up_proj"] == "changed"
    assert status[L + "0.gate_up_proj"] != "changed" and status[L + "2.gate_up_proj"] != "changed"
    assert r.tensor(L + "1.gate_up_proj").rank.numerical_rank == 1
    assert r.tensor(L + "1.gate_up_proj").quant["near_grid"] > 0.5
    assert r.summary.verdict == "derived"
    assert sum(1 for s in status.values() if s == "changed") == 1


def test_a_header_claiming_millions_of_empty_experts_stays_one_tensor(tmp_path):
    # 10^8 experts of zero bytes cost nothing on disk; split, they were 10^8 tensor entries in memory
    write_checkpoint(tmp_path / "m", {L + "gate_up_proj": np.zeros((10 ** 8, 1, 0), np.float32),
                                      "x.weight": np.ones((2, 2), np.float32)})
    with locate(tmp_path / "m") as ck:
        assert sorted(ck.tensors) == [L + "gate_up_proj", "x.weight"]


def test_a_tensor_stored_both_fused_and_on_its_own_is_refused(tmp_path, rng):
    t = _gpt_oss(rng)
    t[L + "0.gate_up_proj"] = t[L + "gate_up_proj"][0]
    write_checkpoint(tmp_path / "m", t)
    line = bad(tmp_path / "m" / "model.safetensors", "is stored both on its own and inside the fused experts tensor")
    assert L + "0.gate_up_proj" in line


def test_index_that_places_a_fused_tensor_in_the_wrong_shard_is_refused(tmp_path, rng):
    write_checkpoint(tmp_path / "m", _gpt_oss(rng), shards=3)
    index = tmp_path / "m" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    at = doc["weight_map"][L + "down_proj"]
    doc["weight_map"][L + "down_proj"] = next(s for s in shards if s != at)
    index.write_text(json.dumps(doc))
    bad(tmp_path / "m", f"holds tensor `{L}down_proj` that the index places in")


def test_stacked_experts_of_an_architecture_without_a_name_map_split_too(tmp_path, rng):
    # llama.cpp keeps its own names for an architecture weightdiff maps none for (gpt-oss): its stacked
    # experts and their biases still read expert by expert
    gguf_build = pytest.importorskip("gguf_build")
    Q = gguf_build.gguf.GGMLQuantizationType
    w = rng.normal(0, 0.02, (4, 16, 32)).astype(np.float32)
    b = rng.normal(0, 0.02, (4, 16)).astype(np.float32)
    path = gguf_build.raw_gguf(tmp_path / "m.gguf", {"blk.0.ffn_gate_exps.weight": (w, Q.F32),
                                                     "blk.0.ffn_gate_exps.bias": (b, Q.F32),
                                                     "blk.0.attn_q.weight": (w[0], Q.F32)}, arch="gpt-oss")
    with locate(path) as ck:
        assert sorted(ck.tensors) == sorted(["blk.0.attn_q.weight"] + [f"blk.0.ffn_gate_exps.{e}.{leaf}"
                                                                       for e in range(4) for leaf in ("weight", "bias")])
        for e in range(4):
            assert np.array_equal(ck.read(f"blk.0.ffn_gate_exps.{e}.weight"), w[e])
            assert np.array_equal(ck.read(f"blk.0.ffn_gate_exps.{e}.bias"), b[e])
        assert "2 stacked expert tensors split" in ck.metadata["gguf.transforms"]


def test_a_gguf_stack_of_more_experts_than_any_model_is_refused_or_kept_whole(tmp_path):
    gguf_build = pytest.importorskip("gguf_build")
    Q = gguf_build.gguf.GGMLQuantizationType
    w = np.zeros((5000, 1, 32), np.float32)
    mapped = gguf_build.raw_gguf(tmp_path / "llama.gguf", {"blk.0.ffn_gate_exps.weight": (w, Q.F32)}, arch="llama")
    bad(mapped, "holds 5,000 stacked experts of 1 x 32: expected 1 to 4,096 experts")
    kept = gguf_build.raw_gguf(tmp_path / "oss.gguf", {"blk.0.ffn_gate_exps.weight": (w, Q.F32)}, arch="gpt-oss")
    with locate(kept) as ck:
        assert list(ck.tensors) == ["blk.0.ffn_gate_exps.weight"]


def test_fused_experts_in_a_pickle_split_like_safetensors(tmp_path, rng):
    # a pytorch_model.bin of the fused layout against the same weights in safetensors: every expert pairs
    # (the pickle's fused tensors stayed whole, and nothing of the experts was compared)
    torch = pytest.importorskip("torch")
    t = _gpt_oss(rng)
    (tmp_path / "bin").mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, tmp_path / "bin" / "pytorch_model.bin")
    write_checkpoint(tmp_path / "st", t, dtype="F32")
    with locate(tmp_path / "bin") as ck:
        assert sorted(ck.tensors) == sorted(_split(t))
        assert np.array_equal(ck.read(L + "2.down_proj"), t[L + "down_proj"][2])
        assert np.array_equal(np.concatenate([w.copy() for w in ck.windows(L + "3.gate_up_proj", 50)]),
                              t[L + "gate_up_proj"][3].reshape(-1))
        assert ck.metadata["weightdiff.experts"] == "5 fused expert tensors split into the experts' own"
    assert compare(tmp_path / "bin", tmp_path / "st").summary.verdict == "identical"
    tuned = {k: v.copy() for k, v in t.items()}
    tuned[L + "down_proj"][1] += 0.05
    write_checkpoint(tmp_path / "ft", tuned, dtype="F32")
    r = compare(tmp_path / "bin", tmp_path / "ft")
    assert [x.name for x in r.tensors if x.status == "changed"] == [L + "1.down_proj"]


def test_experts_fused_on_one_side_and_separate_on_the_other_are_not_called_unchanged(tmp_path, rng):
    # Mixtral as the Hub holds it (each expert's w1, w2, w3) against a raw transformers 5 state dict (the
    # experts fused in memory: gate_up_proj [E, 2I, H] = w1 over w3, down_proj [E, H, I]): the gate/up
    # matrices pair with nothing, and every expert's gate and up replaced at random read "DERIVED: ...
    # none of its own weights changed". Not paired, so not known: inconclusive, with the reason
    E, H, I = 4, 32, 48
    hub, raw = {}, {}
    for layer in range(2):
        w1, w3 = rng.normal(0, 0.05, (E, I, H)), rng.normal(0, 0.05, (E, I, H))
        w2 = rng.normal(0, 0.05, (E, H, I))
        att = rng.normal(0, 0.05, (H, H))
        pre = f"model.layers.{layer}."
        hub[pre + "self_attn.q_proj.weight"] = raw[pre + "self_attn.q_proj.weight"] = att
        for e in range(E):
            for w, arr in (("w1", w1), ("w2", w2), ("w3", w3)):
                hub[f"{pre}block_sparse_moe.experts.{e}.{w}.weight"] = arr[e]
        raw[pre + "mlp.experts.gate_up_proj"] = rng.normal(0, 0.05, (E, 2 * I, H))      # replaced: a fine-tune
        raw[pre + "mlp.experts.down_proj"] = w2
    write_checkpoint(tmp_path / "hub", hub, dtype="BF16")
    write_checkpoint(tmp_path / "raw", raw, dtype="BF16")
    r = compare(tmp_path / "hub", tmp_path / "raw", rank=False)
    assert r.summary.verdict == "inconclusive", r.summary.verdict_reason
    assert "relayout" in r.summary.flags
    assert "fused on one side and separate on the other" in r.summary.verdict_reason
    assert "none of its own weights changed" not in " ".join(r.summary.headline)
    # a real addition (a new block's tensors) is not a relayout: derived, as before
    grown = dict(hub, **{"model.layers.2.self_attn.q_proj.weight": rng.normal(0, 0.05, (H, H))})
    write_checkpoint(tmp_path / "grown", grown, dtype="BF16")
    r = compare(tmp_path / "hub", tmp_path / "grown", rank=False)
    assert r.summary.verdict == "derived" and "relayout" not in r.summary.flags


def test_inspect_lists_the_names_compare_uses(tmp_path, rng):
    # --include / --exclude match the split names (`experts.3.gate_up_proj`), which inspect did not list
    from click.testing import CliRunner

    from weightdiff.cli import main

    write_checkpoint(tmp_path / "m", _gpt_oss(rng), dtype="BF16")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "m"), "--tensors"])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(L)]
    assert [L + "3.gate_up_proj", "BF16", "24", "x", "32"] in rows and len(rows) == 4 * 4
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "m"), "--json", "--tensors"]).stdout)
    assert {"name": L + "0.down_proj_bias", "dtype": "BF16", "shape": [24]} in doc["tensor_list"]
    assert "tensor_list" not in json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "m"), "--json"]).stdout)


def test_a_head_replaced_by_one_of_the_same_size_is_not_a_relayout(tmp_path, rng):
    # a classifier head retrained under a new name beside a frozen body: an addition, not another layout
    base = {"model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.05, (32, 32)),
            "classifier.weight": rng.normal(0, 0.05, (2, 32))}
    tuned = {"model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"],
             "score.weight": rng.normal(0, 0.05, (2, 32))}
    write_checkpoint(tmp_path / "b", base)
    write_checkpoint(tmp_path / "t", tuned)
    r = compare(tmp_path / "b", tmp_path / "t", rank=False)
    assert r.summary.verdict == "derived" and "relayout" not in r.summary.flags
