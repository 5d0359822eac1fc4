"""Aggregation: tensor records -> blocks and module kinds.

Pure Python over ``TensorRecord``s (no arrays). ``aggregate`` fills each record's block
and module (``weightdiff.pairing.names.parse_name``) and rolls records up per block and
per module kind, with the per-record rules of ``judge.status``. It judges nothing: the
verdict is the next, separate step (``judge.verdict.summarise``). Definitions follow
DESIGN.md; docs/pairing.md has worked examples.

>>> r = TensorRecord("h.0.w", "h.0.w", "changed", [4, 4], [4, 4], "F32", "F32", 16, 16,
...                  norm_base=4.0, norm_delta=1.0, cosine=0.97, frac_changed=1.0, frac_beyond_rounding=1.0)
>>> blocks, modules = aggregate([r], Thresholds())
>>> blocks[0].block, blocks[0].rel_change, blocks[0].delta_params
('h.0', 0.25, 16)
"""

from __future__ import annotations

import math

from ..pairing.names import group_of, parse_name
from ..options import Thresholds
from ..records import BlockRecord, TensorRecord
from .status import (_NOT_CHANGED, placements, delta_params_range, extra_rows, is_changed, is_mismatch, is_tied,
                     max_rank_fields, norms_sq, ratio)

__all__ = ["aggregate"]


# ---------------------------------------------------------------- roll-up

class _Acc:
    """Running sums of one block or module kind."""

    def __init__(self) -> None:
        self.params = self.params_changed = self.tensors = self.tensors_changed = self.delta = self.delta_lo = 0
        self.nb2 = self.nd2 = 0.0
        self.ranked: list[TensorRecord] = []
        self.modules: dict[str, list[float]] = {}

    def add(self, rec: TensorRecord, facts: tuple, module: str | None = None) -> None:
        changed, delta, extra, sq, delta_lo = facts
        self.params += rec.numel
        self.tensors += 1
        # a tensor of another shape (never compared) is no measured change: not counted as changed here
        # (``scope.tensors_reshaped`` and ``scope.blocks_reshaped`` count it), though writing it down costs it whole
        measured = changed and not is_mismatch(rec)
        if rec.status == "added":
            self.params_changed += rec.numel
        elif measured:
            self.params_changed += rec.numel if rec.status != "resized" else rec.numel_compared + extra
        else:
            self.params_changed += extra
        self.tensors_changed += measured or rec.status == "added" or extra > 0
        self.delta += delta
        self.delta_lo += delta_lo
        if sq is not None:
            self.nb2 += sq[0]
            self.nd2 += sq[1]
            if module is not None:
                m = self.modules.setdefault(module, [0.0, 0.0])
                m[0] += sq[0]
                m[1] += sq[1]
        if changed and rec.rank is not None:
            self.ranked.append(rec)

    def as_dict(self) -> dict:
        return {"tensors": self.tensors, "tensors_changed": self.tensors_changed, "params": self.params,
                "params_changed": self.params_changed, "rel_change": ratio(self.nd2, self.nb2),
                "norm_base": math.sqrt(self.nb2), "norm_delta": math.sqrt(self.nd2), "delta_params": self.delta,
                "delta_params_lower": self.delta_lo if self.delta_lo != self.delta else None,
                **max_rank_fields(self.ranked)}


def _facts(rec: TensorRecord, thresholds: Thresholds) -> tuple:
    """What a block and a module kind add up of one record, worked out once for both:
    (changed, delta parameters, extra rows, squared norms or None, the least the delta parameters
    could be when the energy rank is a bracket)."""
    if rec.status in _NOT_CHANGED:      # not changed, no extra rows, nothing to write down (judge.status)
        return False, 0, 0, norms_sq(rec), 0
    dp_changed, dp_added, lo = delta_params_range(rec, thresholds)
    return is_changed(rec, thresholds), dp_changed + dp_added, extra_rows(rec), norms_sq(rec), lo + dp_added


def aggregate(records: list[TensorRecord], thresholds: Thresholds) -> tuple[list[BlockRecord], dict[str, dict]]:
    """Fill ``block``/``module`` of every record; return (blocks, module kinds).

    Blocks come in model order: ``embeddings`` (tensors outside blocks that embed),
    the numbered blocks (namespace by first appearance, then index), ``head`` (every
    other tensor outside blocks). Removed base tensors and tied-head rows (the tuned
    embedding shown again against the base head) are left out of blocks and modules.
    """
    placed = placements(records)
    for rec, name in zip(records, placed):
        rec.block, _, rec.module = parse_name(name)

    blocks: dict[str, _Acc] = {}
    index: dict[str, int | None] = {}
    namespaces: dict[str, int] = {}
    modules: dict[str, _Acc] = {}
    for rec, name in zip(records, placed):
        if rec.status == "removed" or is_tied(rec):
            continue
        # component_of(name): the block parse_name just gave, or the group outside blocks
        label = rec.block if rec.block is not None else group_of(name, rec.module)
        if label not in blocks:
            blocks[label] = _Acc()
            index[label] = parse_name(name)[1] if rec.block is not None else None
            namespaces.setdefault(label.rsplit(".", 1)[0] if rec.block is not None else label, len(namespaces))
        facts = _facts(rec, thresholds)
        blocks[label].add(rec, facts, rec.module)
        modules.setdefault(rec.module, _Acc()).add(rec, facts)

    def order(label: str) -> tuple:
        if index[label] is None:
            return (0 if label == "embeddings" else 2, 0, 0, label)
        return (1, namespaces[label.rsplit(".", 1)[0]], index[label], label)

    block_records = []
    for label in sorted(blocks, key=order):
        acc = blocks[label]
        block_records.append(BlockRecord(
            block=label, index=index[label], params=acc.params, params_changed=acc.params_changed,
            tensors=acc.tensors, tensors_changed=acc.tensors_changed, rel_change=ratio(acc.nd2, acc.nb2),
            norm_base=math.sqrt(acc.nb2), norm_delta=math.sqrt(acc.nd2), delta_params=acc.delta,
            **max_rank_fields(acc.ranked), modules={k: ratio(v[1], v[0]) for k, v in acc.modules.items()},
            delta_params_lower=acc.delta_lo if acc.delta_lo != acc.delta else None))
    module_dicts = {k: acc.as_dict() for k, acc in modules.items()}
    return block_records, module_dicts
