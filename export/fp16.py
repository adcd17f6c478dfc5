"""float16 copy of an exported artifact, for the CUDA provider, with its agreement with float32 recorded.

    .venv/bin/python -m export.fp16 --artifact artifacts/en-de --out artifacts/en-de-fp16
    .venv/bin/python -m export.fp16 --artifact artifacts/en-de-cuda --out artifacts/en-de-cuda-fp16 --device cuda

For CUDA, copy an artifact exported with ``--self-attention standard``: ONNX Runtime's CUDA GroupQueryAttention
translated wrongly in float16 (engine/contract.py, check_provider), and is refused there.

Weights, activations and the KV cache become float16 (half the memory traffic per step, tensor cores on the GPU).
What float16 gets wrong stays float32 ("safe LayerNorm/softmax"):
- LayerNormalization, Softmax, LogSoftmax and the mean over heads: their sums and exp overflow or lose the small
  probabilities in float16 (max 65504, 11-bit mantissa);
- the sinusoidal positions (the encoder's Range -> Mul -> Sin/Cos; the decoder step's Gather from the model's
  precomputed table): float16 rounds position x frequency to 11 bits, up to 0.12 rad off at position 250, and
  the encodings to 11 bits; measured, that moved log-probs little, but the table is one [steps, d_model]
  computation or lookup, so float32 costs nothing;
- the graph outputs logits and attention, which the search reads (in float16, near-equal logits would tie; the
  engine's log-softmax of the logits runs in float32, as it did inside the graph before format 7).
Agreement with float32 goes into the manifest (export/lossy_copy.py); ``--device`` says where it is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from engine import contract
from export.lossy_copy import PARITY_SENTENCES, read_sentences, write_lossy_copy

FLOAT32_OPS = ["LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean"]
FLOAT32_OUTPUTS = ["logits", "attention"]
POSITION_TABLE = "position_table"  # the decoder step's initializer (nmt.model.Transformer.position_table)
METHOD = f"onnxruntime.transformers.float16; float32 kept for {', '.join(FLOAT32_OPS)}, the sinusoidal positions " \
         f"and the outputs {', '.join(FLOAT32_OUTPUTS)}"


def _position_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes that make the sinusoidal positions: Sin/Cos nodes and every node feeding them (the
    encoder computes them), or the lookup in the precomputed table (the decoder step reads
    nmt.model.Transformer.position_table) and what feeds it."""
    producer = {out: node for node in graph.node for out in node.output}
    pending = [n for n in graph.node if n.op_type in ("Sin", "Cos")
               or any(i.endswith(POSITION_TABLE) for i in n.input)]
    names: set[str] = set()
    while pending:
        node = pending.pop()
        if node.name in names:
            continue
        names.add(node.name)
        pending.extend(producer[i] for i in node.input if i in producer)
    return sorted(names)


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """The converter inserts one Cast per blocked consumer, so a tensor read by two blocked nodes gets two identical
    Casts defining the same name (an invalid graph): keep the first. Node names are made unique too.

    Raises:
        ValueError: a name defined twice by anything other than identical Casts.
    """
    producer: dict[str, onnx.NodeProto] = {}
    kept, names = [], set()
    for i, node in enumerate(graph.node):
        first = next((producer[o] for o in node.output if o in producer), None)
        if first is not None:
            if (node.op_type, list(node.input), node.attribute) != (first.op_type, list(first.input), first.attribute):
                raise ValueError(f"float16 conversion defined {node.output} twice by different nodes")
            continue
        producer.update((o, node) for o in node.output)
        if node.name in names:
            node.name = f"{node.name}_{i}"
        names.add(node.name)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def fp16_graph(source: Path, destination: Path, scratch: Path | None = None) -> None:
    """Writes the float16 version of one graph file (blocked parts in float32, casts at their borders)."""
    model = onnx.load(str(source))
    for i, node in enumerate(model.graph.node):  # node_block_list matches by name
        node.name = node.name or f"{node.op_type}_{i}"
    outputs = [o.name for o in model.graph.output if o.name in FLOAT32_OUTPUTS]
    converted = convert_float_to_float16(model, keep_io_types=outputs, op_block_list=FLOAT32_OPS,
                                         node_block_list=_position_nodes(model.graph))
    _drop_duplicate_casts(converted.graph)
    # The converter leaves some value_info at the old type (shape inference then fails on them): drop it all.
    del converted.graph.value_info[:]
    onnx.save(converted, str(destination))


def fp16_artifact(artifact: str | Path, out: str | Path, sentences: list[str], device: str = "cpu") -> dict:
    """Writes a float16 copy of ``artifact`` to ``out`` and returns its manifest.

    Raises:
        FileNotFoundError: the source artifact is incomplete.
        EngineUnavailableError: device "cuda" without a working CUDA provider.
        ValueError: device "cuda" and a source whose step uses GroupQueryAttention, which CUDA runs wrongly in
            float16 (engine/contract.py, check_provider): copy an artifact exported with --self-attention standard.
    """
    if device == "cuda":
        manifest = json.loads((Path(artifact) / contract.MANIFEST).read_text())
        contract.check_provider(manifest, "CUDAExecutionProvider", True, artifact)
    return write_lossy_copy(artifact, out, fp16_graph, "float16", METHOD, sentences, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--out", default="artifacts/en-de-fp16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--parity-sentences", default=str(PARITY_SENTENCES))
    args = p.parse_args(argv)
    try:
        manifest = fp16_artifact(args.artifact, args.out, read_sentences(args.parity_sentences), args.device)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(dict(precision=manifest["precision"], parity=manifest["parity"]), indent=2))


if __name__ == "__main__":
    main()
