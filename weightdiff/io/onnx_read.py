"""Reader of ONNX models: the weights (initializers) of a ``.onnx`` file and its external data.

An ONNX file is a protobuf ``ModelProto``. This module walks its wire format itself (no
``onnx`` package, no copy of the file: the walk reads tags and lengths through a read-only
mapping and records where each tensor's bytes lie), so a 2 GB file costs a few thousand
small reads and no memory proportional to it, and a hostile file is refused before anything
proportional to its claims is allocated.

What becomes a tensor:

* every initializer of the main graph and of its subgraphs (``If``/``Loop`` bodies) with a
  float, integer or fp8 type; names must be unique;
* the ``value`` tensor of a ``Constant`` node with at least ``CONSTANT_MIN`` elements (an
  exporter that stores weights as constants); smaller constants are the graph's plumbing
  (shapes, axes, a scalar ``sqrt(d)``) and are counted in a note, not compared;
* integer initializers of at most ``PLUMBING_MAX`` elements that no quantized weight uses
  (shape and index constants of the graph: ``onnx::Reshape_12`` = [-1, 64]) are likewise
  counted, not compared: they are not weights, and two exports name them differently.

Where the bytes are: ``raw_data`` (the usual case) and the fixed-width typed fields
(``float_data``, ``double_data`` when packed) are read in place, like safetensors data;
the varint-coded fields (``int32_data``, which holds fp16/bf16/int8 as well, ``int64_data``,
``uint64_data``) are decoded into numpy when the file is parsed, up to ``DECODED_MAX`` bytes in all,
counted before any is decoded (exporters use them for small tensors only; values stored one field
each, unpacked, at most ``UNPACKED_MAX``; nodes at most ``MAX_NODES``); external data (``data_location = EXTERNAL``)
is read from the file its ``location`` names, which must be a plain relative path inside the
model's folder (no ``..``, no absolute path, no symlink out of the folder), with its
``offset`` and ``length`` checked against that file's size and the tensor's.

Quantized weights are dequantized by ``weightdiff.io.quant_sources``: ``AxisGrid`` for a
``DequantizeLinear`` node reading an integer (int4/uint4/int8/uint8/int16) initializer (QDQ format:
scale, zero point, ``axis`` and ``block_size`` from the node), ONNX Runtime's QOperator triples
``W_quantized`` / ``W_scale`` / ``W_zero_point`` (``quantize_dynamic``; the axis of a per-channel scale
from the node that consumes the weight) and int32 ``QGemm``/``QLinearConv`` biases; ``NBits`` for
``MatMulNBits``; ``Bnb4T`` for ``MatMulBnb4`` (NF4/FP4, transformers.js ``model_bnb4.onnx``). The logical tensor takes the float model's name (``W``), so an int8 export pairs with
the float one by name. Weights the exporter named itself (``onnx::MatMul_702``, ``val_43``) are reported
under the module of the node that reads them (``_module_names``), and parameters stored once for equal
values under each module's name. See docs/formats.md, "ONNX models".
"""

from __future__ import annotations

import ast
import math
import mmap
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from ..errors import CheckpointError, escape_name
from .files import inside, open_regular
from .safetensors_read import Header, QuantScheme, SafetensorsFile, TensorInfo, array_windows, check_range, \
    MAX_DIM, storage_of

__all__ = ["parse_onnx", "locate_onnx", "OnnxData", "OnnxModel", "ONNX_DTYPES", "CONSTANT_MIN", "PLUMBING_MAX"]

#: ONNX TensorProto.DataType -> the safetensors dtype name its values are handed out as
ONNX_DTYPES = {1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
               11: "F64", 12: "U32", 13: "U64", 16: "BF16", 17: "F8_E4M3", 18: "F8_E4M3FNUZ",
               19: "F8_E5M2", 20: "F8_E5M2FNUZ", 24: "F8_E8M0"}
#: types no reader of weights needs: strings, complex numbers, sub-byte ints and floats (refused by name)
_OTHER_TYPES = {8: "STRING", 14: "COMPLEX64", 15: "COMPLEX128", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1",
                25: "UINT2", 26: "INT2"}
#: a Constant node's tensor is a weight from this many elements on; below, the graph's plumbing
CONSTANT_MIN = 1024
#: an integer initializer no quantized weight uses, of at most this many elements, is plumbing
PLUMBING_MAX = 64
#: bytes of tensor values decoded from typed fields (varints, unpacked or split values), in all
DECODED_MAX = 64 << 20
#: graphs nested inside graphs (If/Loop/Scan bodies) at most
MAX_DEPTH = 16
#: characters of the torch exporter's graph signature and of one value's folded_from read at most
SIGNATURE_MAX = 4 << 20
#: characters of one value's folded_from read at most: it names the few values a constant was computed
#: from; a longer one is ignored (ast.literal_eval of a 4 MB list took 4 s, once per value of a hostile file)
FOLDED_FROM_MAX = 1 << 16
#: tensor values stored one field each (unpacked float_data, int32_data, ...) read at most, in all: onnx.proto
#: declares these fields packed; each costs a Python-level step to walk (20 M of them took 50 s)
UNPACKED_MAX = 1 << 20
#: nodes in all graphs at most: real exports hold tens of thousands (8 M empty ones took 2.75 GB and 70 s)
MAX_NODES = 1 << 20
_SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_INT_TYPES = {"U8", "I8", "U16", "I16", "I32", "I64", "U32", "U64", "BOOL"}
#: TensorProto's typed value fields, their names and the wire type of one unpacked value
_FIELD = {4: "float_data", 5: "int32_data", 7: "int64_data", 10: "double_data", 11: "uint64_data"}
_WIRE = {4: 5, 5: 0, 7: 0, 10: 1, 11: 0}
_U64 = (1 << 64) - 1
_CHUNK = 1 << 20                 # bytes of a packed varint field decoded at a time


class _Bad(Exception):
    """A malformed protobuf: turned into a CheckpointError naming the file (with ``hint``, else the
    one of a damaged file)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


_SPEC = "it breaks the ONNX spec, and onnx.checker refuses it too: re-export the model"


class _Unsupported(Exception):
    """A valid model holding what weightdiff does not read (a type, a sparse tensor)."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Bad("a number runs past the end of its field")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Bad("a number is longer than ten bytes")


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or start, end) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise _Bad("a field numbered 0")
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            yield num, 0, v, None
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise _Bad(f"a field of {n:,} bytes runs past the end of its message")
            yield num, 2, pos, pos + n
            pos += n
        elif wt == 1 or wt == 5:
            n = 8 if wt == 1 else 4
            if n > end - pos:
                raise _Bad("a fixed-width field runs past the end of its message")
            yield num, wt, pos, pos + n
            pos += n
        else:
            raise _Bad(f"wire type {wt} (field {num}) is not one ONNX uses")


