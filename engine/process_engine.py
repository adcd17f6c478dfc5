"""An engine core in a process of its own, fed over a pipe: AsyncEngine's interface (engine/async_engine.py).

Why a process: with the step loop on a thread, a replica's request handling (HTTP, validation, splitting, JSON) and
the loop's host work (the search, numpy, the graphs' bindings) share one GIL, so neither runs while the other holds
it, and a thread waiting for the GIL waits up to the switch interval (docs/performance.md, Continuous batching,
"What limits the goals not met"). vLLM's V1 engine runs its core in a separate process for the same reason.

The parent keeps what admission reads at once (queued_work, interactive_work, work_per_s) and one asyncio future per
sentence; a reader thread resolves them from the child's step reports. The child builds its core from a picklable
recipe (:class:`CoreSpec`), takes submits, aborts and settings between steps, and sends after each step the
sentences that left and the core's counters (for the on_step callback, as a :class:`CoreView`). Nothing a caller
does can stop the child's loop: a step's failure fails its sentences, as on a thread. If the child dies, every
pending future fails with EngineUnavailableError and ``alive`` turns False, so a replica's health check fails and
Serve replaces the replica. No Ray and no HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from engine.async_engine import AsyncEngine, _fail, _post, _resolve
from engine.core import CoreStats, EngineCore, Finished
from engine.errors import EngineError, EngineUnavailableError
from engine.heap import freeze_long_lived
from engine.memory import PeriodicTrim
from engine.options import DecodingOptions
from engine.runtime import EngineConfig

log = logging.getLogger(__name__)

# Retry-After of the 503s a dead child's sentences get: Serve replaces a replica that fails 3 health checks about
# 10 s apart (25-28 s from a killed child to translations again, in a trial over HTTP).
RESTART_RETRY_S = 30


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """How the child process builds its core: ``Translator(artifact_dir, config).new_core()``, warmed up first
    (Translator.warmup) when ``warmup``."""

    artifact_dir: str
    config: EngineConfig
    warmup: bool = True

    def build(self) -> tuple[EngineCore, "ModelInChild"]:
        """The core, and what the parent's Translator needs to know of its model."""
        from engine.translator import Translator  # in the child: the parent needs none of it to start one

        translator = Translator(Path(self.artifact_dir), self.config)
        warmup_seconds = translator.warmup() if self.warmup else 0.0
        return translator.new_core(), ModelInChild(translator.provider, getattr(translator.model, "float16", False),
                                                   translator.load_seconds, warmup_seconds)


@dataclasses.dataclass(frozen=True)
class ModelInChild:
    """The child's model as the parent's Translator holds it (``Translator(..., model=engine.model)``): its provider
    and precision, for reports; no sessions, so the model is loaded once, in the child. ``load_seconds`` and
    ``warmup_seconds``: the child's (seconds)."""

    provider: str
    float16: bool
    load_seconds: float
    warmup_seconds: float
    frozen_objects: int = 0  # objects the child froze once loaded (engine/heap.py), 0 before
    ops = None  # the parent decodes nothing


@dataclasses.dataclass
class CoreView:
    """What the on_step callback reads of the child's core after a step (EngineCore's attributes of these names)."""

    stats: CoreStats
    live_sentences: int
    live_rows: int
    waiting: int


