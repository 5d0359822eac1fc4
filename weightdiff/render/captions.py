"""Sentences written from the numbers: figure captions and the facts they share with the tables.

Everything here reads the compare JSON as a plain dict (``schema: weightdiff.compare/2``)
and returns text; nothing draws or writes files. The plots (``render.plots``) and the
memo (``render.memo``) take their captions from here; numbers are formatted by
``render.formats`` and headline sentences come from ``render.sentences``, so a number in
a caption is the same number, formatted the same way, as in the tables.

>>> one_minus_cosine({"norm_base": 2.0, "norm_tuned": 2.0, "norm_delta": 0.0})
0.0
"""

from __future__ import annotations

import math
import re
from statistics import median
from typing import Any, Iterable

from . import sentences
from .formats import count, num, rank_text, sci, share, tuned_params
from .reference import norms_cancel, unmeasured_blocks
from ..pairing.names import component_of

#: statuses in the order the parameter-share figure and the tables list them
STATUS_ORDER = ("unchanged", "rounding", "quantized", "changed", "resized", "added", "removed")
STATUS_LABEL = {"unchanged": "unchanged", "rounding": "rounding only", "quantized": "within the quantization floor",
                "changed": "changed",
                "resized": "resized", "added": "added", "removed": "removed"}


# --- facts shared by captions, headline and tables ---------------------------------------

def one_minus_cosine(t: dict) -> float | None:
    """1 - cosine of one tensor record, from its norms where possible.

    Uses ``1 - cos = (norm_delta^2 - (norm_base - norm_tuned)^2) / (2 norm_base norm_tuned)``,
    which keeps its digits when the cosine is 0.99999999 (the stored cosine would lose
    them to cancellation); falls back to ``1 - cosine``.
    """
    nb, nt, nd = t.get("norm_base"), t.get("norm_tuned"), t.get("norm_delta")
    if nd == 0:
        return 0.0
    if t.get("base_shape") not in (None, t.get("shape")):
        nb = None  # norms of a resized tensor's overlap are not all recorded; trust the cosine
    if nb and nt and nd is not None and nb > 0 and nt > 0 and not norms_cancel(nb, nt, nd, t.get("cosine")):
        return max(0.0, (nd * nd - (nb - nt) ** 2) / (2.0 * nb * nt))
    c = t.get("cosine")
    return None if c is None else max(0.0, 1.0 - c)


def is_matrix(t: dict) -> bool:
    shape = t.get("shape") or []
    return len(shape) >= 2 and sum(1 for s in shape if s > 1) >= 2


def layered_blocks(data: dict) -> list[dict]:
    """Blocks with a depth index, ordered base (0) to top."""
    return sorted((b for b in data.get("blocks", []) if b.get("index") is not None), key=lambda b: b["index"])


def block_changed(b: dict) -> bool:
    return bool(b.get("tensors_changed")) or bool(b.get("params_changed"))


def block_state(b: dict) -> str:
    """``'changed'``, ``'rounding'`` (only cast-level differences) or ``'unchanged'``."""
    if block_changed(b):
        return "changed"
    rc = b.get("rel_change")
    return "rounding" if rc is not None and rc > 0 else "unchanged"


def within_words(data: dict, blocks: set | None = None) -> str:
    """How the tensors of ``blocks`` (all when None) that differ without changing differ: "by dtype
    rounding", "within their quantization noise floor", or both (status ``rounding`` / ``quantized``)."""
    st = {_within_status(t) for t in data.get("tensors") or [] if blocks is None or _group(t) in blocks}
    if "quantized" in st and "rounding" in st:
        return "by dtype rounding or within their quantization noise floor"
    return "within their quantization noise floor" if "quantized" in st else "by dtype rounding"


