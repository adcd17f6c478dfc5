"""engine/memory.py: free heap pages go back to the system, and a step loop trims on its timer only."""

from __future__ import annotations

import platform
import subprocess
import sys

from engine.memory import PeriodicTrim, trim_free_memory

# In a child interpreter, so the test process's heap is not what is measured: 2,000 blocks of 100 kB (below glibc's
# mmap threshold, so on the heap) freed but the last, which keeps glibc from releasing them from the heap's top.
FRAGMENTED_HEAP = """
import numpy as np
from pathlib import Path
from engine.memory import trim_free_memory

def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

blocks = [np.ones(100_000 // 8) for _ in range(2000)]
last = blocks[-1]
del blocks
held = rss_mib()
assert trim_free_memory()
print(held, rss_mib())
"""


def test_trim_returns_freed_heap_pages_to_the_system():
    assert platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # CI's machines: no silent skip
    assert trim_free_memory()  # glibc has malloc_trim
    held, after = map(float, subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], check=True, capture_output=True,
                                            text=True).stdout.split())
    assert held - after > 150  # MiB: the 200 MB freed but held, given back


def test_periodic_trim_trims_once_per_interval():
    now = [100.0]
    trims = []
    trim = PeriodicTrim(30.0, clock=lambda: now[0], trim=lambda: trims.append(now[0]) or True)
    for t in (100.0, 110.0, 129.9, 130.0, 140.0, 159.0, 161.0):
        now[0] = t
        trim()
    assert trims == [130.0, 161.0] and trim.trims == 2
