"""sentence-transformers folders: ``modules.json`` names the modules, each in its own folder.

A SentenceTransformer saves its backbone (``path: ""``, the folder itself; ``0_Transformer/``
in older layouts) and further modules in subfolders: ``1_Pooling/`` (config only),
``2_Dense/model.safetensors`` (or ``pytorch_model.bin``), ``3_Normalize/``. Every module
whose folder holds weights is read through the ordinary readers and the modules make one
checkpoint: the first module's tensors (the backbone) keep their names, so they pair with a
plain transformers checkpoint and across both layouts; each later module's tensors carry
its folder as a prefix (``2_Dense.linear.weight``), so a Dense layer pairs with the other
side's Dense layer, or reads ``added``/``removed``.

Module paths must be plain relative names inside the folder (no ``..``, no absolute path, no
symlink that resolves out of it). A module folder with weight files that no reader takes
(``tf_model.h5``, ``model.onnx``, a nested module) is refused, never skipped.

>>> module_prefix(0, "0_Transformer"), module_prefix(2, "2_Dense"), module_prefix(1, "a/b")
('', '2_Dense.', 'a.b.')
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, escape_name
from .checkpoint import _NOT_WEIGHTS, LocalFolder, _fold_quantized, _listdir, build, choose_weights, onnx_subfolder
from .located import Checkpoint

__all__ = ["locate_modules", "module_prefix", "weight_files", "MODULE_KINDS", "refuse_remote_modules"]

#: what choose_weights may answer for a module that is combined with others
MODULE_KINDS = ("single", "sharded", "pickle", "pickle_sharded")

#: file endings that hold weights (readable or not): a module folder with one of them has weights
_WEIGHT_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt",
                   ".npz", ".npy", ".pkl", ".pickle", ".joblib", ".index.json", ".ot", ".tflite")


def module_prefix(index: int, path: str) -> str:
    """The prefix of module ``index``'s tensor names: none for the first (the backbone), else
    its folder with dots (``2_Dense.``)."""
    return "" if index == 0 else path.replace("/", ".") + "."


def weight_files(names: list[str]) -> list[str]:
    """The names of a listing that hold weights (or an adapter), readable or not."""
    return [n for n in names if n not in _NOT_WEIGHTS and (n.lower().endswith(_WEIGHT_ENDINGS)
                                                           or n == "adapter_config.json")]


def _module_path(where: Path, k: int, value: object) -> str:
    """Module ``k``'s ``path``, checked to be a plain relative name ("" for the folder itself)."""
    if not isinstance(value, str):
        raise CheckpointError(where, f"module {k} has no `path` string")
    pure = PurePosixPath(value)
    if (pure.is_absolute() or ".." in pure.parts or "\\" in value or "\0" in value or value.startswith("~")
            or (value and str(pure) != value.rstrip("/"))):
        raise CheckpointError(where, f"module {k} has path `{escape_name(value)}`, outside the checkpoint folder",
                              "module paths must be plain relative names")
    return "" if str(pure) == "." else str(pure)


def _read_modules(d: Path) -> list[tuple[str, str]]:
    return _parse_modules(LocalFolder(d).read_json("modules.json", "sentence-transformers modules"),
                          d / "modules.json")


def _parse_modules(doc: object, where: object) -> list[tuple[str, str]]:
    if not isinstance(doc, list) or not doc:
        raise CheckpointError(where, "is not a non-empty list of modules")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()             # (a list scan made 200,000 modules take minutes)
    for k, m in enumerate(doc):
        if not isinstance(m, dict):
            raise CheckpointError(where, f"module {k} is not an object")
        rel = _module_path(where, k, m.get("path"))
        if rel in seen:
            raise CheckpointError(where, f"module path `{escape_name(rel)}` is listed twice")
        seen.add(rel)
        kind = m.get("type")
        out.append((rel, kind if isinstance(kind, str) else "?"))
    return out


def _module_folder(d: Path, rel: str) -> Path | None:
    """The module's folder, refused when it resolves out of ``d``; None when it does not exist."""
    if not rel:
        return d
    folder = d / rel
    if not os.path.lexists(folder):
        return None
    real, top = Path(os.path.realpath(folder)), Path(os.path.realpath(d))
    if not real.is_relative_to(top) or real == top:
        raise CheckpointError(folder, f"resolves to {escape_name(str(real))}, outside the sentence-transformers "
                                      f"folder {escape_name(str(d))}; refusing to follow the symlink")
    if not folder.is_dir():
        raise CheckpointError(folder, "is listed in modules.json as a module folder but is not a folder")
    return folder


def _nested(folder: Path) -> str | None:
    """A subfolder of a module folder that holds weights (a nested module, which is not read)."""
    for n in _listdir(folder):
        sub = folder / n
        if not os.path.islink(sub) and sub.is_dir() and weight_files(_listdir(sub)):
            return n
    return None


