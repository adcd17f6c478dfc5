"""The decoder step graph alone, artifacts side by side: milliseconds per call on the same random inputs.

    .venv/bin/python -m loadtests.bench_step_graph artifacts/en-de /tmp/en-de-before    # about 1 min on 2 cores

For comparing two exports of one model (a change to how nmt/model.py's step is exported, an int8 or float16
copy): each artifact's decoder_step.onnx gets the same inputs in its float type, bound as the engine binds them
(the cache as both input and output, engine/runtime.py), for 1 sentence x 1 row, 8 x 1, 40 x 1 and 10 x 4 (beam
4), with 15 cached positions (10 for the first) and 25 source tokens. The artifacts take turns, five rounds of 30
calls each; the best round per artifact is printed. 1 ONNX Runtime thread by default (--threads). No search, no
host work: for those, time the engine end to end (loadtests/benchmark.py).

With ``--engine``, each artifact also gets a column for the engine's own ``OnnxModel.step`` on the same inputs
(engine/runtime.py: its binding, cross slots and checks around the same graph call); the difference to the graph's
column is that wrapper's host time per step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import contract
from engine.runtime import EngineConfig, OnnxModel, _session_options, cross_slots

SHAPES = ((1, 1, 10), (8, 1, 15), (40, 1, 15), (10, 4, 15))  # sentences, rows per sentence, cached positions
SRC_LEN = 25


def step_inputs(config: dict, sentences: int, beam: int, positions: int, rng: np.random.Generator) -> dict:
    """Random decoder-step inputs (engine/contract.py) for ``sentences`` x ``beam`` rows: float32 caches of
    capacity positions + 8, every row at ``positions``."""
    layers, heads = config["n_decoder_layers"], config["n_heads"]
    d_head = config["d_model"] // heads
    rows = sentences * beam
    slot_rows, row_slot = cross_slots(np.repeat(np.arange(sentences), beam))
    feed = dict(tokens=rng.integers(4, config["vocab_size"], (rows, 1)), positions=np.full(rows, positions, np.int64),
                src_mask=np.ones((sentences, SRC_LEN), bool), slot_rows=slot_rows, row_slot=row_slot)
    for i in range(layers):
        for name in ("self_k", "self_v"):
            feed[f"{name}_{i}"] = rng.standard_normal((rows, heads, positions + 8, d_head), dtype=np.float32)
        for name in ("cross_k", "cross_v"):
            feed[f"{name}_{i}"] = rng.standard_normal((sentences, heads, SRC_LEN, d_head), dtype=np.float32)
    return feed


def as_graph_types(session: ort.InferenceSession, feed: dict) -> dict:
    """``feed`` with its float arrays in the graph's float type (a float16 copy takes float16 state)."""
    types = {i.name: i.type for i in session.get_inputs()}
    return {name: value.astype(np.float16) if types[name] == "tensor(float16)" else value
            for name, value in feed.items()}


def run_step(session: ort.InferenceSession, feed: dict) -> None:
    """One call, each cache bound as input and output (written in place), logits and attention to the host."""
    binding = session.io_binding()
    for name, value in feed.items():
        if name.startswith("self_"):
            binding.bind_input(name, "cpu", 0, value.dtype, value.shape, value.ctypes.data)
            binding.bind_output(f"new_{name}", "cpu", 0, value.dtype, value.shape, value.ctypes.data)
        else:
            binding.bind_cpu_input(name, value)
    binding.bind_output("logits", "cpu")
    binding.bind_output("attention", "cpu")
    session.run_with_iobinding(binding)


def engine_step(model: OnnxModel, feed: dict, row_sentence: np.ndarray) -> None:
    """One call of the engine's step on ``feed`` (the caches written in place, as :func:`run_step`)."""
    n = model.n_layers
    model.step(feed["tokens"], [feed[f"self_k_{i}"] for i in range(n)], [feed[f"self_v_{i}"] for i in range(n)],
               [feed[f"cross_k_{i}"] for i in range(n)], [feed[f"cross_v_{i}"] for i in range(n)], feed["src_mask"],
               positions=feed["positions"], row_sentence=row_sentence)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", help="artifact folders of one model (same config.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--engine", action="store_true", help="also time OnnxModel.step on the same inputs")
    args = p.parse_args(argv)
    folders = [Path(a) for a in args.artifacts]
    config = json.loads((folders[0] / contract.CONFIG_FILE).read_text())
    options = _session_options(EngineConfig(device="cpu", intra_op_threads=args.threads))
    sessions = [ort.InferenceSession(str(f / contract.DECODER_STEP_FILE), options, providers=["CPUExecutionProvider"])
                for f in folders]
    cfg = EngineConfig(device="cpu", intra_op_threads=args.threads)
    models = [OnnxModel(f, cfg, config["n_decoder_layers"],
                        json.loads((f / contract.MANIFEST).read_text()).get("self_attention"))
              for f in folders] if args.engine else []
    rng = np.random.default_rng(0)
    columns = [f"{f} (ms)" for f in folders] + [f"{f} OnnxModel.step (ms)" for f in folders if args.engine]
    print("| sentences x rows, cached positions | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for sentences, beam, positions in SHAPES:
        feed = step_inputs(config, sentences, beam, positions, rng)
        feeds = [as_graph_types(session, feed) for session in sessions]
        row_sentence = np.repeat(np.arange(sentences), beam)
        calls = [lambda i=i: run_step(sessions[i], feeds[i]) for i in range(len(sessions))]
        calls += [lambda i=i: engine_step(models[i], feeds[i], row_sentence) for i in range(len(models))]
        best = [float("inf")] * len(calls)
        for _ in range(args.rounds):
            for i, call in enumerate(calls):
                call()  # warm: the first call of a shape plans its memory
                started = time.perf_counter()
                for _ in range(args.calls):
                    call()
                best[i] = min(best[i], (time.perf_counter() - started) / args.calls)
        print(f"| {sentences} x {beam}, {positions} | " + " | ".join(f"{b * 1e3:.3f}" for b in best) + " |",
              flush=True)


if __name__ == "__main__":
    main()
