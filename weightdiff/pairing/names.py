"""Block and module kind from a tensor name, for the common model families.

``parse_name`` reads where a tensor sits (block label and index) and what it is
(``attn.q``, ``mlp.down``, ``norm``, ``embed``, ``lm_head``, ...) from its name alone:
Llama/Mistral/Qwen (``model.layers.N.self_attn.q_proj``), GPT-2 (``transformer.h.N.attn.c_attn``),
BERT/RoBERTa and ViT (``encoder.layer.N.attention.self.query``), T5
(``encoder.block.N.layer.M.SelfAttention.q``), vision-encoder-decoder composites
(``decoder.transformer.h.N.crossattention.q_attn``), and a generic fallback (the
first decimal component is the block, the last name component the kind). It never
raises: odd names land in a block named after what is there. ``weightdiff.judge.aggregate``
rolls records up with it.

>>> parse_name("model.layers.3.self_attn.q_proj.weight")
('layers.3', 3, 'attn.q')
>>> parse_name("decoder.transformer.h.1.crossattention.c_attn.weight")
('decoder.h.1', 1, 'xattn.qkv')
"""

from __future__ import annotations

import functools

__all__ = ["parse_name", "block_slot", "clear_name_caches", "group_of", "component_of", "is_embedding", "is_lm_head", "is_buffer",
           "is_router"]

_EMBED_LEAVES = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in", "tok_embeddings",
                 "token_embedding", "embedding", "embeddings")   # (Mamba's, RWKV's `backbone.embeddings.weight`)
_HEAD_NAMES = ("lm_head", "embed_out", "output", "cls.predictions.decoder")

_WRAPPERS = {"model", "transformer", "base_model", "bert", "roberta", "xlm_roberta", "vit", "deit", "gpt_neox",
             "deberta", "electra", "distilbert", "albert", "backbone", "module", "_orig_mod", "auto_model"}
_XATTN = {"crossattention", "encoder_attn", "encdecattention", "cross_attn", "cross_attention", "crossattn"}
_ATTN = {"self_attn", "attn", "attention", "self_attention", "selfattention", "self", "mha"}
_MLP = {"mlp", "feed_forward", "ffn", "densereludense", "intermediate", "block_sparse_moe", "experts", "moe",
        "shared_experts", "shared_expert", "ff"}
_ATTN_LEAF = {
    "q": {"q_proj", "q", "query", "q_attn", "wq", "q_lin"},
    "k": {"k_proj", "k", "key", "wk", "k_lin"},
    "v": {"v_proj", "v", "value", "wv", "v_lin"},
    "qkv": {"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "in_proj", "w_pack", "linear_qkv"},
    "o": {"o_proj", "o", "out_proj", "c_proj", "dense", "wo", "proj", "out_lin", "output", "linear_proj"},
}
_MLP_LEAF = {
    "gate": {"gate_proj", "w1", "wi_0"},
    "up": {"up_proj", "c_fc", "fc1", "wi", "wi_1", "w3", "dense_h_to_4h", "fc_in", "lin1", "gate_up_proj",
           "input_linear", "v1", "linear_fc1"},            # (GraniteMoE's gate|up, DBRX's up, Megatron's)
    "down": {"down_proj", "c_proj", "fc2", "wo", "w2", "dense_4h_to_h", "fc_out", "lin2", "output_linear",
             "linear_fc2"},
    "router": {"gate", "router", "classifier"},
}
# leaves that name their module without a context (e.g. ``layers.0.q_proj``)
_BARE = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
         "qkv_proj": "attn.qkv", "query_key_value": "attn.qkv", "gate_proj": "mlp.gate", "up_proj": "mlp.up",
         "down_proj": "mlp.down", "fc1": "mlp.up", "fc2": "mlp.down", "c_fc": "mlp.up"}
_EMBED = {"word_embeddings": "embed", "embed_tokens": "embed", "wte": "embed", "shared": "embed",
          "embed_in": "embed", "tok_embeddings": "embed", "token_embedding": "embed", "embedding": "embed",
          "wpe": "embed.pos", "position_embeddings": "embed.pos", "embed_positions": "embed.pos",
          "position_embedding": "embed.pos", "patch_embeddings": "embed.patch", "patch_embedding": "embed.patch",
          "token_type_embeddings": "embed.type", "cls_token": "embed.token", "mask_token": "embed.token",
          "distillation_token": "embed.token", "register_tokens": "embed.token"}
