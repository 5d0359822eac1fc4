"""Tied LM heads: a head present on one side only stands in for the other side's embedding.

A model that ties its output head to its input embedding saves no ``lm_head.weight``;
when one side ties and the other does not, the effective heads are compared: the
tied side's embedding against the other side's head (docs/pairing.md, "tied heads").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import escape_name
from ..io.model_config import HeadTie, ties_head
from .align import fingerprint_indices
from .names import is_embedding, is_lm_head
from .pairs import CheckpointLike, Pair, _Item, make_pair

__all__ = ["tie_heads", "tie_aliases"]


def tie_heads(out: list[tuple[tuple, Pair]], items: Sequence[_Item], bases: Sequence[CheckpointLike],
               mapping: dict[int, tuple[str, str]], used: list[set[str]], notes: list[str],
               tuned: CheckpointLike | None = None) -> None:
    """Tied embeddings: an LM head present on one side only stands in for the other side's
    embedding, when that side ties its head: its config.json says so (``tie_word_embeddings``,
    or transformers' default for its model type), or it has no config (the tie is then
    assumed, and the note says so). A side whose config says it does not tie has no head:
    the other side's head is ``added`` or ``removed`` (a reward model that drops the LM head)."""
    tuned_keys = {it.key: it for it in items}
    base_ties: dict[int, HeadTie] = {}
    dropped: list[int] = []
    for j, (pos, p) in enumerate(out):
        # the tuned model has its own head but the base ties it: compare it with the base embedding
        if p.kind == "added" and is_lm_head(p.tuned_name):
            for i, (tp, bp) in sorted(mapping.items()):
                if not p.tuned_name.startswith(_parent(tp)):   # heads sit next to the aligned trunk
                    continue
                emb = _embedding_for(bases[i].tensors, bp, p.shape_tuned,
                                     any_shape=p.ia3 is not None or getattr(p.lora, "kind", None) == "TOKENS")
                if emb is not None:
                    tie = base_ties.setdefault(i, ties_head(bases[i]))
                    if tie.ties is False:
                        notes.append(f"`{escape_name(p.tuned_name)}` is added: the base has no LM head and does "
                                     f"not tie one to its embedding ({tie.why})")
                        break
                    it = tuned_keys[p.tuned_name]
                    if p.ia3 is not None:
                        shown = tp + emb[len(bp):]
                        if shown in tuned_keys or emb in used[i]:
                            break           # the adapter stores that table too (modules_to_save): left as is
                        # IA3 on the head of a tied base: PEFT's merge multiplies the one tensor the head and the
                        # embedding both read (the merged model stays tied), so it is measured as that table
                        q = make_pair(_Item(shown, it.source, None, it.dtype, ia3=it.ia3), emb,
                                      bases[i].tensors[emb], i, (set(), set()))
                        q.paired_by = "tied"
                        used[i].add(emb)
                        out[j] = (pos, q)
                        notes.append(f"IA3 on `{escape_name(p.tuned_name)}` scales the base embedding "
                                     f"`{escape_name(emb)}`, which the base ties as its LM head{_assumed(tie)}: "
                                     "PEFT's merge scales the one table both read")
                        break
                    if getattr(p.lora, "kind", None) == "TOKENS" and _tied_rows(out, p.lora, i, emb):
                        # trainable tokens on the head of a tied base, with the embedding's ids: PEFT ties the
                        # head's rows to the embedding's (one set of rows for the table both read), measured once
                        lost = f"adapter factor for `{escape_name(p.tuned_name)}` has no base tensor to modify"
                        if lost in notes:
                            notes.remove(lost)
                        dropped.append(j)
                        notes.append(f"trainable token rows of `{escape_name(p.tuned_name)}` are the tied copy of the "
                                     f"embedding's (the base ties its LM head to `{escape_name(emb)}`"
                                     f"{_assumed(tie)}): PEFT applies one set of rows to the table both read, "
                                     "measured once")
                        break
                    q = make_pair(it, emb, bases[i].tensors[emb], i, (set(), set()))
                    q.paired_by = "tied"
                    if p.lora is not None:
                        # a LoRA on the head of a tied base: the factors change the head the base
                        # ties to its embedding, and only the head (the embedding lookup keeps the
                        # base table, inherited): the adapted model unties its head
                        lost = f"adapter factor for `{escape_name(p.tuned_name)}` has no base tensor to modify"
                        if lost in notes:
                            notes.remove(lost)
                        out[j] = (pos, q)
                        notes.append(f"LoRA on `{escape_name(p.tuned_name)}` modifies the base embedding "
                                     f"`{escape_name(emb)}`, which the base ties as its LM head"
                                     f"{_assumed(tie)}: the adapted head is untied from the embedding, "
                                     "which itself is unchanged")
                        break
                    if q.kind == "mismatch" and q.shape_tuned[1:] == q.shape_base[1:]:
                        q.kind, q.overlap_rows = "resized", min(q.shape_tuned[0], q.shape_base[0])
                    out[j] = (pos, q)
                    notes.append(f"`{escape_name(p.tuned_name)}` compared with the base embedding "
                                 f"`{escape_name(emb)}` (the base ties its LM head{_assumed(tie)})")
                    break
    for j in reversed(dropped):
        del out[j]
    # the base has a head that the tuned model ties: the tuned embedding stands in for it
    tuned_tie: list[HeadTie] = []
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
            if not tuned_tie:
                tuned_tie.append(ties_head(tuned) if tuned is not None else HeadTie(None, ""))
            if tuned_tie[0].ties is False:
                notes.append(f"base `{escape_name(bname)}` is removed: the tuned model has no LM head and does not "
                             f"tie one to its embedding ({tuned_tie[0].why})")
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
                         f"(tied{_assumed(tuned_tie[0])}) is compared with the base head")


