"""The engine core's host cost per decoder step (Python and numpy: scheduling, search, cache reorder), measured with a
model that answers instantly, so that the figure does not move with the graphs or with this shared machine's hour.

    .venv/bin/python -m loadtests.bench_host_step      # about 30 s

The model returns fixed log-probs (vocabulary 8000, eos made unlikely so that every sentence runs to its length
limit) over a real-sized cache (3 layers, 4 heads, d_head 64), and its top-k as the ONNX engine's TopK would. For 8
and 40 sentences of greedy and beam-4 search (static policy, one batch), prints microseconds of host time per
decoder step, best of 3 runs; with ``--compare-per-sentence``, also with the greedy choice made sentence by
sentence (what GreedySearch.batch_choose replaced). A real step of the bundled model at 40 rows takes 3-7 ms in
its graphs (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.candidates import TopCandidates
from engine.core import EngineCore
from engine.options import DecodingOptions
from engine.search import GreedySearch
from engine.state_ops import NumpyOps

VOCAB, N_LAYERS, N_HEADS, D_HEAD = 8000, 3, 4, 64
BOS, EOS, PAD = 2, 3, 0


class InstantModel:
    """The core's model interface answering at once: fixed log-probs float32 [rows, VOCAB] per step; ``seconds``
    adds up the time spent in it (the copy of the log-probs, the top-k in numpy: the graphs' work in the engine),
    which the figures leave out."""

    ops = NumpyOps()

    def __init__(self, seed: int = 0) -> None:
        self.seconds = 0.0
        rng = np.random.default_rng(seed)
        self.log_probs = np.log(rng.dirichlet(np.ones(VOCAB), size=1024)).astype(np.float32)
        self.log_probs[:, EOS] = -50.0  # sentences run to their limit

    def encode(self, src_ids, src_mask):
        cross = [np.zeros((src_ids.shape[0], N_HEADS, src_ids.shape[1], D_HEAD), np.float32)
                 for _ in range(N_LAYERS)]
        return cross, [c.copy() for c in cross]

    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k=None, *, positions, row_sentence,
             check_nan=True):
        started = time.perf_counter()
        out = (self.log_probs[:tokens.shape[0]].copy(), self_k, self_v,
               np.zeros((tokens.shape[0], src_mask.shape[1]), np.float32))
        self.seconds += time.perf_counter() - started
        return out

    def top_k(self, log_probs, k):
        """Each row's k best, best first, ties by lower id (as ONNX TopK)."""
        started = time.perf_counter()
        ids = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
        order = np.lexsort((ids, -np.take_along_axis(log_probs, ids, 1)), axis=1)
        ids = np.take_along_axis(ids, order, 1)
        self.seconds += time.perf_counter() - started
        return TopCandidates(np.take_along_axis(log_probs, ids, 1), ids, log_probs.shape[1])


def host_us_per_step(model: InstantModel, sentences: int, beam_size: int, length: int = 30) -> float:
    """Microseconds of the core's step() per decoder step, less the model's own time, for ``sentences``
    sentences of 20 source tokens, each decoding ``length`` steps."""
    core = EngineCore(model, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_positions=256, policy="static")
    options = DecodingOptions(beam_size=beam_size, max_length=length, max_length_a=0.0, max_length_b=length)
    for _ in range(sentences):
        core.submit([5] * 20 + [EOS], options)
    model.seconds = 0.0
    started = time.perf_counter()
    while core.has_work:
        core.step()
    return (time.perf_counter() - started - model.seconds) / core.stats.steps * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-per-sentence", action="store_true")
    args = p.parse_args(argv)
    model = InstantModel()
    batch_choose = GreedySearch.batch_choose
    print("| sentences x beam | host us/step |" + (" greedy chosen per sentence |" if args.compare_per_sentence
                                                    else ""))
    print("|---|---|" + ("---|" if args.compare_per_sentence else ""))
    for beam_size in (1, 4):
        for sentences in (8, 40):
            best = min(host_us_per_step(model, sentences, beam_size) for _ in range(3))
            row = f"| {sentences} x {beam_size} | {best:.0f} |"
            if args.compare_per_sentence:
                GreedySearch.batch_choose = staticmethod(lambda searches, log_probs: {})
                try:
                    alone = min(host_us_per_step(model, sentences, beam_size) for _ in range(3))
                finally:
                    GreedySearch.batch_choose = batch_choose
                row += f" {alone:.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
