"""The torch references of the paged-KV ops against naive dense attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import paged_attention, write_kv
from kernels.reference import (
    _MAX_PADDING,
    _attention_plan,
    _decode_buckets,
    paged_attention_ref,
    write_kv_ref,
)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, H, D] at the end of a context k/v [L, Hkv, D]; float64, no SDPA."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def build_batch(
    seqs: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> dict:
    """Random contexts for ``seqs`` = [(seq_len, q_len)], written into shuffled blocks of a
    NaN-filled cache (so any read of a slot that was never written shows up)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    max_blocks = max(blocks_per_seq) + 2
    tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)  # -1: padding
    contexts, queries = [], []
    for i, (seq_len, q_len) in enumerate(seqs):
        ids = [perm.pop() for _ in range(blocks_per_seq[i])]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        pos = torch.arange(seq_len)
        slots = torch.tensor(ids)[pos // block_size] * block_size + pos % block_size
        write_kv(k, v, k_cache, v_cache, slots)
        contexts.append((k, v))
        queries.append(torch.randn(q_len, num_heads, head_dim, generator=g).to(dtype))
    q_lens = [q_len for _, q_len in seqs]
    return {
        "query": torch.cat(queries),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "query_start_loc": torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        "seq_lens": torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        "block_tables": tables,
        "contexts": contexts,
        "queries": queries,
    }


# (seq_len, q_len): full prefills (lengths not multiples of the block size), decodes of
# different lengths, and extends whose new tokens start mid-block after a cached prefix.
MIXED = [(5, 5), (1, 1), (17, 17), (33, 1), (9, 1), (20, 3), (16, 7), (40, 1), (23, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_matches_dense(dtype: torch.dtype, group: int, block_size: int) -> None:
    num_kv_heads, head_dim = 2, 32
    b = build_batch(MIXED, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                    head_dim=head_dim, block_size=block_size, dtype=dtype)
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention(b["query"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                          b["seq_lens"], b["block_tables"], scale)
    assert out.shape == b["query"].shape and out.dtype == dtype
    want = torch.cat([naive_attention(q, k, v, scale)
                      for q, (k, v) in zip(b["queries"], b["contexts"], strict=True)])
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("seqs", [
    [(7, 1)], [(7, 1), (3, 1), (30, 1)], [(12, 12)], [(12, 4)],
    # decodes in several length buckets (equal lengths, near ones, singletons far apart)
    [(L, 1) for L in (1, 2, 9, 9, 10, 11, 33, 34, 35, 64, 65, 130, 7, 8)],
])
def test_single_kinds(seqs: list[tuple[int, int]]) -> None:
    """Only decodes (batched path, and a lone decode), only a prefill, only an extend."""
    b = build_batch(seqs, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                    dtype=torch.float32, seed=3)
    out = paged_attention_ref(b["query"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                              b["seq_lens"], b["block_tables"], 0.3)
    want = torch.cat([naive_attention(q, k, v, 0.3)
                      for q, (k, v) in zip(b["queries"], b["contexts"], strict=True)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_extend_equals_full_prefill() -> None:
    """The last tokens of a prefill, computed as an extend over the cached prefix, equal the
    same rows of the full prefill."""
    b = build_batch([(21, 21)], num_heads=8, num_kv_heads=2, head_dim=16, block_size=4,
                    dtype=torch.float32, seed=5)
    full = paged_attention(b["query"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                           b["seq_lens"], b["block_tables"], 0.25)
    tail = paged_attention(b["query"][-6:], b["k_cache"], b["v_cache"],
                           torch.tensor([0, 6], dtype=torch.int32), b["seq_lens"],
                           b["block_tables"], 0.25)
    torch.testing.assert_close(tail, full[-6:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, dim = 6, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:11]
    key = torch.randn(11, heads, dim, generator=g).to(dtype)
    value = torch.randn(11, heads, dim, generator=g).to(dtype)
    write_kv_ref(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, heads, dim)
    flat_v = v_cache.view(-1, heads, dim)
    torch.testing.assert_close(flat_k[slots], key, atol=0, rtol=0)
    torch.testing.assert_close(flat_v[slots], value, atol=0, rtol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert (flat_k[untouched] == 0).all() and (flat_v[untouched] == 0).all()
    # block b, offset o is slot b * block_size + o
    s = int(slots[0])
    torch.testing.assert_close(k_cache[s // block_size, s % block_size], key[0])


def test_checks_raise_value_error() -> None:
    k_cache = torch.zeros(4, 4, 2, 8)
    key = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"slot_mapping must be torch\.int64"):
        write_kv(key, key, k_cache, k_cache.clone(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_kv_heads, head_dim"):
        write_kv(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), k_cache, k_cache.clone(),
                 torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        write_kv(key.half(), key.half(), k_cache, k_cache.clone(), torch.zeros(3, dtype=torch.int64))
    q = torch.zeros(3, 3, 8)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(q, k_cache, k_cache, qsl, lens, tables, 1.0)
    with pytest.raises(ValueError, match=r"seq_lens must be torch\.int32"):
        paged_attention(torch.zeros(3, 4, 8), k_cache, k_cache, qsl, lens.long(), tables, 1.0)
    with pytest.raises(ValueError, match="block_tables must have batch"):
        paged_attention(torch.zeros(3, 4, 8), k_cache, k_cache, qsl, lens,
                        torch.zeros(2, 2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        nc = torch.zeros(4, 2, 4, 8).transpose(1, 2)
        paged_attention(torch.zeros(3, 4, 8), nc, nc, qsl, lens, tables, 1.0)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=80))
def test_decode_buckets_cover_every_decode_and_bound_padding(lens: list[int]) -> None:
    decodes = list(range(len(lens)))
    buckets = _decode_buckets(decodes, lens)
    assert sorted(i for b in buckets for i in b) == decodes
    for b in buckets:
        real = sum(lens[i] for i in b)
        assert len(b) * max(lens[i] for i in b) <= _MAX_PADDING * real + 1e-9


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_reference_padding_rows_like_a_cuda_graph_batch(backend: str) -> None:
    """The reference follows the kernels' padding conventions, which a padded CUDA-graph
    decode batch relies on: a negative slot is not written, and a ``seq_len == 0`` row
    outputs zeros without disturbing the real rows (in either decode path: the bucketed
    batch of several decodes, or a single decode)."""
    b = build_batch([(20, 1), (9, 1), (33, 1)], num_heads=4, num_kv_heads=2, head_dim=16,
                    block_size=4, dtype=torch.float32, seed=3)
    args = [b[k] for k in ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    want = paged_attention(*args, 0.25, backend="torch")
    # Pad the batch to 5 rows: a padding row in the middle of the real ones and one at the end.
    order = [0, None, 1, 2, None]
    pad = lambda t, fill: torch.stack([t[i] if i is not None else fill for i in order])  # noqa: E731
    query = pad(b["query"], torch.full_like(b["query"][0], 7.0))
    seq_lens = torch.tensor([b["seq_lens"][i] if i is not None else 0 for i in order],
                            dtype=torch.int32)
    tables = pad(b["block_tables"], torch.zeros_like(b["block_tables"][0]))
    qsl = torch.arange(6, dtype=torch.int32)
    out = paged_attention(query, b["k_cache"], b["v_cache"], qsl, seq_lens, tables, 0.25,
                          backend=backend)  # type: ignore[arg-type]
    assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]]))
    # "auto" on CPU is the C kernel (tests/kernels/test_cpu_kernel.py): float32 sums in
    # another order, so equal within rounding, not bit for bit.
    tol = 0.0 if backend == "torch" else 1e-5
    torch.testing.assert_close(out[[0, 2, 3]], want, atol=tol, rtol=tol)
    # One real decode beside one padding row takes the single-sequence path.
    one = paged_attention(query[:2], b["k_cache"], b["v_cache"], qsl[:3], seq_lens[:2],
                          tables[:2], 0.25, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(one[1], torch.zeros_like(one[1]))
    torch.testing.assert_close(one[0], want[0])  # another SDPA call: rounding differs

    k_cache = torch.zeros(4, 4, 2, 16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, 2, 16)
    slots = torch.tensor([5, -1, 2])
    write_kv(key, -key, k_cache, v_cache, slots, backend=backend)  # type: ignore[arg-type]
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_k[2], key[2])
    assert torch.equal(flat_v[2], -key[2])
    written = torch.zeros(16, dtype=torch.bool)
    written[[2, 5]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any()


def test_reference_reuses_its_plan_only_for_the_same_metadata() -> None:
    """The reference plans a step's decode buckets once and reuses the plan while the
    metadata's values stay the same (every layer of a forward pass). Changing them in place,
    as a static CUDA-graph buffer is changed between steps, must give a new plan."""
    b = build_batch([(20, 1), (9, 1), (33, 1), (12, 1)], num_heads=4, num_kv_heads=2,
                    head_dim=16, block_size=4, dtype=torch.float32, seed=5)
    args = [b[k] for k in ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    first = paged_attention_ref(*args, 0.25)
    assert torch.equal(paged_attention_ref(*args, 0.25), first)  # the plan reused
    # Swap two sequences' contexts in place: same tensors, new values.
    tables, lens = b["block_tables"], b["seq_lens"]
    tables[[0, 1]] = tables[[1, 0]].clone()
    lens[[0, 1]] = lens[[1, 0]].clone()
    swapped = paged_attention_ref(*args, 0.25)
    for row, ctx in ((0, 1), (1, 0)):
        k, v = b["contexts"][ctx]
        want = naive_attention(b["queries"][row], k, v, 0.25)
        torch.testing.assert_close(swapped[row].double(), want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), float("nan")])
def test_decode_bucket_zeroes_the_padding_of_its_blocks(fill: float) -> None:
    """A decode bucket gathers whole blocks: the tail of each sequence's last block and the
    repeated last blocks of its shorter sequences are padding that may hold anything (never
    written, or stale from a freed block). Filled with inf, -inf or NaN, they must not reach
    the output; the padding entries (-1) of the block tables are never read."""
    seqs = [(29, 1), (33, 1), (34, 1), (40, 1)]  # 8, 9, 9 and 10 blocks of 4: one bucket
    b = build_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=16, block_size=4,
                    dtype=torch.float32, seed=7)
    for cache in (b["k_cache"], b["v_cache"]):  # every unwritten slot (NaN) becomes `fill`
        cache.copy_(cache.nan_to_num(nan=fill, posinf=float("inf"), neginf=float("-inf")))
    args = [b[k] for k in ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    plan = _attention_plan(*args[3:], 4)
    assert len(plan.buckets) == 1 and not plan.others
    assert plan.buckets[0].bias.shape[-1] == 40 and plan.buckets[0].padding is not None
    out = paged_attention_ref(*args, 0.25)
    want = torch.cat([naive_attention(q, k, v, 0.25)
                      for q, (k, v) in zip(b["queries"], b["contexts"], strict=True)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
