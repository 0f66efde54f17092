"""The KV-cache write in Triton: each new token's keys and values into its cache slot.

One program per token copies all of its KV heads (``[num_kv_heads, head_dim]``, a few KiB)
for both caches: a pure copy, bound by memory, with the source read through its strides so
that ``key``/``value`` can be views of a fused QKV projection without a ``.contiguous()``.
Slot ``s`` is block ``s // block_size``, offset ``s % block_size`` of the cache
``[num_blocks, block_size, num_kv_heads, head_dim]``, addressed through its strides (so a
strided view, such as vLLM's K|V-packed cache, works too). A negative slot marks a padding
token (as in vLLM, e.g. the unused rows of a CUDA-graph batch) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    # pointers
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    # sizes
    num_kv_heads,
    # strides (the last dimension of every tensor is contiguous; the caches share strides)
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # num_kv_heads rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:
        return
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_kv_heads)[:, None]
    dst = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_slot
           + offs_h[:, None] * stride_cache_head + offs_d[None, :])
    k = tl.load(key_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :],
                mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(value_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :],
                mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches at
    ``slot_mapping`` (int64), in place. Arguments as ``kernels.write_kv`` (already checked
    there); a negative slot is skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value: last dimension contiguous"
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: a power of two"
    assert slot_mapping.is_contiguous()
    if num_tokens == 0:
        return
    heads_pad = triton.next_power_of_2(num_kv_heads)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim,
        HEADS_PAD=heads_pad,
        BLOCK_SIZE=block_size,
        num_warps=max(1, min(8, heads_pad * head_dim // 256)),
    )
