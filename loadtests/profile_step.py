"""Where a decoder step's time goes: each ONNX Runtime kernel's share, and the host's (Python, numpy) share.

    .venv/bin/python -m loadtests.profile_step --artifact artifacts/en-de --threads 1    # about 2 min on 2 cores

For each batch of 1, 4 and 32 test sentences (decoded together) and beam 1 and 4, translates enough batches to
run about 300 decoder steps, then prints one table row: ms per decoder step (wall), the share of the step spent
in the decoder graph, the encoder graph, the TopK graph, the log-softmax of the step's logits (lsm; artifact format
7: beam steps run it, greedy steps without scores, as decoded here, skip it), and on the host (everything else:
the search, the beam reorder of the cache in numpy, joins), and the decoder graph's five largest kernels by op type (from ONNX
Runtime's own profiler: ``SessionOptions.enable_profiling``; Gemm there is every linear layer and the output
projection, FusedGemm the FFN's first layer with its ReLU, FusedMatMul and MatMul attention's per-head products).
Run it on a quiet machine: shares hold up under load better than times, but neither
is exact then.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import onnxruntime as ort

from engine import contract
from engine.core import CoreStats
from engine.options import DecodingOptions
from engine.runtime import EngineConfig, _session_options
from engine.translator import Translator
from nmt.data import read_pairs


class _Timed:
    """Wraps an ONNX Runtime session; adds the seconds spent in its run calls to ``seconds``."""

    def __init__(self, session) -> None:
        self.session, self.seconds = session, 0.0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def _timed(self, method: str, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self.session, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def run(self, *args, **kwargs):
        return self._timed("run", *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed("run_with_iobinding", *args, **kwargs)


def kernel_shares(profile_file: str) -> dict[str, float]:
    """ONNX Runtime's profile (a chrome-trace JSON) -> share of kernel time per op type, largest first."""
    by_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(profile_file).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1
    return {op: d / total for op, d in by_op.most_common()}


def profile(artifact: Path, sources: list[str], batch: int, beam_size: int, threads: int,
            target_steps: int = 300) -> dict:
    """One row of the table: ``batch`` sentences decoded together, batches repeated until ``target_steps``."""
    # The CPU throughout: the profiled decoder session below is a CPU one, and the encoder and TopK graphs must run
    # where it does (on a CUDA machine "auto" would have put them on the GPU).
    config = EngineConfig(device="cpu", intra_op_threads=threads)
    translator = Translator(artifact, config)
    model = translator.model
    options = _session_options(config)
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/profile_step_{os.getpid()}"
    model.decoder = _Timed(ort.InferenceSession(str(artifact / contract.DECODER_STEP_FILE), options,
                                                providers=["CPUExecutionProvider"]))
    model.encoder = _Timed(model.encoder)
    model.top_k.session = _Timed(model.top_k.session)  # the one-node TopK graph, and the two-stage one (CPU)
    model.top_k.blocked = _Timed(model.top_k.blocked) if model.top_k.blocked else None
    top_k_sessions = [s for s in (model.top_k.session, model.top_k.blocked) if s]
    model.log_softmax.host = model.log_softmax.session = _Timed(model.log_softmax.host)  # the CPU's (format 7)
    # No scores, as the service decodes a request that does not ask for them: greedy steps skip the log-softmax.
    decoding = DecodingOptions(beam_size=beam_size, return_scores=False)
    translator.translate(sources[:batch], decoding)  # warm-up
    model.decoder.seconds = model.encoder.seconds = model.log_softmax.host.seconds = 0.0
    for s in top_k_sessions:
        s.seconds = 0.0
    stats, wall, i = CoreStats(), 0.0, 0
    while stats.steps < target_steps:
        chunk = [sources[(i + j) % len(sources)] for j in range(batch)]
        i += batch
        started = time.perf_counter()
        translator.translate(chunk, decoding, stats)
        wall += time.perf_counter() - started
    profile_file = model.decoder.session.end_profiling()
    shares = kernel_shares(profile_file)
    os.remove(profile_file)
    graph = {"decoder": model.decoder.seconds, "encoder": model.encoder.seconds,
             "top_k": sum(s.seconds for s in top_k_sessions), "log_softmax": model.log_softmax.host.seconds}
    return dict(sentences=batch, beam_size=beam_size, steps=stats.steps,
                rows_per_step=round(stats.rows / stats.steps, 1),
                ms_per_step=round(wall / stats.steps * 1e3, 3),
                share={**{k: round(v / wall, 3) for k, v in graph.items()},
                       "host": round(1 - sum(graph.values()) / wall, 3)},
                decoder_kernels={op: round(s, 3) for op, s in list(shares.items())[:5]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=300, help="decoder steps per row (about)")
    args = p.parse_args(argv)
    sources = [en for en, _ in read_pairs(Path(args.corpus) / "test.tsv.gz")][:500]
    print(f"{'sent':>4} {'beam':>4} {'rows':>6} {'ms/step':>8} {'decoder':>8} {'encoder':>8} {'top_k':>6} "
          f"{'lsm':>6} {'host':>6}  decoder kernels (share of the decoder graph's kernel time)")
    for batch in (1, 4, 32):
        for beam_size in (1, 4):
            r = profile(Path(args.artifact), sources, batch, beam_size, args.threads, args.steps)
            s = r["share"]
            kernels = ", ".join(f"{op} {v:.0%}" for op, v in r["decoder_kernels"].items())
            print(f"{batch:>4} {beam_size:>4} {r['rows_per_step']:>6} {r['ms_per_step']:>8} {s['decoder']:>8.0%} "
                  f"{s['encoder']:>8.0%} {s['top_k']:>6.0%} {s['log_softmax']:>6.0%} {s['host']:>6.0%}  {kernels}",
                  flush=True)


if __name__ == "__main__":
    main()
