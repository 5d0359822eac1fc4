"""Name alignment and content pairing: the two ways a tensor finds its counterpart
when the names on both sides are not the same.

``plan`` (weightdiff.pairing.plan) pairs by name first. Names often differ by a wrapper
prefix, which ``best_mapping`` finds by counting, for every split of the names into a
prefix and a suffix, how many suffixes both sides share; prefixes may hold numbers, so
sentence-transformers' ``0.auto_model.`` and ``model.0.auto_model.`` align with plain
transformers names, as do ``base_model.model.``, ``_orig_mod.``, ``module.`` and the
wrapper an ONNX exporter puts around the module (``m.``, ``model.``). ``--rename FROM=TO``
rewrites what no prefix explains. What names cannot explain at all (ONNX
``onnx::MatMul_123`` initializers, re-exported layers) is paired by content:
``content_pairs`` compares a fingerprint of sampled rows of every leftover matrix with
those of the leftover base matrices of the same or the transposed shape, and accepts a
pair only when its correlation stands far above what unrelated tensors of that size give
(``CONTENT_MIN_CORR`` and ``CONTENT_SIGMAS`` standard deviations of chance), and only when
each side is the other's best match. docs/pairing.md has the rules and the reasons.

>>> best_mapping([("0.auto_model.encoder.layer.0.attention.self.query.weight", (4, 4))],
...              {"encoder.layer.0.attention.self.query.weight": (4, 4)})
((1, 1), '0.auto_model.', '')
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import escape_name
from ..kernels.dtypes import DTYPES, decode
from .names import _block_position, block_slot, parse_name
from .pairs import CheckpointLike, Pair

__all__ = ["MAX_PREFIX_PARTS", "splits", "best_mapping", "mapped", "renamed", "parse_renames",
           "content_pairs", "pair_by_content", "realign_blocks", "reuse_blocks", "orient_squares", "fingerprint_indices", "CONTENT_MIN_CORR", "CONTENT_SIGMAS", "CONTENT_SAMPLE"]

#: prefixes are at most this many leading name components
MAX_PREFIX_PARTS = 4
#: rows and columns sampled per dimension for a content fingerprint (k x k elements)
CONTENT_SAMPLE = 32
#: a content pair needs at least this correlation between the fingerprints ...
CONTENT_MIN_CORR = 0.5
#: ... and at least this many standard deviations of chance (1 / sqrt(elements) for unrelated tensors)
CONTENT_SIGMAS = 8.0
#: matrices below this many elements are too small to pair by content
CONTENT_MIN_NUMEL = 256


def splits(name: str) -> list[tuple[str, str]]:
    """(prefix, suffix) splits: prefixes of up to MAX_PREFIX_PARTS components, suffixes of
    at least two components. A prefix may hold a container slot (sentence-transformers'
    ``0.auto_model.``) but never a block index (``layers.7.``).

    >>> splits("0.auto_model.layer.0.w")
    [('', '0.auto_model.layer.0.w'), ('0.', 'auto_model.layer.0.w'), ('0.auto_model.', 'layer.0.w')]
    >>> splits("model.layers.7.q.weight")
    [('', 'model.layers.7.q.weight'), ('model.', 'layers.7.q.weight'), ('model.layers.', '7.q.weight')]
    """
    parts = name.split(".")
    block = _block_position(parts)
    out = [("", name)]
    for k in range(1, min(MAX_PREFIX_PARTS, len(parts) - 2) + 1):
        if block is not None and k > block:
            break          # a block index is never part of a prefix: layer 7 must not align with layer 0
        out.append((".".join(parts[:k]) + ".", ".".join(parts[k:])))
    return out


def best_mapping(items: Iterable[tuple[str, tuple | None, bool]] | Iterable[tuple[str, tuple | None]],
                 base: dict[str, tuple]) -> tuple[tuple[int, int], str, str]:
    """The (tuned prefix, base prefix) matching the most suffixes: ((same shape, by name), tp, bp).

    ``items`` are (tuned key, shape[, shape-free]) -- a LoRA target matches whatever its shape;
    ``base`` maps base names to shapes. Ties go to the shorter prefixes.
    """
    items = list(items)
    # every key names a base tensor of its shape: no mapping scores more (each item counts at
    # most once per prefix pair) and the empty prefixes win the tie, so skip the search
    if items and all(it[0] in base and ((len(it) > 2 and it[2]) or
                                        (it[1] is not None and tuple(it[1]) == tuple(base[it[0]])))
                     for it in items):
        return (len(items), len(items)), "", ""
    return _search(items, base)


def _search(items: list, base: dict[str, tuple]) -> tuple[tuple[int, int], str, str]:
    by_suffix: dict[str, list[tuple[str, tuple]]] = {}
    for bname, shape in base.items():
        for bp, s in splits(bname):
            by_suffix.setdefault(s, []).append((bp, tuple(shape)))
    scores: dict[tuple[str, str], list[int]] = {}
    for item in items:
        key, shape = item[0], item[1]
        any_shape = len(item) > 2 and item[2]
        for tp, s in splits(key):
            for bp, bshape in by_suffix.get(s, ()):
                c = scores.setdefault((tp, bp), [0, 0])
                c[1] += 1
                c[0] += bool(any_shape) or (shape is not None and tuple(shape) == bshape)
    if not scores:
        return (0, 0), "", ""
    (tp, bp), c = min(scores.items(), key=lambda kv: (-kv[1][0], -kv[1][1], len(kv[0][0]) + len(kv[0][1]), kv[0]))
    return (c[0], c[1]), tp, bp


def mapped(key: str, tp: str, bp: str) -> str | None:
    """``key`` moved from the tuned prefix ``tp`` to the base prefix ``bp`` (None outside ``tp``)."""
    return bp + key[len(tp):] if key.startswith(tp) else None


def parse_renames(rules: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.=b."]`` -> ``[("a.", "b.")]``; raises ValueError naming a rule without ``=``.

    >>> parse_renames(["0.auto_model.=", "h.=layers."])
    [('0.auto_model.', ''), ('h.', 'layers.')]
    """
    out = []
    for rule in rules:
        if "=" not in rule or not rule.split("=", 1)[0]:
            raise ValueError(f"rename rule {rule!r} is not FROM=TO (FROM not empty)")
        src, dst = rule.split("=", 1)
        out.append((src, dst))
    return out