class ProcessEngine:
    """Runs a core built from ``spec`` in a child process (a new interpreter, not a fork: a replica has threads,
    which a fork would copy in whatever state they hold); ``name`` names its reader thread.

    Args:
        spec: the child's core (:class:`CoreSpec`).
        on_step: called on the parent's reader thread after every step with a :class:`CoreView` and the sentences
            that left (metrics); its exceptions are logged and ignored.
        start_timeout_s: how long the child may take to load and warm up its model (seconds).

    Attributes: as :class:`AsyncEngine` (queued_work, interactive_work, work_per_s, finished_work, stalled_s).

    Raises:
        EngineUnavailableError: the child failed to build its core or did not report ready in time.
    """

    work = staticmethod(AsyncEngine.work)

    def __init__(self, spec: CoreSpec, name: str = "engine",
                 on_step: Callable[[CoreView, list[Finished]], None] | None = None,
                 start_timeout_s: float = 300.0) -> None:
        self.on_step = on_step
        self.queued_work = self.interactive_work = 0
        self.work_per_s = 0.0
        self._done_ema = self._time_ema = 0.0
        self.finished_work = 0
        self._progress_at = time.monotonic()
        self._lock = threading.Lock()  # the counters, the futures, the group ids and _dead: event loops, the reader
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # to the writer thread: the event loop never blocks
        self._futures: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop, tuple[int, bool], object]] = {}
        self._ids: dict[asyncio.Future, int] = {}
        self._groups: dict[object, list[int]] = {}  # group -> [its id in the child, sentences pending]
        self._next_id = itertools.count()
        self._closed = self._dead = False
        self.settings = {"max_batch_rows": spec.config.max_batch_rows,
                         "max_batch_tokens": spec.config.max_batch_tokens}
        # A fresh interpreter on `python -m engine.process_engine FD` rather than multiprocessing's spawn, which
        # re-runs the parent's main module in the child (a Ray worker's, a test runner's); one socket both ways.
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        # A session of its own: a Ctrl-C meant for the replica's process group must not kill the engine under
        # requests the replica is draining; the child ends when its socket closes.
        self._process = subprocess.Popen([sys.executable, "-m", "engine.process_engine", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env, start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(spec)
            if not self._conn.poll(start_timeout_s):
                raise EngineUnavailableError(f"the engine process did not start within {start_timeout_s:.0f} s")
            kind, detail = self._conn.recv()
            if kind != "ready":
                raise EngineUnavailableError(f"the engine process failed to start: {detail}")
            self.model: ModelInChild = detail
        except (EOFError, OSError) as e:
            self._stop(5.0)
            raise EngineUnavailableError(f"the engine process exited while starting (code "
                                         f"{self._process.returncode}): {e}") from None
        except EngineUnavailableError:
            self._stop(5.0)
            raise
        self._reader = threading.Thread(target=self._read, name=f"engine-{name}-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name=f"engine-{name}-writer", daemon=True)
        self._writer.start()

    # ---- the caller's side (event loops) -----------------------------------------------------------------------

    def submit(self, src_ids: list[int], options: DecodingOptions, *, target_prefix: list[int] | None = None,
               group: object = None, interactive: bool = False, deadline: float | None = None) -> asyncio.Future:
        """As :meth:`AsyncEngine.submit` (``deadline`` in time.monotonic() seconds, one clock for both processes).

        Raises:
            RuntimeError: the engine was closed.
            EngineUnavailableError: the engine process has exited.
        """
        if self._closed:
            raise RuntimeError("the engine is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        work = (self.work(src_ids, options), interactive)
        with self._lock:  # registered before the reader's last sweep, or refused after it (_dead)
            if self._dead:
                raise EngineUnavailableError(f"the engine process has exited (code {self._process.returncode})",
                                             RESTART_RETRY_S)
            sentence = next(self._next_id)
            entry = self._groups.setdefault(group, [sentence, 0]) if group is not None else None
            if entry is not None:
                entry[1] += 1
            self._futures[sentence] = (future, loop, work, group)
            self._ids[future] = sentence
            self._count(*work)
        self._outbox.put(("submit", sentence, list(src_ids), options, target_prefix,
                          None if entry is None else entry[0], deadline))
        return future

    def abort(self, future: asyncio.Future) -> None:
        """Drops the sentence of ``future`` at the child's next step (its future then resolves as aborted)."""
        sentence = self._ids.get(future)
        if sentence is not None:
            self._outbox.put(("abort", sentence))

    def configure(self, **settings: int) -> None:
        """Sets the core's budgets (max_batch_rows, max_batch_tokens), which its next schedule reads."""
        self._outbox.put(("configure", dict(settings)))
        self.settings.update(settings)

    set_rate = AsyncEngine.set_rate
    _after_step = AsyncEngine._after_step  # the drain rate and on_step, on the reader thread
    stalled_s = AsyncEngine.stalled_s  # a child that stops (SIGSTOP, a hung kernel) holds its work unreported

    @property
    def alive(self) -> bool:
        return self._process.poll() is None and self._reader.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the child after its current step; sentences still in it are failed ("the engine was closed")."""
        self._closed = True
        self._outbox.put(("close",))
        self._writer.join(timeout_s)
        self._stop(timeout_s)
        self._reader.join(timeout_s)
        self._conn.close()

    def _stop(self, timeout_s: float) -> None:
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout_s)

    def _write(self) -> None:
        """The writer thread: sends what the callers queued, in order, until "close" (or the child is gone; then
        the reader fails what is pending)."""
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return
            if message[0] == "close":
                return

    def _count(self, work: int, interactive: bool) -> None:  # under self._lock
        if work > 0 and self.queued_work <= 0:  # an idle engine's work: stalled_s counts from here
            self._progress_at = time.monotonic()
        self.queued_work += work
        if interactive:
            self.interactive_work += work

    # ---- the reader thread -------------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
                if message[0] == "failed":
                    self._settle(message[1], _fail, message[2])
                    continue
                _, finished, view, elapsed = message
                done_work = sum(self._settle(sentence, _resolve, done) for sentence, done in finished)
                self._after_step(done_work, elapsed, view, [done for _, done in finished])
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a report that cannot be read: end the child, fail what it held
                log.exception("unreadable report from the engine process; stopping it")
                self._process.kill()
                break
        with self._lock:
            self._dead = True  # submit refuses from now on: no future registers after the sweep below
        # The child is gone: nothing will resolve what it held.
        try:
            code = self._process.wait(5.0)
        except subprocess.TimeoutExpired:  # it closed its end but runs on: end it
            self._process.kill()
            code = self._process.wait()
        error = (RuntimeError("the engine was closed") if self._closed
                 else EngineUnavailableError(f"the engine process exited (code {code})", RESTART_RETRY_S))
        if not self._closed:
            log.error("engine process exited (code %s); failing its %d sentences", code, len(self._futures))
        for sentence in list(self._futures):
            self._settle(sentence, _fail, error)

    def _settle(self, sentence: int, callback: Callable, value: object) -> int:
        """Resolves (or fails) sentence ``sentence``'s future on its loop; returns its work (0 if unknown)."""
        with self._lock:
            entry = self._futures.pop(sentence, None)
            if entry is None:
                return 0
            future, loop, work, group = entry
            self._ids.pop(future, None)
            self._count(-work[0], work[1])
            if group is not None:
                held = self._groups[group]
                held[1] -= 1
                if not held[1]:
                    del self._groups[group]
        _post(loop, callback, future, value)
        return work[0]


# ---- the child process -------------------------------------------------------------------------------------------

def _child_main(conn: Connection) -> None:
    """The child's loop: AsyncEngine._run's, with the socket as its inbox and its reports. Its first message is the
    :class:`CoreSpec`."""
    try:
        spec = conn.recv()
        core, model = spec.build()
        # This process decodes: its collections visit only what the loop makes, not the loaded heap (engine/heap.py).
        model = dataclasses.replace(model, frozen_objects=freeze_long_lived())
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", model))
    handles: dict[int, int] = {}  # sentence id (the parent's) -> core handle
    sentences: dict[int, int] = {}  # core handle -> sentence id
    trim = PeriodicTrim()  # the heap's free pages back to the system (engine/memory.py: RSS crept without)
    while True:
        # Block while idle (no batch timer); between steps take in everything that came.
        wait = None if not core.has_work else 0
        while conn.poll(wait):
            wait = 0
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                return
            if message[0] == "close":
                failed = core.fail_all(RuntimeError("the engine was closed"))
                _report(conn, [(sentences.pop(d.handle), d) for d in failed if d.handle in sentences], core, 0.0)
                return
            if message[0] == "abort":
                if message[1] in handles:
                    core.abort(handles[message[1]])
            elif message[0] == "configure":
                for name, value in message[1].items():
                    setattr(core, name, value)
            else:
                _, sentence, src_ids, options, prefix, group, deadline = message
                try:
                    handle = core.submit(src_ids, options, target_prefix=prefix, group=group, deadline=deadline)
                except Exception as e:  # noqa: BLE001 - the caller's error, not the loop's
                    conn.send(("failed", sentence, _portable(e)))
                    continue
                handles[sentence], sentences[handle] = handle, sentence
        if not core.has_work:
            continue
        started = time.monotonic()
        try:
            finished = core.step()
        except Exception as e:  # noqa: BLE001 - the loop must survive anything
            log.exception("engine core failed; failing its sentences")
            finished = core.fail_all(e)
        elapsed = time.monotonic() - started
        report = []
        for done in finished:
            sentence = sentences.pop(done.handle, None)
            if sentence is None:
                continue
            del handles[sentence]
            if done.error is not None:
                done = dataclasses.replace(done, error=_portable(done.error))
            report.append((sentence, done))
        _report(conn, report, core, elapsed)
        trim()


def _report(conn: Connection, report: list[tuple[int, Finished]], core: EngineCore, elapsed: float) -> None:
    """Sends a step's report; a sentence whose result cannot be pickled fails alone (EngineError), not the child."""
    view = CoreView(dataclasses.replace(core.stats), core.live_sentences, core.live_rows, core.waiting)
    try:
        conn.send(("step", report, view, elapsed))
    except (OSError, EOFError):
        raise
    except Exception:  # noqa: BLE001 - pickling: find the sentences at fault
        safe = []
        for sentence, done in report:
            try:
                pickle.dumps(done)
            except Exception as e:  # noqa: BLE001 - any pickling failure
                done = Finished(done.handle, [], EngineError(f"the result could not be sent: {e}"))
            safe.append((sentence, done))
        conn.send(("step", safe, view, elapsed))


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (most do); else an EngineError with its message (an exception whose
    __init__ takes other arguments than its message cannot be rebuilt from its pickle)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return EngineError(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process %(message)s")
    # The module's own import, not __main__'s copy: what the child pickles must name engine.process_engine.
    from engine.process_engine import _child_main as child_main

    child_main(Connection(int(sys.argv[1])))