def _text(buf, a: int, b: int) -> str:
    try:
        return bytes(buf[a:b]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("a name is not UTF-8") from None


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_varints(buf, a: int, b: int, cap: int) -> list[int]:
    out, pos = [], a
    while pos < b:
        v, pos = _varint(buf, pos, b)
        out.append(v)
        if len(out) > cap:
            raise _Bad("a tensor holds more values than its shape")
    return out


@dataclass
class _Tensor:
    """One TensorProto as found: where its values are, or the values themselves."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None = None             # where the bytes are (None: ``held``)
    start: int = 0
    end: int = 0
    held: np.ndarray | None = None       # decoded from typed fields (flat, storage dtype)
    nibbles: str | None = None           # INT4 / UINT4: two codes per byte (dtype U8, shape the bytes)
    logical: tuple[int, ...] | None = None


@dataclass(slots=True)
class _Node:
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)   # int attributes, and "value" -> _Tensor
    name: str = ""
    scopes: str = ""                            # the torch dynamo exporter's pkg.torch.onnx.name_scopes


class _Parser:
    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size = path, buf, size
        self.folder = path.parent
        self.tensors: dict[str, _Tensor] = {}
        self.nodes: list[_Node] = []
        self.decoded = 0
        self.unpacked = 0                          # values stored one field each, in all
        self.node_count = 0
        self.metadata: dict[str, str] = {}
        self.sizes: dict[Path, int] = {}
        self.signature = ""                        # the torch exporter's graph signature (main graph)
        self.folded_from: dict[str, str] = {}      # value name -> onnxscript's pkg.onnxscript.optimizer.folded_from

    # -- the model -----------------------------------------------------------------------------
    def model(self) -> None:
        graphs = 0
        for num, wt, a, b in _fields(self.buf, 0, self.size):
            if num == 7 and wt == 2:
                graphs += 1
                if graphs > 1:
                    raise _Bad("the model holds two graphs")
                self.graph(a, b, 0)
            elif num == 14 and wt == 2:            # metadata_props
                kv = self.entry(a, b)
                if kv[0]:
                    self.metadata[kv[0] if kv[0].startswith("onnx.") else f"onnx.{kv[0]}"] = kv[1]
            elif num in (2, 3) and wt == 2:        # producer_name, producer_version
                self.metadata["onnx.producer_name" if num == 2 else "onnx.producer_version"] = _text(self.buf, a, b)
            elif num == 1 and wt == 0:
                self.metadata["onnx.ir_version"] = str(a)
        if not graphs:
            raise _Bad("the model has no graph")

    def entry(self, a: int, b: int) -> tuple[str, str]:
        k = v = ""
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 1 and wt == 2:
                k = _text(self.buf, x, y)
            elif num == 2 and wt == 2:
                v = _text(self.buf, x, y)
        return k, v

    def graph(self, a: int, b: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Bad(f"graphs nested more than {MAX_DEPTH} deep")
        for num, wt, x, y in _fields(self.buf, a, b):
            if wt != 2:
                continue
            if num == 5:
                self.add(self.tensor(x, y), "initializer")
            elif num == 1:
                self.node(x, y, depth)
            elif num == 15:
                raise _Unsupported("the graph holds a sparse initializer, which weightdiff does not read")
            elif num == 13:                        # value_info: the optimizer records what it folded
                self.value_info(x, y)
            elif num == 16 and depth == 0:         # metadata_props of the main graph
                k, v = self.entry(x, y)
                if k == _SIGNATURE and len(v) <= SIGNATURE_MAX:
                    self.signature = v

    def value_info(self, a: int, b: int) -> None:
        name, frm = "", None
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 1 and wt == 2:
                name = _text(self.buf, x, y)
            elif num == 4 and wt == 2:
                k, v = self.entry(x, y)
                if k == _FOLDED_FROM and len(v) <= FOLDED_FROM_MAX:
                    frm = v
        if name and frm is not None:
            self.folded_from[name] = frm

    def add(self, t: _Tensor | None, what: str) -> None:
        if t is None:
            return
        if not t.name:
            raise _Bad(f"an {what} has no name")
        if t.name in self.tensors:
            raise _Bad(f"two tensors are named `{escape_name(t.name)}`")
        self.tensors[t.name] = t

    def node(self, a: int, b: int, depth: int) -> None:
        self.node_count += 1
        if self.node_count > MAX_NODES:
            raise _Bad(f"its graphs hold more than {MAX_NODES:,} nodes, which weightdiff does not read (exports "
                       "of real models hold tens of thousands)", "a corrupt or generated file?")
        n = _Node("", "", [], [])
        tensor_attrs: list[tuple[int, int]] = []
        for num, wt, x, y in _fields(self.buf, a, b):
            if wt != 2:
                continue
            if num == 1:
                n.inputs.append(_text(self.buf, x, y))
            elif num == 2:
                n.outputs.append(_text(self.buf, x, y))
            elif num == 4:
                n.op = _text(self.buf, x, y)
            elif num == 3:
                n.name = _text(self.buf, x, y)
            elif num == 7:
                n.domain = _text(self.buf, x, y)
            elif num == 9:                         # metadata_props
                k, v = self.entry(x, y)
                if k == "pkg.torch.onnx.name_scopes" and len(v) <= 4096:
                    n.scopes = v
            elif num == 5:
                tensor_attrs.append((x, y))
        for x, y in tensor_attrs:
            self.attribute(n, x, y, depth)
        if n.inputs or "value" in n.attrs:
            self.nodes.append(n)       # a node that reads nothing and holds no constant says nothing of a weight

    def attribute(self, n: _Node, a: int, b: int, depth: int) -> None:
        name, ival, tval, graphs = "", None, None, []
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 1 and wt == 2:
                name = _text(self.buf, x, y)
            elif num == 3 and wt == 0:
                ival = _signed(x)
            elif num == 5 and wt == 2:
                tval = (x, y)
            elif num in (6, 11) and wt == 2:       # g, graphs: subgraph bodies
                graphs.append((x, y))
        if ival is not None:
            n.attrs[name] = ival
        if tval is not None and n.op == "Constant" and name == "value":
            n.attrs["value"] = tval
        for x, y in graphs:
            self.graph(x, y, depth + 1)

    # -- one TensorProto -----------------------------------------------------------------------
    def tensor(self, a: int, b: int, named: str | None = None) -> _Tensor | None:
        buf = self.buf
        dims: list[int] = []
        dtype_code, name, raw, external, location = 0, named or "", None, {}, 0
        typed: dict[int, list] = {}
        for num, wt, x, y in _fields(buf, a, b):
            if num == 1:
                if wt == 0:
                    dims.append(_signed(x))
                elif wt == 2:
                    dims += [_signed(v) for v in _packed_varints(buf, x, y, 64)]
            elif num == 2 and wt == 0:
                dtype_code = x
            elif num == 8 and wt == 2 and named is None:
                name = _text(buf, x, y)
            elif num == 9 and wt == 2:
                raw = (x, y)
            elif num == 13 and wt == 2:
                k, v = self.entry(x, y)
                external[k] = v
            elif num == 14 and wt == 0:
                location = x
            elif num == 3:
                raise _Unsupported(f"tensor `{escape_name(name)}` is split into segments, which weightdiff does not "
                                   "read")
            elif num in (4, 5, 7, 10, 11):
                self.keep_typed(typed, num, wt, x, y, name)
        if len(dims) > 8:
            raise _Bad(f"tensor `{escape_name(name)}` has {len(dims):,} dimensions")
        if any(d < 0 for d in dims):
            raise _Bad(f"tensor `{escape_name(name)}` has shape {dims}")
        shape = tuple(dims)
        numel = math.prod(shape)
        if numel == 0 and math.prod(d for d in dims if d) > MAX_DIM:
            # an empty tensor bounds its other dimensions by no byte (as in safetensors_read): [0, 2**62, 2**62]
            # was accepted and carried into the report
            raise _Bad(f"tensor `{escape_name(name)}` has shape {dims}: an empty tensor's other dimensions multiply "
                       "to more than 2**63 - 1")
        if raw is not None and raw[1] > raw[0] and typed:    # onnx.checker refuses it too: which is the tensor?
            raise _Bad(f"tensor `{escape_name(name)}` holds values both in raw_data and in a typed field", _SPEC)
        if (location == 1 or external) and ((raw is not None and raw[1] > raw[0]) or typed):
            raise _Bad(f"tensor `{escape_name(name)}` is stored externally and also holds values in the model file",
                       _SPEC)
        if dtype_code in (21, 22):                 # UINT4 / INT4: two codes a byte, low nibble first
            t = _Tensor(name, "U8", (-(-numel // 2),), nibbles="U4" if dtype_code == 21 else "I4", logical=shape)
            want = t.shape[0]
            if location == 1 or external:
                return self.external(t, external, want)
            if raw is None and typed:              # onnx.helper.make_tensor's way: a packed byte per int32_data value
                return self.typed(t, typed, want)
            if raw is None or raw[1] - raw[0] != want:
                raise _Bad(f"tensor `{escape_name(name)}` {_OTHER_TYPES[dtype_code]} {list(shape)} needs {want:,} bytes "
                           "of raw_data")
            t.file, t.start, t.end = self.path, raw[0], raw[1]
            return t
        if dtype_code in _OTHER_TYPES:
            if dtype_code == 8:
                if (raw is not None and raw[1] > raw[0]) or location == 1 or external:
                    # onnx keeps strings in string_data only: bytes in raw_data under a STRING type are a tensor
                    # whose type was damaged (a float matrix that read as dropped, "this base with tensors removed")
                    raise _Bad(f"tensor `{escape_name(name)}` is STRING but holds raw_data or external data, where "
                               "ONNX keeps strings in string_data", _SPEC)
                return None                        # strings: vocabularies of tokenizer graphs, not weights
            raise _Unsupported(f"tensor `{escape_name(name)}` is {_OTHER_TYPES[dtype_code]}, which weightdiff does "
                               "not read")
        if dtype_code not in ONNX_DTYPES:
            raise _Bad(f"tensor `{escape_name(name)}` has unknown data type {dtype_code}")
        dtype = ONNX_DTYPES[dtype_code]
        item = storage_of(dtype).itemsize
        want = numel * item
        t = _Tensor(name, dtype, shape)
        if location == 1 or external:
            return self.external(t, external, want)
        if raw is not None:
            if raw[1] - raw[0] != want:
                raise _Bad(f"tensor `{escape_name(name)}` {dtype} {list(shape)} needs {want:,} bytes, its raw_data "
                           f"holds {raw[1] - raw[0]:,}")
            t.file, t.start, t.end = self.path, raw[0], raw[1]
            return t
        return self.typed(t, typed, numel)

    def keep_typed(self, typed: dict[int, list], num: int, wt: int, x: int, y: int, name: str) -> None:
        """Keep one typed value field (``float_data``, ``int32_data``, ...) of a tensor in ``typed``: a packed
        field as its span (2, x, y); values stored one field each (onnx.proto declares these fields packed,
        but a reader must take both) appended to one compact run (0: an ``array`` of varints, 5 / 1: the
        fixed-width bytes), so a value costs at most 8 bytes and no Python object (a tuple per value took
        36 times the file in memory), and at most ``UNPACKED_MAX`` of them in the file are read."""
        want = _WIRE.get(num)
        if wt != 2 and wt != want:
            raise _Bad(f"tensor `{escape_name(name)}` stores a {_FIELD[num]} value with wire type {wt}, not {want}")
        segs = typed.setdefault(num, [])
        if wt == 2:
            segs.append((2, x, y))
            return
        self.unpacked += 1
        if self.unpacked > UNPACKED_MAX:
            raise _Bad(f"more than {UNPACKED_MAX:,} tensor values stored one field each (unpacked "
                       f"{_FIELD[num]}; onnx.proto declares these fields packed)",
                       "re-export the model: exporters store weights in raw_data")
        if not segs or segs[-1][0] != wt:
            segs.append((wt, array("Q") if wt == 0 else bytearray()))
        if wt == 0:
            segs[-1][1].append(x & _U64)
        else:
            segs[-1][1].extend(self.buf[x:y])

    def typed(self, t: _Tensor, typed: dict[int, list], numel: int) -> _Tensor:
        """A tensor in the typed fields: a fixed-width packed one in place, the others decoded into numpy
        (varints vectorised, chunk by chunk), counted against ``DECODED_MAX`` before any is decoded."""
        fixed = {"F32": 4, "F64": 10}.get(t.dtype)
        if fixed is not None and len(typed.get(fixed, [])) == 1 and typed[fixed][0][0] == 2 and len(typed) == 1:
            _, x, y = typed[fixed][0]
            if y - x != numel * storage_of(t.dtype).itemsize:
                raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} {list(t.shape)} holds {y - x:,} bytes of values, "
                           f"not {numel * storage_of(t.dtype).itemsize:,}")
            t.file, t.start, t.end = self.path, x, y
            return t
        # the field each type is stored in (onnx.proto: TensorProto's comments)
        where = {"F32": 4, "F64": 10, "I64": 7, "U32": 11, "U64": 11}.get(t.dtype, 5)
        if any(k != where for k in typed):
            raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} keeps values in a field of another type")
        segs = typed.get(where, [])
        if where in (4, 10):
            size, code = (4, "<f4") if where == 4 else (8, "<f8")
            if any(seg[0] == 2 and (seg[2] - seg[1]) % size for seg in segs):
                raise _Bad(f"tensor `{escape_name(t.name)}` has a torn value field")
            count = sum((seg[2] - seg[1]) // size if seg[0] == 2 else len(seg[1]) // size for seg in segs)
        else:
            count = sum(self.varints_in(seg[1], seg[2]) if seg[0] == 2 else len(seg[1]) for seg in segs)
        if count > numel:
            raise _Bad(f"tensor `{escape_name(t.name)}` holds more values than its shape {list(t.shape)}")
        if count != numel:
            raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} {list(t.shape)} holds {count:,} values, "
                       f"not {numel:,}")
        dt = storage_of(t.dtype)
        self.decoded += numel * dt.itemsize
        if self.decoded > DECODED_MAX:
            raise _Bad(f"more than {DECODED_MAX >> 20} MB of tensor values in typed fields (float_data, int32_data, "
                       "...), which weightdiff decodes in memory", "re-export the model: exporters store weights in "
                                                                   "raw_data")
        parts = []                          # each piece converted as it is decoded: no uint64 copy of it all
        for seg in segs:
            if where in (4, 10):
                raw = bytes(self.buf[seg[1]:seg[2]]) if seg[0] == 2 else bytes(seg[1])
                parts.append(np.frombuffer(raw, code).astype(dt))
            elif seg[0] == 2:
                parts += [self.stored_as(t, v, dt) for v in self.decode_varints(seg[1], seg[2])]
            else:
                parts.append(self.stored_as(t, np.frombuffer(seg[1], np.uint64), dt))
        arr = np.concatenate(parts) if parts else np.zeros(0, dt)
        arr.flags.writeable = False
        t.held = arr
        return t

    @staticmethod
    def stored_as(t: _Tensor, values: np.ndarray, dt: np.dtype) -> np.ndarray:
        """Varint ``values`` (uint64) of tensor ``t`` in its storage dtype ``dt``; _Bad for one out of its range."""
        if t.dtype in ("F16", "BF16") or t.dtype.startswith("F8_"):
            return (values & np.uint64((1 << (8 * dt.itemsize)) - 1)).astype(
                np.uint16 if dt.itemsize == 2 else np.uint8).view(dt)
        if t.dtype in ("I64", "I32", "I16", "I8"):
            arr = values.view(np.int64)            # two's complement: a negative int32 is sign-extended to 64 bits
            info = np.iinfo(dt)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} holds a value out of its type's range")
            return arr.astype(dt)
        top = 1 if dt.kind == "b" else np.iinfo(dt).max          # BOOL: 0 or 1 (np.iinfo refuses bool)
        if t.dtype != "U64" and values.size and int(values.max()) > top:
            raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} holds a value out of its type's range")
        return values.astype(dt)

    def varints_in(self, a: int, b: int) -> int:
        """How many varints the packed field buf[a:b] holds (its bytes below 0x80 end one each), counted chunk
        by chunk; _Bad when its last one runs past the field's end."""
        count = 0
        for x in range(a, b, _CHUNK):
            count += int(np.count_nonzero(np.frombuffer(bytes(self.buf[x:min(x + _CHUNK, b)]), np.uint8) < 0x80))
        if b > a and self.buf[b - 1] >= 0x80:
            raise _Bad("a number runs past the end of its field")
        return count

    def decode_varints(self, a: int, b: int):
        """The varints of packed field buf[a:b] as uint64 (the low 64 bits, as protobuf keeps), decoded in
        numpy chunk by chunk (each chunk cut after a varint's last byte) and yielded a chunk at a time: no
        Python object per value."""
        x = a
        while x < b:
            raw = np.frombuffer(bytes(self.buf[x:min(x + _CHUNK, b)]), np.uint8)
            ends = np.flatnonzero(raw < 0x80)
            if not ends.size:
                raise _Bad("a number is longer than ten bytes" if raw.size >= 10 else
                           "a number runs past the end of its field")
            raw = raw[:int(ends[-1]) + 1]
            starts = np.concatenate(([0], ends[:-1] + 1))
            lengths = ends - starts + 1
            if int(lengths.max()) > 10:
                raise _Bad("a number is longer than ten bytes")
            at = np.arange(raw.size) - np.repeat(starts, lengths)
            parts = (raw & 0x7F).astype(np.uint64) << (7 * at).astype(np.uint64)
            yield np.add.reduceat(parts, starts)           # disjoint bits: the sum is the OR
            x += raw.size

    def external(self, t: _Tensor, ext: dict[str, str], want: int) -> _Tensor:
        loc = ext.get("location", "")
        pure = PurePosixPath(loc)
        if not loc or pure.is_absolute() or ".." in pure.parts or "\\" in loc or "\0" in loc or loc.startswith("~") \
                or ":" in loc:
            raise CheckpointError(self.path, f"tensor `{escape_name(t.name)}` keeps its data in "
                                             f"`{escape_name(loc)}`, outside the model's folder" if loc else
                                  f"tensor `{escape_name(t.name)}` is stored externally but names no file",
                                  "external data must be a plain relative path beside the .onnx file")
        file = inside(self.folder / loc, self.folder, "copy the data file into the model's folder")
        try:
            itself = os.path.samefile(file, self.path)
        except OSError:
            itself = False                         # (a missing file is refused below, by name)
        if itself:
            # the model's own protobuf bytes read as weights: "DERIVED ... changed far more than a fine-tune"
            raise _Bad(f"tensor `{escape_name(t.name)}` keeps its external data in the model file itself "
                       f"(`{escape_name(loc)}`)", "external data lives in a file beside the .onnx: re-export the model")
        # ONNX Runtime reads these with strtoll-like parsing of ASCII digits: Python's int() would take
        # "0_0", " 0", "-8" or other scripts' digits, which name no byte of the file
        raw_off, raw_len = ext.get("offset", "0") or "0", ext.get("length")
        for key, raw in (("offset", raw_off), ("length", raw_len)):
            # at most 19 digits: an int64 byte position (and int() refuses more than 4,300 digits: exit 1)
            if raw not in (None, "") and not (isinstance(raw, str) and raw.isascii() and raw.isdigit()
                                              and len(raw.lstrip("0")) <= 19):
                raise _Bad(f"tensor `{escape_name(t.name)}` has an external {key} "
                           f"`{escape_name(str(raw))[:40]}` that is not a byte position (a whole number of at most "
                           f"19 digits)")
        offset = int(raw_off)
        length = int(raw_len) if raw_len not in (None, "") else want
        if length != want:
            raise _Bad(f"tensor `{escape_name(t.name)}` {t.dtype} {list(t.shape)} needs {want:,} bytes, its external "
                       f"data holds {length:,} at offset {offset:,}")
        size = self.sizes.get(file)
        if size is None:
            fd, st = open_regular(file)
            os.close(fd)
            size = self.sizes[file] = st.st_size
        if offset + length > size:
            raise CheckpointError(file, f"holds {size:,} bytes, but tensor `{escape_name(t.name)}` needs bytes "
                                        f"{offset:,}-{offset + length:,} (truncated download?)")
        t.file, t.start, t.end = file, offset, offset + length
        return t


@dataclass
class OnnxModel:
    """What ``parse_onnx`` found: tensors by name (graph order), nodes, metadata, the files read."""

    path: Path
    tensors: dict[str, _Tensor]
    nodes: list[_Node]
    metadata: dict[str, str]
    files: list[Path]
    constants: dict[str, _Tensor]
    sizes: dict[Path, int]               # each file's size when it was parsed (the checks were made against it)
    signature: str = ""                  # the torch dynamo exporter's graph signature ("" when none)
    folded_from: dict[str, str] = field(default_factory=dict)   # value -> onnxscript's folded_from list (text)


def parse_onnx(path: Path) -> OnnxModel:
    """Parse the ONNX model at ``path`` (its tensors' locations; no tensor data read)."""
    fd, st = open_regular(path)
    try:
        if st.st_size == 0:
            raise CheckpointError(path, "is empty (0 bytes)")
        try:
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, f"cannot be mapped: {exc}") from None
    finally:
        os.close(fd)
    try:
        p = _Parser(path, mm, st.st_size)
        try:
            p.model()
            constants = {}
            for n in p.nodes:
                tv = n.attrs.pop("value", None)
                if tv is not None and n.outputs:
                    t = p.tensor(*tv, named=n.outputs[0])
                    if t is not None:
                        constants[t.name] = t
        except _Bad as exc:
            raise CheckpointError(path, f"is not a readable ONNX model: {exc}",
                                  exc.hint or "a truncated download or another kind of file?") from None
        except _Unsupported as exc:
            raise CheckpointError(path, str(exc), "compare the float model it was made from") from None
        except RecursionError:
            raise CheckpointError(path, "is not a readable ONNX model: nested too deeply") from None
    finally:
        mm.close()
    files = [path] + [f for f in dict.fromkeys(t.file for t in p.tensors.values()) if f is not None and f != path]
    for t in constants.values():
        if t.file is not None and t.file not in files:
            files.append(t.file)
    p.sizes[path] = st.st_size
    return OnnxModel(path, p.tensors, p.nodes, p.metadata, files, constants, p.sizes, p.signature, p.folded_from)


