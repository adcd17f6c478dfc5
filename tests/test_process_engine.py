"""The engine core in a process of its own (engine/process_engine.py): the same results as decoding alone, aborts,
settings and errors that cross the pipe, a child that dies, and the replica's request path over it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import signal
import time

import pytest

from engine.errors import EngineUnavailableError, InputTooLongError, NumericalError
from engine.options import DecodingOptions
from engine.process_engine import CoreSpec, CoreView, ProcessEngine
from engine.runtime import EngineConfig

from conftest import SENTENCES, NaNAfterToken

MIXED = [DecodingOptions(beam_size=1), DecodingOptions(beam_size=4), DecodingOptions(beam_size=4, n_best=2),
         DecodingOptions(beam_size=1, sampling_topk=5, sampling_temperature=0.8, seed=7),
         DecodingOptions(beam_size=2, no_repeat_ngram_size=2, length_penalty=1.0)]


def start(artifact, on_step=None, spec=CoreSpec) -> ProcessEngine:
    return ProcessEngine(spec(str(artifact), EngineConfig(device="cpu"), warmup=False), "test", on_step)


@dataclasses.dataclass(frozen=True)
class NaNSpec(CoreSpec):
    """The child's model writes NaN log-probs for rows whose last token is ``token`` (conftest.NaNAfterToken)."""

    token: int = 0

    def build(self):
        core, model = super().build()
        core.model = NaNAfterToken(core.model, self.token)
        return core, model


@pytest.fixture(scope="module")
def engine(artifact):
    steps: list[tuple[CoreView, list]] = []
    engine = start(artifact, lambda view, finished: steps.append((view, finished)))
    engine.steps = steps
    yield engine
    engine.close()


def test_sentences_of_mixed_options_decode_in_the_process_as_alone(engine, translator):
    """Sentences submitted at once with different options (greedy, beams, n_best, seeded sampling, n-gram rules)
    and a target prefix give each the tokens and scores they get decoded alone in this process; the admission
    counters return to 0 and the on_step callback saw the child's counters."""
    src = [translator.tokenize(s) for s in SENTENCES[:len(MIXED)]]
    prefix = translator.tokenizer.encode_target("Leider")

    async def main():
        futures = [engine.submit(s, o, group="request") for s, o in zip(src, MIXED)]
        futures.append(engine.submit(src[0], DecodingOptions(beam_size=4), target_prefix=prefix))
        return await asyncio.wait_for(asyncio.gather(*futures), 60)

    got = asyncio.run(main())
    want = [translator.translate_ids([s], o)[0] for s, o in zip(src, MIXED)]
    want.append(translator.translate_ids([src[0]], DecodingOptions(beam_size=4), target_prefixes=[prefix])[0])
    for done, hyps in zip(got, want):
        assert done.error is None and not done.aborted
        assert [h.tokens for h in done.hypotheses] == [h.tokens for h in hyps]
        assert [h.score for h in done.hypotheses] == pytest.approx([h.score for h in hyps], abs=1e-5)
    assert len(got[2].hypotheses) == 2
    assert (engine.queued_work, engine.interactive_work) == (0, 0) and engine.work_per_s > 0
    view = engine.steps[-1][0]
    assert view.stats.steps > 0 and view.stats.joined == view.stats.left and view.live_rows == 0


def test_an_aborted_sentence_leaves_at_the_next_step(engine, translator):
    src = translator.tokenize(SENTENCES[1])

    async def main():
        seen = len(engine.steps)
        future = engine.submit(src, DecodingOptions(beam_size=4, min_length=200, max_length=200))
        # Aborted once a step has reported it live, with 199 steps to go (a fixed 0.3 s sleep raced the decode).
        deadline = time.monotonic() + 30
        while not any(view.live_sentences for view, _ in engine.steps[seen:]):
            assert time.monotonic() < deadline, "the sentence never started"
            await asyncio.sleep(0.001)
        engine.abort(future)
        return await asyncio.wait_for(future, 30)

    started = time.monotonic()
    done = asyncio.run(main())
    assert done.aborted and not done.hypotheses and time.monotonic() - started < 10
    assert engine.queued_work == 0 and engine.alive


def test_the_child_freezes_its_loaded_heap(engine):
    """The child froze what it had loaded (engine/heap.py): the engine's modules, numpy's and ONNX Runtime's objects
    are thousands; a child that did not freeze reports 0."""
    assert engine.model.frozen_objects > 5000


def test_errors_and_settings_cross_the_pipe(engine, translator):
    """A submit the child's core refuses fails its future with the same error type and fields; budgets set with
    configure reach the child's schedule (one row per step: four greedy sentences no longer share a step)."""
    too_long = [5] * (translator.max_positions + 10) + [translator.eos_id]
    src, greedy = [translator.tokenize(s) for s in SENTENCES[:4]], DecodingOptions(beam_size=1)

    async def main():
        with pytest.raises(InputTooLongError) as refused:
            await asyncio.wait_for(engine.submit(too_long, DecodingOptions()), 30)
        assert refused.value.n_tokens == len(too_long)
        before = len(engine.steps)
        await asyncio.wait_for(asyncio.gather(*[engine.submit(s, greedy) for s in src]), 60)
        together = max(view.live_rows for view, _ in engine.steps[before:])
        engine.configure(max_batch_rows=1)
        before = len(engine.steps)
        await asyncio.wait_for(asyncio.gather(*[engine.submit(s, greedy) for s in src]), 60)
        alone = max(view.live_rows for view, _ in engine.steps[before:])
        engine.configure(max_batch_rows=512)
        return together, alone

    together, alone = asyncio.run(main())
    assert together == 4 and alone < 4
    assert engine.settings["max_batch_rows"] == 512


