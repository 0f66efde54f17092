"""Torch references of the paged-KV ops: the ground truth the Triton kernels are tested
against, and the implementation that runs on CPU.

Layouts (shared with the kernels):

- KV cache, one per layer for keys and one for values:
  ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous. Token ``t`` of a
  sequence lives in block ``block_table[t // block_size]`` at offset ``t % block_size``,
  i.e. flat slot ``block_id * block_size + offset``.
- A ragged batch: the new tokens of every sequence packed into one ``[num_tokens, ...]``
  tensor; ``query_start_loc[i]:query_start_loc[i + 1]`` are sequence ``i``'s. Its context
  (``seq_lens[i]`` tokens, its new tokens included, their KV already written) is read through
  ``block_tables[i]``. New token ``j`` of a sequence with ``q_len`` new tokens sits at
  position ``seq_len - q_len + j`` and sees every position up to its own (causal; a cached
  prefix is fully visible).

No argument checking here: the public wrappers in ``kernels/__init__.py`` do it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches
    at ``slot_mapping`` (int64 ``[num_tokens]``), in place. A negative slot marks a padding
    token (a padded CUDA-graph batch) and is skipped."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    # A view of the contiguous cache as [slots, heads, dim]: one index_copy_ per cache, no
    # per-token Python and no temporary the size of the cache.
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(
        0, slot_mapping, value
    )


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their paged contexts.

    Returns ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype. Arithmetic is done in
    float32 (a no-op for float32 inputs) so that the reference is the accurate one. A
    sequence with ``seq_len == 0`` (a padding row of a CUDA-graph batch) outputs zeros.
    """
    out = torch.empty_like(query)
    plan = _attention_plan(query_start_loc, seq_lens, block_tables, k_cache.shape[1])
    for bucket in plan.buckets:
        _decode_bucket(out, query, k_cache, v_cache, bucket, scale)
    starts, lens = plan.starts, plan.lens
    for i in plan.others:
        q_start, q_end = starts[i], starts[i + 1]
        if lens[i] == 0:
            out[q_start:q_end] = 0
            continue
        out[q_start:q_end] = _one_sequence(
            query[q_start:q_end], k_cache, v_cache, block_tables[i], lens[i], scale
        )
    return out


@dataclass(frozen=True)
class _Bucket:
    """Decodes of similar context length, attended in one SDPA call over whole blocks."""

    rows: torch.Tensor  # their query rows
    #: ``[n * blocks]`` the cache block of every (sequence, block index): a sequence with
    #: fewer blocks than the bucket's longest repeats its last one.
    blocks: torch.Tensor
    #: Flat positions of the gathered ``[n * blocks * block_size]`` keys that are not
    #: context (past a sequence's length): zeroed after the gather, None if there are none.
    padding: torch.Tensor | None
    #: Additive float32 mask ``[n, 1, 1, blocks * block_size]`` (0 or -inf): SDPA's CPU
    #: kernel runs about 20% faster with it than with a boolean one.
    bias: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    starts: list[int]
    lens: list[int]
    buckets: list[_Bucket]
    others: list[int]  # sequences attended one by one (prefills, extends, lone decodes)


#: The last plan and copies of what it was made from: every layer of a forward pass attends
#: over the same metadata, so the host reads and the index arithmetic are done once per step.
#: A plan depends only on the metadata's values, so comparing values is a complete check.
_last_plan: tuple[tuple[torch.Tensor, ...], int, _Plan] | None = None


def _attention_plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, block_size: int) -> _Plan:
    global _last_plan
    key = (query_start_loc, seq_lens, block_tables)
    if _last_plan is not None and _last_plan[1] == block_size and all(
            a.device == b.device and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(_last_plan[0], key, strict=True)):
        return _last_plan[2]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1 and lens[i] > 0]
    buckets: list[_Bucket] = []
    bucketed: set[int] = set()
    for group in _decode_buckets(decodes, lens) if len(decodes) > 1 else []:
        if len(group) > 1:
            buckets.append(_make_bucket(group, starts, lens, block_tables, block_size))
            bucketed.update(group)
    others = [i for i in range(len(lens)) if i not in bucketed and starts[i + 1] > starts[i]]
    plan = _Plan(starts, lens, buckets, others)
    _last_plan = (tuple(t.clone() for t in key), block_size, plan)
    return plan


def _gather_context(
    cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """One sequence's first ``seq_len`` cached tokens, ``[seq_len, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_row[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:seq_len]


def _one_sequence(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_row: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Prefill / extend of one sequence: ``q`` ``[q_len, H, D]`` at the end of its context."""
    q_len = q.shape[0]
    k = _gather_context(k_cache, block_row, seq_len)
    v = _gather_context(v_cache, block_row, seq_len)
    # Query j sits at position seq_len - q_len + j; key position p is visible iff p <= it.
    # SDPA's is_causal aligns to the top-left corner: right for a whole prompt (no cached
    # prefix, q_len == seq_len), where the fused CPU kernel then also skips the key blocks
    # above the diagonal (half the work, no mask read); wrong once a prefix is cached, so an
    # extend passes the explicit mask.
    mask = None
    if q_len != seq_len:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
    # 4-D inputs (a batch of one) reach PyTorch's fused CPU attention kernel; 3-D ones fall
    # back to the unfused path, about 3x slower.
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],  # [1, H, q_len, D]
        k.float().transpose(0, 1)[None],  # [1, Hkv, seq_len, D]
        v.float().transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None and q_len > 1,
        scale=scale,
        enable_gqa=True,
    )
    return o[0].transpose(0, 1).to(q.dtype)


