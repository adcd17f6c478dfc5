"""int8 quantization of an exported artifact (CPU), with its agreement with float32 recorded.

    .venv/bin/python -m export.quantize --artifact artifacts/en-de --out artifacts/en-de-int8   # about 10 s

Weights of every MatMul/Gemm become int8 (per output channel). Activations become uint8 with one fixed scale per
linear layer's input, calibrated by decoding export/calibration_sentences.txt (export/calibrate.py:
QuantizeLinear and MatMulIntegerToFloat kernels), so that a sentence's int8 output does not depend on its
batch-mates; ``--activations dynamic`` keeps ONNX Runtime's dynamic quantization instead (a range per call, over
the whole batch: DynamicQuantizeMatMul kernels). Embedding lookups, LayerNorm and softmax stay float32. Agreement
with float32 goes into the manifest (export/lossy_copy.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import shutil
import tempfile

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.calibrate import CALIBRATION_SENTENCES, GRAPHS, PERCENTILE, calibrate, static_graph
from export.lossy_copy import PARITY_SENTENCES, read_sentences, write_lossy_copy

METHOD = "onnxruntime dynamic, per-channel QInt8 MatMul/Gemm, constants folded first"
STATIC_METHOD = (f"per-channel QInt8 MatMul/Gemm weights, constants folded first; uint8 activations with static "
                 f"per-tensor scales, {PERCENTILE}th percentile of per-call ranges while decoding {{n}} calibration "
                 f"sentences (greedy and beam 4)")


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


def conversion_method(activations: str = "static", calibration: list[str] | None = None) -> str:
    """What the manifest of a copy made by :func:`quantize_artifact` with these arguments records as its method."""
    if activations == "dynamic":
        return METHOD
    return STATIC_METHOD.format(n=len(calibration if calibration is not None else default_calibration()))


def default_calibration() -> list[str]:
    """The shipped calibration sentences (export/calibration_sentences.txt)."""
    return read_sentences(CALIBRATION_SENTENCES)


def quantize_artifact(artifact: str | Path, out: str | Path, sentences: list[str], activations: str = "static",
                      calibration: list[str] | None = None) -> dict:
    """Writes an int8 copy of ``artifact`` to ``out`` and returns its manifest. ``sentences``: the parity
    sentences (agreement with float32, in the manifest). ``activations``: "static", one scale per layer input set
    by decoding ``calibration`` (default: export/calibration_sentences.txt; export/calibrate.py), or "dynamic", a
    range per call (ONNX Runtime's dynamic quantization).

    Raises:
        FileNotFoundError: the source artifact is incomplete.
        ValueError: another ``activations``, or static ones with no calibration sentence.
    """
    if activations not in ("static", "dynamic"):
        raise ValueError(f"activations must be 'static' or 'dynamic', got {activations!r}")
    if activations == "static" and calibration is not None and not calibration:
        raise ValueError("static activation scales need at least one calibration sentence")
    method = conversion_method(activations, calibration)
    if activations == "dynamic":
        return write_lossy_copy(artifact, out, quantize_graph, "int8", method, sentences)
    calibration = calibration if calibration is not None else default_calibration()
    artifact = Path(artifact)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dynamic = tmp / "dynamic"  # first the dynamic copy, whose decoding gives the ranges
        shutil.copytree(artifact, dynamic)
        for graph in GRAPHS:
            quantize_graph(artifact / graph, dynamic / graph, tmp)
        ranges = calibrate(dynamic, tmp / "calibration", calibration)

        def static(source: Path, destination: Path, scratch: Path) -> None:
            model = onnx.load(str(dynamic / source.name))
            onnx.save(static_graph(model, ranges[source.name]), str(destination))

        return write_lossy_copy(artifact, out, static, "int8", method, sentences)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--out", default="artifacts/en-de-int8")
    p.add_argument("--parity-sentences", default=str(PARITY_SENTENCES))
    p.add_argument("--activations", choices=("static", "dynamic"), default="static",
                   help="static: one calibrated scale per layer input (batch-invariant); dynamic: a range per call")
    p.add_argument("--calibration-sentences", default=str(CALIBRATION_SENTENCES))
    args = p.parse_args(argv)
    try:
        calibration = read_sentences(args.calibration_sentences) if args.activations == "static" else None
        manifest = quantize_artifact(args.artifact, args.out, read_sentences(args.parity_sentences), args.activations,
                                     calibration)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(json.dumps(dict(precision=manifest["precision"], parity=manifest["parity"]), indent=2))


if __name__ == "__main__":
    main()
