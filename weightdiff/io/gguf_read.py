"""Validated, streaming reader of llama.cpp GGUF files (v2 and v3).

The sibling of ``safetensors_read`` with the same verbs (``tensors``, ``windows``,
``read``, ``read_rows``), but unlike it the values handed out are not always the stored
bytes: a quantized tensor (Q8_0, Q4_K, IQ4_XS, ...) is dequantized to float32 by the
``gguf`` package's own dequantizers (``gguf.quants.dequantize``; Q8_0, Q4_0, Q4_K, Q5_K and
Q6_K by the numba loops of ``kernels/ggml.py``, bitwise equal to them), whole quant blocks
at a time, a window at a time, and its ``TensorInfo.scheme`` records the stored type. F32,
F16, BF16 (and the integer types) are handed out as stored, like safetensors. Names are
mapped to Hugging Face names and the converter's transforms undone (``gguf_names``), so
a GGUF reads as the checkpoint it was converted from.

The header is parsed by ``gguf_header``, not by ``gguf.GGUFReader``, so that a hostile
file is refused before anything proportional to its claims is allocated: every count and
length is checked against the bytes left in the file and against caps; tensor types,
dimension counts (at most 4), then here row lengths (whole quant blocks), alignment and
data ranges (inside the file, aligned, not overlapping) are checked before any tensor
byte is read. Any
problem is a ``CheckpointError`` naming the file. Tensor data is read through a fresh
read-only ``mmap`` of just the byte range a window needs, closed before the window is
handed out, so memory follows the window, not the model.

>>> with GGUFFile("model-Q4_K_M.gguf") as f:                    # doctest: +SKIP
...     info = f.tensors["model.layers.0.self_attn.q_proj.weight"]
...     info.dtype, info.scheme, sum(float(w.sum()) for w in f.windows(info.name))
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, escape_name
from ..kernels import ggml
from .files import OpenCheckpointFile, os_problem, pread_into
from .safetensors_read import TensorInfo, check_range, storage_of
from .gguf_floor import FLOORS, K_QUANTS, claims, ends, floor, scheme_of
from .gguf_header import MAGIC, gguf_version, is_gguf, parse_header, require_gguf, split_of, split_part_name
from .gguf_names import ARCHITECTURES, GENERATED, block_index, head_dim, hf_name
from .experts import MAX_EXPERTS, expert_name
from .gguf_adapter import MERGE_HINT, GGUFLora, lora_header, peft_names

__all__ = ["MAGIC", "GGUFFile", "is_gguf", "require_gguf", "SplitPart", "SplitSeries", "read_series"]

#: llama.cpp's stacked expert tensors (``LLM_TENSOR_FFN_*_EXPS``) and their biases
_STACKED = re.compile(r"^blk\.\d+\.ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias)$")

DECODE_ELEMENTS = 1 << 20         # elements dequantized per gguf call (bounds its temporaries)
#: GGML types handed out as stored, with their safetensors dtype names
NATIVE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
          "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
@dataclass(frozen=True)
class _Layout:
    """How one tensor sits in the file: ``rows`` x ``cols`` in GGUF order (``cols`` = ne[0])."""

    gguf_name: str
    start: int
    rows: int
    cols: int
    block: int
    tsize: int
    out: np.dtype
    decode: Callable[[np.ndarray], np.ndarray]
    transform: str | None
    heads: int
    kernel: Callable[[np.ndarray, np.ndarray], object] | None = None   # decode(raw) into out

    @property
    def row_bytes(self) -> int:
        return self.cols // self.block * self.tsize


#: suffixes of llama.cpp's LoRA factor tensors (convert_lora_to_gguf.py, llama-adapter.cpp)
_LORA_SUFFIXES = (".lora_a", ".lora_b")


def _adapter_evidence(meta: dict, infos: list[tuple]) -> str | None:
    """What says a GGUF is a llama.cpp adapter, for the refusal (None when nothing does): general.type
    `adapter` (any case), an ``adapter.*`` key (``adapter.lora.alpha``, ``adapter.type``: llama.cpp's loader
    reads them only from adapters), or tensors named as LoRA factors (``blk.0.attn_q.weight.lora_a``)."""
    kind = meta.get("general.type")
    if isinstance(kind, str) and kind.strip().lower() == "adapter":
        return f"general.type `{escape_name(kind)}`"
    key = next((k for k in meta if k.startswith("adapter.")), None)
    if key is not None:
        return f"metadata `{escape_name(key)}`"
    factor = next((name for name, *_ in infos if name.endswith(_LORA_SUFFIXES)), None)
    if factor is not None:
        return f"tensors named as LoRA factors: `{escape_name(factor)}`"
    return None


def _q_rows(infos: Sequence[tuple]) -> dict:
    """Each block's query rows (the head size when the metadata gives none: no embedding_length)."""
    return {block_index(n): math.prod(ne[1:]) for n, ne, _, _ in infos if n.endswith(".attn_q.weight") and len(ne) == 2}


