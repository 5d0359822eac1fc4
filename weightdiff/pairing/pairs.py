"""The pairing stage's records: ``Pair`` (one line of the plan), ``Plan`` and how a pair is made.

``weightdiff.pairing.plan`` builds a ``Plan`` from names; ``pairing.heads`` (tied LM
heads) and ``pairing.align`` (content pairing) add pairs to it with ``make_pair``. The
measure stage reads ``Pair`` and never builds one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from .names import _vocab_like, is_router

__all__ = ["Pair", "Plan", "KINDS", "PAIRED_BY", "CheckpointLike", "make_pair"]

KINDS = ("paired", "resized", "mismatch", "added", "removed", "lora", "inherited")
#: how a pair was made, in the order the plan reports them
PAIRED_BY = ("name", "prefix", "rename", "tied", "content")


class CheckpointLike(Protocol):
    tensors: dict           # name -> TensorInfo (.dtype, .shape, .numel)
    format: str
    lora: list              # LoraFactor (.target, .a_name, .b_name, .magnitude_name, .r, .scale)
    adapter: Any


@dataclass(slots=True)
class Pair:
    """One line of the plan: a tuned tensor, the base tensor it is compared with, and how."""

    tuned_name: str | None        # name reported (tuned namespace); None for `removed`
    base_name: str | None         # None for `added`
    base_index: int               # which base (composite models have several)
    kind: str                     # one of KINDS
    shape_tuned: tuple | None
    shape_base: tuple | None
    dtype_tuned: str | None
    dtype_base: str | None
    overlap_rows: int | None = None   # resized: rows compared (a contiguous prefix on both sides)
    tied: bool = False                # tuned lm_head missing -> the tuned embedding stands in
    lora: object | None = None        # LoraFactor when the tuned side is an adapter
    tuned_source: str | None = None   # the tuned tensor to read when it differs from tuned_name
    paired_by: str | None = None      # one of PAIRED_BY when the pair has both sides
    transposed: bool = False          # content pairing: the tuned matrix is the base's transpose
    #: removed: a base parameter the tuned model's exporter folded into a computed constant
    #: (``pairing.folded``): {into, rows ([first, end) of the base's rows it holds bitwise, or None), known}
    folded: dict | None = None
    #: removed: a base parameter outside the numbered blocks that the tuned ONNX model does not hold: an
    #: exporter drops what no exported output reads (BERT's pooler in a feature-extraction export)
    pruned: bool = False
    #: a base bias an adapter's ``lora_B.bias`` (``lora_bias: true``) changes: the LoraFactor; the tuned
    #: tensor is the merged bias, base + scale x lora_B.bias, as PEFT merges it
    lora_bias: object | None = None
    #: an IA3 adapter's vector (``io.peft_adapter.IA3Vector``) merged into this base weight (``ia3``: the tuned
    #: tensor is W x l) or bias (``ia3_bias``: b x l, a layer whose outputs it scales), as PEFT merges it
    ia3: object | None = None
    ia3_bias: object | None = None

    @property
    def shape(self) -> tuple | None:
        """The shape this pair stands for: the tuned tensor's, the base's when there is no tuned tensor."""
        return self.shape_base if self.kind in ("removed", "lora", "inherited") else self.shape_tuned

    @property
    def params(self) -> int:
        """Parameters this pair stands for: tuned elements, base elements when no tuned tensor."""
        return _numel(self.shape)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("tuned_name", "base_name", "base_index", "kind", "dtype_tuned",
                                            "dtype_base", "overlap_rows", "tied", "tuned_source",
                                            "paired_by", "transposed")}
        if self.folded is not None:
            d["folded"] = dict(self.folded)
        if self.pruned:
            d["pruned"] = True
        d["shape_tuned"] = None if self.shape_tuned is None else list(self.shape_tuned)
        d["shape_base"] = None if self.shape_base is None else list(self.shape_base)
        if self.lora is not None:
            d["lora"] = {k: getattr(self.lora, k, None) for k in ("target", "r", "scale", "transposed")}
            if getattr(self.lora, "kind", "LORA") != "LORA":      # LoHa / LoKr (a LoRA's dict is as it was)
                d["lora"]["kind"] = self.lora.kind
        v = self.ia3 if self.ia3 is not None else self.ia3_bias
        if v is not None:
            d["ia3"] = {"vector": v.name, "scales": v.scales, "bias": self.ia3_bias is not None,
                        "transposed": v.transposed, "groups": v.groups}
        return d


@dataclass
class Plan:
    """The pairs in order, how each base was aligned, and notes for the user."""

    pairs: list[Pair]
    alignment: list[dict]
    notes: list[str] = field(default_factory=list)
    buffers: list[dict] = field(default_factory=list)   # {name, side, dtype, shape}: never compared
    #: tied tensors saved twice (``pairing.heads.tie_aliases``): {name, side, alias_of, dtype, shape}
    aliases: list[dict] = field(default_factory=list)
    #: where each checkpoint came from when that could be in doubt (a Hub repo, or a local path
    #: spelled like one); printed with the plan, not part of the JSON
    sources: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        """Tensors and parameters per kind, and dtype changes (``"F32 -> BF16"``: tensors)."""
        tensors: Counter = Counter()
        params: Counter = Counter()
        dtypes: Counter = Counter()
        by: Counter = Counter()
        for p in self.pairs:
            tensors[p.kind] += 1
            if p.paired_by:
                by[p.paired_by] += 1
            params[p.kind] += p.params
            if p.dtype_base and p.dtype_tuned and p.dtype_base != p.dtype_tuned and p.kind != "lora":
                dtypes[f"{p.dtype_base} -> {p.dtype_tuned}"] += 1
        return {"tensors": {k: tensors[k] for k in KINDS if tensors[k]},
                "params": {k: params[k] for k in KINDS if tensors[k]},
                "dtype_changes": dict(sorted(dtypes.items())),
                "tied": sum(1 for p in self.pairs if p.tied),
                "paired_by": {k: by[k] for k in PAIRED_BY if by[k]},
                "buffers": len(self.buffers), **({"aliases": len(self.aliases)} if self.aliases else {})}

    @property
    def folded(self) -> list[dict]:
        """The base parameters the tuned model's exporter folded into computed constants (``Pair.folded``):
        {base_name, base_index, shape, into, rows, known}."""
        return [{"base_name": p.base_name, "base_index": p.base_index, "shape": list(p.shape_base or ()),
                 **p.folded} for p in self.pairs if p.folded is not None]

    @property
    def pruned(self) -> list[dict]:
        """The base parameters the tuned ONNX model does not hold, outside the blocks (``Pair.pruned``):
        {base_name, base_index, shape}."""
        return [{"base_name": p.base_name, "base_index": p.base_index, "shape": list(p.shape_base or ())}
                for p in self.pairs if p.pruned]

    def names(self, kind: str) -> list[str]:
        return [p.tuned_name if p.tuned_name is not None else p.base_name for p in self.pairs if p.kind == kind]

    def to_dict(self) -> dict:
        """The ``plan`` entry of the JSON: alignment, notes, counts, and the non-trivial pairs."""
        special = [p.to_dict() for p in self.pairs if p.kind in ("resized", "mismatch") or p.tied
                   or p.paired_by in ("rename", "content") or p.transposed]
        folded, pruned = self.folded, self.pruned
        return {"alignment": self.alignment, "notes": list(self.notes), "counts": self.counts,
                "added": self.names("added"), "removed": self.names("removed"), "special": special,
                "buffers": list(self.buffers), "aliases": list(self.aliases), **({"folded": folded} if folded else {}),
                **({"pruned": pruned} if pruned else {})}


def _numel(shape: Iterable[int] | None) -> int:
    if shape is None:
        return 0
    if type(shape) is tuple:    # a pair's shape, asked of every pair several times (progress, counts)
        try:
            n = _NUMELS.get(shape)
        except TypeError:       # an unhashable dimension: counted below, as any other shape
            n = None
        if n is not None:
            return n
        n = int(math.prod(int(s) for s in shape))
        if len(_NUMELS) < 4096:
            _NUMELS[shape] = n  # equal tuples have equal products of their int()s
        return n
    return int(math.prod(int(s) for s in shape))


#: element counts of the shapes seen (a model has a few hundred distinct shapes)
_NUMELS: dict[tuple, int] = {}


@dataclass(slots=True)
class _Item:
    """A tuned-side entry: its matching key, the name reported, the tensor read, its header."""

    key: str
    source: str | None
    shape: tuple | None
    dtype: str | None
    lora: object | None = None
    renamed: bool = False
    lora_bias: object | None = None    # the LoraFactor whose ``lora_B.bias`` this bias entry stands for
    ia3: object | None = None          # the IA3Vector merged into this weight




def source_of(it: _Item) -> str | None:
    return it.source if it.source is not None and it.source != it.key else None


def _shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of ints: the header's own tuple when it is one already (a reader
    shares one tuple per distinct shape; 100,000 pairs need no copies of it)."""
    if type(shape) is tuple:
        for d in shape:             # (a loop, not a generator: asked twice for each of 100,000 pairs)
            if type(d) is not int:
                break
        else:
            return shape
    return tuple(map(int, shape))


