"""The replica's request path around the batcher, driven directly (no Ray): admission control, one deadline per
request, a failing sentence stopping its siblings, and live reconfiguration that cannot take a replica down."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from engine.options import DecodingOptions
from service.app import AppArgs, TranslatorDeployment, _Item
from service.batcher import DynamicBatcher
from service.errors import OverloadedError, RequestTimeoutError


class Counter:
    def inc(self, n=1):
        pass


class StubMetrics:
    """ServiceMetrics' interface, counting pending sentences."""

    rejected = timeouts = cancelled = Counter()

    def __init__(self) -> None:
        self.pending = 0

    def add_pending(self, n: int) -> None:
        self.pending += n

    def count(self, counter, n) -> None:
        pass


def replica(process, **args) -> object:
    """The deployment class without its constructor (no model, no Ray): just args and a batcher over ``process``."""
    # The user class under Serve's ingress wrapper (whose async __del__ would warn on a bare instance).
    dep = object.__new__(TranslatorDeployment.func_or_class.__mro__[1])
    dep.args = AppArgs(warmup=False, **args)
    dep.batcher = DynamicBatcher(process, max_batch_size=1, batch_wait_timeout_s=0.0)
    dep._configured = False
    return dep


def items(n: int) -> list[_Item]:
    return [_Item("m", [k], DecodingOptions(), time.perf_counter()) for k in range(n)]


def test_a_failing_sentence_stops_its_siblings_and_leaves_nothing_queued():
    decoded = []

    async def engine(batch, settle):
        await asyncio.sleep(0.05)
        decoded.extend(item.src_ids[0] for item in batch if not item.cancelled)
        return [RuntimeError("engine failed on this sentence") if item.src_ids == [0] else [object()]
                for item in batch]

    async def main():
        dep, metrics, request = replica(engine), StubMetrics(), items(5)
        with pytest.raises(RuntimeError, match="engine failed"):
            await dep._run_items(request, metrics, time.monotonic() + 10)
        await asyncio.sleep(0.3)
        return dep.batcher.queued, metrics.pending, [i.cancelled for i in request]

    queued, pending, flags = asyncio.run(main())
    assert decoded == [0]  # the other four were never decoded
    assert (queued, pending) == (0, 0) and all(flags)


def test_the_deadline_covers_queueing_and_decoding_and_drops_the_work():
    async def slow(batch, settle):
        await asyncio.sleep(0.5)
        return [[object()] for _ in batch]

    async def main():
        dep, request = replica(slow), items(3)
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await dep._run_items(request, StubMetrics(), started + 0.2)  # what splitting left of the deadline
        return time.monotonic() - started, [i.cancelled for i in request]

    waited, flags = asyncio.run(main())
    assert waited < 0.45 and all(flags)


def test_admission_refuses_past_the_queue_limit_but_always_admits_into_an_empty_queue():
    async def engine(batch, settle):
        await asyncio.sleep(0.2)
        return [[object()] for _ in batch]

    async def main():
        dep = replica(engine, max_queued_sentences=3)
        big = asyncio.create_task(dep._run_items(items(6), StubMetrics(), time.monotonic() + 10))
        await asyncio.sleep(0.05)  # 1 decoding, 5 waiting
        with pytest.raises(OverloadedError) as refused:
            await dep._run_items(items(1), StubMetrics(), time.monotonic() + 10)
        return len(await big), refused.value.retry_after_s

    assert asyncio.run(main()) == (6, 1)


def test_an_invalid_live_reconfigure_keeps_the_replica_serving_with_its_settings():
    dep = replica(None)
    with pytest.raises(ValidationError):  # first configuration: the deploy fails loudly
        dep.reconfigure({"max_batch_size": 0})
    dep.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.02})
    dep.reconfigure({"max_batch_size": 0})  # a bad live update: logged, not applied
    dep.reconfigure({"max_batch_size": 4, "nonsense": 1})
    assert (dep.batcher.max_batch_size, dep.batcher.batch_wait_timeout_s) == (4, 0.02)
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    assert dep.batcher.max_batch_size == 8


def test_a_request_with_no_sentences_queues_nothing():
    async def never(batch, settle):
        raise AssertionError("nothing should reach the engine")

    assert asyncio.run(replica(never)._run_items([], StubMetrics(), time.monotonic() + 1)) == []
