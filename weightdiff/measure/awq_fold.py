"""AWQ's searched scales, fit back before the floor test.

AutoAWQ (``auto_scale.apply_scale``) multiplies each input channel ``j`` of the linears after an
operation by an activation scale before quantizing them, and divides that operation's output channel
``j`` by it, so the model computes the same function:

* ``input_layernorm`` -> ``q_proj``, ``k_proj``, ``v_proj``; ``post_attention_layernorm`` ->
  ``gate_proj``, ``up_proj``: the norm's weight is divided;
* ``v_proj`` -> ``o_proj`` (when their shapes match) and ``up_proj`` -> ``down_proj``: the rows of
  ``v_proj`` / ``up_proj`` are divided.

Compared with the unquantized base, the norms then differ and every quantized linear by far more than
its floor. When a block's norms differ and its linears are AWQ-quantized (the signature of the scale
search), ``fold(plain, quant, name)`` fits the scales back from the data: per input column ``c_j``
(and for ``v_proj`` / ``up_proj`` per row ``r_i`` too, by alternating least squares), the factors that
bring the base closest to the dequantized tensor. The floor test then compares the quantized tensor
with the base scaled so (``c_j r_i W_ij``). Fitting, not reading the scales off the norms: the files
AutoAWQ 0.2.9 wrote on CPU with transformers 5 carry the square of the norms' ratio in their weights.
A per-channel scaling of a fine-tune is absorbed by the fit too (docs/methodology.md says so). A norm
whose ratio to the base goes with the fitted scales of the linears after it is explained by the fold
(``norm_fold``).

Names are those of Llama-family models (Llama, Mistral, Qwen2): a model named otherwise is not folded,
and its AWQ model with searched scales keeps the ``awq_scaled`` verdict.

>>> _ratio(np.array([2.0, 3.0]), np.array([1.0, 1.5])).tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import re
import weakref

import numpy as np

from ..kernels.reference import decode

__all__ = ["fold", "norm_fold", "bias_fold"]

_LAYER = re.compile(r"^(.*\.layers\.\d+\.)(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$")
_NORM = re.compile(r"^(.*\.layers\.\d+\.)(input_layernorm|post_attention_layernorm)\.weight$")
_BIAS = re.compile(r"^(.*\.layers\.\d+\.)(self_attn\.v_proj|mlp\.up_proj)\.bias$")
#: the linear whose input scales a linear's rows carry
_NEXT = {"self_attn.v_proj": "self_attn.o_proj", "mlp.up_proj": "mlp.down_proj"}
_FOLLOWERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``a / b`` when every value is finite and positive (a scale), else None."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.asarray(a, np.float64) / np.asarray(b, np.float64)
    return r if r.size and bool(np.all(np.isfinite(r) & (r > 0))) else None


def _values(ck, name: str) -> np.ndarray | None:
    info = ck.tensors.get(name)
    if info is None:
        return None
    return np.asarray(decode(ck.read(name), info.dtype), np.float64).reshape(tuple(info.shape))


def _awq(ck, name: str) -> bool:
    info = ck.tensors.get(name)
    return info is not None and info.quant is not None and info.quant.format == "awq"


#: a norm is AWQ's scales when the logarithms of its ratio to the base and of the fitted column scales
#: correlate above this: 0.98-0.998 on AutoAWQ's files of unchanged Llama, Mistral and Qwen2 bases, 0.32-0.55
#: with the norms also changed by 10% (0.5 let that through); a norm change of ~2% hides in the fit's noise
NORM_CORR = 0.9
#: rows read at a time while fitting
FIT_ROWS = 256                 # two float64 blocks of 256 x 14,336: 59 MB
#: fitted scales within this of 1 are no scaling (a fine-tune's own column norms move less than that)
NO_SCALE = 1e-2
#: rounds of the alternating fit (rows, then columns) for ``v_proj`` / ``up_proj``
FIT_ROUNDS = 4
#: a column with fewer non-zero quantized values than this share of its rows (and than ``MIN_NONZERO``) is
#: fit on those values alone: its zeros are the elements AWQ's scale rounded to the zero point
FEW_NONZERO = 0.25
MIN_NONZERO = 4


class _Folds:
    """The scales of one (plain, quantized) checkpoint pair, found tensor by tensor as asked."""

    def __init__(self, plain, quant):
        # weak: the memo lives on ``quant`` keyed weakly by ``plain``; a strong reference here would keep
        # every base a provenance run compared against alive (and its files open) as long as ``quant``
        self._plain, self.quant = weakref.ref(plain), quant
        self.memo: dict[str, object] = {}

    @property
    def plain(self):
        return self._plain()

    def searched(self, prefix: str) -> bool:
        """Whether block ``prefix`` shows AWQ's scale search: a norm before AWQ-quantized linears differs
        from the base's by a positive factor per channel (not all 1)."""
        key = prefix + ":searched"
        if key not in self.memo:
            self.memo[key] = any(self.norm_ratio(prefix, n) is not None for n in _FOLLOWERS)
        return bool(self.memo[key])

    def norm_ratio(self, prefix: str, norm: str) -> np.ndarray | None:
        key = prefix + norm
        if key not in self.memo:
            self.memo[key] = None
            if any(_awq(self.quant, f"{prefix}{m}.weight") for m in _FOLLOWERS[norm]):
                a, b = _values(self.plain, key + ".weight"), _values(self.quant, key + ".weight")
                r = _ratio(a, b) if a is not None and b is not None and a.shape == b.shape else None
                if r is not None and not np.all(r == 1.0):
                    self.memo[key] = r
        return self.memo[key]

    def scales(self, name: str, rows_too: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        if name not in self.memo:
            self.memo[name] = _fit(self.plain, self.quant, name, rows_too)
        return self.memo[name]


def _weights(d: np.ndarray, group: int, levels: int) -> np.ndarray:
    """Least-squares weights of the dequantized rows ``d``: one over the square of each (row, group)'s
    quantization step, estimated from its range. A row AWQ divided by a small scale (50x larger), or a
    group holding an outlier channel, has a step to match and its rounding error with it; unweighted, it
    set the fitted factors of every column (12% of an unchanged up_proj beyond the floor)."""
    k, n = d.shape
    g = d.reshape(k, n // group, group)
    step = (g.max(axis=2) - g.min(axis=2)) / levels
    pos = step > 0
    # a group all at its zero point: the row's typical step (one of its groups that is not)
    if not pos.all():
        fill = np.ones(k)
        some = pos.any(axis=1)
        if some.any():
            fill[some] = np.nanmedian(np.where(pos[some], step[some], np.nan), axis=1)
        fill = np.where(np.isfinite(fill) & (fill > 0), fill, 1.0)
        step = np.where(pos, step, fill[:, None])
    return np.repeat(1.0 / (step * step), group, axis=1)


def _ends(d: np.ndarray, group: int) -> np.ndarray:
    """Where ``d`` sits on its (row, group)'s largest or smallest value: where AWQ's clipping search
    (``auto_clip``, after the scale search, on the scaled weights) puts the values it clamped."""
    k, n = d.shape
    g = d.reshape(k, n // group, group)
    return ((g == g.max(axis=2, keepdims=True)) | (g == g.min(axis=2, keepdims=True))).reshape(k, n)


def _unclipped(q: np.ndarray, end: np.ndarray, p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The weights ``q`` with 0 for the elements the clipping explains at the current factors (the base
    scaled, ``p``): on an end value, with the base's sign, and nearer zero than it by more than half a
    step, as ``kernels.quant_floor.clipped_beyond`` sets them apart in the test. Left in, they pull an
    outlier channel's factor down (AWQ clips the groups it is largest in) and the rows with it: 0.5-0.9%
    of an unchanged v_proj / up_proj beyond."""
    with np.errstate(invalid="ignore"):
        clip = end & (np.sign(p) == np.sign(d)) & (np.abs(p) - np.abs(d) > 0.5 / np.sqrt(q))
    return np.where(clip, 0.0, q)


def _stab(blocks, r: np.ndarray, cols: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The factor of each column ``cols`` (one with few non-zero quantized values) that leaves the most
    of its elements within half a step of the dequantized value: each element allows an interval of
    factors, and the point most of them hold is taken (the middle of its run; 0 when no positive factor
    does better than the column rounding to zero). Least squares on such a column is pulled to 0 by its
    zeros, or, on its non-zero values alone, away from it: 1.2% of an unchanged down_proj beyond."""
    lo_all, hi_all = [], []
    for r0, w, d, q, _ in blocks:
        a = w[:, cols] * r[r0:r0 + w.shape[0], None]
        half = 0.5 / np.sqrt(q[:, cols])
        dd = d[:, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            x, y = (dd - half) / a, (dd + half) / a
        lo_all.append(np.where(a != 0, np.minimum(x, y), np.nan))
        hi_all.append(np.where(a != 0, np.maximum(x, y), np.nan))
    lo, hi = np.concatenate(lo_all), np.concatenate(hi_all)
    out = start.copy()
    for k in range(lo.shape[1]):
        ok = np.isfinite(lo[:, k]) & np.isfinite(hi[:, k])
        ls, hs = np.sort(lo[ok, k]), np.sort(hi[ok, k])
        if ls.size == 0:
            continue
        cand = np.concatenate([[0.0], ls[ls > 0]])
        count = np.searchsorted(ls, cand, "right") - np.searchsorted(hs, cand, "left")
        best = int(np.argmax(count))             # the first maximum: 0 when a positive factor does no better
        x = cand[best]
        if x > 0:
            end = hs[np.searchsorted(hs, x, "left")] if np.searchsorted(hs, x, "left") < hs.size else x
            nxt = ls[np.searchsorted(ls, x, "right")] if np.searchsorted(ls, x, "right") < ls.size else end
            x = 0.5 * (x + min(end, nxt) if min(end, nxt) >= x else x + x)
        out[k] = x
    return out


def _fit(plain, quant, name: str, rows_too: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(c, r)``: the column (and row) factors minimising ``|| D - diag(r) W diag(c) ||_F`` for the base
    ``W`` and the dequantized ``D`` of linear ``name``, by alternating least squares over row blocks;
    None when no factor moves more than ``NO_SCALE``."""
    info, pinfo = quant.tensors[name], plain.tensors.get(name)
    if pinfo is None or tuple(pinfo.shape) != tuple(info.shape) or len(info.shape) != 2:
        return None
    m, n = (int(x) for x in info.shape)
    c, r = np.ones(n), np.ones(m)
    q = info.quant
    group = int(q.group) if q is not None and str(q.group).isdigit() and n % int(q.group) == 0 else n
    levels = (1 << int(q.bits)) - 1 if q is not None and int(q.bits) > 0 else 15

    def blocks():
        for r0 in range(0, m, FIT_ROWS):
            idx = np.arange(r0, min(m, r0 + FIT_ROWS))
            w = np.asarray(decode(plain.read_rows(name, idx), pinfo.dtype), np.float64).reshape(idx.size, n)
            d = np.asarray(quant.read_rows(name, idx), np.float64).reshape(idx.size, n)
            ok = np.isfinite(w) & np.isfinite(d)
            w, d = np.where(ok, w, 0.0), np.where(ok, d, 0.0)
            yield r0, w, d, _weights(d, group, levels), _ends(d, group)

    if rows_too:
        # start the rows at their norms' ratio: a row AWQ divided by a tiny scale (a channel with almost no
        # activation: 50x and more) otherwise dominates the first column fit, and three rounds did not undo it
        nd, nw = np.zeros(m), np.zeros(m)
        for r0, w, d, _, _ in blocks():
            nd[r0:r0 + w.shape[0]] = np.einsum("ij,ij->i", d, d)
            nw[r0:r0 + w.shape[0]] = np.einsum("ij,ij->i", w, w)
        r = np.where((nw > 0) & (nd > 0), np.sqrt(nd / np.where(nw > 0, nw, 1.0)), 1.0)
        r = r / np.exp(np.mean(np.log(r)))
    dead = np.zeros(n, bool)
    for _ in range(FIT_ROUNDS if rows_too else 2):
        num, den = np.zeros(n), np.zeros(n)
        num_nz, den_nz, nz = np.zeros(n), np.zeros(n), np.zeros(n)
        for r0, w, d, q, end in blocks():
            wr = w * r[r0:r0 + w.shape[0], None]
            q = _unclipped(q, end, wr * c[None, :], d)
            on = d != 0
            qwr = q * wr
            num += np.einsum("ij,ij->j", d, qwr)
            den += np.einsum("ij,ij->j", wr, qwr)
            qwr_on = np.where(on, qwr, 0.0)
            num_nz += np.einsum("ij,ij->j", d, qwr_on)
            den_nz += np.einsum("ij,ij->j", wr, qwr_on)
            nz += on.sum(axis=0)
        c = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        # a column whose quantized values are (almost) all zero says little about its scale: AWQ scaled a
        # channel with almost no activation down until most of it rounds to the zero point. Its zeros pull
        # the fit towards 0: fit it on its non-zero values; with none, any small enough scale gives the
        # column back (``c = 0``: the scaled base column rounds to zero, as the quantized one is)
        few = nz < max(MIN_NONZERO, FEW_NONZERO * m)
        c = np.where(few & (den_nz > 0), num_nz / np.where(den_nz > 0, den_nz, 1.0), c)
        dead = nz == 0
        c = np.where(dead, 0.0, c)
        if not rows_too:
            continue
        for r0, w, d, q, end in blocks():
            wc = w * c[None, :]
            q = _unclipped(q, end, wc * r[r0:r0 + w.shape[0], None], d)
            nu, de = np.einsum("ij,ij->i", d, q * wc), np.einsum("ij,ij->i", wc, q * wc)
            r[r0:r0 + w.shape[0]] = np.where(de > 0, nu / np.where(de > 0, de, 1.0), 1.0)
    few = (nz < max(MIN_NONZERO, FEW_NONZERO * m)) & ~dead
    if few.any():
        c[few] = _stab(blocks(), r, few, c[few])
        dead = dead | (few & (c == 0))
    live = ~dead
    if not (np.all(np.isfinite(c)) and np.all(c[live] > 0) and np.all(c[dead] == 0) and np.all(np.isfinite(r))
            and np.all(r > 0)):
        return None
    if np.max(np.abs(c - 1.0)) < NO_SCALE and np.max(np.abs(r - 1.0)) < NO_SCALE:
        return None
    return c, (r if rows_too else None)


def _folds(plain, quant) -> _Folds:
    """The memo of a (plain, quant) pair, kept on the quantized checkpoint."""
    memo = quant.__dict__.setdefault("_awq_folds", weakref.WeakKeyDictionary())
    if plain not in memo:              # keyed by the object, not its id: a closed base's id is reused
        memo[plain] = _Folds(plain, quant)
    return memo[plain]


def fold(plain, quant, name: str) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """``(s_in, s_out)`` of AWQ-quantized linear ``name`` in a block that shows the scale search: its
    base columns are to be multiplied by ``s_in`` and its rows divided by ``s_out`` before the floor
    test; None when AWQ scaled nothing there (or the names are not a Llama family's)."""
    if not _awq(quant, name):
        return None
    m = _LAYER.match(name)
    if m is None:
        return None
    f = _folds(plain, quant)
    if not f.searched(m.group(1)):
        return None
    got = f.scales(name, m.group(2) in _NEXT)
    if got is None:
        return None
    c, r = got
    return c, (None if r is None else 1.0 / r)


def norm_fold(plain, quant, name: str) -> np.ndarray | None:
    """The factors norm ``name`` differs from the base's by (base / quantized side), when they go with
    the scales fit back for the AWQ-quantized linears after it (their logarithms correlate above
    ``NORM_CORR``); else None."""
    mt = _NORM.match(name)
    if mt is None:
        return None
    f = _folds(plain, quant)
    prefix, norm = mt.group(1), mt.group(2)
    ratio = f.norm_ratio(prefix, norm)
    if ratio is None:
        return None
    for lin in _FOLLOWERS[norm]:
        got = fold(plain, quant, f"{prefix}{lin}.weight")
        if got is not None and got[0] is not None and got[0].size == ratio.size:
            live = got[0] > 0                  # a column that rounds to zero has no fitted scale
            a, b = np.log(ratio[live]), np.log(got[0][live])
            if a.size > 1 and a.std() > 0 and b.std() > 0 and float(np.corrcoef(a, b)[0, 1]) > NORM_CORR:
                return ratio
    return None


def bias_fold(plain, quant, name: str, rel: float) -> np.ndarray | None:
    """The factors the bias of ``v_proj`` / ``up_proj`` was divided by with its weight's rows (AutoAWQ's
    ``scale_fc_fc`` divides both), when every value is the base's times the row factors fit for the
    weight, within ``rel`` of its magnitude (the fit's error); else None. Qwen2 with as many KV heads as
    heads: AWQ scales v_proj -> o_proj, and its bias read changed."""
    mt = _BIAS.match(name)
    if mt is None:
        return None
    got = fold(plain, quant, f"{mt.group(1)}{mt.group(2)}.weight")
    if got is None or got[1] is None:
        return None
    r = 1.0 / got[1]
    a, b = _values(plain, name), _values(quant, name)
    if a is None or b is None or a.shape != b.shape or a.shape != r.shape:
        return None
    want = a * r
    # the fit fixes r times the column factors, not how the two split (r k and c / k fit as well): one global
    # factor k, least squares, before the test
    den = float(want @ want)
    if not den > 0:
        return None
    want = want * (float(b @ want) / den)
    with np.errstate(invalid="ignore"):
        ok = np.abs(b - want) <= rel * np.abs(want) + 2.0 ** -24
    return r if bool(np.all(ok)) else None


def _awq_norm_both(a, b, name: str) -> bool:
    """Whether norm (or v_proj/up_proj bias) ``name`` sits before AWQ-quantized linears on both sides (two
    AWQ files, each with its own searched scales folded in) and the two differ by a positive factor per
    channel."""
    mt = _NORM.match(name) or _BIAS.match(name)
    if mt is None:
        return False
    prefix, what = mt.group(1), mt.group(2)
    after = _FOLLOWERS.get(what) or (_NEXT[what],)
    if not all(any(_awq(ck, f"{prefix}{m}.weight") for m in after) for ck in (a, b)):
        return False
    x, y = _values(a, name), _values(b, name)
    return x is not None and y is not None and x.shape == y.shape and _ratio(x, y) is not None