_HEAD = {"classifier", "score", "qa_outputs", "pooler", "cls", "head", "heads", "pre_classifier",
         "visual_projection", "text_projection", "logit_scale"}


def _is_norm(part: str) -> bool:
    p = part.lower()
    return "norm" in p or p == "ln" or p.startswith("ln_") or p in ("ln1", "ln2", "ln_f")


def _te_parts(rest: list[str]) -> list[str]:
    """TransformerEngine's fused names in the plain form: ``layernorm_qkv.weight`` is a QKV matrix,
    ``layernorm_mlp.fc1_weight`` the MLP's first matrix (their norms are ``layer_norm_weight``); read by
    their words, every one of them was a norm ("norm" in the name) and left out of the relatedness numbers.

    >>> _te_parts(["self_attention", "layernorm_qkv", "weight"]), _te_parts(["layernorm_mlp", "fc2_weight"])
    (['self_attention', 'qkv', 'weight'], ['mlp', 'fc2', 'weight'])
    """
    if not any(p in _TE_MODULES or p in _TE_LEAVES for p in rest):
        return rest
    out = [_TE_MODULES.get(p, p) for p in rest]
    if out and out[-1] in _TE_LEAVES:
        out[-1:] = out[-1].rsplit("_", 1)
    return out


_TE_LEAVES = {"fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias"}
#: TransformerEngine's fused modules (ViT's `layernorm_before` / `layernorm_after` are norms)
_TE_MODULES = {"layernorm_qkv": "qkv", "layernorm_mlp": "mlp", "layernorm_linear": "linear"}


def _module_kind(rest: list[str], in_block: bool) -> str:
    """Module kind from the name components after the block index (or of a non-block tensor)."""
    rest = _te_parts(rest)
    last = rest[-1] if rest else ""
    body = rest[:-1] if last in ("weight", "bias") else rest
    low = [p.lower() for p in body]
    # a norm's own component, or a norm container with no attention or MLP inside it: DBRX keeps its
    # attention under `norm_attn_norm.attn.Wqkv`, which is no norm (read so, its attention was left out of
    # the relatedness numbers: replaced by another model's, it read "a fine-tune, 1 - cosine = 0")
    if low and (_is_norm(low[-1]) or (any(_is_norm(p) for p in low[:-1])
                                      and not set(low) & (_ATTN | _XATTN | _MLP))):
        return "norm"
    if last == "bias":
        return "bias"
    if low and low[-1].isdecimal() and len(low) > 1:
        # one expert's slice of a stacked tensor (GraniteMoE's `input_linear.3`): the kind is the tensor's
        low = low[:-1]
    leaf = low[-1] if low else ""
    if leaf == "embeddings":                    # Mamba's and RWKV's token table, `backbone.embeddings.weight`
        return "embed"
    if leaf == "layer" and len(low) > 1 and low[-2] == "router":   # GraniteMoE's, DBRX's `router.layer`
        return "mlp.router"
    joined = ".".join(low)
    if leaf in ("lm_head", "embed_out") or joined.endswith("cls.predictions.decoder") or \
            (not in_block and joined == "output"):
        return "lm_head"
    for p in reversed(low):
        if p in _EMBED:
            return _EMBED[p]
    ctx = set(low[:-1])
    if ctx & _XATTN or ctx & _ATTN:
        pre = "xattn." if ctx & _XATTN else "attn."
        for kind, names in _ATTN_LEAF.items():
            if leaf in names:
                return pre + kind
        return pre + (leaf or "other")
    if ctx & _MLP or "output" in ctx:
        for kind, names in _MLP_LEAF.items():
            if leaf in names:
                if kind == "router" and "experts" in ctx:
                    continue
                return "mlp." + kind
        if low[-2:] in (["intermediate", "dense"],):
            return "mlp.up"
        if low[-2:] == ["output", "dense"]:
            return "mlp.down"
        return "mlp." + (leaf or "other")
    if leaf in _BARE:
        return _BARE[leaf]
    if not in_block and (set(low) & _HEAD):
        return "head"
    return leaf or "other"


