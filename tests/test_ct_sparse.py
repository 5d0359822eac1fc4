"""compressed-tensors' sparse formats (``sparsity_config`` ``sparse-bitmask`` / ``sparse-24-bitmask``):
decoded to the dense weights exactly as compressed-tensors' own decompressor gives them. The fixtures
under tests/data/ct_sparse were written by compressed-tensors 0.12.2's ModelCompressor (make.py there;
0.20 dropped these compressors), with that version's decompression in ref.npz. Unread, the values and
bitmasks paired as added tensors and a 2:4-pruned model read "none of its own weights changed"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from weightdiff import compare
from weightdiff.errors import CheckpointError
from weightdiff.io.checkpoint import locate
from weightdiff.kernels.reference import decode

DATA = Path(__file__).parent / "data" / "ct_sparse"
SPARSE = ("lossless-bitmask", "pruned-bitmask", "pruned-24", "holes-bitmask")
LINEARS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.0.mlp.up_proj.weight")


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "ref.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("folder", SPARSE)
def test_decoded_as_compressed_tensors_decompresses(folder, ref):
    with locate(DATA / "base") as base, locate(DATA / folder) as ck:
        assert sorted(ck.tensors) == sorted(base.tensors)          # values, masks, shapes folded away
        assert ck.params == base.params
        for name in LINEARS:
            info = ck.tensors[name]
            assert info.dtype == "BF16" and info.quant is None    # lossless: a plain tensor, no floor
            want = ref[f"{folder}/{name}"]
            got = decode(ck.read(name), "BF16").reshape(want.shape)
            np.testing.assert_array_equal(got, want)
            flat = np.concatenate([decode(w, "BF16") for w in ck.windows(name, 97)])   # windows straddle rows
            np.testing.assert_array_equal(flat, want.reshape(-1))
            np.testing.assert_array_equal(decode(ck.read_rows(name, [5, 3, 4]), "BF16").reshape(3, -1),
                                          want[[5, 3, 4]])
            assert ck.floor_windows(name) is None


def test_a_lossless_copy_is_identical_and_pruned_ones_changed():
    r = compare(DATA / "base", DATA / "lossless-bitmask", rank=False)
    assert r.summary.verdict == "identical", r.summary.verdict_reason
    for folder in ("pruned-bitmask", "pruned-24", "holes-bitmask"):
        r = compare(DATA / "base", DATA / folder, rank=False)
        s = r.summary
        assert s.verdict == "derived", s.verdict_reason
        assert s.tensors_by_status.get("added", 0) == 0 and s.tensors_by_status.get("removed", 0) == 0
        assert sorted(t.name for t in r.tensors if t.status == "changed") == sorted(LINEARS)
    r = compare(DATA / "pruned-bitmask", DATA / "pruned-24", rank=False)
    assert r.summary.verdict == "identical"                         # one pruning, two layouts


def _copy(tmp_path, folder, edit_config=None):
    out = tmp_path / folder
    shutil.copytree(DATA / folder, out)
    if edit_config is not None:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("edit, problem", [
    (lambda qc: qc["sparsity_config"].update(format="marlin-24"),
     "compressed-tensors sparsity_config format 'marlin-24' is not supported"),
    (lambda qc: qc.update(config_groups={"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8}}}),
     "compressed-tensors sparsity_config format 'sparse-24-bitmask' together with quantization (config_groups) "
     "is not supported"),
])
def test_other_sparse_layouts_are_refused_in_one_line(tmp_path, edit, problem):
    from click.testing import CliRunner
    from weightdiff.cli import main

    tuned = _copy(tmp_path, "pruned-24", edit)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(DATA / "base"), str(tuned), "--no-rank", "-q", "--json", str(out)])
    assert r.exit_code == 2 and r.stdout == "" and not out.exists()
    assert r.stderr.startswith(f"error: {tuned / 'config.json'}: {problem}") and r.stderr.count("\n") == 1


def test_a_mask_that_does_not_match_its_values_is_refused(tmp_path):
    """compressed-tensors fills the mask's places with the values in order: a count that differs is a
    corrupt file, not a shorter weight."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file


    tuned = _copy(tmp_path, "holes-bitmask")
    t = load_file(str(tuned / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.compressed"
    t[name] = t[name][:-1]
    save_file(t, str(tuned / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"`model.layers.0.mlp.down_proj.bitmask` marks 1,519 non-zero "
                                              r"values, but `model.layers.0.mlp.down_proj.compressed` holds 1,518"):
        compare(DATA / "base", tuned, rank=False)


def test_the_weights_without_their_config_are_read_by_their_names(tmp_path):
    """model.safetensors copied out of the folder: the names ``m.compressed``, ``m.bitmask``, ``m.shape``
    say what it is, as for the quantized formats."""
    for folder in ("pruned-24", "holes-bitmask"):
        (tmp_path / folder).mkdir()
        shutil.copy(DATA / folder / "model.safetensors", tmp_path / folder / "model.safetensors")
        r = compare(DATA / "base", tmp_path / folder / "model.safetensors", rank=False)
        assert r.summary.verdict == "derived" and r.summary.tensors_by_status.get("added", 0) == 0
        assert sorted(t.name for t in r.tensors if t.status == "changed") == sorted(LINEARS)