def _split_int(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    return v if type(v) is int else None


class SplitPart(CheckpointError):
    """``GGUFFile(path)`` of one part of a split GGUF (``split.count`` > 1): the model is all its parts, read
    together by ``read_series``. Carries the part's header: ``meta``, ``infos``, ``no`` (from 0), ``count``,
    ``total`` (``split.tensors.count``)."""

    def __init__(self, path: str | os.PathLike, meta: dict, infos: list[tuple]):
        self.meta, self.infos = meta, infos
        self.no, self.count = _split_int(meta, "split.no"), _split_int(meta, "split.count")
        self.total = _split_int(meta, "split.tensors.count")
        super().__init__(path, f"is part {'?' if self.no is None else self.no + 1} of a GGUF split into "
                               f"{self.count} files", "pass its first part, with the others beside it")


@dataclass(eq=False)
class SplitSeries:
    """The parts of a split GGUF (llama-gguf-split, convert_hf_to_gguf.py --split-max-size), in order, read
    as one model: ``meta``, the first part's metadata (the model's: the other parts hold only ``split.*``);
    ``q_rows``, each block's query rows over every part (a head size, wherever its query matrix is)."""

    parts: tuple
    meta: dict
    q_rows: dict

    def check_part(self, path: str | os.PathLike, meta: dict, infos: list[tuple]) -> None:
        """A part opened again must still be that part of this series."""
        i = self.parts.index(Path(path))
        if _split_int(meta, "split.no") != i or _split_int(meta, "split.count") != len(self.parts):
            raise CheckpointError(path, f"is no longer part {i + 1} of {len(self.parts)} of its split GGUF "
                                        "(changed since it was located?)", "rerun")


def read_series(first: SplitPart, path: Path, beside: Callable[[str], Path]) -> tuple[list[Path], SplitSeries]:
    """The parts of the split GGUF that ``path`` (which raised ``first``) belongs to, and the series to open
    each with (``GGUFFile(part, series)``). The parts are found by llama.cpp's names for them
    (``PREFIX-00001-of-0000N.gguf``, as llama.cpp's loader finds them), through ``beside(name)`` (the
    checkpoint folder's rules: a part that is a symlink out of it is refused), whichever part ``path`` is.
    Every part must say it is that part of that many (``split.no``, ``split.count``), agree on the tensor
    count (``split.tensors.count``) and hold between them exactly that many tensors."""
    count, no = first.count, first.no
    if no is None or not 0 <= no < count:
        raise CheckpointError(path, f"is part of a GGUF split into {count} files, but its split.no is "
                                    f"{first.meta.get('split.no')!r}, not a part number from 0 to {count - 1}")
    if first.total is None or first.total < 0:
        raise CheckpointError(path, f"is part {no + 1} of a GGUF split into {count} files, but its "
                                    f"split.tensors.count is {first.meta.get('split.tensors.count')!r}, not a count")
    named = split_of(path.name)
    if named is None or named[1:] != (no + 1, count):
        raise CheckpointError(path, f"is part {no + 1} of a GGUF split into {count} files, but its name is not "
                                    f"llama.cpp's name for that part (PREFIX-{no + 1:05d}-of-{count:05d}.gguf), so "
                                    "where the other parts are is unknown",
                              "give the parts their llama-gguf-split names, or merge them with "
                              "llama-gguf-split --merge")
    parts, heads = [], []
    for i in range(count):
        name = split_part_name(named[0], i + 1, count)
        part = path if i == no else beside(name)
        if i != no and not os.path.lexists(part):
            raise CheckpointError(path, f"is part {no + 1} of a GGUF split into {count} files, and part {i + 1} "
                                        f"({escape_name(name)}) is not beside it",
                                  "fetch every part of the model into one folder")
        parts.append(Path(part))
        if i == no:
            heads.append(first)
            continue
        try:
            with GGUFFile(part):
                pass
        except SplitPart as other:
            heads.append(other)
            continue
        raise CheckpointError(part, f"is named as part {i + 1} of {count} of a split GGUF, but its header says "
                                    "it is a whole model (no split.count)", "merge or rename the parts")
    for i, (part, h) in enumerate(zip(parts, heads)):
        if h.count != count or h.no != i:
            raise CheckpointError(part, f"is named as part {i + 1} of {count} of a split GGUF, but its header says "
                                        f"part {'?' if h.no is None else h.no + 1} of {h.count}",
                                  "the parts come from different splits: fetch them again")
        if h.total != first.total:
            raise CheckpointError(part, f"says its split GGUF holds {h.total} tensors, part {no + 1} says "
                                        f"{first.total}", "the parts come from different splits: fetch them again")
    held = sum(len(h.infos) for h in heads)
    if held != first.total:
        raise CheckpointError(path, f"is part {no + 1} of a GGUF split into {count} files whose parts hold "
                                    f"{held:,} tensors between them, not the {first.total:,} the split declares",
                              "a part is from another split, or truncated: fetch the parts again")
    seen: dict[str, int] = {}
    for i, h in enumerate(heads):
        for n, *_ in h.infos:
            if n in seen:
                raise CheckpointError(parts[i], f"tensor `{escape_name(n)}` is in parts {seen[n] + 1} and {i + 1} of "
                                                "its split GGUF")
            seen[n] = i
    return parts, SplitSeries(tuple(parts), heads[0].meta, _q_rows([x for h in heads for x in h.infos]))


class GGUFFile(OpenCheckpointFile):
    """One open, fully validated GGUF file (a context manager), named as Hugging Face names.

    ``tensors`` maps Hugging Face names to ``TensorInfo`` (``dtype`` F32 for quantized
    tensors, ``scheme`` their GGML type); ``metadata`` holds the GGUF key/values (arrays
    summarised) and ``gguf.*`` notes on the name mapping and the transforms undone.
    """

    def __init__(self, path: str | os.PathLike, series: "SplitSeries | None" = None):
        self._fd = None
        self._gguf = require_gguf(Path(path))
        self._open(path)
        self.series = series
        try:
            self._open_header()
        except BaseException:
            self.close()
            raise

    def _open_header(self) -> None:
        gguf, path = self._gguf, self.path
        if self.size < 24:
            raise CheckpointError(path, f"file is {self.size:,} bytes, too short for a GGUF header (truncated download?)")
        try:
            mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, f"cannot map the file: {os_problem(exc) if isinstance(exc, OSError) else exc}") from None
        try:
            if not is_gguf(mm[:4]):
                raise CheckpointError(path, "not a GGUF file (no GGUF magic)")
            data, align, meta, infos = parse_header(mm, self.size, path, gguf)
        finally:
            mm.close()
        split = meta.get("split.count")
        if self.series is None and type(split) is int and split > 1:
            raise SplitPart(path, meta, infos)     # the caller reads the series (read_series)
        if self.series is not None:
            # one part of a split GGUF: the model's metadata is the first part's (the others hold only split.*)
            self.series.check_part(path, meta, infos)
            meta = self.series.meta
        arch = meta.get("general.architecture")
        arch = arch if isinstance(arch, str) else ""
        if arch == "controlvector":
            # llama-cvector-generator's output (direction.N, one vector per layer): llama.cpp adds each to that
            # layer's hidden state at inference (--control-vector); read as a model it was INCONCLUSIVE, "a GGUF of
            # an architecture weightdiff has no name map for", as if a conversion might explain it
            hint = meta.get("controlvector.model_hint")
            hint = f" for `{escape_name(hint)}`" if isinstance(hint, str) and hint else ""
            raise CheckpointError(path, f"is a llama.cpp control vector{hint} (general.architecture `controlvector`): "
                                        "directions llama.cpp adds to each layer's hidden state at inference, not "
                                        "weights; it changes no weight of the model, so there is nothing to compare",
                                  "compare the model's weights; a control vector is applied by llama.cpp's "
                                  "--control-vector")
        why = _adapter_evidence(meta, infos)
        #: a llama.cpp LoRA adapter's header (weightdiff.io.gguf_adapter), None for a model
        self.lora: GGUFLora | None = None
        if why is not None:
            # convert_lora_to_gguf.py writes the factors (`blk.N.attn_q.weight.lora_a`, `.lora_b`) and
            # adapter.lora.alpha: read as a LoRA adapter, as llama.cpp loads it. Known by its factors and keys
            # too: without general.type (or spelled `Adapter`) it read as a model whose factors were added
            # tensors ("DERIVED ... none of its own weights changed"); llama.cpp refuses such a file, and so
            # does lora_header
            self.lora = lora_header(meta, infos, path, why)
            if self.series is not None:
                raise CheckpointError(path, "is a llama.cpp LoRA adapter split into parts, which llama.cpp does not "
                                            "load", "merge the parts with llama-gguf-split --merge")
        #: the head count each tensor's Q/K rows were un-permuted by (a LoRA adapter of this base borrows it)
        self.rope_heads: dict[str, int] = {}
        lora_parts: dict[str, dict[str, str]] = {}
        self.metadata = {k: (v if isinstance(v, str) else str(v)) for k, v in meta.items()}
        self.tensors: dict[str, TensorInfo] = {}
        self._layout: dict[str, _Layout] = {}
        self._offset: dict[str, str] = {}
        spans, skipped, counts = [], [], {"permute": 0, "transpose": 0, "minus_one": 0, "experts": 0}
        # each block's query rows: the head size when the metadata gives none (no embedding_length)
        q_rows = self.series.q_rows if self.series is not None else _q_rows(infos)
        for name, ne, qtype, offset in infos:
            q = f"`{escape_name(name)}`"
            tname = gguf.GGMLQuantizationType(qtype).name
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
            cols = ne[0] if ne else 1
            rows = math.prod(ne[1:])
            if cols % block:
                raise CheckpointError(path, f"tensor {q} is {tname} with rows of {cols:,} elements, not a whole "
                                            f"number of {block}-element blocks")
            nbytes = rows * (cols // block) * tsize
            if offset % align:
                raise CheckpointError(path, f"tensor {q} starts at data offset {offset:,}, not a multiple of "
                                            f"the alignment {align}")
            if data + offset + nbytes > self.size:
                raise CheckpointError(path, f"tensor {q} ({tname}, {nbytes:,} bytes at data offset {offset:,}) "
                                            f"runs past the end of the {self.size:,}-byte file (truncated download?)")
            spans.append((offset, offset + nbytes, name))
            if name in GENERATED:
                skipped.append(name)
                continue
            if self.lora is not None:
                self._adapter_tensor(name, ne, data + offset, qtype, tname, block, tsize, nbytes, arch, meta,
                                     lora_parts)
                continue
            mapped = hf_name(arch, name, meta)
            if mapped.transform is None and mapped.name == name and len(ne) in (2, 3) \
                    and 2 <= int(ne[-1]) <= MAX_EXPERTS and all(int(d) > 0 for d in ne[:-1]) and _STACKED.match(name):
                # an architecture without a name map keeps llama.cpp's names: its stacked experts
                # (and their biases) still split, as `blk.N.ffn_gate_exps.E.weight`
                mapped = mapped._replace(name=expert_name(name, "{x}"), transform="experts")
            if mapped.transform == "experts":
                self._split_experts(name, mapped.name, ne, data + offset, qtype, tname, block, tsize, meta)
                counts["experts"] += 1
                continue
            shape = tuple(reversed(ne))
            transform = mapped.transform
            if transform == "transpose" and len(ne) != 2:
                transform = None
            if transform == "transpose":
                shape = tuple(ne)
            if transform == "permute":
                if len(ne) not in (1, 2):
                    raise CheckpointError(path, f"tensor {q}: cannot undo llama.cpp's Q/K permutation of a tensor "
                                                f"of {len(ne)} dimensions (corrupt header?)")
                if mapped.heads < 1 or shape[0] % (2 * mapped.heads):
                    raise CheckpointError(path, f"tensor {q}: cannot undo llama.cpp's Q/K permutation: {shape[0]:,} "
                                                f"rows and {mapped.heads} heads from the metadata (corrupt metadata?)")
                bid = block_index(name)
                hd = head_dim(meta, arch, bid, q_rows.get(bid, 0))
                if hd and shape[0] != mapped.heads * hd:
                    # a missing head_count_kv falls back to head_count: k's rows then split into the wrong
                    # heads, and the un-permuted matrix read as changed weights (llama.cpp refuses such a file)
                    raise CheckpointError(path, f"tensor {q}: {shape[0]:,} rows, but the metadata's "
                                                f"{mapped.heads} heads of {hd} need {mapped.heads * hd:,} "
                                                "(head_count_kv missing or wrong?): cannot undo llama.cpp's "
                                                "Q/K permutation")
                if len(ne) == 1:
                    if block != 1:
                        raise CheckpointError(path, f"tensor {q}: a permuted 1-D tensor stored as {tname} "
                                                    "cannot be un-permuted")
                    rows, cols = cols, 1          # a bias: one element per row
            layout = self._make_layout(name, data + offset, qtype, tname, rows, cols, block, tsize,
                                       transform, mapped.heads)
            if mapped.name in self.tensors:
                raise CheckpointError(path, f"tensors `{escape_name(self._layout[mapped.name].gguf_name)}` and {q} "
                                            f"both map to `{escape_name(mapped.name)}`")
            dtype = "F32" if layout.out == np.float32 and (tname not in NATIVE or transform == "minus_one") \
                else NATIVE[tname]
            scheme = None if tname in NATIVE else tname
            quant = None if tname in NATIVE else scheme_of(tname, block, tsize, nbytes, name, meta)
            self.tensors[mapped.name] = TensorInfo(mapped.name, dtype, shape, path, data + offset,
                                                   data + offset + nbytes, scheme, quant)
            self._layout[mapped.name] = layout
            if transform == "minus_one" and tname in NATIVE:
                self._offset[mapped.name] = NATIVE[tname]
            if transform == "permute":
                self.rope_heads[mapped.name] = mapped.heads
            if transform:
                counts[transform] += 1
        for stem, got in lora_parts.items():
            if len(got) < 2:
                have, lack = ("lora_a", "lora_b") if "a" in got else ("lora_b", "lora_a")
                raise CheckpointError(path, f"LoRA factor `{escape_name(stem)}.{have}` has no `.{lack}` beside it "
                                            "(llama.cpp refuses the adapter: a pair is missing one component)",
                                      "convert the adapter again with llama.cpp's convert_lora_to_gguf.py")
        self.counts, self.skipped = counts, skipped
        if not spans:          # a part of a split GGUF that holds only the model's metadata
            self._notes(arch, counts, skipped)
            return
        spans.sort()
        for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
            if b2 < e1:
                raise CheckpointError(path, f"tensors `{escape_name(n1)}` and `{escape_name(n2)}` overlap")
        # writers lay the tensors out back to back from offset 0, each padded to the alignment: more
        # bytes than a pad that no tensor claims mean the header does not describe this data
        gaps = [(spans[0][0], None, spans[0][2])] + [(b2 - e1, n1, n2) for (_, e1, n1), (b2, _, n2) in
                                                     zip(spans, spans[1:])]
        for gap, n1, n2 in gaps:
            if gap >= align:
                where = f"before `{escape_name(n2)}`" if n1 is None else \
                    f"between `{escape_name(n1)}` and `{escape_name(n2)}`"
                raise CheckpointError(path, f"{gap:,} bytes of the tensor data {where} belong to no tensor "
                                            "(a corrupt or edited header?)")
        tail = self.size - (data + spans[-1][1])
        if tail >= align:
            raise CheckpointError(path, f"{tail:,} bytes after the last tensor belong to no tensor (a tensor count "
                                        "that does not match the header, or data appended to the file?)")
        self._notes(arch, counts, skipped)

    def _split_experts(self, name: str, template: str, ne: list, start: int, qtype: int, tname: str, block: int,
                       tsize: int, meta: dict) -> None:
        """One ``[experts, m, n]`` stack (``ffn_gate_exps``) as the experts' own ``m x n`` matrices under
        their Hugging Face names: each is a contiguous run of whole rows, so it reads, pairs, and gets
        its rank like the safetensors tensor it was stacked from (as one matrix, its spectrum would say
        nothing of any expert's change)."""
        q = f"`{escape_name(name)}`"
        if len(ne) == 2 and name.endswith(".bias"):
            (cols, experts), rows = (int(v) for v in ne), 1       # one bias vector per expert
        elif len(ne) != 3:
            raise CheckpointError(self.path, f"tensor {q} holds stacked experts but has {len(ne)} dimensions, not 3 "
                                             "(experts, rows, columns)")
        else:
            cols, rows, experts = (int(v) for v in ne)
        if not 1 <= experts <= MAX_EXPERTS or rows * cols == 0:
            raise CheckpointError(self.path, f"tensor {q} holds {experts:,} stacked experts of {rows:,} x {cols:,}: "
                                             f"expected 1 to {MAX_EXPERTS:,} experts of at least one element "
                                             "(corrupt header?)")
        layout = self._make_layout(name, start, qtype, tname, rows * experts, cols, block, tsize, None, 0)
        dtype = "F32" if layout.out == np.float32 and tname not in NATIVE else NATIVE[tname]
        scheme = None if tname in NATIVE else tname
        nbytes = rows * layout.row_bytes
        for x in range(experts):
            hf = template.replace("{x}", str(x))
            if hf in self.tensors:
                raise CheckpointError(self.path, f"tensors `{escape_name(self._layout[hf].gguf_name)}` and {q} "
                                                 f"both map to `{escape_name(hf)}`")
            at = start + x * nbytes
            quant = None if tname in NATIVE else scheme_of(tname, block, tsize, nbytes, name, meta)
            shape = (cols,) if len(ne) == 2 else (rows, cols)
            self.tensors[hf] = TensorInfo(hf, dtype, shape, self.path, at, at + nbytes, scheme, quant)
            self._layout[hf] = replace(layout, start=at, rows=rows)

    def _adapter_tensor(self, name: str, ne: list, start: int, qtype: int, tname: str, block: int, tsize: int,
                        nbytes: int, arch: str, meta: dict, parts: dict) -> None:
        """One tensor of a llama.cpp LoRA adapter, under PEFT's name for it (weightdiff.io.gguf_adapter)."""
        q = f"`{escape_name(name)}`"
        if name.endswith("_norm.weight"):
            self.lora.norms.append(name)      # llama.cpp skips them ("TODO: add support for norm vector")
            return
        stem, which = name[:-7], name[-1]
        if name[-7:] not in _LORA_SUFFIXES:
            raise CheckpointError(self.path, f"tensor {q} of a llama.cpp LoRA adapter is neither a factor (`.lora_a`, "
                                             "`.lora_b`) nor a norm weight (llama.cpp refuses it: an unexpected "
                                             "suffix)", "convert the adapter again with llama.cpp's "
                                                        "convert_lora_to_gguf.py")
        parts.setdefault(stem, {})[which] = name       # (the header parser refuses a name written twice)
        mapped = hf_name(arch, stem, meta)
        if mapped.transform is None and mapped.name == stem and len(ne) == 3 \
                and 2 <= int(ne[-1]) <= MAX_EXPERTS and all(int(d) > 0 for d in ne[:-1]) and _STACKED.match(stem):
            mapped = mapped._replace(name=expert_name(stem, "{x}"), transform="experts")
        if not mapped.name.endswith(".weight") or mapped.transform in ("transpose", "minus_one"):
            what = ("GPT-2's Conv1D weight, whose factors llama.cpp's converter writes transposed against the "
                    "base's (llama.cpp refuses them unless the layer is square)" if mapped.transform == "transpose"
                    else "a norm weight" if mapped.transform == "minus_one" else "a bias")
            raise CheckpointError(self.path, f"tensor {q} is a LoRA factor of {what}, which weightdiff does not read "
                                             "from a llama.cpp adapter", MERGE_HINT)
        if mapped.transform == "experts":
            self._split_experts(name, peft_names(mapped.name, which, False), ne, start, qtype, tname, block, tsize,
                                meta)
            return
        if len(ne) != 2:
            raise CheckpointError(self.path, f"LoRA factor {q} has {len(ne)} dimensions, not 2 ([r, in] for lora_a, "
                                             "[out, r] for lora_b; stacked experts' 3)")
        # llm_build_inp_embd gathers token rows of lora_a, stored [vocab, r]: PEFT's lora_embedding_A is [r, vocab]
        embedding = stem.endswith("token_embd.weight")
        transform = "transpose" if embedding and which == "a" else None
        cols, rows = int(ne[0]), int(ne[1])
        layout = self._make_layout(name, start, qtype, tname, rows, cols, block, tsize, transform, 0)
        peft = peft_names(mapped.name, which, embedding)
        if peft in self.tensors:
            raise CheckpointError(self.path, f"tensors `{escape_name(self._layout[peft].gguf_name)}` and {q} "
                                             f"both map to `{escape_name(peft)}`")
        if mapped.transform == "permute" and which == "b":
            # B's rows are in llama.cpp's rotary order, by a head count only the base gives (resolve_rows)
            self.lora.rope[peft] = "k" if stem.split(".")[-2] == "attn_k" else "q"
        dtype = "F32" if layout.out == np.float32 and tname not in NATIVE else NATIVE[tname]
        scheme = None if tname in NATIVE else tname
        quant = None if tname in NATIVE else scheme_of(tname, block, tsize, nbytes, name, meta)
        shape = (cols, rows) if transform == "transpose" else (rows, cols)
        self.tensors[peft] = TensorInfo(peft, dtype, shape, self.path, start, start + nbytes, scheme, quant)
        self._layout[peft] = layout

    def _notes(self, arch: str, counts: dict, skipped: list[str]) -> None:
        notes(self.metadata, arch, counts, skipped)

    def _make_layout(self, name, start, qtype, tname, rows, cols, block, tsize, transform, heads) -> _Layout:
        gguf = self._gguf
        if tname in NATIVE and transform != "minus_one":
            dt = storage_of(NATIVE[tname])
            return _Layout(name, start, rows, cols, block, tsize, dt, lambda raw, dt=dt: raw.view(dt),
                           transform, heads)
        try:
            gguf.quants.dequantize(np.zeros((1, tsize), np.uint8), gguf.GGMLQuantizationType(qtype))
        except NotImplementedError:
            if tname in NATIVE:     # a plain type under the 1 + w norm transform: not gguf's to decode
                raise CheckpointError(self.path, f"tensor `{escape_name(name)}` is stored as {tname}, but this "
                                                 "architecture stores its norm weights as 1 + w, which is read "
                                                 "from F32, F16 or BF16 only") from None
            if tname in ("Q8_1", "Q8_K"):   # ggml quantizes activations to these for its dot products only
                raise CheckpointError(self.path, f"tensor `{escape_name(name)}` is stored as {tname}, a type ggml "
                                                 "uses only for the activations of its dot products, never for "
                                                 "stored weights (a corrupt or hand-made file?)") from None
            raise CheckpointError(self.path, f"tensor `{escape_name(name)}` is stored as {tname}, which gguf "
                                             f"{gguf_version(gguf)} cannot dequantize", "upgrade gguf") from None
        qt = gguf.GGMLQuantizationType(qtype)
        deq = gguf.quants.dequantize
        kernel = None
        if tname in ggml.BLOCKS and transform != "minus_one":   # numba, bitwise equal to gguf's
            def kernel(raw, out, name=tname):
                return ggml.dequantize(raw, name, out)
        if transform == "minus_one":
            def decode(raw, qt=qt):
                return deq(raw, qt).astype(np.float32, copy=False) - np.float32(1)
        else:
            def decode(raw, qt=qt):
                return deq(raw, qt)
        return _Layout(name, start, rows, cols, block, tsize, np.dtype(np.float32), decode, transform, heads,
                       kernel)

    # -- data ------------------------------------------------------------------
    def windows(self, name: str, max_elements: int | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[np.ndarray]:
        """1-D read-only arrays over flat elements [start, stop) of ``name`` in Hugging Face
        order, at most ``max_elements`` each (dequantized to float32 where quantized)."""
        info = self._info(name)
        lay = self._layout[name]
        start, stop, step = check_range(info, max_elements, start, stop, lay.out.itemsize)
        return self._windows(info, lay, start, stop, step)

    def offset_storage(self, name: str) -> str | None:
        """The float dtype a tensor is stored in as ``1 + w`` (a Gemma norm weight: the values handed
        out are that minus 1, in float32), or None. ``measure.recast`` reproduces the storage from
        the base: that subtraction does not give back an F32 or F16 base's bits."""
        return self._offset.get(name)

    def floor_windows(self, name: str, max_elements: int | None = None, start: int = 0,
                      stop: int | None = None, noise: bool = False) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows``: per element the quantization noise floor
        (weightdiff.io.gguf_floor), or with ``noise`` the half-width of its noise model; None for
        a tensor stored unquantized or without a floor."""
        info = self._info(name)
        lay = self._layout[name]
        if info.scheme not in FLOORS or lay.transform == "minus_one":
            return None
        bs, tname = lay.block, info.scheme
        return self._per_block(info, lay, lambda blocks, values: floor(blocks, values, tname, bs, noise),
                               max_elements, start, stop)

    def end_windows(self, name: str, max_elements: int | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows``: per element of a K-quant tensor, 1 at its sub-block's
        top code, -1 at the bottom one, 0 between, 2 where the sub-block's step is 0
        (``gguf_floor.ends``); None for any other type. The floor test reads them to tell a code an
        importance-matrix quantizer clamped from one it rounded."""
        info = self._info(name)
        lay = self._layout[name]
        if info.scheme not in FLOORS or lay.transform == "minus_one":
            return None
        bs, ts, tname = lay.block, lay.tsize, info.scheme
        if ends(np.zeros((1, ts), np.uint8), np.zeros((1, bs), np.float32), tname) is None:
            return None
        return self._per_block(info, lay, lambda blocks, values: ends(blocks, values, tname),
                               max_elements, start, stop)

    def claim_windows(self, name: str, which: int, max_elements: int | None = None, start: int = 0,
                      stop: int | None = None) -> Iterator[np.ndarray] | None:
        """float32 windows aligned with ``windows``: per element, what its block's stored scales say of the
        weights they quantized (``gguf_floor.claims``): ``which`` 0, the least range of its block or
        sub-block, 1 the least largest sub-block range of its super-block (K-quants only). Blocks run along
        rows in both orders (the head permutation moves whole rows), down a column of a transposed tensor
        (``claim_order``); None for a type without a floor."""
        info = self._info(name)
        lay = self._layout[name]
        if info.scheme not in FLOORS or lay.transform == "minus_one" \
                or (which == 1 and info.scheme not in K_QUANTS):
            return None
        tname = info.scheme
        return self._per_block(info, lay, lambda blocks, values: claims(blocks, values, tname, which),
                               max_elements, start, stop, values=False)

    def claim_order(self, name: str) -> str:
        """How the blocks ``claim_windows`` speaks of run in the Hugging Face tensor: ``"rows"`` (runs of the
        flat order), or ``"cols"`` (a transposed tensor: runs of consecutive rows down each column)."""
        return "cols" if self._layout[name].transform == "transpose" else "rows"

    def _per_block(self, info, lay, fn, max_elements, start, stop, values: bool = True) -> Iterator[np.ndarray]:
        """float32 windows aligned with ``windows`` of ``fn(blocks, values)``: a value per element computed from
        each quantized block's raw bytes and its decoded values (a floor, an end-code mark); ``values`` False:
        ``fn`` reads the bytes only and gets an unfilled array of the values' shape."""
        bs, ts = lay.block, lay.tsize

        def decode(raw):
            blocks = raw.reshape(-1, ts)
            values = np.empty((blocks.shape[0], bs), np.float32)
            if not need:
                pass
            elif lay.kernel is not None:
                lay.kernel(blocks, values)
            else:
                values = lay.decode(blocks).reshape(-1, bs)
            return fn(blocks, values).reshape(raw.shape[0], -1)

        need = values
        start, stop, step = check_range(info, max_elements, start, stop, 4)
        return self._windows(info, replace(lay, decode=decode, kernel=None), start, stop, step)

    def _windows(self, info, lay, start, stop, step) -> Iterator[np.ndarray]:
        for pos in range(start, stop, step):
            arr = self._flat(info, lay, pos, min(pos + step, stop))
            arr.flags.writeable = False
            yield arr

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, shaped, as handed out by ``windows``."""
        info = self._info(name)
        return self._flat(info, self._layout[name], 0, info.numel).reshape(info.shape)

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows (first-axis slices) of ``name`` in the given order: shape (len(rows), *shape[1:])."""
        info = self._info(name)
        lay = self._layout[name]
        if not info.shape:
            raise ValueError(f"read_rows needs a >=1-D tensor; `{escape_name(name)}` is 0-d")
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= info.shape[0]):
            raise IndexError(f"row index out of range for `{escape_name(name)}` with {info.shape[0]} rows")
        width = math.prod(info.shape[1:])
        out = np.empty((idx.size, width), dtype=lay.out)
        i = 0
        while i < idx.size and width:
            j = i + 1
            while j < idx.size and idx[j] == idx[j - 1] + 1:
                j += 1
            out[i:j] = self._flat(info, lay, int(idx[i]) * width, int(idx[j - 1] + 1) * width).reshape(j - i, width)
            i = j
        return out.reshape((idx.size, *info.shape[1:]))

    def _flat(self, info: TensorInfo, lay: _Layout, a: int, b: int) -> np.ndarray:
        """Flat elements [a, b) in Hugging Face order, as an owned array."""
        if b <= a:
            return np.empty(0, dtype=lay.out)
        if lay.transform == "transpose":            # HF row i is GGUF column i
            n = lay.rows
            ra, rb = a // n, -(-b // n)
            vals = np.ascontiguousarray(self._grid(lay, 0, n, ra, rb).T).reshape(-1)
            return vals[a - ra * n:b - ra * n]
        if lay.transform == "permute":              # HF row r is GGUF row g(r) within its head
            cols = lay.cols
            ra, rb = a // cols, -(-b // cols)
            g = _unpermute(np.arange(ra, rb, dtype=np.int64), lay.rows // lay.heads)
            lo, hi = int(g.min()), int(g.max()) + 1
            vals = self._grid(lay, lo, hi, 0, cols)[g - lo].reshape(-1)
            return vals[a - ra * cols:b - ra * cols]
        cols = lay.cols
        (ra, ca), (rb, cb) = divmod(a, cols), divmod(b, cols)
        if ra == rb:
            return self._grid(lay, ra, ra + 1, ca, cb).reshape(-1)
        parts = []
        if ca:
            parts.append(self._grid(lay, ra, ra + 1, ca, cols).reshape(-1))
            ra += 1
        if rb > ra:
            parts.append(self._grid(lay, ra, rb, 0, cols).reshape(-1))
        if cb:
            parts.append(self._grid(lay, rb, rb + 1, 0, cb).reshape(-1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _grid(self, lay: _Layout, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """GGUF-order rows [r0, r1) x columns [c0, c1), decoded from whole blocks."""
        bs = lay.block
        b0, b1 = c0 // bs, -(-c1 // bs)
        out = np.empty((r1 - r0, (b1 - b0) * bs), dtype=lay.out)
        self.check_unchanged()
        raw, mm = self._bytes(lay.start + r0 * lay.row_bytes, (r1 - r0) * lay.row_bytes)
        try:
            _decode_into(out, raw.reshape(r1 - r0, lay.row_bytes), lay, b0, b1)
        finally:
            del raw
            if mm is not None:
                try:
                    mm.close()
                except BufferError:        # a view escaped: unmapped when it is freed
                    pass
        return out[:, c0 - b0 * bs:c1 - b0 * bs]

    def _bytes(self, offset: int, length: int) -> tuple[np.ndarray, mmap.mmap | None]:
        """``length`` bytes at ``offset`` as a uint8 array (a map of just that range)."""
        if length == 0:
            return np.zeros(0, np.uint8), None
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._open_fd(), offset - base + length, access=mmap.ACCESS_READ, offset=base)
        except (OSError, ValueError, OverflowError):
            buf = np.empty(length, np.uint8)        # a filesystem without mmap: read instead
            pread_into(self._open_fd(), memoryview(buf), offset, self.path)
            return buf, None
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        return np.frombuffer(mm, np.uint8, count=length, offset=offset - base), mm


def _decode_into(out: np.ndarray, raw: np.ndarray, lay: _Layout, b0: int, b1: int) -> None:
    """Decode blocks [b0, b1) of every row of ``raw`` (rows x row bytes) into ``out``,
    at most DECODE_ELEMENTS per call so the dequantizer's temporaries stay small."""
    bs, ts = lay.block, lay.tsize
    grid = raw[:, b0 * ts:b1 * ts]
    if lay.kernel is not None:                      # numba: no temporaries, one call
        lay.kernel(grid, out)
        return
    with np.errstate(all="ignore"):           # NaN/Inf in a file are data (counted later), not warnings
        _decode_chunks(out, grid, lay, b0, b1)


def _decode_chunks(out: np.ndarray, grid: np.ndarray, lay: _Layout, b0: int, b1: int) -> None:
    bs, ts = lay.block, lay.tsize
    width = (b1 - b0) * bs
    if width >= DECODE_ELEMENTS:                    # long rows: a run of blocks at a time
        step = max(1, DECODE_ELEMENTS // bs)
        for r in range(grid.shape[0]):
            for k in range(0, b1 - b0, step):
                chunk = np.ascontiguousarray(grid[r:r + 1, k * ts:(k + step) * ts])
                out[r:r + 1, k * bs:(k + step) * bs] = lay.decode(chunk)
    else:
        step = max(1, DECODE_ELEMENTS // max(width, 1))
        for r in range(0, grid.shape[0], step):
            out[r:r + step] = lay.decode(np.ascontiguousarray(grid[r:r + step]))


def _unpermute(r: np.ndarray, head_dim: int) -> np.ndarray:
    """GGUF row of each Hugging Face row of a Q/K projection.

    llama.cpp's ``LlamaModel.permute`` reshapes the rows of each head as (2, head_dim/2)
    and swaps the two axes, so HF row (h, j, k) = h*head_dim + j*head_dim/2 + k is stored
    at GGUF row h*head_dim + 2k + j.

    >>> _unpermute(np.arange(8), 4).tolist()
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    half = head_dim // 2
    h, i = np.divmod(r, head_dim)
    j, k = np.divmod(i, half)
    return h * head_dim + 2 * k + j


def notes(metadata: dict, arch: str, counts: dict, skipped: list[str]) -> None:
    """The ``gguf.*`` notes of a GGUF's metadata: how its names were mapped, the transforms undone
    (``counts``: permute, transpose, minus_one, experts), the tensors skipped as generated."""
    metadata["gguf.names"] = (f"llama.cpp names mapped to Hugging Face names ({arch})"
                              if arch in ARCHITECTURES else
                              f"llama.cpp names kept: no name map for architecture `{escape_name(arch)}`")
    if arch not in ARCHITECTURES:
        # the judge reads this key: a converter weightdiff does not know may have permuted or shifted
        # values (llama's Q/K rows, Gemma's 1 + w) under names it keeps, so what differs is not a change
        metadata["gguf.unmapped_architecture"] = arch
    done = [f"{n} {w}" for n, w in ((counts["permute"], "Q/K row permutations undone"),
                                    (counts["transpose"], "Conv1D transposes undone"),
                                    (counts["minus_one"], "norm weights stored as 1 + w restored"),
                                    (counts["experts"], "stacked expert tensors split into the experts' matrices"))
            if n]
    if done:
        metadata["gguf.transforms"] = ", ".join(done)
    if skipped:
        metadata["gguf.skipped"] = ", ".join(skipped) + " (generated from config.json, not weights)"
