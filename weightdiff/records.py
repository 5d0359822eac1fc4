"""Result records and the JSON contract (``schema: weightdiff.compare/2``).

``TensorRecord`` is one row per tuned (or removed base) tensor, ``RankRecord`` its
spectral block, ``BlockRecord`` one row per block, ``Summary`` the model level.
``Comparison`` holds them all and serialises deterministically: same inputs, same
bytes. Non-finite floats become ``null``; floats are written with Python's
shortest round-trip repr; keys keep the order of the contract in DESIGN.md.
Run time and other facts that vary between runs live under ``run``, which
``to_json(include_run=False)`` leaves out for hashing.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, ClassVar, Callable

SCHEMA = "weightdiff.compare/2"
#: older schemas ``weightdiff report`` still reads (a /1 result has no coverage, components or buffers)
READABLE_SCHEMAS = ("weightdiff.compare/1", SCHEMA)

STATUSES = ("unchanged", "rounding", "quantized", "changed", "resized", "added", "removed")
VERDICTS = ("identical", "cast_only", "quantized_only", "derived", "partial", "unrelated", "inconclusive")


@dataclass
class RankRecord:
    stable_rank: float | None
    effective_rank: float | None
    energy_rank_90: int | None
    energy_rank_99: int | None
    numerical_rank: int
    noise_floor: float
    spectrum: list[float]
    energy_captured: float | None    # share of norm_delta^2 the reported spectrum holds
    method: str = "exact"             # "exact" | "gram" | "inertia" | "randomized" | "factors"
    shape_2d: tuple[int, int] = (0, 0)
    exact: bool = True                # False when ranks are lower bounds from a partial spectrum
    extra: dict[str, Any] = field(default_factory=dict)   # opt-in weight-subspace analysis, notes
    bounds: dict[str, list[float]] = field(default_factory=dict)  # field -> [lo, hi] when not exact (see docs/rank.md)
    estimated: list[str] = field(default_factory=list)    # fields computed with a stated approximation

    def to_dict(self) -> dict:
        d = _shallow(self)
        d["shape_2d"] = list(self.shape_2d)
        return d


@dataclass
class TensorRecord:
    name: str                           # tuned name (base name for `removed`)
    base_name: str | None
    status: str
    shape: list[int]                    # tuned shape (base shape for `removed`)
    base_shape: list[int] | None
    dtype_base: str | None
    dtype_tuned: str | None
    numel: int                          # elements of the tuned tensor (base for `removed`)
    numel_compared: int = 0             # elements paired element-wise (overlap rows when resized)
    norm_base: float | None = None
    norm_tuned: float | None = None
    norm_delta: float | None = None
    rel_change: float | None = None
    cosine: float | None = None
    frac_changed: float | None = None
    frac_beyond_rounding: float | None = None
    max_abs_delta: float | None = None
    nonfinite: int = 0
    sign_flips: int = 0
    base_index: int = 0                 # which --base this tensor was paired with
    compared: str = "float"             # "float" | "bytes" (dtypes the kernels cannot decode) | "none"
    block: str | None = None            # filled by aggregate
    module: str | None = None           # filled by aggregate
    note: str | None = None
    rank: RankRecord | None = None
    tied: bool = False                  # a tied LM head: the tuned embedding again, against the base head
    quant: dict | None = None           # the quantization noise-floor test when a side is quantized
    rounding_floor: dict[str, float] | None = None   # norm of a cast of the base to BF16 / F16 (measure.floors)
    paired_by: str | None = None        # how the pair was made: name, prefix, rename, tied, content
    # Not a field: the cast chain that gives every tuned value from the base (measure.recast), set on
    # the few records it explains and in their JSON rows only. A 30th instance attribute ends CPython's
    # key sharing for every record's __dict__ (at most 29 keys in 3.11): 1.2 KB more per tensor, +120 MB
    # for 100,000 tensors. Add no field without removing one (tests/test_records_json.py checks).
    cast: ClassVar[dict | None] = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if len(d) != len(_TENSOR_FIELDS):       # an attribute that is not a field: leave it out
            d = _shallow(self)
        for key in ("shape", "base_shape", "quant", "rounding_floor"):   # copied one level, as _shallow does
            v = d[key]
            if v is not None:
                d[key] = list(v) if type(v) is list else dict(v) if type(v) is dict else v
        d["rank"] = None if self.rank is None else self.rank.to_dict()
        if self.cast is not None:
            d["cast"] = dict(self.cast)
        return d


#: the start of the note of a tensor whose stored bytes are the base's, labelled with another dtype of the same width
#: (``measure.compute``): flag ``dtype_relabelled``, and no evidence of relatedness (``judge.relatedness``)
RELABEL_NOTE = "the base's bytes under another dtype label"


#: the start of the note of a base tensor an IA3 adapter's vector scales, measured as PEFT merges it
#: (``measure.compute``): flag ``adapter``, as for LoRA factors
IA3_NOTE = "IA3 vector"

#: the start of the note of a base weight an OFT adapter rotates, measured as PEFT merges it (``measure.compute``):
#: flag ``adapter``, as for LoRA factors and IA3 vectors
OFT_NOTE = "OFT rotation"

#: the start of the note of a base weight a BOFT adapter rotates and scales, measured as PEFT merges it
#: (``measure.compute``): flag ``adapter``, counted with OFT's in ``scope.oft``
BOFT_NOTE = "BOFT rotation"

#: the start of the note of a table whose rows PEFT's trainable tokens replace (``measure.compute``): flag
#: ``adapter``, as for LoRA factors
TOKENS_NOTE = "PEFT trainable tokens"

#: the start of the note of a base tensor an LN tuning adapter's trained layer copy replaces (``measure.compute``):
#: flag ``adapter``
LN_NOTE = "LN tuning: the adapter's trained copy"


_IA3_VALUES = re.compile(r"^IA3 vector `.*` \((\d+) values?\) merged into the base's weight", re.S)


_OFT_VALUES = re.compile(r"^B?OFT rotation `.*` \((\d+) values?;", re.S)


def oft_values(record) -> int | None:
    """The parameters of the OFT rotation a merged weight's record names in its note; None for any other record.

    >>> oft_values({"note": "OFT rotation `m.oft_R.weight` (112 values; 4 blocks of 8, Cayley) merged into ..."})
    112
    """
    get = record.get if isinstance(record, Mapping) else record.__dict__.get
    m = _OFT_VALUES.match(get("note") or "")
    return int(m[1]) if m else None


def ia3_merged(record) -> bool:
    """Whether a record (or JSON row) is a base tensor an IA3 adapter's vector scales, measured merged."""
    get = record.get if isinstance(record, Mapping) else record.__dict__.get
    return (get("note") or "").startswith(IA3_NOTE)


