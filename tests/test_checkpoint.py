"""The locator: single files, folders, shards, HF cache, PEFT adapters and legacy pickles."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from weightdiff.io.checkpoint import Checkpoint, locate
from weightdiff.errors import CheckpointError
from weightdiff.io.safetensors_write import save_checkpoint, save_file

TENSORS = {f"model.layers.{i}.mlp.w": np.arange(12, dtype=np.float32).reshape(3, 4) + i for i in range(5)}


def _all(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    return {n: ckpt.read(n) for n in ckpt.tensors}


def test_single_file_and_folder(tmp_path):
    d = save_checkpoint(tmp_path / "ck", TENSORS)
    for target in (d, d / "model.safetensors"):
        with locate(target) as c:
            assert c.format == "safetensors" and c.files == [d / "model.safetensors"]
            assert c.params == 60 and c.nbytes == 240 and c.metadata == {"format": "pt"}
            for n, v in TENSORS.items():
                np.testing.assert_array_equal(c.read(n), v)


def test_sharded_written_by_safetensors_library(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    names = list(TENSORS)
    groups = [names[:2], names[2:3], names[3:]]
    wmap = {}
    for k, g in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-00003.safetensors"
        safetensors.numpy.save_file({n: TENSORS[n] for n in g}, d / fname, metadata={"format": "np"})
        wmap.update({n: fname for n in g})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 240}, "weight_map": wmap}))
    with locate(d) as c:
        assert c.format == "sharded" and len(c.files) == 3
        assert list(c.tensors) == names and c.metadata == {"format": "np", "total_size": "240"}
        for n, v in TENSORS.items():
            np.testing.assert_array_equal(c.read(n), v)
            np.testing.assert_array_equal(np.concatenate(list(c.windows(n, 5))), v.ravel())
            np.testing.assert_array_equal(c.read_rows(n, [2, 0]), v[[2, 0]])
        # two tensors of different shards zipped window by window
        a, b = names[0], names[4]
        got = [(x.copy(), y.copy()) for x, y in zip(c.windows(a, 5), c.windows(b, 5))]
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), TENSORS[b].ravel())
    with locate(d / "model.safetensors.index.json") as c:
        assert c.format == "sharded" and len(c.tensors) == 5


def test_sharded_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    sd = {k: v for k, v in model.state_dict().items()}
    with locate(tmp_path / "llama") as c:
        assert c.format == "sharded" and len(c.files) > 1
        assert all(t.dtype == "BF16" for t in c.tensors.values())
        for name in c.tensors:
            want = sd[name].contiguous().view(torch.uint16).numpy() if hasattr(torch, "uint16") else None
            got = c.read(name)
            assert got.dtype == np.uint16
            if want is not None:
                np.testing.assert_array_equal(got, want)
        assert "lm_head.weight" in c.tensors or cfg.tie_word_embeddings


def test_many_shards_keep_few_files_open(tmp_path):
    t = {f"w{i}": np.full(3, i, np.float32) for i in range(20)}
    d = save_checkpoint(tmp_path / "ck", t, shards=20)
    with locate(d) as c:
        for n, v in t.items():
            np.testing.assert_array_equal(np.concatenate(list(c.windows(n))), v)
            assert len(c._open) <= 8


def test_shard_replaced_after_locate_is_detected(tmp_path):
    d = save_checkpoint(tmp_path / "ck", TENSORS, shards=2)
    with locate(d) as c:
        first = c.files[0]
        names = [n for n, t in c.tensors.items() if t.path == first]
        np.testing.assert_array_equal(c.read(names[0]), TENSORS[names[0]])
        c.close()
        save_file(first, {n: np.zeros((3, 5), np.float32) for n in names})
        with pytest.raises(CheckpointError, match="changed since the checkpoint was located"):
            c.read(names[0])


def test_unrelated_safetensors_beside_index_are_listed_as_ignored(tmp_path):
    d = save_checkpoint(tmp_path / "ck", TENSORS, shards=2)
    save_file(d / "consolidated.safetensors", {"x": np.zeros(1, np.float32)})
    with locate(d) as c:
        assert c.ignored == [d / "consolidated.safetensors"] and "x" not in c.tensors


def test_one_oddly_named_safetensors_file(tmp_path):
    d = tmp_path / "ck"
    save_file(d / "diffusion_pytorch_model.safetensors", {"w": np.ones(2, np.float32)})
    with locate(d) as c:
        assert c.files == [d / "diffusion_pytorch_model.safetensors"]


def test_hf_cache_snapshot_symlinks(tmp_path):
    repo = tmp_path / "models--org--tiny"
    src = save_checkpoint(tmp_path / "src", TENSORS, shards=2)
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for target in (repo, snap):
        with locate(target) as c:
            assert c.format == "sharded"
            for n, v in TENSORS.items():
                np.testing.assert_array_equal(c.read(n), v)
            assert set(c.file_digests()) == {f.name for f in src.glob("*.safetensors")}


def test_file_digests(tmp_path):
    d = save_checkpoint(tmp_path / "ck", TENSORS, shards=2)
    with locate(d) as c:
        dig = c.file_digests()
    assert dig == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.glob("*.safetensors")}


# -- PEFT adapters ----------------------------------------------------------------

def _peft_model(tmp_path, **lora_kw):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    base = transformers.LlamaForCausalLM(cfg)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kw))
    for name, p in model.named_parameters():          # LoRA B starts at zero: give it values
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    return torch, model, base_sd


def test_peft_adapter_layout_and_delta(tmp_path):
    torch, model, base_sd = _peft_model(tmp_path, r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                                        alpha_pattern={"v_proj": 6},
                                        target_modules=["q_proj", "v_proj", "embed_tokens"])
    scaling = {n.removeprefix("base_model.model.") + ".weight": m.scaling["default"]
               for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
    merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    with locate(tmp_path / "adapter") as c:
        assert c.format == "adapter" and c.adapter.r == 4 and c.adapter.lora_alpha == 8.0
        assert set(c.adapter.target_modules) == {"q_proj", "v_proj", "embed_tokens"}
        assert not c.adapter.use_rslora and not c.adapter.use_dora and c.adapter.scale == 2.0
        targets = {f.target: f for f in c.lora}
        assert set(targets) == set(scaling) and all(t in base_sd for t in targets)
        assert len(targets) == 5
        for t, f in targets.items():
            assert f.scale == pytest.approx(scaling[t]), t
            assert f.r == (2 if "v_proj" in t else 4) and f.magnitude_name is None
            a = c.read(f.a_name).astype(np.float64)
            b = c.read(f.b_name).astype(np.float64)
            delta = f.scale * (b @ a)
            if f.embedding:
                delta = delta.T
            want = (merged[t] - base_sd[t]).numpy()
            np.testing.assert_allclose(delta, want, atol=1e-5)


def test_peft_dora_rslora(tmp_path):
    torch, model, base_sd = _peft_model(tmp_path, r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                        target_modules=["q_proj"])
    with locate(tmp_path / "adapter") as c:
        assert c.adapter.use_dora and c.adapter.use_rslora and c.adapter.scale == pytest.approx(4.0)
        assert len(c.lora) == 2
        for f in c.lora:
            assert f.magnitude_name and f.magnitude_name.endswith("q_proj.lora_magnitude_vector")
            assert c.tensors[f.magnitude_name].shape == (32,) and f.scale == pytest.approx(4.0)


def test_adapter_without_peft(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": "q",
                                                       "base_model_name_or_path": "org/base"}))
    save_file(d / "adapter_model.safetensors", {
        "base_model.model.l.0.q.lora_A.weight": np.ones((2, 3), np.float32),
        "base_model.model.l.0.q.lora_B.weight": np.ones((4, 2), np.float32)})
    with locate(d) as c:
        assert c.adapter.target_modules == ["q"] and c.adapter.base_model == "org/base"
        (f,) = c.lora
        assert (f.target, f.r, f.scale, f.embedding) == ("l.0.q.weight", 2, 1.0, False)


def test_adapter_factors_that_do_not_chain(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    save_file(d / "adapter_model.safetensors", {"m.q.lora_A.weight": np.ones((2, 3), np.float32),
                                                "m.q.lora_B.weight": np.ones((4, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"LoRA factors of `m.q` do not chain: A is \[2, 3\], B is \[4, 3\]"):
        locate(d)


# -- legacy pickles -----------------------------------------------------------------

def test_pickle_read_through_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]).to(torch.bfloat16),
          "s": torch.tensor(3, dtype=torch.int64), "e": torch.zeros(0, 4)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with locate(tmp_path) as c:
        assert c.format == "pickle" and c.files == [tmp_path / "pytorch_model.bin"]
        assert {n: (t.dtype, t.shape) for n, t in c.tensors.items()} == {
            "a": ("F32", (2, 3)), "b": ("BF16", (2,)), "s": ("I64", ()), "e": ("F32", (0, 4))}
        np.testing.assert_array_equal(c.read("a"), sd["a"].numpy())
        assert c.read("b").tolist() == [0x3FC0, 0xC000]
        assert c.read("s").shape == () and int(c.read("s")) == 3
        np.testing.assert_array_equal(c.read_rows("a", [1]), sd["a"].numpy()[[1]])
        assert [w.tolist() for w in c.windows("a", 4)] == [[0, 1, 2, 3], [4, 5]]
        assert list(c.windows("e")) == []


def test_trainer_files_are_not_weights(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "training_args.bin").write_bytes(b"not read")
    (tmp_path / "optimizer.pt").write_bytes(b"not read")
    with locate(tmp_path) as c:
        assert c.files == [tmp_path / "model.pt"]
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="2 pickle files and no index, so which is the model is ambiguous"):
        locate(tmp_path)


def test_wrapped_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "model.pt")
    with locate(tmp_path / "model.pt") as c:
        assert list(c.tensors) == ["w"]


@pytest.mark.parametrize("shard_mb", [None, 0.00001])
def test_a_header_is_parsed_once_and_a_changed_one_is_caught(tmp_path, monkeypatch, shard_mb):
    from weightdiff.io import safetensors_read

    if shard_mb is None:
        save_file(tmp_path / "model.safetensors", TENSORS)
    else:
        save_checkpoint(tmp_path, TENSORS, max_shard_bytes=100)
    calls = []
    real = safetensors_read.parse_header
    monkeypatch.setattr(safetensors_read, "parse_header", lambda *a: calls.append(1) or real(*a))
    with locate(tmp_path) as c:
        located = len(calls)
        for n in TENSORS:
            np.concatenate(list(c.windows(n)))
        assert len(calls) == located            # opening the files again reuses the parsed headers
    with locate(tmp_path) as c:
        name = next(iter(TENSORS))
        victim = c.tensors[name].path
        other = {k: v for k, v in safetensors.numpy.load_file(victim).items()}
        other[name] = other[name][::-1].copy() if other[name].ndim == 1 else other[name] + 0
        renamed = {("x" + k): v for k, v in other.items()}          # same sizes, another header
        save_file(victim, renamed)
        with pytest.raises(CheckpointError, match="changed since the checkpoint was located"):
            list(c.windows(name))


def test_a_pickle_of_nested_dicts_is_named_for_what_it_is(tmp_path):
    """HQQ's qmodel.pt (hqq 0.2.8 save_quantized: a dict per module with packed `W_q`, `scale`,
    `zero`, `nbits`, ...) was refused as "holds no tensors"."""
    torch = pytest.importorskip("torch")
    hqq = {"model.layers.0.self_attn.q_proj": {"W_q": torch.zeros(32, 8, dtype=torch.uint8), "nbits": 4,
                                               "group_size": 64, "scale": torch.ones(8, 1), "zero": torch.zeros(8, 1)},
           "model.embed_tokens": {"weight": torch.ones(4, 8)}}
    torch.save(hqq, tmp_path / "qmodel.pt")
    with pytest.raises(CheckpointError, match=r"qmodel.pt: is an HQQ quantized model .* does not dequantize"):
        locate(tmp_path / "qmodel.pt")
    torch.save({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match=r"nested.pt: holds 2 state dicts \(`a`, `b`\): which one is the model"):
        locate(tmp_path / "nested.pt")
    torch.save({"a": {"x": {"w": torch.ones(2)}}, "b": {"y": {"w": torch.ones(2)}}}, tmp_path / "deeper.pt")
    with pytest.raises(CheckpointError, match="only 2 nested dictionaries"):
        locate(tmp_path / "deeper.pt")


def test_a_training_checkpoint_reads_its_one_state_dict(tmp_path):
    """A trainer's checkpoint holds the model's state dict beside an optimizer's (tensors only under "state"),
    a step counter, loops and callbacks: {"model": sd, "optimizer": ...} was refused as "only 2 nested
    dictionaries", and a `.ckpt` file (PyTorch Lightning's name) was read as a safetensors file whose header
    length was eight bytes of a zip ("exceeds the 100,000,000-byte cap"). The one nested dict that holds
    tensors is read; two (a model and its EMA copy) are refused naming both."""
    torch = pytest.importorskip("torch")
    sd = {"layer.weight": torch.ones(4, 4), "layer.bias": torch.zeros(4)}
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()
    torch.save({"model": sd, "optimizer": opt.state_dict(), "step": 5}, tmp_path / "trainer.pt")
    with locate(tmp_path / "trainer.pt") as c:
        assert set(c.tensors) == set(sd)
    lightning = {"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.5.0",
                 "state_dict": {"model." + k: v for k, v in sd.items()},
                 "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
                 "callbacks": {"ModelCheckpoint{}": {"best_model_score": torch.tensor(0.5)}},
                 "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3}}
    torch.save(lightning, tmp_path / "last.ckpt")
    with locate(tmp_path / "last.ckpt") as c:
        assert set(c.tensors) == {"model.layer.weight", "model.layer.bias"} and c.format == "pickle"
    torch.save({"model": sd, "model_ema": dict(sd), "optimizer": opt.state_dict()}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"two.pt: holds 2 state dicts \(`model`, `model_ema`\)"):
        locate(tmp_path / "two.pt")


def test_a_lightning_checkpoint_written_by_lightning(tmp_path):
    """tests/data/lightning/last.ckpt: written by PyTorch Lightning 2.6's Trainer (make.py) after two steps of a
    tiny module whose weights before training are base.pt; read through torch's weights-only loader."""
    pytest.importorskip("torch")
    from weightdiff import compare

    here = Path(__file__).parent / "data" / "lightning"
    with locate(here / "last.ckpt") as c:
        assert set(c.tensors) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    s = compare(here / "base.pt", here / "last.ckpt").summary
    assert s.verdict == "derived" and s.tensors_by_status["changed"] == 4
