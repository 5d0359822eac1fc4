"""The GGUF header (v2/v3), parsed and validated before anything it claims is allocated.

Every count and length is checked against the bytes left in the file and against caps,
metadata values are read by type (numeric arrays kept only when short, strings in arrays
walked, not kept: a long array is summarised by its length and a hash of its bytes), and
tensor entries are checked for dimension count, dimensions below 2**63 and known type.
``weightdiff.io.gguf_read`` checks the rest (block-aligned rows, aligned offsets, data
ranges inside the file, no overlap) and reads the data. Any problem is a CheckpointError
naming the file.

>>> _Cursor(b"\\x05\\0\\0\\0\\0\\0\\0\\0hello", "f.gguf").string("name")
b'hello'
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from pathlib import Path

from ..errors import CheckpointError, escape_name

__all__ = ["MAGIC", "MAX_DIMS", "MAX_TENSORS", "MAX_KV", "MAX_STRINGS", "MAX_KEY", "require_gguf",
           "is_gguf", "parse_header", "gguf_version", "SPLIT_NAME", "split_part_name", "split_of", "gguf_choices"]

MAGIC = b"GGUF"
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_TENSORS = 1 << 20             # real files hold at most tens of thousands
MAX_KV = 1 << 20
MAX_STRINGS = 1 << 22             # strings walked in metadata arrays (vocabularies and merges: up to ~10^6; each
#                                 walked in Python at ~1.5 us, so 2^24 cost ~25 s before the refusal)
MAX_KEY = 65535                   # the GGUF specification's key length limit
_MAX_DIM = (1 << 63) - 1          # llama.cpp's INT64_MAX: no dimension, nor product of dimensions, past it
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

#: how llama.cpp names the parts of a split GGUF (``llama_split_path``: ``%s-%05d-of-%05d.gguf``; gguf-py's
#: ``SHARD_NAME_FORMAT``, which convert_hf_to_gguf.py --split-max-size writes): part numbers from 1
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_name(prefix: str, no: int, count: int) -> str:
    """The file name of part ``no`` (from 1) of ``count``, as llama-gguf-split writes it.

    >>> split_part_name("Llama-2-70b.Q8_0", 2, 3)
    'Llama-2-70b.Q8_0-00002-of-00003.gguf'
    """
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def split_of(name: str) -> tuple[str, int, int] | None:
    """(prefix, part number from 1, part count) of a file named as a part of a split GGUF, else None (a
    count of 1 or a number outside 1..count is no split's name).

    >>> split_of("sub/m-Q8_0-00002-of-00003.gguf"), split_of("m.gguf"), split_of("m-00004-of-00003.gguf")
    (('sub/m-Q8_0', 2, 3), None, None)
    """
    m = SPLIT_NAME.match(name)
    if m is None:
        return None
    no, count = int(m["no"]), int(m["count"])
    return (m["prefix"], no, count) if 1 <= no <= count and count > 1 else None


def gguf_choices(names: "list[str]") -> list[str]:
    """The .gguf files of a folder listing as the models they hold: the parts of one split GGUF (named as
    llama-gguf-split names them) count once, by the name of their first part (whether or not it is there:
    reading it says which part is missing), other files each by their own name.

    >>> gguf_choices(["m-00002-of-00002.gguf", "m-00001-of-00002.gguf", "mmproj.gguf"])
    ['m-00001-of-00002.gguf', 'mmproj.gguf']
    """
    out: dict[str, None] = {}
    for n in sorted(names):
        s = split_of(n)
        out[split_part_name(s[0], 1, s[2]) if s else n] = None
    return list(out)


def require_gguf(path: str | os.PathLike | None):
    """The ``gguf`` package, or a CheckpointError naming the extra that installs it."""
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise CheckpointError(path, "is a GGUF file; reading it needs the gguf package",
                              "pip install 'weightdiff[gguf]'") from None
    return gguf


def is_gguf(prefix: bytes) -> bool:
    """True when the first bytes of a file are the GGUF magic."""
    return prefix[:4] == MAGIC


class _Cursor:
    """Bounded little-endian reads from the header bytes; every overrun is a CheckpointError."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise CheckpointError(self.path, f"{what} runs past the end of the file at byte "
                                             f"{self.pos:,} (truncated download?)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, cap: int | None = None) -> bytes:
        n = self.scalar("<Q", what)
        if cap is not None and n > cap:
            raise CheckpointError(self.path, f"{what} is {n:,} bytes long, over the {cap:,}-byte limit")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def value(self, vtype: int, key: str, depth: int = 0, walked: list | None = None):
        what = f"metadata `{escape_name(key)}`"
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what).decode("utf-8", "replace")
        if vtype != _ARRAY:
            raise CheckpointError(self.path, f"{what} has unknown value type {vtype}")
        if depth >= 3:
            raise CheckpointError(self.path, f"{what} nests arrays more than 3 deep")
        start = self.pos
        itype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            self.need(count * size, what)
            if count <= 4096:
                out = list(struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos))
                self.pos += count * size
                return out
            self.pos += count * size
            return f"[{count:,} numbers, {self.digest(start)}]" if depth == 0 else ""
        if itype not in (_STRING, _ARRAY):
            raise CheckpointError(self.path, f"{what} is an array of unknown type {itype}")
        self.need(count * (8 if itype == _STRING else 12), what)
        walked = walked if walked is not None else [0]
        walked[0] += count
        if walked[0] > MAX_STRINGS:
            raise CheckpointError(self.path, f"{what}: metadata arrays hold over {MAX_STRINGS:,} items")
        for _ in range(count):
            self.value(itype, key, depth + 1, walked)
        if depth:
            return ""
        return f"[{count:,} {'strings' if itype == _STRING else 'arrays'}, {self.digest(start)}]"

    def digest(self, start: int) -> str:
        """``hash`` and 16 hex digits of the bytes from ``start`` to the cursor (an array as stored: its type,
        count and items), hashed in 1 MB pieces: the summary a long array is kept and compared by, so two
        vocabularies of one size with tokens swapped differ (as "[N strings]" alone, they read equal)."""
        h = hashlib.blake2b(digest_size=8)
        for at in range(start, self.pos, 1 << 20):
            h.update(self.buf[at:min(at + (1 << 20), self.pos)])
        return f"hash {h.hexdigest()}"


