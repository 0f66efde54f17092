"""Paged prefill / extend attention in Triton: a ragged batch of new tokens, each sequence's
tokens attending causally to its cached prefix and to themselves.

FlashAttention-style: a program owns a tile of query rows, streams the sequence's K/V
through it in ``BLOCK_N``-token tiles with an online softmax, and never materialises the
score matrix. Specific to this engine:

- **Ragged batch, no host sync.** Sequence ``i`` has ``q_len_i`` new tokens, cut into tiles
  of ``BLOCK_Q`` tokens. Its tiles are the programs numbered from
  ``query_start_loc[i] // BLOCK_Q + i``: that start is monotone in ``i`` and leaves every
  sequence at least ``ceil(q_len_i / BLOCK_Q)`` numbers, so a grid of
  ``num_tokens // BLOCK_Q + batch`` programs covers any batch. A program finds its sequence
  by binary search over ``query_start_loc``; the few surplus programs exit at once. The grid
  depends only on tensor sizes, never on their values (no ``.item()``, CUDA-graph safe).
  A sequence's tiles are handed out last first: under the causal mask the last tiles see the
  most keys, and starting them early keeps the grid's final wave short.
- **GQA packing.** A program serves one KV head and all ``group`` query heads that share it:
  its ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows are (token, head) pairs, token-major, so every
  K/V tile is read once per group and a decode (one token) in a mixed batch still fills
  ``GROUP_PAD`` rows of the dot.
- **Causality with a prefix.** New token ``j`` sits at position ``seq_len - q_len + j``
  (the prefix may end mid-block). Key tiles entirely at or before the tile's first query
  position run without masks; only the tiles on the diagonal are masked.
- **Paging.** As in decode: each key position's slot comes from the block table, so a tile
  may span several blocks or part of one, for any block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, last_pos,
    qk_scale, stride_cache_block, stride_cache_slot,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the keys at ``[tile_start, tile_start + BLOCK_N)``.

    Without ``CAUSAL_MASK`` every key of the tile is visible to every row (the caller
    guarantees it); with it, key ``p`` is loaded iff ``p <= last_pos`` and row ``r`` sees it
    iff ``p <= q_pos[r]``.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    pos = tile_start + offs_n
    if CAUSAL_MASK:
        valid = pos <= last_pos
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    slot = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_slot + head_offset
    kv_offsets = slot[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
    if CAUSAL_MASK:
        # Out-of-range lanes load 0, not the cache (unused slots may hold NaN).
        k = tl.load(k_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL_MASK:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if CAUSAL_MASK:
        v = tl.load(v_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + kv_offsets)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    # pointers
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    # sizes and scalars
    num_seqs, qk_scale,
    # strides (the last dimension of every tensor is contiguous)
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    # meta-parameters
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_Q: tl.constexpr,  # new tokens per program (BLOCK_Q * GROUP_PAD rows)
    BLOCK_N: tl.constexpr,  # keys per tile
    DOT_PRECISION: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The sequence owning this tile: the last i with query_start_loc[i] // BLOCK_Q + i <= tile_id.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile_id
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    local = tile_id - (q_start // BLOCK_Q + seq)
    if local >= num_q_tiles:
        return  # a surplus program
    q_tile = num_q_tiles - 1 - local  # last tile first (see the module docstring)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_new_pos = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = q_tile * BLOCK_Q + offs_m // GROUP_PAD  # index among the sequence's new tokens
    head_in_group = offs_m % GROUP_PAD
    row_valid = (tok < q_len) & (head_in_group < GROUP)
    heads = kv_head * GROUP + head_in_group
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None], other=0.0,
    )
    q_pos = first_new_pos + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    head_offset = kv_head * stride_cache_head
    tile_first_pos = first_new_pos + q_tile * BLOCK_Q
    tile_last_pos = tl.minimum(tile_first_pos + BLOCK_Q, seq_len) - 1
    # Keys [0, unmasked_end) are visible to every row of the tile: no masks there.
    unmasked_end = (tile_first_pos + 1) // BLOCK_N * BLOCK_N
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos,
            k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, tile_last_pos,
            qk_scale, stride_cache_block, stride_cache_slot,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )
    # The diagonal. No row ends with an empty softmax: either the loop above ran, or
    # unmasked_end == 0 and every row sees key 0 in the first tile here.
    for tile_start in range(unmasked_end, tile_last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos,
            k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, tile_last_pos,
            qk_scale, stride_cache_block, stride_cache_slot,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None],
    )


def _default_meta(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> dict[str, int]:
    # FlashAttention-2 shapes for Hopper/Ampere: 128 query rows x 64 keys per tile; 8 warps
    # at head_dim 128 keep the [128, 128] float32 accumulator in registers (~210 registers
    # a thread for sm_90, no spills). float32 inputs take no tensor cores (exact "ieee" dots)
    # and small tiles. Not yet tuned on a GPU (see docs/kernels.md; bench.kernels --sweep).
    if not on_gpu:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"block_m": 32, "block_n": 32, "num_warps": 8, "num_stages": 2}
    return {"block_m": 128, "block_n": 64, "num_warps": 8 if head_dim >= 128 else 4,
            "num_stages": 3}


def paged_prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch (prefills, extends and decodes alike) over paged
    KV. Arguments as ``kernels.paged_attention`` (already checked there); ``block_m``
    (query rows per program, a power of two) and the other launch parameters override the
    defaults. Returns ``out`` (allocated ``[num_tokens, num_heads, head_dim]`` if None).
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
    if batch == 0 or num_tokens == 0:
        return out
    meta = _default_meta(head_dim, query.dtype, query.is_cuda)
    block_m = block_m or meta["block_m"]
    block_n = block_n or meta["block_n"]
    group_pad = triton.next_power_of_2(group)
    # At least 16 rows (the smallest tensor-core tile); a group wider than block_m gets one
    # token per program.
    block_m = max(block_m, 16, group_pad)
    block_q = block_m // group_pad
    assert block_q * group_pad == block_m, f"block_m {block_m}: a power of two"
    num_tiles = num_tokens // block_q + batch

    _prefill_kernel[(num_tiles, num_kv_heads)](
        out, query, k_cache, v_cache,
        query_start_loc, seq_lens, block_tables,
        batch, scale * LOG2E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps or meta["num_warps"],
        num_stages=num_stages or meta["num_stages"],
    )
    return out
