r"""PEFT's FourierFT adapters (``peft_type`` FOURIERFT), read as the factor pair their change is.

FourierFT trains, for each adapted Linear (or GPT-2 Conv1D) layer of ``out`` outputs and ``in`` inputs, ``n``
spectral coefficients, saved as ``<m>.fourierft_spectrum`` [n]. Their places in the [out, in] spectrum are not
saved: PEFT (this module follows 0.21) draws them again whenever it builds the layer, the first ``n`` of
``torch.randperm(out * in)`` from a generator seeded with the config's ``random_loc_seed`` (one seed for every
layer, so layers of one shape share their places), entry p at row p // in and column p % in. The change is
``real(ifft2(S)) x scaling``, S the [out, in] spectrum holding the coefficients there (torch's ifft2 divides by
out x in), added to the weight as it is for a Linear, transposed for a Conv1D (``fan_in_fan_out``).

Each coefficient s at (j, l) contributes s cos(2 pi (a j / out + b l / in)) / (out in) to element (a, b), and
cos(x + y) = cos x cos y - sin x sin y, so the change is a factor pair B @ A of inner size 2 n:
B = [s cos(2 pi a j / out), -s sin(2 pi a j / out)] x scaling / (out in) and A = [cos(2 pi b l / in);
sin(2 pi b l / in)], of rank at most 2 n, measured exactly as a LoRA's is (``measure.rank.analyze_factors``). The
places are those PEFT draws when it loads the adapter: torch's CPU generator (MT19937) and its randperm's shuffle,
reproduced for the first n entries only (``places``, tested against torch), so that an out x in permutation is never
held (1.9 GB of int64 at 70B widths); more than ``_EMULATED_MAX`` coefficients are drawn with torch itself.

>>> import numpy as np
>>> s, idx = np.array([1.0, -0.5, 0.25]), np.array([7, 0, 23])
>>> a, b = spectrum_pair((4, 6), False, s, idx)
>>> dense = np.zeros((4, 6)); dense[idx // 6, idx % 6] = s
>>> bool(np.allclose(b @ a, np.fft.ifft2(dense).real))
True
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .safetensors_read import TensorInfo

__all__ = ["parse_fourierft_config", "fourierft_factors", "check_fourierft", "check_fourierft_values", "places",
           "spectrum_pair", "fourierft_pair", "fourierft_note"]

_PREFIX = "base_model.model."
_SPECTRUM_RE = re.compile(r"^(?P<mod>.+)\.fourierft_spectrum\Z", re.S)
#: torch.Generator.manual_seed's range
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def parse_fourierft_config(raw: dict, path: Path):
    """The AdapterConfig of a FourierFT config: ``n_frequency`` (PEFT's default 1000) and ``n_frequency_pattern``'s
    values positive integers, ``scaling`` (150) a number, ``random_loc_seed`` (777) an integer torch can seed with,
    ``fan_in_fan_out`` a boolean."""
    from .peft_adapter import AdapterConfig, _bool, _number, _pattern_repeats, _rank, _targets

    n = _rank(path, "n_frequency", raw.get("n_frequency", 1000))
    scaling = _number(path, "scaling", raw.get("scaling", 150.0))
    seed = raw.get("random_loc_seed", 777)
    if type(seed) is not int or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise CheckpointError(path, f"adapter config has random_loc_seed = {escape_name(repr(seed))[:40]}, expected "
                                    "an integer torch can seed its generator with")
    pats = raw.get("n_frequency_pattern") or {}
    if not isinstance(pats, dict):
        raise CheckpointError(path, "adapter config has n_frequency_pattern that is not an object of module name -> "
                                    "frequencies")
    repeats = {}
    for pat, value in pats.items():
        _rank(path, f"n_frequency_pattern[{escape_name(repr(pat))[:40]}]", value)
        repeats[pat] = _pattern_repeats(path, "n_frequency_pattern", pat)
    fan = _bool(path, raw, "fan_in_fan_out")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(n, scaling, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         {**raw, "n_frequency": n, "scaling": scaling, "random_loc_seed": seed,
                          "n_frequency_pattern": pats}, fan_in_fan_out=fan, path=Path(path), repeats=repeats,
                         peft_type="FOURIERFT")


def is_fourierft(name: str) -> bool:
    return _SPECTRUM_RE.match(name) is not None


def fourierft_factors(tensors: dict[str, TensorInfo], where: Path, config) -> list:
    """One LoraFactor (kind FOURIERFT, its spectrum in ``parts``, r its frequencies, scale the config's scaling) per
    adapted module."""
    from .peft_adapter import LoraFactor, _is_float, own_tensors

    out = []
    for name, info, m in own_tensors(tensors, where, _SPECTRUM_RE, ".fourierft_spectrum", "FourierFT",
                                     "fourierft_spectrum", "FOURIERFT"):
        if not _is_float(info) or len(info.shape) != 1 or not info.shape[0]:
            raise CheckpointError(where, f"FourierFT tensor `{escape_name(name)}` is {info.dtype} {list(info.shape)}; "
                                         "expected a float vector of the layer's spectral coefficients")
        module = m["mod"].removeprefix(_PREFIX)
        n = int(info.shape[0])
        want = config.pattern("n_frequency_pattern", module, config.r)
        if n != want:
            raise CheckpointError(where, f"FourierFT tensor `{escape_name(name)}` holds {n:,} coefficients, but "
                                         f"adapter_config.json gives this module n_frequency {want:,}",
                                  "tensors and config from different adapters?")
        out.append(LoraFactor(module + ".weight", name, name, None, n, float(config.lora_alpha), kind="FOURIERFT",
                              parts={"spectrum": name}))
    if any(f.r > _EMULATED_MAX for f in out):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CheckpointError(where, "FourierFT adapters do not save where their coefficients sit in the spectrum: "
                                         f"PEFT draws the places again with torch's random generator from "
                                         f"random_loc_seed, and so does weightdiff, with the torch extra for more "
                                         f"than {_EMULATED_MAX:,} coefficients a layer",
                                  "pip install 'weightdiff[torch]'") from None
    return out


def check_fourierft(factor, tensors: dict[str, TensorInfo], base: TensorInfo, config, where: Path) -> None:
    """The spectrum must fit the base layer PEFT builds FourierFT on (headers only): a float Linear weight [out, in],
    or under ``fan_in_fan_out`` GPT-2's Conv1D [in, out], with at most out x in coefficients. Sets ``shared`` to
    (out, in, random_loc_seed) and ``in_out`` to the Conv1D layout."""
    from .peft_adapter import float_base_shape

    t = f"`{escape_name(factor.target)}`"
    shape = float_base_shape("FourierFT", "Linear and Conv1D", factor, base, where)
    if len(shape) != 2:
        raise CheckpointError(where, f"FourierFT module {t}: the base weight is {list(shape)}, not a Linear or Conv1D "
                                     "weight PEFT's FourierFT builds on", "is this adapter for another base model?")
    conv1d = bool(config.fan_in_fan_out)
    out, inn = (shape[1], shape[0]) if conv1d else shape
    n = factor.r
    if n > out * inn:
        raise CheckpointError(where, f"FourierFT module {t} has {n:,} coefficients, more than its {out:,} x {inn:,} "
                                     "spectrum holds (PEFT refuses n_frequency above out x in)",
                              "is this adapter for another base model?")
    factor.shared = (out, inn, int(config.raw.get("random_loc_seed", 777)))
    factor.in_out = conv1d


def check_fourierft_values(factor, spectrum: np.ndarray, where: Path, cap: float) -> None:
    """A change too large to measure is refused: its norm is at most |scaling| |s| / sqrt(out x in) (Parseval)."""
    out, inn, _ = factor.shared if factor.shared else (1, 1, 0)
    with np.errstate(all="ignore"):
        bound = abs(factor.scale) * float(np.linalg.norm(np.asarray(spectrum, np.float64))) / math.sqrt(out * inn)
    if not math.isfinite(bound) or bound > cap:
        raise CheckpointError(where, f"FourierFT delta of `{escape_name(factor.target)}` is too large to measure: "
                                     f"|scaling| x |spectrum| / sqrt(out x in) = {bound:.3g} with scaling "
                                     f"{factor.scale:.3g}", "check scaling in adapter_config.json")


#: torch's CPU randperm keeps its first shuffle below this many elements (uint32's largest over 20): a forward
#: Fisher-Yates drawing 32-bit numbers, ``random() % (N - i)``; from it on the "inside-out" one drawing 64-bit
#: numbers (two 32-bit draws, the first the high half), ``random64() % (i + 1)`` (aten's ``randperm_cpu``)
_RANDPERM_SPLIT = 0xFFFFFFFF // 20
#: more coefficients than this are drawn with torch itself (the places' own loop runs once per coefficient)
_EMULATED_MAX = 1 << 20
#: draws at once in the inside-out shuffle's tail (five 8-byte temporaries of this many)
_DRAWS = 1 << 20


def _torch_generator(seed: int) -> np.random.MT19937:
    """torch's CPU generator seeded with ``seed`` (``torch.Generator().manual_seed``): MT19937 seeded by
    init_genrand with the seed's low 32 bits, as numpy's legacy seeding seeds it."""
    state = np.random.RandomState(seed % (1 << 32)).get_state(legacy=False)
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": state["state"]}
    return bg


def first_of_randperm(size: int, seed: int, n: int) -> np.ndarray:
    """``torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]`` without the permutation: below
    ``_RANDPERM_SPLIT`` the forward shuffle's first n steps fix the first n entries (the positions it swaps with
    kept in a dict); from it on an entry p < n ends as the last i >= n that drew p, else as the inside-out shuffle
    of the first n left it, so the tail's draws are read in chunks and only those below n kept.

    >>> first_of_randperm(10, 0, 3).tolist()
    [4, 1, 7]
    """
    n = min(n, size)
    bg = _torch_generator(seed)
    if size < _RANDPERM_SPLIT:
        draws = bg.random_raw(min(n, size - 1)).tolist()
        moved: dict[int, int] = {}
        out = np.empty(n, np.int64)
        for i in range(n):
            j = i + (draws[i] % (size - i) if i < len(draws) else 0)
            vi, vj = moved.get(i, i), moved.get(j, j)
            moved[j] = vi
            out[i] = vj
        return out
    out = np.zeros(n, np.int64)
    head = bg.random_raw(2 * n)
    for i, (hi, lo) in enumerate(zip(head[0::2].tolist(), head[1::2].tolist())):
        z = ((hi << 32) | lo) % (i + 1)
        out[i] = out[z]
        out[z] = i
    for i0 in range(n, size, _DRAWS):
        k = min(_DRAWS, size - i0)
        raw = bg.random_raw(2 * k)
        z = ((raw[0::2] << np.uint64(32)) | raw[1::2]) % np.arange(i0 + 1, i0 + k + 1, dtype=np.uint64)
        hit = np.flatnonzero(z < np.uint64(n))
        if hit.size:          # (later draws win: the largest i that drew p)
            np.maximum.at(out, z[hit].astype(np.int64), hit.astype(np.int64) + i0)
    return out


@functools.lru_cache(maxsize=16)
def places(out: int, inn: int, seed: int, n: int) -> np.ndarray:
    """The flat places p (row p // in, column p % in) of a layer's n coefficients, as PEFT draws them: the first n
    of torch.randperm(out x in) from a generator seeded with ``seed`` (layers of one shape share them), drawn by
    ``first_of_randperm`` (torch's own randperm above ``_EMULATED_MAX`` coefficients)."""
    if n <= _EMULATED_MAX:
        out_ = first_of_randperm(out * inn, seed, n)
    else:
        import torch

        out_ = torch.randperm(out * inn, generator=torch.Generator().manual_seed(seed))[:n].numpy().astype(np.int64)
    out_.setflags(write=False)
    return out_


def spectrum_pair(shape: tuple[int, int], conv1d: bool, spectrum: np.ndarray, flat: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(A [2 n, cols], B [rows, 2 n]) with real(ifft2(S)) = B @ A (as stored: transposed for a Conv1D), S the
    [out, in] = ``shape`` spectrum holding ``spectrum`` at the flat places ``flat`` (the scaling is the pair's
    scale, applied as a LoRA's is). The phases are reduced modulo the size in integers first, so cos and sin see
    angles below 2 pi."""
    out, inn = shape
    j, l = flat // inn, flat % inn
    s = np.asarray(spectrum, np.float64) / (out * inn)
    a = _waves(inn, l, np.ones(len(l)), 1.0)                                     # [in, 2 n]: A^T
    if conv1d:                  # a Conv1D stores [in, out]: (B A)^T = A^T B^T
        return np.ascontiguousarray(_waves(out, j, s).T), a
    a = np.ascontiguousarray(a.T)
    if out * 2 * len(j) * 8 > _HELD_BYTES:     # B's rows computed when asked for (a 70B layer's: 459 MB)
        return a, WaveRows(out, j, s)
    return a, _waves(out, j, s)                                                  # [out, 2 n]


#: a factor B of more bytes than this is a ``WaveRows`` (its rows computed as the rank pass reads them)
_HELD_BYTES = 64 << 20


class WaveRows:
    """The factor B [size, 2 n] of ``_waves(size, freq, weight)`` never held: its rows are computed when sliced
    (``b[i:j]``, a float64 array, the same values as the held factor's rows), as the factor paths read B, by row
    blocks (``measure.rank.analyze_factors``, ``kernels.spectral.tall_r``); ``np.asarray`` of it builds it whole."""

    row_blocks = True           # (the factor paths' test for a factor they may read by row blocks only)
    dtype = np.dtype(np.float64)
    ndim = 2

    def __init__(self, size: int, freq: np.ndarray, weight: np.ndarray):
        self.size, self.freq, self.weight = int(size), np.asarray(freq, np.int64), np.asarray(weight, np.float64)
        self.shape = (self.size, 2 * len(self.freq))
        self.nbytes = self.shape[0] * self.shape[1] * 8

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            return np.asarray(self)[key]
        lo, hi, _ = key.indices(self.size)
        return _waves(self.size, self.freq, self.weight, rows=(lo, max(lo, hi)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = _waves(self.size, self.freq, self.weight)
        return x if dtype is None else x.astype(dtype, copy=False)


#: rows of a factor computed at once (its temporaries a few MB whatever the layer's size)
_WAVE_ROWS = 512


def _waves(size: int, freq: np.ndarray, weight: np.ndarray, sin_sign: float = -1.0,
           rows: tuple[int, int] | None = None) -> np.ndarray:
    """[size, 2 n] (rows ``rows[0]`` to ``rows[1]`` of it): weight x cos(2 pi p f / size) in the first n columns,
    sin_sign x weight x sin(...) in the rest, for p = 0 .. size - 1 and each frequency f, the phase p f reduced modulo
    ``size`` in integers; in row blocks (each element computed alone: the same values however the rows are cut)."""
    n = len(freq)
    first, last = (0, size) if rows is None else rows
    out = np.empty((last - first, 2 * n))
    step = 2.0 * math.pi / size
    freq = np.asarray(freq, np.int64)
    for lo in range(first, last, _WAVE_ROWS):
        p = np.arange(lo, min(last, lo + _WAVE_ROWS), dtype=np.int64)[:, None]
        angle = step * ((p * freq[None, :]) % size)
        out[lo - first:lo - first + len(p), :n] = weight * np.cos(angle)
        out[lo - first:lo - first + len(p), n:] = (sin_sign * weight) * np.sin(angle)
    return out


def fourierft_pair(factor, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``spectrum_pair`` of a module from its saved spectrum (``peft_adapter.factor_pair``): its change is
    ``factor.scale`` (the config's scaling) x B @ A."""
    spectrum = np.asarray(values["spectrum"]).reshape(-1)
    out, inn, seed = factor.shared
    return spectrum_pair((out, inn), bool(factor.in_out), spectrum, places(out, inn, seed, spectrum.size))


def fourierft_note(factor) -> str:
    out, inn, seed = factor.shared
    return (f"FourierFT `{factor.parts['spectrum']}` ({factor.r:,} spectral coefficients, scaling {factor.scale:g}, "
            f"their places drawn from random_loc_seed {seed} with torch as PEFT draws them) measured exactly as the "
            f"factor pair of real(ifft2(S)) x scaling, rank at most {2 * factor.r:,}"
            + (" (GPT-2 Conv1D: transposed)" if factor.in_out else ""))