def locate_modules(d: Path, names: list[str]) -> Checkpoint:
    """The checkpoint of a sentence-transformers folder ``d`` (whose listing ``names`` holds
    ``modules.json``). Raises CheckpointError."""
    mods = _read_modules(d)
    found = []              # (index, rel, type, folder, kind, weight file name)
    described = []
    for k, (rel, kind_of) in enumerate(mods):
        folder = _module_folder(d, rel)
        listing = (names if folder is d else _listdir(folder)) if folder is not None else []
        weights = weight_files(listing)
        described.append({"path": rel, "type": kind_of, "prefix": module_prefix(k, rel), "files": [],
                          "tensors": 0, "folder": folder is not None})
        onnx = onnx_subfolder(folder) if folder is not None and not weights else None
        if onnx is not None:             # sentence-transformers' ONNX backend: the module's onnx/model.onnx
            found.append((k, rel, kind_of, folder, "onnx", onnx))
            continue
        if not weights:
            continue
        if folder is not d:
            nested = _nested(folder)
            if nested is not None:
                raise CheckpointError(folder / nested, "holds weights of a nested module, which weightdiff does not "
                                                       "read", "compare the module folders one by one")
        try:
            kind, name = choose_weights(listing, folder)
        except CheckpointError as exc:
            if "no checkpoint here" not in str(exc):
                raise
            raise CheckpointError(folder, f"module {escape_name(rel or '.')} (modules.json) holds weights weightdiff "
                                          f"cannot read: {', '.join(escape_name(w) for w in weights[:4])}",
                                  "convert them to safetensors") from None
        found.append((k, rel, kind_of, folder, kind, name))
    top_weights = weight_files(names)
    if not any(rel == "" for _, rel, *_ in found) and top_weights:
        ignored_top = [d / n for n in top_weights]
    else:
        ignored_top = []
    if not found:
        raise CheckpointError(d, "sentence-transformers folder (modules.json) whose modules hold no weights "
                                 f"({', '.join(escape_name(r or '.') for r, _ in mods[:6])})")
    if len(found) == 1 and found[0][0] == 0:
        # the backbone alone: the ordinary checkpoint of its folder, names as they are
        k, rel, _, folder, kind, name = found[0]
        ckpt = build(LocalFolder(folder), kind, name, d)
        if rel:
            ckpt.config_dir, ckpt.root = folder, d
        ckpt.ignored += ignored_top
        _describe(ckpt, described, [(0, ckpt)])
        _note_ignored(ckpt, ignored_top)
        return ckpt
    parts = []
    for k, rel, kind_of, folder, kind, name in found:
        if kind not in MODULE_KINDS:
            what = {"adapter": "a PEFT adapter", "gguf": "a GGUF file", "onnx": "an ONNX model"}.get(kind, kind)
            # the hint fits the kind: "merge the adapter" was given for an ONNX backbone beside a Dense module
            hint = {"adapter": "merge the adapter (merge_and_unload) and compare the merged model, or compare the "
                               "module folders one by one",
                    "onnx": "compare the ONNX model and the other module folders one by one"
                    }.get(kind, "compare the module folders one by one")
            raise CheckpointError(folder, f"module {escape_name(rel or '.')} (modules.json) is {what}, which "
                                          "weightdiff reads only as a whole checkpoint, not beside other "
                                          "sentence-transformers modules", hint)
        sub = build(LocalFolder(folder), kind, name, folder)
        if sub.format in ("safetensors", "sharded"):
            _fold_quantized(sub)
        if sub.quant or sub.hidden:
            raise CheckpointError(folder, f"module {escape_name(rel or '.')} (modules.json) is quantized, which "
                                          "weightdiff reads only as a whole checkpoint, not beside other "
                                          "sentence-transformers modules", "compare the module folders one by one")
        parts.append((k, sub))
    tensors, file_names, files, headers, notes, ignored, owner = {}, {}, [], {}, [], list(ignored_top), {}
    for k, sub in parts:
        prefix = module_prefix(k, mods[k][0])
        for n, info in sub.tensors.items():
            shown = prefix + n
            if shown in tensors:
                raise CheckpointError(d / "modules.json", f"modules {escape_name(owner[shown] or '.')} and "
                                                          f"{escape_name(mods[k][0] or '.')} both give a tensor "
                                                          f"`{escape_name(shown)}`")
            tensors[shown], owner[shown] = info, mods[k][0]
            if shown != n:
                file_names[shown] = n
        files += [f for f in sub.files if f not in files]
        headers.update(sub._headers)
        notes += sub.notes
        ignored += sub.ignored
    ckpt = Checkpoint(d, "sentence-transformers", files, tensors, {}, d, ignored=ignored)
    ckpt._headers.update(headers)
    ckpt.file_names = file_names
    ckpt.notes += notes
    if mods[0][0] and any(k == 0 for k, _ in parts):
        ckpt.config_dir = d / mods[0][0]
    _describe(ckpt, described, parts)
    _note_ignored(ckpt, ignored_top)
    return ckpt


def _describe(ckpt: Checkpoint, described: list[dict], parts: list[tuple[int, Checkpoint]]) -> None:
    for k, sub in parts:
        described[k]["files"] = [_rel(f, ckpt.root) for f in sub.files]
        described[k]["tensors"] = len(sub.tensors)
    ckpt.modules = described


def _note_ignored(ckpt: Checkpoint, ignored_top: list[Path]) -> None:
    if ignored_top:
        ckpt.notes.append(f"{escape_name(str(ckpt.path))}: {', '.join(escape_name(p.name) for p in ignored_top)} "
                          "beside modules.json belong to no module listed there and are not compared")


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def refuse_remote_modules(names: list[str], paths: list[str], read_json, where: object) -> None:
    """CheckpointError when a Hub repo folder (direct children ``names``, every file's path
    relative to it ``paths``) is a sentence-transformers model with weights in module
    subfolders: those are read only from a local folder, so the repo is refused rather than
    compared without them. ``read_json(name)`` gives a small JSON file's content."""
    if "modules.json" not in names:
        return
    mods = _parse_modules(read_json("modules.json"), where)
    held = []
    for rel, _ in mods:
        if rel:
            inside = [p[len(rel) + 1:] for p in paths if p.startswith(rel + "/")]
            if weight_files([p for p in inside if "/" not in p]):
                held.append(rel)
    if held:
        raise CheckpointError(where, f"is a sentence-transformers model whose module folders "
                                     f"{', '.join(escape_name(h) for h in held)} hold weights, which weightdiff "
                                     "reads only from a local folder, not from the Hub",
                              "download it (hf download REPO --local-dir DIR) and compare DIR")