def _group(t: dict) -> str | None:
    """A tensor's block label, or for one outside the numbered blocks its group (``embeddings``, ``head``):
    the quantized embeddings of a GGUF read "differ only by dtype rounding" when matched by block alone."""
    if t.get("block") is not None:
        return t.get("block")
    return component_of(str(t.get("name") or "")) if t.get("name") else None


def _norms_only(data: dict, group: str) -> bool:
    """Whether every tensor of ``group`` that differs from the base is a vector (a norm's weights or a bias)."""
    moved = [t for t in data.get("tensors") or [] if t.get("block") is None and _group(t) == group
             and t.get("status") not in ("unchanged", None)]
    return bool(moved) and all(len(t.get("shape") or ()) <= 1 for t in moved)


def _within_status(t: dict) -> str | None:
    """``rounding`` or ``quantized`` for a tensor that differs without changing: its status, and for a
    resized one whose shared rows lie within its quantization noise floor, ``quantized``."""
    if t.get("status") == "resized":
        return "quantized" if (t.get("quant") or {}).get("within") else "rounding"
    return t.get("status")


def _only_new_rows(data: dict, group: str) -> bool:
    """Every tensor of ``group`` that changed is resized with its shared rows unchanged beyond rounding or their
    quantization noise floor: the group's relative change is that rounding or noise, its change the new rows."""
    moved = [t for t in data.get("tensors") or [] if _group(t) == group and t.get("status") in ("changed", "resized")]
    return bool(moved) and all(
        t.get("status") == "resized" and t.get("compared") != "none"
        and (t.get("frac_changed") == 0 or (t.get("quant") or {}).get("within") or t.get("frac_beyond_rounding") == 0)
        for t in moved)


def tensor_label(t: dict) -> str:
    """A short label for legends: ``block 11 attn.q`` when the aggregate named them, else the name."""
    block, module = t.get("block"), t.get("module")
    if block and module and str(block).startswith(("layers.", "h.", "layer.", "block.", "blocks.")):
        return f"block {str(block).rsplit('.', 1)[-1]} {module}"
    name = str(t.get("name", "?"))
    return name if len(name) <= 40 else "..." + name[-37:]


def changed_matrices(data: dict) -> list[dict]:
    """Matrices whose delta has a spectrum, most changed (by relative change) first."""
    ts = [t for t in data.get("tensors", []) if t.get("rank") and t.get("status") in ("changed", "resized")]
    return sorted(ts, key=lambda t: (-(t.get("rel_change") or 0.0), str(t.get("name"))))


def cosine_matrices(data: dict) -> list[dict]:
    """Paired matrices with a cosine (vectors such as norm gains are left out, as DESIGN.md says)."""
    return [t for t in data.get("tensors", []) if is_matrix(t) and one_minus_cosine(t) is not None]


def _thresholds(data: dict) -> dict:
    return (data.get("settings") or {}).get("thresholds") or {}


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} " + (word if n == 1 else plural or word + "s")


def _blocks_named(blocks: list[dict]) -> str:
    """Numbered blocks by their index: ``block 3``, ``2 blocks (3 and 5)``."""
    if len(blocks) == 1:
        return f"block {blocks[0]['index']}"
    return f"{len(blocks):,} blocks ({_list(str(b['index']) for b in blocks)})"