def parse_header(buf, size: int, path: Path, gguf) -> tuple[int, int, dict, list[tuple]]:
    """(data start, alignment, metadata, [(name, ne, type, offset), ...]) from the header bytes."""
    c = _Cursor(buf, path)
    c.need(24, "the GGUF header")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version in (1,):
        raise CheckpointError(path, "GGUF version 1 is not supported", "convert with a current llama.cpp")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        endian = " (a big-endian file, which weightdiff does not read)" if swapped in (2, 3) else ""
        raise CheckpointError(path, f"unknown GGUF version {version}{endian}; weightdiff reads versions 2 and 3")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    left = size - c.pos
    if n_tensors > MAX_TENSORS or n_tensors * 24 > left:
        raise CheckpointError(path, f"header declares {n_tensors:,} tensors, more than a {size:,}-byte file "
                                    "can describe (corrupt file?)")
    if n_kv > MAX_KV or n_kv * 12 > left:
        raise CheckpointError(path, f"header declares {n_kv:,} metadata entries, more than a {size:,}-byte "
                                    "file can hold (corrupt file?)")
    meta: dict = {}
    walked = [0]
    for _ in range(n_kv):
        key = c.string("metadata key", MAX_KEY).decode("utf-8", "replace")
        if key in meta:
            raise CheckpointError(path, f"metadata key `{escape_name(key)}` appears twice")
        vtype = c.scalar("<I", f"metadata `{escape_name(key)}`")
        meta[key] = c.value(vtype, key, 0, walked)
    known = {t.value for t in gguf.GGMLQuantizationType}
    infos, names = [], set()
    for i in range(n_tensors):
        raw = c.string(f"name of tensor {i}", MAX_KEY)
        name = raw.decode("utf-8", "replace")
        q = f"`{escape_name(name)}`"
        if not name:
            raise CheckpointError(path, f"tensor {i} has an empty name")
        if i == 0 and _is_key(name, meta):
            # the first "tensor" is a metadata key: the header's metadata count stopped short of it, and
            # its value would be read as dimensions, a type and an offset (a key named as a bad tensor)
            raise CheckpointError(path, f"the header declares {n_kv:,} metadata entries, but `{escape_name(name)}`, "
                                        "a metadata key, follows them where the first tensor entry belongs "
                                        "(a metadata count too small: corrupt header?)")
        if name in names:
            raise CheckpointError(path, f"tensor {q} appears twice")
        names.add(name)
        n_dims = c.scalar("<I", f"tensor {q}")
        if n_dims > MAX_DIMS:
            raise CheckpointError(path, f"tensor {q} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        c.need(8 * n_dims + 12, f"tensor {q}")
        ne = struct.unpack_from(f"<{n_dims}Q", c.buf, c.pos)
        c.pos += 8 * n_dims
        if any(d > _MAX_DIM for d in ne) or math.prod(d for d in ne if d) > _MAX_DIM:
            # llama.cpp refuses these (gguf.cpp's INT64_MAX checks); a 0 dimension makes the tensor hold no
            # byte, so no size check bounds the others: [0, 2**63, 2**63] was accepted and broke the report
            raise CheckpointError(path, f"tensor {q} has shape {list(ne)}: its dimensions, or the product of its "
                                        "non-zero dimensions, reach 2**63 (no array has one; the largest is "
                                        "2**63 - 1; corrupt header?)")
        qtype = c.scalar("<I", f"tensor {q}")
        offset = c.scalar("<Q", f"tensor {q}")
        if qtype not in known or qtype not in gguf.GGML_QUANT_SIZES:
            top = max(t.value for t in gguf.GGMLQuantizationType)
            raise CheckpointError(path, f"tensor {q} has unknown type {qtype} (gguf {gguf_version(gguf)} knows "
                                        f"types 0 to {top}, with gaps)",
                                  "a type newer than the installed gguf: upgrade gguf" if qtype > top else None)
        infos.append((name, tuple(int(d) for d in ne), qtype, offset))
    align = meta.get("general.alignment", 32)
    # any power of two (llama.cpp's rule; a large one only pads the data start, checked against the size below)
    if type(align) is not int or align < 1 or align & (align - 1):
        raise CheckpointError(path, f"general.alignment is {align!r}, expected a power of two")
    data = -(-c.pos // align) * align
    split = meta.get("split.count")
    if not infos and type(split) is int and split > 1:
        # a part of a split GGUF with no tensors of its own: the first part as llama-gguf-split
        # --no-tensor-first-split writes it (the model's metadata only); its data section may be absent
        return min(data, size), align, meta, infos
    if not infos:
        # a vocab-only GGUF (convert_hf_to_gguf.py --vocab-only, llama.cpp's models/ggml-vocab-*.gguf):
        # the writer pads no data section after the header, so the offset check below would call it
        # truncated; there are no weights to compare
        raise CheckpointError(path, "holds no tensors (a vocab-only GGUF: tokenizer metadata, no weights)",
                              "compare the GGUF that holds the model's weights")
    if data > size:
        raise CheckpointError(path, "the tensor data section starts past the end of the file (truncated download?)")
    if any(c.buf[c.pos:data]):
        # writers pad the header to the alignment with zeros; anything else there is a tensor info or
        # metadata the counts left out, and every tensor would be read from shifted bytes
        raise CheckpointError(path, f"the {data - c.pos} bytes between the header and the tensor data are not zero "
                                    "padding (a tensor or metadata count that does not match the header?)")
    return data, align, meta, infos


#: prefixes of GGUF metadata keys (gguf-py's Keys): a tensor entry named so is a misread metadata entry
_KEY_PREFIXES = ("general.", "tokenizer.", "split.", "quantize.", "adapter.", "clip.")


def _is_key(name: str, meta: dict) -> bool:
    """Whether ``name``, read where a tensor entry belongs, is a metadata key: one of gguf-py's key
    families, or a key of the file's own architecture (``llama.embedding_length``), and not named as
    llama.cpp names tensors (``.weight``, ``.bias``)."""
    if name.endswith((".weight", ".bias")):      # tensors are named so; no metadata key is
        return False
    arch = meta.get("general.architecture")
    return name.startswith(_KEY_PREFIXES) or (isinstance(arch, str) and bool(arch) and name.startswith(arch + "."))


def gguf_version(gguf) -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return getattr(gguf, "__version__", "?")
