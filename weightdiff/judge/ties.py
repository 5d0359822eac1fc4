"""Near ties between provenance candidates: what the pooled number hides and the blocks show.

``relatedness.near_tie`` compares one pooled number, the large-matrix relative change. A model that
retrained one layer heavily and kept the rest of its base bitwise (the README's own case: only one
layer may be trained) pools to nearly the same change against its base and against that base's
base: the retrained layer dominates both sums. The evidence that tells them apart is elsewhere:
the candidate that is bitwise equal to the tuned model where the other is not, or closer in most
blocks. ``singles_out(lead, other)`` weighs it for two candidate rows of a provenance result (their
JSON fields only, so a saved result answers the same); ``promote`` puts a candidate that the blocks
single out over every other near-tied one first.

>>> a = {"path": "A", "compare_verdict": "derived", "identical_large_params": 80, "blocks": [
...     {"block": "layers.0", "rel_change": 0.0}, {"block": "layers.1", "rel_change": 0.13}]}
>>> b = {"path": "base", "compare_verdict": "derived", "identical_large_params": 0, "blocks": [
...     {"block": "layers.0", "rel_change": 0.009}, {"block": "layers.1", "rel_change": 0.13}]}
>>> singles_out(a, b)["closer"], singles_out(b, a)
(['layers.0'], None)
"""

from __future__ import annotations

from .relatedness import MARGINS, near_tie

__all__ = ["singles_out", "within_margin", "promote"]

#: how exactly a candidate holds the tuned model's weights, by its compare verdict: bitwise, within the
#: rounding of a cast, or neither
_EXACTNESS = {"identical": 0, "cast_only": 1}


def _blocks(row: dict) -> dict[str, float]:
    return {b["block"]: b["rel_change"] for b in row.get("blocks") or () if b.get("rel_change") is not None}


def singles_out(lead: dict, other: dict) -> dict | None:
    """What makes ``lead`` the closer of two candidates whose pooled relative changes are within the
    near-tie margin, or None when nothing does (the weights cannot tell them apart).

    ``lead`` is singled out when its compare verdict is more exact (``identical`` over ``cast_only``
    over the rest: it holds the tuned model's weights, the other does not), or when ``other`` is closer
    by more than ``near_tie_ratio`` in no block that both measured and either ``lead`` is closer by more
    than that margin in most of those blocks (a block bitwise equal on one side only counts), or some
    large matrices are bitwise ``lead``'s and none are ``other``'s. Returned: ``closer`` (blocks where
    ``lead`` is closer), ``bitwise`` (those of them it matches bitwise), ``blocks`` (how many both
    measured), ``identical_large_params`` of each, ``exact`` (the more exact compare verdict, or None).
    """
    ea = _EXACTNESS.get(lead.get("compare_verdict") or "", 2)
    eo = _EXACTNESS.get(other.get("compare_verdict") or "", 2)
    a, o = _blocks(lead), _blocks(other)
    common = [k for k in a if k in o]
    ratio = MARGINS["near_tie_ratio"]
    closer = [k for k in common if o[k] > a[k] * ratio]
    farther = [k for k in common if a[k] > o[k] * ratio]
    il, io = lead.get("identical_large_params") or 0, other.get("identical_large_params") or 0
    out = {"path": other["path"], "closer": closer, "bitwise": [k for k in closer if a[k] == 0],
           "blocks": len(common), "identical_large_params": il, "other_identical_large_params": io,
           "exact": lead.get("compare_verdict") if ea < eo else None}
    if ea < eo:
        return out
    if ea > eo or farther or not common:
        return None
    if 2 * len(closer) > len(common) or (il > 0 and io == 0):
        return out
    return None


def within_margin(rows: list[dict]) -> list[dict]:
    """The derived candidates within ``near_tie_ratio`` of the smallest derived relative change."""
    derived = [c for c in rows if c["verdict"] == "derived"]
    values = [c["relative_change_large"] for c in derived if c["relative_change_large"] is not None]
    if not values:
        return derived[:1]
    lo = min(values)
    return [c for c in derived if near_tie(lo, c["relative_change_large"])]


def promote(rows: list[dict]) -> list[dict]:
    """``rows`` (ranked by ``rank_key``) with the near-tied candidate that ``singles_out`` every other
    near-tied one moved first; unchanged when there is none (a tie is reported, never broken by order)."""
    tied = within_margin(rows)
    if len(tied) < 2:
        return rows
    winner = next((c for c in tied if all(singles_out(c, o) for o in tied if o is not c)), None)
    if winner is None or winner is rows[0]:
        return rows
    return [winner] + [c for c in rows if c is not winner]
