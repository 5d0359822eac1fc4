"""``weightdiff inspect``: what a checkpoint holds, from its headers alone.

Format, files and shards, tensor count, parameters by dtype and by block, metadata and,
for a PEFT adapter, its LoRA, AdaLoRA or IA3 settings; for a quantized checkpoint, the format and scheme of
each quantized tensor (weightdiff.io.quantized), whose parameters are its logical elements. ``describe()`` returns a JSON-ready dict
(schema ``weightdiff.inspect/1``); ``render_text()`` turns it into the terminal view.
No tensor data is read (beyond the few bytes of a quantized model's shape tensors). Blocks are labelled by ``weightdiff.pairing.names.parse_name``, the
parser ``compare`` uses, so the labels agree between the two commands.

>>> block_of("model.layers.12.self_attn.q_proj.weight")
('layers.12', 12)
>>> block_of("transformer.h.3.attn.c_attn.weight"), block_of("lm_head.weight")
(('h.3', 3), None)
"""

from __future__ import annotations

import os

from .pairing.names import parse_name
from .io.checkpoint import locate
from .errors import CheckpointError, escape_name
from .kernels.dtypes import DTYPES
from .io.files import os_problem
from .options import HubOptions

__all__ = ["SCHEMA", "describe", "render_text", "block_of"]

SCHEMA = "weightdiff.inspect/1"
_FORMATS = {"safetensors": "safetensors file", "sharded": "sharded safetensors",
            "adapter": "PEFT LoRA adapter", "pickle": "PyTorch pickle (read with weights_only)",
            "gguf": "GGUF (llama.cpp), names mapped to Hugging Face",
            "sentence-transformers": "sentence-transformers modules (modules.json)"}


def block_of(name: str) -> tuple[str, int] | None:
    """(block label, block index) of a tensor name, or None outside the repeated blocks.

    The same labels as ``weightdiff compare`` (weightdiff.pairing.names.parse_name), so a block
    in ``inspect`` output can be found in a comparison by name.
    """
    label, index, _ = parse_name(name)
    return None if label is None else (label, index)


