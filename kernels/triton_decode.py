"""Paged decode attention in Triton: one new token per sequence, read against its paged KV.

Decode is bound by memory: every step reads each sequence's whole K and V once, and does
two multiply-adds per element read. The kernel is shaped so that those bytes are read once
and at full bandwidth:

- **GQA packing.** One program serves one KV head of one sequence and *all* the query heads
  that share it (``group = num_heads // num_kv_heads``). Those heads are the M dimension of
  ``tl.dot`` (padded to 16, the smallest tensor-core tile), so each K/V tile is loaded once
  per group rather than once per query head, and the dot runs on tensor cores.
- **Split-KV.** At small batch there are too few (sequence, KV head) programs to fill the
  GPU (batch 1 x 8 KV heads is 8 programs on 132 SMs). A third grid dimension cuts each
  context into ``num_splits`` slices; each program writes its slice's normalised partial
  output and log-sum-exp, and ``_reduce_kernel`` merges them.
- **Paging.** A KV tile of ``BLOCK_N`` tokens may span several cache blocks (or part of
  one): each token's slot is looked up in the block table, so any block size works and the
  tile size is chosen for the hardware, not for the cache.

Layouts: see ``kernels/reference.py``. Softmax runs in base 2 (``exp2``; the scale is
pre-multiplied by log2(e)), accumulation in float32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split-KV heuristic (see num_kv_splits): aim for this many programs per SM, never give a
# split fewer than MIN_SPLIT_TOKENS tokens, never more than MAX_SPLITS splits.
PROGRAMS_PER_SM = 4
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64


@triton.jit
def _decode_kernel(
    # pointers
    out_ptr, part_out_ptr, part_lse_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    # sizes and scalars
    num_heads, qk_scale,
    # strides (the last dimension of every tensor is contiguous; the partials are contiguous
    # [batch, num_heads, NUM_SPLITS(, HEAD_DIM)])
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    # meta-parameters
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two, at least 16
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per KV tile
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    # This split's slice [start, end) of the context: equal shares, rounded up to whole tiles.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    head_valid = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q = tl.load(
        q_ptr + q_row * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=head_valid[:, None], other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    head_offset = kv_head * stride_cache_head
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        valid = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_slot + head_offset
        kv_offsets = slot[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        # Masked lanes load 0, not the cache: unused slots may hold anything, NaN included,
        # and 0 * NaN would poison the weighted sum.
        k = tl.load(k_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty slice (short context, or a zero-length padding sequence) has l_i == 0: it
    # writes a zero output and lse = -inf, which the reduction weighs as nothing.
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + q_row * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None],
        )
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=head_valid[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_valid)


@triton.jit
def _reduce_kernel(
    # pointers
    out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr,
    # sizes
    num_heads,
    # strides
    stride_o_tok, stride_o_head,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # a power of two
):
    """Merge one (sequence, query head)'s split partials: out = sum_s w_s o_s / sum_s w_s,
    w_s = 2^(lse_s - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part)
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all empty: weights all 0
    w = tl.exp2(lse - lse_max)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    tl.store(out_ptr + q_row * stride_o_tok + head * stride_o_head + offs_d,
             out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a stand-in of 4 off CUDA (the interpreter),
    so that the split heuristic still has something to divide."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def num_kv_splits(batch: int, num_kv_heads: int, max_context: int, sms: int) -> int:
    """How many slices to cut each context into (a power of two).

    Doubles the split count while the grid has fewer than ``PROGRAMS_PER_SM`` programs per
    SM (a memory-bound kernel needs several in flight per SM to cover HBM latency), as long
    as every slice keeps at least ``MIN_SPLIT_TOKENS`` tokens (below that, the extra partial
    writes and the reduction cost more than the parallelism buys). Batch 64 x 8 KV heads on
    132 SMs gets 2 splits; batch 1 at 32k context gets 64.
    """
    programs = max(1, batch * num_kv_heads)
    splits = 1
    while (
        programs * splits < PROGRAMS_PER_SM * sms
        and splits * 2 <= MAX_SPLITS
        and max_context >= splits * 2 * MIN_SPLIT_TOKENS
    ):
        splits *= 2
    return splits


def _default_meta(head_dim: int, on_gpu: bool) -> dict[str, int]:
    # 64-token tiles: a [64, 128] bf16 K or V tile is 16 KiB, and two stages of K and V stay
    # well inside shared memory with 4 warps. Not yet tuned on a GPU (see docs/kernels.md).
    del head_dim
    return {"block_n": 64, "num_warps": 4, "num_stages": 2 if on_gpu else 1}


def paged_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention: sequence ``i``'s single new token is row ``query_start_loc[i]`` of
    ``query`` ``[num_tokens, num_heads, head_dim]``; it attends to all ``seq_lens[i]``
    positions of its context. Arguments as ``kernels.paged_attention`` (already checked
    there); ``num_splits`` (a power of two) and the tile/launch parameters override the
    heuristics. Returns ``out`` (allocated ``[num_tokens, num_heads, head_dim]`` if None).
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    assert query.stride(-1) == 1, "query's last dimension must be contiguous"
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: a power of two >= 16"
    assert block_tables.stride(-1) == 1
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    meta = _default_meta(head_dim, query.is_cuda)
    block_n = block_n or meta["block_n"]
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size  # an upper bound known without a sync
        num_splits = num_kv_splits(batch, num_kv_heads, max_context, num_sms(query.device))
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits: a power of two"
    if num_splits > 1:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                               device=query.device)
    else:  # unused by the kernel; any float32 tensor will do
        part_out = part_lse = out.new_empty((1,), dtype=torch.float32)

    _decode_kernel[(batch, num_kv_heads, num_splits)](
        out, part_out, part_lse,
        query, k_cache, v_cache,
        query_start_loc, seq_lens, block_tables,
        num_heads, scale * LOG2E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps or meta["num_warps"],
        num_stages=num_stages or meta["num_stages"],
    )
    if num_splits > 1:
        _reduce_kernel[(batch, num_heads)](
            out, part_out, part_lse, query_start_loc,
            num_heads,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            num_warps=max(1, min(4, math.ceil(num_splits * head_dim / 1024))),
        )
    return out
