"""The replica's request path over the engine loop, driven directly (no Ray): admission by work, one deadline per
request, a failing sentence stopping its siblings, nothing left in the engine afterwards, and live reconfiguration
that cannot take a replica down."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from engine.async_engine import AsyncEngine
from engine.explain import Explainer
from engine.errors import EngineUnavailableError, InvalidRequestError, NumericalError
from engine.options import DecodingOptions
from service.app import AppArgs, TranslatorDeployment, _Model
from service import request_texts
from service.request_texts import Sentence
from service.errors import OverloadedError, RequestTimeoutError

from conftest import SENTENCES, NaNAfterToken


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n=1):
        self.value += n


class StubMetrics:
    """ServiceMetrics' interface, counting pending sentences."""

    def __init__(self) -> None:
        self.pending, self.statuses = 0, []
        self.rejected, self.timeouts, self.cancelled, self.source_tokens = Counter(), Counter(), Counter(), Counter()
        self.sentences, self.generated_tokens = Counter(), Counter()

    def add_pending(self, n: int) -> None:
        self.pending += n

    def request(self, status: int, api: str = "native") -> None:
        self.statuses.append(status)

    def count(self, counter, n) -> None:
        counter.inc(n)


def replica(translator, model=None, **args):
    """The deployment class without its constructor (no Ray): args and one model whose engine loop runs on
    ``model`` (default: the translator's)."""
    # The user class under Serve's ingress wrapper (whose async __del__ would warn on a bare instance).
    dep = object.__new__(TranslatorDeployment.func_or_class.__mro__[1])
    dep.args = AppArgs(warmup=False, **args)
    core = translator.new_core()
    if model is not None:
        core.model = model
    dep.default = _Model(translator, StubMetrics(), Explainer(translator.artifact_dir, translator.bos_id),
                         AsyncEngine(core, "test"))
    dep.models = {dep.args.model_id: dep.default}
    dep._configured = False
    dep.access = None
    return dep


def sentences(translator, texts: list[str]) -> list[Sentence]:
    return [Sentence(translator.tokenize(t)) for t in texts]


