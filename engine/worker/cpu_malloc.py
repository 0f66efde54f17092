"""glibc malloc settings for a CPU worker: keep freed activation memory instead of handing it
back to the kernel after every op.

A CPU forward pass allocates and frees many tensors of hundreds of KB to a few MB per layer
(a decode bucket's gathered K and V: ~5 MB each at 64 sequences x 300 tokens). glibc serves
blocks above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and trims the heap's top above
``M_TRIM_THRESHOLD``, so such a tensor costs a page fault per 4 KB page on first touch, every
time: on the saturation model a decode bucket's two gathers and its attention took 6.2 ms
that way against 1.7 ms with the settings below (1 thread, interleaved with other
allocations; docs/benchmarks.md "Saturation"). vLLM's CPU worker gets the same effect by
preloading tcmalloc.

``tune_malloc`` raises the mmap threshold to glibc's maximum (32 MB) and the trim threshold
to 1 GiB, at run time through ``mallopt`` (the ``MALLOC_*`` environment variables are read
once at process start, too late for a child whose parent already runs). The cost: the
worker's resident memory stays at its largest step's activations instead of shrinking
between steps. Not glibc (musl, macOS): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 1 << 30


def tune_malloc() -> bool:
    """Apply the settings; True when glibc accepted both."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("mallopt refused the CPU worker's malloc settings; glibc defaults kept")
    return ok
