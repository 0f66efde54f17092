"""What the model tests share: a ragged prefill of the native model through a paged cache.

Kept free of transformers: the tensor-parallel test's spawned ranks import it.
"""

from __future__ import annotations

import torch

from engine.models.layers import AttentionMetadata
from engine.models.llama import LlamaForCausalLM


def ragged_logits(model: LlamaForCausalLM, prompts: list[list[int]], block_size: int = 4) -> list[torch.Tensor]:
    """All-position logits of ``prompts`` as one ragged prefill through shuffled KV blocks,
    the cache sized from ``model.cfg`` (this rank's KV heads under tensor parallelism)."""
    cfg = model.cfg
    blocks = [-(-len(p) // block_size) for p in prompts]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
              for _ in range(cfg.num_layers)]
    tables = torch.zeros(len(prompts), max(blocks), dtype=torch.int32)
    slots, positions = [], []
    for i, p in enumerate(prompts):
        ids = torch.tensor([perm.pop() for _ in range(blocks[i])])
        tables[i, : len(ids)] = ids
        pos = torch.arange(len(p))
        positions.append(pos)
        slots.append(ids[pos // block_size] * block_size + pos % block_size)
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables,
    )
    with torch.inference_mode():
        logits = model(torch.tensor([t for p in prompts for t in p]), torch.cat(positions), meta,
                       caches, torch.arange(sum(lens)))
    return list(logits.split(lens))