class OnnxData(SafetensorsFile):
    """One file of an ONNX checkpoint (the model or an external data file), read through the
    header ``parse_onnx`` made for it: the same verbs as ``SafetensorsFile``; values that
    were decoded from varint fields are served from memory."""

    def __init__(self, path: str | os.PathLike, use_mmap: bool = True, known: Header | None = None):
        self.use_mmap = use_mmap
        self._open(path)
        if known is None or known.size != self.size:
            self.close()
            raise CheckpointError(path, "file changed since the checkpoint was located (rerun)")
        self.tensors, self.metadata = known, known.metadata
        self.held: dict[str, np.ndarray] = getattr(known, "held", {})

    def windows(self, name, max_elements=None, start=0, stop=None):
        h = self.held.get(name)
        if h is None:
            return super().windows(name, max_elements, start, stop)
        start, stop, step = check_range(self._info(name), max_elements, start, stop, h.itemsize)
        return array_windows(h, start, stop, step)

    def read(self, name):
        h = self.held.get(name)
        return super().read(name) if h is None else h.copy().reshape(self._info(name).shape)

    def read_rows(self, name, rows):
        h = self.held.get(name)
        if h is None:
            return super().read_rows(name, rows)
        info = self._info(name)
        if not info.shape:
            raise ValueError(f"read_rows needs a >=1-D tensor; `{escape_name(name)}` is 0-d")
        return h.reshape(info.shape)[np.asarray(rows, dtype=np.int64)].copy()


