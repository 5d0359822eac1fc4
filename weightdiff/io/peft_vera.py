r"""PEFT's VeRA adapters (``peft_type`` VERA), read as the rank-r factor pair each module's delta is.

VeRA trains two vectors per module and shares two random projections across the model: ``base_model.vera_A``
[r, largest in] and ``base_model.vera_B`` [largest out, r] (saved in the adapter under ``save_projection``, the
default), ``<m>.vera_lambda_d`` [r] and ``<m>.vera_lambda_b`` [out]. PEFT's merge adds
``(lambda_b x vera_B[:out]) @ (lambda_d x vera_A[:, :in])`` to the layer's weight, transposed for GPT-2's
``Conv1D`` (``fan_in_fan_out``): B [out, r] and A [r, in], measured as a LoRA's factors with scale 1 (exact
spectrum, rank at most r). ``in`` is the base layer's, so the slice is set when the factors meet the base
(``check_vera``), with the orientation, decided as for LoRA.

An adapter saved with ``save_projection: false`` holds no projections: PEFT draws them again when it loads the
adapter, from ``projection_prng_key`` with torch's CPU generator (``VeraModel._init_vera_A_vera_B``: Kaiming-uniform
[r, largest in] then [largest out, r], sized to the largest layer it adapts), and so does ``projections`` here, with
torch (the ``torch`` extra; without it such an adapter is refused, naming the extra). PEFT warns that the draw is
reproducible on the same torch only; each record's note says the projections were drawn again.

>>> import numpy as np
>>> from weightdiff.io.peft_adapter import LoraFactor
>>> f = LoraFactor("m.weight", "d", "b", None, 2, 1.0, kind="VERA", cols=3)
>>> w = {"vera_A": np.arange(8.).reshape(2, 4), "vera_B": np.ones((5, 2)), "vera_lambda_d": np.array([1., 2.]),
...      "vera_lambda_b": np.array([1., 0., 2.])}
>>> a, b = vera_product(f, w)
>>> (b @ a).tolist()
[[8.0, 11.0, 14.0], [0.0, 0.0, 0.0], [16.0, 22.0, 28.0]]
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_vera_config", "vera_factors", "check_vera", "vera_layout", "vera_product", "check_projections",
           "projections"]

_PREFIX = "base_model.model."
#: peft.VeraConfig's default rank
DEFAULT_R = 256
_LAMBDA_RE = re.compile(r"^(?P<mod>.+)\.vera_lambda_(?P<k>b|d)\Z", re.S)
#: the shared projections as PEFT saves them (``BufferDict`` entries of the tuner, the adapter name removed)
_SHARED_RE = re.compile(r"^(?:base_model\.)?vera_(?P<k>A|B)\Z")


def parse_vera_config(raw: dict, path: Path):
    """The AdapterConfig of a VeRA config: ``r`` (256 when left out, as PEFT), ``fan_in_fan_out``, no scale
    (``lora_alpha`` 1); ``save_projection`` and ``projection_prng_key`` stay in ``raw``."""
    from .peft_adapter import AdapterConfig, _bool, _rank, _show, _targets

    r = _rank(path, "r", raw.get("r", DEFAULT_R))
    fan = _bool(path, raw, "fan_in_fan_out")
    if raw.get("save_projection", True) is not True:
        _bool(path, raw, "save_projection")
    key = raw.get("projection_prng_key", 0)
    if type(key) is not int:
        raise CheckpointError(path, f"adapter config has projection_prng_key = {_show(key)}, expected an integer")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, float(r), _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         raw, fan_in_fan_out=fan, path=Path(path), peft_type="VERA")


def vera_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor per module with both vectors; ``parts`` holds its vectors and the shared projections."""
    from .peft_adapter import LoraFactor, _is_float, refuse_other_method

    vecs: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    for name in tensors:
        m = _LAMBDA_RE.match(name) if "vera_lambda_" in name else None
        if m:
            vecs.setdefault(m["mod"], {})[m["k"]] = name
            continue
        s = _SHARED_RE.match(name) if "vera_" in name else None
        if s:
            shared[s["k"]] = name
        else:
            refuse_other_method(name, where, "VeRA", "vera_lambda_b, vera_lambda_d, vera_A, vera_B", "VERA")
    if not vecs:
        return []
    r = config.r
    drawn = config.raw.get("save_projection") is False and not shared
    if drawn:
        # PEFT draws them again when it loads the adapter: so does projections(), with torch
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError(where, "VeRA adapter saved with save_projection false holds no projections "
                                         "(vera_A, vera_B): PEFT draws them again from projection_prng_key with "
                                         "torch's random generator, and so does weightdiff, with the torch extra",
                                  "pip install 'weightdiff[torch]'") from None
    elif set(shared) != {"A", "B"}:
        raise CheckpointError(where, f"VeRA adapter holds {', '.join('vera_' + k for k in sorted(shared)) or 'neither'}"
                                     " of its shared projections vera_A and vera_B")
    else:
        a, b = tensors[shared["A"]], tensors[shared["B"]]
        for n, info in ((shared["A"], a), (shared["B"], b)):
            if not _is_float(info):
                raise CheckpointError(where, f"VeRA tensor `{escape_name(n)}` is {info.dtype}; expected a float dtype")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(where, f"VeRA projections vera_A {list(a.shape)} and vera_B {list(b.shape)} are not "
                                         f"[r, in] and [out, r] for adapter_config.json's r = {r}",
                                  "projections and config from different adapters?")
    out = []
    for mod, got in vecs.items():
        if set(got) != {"b", "d"}:
            raise CheckpointError(where, f"VeRA module `{escape_name(mod)}` has only vera_lambda_"
                                         f"{next(iter(got))} of its two vectors vera_lambda_b and vera_lambda_d")
        lb, ld = tensors[got["b"]], tensors[got["d"]]
        for n, info in ((got["b"], lb), (got["d"], ld)):
            if not _is_float(info):
                raise CheckpointError(where, f"VeRA tensor `{escape_name(n)}` is {info.dtype}; expected a float dtype")
        most = None if drawn else int(b.shape[0])
        if tuple(ld.shape) != (r,) or len(lb.shape) != 1 or not 0 < lb.shape[0] <= (most or lb.shape[0]):
            raise CheckpointError(where, f"VeRA vectors of `{escape_name(mod)}` are vera_lambda_d {list(ld.shape)} "
                                         f"and vera_lambda_b {list(lb.shape)}; expected [{r}] (r) and [out]"
                                         + (f" with out at most vera_B's {most} rows" if most else ""))
        parts = {"vera_lambda_b": got["b"], "vera_lambda_d": got["d"]}
        if not drawn:
            parts = {"vera_A": shared["A"], "vera_B": shared["B"], **parts}
        out.append(LoraFactor(mod.removeprefix(_PREFIX) + ".weight", got["d"], got["b"], None, r, 1.0, kind="VERA",
                              parts=parts, shared=(0, 0, config.raw.get("projection_prng_key", 0)) if drawn else None))
    return out


