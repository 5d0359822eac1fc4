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


# -- a NaN cosine is not a sign flip; an overflowed norm is refused with a NaN beside it ---------------

def _overflowed_stats() -> np.ndarray:
    s = np.zeros(reference.NSTATS)
    for k, v in (("count", 256), ("sum_b2", np.inf), ("sum_t2", np.inf), ("sum_d2", np.inf), ("dot", np.inf),
                 ("n_changed", 1), ("n_beyond", 1), ("max_abs", 0.01), ("nonfinite_b", 1), ("nonfinite_t", 1)):
        s[reference.IDX[k]] = v
    return s


def test_finalize_keeps_a_nan_cosine_unmeasured():
    s = _overflowed_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no RuntimeWarning for inf / inf either
        one = reference.finalize(s)
        many = reference.finalize_many(np.stack([s, s]))
    # max(-1.0, nan) is -1.0: the NaN of inf / inf read as a matrix stored times -1
    assert one["cosine"] is None and one["rel_change"] is None
    assert many == [one, one]


def test_finalize_many_still_clips_like_finalize(rng):
    rows = []
    for cos_target in (1.0 + 1e-12, -1.0 - 1e-12, 0.3):
        s = np.zeros(reference.NSTATS)
        s[reference.IDX["count"]], s[reference.IDX["sum_b2"]], s[reference.IDX["sum_t2"]] = 4, 4.0, 9.0
        s[reference.IDX["dot"]] = cos_target * 6.0
        rows.append(s)
    got = reference.finalize_many(np.stack(rows))
    assert [g["cosine"] for g in got] == [reference.finalize(r)["cosine"] for r in rows] == [1.0, -1.0, 0.3 * 6.0 / 6.0]


def _f64_pair(tmp_path: Path, edit) -> tuple[Path, Path]:
    w = np.random.default_rng(0).standard_normal((16, 16))
    edit(w)
    t = w.copy()
    t[5, 5] += 0.01
    name = "model.layers.0.mlp.up_proj.weight"
    return tuple(st_file(tmp_path / f"{side}.safetensors", {name: entry("F64", [16, 16], 0, 2048)}, a.tobytes())
                 for side, a in (("base", w), ("tuned", t)))


def test_overflowing_f64_with_a_nan_is_refused_not_a_sign_flip(tmp_path):
    def edit(w):
        w[0, 0], w[0, 1] = np.nan, 1e200
    base, tuned = _f64_pair(tmp_path, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(tmp_path / "r.json"), "-q"])
    one_error_line(r, str(base), "holds values too large to measure")
    assert not (tmp_path / "r.json").exists()


def test_overflowing_f64_gives_one_stderr_line_and_no_numpy_warning(tmp_path):
    # the content fingerprint's norm overflowed: numpy printed "RuntimeWarning: overflow encountered in dot"
    def edit(w):
        w[0, 0] = 1e300
    base, tuned = _f64_pair(tmp_path, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(tmp_path / "r.json"), "-q"])
    one_error_line(r, str(base), "holds values too large to measure")


def _scaled_f64_pair(tmp_path: Path, scale: float, tag: str, n: int = 32) -> tuple[Path, Path]:
    """A dense 5% change of an n x n float64 matrix (full rank), every value times ``scale``."""
    r = np.random.default_rng(3)
    w = r.standard_normal((n, n))
    t = w * (1 + 0.05 * r.standard_normal((n, n)))
    name = "model.layers.0.mlp.up_proj.weight"
    return tuple(st_file(tmp_path / f"{side}{tag}.safetensors", {name: entry("F64", [n, n], 0, 8 * n * n)},
                         (a * scale).tobytes()) for side, a in (("base", w), ("tuned", t)))


def _compare_json(tmp_path: Path, base: Path, tuned: Path) -> dict:
    out = tmp_path / f"{tuned.stem}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(out), "-q"])
    assert r.exit_code == 0 and r.stderr == "", (r.stderr, r.exception)
    return json.loads(out.read_text())