def headers_of(model: OnnxModel, infos: dict[str, TensorInfo], held: dict[str, np.ndarray]
               ) -> dict[Path, Header]:
    """One ``Header`` per file: the tensors whose bytes it holds (the model file also the held values)."""
    out: dict[Path, Header] = {}
    for f in model.files:
        h = Header()
        h.size, h.metadata = model.sizes[f], {}
        h.held = {}
        out[f] = h
    for name, info in infos.items():
        out[info.path][name] = info
        if name in held:
            out[info.path].held[name] = held[name]
    return out


#: quantization operators, and the input positions that hold scales and zero points (of activations
#: as well as weights): such an initializer is a quantization parameter, not a weight
_QPARAMS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
            "QLinearConv": (1, 2, 4, 5, 6, 7), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
            "QGemm": (1, 2, 4, 5, 7, 8), "DynamicQuantizeMatMul": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5),
            "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7), "QAttention": (3, 4, 6, 7),
            "QLinearSigmoid": (1, 2, 3, 4), "QLinearLeakyRelu": (1, 2, 3, 4), "QLinearAveragePool": (1, 2, 3, 4),
            "QLinearGlobalAveragePool": (1, 2, 3, 4), "QLinearConcat": (), "QLinearSoftmax": (1, 2, 3, 4),
            "QLinearWhere": (), "QEmbedLayerNormalization": (), "MatMulNBits": (2, 3, 4), "MatMulBnb4": (2,)}