def ia3_values(record) -> int:
    """The values of the IA3 vector a merged weight's record names in its note (0 for any other record, and for
    a bias the same vector scales).

    >>> ia3_values({"note": "IA3 vector `m.ia3_l` (32 values) merged into the base's weight (W x l)"})
    32
    """
    get = record.get if isinstance(record, Mapping) else record.__dict__.get
    m = _IA3_VALUES.match(get("note") or "")
    return int(m[1]) if m else 0


#: the start of the note of a changed tensor whose bytes are, bit for bit, another tensor of the base's under this
#: name (``comparison.mark_moved_tensors``): flag ``moved_tensors``, and no evidence of relatedness
MOVED_NOTE = "bit for bit another tensor of the base"


def moved(record) -> bool:
    """Whether a record (or JSON row) is a changed tensor that is bit for bit another tensor of the base."""
    get = record.get if isinstance(record, Mapping) else record.__dict__.get
    return get("status") == "changed" and MOVED_NOTE in (get("note") or "")


def relabelled(record) -> bool:
    """Whether a record (or JSON row) is a tensor holding the base's bytes under another dtype label."""
    get = record.get if isinstance(record, Mapping) else record.__dict__.get
    db, dt = get("dtype_base"), get("dtype_tuned")
    return db is not None and dt is not None and db != dt and RELABEL_NOTE in (get("note") or "")


_TENSOR_FIELDS = tuple(f.name for f in fields(TensorRecord))
_TENSOR_FIELD_SET = frozenset(_TENSOR_FIELDS)


class TensorRow(Mapping):
    """A ``TensorRecord`` seen as its JSON row (``to_dict()``) without building that dict: the
    sentences, the reference scale and the terminal summary read 100,000 rows of a
    mixture-of-experts comparison through these, and ``dumps`` writes each from its record.
    Read-only; equal to ``record.to_dict()`` (lists and dicts are the record's own, not copies)."""

    __slots__ = ("record", "get")

    def __init__(self, record: TensorRecord) -> None:
        self.record = record
        d = record.__dict__
        # no rank to turn into a dict and nothing but the fields: the record's own dict answers
        # ``get`` (a C call; the sentences ask 20 questions of each of 100,000 rows)
        # (never a method of self: a view holding its own bound method would be a reference cycle)
        self.get = d.get if record.rank is None and len(d) == len(_TENSOR_FIELDS) else partial(_row_get, record)

    def __getitem__(self, key: str) -> Any:
        if key not in _TENSOR_FIELD_SET and not (key == "cast" and self.record.cast is not None):
            raise KeyError(key)
        return _row_get(self.record, key)

    def __contains__(self, key: object) -> bool:
        return key in _TENSOR_FIELD_SET or (key == "cast" and self.record.cast is not None)

    def __iter__(self):
        return iter(_TENSOR_FIELDS + (("cast",) if self.record.cast is not None else ()))

    def __len__(self) -> int:
        return len(_TENSOR_FIELDS) + (self.record.cast is not None)

    def __repr__(self) -> str:
        return f"TensorRow({self.record.name!r})"