def describe(path: str | os.PathLike, hub: HubOptions | None = None, tensors: bool = False) -> dict:
    """Locate ``path`` (or a Hub repo id, read as ``hub`` says) and summarise it as a
    JSON-ready dict (reads headers only); with ``tensors``, also ``tensor_list``: every tensor
    as compare names it (name, dtype, shape)."""
    with locate(path, hub) as ckpt:
        files = []
        per_file: dict = {}
        for t in ckpt.tensors.values():
            per_file[t.path] = per_file.get(t.path, 0) + 1
        hub_files = [f for f in ckpt.hub["files"]] if ckpt.hub is not None else None
        for i, f in enumerate(ckpt.files):
            if hub_files is not None:
                size = hub_files[i]["bytes"]
            else:
                try:
                    size = os.stat(f).st_size
                except OSError as exc:
                    raise CheckpointError(f, os_problem(exc)) from None
            files.append({"path": str(f) if hub_files is None else hub_files[i]["name"], "bytes": size,
                          "tensors": per_file.get(f, 0)})
            if hub_files is not None:
                files[-1]["sha256"] = hub_files[i]["sha256"]
        dtypes: dict[str, dict] = {}
        schemes: dict[str, dict] = {}
        blocks: dict[str, dict] = {}
        other = {"tensors": 0, "params": 0}
        for key, t in ckpt.tensors.items():
            d = dtypes.setdefault(t.dtype, {"tensors": 0, "params": 0, "bytes": 0,
                                            "decodable": DTYPES[t.dtype].decodable})
            d["tensors"] += 1
            d["params"] += t.numel
            d["bytes"] += t.nbytes
            if t.scheme is not None:
                q = schemes.setdefault(t.scheme, {"tensors": 0, "params": 0, "bytes": 0, "read_as": t.dtype})
                q["tensors"] += 1
                q["params"] += t.numel
                q["bytes"] += t.nbytes
            name = key.removeprefix("base_model.model.") if ckpt.format == "adapter" else key
            blk = block_of(name)
            if blk is None:
                other["tensors"] += 1
                other["params"] += t.numel
                continue
            b = blocks.setdefault(blk[0], {"block": blk[0], "index": blk[1], "tensors": 0, "params": 0})
            b["tensors"] += 1
            b["params"] += t.numel
        stacks = list(dict.fromkeys(label.rsplit(".", 1)[0] for label in blocks))
        ordered = sorted(blocks.values(), key=lambda b: (stacks.index(b["block"].rsplit(".", 1)[0]), b["index"]))
        adapter = None
        if ckpt.adapter is not None and ckpt.adapter.peft_type == "IA3":
            a = ckpt.adapter
            ff = a.feedforward_modules
            adapter = {"peft_type": "IA3", "target_modules": a.target_modules,
                       "feedforward_modules": ff if isinstance(ff, (str, type(None))) else list(ff),
                       "base_model": a.base_model, "vectors": len(ckpt.ia3),
                       "scaling_inputs": sum(v.feedforward for v in ckpt.ia3)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "VERA":
            a = ckpt.adapter
            adapter = {"peft_type": "VERA", "r": a.r, "target_modules": a.target_modules, "base_model": a.base_model,
                       "modules": len(ckpt.lora), "fan_in_fan_out": a.fan_in_fan_out,
                       "save_projection": a.raw.get("save_projection", True) is not False,
                       "projection_prng_key": a.raw.get("projection_prng_key", 0)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "OFT":
            a = ckpt.adapter
            adapter = {"peft_type": "OFT", **{k: a.raw[k] for k in ("r", "oft_block_size", "block_share", "coft", "eps",
                                                                    "use_cayley_neumann", "num_cayley_neumann_terms")},
                       "target_modules": a.target_modules, "base_model": a.base_model, "modules": len(ckpt.lora),
                       "embedding_modules": sum(f.embedding for f in ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type in ("LOHA", "LOKR"):
            a = ckpt.adapter
            adapter = {"peft_type": a.peft_type, "r": a.r, "alpha": a.lora_alpha, "scale": a.lora_alpha / a.r,
                       "target_modules": a.target_modules, "base_model": a.base_model, "modules": len(ckpt.lora),
                       "ranks": sorted({f.r for f in ckpt.lora}),
                       "use_effective_conv2d": a.raw.get("use_effective_conv2d") is True}
            if a.peft_type == "LOKR":
                adapter["decompose_both"] = a.raw.get("decompose_both") is True
                adapter["decompose_factor"] = a.raw.get("decompose_factor", -1)
        elif ckpt.adapter is not None and ckpt.adapter.source == "mlx-lm":
            a = ckpt.adapter
            adapter = {"peft_type": a.peft_type, "source": "mlx-lm", "fine_tune_type": a.raw["fine_tune_type"],
                       "r": a.r, "scale": a.lora_alpha, "num_layers": a.raw.get("num_layers"),
                       "target_modules": a.target_modules, "base_model": a.base_model, "factors": len(ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.source == "llama.cpp":
            a = ckpt.adapter
            # convert_lora_to_gguf.py keeps lora_alpha only: each module's scale is alpha / its own rank (1 at 0)
            adapter = {"peft_type": "LORA", "source": "llama.cpp", "architecture": ckpt.gguf_lora.arch,
                       "lora_alpha": a.lora_alpha, "target_modules": a.target_modules, "base_model": a.base_model,
                       "factors": len(ckpt.lora),
                       "ranks": sorted({f.r for f in ckpt.lora}), "norms_skipped": len(ckpt.gguf_lora.norms),
                       "alora_invocation_tokens": ckpt.gguf_lora.invocation}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "BOFT":
            a = ckpt.adapter
            adapter = {"peft_type": "BOFT", **{k: a.raw[k] for k in ("boft_block_size", "boft_block_num",
                                                                     "boft_n_butterfly_factor")},
                       "target_modules": a.target_modules, "base_model": a.base_model, "modules": len(ckpt.lora),
                       "factors_saved": sorted({int(ckpt.tensors[f.parts["boft_R"]].shape[0]) for f in ckpt.lora})}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "TRAINABLE_TOKENS":
            a = ckpt.adapter
            adapter = {"peft_type": "TRAINABLE_TOKENS", "target_modules": a.target_modules, "base_model": a.base_model,
                       "token_indices": list(a.tokens[""]),
                       "trainable_tokens": {f.target: len(f.tokens) for f in ckpt.lora}}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "VBLORA":
            a = ckpt.adapter
            adapter = {"peft_type": "VBLORA", **{k: a.raw[k] for k in ("r", "topk", "num_vectors", "vector_length",
                                                                       "save_only_topk_weights", "fan_in_fan_out")},
                       "target_modules": a.target_modules, "base_model": a.base_model, "modules": len(ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "DELORA":
            a = ckpt.adapter
            adapter = {"peft_type": "DELORA", "r": a.r, "target_modules": a.target_modules, "base_model": a.base_model,
                       "modules": len(ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "FOURIERFT":
            a = ckpt.adapter
            adapter = {"peft_type": "FOURIERFT", **{k: a.raw[k] for k in ("n_frequency", "scaling", "random_loc_seed")},
                       "fan_in_fan_out": a.fan_in_fan_out, "target_modules": a.target_modules,
                       "base_model": a.base_model, "modules": len(ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "HRA":
            a = ckpt.adapter
            adapter = {"peft_type": "HRA", "r": a.r, "apply_GS": a.raw["apply_GS"], "target_modules": a.target_modules,
                       "base_model": a.base_model, "modules": len(ckpt.lora)}
        elif ckpt.adapter is not None and ckpt.adapter.peft_type == "LN_TUNING":
            from .io.peft_ln import ln_target

            a = ckpt.adapter
            copies = sorted({t.rsplit(".", 1)[0] for t in map(ln_target, ckpt.tensors) if t})
            adapter = {"peft_type": "LN_TUNING", "target_modules": a.target_modules, "base_model": a.base_model,
                       "layers": len(copies), "tensors": sum(ln_target(n) is not None for n in ckpt.tensors)}
        elif ckpt.adapter is not None:
            a = ckpt.adapter
            pairs = [f for f in ckpt.lora if f.kind != "TOKENS"]
            adapter = {"peft_type": a.peft_type, "r": a.r, "lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora,
                       "use_dora": a.use_dora, "target_modules": a.target_modules,
                       "base_model": a.base_model, "scale": a.scale,
                       "factors": len({(f.a_name, f.b_name) for f in pairs}),     # the experts of a parameter share one
                       "ranks": sorted({f.r for f in pairs})}
            if a.target_parameters:     # LoRA on parameters (PEFT's ParamWrapper): parameter -> its experts
                adapter["target_parameters"] = list(a.target_parameters)
                adapter["parameters"] = {f.param: f.experts for f in pairs if f.param is not None}
            if a.tokens:
                adapter["trainable_tokens"] = {f.target: len(f.tokens) for f in ckpt.lora if f.kind == "TOKENS"}
            if a.peft_type == "ADALORA":
                # r is init_r; each module's scale is lora_alpha / (init_r + 1e-5), whatever rank it kept
                from .io.peft_adapter import adalora_scale

                adapter["scale"] = adalora_scale(a, a.r)
        quant = None
        if ckpt.quant:
            qc = ckpt.quant_config or {}
            quant = {"method": qc.get("quant_method"), "folded_away": ckpt.hidden,
                     "tensors": [{"name": key, "format": t.quant.format, "scheme": t.quant.scheme,
                                  "bits": t.quant.bits, "group": t.quant.group, "stored": list(t.quant.stored)}
                                 for key, t in ckpt.tensors.items() if t.quant is not None]}
        return {
            "schema": SCHEMA, "path": str(ckpt.path), "format": ckpt.format, "files": files,
            "quantization": quant,
            "ignored": [str(p) for p in ckpt.ignored], "tensors": len(ckpt.tensors),
            "params": ckpt.params, "bytes": ckpt.nbytes,
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["params"])),
            "schemes": dict(sorted(schemes.items(), key=lambda kv: -kv[1]["params"])),
            "blocks": ordered, "outside_blocks": other, "modules": ckpt.modules,
            "metadata": {str(k): str(v) for k, v in ckpt.metadata.items()}, "adapter": adapter,
            **({"hub": {k: v for k, v in ckpt.hub.items() if k != "files"}} if ckpt.hub is not None else {}),
            # the name compare reports (and --include matches), and the name in the file where it differs (a
            # sentence-transformers module's prefix, an ONNX weight named after the module that reads it)
            **({"tensor_list": [{"name": key, "dtype": (t.scheme or t.quant.format) if t.quant is not None
                                 else t.dtype, "shape": list(t.shape),
                                 **({"stored_as": ckpt.file_names[key]} if key in ckpt.file_names else {})}
                                for key, t in ckpt.tensors.items()]}
               if tensors else {}),
        }


def _shown(path: str, top: str) -> str:
    """A file's path as shown: relative to the checkpoint folder when inside it (a
    sentence-transformers module's ``2_Dense/model.safetensors``), else its name."""
    rel = os.path.relpath(path, top) if os.path.isabs(path) == os.path.isabs(top) else path
    return rel if rel != "." and not rel.startswith("..") and os.path.isdir(top) else os.path.basename(path)


def _size(n: int) -> str:
    """Bytes in decimal units: _size(1_500_000) == '1.50 MB'."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_text(summary: dict) -> str:
    """The terminal view of ``describe()``'s dict; names and metadata are printed escaped."""
    e = escape_name
    from .io.peft_adapter import KIND_LABELS

    peft_type = (summary.get("adapter") or {}).get("peft_type")
    source = (summary.get("adapter") or {}).get("source")
    kind = ("llama.cpp LoRA adapter (GGUF)" if source == "llama.cpp" else "mlx-lm adapter" if source == "mlx-lm"
            else f"PEFT {KIND_LABELS[peft_type]} adapter" if peft_type in KIND_LABELS
            else _FORMATS.get(summary["format"], summary["format"]))
    lines = [f"checkpoint  {e(summary['path'])}",
             f"format      {kind}, "
             f"{len(summary['files'])} file{'s' if len(summary['files']) != 1 else ''}"]
    hub = summary.get("hub")
    if hub:
        rev = f" (revision {e(str(hub['revision']))})" if hub.get("revision") else ""
        lines.insert(1, f"hub repo    {e(hub['repo_id'])} at commit {hub['commit']}{rev}")
    for i, f in enumerate(summary["files"]):
        lines.append(f"{'files' if i == 0 else '':<12}{e(_shown(f['path'], summary['path']))}  "
                     f"{_size(f['bytes'])}  {f['tensors']:,} tensor{'' if f['tensors'] == 1 else 's'}")
    for p in summary["ignored"]:
        why = ("no module of modules.json" if summary.get("modules") else
               "model.safetensors beside it is read" if summary.get("format") == "safetensors" else "not in the index")
        lines.append(f"{'ignored':<12}{e(_shown(p, summary['path']))} ({why})")
    for i, m in enumerate(summary.get("modules") or []):
        held = (f"{m['tensors']:,} tensors from {', '.join(e(f) for f in m['files'])}"
                + (f", named `{e(m['prefix'])}*`" if m["prefix"] else "")) if m["files"] else \
            ("no weights" if m["folder"] else "no folder, no weights")
        lines.append(f"{'modules' if i == 0 else '':<12}{e(m['path'] or '.')}  {e(m['type'].rsplit('.', 1)[-1])}: {held}")
    lines.append(f"tensors     {summary['tensors']:,}")
    lines.append(f"parameters  {summary['params']:,} ({_size(summary['bytes'])})")
    lines.append("")
    lines.append(f"{'dtype':<14}{'tensors':>9}{'parameters':>18}{'share':>8}")
    total = max(summary["params"], 1)
    for name, d in summary["dtypes"].items():
        note = "" if d["decodable"] else "  (compared byte for byte)"
        lines.append(f"{name:<14}{d['tensors']:>9,}{d['params']:>18,}{d['params'] / total:>8.1%}{note}")
    if summary.get("schemes"):
        lines.append("")
        lines.append(f"{'stored as':<14}{'tensors':>9}{'parameters':>18}{'bytes':>12}  read as")
        for name, q in summary["schemes"].items():
            lines.append(f"{e(name):<14}{q['tensors']:>9,}{q['params']:>18,}{_size(q['bytes']):>12}  "
                         f"{q['read_as']} (dequantized)")
    if summary["blocks"]:
        width = max(14, max(len(e(b["block"])) for b in summary["blocks"]) + 2)
        lines.append("")
        lines.append(f"{'block':<{width}}{'tensors':>9}{'parameters':>18}")
        for b in summary["blocks"]:
            lines.append(f"{e(b['block']):<{width}}{b['tensors']:>9,}{b['params']:>18,}")
        o = summary["outside_blocks"]
        if o["tensors"]:
            lines.append(f"{'(outside)':<{width}}{o['tensors']:>9,}{o['params']:>18,}")
    q = summary.get("quantization")
    if q:
        lines.append("")
        kinds: dict[tuple[str, str], list[str]] = {}
        for t in q["tensors"]:
            kinds.setdefault((t["format"], t["scheme"]), []).append(t["name"])
        lines.append(f"quantized   {len(q['tensors']):,} tensors, read dequantized to float32; their scales, "
                     "zero points and indices are part of them, not tensors of their own")
        for (fmt, scheme), names in kinds.items():
            more = f" and {len(names) - 1:,} more" if len(names) > 1 else ""
            lines.append(f"{'':<12}{e(fmt)}: {e(scheme)}  ({len(names):,}: {e(names[0])}{more})")
        if q["folded_away"]:
            lines.append(f"{'':<12}{len(q['folded_away']):,} activation/KV-cache scales and layout markers set aside "
                         f"(e.g. {e(q['folded_away'][0])})")
    if summary["adapter"] is not None:
        lines += ["", *_adapter_lines(summary["adapter"])]
    if summary["metadata"]:
        lines.append("")
        for i, (k, v) in enumerate(summary["metadata"].items()):
            v = v if len(v) <= 80 else v[:77] + "..."
            lines.append(f"{'metadata' if i == 0 else '':<12}{e(k)} = {e(v)}")
    listed = summary.get("tensor_list")
    if listed is not None:
        lines.append("")
        width = max([len("tensor")] + [len(e(t["name"])) for t in listed]) + 2
        lines.append(f"{'tensor':<{width}}{'dtype':<14}shape")
        for t in listed:
            stored = f"  (stored as {e(t['stored_as'])})" if t.get("stored_as") else ""
            lines.append(f"{e(t['name']):<{width}}{e(t['dtype']):<14}{' x '.join(map(str, t['shape'])) or '()'}{stored}")
    return "\n".join(lines)


def _adapter_lines(a: dict) -> list[str]:
    """The terminal lines of ``describe()``'s ``adapter``: what it is and how it scales, its targets, then what
    each kind adds (IA3's feedforward modules, a llama.cpp adapter's architecture), the declared base, notes."""
    e = escape_name
    from .io.peft_adapter import KIND_LABELS

    kind = a.get("peft_type")
    s = lambda n: "s" if n != 1 else ""          # noqa: E731
    beside, after = [], []
    if kind == "IA3":
        ff = a["feedforward_modules"]
        head = (f"IA3, {a['vectors']} vector{s(a['vectors'])} ({a['scaling_inputs']} scaling a layer's inputs, "
                f"{a['vectors'] - a['scaling_inputs']} its outputs)")
        beside.append(f"feedforward {e(ff if isinstance(ff, str) else ', '.join(ff or [])) or '-'}")
    elif kind == "VERA":
        head = (f"VeRA r={a['r']}, {a['modules']} module{s(a['modules'])}, shared projections "
                f"{'saved' if a['save_projection'] else 'not saved'} (projection_prng_key "
                f"{e(str(a['projection_prng_key']))})")
    elif kind == "BOFT":
        size = (f"boft_block_size={a['boft_block_size']}" if a["boft_block_size"]
                else f"boft_block_num={a['boft_block_num']}")
        n = a["factors_saved"] or [a["boft_n_butterfly_factor"]]
        head = (f"BOFT {size}, {'/'.join(map(str, n))} butterfly factor{s(max(n))}, {a['modules']} "
                f"module{s(a['modules'])}")
    elif kind == "VBLORA":
        head = (f"VBLoRA r={a['r']} topk={a['topk']}, a bank of {a['num_vectors']} vectors of {a['vector_length']}"
                f"{' (top-k weights saved)' if a['save_only_topk_weights'] else ''}, {a['modules']} "
                f"module{s(a['modules'])}")
    elif kind == "DELORA":
        head = f"DeLoRA r={a['r']}, {a['modules']} module{s(a['modules'])}"
    elif kind == "FOURIERFT":
        head = (f"FourierFT n_frequency={a['n_frequency']:,} scaling={a['scaling']:g} random_loc_seed="
                f"{a['random_loc_seed']}, {a['modules']} module{s(a['modules'])}")
    elif kind == "HRA":
        head = (f"HRA r={a['r']} Householder reflections{' (apply_GS)' if a['apply_GS'] else ''}, {a['modules']} "
                f"module{s(a['modules'])}")
    elif kind == "LN_TUNING":
        head = (f"LN tuning, {a['layers']} trained layer cop{'y' if a['layers'] == 1 else 'ies'} "
                f"({a['tensors']} tensor{s(a['tensors'])}), each swapped in for the base's layer")
    elif kind == "TRAINABLE_TOKENS":
        ids = a["token_indices"]
        head = (f"trainable tokens, {len(ids):,} token id{s(len(ids))} ({', '.join(map(str, ids[:8]))}"
                f"{', ...' if len(ids) > 8 else ''})")
    elif kind == "OFT":
        size = f"oft_block_size={a['oft_block_size']}" if a["oft_block_size"] else f"r={a['r']} blocks"
        how = (f"Cayley-Neumann {a['num_cayley_neumann_terms']} terms" if a["use_cayley_neumann"] else "Cayley") + \
            (f", coft eps={a['eps']:g}" if a["coft"] else "") + (", block_share" if a["block_share"] else "")
        head = (f"OFT {size}, {how}, {a['modules']} module{s(a['modules'])}"
                + (f" ({a['embedding_modules']} embedding)" if a["embedding_modules"] else ""))
    elif kind in ("LOHA", "LOKR"):
        how = (" effective_conv2d" if a["use_effective_conv2d"] else "") + (
            f" decompose_factor={a['decompose_factor']}{' decompose_both' if a['decompose_both'] else ''}"
            if kind == "LOKR" else "")
        head = (f"{KIND_LABELS[kind]} r={a['r']} alpha={a['alpha']:g} scale={a['scale']:g}{how}, {a['modules']} "
                f"module{s(a['modules'])} (ranks {', '.join(map(str, a['ranks'])) or '-'})")
    elif a.get("source") == "mlx-lm":
        head = (f"mlx-lm {a['fine_tune_type']}" + (f" r={a['r']} scale={a['scale']:g}, {a['factors']} LoRA factor "
                                                   f"pair{s(a['factors'])}" if a["fine_tune_type"] != "full" else
                                                   " fine-tune (trained tensors)")
                + (f", last {a['num_layers']} layers" if isinstance(a.get("num_layers"), int) else ""))
    elif a.get("source") == "llama.cpp":
        how = "scale alpha / each module's rank" if a["lora_alpha"] else "scale 1"
        head = (f"llama.cpp LoRA alpha={a['lora_alpha']:g} ({how}), {a['factors']} LoRA factor pair{s(a['factors'])} "
                f"(ranks {', '.join(map(str, a['ranks'])) or '-'})")
        beside.append(f"architecture {e(a['architecture'])}")
        if a["norms_skipped"]:
            after.append(f"{'':<12}{a['norms_skipped']} norm weights not applied (llama.cpp skips them)")
        if a["alora_invocation_tokens"]:
            after.append(f"{'':<12}activated LoRA: applied after a {a['alora_invocation_tokens']}-token invocation "
                         "sequence")
    else:
        ada = kind == "ADALORA"
        head = (f"{'AdaLoRA init_r' if ada else 'r'}={a['r']} lora_alpha={a['lora_alpha']:g} scale={a['scale']:g}"
                f"{' rslora' if a['use_rslora'] else ''}{' dora' if a['use_dora'] else ''}, {a['factors']} "
                f"{'AdaLoRA factor triple' if ada else 'LoRA factor pair'}{s(a['factors'])} "
                f"({'kept ranks' if ada else 'ranks'} {', '.join(map(str, a['ranks'])) or '-'})")
    if a.get("parameters"):
        after.append("parameters  " + ", ".join(f"{e(p)}" + (f" ({n} experts)" if n > 1 else "")
                                                for p, n in a["parameters"].items()) + " (target_parameters)")
    if a.get("trainable_tokens"):
        after.append("tokens      " + ", ".join(f"{n:,} row{s(n)} of {e(t)}" for t, n in a["trainable_tokens"].items())
                     + " (trainable tokens: rows replaced)")
    return [f"adapter     {head}", f"targets     {e(', '.join(a['target_modules'])) or '-'}", *beside,
            *([f"base model  {e(a['base_model'])}"] if a["base_model"] else []), *after]