#: names exporters give the values they create (not a module's parameter): legacy ``onnx::Op_N``, dynamo
#: ``val_N``, node outputs ``/path/Constant_output_0``
_GENERATED = re.compile(r"^(?:onnx::|val_\d|_val_\d|/|const_|Constant_)")


#: operators that read a weight, and the input it is at
_WEIGHT_USE = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "MatMulInteger": 1, "MatMulNBits": 1,
               "MatMulBnb4": 1,
               "QGemm": 3, "QLinearMatMul": 3, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
               "ConvInteger": 1, "QLinearConv": 3, "Gather": 0, "Transpose": 0, "GatherBlockQuantized": 0}
#: the operators among them that read an integer weight (whose scale must be stored beside it)
_INT_WEIGHT = {op: i for op, i in {**_WEIGHT_USE, "QAttention": 1}.items()
               if op in ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                         "ConvInteger", "QLinearConv", "QGemm", "QAttention")}
_MODULE_PATH = re.compile(r"[A-Za-z_][\w]*(?:\.[\w]+)*")
_PARAM_NAME = re.compile(r"[A-Za-z_][\w]*(?:\.[\w]+)*\.(?:weight|bias)")


def _scope(n: _Node) -> str | None:
    """The module a node belongs to: the last module path of the torch dynamo exporter's name_scopes
    (``[..., 'm.model.layers.0.self_attn.q_proj', 'linear']``), or the legacy exporter's node name
    (``/m/model/layers.0/self_attn/q_proj/MatMul``) without its last part."""
    path = None
    if n.scopes:
        try:
            lst = ast.literal_eval(n.scopes)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            lst = None
        if isinstance(lst, list) and len(lst) >= 2 and all(isinstance(x, str) for x in lst):
            path = lst[-2]
    elif n.name.startswith("/"):
        path = ".".join(p for p in n.name.split("/")[1:-1] if p)
    return path if path and _MODULE_PATH.fullmatch(path) else None


def _module_names(nodes: list[_Node], tensors: dict[str, TensorInfo], sources: dict,
                  copies: dict[str, str] | None = None
                  ) -> tuple[dict[str, TensorInfo], dict[str, str], list[tuple[str, str]], list[str]]:
    """Names for the weights an exporter named itself (``onnx::MatMul_702``, ``val_43``): the module of
    the one node that reads each (``m.model.layers.0.self_attn.q_proj.weight``), so two exports pair by
    name, blocks are known and a fine-tune of layer 0 is not reported as the head's. A weight read by
    nodes of several modules, or whose module name is taken, keeps its name, except when the name is taken by
    the parameter it was folded from (``copies``, onnxscript's ``folded_from``) and that parameter's own readers
    are of one other module: a tied head stored as it is for the embedding's Gather and transposed for the
    head's MatMul (``m.lm_head.weight`` and ``val_245``) is the head's weight, and the parameter is the
    embedding's (``m.transformer.wte.weight``). And the parameters an
    exporter stored once for equal values (the legacy exporter keeps ``Identity(kept) -> dropped``).
    -> (tensors, reported name -> stored name, [(old, new)], [alias])."""
    readers: dict[str, list[tuple[_Node, int]]] = {}
    for n in nodes:
        for i, x in enumerate(n.inputs):
            readers.setdefault(x, []).append((n, i))
    dq = {n.inputs[0]: n.outputs[0] for n in nodes if n.op == "DequantizeLinear" and n.inputs and n.outputs}
    rename: dict[str, str] = {}
    moved: dict[str, str] = {}                 # a parameter whose name its transposed copy takes -> its reader's
    taken = set(tensors)
    for name, info in tensors.items():
        if len(info.shape) < 2 or not _GENERATED.match(name):
            continue
        src = sources.get(name)
        held = getattr(src, "codes", None) or getattr(src, "b", None) if src is not None else None
        key = held.name if held is not None else name
        if key in dq:
            key = dq[key]
        scopes = {_scope(n) for n, i in readers.get(key, []) if _WEIGHT_USE.get(n.op) == i}
        if len(scopes) == 1 and None not in scopes:
            new = scopes.pop() + ".weight"
            if new not in taken:
                rename[name] = new
                taken.add(new)
            elif (copies or {}).get(name) == new and new in tensors and new not in sources and new not in moved:
                own = {_scope(n) for n, _ in readers.get(new, [])}
                if len(own) == 1 and None not in own and own != {new.rsplit(".", 1)[0]} \
                        and (other := own.pop() + "." + new.rsplit(".", 1)[1]) not in taken:
                    rename[name], moved[new] = new, other
                    taken.add(other)
    out: dict[str, TensorInfo] = {}
    file_names: dict[str, str] = {}
    for name, info in tensors.items():
        new = rename.get(name, moved.get(name, name))
        out[new] = info
        if name in sources:
            src = sources.pop(name)
            src.name = new
            sources[new] = src
        elif new != name:
            file_names[new] = name
    aliased = []
    for name in list(out):                     # one initializer read by nodes of several modules
        if name in sources or not _PARAM_NAME.fullmatch(name):
            continue
        own, leaf = name.rsplit(".", 1)
        stored_name = file_names.get(name, name)
        for n, _ in readers.get(stored_name, []):
            # dynamo's name scopes; or the legacy exporter's node names, where ONNX Runtime's graph optimizer
            # (optimized_model_filepath) stored bitwise-equal initializers once and dropped the exporter's
            # Identity aliases: five RMSNorm gains at 1.0 read by one initializer, four of them "removed"
            scope = _scope(n) if n.scopes or n.name.startswith("/") else None
            if scope is None or scope == own or own.startswith(scope + ".") or scope.startswith(own + "."):
                continue            # its own module, or a parent or child of it reading it
            alias = f"{scope}.{leaf}"
            if alias not in out:
                out[alias] = out[name]
                file_names[alias] = stored_name
                aliased.append(alias)
    for n in nodes:
        if n.op != "Identity" or len(n.inputs) != 1 or len(n.outputs) != 1:
            continue
        x, y = n.inputs[0], n.outputs[0]
        x = rename.get(x, x)
        if x in out and x not in sources and y not in out and _PARAM_NAME.fullmatch(y) and not _GENERATED.match(y):
            out[y] = out[x]
            file_names[y] = file_names.get(x, x)
            aliased.append(y)
    return out, file_names, list(rename.items()), aliased


#: one input of the torch exporter's graph signature: ``p_m_fc_weight: PARAMETER target='m.fc.weight'``
_SIGNATURE_LINE = re.compile(r"^[ \t\r\f\v]*[^\s:]+: ([A-Z_]+) target='([^'\n]*)'", re.M)


def _signature(text: str) -> tuple[set[str], set[str]] | None:
    """(parameters, other inputs: buffers, lifted constants) the torch dynamo exporter's graph signature
    names, or None without one (another exporter, the legacy one, metadata stripped)."""
    if not text:
        return None
    params: set[str] = set()
    others: set[str] = set()
    for m in _SIGNATURE_LINE.finditer(text):
        (params if m.group(1) == "PARAMETER" else others).add(m.group(2))
    return (params, others) if params or others else None


