"""The service's dynamic batcher (service/batcher.py): batches form when the engine is free."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.batcher import DynamicBatcher


class SlowEngine:
    """Records every batch; each takes ``seconds`` and returns item * 10 (or the item if it is an Exception)."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds, self.batches = seconds, []

    async def __call__(self, items, settle):
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        return [i if isinstance(i, Exception) else i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


def test_requests_that_arrive_during_a_decode_form_the_next_batch_together():
    async def main():
        engine = SlowEngine(0.1)
        batcher = DynamicBatcher(engine, max_batch_size=64, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)  # the engine is busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 21)]
        assert await asyncio.gather(first, *rest) == [i * 10 for i in range(21)]
        return engine.batches

    batches = run(main())
    # With a zero wait Ray's @serve.batch would start a batch per arrival window; here all 20 wait for the engine.
    assert batches == [[0], list(range(1, 21))]


def test_max_batch_size_is_respected_and_order_kept():
    async def main():
        engine = SlowEngine(0.01)
        batcher = DynamicBatcher(engine, max_batch_size=4, batch_wait_timeout_s=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10))), engine.batches

    results, batches = run(main())
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == list(range(10))


def test_a_lone_request_waits_at_most_the_batch_wait_timeout():
    async def main():
        batcher = DynamicBatcher(SlowEngine(0.0), max_batch_size=8, batch_wait_timeout_s=0.2)
        started = time.monotonic()
        await batcher.submit(1)
        return time.monotonic() - started

    waited = run(main())
    assert 0.15 <= waited < 0.6


def test_a_failing_item_fails_alone_and_a_failing_batch_does_not_stop_the_loop():
    calls = []

    async def flaky(items, settle):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("engine exploded")
        return [i if isinstance(i, Exception) else i + 1 for i in items]

    async def main():
        batcher = DynamicBatcher(flaky, max_batch_size=8, batch_wait_timeout_s=0.01)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(1)
        bad = ValueError("this one")
        outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(bad), batcher.submit(3),
                                        return_exceptions=True)
        return outcomes, bad

    outcomes, bad = run(main())
    assert outcomes == [2, bad, 4]


def test_a_cancelled_waiting_request_never_reaches_the_engine():
    async def main():
        engine = SlowEngine(0.1)
        batcher = DynamicBatcher(engine, max_batch_size=8, batch_wait_timeout_s=0.0)
        busy = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await busy == 0 and await kept == 20
        with pytest.raises(asyncio.CancelledError):
            await gone
        return engine.batches

    assert run(main()) == [[0], [2]]


def test_configure_rejects_nonsense_and_applies_to_the_next_batch():
    async def main():
        engine = SlowEngine(0.01)
        batcher = DynamicBatcher(engine, max_batch_size=2, batch_wait_timeout_s=0.0)
        with pytest.raises(ValueError):
            batcher.configure(0, 0.0)
        with pytest.raises(ValueError):
            batcher.configure(4, -1.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        batcher.configure(4, 0.05)
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        return engine.batches

    assert [len(b) for b in run(main())] == [2, 2, 4]


def test_cancelled_waiting_requests_do_not_count_as_queued():
    async def main():
        batcher = DynamicBatcher(SlowEngine(0.2), max_batch_size=1, batch_wait_timeout_s=0.0)
        busy = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        waiting = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        before = batcher.queued
        for task in waiting[1:]:
            task.cancel()
        await asyncio.sleep(0.01)
        after = batcher.queued
        await asyncio.gather(busy, *waiting, return_exceptions=True)
        return before, after

    assert run(main()) == (5, 1)


def test_the_loop_survives_every_waiting_caller_leaving_while_it_waits_for_a_fuller_batch():
    # Found by a break-it run: the queue emptied (pruned by `queued`) while the loop waited for more items, and the
    # loop read queue[0] of an empty deque and died.
    async def main():
        batcher = DynamicBatcher(SlowEngine(0.0), max_batch_size=8, batch_wait_timeout_s=0.5)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)  # the loop waits up to 0.5 s for a fuller batch
        second = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)  # the second arrival has woken the loop, which has not run yet
        first.cancel()
        second.cancel()
        assert batcher.queued == 0  # prunes both
        await asyncio.sleep(0.05)
        loop_alive = not batcher._loop_task.done()
        return loop_alive, await asyncio.wait_for(batcher.submit(3), 2)

    assert run(main()) == (True, 30)


def test_an_item_settled_early_does_not_wait_for_the_rest_of_its_batch():
    async def engine(items, settle):
        settle(0, "cheap")  # known at once
        await asyncio.sleep(0.5)  # the rest of the batch is slow
        return ["ignored: already settled", "slow"]

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=2, batch_wait_timeout_s=0.05)
        started = time.monotonic()
        cheap, slow = asyncio.create_task(batcher.submit(1)), asyncio.create_task(batcher.submit(2))
        assert await cheap == "cheap"
        cheap_after = time.monotonic() - started
        assert await slow == "slow"
        return cheap_after, time.monotonic() - started

    cheap_after, slow_after = run(main())
    assert cheap_after < 0.3 <= 0.5 <= slow_after
