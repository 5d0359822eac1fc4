"""``weightdiff demo``: a small base model, a fine-tune with a known answer, and the full report on them.

``build_demo(directory)`` writes two Llama-shaped checkpoints (8 blocks, hidden 256,
bfloat16, about 8 million parameters, seeded, no network) whose difference is documented
in ``GROUND_TRUTH``:

- a rank-8 update ``B @ A`` on the query and value projections of the top two blocks
  (6 and 7), merged in float32 and saved in bfloat16, as a merged LoRA adapter would be;
- block 3 fully retrained: a dense, full-rank change to every matrix and norm in it;
- a new classification head ``score.weight`` (4 labels x 256), an added tensor;
- a vocabulary grown by 8 tokens: ``model.embed_tokens.weight`` and ``lm_head.weight`` get
  8 new rows, the old rows untouched;
- every other tensor bit for bit equal to the base.

``run_demo(directory)`` builds the pair, runs ``weightdiff.compare`` on it and writes the
JSON, the figures, the HTML and Markdown memo and ``ground_truth.json`` beside them.
"""

from __future__ import annotations

import json
import os
from shlex import quote
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fsutil import write_text
from .render.report import write_report
from .io.safetensors_write import save_checkpoint, to_storage

BLOCKS, HIDDEN, INTER, KV, VOCAB, NEW_TOKENS, LABELS, LORA_RANK = 8, 256, 688, 128, 2000, 8, 4, 8
LORA_BLOCKS, LORA_MODULES, RETRAINED_BLOCK = (6, 7), ("q_proj", "v_proj"), 3
SEED = 20240611
#: how the memo names the two demo models
DEMO_LABELS = ("demo base (Llama-shaped, 8 blocks)", "demo fine-tune")

GROUND_TRUTH = {
    "model": f"Llama-shaped, {BLOCKS} blocks, hidden {HIDDEN}, MLP {INTER}, grouped k/v {KV}, vocabulary {VOCAB}, bf16",
    "low_rank_update": {"blocks": list(LORA_BLOCKS), "modules": ["self_attn.q_proj", "self_attn.v_proj"],
                        "rank": LORA_RANK, "saved_as": "BF16 after merging in float32"},
    "retrained_block": RETRAINED_BLOCK,
    "added": ["score.weight"],
    "resized": {"model.embed_tokens.weight": [VOCAB, VOCAB + NEW_TOKENS],
                "lm_head.weight": [VOCAB, VOCAB + NEW_TOKENS]},
    "blocks_changed": sorted({RETRAINED_BLOCK, *LORA_BLOCKS}),
    "everything_else": "bitwise equal to the base",
}


@dataclass
class DemoResult:
    """Where the demo wrote its files, the compare dict it produced, and the ground truth."""

    directory: Path
    base: Path
    tuned: Path
    json: Path
    html: Path
    markdown: Path
    plots: Path
    ground_truth: dict
    data: dict = field(repr=False, default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _base_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)

    def gain() -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.05, HIDDEN)).astype(np.float32)

    t = {"model.embed_tokens.weight": mat(VOCAB, HIDDEN)}
    for i in range(BLOCKS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = gain()
        t[p + "self_attn.q_proj.weight"] = mat(HIDDEN, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = mat(KV, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = mat(KV, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = mat(HIDDEN, HIDDEN)
        t[p + "post_attention_layernorm.weight"] = gain()
        t[p + "mlp.gate_proj.weight"] = mat(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = mat(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = mat(HIDDEN, INTER)
    t["model.norm.weight"] = gain()
    t["lm_head.weight"] = mat(VOCAB, HIDDEN)
    return t


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to what bf16 stores (so base values are exactly representable)."""
    bits = to_storage(x, "BF16").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(x.shape)


def demo_tensors(seed: int = SEED) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The base and tuned state dicts (float32 arrays holding bf16-exact values)."""
    rng = np.random.default_rng(seed)
    base = {k: _bf16(v) for k, v in _base_tensors(rng).items()}
    tuned = dict(base)
    for i in LORA_BLOCKS:
        for m in LORA_MODULES:
            name = f"model.layers.{i}.self_attn.{m}.weight"
            w = base[name]
            a = rng.normal(0.0, 1.0 / np.sqrt(HIDDEN), (LORA_RANK, w.shape[1]))
            b = rng.normal(0.0, 0.004, (w.shape[0], LORA_RANK))
            tuned[name] = _bf16((w + (b @ a) * 2.0).astype(np.float32))          # alpha / r = 2
    for name in [k for k in base if k.startswith(f"model.layers.{RETRAINED_BLOCK}.")]:
        w = base[name]
        scale = 0.01 if w.ndim == 1 else 0.006
        tuned[name] = _bf16((w + rng.normal(0.0, scale, w.shape)).astype(np.float32))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        new_rows = rng.normal(0.0, 0.02, (NEW_TOKENS, HIDDEN)).astype(np.float32)
        tuned[name] = np.vstack([base[name], _bf16(new_rows)])
    tuned["score.weight"] = _bf16(rng.normal(0.0, 0.02, (LABELS, HIDDEN)).astype(np.float32))
    return base, tuned


def build_demo(directory: str | os.PathLike, seed: int = SEED) -> tuple[Path, Path]:
    """Write ``base/`` and ``tuned/`` (bf16 safetensors) into ``directory``; returns their paths."""
    directory = Path(directory)
    base, tuned = demo_tensors(seed)
    meta = {"format": "pt", "weightdiff_demo": "see weightdiff/demo.py GROUND_TRUTH"}
    bdir = save_checkpoint(directory / "base", {k: ("BF16", to_storage(v, "BF16")) for k, v in base.items()},
                           metadata=meta)
    tdir = save_checkpoint(directory / "tuned", {k: ("BF16", to_storage(v, "BF16")) for k, v in tuned.items()},
                           metadata=meta)
    return bdir, tdir


def run_demo(directory: str | os.PathLike = "weightdiff-demo", *, command: str | None = None,
             threads: int | None = None) -> DemoResult:
    """Build the demo pair in ``directory``, compare it, and write ``out.json``, ``plots/``,
    ``memo.html``, ``memo.md`` and ``ground_truth.json`` there."""
    from .comparison import compare   # numba: imported only when the demo runs

    directory = Path(directory)
    bdir, tdir = build_demo(directory)
    result = compare(bdir, tdir, hash_files=True, threads=threads, base_label=DEMO_LABELS[0],
                     tuned_label=DEMO_LABELS[1],
                     command=command or f"weightdiff compare {bdir} {tdir} --base-label {quote(DEMO_LABELS[0])} "
                                        f"--tuned-label {quote(DEMO_LABELS[1])} --json {directory / 'out.json'}")
    text = result.to_json()
    data = json.loads(text)
    files = [write_text(directory / "out.json", text),
             write_text(directory / "ground_truth.json", json.dumps(GROUND_TRUTH, indent=1) + "\n")]
    out = write_report(data, html=directory / "memo.html", markdown=directory / "memo.md",
                       plots=directory / "plots",
                       source={"path": str(directory / "out.json"), "sha256": _sha256(text.encode("utf-8")),
                               "command": "weightdiff demo"})
    return DemoResult(directory=directory, base=bdir, tuned=tdir, json=files[0], html=out.html, markdown=out.markdown,
                      plots=directory / "plots", ground_truth=GROUND_TRUTH, data=data, files=files + out.files)


def _sha256(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()   # of the bytes written (the file appears only at commit)