def _sources_of(text: str | None) -> list[str] | None:
    """onnxscript's ``folded_from`` (the values a folded constant was computed from), or None."""
    if text is None:
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _folded_constants(model: OnnxModel, tensors: dict[str, TensorInfo], sources: dict,
                      uses: dict[str, list[tuple[_Node, int]]]) -> tuple[dict[str, TensorInfo], list[dict]]:
    """The values an exporter computed and stored as initializers, set apart from the weights: what a
    fixed input shape makes constant (causal masks, rotary cos/sin tables, position embeddings gathered
    with constant position ids), which torch's dynamo exporter folds (``optimize=True``, the default) under
    the name of the value (``val_83``, ``embedding_2``, ``unsqueeze_14``). A tensor is one when

    * its name is the exporter's: with the dynamo exporter's graph signature, any name that is not an
      input it lists (a parameter, buffer or lifted constant, by their module paths); without one
      (the legacy exporter, other tools), a generated name (``onnx::Mul_7``, ``val_3``, ``/m/Constant_output_0``)
      of at least two dimensions (a norm scale or bias is one-dimensional), and
    * nodes read it, and none as a weight: not at the weight input of a MatMul, Gemm, Conv or Gather
      (``_WEIGHT_USE``), where an exporter puts a parameter it transposed (``val_37``, ``onnx::MatMul_12``:
      weights, renamed by ``_module_names``);
    * and it is not a quantized weight.

    The parameters each was computed from (onnxscript's ``folded_from`` among the signature's
    parameters; None when the file does not say) go with it, so pairing can tell a base parameter folded
    away (BERT's ``position_embeddings.weight``, held as its first rows) from one removed.
    -> (the tensors left, [{name, shape, dtype, params}])."""
    sig = _signature(model.signature)
    params, others = sig if sig is not None else (set(), set())
    kept: dict[str, TensorInfo] = {}
    folded: list[dict] = []
    for name, info in tensors.items():
        read = uses.get(name, ())
        if name in sources or not read or any(_WEIGHT_USE.get(op.op) == i for op, i in read):
            kept[name] = info
            continue
        made = name not in params and name not in others if sig is not None else \
            _GENERATED.match(name) is not None and len(info.shape) >= 2
        if not made:
            kept[name] = info
            continue
        frm = _sources_of(model.folded_from.get(name)) if sig is not None else None
        folded.append({"name": name, "shape": [int(d) for d in info.shape], "dtype": info.dtype,
                       "params": None if frm is None else sorted(x for x in set(frm) if x in params)})
    return kept, folded


def _layouts(tensors: dict[str, TensorInfo], file_names: dict[str, str], sources: dict,
             uses: dict[str, list[tuple[_Node, int]]]) -> dict[str, str]:
    """The layout the graph fixes for each 2-D float weight, by reported name: the B input of ``MatMul``
    (and of ``Gemm`` or ``FusedMatMul`` without ``transB``) is ``[in, out]``, "in_out"; ``Gemm`` or
    ``FusedMatMul`` with ``transB=1`` reads B as ``[out, in]``, "out_in". A square matrix's shape cannot
    show which, and torch's ``nn.Linear`` stores ``[out, in]`` while the legacy exporter writes its weight
    for MatMul, so pairing needs this to compare a square matrix the right way round (``align.orient_squares``).
    A weight some other operator also reads (Gather, Transpose, as MatMul's A), or read both ways, has none.
    Quantized weights are left out: their sources carry their own orientation."""
    out: dict[str, str] = {}
    for name, info in tensors.items():
        if len(info.shape) != 2 or name in sources:
            continue
        seen = set()
        for n, i in uses.get(file_names.get(name, name), []):
            if n.op == "MatMul" and i == 1 and n.domain in ("", "ai.onnx"):
                seen.add("in_out")
            elif n.op in ("Gemm", "FusedMatMul") and i == 1:
                seen.add("out_in" if n.attrs.get("transB") else "in_out")
            else:
                seen.add(None)
        if len(seen) == 1 and None not in seen:
            out[name] = seen.pop()
    return out


def _folded_note(file: Path, folded: list[dict]) -> str:
    n = len(folded)
    values = sum(math.prod(f["shape"]) for f in folded)
    first = folded[0]
    held = [(p, f["name"]) for f in folded for p in (f["params"] or ())]
    unknown = sum(1 for f in folded if f["params"] is None)
    text = (f"{escape_name(str(file))}: {n} value{'s' if n != 1 else ''} the exporter computed for a fixed input "
            f"shape and stored as {'initializers' if n != 1 else 'an initializer'} (`{escape_name(first['name'])}` "
            f"{first['shape']}; {values:,} values in all: masks, rotary tables, position rows) "
            f"{'are not weights and are' if n != 1 else 'is not a weight and is'} not compared")
    if held:
        text += (f"; computed from {len(held)} parameter{'s' if len(held) != 1 else ''} of the model, which "
                 f"{'are' if len(held) != 1 else 'is'} not in the file as such (`{escape_name(held[0][0])}` "
                 f"in `{escape_name(held[0][1])}`)")
    elif unknown:
        text += f"; the file does not say what {'they were' if unknown != 1 else 'it was'} computed from"
    return text


#: the output of a Constant node, made an initializer (ONNX Runtime's quantizer does so)
_CONSTANT_OUTPUT = re.compile(r"(?:^|/)Constant(?:_\d+)?_output_\d+$")


def _plumbing(name: str, numel: int, integer: bool, constant: bool) -> bool:
    """A value of the graph, not a weight: a small integer (shapes, axes, indices), a Constant node's small
    value (also when the quantizer made it an initializer), a scalar under a made-up name (sqrt(d), eps)."""
    if integer and numel <= PLUMBING_MAX:
        return True
    if (constant or _CONSTANT_OUTPUT.search(name)) and numel < CONSTANT_MIN:
        return True
    return numel <= 1 and _GENERATED.match(name) is not None