def _tied_rows(out: list[tuple[tuple, Pair]], head, i: int, emb: str) -> bool:
    """Whether trainable tokens ``head`` (on the LM head of a base that ties it to ``emb``) have a twin on that
    embedding with the same ids: PEFT then ties the head's rows to the embedding's; the twin is told to check
    that the two saved copies hold the same values (``tied_copy``)."""
    for _, q in out:
        f = q.lora
        if f is not None and f.kind == "TOKENS" and q.kind == "lora" and q.base_index == i and q.base_name == emb:
            if tuple(f.tokens) == tuple(head.tokens):
                f.tied_copy = head.parts["rows"]
                return True
    return False


def _assumed(tie: HeadTie) -> str:
    """The clause a tie note adds when no config says the side ties (the tie is assumed)."""
    return f"; assumed, as {tie.why.removesuffix(', so the tie is assumed')}" if tie.ties is None and tie.why else ""


def _parent(prefix: str) -> str:
    """``decoder.transformer.`` -> ``decoder.``; ``transformer.`` -> ``""``."""
    parts = prefix.split(".")[:-1]
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else ""


def _embedding_for(tensors: dict, prefix: str, shape: tuple | None, any_shape: bool = False) -> str | None:
    """The first embedding under ``prefix`` whose row width matches ``shape``, or whose shape is its
    transpose (an ONNX export stores the head of a tied model transposed, as its MatMul reads it); with
    ``any_shape``, the first 2-D one (an IA3 vector, checked against it later)."""
    for name, info in tensors.items():
        if not (name.startswith(prefix) and is_embedding(name)):
            continue
        if any_shape and len(info.shape) == 2:
            return name
        if shape is not None and (tuple(info.shape)[1:] == tuple(shape)[1:]
                                  or (len(shape) == 2 and tuple(info.shape) == tuple(shape)[::-1])):
            return name
    return None


# ---------------------------------------------------------------- tied aliases saved twice

#: elements per window when two tensors are compared byte for byte
_ALIAS_WINDOW = 1 << 22


def _tie_family(name: str) -> str | None:
    """``"weight"`` for a token embedding or an LM head, ``"bias"`` for the bias of a
    prediction head (BERT's ``cls.predictions.bias`` and its ``decoder.bias``): the only
    tensors a tie makes one (``tie_word_embeddings``, BERT's decoder bias); None otherwise."""
    if is_embedding(name) or is_lm_head(name):
        return "weight"
    if name.endswith("predictions.bias") or name.endswith("predictions.decoder.bias"):
        return "bias"
    return None


def _same_bytes(ckpt, a: str, b: str) -> bool:
    """Whether two tensors of one checkpoint hold the same bytes (same dtype and shape checked
    by the caller): a few sampled rows first, then every element in windows."""
    if not hasattr(ckpt, "windows") or a in (getattr(ckpt, "quant", None) or {}) \
            or b in (getattr(ckpt, "quant", None) or {}):
        return False
    try:
        shape = tuple(ckpt.tensors[a].shape)
        if len(shape) >= 2 and hasattr(ckpt, "read_rows"):
            rows = fingerprint_indices(int(shape[0]), 8)
            if np.asarray(ckpt.read_rows(a, rows)).tobytes() != np.asarray(ckpt.read_rows(b, rows)).tobytes():
                return False
        for x, y in zip(ckpt.windows(a, _ALIAS_WINDOW), ckpt.windows(b, _ALIAS_WINDOW), strict=True):
            if np.asarray(x).view(np.uint8).tobytes() != np.asarray(y).view(np.uint8).tobytes():
                return False
        return True
    except (ValueError, KeyError, OSError, IndexError):
        return False


