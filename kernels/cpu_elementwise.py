"""Fused elementwise ops of the Llama block on CPU float32: RMSNorm, residual add + RMSNorm,
rotary embedding, SwiGLU's ``silu(gate) * up``.

Each is one C loop over the rows (``kernels/cpu/elementwise.c``) instead of a chain of small
torch ops with an intermediate tensor each: on the saturation model (hidden 256, 8 heads of
32, MLP 768) they are 3-17x faster than the torch ops they replace (docs/kernels.md, "CPU
elementwise ops"). ``applies`` says whether a call can take this path (CPU, float32, rows
contiguous, no autograd, the library built); the model layers keep their torch ops for
everything else (CUDA, bf16, training), and the results agree with them to a few ulp (the
order of a sum of squares, the exponential's polynomial).

``ENGINE_CPU_ELEMENTWISE=0`` turns the path off (the torch ops serve), as does setting
``ENABLED`` to False in a process (``bench.native_ab`` compares both that way).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from kernels.cpu import build

logger = logging.getLogger(__name__)

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

#: Whether the C ops may serve (the library must also build).
ENABLED = os.environ.get("ENGINE_CPU_ELEMENTWISE", "1").strip().lower() not in (
    "0", "false", "no", "off")


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The library, or None after one warning when it cannot be built (the torch ops serve)."""
    try:
        lib = build.load("elementwise")
    except build.BuildError as e:
        logger.warning("the fused CPU elementwise ops are unavailable, using the torch ops "
                       "instead: %s", e)
        return None
    lib.rms_norm_f32.argtypes = [_P, _I64, _P, _P, _I64, _I64, _F32]
    lib.add_rms_norm_f32.argtypes = [_P, _P, _P, _P, _I64, _I64, _F32]
    lib.rotary_f32.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P]
    lib.silu_mul_f32.argtypes = [_P, _P, _I64, _I64]
    for fn in (lib.rms_norm_f32, lib.add_rms_norm_f32, lib.rotary_f32, lib.silu_mul_f32):
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the C ops serve: enabled, and the library built and loaded."""
    return ENABLED and _lib() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` can go through the C ops: CPU float32 with no autograd, and the
    library available. Layout (contiguous rows) is each op's own check."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def _rows_2d(x: torch.Tensor) -> int | None:
    """The row stride of ``x`` [n, d] when its rows are contiguous (stride 1 within a row)."""
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        return None
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * (x / sqrt(mean(x**2, -1) + eps))`` over the last dim, or None when the
    layout does not fit (rows of ``x`` must be contiguous; the caller runs the torch op)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d) if x.dim() != 2 else x
    stride = _rows_2d(x2)
    if stride is None or not weight.is_contiguous() or weight.shape != (d,):
        return None
    out = torch.empty((x2.shape[0], d), dtype=x.dtype)
    _lib().rms_norm_f32(x2.data_ptr(), stride, weight.data_ptr(), out.data_ptr(),  # type: ignore[union-attr]
                        x2.shape[0], d, eps)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, acc: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor | None:
    """``acc += x`` in place (the residual stream), then ``rms_norm(acc)``; None (and
    nothing written) when the layout does not fit: both ``[n, d]`` contiguous."""
    if (x.shape != acc.shape or x.dim() != 2 or not x.is_contiguous() or not acc.is_contiguous()
            or not weight.is_contiguous() or weight.shape != (x.shape[1],)):
        return None
    out = torch.empty_like(acc)
    _lib().add_rms_norm_f32(x.data_ptr(), acc.data_ptr(), weight.data_ptr(),  # type: ignore[union-attr]
                            out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate ``x`` ``[n, heads, head_dim]`` in place by ``cos``/``sin`` ``[n, 1, head_dim //
    2]`` (neox layout). ``x`` may be a view into a wider row (q or k of a fused qkv output):
    its heads must be contiguous within a row. False (nothing written) when it does not fit."""
    n, heads, dim = x.shape
    if (dim % 2 or x.stride(2) != 1 or x.stride(1) != dim
            or cos.shape != (n, 1, dim // 2) or sin.shape != cos.shape
            or not cos.is_contiguous() or not sin.is_contiguous()):
        return False
    stride = x.stride(0) if n > 1 else heads * dim
    _lib().rotary_f32(x.data_ptr(), stride, n, heads, dim,  # type: ignore[union-attr]
                      cos.data_ptr(), sin.data_ptr())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` for a contiguous ``[n, 2I]``; None when the
    layout does not fit."""
    if gate_up.dim() != 2 or not gate_up.is_contiguous() or gate_up.shape[1] % 2:
        return None
    n, two_i = gate_up.shape
    out = torch.empty((n, two_i // 2), dtype=gate_up.dtype)
    _lib().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), n, two_i // 2)  # type: ignore[union-attr]
    return out