def make_pair(it: _Item, bname: str, info: Any, i: int, vocab: tuple[set[int], set[int]]) -> Pair:
    sb = _shape(info.shape)
    if it.lora is not None:
        p = Pair(it.key, bname, i, "lora", sb, sb, it.dtype, info.dtype, lora=it.lora)
        return p
    if it.ia3 is not None:
        # the merged weight: the base's shape, in the base's dtype (PEFT's merge casts back to it)
        return Pair(it.key, bname, i, "paired", sb, sb, info.dtype, info.dtype, tuned_source=it.source, ia3=it.ia3)
    st = _shape(it.shape)
    kind, overlap = "paired", None
    if st != sb:
        kind = "mismatch"
        if len(st) == len(sb) >= 1 and st[1:] == sb[1:] and (
                _vocab_like(it.key) or (st[0] in vocab[0] and sb[0] in vocab[1])
                or (len(st) <= 2 and is_router(it.key))):     # experts added or removed: a router's rows
            kind, overlap = "resized", min(st[0], sb[0])
    # the same name stored transposed (GPT-2's Conv1D against a Linear export): compared as its transpose
    transposed = kind == "mismatch" and len(st) == len(sb) == 2 and st == sb[::-1]
    return Pair(it.key, bname, i, "paired" if transposed else kind, st, sb, it.dtype, info.dtype,
                overlap_rows=overlap, tuned_source=source_of(it), transposed=transposed, lora_bias=it.lora_bias)