def renamed(key: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply every FROM=TO rule in order, each replacing all occurrences of FROM.

    >>> renamed("enc.h.0.w", [("enc.", ""), ("h.", "layers.")])
    'layers.0.w'
    """
    for src, dst in rules:
        key = key.replace(src, dst)
    return key


# ---------------------------------------------------------------- content pairing

def fingerprint_indices(size: int, k: int = CONTENT_SAMPLE) -> np.ndarray:
    """The fixed, sorted sample of min(k, size) indices of a dimension of ``size`` (seeded by size,
    so both sides of a pair sample the same rows and columns)."""
    k = min(k, size)
    rng = np.random.default_rng([zlib.crc32(b"weightdiff-content"), size])
    return np.sort(rng.choice(size, size=k, replace=False)) if k < size else np.arange(size)


def _matrix_shape(shape: tuple) -> tuple[int, int] | None:
    if shape is None or len(shape) < 2:
        return None
    m, n = int(shape[0]), int(math.prod(int(s) for s in shape[1:]))
    return (m, n) if m * n >= CONTENT_MIN_NUMEL and min(m, n) >= 2 else None


def _fingerprint(rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """Centred, unit-norm sample (rows x cols) in float64; None when it is constant."""
    x = rows[:, cols].astype(np.float64).ravel()
    if not np.all(np.isfinite(x)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):    # float64 values near its limit: squares overflow
        x = x - x.mean()
        n = float(np.linalg.norm(x))
    return x / n if 0 < n < math.inf else None             # an overflowed sample fingerprints nothing


def content_pairs(tuned: dict[str, tuple], base: dict[str, tuple],
                  read_tuned: Callable[[str, np.ndarray], np.ndarray],
                  read_base: Callable[[str, np.ndarray], np.ndarray],
                  reuse: bool = False) -> list[tuple[str, str, bool, float]]:
    """Pairs (tuned name, base name, transposed, correlation) of leftover matrices by content.

    ``tuned``/``base`` map leftover names to shapes; ``read_*(name, rows)`` return those rows
    decoded to float (shape [rows, n]). A candidate needs the same (m, n) or the transposed
    (n, m) 2-D shape; its score is the correlation of the sampled k x k submatrices (for a
    transposed candidate, base rows and columns swap). A pair is accepted when the score is
    at least CONTENT_MIN_CORR and CONTENT_SIGMAS / sqrt(k * k) (chance gives about 0 with
    that standard deviation), and when neither side scores higher with another candidate.
    With ``reuse`` a base matrix may serve several tuned ones (each takes its best base).
    """
    fp_t: dict[str, dict] = {}
    fp_b: dict[str, dict] = {}

    def prints(name, shape, read, cache, orient):
        got = cache.setdefault(name, {})
        if "N" not in got:
            r, c = fingerprint_indices(shape[0]), fingerprint_indices(shape[1])
            fp = _fingerprint(np.asarray(read(name, r)).reshape(len(r), -1), c)
            got["N"] = fp
            # as seen from a partner of the transposed shape: the same sample, transposed
            got["T"] = None if fp is None else fp.reshape(len(r), len(c)).T.ravel()
        return got[orient]

    t_shapes = {n: s for n, s in ((n, _matrix_shape(s)) for n, s in tuned.items()) if s is not None}
    b_shapes = {n: s for n, s in ((n, _matrix_shape(s)) for n, s in base.items()) if s is not None}
    scored: list[tuple[float, str, str, bool]] = []
    for tn, (m, n) in t_shapes.items():
        for bn, bs in b_shapes.items():
            for transposed in ((False,) if bs == (m, n) else ()) + ((True,) if bs == (n, m) else ()):
                ft = prints(tn, (m, n), read_tuned, fp_t, "N")
                fb = prints(bn, bs, read_base, fp_b, "T" if transposed else "N")
                if ft is None or fb is None or ft.size != fb.size:
                    continue
                scored.append((float(ft @ fb), tn, bn, transposed))
    scored.sort(key=lambda s: (-s[0], s[1], s[2], s[3]))
    best_t: dict[str, float] = {}
    best_b: dict[str, float] = {}
    for score, tn, bn, _ in scored:
        best_t.setdefault(tn, score)
        best_b.setdefault(bn, score)
    out, used_t, used_b = [], set(), set()
    for score, tn, bn, transposed in scored:
        size = fp_t[tn]["N"].size
        if score < max(CONTENT_MIN_CORR, CONTENT_SIGMAS / math.sqrt(size)):
            break
        if tn in used_t or score < best_t[tn] or (not reuse and (bn in used_b or score < best_b[bn])):
            continue
        used_t.add(tn)
        used_b.add(bn)
        out.append((tn, bn, transposed, score))
    return out


def _rows_reader(ckpt: CheckpointLike, source_of: dict[str, str] | None = None):
    def read(name: str, rows):
        src = (source_of or {}).get(name, name)
        info = ckpt.tensors[src]
        raw = np.asarray(ckpt.read_rows(src, rows))
        if DTYPES[info.dtype].kind == "opaque":
            raise ValueError(info.dtype)
        return decode(raw.reshape(-1), info.dtype).reshape(len(rows), -1)
    return read


def pair_by_content(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                     used: list[set[str]], notes: list[str]) -> None:
    """Matrices no name explains, paired by a fingerprint of sampled rows (``align.content_pairs``)."""
    if not hasattr(tuned, "read_rows"):
        return
    decodable = lambda dt: dt in DTYPES and DTYPES[dt].kind != "opaque"   # noqa: E731
    left = {p.tuned_name: (j, p) for j, (_, p) in enumerate(out) if p.kind == "added" and p.lora is None
            and p.shape_tuned is not None and decodable(p.dtype_tuned)}
    for i, base in enumerate(bases):
        if not left or not hasattr(base, "read_rows"):
            continue
        cands = {n: tuple(info.shape) for n, info in base.tensors.items() if n not in used[i]
                 and decodable(info.dtype)}
        sources = {n: p.tuned_source or n for n, (_, p) in left.items()}
        try:
            found = content_pairs({n: p.shape_tuned for n, (_, p) in left.items()}, cands,
                                  _rows_reader(tuned, sources), _rows_reader(base))
        except (ValueError, KeyError, OSError):
            continue
        for tname, bname, transposed, score in found:
            j, p = left.pop(tname)
            info = base.tensors[bname]
            q = Pair(tname, bname, i, "paired", p.shape_tuned, tuple(int(x) for x in info.shape), p.dtype_tuned,
                     info.dtype, tuned_source=p.tuned_source, paired_by="content", transposed=transposed)
            used[i].add(bname)
            out[j] = (out[j][0], q)
        if found:
            n_t = sum(1 for f in found if f[2])
            notes.append(f"{len(found)} tensors paired with base {i} by content (sampled rows correlate "
                         f"far above chance){f'; {n_t} of them transposed' if n_t else ''}")
        # what is left may copy a base matrix another tensor already copies: each expert of a model
        # upcycled from a dense one starts as the dense MLP (sparse upcycling), a duplicated head
        if left and found:
            again = {n: tuple(info.shape) for n, info in base.tensors.items() if decodable(info.dtype)}
            try:
                more = content_pairs({n: p.shape_tuned for n, (_, p) in left.items()}, again,
                                     _rows_reader(tuned, sources), _rows_reader(base), reuse=True)
            except (ValueError, KeyError, OSError):
                more = []
            for tname, bname, transposed, score in more:
                j, p = left.pop(tname)
                info = base.tensors[bname]
                out[j] = (out[j][0], Pair(tname, bname, i, "paired", p.shape_tuned,
                                          tuple(int(x) for x in info.shape), p.dtype_tuned, info.dtype,
                                          tuned_source=p.tuned_source, paired_by="content",
                                          transposed=transposed))
                used[i].add(bname)
            if more:
                notes.append(f"{len(more)} more tensors paired by content with base {i} tensors that another "
                             "tensor also copies (experts upcycled from one dense MLP, duplicated matrices)")


#: a vector is hashed whole to be paired by its bytes only up to this many elements (matrices of
#: CONTENT_MIN_NUMEL elements or more are content pairing's, by sampled rows: never read whole here)
BYTES_MAX_NUMEL = 1 << 20


def pair_leftovers(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                   used: list[set[str]], notes: list[str]) -> None:
    """Biases, norm gains and small tables no name explains, after the matrices are paired by content.

    Content pairing fingerprints matrices only: a vector has too few values to tell chance from a match
    by correlation, so an ONNX model whose initializers were renamed (``w0``..``wN``) read DERIVED with
    every bias and norm "added" and "removed", each bitwise the base's. Two rules, neither of which can
    pair tensors that differ in value by guesswork:

    1. its module's matrix: where ``T.weight`` was paired by content with ``B.weight``, a leftover
       ``T.<leaf>`` pairs with a leftover ``B.<leaf>`` of the same shape (a sentence-transformers
       Dense moved to another folder: its bias follows its weight), whatever their values;
    2. its bytes: a leftover vector or small table (under ``CONTENT_MIN_NUMEL`` elements) whose dtype,
       shape and bytes occur once among the tuned leftovers and once among the base's pairs with that one.
       Larger matrices are never read whole here: unrelated models would have every one hashed.
       A constant tensor (an all-zero bias, an all-one gain: every fresh init has many) is never
       paired this way, as equal bytes say nothing of which module it belongs to; only rule 1
       places it.
    """
    left = {p.tuned_name: j for j, (_, p) in enumerate(out) if p.kind == "added" and p.lora is None
            and p.shape_tuned is not None}
    if not left:
        return
    for i, base in enumerate(bases):
        followed = bytewise = 0
        owners = [(p.tuned_name[:-len(".weight")], p.base_name[:-len(".weight")]) for _, p in out
                  if p.kind == "paired" and p.base_index == i and p.paired_by == "content"
                  and p.tuned_name.endswith(".weight") and (p.base_name or "").endswith(".weight")]
        for tm, bm in owners:
            if tm == bm:
                continue
            for tname in [n for n in left if n.startswith(tm + ".") and "." not in n[len(tm) + 1:]]:
                bname = bm + tname[len(tm):]
                info = base.tensors.get(bname)
                p = out[left[tname]][1]
                if info is None or bname in used[i] or tuple(int(x) for x in info.shape) != tuple(p.shape_tuned):
                    continue
                _pair_as_content(out, left.pop(tname), bname, i, info)
                used[i].add(bname)
                followed += 1
        if left and hasattr(tuned, "read") and hasattr(base, "read"):
            bytewise = _pair_by_bytes(out, left, tuned, base, i, used[i])
        if followed:
            notes.append(f"{followed} tensors paired with base {i} as the other tensors of their module's matrix, "
                         "which was paired by content")
        if bytewise:
            notes.append(f"{bytewise} tensors paired with base {i} by their bytes (the same dtype, shape and "
                         "values, held by no other leftover tensor on either side)")


def _pair_as_content(out: list[tuple[tuple, Pair]], j: int, bname: str, i: int, info) -> None:
    p = out[j][1]
    out[j] = (out[j][0], Pair(p.tuned_name, bname, i, "paired", p.shape_tuned, tuple(int(x) for x in info.shape),
                              p.dtype_tuned, info.dtype, tuned_source=p.tuned_source, paired_by="content"))


def _pair_by_bytes(out: list[tuple[tuple, Pair]], left: dict[str, int], tuned: CheckpointLike,
                   base: CheckpointLike, i: int, used: set[str]) -> int:
    """Rule 2 of ``pair_leftovers``: unique, non-constant bytes on both sides. -> pairs made."""
    def digest(ck, name: str, info) -> tuple | None:
        numel = math.prod(int(x) for x in info.shape)
        if info.dtype not in DTYPES or DTYPES[info.dtype].kind == "opaque" \
                or name in (getattr(ck, "quant", None) or {}) or not 1 < numel <= BYTES_MAX_NUMEL \
                or (len(info.shape) > 1 and numel >= CONTENT_MIN_NUMEL):
            return None
        try:
            raw = np.ascontiguousarray(np.asarray(ck.read(name))).reshape(-1)
        except (ValueError, KeyError, OSError, IndexError):
            return None
        if raw.size < 2 or bool(np.all(raw == raw[0])) or raw.tobytes() == raw[:1].tobytes() * raw.size:
            return None                     # constant: equal bytes say nothing of its module
        return info.dtype, tuple(int(x) for x in info.shape), hashlib.sha256(raw.tobytes()).digest()

    t_keys: dict[tuple, list[str]] = {}
    b_keys: dict[tuple, list[str]] = {}
    shapes = set()
    for tname, j in left.items():
        p = out[j][1]
        src = p.tuned_source or tname
        info = tuned.tensors.get(src)
        if info is None:
            continue
        k = digest(tuned, src, info)
        if k is not None:
            t_keys.setdefault(k, []).append(tname)
            shapes.add((k[0], k[1]))
    if not t_keys:
        return 0
    for bname, info in base.tensors.items():
        if bname in used or (info.dtype, tuple(int(x) for x in info.shape)) not in shapes:
            continue
        k = digest(base, bname, info)
        if k is not None:
            b_keys.setdefault(k, []).append(bname)
    made = 0
    for k, tnames in t_keys.items():
        bnames = b_keys.get(k, [])
        if len(tnames) == 1 and len(bnames) == 1:
            _pair_as_content(out, left.pop(tnames[0]), bnames[0], i, base.tensors[bnames[0]])
            used.add(bnames[0])
            made += 1
    return made


def realign_blocks(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                   used: list[set[str]], notes: list[str]) -> None:
    """Blocks renumbered after layers were dropped, found by content.

    A model pruned of some layers (ShortGPT-style pruning, a student keeping every other
    layer) renumbers the blocks it keeps, so tuned block 20 is base block 28 and pairing by
    name compares unrelated blocks. When the tuned model name-pairs fewer blocks than the
    base has, each block's matrices are fingerprinted against the same slot in every base
    block (``content_pairs``); a tuned block whose matrices mostly match another base block
    is moved there whole (vectors too, by slot), ``paired_by`` content. A block with no such
    majority keeps its names.
    """
    if not hasattr(tuned, "read_rows"):
        return
    for i, base in enumerate(bases):
        if not hasattr(base, "read_rows"):
            continue
        paired = [j for j, (_, p) in enumerate(out)
                  if p.base_index == i and p.kind == "paired" and p.paired_by in ("name", "prefix", "rename")]
        # every base tensor name-paired (the common case): every base block is, nothing to move
        # (a set of names: ~10 ms for 100,000, where parsing them all took ~1 s)
        if len({out[j][1].base_name for j in paired}) >= len(base.tensors):
            continue
        # as many blocks name-paired as the base has: decided from the block indices parse_name
        # caches anyway, before any slot is built
        if len({parse_name(out[j][1].base_name)[1] for j in paired} - {None}) >= \
                len({parse_name(n)[1] for n in base.tensors} - {None}):
            continue
        slots = {j: block_slot(out[j][1].base_name) for j in paired}
        slots = {j: s for j, s in slots.items() if s[0] is not None}
        base_slots = {block_slot(n): n for n in base.tensors}
        base_slots.pop((None, None), None)
        by_slot: dict[str, list[int]] = {}
        for j, (slot, _) in slots.items():
            p = out[j][1]
            if _matrix_shape(p.shape_tuned) is not None and not p.transposed:
                by_slot.setdefault(slot, []).append(j)
        source = {out[j][1].tuned_name: out[j][1].tuned_source or out[j][1].tuned_name
                  for js in by_slot.values() for j in js}
        index_of = {out[j][1].tuned_name: slots[j][1] for js in by_slot.values() for j in js}
        votes: dict[int, Counter] = {}
        for slot, js in by_slot.items():
            cands = {n: tuple(base.tensors[n].shape) for (s, _), n in base_slots.items() if s == slot}
            try:
                found = content_pairs({out[j][1].tuned_name: tuple(out[j][1].shape_tuned) for j in js}, cands,
                                      _rows_reader(tuned, source), _rows_reader(base))
            except (ValueError, KeyError, OSError):
                continue
            for tn, bn, transposed, _ in found:
                if not transposed:
                    votes.setdefault(index_of[tn], Counter())[block_slot(bn)[1]] += 1
        moves = {}
        for k, c in votes.items():
            target, n = c.most_common(1)[0]
            if target != k and 2 * n > sum(c.values()):
                moves[k] = target
        if not moves:
            continue
        taken = set(used[i]) - {out[j][1].base_name for j, (_, k) in slots.items() if k in moves}
        for j, (slot, k) in sorted(slots.items()):
            if k not in moves:
                continue
            p = out[j][1]
            bn = base_slots.get((slot, moves[k]))
            info = base.tensors.get(bn) if bn is not None else None
            if info is None or bn in taken or tuple(info.shape) != tuple(p.shape_tuned):
                out[j] = (out[j][0], Pair(p.tuned_name, None, 0, "added", p.shape_tuned, None, p.dtype_tuned, None,
                                          tuned_source=p.tuned_source))
                continue
            taken.add(bn)
            out[j] = (out[j][0], Pair(p.tuned_name, bn, i, "paired", p.shape_tuned, tuple(info.shape), p.dtype_tuned,
                                      info.dtype, tuned_source=p.tuned_source, paired_by="content"))
        used[i].clear()
        used[i].update(taken)
        moved = ", ".join(f"{k} -> {t}" for k, t in sorted(moves.items()))
        notes.append(f"blocks renumbered (layers dropped?): tuned block -> base block {moved}, found by content")


def _family(name: str) -> str | None:
    """``attn``, ``mlp``, ``xattn``, ... of a matrix inside a block (None outside blocks)."""
    block, _, kind = parse_name(name)
    return None if block is None else kind.split(".", 1)[0]


def orient_squares(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                   notes: list[str], probe: bool = True) -> None:
    """Square matrices of a checkpoint stored transposed (GPT-2's Conv1D saved in nn.Linear
    layout, an ONNX export's MatMul weights): shapes show the transposition of every other
    matrix (``make_pair``), not of a square one.

    * Where both sides are ONNX graphs that fix the layout (``Checkpoint.layouts``: the B input of
      MatMul is ``[in, out]``, of Gemm with transB ``[out, in]``), the graphs decide, with no read.
    * Where one side's graph fixes it and the other is a torch checkpoint (nn.Linear ``[out, in]``,
      Conv1D ``[in, out]``: the names do not say which), the graph is the reason to look: each square
      matrix is fingerprinted both ways (``content_pairs``' sample) and compared transposed when the
      transposed sample matches beyond chance (``CONTENT_SIGMAS``) and better than the plain one, and
      the plain one fails the content-pairing test. An export of a model whose block matrices are all
      square has no non-square matrix to show the transposition, and its own weights compared as
      stored read as unrelated (near-orthogonal), the worst wrong verdict; a fine-tune is still far
      above chance the right way round. One that neither way is beyond chance for follows the other
      matrices of its graph layout when they all decided alike; otherwise it stays as stored, with a note.
    * Otherwise, when every non-square name-paired matrix of a module family (``attn``, ``mlp``;
      of all blocks when the family has none) is transposed, each square name-paired matrix of
      that family is fingerprinted both ways, and compared transposed only when the plain
      orientation fails the content-pairing test and the transposed one passes it.

    A plain orientation that matches is never transposed by content. ``probe`` False (content
    pairing off) leaves only the graphs' own answer.
    """
    named = [(j, p) for j, (_, p) in enumerate(out) if p.kind == "paired" and p.lora is None and p.ia3 is None
             and p.paired_by in ("name", "prefix", "rename") and p.shape_tuned is not None
             and len(p.shape_tuned) == 2 and len(p.shape_base or ()) == 2]
    lay_t = getattr(tuned, "layouts", None) or {}
    for i, base in enumerate(bases):
        lay_b = getattr(base, "layouts", None) or {}
        mine = [(j, p, _family(p.tuned_name)) for j, p in named if p.base_index == i]
        by_graph, undecided, turned = [], [], []
        decided: dict[tuple, set] = {}
        hinted = set()
        for j, p, fam in mine:
            n = p.shape_base[0]
            if p.transposed or tuple(p.shape_tuned) != (n, n) or tuple(p.shape_base) != (n, n):
                continue
            lt, lb = lay_t.get(p.tuned_name), lay_b.get(p.base_name)
            if lt is not None and lb is not None:
                hinted.add(j)
                if lt != lb:
                    p.transposed = True
                    by_graph.append(p.tuned_name)
            elif lt is not None or lb is not None:
                hinted.add(j)
                if probe and hasattr(tuned, "read_rows") and hasattr(base, "read_rows"):
                    verdict = _graph_probe(tuned, p, base, n)
                    if verdict is True:
                        p.transposed = True
                        turned.append(p.tuned_name)
                    if verdict is None:
                        undecided.append((p, (lt, lb)))
                    else:
                        decided.setdefault((lt, lb), set()).add(verdict)
        # a matrix changed beyond what a sample can tell either way follows the other matrices of the same
        # graph layout when they all agree (one exporter wrote them all): left as stored among turned ones,
        # a heavily retrained block read as unrelated, near-orthogonal, where it is only far from the base
        followed, open_ = [], []
        for p, key in undecided:
            if decided.get(key) == {True}:
                p.transposed = True
                followed.append(p.tuned_name)
            elif decided.get(key) != {False}:
                open_.append(p.tuned_name)
        undecided = open_
        if followed:
            notes.append(f"{len(followed)} square matrices that match the other side neither way (sampled rows) are "
                         f"compared transposed, as every other matrix the ONNX graph reads in the same layout matched "
                         f"only transposed (`{escape_name(followed[0])}`)")
        if by_graph:
            notes.append(f"{len(by_graph)} square matrices compared transposed, as the ONNX graphs read them in "
                         f"opposite layouts (`{escape_name(by_graph[0])}`)")
        if turned:
            notes.append(f"{len(turned)} square matrices compared transposed: an ONNX graph fixes their layout "
                         f"(MatMul reads [in, out]) and their sampled rows match the other side's only that way "
                         f"(`{escape_name(turned[0])}`)")
        if undecided:
            notes.append(f"{len(undecided)} square matrices whose layout an ONNX graph fixes match the other side "
                         f"neither as stored nor transposed (sampled rows), nor do the others of that layout say "
                         f"which; they are compared as stored, and a transposed layout cannot be ruled out "
                         f"(`{escape_name(undecided[0])}`)")
        if not probe or not hasattr(tuned, "read_rows") or not hasattr(base, "read_rows"):
            continue
        votes: dict[str | None, list[bool]] = {}
        for _, p, fam in mine:
            if fam is not None and p.shape_base[0] != p.shape_base[1]:
                votes.setdefault(fam, []).append(p.transposed)
                votes.setdefault(None, []).append(p.transposed)
        flipped = {f for f, v in votes.items() if v and all(v)}
        if not flipped:
            continue
        turned = []
        for j, p, fam in mine:
            n = p.shape_base[0]
            if j in hinted or fam is None or p.transposed or tuple(p.shape_tuned) != (n, n) or \
                    (fam not in flipped and (fam in votes or None not in flipped)):
                continue
            try:
                plain, across, size = _both_ways(tuned, p.tuned_source or p.tuned_name, base, p.base_name, n)
            except (ValueError, KeyError, OSError, IndexError):
                continue
            need = max(CONTENT_MIN_CORR, CONTENT_SIGMAS / math.sqrt(size)) if size else math.inf
            if plain is not None and plain >= need:
                continue
            if across is not None and across >= need and (plain is None or across > plain):
                p.transposed = True
                turned.append(p.tuned_name)
        if turned:
            notes.append(f"{len(turned)} square matrices compared transposed, as the other matrices of their "
                         f"module family are stored transposed (sampled rows match only that way)")


def _graph_probe(tuned: CheckpointLike, p: Pair, base: CheckpointLike, n: int) -> bool | None:
    """Whether a square matrix one ONNX graph fixes as ``[in, out]`` (or ``[out, in]``) is to be
    compared transposed against a checkpoint whose layout no graph fixes: True when the transposed
    sample matches beyond chance and better than the plain one, and the plain one fails the
    content-pairing test; False when the plain one is beyond chance and at least as good; None
    when neither is beyond chance (independent weights, or a change too large to tell)."""
    try:
        plain, across, size = _both_ways(tuned, p.tuned_source or p.tuned_name, base, p.base_name, n)
    except (ValueError, KeyError, OSError, IndexError):
        return None
    if not size:
        return None
    chance = CONTENT_SIGMAS / math.sqrt(size)
    need = max(CONTENT_MIN_CORR, chance)
    plain = -math.inf if plain is None else plain
    across = -math.inf if across is None else across
    if plain < need and across >= chance and across > plain:
        return True
    if plain >= chance and plain >= across:
        return False
    return None


def _both_ways(tuned: CheckpointLike, tname: str, base: CheckpointLike, bname: str,
               n: int) -> tuple[float | None, float | None, int]:
    """Correlation of the sampled k x k submatrix of a square tuned matrix with the base's, and
    with the base's transpose (for a square matrix the row and column samples are the same)."""
    idx = fingerprint_indices(n)
    t = _rows_reader(tuned)(tname, idx)
    b = _rows_reader(base)(bname, idx)
    ft = _fingerprint(t, idx)
    fb = _fingerprint(b, idx)
    if ft is None or fb is None:
        return None, None, 0
    fbt = fb.reshape(len(idx), len(idx)).T.ravel()
    return float(ft @ fb), float(ft @ fbt), ft.size


def _probe_matrix(pairs: list[Pair], decodable) -> Pair | None:
    """The cheapest matrix of a block to fingerprint (fewest columns: read_rows reads whole rows)."""
    ok = [p for p in pairs if not p.transposed and p.lora is None and _matrix_shape(p.shape_tuned) is not None
          and p.shape_base is not None and tuple(p.shape_base) == tuple(p.shape_tuned)
          and decodable(p.dtype_tuned) and decodable(p.dtype_base)]
    return min(ok, key=lambda p: (_matrix_shape(p.shape_tuned)[1], _matrix_shape(p.shape_tuned)[0], p.tuned_name),
               default=None)


def _passes(score: float | None, size: int) -> bool:
    return score is not None and size > 0 and score >= max(CONTENT_MIN_CORR, CONTENT_SIGMAS / math.sqrt(size))


def reuse_blocks(out: list[tuple[tuple, Pair]], tuned: CheckpointLike, bases: Sequence[CheckpointLike],
                 used: list[set[str]], notes: list[str]) -> None:
    """Blocks reordered or duplicated (layers swapped; SOLAR-style depth up-scaling, Goliath-style
    merges repeating base layers), found by content, a base block allowed to serve several.

    Names line up in such models, so ``realign_blocks`` sees nothing to do. Here one matrix of
    each name-paired block (the one with the fewest columns) is fingerprinted on both sides, as
    content pairing does; a block whose sample passes the content test keeps its names and
    nothing more is read for it. A block whose sample fails, and a tuned block with no base
    block of its number (its tensors ``added``), has every matrix fingerprinted against the
    same slot of every base block; when most of its matrices match one base block best (each
    passing the test), the whole block (vectors too, by slot) is paired with that base block,
    ``paired_by`` content. A base block may serve several tuned blocks (each base tensor still
    counts once in the coverage). A block without such a majority (a re-initialised layer)
    keeps its names, unless the base block of its number is paired by content with another tuned
    block: then it was inserted, and its tensors are ``added``.
    """
    if not hasattr(tuned, "read_rows"):
        return
    decodable = lambda dt: dt in DTYPES and DTYPES[dt].kind != "opaque"   # noqa: E731
    for i, base in enumerate(bases):
        if not hasattr(base, "read_rows"):
            continue
        # tuned blocks: name-paired to base i, or wholly added with slots base i has
        blocks: dict[tuple[str, int], list[int]] = {}
        for j, (_, p) in enumerate(out):
            if p.tuned_name is None or p.lora is not None:
                continue
            if p.kind == "paired" and p.base_index == i and p.paired_by in ("name", "prefix", "rename"):
                # the block index as parse_name finds it (block_slot's, from the same rule): its
                # cache serves the aggregate step later, so 100,000 names cost one parse each
                bk = parse_name(p.base_name)[1]
                tk = parse_name(p.tuned_name)[1] if p.tuned_name != p.base_name else bk
                if bk is None or tk != bk:
                    continue
                blocks.setdefault(("named", bk), []).append(j)
            elif p.kind == "added" and p.shape_tuned is not None:
                tk = parse_name(p.tuned_name)[1]
                if tk is not None:
                    blocks.setdefault(("added", tk), []).append(j)
        if not blocks:
            continue
        read_t, read_b = _rows_reader(tuned, {out[j][1].tuned_name: out[j][1].tuned_source or out[j][1].tuned_name
                                              for js in blocks.values() for j in js}), _rows_reader(base)
        prints: dict[tuple[str, str], np.ndarray | None] = {}

        def fp(side: str, name: str, shape: tuple) -> np.ndarray | None:
            if (side, name) not in prints:
                m, n = _matrix_shape(shape)
                r = fingerprint_indices(m)
                read = read_t if side == "t" else read_b
                prints[(side, name)] = _fingerprint(np.asarray(read(name, r)).reshape(len(r), -1),
                                                    fingerprint_indices(n))
            return prints[(side, name)]

        def score(tn, tshape, bn) -> float | None:
            a, b = fp("t", tn, tshape), fp("b", bn, tuple(base.tensors[bn].shape))
            return None if a is None or b is None or a.size != b.size else float(a @ b)

        suspects: list[tuple[str, int]] = []
        for (how, k), js in sorted(blocks.items()):
            if how == "added":
                suspects.append((how, k))
                continue
            p = _probe_matrix([out[j][1] for j in js], decodable)
            if p is None:
                continue
            try:
                s = score(p.tuned_name, tuple(p.shape_tuned), p.base_name)
            except (ValueError, KeyError, OSError, IndexError):
                continue
            if not _passes(s, 0 if s is None else prints[("t", p.tuned_name)].size):
                suspects.append((how, k))
        if not suspects:
            continue
        # tuned slot -> base slot, from the name pairs (the prefix alignment, per slot)
        slot_map = {block_slot(out[j][1].tuned_name)[0]: block_slot(out[j][1].base_name)[0]
                    for (how, _), js in blocks.items() if how == "named" for j in js}
        base_slots: dict[str, dict[int, str]] = {}
        for n in base.tensors:
            s, k = block_slot(n)
            if s is not None:
                base_slots.setdefault(s, {})[k] = n
        moves: dict[tuple[str, int], int] = {}
        for how, k in suspects:
            votes: Counter = Counter()
            voters = 0
            for j in blocks[(how, k)]:
                p = out[j][1]
                if _matrix_shape(p.shape_tuned) is None or p.transposed or not decodable(p.dtype_tuned):
                    continue
                tslot = block_slot(p.tuned_name)[0]
                cands = {bk: bn for bk, bn in base_slots.get(slot_map.get(tslot), {}).items()
                         if tuple(base.tensors[bn].shape) == tuple(p.shape_tuned) and decodable(base.tensors[bn].dtype)}
                if not cands:
                    continue
                voters += 1
                best = None
                for bk, bn in sorted(cands.items()):
                    try:
                        s = score(p.tuned_name, tuple(p.shape_tuned), bn)
                    except (ValueError, KeyError, OSError, IndexError):
                        s = None
                    if _passes(s, 0 if s is None else prints[("t", p.tuned_name)].size) and \
                            (best is None or s > best[0]):
                        best = (s, bk)
                if best is not None:
                    votes[best[1]] += 1
            if not votes:
                continue
            target, n = votes.most_common(1)[0]
            if 2 * n > voters and not (how == "named" and target == k):
                moves[(how, k)] = target
        if not moves:
            continue
        freed = set()
        # a named block that matches no base block while its own base block serves another tuned block
        # (found there by content) was inserted: its name pairs it with the block it displaced, so a layer
        # inserted in the middle read "unrelated" where the same layer appended read "added"
        targets = set(moves.values())
        inserted = [key for key in suspects if key[0] == "named" and key not in moves and key[1] in targets]
        for key in inserted:
            for j in blocks[key]:
                p = out[j][1]
                if p.base_name is not None:
                    freed.add(p.base_name)
                out[j] = (out[j][0], Pair(p.tuned_name, None, 0, "added", p.shape_tuned, None, p.dtype_tuned,
                                          None, tuned_source=p.tuned_source))
        for key, target in sorted(moves.items()):
            for j in blocks[key]:
                p = out[j][1]
                tslot = block_slot(p.tuned_name)[0]
                bn = base_slots.get(slot_map.get(tslot), {}).get(target)
                info = base.tensors.get(bn) if bn is not None else None
                if p.base_name is not None:
                    freed.add(p.base_name)
                if info is None or tuple(info.shape) != tuple(p.shape_tuned):
                    out[j] = (out[j][0], Pair(p.tuned_name, None, 0, "added", p.shape_tuned, None, p.dtype_tuned,
                                              None, tuned_source=p.tuned_source))
                    continue
                out[j] = (out[j][0], Pair(p.tuned_name, bn, i, "paired", p.shape_tuned, tuple(info.shape),
                                          p.dtype_tuned, info.dtype, tuned_source=p.tuned_source,
                                          paired_by="content"))
        claimed = {p.base_name for _, p in out if p.base_index == i and p.base_name is not None
                   and p.kind not in ("added", "removed", "inherited")}
        used[i].difference_update(freed - claimed)
        used[i].update(claimed & set(base.tensors))
        def label(names) -> str:
            return next((parse_name(n)[0] for n in names if parse_name(n)[0] is not None), "?")

        said = [f"tuned {label(out[j][1].tuned_name for j in blocks[key])} is base "
                f"{label(base_slots[s][t] for s in base_slots if t in base_slots[s])}"
                for key, t in sorted(moves.items(), key=lambda kv: kv[0][1])]
        users: dict[int, set[int]] = {}
        for _, p in out:
            if p.base_index == i and p.kind == "paired" and p.base_name is not None and p.tuned_name is not None:
                bk, tk = block_slot(p.base_name)[1], block_slot(p.tuned_name)[1]
                if bk is not None and tk is not None:
                    users.setdefault(bk, set()).add(tk)
        twice = [label(base_slots[s][t] for s in base_slots if t in base_slots[s])
                 for t in sorted(users) if len(users[t]) > 1]
        said += [f"tuned {label(out[j][1].tuned_name for j in blocks[key])} is new (its number's base block "
                 "is paired with another tuned block)" for key in inserted]
        more = f", and {len(said) - 12} more" if len(said) > 12 else ""
        notes.append("blocks reordered or repeated, paired by content (sampled rows match another base block): "
                     + ", ".join(said[:12]) + more
                     + (f"; base blocks serving more than one tuned block: {', '.join(twice)}" if twice else ""))
