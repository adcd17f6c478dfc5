"""An engine core's step loop on a thread of its own, fed by asyncio callers (vLLM's AsyncLLM in miniature).

The loop sleeps while the core has nothing to do (no batch timer: a sentence submitted to an idle engine starts at
once) and otherwise runs one step after another; between two steps it takes in what callers submitted or aborted
since. Callers get one asyncio future per sentence, resolved with its :class:`engine.core.Finished` as soon as the
sentence leaves the core. Nothing a caller does (cancelling, leaving, failing) can stop the loop: a step's failure
fails its sentences (engine/core.py), and anything else the core raises fails every sentence in it and the loop
goes on with an empty core. No Ray and no HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

from engine.core import EngineCore, Finished
from engine.memory import PeriodicTrim
from engine.options import DecodingOptions

RATE_WEIGHT = 0.02  # of one step in the drain rate's moving averages

log = logging.getLogger(__name__)


class AsyncEngine:
    """Runs ``core`` on a daemon thread named ``engine-<name>``.

    Args:
        core: the engine core it owns (nothing else may call it).
        on_step: called on the loop thread after every step with the core and the sentences that left (metrics);
            its exceptions are logged and ignored.

    Attributes:
        queued_work: :meth:`work` summed over the sentences submitted and not yet finished (the admission measure
            of service/app.py).
        interactive_work: the part of queued_work submitted as interactive (small requests), which service/app.py
            admits against each other only, so that a document in the engine does not shut small requests out.
        work_per_s: the work the engine has been finishing per second while busy: work finished over decoder time,
            both as exponential moving averages over steps (weight 0.02 a step; 0 before the first sentence
            finishes), a ratio of sums rather than an average of each step's ratio, which a step that finishes a
            long sentence inflated (the first estimate was that one step's): how fast a queue drains, for admission
            and Retry-After. ``set_rate`` sets it as if measured over a long time (tests, a known machine).
        finished_work: :meth:`work` of every sentence finished since the start (or as set_rate implies): how much
            the rate has behind it (service/app.py checks deadlines against the rate only once it is enough).
        stalled_s: seconds the engine has held work without finishing a step (0 while it holds none): a step that
            hangs (a kernel that never returns, a stopped process) shows here, for health checks.
    """

    def __init__(self, core: EngineCore, name: str = "engine",
                 on_step: Callable[[EngineCore, list[Finished]], None] | None = None) -> None:
        self.core, self.on_step = core, on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.queued_work = 0
        self.interactive_work = 0
        self.work_per_s = 0.0
        self._done_ema = self._time_ema = 0.0  # work finished, seconds of steps
        self.finished_work = 0
        self._progress_at = time.monotonic()  # the last step's end, or the submit that gave an idle engine work
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def _after_step(self, done_work: int, elapsed: float, core, finished: list[Finished]) -> None:
        """After each step (on the loop's thread): the drain rate's moving averages take the step's finished work
        and its seconds; then the on_step callback."""
        self._progress_at = time.monotonic()
        self.finished_work += done_work
        self._done_ema = (1 - RATE_WEIGHT) * self._done_ema + done_work
        self._time_ema = (1 - RATE_WEIGHT) * self._time_ema + elapsed
        if self._done_ema and self._time_ema > 0:
            self.work_per_s = self._done_ema / self._time_ema
        if self.on_step is not None:
            try:
                self.on_step(core, finished)
            except Exception:  # noqa: BLE001 - metrics must not stop decoding
                log.exception("on_step callback failed")

    def set_rate(self, work_per_s: float, seconds: float = 1e6) -> None:
        """Sets :attr:`work_per_s` as if measured over ``seconds`` of steps, so that the next steps hardly move it."""
        self._done_ema, self._time_ema, self.work_per_s = work_per_s * seconds, seconds, work_per_s
        self.finished_work = max(self.finished_work, int(work_per_s * seconds))

    @staticmethod
    def work(src_ids: list[int], options: DecodingOptions) -> int:
        """The admission measure of one sentence, in token-rows: beam_size x (source tokens + expected target
        tokens), the target expected as long as the source, or min_length when that is larger (a beam-4 sentence
        of 20 tokens counts 160)."""
        return options.beam_size * (len(src_ids) + max(len(src_ids), options.min_length))

    def submit(self, src_ids: list[int], options: DecodingOptions, *, target_prefix: list[int] | None = None,
               group: object = None, interactive: bool = False, deadline: float | None = None) -> asyncio.Future:
        """Queues a sentence (arguments as :meth:`EngineCore.submit`, ``interactive``: counted in interactive_work
        too; validate lengths before: the core's
        InputTooLongError would come back as the future's exception). Call from the event loop that awaits it.
        Returns a future resolved with the sentence's :class:`Finished`.

        Raises:
            RuntimeError: the engine was closed.
        """
        if self._closed:
            raise RuntimeError("the engine is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        work = self.work(src_ids, options)
        self._count(work, interactive)
        self._inbox.put(("submit", future, loop, (work, interactive),
                         (src_ids, options, target_prefix, group, deadline)))
        self._wake.set()
        return future

    def abort(self, future: asyncio.Future) -> None:
        """Drops the sentence of ``future`` at the next step (its future then resolves as aborted)."""
        self._inbox.put(("abort", future))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stalled_s(self) -> float:
        return time.monotonic() - self._progress_at if self.queued_work > 0 else 0.0

    @property
    def settings(self) -> dict[str, int]:
        """The core's budgets: max_batch_rows, max_batch_tokens."""
        return {"max_batch_rows": self.core.max_batch_rows, "max_batch_tokens": self.core.max_batch_tokens}

    def configure(self, **settings: int) -> None:
        """Sets the core's budgets (max_batch_rows, max_batch_tokens): plain attribute writes, which the loop reads
        at its next schedule."""
        for name, value in settings.items():
            setattr(self.core, name, value)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the loop after its current step; sentences still in it are aborted."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)

    # ---- the loop thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        futures: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop, int]] = {}
        handles: dict[asyncio.Future, int] = {}
        trim = PeriodicTrim()  # the heap's free pages back to the system (engine/memory.py)
        while not self._closed:
            self._take_inbox(futures, handles)
            if not self.core.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            started = time.monotonic()
            try:
                finished = self.core.step()
            except Exception as e:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine core failed; failing its %d sentences", len(futures))
                finished = self.core.fail_all(e)
            done_work = 0
            for done in finished:
                entry = futures.pop(done.handle, None)
                if entry is None:
                    continue
                future, loop, work = entry
                handles.pop(future, None)
                done_work += work[0]
                self._count(-work[0], work[1])
                _post(loop, _resolve, future, done)
            self._after_step(done_work, time.monotonic() - started, self.core, finished)
            trim()
        for done in self.core.fail_all(RuntimeError("the engine was closed")):
            entry = futures.pop(done.handle, None)
            if entry is not None:
                _post(entry[1], _resolve, entry[0], done)

    def _take_inbox(self, futures: dict, handles: dict) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                handle = handles.get(message[1])
                if handle is not None:
                    self.core.abort(handle)
                continue
            _, future, loop, work, (src_ids, options, prefix, group, deadline) = message
            if future.done():  # cancelled before it reached the loop
                self._count(-work[0], work[1])
                continue
            try:
                handle = self.core.submit(src_ids, options, target_prefix=prefix, group=group, deadline=deadline)
            except Exception as e:  # noqa: BLE001 - the caller's error, not the loop's
                self._count(-work[0], work[1])
                _post(loop, _fail, future, e)
                continue
            futures[handle] = (future, loop, work)
            handles[future] = handle


    def _count(self, work: int, interactive: bool) -> None:
        with self._lock:
            if work > 0 and self.queued_work <= 0:  # an idle engine's work: stalled_s counts from here
                self._progress_at = time.monotonic()
            self.queued_work += work
            if interactive:
                self.interactive_work += work


def _post(loop: asyncio.AbstractEventLoop, callback: Callable, future: asyncio.Future, value: object) -> None:
    """Runs ``callback(future, value)`` on the caller's loop; a loop closed since (its caller gone) is skipped: the
    step loop must not die of it (it did, with RuntimeError, when a test's loop closed first)."""
    try:
        loop.call_soon_threadsafe(callback, future, value)
    except RuntimeError:
        log.debug("a finished sentence's event loop is closed; its result is dropped")


def _resolve(future: asyncio.Future, done: Finished) -> None:
    if not future.done():
        future.set_result(done)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