@functools.lru_cache(maxsize=1 << 12)
def _kind_of(rest: tuple[str, ...], in_block: bool) -> str:
    """``_module_kind``, remembered: the components after the block index repeat in every block
    (``self_attn.q_proj.weight``, ``experts.15.w``), so a model has a few hundred of them."""
    return _module_kind(list(rest), in_block)


def _block_position(parts: list[str]) -> int | None:
    """Where the block index sits in a split name; a number right before a wrapper is a
    container slot (sentence-transformers' ``0.auto_model.``), not a block."""
    n = len(parts)
    for i, p in enumerate(parts):       # (a loop, not a generator: the first parse of every name asks)
        if p.isdecimal() and p.isascii() and len(p) < 10 and not (i + 1 < n and parts[i + 1] in _WRAPPERS):
            return i
    return None


def block_slot(name: str) -> tuple[str | None, int | None]:
    """The name with its block index replaced by ``#``, and that index (None, None outside blocks).

    >>> block_slot("model.layers.12.mlp.up_proj.weight")
    ('model.layers.#.mlp.up_proj.weight', 12)
    """
    return _block_slot(str(name))


def _block_slot(name: str) -> tuple[str | None, int | None]:
    parts = name.split(".")
    k = _block_position(parts)
    if k is None:
        return None, None
    index = int(parts[k])
    parts[k] = "#"
    return ".".join(parts), index


def parse_name(name: str) -> tuple[str | None, int | None, str]:
    """(block label, block index, module kind) of a tensor name; never raises.

    The block is the first decimal name component with the container before it and any
    meaningful namespace (``encoder``, ``decoder``, ``vision_model``) in front; wrappers
    such as ``model.``, ``transformer.``, ``bert.`` are dropped and a repeated component
    is written once. Tensors outside blocks get block None.

    >>> parse_name("bert.encoder.layer.11.attention.output.dense.weight")
    ('encoder.layer.11', 11, 'attn.o')
    >>> parse_name("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")
    ('encoder.block.0', 0, 'mlp.up')
    >>> parse_name("0.auto_model.encoder.layer.2.output.dense.weight")
    ('encoder.layer.2', 2, 'mlp.down')
    >>> parse_name("model.embed_tokens.weight"), parse_name("lm_head.weight")
    ((None, None, 'embed'), (None, None, 'lm_head'))
    """
    return _parse_name(str(name))


@functools.lru_cache(maxsize=1 << 18)      # every stage asks again for each of 100,000 names
def _parse_name(name: str) -> tuple[str | None, int | None, str]:
    parts = name.split(".")
    idx = _block_position(parts)
    if idx is None:
        rest = [p for p in parts if p not in _WRAPPERS and not p.isdecimal()] or parts
        return None, None, _kind_of(tuple(rest), False)
    ns: list[str] = []
    for p in parts[:idx]:
        if p in _WRAPPERS or p.isdecimal() or (ns and ns[-1] == p):
            continue
        ns.append(p)
    if idx > 0 and parts[idx - 1] in _WRAPPERS:   # keep the container even when it is a wrapper word
        ns.append(parts[idx - 1])
    label = ".".join(ns + [parts[idx]])
    return label, int(parts[idx]), _kind_of(tuple(parts[idx + 1:]), True)


def group_of(name: str, module: str) -> str:
    """The group of a tensor outside any block: ``embeddings`` or ``head``."""
    if module.startswith("embed") or any(p in ("embeddings", "embed") for p in str(name).split(".")):
        return "embeddings"
    return "head"


def component_of(name: str) -> str:
    """The block label of a tensor, or ``embeddings``/``head`` outside blocks.

    >>> component_of("model.layers.3.mlp.up_proj.weight"), component_of("lm_head.weight")
    ('layers.3', 'head')
    """
    block, _, module = parse_name(name)
    return block if block is not None else group_of(name, module)


