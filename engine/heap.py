"""The startup heap out of the garbage collector's way: ``freeze_startup_heap``.

CPython's cyclic collector walks every tracked object of the generation it collects, and
its oldest generation holds everything a process built at startup: the frontend's, after
loading the tokenizer (transformers' modules, the vocabulary), ~385,000 objects, which one
full collection walks in 190-390 ms on the 2-core machine. The frontend's allocations
trigger one now and then (in ``bench.flood`` runs, once per run, 216-290 ms, logged by a
``gc.callbacks`` probe), and for that long its event loop stops: no connection is accepted,
no prompt tokenized, no token sent. Critical requests under the flood had single
``accept`` or ``tokenize`` parts of 130-480 ms, the size of such a stop (issue 15,
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
