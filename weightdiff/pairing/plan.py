"""Pairing: which tuned tensor is compared with which base tensor, from headers alone.

``plan(bases, tuned)`` reads names, shapes and dtypes only (no tensor bytes), so a
user learns of a vocabulary mismatch or a wrong base in seconds, before any heavy
compute. Every tuned tensor (and every base tensor nobody claims) ends in exactly one
``Pair`` whose ``kind`` says what the compute loop does with it:

    paired    same name after prefix alignment, same shape: compared element-wise
    resized   an embedding or LM head whose row count differs: the shared rows compared
    mismatch  same name, another shape that is not a vocabulary resize: reported only
    added     a tuned tensor no base explains (a new head, cross-attention)
    removed   a base tensor the tuned model lacks
    lora      a PEFT adapter factor pair against the base weight it modifies
    inherited a base tensor an adapter leaves untouched (unchanged by construction)

Prefix alignment is found, not configured: for each base, every split of names into
a prefix of up to three non-numeric components and a suffix is counted, and the
(tuned prefix, base prefix) with the most matching suffixes (same shape first) wins:
``model.`` vs none, ``base_model.model.`` from PEFT merges, ``transformer.`` for
GPT-2, ``encoder.``/``decoder.`` of a composite model against ``vit.`` and
``transformer.``. With several bases, the base with the strongest match claims its
sub-tree first. See docs/pairing.md for the rules and the worked examples.

>>> from types import SimpleNamespace as NS
>>> t = lambda s: NS(dtype="F32", shape=s, numel=s[0] * s[1])
>>> base = NS(tensors={"layers.0.w": t((2, 2))}, format="safetensors", lora=[], adapter=None)
>>> tuned = NS(tensors={"model.layers.0.w": t((2, 2))}, format="safetensors", lora=[], adapter=None)
>>> p = plan([base], tuned)
>>> [(x.kind, x.tuned_name, x.base_name) for x in p.pairs], p.alignment[0]["tuned_prefix"]
([('paired', 'model.layers.0.w', 'layers.0.w')], 'model.')
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Protocol, Sequence

from .names import _vocab_like, is_embedding, is_lm_head
from ..errors import escape_name

__all__ = ["Pair", "Plan", "plan", "KINDS", "is_embedding", "is_lm_head", "CheckpointLike"]

KINDS = ("paired", "resized", "mismatch", "added", "removed", "lora", "inherited")

#: prefixes are at most this many leading name components, never a block index
MAX_PREFIX_PARTS = 3

_PEFT_PREFIX = "base_model.model."
_PEFT_SEGMENTS = re.compile(r"\.(?:modules_to_save\.[^.]+|modules_to_save|original_module|base_layer)(?=\.)")


class CheckpointLike(Protocol):
    tensors: dict           # name -> TensorInfo (.dtype, .shape, .numel)
    format: str
    lora: list              # LoraFactor (.target, .a_name, .b_name, .magnitude_name, .r, .scale)
    adapter: Any


@dataclass
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

    @property
    def params(self) -> int:
        """Parameters this pair stands for: tuned elements, base elements when no tuned tensor."""
        shape = self.shape_base if self.kind in ("removed", "lora", "inherited") else self.shape_tuned
        return _numel(shape)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("tuned_name", "base_name", "base_index", "kind", "dtype_tuned",
                                            "dtype_base", "overlap_rows", "tied", "tuned_source")}
        d["shape_tuned"] = None if self.shape_tuned is None else list(self.shape_tuned)
        d["shape_base"] = None if self.shape_base is None else list(self.shape_base)
        if self.lora is not None:
            d["lora"] = {k: getattr(self.lora, k, None) for k in ("target", "r", "scale")}
        return d


@dataclass
class Plan:
    """The pairs in order, how each base was aligned, and notes for the user."""

    pairs: list[Pair]
    alignment: list[dict]
    notes: list[str] = field(default_factory=list)
    #: where each checkpoint came from when that could be in doubt (a Hub repo, or a local path
    #: spelled like one); printed with the plan, not part of the JSON
    sources: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        """Tensors and parameters per kind, and dtype changes (``"F32 -> BF16"``: tensors)."""
        tensors: Counter = Counter()
        params: Counter = Counter()
        dtypes: Counter = Counter()
        for p in self.pairs:
            tensors[p.kind] += 1
            params[p.kind] += p.params
            if p.dtype_base and p.dtype_tuned and p.dtype_base != p.dtype_tuned and p.kind != "lora":
                dtypes[f"{p.dtype_base} -> {p.dtype_tuned}"] += 1
        return {"tensors": {k: tensors[k] for k in KINDS if tensors[k]},
                "params": {k: params[k] for k in KINDS if tensors[k]},
                "dtype_changes": dict(sorted(dtypes.items())),
                "tied": sum(1 for p in self.pairs if p.tied)}

    def names(self, kind: str) -> list[str]:
        return [p.tuned_name if p.tuned_name is not None else p.base_name for p in self.pairs if p.kind == kind]

    def to_dict(self) -> dict:
        """The ``plan`` entry of the JSON: alignment, notes, counts, and the non-trivial pairs."""
        special = [p.to_dict() for p in self.pairs if p.kind in ("resized", "mismatch") or p.tied]
        return {"alignment": self.alignment, "notes": list(self.notes), "counts": self.counts,
                "added": self.names("added"), "removed": self.names("removed"), "special": special}


def _numel(shape: Iterable[int] | None) -> int:
    return 0 if shape is None else int(math.prod(int(s) for s in shape))


def _splits(name: str) -> list[tuple[str, str]]:
    """(prefix, suffix) splits: prefixes of up to MAX_PREFIX_PARTS non-numeric components,
    suffixes of at least two components (or the whole name).

    >>> _splits("model.layers.0.w.weight")
    [('', 'model.layers.0.w.weight'), ('model.', 'layers.0.w.weight'), ('model.layers.', '0.w.weight')]
    """
    parts = name.split(".")
    out = [("", name)]
    for k in range(1, min(MAX_PREFIX_PARTS, len(parts) - 2) + 1):
        if parts[k - 1].isdecimal():
            break
        out.append((".".join(parts[:k]) + ".", ".".join(parts[k:])))
    return out


@dataclass
class _Item:
    """A tuned-side entry: its matching key, the name reported, the tensor read, its header."""

    key: str
    source: str | None
    shape: tuple | None
    dtype: str | None
    lora: object | None = None


def _tuned_items(tuned: CheckpointLike, notes: list[str]) -> list[_Item]:
    tensors = tuned.tensors
    factors = list(getattr(tuned, "lora", None) or [])
    if getattr(tuned, "format", None) != "adapter" and not factors:
        return [_Item(n, n, tuple(i.shape), i.dtype) for n, i in tensors.items()]
    used = set()
    first: dict[str, int] = {}
    order = {n: i for i, n in enumerate(tensors)}
    items: list[tuple[int, _Item]] = []
    for f in factors:
        names = [f.a_name, f.b_name, getattr(f, "magnitude_name", None)]
        used.update(n for n in names if n)
        pos = min(order.get(n, len(order)) for n in names if n) if any(names) else len(order)
        a, b = tensors.get(f.a_name), tensors.get(f.b_name)
        dtype = (a or b).dtype if (a or b) is not None else None
        shape = None
        if a is not None and b is not None and len(a.shape) >= 2 and len(b.shape) >= 2:
            shape = (int(b.shape[0]), _numel(a.shape[1:]))
            if getattr(f, "embedding", False):      # embedding factors: A [r, vocab], B [dim, r]
                shape = (int(a.shape[1]), int(b.shape[0]))
        items.append((pos, _Item(f.target, None, shape, dtype, lora=f)))
        first.setdefault(f.target, pos)
    targets = {it.key: it.shape for _, it in items}
    for n, info in tensors.items():
        if n in used:
            continue
        key = n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n
        key = _PEFT_SEGMENTS.sub("", key)
        if key in targets and targets[key] == tuple(info.shape):
            # PEFT's save_embedding_layers stores the full base layer beside its factors; the
            # factors are the change, so the copy is not compared a second time
            notes.append(f"adapter also stores the full `{escape_name(key)}` beside its LoRA factors; "
                         "the change is measured from the factors")
            continue
        items.append((order[n], _Item(key, n, tuple(info.shape), info.dtype)))
    items.sort(key=lambda t: t[0])
    if factors:
        notes.append(f"adapter: {len(factors)} LoRA factor pairs, {len(items) - len(factors)} other tensors "
                     "(modules_to_save); base tensors the adapter leaves alone are `inherited`")
    return [it for _, it in items]


def _shape_ok(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and tuple(a) == tuple(b)


def _best_mapping(items: Sequence[_Item], base: CheckpointLike) -> tuple[tuple[int, int], str, str]:
    """The (tuned prefix, base prefix) matching the most suffixes: ((same shape, by name), tp, bp)."""
    by_suffix: dict[str, list[tuple[str, Any]]] = {}
    for bname, info in base.tensors.items():
        for bp, s in _splits(bname):
            by_suffix.setdefault(s, []).append((bp, info))
    scores: dict[tuple[str, str], list[int]] = {}
    for it in items:
        for tp, s in _splits(it.key):
            for bp, info in by_suffix.get(s, ()):
                c = scores.setdefault((tp, bp), [0, 0])
                c[1] += 1
                c[0] += it.lora is not None or _shape_ok(it.shape, tuple(info.shape))
    if not scores:
        return (0, 0), "", ""
    (tp, bp), c = min(scores.items(), key=lambda kv: (-kv[1][0], -kv[1][1], len(kv[0][0]) + len(kv[0][1]), kv[0]))
    return (c[0], c[1]), tp, bp


def _mapped(key: str, tp: str, bp: str) -> str | None:
    return bp + key[len(tp):] if key.startswith(tp) else None


def _glob_filter(include: Sequence[str], exclude: Sequence[str]):
    def keep(name: str) -> bool:
        if include and not any(fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatchcase(name, p) for p in exclude)
    return keep


def plan(bases: Sequence[CheckpointLike], tuned: CheckpointLike, include: Sequence[str] = (),
         exclude: Sequence[str] = ()) -> Plan:
    """Pair the tuned checkpoint's tensors with those of one or more bases (headers only).

    ``include``/``exclude`` are fnmatch globs on the names reported (tuned names;
    for tensors only a base has, the base name moved into the tuned namespace).
    Order: the tuned checkpoint's tensor order, then base tensors nobody claimed
    (base by base, in file order). Never raises on odd names or shapes: a mismatch
    is data, not an error.
    """
    notes: list[str] = []
    keep = _glob_filter(tuple(include), tuple(exclude))
    items = _tuned_items(tuned, notes)
    adapter = any(it.lora is not None for it in items) or getattr(tuned, "format", None) == "adapter"
    n_before = len(items)
    items = [it for it in items if keep(it.key)]
    if len(items) < n_before:
        notes.append(f"--include/--exclude left out {n_before - len(items)} of {n_before} tuned tensors")

    # -- alignment: strongest base first claims the tuned keys it explains
    mapping: dict[int, tuple[str, str]] = {}    # in claiming order
    alignment: dict[int, dict] = {}
    remaining = list(items)
    todo = list(range(len(bases)))
    while todo:
        scored = [(_best_mapping(remaining, bases[i]), i) for i in todo]
        ((score, tp, bp), i) = min(scored, key=lambda s: (-s[0][0][0], -s[0][0][1], s[1]))
        todo.remove(i)
        btensors = bases[i].tensors
        if score[1]:
            mapping[i] = (tp, bp)
            remaining = [it for it in remaining if _mapped(it.key, tp, bp) not in btensors]
        alignment[i] = {"base": i, "tuned_prefix": tp if score[1] else None,
                        "base_prefix": bp if score[1] else None, "matched": 0,
                        "base_tensors": len(btensors), "subtree": tp if score[1] else None}

    # -- pairs in tuned order
    used: list[set[str]] = [set() for _ in bases]
    vocab = _vocab_sizes(items, bases, mapping)
    out: list[tuple[tuple, Pair]] = []
    for pos, it in enumerate(items):
        pair = None
        for i, (tp, bp) in mapping.items():
            bname = _mapped(it.key, tp, bp)
            if bname is None or bname not in bases[i].tensors or bname in used[i]:
                continue
            used[i].add(bname)
            pair = _make_pair(it, bname, bases[i].tensors[bname], i, vocab)
            break
        if pair is None:
            pair = Pair(it.key, None, 0, "added", it.shape, None, it.dtype, None, lora=it.lora,
                        tuned_source=_source(it))
            if it.lora is not None:
                notes.append(f"adapter factor for `{escape_name(it.key)}` has no base tensor to modify")
        out.append(((0, pos, 0), pair))

    _tie_heads(out, items, bases, mapping, used, notes)
    for i, base in enumerate(bases):
        tp, bp = mapping.get(i, ("", ""))
        for pos, (bname, info) in enumerate(base.tensors.items()):
            if bname in used[i]:
                continue
            shown = tp + bname[len(bp):] if bname.startswith(bp) else bname
            if not keep(shown):
                continue
            if adapter:
                out.append(((1, i, pos), Pair(shown, bname, i, "inherited", None, tuple(info.shape), None,
                                               info.dtype)))
            else:
                out.append(((1, i, pos), Pair(None, bname, i, "removed", None, tuple(info.shape), None,
                                               info.dtype)))
    out.sort(key=_adapter_key(bases) if adapter else (lambda t: t[0]))
    pairs = [p for _, p in out]
    for p in pairs:
        if p.base_name is not None and p.kind not in ("removed", "inherited"):
            alignment[p.base_index]["matched"] += 1
    for i in range(len(bases)):
        a = alignment[i]
        if a["tuned_prefix"] is None:
            notes.insert(0, f"base {i} shares no tensor name with the tuned model, even after prefix alignment")
        elif a["tuned_prefix"] or a["base_prefix"]:
            notes.insert(0, f"base {i}: tuned `{escape_name(a['tuned_prefix'])}*` aligned with base "
                            f"`{escape_name(a['base_prefix'])}*` ({a['matched']} tensors)")
    _summarise_notes(pairs, notes)
    return Plan(pairs, [alignment[i] for i in range(len(bases))], notes)


def _source(it: _Item) -> str | None:
    return it.source if it.source is not None and it.source != it.key else None


def _vocab_sizes(items: Sequence[_Item], bases: Sequence[CheckpointLike],
                 mapping: dict[int, tuple[str, str]]) -> tuple[set[int], set[int]]:
    """Row counts of the embeddings on each side (to recognise LM-head biases and the like)."""
    tuned_rows = {int(it.shape[0]) for it in items if it.shape and is_embedding(it.key)}
    base_rows = {int(info.shape[0]) for i in mapping for n, info in bases[i].tensors.items()
                 if len(info.shape) and is_embedding(n)}
    return tuned_rows, base_rows


def _make_pair(it: _Item, bname: str, info: Any, i: int, vocab: tuple[set[int], set[int]]) -> Pair:
    sb = tuple(int(s) for s in info.shape)
    if it.lora is not None:
        p = Pair(it.key, bname, i, "lora", sb, sb, it.dtype, info.dtype, lora=it.lora)
        return p
    st = tuple(int(s) for s in it.shape)
    kind, overlap = "paired", None
    if st != sb:
        kind = "mismatch"
        if len(st) == len(sb) >= 1 and st[1:] == sb[1:] and (
                _vocab_like(it.key) or (st[0] in vocab[0] and sb[0] in vocab[1])):
            kind, overlap = "resized", min(st[0], sb[0])
    return Pair(it.key, bname, i, kind, st, sb, it.dtype, info.dtype, overlap_rows=overlap,
                tuned_source=_source(it))


def _tie_heads(out: list[tuple[tuple, Pair]], items: Sequence[_Item], bases: Sequence[CheckpointLike],
               mapping: dict[int, tuple[str, str]], used: list[set[str]], notes: list[str]) -> None:
    """Tied embeddings: an LM head present on one side only stands in for the other side's embedding."""
    tuned_keys = {it.key: it for it in items}
    for j, (pos, p) in enumerate(out):
        # the tuned model has its own head but the base ties it: compare it with the base embedding
        if p.kind == "added" and p.lora is None and is_lm_head(p.tuned_name):
            for i, (tp, bp) in sorted(mapping.items()):
                if not p.tuned_name.startswith(_parent(tp)):   # heads sit next to the aligned trunk
                    continue
                emb = _embedding_for(bases[i].tensors, bp, p.shape_tuned)
                if emb is not None:
                    it = tuned_keys[p.tuned_name]
                    q = _make_pair(it, emb, bases[i].tensors[emb], i, (set(), set()))
                    if q.kind == "mismatch" and q.shape_tuned[1:] == q.shape_base[1:]:
                        q.kind, q.overlap_rows = "resized", min(q.shape_tuned[0], q.shape_base[0])
                    out[j] = (pos, q)
                    notes.append(f"`{escape_name(p.tuned_name)}` compared with the base embedding "
                                 f"`{escape_name(emb)}` (the base ties its LM head)")
                    break
    # the base has a head that the tuned model ties: the tuned embedding stands in for it
    for i, (tp, bp) in sorted(mapping.items()):
        for bname, info in bases[i].tensors.items():
            if bname in used[i] or not is_lm_head(bname) or not bname.startswith(bp):
                continue
            shown = tp + bname[len(bp):]
            if shown in tuned_keys:
                continue
            emb_t = _embedding_for({it.key: it for it in items if it.key.startswith(tp) and it.lora is None},
                                   tp, tuple(info.shape))
            if emb_t is None:
                continue
            it = tuned_keys[emb_t]
            q = _make_pair(_Item(shown, it.source, it.shape, it.dtype), bname, info, i, (set(), set()))
            if q.kind == "mismatch" and q.shape_tuned[1:] == q.shape_base[1:]:
                q.kind, q.overlap_rows = "resized", min(q.shape_tuned[0], q.shape_base[0])
            q.tied, q.tuned_source = True, it.source or emb_t
            used[i].add(bname)
            at = next(pos for pos, x in out if x.tuned_name == emb_t)
            out.append(((0, at[1], 1), q))
            notes.append(f"the tuned model has no `{escape_name(shown)}`: its embedding `{escape_name(emb_t)}` "
                         "(tied) is compared with the base head")


