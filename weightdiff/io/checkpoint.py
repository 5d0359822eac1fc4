"""Checkpoint locator: a path -> the files, tensors and (for PEFT adapters) LoRA factors.

A path may be one ``.safetensors`` file; a folder with ``model.safetensors``; a sharded
folder with ``*.safetensors.index.json`` (every shard must exist, hold exactly the
tensors the index names for it, and no tensor may sit in two shards; a stray shard of
the same series is an error, other ``.safetensors`` files are listed in ``ignored``);
a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``); a
llama.cpp GGUF file (recognised by its magic, whatever its name), or a folder holding
exactly one ``.gguf``, read through ``weightdiff.io.gguf_read`` (the ``gguf`` extra); a
sentence-transformers folder (``modules.json``: every module with weights, weightdiff.io.st_modules); a
Hugging Face cache folder (``models--org--name`` or one of its ``snapshots/<rev>``,
whose symlinks are followed); or a legacy ``pytorch_model*.bin`` / ``.pt`` pickle, read
only through torch's restricted unpickler. Locating reads headers, never tensor data.

>>> with locate("tuned/") as ckpt:                               # doctest: +SKIP
...     ckpt.format, ckpt.params, [f.target for f in ckpt.lora][:1]
('adapter', 1703936, ['model.layers.0.self_attn.q_proj.weight'])
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from ..errors import CheckpointError, escape_name
from .files import inside as _inside, load_json, open_regular, os_problem, pread_into, read_small
from .experts import count_note, fused_origin, split_infos, split_note, switch_origin
from . import meta_layout
from .located import Checkpoint
from .peft_adapter import JSON_CAP, AdapterConfig, LoraFactor, parse_adapter_config
from .pickle_read import PICKLE_SUFFIXES, load_pickle
from .quantized import fold, read_quant_config
from .safetensors_read import SafetensorsFile, TensorInfo

__all__ = ["AdapterConfig", "LoraFactor", "Checkpoint", "locate", "JSON_CAP", "LocalFolder", "choose_weights", "build",
           "file_kind", "AmbiguousWeights", "is_hub_candidate"]

#: trainer state saved beside the weights, never a model
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


# -- locating ------------------------------------------------------------------

def locate(path: str | os.PathLike, hub: object = None) -> Checkpoint:
    """Find and validate the checkpoint at ``path`` (headers only, plus the few bytes of a
    quantized checkpoint's shape and quant-state tensors). Raises CheckpointError.

    A path that does not exist but is spelled as a Hugging Face Hub repo id (``org/name``,
    ``org/name@revision``, ``hf://org/name@revision/subfolder``) is resolved on the Hub by
    weightdiff.io.hub (the ``hub`` extra); ``hub`` is its HubOptions (download or stream,
    offline). A local path always wins over a repo id of the same spelling.
    """
    if is_hub_candidate(path):
        from .hub import locate_hub

        ckpt = locate_hub(path, hub)
    else:
        ckpt = _locate(Path(os.fspath(path)), path)
        try:
            _configs_inside(ckpt)
        except BaseException:
            ckpt.close()
            raise
    if ckpt.format in ("safetensors", "sharded", "pickle"):
        try:
            meta_layout.apply(ckpt)
        except BaseException:
            ckpt.close()
            raise
    if ckpt.format in ("safetensors", "sharded", "pickle"):
        unwrap_names(ckpt)
    if ckpt.format in ("safetensors", "sharded"):
        try:
            _fold_quantized(ckpt)
        except BaseException:
            ckpt.close()
            raise
    return ckpt


#: a segment a training wrapper puts inside the names of a raw state dict, around each module it wraps (not only
#: in front, where prefix alignment finds a wrapper): torch.distributed's activation checkpointing and FSDP's
_WRAPPER_SEGMENT = re.compile(r"(?<![^.])(?:_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


#: PEFT's ``modules_to_save`` in a wrapped model's whole state dict: the trained copy the model runs,
#: ``m.modules_to_save.<adapter>.weight``, beside the frozen original, ``m.original_module.weight``
_PEFT_SAVED = re.compile(r"(?<![^.])modules_to_save\.[^.]+\.")
_PEFT_ORIGINAL = re.compile(r"(?<![^.])original_module\.")


def unwrap_names(ckpt: Checkpoint) -> None:
    """Report the tensors of a state dict saved through a training wrapper under the module's own names, read by
    their stored names (``file_names``): ``model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`` as
    ``model.layers.0.mlp.up_proj.weight`` (they paired by content at best, and the norm weights, alike, not at
    all: counted as added, and the base's as removed), and a PEFT-wrapped model's ``modules_to_save`` copy,
    ``lm_head.modules_to_save.default.weight``, as ``lm_head.weight``, the frozen ``lm_head.original_module.weight``
    beside it left out (the model runs the copy; with neither named ``lm_head.weight``, a head stored twice read
    "none is stored: loaded with transformers, that head is random"). Nothing changes when two names would
    become one, or one another stored name."""
    names = ckpt.tensors
    wrapped = any("_wrapped_module." in n for n in names)
    saved = any(".modules_to_save." in n or n.startswith("modules_to_save.") for n in names)
    if not wrapped and not saved:
        return
    found, originals = {}, []
    for n in names:
        new = _WRAPPER_SEGMENT.sub("", n) if "_wrapped_module." in n else n
        if saved and "modules_to_save." in new:
            new = _PEFT_SAVED.sub("", new, count=1)
        elif saved and "original_module." in new and _PEFT_ORIGINAL.search(new):
            originals.append(n)
            continue
        if new != n:
            found[n] = new
    plain = list(found.values())
    if not plain or len(set(plain)) != len(plain) or any(not k or (k in names and k not in found) for k in plain):
        return
    kept = set(plain)
    dropped = [n for n in originals if _PEFT_ORIGINAL.sub("", _WRAPPER_SEGMENT.sub("", n), count=1) in kept]
    if len(dropped) != len(originals):        # an original with no trained copy beside it: not PEFT's pair
        return
    from dataclasses import replace

    file_names = dict(ckpt.file_names)
    out = {}
    gone = set(dropped)
    for name, info in ckpt.tensors.items():
        if name in gone:
            continue
        new = found.get(name)
        if new is not None:
            file_names[new] = file_names.get(name, name)
            info = replace(info, name=new)
            name = new
        out[name] = info
    ckpt.tensors = ckpt.stored = out
    ckpt.file_names = file_names
    shown = escape_name(str(ckpt.path))
    n_wrapped = sum(1 for n in found if "_wrapped_module." in n)
    if n_wrapped:
        ckpt.notes.append(f"{shown}: {n_wrapped:,} tensor names hold a training wrapper's segments "
                          "(`_checkpoint_wrapped_module.`, `_fsdp_wrapped_module.`), read under the names without them")
    if dropped:
        ckpt.notes.append(f"{shown}: PEFT's modules_to_save: {len(dropped):,} trained "
                          f"{'copy' if len(dropped) == 1 else 'copies'} (`modules_to_save.<adapter>.`) read as the "
                          "model's own, the frozen `original_module.` beside each left out")


def is_hub_candidate(path: object) -> bool:
    """True when ``path`` is spelled ``hf://...`` (a URI is never a local path, though the filesystem reads
    ``hf://org/x`` as the folder ``hf:/org/x``), or names nothing local and is spelled as a Hub repo id."""
    if isinstance(path, str) and path.startswith("hf://"):
        return True
    if not isinstance(path, str) or os.path.lexists(path):
        return False
    from .hub import hub_spelling

    return hub_spelling(path)


#: files beside the weights that decide how a model is read (head tie, quantization, declared base)
CONFIG_FILES = ("config.json", "quantize_config.json", "params.json", "recipe.yaml", "hf_quant_config.json")


def _configs_inside(ckpt: Checkpoint) -> None:
    """CheckpointError when a config file beside a local checkpoint's weights is a symlink that resolves
    out of its folder: another model's config would change how this one is read. Refused whether or
    not this comparison reads it, so the same folder is accepted or refused the same way every time."""
    root = ckpt.config_dir or ckpt.root
    if root is None or ckpt.read_config is not None:
        return
    for name in CONFIG_FILES:
        if os.path.islink(Path(root, name)):
            _inside(Path(root, name), Path(root), "copy it into the folder if it belongs to this model")


def _fold_quantized(ckpt: Checkpoint) -> None:
    """Fold quantized weights and their companions into logical tensors (weightdiff.io.quantized)."""
    try:
        qc, qc_error = read_quant_config(ckpt.config_dir or ckpt.root, ckpt.read_config), None
    except CheckpointError as exc:         # a broken config.json matters only to a quantized model
        qc, qc_error = None, exc
    tensors, sources, hidden = fold(ckpt.tensors, qc, ckpt._stored_read)
    if sources and qc_error is not None:
        raise qc_error
    if sources or hidden:
        ckpt.tensors, ckpt.quant, ckpt.hidden = tensors, sources, hidden
    ckpt.quant_config = qc if sources else None


def _locate(p: Path, path: str | os.PathLike) -> Checkpoint:
    if "\0" in str(p):     # os.stat raises ValueError ("embedded null byte"), which read as a bug
        raise CheckpointError(escape_name(str(p)), "the path holds a NUL byte, which no file name can")
    try:
        st = p.stat()
    except OSError as exc:
        raise CheckpointError(p, os_problem(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        ckpt = _locate_dir(p)
    elif p.name.lower().endswith(".onnx"):
        ckpt = _onnx(p, p, p.parent)
    elif _sniff(p) == "gguf" or p.name.lower().endswith(".gguf"):
        ckpt = _gguf(p, p, p.parent, LocalFolder(p.parent, named=p.name))   # without the magic: refused by name
    elif p.name.endswith(".bin.index.json"):
        ckpt = _pickle_sharded(p.parent, p)
    elif p.name.endswith(".index.json"):
        ckpt = _sharded(LocalFolder(p.parent, named=p.name), p.name, p)
    elif p.name.endswith(PICKLE_SUFFIXES + (".ckpt",)):
        # ``.ckpt`` (PyTorch Lightning's, Stable Diffusion's): a torch.save file when named on its own (a folder's
        # listing does not take it for the model's weights); it read as a safetensors file with a huge header
        ckpt = _pickles(p, [p], p.parent)
    else:
        ckpt = _single(LocalFolder(p.parent, named=p.name), p.name, p)
    if isinstance(path, str):
        from .hub import hub_spelling

        if hub_spelling(path):
            ckpt.origin = (f"{escape_name(path)}: the local {'folder' if stat.S_ISDIR(st.st_mode) else 'file'}, "
                           "not the Hub repo of the same spelling (a local path always wins)")
    return ckpt


def _listdir(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError as exc:
        raise CheckpointError(d, f"cannot list: {os_problem(exc)}") from None


class LocalFolder:
    """A folder on disk as the locator reads it. Its twin for a Hub repo read over HTTP is
    weightdiff.io.hub's ``HubFolder``: the same verbs, so both go through the same rules.
    ``file()`` refuses a symlink that leads out of the folder, except for ``named``: the file
    the user named directly, whose folder is only where it lives."""

    def __init__(self, root: Path, named: str | None = None):
        self.root, self.named = root, named

    def names(self) -> list[str]:
        return _listdir(self.root)

    def file(self, name: str) -> Path:
        return self.root / name if name == self.named else _inside(self.root / name, self.root)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.root / name)

    def read_json(self, name: str, what: str) -> object:
        path = self.file(name)
        return load_json(read_small(path, JSON_CAP), path, what)

    def headers(self, names: Sequence[str]) -> dict[str, tuple[dict[str, TensorInfo], dict[str, str]]]:
        return {n: _header(self.file(n)) for n in names}


def choose_weights(names: Sequence[str], where: object,
                   listdir: Callable[[str], Sequence[str]] | None = None) -> tuple[str, str | None]:
    """Which file of a folder listing holds the model: ``(kind, name)``.

    Kinds: ``adapter`` (name: the adapter's weights file, None when missing), ``sharded``
    (name: the safetensors index), ``single``, ``pickle_sharded`` (the .bin index),
    ``pickle``, ``gguf`` and ``onnx``. The same rules serve a local folder and a Hub repo's file list
    (a new format adds its rule here). ``listdir(sub)``: the names in a subfolder, for the one rule that
    looks below the folder (``onnx_in_subfolder``; ``name`` is then ``onnx/model.onnx``). Raises
    CheckpointError naming ``where`` (``AmbiguousWeights`` when several files could be the model).

    >>> choose_weights(["config.json", "model-00001-of-00002.safetensors",
    ...                 "model-00002-of-00002.safetensors", "model.safetensors.index.json"], "x")
    ('sharded', 'model.safetensors.index.json')
    """
    names = sorted(names)
    if "adapter_config.json" in names:
        return "adapter", next((n for n in ("adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors")
                                if n in names), None)
    lone = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if n in names]
    if lone:
        raise CheckpointError(where, f"{lone[0]} is here but adapter_config.json is missing, so the adapter's "
                                     "scale and targets are unknown", "add the adapter's adapter_config.json")
    st = [n for n in names if n.endswith(".safetensors")]
    st_index = [n for n in names if n.endswith(".safetensors.index.json")]
    if "model.safetensors.index.json" in st_index:
        st_index = ["model.safetensors.index.json"]
    if len(st_index) == 1:
        return "sharded", st_index[0]
    if len(st_index) > 1:
        raise CheckpointError(where, f"several index files and none named model.safetensors.index.json: "
                                     f"{', '.join(st_index)}", "pass the index file to use")
    if sorted(st) == ["consolidated.safetensors", "model.safetensors"]:
        # Mistral's layout of a model that fits one file: the Hugging Face file wins, as the index's files do
        # beside the consolidated one (the same weights under Mistral's names; listed by inspect as ignored)
        return "single", "model.safetensors"
    if st:
        return "single", _the_one(where, st, ".safetensors files and no index",
                                  "pass one file, or add model.safetensors.index.json")
    pk_index = [n for n in names if n.endswith(".bin.index.json")]
    if len(pk_index) == 1:
        return "pickle_sharded", pk_index[0]
    pk = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in _NOT_WEIGHTS]
    if any(n.lower().endswith(".onnx") for n in names):
        # a .bin beside an ONNX model is most often its external data (any name is legal: weights.bin)
        pk = [n for n in pk if not n.endswith(".bin") or n.startswith("pytorch_model")]
    if "pytorch_model.bin" in pk:
        pk = ["pytorch_model.bin"]
    if pk:
        return "pickle", _the_one(where, pk, "pickle files and no index", "pass one file")
    gg = [n for n in names if n.lower().endswith(".gguf")]
    if gg:                             # the parts of a split GGUF are one model, named by its first part
        from .gguf_header import gguf_choices

        return "gguf", _the_one(where, gguf_choices(gg), ".gguf files", "pass one file")
    ox = [n for n in names if n.lower().endswith(".onnx")]
    if ox:
        return "onnx", _the_one(where, ox, ".onnx files", "pass one file")
    sub = onnx_in_subfolder(listdir("onnx"), where) if listdir is not None and "onnx" in names else None
    if sub is not None:
        return "onnx", sub
    found = f"found {', '.join(escape_name(n) for n in names[:6])}" + (", ..." if len(names) > 6 else "") \
        if names else "the folder is empty"
    raise CheckpointError(where, f"no checkpoint here: expected model.safetensors, "
                                 f"model.safetensors.index.json, a .gguf or a .onnx file ({found})")


class AmbiguousWeights(CheckpointError):
    """A folder with several candidate weight files: ``candidates`` lists them (names relative to the
    folder), so a caller can say how to name one in its own spelling (a Hub repo: ``hf://org/name/file``)."""

    def __init__(self, where: object, problem: str, hint: str, candidates: Sequence[str]):
        super().__init__(where, problem, hint)
        self.problem, self.candidates = problem, list(candidates)


def _the_one(where: object, candidates: list[str], what: str, hint: str) -> str:
    """The only candidate weight file, or bad input listing them all (which one is the model is ambiguous)."""
    if len(candidates) == 1:
        return candidates[0]
    raise AmbiguousWeights(where, f"{len(candidates)} {what}, so which is the model is ambiguous: "
                                  f"{', '.join(escape_name(n) for n in candidates)}", hint, candidates)


def file_kind(name: str) -> str | None:
    """The kind of a weights file named directly, from its name alone (a Hub path, where nothing can be
    sniffed before it is fetched; a local file also goes by its first bytes): None for a name that is no
    weights file."""
    low = name.lower()
    if low.endswith(".onnx"):
        return "onnx"
    if low.endswith(".gguf"):
        return "gguf"
    if name.endswith(".bin.index.json"):
        return "pickle_sharded"
    if name.endswith(".safetensors.index.json"):
        return "sharded"
    if name.endswith(PICKLE_SUFFIXES) and name.rsplit("/", 1)[-1] not in _NOT_WEIGHTS:
        return "pickle"
    if name.endswith(".safetensors"):
        return "single"
    return None


def onnx_in_subfolder(found: Sequence[str], where: object) -> str | None:
    """The rule for an ``onnx/`` subfolder (its file names ``found``) of a folder with no weights of its
    own, as transformers.js repos and sentence-transformers' ONNX backend keep them: ``onnx/model.onnx``,
    the file those load (beside optimized and quantized variants, ``model_quantized.onnx``,
    ``model_O1.onnx``: name another file to compare it). None when the subfolder holds no .onnx."""
    found = sorted(n for n in found if n.lower().endswith(".onnx"))
    if "model.onnx" in found:
        return "onnx/model.onnx"
    if found:
        raise AmbiguousWeights(where, f"holds no weights of its own and its onnx/ folder holds "
                                      f"{', '.join(escape_name(n) for n in found[:6])} but no model.onnx, which "
                                      "sentence-transformers' ONNX backend and transformers.js load",
                               "pass the .onnx file to compare", [f"onnx/{n}" for n in found])
    return None


def build(folder, kind: str, name: str | None, shown: object) -> Checkpoint:
    """The Checkpoint of ``choose_weights``' answer, read through ``folder`` (headers only)."""
    if kind == "adapter":
        return _adapter(folder, name, shown)
    if kind == "sharded":
        return _sharded(folder, name, shown)
    if kind == "single":
        return _single(folder, name, shown)
    if kind == "pickle_sharded":
        return _pickle_sharded(folder.root, folder.file(name))
    if kind == "gguf":                 # through file(): a symlink out of the folder is refused, as for every kind
        return _gguf(folder.file(name), shown, folder.root, folder)
    if kind == "onnx":
        return _onnx(folder.file(name), shown, folder.root)
    return _pickles(shown, [folder.file(name)], folder.root)


def _locate_dir(d: Path) -> Checkpoint:
    names = _listdir(d)
    if "adapter_config.json" not in names and "snapshots" in names and (d / "snapshots").is_dir():
        snap = _snapshot(d)
        _cache_inside(snap, d)
        return _locate_dir(snap)
    if "modules.json" in names:
        from .st_modules import locate_modules

        return locate_modules(d, names)
    kind, name = choose_weights(names, d, lambda sub: onnx_subfolder_names(d / sub))
    ckpt = build(LocalFolder(d), kind, name, d)
    if kind == "onnx" and "/" in name:
        ckpt.notes.append(f"{escape_name(str(d))}: no weights beside its config; {name} is read (the file "
                          "transformers.js and sentence-transformers' ONNX backend load)")
    return ckpt


def onnx_subfolder_names(sub: Path) -> list[str]:
    """The names in a local ``onnx/`` subfolder (none when it is not a folder); CheckpointError when
    it is a symlink that leads out of its checkpoint folder."""
    if not sub.is_dir():
        return []
    _inside(sub, sub.parent, "copy the ONNX model into the folder if it belongs to this model")
    return _listdir(sub)


def onnx_subfolder(folder: Path) -> str | None:
    """``onnx_in_subfolder`` for a local folder: ``onnx/model.onnx`` or None (raises when ambiguous)."""
    return onnx_in_subfolder(onnx_subfolder_names(folder / "onnx"), folder)


def _cache_inside(path: Path, repo: Path) -> None:
    """CheckpointError unless ``path`` (a snapshot folder or refs file of the Hugging Face cache
    repo folder ``repo``) resolves inside that repo: a ``snapshots/<rev>``, ``snapshots/`` or
    ``refs/main`` symlinked elsewhere would make the repo read files that are not its own."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(repo))
    if not real.is_relative_to(top):
        raise CheckpointError(path, f"resolves to {escape_name(str(real))}, outside the Hugging Face cache folder "
                                    f"{escape_name(str(repo))}; refusing to follow the symlink",
                              "pass that folder directly if it is the one you mean")


def _snapshot(d: Path) -> Path:
    """The revision folder of a Hugging Face cache repo: refs/main, else the only snapshot."""
    _cache_inside(d / "snapshots", d)
    snaps = _listdir(d / "snapshots")
    ref = d / "refs" / "main"
    if ref.is_file():
        _cache_inside(ref, d)
        rev = read_small(ref, 4096).decode("utf-8", "replace").strip()
        if rev in snaps:
            return d / "snapshots" / rev
    if len(snaps) == 1:
        return d / "snapshots" / snaps[0]
    raise CheckpointError(d, f"Hugging Face cache folder with {len(snaps)} snapshots and no usable "
                             "refs/main", "pass snapshots/<revision>/")


#: magics of llama.cpp's pre-GGUF formats (GGML, GGMF, GGJT), as stored on disk
_LEGACY_GGML = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}


def _sniff(path: Path) -> str | None:
    """"gguf" when the file starts with the GGUF magic; legacy GGML files are refused here."""
    try:
        fd, st = open_regular(path)
    except CheckpointError:
        return None                      # the reader that follows reports the problem
    try:
        head = bytearray(min(4, st.st_size))
        pread_into(fd, memoryview(head), 0, path)
    finally:
        os.close(fd)
    if bytes(head) == b"GGUF":
        return "gguf"
    if bytes(head) in _LEGACY_GGML:
        raise CheckpointError(path, f"is a legacy llama.cpp {_LEGACY_GGML[bytes(head)]} file, which weightdiff "
                                    "does not read", "convert it to GGUF with llama.cpp first")
    return None


def _gguf(file: Path, shown: Path, root: Path, folder: "LocalFolder") -> Checkpoint:
    from .gguf_read import GGUFFile, SplitPart

    try:
        with GGUFFile(file) as f:
            tensors, metadata, lora, rope = f.tensors, f.metadata, f.lora, f.rope_heads
    except SplitPart as part:
        return _gguf_split(part, Path(file), shown, root, folder)
    if lora is not None:
        from .gguf_adapter import adapter_checkpoint

        return adapter_checkpoint(lora, shown, file, tensors, metadata, root)
    ckpt = Checkpoint(shown, "gguf", [file], tensors, dict(metadata), root, opener=GGUFFile)
    ckpt._headers[file] = tensors
    ckpt.rope_heads = rope
    return ckpt


def _gguf_split(first, file: Path, shown: Path, root: Path, folder: "LocalFolder") -> Checkpoint:
    """A GGUF split into parts (llama-gguf-split), whichever part was named: one checkpoint of every part's
    tensors, with the first part's metadata (the model's), each part read by its own GGUFFile."""
    from functools import partial

    from .gguf_read import GGUFFile, notes, read_series

    sub = file.parent.relative_to(folder.root)     # the parts are beside the one named, read by the folder's rules
    parts, series = read_series(first, file, lambda name: folder.file((sub / name).as_posix()))
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, int] = {}
    per_part, counts, skipped = [], {"permute": 0, "transpose": 0, "minus_one": 0, "experts": 0}, []
    metadata: dict = {}
    rope: dict[str, int] = {}
    for i, part in enumerate(parts):
        with GGUFFile(part, series) as f:
            for name, info in f.tensors.items():
                if name in tensors:
                    raise CheckpointError(part, f"tensor `{escape_name(name)}` of part {i + 1} and one of part "
                                                f"{where[name] + 1} of its split GGUF map to the same name")
                tensors[name], where[name] = info, i
            per_part.append(f.tensors)
            rope.update(f.rope_heads)
            if i == 0:
                metadata = dict(f.metadata)
            for k, v in f.counts.items():
                counts[k] += v
            skipped += f.skipped
    if not tensors:
        raise CheckpointError(file, f"is part of a GGUF split into {len(parts)} files that hold no tensors")
    arch = series.meta.get("general.architecture")
    for k in ("gguf.transforms", "gguf.skipped"):
        metadata.pop(k, None)
    notes(metadata, arch if isinstance(arch, str) else "", counts, skipped)
    metadata["gguf.split"] = f"{len(parts)} parts ({escape_name(parts[0].name)} ...), read as one model"
    ckpt = Checkpoint(shown, "gguf", parts, tensors, metadata, root, opener=partial(GGUFFile, series=series))
    for part, t in zip(parts, per_part):
        ckpt._headers[part] = t
    ckpt.rope_heads = rope
    return ckpt


def _onnx(file: Path, shown: object, root: Path) -> Checkpoint:
    from .onnx_read import locate_onnx

    return locate_onnx(file, shown, root)


def _header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return f.tensors, f.metadata


def _single(folder, name: str, shown: object) -> Checkpoint:
    file = folder.file(name)
    if not name.endswith(".safetensors") and name.endswith(".json"):
        raise CheckpointError(file, "is JSON, not a checkpoint", "pass the folder that holds it")
    tensors, metadata = folder.headers([name])[name]
    metadata = dict(metadata)
    note = split_note(tensors)
    if note:
        metadata["weightdiff.experts"] = note
    ignored = []
    if name == "model.safetensors":
        try:
            beside = folder.names()
        except (OSError, AttributeError):
            beside = []
        ignored = [folder.file("consolidated.safetensors")] if "consolidated.safetensors" in beside else []
    ckpt = Checkpoint(shown, "safetensors", [file], tensors, metadata, folder.root, ignored=ignored)
    ckpt._headers[file] = tensors
    return ckpt


def _shard_name(index: Path, value: object, tensor: str) -> str:
    if not isinstance(value, str) or not value:
        raise CheckpointError(index, f"weight_map entry for `{escape_name(tensor)}` is not a file name")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value or "\0" in value or value.startswith("~"):
        raise CheckpointError(index, f"weight_map sends `{escape_name(tensor)}` to `{escape_name(value)}`, "
                                     "outside the checkpoint folder", "shard names must be plain relative names")
    return value


def _read_index(folder, name: str) -> tuple[dict[str, str], dict]:
    index = folder.file(name)
    doc = folder.read_json(name, "index")
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CheckpointError(index, "index has no weight_map object")
    wmap = {t: _shard_name(index, s, t) for t, s in doc["weight_map"].items()}
    if not wmap:
        raise CheckpointError(index, "index weight_map is empty")
    meta = doc.get("metadata") or {}
    return wmap, meta if isinstance(meta, dict) else {}


def _series(index: Path, shard_names: set[str], names: list[str], suffix: str) -> list[str]:
    """Files of the index's shard series (``prefix-0000k-of-0000n``) that the index does not list."""
    if not index.name.endswith(suffix + ".index.json"):
        return []
    prefix = index.name[: -len(suffix + ".index.json")]
    pat = re.compile(rf"^{re.escape(prefix)}-\d+-of-\d+{re.escape(suffix)}$")
    return [n for n in names if pat.match(n) and n not in shard_names]


def _sharded(folder, index_name: str, shown: object) -> Checkpoint:
    index = folder.file(index_name)
    wmap, meta = _read_index(folder, index_name)
    shards = list(dict.fromkeys(wmap.values()))
    names = folder.names()
    stray = _series(index, set(shards), names, ".safetensors")
    if stray:
        raise CheckpointError(index, f"shard {escape_name(stray[0])} is in the folder but not in the index "
                                     "(incomplete index or stray file?)")
    for shard in shards:
        if not folder.exists(shard):
            raise CheckpointError(index, f"shard {escape_name(shard)} is listed but missing (incomplete download?)")
    parsed = folder.headers(shards)
    tensors: dict[str, TensorInfo] = {}
    headers: dict[Path, dict[str, TensorInfo]] = {}
    metadata: dict = {}
    owner: dict[str, str] = {}
    unlisted: list[tuple[str, str]] = []
    cut: dict[str, list[str]] = {}           # fused experts tensor (as the index lists it) -> its experts' names
    for shard in shards:
        path = folder.file(shard)
        infos, md = parsed[shard]
        for k, v in md.items():
            metadata.setdefault(k, v)
        headers[path] = infos
        for name in infos:
            key = name
            if name not in wmap:
                origin = fused_origin(name) or switch_origin(name)
                if origin is not None and origin in wmap and origin not in infos:
                    key = origin              # split by the reader (weightdiff.io.experts)
                    cut.setdefault(origin, []).append(name)
                    if owner.get(origin, shard) == shard and wmap[origin] == shard:
                        owner[origin] = shard
                        continue
            if key in owner:
                raise CheckpointError(path, f"tensor `{escape_name(key)}` is stored in both "
                                            f"{escape_name(owner[key])} and {escape_name(shard)}")
            owner[key] = shard
            if key not in wmap:
                unlisted.append((name, shard))
            elif wmap[key] != shard:
                raise CheckpointError(path, f"holds tensor `{escape_name(key)}` that the index places in "
                                            f"{escape_name(wmap[key])}")
    for name, shard in wmap.items():
        if owner.get(name) != shard:
            raise CheckpointError(folder.file(shard), f"tensor `{escape_name(name)}` is listed in the index for "
                                                      "this shard but the shard does not hold it")
        header = headers[folder.file(shard)]
        for part in cut.get(name, (name,)):
            tensors[part] = header[part]
    if cut:
        metadata["weightdiff.experts"] = count_note(len(cut))
    notes = []
    for name, shard in unlisted:             # transformers loads by the index; still, measure it
        tensors[name] = headers[folder.file(shard)][name]
        notes.append(f"{escape_name(str(folder.file(shard)))}: holds tensor `{escape_name(name)}` that the index "
                     "does not list; it is compared as a tensor of its own")
    metadata.update({k: str(v) for k, v in meta.items()})
    listed = {folder.file(s) for s in shards}
    ignored = [folder.root / n for n in names if n.endswith(".safetensors") and folder.root / n not in listed] \
        if isinstance(folder, LocalFolder) else [folder.file(n) for n in names
                                                  if n.endswith(".safetensors") and folder.file(n) not in listed]
    ckpt = Checkpoint(shown, "sharded", [folder.file(s) for s in shards], tensors, metadata, folder.root,
                      ignored=ignored)
    ckpt._headers.update(headers)
    ckpt.notes += notes
    return ckpt


def _pickles(shown: Path, files: list[Path], root: Path) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = load_pickle(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f, f"tensor `{escape_name(name)}` is stored in both "
                                         f"{tensors[name].path.name} and {f.name}")
            tensors[name] = info
    split = split_infos(list(tensors.values()), shown)      # fused experts, as every reader splits them
    cut: dict[str, tuple[str, int]] = {}
    if split is not None:
        tensors, cut = {t.name: t for t in split[0]}, split[1]
    ckpt = Checkpoint(shown, "pickle", files, tensors, {}, root)
    ckpt._expert_of = cut
    if cut:
        ckpt.metadata["weightdiff.experts"] = count_note(len({fused for fused, _ in cut.values()}))
    return ckpt


def _pickle_sharded(d: Path, index: Path) -> Checkpoint:
    wmap, _ = _read_index(LocalFolder(d), index.name)
    shards = list(dict.fromkeys(wmap.values()))
    ckpt = _pickles(d, [_inside(d / s, d) for s in shards], d)
    split = {fused: ckpt.tensors[part] for part, (fused, _) in ckpt._expert_of.items()}
    for name, shard in wmap.items():
        info = ckpt.tensors.get(name) or split.get(name)
        if info is None or info.path.name != PurePosixPath(shard).name:
            raise CheckpointError(d / shard, f"tensor `{escape_name(name)}` is listed in the index for "
                                             "this shard but the shard does not hold it")
    return ckpt


# -- PEFT adapters ---------------------------------------------------------------

def _adapter(folder, weights: str | None, shown: object) -> Checkpoint:
    config = parse_adapter_config(folder.read_json("adapter_config.json", "adapter config"),
                                  folder.file("adapter_config.json"))
    if weights in ("adapter_model.safetensors", "adapters.safetensors"):     # PEFT's, mlx-lm's
        ckpt = _single(folder, weights, shown)
    elif weights == "adapter_model.bin":
        ckpt = _pickles(shown, [folder.file(weights)], folder.root)
    else:
        raise CheckpointError(shown, "adapter folder has adapter_config.json but no adapter_model.safetensors")
    if not ckpt.tensors:
        # not "identical": an adapter that applies nothing is a broken save, not a statement about the base
        targets = ", ".join(escape_name(t) for t in config.target_modules[:4]) or "no modules"
        raise CheckpointError(ckpt.files[0], f"adapter holds no tensors (its config targets {targets}): "
                                             "there is no change to measure")
    out = Checkpoint(shown, "adapter", ckpt.files, ckpt.tensors, ckpt.metadata, folder.root, adapter=config)
    out._expert_of = ckpt._expert_of
    out.notes += ckpt.notes
    out._headers.update(ckpt._headers)
    return out