def vera_layout(factor, tensors: dict[str, TensorInfo], base: TensorInfo) -> str | None:
    """What a module's shapes say of its layer: ``linear`` (the base weight is [out, in] and only so), ``conv1d``
    (only [in, out]: GPT-2's Conv1D), None (square, or neither)."""
    shape, rows = tuple(base.shape), int(tensors[factor.parts["vera_lambda_b"]].shape[0])
    if len(shape) != 2:
        return None
    normal, flipped = shape[0] == rows, shape[1] == rows
    return "linear" if normal and not flipped else "conv1d" if flipped and not normal else None


def check_vera(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path,
               layout: str | None = None) -> None:
    """Check a module's vectors against the base weight (headers only), and set its orientation and the columns
    of vera_A it reads (the layer's inputs)."""
    t = f"`{escape_name(factor.target)}`"
    shape = tuple(int(d) for d in base.shape)
    rows = int(tensors[factor.parts["vera_lambda_b"]].shape[0])
    # projections drawn again (save_projection false) are sized to the layers: any width fits
    width = int(tensors[factor.parts["vera_A"]].shape[1]) if "vera_A" in factor.parts else max(shape or (0,))
    normal = len(shape) == 2 and shape[0] == rows and shape[1] <= width
    flipped = len(shape) == 2 and shape[1] == rows and shape[0] <= width
    if not (normal or flipped):
        raise CheckpointError(where, f"VeRA vectors of {t} (vera_lambda_b [{rows}]) and vera_A [{factor.r}, {width}] "
                                     f"do not fit the base weight, which is {list(shape)} (PEFT builds VeRA on Linear "
                                     "and Conv1D layers only)", "is this adapter for another base model?")
    prefer = layout == "conv1d" if layout is not None else bool(config and config.fan_in_fan_out)
    factor.transposed = flipped and (prefer or not normal)
    factor.cols = shape[0] if factor.transposed else shape[1]