def _row_get(record: TensorRecord, key: str, default: Any = None) -> Any:
    """``TensorRow.get`` of a record with a rank block (given as a dict) or extra attributes."""
    if key == "rank":
        r = record.rank
        return None if r is None else r.to_dict()
    return getattr(record, key) if key in _TENSOR_FIELD_SET or key == "cast" else default


def plain_rows(data: dict) -> dict:
    """``data`` with its ``tensors`` as plain dicts (``TensorRow`` views and records turned into
    ``to_dict()`` rows), for outputs that need real dicts (CSV, the memo, figures)."""
    rows = data.get("tensors")
    if isinstance(rows, list) and any(type(r) is not dict for r in rows):
        data["tensors"] = [r.record.to_dict() if type(r) is TensorRow else r.to_dict() if type(r) is TensorRecord
                           else r for r in rows]
    return data


@dataclass
class BlockRecord:
    block: str
    index: int | None
    params: int
    params_changed: int
    tensors: int
    tensors_changed: int
    rel_change: float | None
    norm_base: float
    norm_delta: float
    delta_params: int
    max_numerical_rank: int | None = None         # None when a bracket: see max_numerical_rank_bounds
    max_numerical_rank_bounds: list[int] | None = None
    modules: dict[str, float | None] = field(default_factory=dict)  # module kind -> rel_change
    bounds: dict[str, list] = field(default_factory=dict)  # max_numerical_rank -> [lo, hi] from partial spectra
    delta_params_lower: int | None = None   # as Summary.delta_params_lower: delta_params is then an upper bound

    def to_dict(self) -> dict:
        return _asdict(self)


@dataclass
class Summary:
    verdict: str
    verdict_reason: str
    scope: dict[str, Any]
    form: dict[str, Any]
    flags: list[str]
    params_total: int
    params_by_status: dict[str, int]
    tensors_by_status: dict[str, int]
    relative_change: float | None
    relatedness_cosine: float | None
    blocks_total: int
    blocks_changed: int
    delta_params: int
    delta_params_share: float | None
    compressed_bytes: dict[str, Any] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)
    relatedness_rel_change: float | None = None   # relative change over the matrices behind relatedness_cosine
    quantization: dict[str, Any] | None = None    # the noise-floor tests of pairs with a quantized side
    coverage: dict[str, Any] = field(default_factory=dict)      # compared shares of each side's parameters
    components: list[dict] = field(default_factory=list)        # per-component relatedness (judge.relatedness)
    buffers: list[dict] = field(default_factory=list)           # non-trainable buffers, never compared
    declared: dict[str, Any] = field(default_factory=dict)      # names the checkpoints declare (a hint)
    #: the least delta_params could be when some energy ranks are brackets (delta_params is then an
    #: upper bound: it counts their upper ends); None when delta_params is exact
    delta_params_lower: int | None = None

    def to_dict(self) -> dict:
        return _asdict(self)


_FIELDS: dict[type, tuple[str, ...]] = {}
_ATOMS = (str, int, float, bool, type(None))


def _asdict(obj: Any) -> dict:
    """``dataclasses.asdict(obj)``, the same result, without ``copy.deepcopy`` of every number and
    string (the summary and the blocks of a 1,000-block model hold some 60,000 of them)."""
    return {name: _copied(getattr(obj, name)) for name in _fields_of(obj)}


def _copied(v: Any) -> Any:
    t = type(v)
    if t in _ATOMS:
        return v
    if t is dict:
        return {_copied(k): _copied(x) for k, x in v.items()}
    if t is list:
        return [_copied(x) for x in v]
    if t is tuple:
        return tuple(_copied(x) for x in v)
    return asdict(v) if hasattr(type(v), "__dataclass_fields__") else copy.deepcopy(v)


def _fields_of(obj: Any) -> tuple[str, ...]:
    names = _FIELDS.get(type(obj))
    if names is None:
        names = _FIELDS[type(obj)] = tuple(f.name for f in fields(obj))
    return names