_INT_NAMES = {"U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "I32": "int32", "U4": "uint4", "I4": "int4"}


def _is_int(dtype: str) -> bool:
    return dtype in ("U8", "I8", "U16", "I16", "I32")


def _axis_for(op: _Node, shape: tuple[int, ...]) -> int | None:
    """The axis a per-channel weight scale spans for the operator that consumes the weight."""
    if op.op in ("ConvInteger", "QLinearConv"):
        return 0
    if op.op == "QGemm":
        return 0 if op.attrs.get("transB", 0) else len(shape) - 1
    if op.op in _INT_WEIGHT:
        return len(shape) - 1              # MatMul: B is [K, N], one scale per output column
    return None


def locate_onnx(file: Path, shown: object, root: Path):
    """The Checkpoint of one ONNX model (``format`` "onnx")."""
    from ..kernels import quant as K
    from .located import Checkpoint
    from .quant_sources import AxisGrid, Bnb4T, NBits

    model = parse_onnx(file)
    found = dict(model.tensors)
    for name, t in model.constants.items():
        if name in found:
            raise CheckpointError(file, f"a Constant node's output `{escape_name(name)}` is also an initializer")
        found[name] = t
    stored: dict[str, TensorInfo] = {}
    held: dict[str, np.ndarray] = {}
    nibbles = {name: (t.nibbles, t.logical) for name, t in found.items() if t.nibbles}
    for name, t in found.items():
        if t.held is not None:
            held[name] = t.held
            stored[name] = TensorInfo(name, t.dtype, t.shape, file, 0, t.held.nbytes)
        else:
            stored[name] = TensorInfo(name, t.dtype, t.shape, t.file, t.start, t.end)
    uses: dict[str, list[tuple[_Node, int]]] = {}
    for n in model.nodes:
        for i, x in enumerate(n.inputs):
            if x in stored:
                uses.setdefault(x, []).append((n, i))
    sources: dict = {}
    owned: dict[str, str] = {}               # stored name -> the logical tensor it is part of

    def kind_shape(t: TensorInfo) -> tuple[str, tuple[int, ...]]:
        """A stored tensor's type and shape as the model declares them (INT4 and UINT4 are held as bytes)."""
        return nibbles[t.name] if t.name in nibbles else (t.dtype, tuple(t.shape))

    def source(codes: str, scale: str, zero: str | None, axis: int | None, block: int, how: str,
               scale2: str | None = None) -> None:
        c, s = stored[codes], stored[scale]
        z = stored.get(zero) if zero else None
        ctype, cshape = kind_shape(c)
        if s.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(c.path, f"`{escape_name(codes)}`: its scale `{escape_name(scale)}` is {s.dtype}, "
                                          "not a float")
        if z is not None:
            ztype, zshape = kind_shape(z)
            if ztype != ctype or (zshape != tuple(s.shape) and not math.prod(zshape) == s.numel == 1):
                raise CheckpointError(c.path, f"`{escape_name(codes)}` {ctype}: its zero point `{escape_name(zero)}` "
                                              f"is {ztype} {list(zshape)}, expected {ctype} shaped as its scale "
                                              f"{list(s.shape)}")
        if math.prod(s.shape) == 1 and not block:
            axis, group, what = None, "tensor", "per-tensor"
        else:
            nd = len(cshape)
            if axis is None or not -nd <= axis < nd:
                raise CheckpointError(c.path, f"`{escape_name(codes)}` {list(cshape)}: the axis of its scale "
                                              f"`{escape_name(scale)}` {list(s.shape)} is unknown or out of range")
            axis %= nd
            if block:
                want = tuple(-(-d // block) if k == axis else d for k, d in enumerate(cshape))
                group, what = str(block), f"block {block} along axis {axis}"
            else:
                want = (cshape[axis],)
                group, what = "channel", f"per-channel (axis {axis})"
            if tuple(s.shape) != want:
                raise CheckpointError(c.path, f"`{escape_name(codes)}` {list(cshape)}: its scale "
                                              f"`{escape_name(scale)}` {list(s.shape)} fits no {what} layout "
                                              f"(expected {list(want)})")
        s2 = stored[scale2] if scale2 else None
        if s2 is not None and (s2.dtype not in ("F32", "F16", "BF16") or math.prod(s2.shape) != 1):
            raise CheckpointError(c.path, f"`{escape_name(codes)}`: the input scale `{escape_name(scale2)}` of its "
                                          f"bias is {s2.dtype} {list(s2.shape)}, not one float")
        logical = codes[:-len("_quantized")] if codes.endswith("_quantized") else codes
        shape, transposed = cshape, False
        if logical.endswith("_Transposed") and len(shape) == 2 and logical[:-len("_Transposed")] not in stored:
            logical, shape, transposed = logical[:-len("_Transposed")], shape[::-1], True
        if logical in sources or (logical != codes and logical in stored):
            raise CheckpointError(c.path, f"tensor `{escape_name(logical)}` is stored both plain and quantized")
        bits = 4 if ctype in ("U4", "I4") else 8 * storage_of(c.dtype).itemsize
        label = f"{_INT_NAMES[ctype]}" \
                f"{' with zero points' if z is not None else ''}, {what} ({how})"
        parts = [c, s] + ([z] if z is not None else [])
        scheme = QuantScheme("onnx", label, bits, group, False, tuple(p.name for p in parts),
                             sum(p.nbytes for p in parts))
        sources[logical] = AxisGrid(logical, shape, scheme, c.path, c, s, z, axis, block, s2, transposed,
                                    nibbles=ctype if ctype in ("U4", "I4") else None, stored_shape=cshape)
        owned.update({p.name: logical for p in parts})

    def weight_node(n: _Node, what: str) -> tuple[TensorInfo, TensorInfo, Callable[[str], CheckpointError]]:
        """A com.microsoft weight node's stored codes (input 1) and ``what`` (input 2: scales, absmax),
        and the one-line refusal naming its weight."""
        def refuse(problem: str) -> CheckpointError:
            return CheckpointError(file, f"{n.op} weight `{escape_name(n.inputs[1] if len(n.inputs) > 1 else '?')}` "
                                         f"{problem}", "compare the float model it was quantized from")
        if len(n.inputs) < 3 or n.inputs[1] not in stored or n.inputs[2] not in stored:
            raise refuse(f"or its {what} is not stored in the model, so its values cannot be known")
        return stored[n.inputs[1]], stored[n.inputs[2]], refuse

    def nbits(n: _Node) -> None:
        b, sc, refuse = weight_node(n, "scales tensor")
        zp = stored.get(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else None
        if len(n.inputs) > 3 and n.inputs[3] and zp is None:
            raise refuse(f"has a zero point `{escape_name(n.inputs[3])}` that is not stored")
        if len(n.inputs) > 4 and n.inputs[4]:
            raise refuse("has a g_idx (an activation order), which weightdiff does not read")
        k, nn, bits, bs = (n.attrs.get(a) for a in ("K", "N", "bits", "block_size"))
        bits = 4 if bits is None else bits
        if bits not in (2, 4, 8) or not isinstance(k, int) or not isinstance(nn, int) or k < 1 or nn < 1 \
                or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise refuse(f"has bits={bits}, K={k}, N={nn}, block_size={bs}: weightdiff reads 2, 4 and 8 bits "
                         "with a power-of-two block of at least 16")
        kb = -(-k // bs)
        if b.dtype != "U8" or tuple(b.shape) != (nn, kb, bs * bits // 8):
            raise refuse(f"is {b.dtype} {list(b.shape)}, expected U8 {[nn, kb, bs * bits // 8]} for K={k}, N={nn}, "
                         f"{bits} bits, block {bs}")
        if sc.dtype not in ("F32", "F16", "BF16") or sc.numel != nn * kb:
            raise refuse(f"has scales {sc.dtype} {list(sc.shape)}, expected {nn * kb} floats")
        if zp is not None and (zp.dtype != "U8" or zp.numel != nn * -(-kb * bits // 8)):
            what = "float zero points (HQQ), which weightdiff does not read" if zp.dtype == sc.dtype else \
                f"zero points {zp.dtype} {list(zp.shape)}, expected {nn * -(-kb * bits // 8)} packed bytes"
            raise refuse(f"has {what}")
        logical = b.name[:-len(f"_Q{bits}")] if b.name.endswith(f"_Q{bits}") else b.name
        if logical in sources or (logical != b.name and logical in stored):
            raise CheckpointError(b.path, f"tensor `{escape_name(logical)}` is stored both plain and quantized")
        parts = [b, sc] + ([zp] if zp is not None else [])
        scheme = QuantScheme("onnx", f"int{bits}{' with zero points' if zp is not None else ''}, block {bs} "
                             "(MatMulNBits)", bits, str(bs), False, tuple(p.name for p in parts),
                             sum(p.nbytes for p in parts))
        sources[logical] = NBits(logical, (k, nn), scheme, b.path, b, sc, zp, bits, bs)
        owned.update({p.name: logical for p in parts})

    def bnb4(n: _Node) -> None:
        b, am, refuse = weight_node(n, "absmax")
        k, nn, bs, qt = (n.attrs.get(a) for a in ("K", "N", "block_size", "quant_type"))
        if qt not in K.BNB4_ORT_TABLES or not isinstance(k, int) or not isinstance(nn, int) or k < 1 or nn < 1 \
                or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise refuse(f"has quant_type={qt}, K={k}, N={nn}, block_size={bs}: weightdiff reads FP4 (0) and NF4 (1) "
                         "with a power-of-two block of at least 16")
        numel = k * nn
        if b.dtype != "U8" or b.numel != -(-numel // 2):
            raise refuse(f"is {b.dtype} {list(b.shape)}, expected {-(-numel // 2)} bytes for K={k}, N={nn}")
        if am.dtype not in ("F32", "F16", "BF16") or am.numel != -(-numel // bs):
            raise refuse(f"has absmax {am.dtype} {list(am.shape)}, expected {-(-numel // bs)} floats (block {bs})")
        logical = b.name[:-len("_Bnb4")] if b.name.endswith("_Bnb4") else b.name
        if logical in sources or (logical != b.name and logical in stored):
            raise CheckpointError(b.path, f"tensor `{escape_name(logical)}` is stored both plain and quantized")
        kind = "nf4" if qt == 1 else "fp4"
        scheme = QuantScheme("onnx", f"{kind}, block {bs} (MatMulBnb4)", 4, str(bs), False, (b.name, am.name),
                             b.nbytes + am.nbytes)
        sources[logical] = Bnb4T(logical, (k, nn), scheme, b.path, b, am, K.BNB4_ORT_TABLES[qt], bs)
        owned.update({b.name: logical, am.name: logical})

    for n in model.nodes:                      # QDQ: DequantizeLinear of an integer initializer
        if n.op != "DequantizeLinear" or not n.inputs or n.inputs[0] not in stored or n.inputs[0] in owned:
            continue
        x = stored[n.inputs[0]]
        if not _is_int(x.dtype) and x.name not in nibbles:
            raise CheckpointError(file, f"`{escape_name(x.name)}` is {x.dtype}, dequantized by a DequantizeLinear "
                                        "node; weightdiff reads integer (int4/uint4/int8/uint8/int16) codes only")
        if len(n.inputs) < 2 or n.inputs[1] not in stored:
            raise CheckpointError(file, f"`{escape_name(x.name)}` is dequantized with a scale that is not stored "
                                        "in the model, so its values cannot be known")
        zero = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
        if zero is not None and zero not in stored:
            raise CheckpointError(file, f"`{escape_name(x.name)}`: its zero point `{escape_name(zero)}` is not stored")
        source(x.name, n.inputs[1], zero, n.attrs.get("axis", 1), n.attrs.get("block_size", 0), "DequantizeLinear")
    for n in model.nodes:                      # an int32 bias of QGemm / QLinearConv: input scale x weight scale
        at = {"QGemm": 6, "QLinearConv": 8}.get(n.op)
        if at is None or len(n.inputs) <= at or n.inputs[at] not in stored or n.inputs[at] in owned:
            continue
        bias, xs, ws = n.inputs[at], n.inputs[1], n.inputs[4]
        if stored[bias].dtype != "I32" or len(stored[bias].shape) != 1 or xs not in stored or ws not in stored:
            continue
        per = math.prod(stored[ws].shape) > 1
        source(bias, ws, None, 0 if per else None, 0, f"{n.op} bias", scale2=xs)
    for name, c in stored.items():             # ONNX Runtime's QOperator names: W_quantized, W_scale, W_zero_point
        if not name.endswith("_quantized") or name in owned or not _is_int(c.dtype):
            continue
        stem = name[:-len("_quantized")]
        scale, zero = stem + "_scale", stem + "_zero_point"
        if scale not in stored:
            continue
        axis = None
        if math.prod(stored[scale].shape) > 1:
            fits = [k for k, d in enumerate(c.shape) if (d,) == tuple(stored[scale].shape)]
            by_op = {_axis_for(op, c.shape) for op, i in uses.get(name, []) if _INT_WEIGHT.get(op.op) == i} - {None}
            axis = by_op.pop() if len(by_op) == 1 else (fits[0] if len(fits) == 1 else None)
        source(name, scale, zero if zero in stored else None, axis, 0, "ONNX Runtime")
    for name, c in stored.items():             # an integer weight left: its values cannot be known
        if name in owned or not _is_int(c.dtype):
            continue
        for op, i in uses.get(name, []):
            if _INT_WEIGHT.get(op.op) == i:
                raise CheckpointError(file, f"`{escape_name(name)}` {c.dtype} {list(c.shape)} is the integer weight of "
                                            f"a {op.op} node, and no stored scale for it was found, so its values "
                                            "cannot be known", "compare the float model this one was quantized from")
    for n in model.nodes:                      # ONNX Runtime's MatMulNBits (2/4/8-bit blocks along K), MatMulBnb4
        if n.op == "MatMulNBits":
            nbits(n)
        elif n.op == "MatMulBnb4":
            bnb4(n)
    for name, (kind, shape) in nibbles.items():
        if name not in owned:
            readers = sorted({op.op for op, _ in uses.get(name, [])}) or ["no node"]
            raise CheckpointError(file, f"`{escape_name(name)}` is {'INT4' if kind == 'I4' else 'UINT4'} "
                                        f"{list(shape)} read by {', '.join(readers)}: weightdiff reads 4-bit codes "
                                        "only through DequantizeLinear or MatMulNBits",
                                  "compare the float model it was quantized from")
    tensors: dict[str, TensorInfo] = {}
    plumbing = params = 0
    dropped: set[str] = set()                 # quantized logical tensors that are plumbing too
    for name, info in stored.items():
        if name in owned:
            logical = owned[name]
            if logical not in tensors and logical not in dropped:
                src = sources[logical]
                if _plumbing(logical, int(math.prod(src.shape)), False, False):
                    dropped.add(logical)
                    plumbing += 1
                    params += int(math.prod(src.shape))
                    continue
                # the stored integer type names the scheme (`dtypes` counts int8 and int4 tensors apart)
                stored_as = f"int{src.scheme.bits}" if src.scheme.scheme.endswith("(MatMulNBits)") \
                    else src.scheme.scheme.split(",")[0].split(" ")[0]       # int8, uint8, int4, nf4, fp4
                tensors[logical] = TensorInfo(logical, "F32", tuple(src.shape), src.path, None, None,
                                              scheme=stored_as, quant=src.scheme)
            continue
        qparam = bool(uses.get(name)) and all(i in _QPARAMS.get(op.op, ()) for op, i in uses[name])
        if qparam or _plumbing(name, info.numel, info.dtype in _INT_TYPES, name in model.constants):
            plumbing += 1
            params += info.numel
            continue
        tensors[name] = info
    for logical in dropped:
        del sources[logical]
    tensors, folded = _folded_constants(model, tensors, sources, uses)
    hidden = [n for n in stored if n not in tensors and owned.get(n) not in sources]
    copies = {}
    for name in tensors:                       # a weight computed from one parameter alone (transposed)
        frm = _sources_of(model.folded_from.get(name)) if _GENERATED.match(name) else None
        if frm is not None and len(frm) == 1 and frm[0] in tensors:
            copies[name] = frm[0]
    tensors, file_names, named, aliased = _module_names(model.nodes, tensors, sources, copies)
    meta = dict(model.metadata)
    ckpt = Checkpoint(shown, "onnx", model.files, tensors, meta, root, opener=OnnxData)
    ckpt.stored, ckpt.quant, ckpt.file_names = stored, sources, file_names
    ckpt.hidden = hidden
    ckpt.folded = folded
    ckpt.layouts = _layouts(tensors, file_names, sources, uses)
    if named:
        old, new = named[0]
        ckpt.notes.append(f"{escape_name(str(file))}: {len(named)} weight{'s' if len(named) != 1 else ''} the exporter "
                          f"named itself (`{escape_name(old)}`) {'are' if len(named) != 1 else 'is'} reported under "
                          f"the module of the node that reads {'them' if len(named) != 1 else 'it'} "
                          f"(`{escape_name(new)}`)")
    if aliased:
        ckpt.notes.append(f"{escape_name(str(file))}: {len(aliased)} parameter{'s' if len(aliased) != 1 else ''} the "
                          f"exporter stored once for equal values {'are' if len(aliased) != 1 else 'is'} read under "
                          f"{'their' if len(aliased) != 1 else 'its'} own name{'s' if len(aliased) != 1 else ''} "
                          f"through the nodes of {'their' if len(aliased) != 1 else 'its'} modules "
                          f"(`{escape_name(aliased[0])}`)")
    for path, h in headers_of(model, stored, held).items():
        ckpt._headers[path] = h
    if folded:
        ckpt.notes.append(_folded_note(file, folded))
    if plumbing:
        ckpt.notes.append(f"{escape_name(str(file))}: {plumbing} graph constant{'s' if plumbing != 1 else ''} "
                          f"({params:,} value{'s' if params != 1 else ''}: shapes, indices, quantization parameters "
                          f"of activations) {'are not weights and are' if plumbing != 1 else 'is not a weight and is'} "
                          "not compared")
    return ckpt