def check_projections(factors: list, where: Path, tensors: dict[str, TensorInfo]) -> None:
    """PEFT sizes the shared projections to the largest layer it adapts ([r, largest in], [largest out, r]) and
    fails to load others: the same check, once every module's orientation is known."""
    if not factors:
        return
    rows = max(int(tensors[f.parts["vera_lambda_b"]].shape[0]) for f in factors)
    cols = max(f.cols for f in factors)
    if "vera_A" not in factors[0].parts:
        for f in factors:               # drawn again at [r, cols] and [rows, r], as PEFT sizes them (_find_dim)
            f.shared = (rows, cols, f.shared[2])
        return
    a, b = (tuple(tensors[factors[0].parts[k]].shape) for k in ("vera_A", "vera_B"))
    if (b[0], a[1]) != (rows, cols):
        raise CheckpointError(where, f"VeRA projections vera_A {list(a)} and vera_B {list(b)} are not sized to the "
                                     f"largest layer the adapter modifies ({rows} outputs, {cols} inputs), as PEFT "
                                     "sizes them: it would not load them", "is this adapter for another base model?")


@functools.lru_cache(maxsize=2)
def projections(key: int, r: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared projections PEFT draws for ``projection_prng_key`` ``key`` (float32 vera_A [r, cols] and vera_B
    [rows, r], read-only): ``torch.Generator(device="cpu").manual_seed(key)``, then ``_kaiming_init`` of each in
    turn, uniform in +-sqrt(3) sqrt(2) / sqrt(fan_in) (fan_in the second side). Drawn once per adapter, not once per
    module (each module's checks and its record read them; r 256 on a 14336-wide model is 2 x 3.7M draws)."""
    import math

    import torch

    g = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((r, cols), (rows, r)):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        with torch.no_grad():
            x = torch.empty(shape).uniform_(-bound, bound, generator=g).numpy()
        x.flags.writeable = False
        out.append(x)
    return out[0], out[1]


def vera_product(factor, w: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) in float64: lambda_d x vera_A[:, :in] and lambda_b x vera_B[:out] (the projections
    drawn again when the adapter holds none: ``factor.shared``)."""
    if "vera_A" not in w:
        rows, cols, key = factor.shared
        w = {**w}
        w["vera_A"], w["vera_B"] = projections(key, factor.r, rows, cols)
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    lb, ld = w["vera_lambda_b"].reshape(-1), w["vera_lambda_d"].reshape(-1)
    cols = factor.cols if factor.cols is not None else w["vera_A"].shape[1]
    a = ld[:, None] * w["vera_A"][:, :cols]
    b = lb[:, None] * w["vera_B"][:lb.shape[0]]
    return a, b