def _shallow(obj: Any) -> dict:
    """``dataclasses.asdict`` for a record of plain values, without its deep copy (the 100,000-tensor
    case spends most of its JSON time in ``copy.deepcopy``): lists and dicts are copied one level."""
    d = {}
    for name in _fields_of(obj):
        v = getattr(obj, name)
        d[name] = list(v) if type(v) is list else dict(v) if type(v) is dict else v
    return d


def clean(value: Any) -> Any:
    """Recursively turn NaN/Inf into None and tuples into lists (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):   # numpy scalars
        return clean(value.item())
    return value


#: keys whose list of records is written one compact record per line (see ``dumps``)
ROW_KEYS = frozenset({"tensors"})


def dumps(obj: Any) -> str:
    """The one JSON encoder: deterministic, strict, UTF-8, trailing newline.

    Indented by one space per level (``json.dumps(..., indent=1)``), except that a list of
    objects under a key in ``ROW_KEYS`` (``tensors``) holds one compact object per line
    (``", "`` and ``": "`` separators): a 100,000-tensor comparison is half the bytes and
    several times faster to write, and ``grep name result.json`` shows a tensor's whole
    record. ``dumps_reference`` is the specification the tests compare it with. Non-finite
    floats are written as ``null``; numpy scalars as their Python values.
    """
    out: list[str] = []
    _emit(obj, 0, out)
    out.append("\n")
    return "".join(out)


def dump_chunks(obj: Any, write: Callable[[str], None], chunk: int = 1 << 20) -> None:
    """``dumps(obj)`` handed to ``write`` in pieces of about ``chunk`` characters (the same text,
    joined): a 100,000-tensor result is written without holding the whole document, its
    pieces and its bytes at once."""
    out = _Chunks(write, chunk)
    _emit(obj, 0, out)
    out.append("\n")
    out.flush()


class _Chunks:
    """The ``out`` list of ``_emit`` that passes its text on every ``size`` characters."""

    __slots__ = ("parts", "n", "write", "size")

    def __init__(self, write: Callable[[str], None], size: int) -> None:
        self.parts: list[str] = []
        self.n, self.write, self.size = 0, write, size

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.n += len(text)
        if self.n >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.write("".join(self.parts))
            self.parts.clear()
            self.n = 0


def dumps_reference(obj: Any) -> str:
    """``dumps`` written plainly with the standard library (slow; the tests' reference)."""
    def walk(v: Any, level: int) -> str:
        pad, inner = "\n" + " " * level, "\n" + " " * (level + 1)
        if isinstance(v, dict) and v:
            items = []
            for k, x in v.items():
                if k in ROW_KEYS and isinstance(x, list) and x and all(isinstance(r, dict) for r in x):
                    body = "[" + ",".join(inner + " " + json.dumps(r, ensure_ascii=False, allow_nan=False,
                                                                   separators=(", ", ": ")) for r in x)
                    items.append(inner + json.dumps(k) + ": " + body + inner + "]")
                else:
                    items.append(inner + json.dumps(k, ensure_ascii=False) + ": " + walk(x, level + 1))
            return "{" + ",".join(items) + pad + "}"
        if isinstance(v, list) and v:
            return "[" + ",".join(inner + walk(x, level + 1) for x in v) + pad + "]"
        return json.dumps(v, ensure_ascii=False, allow_nan=False)

    return walk(clean(obj), 0) + "\n"


def _row_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):                 # a record nested in a record (TensorRecord.rank)
        return o.to_dict()
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        return o.item()                       # numpy scalars
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# the C encoder (no indentation): one row in a few microseconds
_row_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": "),
                                default=_row_default)


def _row(item: Any) -> str:
    if type(item) is TensorRow:
        item = item.record
    plain = item
    if type(item) is TensorRecord:
        d = item.__dict__                     # dataclass fields in order, unless someone added one
        plain = d if len(d) == len(_TENSOR_FIELDS) else item.to_dict()
    try:
        return "".join(_row_c(plain, 0)) if _row_c is not None else _row_encoder.encode(plain)
    except ValueError:                        # a non-finite float somewhere: written as null
        pass
    if plain is not item and type(plain) is dict:
        # usually a top-level float (the relative change of an all-zero base tensor): null those
        # and try the C encoder again (a tenth of the full clean's cost; 15% of the rows of some models)
        fixed = {k: (None if type(v) is float and not math.isfinite(v) else v) for k, v in plain.items()}
        try:
            return "".join(_row_c(fixed, 0)) if _row_c is not None else _row_encoder.encode(fixed)
        except ValueError:
            pass
    return _row_encoder.encode(clean(item.to_dict() if type(item) is TensorRecord else item))


