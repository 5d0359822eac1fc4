"""End-to-end: checkpoints with a known answer -> weightdiff.compare -> verdict and figures.

Each case of issue 5's "done when" list, on tiny Llama/GPT-2/ViT checkpoints written
by the test itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import weightdiff
from weightdiff.cli import main
from conftest import write_checkpoint
from models import gpt2, llama, low_rank_update, vit

LAYERS = 4


@pytest.fixture(scope="module")
def base_tensors():
    return llama(np.random.default_rng(7), layers=LAYERS)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, base_tensors):
    return write_checkpoint(tmp_path_factory.mktemp("base"), base_tensors)


def _compare(base, tuned, **kw):
    return weightdiff.compare(str(base), str(tuned), **kw)


def test_identical_copy(tmp_path, base_dir, base_tensors):
    tuned = write_checkpoint(tmp_path / "tuned", base_tensors, shards=3)
    r = _compare(base_dir, tuned)
    s = r.summary
    assert s.verdict == "identical"
    assert s.blocks_changed == 0 and s.blocks_total == LAYERS
    assert s.params_by_status["unchanged"] == s.params_total
    assert s.relative_change == 0.0
    assert s.delta_params == 0
    assert all(t.rank is None for t in r.tensors)


def test_fp32_to_bf16_cast_is_cast_only(tmp_path, base_dir, base_tensors):
    tuned = write_checkpoint(tmp_path / "tuned", base_tensors, dtype="BF16")
    r = _compare(base_dir, tuned)
    assert r.summary.verdict == "cast_only"
    assert r.summary.params_by_status["rounding"] == r.summary.params_total
    assert all(t.frac_beyond_rounding == 0.0 for t in r.tensors)
    assert r.summary.delta_params == 0


def test_rank8_update_on_q_and_v_of_last_two_blocks_in_bf16(tmp_path, base_tensors):
    rng = np.random.default_rng(1)
    base = write_checkpoint(tmp_path / "base", base_tensors, dtype="BF16")
    tuned_t = dict(base_tensors)
    changed = []
    for i in (LAYERS - 2, LAYERS - 1):
        for m in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{m}.weight"
            tuned_t[name] = low_rank_update(rng, base_tensors[name], 8)
            changed.append(name)
    tuned = write_checkpoint(tmp_path / "tuned", tuned_t, dtype="BF16")
    r = _compare(base, tuned)
    s = r.summary
    assert s.verdict == "derived"
    assert s.blocks_changed == 2
    assert s.form["kind"] == "low_rank"
    assert s.form["max_numerical_rank"] == 8
    for t in r.tensors:
        if t.name in changed:
            assert t.status == "changed"
            assert t.rank.numerical_rank == 8
            assert t.rank.energy_rank_99 <= 8
            assert t.rel_change == pytest.approx(0.05, rel=0.1)
        else:
            assert t.status == "unchanged", t.name
    # delta_params: each changed 128x128 matrix needs at most 8 * (128 + 128) numbers
    assert 0 < s.delta_params <= 4 * 8 * 256


def test_one_block_fine_tuned(tmp_path, base_dir, base_tensors):
    rng = np.random.default_rng(2)
    tuned_t = {k: (v + rng.normal(0, 1e-3, v.shape).astype(np.float32)) if k.startswith("model.layers.1.") else v
               for k, v in base_tensors.items()}
    r = _compare(base_dir, write_checkpoint(tmp_path / "tuned", tuned_t))
    assert r.summary.verdict == "derived"
    assert r.summary.blocks_changed == 1
    changed_blocks = [b.block for b in r.blocks if b.params_changed]
    assert len(changed_blocks) == 1 and "1" in changed_blocks[0]
    assert r.summary.form["kind"] == "dense"


def test_every_weight_trained_is_dense_everywhere(tmp_path, base_dir, base_tensors):
    rng = np.random.default_rng(3)
    tuned_t = {k: v + rng.normal(0, 2e-3, v.shape).astype(np.float32) for k, v in base_tensors.items()}
    r = _compare(base_dir, write_checkpoint(tmp_path / "tuned", tuned_t))
    s = r.summary
    assert s.verdict == "derived"
    assert s.blocks_changed == LAYERS
    assert s.params_by_status["changed"] == s.params_total
    assert s.form["kind"] == "dense"
    q = r.tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.rank.energy_rank_90 > 40          # noise spreads over many directions


def test_added_classification_head(tmp_path, base_dir, base_tensors):
    tuned_t = dict(base_tensors)
    tuned_t["score.weight"] = np.random.default_rng(4).normal(0, 0.02, (3, 128)).astype(np.float32)
    r = _compare(base_dir, write_checkpoint(tmp_path / "tuned", tuned_t))
    assert r.tensor("score.weight").status == "added"
    assert "added_tensors" in r.summary.flags
    assert r.summary.params_by_status["added"] == 3 * 128


def test_vocabulary_grown_by_50_tokens(tmp_path, base_dir, base_tensors):
    rng = np.random.default_rng(5)
    tuned_t = dict(base_tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        new = rng.normal(0, 0.02, (50, 128)).astype(np.float32)
        tuned_t[name] = np.concatenate([base_tensors[name], new])
    r = _compare(base_dir, write_checkpoint(tmp_path / "tuned", tuned_t))
    emb = r.tensor("model.embed_tokens.weight")
    assert emb.status == "resized"
    assert emb.norm_delta == 0.0 and emb.numel_compared == 512 * 128
    assert "resized_embeddings" in r.summary.flags
    assert r.summary.verdict == "derived"


def test_composite_vit_gpt2_against_two_bases(tmp_path):
    rng = np.random.default_rng(6)
    vit_t = vit(rng)
    gpt_t = gpt2(rng)
    vit_dir = write_checkpoint(tmp_path / "vit", vit_t)
    gpt_dir = write_checkpoint(tmp_path / "gpt2", gpt_t)
    tuned_t = {}
    for k, v in vit_t.items():
        tuned_t["encoder." + k[len("vit."):]] = v
    for k, v in gpt_t.items():
        tuned_t["decoder." + k] = v
    cross = []
    for i in range(2):
        for m in ("c_attn", "q_attn", "c_proj"):
            name = f"decoder.transformer.h.{i}.crossattention.{m}.weight"
            shape = (64, 128) if m == "c_attn" else (64, 64)
            tuned_t[name] = rng.normal(0, 0.02, shape).astype(np.float32)
            cross.append(name)
    tuned = write_checkpoint(tmp_path / "ved", tuned_t)
    r = weightdiff.compare([str(vit_dir), str(gpt_dir)], str(tuned))
    for name in cross:
        assert r.tensor(name).status == "added"
    paired = [t for t in r.tensors if t.status == "unchanged"]
    assert len(paired) == len(vit_t) + len(gpt_t)
    assert {t.base_index for t in paired} == {0, 1}
    assert "composite_base" in r.summary.flags


def test_independent_init_is_unrelated(tmp_path, base_dir):
    other = llama(np.random.default_rng(99), layers=LAYERS)
    r = _compare(base_dir, write_checkpoint(tmp_path / "other", other))
    assert r.summary.verdict == "unrelated"
    # over the large matrices (norm gains near 1 in every model are left out of relatedness)
    assert r.summary.relatedness_rel_change == pytest.approx(np.sqrt(2), rel=0.1)
    assert abs(r.summary.relatedness_cosine) < 0.05


def test_same_inputs_same_json_bytes(tmp_path, base_dir, base_tensors):
    rng = np.random.default_rng(8)
    tuned_t = dict(base_tensors)
    tuned_t["model.layers.2.mlp.up_proj.weight"] = low_rank_update(rng, base_tensors["model.layers.2.mlp.up_proj.weight"], 4)
    tuned = write_checkpoint(tmp_path / "tuned", tuned_t)
    a = _compare(base_dir, tuned, threads=1).to_json(include_run=False)
    b = _compare(base_dir, tuned, threads=2).to_json(include_run=False)
    assert a == b
    d = json.loads(a)
    assert d["schema"] == "weightdiff.compare/2"
    for key in ("verdict", "scope", "form", "flags", "params_total", "params_by_status", "relative_change",
                "blocks_total", "blocks_changed", "delta_params", "delta_params_share"):
        assert key in d["summary"]


def test_cli_json_stdout_is_only_json(tmp_path, base_dir, base_tensors):
    tuned = write_checkpoint(tmp_path / "tuned", base_tensors, dtype="BF16")
    res = CliRunner().invoke(main, ["compare", str(base_dir), str(tuned), "--json", "-", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["verdict"] == "cast_only"


def test_cli_text_summary_and_files(tmp_path, base_dir, base_tensors):
    rng = np.random.default_rng(9)
    tuned_t = dict(base_tensors)
    tuned_t["model.layers.3.self_attn.q_proj.weight"] = low_rank_update(
        rng, base_tensors["model.layers.3.self_attn.q_proj.weight"], 2)
    tuned = write_checkpoint(tmp_path / "tuned", tuned_t)
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    res = CliRunner().invoke(main, ["compare", str(base_dir), str(tuned), "--json", str(out_json),
                                    "--csv", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert "DERIVED" in res.stdout
    assert "1 of 4 blocks changed" in res.stdout
    assert "model.layers.3.self_attn.q_proj.weight" in res.stdout
    assert "plan:" in res.stderr and "plan:" not in res.stdout
    assert json.loads(out_json.read_text())["summary"]["blocks_changed"] == 1
    assert out_csv.read_text().splitlines()[0].startswith("name,base_name,status")


def test_cli_bad_input_one_line_exit_2(tmp_path, base_dir):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05")
    res = CliRunner().invoke(main, ["compare", str(base_dir), str(bad)])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "bad.safetensors" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_unwritable_output_is_one_line_exit_2(tmp_path, base_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["compare", str(base_dir), str(base_dir), "-q", "--json",
                                    str(blocker / "out.json")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "out.json" in res.stderr and "Traceback" not in res.stderr


def test_cli_cuda_without_a_gpu_fails_before_reading(tmp_path, base_dir, monkeypatch):
    from weightdiff.kernels import cuda

    def no_gpu(device="cuda"):
        raise cuda.DeviceUnavailable("no CUDA device", "install a CUDA build of torch")

    monkeypatch.setattr(cuda, "require_device", no_gpu)
    res = CliRunner().invoke(main, ["compare", str(base_dir), str(base_dir), "--device", "cuda"])
    assert res.exit_code == 2
    assert res.stderr == "error: --device cuda: no CUDA device (install a CUDA build of torch)\n"


def test_a_comparison_pauses_the_cycle_collector_and_makes_no_cycles_per_tensor(tmp_path):
    """compare() runs with the cyclic collector paused and leaves it as it found it (on, off, after
    an error); that is only safe while a comparison makes no reference cycles per tensor, so the
    cyclic garbage of 40 and of 400 tensors (small matrices that change, with ranks) is the same."""
    import gc

    from weightdiff import compare
    from weightdiff.errors import WeightdiffError

    def pair(n):
        rng = np.random.default_rng(n)
        base = {f"model.layers.{i}.mlp.w{j}.weight": rng.normal(size=(6, 5)).astype(np.float32)
                for i in range(n // 4) for j in range(4)}
        tuned = {k: v + (rng.normal(size=v.shape).astype(np.float32) if i % 2 else 0) for i, (k, v) in enumerate(base.items())}
        write_checkpoint(tmp_path / f"b{n}", base)
        write_checkpoint(tmp_path / f"t{n}", tuned)
        return tmp_path / f"b{n}", tmp_path / f"t{n}"

    seen = []
    real = weightdiff.comparison.compute_all
    try:
        weightdiff.comparison.compute_all = lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k)
        garbage = {}
        for n in (40, 400):
            b, t = pair(n)
            compare(b, t)                         # warm: imports and caches make their own objects
            gc.collect()
            assert gc.isenabled()
            compare(b, t)
            garbage[n] = gc.collect()
        gc.disable()
        compare(*pair(40))
        assert not gc.isenabled()
        gc.enable()
        with pytest.raises(WeightdiffError):
            compare(tmp_path / "missing", tmp_path / "t40")
        assert gc.isenabled()
    finally:
        weightdiff.comparison.compute_all = real
        gc.enable()
    assert seen and not any(seen)
    assert garbage[400] <= garbage[40] + 20, garbage


def test_a_removed_matrix_beside_an_added_one_of_its_shape_is_not_called_unchanged(tmp_path, base_dir, base_tensors):
    # an ONNX export names a MatMul weight `onnx::MatMul_N`: changed so much that its values no longer
    # correlate with the base's, it pairs neither by name nor by content. "none of its own weights changed"
    # would be false; the title and reason say it may be that weight changed beyond recognition
    rng = np.random.default_rng(3)
    name = "model.layers.1.self_attn.q_proj.weight"
    t = dict(base_tensors)
    t["onnx::MatMul_7"] = np.ascontiguousarray(rng.normal(0, 0.05, base_tensors[name].shape).astype(np.float32).T)
    del t[name]
    from weightdiff.render.sentences import verdict_title

    r = CliRunner().invoke(main, ["compare", str(base_dir), str(write_checkpoint(tmp_path / "t", t)),
                                  "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.stderr
    s = json.loads((tmp_path / "a.json").read_text())["summary"]
    assert s["verdict"] == "derived" and "unpaired_lookalikes" in s["flags"]
    assert verdict_title(s) == ("DERIVED: this base with tensors added, removed or changed beyond recognition; "
                                "none of the weights paired with it changed.")
    assert "1 removed base matrix has an added tuned matrix of its shape beside it" in s["verdict_reason"]
    # a new tensor of another shape beside a removed one: removed and added, as before
    t2 = dict(base_tensors)
    t2["extra.weight"] = rng.normal(0, 0.05, (7, 9)).astype(np.float32)
    del t2[name]
    r = CliRunner().invoke(main, ["compare", str(base_dir), str(write_checkpoint(tmp_path / "t2", t2)),
                                  "--json", str(tmp_path / "b.json")])
    s2 = json.loads((tmp_path / "b.json").read_text())["summary"]
    assert "unpaired_lookalikes" not in s2["flags"]
    assert verdict_title(s2) == "DERIVED: this base with tensors added and removed; none of its own weights changed."
    # the removed base tensor is said apart: "0 of N tensors changed" alone read as if nothing differed
    assert "; 1 base tensor removed;" in s2["verdict_reason"]


def test_a_0d_tensor_counts_once_on_both_sides_of_the_coverage(tmp_path, base_dir, base_tensors):
    # a scalar parameter (CLIP's logit_scale) counted in `compared` but not in `params` read "100.001%"
    t = dict(base_tensors)
    t["model.scale"] = np.array(2.5, np.float32)
    a, b = write_checkpoint(tmp_path / "a", t), write_checkpoint(tmp_path / "b", t)
    s = _compare(a, b).summary
    for side in ("base", "tuned"):
        assert s.coverage[side]["compared"] == s.coverage[side]["params"] == s.params_total
        assert s.coverage[side]["share"] == 1.0
