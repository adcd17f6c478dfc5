"""Engine throughput in process: generated target tokens/s and sentences/s on the test split.

    .venv/bin/python -m loadtests.bench_engine --artifact artifacts/en-de --threads 1 --limit 200

Prints one JSON line per decoding mode (greedy, beam 4), with the number of decoder steps and rows it took. The
list is decoded as one caller's (``Translator.translate_ids``) under ``--policy`` (engine/core.py; "refill", the
default there, "static" or "continuous"). Time on a quiet machine: another busy process on a
2-core machine changes these figures several-fold (CTranslate2 with 2 threads beside one: 1627 to 37-550 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.heap import freeze_long_lived
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.core import POLICIES, CoreStats
from engine.translator import Translator
from nmt.data import read_pairs


def run(translator: Translator, sources: list[str], options: DecodingOptions, repeats: int,
        policy: str = "refill") -> dict:
    """Best of ``repeats`` (seconds) decodes of ``sources`` as one list under ``policy``, tokenization included."""
    translator.translate(sources[:8], options)  # warm-up
    best = None
    for _ in range(repeats):
        stats = CoreStats()
        started = time.perf_counter()
        hypotheses = translator.translate_ids([translator.tokenize(s) for s in sources], options, stats,
                                              policy=policy)
        seconds = time.perf_counter() - started
        if best is None or seconds < best[0]:
            best = (seconds, hypotheses, stats)
    seconds, hypotheses, stats = best
    tokens = sum(len(h[0].tokens) + 1 for h in hypotheses if h)  # + eos: every generated token costs a step
    return dict(beam_size=options.beam_size, policy=policy, sentences=len(sources), seconds=round(seconds, 3),
                sentences_per_s=round(len(sources) / seconds, 1), target_tokens_per_s=round(tokens / seconds, 1),
                decoder_steps=stats.steps, decoder_rows=stats.rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--limit", type=int, default=200, help="test sentences to translate")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--intra-op-spinning", action="store_true", help="those threads busy-wait between kernels "
                   "(ONNX Runtime's default; EngineConfig's is off)")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs")
    p.add_argument("--policy", default="refill", choices=POLICIES, help="the engine core's scheduling")
    args = p.parse_args(argv)
    sources = [en for en, _ in read_pairs(Path(args.corpus) / "test.tsv.gz")][: args.limit]
    translator = Translator(args.artifact, EngineConfig(intra_op_threads=args.threads,
                                                        intra_op_spinning=args.intra_op_spinning))
    freeze_long_lived()  # as a replica does once loaded (engine/heap.py)
    for beam_size in (1, 4):
        result = run(translator, sources, DecodingOptions(beam_size=beam_size), args.repeats, args.policy)
        print(json.dumps(dict(provider=translator.provider, threads=args.threads,
                              intra_op_spinning=args.intra_op_spinning, **result)))


if __name__ == "__main__":
    main()
