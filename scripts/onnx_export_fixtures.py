"""Write tests/data/onnx_exports/: tiny transformers models and their ONNX exports by torch's own exporters.

Usage: python scripts/onnx_export_fixtures.py [OUT] [--all]

Needs torch, transformers, onnx and onnxscript (none of them at test time: tests/test_onnx.py reads the
files written here). Written with torch 2.13.0 (CPU), onnxscript 0.7.2, onnx 1.23.2, transformers 5.25.0.

For each of a tiny Llama, GPT-2 and BERT (one layer, hidden size 32, vocabulary 64, every parameter
drawn from torch.manual_seed(0)), ``MODEL/hf/`` holds ``save_pretrained``'s safetensors and config, and beside it:

* ``static.onnx``: ``torch.onnx.export(model, (input_ids,), dynamo=True)``, the default exporter with its
  defaults (``optimize=True``, no ``dynamic_shapes``): the optimizer folds what the fixed input shape makes
  constant (rotary cos/sin tables, causal masks, BERT's position embeddings gathered with its constant
  ``position_ids``) into initializers named ``val_N``;
* ``dynamic.onnx``: the same with ``dynamic_shapes`` (batch and sequence) (``--all`` only: also
  ``unoptimized.onnx``, ``optimize=False``, and ``legacy.onnx``, ``dynamo=False``, which fails on
  transformers 5's Llama and GPT-2 masks (``aten::diff``), so only BERT has one).

The model is wrapped so that it is called with ``use_cache=False`` and returns tensors only (its
parameters are then named ``m.<name>``, as any wrapper's). Each file is the exporter's model with the
weights inside (``external_data=False``) and, to keep it small, the node metadata that only debuggers
read removed (``pkg.torch.onnx.stack_trace``, ``namespace``, ``class_hierarchy``, ``fx_node``: source
lines and paths of the machine that exported); ``pkg.torch.onnx.name_scopes``, which weightdiff reads,
is kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "onnx_exports"
DROP = {"pkg.torch.onnx.stack_trace", "namespace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.fx_node"}


def models():
    import transformers as T
    yield "llama", T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    yield "gpt2", T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    yield "bert", T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64))


def strip(path: Path) -> None:
    import onnx
    m = onnx.load(str(path))

    def walk(g):
        for n in g.node:
            keep = [p for p in n.metadata_props if p.key not in DROP]
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
            n.doc_string = ""
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)
    walk(m.graph)
    onnx.save(m, str(path))


def main(argv: list[str]) -> None:
    import torch
    every = "--all" in argv
    args = [a for a in argv if not a.startswith("--")]
    out = Path(args[0]) if args else OUT

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            if type(self.m).__name__ == "BertModel":
                o = self.m(input_ids=input_ids, return_dict=False)
                return o[0], o[1]
            return self.m(input_ids=input_ids, use_cache=False, return_dict=False)[0]

    torch.manual_seed(0)
    for name, model in models():
        model.eval()
        with torch.no_grad():          # every parameter its own values (a fresh model's zero biases and unit
            for p in model.parameters():   # norms are stored once by the exporter), as in a trained model
                p.copy_(torch.randn_like(p) * 0.1)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d / "hf")
        ids = torch.arange(8).reshape(1, 8) % 64
        dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
        variants = {"static": dict(dynamo=True), "dynamic": dict(dynamo=True, dynamic_shapes=dyn)}
        if every:
            variants["unoptimized"] = dict(dynamo=True, optimize=False)
            variants["legacy"] = dict(dynamo=False, dynamic_axes={"input_ids": {0: "b", 1: "s"}})
        for variant, kw in variants.items():
            f = d / f"{variant}.onnx"
            try:
                torch.onnx.export(Wrap(model).eval(), (ids,), str(f), input_names=["input_ids"], external_data=False,
                                  **kw)
            except Exception as exc:       # the legacy exporter on transformers 5's masks
                print(f"{name} {variant}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
                continue
            strip(f)
            print(f"{f}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
