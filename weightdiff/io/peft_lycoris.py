r"""PEFT's LyCORIS adapters, LoHa (``peft_type`` LOHA) and LoKr (LOKR), read as the low-rank factor pairs their
merged deltas are, so that the LoRA path (``measure.rank.analyze_factors``) measures them exactly.

LoHa (``hada_*``) merges ``scale x (w1_a @ w1_b) * (w2_a @ w2_b)``, a Hadamard product of two rank-r products:
that is ``B @ A`` with B the row-wise Kronecker (face-splitting) product of ``w1_a`` and ``w2_a`` [out, r1 r2]
and A the column-wise Kronecker (Khatri-Rao) product of ``w1_b`` and ``w2_b`` [r1 r2, in], so its rank is at
most r1 x r2. LoKr (``lokr_*``) merges ``scale x kron(w1, w2)``, each of ``w1`` and ``w2`` stored whole or as a
product of two factors: ``kron(B1 A1, B2 A2) = kron(B1, B2) @ kron(A1, A2)`` (a whole matrix is itself times an
identity, on its shorter side). The effective-convolution form (``use_effective_conv2d``: a core ``t`` [r, r,
kh, kw]) rebuilds ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``, which is ``w_a.T @ M`` with ``M`` [r, in kh
kw]. Every delta is read as the base weight flattened to [out, in x kernel], as PEFT reshapes it.

``scale`` is ``alpha / r`` (``alpha``, not ``lora_alpha``; ``rank_pattern`` and ``alpha_pattern`` override both
per module as for LoRA). PEFT builds each module's factors from the base layer's shape and the config
(``decompose_both``, ``decompose_factor``, ``use_effective_conv2d``), and refuses to load tensors of other
shapes: so does this, naming the shapes PEFT expects.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> w = {k: rng.standard_normal(s) for k, s in (("hada_w1_a", (5, 2)), ("hada_w1_b", (2, 3)),
...                                            ("hada_w2_a", (5, 2)), ("hada_w2_b", (2, 3)))}
>>> a, b = lycoris_product("LOHA", w)
>>> bool(np.allclose(b @ a, (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])))
True
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_lycoris_config", "lycoris_factors", "lycoris_product", "expected_shapes",
           "check_lycoris", "factorization"]

_PREFIX = "base_model.model."
_ROLES = {"LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
          "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
#: a LyCORIS tensor of module ``mod`` (PEFT saves the parameter without its adapter name; a module name may hold
#: any character, a newline too)
_PART_RE = re.compile(r"^(?P<mod>.+)\.(?P<role>hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))\Z", re.S)
#: peft.LoHaConfig / LoKrConfig defaults (r = alpha = 8, decompose_factor -1)
DEFAULT_R, DEFAULT_ALPHA, DEFAULT_FACTOR = 8, 8, -1


def parse_lycoris_config(raw: dict, path: Path, kind: str):
    """The AdapterConfig of a LoHa or LoKr config: ``r`` and ``alpha`` (``lora_alpha`` of the AdapterConfig), the
    patterns as LoRA's, ``use_effective_conv2d``, and LoKr's ``decompose_both`` and ``decompose_factor`` (an
    integer, -1 for "near the square root") in ``raw``, read when the factors meet the base."""
    from .peft_adapter import AdapterConfig, _bool, _number, _patterns, _rank, _show, _targets

    r = _rank(path, "r", raw.get("r", DEFAULT_R))
    alpha = _number(path, "alpha", raw.get("alpha", DEFAULT_ALPHA))
    flags = ["use_effective_conv2d"] + (["decompose_both"] if kind == "LOKR" else [])
    for key in flags:
        _bool(path, raw, key)
    if kind == "LOKR":
        f = raw.get("decompose_factor", DEFAULT_FACTOR)
        if type(f) is not int or not (f == -1 or 1 <= f < 1 << 31):
            raise CheckpointError(path, f"adapter config has decompose_factor = {_show(f)}, expected -1 or a "
                                        "positive integer")
    repeats = _patterns(raw, path)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, alpha, _targets(path, raw), False, False, base if isinstance(base, str) else None, raw,
                         path=Path(path), repeats=repeats, peft_type=kind)


def lycoris_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor per adapted module, its LyCORIS tensors in ``parts`` (role -> name); ``a_name`` and
    ``b_name`` name two of them (the dtype and the plan's bookkeeping). Shapes are checked against the base by
    ``check_lycoris``."""
    from .peft_adapter import _IA3_RE, _LORA_RE, KIND_LABELS, LoraFactor, _is_float

    kind = config.peft_type
    label = KIND_LABELS[kind]
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _PART_RE.match(name)
        if m and m["role"] in _ROLES[kind]:
            parts.setdefault(m["mod"], {})[m["role"]] = name
        elif m or (".ia3_l" in name and _IA3_RE.match(name)) or _LORA_RE.match(name):
            raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, which is not {label}'s "
                                         f"({', '.join(_ROLES[kind])}), but adapter_config.json says peft_type {kind}",
                                  "tensors and config from different adapters?")
    out = []
    for mod, got in parts.items():
        roles = set(got)
        if kind == "LOHA":
            ok = roles in ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
                           {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
            need = "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b (and hada_t1 with hada_t2)"
        else:
            ok = (roles & {"lokr_w1", "lokr_w1_a", "lokr_w1_b"} in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
                  and roles & {"lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
                  in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"}))
            need = "lokr_w1 (or lokr_w1_a with lokr_w1_b) and lokr_w2 (or lokr_w2_a with lokr_w2_b, and lokr_t2)"
        if not ok:
            raise CheckpointError(where, f"{label} module `{escape_name(mod)}` has {', '.join(sorted(roles))}; "
                                         f"expected {need}")
        for n in got.values():
            if not _is_float(tensors[n]):
                raise CheckpointError(where, f"{label} tensor `{escape_name(n)}` is {tensors[n].dtype}; expected "
                                             "a float dtype")
        module = mod.removeprefix(_PREFIX)
        r = int(config.pattern("rank_pattern", module, config.r))
        alpha = float(config.pattern("alpha_pattern", module, config.lora_alpha))
        if kind == "LOHA":
            a, b = got["hada_w1_b"], got["hada_w1_a"]
        else:
            a, b = got.get("lokr_w2_b", got.get("lokr_w2")), got.get("lokr_w1_a", got.get("lokr_w1"))
        out.append(LoraFactor(module + ".weight", a, b, None, r, alpha / r, kind=kind,
                              parts=dict(sorted(got.items()))))
    return out


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension`` as m x n, m <= n, as PEFT's LoKr splits a layer's side (``peft.tuners.lokr.layer``): m is
    ``factor`` when it divides, else the divisor nearest the square root (never above ``factor``).

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4), factorization(4096)
    ((16, 16), (8, 16), (1, 127), (4, 32), (64, 64))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    # PEFT's loop steps m through every integer to the next divisor (a prime side of 10^9, which a hostile base
    # can declare, is 10^9 steps); the same walk over the divisors alone, found up to the square root
    small = [d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0]
    divisors = sorted(set(small) | {dimension // d for d in small})
    m, n = 1, dimension
    length = m + n
    for new_m in divisors[1:]:
        if m >= n:
            break
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def expected_shapes(kind: str, shape: tuple, r: int, raw: dict) -> dict[str, tuple] | None:
    """The tensors PEFT builds for a ``kind`` module of rank ``r`` on a base weight of ``shape`` (role -> shape),
    as ``LoHaLayer`` / ``LoKrLayer.update_layer`` do; None for a weight that is not a Linear's (2-D), a Conv1d's
    (3-D) or a Conv2d's (4-D)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (2, 3, 4):
        return None
    out, inn, ks = shape[0], shape[1], shape[2:]
    # PEFT turns the effective form off for a 1x1 (or size-1) kernel: that layer is a matrix product
    eff = raw.get("use_effective_conv2d") is True and len(shape) > 2 and any(k != 1 for k in ks)
    core = (r, r, *ks) if len(ks) == 2 else (r, r, *ks, 1)
    kernel = int(np.prod(ks, dtype=np.int64)) if ks else 1
    if kind == "LOHA":
        if eff:
            return {"hada_t1": core, "hada_w1_a": (r, out), "hada_w1_b": (r, inn),
                    "hada_t2": core, "hada_w2_a": (r, out), "hada_w2_b": (r, inn)}
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, inn * kernel),
                "hada_w2_a": (out, r), "hada_w2_b": (r, inn * kernel)}
    f = raw.get("decompose_factor", DEFAULT_FACTOR)
    in_m, in_n = factorization(inn, f)
    out_l, out_k = factorization(out, f)
    use_w1 = not (raw.get("decompose_both") is True and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    got = {"lokr_w1": (out_l, in_m)} if use_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
    if use_w2:
        got["lokr_w2"] = (out_k, in_n, *ks)
    elif eff:
        got.update({"lokr_t2": core, "lokr_w2_a": (r, out_k), "lokr_w2_b": (r, in_n)})
    else:
        got.update({"lokr_w2_a": (out_k, r), "lokr_w2_b": (r, in_n * kernel)})
    return got


def check_lycoris(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """Refuse a LoHa/LoKr module whose tensors are not those PEFT builds on ``base`` (headers only): PEFT's
    ``from_pretrained`` fails on them with a size mismatch."""
    label = factor.label
    t = f"`{escape_name(factor.target)}`"
    got = {role: tuple(int(d) for d in tensors[n].shape) for role, n in factor.parts.items()}
    want = expected_shapes(factor.kind, tuple(base.shape), factor.r, config.raw if config is not None else {})
    show = ", ".join(f"{k} {list(v)}" for k, v in got.items())
    if want is None:
        raise CheckpointError(where, f"{label} tensors of {t} ({show}) cannot modify the base weight, which is "
                                     f"{list(base.shape)}: PEFT builds {label} on Linear, Conv1d and Conv2d layers "
                                     "only", "is this adapter for another base model?")
    if got != want:
        how = f"r={factor.r}"
        if factor.kind == "LOKR":
            raw = config.raw if config is not None else {}
            how += (f", decompose_both {str(raw.get('decompose_both') is True).lower()}, decompose_factor "
                    f"{raw.get('decompose_factor', DEFAULT_FACTOR)}")
        if len(base.shape) > 2:
            how += f", use_effective_conv2d {str((config.raw if config else {}).get('use_effective_conv2d') is True).lower()}"
        expect = ", ".join(f"{k} {list(v)}" for k, v in want.items())
        raise CheckpointError(where, f"{label} tensors of {t} ({show}) are not those PEFT builds on the base "
                                     f"weight {list(base.shape)} with {how} ({expect})",
                              "is this adapter for another base model, or its config another adapter's?")


def _pair_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with B @ A = w, on w's shorter side (a whole matrix is itself times an identity)."""
    m, n = w.shape
    return (np.eye(m), w) if m <= n else (w, np.eye(n))


def _cp(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of PEFT's effective-convolution rebuild ``einsum("ijkl,jr,ip->prkl", t, wb, wa)`` as [out, in x k]:
    B = wa.T [out, r], A[i, (c, k, l)] = sum_j t[i, j, k, l] wb[j, c]."""
    r = t.shape[0]
    return wa.T, np.einsum("ijkl,jc->ickl", t, wb).reshape(r, -1)


def lycoris_product(kind: str, w: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A [k, in x kernel], B [out, k]) in float64 with ``B @ A`` the unscaled delta PEFT merges, from the module's
    tensors ``w`` (role -> decoded values, in their saved shapes). LoHa: k = r1 r2 (face-splitting and Khatri-Rao
    products); LoKr: k = k1 k2 (Kronecker products of each side's pair)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    if kind == "LOHA":
        sides = []
        for i in "12":
            if f"hada_t{i}" in w:
                sides.append(_cp(w[f"hada_t{i}"], w[f"hada_w{i}_a"], w[f"hada_w{i}_b"]))
            else:
                sides.append((w[f"hada_w{i}_a"], w[f"hada_w{i}_b"].reshape(w[f"hada_w{i}_b"].shape[0], -1)))
        (b1, a1), (b2, a2) = sides
        m, n = b1.shape[0], a1.shape[1]
        if b1.shape[1] * b2.shape[1] > min(m, n):
            # r1 r2 past the matrix's shorter side: the pair would be wider than the matrix (r = 4096 on a 4096-wide
            # layer: 4096 x 16.8M factors, 550 GB), so the delta is formed whole, a row block at a time
            dense = np.empty((m, n))
            step = max(1, (1 << 22) // max(n, 1))
            for i in range(0, m, step):
                dense[i:i + step] = (b1[i:i + step] @ a1) * (b2[i:i + step] @ a2)
            return _pair_of(dense)[::-1]
        b = (b1[:, :, None] * b2[:, None, :]).reshape(m, -1)
        a = (a1[:, None, :] * a2[None, :, :]).reshape(-1, n)
        return a, b
    if "lokr_w1" in w:
        b1, a1 = _pair_of(w["lokr_w1"])
    else:
        b1, a1 = _narrow(w["lokr_w1_a"], w["lokr_w1_b"])
    if "lokr_w2" in w and w["lokr_w2"].ndim == 3:
        # a Conv1d's whole w2 [b, d, k]: PEFT's make_kron calls torch.kron(w1, w2) with w1 still 2-D, and torch
        # (as numpy) puts w1's missing axis first: [b, a d, c k], read as the weight [a b, c d, k] by a plain
        # reshape. PEFT's forward and merge use that weight: measured as it is, whole (B @ A = it)
        w1 = b1 @ a1
        dense = np.kron(w1[None], w["lokr_w2"]).reshape(w1.shape[0] * w["lokr_w2"].shape[0], -1)
        return _pair_of(dense)[::-1]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
        b2, a2 = _pair_of(w2.reshape(w2.shape[0], -1))
    elif "lokr_t2" in w:
        b2, a2 = _narrow(*_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"]))
    else:
        b2, a2 = _narrow(w["lokr_w2_a"], w["lokr_w2_b"])
    # each side's inner size is at most its shorter side, so the Kronecker pair's is at most the matrix's
    return np.kron(a1, a2), np.kron(b1, b2)


def _narrow(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of B @ A on an inner size of at most its shorter side: a rank r past it (LoKr's w1 of [2, 64] at r =
    20) is the product itself, times an identity."""
    return _pair_of(b @ a) if b.shape[1] > min(b.shape[0], a.shape[1]) else (b, a)


def lycoris_note(factor, inner: int) -> str:
    """The record note of a LoHa/LoKr module measured from its factors (``inner``: the pair's inner size, a bound
    on the delta's rank)."""
    p = factor.parts
    if factor.kind == "LOHA":
        how = "the Hadamard product (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)"
        if "hada_t1" in p:
            how += " of the cores hada_t1, hada_t2 (use_effective_conv2d)"
    else:
        w1 = "lokr_w1" if "lokr_w1" in p else "lokr_w1_a @ lokr_w1_b"
        w2 = ("lokr_w2" if "lokr_w2" in p else "lokr_w2_a @ lokr_w2_b"
              + (" through the core lokr_t2 (use_effective_conv2d)" if "lokr_t2" in p else ""))
        how = f"the Kronecker product kron({w1}, {w2})"
    return (f"{factor.label} adapter (r={factor.r}, scale={factor.scale:g}) analysed exactly from its "
            f"factors: {how}, a product of factors of inner size {inner} (its rank is at most that)")