def _alias_of(ckpt, name: str, info_of, partners) -> str | None:
    """The first partner (a paired tensor of the same tie family, dtype and shape) that
    ``name`` is bitwise equal to."""
    family, (dtype, shape) = _tie_family(name), info_of(name)
    if family is None or not shape:
        return None
    for other in partners:
        if other != name and _tie_family(other) == family and info_of(other) == (dtype, shape) \
                and _same_bytes(ckpt, name, other):
            return other
    return None


def tie_aliases(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                used: list[set[str]], notes: list[str]) -> list[dict]:
    """Tied tensors saved twice (``save_file(model.state_dict())`` keeps the aliases that
    ``save_pretrained`` drops: T5's ``encoder.embed_tokens`` and ``lm_head`` beside ``shared``,
    BERT's ``cls.predictions.decoder.weight``/``.bias``): one side's tensor that no name
    pairs, whose name is a tie (``_tie_family``) and whose bytes equal a tensor of the same
    family on the same side that is paired, is that tensor again. It is taken out of the
    plan (tuned side: not ``added``; base side: not ``removed``) and returned as
    ``{name, side, alias_of, dtype, shape}``, with a note. Run right after name pairing,
    before the tied-head rule. Equal bytes alone never make an alias: a new head that
    happens to equal another tensor under any other name stays ``added``."""
    aliases: list[dict] = []
    # only a side with unpaired tensors can hold an alias: nothing is looked at otherwise (a
    # 100,000-tensor checkpoint pairs every name, and this step must cost it nothing per tensor)
    has_added = any(p.kind == "added" and p.lora is None for _, p in out)
    infos = tuned.tensors

    def t_info(n: str):
        i = infos.get(n)
        return None if i is None else (i.dtype, tuple(int(s) for s in i.shape))
    src = {p.tuned_name: p.tuned_source or p.tuned_name for _, p in out if p.tuned_name is not None} \
        if has_added else {}
    paired_t = [src[p.tuned_name] for _, p in out if p.kind in ("paired", "resized") and p.lora is None
                and p.tuned_name is not None and _tie_family(src[p.tuned_name])] if has_added else []
    keep = []
    for pos, p in out:
        s = src.get(p.tuned_name) if p.tuned_name is not None else None
        if p.kind == "added" and p.lora is None and s in infos and paired_t:
            other = _alias_of(tuned, s, t_info, paired_t)
            if other is not None:
                shown = next(q.tuned_name for _, q in out if q.tuned_name is not None and src[q.tuned_name] == other)
                aliases.append({"name": p.tuned_name, "side": "tuned", "alias_of": shown, "dtype": p.dtype_tuned,
                                "shape": [int(x) for x in p.shape_tuned]})
                notes.append(f"`{escape_name(p.tuned_name)}` is bitwise the tuned `{escape_name(shown)}` (a tied "
                             "alias saved twice): compared once, not counted as added")
                continue
        keep.append((pos, p))
    out[:] = keep
    for i, base in enumerate(bases):
        unused = [n for n in base.tensors if n not in used[i]]
        if not unused or not any(_tie_family(n) for n in unused):
            continue
        b_info = {n: (x.dtype, tuple(int(s) for s in x.shape)) for n, x in base.tensors.items()}
        paired_b = [n for n in base.tensors if n in used[i] and _tie_family(n)]
        if not paired_b:
            continue
        for bname in unused:
            if bname in used[i] or _tie_family(bname) is None:
                continue
            other = _alias_of(base, bname, b_info.get, paired_b)
            if other is not None:
                used[i].add(bname)
                aliases.append({"name": bname, "side": "base", "alias_of": other, "base_index": i,
                                "dtype": b_info[bname][0], "shape": list(b_info[bname][1])})
                notes.append(f"base `{escape_name(bname)}` is bitwise the base `{escape_name(other)}` (a tied "
                             "alias saved twice): compared once, not counted as removed")
    return aliases