def _list(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --- headline ----------------------------------------------------------------------------

def headline_sentences(data: dict) -> list[str]:
    """The JSON's own ``summary.headline`` when it has one, else ``render.sentences.headline``."""
    given = (data.get("summary") or {}).get("headline") or []
    return [str(x) for x in given] if given else sentences.headline(data)


# --- figure captions ---------------------------------------------------------------------

def caption_depth(data: dict) -> str:
    blocks = layered_blocks(data)
    if not blocks:
        return "Relative change per block: the checkpoint has no numbered blocks to plot."
    points = depth_points(data)
    nan_only = unmeasured_blocks(data)
    nonfinite = [b for b in blocks if b.get("block") in nan_only]
    changed = [b for b in blocks if block_state(b) == "changed" and b.get("block") not in nan_only]
    rounding = [b for b in blocks if block_state(b) == "rounding"]
    # a block with no relative change to show is not in the base (appended or inserted layers): new, not changed
    new = [b for b in changed if b.get("rel_change") is None]
    changed = [b for b in changed if b.get("rel_change") is not None]
    text = ((f"Relative change ‖ΔW‖ / ‖W‖ (Frobenius norms) of each of the {len(blocks)} blocks, from the input "
             f"(block {blocks[0]['index']}) to the top (block {blocks[-1]['index']}), on a log scale. "
             # counted as the summary counts them: a block that differs only by NaN/Inf is changed, unmeasured
             f"{len(changed) + len(nonfinite)} of {len(blocks)} blocks changed") if len(blocks) != 1 else
            (f"Relative change ‖ΔW‖ / ‖W‖ (Frobenius norms) of the model's one block (block {blocks[0]['index']}), "
             f"on a log scale. {'It changed' if changed or nonfinite else 'It did not change'}"))
    if changed:
        top = max(changed, key=lambda b: b.get("rel_change") or 0.0)
        text += f"; the largest change is in block {top['index']} ({sci(top.get('rel_change'))})"
    if nonfinite:
        text += (f"; {_blocks_named(nonfinite)} "
                 f"{'differs' if len(nonfinite) == 1 else 'differ'} only by NaN or infinite values, which are not "
                 f"measured (crosses on the 0 line)")
    if new:
        text += (f"; {_blocks_named(new)} "
                 f"{'is' if len(new) == 1 else 'are'} not in the base, with no change to measure")
    # a block whose only difference is tensors of another shape (never compared) is not "no change at all"
    reshaped_in = {t.get("block") for t in data.get("tensors") or []
                   if t.get("status") == "resized" and t.get("compared") == "none"}
    counted = {b.get("block") for b in changed + new + rounding + nonfinite}
    reshaped = [b for b in blocks if b.get("block") in reshaped_in and b.get("block") not in counted]
    if reshaped:
        text += (f"; {_blocks_named(reshaped)} {'holds' if len(reshaped) == 1 else 'hold'} tensors of another shape "
                 "than in the base, not compared (on the 0 line, not measured)")
    text += "."
    unchanged = len(blocks) - len(changed) - len(new) - len(rounding) - len(nonfinite) - len(reshaped)
    if unchanged:
        text += (f" {_plural(unchanged, 'block')} with no change at all {'sits as a hollow circle' if unchanged == 1 else 'sit as hollow circles'} "
                 "on the line marked 0.")
    if rounding:
        one = len(rounding) == 1
        words = within_words(data, {b.get('block') for b in rounding})
        if one:
            words = words.replace("their", "its")
        text += (f" {_plural(len(rounding), 'block')} {'differs' if one else 'differ'} only {words}"
                 f" ({'a hollow diamond' if one else 'hollow diamonds'}).")
    ends = [p for p in points if p["group"] is not None]
    said: dict[str, list[str]] = {}
    norm_only = False
    head = _effective_head(data)
    for p in ends:
        where = (f"the embeddings (before block {blocks[0]['index']})" if "embed" in p["group"] else
                 f"the {'head' if p['group'] == 'head' else p['group']} (after block {blocks[-1]['index']})")
        if p["group"] == "head" and head:
            continue                    # said below, from the head the model computes with
        if p["group"] == "head" and p["state"] != "unchanged" and _norms_only(data, "head"):
            # the head group holds the final norm too: "the head changed" read as the output layer trained
            where, norm_only = f"the final norm (after block {blocks[-1]['index']})", True
        if p["state"] == "nonfinite":
            what = "differ only by NaN or infinite values (not measured)"
        elif p["state"] == "changed" and p["rel_change"] and _only_new_rows(data, p["group"]):
            # a vocabulary grown in a quantized copy: the shared rows' figure is the quantization's noise
            what = (f"changed only by new or resized rows (their shared rows differ only "
                    f"{within_words(data, {p['group']})}, {sci(p['rel_change'])})")
        elif p["state"] == "changed" and p["rel_change"]:
            what = f"changed ({sci(p['rel_change'])})"
        elif p["state"] == "changed":
            what = "changed only by new or resized rows (triangles on the 0 line: their shared rows are unchanged)"
        elif p["state"] == "rounding":
            what = f"differ only {within_words(data, {p['group']})} ({sci(p['rel_change'])})"
        else:
            what = "did not change"
        said.setdefault(what, []).append(where)
    for what, wheres in said.items():
        subject = _list(wheres)
        if len(wheres) == 1 and what.startswith("differ ") and not wheres[0].startswith("the embeddings"):
            what = "differs " + what[len("differ "):].replace("their", "its")   # "the head differs", "... and ... differ"
        text += f" {subject[0].upper() + subject[1:]} {what}."
    if norm_only:
        text += " The output head's matrices did not change."
    if head and any(p["group"] == "head" for p in ends):
        text += f" The head (after block {blocks[-1]['index']}) {head}."
    summary = data.get("summary") or {}
    if sentences.undone_words(summary):
        # the numbers are beneath a reordering, rotation or rescale, as the headline says; as stored they moved
        text += f" Each part is measured once {' and '.join(sentences.undone_words(summary))}."
    if sentences.computes_else(summary):
        text += " " + sentences.computes_else(summary)
    return text


def _effective_head(data: dict) -> str:
    """What the depth profile says of the head the model computes with when its stored tensors do not show it:
    missing and untied (``head_missing``: random when loaded), the base's head removed, or a tied head on one
    side only that differs from the base's. "" when the stored tensors say it. The caption read "the head did
    not change" of each of these, beside a verdict that said the head was random or differed."""
    flags = (data.get("summary") or {}).get("flags") or []
    ts = [t for t in data.get("tensors") or [] if _group(t) == "head"]
    heads = [t for t in ts if sentences.is_tied_row(t) or "lm_head" in str(t.get("base_name") or t.get("name") or "")]
    if "head_missing" in flags:
        return ("is not stored: the config asks for an untied head, which transformers initialises at random, so "
                "no figure here measures it")
    if any(t.get("status") == "removed" for t in heads):
        return "is not in this model (the base's head tensor is removed)"
    tied = [t for t in heads if sentences.is_tied_row(t) and t.get("status") == "changed"]
    if tied:
        return (f"is tied to the embeddings on one side only, and the head the model computes with differs from the "
                f"base's (relative change {sci(tied[0].get('rel_change'))}, not plotted)")
    return ""


def nonfinite_cells(data: dict) -> set:
    """``(block, module kind)`` cells of the heatmap whose changed tensors all differ only by NaN or infinity:
    their relative change of 0 is not a measurement, so they are drawn apart from the unchanged cells."""
    from .reference import nonfinite_only

    by_cell: dict = {}
    for t in data.get("tensors") or []:
        if t.get("status") == "changed" and t.get("block") is not None and t.get("module") is not None:
            by_cell.setdefault((t["block"], t["module"]), []).append(nonfinite_only(t))
    return {c for c, flags in by_cell.items() if all(flags)}


def caption_heatmap(data: dict) -> str:
    cells = [(b, k, v) for b in layered_blocks(data) for k, v in (b.get("modules") or {}).items()]
    if not cells:
        return "Relative change by block and module kind: no numbered blocks to plot."
    nan = nonfinite_cells(data)
    broken = [c for c in cells if (c[0].get("block"), c[1]) in nan]
    moved = [c for c in cells if c[2] and (c[0].get("block"), c[1]) not in nan]
    text = (f"Relative change of each module kind ({_plural(len({c[1] for c in cells}), 'kind')}, the rows) in each "
            f"block, log colour scale. {len(moved)} of {len(cells)} block-module cells changed")
    if moved:
        b, k, v = max(moved, key=lambda c: c[2])
        text += f"; the largest is {k} in block {b['index']} ({sci(v)})"
    if broken:
        where = _list([f"{k} in block {b['index']}" for b, k, _ in broken[:3]]
                      + ([f"{len(broken) - 3} more"] if len(broken) > 3 else []))
        text += (f"; {_plural(len(broken), 'cell')} ({where}) "
                 f"{'differs' if len(broken) == 1 else 'differ'} only by NaN or infinite values, which are not "
                 f"measured (crosses)")
    kinds = {c[1] for c in cells}
    absent = sum(len(kinds) - len(b.get("modules") or {}) for b in layered_blocks(data))
    text += ". Hatched white cells did not change at all"
    return text + (f"; {_plural(absent, 'cross-hatched grey cell')} mark kinds a block does not have."
                   if absent else ".")


def caption_params(data: dict) -> str:
    s = data.get("summary") or {}
    by, total = s.get("params_by_status") or {}, tuned_params(s)
    if not total:
        return "Share of parameters by status: the model has no parameters."
    parts = [f"{share(by.get(k, 0) / total)} {STATUS_LABEL[k]}" for k in STATUS_ORDER[:-1] if by.get(k)]
    text = f"Share of the {count(total)} parameters of the tuned model by status: {_list(parts)}."
    if by.get("removed"):
        text += f" {count(by['removed'])} base parameters were removed (not part of the bar)."
    if by.get("resized"):
        text += (" 'Resized' counts the rows a resized tensor (for example a grown vocabulary) shares with the "
                 "base; its new rows count as added.")
    return text


def caption_rank(data: dict, shown: list[dict]) -> str:
    mats = changed_matrices(data)
    if not mats:
        return "Rank of the change: no changed matrix has a spectrum (nothing changed, or --no-rank)."
    # a partial spectrum's energy rank is a lower bound: the median and range use exact ranks only
    r90 = [t["rank"]["energy_rank_90"] for t in mats if t["rank"].get("energy_rank_90") is not None
           and "energy_rank_90" not in (t["rank"].get("bounds") or {})]
    dims = sorted({min(t["rank"].get("shape_2d") or t.get("shape")[:2]) for t in mats})
    text = (f"Left: cumulative share of the change's energy (sum of squared singular values over ‖ΔW‖²) "
            f"captured by the top k singular directions, for {len(shown)} of the most changed matrices (the most "
            f"changed of each changed block first). ")
    text += " ".join(f"{tensor_label(t)} reaches 90% at rank {rank_text(t['rank'], 'energy_rank_90')} and 99% at rank "
                     f"{rank_text(t['rank'], 'energy_rank_99')}." for t in _first_per_block(shown)[:3])
    k = max((len(t["rank"].get("spectrum") or []) for t in shown), default=0)
    if any((t["rank"].get("energy_captured") or 1.0) < 0.985 for t in shown):
        text += f" Curves that stop short of 100% end where the reported spectrum ends (top {_plural(k, 'singular value')})."
    text += (" Right: rank needed for 90% of the energy against the matrix's smaller side, for "
             + (f"all {len(mats)} changed matrices" if len(mats) != 1 else "the 1 changed matrix"))
    if r90:
        text += f" (median {median(r90):g}, range {min(r90)}-{max(r90)}; smaller side {_list(str(d) for d in dims[:4])}" \
                + (" ..." if len(dims) > 4 else "") + ")"
    text += ". Full rank and the value for pure random noise (about half the side) are drawn for reference."
    if any(not t["rank"].get("exact", True) for t in mats):
        text += " Hollow markers are lower bounds from a partial spectrum."
    return text


def _first_per_block(ts: list[dict]) -> list[dict]:
    seen, out = set(), []
    for t in ts:
        if t.get("block") not in seen:
            seen.add(t.get("block"))
            out.append(t)
    return out


def caption_cosine(data: dict) -> str:
    mats = cosine_matrices(data)
    if not mats:
        return "1 - cosine per matrix: no paired matrices."
    vals = [(one_minus_cosine(t), t) for t in mats]
    moved = [(v, t) for v, t in vals if v > 0]
    cut = 1.0 - _thresholds(data).get("unrelated_cosine", 0.2)
    text = (f"1 - cosine similarity between base and tuned weights for "
            f"{f'each of the {len(mats)} paired matrices' if len(mats) != 1 else 'the one paired matrix'}, "
            f"on a log scale (0 means identical direction). The dashed line at 1 marks unrelated models (cosine "
            f"about 0); the shaded band from {num(cut)} up is where the verdict's unrelated rule looks (cosine below "
            f"{num(1.0 - cut)}). ")
    if moved:
        v, t = max(moved, key=lambda p: p[0])
        if len(moved) == 1:
            text += f"1 matrix moved: {sci(v)} ({tensor_label(t)})"
            text += ", inside the shaded band." if v >= cut else ", below the shaded band."
        else:
            text += (f"{len(moved)} matrices moved; median {sci(median(v for v, _ in moved))}, largest "
                     f"{sci(v)} ({tensor_label(t)})")
            far = sum(1 for v, _ in moved if v >= cut)
            text += f"; {far} inside the shaded band." if far else ", all below the shaded band."
    else:
        text += "No matrix moved."
    unchanged = len(mats) - len(moved)
    if unchanged:
        text += (f" {_plural(unchanged, 'matrix', 'matrices')} with no change "
                 f"{'sits as a hollow circle' if unchanged == 1 else 'sit as hollow circles'} on the line marked 0.")
    return text


def status_counts(data: dict) -> dict[str, Any]:
    s = data.get("summary") or {}
    return {k: (s.get("params_by_status") or {}).get(k, 0) for k in STATUS_ORDER}


# --- what the block figures place (shared with render.figures_blocks) ----------------------

def depth_points(data: dict) -> list[dict]:
    """The points of the depth profile: the embeddings one step before the first block, every
    numbered block at its index, the groups after the stack (a final norm, the head) one step
    each after the last block, the head last. Each point: ``x``, ``label``, ``rel_change``,
    ``state`` (block_state, or ``'nonfinite'`` for a block whose changes are all NaN or infinity: not
    measured) and ``group`` (None for a numbered block, else its name)."""
    blocks = layered_blocks(data)
    if not blocks:
        return []
    groups = [b for b in data.get("blocks", []) if b.get("index") is None]
    before = [b for b in groups if "embed" in str(b.get("block"))]
    after = sorted((b for b in groups if b not in before), key=lambda b: str(b.get("block")) == "head")

    nan_only = unmeasured_blocks(data)

    def point(b: dict, x: int, label: str, group: str | None) -> dict:
        state = "nonfinite" if b.get("block") in nan_only else block_state(b)
        return {"x": x, "label": label, "rel_change": b.get("rel_change"), "state": state, "group": group}

    first, last = blocks[0]["index"], blocks[-1]["index"]
    out = [point(b, first - len(before) + i, "emb." if len(before) == 1 else str(b["block"])[:8], str(b["block"]))
           for i, b in enumerate(before)]
    out += [point(b, b["index"], str(b["index"]), None) for b in blocks]
    out += [point(b, last + 1 + i, str(b["block"])[:10], str(b["block"])) for i, b in enumerate(after)]
    return out


_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def expert_grid(data: dict) -> dict:
    """Relative change of each expert in each block of a mixture-of-experts model:
    ``{"experts": [0, 1, ...], "blocks": [indices], "grid": [[rel or None per block] per expert]}``,
    from the tensors whose name holds ``experts.N.``; empty lists when there are none."""
    index = {b.get("block"): b.get("index") for b in data.get("blocks", []) if b.get("index") is not None}
    sums: dict[tuple[int, int], list[float]] = {}
    for t in data.get("tensors", []):
        m = _EXPERT.search(str(t.get("name") or ""))
        bi = index.get(t.get("block"))
        if not m or bi is None or t.get("compared") not in ("float", "factors"):
            continue
        nb, nd = t.get("norm_base"), t.get("norm_delta")
        if nb is None or nd is None or not (math.isfinite(nb) and math.isfinite(nd)):
            continue
        acc = sums.setdefault((int(m.group(1)), bi), [0.0, 0.0])
        acc[0] += nb * nb
        acc[1] += nd * nd
    experts = sorted({e for e, _ in sums})
    blocks = sorted({b for _, b in sums})
    grid = [[None if (e, b) not in sums else (0.0 if sums[(e, b)][1] == 0 else
             math.sqrt(sums[(e, b)][1] / sums[(e, b)][0]) if sums[(e, b)][0] > 0 else None)
             for b in blocks] for e in experts]
    return {"experts": experts, "blocks": blocks, "grid": grid}


def caption_experts(data: dict) -> str:
    ex = expert_grid(data)
    cells = [(e, b, v) for e, row in zip(ex["experts"], ex["grid"]) for b, v in zip(ex["blocks"], row)
             if v is not None]
    if not cells:
        return "Experts: the model has no mixture-of-experts tensors."
    moved = [c for c in cells if c[2] > 0]
    where = (f"each of the {len(ex['blocks'])} blocks that have experts" if len(ex["blocks"]) != 1 else
             "the 1 block that has experts")
    text = (f"Relative change of each of the {len(ex['experts'])} experts (rows) in {where}, log colour scale. "
            f"{len(moved)} of {len(cells)} expert-block cells changed")
    if moved:
        e, b, v = max(moved, key=lambda c: c[2])
        text += f"; the largest is expert {e} in block {b} ({sci(v)})"
    return text + ". Hatched white cells did not change at all."


def caption_reference(data: dict) -> str:
    from .reference import only_nonfinite, reference_of

    ref = reference_of(data)
    pts = {p["key"]: p for p in ref.get("points") or []}
    if not pts:
        return "Reference scale: no matrix was compared as floats, so there is nothing to place."
    parts = []
    for key in ("F16", "BF16"):
        if key in pts:
            parts.append(f"rounding its weights to {'float16' if key == 'F16' else 'bfloat16'} would read "
                         f"{sci(pts[key]['rel_change'])} (1 − cosine {sci(pts[key]['one_minus_cosine'])})")
    # "this model", not "this fine-tune": the figure is on page one whatever the verdict (identical, unrelated)
    text = (f"This model's large matrices ({_plural(ref.get('matrices') or 0, 'matrix', 'matrices')}, "
            f"{count(ref.get('params'))} parameters) on two log axes, relative change and 1 − cosine. ")
    if "model" in pts and only_nonfinite(data):
        text += ("It differs from the base only by NaN or infinite values, which are not measured, so it is not "
                 "placed (its finite values are the base's). ")
    elif "model" in pts:
        text += (f"It reads {sci(pts['model']['rel_change'])} "
                 f"(1 − cosine {sci(pts['model']['one_minus_cosine'])}). ")
    if parts:
        text += ("For scale, computed from this base's own weights: " + _list(parts) + "; ")
    if "unrelated" in pts:
        text += (f"an unrelated model of the same shape (independent initialisation, cosine about 0) would read "
                 f"{sci(pts['unrelated']['rel_change'])} (1 − cosine {sci(pts['unrelated']['one_minus_cosine'])}).")
    if pts.get("F16", {}).get("overflow"):
        text += f" {count(pts['F16']['overflow'])} weights exceed the float16 range and are left out of its floor."
    return text