def _parent(prefix: str) -> str:
    """``decoder.transformer.`` -> ``decoder.``; ``transformer.`` -> ``""``."""
    parts = prefix.split(".")[:-1]
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else ""


def _embedding_for(tensors: dict, prefix: str, shape: tuple | None) -> str | None:
    """The first embedding under ``prefix`` whose row width matches ``shape``."""
    for name, info in tensors.items():
        if name.startswith(prefix) and is_embedding(name) and shape is not None \
                and tuple(info.shape)[1:] == tuple(shape)[1:]:
            return name
    return None


def _adapter_key(bases: Sequence[CheckpointLike]):
    """Adapters follow the base's order (the tuned model is the base, modified); unmatched last."""
    where = {(i, n): k for i, b in enumerate(bases) for k, n in enumerate(b.tensors)}

    def key(t: tuple[tuple, Pair]) -> tuple:
        pos, p = t
        if p.base_name is None:
            return (1, 0, pos[1], 0)
        return (0, p.base_index, where.get((p.base_index, p.base_name), 0), 0 if p.kind == "lora" else 1)

    return key


def _summarise_notes(pairs: Sequence[Pair], notes: list[str]) -> None:
    kinds = Counter(p.kind for p in pairs)
    for p in pairs:
        if p.kind == "resized":
            grew = "grew" if p.shape_tuned[0] > p.shape_base[0] else "shrank"
            notes.append(f"vocabulary {grew}: `{escape_name(p.tuned_name)}` has {p.shape_tuned[0]:,} rows, "
                         f"the base {p.shape_base[0]:,}; the {p.overlap_rows:,} shared rows are compared")
    if kinds["mismatch"]:
        n = kinds["mismatch"]
        notes.append(f"{n} {'tensors have' if n != 1 else 'tensor has'} another shape than in the base and "
                     f"{'are' if n != 1 else 'is'} not compared element by element")
    if kinds["added"]:
        n = kinds["added"]
        notes.append(f"{n} tuned {'tensors have' if n != 1 else 'tensor has'} no counterpart in the base (added)")
    if kinds["removed"]:
        n = kinds["removed"]
        notes.append(f"{n} base {'tensors are' if n != 1 else 'tensor is'} missing from the tuned model (removed)")
    dt = Counter(f"{p.dtype_base} -> {p.dtype_tuned}" for p in pairs
                 if p.kind in ("paired", "resized") and p.dtype_base != p.dtype_tuned)
    for change, n in sorted(dt.items()):
        notes.append(f"dtype changed {change} on {n} tensors")
