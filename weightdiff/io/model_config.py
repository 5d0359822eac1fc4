"""What a checkpoint's ``config.json`` says about its LM head: whether it ties it to the embedding.

A model that ties its output head to its input embedding (``tie_word_embeddings``) saves no
``lm_head.weight``. A missing head is a tied head only when the model's config says it ties:
the key itself (at the top, or in a composite model's ``text_config``), else the default that
transformers gives that ``model_type``. transformers writes the key whenever it differs from its
defaults, so a key that is absent means the default: False for the config classes below (their
``__init__`` defaults it to False; generated from transformers 5.24), True for every other
(``PretrainedConfig``'s default). Without a config the tie is assumed, and said to be.

>>> ties_head_of({"model_type": "llama"}).ties, ties_head_of({"model_type": "gpt2"}).ties
(False, True)
>>> ties_head_of({"model_type": "qwen2", "tie_word_embeddings": True}).why
'its config.json sets tie_word_embeddings true'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import CheckpointError
from .files import load_json, read_beside

__all__ = ["HeadTie", "config_of", "ties_head", "ties_head_of", "UNTIED_BY_DEFAULT", "RUN_KEYS", "run_settings",
           "settings_differ"]

_CAP = 4 << 20

#: model types whose transformers config class defaults tie_word_embeddings to False
UNTIED_BY_DEFAULT = frozenset({
    "EvollaModel", "afmoe", "apertus", "apertus1p5", "apertus1p5_text", "arcee", "aria", "aria_text",
    "axk1", "axk2", "bailing_hybrid", "bamba", "beam", "bitnet", "blt", "blt_global_transformer",
    "blt_local_decoder", "blt_local_encoder", "blt_patcher", "bridgetower", "chameleon", "codegen",
    "cohere_asr", "cohere_compass", "cosmos3_edge", "cosmos3_edge_text", "cosmos3_omni", "cwm", "dbrx",
    "deepseek_ocr2", "deepseek_ocr2_encoder", "deepseek_ocr2_text", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "diffllama", "doge", "dory", "dots1", "dots3_note", "dots3_note_text",
    "emu3", "emu3_text_model", "esmc", "eurobert", "evolla", "exaone", "exaone4", "exaone4_5", "exaone_moe",
    "falcon_h1", "fast_vlm", "flex_olmo", "flint", "fsmt", "fuyu", "git", "glm", "glm4", "glm46v",
    "glm4_moe", "glm4_moe_lite", "glm4v", "glm4v_moe", "glm4v_moe_text", "glm5_next", "glm5_next_text",
    "glm_image", "glm_moe_dsa", "glm_ocr", "glmga", "gpt_neox", "gpt_oss", "gptj", "granite",
    "granite4_vision", "granite4_vision_text", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "helium", "higgs_audio_v2", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "hy_v3", "hy_v4", "hy_v4_vl", "hy_v4_vl_text", "hyperclovax", "idefics", "idefics2", "idefics3",
    "imagegpt", "internlm3", "iquestcoder", "jais2", "jamba", "kimi_linear", "kolibri1",
    "kyutai_speech_to_text", "laguna", "llama", "llama4", "llama4_text", "llava", "llava_next",
    "llava_next_video", "llava_onevision", "longcat_flash", "mamba2", "mellum", "mimo_v2_flash",
    "minicpmv4_6", "minicpmv4_7", "minimax", "minimax_m2", "minimax_m3_vl", "minimax_m3_vl_text",
    "ministral", "ministral3", "mistral", "mistral4", "mistral_large4", "mistral_large4_text", "mixtral",
    "mllama_text_model", "modernvbert", "molmo2", "molmo2_text", "moonshine_streaming", "moshi",
    "moshi_depth", "muse_glimmer_text", "muse_spark_text", "musicgen_decoder", "musicgen_melody_decoder",
    "nanochat", "nemotron", "nemotron_h", "neucodec", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe",
    "openai_privacy_filter", "perception_lm", "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe",
    "pix2struct", "pix2struct_text_model", "pp_formulanet_text", "qianfan_ocr", "qwen2",
    "qwen2_5_omni_talker", "qwen2_5_omni_thinker", "qwen2_5_vl", "qwen2_moe", "qwen2_vl", "qwen3",
    "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next",
    "qwen3_omni_moe_talker_code_predictor", "qwen3_omni_moe_talker_text", "qwen3_omni_moe_thinker",
    "qwen3_vl", "qwen3_vl_moe", "qwen4_exp", "qwen4_exp_text", "reformer", "rembert", "rwkv", "sarvam_mla",
    "sarvam_moe", "seed_oss", "smolvlm", "solar_open", "stablelm", "step3p5", "ultrabert", "ultravbert",
    "unlimited_ocr", "unlimited_ocr_text", "vibevoice", "video_llama_3", "video_llava", "vipllava",
    "xcodec2", "xlstm",
})


@dataclass(frozen=True)
class HeadTie:
    """``ties``: True, False, or None when no config says (the tie is then assumed); ``why``: the
    clause a note quotes."""

    ties: bool | None
    why: str


def ties_head_of(doc: object) -> HeadTie:
    """What a parsed config.json says about the tie."""
    if not isinstance(doc, dict):
        return HeadTie(None, "its config.json is not an object")
    for where, d in (("", doc), ("text_config.", doc.get("text_config"))):
        if isinstance(d, dict) and isinstance(d.get("tie_word_embeddings"), bool):
            v = d["tie_word_embeddings"]
            return HeadTie(v, f"its config.json sets {where}tie_word_embeddings {str(v).lower()}")
    mt = doc.get("model_type")
    if isinstance(mt, str) and mt:
        untied = mt in UNTIED_BY_DEFAULT
        return HeadTie(not untied, f"its config.json (model_type {mt}) leaves tie_word_embeddings at transformers' "
                                   f"default for {mt}, {str(not untied).lower()}")
    return HeadTie(True, "its config.json leaves tie_word_embeddings at transformers' default, true")


def config_of(ckpt: object) -> object:
    """The parsed config.json beside a located checkpoint's weights (a streamed Hub checkpoint's through
    ``read_config``); None when it has none; CheckpointError or OSError when it cannot be read."""
    read = getattr(ckpt, "read_config", None)
    root = getattr(ckpt, "config_dir", None) or getattr(ckpt, "root", None)
    # a config.json that resolves out of the folder is refused (CheckpointError), not read, nor assumed
    got = read_beside(root, "config.json", _CAP) if read is None and root is not None else None
    if read is not None:
        return read("config.json")
    return load_json(got[1], got[0], "config.json") if got is not None else None


def ties_head(ckpt: object) -> HeadTie:
    """Whether located checkpoint ``ckpt`` ties its LM head, from the config.json beside its
    weights (a streamed Hub checkpoint's through ``read_config``)."""
    try:
        doc = config_of(ckpt)
    except (CheckpointError, OSError):
        return HeadTie(None, "its config.json cannot be read, so the tie is assumed")
    if doc is None:
        return HeadTie(None, "it has no config.json to say so, so the tie is assumed")
    return ties_head_of(doc)


#: config.json keys transformers computes with besides the weights (compared when both sides set them): attention,
#: positions, norms' epsilon, activations, soft-capping, routing. A long-context re-release that changes only these is
#: bitwise the base's weights, yet computes something else
RUN_KEYS = ("model_type", "max_position_embeddings", "n_positions", "n_ctx", "sliding_window", "use_sliding_window",
            "max_window_layers", "layer_types", "hidden_act", "hidden_activation", "activation_function", "rms_norm_eps",
            "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "num_attention_heads", "num_key_value_heads", "head_dim",
            "partial_rotary_factor", "rotary_pct", "rotary_emb_base", "attn_logit_softcapping",
            "final_logit_softcapping", "query_pre_attn_scalar", "num_experts_per_tok", "norm_topk_prob",
            "routed_scaling_factor", "attention_multiplier", "embedding_multiplier", "logits_scaling",
            "residual_multiplier", "scale_embedding", "position_embedding_type", "clip_qkv", "logit_scale")


def run_settings(doc: object) -> dict[str, object]:
    """The settings of a parsed config.json that ``settings_differ`` compares: ``RUN_KEYS`` that it sets (not null),
    a multimodal model's ``text_config`` over its top level, and the RoPE base and scaling read alike from
    transformers 4's ``rope_theta`` / ``rope_scaling`` and transformers 5's ``rope_parameters`` (``rope_theta``;
    ``rope_scaling`` None for the default rope, and absent when it is a per-layer-type mapping, which transformers 4
    spelled otherwise)."""
    if not isinstance(doc, dict):
        return {}
    d = {**doc, **(doc.get("text_config") if isinstance(doc.get("text_config"), dict) else {})}
    out: dict[str, object] = {k: d[k] for k in RUN_KEYS if d.get(k) is not None}
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None
    theta = d.get("rope_theta")
    if theta is None and rp is not None:
        theta = rp.get("rope_theta")
    if theta is not None:
        out["rope_theta"] = theta
    rs = d.get("rope_scaling")
    src = rs if isinstance(rs, dict) else rp
    if src is not None and all(isinstance(v, dict) for v in src.values()) and src:
        return out                               # per layer type (Gemma 3 in transformers 5): not compared
    scaling = None
    if src is not None:
        scaling = {("rope_type" if k == "type" else k): v for k, v in src.items() if k != "rope_theta"}
        if scaling.get("rope_type") in (None, "default") and set(scaling) <= {"rope_type"}:
            scaling = None
    elif rs is not None:
        scaling = rs                             # a value of another type: compared as it is
    out["rope_scaling"] = scaling
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except OverflowError:                    # a config integer past a float's range
            return a == b
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def settings_differ(base: object, tuned: object) -> list[tuple[str, str, str]]:
    """The settings (``run_settings``) two parsed config.json documents both set and set otherwise, as ``(key, base
    value, tuned value)`` in JSON, sorted by key. ``rope_scaling`` counts where either side sets it (absent or the
    default rope is none); a key one side leaves out is not compared (a newer transformers writes defaults)."""
    a, b = run_settings(base), run_settings(tuned)
    out = []
    for k in sorted(set(a) & set(b)):
        if not _same(a[k], b[k]):
            out.append((k, json.dumps(a[k], sort_keys=True, default=str), json.dumps(b[k], sort_keys=True, default=str)))
    return out
