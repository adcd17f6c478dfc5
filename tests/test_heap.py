"""engine/heap.py: objects alive when the heap is frozen are left out of later collections, and garbage made after
it (the decode loop's) is still collected."""

from __future__ import annotations

import gc
import weakref

import pytest

from engine.heap import freeze_long_lived


class Node:
    """An object that can sit in a reference cycle (so that only the cyclic collector frees it)."""

    def __init__(self) -> None:
        self.other = None


def _cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


@pytest.fixture
def frozen():
    yield freeze_long_lived()
    gc.unfreeze()  # the rest of the test session collects as before


def test_objects_alive_at_the_freeze_are_left_out_of_collections(frozen):
    assert frozen > 0 and gc.get_freeze_count() > 0
    after = _cycle()
    young = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert id(after) in young  # tracked: visited by the next collections
    assert id(freeze_long_lived) not in young  # loaded before the freeze: in no generation


def test_garbage_made_after_the_freeze_is_still_collected(frozen):
    dropped = weakref.ref(_cycle())  # an unreachable cycle: reference counting cannot free it
    assert dropped() is not None
    gc.collect()
    assert dropped() is None


def test_a_cycle_frozen_while_alive_is_not_collected_until_unfrozen():
    """What the module docstring warns of: freezing is for the loaded heap, which lives as long as the process."""
    kept = _cycle()
    held = weakref.ref(kept)
    freeze_long_lived()
    try:
        del kept
        gc.collect()
        assert held() is not None
    finally:
        gc.unfreeze()
    gc.collect()
    assert held() is None
