"""The C paged-attention kernel for CPU workers: built on first use, loaded with ctypes.

``paged_attention.c`` (beside this file) is plain C, no torch headers, so the system
compiler builds it in a fraction of a second: ``cc -O3 -march=native -shared -fPIC``
(``ENGINE_CC`` or ``CC`` names another compiler). The shared library goes to a cache
directory (``ENGINE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/engine/kernels``, else
``~/.cache/engine/kernels``) under a name keyed by a hash of the source, the flags, the
compiler's identity and the CPU's (``-march=native``), so an edit or another compiler builds afresh and a second process (or a
second run) loads what is there without compiling. Two processes starting at once each
compile into their own temporary file and ``os.replace`` it onto the final name: the rename
is atomic, so a reader sees a whole library or none, never a half-written one.

ctypes releases the GIL during the call. With torch running more than one intra-op thread,
a call worth it is split into that many parts (contiguous runs of tiles of about equal cost,
chosen by the C code from the batch alone) run by as many Python threads, the calling one
included: no OpenMP in the library (a second OpenMP runtime beside torch's libgomp is
asking for trouble), and no thread of ours spins. ``load()`` returns
the library or raises ``CpuKernelUnavailable`` with the reason (no compiler, a failed build,
a platform without ctypes-loadable shared objects); ``kernels.paged_attention`` decides what
to do with that (docs/kernels.md, "The CPU kernel").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["HEAD_DIMS", "CpuKernelUnavailable", "library_path", "load", "paged_attention_cpu"]

#: head sizes with a compiled copy of the kernel (compile-time constants in the C source).
HEAD_DIMS = (16, 32, 64, 128, 256)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")


class CpuKernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says why."""


def compiler() -> list[str]:
    """The C compiler command: ``ENGINE_CC``, else ``CC``, else ``cc``."""
    raw = os.environ.get("ENGINE_CC") or os.environ.get("CC") or "cc"
    return shlex.split(raw)


def cache_dir() -> Path:
    explicit = os.environ.get("ENGINE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "engine" / "kernels"


def _compiler_identity(cc: list[str]) -> str:
    exe = shutil.which(cc[0])
    if exe is None:
        raise CpuKernelUnavailable(f"no C compiler: {cc[0]!r} not found (set ENGINE_CC or CC)")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CpuKernelUnavailable(f"C compiler {cc[0]!r} does not run: {e}") from e
    return f"{exe}\n{version}"


def _cpu_identity() -> str:
    """What ``-march=native`` compiled for: the machine and, on Linux, the CPU's feature
    flags, so a cache shared between hosts (an NFS home) never hands one CPU a library
    built for another's instructions."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}\n{platform.processor()}\n{flags}"


def library_path() -> Path:
    """Where the library for this source, these flags and this compiler lives (built or
    not)."""
    cc = compiler()
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), " ".join(cc).encode(),
                 _compiler_identity(cc).encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"paged_attention-{h.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp",
                                   dir=target.parent)
    except OSError as e:
        raise CpuKernelUnavailable(
            f"cannot write the CPU attention kernel to {target.parent} ({e}); "
            "set ENGINE_KERNEL_CACHE to a writable directory") from e
    os.close(fd)
    try:
        cmd = [*compiler(), *FLAGS, "-o", tmp, str(SOURCE), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise CpuKernelUnavailable(
                f"building the CPU attention kernel failed ({shlex.join(cmd)}):\n"
                f"{result.stderr.strip()}")
        os.replace(tmp, target)  # atomic: concurrent builders each rename a whole file
    except OSError as e:
        raise CpuKernelUnavailable(f"building the CPU attention kernel failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL:
    """The kernel library, compiled first if the cache has none (once per process)."""
    target = library_path()
    if not target.exists():
        _build(target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise CpuKernelUnavailable(f"cannot load {target}: {e}") from e
    fn = lib.paged_attention_f32
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, p, i64, i32, i32, i32, i32, i32, i32, ctypes.c_float, p,
                   i32, i32]
    fn.restype = i32
    cost = lib.paged_attention_cost
    cost.argtypes = [p, p, i64, i32, i32, i32]
    cost.restype = i64
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
