"""Paged-KV attention ops: one public function per concept, checked, then dispatched.

``write_kv`` scatters new keys/values into the paged caches; ``paged_attention`` runs causal
attention of a ragged batch (prefill chunks, extends over a cached prefix, and decodes) over
those caches. Layouts and semantics: see ``kernels/reference.py``.

Dispatch: the torch reference everywhere for now. Triton kernels on CUDA plug in at
``_use_triton`` (one place), each tested against the reference with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from kernels.reference import paged_attention_ref, write_kv_ref

__all__ = ["paged_attention", "write_kv"]


def _use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this call: not yet (they come in a later issue)."""
    del tensor
    return False


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (int64
    ``[num_tokens]``, slot = block_id * block_size + offset), in place."""
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
    _check_contiguous(("k_cache", k_cache), ("v_cache", v_cache))
    _check_same_device(
        ("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
        ("slot_mapping", slot_mapping),
    )
    if _use_triton(key):  # pragma: no cover - no Triton kernels yet
        raise NotImplementedError
    write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a ragged batch over paged KV caches.

    query ``[num_tokens, num_heads, head_dim]``; caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (num_heads a multiple of
    num_kv_heads); ``query_start_loc`` int32 ``[batch + 1]``; ``seq_lens`` int32 ``[batch]``,
    context lengths including the new tokens; ``block_tables`` int32 ``[batch, max_blocks]``.
    Returns ``[num_tokens, num_heads, head_dim]`` in query's dtype.
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
    _check_contiguous(("k_cache", k_cache), ("v_cache", v_cache))
    _check_same_device(
        ("query", query), ("k_cache", k_cache), ("v_cache", v_cache),
        ("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
        ("block_tables", block_tables),
    )
    if _use_triton(query):  # pragma: no cover - no Triton kernels yet
        raise NotImplementedError
    return paged_attention_ref(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, float(scale)
    )


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
