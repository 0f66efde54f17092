"""Building blocks of the Llama family: RMSNorm, rotary embeddings, paged attention, SwiGLU.

Every op works on a flat ragged batch: activations are ``[num_tokens, ...]`` with the tokens
of all scheduled sequences packed together (no padding, no batch dimension); which sequence a
token belongs to only matters inside attention, and that is described by
``AttentionMetadata``.

Numerics follow Hugging Face transformers op for op (RMSNorm in float32 then cast back,
rotary tables computed in float32 then cast to the activation dtype), so that greedy outputs
match it token for token in float32. On CPU float32 the elementwise ops (RMSNorm, the residual
add fused with the next RMSNorm, rotary, SwiGLU's activation) run as fused C loops
(``kernels.cpu_elementwise``) when the library builds; they agree with the torch ops to a few
ulp (summation order, the exponential's polynomial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.models.cpu_linear import Linear
from engine.models.parallel import TensorParallel, row_parallel_linear
from kernels import cpu_elementwise


@dataclass(frozen=True)
class AttentionMetadata:
    """How the flat batch maps onto sequences and KV slots; shared by every layer.

    slot_mapping: int64 ``[num_tokens]``, the cache slot each new token's KV goes to.
    query_start_loc: int32 ``[batch + 1]``, cumulative new-token counts.
    seq_lens: int32 ``[batch]``, context length per sequence including its new tokens.
    block_tables: int32 ``[batch, max_blocks]``, padded.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor


@dataclass(frozen=True)
class SampledRows:
    """The rows of the flat batch whose logits are wanted, when each is the last new token
    of its sequence (no prompt-logprob rows): a model's last layer then only needs them.

    Every token's K and V must still reach the cache, but a token nobody samples needs no
    query, attention, output projection or MLP in the last layer: its hidden state there
    feeds nothing. ``rows`` int64 ``[num_rows]`` (ascending); ``query_start_loc`` int32
    ``[batch + 1]`` counts each sequence's rows (1 if it samples, else 0), its ``seq_lens``
    and ``block_tables`` unchanged, so attention sees each row as a one-token query at the
    end of its context.
    """

    rows: torch.Tensor
    query_start_loc: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_elementwise.applies(x, self.weight):
            out = cpu_elementwise.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        # Statistics in float32 whatever the activation dtype (bf16 sums of squares drift).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(residual + x, self(residual + x))``: the residual add and this norm in one pass
        where the C ops apply (the sum is written into ``x``, which must be a fresh tensor
        the caller gives up)."""
        if cpu_elementwise.applies(x, residual, self.weight):
            out = cpu_elementwise.add_rms_norm(residual, x, self.weight, self.eps)
            if out is not None:
                return x, out
        h = residual + x
        return h, self(h)


# --------------------------------------------------------------------------- rotary

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with the checkpoint's scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent interpolation: long wavelengths are divided by
    ``factor``, short ones kept, the band between blended smoothly."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_positions``, looked up per token.

    Tables are ``[max_positions, head_dim // 2]`` in the activation dtype (the neox layout
    repeats them for both halves, so half is enough): a lookup is one gather per forward,
    shared by every layer, instead of recomputing sin/cos per layer.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        *,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.cos = freqs.cos().to(dtype=dtype, device=device)
        self.sin = freqs.sin().to(dtype=dtype, device=device)
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[num_tokens, 1, head_dim // 2]`` for int64 ``positions``."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, heads, head_dim]`` (neox / HF rotate_half layout).

    On CPU float32 (the C op) ``x`` is rotated in place and returned: callers pass a tensor
    nobody reads unrotated afterwards (q or k of a fresh qkv projection)."""
    if cpu_elementwise.applies(x, cos, sin) and cpu_elementwise.rotary_(x, cos, sin):
        return x
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache.

    q, k and v come from one fused projection (one GEMM reading the activations once instead
    of three); the loader fills its row slices from the checkpoint's q/k/v weights.

    Under tensor parallelism (``tp`` of size > 1) ``num_heads`` and ``num_kv_heads`` are this
    rank's share: ``qkv_proj`` is column-parallel (this rank's q, k and v rows), ``o_proj``
    row-parallel (its input columns), summed over the group (see ``engine.models.parallel``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
        dtype: torch.dtype,
        device: Any = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias, **kw)
        self.o_proj = Linear(self.q_size, hidden_size, bias=o_bias, **kw)
        # Qwen3: RMSNorm over each head's q and k, before rotary.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, **kw) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, **kw) if qk_norm_eps is not None else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """Attention output of every row of ``x``, or only of ``sampled.rows`` (every row's
        K and V are written to the cache either way)."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k = apply_rotary(k, cos, sin)
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        query_start_loc = meta.query_start_loc
        if sampled is not None:
            q, cos, sin = q[sampled.rows], cos[sampled.rows], sin[sampled.rows]
            query_start_loc, n = sampled.query_start_loc, q.shape[0]
        o = kernels.paged_attention(
            apply_rotary(q, cos, sin), k_cache, v_cache, query_start_loc, meta.seq_lens,
            meta.block_tables, self.scale,
        )
        return row_parallel_linear(self.o_proj, o.reshape(n, self.q_size), self.tp)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one GEMM.

    Under tensor parallelism ``intermediate_size`` is this rank's share: ``gate_up_proj`` is
    column-parallel, ``down_proj`` row-parallel, summed over the group.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, bias: bool, dtype: torch.dtype,
        device: Any = None, tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = cpu_elementwise.silu_mul(gate_up) if cpu_elementwise.applies(gate_up) else None
        if act is None:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = F.silu(gate) * up
        return row_parallel_linear(self.down_proj, act, self.tp)
