"""The engine core alone under an open loop: Poisson arrivals of one-sentence requests, scheduling policies compared.

    .venv/bin/python -m loadtests.open_loop_engine --rate 45 --seconds 12     # about 1 minute on 2 cores
    .venv/bin/python -m loadtests.open_loop_engine --rate 43 --max-batch-rows 16   # the same under a row budget
    .venv/bin/python -m loadtests.open_loop_engine --closed 64                # about 30 s: sentences/s per policy

No HTTP, no Ray: one process submits each request to an EngineCore (engine/core.py) when its arrival time has come
and steps the core in between, as the service's engine loop does, so what the figures show is the scheduling
policy and the decoder, not the web stack. Requests are test sentences with beam_size drawn per request (50% beam 4,
40% greedy, 10% beam 16, as loadtests/bench_scheduling.py's open loop), arrivals and draws from a fixed seed, the
same for every policy. For each policy prints one JSON line: requests, latency p50 / p99 / max (seconds from
arrival to the sentence leaving the core), the same per beam_size (``by_beam``: p50 / p90 / p99) and wall seconds.
Policies: "static" (a batch decodes to completion), "continuous" with one batch (every sentence joins the running
batch, the engine before batches of its own) and with the core's default batches (engine/core.py's module
docstring), each under ``--max-batch-rows`` (the core's row budget). Last, each request decoded alone on the idle
engine, one after another: its own decode time, which no schedule can beat, so their p99 is a lower bound on any
policy's. A run under other load is noisy: the p99 of a 12-second window rests on a handful of requests, so compare
policies within one run, and several runs.

``--closed N`` instead runs a closed loop: N clients, each with one sentence at beam 4 in flight, taking the next of
the first 500 test sentences (in file order, so lengths mix) as soon as theirs finishes, as bench_scheduling's
saturation scenario does over HTTP; per policy it prints sentences/s, decoder steps and rows per step, beside the
whole list decoded at once in length order (``Translator.translate_ids``, the engine-alone figure of that scenario).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.core import MAX_BATCHES, EngineCore
from engine.heap import freeze_long_lived
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from loadtests.bench_scheduling import beam_sizes, poisson_arrivals
from nmt.data import read_pairs

POLICIES = (("static", "static", 1), ("continuous, 1 batch", "continuous", 1),
            (f"continuous, {MAX_BATCHES} batches of each kind", "continuous", MAX_BATCHES))


def arrivals(sources: list[list[int]], rate: float, seconds: float, seed: int = 0):
    """[(arrival time s, src ids, beam_size)]: a Poisson process of ``rate`` requests/s over ``seconds``, each a
    source drawn from ``sources`` with a beam_size drawn from bench_scheduling's mix; the same seed, the same list."""
    times = poisson_arrivals(rate, seconds, seed)
    rng = random.Random(seed)
    return [(t, rng.choice(sources), beam) for t, beam in zip(times, beam_sizes(len(times), seed))]


def _figures(latency: list[float], beams: list[int]) -> dict:
    """requests, latency p50 / p99 / max (s) and ``by_beam``: {beam_size: [p50, p90, p99]} of the latencies."""
    latency_ = np.asarray(latency)
    by_beam = {}
    for beam in sorted(set(beams)):
        mine = latency_[np.asarray(beams) == beam]
        by_beam[beam] = [round(float(q), 3) for q in np.percentile(mine, [50, 90, 99])]
    return dict(requests=len(latency_), latency_p50_s=round(float(np.percentile(latency_, 50)), 3),
                latency_p99_s=round(float(np.percentile(latency_, 99)), 3),
                latency_max_s=round(float(latency_.max()), 3), by_beam=by_beam)


