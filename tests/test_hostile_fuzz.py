"""Fuzz (hypothesis) over adapter_config.json and over ``weightdiff report``'s JSON: values of the wrong
type, size and nesting in every field give bad input (a one-line WeightdiffError) or a result, never an
internal error. Kept to about 20 s in all."""

from __future__ import annotations

import copy
import json
import uuid
import warnings

import matplotlib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightdiff
from render_sample import cached_result
from weightdiff.errors import WeightdiffError
from weightdiff.io.safetensors_write import save_file
from weightdiff.render import memo
from weightdiff.render.captions import headline_sentences
from weightdiff.render.report import validate_result
from weightdiff.render.tabular import to_csv

matplotlib.use("Agg")

huge = st.sampled_from([10 ** 400, -(10 ** 30), 2 ** 63, 1e308, -1e308, 5e-324, -0.0, 0, 1, 2 ** 31])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | huge | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["false", "true", "LORA", "lora", "LOHA", "IA3", "\u202e", "\x1b[2J"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
deep = st.integers(20, 200).map(lambda n: json.loads("[" * n + "]" * n))

# -- adapter_config.json -------------------------------------------------------------------------------

PRE = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
pattern_keys = st.sampled_from(["q_proj", Q, r"layers\.\d+\.self_attn\.q_proj", "(x+x+)+y", "(a|a)*", "[",
                                ".*", "q_proj|v_proj", r"(a)\1", "(?=q)q_proj", "x" * 2000, ""]) | st.text(max_size=12)
pattern_values = st.integers(-3, 64) | huge | st.floats(allow_nan=False) | json_values
config_fields = {
    "peft_type": st.sampled_from(["LORA", "lora", "LOHA", "LOKR", "IA3", None, 3]) | json_values,
    "r": st.sampled_from([4, 4, 4, 8, 0, -1, True]) | huge | json_values,
    "lora_alpha": st.sampled_from([8, 16.0, 0]) | huge | st.floats(allow_nan=False) | json_values,
    "use_rslora": st.booleans() | json_values, "use_dora": st.booleans() | json_values,
    "fan_in_fan_out": st.booleans() | json_values,
    "alpha_pattern": st.dictionaries(pattern_keys, pattern_values, max_size=3) | json_values | deep,
    "rank_pattern": st.dictionaries(pattern_keys, pattern_values, max_size=3) | json_values,
    "target_modules": st.sampled_from([["q_proj"], "q_proj", "all-linear", None]) | json_values,
    "base_model_name_or_path": json_values,
}
configs = st.fixed_dictionaries({}, optional=config_fields)


@pytest.fixture(scope="module")
def adapter_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_adapter")
    rng = np.random.default_rng(0)
    save_file(d / "base.safetensors", {f"{Q}.weight": rng.standard_normal((16, 16)).astype(np.float32),
                                       "model.norm.weight": np.ones(16, np.float32)})
    factors = {PRE + f"{Q}.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               PRE + f"{Q}.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
               PRE + f"{Q}.lora_magnitude_vector": np.ones(16, np.float32)}
    return d, factors


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(config=configs, dora=st.booleans())
def test_adapter_config_fuzz(adapter_pair, config, dora):
    d, factors = adapter_pair
    ad = d / uuid.uuid4().hex
    ad.mkdir()
    tensors = dict(factors) if dora else {k: v for k, v in factors.items() if "magnitude" not in k}
    save_file(ad / "adapter_model.safetensors", tensors)
    (ad / "adapter_config.json").write_text(json.dumps(config))
    try:
        r = weightdiff.compare(str(d / "base.safetensors"), str(ad))
    except WeightdiffError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        return
    t = r.tensor(f"{Q}.weight")
    assert t.compared == "factors" and np.isfinite(t.norm_delta)
    json.loads(r.to_json())


ids = st.lists(st.integers(-1, 13), max_size=4) | st.lists(st.integers(-2, 14) | huge, max_size=5) | json_values
token_fields = {
    "r": st.sampled_from([4, 4, 2]), "lora_alpha": st.sampled_from([8, 4]),
    "target_modules": st.sampled_from([["q_proj"], ["embed_tokens"], "embed_tokens", None]) | json_values,
    "trainable_token_indices": ids | st.dictionaries(st.sampled_from(["embed_tokens", "lm_head", Q, ""]) | st.text(
        max_size=6), ids, max_size=3),
    "token_indices": ids | st.dictionaries(st.text(max_size=6), ids, max_size=2),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(config=st.fixed_dictionaries({"peft_type": st.sampled_from(["LORA", "TRAINABLE_TOKENS", "trainable_tokens"])
                                      | json_values}, optional=token_fields), rows=st.sampled_from([1, 2, 3]),
       wrapped=st.booleans(), lora=st.booleans(), head=st.booleans())
def test_trainable_tokens_fuzz(adapter_pair, config, rows, wrapped, lora, head):
    """Trainable tokens' ids of every type and size, under either config, rows of 1-3 ids, with or without LoRA
    factors and a head's copy: a one-line error or finite records, never an internal error."""
    d, factors = adapter_pair
    emb = d / "base_emb.safetensors"
    if not emb.exists():
        rng = np.random.default_rng(1)
        save_file(emb, {"model.embed_tokens.weight": rng.standard_normal((12, 16)).astype(np.float32),
                        f"{Q}.weight": rng.standard_normal((16, 16)).astype(np.float32)})
    ad = d / uuid.uuid4().hex
    ad.mkdir()
    seg = ".token_adapter" if wrapped else ""
    tensors = {k: v for k, v in factors.items() if "magnitude" not in k} if lora else {}
    tensors[f"{PRE}model.embed_tokens{seg}.trainable_tokens_delta"] = np.full((rows, 16), 0.5, np.float32)
    if head:
        tensors[f"{PRE}lm_head{seg}.trainable_tokens_delta"] = np.full((rows, 16), 0.5, np.float32)
    save_file(ad / "adapter_model.safetensors", tensors)
    (ad / "adapter_config.json").write_text(json.dumps(config))
    try:
        r = weightdiff.compare(str(emb), str(ad))
    except WeightdiffError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        return
    assert all(t.norm_delta is None or np.isfinite(t.norm_delta) for t in r.tensors)
    json.loads(r.to_json())


# -- report JSON ---------------------------------------------------------------------------------------------

def _small_result() -> dict:
    data = cached_result()
    ranked = [t for t in data["tensors"] if t.get("rank")][:3]
    others = [t for t in data["tensors"] if not t.get("rank")][:4]
    data["tensors"] = ranked + others
    data["blocks"] = data["blocks"][:3] + data["blocks"][-2:]
    return data


SMALL = _small_result()


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(SMALL) if p and p[0] != "schema"]
wrong = json_values | huge | deep | st.sampled_from([[1], "x", 3, {"a": 1}, [None], "\ud800", 1e300])


@st.composite
def mutated(draw):
    data = copy.deepcopy(SMALL)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if draw(st.booleans()) and isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(wrong)
        except (KeyError, IndexError, TypeError):
            continue
    return data


def _render_text_parts(data: dict) -> None:
    headline_sentences(data)
    blocks = memo.build(data, [], {"path": "r.json", "sha256": "0" * 64, "command": "weightdiff report"})
    memo.to_html(blocks, "t")
    memo.to_markdown(blocks, {})
    to_csv(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_report_json_fuzz_text(data):
    try:
        validate_result(data, "r.json")
    except WeightdiffError as exc:
        assert "\n" not in exc.one_line()
        return
    _render_text_parts(data)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_report_json_fuzz_figures(data):
    from weightdiff.render.plots import render_figures

    try:
        validate_result(data, "r.json")
    except WeightdiffError:
        return
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        render_figures(data, ())
