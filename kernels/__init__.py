"""Paged-KV attention ops: one public function per concept, checked, then dispatched.

``write_kv`` scatters new keys/values into the paged caches; ``paged_attention`` runs causal
attention of a ragged batch (prefill chunks, extends over a cached prefix, and decodes) over
those caches. Layouts and semantics: see ``kernels/reference.py``; the Triton kernels' design:
``docs/kernels.md``.

Dispatch, in one place (``_use_triton``), chosen per call by ``backend=``:

- ``"auto"`` (the default): the Triton kernels for CUDA tensors (when ``triton`` imports and
  the head size is one they support), the torch reference otherwise. On CPU,
  ``paged_attention`` runs the C kernel (``kernels/cpu``) for float32 with a head size it
  has a copy for (16, 32, 64, 128, 256), when the kernel builds (if it cannot, a one-time
  warning and the reference; it runs on as many threads as torch's intra-op pool has); ``ENGINE_CPU_ATTENTION`` overrides that:
  ``torch`` (always the reference), ``cpu`` (as ``backend="cpu"``), ``auto`` or unset (the
  rule above). ``ENGINE_TRITON_INTERPRET=1`` instead asks for the whole engine to run the
  Triton kernels under Triton's interpreter (slow; for debugging the kernels in situ; set
  ``TRITON_INTERPRET=1`` too, since transformers imports triton before the kernels load).
- ``"torch"``: the reference, on any device.
- ``"cpu"``: ``paged_attention`` through the C kernel, or an error saying why not (not a CPU
  tensor, not float32, a head size without a compiled copy, no compiler); ``write_kv`` has
  no C kernel and runs the reference.
- ``"triton"``: the Triton kernels or an error saying why not. CPU tensors need Triton's
  interpreter, which is process-wide: ``TRITON_INTERPRET=1`` (or
  ``ENGINE_TRITON_INTERPRET=1``) set before triton is first imported.

``TRITON_INTERPRET=1`` on its own never changes what ``"auto"`` does, so the CPU default
stays the reference in a process (a test session, say) that also interprets the kernels.

``paged_attention`` sends a batch with as many new tokens as sequences (every sequence
decoding one token; the engine never schedules a sequence with none) to the decode kernel
and any other batch to the prefill kernel, deciding from tensor sizes alone: no host sync,
so it can be captured in a CUDA graph.

Caches: the reference needs them contiguous; the Triton kernels address them through their
strides, so they also take strided views (head_dim contiguous, K and V sharing strides), such
as vLLM's cache with K and V packed side by side per slot.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from types import ModuleType
from typing import Literal, NamedTuple

import torch

from kernels.cpu import HEAD_DIMS as CPU_HEAD_DIMS
from kernels.cpu import CpuKernelUnavailable, paged_attention_cpu
from kernels.cpu import load as load_cpu_kernel
from kernels.reference import paged_attention_ref, write_kv_ref

__all__ = ["BACKENDS", "Backend", "graph_safe", "paged_attention", "write_kv"]

Backend = Literal["auto", "torch", "triton", "cpu"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton", "cpu")
CPU_ATTENTION_MODES = ("auto", "torch", "cpu")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (int64
    ``[num_tokens]``, slot = block_id * block_size + offset), in place. ``backend``: see
    the module docstring."""
    _check_dims("key", key, 3)
    _check_dims("k_cache", k_cache, 4)
    _check_same_shape(("key", key), ("value", value))
    _check_same_shape(("k_cache", k_cache), ("v_cache", v_cache))
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"write_kv: key is [num_tokens, num_kv_heads, head_dim] = {list(key.shape)} but "
            f"the cache holds [.., .., {k_cache.shape[2]}, {k_cache.shape[3]}]"
        )
    _check_dtype("slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(
            f"write_kv: slot_mapping must be [num_tokens] = [{key.shape[0]}], "
            f"got {list(slot_mapping.shape)}"
        )
    _check_same_dtype(("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache))
    _check_same_device(
        ("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
        ("slot_mapping", slot_mapping),
    )
    use_triton = _use_triton(key, backend, head_dim=key.shape[2])
    _check_cache_layout(k_cache, v_cache, strided_ok=use_triton)
    if use_triton:
        _triton_kernels().kv_write.write_kv(
            _rows(key), _rows(value), k_cache, v_cache, slot_mapping.contiguous()
        )
        return
    write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Causal attention of a ragged batch over paged KV caches.

    query ``[num_tokens, num_heads, head_dim]``; caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (num_heads a multiple of
    num_kv_heads); ``query_start_loc`` int32 ``[batch + 1]``; ``seq_lens`` int32 ``[batch]``,
    context lengths including the new tokens; ``block_tables`` int32 ``[batch, max_blocks]``.
    Returns ``[num_tokens, num_heads, head_dim]`` in query's dtype. ``backend``: see the
    module docstring.
    """
    _check_dims("query", query, 3)
    _check_dims("k_cache", k_cache, 4)
    _check_same_shape(("k_cache", k_cache), ("v_cache", v_cache))
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(
            f"paged_attention: query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"paged_attention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
            f"({num_kv_heads})"
        )
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_tables", block_tables)):
        _check_dtype(name, t, torch.int32)
    _check_dims("query_start_loc", query_start_loc, 1)
    batch = query_start_loc.shape[0] - 1
    if batch < 0:
        raise ValueError("paged_attention: query_start_loc must have batch + 1 >= 1 entries")
    if seq_lens.shape != (batch,):
        raise ValueError(
            f"paged_attention: seq_lens must be [batch] = [{batch}], got {list(seq_lens.shape)}"
        )
    _check_dims("block_tables", block_tables, 2)
    if block_tables.shape[0] != batch:
        raise ValueError(
            f"paged_attention: block_tables must have batch = {batch} rows, "
            f"got {block_tables.shape[0]}"
        )
    _check_same_dtype(("query", query), ("k_cache", k_cache), ("v_cache", v_cache))
    _check_same_device(
        ("query", query), ("k_cache", k_cache), ("v_cache", v_cache),
        ("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
        ("block_tables", block_tables),
    )
    use_triton = _use_triton(query, backend, head_dim=head_dim)
    _check_cache_layout(k_cache, v_cache, strided_ok=use_triton)
    use_cpu = not use_triton and _use_cpu_kernel(query, k_cache, v_cache, backend)
    if query.shape[0] == 0:  # no query rows (a last layer none of whose rows sample)
        return torch.empty_like(query)
    if use_cpu:
        return paged_attention_cpu(
            query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, float(scale)
        )
    if use_triton:
        ops = _triton_kernels()
        args = (_rows(query), k_cache, v_cache, query_start_loc.contiguous(),
                seq_lens.contiguous(), _rows(block_tables), float(scale))
        if query.shape[0] == batch:
            return ops.decode.paged_decode(*args)
        return ops.prefill.paged_prefill(*args)
    return paged_attention_ref(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, float(scale)
    )


def graph_safe(device: torch.device, head_dim: int) -> bool:
    """Whether ``backend="auto"`` serves ``device`` with the Triton kernels, whose launches
    depend on tensor sizes alone and can be captured in a CUDA graph (the torch reference
    reads lengths on the host, which a capture forbids)."""
    if device.type != "cuda":
        return False
    supported = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    return supported and _triton_available()


# --------------------------------------------------------------------------- dispatch


class _TritonKernels(NamedTuple):
    decode: ModuleType
    prefill: ModuleType
    kv_write: ModuleType
    interpreted: bool  # built for Triton's interpreter (CPU tensors) rather than a GPU


def _use_triton(tensor: torch.Tensor, backend: Backend = "auto", *, head_dim: int) -> bool:
    """Whether the Triton kernels serve a call on ``tensor``'s device (see the module
    docstring); raises when ``backend="triton"`` cannot be honoured."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "cpu"):
        return False
    supported = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    if backend == "auto":
        if tensor.is_cuda:
            if not supported or not _triton_available():
                _warn_fallback(head_dim, supported)
                return False
            return True
        if not _env_flag("ENGINE_TRITON_INTERPRET"):
            return False
    # backend == "triton", or "auto" on CPU with ENGINE_TRITON_INTERPRET=1: honour it or say why.
    if not _triton_available():
        raise RuntimeError("the Triton kernels need the triton package: pip install 'engine[triton]'")
    if not supported:
        raise ValueError(f"the Triton kernels need a power-of-two head_dim in [16, 256], got {head_dim}")
    if not tensor.is_cuda and not _triton_kernels().interpreted:
        raise ValueError(
            f"the Triton kernels take {tensor.device} tensors only under Triton's interpreter, "
            "which is process-wide and chosen when triton is first imported (transformers "
            "and torch may import it early): start the process with TRITON_INTERPRET=1"
        )
    return True


def _use_cpu_kernel(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    backend: Backend) -> bool:
    """Whether the C kernel serves a ``paged_attention`` call (see the module docstring);
    raises when ``backend="cpu"`` (or ``ENGINE_CPU_ATTENTION=cpu``) cannot be honoured."""
    if backend in ("torch", "triton"):
        return False
    if query.device.type != "cpu":
        if backend == "cpu":
            raise ValueError(f"backend='cpu' takes CPU tensors, got {query.device}")
        return False
    if backend == "auto":
        mode = _cpu_attention_mode()
        if mode == "torch":
            return False
        if mode == "auto":
            if query.dtype != torch.float32 or query.shape[2] not in CPU_HEAD_DIMS:
                return False
            try:
                load_cpu_kernel()
            except CpuKernelUnavailable as e:
                _warn_cpu_fallback(str(e))
                return False
            return True
    # backend == "cpu", or ENGINE_CPU_ATTENTION=cpu: honour it or say why.
    if query.dtype != torch.float32:
        raise ValueError(f"the CPU attention kernel takes float32, got {query.dtype}")
    if query.shape[2] not in CPU_HEAD_DIMS:
        raise ValueError(
            f"the CPU attention kernel has copies for head_dim {CPU_HEAD_DIMS}, "
            f"not head_dim {query.shape[2]}"
        )
    _check_contiguous(("k_cache", k_cache), ("v_cache", v_cache))
    try:
        load_cpu_kernel()
    except CpuKernelUnavailable as e:
        raise RuntimeError(f"backend='cpu': {e}") from e
    return True


def _cpu_attention_mode() -> str:
    """``ENGINE_CPU_ATTENTION``: what ``backend="auto"`` does on CPU (failing loudly on an
    unknown value)."""
    raw = os.environ.get("ENGINE_CPU_ATTENTION", "")
    mode = raw.strip().lower() or "auto"
    if mode not in CPU_ATTENTION_MODES:
        raise ValueError(
            f"environment variable ENGINE_CPU_ATTENTION={raw!r}: expected one of "
            f"{CPU_ATTENTION_MODES}"
        )
    return mode


@functools.cache
def _warn_cpu_fallback(why: str) -> None:
    warnings.warn(f"kernels: the CPU attention kernel is unavailable, using the torch "
                  f"reference: {why}", stacklevel=4)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dimension, as the kernels read it (other strides are
    passed to them, so views such as q/k/v split from one projection are not copied)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_kernels() -> _TritonKernels:
    """Import the kernel modules (once, on first use: importing ``kernels`` stays free of
    triton).

    Triton's interpreter is all or nothing per process: ``TRITON_INTERPRET`` is read when
    ``triton`` is first imported (its own library functions are ``@jit`` ones), when each
    ``@triton.jit`` decorator runs, and by imports Triton makes lazily while interpreting.
    ``ENGINE_TRITON_INTERPRET=1`` therefore sets ``TRITON_INTERPRET=1`` for the rest of the
    process, if triton has not been imported yet (if it has, ``_use_triton`` says so).
    """
    if _env_flag("ENGINE_TRITON_INTERPRET") and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    decode = importlib.import_module("kernels.triton_decode")
    prefill = importlib.import_module("kernels.triton_prefill")
    kv_write = importlib.import_module("kernels.triton_kv_write")
    interpreted = type(decode._decode_kernel).__name__ == "InterpretedFunction"
    return _TritonKernels(decode, prefill, kv_write, interpreted)


@functools.cache
def _warn_fallback(head_dim: int, supported: bool) -> None:
    why = "triton is not installed" if supported else f"head_dim {head_dim} is not supported"
    warnings.warn(f"kernels: CUDA tensors but {why}; using the torch reference", stacklevel=3)


def _env_flag(name: str) -> bool:
    """A boolean environment variable; anything unrecognised fails loudly."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of {_TRUE + _FALSE[1:]}")


# --------------------------------------------------------------------------- checks


def _check_dims(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def _check_same_shape(*named: tuple[str, torch.Tensor]) -> None:
    (first, t0), *rest = named
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(
                f"{name} shape {list(t.shape)} != {first} shape {list(t0.shape)}"
            )


def _check_same_dtype(*named: tuple[str, torch.Tensor]) -> None:
    (first, t0), *rest = named
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != {first} dtype {t0.dtype}")


def _check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    (first, t0), *rest = named
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {t0.device}")


def _check_contiguous(*named: tuple[str, torch.Tensor]) -> None:
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, *, strided_ok: bool) -> None:
    """The torch reference needs contiguous caches. The Triton kernels take the caches'
    strides, so they also accept strided views (e.g. K and V packed side by side per slot,
    as vLLM stores them) as long as head_dim is contiguous and K and V share strides."""
    if not strided_ok:
        _check_contiguous(("k_cache", k_cache), ("v_cache", v_cache))
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache strides {k_cache.stride()} != v_cache strides {v_cache.stride()}"
        )
