"""Adapters measured merged (OFT, BOFT, IA3) never hold the merged weight whole: ``compute.RowMergedSide`` merges the
rows a window, a read or a set of rows asks for, from the base's rows. Every way of reading it gives the values of the
merge done at once, and a comparison's stats and rank passes ask for no more than a window of rows at a time (a
28672 x 8192 bf16 OFT pair peaked at 1,288 MB holding its merged copy beside the Gram matrix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import weightdiff
from weightdiff.io.checkpoint import locate
from weightdiff.io.safetensors_write import save_file, to_storage
from weightdiff.measure import compute
from weightdiff.pairing.plan import plan

NAME = "model.layers.0.mlp.up_proj"
PRE = f"base_model.model.{NAME}."


def _written(tmp_path, rng, kind: str, shape: tuple, dtype: str):
    m, n = shape
    (tmp_path / "base").mkdir()
    w = rng.standard_normal((m, n)) * 0.02
    save_file(tmp_path / "base" / "model.safetensors", {NAME + ".weight": (dtype, to_storage(w, dtype))})
    ad = tmp_path / kind
    ad.mkdir()
    cfg: dict = {"peft_type": kind, "target_modules": ["up_proj"]}
    b = 8
    if kind == "OFT":
        cfg.update(r=0, oft_block_size=b, peft_version="0.21.2")
        t = {PRE + "oft_R.weight": (0.05 * rng.standard_normal((n // b, b * (b - 1) // 2))).astype(np.float32)}
    elif kind == "BOFT":
        cfg.update(r=b, boft_block_size=b, boft_block_num=0, boft_n_butterfly_factor=1)
        t = {PRE + "boft_R": (0.05 * rng.standard_normal((1, n // b, b, b))).astype(np.float32),
             PRE + "boft_s": (1 + 0.05 * rng.standard_normal((m, 1))).astype(np.float32)}
    else:           # IA3 on the outputs (a vector per row) or, as a feedforward module, the inputs
        feed = kind == "IA3-inputs"
        cfg.update(peft_type="IA3", feedforward_modules=["up_proj"] if feed else [])
        t = {PRE + "ia3_l": (1 + 0.1 * rng.standard_normal((1, n) if feed else (m, 1))).astype(np.float32)}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(ad / "adapter_model.safetensors", t)
    return tmp_path / "base", ad


KINDS = ("OFT", "BOFT", "IA3-outputs", "IA3-inputs")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_every_read_of_a_merged_side_is_the_merge_done_at_once(tmp_path, rng, kind, dtype):
    from weightdiff.comparison import check_adapter_plan

    base, ad = _written(tmp_path, rng, kind, (37, 24), dtype)
    with locate(base) as b, locate(ad) as t:
        p = plan([b], t)
        check_adapter_plan(p, [b], t)
        pair = next(x for x in p.pairs if x.base_name == NAME + ".weight")
        merged = compute._ia3_merged if kind.startswith("IA3") else \
            compute._boft_merged if kind == "BOFT" else compute._oft_merged
        info, rows = merged(pair, b, t)
        whole = np.asarray(rows(0, 37))
        side = compute.RowMergedSide(t, pair.tuned_name, info, rows)
        assert whole.shape == (37, 24) and whole.dtype == compute.storage_of(dtype)
        flat = whole.reshape(-1)
        for r0, r1 in ((0, 1), (5, 6), (3, 17), (36, 37), (0, 37), (10, 10)):
            assert np.array_equal(np.asarray(rows(r0, r1)).view(np.uint8), whole[r0:r1].view(np.uint8))
        # windows of any size, straddling rows, over any range: the merged values in order
        for size in (1, 7, 23, 24, 25, 100, None):
            for start, stop in ((0, None), (5, 880), (24, 48), (887, 888), (0, 0)):
                got = [np.array(w) for w in side.windows(pair.tuned_name, size, start, stop)]
                want = flat[start:888 if stop is None else stop]
                assert all(not w.flags.writeable for w in side.windows(pair.tuned_name, size, start, stop))
                joined = np.concatenate(got) if got else np.zeros(0, flat.dtype)
                assert np.array_equal(joined.view(np.uint8), want.view(np.uint8)), (size, start, stop)
        assert np.array_equal(side.read(pair.tuned_name).view(np.uint8), whole.view(np.uint8))
        idx = [5, 3, 4, 4, 36, 0, 20, 21, 22]
        assert np.array_equal(side.read_rows(pair.tuned_name, idx).view(np.uint8), whole[idx].view(np.uint8))
        assert side.read_rows(pair.tuned_name, []).shape == (0, 24)
        assert side.floor_windows(pair.tuned_name) is None and side.quant == {}
        with pytest.raises(ValueError, match="outside tensor"):
            next(side.windows(pair.tuned_name, 4, 0, 889))


@pytest.mark.parametrize("kind", ("OFT", "IA3-inputs"))
def test_a_comparison_merges_a_window_of_rows_at_a_time(tmp_path, rng, kind, monkeypatch):
    """A matrix of several windows (the streamed Gram path, 1,100 x 256): the stats and rank passes ask for a window's
    rows at a time and never read the merged weight whole; the record is the one of windows of the usual size (the
    same rank, the statistics within summation order)."""
    base, ad = _written(tmp_path, rng, kind, (1100, 256), "F32")
    want = weightdiff.compare(str(base), str(ad)).tensor(NAME + ".weight")
    asked: list[int] = []
    flat = compute.RowMergedSide._flat

    def counted(self, start, stop):
        asked.append(stop - start)
        return flat(self, start, stop)

    def whole(self, name):
        raise AssertionError("the merged weight was read whole")

    monkeypatch.setattr(compute.RowMergedSide, "_flat", counted)
    monkeypatch.setattr(compute.RowMergedSide, "read", whole)
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 1 << 14)
    got = weightdiff.compare(str(base), str(ad)).tensor(NAME + ".weight")
    assert asked and max(asked) <= 1 << 14 and sum(asked) >= 1100 * 256
    assert got.status == want.status == "changed"
    assert got.rank.numerical_rank == want.rank.numerical_rank and got.rank.exact and want.rank.exact
    for f in ("norm_base", "norm_tuned", "norm_delta", "cosine", "max_abs_delta", "frac_changed"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), rel=1e-12, abs=1e-300), f


def _saved_layer(tmp_path, rng, kind: str):
    """A LoRA whose adapter saves its module's base layer: ``embed`` a table resized from 1,100 to 1,110 rows (PEFT's
    ``save_embedding_layers``, lora_embedding_A/B), ``dora`` an up_proj [1,100, 256] of other values with a DoRA
    magnitude."""
    (tmp_path / "base").mkdir()
    ad = tmp_path / kind
    ad.mkdir()
    r = 4
    if kind == "embed":
        m, n, mod = 1100, 256, "model.embed_tokens"
        t = {f"base_model.model.{mod}.lora_embedding_A": (0.1 * rng.standard_normal((r, m + 10))).astype(np.float32),
             f"base_model.model.{mod}.lora_embedding_B": (0.1 * rng.standard_normal((n, r))).astype(np.float32)}
        saved = (m + 10, n)
    else:
        m, n, mod = 1100, 256, NAME
        t = {f"base_model.model.{mod}.lora_A.weight": (0.1 * rng.standard_normal((r, n))).astype(np.float32),
             f"base_model.model.{mod}.lora_B.weight": (0.1 * rng.standard_normal((m, r))).astype(np.float32),
             f"base_model.model.{mod}.lora_magnitude_vector": (1 + rng.random(m)).astype(np.float32)}
        saved = (m, n)
    w = (0.02 * rng.standard_normal((m, n))).astype(np.float32)
    save_file(tmp_path / "base" / "model.safetensors", {mod + ".weight": w})
    s = (0.02 * rng.standard_normal(saved)).astype(np.float32)
    s[:m] = w + (0 if kind == "embed" else 0.01 * s[:m])
    t[f"base_model.model.{mod}.base_layer.weight"] = s
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": [mod.rsplit(".", 1)[1]],
           "use_dora": kind == "dora"}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(ad / "adapter_model.safetensors", t)
    return tmp_path / "base", ad, mod + ".weight"


@pytest.mark.parametrize("kind", ("embed", "dora"))
def test_a_saved_base_layer_is_merged_a_window_of_rows_at_a_time(tmp_path, rng, kind, monkeypatch):
    """The same for a LoRA merged into the base layer its adapter saves (a resized embedding: 128,256 x 8,192 bf16 at
    70B, 8.4 GB decoded to float64 whole): the merge is asked for a window of rows at a time, never whole, and the
    record is the one of windows of the usual size, which is the merge computed in float64 from the factors."""
    base, ad, name = _saved_layer(tmp_path, rng, kind)
    want = weightdiff.compare(str(base), str(ad)).tensor(name)
    asked: list[int] = []
    flat = compute.RowMergedSide._flat

    def counted(self, start, stop):
        asked.append(stop - start)
        return flat(self, start, stop)

    monkeypatch.setattr(compute.RowMergedSide, "_flat", counted)
    monkeypatch.setattr(compute.RowMergedSide, "read", lambda self, name: pytest.fail("read whole"))
    monkeypatch.setattr(compute, "WINDOW_ELEMENTS", 1 << 14)
    got = weightdiff.compare(str(base), str(ad)).tensor(name)
    assert asked and max(asked) <= 1 << 14
    assert got.status == want.status == ("resized" if kind == "embed" else "changed")
    assert got.rank.numerical_rank == want.rank.numerical_rank
    for f in ("norm_base", "norm_tuned", "norm_delta", "max_abs_delta"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), rel=1e-12), f
    # the merge itself, in float64: W' + s B A, DoRA's magnitude over each row's norm
    from safetensors.numpy import load_file

    t = load_file(ad / "adapter_model.safetensors")
    pre = "base_model.model." + name.removesuffix(".weight")
    w = t[pre + ".base_layer.weight"].astype(np.float64)
    if kind == "embed":
        merged = w + 2.0 * (t[pre + ".lora_embedding_A"].astype(np.float64).T @ t[pre + ".lora_embedding_B"].T)
    else:
        merged = w + 2.0 * (t[pre + ".lora_B.weight"].astype(np.float64) @ t[pre + ".lora_A.weight"])
        merged *= (t[pre + ".lora_magnitude_vector"] / np.linalg.norm(merged, axis=1))[:, None]
    merged = merged.astype(np.float32).astype(np.float64)
    b = load_file(base / "model.safetensors")[name].astype(np.float64)
    assert got.norm_tuned == pytest.approx(float(np.linalg.norm(merged[:len(b)])), rel=1e-9)   # the shared rows
    assert got.norm_delta == pytest.approx(float(np.linalg.norm(merged[:len(b)] - b)), rel=1e-9)
