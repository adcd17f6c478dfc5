"""Dynamic batching that forms a batch when the engine is free, not when a timer fires.

Ray Serve's ``@serve.batch`` forms the next batch as soon as its wait timer expires, even while the previous batch
still holds the engine; the new batch then waits for the engine with only the requests of that short window (Ray
2.60 ``_process_batches``: ``wait_for_batch`` runs before the concurrency semaphore). Measured on this service with
64 closed-loop clients: 64 sentences pending in the replica, yet batches of 3.2 sentences on average. Here the
next batch is taken only when the previous one is done, so everything that queued during a decode is decoded
together (Triton's dynamic batcher and CTranslate2's batch queue behave this way).

Only asyncio: no Ray, no HTTP; the service wraps the engine call in ``process``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Awaitable, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Settle = Callable[[int, object], None]


@dataclasses.dataclass
class _Waiting(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued_at: float  # time.monotonic(), seconds


class DynamicBatcher(Generic[T, R]):
    """Queues items; one loop decodes them in batches of at most ``max_batch_size``.

    ``process(items, settle)`` gets a batch and returns one outcome per item, in order: a result, or an Exception
    that only that item's caller receives. It may call ``settle(i, outcome)`` (from any thread) as soon as item i's
    outcome is known, so that the cheap part of a batch does not wait for the rest; what it later returns for an
    item already settled is ignored. A batch starts when the engine is free and either ``max_batch_size`` items are
    queued or the oldest queued item has waited ``batch_wait_timeout_s`` seconds. A caller that is cancelled while
    its item still waits takes the item out of the queue; cancelling work already in a batch is the caller's job
    (the service flags the item and the engine drops it at its next step).

    Raises (from the constructor and :meth:`configure`):
        ValueError: max_batch_size < 1 or batch_wait_timeout_s < 0.
    """

    def __init__(self, process: Callable[[list[T], Settle], Awaitable[list[R | Exception]]], max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01) -> None:
        self._process = process
        self._queue: collections.deque[_Waiting[T]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.configure(max_batch_size, batch_wait_timeout_s)

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Changes the batch settings; they apply from the next batch on."""
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got {max_batch_size}, "
                             f"{batch_wait_timeout_s}")
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batch being decoded), those of cancelled callers excluded."""
        while self._queue and self._queue[0].future.done():  # cheap pruning; the rest are skipped when popped
            self._queue.popleft()
        return sum(1 for w in self._queue if not w.future.done())

    async def submit(self, item: T) -> R:
        """Queues ``item`` and returns its outcome; raises the Exception ``process`` returned for it."""
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        waiting = _Waiting(item, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(waiting)
        self._arrived.set()
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if not waiting.future.done():
                waiting.future.cancel()
            raise

    async def _next_batch(self) -> list[_Waiting[T]]:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for a fuller batch only until the oldest item has waited batch_wait_timeout_s: under load the
            # queue filled during the previous decode and the batch starts at once.
            # (0 < len: callers that leave while we wait are pruned by `queued`, which can empty the queue.)
            while 0 < len(self._queue) < self.max_batch_size:
                remaining = self._queue[0].enqueued_at + self.batch_wait_timeout_s - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                waiting = self._queue.popleft()
                if not waiting.future.done():  # done = its caller was cancelled while it waited
                    batch.append(waiting)
            if batch:
                return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()  # settle() may be called from the engine's worker thread
        while True:
            try:
                batch = await self._next_batch()
            except Exception:  # noqa: BLE001 - a bug here must not leave every later request hanging
                log.exception("forming a batch failed; the queue is kept")
                await asyncio.sleep(0.01)
                continue

            def settle(index: int, outcome: object, batch: list[_Waiting[T]] = batch) -> None:
                loop.call_soon_threadsafe(self._settle, batch[index], outcome)

            try:
                outcomes = await self._process([w.item for w in batch], settle)
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"process returned {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - the loop must outlive any failing batch
                log.exception("batch of %d items failed", len(batch))
                outcomes = [e] * len(batch)
            for waiting, outcome in zip(batch, outcomes):
                self._settle(waiting, outcome)

    @staticmethod
    def _settle(waiting: _Waiting, outcome: object) -> None:
        if waiting.future.done():  # settled early, or its caller left
            return
        if isinstance(outcome, Exception):
            waiting.future.set_exception(outcome)
        else:
            waiting.future.set_result(outcome)
