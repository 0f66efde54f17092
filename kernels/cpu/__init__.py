"""The C kernels for CPU tensors: the paged-attention kernel (``paged_attention.c``, wrapped
here) and the fused elementwise ops (``elementwise.c``, wrapped by
``kernels.cpu_elementwise``), both built on first use by the system compiler and loaded with
ctypes (``build.py``: flags, the cache, what happens without a compiler).

ctypes releases the GIL during the call. With torch running more than one intra-op thread,
an attention call worth it is split into that many parts (contiguous runs of tiles of about
equal cost, chosen by the C code from the batch alone) run by as many Python threads, the
calling one included: no OpenMP in the library (a second OpenMP runtime beside torch's
libgomp is asking for trouble), and no thread of ours spins. ``load()`` returns the library
or raises ``CpuKernelUnavailable`` with the reason (no compiler, a failed build, an unwritable
cache, a platform without ctypes-loadable shared objects); ``kernels.paged_attention``
decides what to do with that (docs/kernels.md, "The CPU kernel").
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kernels.cpu import build

__all__ = ["HEAD_DIMS", "CpuKernelUnavailable", "library_path", "load", "paged_attention_cpu"]

#: head sizes with a compiled copy of the kernel (compile-time constants in the C source).
HEAD_DIMS = (16, 32, 64, 128, 256)

#: The kernel's build failures (``build.BuildError``) under the name callers catch.
CpuKernelUnavailable = build.BuildError


def library_path() -> Path:
    """Where the kernel's library for this compiler and CPU lives (built or not)."""
    return build.library_path("paged_attention")


_signed: ctypes.CDLL | None = None  # the library object whose argtypes are set


def load() -> ctypes.CDLL:
    """The kernel library, compiled first if the cache has none (once per process)."""
    global _signed
    lib = build.load("paged_attention")
    if lib is _signed:
        return lib
    fn = lib.paged_attention_f32
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, p, i64, i32, i32, i32, i32, i32, i32, ctypes.c_float, p,
                   i32, i32]
    fn.restype = i32
    cost = lib.paged_attention_cost
    cost.argtypes = [p, p, i64, i32, i32, i32]
    cost.restype = i64
    _signed = lib
    return lib


#: Below this many cost units (``tile_cost`` in the C source: padded query rows x 16-key
#: chunks; ~0.05-0.15 us each on the machine of docs/kernels.md) a call runs on the calling
#: thread alone: waking other threads costs more than they would save.
MIN_SPLIT_COST = 2000


def _num_parts(lib: ctypes.CDLL, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, num_heads: int, num_kv_heads: int) -> int:
    """How many threads share the call: torch's intra-op thread count (the worker's
    ``--num-threads``), when the batch is worth splitting."""
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    cost: int = lib.paged_attention_cost(query_start_loc.data_ptr(), seq_lens.data_ptr(),
                                         block_tables.stride(0), seq_lens.shape[0], num_heads,
                                         num_kv_heads)
    return max(1, min(threads, cost // MIN_SPLIT_COST))


_executor: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads for the other parts of a split call (the calling thread runs part 0); ctypes
    releases the GIL, so they run the C code in parallel. Kept across calls, remade when the
    thread count changes, and in a forked child (which inherits the pool but not its
    threads: a submit there would wait forever)."""
    global _executor
    pid = os.getpid()
    if _executor is None or _executor[:2] != (pid, workers):
        if _executor is not None and _executor[0] == pid:
            _executor[2].shutdown(wait=False)
        _executor = (pid, workers,
                     ThreadPoolExecutor(workers, thread_name_prefix="cpu-attention"))
    return _executor[2]


def paged_attention_cpu(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``paged_attention_ref``'s semantics through the C kernel. The caller has checked
    shapes and dtypes (float32 query and caches, int32 metadata, head_dim in
    ``HEAD_DIMS``, contiguous caches); query and metadata are made contiguous here (a no-op
    for what the model passes)."""
    query = query.contiguous()
    query_start_loc = query_start_loc.contiguous()
    seq_lens = seq_lens.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    out = torch.empty_like(query)
    num_heads, head_dim = query.shape[1:]
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    lib = load()
    args = (query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
            block_tables.stride(0), seq_lens.shape[0], num_heads, num_kv_heads, head_dim,
            block_size, num_blocks, scale, out.data_ptr())
    num_parts = _num_parts(lib, query_start_loc, seq_lens, block_tables, num_heads,
                           num_kv_heads)
    with torch.profiler.record_function("kernels::paged_attention_cpu"):  # named in profiles
        if num_parts == 1:
            rc = lib.paged_attention_f32(*args, 0, 1)
        else:
            pool = _pool(num_parts - 1)
            rest = [pool.submit(lib.paged_attention_f32, *args, part, num_parts)
                    for part in range(1, num_parts)]
            rc = lib.paged_attention_f32(*args, 0, num_parts)  # this thread's share
            rc = min([rc, *(f.result() for f in rest)])
    if rc == -2:
        raise ValueError("paged_attention: a block table entry a context needs is outside "
                         f"[0, {num_blocks})")
    if rc != 0:
        raise ValueError(f"the CPU attention kernel has no copy for head_dim {head_dim}")
    return out
