"""Which attention path of the float16 decoder step translates like float32 on CUDA, and how fast each is.

    python3 scripts/gpu/fp16_paths.py --out $OUT/fp16_paths.json      # on the GPU machine, after check.sh's setup

ONNX Runtime's CUDA GroupQueryAttention picks its kernel at run time: flash attention with its decode fast path
(past and present one buffer, one query per row), flash attention without it (ORT_DISABLE_FLASH_DECODE=1) or
memory-efficient attention (ORT_DISABLE_FLASH_ATTENTION=1). The float16 copy of the standard-ops step (no
GroupQueryAttention) is another variant. On an H200 (2026-12-04) the three kernels gave the same wrong outputs, the
first token right and the rest wrong, and the standard-ops copy agreed with float32 on every sentence. ONNX
Runtime treats a GroupQueryAttention call whose total_sequence_length equals its query length (1 here: every row
at position 0, a batch's first step) as a prompt; "gqa-no-first-prompt" tests whether that step is the one that
goes wrong, with total_sequence_length raised to at least 2 (rows still attend over their own seqlens_k + 1). Each runs in its own process (the variables are read when a session is
made) on the parity sentences (greedy outputs identical to float32 on the CPU, and the largest log-prob difference
along float32's greedy path of the first one) and on the test split (BLEU and seconds, greedy and beam 4).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEVICE = os.environ.get("FP16_PATHS_DEVICE", "cuda")  # "cpu" to try the script on a machine without a GPU

VARIANTS = {  # name: (artifact, environment)
    "gqa-no-first-prompt": ("gqa-total2", {}),
    "gqa-flash-decode": ("gqa", {}),
    "gqa-flash": ("gqa", {"ORT_DISABLE_FLASH_DECODE": "1"}),
    "gqa-memory-efficient": ("gqa", {"ORT_DISABLE_FLASH_ATTENTION": "1"}),
    "standard": ("standard", {}),
}


def measure(work: Path, artifact: str, corpus: Path) -> dict:
    """One variant, in this process: agreement with float32 (CPU) and test-split BLEU and seconds on CUDA."""
    import sacrebleu

    from engine.options import DecodingOptions
    from engine.runtime import EngineConfig
    from engine.translator import Translator
    from export.lossy_copy import greedy_path_diff
    from export.lossy_copy import PARITY_SENTENCES as PARITY_FILE, read_sentences
    from engine import contract
    from nmt.data import read_pairs

    # This script measures the step the engine refuses on CUDA (contract.check_provider), so it lets it run.
    contract.check_provider = lambda *args: None
    sentences = read_sentences(PARITY_FILE)
    reference = Translator(work / "gqa", EngineConfig(device="cpu"))
    half = Translator(work / f"{artifact}-fp16", EngineConfig(device=DEVICE, max_batch_tokens=16384))
    greedy = DecodingOptions(beam_size=1, max_length=64)
    want = [h.text for h in reference.translate(sentences, greedy)]
    got = [h.text for h in half.translate(sentences, greedy)]
    out = dict(provider=half.provider, parity_sentences=len(want),
               greedy_identical_to_float32=sum(a == b for a, b in zip(want, got)),
               max_abs_log_prob_diff_first=round(greedy_path_diff(reference, half, sentences[0]), 5),
               first=got[0], first_float32=want[0])
    pairs = read_pairs(corpus / "test.tsv.gz")
    src, ref = [en for en, _ in pairs], [de for _, de in pairs]
    for beam_size in (1, 4):
        options = DecodingOptions(beam_size=beam_size)
        half.translate(src[:8], options)
        started = time.perf_counter()
        hyps = [h.text for h in half.translate(src, options)]
        out[f"beam{beam_size}"] = dict(seconds=round(time.perf_counter() - started, 3),
                                       bleu=round(sacrebleu.corpus_bleu(hyps, [ref]).score, 2))
    return out


def total_at_least_two(artifact: Path, out: Path) -> None:
    """Copies a GroupQueryAttention artifact with each such node's total_sequence_length input raised to >= 2."""
    import onnx
    from onnx import helper

    from engine import contract

    shutil.copytree(artifact, out)
    model = onnx.load(str(out / contract.DECODER_STEP_FILE))
    two = helper.make_node("Constant", [], ["total_floor"], value=helper.make_tensor("two", onnx.TensorProto.INT32,
                                                                                      [], [2]))
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    total = nodes[0].input[6]
    assert all(n.input[6] == total for n in nodes), "one total_sequence_length for every layer expected"
    raised = helper.make_node("Max", [total, "total_floor"], ["total_at_least_two"])
    for n in nodes:
        n.input[6] = "total_at_least_two"
    first = list(model.graph.node).index(nodes[0])
    model.graph.node.insert(first, raised)
    model.graph.node.insert(first, two)
    onnx.save(model, str(out / contract.DECODER_STEP_FILE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".gpu/out/fp16_paths.json")
    p.add_argument("--corpus", default=".gpu/corpus")
    p.add_argument("--measure", nargs=2, metavar=("WORK", "ARTIFACT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], Path(args.corpus))))
        return
    from export.fp16 import fp16_graph
    from export.lossy_copy import write_lossy_copy, PARITY_SENTENCES as PARITY_FILE, read_sentences
    from export.onnx_export import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="fp16-paths-"))
    sentences = read_sentences(PARITY_FILE)
    results = {}
    for name in ("gqa", "standard"):
        export_checkpoint(ROOT / "models" / "en-de", work / name, sentences[:4], self_attention=name)
        manifest = write_lossy_copy(work / name, work / f"{name}-fp16", fp16_graph, "float16", "fp16_paths", sentences)
        results[f"{name}-fp16 on the CPU"] = manifest["parity"]
        print(name, "float16 on the CPU:", manifest["parity"], flush=True)
    total_at_least_two(work / "gqa-fp16", work / "gqa-total2-fp16")
    for variant, (artifact, env) in VARIANTS.items():
        run = subprocess.run([sys.executable, __file__, "--corpus", args.corpus, "--measure", str(work), artifact],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        lines = run.stdout.strip().splitlines()
        results[variant] = json.loads(lines[-1]) if run.returncode == 0 and lines else dict(
            error=run.stderr.strip().splitlines()[-3:])
        print(variant, json.dumps(results[variant]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
