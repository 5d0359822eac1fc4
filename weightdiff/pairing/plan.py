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

Prefix alignment is found, not configured (weightdiff.pairing.align): for each base,
every split of names into a prefix of up to four components and a suffix is counted,
and the (tuned prefix, base prefix) with the most matching suffixes (same shape first)
wins: ``model.`` vs none, ``base_model.model.`` from PEFT merges, ``transformer.`` for
GPT-2, sentence-transformers' ``0.auto_model.``, ``encoder.``/``decoder.`` of a composite
model against ``vit.`` and ``transformer.``. With several bases, the base with the
strongest match claims its sub-tree first. ``rename`` rules (FROM=TO) rewrite tuned names
first; matrices still without a partner are paired by content (``align.content_pairs``).
Every pair records how it was made (``paired_by``: name, prefix, rename, tied, content).
Buffers (position ids, rotary frequencies, masks, running statistics: ``names.is_buffer``)
are not parameters: they are listed in ``Plan.buffers`` and never paired. See
docs/pairing.md for the rules and the worked examples.

>>> from types import SimpleNamespace as NS
>>> t = lambda s: NS(dtype="F32", shape=s, numel=s[0] * s[1])
>>> base = NS(tensors={"layers.0.w": t((2, 2))}, format="safetensors", lora=[], adapter=None)
>>> tuned = NS(tensors={"model.layers.0.w": t((2, 2))}, format="safetensors", lora=[], adapter=None)
>>> p = plan([base], tuned)
>>> [(x.kind, x.tuned_name, x.base_name) for x in p.pairs], p.alignment[0]["tuned_prefix"]
([('paired', 'model.layers.0.w', 'layers.0.w')], 'model.')
"""

from __future__ import annotations

import re
from collections import Counter
from fnmatch import fnmatchcase
from typing import Any, Sequence

from .align import best_mapping, mapped as _mapped, orient_squares, pair_by_content, pair_leftovers, parse_renames, \
    realign_blocks, renamed, reuse_blocks
from .folded import fold_of
from .heads import tie_aliases, tie_heads
from .names import is_buffer, is_embedding, is_lm_head, is_router, parse_name
from .pairs import KINDS, PAIRED_BY, CheckpointLike, Pair, Plan, _Item, _numel, make_pair, source_of
from ..errors import OptionsError, escape_name
from ..io.peft_ln import ln_target

__all__ = ["Pair", "Plan", "plan", "KINDS", "PAIRED_BY", "is_embedding", "is_lm_head", "CheckpointLike"]

_PEFT_PREFIX = "base_model.model."
_PEFT_SEGMENTS = re.compile(r"\.(?:modules_to_save\.[^.]+|modules_to_save|original_module|base_layer)(?=\.)")


def _tuned_items(tuned: CheckpointLike, notes: list[str], bases: Sequence[CheckpointLike] = ()) -> list[_Item]:
    tensors = tuned.tensors
    factors = list(getattr(tuned, "lora", None) or [])
    if any(getattr(f, "expert", None) is not None for f in factors):
        from ..io.peft_params import experts_apart

        factors = experts_apart(factors, bases, notes)      # the experts a base keeps apart, as transformers fuses them
    vectors = list(getattr(tuned, "ia3", None) or [])
    if getattr(tuned, "format", None) != "adapter" and not factors and not vectors:
        return [_Item(n, n, tuple(i.shape), i.dtype) for n, i in tensors.items()]
    used = set()
    first: dict[str, int] = {}
    order = {n: i for i, n in enumerate(tensors)}
    items: list[tuple[int, _Item]] = []
    saved = ignored = biased = pruned = 0
    for f in factors:
        saved += getattr(f, "base_layer_name", None) is not None
        ignored += getattr(f, "ignored_magnitude", None) is not None
        names = [f.a_name, f.b_name, getattr(f, "magnitude_name", None), getattr(f, "base_layer_name", None),
                 getattr(f, "ignored_magnitude", None), getattr(f, "e_name", None), *getattr(f, "parts", {}).values()]
        used.update(n for n in names if n)
        if getattr(f, "r", None) == 0:
            # AdaLoRA pruned every rank of this module: PEFT builds it empty, and the base weight is used as it is
            pruned += 1
            continue
        pos = min(order.get(n, len(order)) for n in names if n) if any(names) else len(order)
        a, b = tensors.get(f.a_name), tensors.get(f.b_name)
        dtype = (a or b).dtype if (a or b) is not None else None
        shape = None
        if getattr(f, "parts", None) or getattr(f, "param", None) is not None or getattr(f, "mlx", None):
            pass                        # LoHa, LoKr, a parameter's, mlx-lm's: the base's shape, checked once paired
        elif a is not None and b is not None and len(a.shape) >= 2 and len(b.shape) >= 2:
            shape = (int(b.shape[0]), _numel(a.shape[1:]))
            if getattr(f, "embedding", False):      # embedding factors: A [r, vocab], B [dim, r]
                shape = (int(a.shape[1]), int(b.shape[0]))
        items.append((pos, _Item(f.target, None, shape, dtype, lora=f)))
        first.setdefault(f.target, pos)
        bias = getattr(f, "bias_name", None)
        if bias:                        # lora_bias: true, merged by PEFT into the layer's bias
            used.add(bias)
            info = tensors[bias]
            items.append((order[bias], _Item(f.bias_target, bias, tuple(info.shape), info.dtype, lora_bias=f)))
            biased += 1
    for v in vectors:                   # IA3: W x l, as PEFT merges it (the base's shape, known once paired)
        used.add(v.name)
        if v.base_layer_name:           # the copy PEFT loads over the base's weight, and the vector scales
            used.add(v.base_layer_name)
        items.append((order[v.name], _Item(v.target, v.name, None, tensors[v.name].dtype, ia3=v)))
    targets = {it.key: it.shape for _, it in items}
    raw = getattr(getattr(tuned, "adapter", None), "raw", None) or {}
    ln = getattr(getattr(tuned, "adapter", None), "peft_type", None) == "LN_TUNING"
    sampler = copies = 0
    for n, info in tensors.items():
        if n in used:
            continue
        if raw.get("monteclora_config") and ".lora_monteclora_sampler." in n:
            # MonteCLoRA's sampler state: PEFT samples from it in training only, and its eval forward and merge
            # use scale x B @ A alone; counted as added tensors, it gave 29 tensors where the merged model has 21
            sampler += 1
            continue
        key = n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n
        key = _PEFT_SEGMENTS.sub("", key)
        if ln and (copy := ln_target(key)) is not None:
            # LN tuning: a trained copy of the layer, which PEFT's merge swaps in for the base's
            key, copies = copy, copies + 1
        if key in targets and targets[key] == tuple(info.shape):
            # PEFT's save_embedding_layers stores the full base layer beside its factors; the
            # factors are the change, so the copy is not compared a second time
            notes.append(f"adapter also stores the full `{escape_name(key)}` beside its LoRA factors; "
                         "the change is measured from the factors")
            continue
        items.append((order[n], _Item(key, n, tuple(info.shape), info.dtype)))
    items.sort(key=lambda t: t[0])
    if ignored:
        notes.append(f"adapter_config.json has use_dora false, so PEFT loads a plain LoRA: the DoRA magnitudes "
                     f"(lora_magnitude_vector) of {ignored} modules are not used, here as in PEFT")
    kept = sum(getattr(f, "kind", None) == "TOKENS" and getattr(f, "base_layer_name", None) is not None
               for f in factors)
    if kept:
        notes.append(f"adapter stores the table of {kept} of its trainable-tokens modules (PEFT loads it over the "
                     "base's weight, as for a resized vocabulary): the trained rows replace rows of that copy, and a "
                     "copy that is not the base's is measured as the merged table")
        saved -= kept
    if saved:
        # PEFT's save_embedding_layers (a resized or edited table): PEFT loads the copy over the base's weight
        oft = getattr(factors[0], "kind", "LORA") == "OFT"
        notes.append(f"adapter stores the base layer of {saved} of its {'OFT' if oft else 'LoRA'} modules (PEFT loads "
                     f"it over the base's weight): the {'rotation applies' if oft else 'factors apply'} to that copy"
                     + (", which is measured merged" if oft else ", and a copy that is not the base's is measured as "
                        "the merged weight"))
    if sampler:
        notes.append(f"adapter has monteclora_config: {sampler} tensors of MonteCLoRA's sampler state "
                     "(lora_monteclora_sampler) are used in training only (PEFT's eval forward and merge use "
                     "scale x B @ A alone): not model weights, not compared")
    if ln:
        rest = len(items) - copies
        notes.append(f"adapter: LN tuning, {copies} tensor{'s' if copies != 1 else ''} of the trained layer copies "
                     "(each compared with the base's tensor it replaces: PEFT's merge swaps the copy in for the "
                     f"layer), {rest} other tensor{'s' if rest != 1 else ''} (modules_to_save); base tensors the "
                     "adapter leaves alone are `inherited`")
    if raw.get("alora_invocation_tokens"):
        notes.append("adapter has alora_invocation_tokens (aLoRA): PEFT applies its change only to the tokens "
                     "after an invocation sequence, and cannot merge it; the weights measured are those the "
                     "model uses once the adapter is invoked, not on every input")
    if biased:
        notes.append(f"adapter has lora_bias: the lora_B.bias of {biased} LoRA modules is measured as a change of "
                     "the module's bias (base + scale x lora_B.bias, as PEFT merges it)")
    if vectors:
        ff = sum(v.feedforward for v in vectors)
        rest = len(items) - len(vectors)
        notes.append(f"adapter: {len(vectors)} IA3 vector{'s' if len(vectors) != 1 else ''} ({ff} scaling a layer's "
                     f"inputs, {len(vectors) - ff} its outputs), each measured as the weight PEFT merges, W x l (and "
                     f"b x l for the bias of a layer whose outputs it scales), {rest} other tensor"
                     f"{'s' if rest != 1 else ''} (modules_to_save); base tensors the adapter leaves alone are "
                     "`inherited`")
    if pruned:
        notes.append(f"adapter: AdaLoRA kept no rank of {pruned} of its modules (rank_pattern): they change nothing, "
                     "and their base weights are `inherited`")
    mlx = getattr(getattr(tuned, "adapter", None), "source", None) == "mlx-lm"
    if mlx and factors:
        notes.append(f"adapter: mlx-lm's (adapters.safetensors, fine_tune_type {raw.get('fine_tune_type')}), each "
                     "layer measured as mlx_lm.fuse adds it: scale x lora_b^T @ lora_a^T (an embedding's scale x "
                     f"lora_a @ lora_b), scale {getattr(factors[0], 'scale', 0):g} from lora_parameters"
                     + (", each row then scaled to its magnitude m (DoRA)" if raw.get("fine_tune_type") == "dora" else ""))
    elif mlx:
        notes.append(f"adapter: an mlx-lm full fine-tune (adapters.safetensors): its {len(items)} trained tensor"
                     f"{'s' if len(items) != 1 else ''} compared with the base's, the rest of the base `inherited` "
                     "(mlx-lm loads them over the model's)")
    tokens = [f for f in factors if getattr(f, "kind", None) == "TOKENS"]
    if tokens:
        tables = ", ".join(f"{len(f.tokens):,} row{'s' if len(f.tokens) != 1 else ''} of `{escape_name(f.target)}`"
                           for f in tokens)
        notes.append(f"adapter: trainable tokens, {tables} (each table measured as PEFT's merge gives it: those rows "
                     "replaced by the trained ones)")
        factors = [f for f in factors if getattr(f, "kind", None) != "TOKENS"]
        rest = len(items) - len(tokens) - biased
        if not factors and rest:
            notes.append(f"adapter: {rest} other tensor{'s' if rest != 1 else ''} (modules_to_save); base tensors "
                         "the adapter leaves alone are `inherited`")
    if factors:
        adalora = any(getattr(f, "e_name", None) for f in factors)
        n, rest = len(factors) - pruned, len(items) - len(factors) - len(tokens) + pruned - biased
        lycoris = getattr(factors[0], "label", "LoRA")
        lycoris = lycoris if lycoris in ("LoHa", "LoKr", "VeRA", "VBLoRA", "FourierFT", "DeLoRA", "OFT", "BOFT",
                                         "HRA") else None
        kinds = (f"{lycoris} module" if lycoris else "AdaLoRA factor triple" if adalora
                 else "LoRA factor pair") + ("s" if n != 1 else "")
        if lycoris:
            kinds += " (each measured exactly as the factor pair " + {
                "LoHa": "its Hadamard product is)", "LoKr": "its Kronecker product is)",
                "VeRA": "its vectors make of the shared projections, (lambda_b x B) @ (lambda_d x A))",
                "HRA": "W (H - I) is, H the product of its Householder reflections of the inputs)",
                "VBLoRA": "its top-k mixtures of the shared vector bank make, B @ A)",
                "FourierFT": "its spectral coefficients make, real(ifft2(S)) x scaling, their places drawn from "
                             "random_loc_seed as PEFT draws them)",
                "DeLoRA": "its normalized terms make, B diag(lambda / r / (|A_i| |B^i|)) A, the columns scaled by the "
                          "saved w_norm)",
                "OFT": "", "BOFT": "",
            }[lycoris]
            if lycoris == "OFT":
                kinds = kinds.removesuffix(" (each measured exactly as the factor pair ") + \
                    " (each measured as the weight PEFT's merge gives, W R^T: R the block-diagonal rotation of its inputs)"
            elif lycoris == "BOFT":
                kinds = kinds.removesuffix(" (each measured exactly as the factor pair ") + \
                    " (each measured as the weight PEFT's merge gives, (W M^T) s: M the butterfly rotation of its " \
                    "inputs, s a scale per output)"
        notes.append(f"adapter: {n} {kinds}, {rest} other tensor{'s' if rest != 1 else ''} (modules_to_save); base "
                     "tensors the adapter leaves alone are `inherited`")
        params = {f.param: f.experts for f in factors if getattr(f, "param", None) is not None}
        if params:
            fused = [e for e in params.values() if e > 1]
            notes.append(f"adapter: target_parameters: {len(params)} parameter{'s' if len(params) != 1 else ''} "
                         "adapted by PEFT's ParamWrapper" + (
                             f", {len(fused)} of them fused experts, counted above as their {sum(fused)} experts' "
                             "matrices: each expert's share of the factors (its rows of A, its columns of B) measured "
                             "exactly against its own matrix" if fused else ""))
    return [it for _, it in items]


def _shape_ok(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and tuple(a) == tuple(b)


def _best_mapping(items: Sequence[_Item], base: CheckpointLike) -> tuple[tuple[int, int], str, str]:
    return best_mapping([(it.key, it.shape, it.lora is not None or it.ia3 is not None) for it in items],
                        {n: tuple(info.shape) for n, info in base.tensors.items()})


def _glob_filter(include: Sequence[str], exclude: Sequence[str]):
    if not include and not exclude:
        return _keep_all                # (asked of every tensor: no generator to run when there is no glob)

    def keep(name: str) -> bool:
        if include and not any(fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatchcase(name, p) for p in exclude)
    return keep


def _keep_all(name: str) -> bool:
    return True


class _Filtered:
    """A checkpoint seen without its buffers (same attributes, fewer tensors)."""

    def __init__(self, ckpt: CheckpointLike, tensors: dict):
        self._ckpt, self.tensors = ckpt, tensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)


def _without_buffers(ckpt: CheckpointLike, side: str, out: list[dict]) -> CheckpointLike:
    kept = {}
    for n, info in ckpt.tensors.items():
        if is_buffer(n, info.dtype, tuple(info.shape)):
            out.append({"name": n, "side": side, "dtype": info.dtype, "shape": [int(x) for x in info.shape]})
        else:
            kept[n] = info
    return ckpt if len(kept) == len(ckpt.tensors) else _Filtered(ckpt, kept)


def plan(bases: Sequence[CheckpointLike], tuned: CheckpointLike, include: Sequence[str] = (),
         exclude: Sequence[str] = (), rename: Sequence[str] = (), content: bool = True,
         reorder: bool = True) -> Plan:
    """Pair the tuned checkpoint's tensors with those of one or more bases.

    ``include``/``exclude`` are fnmatch globs on the names reported (tuned names;
    for tensors only a base has, the base name moved into the tuned namespace);
    ``rename`` holds FROM=TO rules applied to tuned names before alignment. Headers
    only, except content pairing (``content``), which reads a few sampled rows of the
    matrices no name explains, and ``reorder`` (``align.reuse_blocks``: one sampled matrix per
    block, more where a block looks moved or repeated). Order: the tuned checkpoint's tensor order, then base
    tensors nobody claimed (base by base, in file order). Odd names or shapes are data,
    not errors; filters that leave nothing to compare raise ``OptionsError``.
    """
    notes: list[str] = []
    buffers: list[dict] = []
    try:
        rules = parse_renames(tuple(rename))
    except ValueError as exc:
        raise OptionsError(f"rename: {exc}", "write each rule as FROM=TO, e.g. '0.auto_model.='",
                           option="rename") from None
    keep = _glob_filter(tuple(include), tuple(exclude))
    tuned = _without_buffers(tuned, "tuned", buffers)
    bases = [_without_buffers(b, "base", buffers) for b in bases]
    items = _tuned_items(tuned, notes, bases)
    seen: dict[str, tuple[str, bool]] = {}     # renamed key -> (first name, whether a rule made it)
    for it in items:
        key = renamed(it.key, rules)
        first = seen.get(key)
        if first is not None and (key != it.key or first[1]):    # a rule made two names one
            raise OptionsError(f"rename makes `{escape_name(first[0])}` and `{escape_name(it.key)}` both "
                               f"`{escape_name(key)}`", "make the FROM part of the rule more specific",
                               option="rename")
        seen.setdefault(key, (it.key, key != it.key))
        it.key, it.renamed = key, key != it.key
    adapter = any(it.lora is not None or it.ia3 is not None for it in items) or getattr(tuned, "format", None) == "adapter"
    n_before = len(items)
    items = [it for it in items if keep(it.key)]
    if n_before and not items:
        which = "include" if include and not any(any(fnmatchcase(it.key, g) for g in include)
                                                 for it in _tuned_items(tuned, [], bases)) else "exclude"
        globs = ", ".join(repr(escape_name(g, keep_quotes=False)) for g in (include if which == "include" else exclude))
        verb = "matches none" if which == "include" else "leaves none"
        raise OptionsError(f"{which} {globs} {verb} of the {n_before:,} tuned tensors: nothing to compare",
                           "globs match the tuned names that `weightdiff inspect TUNED --tensors` lists", option=which)
    if len(items) < n_before:
        notes.append(f"--include/--exclude left out {n_before - len(items)} of {n_before} tuned tensors")
    buffers = [b for b in buffers if keep(b["name"])]

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
            pair = make_pair(it, bname, bases[i].tensors[bname], i, vocab)
            pair.paired_by = "rename" if it.renamed else ("name" if tp == bp else "prefix")
            break
        if pair is None:
            pair = Pair(it.key, None, 0, "added", it.shape, None, it.dtype, None, lora=it.lora,
                        tuned_source=source_of(it), lora_bias=it.lora_bias, ia3=it.ia3)
            if it.lora is not None:
                notes.append(f"adapter factor for `{escape_name(it.key)}` has no base tensor to modify")
        out.append(((0, pos, 0), pair))

    aliases = [] if adapter else tie_aliases(out, tuned, bases, used, notes)
    if content and not adapter:
        realign_blocks(out, tuned, bases, used, notes)
        if reorder:             # provenance's screening leaves it out: an unrelated candidate fails
            reuse_blocks(out, tuned, bases, used, notes)    # every block, and screening reads samples only
        pair_by_content(out, tuned, bases, used, notes)
        pair_leftovers(out, tuned, bases, used, notes)
        orient_squares(out, tuned, bases, notes)
    else:
        orient_squares(out, tuned, bases, notes, probe=False)
    # the tie is a last resort: only a head that neither names nor content pair (an ONNX export's
    # transposed head `onnx::MatMul_N` is the base head, not a sign that the tuned model ties it)
    tie_heads(out, items, bases, mapping, used, notes, tuned)
    # IA3: the bias of a layer whose outputs a vector scales is merged as b x l (a base tensor the adapter
    # stores nothing for, but changes)
    scaled = {(p.base_index, p.base_name.removesuffix(".weight") + ".bias"): p.ia3 for _, p in out
              if p.ia3 is not None and p.base_name is not None and p.base_name.endswith(".weight")
              and not p.ia3.feedforward}
    for i, base in enumerate(bases):
        tp, bp = mapping.get(i, ("", ""))
        for pos, (bname, info) in enumerate(base.tensors.items()):
            if bname in used[i]:
                continue
            shown = tp + bname[len(bp):] if bname.startswith(bp) else bname
            if not keep(shown):
                continue
            v = scaled.get((i, bname)) if scaled else None
            if v is not None:
                used[i].add(bname)
                out.append(((1, i, pos), Pair(shown, bname, i, "paired", tuple(info.shape), tuple(info.shape),
                                               info.dtype, info.dtype, tuned_source=v.name, paired_by="name",
                                               ia3_bias=v)))
                continue
            if adapter:
                # the base tensor is used as it is: in its own dtype on the adapted side too
                out.append(((1, i, pos), Pair(shown, bname, i, "inherited", None, tuple(info.shape), info.dtype,
                                               info.dtype)))
            else:
                fold = fold_of(tuned, base, bname, shown, info)
                out.append(((1, i, pos), Pair(None, bname, i, "removed", None, tuple(info.shape), None,
                                               info.dtype, folded=fold,
                                               pruned=fold is None and _pruned_by_export(tuned, bname))))
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
    empty = [p for p in pairs if p.kind in ("added", "removed") and p.params == 0]
    if empty:
        # a tensor of no element holds no weight: "1 tensor was added (0 parameters)" decided a DERIVED verdict
        # with nothing said of it; the verdict stays (the names differ), the note says what the change is
        e = empty[0]
        one = len(empty) == 1
        notes.append(f"{len(empty)} {e.kind if one else 'added or removed'} tensor{'' if one else 's'} "
                     f"hold{'s' if one else ''} no element (`{escape_name(e.tuned_name or e.base_name or '')}` "
                     f"{list(e.shape_tuned or e.shape_base or ())}): only a name differs there, no weight")
    for p in pairs:
        if p.folded is not None:
            notes.append(fold_note(p))
    pruned = [p.base_name for p in pairs if p.pruned]
    if pruned:
        shown = ", ".join(f"`{escape_name(n)}`" for n in pruned[:4]) + (", ..." if len(pruned) > 4 else "")
        notes.append(f"{len(pruned)} base tensor{'s' if len(pruned) != 1 else ''} outside the blocks ({shown}) "
                     f"{'are' if len(pruned) != 1 else 'is'} not in the tuned ONNX model: an exporter drops the "
                     "parameters no exported output reads (a pooler or LM head in a feature-extraction export), so "
                     "what the export does not hold is not compared")
    if buffers:
        notes.append(f"{len(buffers)} buffers (position ids, masks, running statistics and the like) are not "
                     "parameters: listed apart, never compared")
    return Plan(pairs, [alignment[i] for i in range(len(bases))], notes, buffers, aliases=aliases)


def _pruned_by_export(tuned: CheckpointLike, bname: str) -> bool:
    """Whether base tensor ``bname``, which the tuned model lacks, may be one its ONNX exporter pruned: the
    tuned model is an ONNX graph, which holds only what its outputs read, and the tensor is outside the
    numbered blocks (a head or pooler after the last block; a block's own parameter is on the path of any
    output that reads the block)."""
    return getattr(tuned, "format", None) == "onnx" and parse_name(bname)[0] is None


def _vocab_sizes(items: Sequence[_Item], bases: Sequence[CheckpointLike],
                 mapping: dict[int, tuple[str, str]]) -> tuple[set[int], set[int]]:
    """Row counts of the embeddings on each side (to recognise LM-head biases and the like)."""
    tuned_rows = {int(it.shape[0]) for it in items if it.shape and is_embedding(it.key)}
    base_rows = {int(info.shape[0]) for i in mapping for n, info in bases[i].tensors.items()
                 if len(info.shape) and is_embedding(n)}
    return tuned_rows, base_rows


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
        if p.kind == "resized" and is_router(p.tuned_name):
            grew = "added" if p.shape_tuned[0] > p.shape_base[0] else "removed"
            notes.append(f"experts {grew}: the router `{escape_name(p.tuned_name)}` has {p.shape_tuned[0]:,} rows, "
                         f"the base's {p.shape_base[0]:,}; the {p.overlap_rows:,} shared rows are compared")
        elif p.kind == "resized":
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


def fold_note(p: Pair) -> str:
    """The plan's line for a base parameter the tuned model's exporter folded into a constant."""
    f = p.folded or {}
    name, into, rows = escape_name(p.base_name or ""), escape_name(str(f.get("into"))), f.get("rows")
    n = (p.shape_base or (0,))[0] if p.shape_base else 0
    if rows is not None:
        rest = n - (rows[1] - rows[0])
        return (f"base `{name}` is folded into the tuned model's constant `{into}`, which holds its rows "
                f"{rows[0]}-{rows[1] - 1}, bitwise"
                + (f"; its other {rest:,} rows are not in the export (a fixed input shape)" if rest else "")
                + ": not compared as a tensor")
    if f.get("known"):
        return (f"base `{name}` is folded into the tuned model's constant `{into}` (computed from it for a fixed "
                "input shape), whose values are not rows of the base's: not compared")
    return (f"base `{name}` has no counterpart, and the tuned model holds values its exporter computed from "
            f"what the file does not say (`{into}`): it may be folded into them; not compared")
