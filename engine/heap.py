"""The startup heap out of the garbage collector's way: ``freeze_startup_heap``.

CPython's cyclic collector walks every tracked object of the generation it collects, and
its oldest generation holds everything a process built at startup: the frontend's, after
loading the tokenizer (transformers' modules, the vocabulary), ~385,000 objects, which one
full collection walks in 190-390 ms on the 2-core machine. Under a flood of requests the
frontend allocates enough for a full collection every few seconds, and each one stops its
event loop: no connection is accepted and no token is sent for that long. That was the
largest critical-TTFT outlier under the flood (the ``accept`` part: 350-480 ms; issue 15,
docs/benchmarks.md "Flood").

``gc.freeze()`` moves every object alive now to a permanent generation the collector
never walks (what it was made for: a server's startup heap lives as long as the process).
Objects made later are collected as before, so garbage cycles of requests are still freed;
what the startup heap held and later dropped is not, which for a heap that lives as long as
the process is nothing.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left (call when startup is done, before serving);
    returns how many objects were frozen."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze the startup heap: %d objects out of the collector's walk (%.0f ms)",
             frozen, 1e3 * (time.perf_counter() - start))
    return frozen