def run(core: EngineCore, requests) -> dict:
    """Feeds ``requests`` to ``core`` at their arrival times (wall clock) and steps it; returns the figures."""
    started, submitted, latency, beams, i = time.perf_counter(), {}, [], [], 0
    while i < len(requests) or core.has_work:
        now = time.perf_counter() - started
        while i < len(requests) and requests[i][0] <= now:
            arrival, src_ids, beam = requests[i]
            submitted[core.submit(src_ids, DecodingOptions(beam_size=beam), group=i)] = (arrival, beam)
            i += 1
        if not core.has_work:  # idle until the next arrival, as the service's loop waits
            time.sleep(max(0.0, requests[i][0] - now))
            continue
        for done in core.step():
            arrival, beam = submitted[done.handle]
            latency.append(time.perf_counter() - started - arrival)
            beams.append(beam)
    return dict(**_figures(latency, beams), wall_s=round(time.perf_counter() - started, 1))


def alone(core: EngineCore, requests) -> dict:
    """Decodes each of ``requests`` alone on the idle ``core``, one after another (arrival times ignored); returns
    the figures of their decode times (s): what each request costs without any other, a lower bound on its latency
    under any schedule."""
    latency, beams = [], []
    for _, src_ids, beam in requests:
        started = time.perf_counter()
        core.submit(src_ids, DecodingOptions(beam_size=beam))
        while core.has_work:
            core.step()
        latency.append(time.perf_counter() - started)
        beams.append(beam)
    return _figures(latency, beams)


def closed_loop(core: EngineCore, sources: list[list[int]], clients: int, options: DecodingOptions) -> dict:
    """Decodes ``sources`` with ``clients`` one-sentence requests in flight (each its own group), a finished one
    replaced at once by the next source; returns sentences/s, steps and mean rows per step."""
    started, following = time.perf_counter(), 0
    for following in range(min(clients, len(sources))):
        core.submit(sources[following], options, group=following)
    following = min(clients, len(sources))
    while core.has_work:
        for _ in core.step():
            if following < len(sources):
                core.submit(sources[following], options, group=following)
                following += 1
    seconds = time.perf_counter() - started
    return dict(clients=clients, sentences=len(sources), sentences_per_s=round(len(sources) / seconds, 1),
                steps=core.stats.steps, rows_per_step=round(core.stats.rows / max(1, core.stats.steps), 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--rate", type=float, default=45.0, help="requests (sentences) per second")
    p.add_argument("--seconds", type=float, default=12.0, help="arrivals over this many seconds")
    p.add_argument("--closed", type=int, metavar="N", help="a closed loop of N one-sentence clients at beam 4 "
                                                           "instead (module docstring)")
    p.add_argument("--max-batch-rows", type=int, default=EngineConfig.max_batch_rows,
                   help="the core's budget of decoder rows (default: the engine's)")
    args = p.parse_args(argv)
    translator = Translator(args.artifact, EngineConfig(device="cpu", intra_op_threads=args.threads))
    freeze_long_lived()  # as a replica does once loaded (engine/heap.py)
    sources = [translator.tokenize(en) for en, _ in read_pairs(Path(args.corpus) / "test.tsv.gz")]
    if args.closed:
        beam4 = replace(translator.default_options, beam_size=4)
        sources = sources[:500]
        translator.translate_ids(sources[:8], beam4, policy="continuous")  # warm-up
        started = time.perf_counter()
        translator.translate_ids(sources, beam4, policy="continuous")
        print(json.dumps(dict(policy="all at once, length order", sentences=len(sources),
                              sentences_per_s=round(len(sources) / (time.perf_counter() - started), 1))))
    else:
        requests = arrivals(sources, args.rate, args.seconds)

    def new_core(policy: str, max_batches: int) -> EngineCore:
        return EngineCore(translator.model, bos_id=translator.bos_id, eos_id=translator.eos_id,
                          pad_id=translator.pad_id, max_positions=translator.max_positions, policy=policy,
                          max_batches=max_batches, max_batch_rows=args.max_batch_rows)

    for name, policy, max_batches in POLICIES:
        core = new_core(policy, max_batches)
        figures = (closed_loop(core, sources, args.closed, beam4) if args.closed
                   else dict(rate_per_s=args.rate, max_batch_rows=args.max_batch_rows, **run(core, requests)))
        print(json.dumps(dict(policy=name, **figures)), flush=True)
    if not args.closed:
        print(json.dumps(dict(policy="each alone on the idle engine (a bound)", **alone(new_core("static", 1),
                                                                                       requests))), flush=True)


if __name__ == "__main__":
    main()