# the C encoder itself, made once (JSONEncoder.encode builds one per call); no cycle check: rows are trees
_row_c = None
if getattr(json.encoder, "c_make_encoder", None) is not None:
    _row_c = json.encoder.c_make_encoder(None, _row_default, json.encoder.encode_basestring, None, ": ", ", ",
                                         False, False, False)


_enc_str = json.encoder.encode_basestring   # type: ignore[attr-defined]  (C, ensure_ascii=False)
_INDENTS = ["\n" + " " * i for i in range(64)]


def _emit(v: Any, level: int, out: list[str]) -> None:
    t = type(v)
    if t is str:
        out.append(_enc_str(v))
    elif v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif t is int:
        out.append(int.__repr__(v))
    elif isinstance(v, float):
        out.append(float.__repr__(v) if math.isfinite(v) else "null")
    elif isinstance(v, dict):
        if not v:
            out.append("{}")
            return
        inner = _INDENTS[level + 1] if level + 1 < len(_INDENTS) else "\n" + " " * (level + 1)
        sep = "{"
        for k, x in v.items():
            out.append(sep)
            out.append(inner)
            out.append(_enc_str(k if type(k) is str else str(k)))
            out.append(": ")
            if k in ROW_KEYS and type(x) is list and x and all(
                    type(r) is dict or type(r) is TensorRecord or type(r) is TensorRow for r in x):
                _emit_rows(x, level + 1, out)
            else:
                _emit(x, level + 1, out)
            sep = ","
        out.append(_INDENTS[level] if level < len(_INDENTS) else "\n" + " " * level)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        if not v:
            out.append("[]")
            return
        inner = _INDENTS[level + 1] if level + 1 < len(_INDENTS) else "\n" + " " * (level + 1)
        sep = "["
        for x in v:
            out.append(sep)
            out.append(inner)
            _emit(x, level + 1, out)
            sep = ","
        out.append(_INDENTS[level] if level < len(_INDENTS) else "\n" + " " * level)
        out.append("]")
    elif isinstance(v, str):
        out.append(_enc_str(v))
    elif isinstance(v, int):
        out.append(int.__repr__(v))
    else:
        c = clean(v)
        if c is v:       # not JSON: the standard library's TypeError
            json.dumps(v)
        _emit(c, level, out)


#: rows joined into one piece before it is handed on (a 100,000-row list made 300,000 appends)
_ROWS_PER_PIECE = 1024


def _emit_rows(rows: list, level: int, out: list[str]) -> None:
    inner = "\n" + " " * (level + 1)
    joiner = "," + inner
    for k in range(0, len(rows), _ROWS_PER_PIECE):
        out.append(("[" if k == 0 else ",") + inner + joiner.join(map(_row, rows[k:k + _ROWS_PER_PIECE])))
    out.append("\n" + " " * level)
    out.append("]")


#: the smallest matrix the look-alike count considers (content pairing's own threshold)
LOOKALIKE_MIN = 256


def count_lookalikes(rows) -> int:
    """Removed base matrices for which an added tuned matrix of the same or the transposed shape is
    left unpaired, from ``(status, shape)`` pairs (records or JSON rows): neither names nor content
    paired them (content pairing needs the values to correlate), so they may be the same weights
    changed beyond recognition, or replaced (an ONNX export's ``onnx::MatMul_N`` of a re-initialised
    layer). Summary flag ``unpaired_lookalikes``; the derived reason gives the count."""
    rows = [(st, tuple(sorted(sh))) for st, sh in rows
            if st in ("added", "removed") and sh is not None and len(sh) == 2 and sh[0] * sh[1] >= LOOKALIKE_MIN]
    spare: dict = {}
    for st, key in rows:
        if st == "added":
            spare[key] = spare.get(key, 0) + 1
    n = 0
    for st, key in rows:
        if st == "removed" and spare.get(key):
            spare[key] -= 1
            n += 1
    return n


def share_lower(s: dict) -> float | None:
    """The least the delta-parameter share could be when ``delta_params`` is an upper bound
    (``delta_params_lower`` set), over the same model size as ``delta_params_share``; None when exact.

    >>> share_lower({"delta_params": 300, "delta_params_share": 0.3, "delta_params_lower": 30})
    0.03
    """
    lower, delta, share = s.get("delta_params_lower"), s.get("delta_params"), s.get("delta_params_share")
    if not (isinstance(lower, int) and isinstance(delta, int) and delta and isinstance(share, float) and share):
        return None
    return lower / round(delta / share)        # delta_params_share is delta_params / the tuned model's size