async def settle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    """Waits until the engine has nothing left: no live rows, nothing waiting, no queued work."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (engine.core.has_work or engine.queued_work or not engine._inbox.empty()):
        await asyncio.sleep(0.02)


def test_a_failing_sentence_stops_its_siblings_and_leaves_nothing_behind(translator):
    greedy = DecodingOptions(beam_size=1)
    (bad,) = translator.translate_ids([translator.tokenize(SENTENCES[0])], greedy)
    poisoned = bad[0].tokens[1]
    long_ones = [s for s in SENTENCES[3::4] if poisoned not in translator.translate_ids(
        [translator.tokenize(s)], greedy)[0][0].tokens]
    assert long_ones
    dep = replica(translator, NaNAfterToken(translator.model, poisoned))
    model = dep.default

    async def main():
        futures = dep._submit(model, sentences(translator, [SENTENCES[0]] + long_ones * 3), greedy)
        with pytest.raises(NumericalError):
            await dep._await_sentences(model, futures, time.monotonic() + 30)
        await settle(model.engine)
        return [f.result() for f in futures]

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[0].error, NumericalError)
    assert any(o.aborted for o in outcomes[1:])  # the siblings were dropped, not decoded to the end
    core = model.engine.core
    assert (core.live_rows, core.waiting, model.engine.queued_work, model.metrics.pending) == (0, 0, 0, 0)
    model.engine.close()


def test_the_deadline_covers_queueing_and_decoding_and_drops_the_work(translator):
    dep = replica(translator, timeout_s_per_sentence=0.1)
    model = dep.default
    heavy = DecodingOptions(beam_size=16, min_length=200, max_length=200)

    async def main():
        futures = dep._submit(model, sentences(translator, SENTENCES[:3]), heavy)
        started = time.monotonic()
        # The message names both parts of the deadline (a 64-sentence stream's said 30 s and ended at 36.4 s).
        with pytest.raises(RequestTimeoutError, match=r"request_timeout_s=30.0 \+ timeout_s_per_sentence=0.1 per"):
            await dep._await_sentences(model, futures, started + 0.3)
        waited = time.monotonic() - started
        await settle(model.engine)
        return waited, [f.result().aborted for f in futures]

    waited, aborted = asyncio.run(main())
    assert waited < 0.8 and all(aborted)
    assert model.engine.core.live_rows == 0 and model.metrics.timeouts.value == 1
    model.engine.close()


def test_admission_refuses_bulk_past_the_work_limit_admits_interactive_and_always_an_idle_engine(translator):
    dep = replica(translator, max_queued_work=1000, interactive_max_sentences=1)
    model = dep.default
    heavy = DecodingOptions(beam_size=4, min_length=100, max_length=100)
    bulk = sentences(translator, SENTENCES[:4])
    assert 1000 < sum(AsyncEngine.work(s.src_ids, heavy) for s in bulk) < 2000

    async def main():
        dep._admit(model, bulk, heavy)  # an idle engine admits a request larger than the limit
        futures = dep._submit(model, bulk, heavy)
        with pytest.raises(OverloadedError) as refused:
            dep._admit(model, sentences(translator, SENTENCES[4:6]), DecodingOptions())
        dep._admit(model, sentences(translator, SENTENCES[4:5]), DecodingOptions())  # interactive: still in
        model.engine.set_rate(10.0)  # token-rows/s: the queue drains slowly, so Retry-After grows
        second = sentences(translator, SENTENCES[4:6])
        excess = model.engine.queued_work + sum(AsyncEngine.work(s.src_ids, DecodingOptions()) for s in second) - 1000
        with pytest.raises(OverloadedError) as later:
            dep._admit(model, second, DecodingOptions())
        assert excess / 10 > 60 and later.value.retry_after_s == 60  # capped at 60 s (the rate may decay)
        dep._abandon(model, futures)
        await settle(model.engine)
        return refused.value

    refused = asyncio.run(main())
    assert refused.retry_after_s == 1 and "limit 1000" in str(refused)
    assert model.metrics.rejected.value == 2
    model.engine.close()


def test_admission_refuses_a_request_the_queue_would_not_let_finish_before_its_deadline(translator):
    dep = replica(translator, max_queued_work=8000, interactive_max_sentences=1)
    model = dep.default
    heavy = DecodingOptions(beam_size=4, min_length=100, max_length=100)

    async def main():
        first = dep._submit(model, sentences(translator, SENTENCES[:1]), heavy)
        model.engine.set_rate(1.0)  # token-rows/s: far too slow, but under 1/8 of max_queued_work is queued
        dep._admit(model, sentences(translator, SENTENCES[4:6]), DecodingOptions(), 0.01)
        futures = dep._submit(model, sentences(translator, SENTENCES[:4]), heavy)
        assert model.engine.queued_work * 8 >= 8000
        model.engine.set_rate(100.0)  # token-rows/s
        probe = sentences(translator, SENTENCES[4:6])
        dep._admit(model, probe, DecodingOptions(), 1e9)  # far within the work limit, and in time
        dep._admit(model, probe, DecodingOptions())  # no deadline given: the work limit alone
        with pytest.raises(OverloadedError) as refused:
            dep._admit(model, probe, DecodingOptions(), 0.01)
        dep._abandon(model, futures + first)
        await settle(model.engine)
        dep._admit(model, probe, DecodingOptions(), 0.01)  # an idle engine admits anything
        return refused.value

    refused = asyncio.run(main())
    assert "past the request's deadline" in str(refused) and 1 <= refused.retry_after_s <= 60
    assert model.metrics.rejected.value == 1
    model.engine.close()


def test_a_fresh_engines_rate_refuses_nothing_before_it_has_finished_enough_work(translator):
    """A new replica under 48 clients refused 15 requests in a fresh-clone CI run's compose check: "8448 token-rows
    of work queued, about 12259 s ... at its recent rate": that rate counted a health probe finished beside seconds
    of steps of sentences still decoding. The deadline check waits until the engine has finished max_queued_work /
    DEADLINE_CHECK_FRACTION of work itself."""
    dep = replica(translator, max_queued_work=8000, interactive_max_sentences=1)
    model = dep.default
    heavy = DecodingOptions(beam_size=4, min_length=100, max_length=100)

    async def main():
        futures = dep._submit(model, sentences(translator, SENTENCES[:5]), heavy)
        assert model.engine.queued_work * 8 >= 8000 and model.engine.finished_work == 0
        model.engine.work_per_s = 0.7  # token-rows/s, what that replica measured
        probe = sentences(translator, SENTENCES[4:6])
        dep._admit(model, probe, DecodingOptions(), 0.01)  # admitted: the rate has almost nothing behind it
        model.engine.finished_work = 1000  # 8000 / 8 finished: now the rate counts
        with pytest.raises(OverloadedError, match="past the request's deadline"):
            dep._admit(model, probe, DecodingOptions(), 0.01)
        dep._abandon(model, futures)
        await settle(model.engine)

    asyncio.run(main())
    model.engine.close()


def test_a_document_filling_the_queue_does_not_shut_interactive_requests_out(translator):
    dep = replica(translator, max_queued_work=200, interactive_max_sentences=2)
    model = dep.default
    document = sentences(translator, SENTENCES * 3)  # 24 sentences, far past twice the limit

    async def main():
        dep._admit(model, document, DecodingOptions())  # an idle engine admits it
        futures = dep._submit(model, document, DecodingOptions())
        assert model.engine.queued_work > 2 * 200 and model.engine.interactive_work == 0
        with pytest.raises(OverloadedError):  # bulk: past the limit of all queued work
            dep._admit(model, sentences(translator, SENTENCES[:3]), DecodingOptions())
        small = sentences(translator, SENTENCES[:2])
        dep._admit(model, small, DecodingOptions())  # interactive: against interactive work only
        probe = dep._submit(model, small, DecodingOptions())
        assert model.engine.interactive_work == sum(AsyncEngine.work(s.src_ids, DecodingOptions()) for s in small)
        await asyncio.wait(probe)
        first_probe_done = sum(f.done() for f in futures)
        await asyncio.wait(futures)
        await settle(model.engine)
        return first_probe_done

    document_done_before_probe = asyncio.run(main())
    assert document_done_before_probe < len(document)  # the probe did not wait for the whole document
    assert (model.engine.queued_work, model.engine.interactive_work) == (0, 0)
    model.engine.close()


def test_an_invalid_live_reconfigure_keeps_the_replica_serving_with_its_settings(translator):
    dep = replica(translator)
    core = dep.default.engine.core
    with pytest.raises(ValidationError):  # first configuration: the deploy fails loudly
        dep.reconfigure({"max_batch_rows": 0})
    dep.reconfigure({"max_batch_rows": 64, "max_batch_tokens": 2048})
    dep.reconfigure({"max_batch_rows": 0})  # a bad live update: logged, not applied
    dep.reconfigure({"max_batch_rows": 4, "nonsense": 1})
    assert (core.max_batch_rows, core.max_batch_tokens) == (64, 2048)
    dep.reconfigure({"max_batch_rows": 8})
    assert (core.max_batch_rows, core.max_batch_tokens) == (8, 2048)
    dep.default.engine.close()


def test_a_request_with_no_sentences_queues_nothing(translator):
    dep = replica(translator)

    async def main():
        return await dep._await_sentences(dep.default, dep._submit(dep.default, [], DecodingOptions()),
                                          time.monotonic() + 1)

    assert asyncio.run(main()) == [] and dep.default.engine.core.stats.steps == 0
    dep.default.engine.close()


def test_options_the_model_cannot_meet_are_refused_before_anything_is_queued(translator):
    """A target_prefix longer than max_length (it was decoded one token past it) and a min_length past the model's
    positions (it was lowered silently) are 422s that name the value."""
    from service.schemas import TranslateRequest

    dep, most = replica(translator), translator.max_positions - 1

    async def main():
        with pytest.raises(InvalidRequestError, match=r"target_prefix\[1\] has \d+ tokens > max_length=2"):
            await dep._accept(dep.default, TranslateRequest(text=["Hi.", "Click the button."], max_length=2,
                                                            target_prefix=[None, "Bitte klicken Sie"]))
        with pytest.raises(InvalidRequestError, match=f"min_length={most + 1} > {most}"):
            await dep._accept(dep.default, TranslateRequest(text="Hi.", min_length=most + 1, max_length=4096))

    asyncio.run(main())
    assert dep.default.engine.queued_work == 0 and dep.default.metrics.pending == 0
    dep.default.engine.close()


def test_a_text_with_a_target_prefix_keeps_its_emoji_in_the_models_input(translator):
    """The prefix is forced on the model's output of the input as sent: an emoji kept out of the input came back
    before the prefix ("🎉 🎉 Hallo Welt"); a text without a prefix still has its edge emoji kept out."""
    from service.schemas import TranslateRequest

    req = TranslateRequest(text=["🎉 Hello world", "🎉 Hello world"], target_prefix=["🎉 Hallo", None])
    segmented, sentences = request_texts.prepare(translator, req.texts(), req.prefixes(), req,
                                                 req.decoding_options(translator.default_options))
    assert segmented[0].sentences == ["🎉 Hello world"] and segmented[1].sentences == ["Hello world"]


def test_the_engine_loop_survives_callers_that_leave(translator):
    """Cancelled awaits (clients gone) abort their sentences; the loop goes on serving the next caller."""
    dep = replica(translator)
    model = dep.default

    async def main():
        heavy = DecodingOptions(beam_size=8, min_length=100, max_length=100)
        tasks = [asyncio.ensure_future(dep._await_sentences(model, dep._submit(model, sentences(
            translator, SENTENCES[:2]), heavy), time.monotonic() + 30)) for _ in range(4)]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle(model.engine)
        return await dep._await_sentences(model, dep._submit(model, sentences(translator, SENTENCES[:1]),
                                                             DecodingOptions()), time.monotonic() + 30)

    (hyps,) = asyncio.run(main())
    assert hyps[0].tokens == translator.translate_ids([translator.tokenize(SENTENCES[0])], DecodingOptions())[0][0].tokens
    assert model.engine.core.live_rows == 0 and model.engine.alive
    assert model.metrics.sentences.value == 1 and model.metrics.generated_tokens.value == len(hyps[0].tokens)
    model.engine.close()


def test_the_engine_loop_survives_a_caller_whose_event_loop_closed(translator):
    """A sentence whose caller's event loop has closed before it finishes (a test's, a shut-down server's): its
    result is dropped, and the step loop goes on serving the next caller."""
    engine = AsyncEngine(translator.new_core(), "closed-loop")
    src = translator.tokenize(SENTENCES[0])

    async def leave():
        engine.submit(src, DecodingOptions(beam_size=4, min_length=60, max_length=60))

    async def ask():
        return await asyncio.wait_for(engine.submit(src, DecodingOptions()), 30)

    asyncio.run(leave())  # returns, and closes its loop, before the sentence is done
    done = asyncio.run(ask())
    assert done.hypotheses[0].tokens == translator.translate_ids([src], DecodingOptions())[0][0].tokens
    assert engine.alive
    engine.close()


def test_an_error_during_a_stream_ends_it_with_an_error_record(translator):
    import json

    from service import schemas

    greedy = DecodingOptions(beam_size=1)
    (bad,) = translator.translate_ids([translator.tokenize(SENTENCES[0])], greedy)
    dep = replica(translator, NaNAfterToken(translator.model, bad[0].tokens[1]))
    body = {"text": [SENTENCES[2], SENTENCES[0] + " " + SENTENCES[2]], "beam_size": 1, "stream": True}

    async def main():
        response = await dep._translate(schemas.TranslateRequest.model_validate_json(json.dumps(body)),
                                        dep.default.metrics.request)
        return [json.loads(chunk) async for chunk in response.body_iterator]

    records = asyncio.run(main())
    assert [r["type"] for r in records] == ["sentence", "translation", "error"]  # never a silent cut
    assert records[-1]["status"] == 500 and records[-1]["error"]["type"] and records[-1]["error"]["message"]
    assert dep.default.metrics.statuses == [500]
    dep.default.engine.close()


def test_a_streams_log_line_gives_its_final_status_and_time(translator, caplog):
    import json

    from starlette.requests import Request

    from service import schemas

    greedy = DecodingOptions(beam_size=1)
    (bad,) = translator.translate_ids([translator.tokenize(SENTENCES[0])], greedy)
    dep = replica(translator, NaNAfterToken(translator.model, bad[0].tokens[1]))
    body = json.dumps({"text": [SENTENCES[2], SENTENCES[0]], "beam_size": 1, "stream": True}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    def parse(raw, _):
        req = schemas.TranslateRequest.model_validate_json(raw)
        return req, req.texts(), req.model

    async def main():
        request = Request({"type": "http", "method": "POST", "path": "/translate", "query_string": b"",
                           "headers": [(b"content-type", b"application/json")]}, receive)
        response = await dep._handle(request, "translate", parse, dep._translate)
        logged_at_start = [r.getMessage() for r in caplog.records if "latency_ms" in r.getMessage()]
        records = [json.loads(chunk) async for chunk in response.body_iterator]
        return logged_at_start, records

    with caplog.at_level("INFO", logger="service.app"):
        logged_at_start, records = asyncio.run(main())
    assert logged_at_start == []  # it was logged "status 200" when its headers went out
    assert records[-1]["type"] == "error" and records[-1]["status"] == 500
    (line,) = [r.getMessage() for r in caplog.records if "latency_ms" in r.getMessage()]
    assert "translate status 500 texts 2" in line, line
    dep.default.engine.close()


def test_a_hung_engine_fails_health_while_it_holds_work_and_recovers_when_its_step_returns(translator):
    """A step that never returns (a hung kernel; a stopped engine process, tests/test_process_engine.py) left
    /health answering "ok" for the 90 s Serve's probes took to replace the replica. An engine holding work without
    finishing a step for engine_stall_s makes /health a 503 and Serve's check fail at once; an idle engine never
    counts as stalled, and one whose step returns serves again."""
    from conftest import BlockingStep

    model = BlockingStep(translator.model)
    dep = replica(translator, model, engine_stall_s=0.3)
    engine = dep.default.engine

    async def main():
        await asyncio.sleep(0.5)
        assert engine.stalled_s == 0 and dep._engine_down() is None  # idle for longer than the limit: not stalled
        future = engine.submit(translator.tokenize(SENTENCES[0]), DecodingOptions())
        assert await asyncio.to_thread(model.entered.wait, 10)
        await asyncio.sleep(0.5)
        assert engine.stalled_s > 0.3, engine.stalled_s
        with pytest.raises(EngineUnavailableError, match="has not finished a decoder step") as down:
            await dep.health()
        assert down.value.retry_after_s > 0
        with pytest.raises(RuntimeError, match="has not finished a decoder step"):
            await dep.check_health()
        model.release.set()
        done = await asyncio.wait_for(future, 30)
        return done

    done = asyncio.run(main())
    assert done.error is None and done.hypotheses[0].tokens == translator.translate_ids(
        [translator.tokenize(SENTENCES[0])], DecodingOptions())[0][0].tokens
    assert engine.stalled_s == 0 and dep._engine_down() is None
    engine.close()
