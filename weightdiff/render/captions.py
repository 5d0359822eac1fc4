"""Sentences written from the numbers: figure captions and the facts they share with the tables.

Everything here reads the compare JSON as a plain dict (``schema: weightdiff.compare/1``)
and returns text; nothing draws or writes files. The plots (``render.plots``) and the
memo (``render.memo``) take their captions from here; numbers are formatted by
``render.formats`` and headline sentences come from ``render.sentences``, so a number in
a caption is the same number, formatted the same way, as in the tables.

>>> one_minus_cosine({"norm_base": 2.0, "norm_tuned": 2.0, "norm_delta": 0.0})
0.0
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any, Iterable

from . import sentences
from .formats import count, num, sci, share

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
    if nb and nt and nd is not None and nb > 0 and nt > 0:
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
    changed = [b for b in blocks if block_state(b) == "changed"]
    rounding = [b for b in blocks if block_state(b) == "rounding"]
    text = (f"Relative change ‖ΔW‖ / ‖W‖ (Frobenius norms) of each of the {len(blocks)} blocks, from the input "
            f"(block {blocks[0]['index']}) to the top (block {blocks[-1]['index']}), on a log scale. "
            f"{len(changed)} of {len(blocks)} blocks changed")
    if changed:
        top = max(changed, key=lambda b: b.get("rel_change") or 0.0)
        text += f"; the largest change is in block {top['index']} ({sci(top.get('rel_change'))})"
    text += "."
    unchanged = len(blocks) - len(changed) - len(rounding)
    if unchanged:
        text += f" {_plural(unchanged, 'block')} with no change at all sit as hollow circles on the line marked 0."
    if rounding:
        text += f" {_plural(len(rounding), 'block')} differ only by dtype rounding (hollow diamonds)."
    others = [b for b in data.get("blocks", []) if b.get("index") is None and block_changed(b)]
    if others:
        text += (" Outside the numbered blocks, " + _list(f"{b.get('block')} ({count(b.get('params_changed'))} "
                 f"parameters changed, added or resized)" for b in others) + " also changed; they are not drawn here.")
    return text


def caption_heatmap(data: dict) -> str:
    cells = [(b, k, v) for b in layered_blocks(data) for k, v in (b.get("modules") or {}).items()]
    if not cells:
        return "Relative change by block and module kind: no numbered blocks to plot."
    moved = [c for c in cells if c[2]]
    text = (f"Relative change of each module kind ({len({c[1] for c in cells})} kinds, the rows) in each "
            f"block, log colour scale. {len(moved)} of {len(cells)} block-module cells changed")
    if moved:
        b, k, v = max(moved, key=lambda c: c[2])
        text += f"; the largest is {k} in block {b['index']} ({sci(v)})"
    kinds = {c[1] for c in cells}
    absent = sum(len(kinds) - len(b.get("modules") or {}) for b in layered_blocks(data))
    text += ". White cells did not change at all"
    return text + (f"; {_plural(absent, 'hatched cell')} mark kinds a block does not have." if absent else ".")


def caption_params(data: dict) -> str:
    s = data.get("summary") or {}
    by, total = s.get("params_by_status") or {}, s.get("params_total") or 0
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
    r90 = [t["rank"]["energy_rank_90"] for t in mats if t["rank"].get("energy_rank_90") is not None]
    dims = sorted({min(t["rank"].get("shape_2d") or t.get("shape")[:2]) for t in mats})
    text = (f"Left: cumulative share of the change's energy (sum of squared singular values over ‖ΔW‖²) "
            f"captured by the top k singular directions, for {len(shown)} of the most changed matrices (the most "
            f"changed of each changed block first). ")
    text += " ".join(f"{tensor_label(t)} reaches 90% at rank {t['rank'].get('energy_rank_90')} and 99% at rank "
                     f"{t['rank'].get('energy_rank_99')}." for t in _first_per_block(shown)[:3])
    k = max((len(t["rank"].get("spectrum") or []) for t in shown), default=0)
    if any((t["rank"].get("energy_captured") or 1.0) < 0.985 for t in shown):
        text += f" Curves that stop short of 100% end where the reported spectrum ends (top {k} singular values)."
    text += (f" Right: rank needed for 90% of the energy against the matrix's smaller side, for all {len(mats)} "
             f"changed matrices")
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
    text = (f"1 - cosine similarity between base and tuned weights for each of the {len(mats)} paired matrices, "
            f"on a log scale (0 means identical direction; two unrelated models sit near 1). ")
    if moved:
        v, t = max(moved, key=lambda p: p[0])
        text += (f"{len(moved)} matrices moved; median {sci(median(v for v, _ in moved))}, largest "
                 f"{sci(v)} ({tensor_label(t)})")
        far = sum(1 for v, _ in moved if v >= cut)
        text += f"; {far} beyond the 'unrelated' line at {num(cut)}." if far else \
            f", all far below the 'unrelated' line at {num(cut)}."
    else:
        text += "No matrix moved."
    unchanged = len(mats) - len(moved)
    if unchanged:
        text += f" {_plural(unchanged, 'matrix', 'matrices')} with no change sit as hollow circles on the line marked 0."
    return text


def status_counts(data: dict) -> dict[str, Any]:
    s = data.get("summary") or {}
    return {k: (s.get("params_by_status") or {}).get(k, 0) for k in STATUS_ORDER}
