"""int8 dynamic quantization of an exported artifact (CPU), with its agreement with float32 recorded.

    .venv/bin/python -m export.quantize --artifact artifacts/en-de --out artifacts/en-de-int8

Weights of every MatMul/Gemm become int8 (per output channel); activations are quantized per call from their
observed range (ONNX Runtime's dynamic quantization, MatMulInteger / DynamicQuantizeMatMul kernels). Embedding
lookups, LayerNorm and softmax stay float32. Agreement with float32 goes into the manifest (export/lossy_copy.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.lossy_copy import PARITY_SENTENCES, read_sentences, write_lossy_copy

METHOD = "onnxruntime dynamic, per-channel QInt8 MatMul/Gemm, constants folded first"


def quantize_graph(source: Path, destination: Path, scratch: Path) -> None:
    """Writes the int8 version of one graph file."""
    # Constant folding first: the output projection multiplies by Transpose(embedding), which the quantizer only
    # sees as a constant weight once folded (without it the largest MatMul stayed float32).
    folded = scratch / f"folded-{source.name}"
    quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
    # int8 weights with per-channel scales (they keep the tied 8000-row output projection accurate).
    quantize_dynamic(folded, destination, per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    folded.unlink()


def quantize_artifact(artifact: str | Path, out: str | Path, sentences: list[str]) -> dict:
    """Writes an int8 copy of ``artifact`` to ``out`` and returns its manifest.

    Raises:
        FileNotFoundError: the source artifact is incomplete.
    """
    return write_lossy_copy(artifact, out, quantize_graph, "int8", METHOD, sentences)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--out", default="artifacts/en-de-int8")
    p.add_argument("--parity-sentences", default=str(PARITY_SENTENCES))
    args = p.parse_args(argv)
    manifest = quantize_artifact(args.artifact, args.out, read_sentences(args.parity_sentences))
    print(json.dumps(dict(precision=manifest["precision"], parity=manifest["parity"]), indent=2))


if __name__ == "__main__":
    main()