@pytest.mark.parametrize("scale", [1e-200, 1e-160])
def test_f64_values_whose_squares_underflow_are_refused_not_rounding(tmp_path, scale):
    """A 5% change of values near 1e-200 read DERIVED "changed only at the level of floating-point rounding",
    rank 0: every sum of squares underflowed to 0 (or to a few subnormal bits). Refused like its overflow twin."""
    base, tuned = _scaled_f64_pair(tmp_path, scale, "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(tmp_path / "r.json"), "-q"])
    one_error_line(r, str(tuned), "holds values too small to measure")
    assert not (tmp_path / "r.json").exists()


def test_f64_values_past_float32_all_over_give_one_line(tmp_path):
    """Every value near 1e200: the round-trip detector's float32 copy printed "RuntimeWarning: overflow
    encountered in cast" (kernels/quant_floor.py) above the one error line."""
    base, tuned = _scaled_f64_pair(tmp_path, 1e200, "", n=64)
    r = subprocess.run([sys.executable, "-m", "weightdiff.cli", "compare", str(base), str(tuned), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {base}: ") and "holds values too large to measure" in r.stderr


@pytest.mark.parametrize("scale", [1e-50, 1e-100])
def test_f64_change_below_float32_normals_has_no_rank_not_rank_zero(tmp_path, scale):
    """Values near 1e-50 have exact float64 sums, but the rank pass's float32 copy of their delta is zeros: rank 0
    read as "no direction above the rounding noise". The rank is now not computed (as past float32's range);
    the same pair at a normal scale keeps its full rank."""
    small = _compare_json(tmp_path, *_scaled_f64_pair(tmp_path, scale, "s"))
    plain = _compare_json(tmp_path, *_scaled_f64_pair(tmp_path, 1.0, "p"))
    (ts,), (tp,) = small["tensors"], plain["tensors"]
    assert tp["rank"]["numerical_rank"] == 32 and plain["summary"]["form"]["kind"] == "dense"
    assert ts["rank"] is None and "too small for float32" in ts["note"]
    summary = small["summary"]
    assert summary["form"]["kind"] == "undecided" and summary["verdict"] == "derived"
    assert "rounding" not in json.dumps([summary["headline"], summary["verdict_reason"], summary["flags"]])
    # the float64 figures are the same at both scales
    for key in ("rel_change", "cosine", "frac_changed"):
        assert ts[key] == pytest.approx(tp[key], rel=1e-12), key


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_differences_past_float32_have_no_rank_not_rank_zero(tmp_path, dtype):
    """Values near 3e38 (float32's and bf16's largest) with half their signs flipped: each difference is past
    float32's range, the rank pass's float32 copy of the delta held infinities, and the matrix read rank 0, "a
    large low-rank update". No rank is taken; a 5% change of the same values keeps its full rank."""
    from weightdiff.io.safetensors_write import to_storage

    r = np.random.default_rng(5)
    w = r.standard_normal((32, 32))
    b = w / np.abs(w).max() * 3e38
    flipped = np.where(r.random((32, 32)) < 0.5, -b, b)
    name = "model.layers.0.mlp.up_proj.weight"
    size = 4 if dtype == "F32" else 2

    def pair(t, tag):      # beside an unchanged matrix: the pair is derived (alone, half its signs flipped, unrelated)
        header = {name: entry(dtype, [32, 32], 0, 1024 * size),
                  name.replace("up", "down"): entry(dtype, [32, 32], 1024 * size, 2048 * size)}
        return tuple(st_file(tmp_path / f"{side}{tag}.safetensors", header,
                             to_storage(a, dtype).tobytes() + to_storage(b, dtype).tobytes())
                     for side, a in (("base", b), ("tuned", t)))

    flip = _compare_json(tmp_path, *pair(flipped, "flip"))
    plain = _compare_json(tmp_path, *pair(np.clip(b * (1 + 0.05 * r.standard_normal((32, 32))), -3.3e38, 3.3e38),
                                          "five"))
    (tf, _), (tp, _) = (sorted(x["tensors"], key=lambda row: "down" in row["name"]) for x in (flip, plain))
    assert flip["summary"]["verdict"] == "derived" and tf["rank"] is None and "beyond float32's range" in tf["note"] and tf["max_abs_delta"] > 3.4e38
    assert flip["summary"]["form"]["kind"] == "undecided"
    said = json.dumps([flip["summary"]["headline"], flip["summary"]["verdict_reason"]])
    assert "yet the change is low-rank" not in said and "numerical rank 0" not in said and "is not measured" in said
    assert tp["rank"]["numerical_rank"] >= 16 and plain["summary"]["form"]["kind"] == "dense"


def test_f64_change_that_underflows_beside_normal_values_is_measured(tmp_path):
    """One zero of a normal-sized float64 matrix becomes 1e-300: the delta's square underflows, but relative to
    the tensor it is nothing (under 2^-61), so the comparison goes on; a signed zero alone likewise."""
    w = np.random.default_rng(4).standard_normal((16, 16))
    w[3, 3] = 0.0
    name = "model.layers.0.mlp.up_proj.weight"
    for tag, v in (("tiny", 1e-300), ("negzero", -0.0)):
        t = w.copy()
        t[3, 3] = v
        base, tuned = (st_file(tmp_path / f"{side}{tag}.safetensors", {name: entry("F64", [16, 16], 0, 2048)},
                               a.tobytes()) for side, a in (("base", w), ("tuned", t)))
        (row,) = _compare_json(tmp_path, base, tuned)["tensors"]
        # the tiny value is beyond rounding of a zero; the signed zero is rounding
        assert (row["status"], row["rel_change"]) == ("changed" if tag == "tiny" else "rounding", 0.0), (tag, row)


def test_nan_alone_in_f64_is_still_measured(tmp_path):
    def edit(w):
        w[0, 0] = np.nan
    base, tuned = _f64_pair(tmp_path, edit)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    t = json.loads(out.read_text())["tensors"][0]
    assert t["status"] == "changed" and 0.999 < t["cosine"] <= 1.0


@pytest.mark.parametrize("dtype, size", [("BF16", 2), ("F32", 4)])
def test_signaling_nans_widen_without_a_numpy_warning(tmp_path, dtype, size):
    """Random bytes hold signaling NaNs; widening one to float64 made numpy print "RuntimeWarning: invalid
    value encountered in cast" (kernels/dtypes.py, the neuron matcher) on a run that exits 0."""
    r = np.random.default_rng(1)
    b = r.integers(0, 256, 64 * 64 * size, dtype=np.uint8).tobytes()
    t = bytearray(b)
    t[10] ^= 1
    t[-1] ^= 0x40
    paths = []
    for side, data in (("base", b), ("tuned", bytes(t))):
        other = b if side == "base" else bytes(reversed(b))
        paths.append(st_file(tmp_path / f"{side}.safetensors", {
            "model.layers.0.mlp.up_proj.weight": entry(dtype, [64, 64], 0, len(data)),
            "model.layers.0.mlp.down_proj.weight": entry(dtype, [64, 64], len(data), 2 * len(data))}, data + other))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = CliRunner().invoke(main, ["compare", *map(str, paths), "--json", str(tmp_path / "r.json"), "-q"])
    assert res.exit_code == 0 and res.stderr == "", (res.stderr, res.exception)


# -- empty tensors: measured, and inside the result's schema --------------------------------------------

def test_empty_matrix_stored_transposed_is_measured(tmp_path):
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)

    def write(path, zshape, arr):
        return st_file(path, {"model.embed_tokens.weight": entry("F32", zshape, 0, 0),
                              "model.layers.0.mlp.up_proj.weight": entry("F32", [16, 16], 0, 1024)}, arr.tobytes())
    base = write(tmp_path / "base.safetensors", [5, 0], w)
    tuned = write(tmp_path / "tuned.safetensors", [0, 5], w + 0.01)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", str(base), str(tuned), "--json", str(out), "-q"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    empty = next(t for t in json.loads(out.read_text())["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert empty["status"] == "unchanged" and empty["numel"] == 0
    r = CliRunner().invoke(main, ["report", str(out), "--memo", str(tmp_path / "m.md"), "-q"])
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("dims", [[0, 2 ** 64], [0, 2 ** 63], [2 ** 70, 0, 3]])
def test_a_dimension_past_int64_is_refused_by_the_reader(tmp_path, dims):
    path = st_file(tmp_path / "m.safetensors", {"a.weight": entry("F32", [2, 2], 0, 16),
                                                 "b.weight": entry("F32", dims, 16, 16)}, bytes(16))
    one_error_line(CliRunner().invoke(main, ["inspect", str(path)]), str(path), "`b.weight`",
                   "a dimension of 2**63 or more")


def test_the_largest_dimension_compares_and_reports(tmp_path):
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    paths = [st_file(tmp_path / f"{side}.safetensors",
                     {"model.layers.0.mlp.up_proj.weight": entry("F32", [4, 4], 0, 64),
                      "model.layers.0.self_attn.q_proj.weight": entry("F32", [0, 2 ** 63 - 1], 64, 64)}, a.tobytes())
             for side, a in (("base", w), ("tuned", w + 0.01))]
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compare", *map(str, paths), "--json", str(out), "-q"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    r = CliRunner().invoke(main, ["report", str(out), "-q"])    # the checks --memo ran on its own result
    assert r.exit_code == 0, r.stderr


# -- a NUL byte in a path is bad input, not an internal error ---------------------------------------

def test_survey_list_line_with_a_nul_byte_is_refused(tmp_path):
    from weightdiff.io.safetensors_write import save_file

    for side, v in (("base", 1.0), ("tuned", 1.5)):
        (tmp_path / side).mkdir()
        save_file(tmp_path / side / "model.safetensors", {"w.weight": np.full((4, 4), v, np.float32)})
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# models\n" + str(tmp_path / "tuned").encode() + b"\0evil\n")
    r = CliRunner().invoke(main, ["survey", str(tmp_path / "base"), "--from-file", str(listing),
                                  "--out", str(tmp_path / "out"), "-q"])
    one_error_line(r, str(listing), "line 2 holds a NUL byte")
    assert not (tmp_path / "out").exists()


def test_a_path_with_a_nul_byte_is_a_checkpoint_error(tmp_path):
    from weightdiff.errors import CheckpointError
    from weightdiff.io.checkpoint import locate
    from weightdiff.survey import survey_task

    with pytest.raises(CheckpointError, match="holds a NUL byte"):
        locate(str(tmp_path / "tuned\0evil"))
    from weightdiff.io.safetensors_write import save_file

    save_file(tmp_path / "base.safetensors", {"w.weight": np.ones((4, 4), np.float32)})
    row = survey_task(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned\0evil"), None, False)
    assert "NUL byte" in row["error"] and "internal error" not in row["error"], row


# -- survey: the tables are rewritten in batches, not after every row --------------------------------

def test_survey_rewrites_its_tables_in_batches_and_keeps_every_row(tmp_path, monkeypatch):
    """survey.csv and survey.parquet were rewritten and fsynced whole after every row: 3,000 missing
    paths took 87 s. Now at most every TABLE_SECONDS while it runs, and once at the end."""
    import weightdiff.survey as sv
    from weightdiff.io.safetensors_write import save_file

    save_file(tmp_path / "base.safetensors", {"w.weight": np.ones((4, 4), np.float32)})
    calls = []
    real = sv.write_tables
    monkeypatch.setattr(sv, "write_tables", lambda rows, *a: calls.append(len(rows)) or real(rows, *a))
    paths = [str(tmp_path / "missing" / str(i)) for i in range(60)]
    res = sv.survey(tmp_path / "base.safetensors", paths, tmp_path / "out")
    assert res.failed == 60 and len(sv.read_csv(tmp_path / "out" / "survey.csv")) == 60
    assert len(calls) <= 3 and calls[-1] == 60, calls       # 61 before


def test_survey_stopped_early_keeps_the_rows_done(tmp_path):
    import weightdiff.survey as sv
    from weightdiff.io.safetensors_write import save_file

    save_file(tmp_path / "base.safetensors", {"w.weight": np.ones((4, 4), np.float32)})
    paths = [str(tmp_path / "missing" / str(i)) for i in range(5)]
    seen = []

    def task(base, tuned, *rest):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(tuned)
        return sv.survey_task(base, tuned, *rest)

    with pytest.raises(KeyboardInterrupt):
        sv.survey(tmp_path / "base.safetensors", paths, tmp_path / "out", task=task)
    assert [r["tuned"] for r in sv.read_csv(tmp_path / "out" / "survey.csv")] == sorted(seen)


def test_survey_looks_up_a_repeated_spelling_once(tmp_path, monkeypatch):
    # 200,000 copies of one path in a list took over a minute before they were deduplicated
    import weightdiff.survey as sv

    looked = []
    real = sv.identity
    monkeypatch.setattr(sv, "identity", lambda p: looked.append(p) or real(p))
    seen = sv.tuned_identities([str(tmp_path / "ft")] * 5000, str(tmp_path / "base"), None, [])
    assert list(seen) == [str(tmp_path / "ft")] and len(looked) == 1


# -- report: blocks beyond the summary's count are refused ---------------------------------------------

@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory) -> str:
    """The JSON text of a compare of four blocks (each test edits its own copy)."""
    from weightdiff.io.safetensors_write import save_file

    root, r = tmp_path_factory.mktemp("four"), np.random.default_rng(0)
    for side in ("base", "tuned"):
        save_file(root / f"{side}.safetensors", {f"model.layers.{i}.mlp.up_proj.weight":
                                                 r.standard_normal((8, 8)).astype(np.float32) for i in range(4)})
    res = CliRunner().invoke(main, ["compare", str(root / "base.safetensors"), str(root / "tuned.safetensors"),
                                    "--json", str(root / "r.json"), "--no-rank", "-q"])
    assert res.exit_code == 0, res.stderr
    return (root / "r.json").read_text()


@pytest.mark.parametrize("edit, words", [
    # 200,000 blocks beside blocks_total 4 were drawn (160 s, 1.8 GB)
    (lambda d: d.update(blocks=[dict(d["blocks"][0], block=f"layers.{i}", index=i) for i in range(40)]),
     "`blocks` holds 40 numbered blocks, but `summary.blocks_total` is 4"),
    (lambda d: d["blocks"].pop(), "`blocks` holds 3 numbered blocks, but `summary.blocks_total` is 4"),
    (lambda d: d["blocks"][1].update(index=-10 ** 12), "`blocks[1].index` is negative"),
])
def test_report_refuses_blocks_no_run_writes(four_blocks, tmp_path, edit, words):
    data = json.loads(four_blocks)
    assert len(data["blocks"]) == data["summary"]["blocks_total"] == 4
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    one_error_line(CliRunner().invoke(main, ["report", str(path), "--memo", str(tmp_path / "m.md"), "-q"]),
                   str(path), words)
    assert not (tmp_path / "m.md").exists()
