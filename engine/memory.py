"""Heap memory back to the system: glibc's malloc_trim on a timer, for the engine's step loops.

Why: a step loop allocates and frees arrays of many sizes every step (logits [rows, vocab], cross K/V of joiners,
caches that grow and shrink by doubling). glibc returns freed heap memory to the system only from the top of a
heap, so pages freed below a block still in use stay in the process's RSS, and the RSS of a long-running loop
climbs with the mix of sizes it has seen: the engine process under the soak's mixed load (4 clients, 1-8
sentences, greedy or beam 4) went from a median of 198 to 237 MiB over 20 minutes (a run beside other work), and
malloc_trim(0) took an idle one from 185.6 to 140.8 MiB, below its RSS before the load (153.6): memory held, not
memory in use (docs/performance.md, Continuous batching). malloc_trim(0) releases every free page of every arena
(glibc >= 2.8); elsewhere (musl, macOS) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

# Seconds between trims of a busy loop. A trim took 12 ms here to give back 190 MB, microseconds with nothing free.
TRIM_INTERVAL_S = 30.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def trim_free_memory() -> bool:
    """Returns the heap's free pages to the system (malloc_trim(0)); True if the C library has it. ctypes releases
    the GIL for the call, so other threads run meanwhile."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class PeriodicTrim:
    """Calls :func:`trim_free_memory` when called at least ``interval_s`` seconds (of ``clock``) after the last
    trim, or after this object was made. A step loop calls it after every step."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[], bool] = trim_free_memory) -> None:
        self.interval_s, self._clock, self._trim = interval_s, clock, trim
        self._last = clock()
        self.trims = 0

    def __call__(self) -> None:
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._trim()
            self.trims += 1
