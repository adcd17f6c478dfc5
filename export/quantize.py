"""int8 dynamic quantization of an exported artifact (CPU), with its agreement with float32 recorded.

    .venv/bin/python -m export.quantize --artifact artifacts/en-de --out artifacts/en-de-int8

Weights of every MatMul/Gemm become int8 (per output channel); activations are quantized per call from their
observed range (ONNX Runtime's dynamic quantization, MatMulInteger / DynamicQuantizeMatMul kernels). Embedding
lookups, LayerNorm and softmax stay float32. This is lossy by design, so instead of the float32 export's parity
check the manifest records, on the parity sentences, the max log-prob difference along the float32 greedy path and
how many greedy outputs are identical; the BLEU loss on the test split is reported by loadtests/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from engine import contract
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.onnx_export import sha256

PARITY_SENTENCES = Path(__file__).with_name("parity_sentences.txt")


def _greedy_path_diff(reference: Translator, quantized: Translator, text: str, max_length: int = 64) -> float:
    """Max abs log-prob difference between two engines along the reference's greedy path of one sentence."""
    src = np.asarray([reference.tokenize(text)], dtype=np.int64)
    mask = np.ones_like(src, dtype=bool)
    states = []
    for engine in (reference, quantized):
        ck, cv = engine.model.encode(src, mask)
        empty = engine.model.ops.empty(ck[0])
        states.append([[empty] * len(ck), [empty] * len(ck), ck, cv])
    token, diff = reference.bos_id, 0.0
    for _ in range(max_length):
        outputs = []
        for state, engine in zip(states, (reference, quantized)):
            log_probs, state[0], state[1], _ = engine.model.step(np.asarray([[token]]), *state, mask)
            outputs.append(log_probs[0])
        diff = max(diff, float(np.abs(outputs[0] - outputs[1]).max()))
        token = int(outputs[0].argmax())
        if token == reference.eos_id:
            break
    return diff


def quantize_artifact(artifact: str | Path, out: str | Path, sentences: list[str]) -> dict:
    """Writes an int8 copy of ``artifact`` to ``out`` and returns its manifest.

    Raises:
        FileNotFoundError: the source artifact is incomplete.
    """
    artifact, out = Path(artifact), Path(out)
    manifest = json.loads((artifact / contract.MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name) / "artifact"
        shutil.copytree(artifact, tmp)
        for graph in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
            # Constant folding first: the output projection multiplies by Transpose(embedding), which the quantizer
            # only sees as a constant weight once folded (without it the largest MatMul stayed float32).
            folded = Path(tmp_name) / f"folded-{graph}"
            quant_pre_process(str(artifact / graph), str(folded), skip_symbolic_shape=True)
            # int8 weights with per-channel scales (they keep the tied 8000-row output projection accurate).
            quantize_dynamic(folded, tmp / graph, per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
            folded.unlink()
        reference = Translator(artifact, EngineConfig(device="cpu"))
        quantized = Translator(tmp, EngineConfig(device="cpu"))
        options = DecodingOptions(beam_size=1, max_length=64)
        same = sum(a.text == b.text for a, b in zip(reference.translate(sentences, options),
                                                   quantized.translate(sentences, options)))
        manifest.update(
            precision="int8", quantization=dict(method="onnxruntime dynamic, per-channel QInt8 MatMul/Gemm",
                                                source_files={g: manifest["files"][g] for g in
                                                              (contract.ENCODER_FILE, contract.DECODER_STEP_FILE)}),
            parity=dict(sentences=len(sentences), greedy_identical_to_float32=same,
                        max_abs_log_prob_diff=round(max(_greedy_path_diff(reference, quantized, s)
                                                        for s in sentences), 6)))
        manifest["files"] = {f.name: sha256(f) for f in sorted(tmp.iterdir()) if f.name != contract.MANIFEST}
        (tmp / contract.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--out", default="artifacts/en-de-int8")
    p.add_argument("--parity-sentences", default=str(PARITY_SENTENCES))
    args = p.parse_args(argv)
    sentences = [s for s in Path(args.parity_sentences).read_text().splitlines() if s.strip()]
    manifest = quantize_artifact(args.artifact, args.out, sentences)
    print(json.dumps(dict(precision=manifest["precision"], parity=manifest["parity"]), indent=2))


if __name__ == "__main__":
    main()