def _leaf(name: str) -> str:
    """The module part of a parameter name: ``a.b.weight`` -> ``a.b``."""
    for end in (".weight", ".bias"):
        if name.endswith(end):
            return name[: -len(end)]
    return name


def is_embedding(name: str) -> bool:
    """A token-embedding matrix by its name (Llama, GPT-2, BERT, T5, NeoX, ...).

    >>> is_embedding("model.embed_tokens.weight"), is_embedding("transformer.wpe.weight")
    (True, False)
    """
    # (``_leaf`` of a name ending in ``.weight`` is the name without it)
    return name.endswith(".weight") and name[:-7].rpartition(".")[2] in _EMBED_LEAVES


def is_router(name: str) -> bool:
    """A mixture-of-experts router's tensor by its name: one row (or value) per expert, so a model whose experts
    were added or removed (upcycled) has more or fewer of them, and the rows of the experts both keep compare.

    >>> is_router("model.layers.1.block_sparse_moe.gate.weight"), is_router("model.layers.1.mlp.gate_proj.weight")
    (True, False)
    >>> is_router("model.layers.3.mlp.gate.e_score_correction_bias"), is_router("model.layers.0.mlp.router.bias")
    (True, True)
    """
    n = str(name)
    if n.endswith(".e_score_correction_bias"):
        return True
    if n.endswith(".bias"):
        n = n[:-len("bias")] + "weight"
    return parse_name(n)[2] == "mlp.router"


def is_lm_head(name: str) -> bool:
    """An output projection onto the vocabulary by its name.

    >>> is_lm_head("lm_head.weight"), is_lm_head("model.layers.0.mlp.output.weight")
    (True, False)
    """
    leaf = _leaf(name)
    # a bare top-level `head.weight` is RWKV's output projection (and a classifier's, whose rows are classes:
    # resized the same way when classes are added)
    return name.endswith(".weight") and (leaf == "head" or any(leaf == h or leaf.endswith("." + h) and h != "output"
                                                               for h in _HEAD_NAMES))


def _vocab_like(name: str) -> bool:
    leaf = _leaf(name)
    return is_embedding(name) or is_lm_head(name) or any(leaf == h or leaf.endswith("." + h) for h in
                                                         ("lm_head", "cls.predictions", "embed_out"))

# ---------------------------------------------------------------- buffers

#: leaf names of non-trainable buffers that models save beside their parameters
BUFFER_LEAVES = {"position_ids", "token_type_ids", "inv_freq", "running_mean", "running_var",
                 "num_batches_tracked", "masked_bias", "_float_tensor", "freqs_cis", "cos_cached", "sin_cached"}
#: dtypes that never hold trainable parameters (8-bit integers can: quantized weights)
BUFFER_DTYPES = {"I64", "I32", "I16", "U64", "U32", "U16", "BOOL"}


def is_buffer(name: str, dtype: str | None = None, shape=None) -> bool:
    """A non-trainable buffer: position ids, rotary frequencies, a causal mask, BatchNorm
    running statistics (by name), or any tensor of a wide integer or bool dtype.

    GPT-2's causal mask ``h.N.attn.bias`` is a buffer by its name and its 4 dimensions
    (a real bias has one); 8-bit integers are quantized weights, not buffers.

    >>> is_buffer("embeddings.position_ids", "I64"), is_buffer("h.0.attn.bias", "F32", (1, 1, 8, 8))
    (True, True)
    >>> is_buffer("h.0.attn.c_attn.bias", "F32", (96,)), is_buffer("q.weight", "I8", (4, 4))
    (False, False)
    """
    head, dot, leaf = str(name).rpartition(".")
    if leaf in BUFFER_LEAVES or (dtype is not None and dtype in BUFFER_DTYPES):
        return True
    # the component before the leaf is the last one of the head
    return leaf == "bias" and bool(dot) and head.rpartition(".")[2] == "attn" and shape is not None and len(shape) >= 2


def clear_name_caches() -> None:
    """Forget the parsed names (a comparison calls this when it is done with its checkpoints)."""
    _parse_name.cache_clear()
    _kind_of.cache_clear()
