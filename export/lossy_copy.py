"""Lossy copies of an exported artifact (int8, float16): graphs converted one by one, then the copy's agreement with
the float32 original measured and recorded in its manifest.

A lossy copy cannot pass the float32 export's parity check by design, so instead the manifest records, on the
parity sentences, how many greedy outputs are identical to float32 and the max log-prob difference along the
float32 greedy path; the BLEU loss on the test split is reported by loadtests/benchmark.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from engine import contract
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.onnx_export import sha256
from export.publish import publish

PARITY_SENTENCES = Path(__file__).with_name("parity_sentences.txt")

ConvertFn = Callable[[Path, Path, Path], None]  # (source graph, destination graph, scratch folder)


def greedy_path_diff(reference: Translator, other: Translator, text: str, max_length: int = 64) -> float:
    """Max abs log-prob difference between two engines along the reference's greedy path of one sentence."""
    src = np.asarray([reference.tokenize(text)], dtype=np.int64)
    mask = np.ones_like(src, dtype=bool)
    states = []
    for engine in (reference, other):
        ck, cv = engine.model.encode(src, mask)
        states.append([*engine.model.empty_cache(ck[0], 1, max_length), ck, cv])
    token, diff = reference.bos_id, 0.0
    for t in range(max_length):
        outputs = []
        for state, engine in zip(states, (reference, other)):
            log_probs, state[0], state[1], _ = engine.model.step(np.asarray([[token]]), *state, mask,
                                                                 positions=np.asarray([t]))
            outputs.append(log_probs[0])
        diff = max(diff, float(np.abs(outputs[0] - outputs[1]).max()))
        token = int(outputs[0].argmax())
        if token == reference.eos_id:
            break
    return diff


def write_lossy_copy(artifact: str | Path, out: str | Path, convert: ConvertFn, precision: str, method: str,
                     sentences: list[str], device: str = "cpu") -> dict:
    """Writes ``artifact`` to ``out`` with both graphs passed through ``convert``; returns the new manifest.

    Args:
        convert: writes the converted graph of its first argument to its second.
        precision, method: recorded in the manifest ("int8", "float16"; how it was made).
        sentences: the parity sentences the agreement is measured on.
        device: where the copy is run for the agreement check ("cpu" or "cuda"; the reference runs on the CPU).
    Raises:
        FileNotFoundError: the source artifact is incomplete.
        EngineUnavailableError: device "cuda" without a working CUDA provider.
        NumericalError: the copy produced NaN log-probs on a parity sentence (nothing is written then).
        ValueError: no parity sentence.
    """
    if not sentences:
        raise ValueError("the agreement with float32 needs at least one parity sentence")
    artifact, out = Path(artifact), Path(out)
    manifest = json.loads((artifact / contract.MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name) / "artifact"
        shutil.copytree(artifact, tmp)
        for graph in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
            convert(artifact / graph, tmp / graph, Path(tmp_name))
        reference = Translator(artifact, EngineConfig(device="cpu"))
        copy = Translator(tmp, EngineConfig(device=device))
        options = DecodingOptions(beam_size=1, max_length=64)
        same = sum(a.text == b.text for a, b in zip(reference.translate(sentences, options),
                                                   copy.translate(sentences, options)))
        manifest.update(
            precision=precision,
            conversion=dict(method=method, source_files={g: manifest["files"][g] for g in
                                                         (contract.ENCODER_FILE, contract.DECODER_STEP_FILE)}),
            parity=dict(sentences=len(sentences), greedy_identical_to_float32=same, measured_on=copy.provider,
                        max_abs_log_prob_diff=round(max(greedy_path_diff(reference, copy, s)
                                                        for s in sentences), 6)))
        manifest["files"] = {f.name: sha256(f) for f in sorted(tmp.iterdir()) if f.name != contract.MANIFEST}
        (tmp / contract.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(tmp, out)
    return manifest


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a text file."""
    return [s for s in Path(path).read_text().splitlines() if s.strip()]
