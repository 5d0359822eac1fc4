"""Hostile-input round H: tiny files that allocated gigabytes, NaN cosines read as sign flips, empty
tensors that crashed or broke the result's own schema, numpy warnings beside the one error line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from weightdiff.cli import main
from weightdiff.kernels import reference


def st_file(path: Path, header: dict, data: bytes = b"") -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def one_error_line(r, *expect: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# -- an empty quantized weight: refused before any column-wise unpacking ----------------------------

def _empty_pack_quantized(root: Path) -> tuple[Path, Path]:
    """The tester's 345-byte compressed-tensors checkpoint: weight_packed I32 [0, 1.25e8] (0 bytes),
    weight_shape [0, 1e9]; the base an F32 [1e9, 0]. Unpacking it allocated 7.45 GiB per array."""
    n, m = 10 ** 9, "model.layers.0.mlp.up_proj"
    base, tuned = root / "base", root / "tuned"
    base.mkdir()
    tuned.mkdir()
    st_file(base / "model.safetensors", {f"{m}.weight": entry("F32", [n, 0], 0, 0)})
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    st_file(tuned / "model.safetensors",
            {f"{m}.weight_packed": entry("I32", [0, n // 8], 0, 0), f"{m}.weight_shape": entry("I64", [2], 0, 16),
             f"{m}.weight_scale": entry("F16", [0, n // 128], 16, 16)}, np.array([0, n], np.int64).tobytes())
    (tuned / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                               "strategy": "group", "group_size": 128}}}}}))
    return base, tuned


def _capped_address_space() -> None:           # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the address space on Linux")
def test_empty_quantized_weight_is_bad_input_within_2_gb(tmp_path):
    base, tuned = _empty_pack_quantized(tmp_path)
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-c", "from weightdiff.cli import main; main()", "compare", str(base),
                        str(tuned), "--json", str(out), "-q"], capture_output=True, text=True, timeout=120,
                       preexec_fn=_capped_address_space, env={**os.environ, "WEIGHTDIFF_DEBUG": ""})
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert str(tuned / "model.safetensors") in lines[0]
    assert "`model.layers.0.mlp.up_proj.weight` declares shape [0, 1000000000], which holds no elements" in lines[0]
    assert not out.exists()


def test_empty_quantized_weight_refused_by_inspect(tmp_path):
    _, tuned = _empty_pack_quantized(tmp_path)
    one_error_line(CliRunner().invoke(main, ["inspect", str(tuned)]), str(tuned / "model.safetensors"),
                   "holds no elements")