def test_a_sentence_that_fails_in_the_child_fails_alone(artifact, translator):
    """A sentence whose step gives NaN fails with NumericalError; a sentence of another request beside it gets its
    translation, and the engine process stays up (the child died of such a sentence, taking every other one with
    it, when it wrote the error into the frozen Finished)."""
    greedy = DecodingOptions(beam_size=1)
    bad, good = translator.tokenize(SENTENCES[0]), translator.tokenize(SENTENCES[5])
    poisoned = translator.translate_ids([bad], greedy)[0][0].tokens[1]
    want = translator.translate_ids([good], greedy)[0][0].tokens
    assert poisoned not in want
    engine = start(artifact, spec=functools.partial(NaNSpec, token=poisoned))

    async def main():
        return await asyncio.wait_for(asyncio.gather(engine.submit(bad, greedy, group="a"),
                                                     engine.submit(good, greedy, group="b")), 60)

    try:
        failed, ok = asyncio.run(main())
        assert isinstance(failed.error, NumericalError) and ok.error is None and ok.hypotheses[0].tokens == want
        assert engine.alive and engine.queued_work == 0
    finally:
        engine.close()


def test_a_killed_engine_process_fails_its_sentences_and_reports_itself_dead(artifact, translator):
    killed = []

    def kill_at_the_first_step(view, finished):
        # In the reader thread, at the first step's report: the sentence has 199 steps to go. (A fixed 0.3 s sleep
        # before the kill raced the decode once a step got faster: the sentence finished first.)
        if view.live_sentences and not killed:
            killed.append(view.stats.steps)
            os.kill(engine._process.pid, signal.SIGKILL)

    engine = start(artifact, kill_at_the_first_step)
    src = translator.tokenize(SENTENCES[2])

    async def main():
        future = engine.submit(src, DecodingOptions(beam_size=4, min_length=200, max_length=200))
        with pytest.raises(EngineUnavailableError, match="exited") as failed:
            await asyncio.wait_for(future, 30)
        assert failed.value.retry_after_s > 0
        with pytest.raises(EngineUnavailableError):
            engine.submit(src, DecodingOptions())

    asyncio.run(main())
    assert killed and killed[0] < 200  # killed while decoding, not after
    assert not engine.alive and engine.queued_work == 0
    engine.close()


def test_a_stopped_engine_process_counts_as_stalled_while_it_holds_work(artifact, translator):
    """A SIGSTOPped child passed /health for about 94 s (a break-it trial): its stalled_s now grows while it holds
    work (the replica's health turns 503 past engine_stall_s: tests/test_admission.py), and falls to 0 once it
    goes on and finishes."""
    engine = start(artifact)
    src = translator.tokenize(SENTENCES[2])

    async def main():
        await asyncio.sleep(0.3)
        assert engine.stalled_s == 0
        future = engine.submit(src, DecodingOptions(beam_size=4, min_length=200, max_length=200))
        os.kill(engine._process.pid, signal.SIGSTOP)  # at once: the sentence must not finish first
        try:
            await asyncio.sleep(1.0)
            assert engine.stalled_s > 0.8 and engine.alive
        finally:
            os.kill(engine._process.pid, signal.SIGCONT)
        done = await asyncio.wait_for(future, 60)
        assert done.error is None and len(done.hypotheses[0].tokens) == 200

    try:
        asyncio.run(main())
        assert engine.stalled_s == 0 and engine.queued_work == 0
    finally:
        engine.close()


def test_health_is_a_503_with_retry_after_while_an_engine_is_down(artifact, translator):
    """GET /health answered "ok" for the 25-28 s a replica whose engine process was killed took to be replaced,
    while every translation got 503."""
    from test_admission import replica

    from service.errors import response_for

    dep = replica(translator)
    dep.default.engine.close()  # its loop ends: alive is False, as for a dead child
    with pytest.raises(EngineUnavailableError, match="en-de is not running") as down:
        asyncio.run(dep.health())
    response = response_for(down.value)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0


def test_a_child_that_cannot_build_its_core_fails_the_start(tmp_path):
    with pytest.raises(EngineUnavailableError, match="failed to start"):
        ProcessEngine(CoreSpec(str(tmp_path), EngineConfig(device="cpu"), warmup=False))


def test_the_replica_answers_the_same_over_an_engine_process(artifact, translator):
    """A replica with engine_process answers a request as one with the engine on a thread; its step metrics
    (StepMetrics over the child's CoreView) count decoder steps."""
    from test_admission import replica

    from service import schemas
    from service.metrics import StepMetrics

    body = {"text": [SENTENCES[0], SENTENCES[3] + " " + SENTENCES[4]], "beam_size": 4, "n_best": 2}
    threaded = replica(translator)
    process = replica(translator)
    process.default.engine.close()

    class Gauge:
        def __init__(self):
            self.values = []

        def observe(self, value):
            self.values.append(value)

        set = observe

    metrics = process.default.metrics
    for name in ("step_rows", "step_sentences", "queue_seconds", "compute_seconds", "live_rows", "waiting"):
        setattr(metrics, name, Gauge())
    metrics.decode_steps = metrics.decoder_rows = metrics.joined = metrics.left = None
    counted = []
    metrics.count = lambda counter, n: counted.append(n) if counter is None else counter.inc(n)
    process.default.engine = start(artifact, StepMetrics(metrics))

    async def ask(dep):
        response = await dep._translate(schemas.TranslateRequest.model_validate_json(json.dumps(body)),
                                        dep.default.metrics.request)
        return json.loads(response.body)

    try:
        assert asyncio.run(ask(process)) == asyncio.run(ask(threaded))
        assert metrics.step_rows.values and sum(counted) > 0
    finally:
        threaded.default.engine.close()
        process.default.engine.close()
