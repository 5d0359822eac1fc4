"""Tied LM heads: a head present on one side only stands in for the other side's embedding.

A model that ties its output head to its input embedding saves no ``lm_head.weight``;
when one side ties and the other does not, the effective heads are compared: the
tied side's embedding against the other side's head (docs/pairing.md, "tied heads").
"""

from __future__ import annotations

from typing import Sequence

from ..errors import escape_name
from .names import is_embedding, is_lm_head
from .pairs import CheckpointLike, Pair, _Item, make_pair

__all__ = ["tie_heads"]


def tie_heads(out: list[tuple[tuple, Pair]], items: Sequence[_Item], bases: Sequence[CheckpointLike],
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
                    q = make_pair(it, emb, bases[i].tensors[emb], i, (set(), set()))
                    q.paired_by = "tied"
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
            q = make_pair(_Item(shown, it.source, it.shape, it.dtype), bname, info, i, (set(), set()))
            if q.kind == "mismatch" and q.shape_tuned[1:] == q.shape_base[1:]:
                q.kind, q.overlap_rows = "resized", min(q.shape_tuned[0], q.shape_base[0])
            q.tied, q.tuned_source, q.paired_by = True, it.source or emb_t, "tied"
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