#: A decode bucket grows while its padded size stays within this factor of its real size.
_MAX_PADDING = 1.25


def _decode_buckets(decodes: list[int], lens: list[int]) -> list[list[int]]:
    """The decodes sorted by context length and cut into buckets whose padding to their
    longest context wastes at most ``_MAX_PADDING`` - 1 of the keys read."""
    buckets: list[list[int]] = []
    total = 0
    for i in sorted(decodes, key=lambda d: lens[d]):
        if buckets and (len(buckets[-1]) + 1) * lens[i] <= _MAX_PADDING * (total + lens[i]):
            buckets[-1].append(i)
            total += lens[i]
        else:
            buckets.append([i])
            total = lens[i]
    return buckets


def _make_bucket(decodes: list[int], starts: list[int], lens: list[int],
                 block_tables: torch.Tensor, block_size: int) -> _Bucket:
    """Where a bucket's keys are: whole blocks, each sequence's padded with its last block
    up to the bucket's longest, and the positions past each context listed for zeroing."""
    device = block_tables.device
    ctx = torch.tensor([lens[i] for i in decodes], device=device)
    num_blocks = -(-max(lens[i] for i in decodes) // block_size)
    last = (ctx + block_size - 1) // block_size - 1  # each sequence's last block index
    index = torch.minimum(torch.arange(num_blocks, device=device)[None, :], last[:, None])
    table = block_tables[torch.tensor(decodes, device=device)].long()
    pos = torch.arange(num_blocks * block_size, device=device)
    valid = pos[None, :] < ctx[:, None]  # [n, blocks * block_size]
    padding = (~valid).flatten().nonzero()[:, 0]
    rows = torch.tensor([starts[i] for i in decodes], device=device)
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=device)
    bias = bias.masked_fill_(~valid, float("-inf"))[:, None, None, :]
    return _Bucket(rows=rows, blocks=table.gather(1, index).flatten(),
                   padding=padding if padding.numel() else None, bias=bias)


def _decode_bucket(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bucket: _Bucket,
    scale: float,
) -> None:
    """Single-token sequences of similar context lengths in one SDPA call.

    On CPU a decode step is dominated by per-call overhead and memory traffic, not FLOPs: one
    gather per cache and one SDPA over ``[n, H, 1, L_max]`` per bucket replaces ``n`` small
    calls, and bucketing by length keeps the padding (keys read for nothing) under 25%
    however mixed the batch's lengths are.
    """
    num_kv_heads, head_dim = k_cache.shape[2:]
    n, length = bucket.bias.shape[0], bucket.bias.shape[-1]
    k = _gather_blocks(k_cache, bucket).view(n, length, num_kv_heads, head_dim)
    v = _gather_blocks(v_cache, bucket).view(n, length, num_kv_heads, head_dim)
    num_heads = query.shape[1]
    # GQA folded into the query length: query head h reads kv head h // group, so the group
    # of one kv head becomes `group` query rows against that head's keys. K/V stay
    # un-replicated (no repeat_interleave) and the fused kernel sees [n, Hkv, group, L].
    q = query[bucket.rows].float().view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(
        q,
        k.transpose(1, 2),  # [n, Hkv, L, D]
        v.transpose(1, 2),
        attn_mask=bucket.bias,
        scale=scale,
    )
    out[bucket.rows] = o.reshape(n, num_heads, head_dim).to(out.dtype)


def _gather_blocks(cache: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    """The bucket's blocks of ``cache`` as float32 ``[n * blocks * block_size, Hkv, D]``,
    with every position past a context zeroed.

    One 4 KB row per block (block 16, 2 x 32 float32) instead of one 256-byte row per
    position: 16x fewer indices to build and read (the measured gain is mostly the bucket
    plan's, docs/kernels.md; the copy itself costs about the same). Its price is the tail of
    each sequence's last block (and, for the shorter sequences of the bucket, whole repeated
    blocks): slots the mask gives weight 0 but that may never have been written, or were
    written by a request that has since freed the block. Weight 0 is not enough (0 x NaN and 0 x inf are
    NaN, and -inf + NaN is NaN in the scores), so those positions are zeroed after the
    gather: an ``index_fill_`` over the padding alone, not over the whole bucket."""
    rows = cache.index_select(0, bucket.blocks).flatten(0, 1)
    if bucket.padding is not None:
        rows.index_fill_(0, bucket.padding, 0.0)
    return rows.float()
