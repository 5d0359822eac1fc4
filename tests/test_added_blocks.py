"""Blocks the tuned model adds: counted once each, in time linear in the tensors, and said as added.

An added block of empty tensors was left out of ``blocks_changed`` yet subtracted from it as added
("in -1 of 1 blocks"), and the tensors in added blocks were counted against a set rebuilt for every tensor
(200,000 empty tensors in a 7.3 MB GGUF took minutes to compare)."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save_file

from weightdiff import compare
from weightdiff.judge.aggregate import aggregate
from weightdiff.judge.verdict import summarise
from weightdiff.options import Thresholds
from weightdiff.records import TensorRecord
from weightdiff.render import formats, sentences


class _Label(str):
    """A block label that counts how often it is hashed (a set built of it hashes every label again)."""

    hashed = 0

    def __hash__(self) -> int:
        _Label.hashed += 1
        return str.__hash__(self)


def _added(name: str, shape: list[int]) -> TensorRecord:
    return TensorRecord(name, None, "added", shape, None, None, "F32", int(np.prod(shape)), 0, compared="none")


def test_tensors_in_added_blocks_are_counted_in_linear_time():
    blocks_n, per_block = 1000, 2
    embed = TensorRecord("model.embed_tokens.weight", "model.embed_tokens.weight", "unchanged", [4, 8], [4, 8],
                         "F32", "F32", 32, 32, norm_base=1.0, norm_tuned=1.0, norm_delta=0.0, rel_change=0.0,
                         cosine=1.0, frac_changed=0.0, frac_beyond_rounding=0.0, max_abs_delta=0.0)
    records = [embed] + [_added(f"model.layers.{i}.mlp.up_proj{j}.weight", [8, 0])
                         for i in range(blocks_n) for j in range(per_block)]
    blocks, _ = aggregate(records, Thresholds())
    for r in records:
        if r.block is not None:
            r.block = _Label(r.block)
    _Label.hashed = 0
    s = summarise(records, blocks, Thresholds())
    # a set of the 1,000 added labels rebuilt for each of the 2,000 tensors hashed them 2,000,000 times;
    # counted against one set, each tensor's label is hashed a few times
    assert _Label.hashed < 20 * len(records), _Label.hashed
    added = s.scope["blocks_added"]
    assert len(added["blocks"]) == blocks_n and added["tensors"] == blocks_n * per_block
    assert s.blocks_changed == blocks_n == s.blocks_total


def test_an_added_block_of_one_empty_tensor_is_said_as_added(tmp_path):
    e = np.ones((4, 64), np.float32)
    save_file({"model.embed_tokens.weight": e}, tmp_path / "base.safetensors")
    save_file({"model.embed_tokens.weight": e, "model.layers.0.mlp.up_proj.weight": np.zeros((64, 0), np.float32)},
              tmp_path / "tuned.safetensors")
    result = compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    data = result.to_dict()
    s = data["summary"]
    assert s["scope"]["blocks_added"] == {"blocks": ["layers.0"], "tensors": 1}
    # the added block is among the changed ones, as every added block with parameters is (docs/json-schema.md)
    assert s["blocks_changed"] == s["scope"]["blocks_changed"] == 1
    assert s["scope"]["changed_blocks"] == ["layers.0"]
    reason = sentences.verdict_reason(data)
    assert "-1" not in reason and "in 0 of 1 blocks; 1 block added" in reason, reason
    assert formats.summary_blocks_text(s) == "0 of 1 blocks changed, 1 added (not in the base)"
    plain = " ".join(sentences.plain_language(data))
    assert "its one block was added (not in the base)" in plain and "was not changed and 1 was added" not in plain
