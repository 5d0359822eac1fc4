r"""PEFT's trainable tokens, read as the rows of a table PEFT replaces.

PEFT trains chosen rows of an embedding (or of an LM head) and leaves the rest of the table alone: a LoRA
adapter's ``trainable_token_indices`` (a list, for the model's input embedding, or an object of module name ->
list), or an adapter of its own, ``peft_type`` TRAINABLE_TOKENS (``token_indices`` for its ``target_modules``).
The adapter saves the trained rows, not a difference, despite the name: ``<m>.trainable_tokens_delta``
(``<m>.token_adapter.trainable_tokens_delta`` under LoRA) [tokens, dim], and both PEFT's forward and its merge
put them in place of the table's rows, cast to the table's dtype (``TrainableTokensLayer.get_merged_weights``:
``W.index_copy(0, indices, delta.to(W))``).

The change of the table is those rows minus the base's: a matrix with as many non-zero rows as tokens, of rank
at most that many. It is measured exactly as a factor pair whose B selects the rows (``measure.rank.
analyze_factors`` with ``rows``), never forming the table: a 128,256-row embedding with 3 tokens trained costs
3 rows. A table the adapter saves whole (PEFT's ``save_embedding_layers``, a resized vocabulary:
``<m>.token_adapter.base_layer.weight``) is what PEFT loads and replaces rows of; when it is not the base's
table to the bit, the merged table is compared with the base's as a plain pair (or a resize), as for a LoRA.

With tied embeddings PEFT ties the LM head's rows to the embedding's (one set of rows for the table both read):
a copy of them saved for the head is measured once, with the embedding (``weightdiff.pairing.heads``).

>>> cfg = parse_tokens_config({"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 2]}, Path("a.json"))
>>> cfg.tokens, cfg.target_modules
({'': (5, 2)}, ['embed_tokens'])
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError, escape_name
from ..records import TOKENS_NOTE
from .safetensors_read import TensorInfo

__all__ = ["parse_tokens_config", "token_indices", "token_factors", "check_tokens", "tokens_note", "TOKENS_NOTE",
           "is_token_delta"]

_PREFIX = "base_model.model."
_DELTA_RE = re.compile(r"^(?P<mod>.+?)(?P<wrap>\.token_adapter)?\.trainable_tokens_delta\Z", re.S)
#: more indices than any vocabulary has (a list this long in a config is a corrupt or hostile file)
_INDEX_CAP = 1 << 31
_LIST_CAP = 1 << 22
_MERGE = "merge the adapter (merge_and_unload) and compare the merged model"


def is_token_delta(name: str) -> bool:
    """Whether ``name`` is a trainable-tokens tensor of PEFT's (``<m>.trainable_tokens_delta``)."""
    return name.endswith(".trainable_tokens_delta") and _DELTA_RE.match(name) is not None


def _indices(path: Path, what: str, value: object) -> tuple[int, ...]:
    from .peft_adapter import _show

    if not isinstance(value, list) or not value or len(value) > _LIST_CAP:
        raise CheckpointError(path, f"adapter config has {what} = {_show(value)}, expected a non-empty list of "
                                    "token ids")
    if not all(type(v) is int and 0 <= v < _INDEX_CAP for v in value):
        bad = next(v for v in value if not (type(v) is int and 0 <= v < _INDEX_CAP))
        raise CheckpointError(path, f"adapter config has {what} holding {_show(bad)}, expected token ids "
                                    "(integers from 0)")
    seen: set[int] = set()
    dup = next((v for v in value if v in seen or seen.add(v)), None)      # one pass (4M ids: no quadratic scan)
    if dup is not None:
        raise CheckpointError(path, f"adapter config has {what} listing token {dup} twice: PEFT would write two "
                                    "trained rows into one row of the table, and which one it keeps is not defined")
    return tuple(value)


def token_indices(raw: dict, path: Path, key: str) -> dict[str, tuple[int, ...]]:
    """``raw[key]`` checked: module name -> its token ids, ``""`` naming the model's input embedding (a list)."""
    from .peft_adapter import _KEY_CAP, _show

    value = raw[key]
    if isinstance(value, dict):
        if not value:
            raise CheckpointError(path, f"adapter config has {key} = {{}}, expected module name -> token ids")
        out = {}
        for name, ids in value.items():
            if not name or len(name) > _KEY_CAP:
                raise CheckpointError(path, f"adapter config has {key} with the module name {_show(name)}")
            out[name] = _indices(path, f"{key}[{_show(name)}]", ids)
        return out
    return {"": _indices(path, key, value)}


def parse_tokens_config(raw: dict, path: Path):
    """The AdapterConfig of a trainable-tokens adapter (``peft_type`` TRAINABLE_TOKENS): its ``token_indices``
    (checked, in ``tokens``) and ``target_modules`` (PEFT's default ``["embed_tokens"]``)."""
    from .peft_adapter import AdapterConfig, _targets

    if raw.get("token_indices") is None:
        raise CheckpointError(path, "adapter config has peft_type TRAINABLE_TOKENS but no token_indices")
    tokens = token_indices(raw, path, "token_indices")
    if "" not in tokens:
        raise CheckpointError(path, "adapter config has token_indices as an object; TRAINABLE_TOKENS takes a list "
                                    "of token ids for its target_modules")
    targets = _targets(path, raw) if raw.get("target_modules") is not None else ["embed_tokens"]
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(0, 0.0, targets, False, False, base if isinstance(base, str) else None, raw,
                         path=Path(path), peft_type="TRAINABLE_TOKENS", tokens=tokens)


