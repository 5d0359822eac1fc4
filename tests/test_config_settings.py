"""A config.json that changes what transformers computes with (the RoPE base, its scaling, a context length) beside
weights that are the base's: the verdict, of the weights, stands, and the title names the settings (flag
``config_differs``), as ``gguf_metadata_differs`` does for a GGUF. A config re-saved by another transformers (which
spells the RoPE in ``rope_parameters`` and writes defaults) is not a difference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.comparison import compare
from weightdiff.io.model_config import run_settings, settings_differ
from weightdiff.render.sentences import verdict_title

from conftest import write_checkpoint
from models import llama

BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 4096, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
V5 = {**{k: v for k, v in BASE.items() if k not in ("rope_theta", "rope_scaling")},
      "rope_parameters": {"rope_type": "default", "rope_theta": 10000}, "head_dim": 16, "transformers_version": "5.1.0"}


@pytest.mark.parametrize("tuned, want", [
    (BASE, []),
    (V5, []),                                                     # transformers 5's spelling, defaults written
    ({**BASE, "rope_theta": 1e6}, ["rope_theta"]),
    ({**V5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, ["rope_theta"]),
    ({**BASE, "rope_scaling": {"type": "linear", "factor": 4.0}}, ["rope_scaling"]),
    ({**BASE, "rope_scaling": {"rope_type": "default"}}, []),
    ({**BASE, "max_position_embeddings": 32768, "sliding_window": 4096}, ["max_position_embeddings"]),
    ({**BASE, "rms_norm_eps": 1e-6, "num_key_value_heads": 4}, ["num_key_value_heads", "rms_norm_eps"]),
    ({**BASE, "rms_norm_eps": 1.0000001e-5, "torch_dtype": "float32", "_name_or_path": "x"}, []),
    ({"text_config": {**BASE, "rope_theta": 5e5}, "model_type": "llava"}, ["rope_theta"]),     # the text model's
])
def test_settings_that_differ(tuned, want):
    assert [k for k, _, _ in settings_differ(BASE, tuned)] == want


def test_llama3_rope_scaling_in_either_spelling_is_the_same_and_per_layer_rope_is_not_compared():
    v4 = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "type": "llama3", "factor": 8.0,
                                               "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                              "rope_theta": 500000}}
    assert settings_differ(v4, v5) == []
    assert [k for k, _, _ in settings_differ(v4, {**v5, "rope_parameters": {**v5["rope_parameters"], "factor": 16.0}})] \
        == ["rope_scaling"]
    gemma3 = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert "rope_scaling" not in run_settings(gemma3)
    assert run_settings([1]) == {} and settings_differ("x", BASE) == []


def test_a_long_context_rerelease_with_the_base_weights_is_identical_and_says_its_config_differs(tmp_path):
    t = llama(np.random.default_rng(0), layers=2, hidden=64, inter=128, vocab=96, kv=32)
    a, b = write_checkpoint(tmp_path / "a", t), write_checkpoint(tmp_path / "b", t)
    (a / "config.json").write_text(json.dumps(BASE))
    (b / "config.json").write_text(json.dumps({**BASE, "rope_theta": 1e6, "max_position_embeddings": 32768}))
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--json", str(out), "--no-rank", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["verdict"] == "identical" and "config_differs" in s["flags"]
    assert s["scope"]["config_differs"] == {"keys": ["max_position_embeddings", "rope_theta"]}
    assert "its config.json sets what transformers runs it with otherwise (`max_position_embeddings`, `rope_theta`)" \
        in verdict_title(s)
    assert any("`rope_theta` `10000.0` in the base, `1000000.0` in the tuned model" in n for n in doc["plan"]["notes"])
    r = CliRunner().invoke(main, ["report", str(out), "--markdown", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.output
    assert "it may not compute what the base computes" in (tmp_path / "m.md").read_text()
    # transformers 5's re-save of the same config, and a fine-tune beside a changed config: no flag
    (b / "config.json").write_text(json.dumps(V5))
    assert compare(a, b, rank=False).summary.flags == []
    t2 = dict(t)
    name = next(n for n in t if n.endswith("q_proj.weight"))
    t2[name] = t[name] * 1.01
    c = write_checkpoint(tmp_path / "c", t2)
    (c / "config.json").write_text(json.dumps({**BASE, "rope_theta": 1e6}))
    s = compare(a, c, rank=False).summary
    assert s.verdict == "derived" and "config_differs" not in s.flags
