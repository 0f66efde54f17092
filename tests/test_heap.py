"""``freeze_startup_heap``: the startup heap leaves the collector's walk, later garbage
cycles are still freed."""

from __future__ import annotations

import gc
import weakref

from engine.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_the_startup_heap_is_frozen_and_later_cycles_are_still_collected():
    startup = Node()
    startup.other = startup  # alive: moved out of the walk
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 1000  # pytest's own heap, at least
        assert not any(o is startup for o in gc.get_objects())  # not walked any more
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None, "a cycle made after the freeze is freed as before"
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert any(o is startup for o in gc.get_objects())