def _ids_for(module: str, tokens: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The token ids the config gives module ``module``: the list's (the input embedding, the only table PEFT
    wraps for a list, or the head tied to it), or the one key naming the module (PEFT matches a key as the
    module's name or its last dotted parts)."""
    if "" in tokens:
        return tokens[""]
    hits = [ids for key, ids in tokens.items() if module == key or module.endswith("." + key)]
    return hits[0] if len(hits) == 1 else None


def token_factors(tensors: dict[str, TensorInfo], where: Path, config, lora_modules=()) -> list:
    """One LoraFactor (kind TOKENS, its rows tensor in ``parts``, its ids in ``tokens``) per table whose rows the
    adapter trains. ``lora_modules``: the modules LoRA factors adapt (a table may not have both)."""
    from .peft_adapter import LoraFactor, _is_float

    tokens = config.tokens or {}
    out = []
    for name, info in tensors.items():
        m = _DELTA_RE.match(name) if name.endswith(".trainable_tokens_delta") else None
        if m is None:
            continue
        mod = m["mod"]
        module = mod.removeprefix(_PREFIX)
        if not tokens:
            raise CheckpointError(where, f"adapter holds trainable token rows (`{escape_name(name)}`) but "
                                         "adapter_config.json sets no trainable_token_indices, so PEFT would not "
                                         "load them", "rows and config from different adapters?")
        ids = _ids_for(module, tokens)
        if ids is None:
            raise CheckpointError(where, f"adapter holds trainable token rows for `{escape_name(module)}`, but "
                                         "adapter_config.json gives that module no token ids (or several)",
                                  "rows and config from different adapters?")
        if not _is_float(info) or len(info.shape) != 2 or int(info.shape[0]) != len(ids):
            raise CheckpointError(where, f"trainable tokens tensor `{escape_name(name)}` is {info.dtype} "
                                         f"{list(info.shape)}; expected a float matrix of {len(ids):,} rows, one per "
                                         "token id adapter_config.json lists")
        if mod in lora_modules:
            raise CheckpointError(where, f"`{escape_name(module)}` has both LoRA factors and trainable token rows, "
                                         "which PEFT does not build on one layer",
                                  "factors and rows from different adapters?")
        saved = f"{mod}{m['wrap'] or ''}.base_layer.weight"
        if saved in tensors and not _is_float(tensors[saved]):
            raise CheckpointError(where, f"base layer `{escape_name(saved)}` saved in the adapter is "
                                         f"{tensors[saved].dtype}; expected a float dtype")
        out.append(LoraFactor(module + ".weight", name, name, None, len(ids), 1.0, kind="TOKENS",
                              parts={"rows": name}, base_layer_name=saved if saved in tensors else None, tokens=ids))
    if tokens and not out:
        key = "token_indices" if config.peft_type == "TRAINABLE_TOKENS" else "trainable_token_indices"
        raise CheckpointError(where, f"adapter_config.json sets {key}, but the adapter holds no trainable token "
                                     "rows (trainable_tokens_delta)", "rows and config from different adapters?")
    return out


def check_tokens(factor, tensors: dict[str, TensorInfo], base: TensorInfo, quantized: bool, where: Path) -> None:
    """The rows must fit the table they replace rows of (headers only): a float table [vocab, dim] (or the copy
    the adapter saves of it), each id one of its rows, the rows as wide as the table."""
    t = f"`{escape_name(factor.target)}`"
    from .peft_adapter import saved_layer_shape

    shape = saved_layer_shape(factor, tensors, tuple(int(d) for d in base.shape), where)
    if factor.base_layer_name is None and quantized:
        raise CheckpointError(where, f"trainable tokens replace rows of {t}, which the base stores quantized: PEFT "
                                     "replaces rows of a float table", "compare against the base's float weights")
    dtype = tensors[factor.base_layer_name].dtype if factor.base_layer_name is not None else base.dtype
    if dtype not in ("F16", "BF16", "F32", "F64"):
        raise CheckpointError(where, f"trainable tokens replace rows of {t}, a {dtype} table: weightdiff merges "
                                     "rows into float16, bfloat16, float32 and float64 tables only", _MERGE)
    rows = tensors[factor.parts["rows"]].shape
    if len(shape) != 2 or int(rows[1]) != shape[1]:
        raise CheckpointError(where, f"trainable tokens tensor `{escape_name(factor.parts['rows'])}` holds rows of "
                                     f"{int(rows[1]):,} values, but the table {t} is {list(shape)}",
                              "is this adapter for another base model?")
    top = max(factor.tokens)
    if top >= shape[0]:
        raise CheckpointError(where, f"trainable token id {top:,} is outside {t}, which has {shape[0]:,} rows "
                                     "(PEFT's index_copy fails on it)",
                              "is this adapter for another base model, or was its vocabulary resized?")


def tokens_note(factor, dtype: str, merged_into: str | None = None, shape: list | None = None) -> str:
    """The note of a table whose rows trainable tokens replace (``TOKENS_NOTE`` first: the verdict's adapter flag
    reads it); ``merged_into``: the base layer the adapter saves (of ``shape``), the rows written into it."""
    ids = factor.tokens
    shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids):,} in all)" if len(ids) > 8 else "")
    n = len(ids)
    head = (f"{TOKENS_NOTE} `{factor.parts['rows']}` ({n:,} row{'s' if n != 1 else ''}: token "
            f"id{'s' if n != 1 else ''} {shown})")
    if merged_into:
        return (f"{head} written into the base layer the adapter saves, `{merged_into}` ({shape}, {dtype}), which "
                "is not this base's table: PEFT loads that copy and replaces its rows (index_copy), so the merged "
                "table is compared")
    return (f"{head} in place of the base's rows, cast to {dtype} as PEFT applies them (index_copy), analysed "
            f"exactly from those rows: the change has at most {n:,} non-zero row{'s' if n != 1 else ''}, so its rank "
            f"is at most {n:,}")
