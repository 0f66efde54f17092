"""A last layer that runs only the sampled rows (``SampledRows``) gives the logits and the
KV cache of the full forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.models.layers import AttentionMetadata, SampledRows
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import load_model

pytest.importorskip("transformers")
from models.test_llama_vs_hf import save_random_model

BLOCK = 4


def _batch(contexts: list[int], new: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata of a ragged batch: sequence i has ``contexts[i]`` cached tokens
    and ``new[i]`` new ones, its blocks laid out backwards so tables are not the identity."""
    total = [c + n for c, n in zip(contexts, new, strict=True)]
    width = max(-(-t // BLOCK) for t in total)
    tables = torch.zeros(len(total), width, dtype=torch.int32)
    next_block = sum(-(-t // BLOCK) for t in total)
    slots, positions = [], []
    for i, t in enumerate(total):
        for b in range(-(-t // BLOCK)):
            next_block -= 1
            tables[i, b] = next_block
        pos = torch.arange(contexts[i], t)
        positions.append(pos)
        slots.append(tables[i].long()[pos // BLOCK] * BLOCK + pos % BLOCK)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(torch.cat(slots), cu, torch.tensor(total, dtype=torch.int32), tables)
    return torch.cat(positions), meta


def _caches(model: LlamaForCausalLM, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, BLOCK, model.cfg.num_kv_heads, model.cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.cfg.num_layers)]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("sampling", [[True, False, True, True], [False, False, False, False],
                                      [False, True, False, False]])
def test_sampled_rows_match_full_forward(kind: str, sampling: list[bool], tmp_path: Path) -> None:
    model = load_model(save_random_model(kind, tmp_path / kind), dtype=torch.float32,
                       device="cpu")
    # Whole prompts, an extend over a cached prefix, a one-token decode.
    contexts, new = [0, 0, 6, 9], [7, 13, 5, 1]
    positions, meta = _batch(contexts, new)
    num_blocks = int(meta.block_tables.max()) + 1
    gen = torch.Generator().manual_seed(0)
    prefix_ids = torch.randint(0, 97, (sum(contexts),), generator=gen)
    ids = torch.randint(0, 97, (sum(new),), generator=gen)
    ends = meta.query_start_loc[1:].long() - 1
    rows = ends[torch.tensor(sampling)]
    qsl = torch.tensor([0, *torch.tensor(sampling).cumsum(0).tolist()], dtype=torch.int32)
    results = []
    for sampled in (None, SampledRows(rows=rows, query_start_loc=qsl)):
        caches = _caches(model, num_blocks)
        with torch.inference_mode():
            # The cached prefixes first (a prefill of them alone), then the batch.
            pre_pos, pre_meta = _batch([0, 0, 0, 0], [1, 1, *contexts[2:]])
            pre = SampledRows(rows=torch.zeros(0, dtype=torch.int64),
                              query_start_loc=torch.zeros(5, dtype=torch.int32))
            pre_ids = torch.cat([torch.zeros(2, dtype=torch.int64), prefix_ids])
            assert model(pre_ids, pre_pos, _same_tables(pre_meta, meta), caches,
                         torch.zeros(0, dtype=torch.int64), pre).shape[0] == 0
            logits = model(ids, positions, meta, caches, rows, sampled)
        results.append((logits, caches))
    (full, full_caches), (part, part_caches) = results
    assert part.shape == (len(rows), 97)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(full_caches, part_caches, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def _same_tables(pre: AttentionMetadata, meta: AttentionMetadata) -> AttentionMetadata:
    """``pre``'s tokens written through ``meta``'s block tables (the prefixes' own blocks)."""
    pos = torch.cat([torch.arange(int(n)) for n in pre.seq_lens.tolist()])
    seq = torch.repeat_interleave(torch.arange(len(pre.seq_lens)), pre.seq_lens.long())
    slots = meta.block_tables.long()[seq, pos // BLOCK] * BLOCK + pos % BLOCK
    return AttentionMetadata(slots, pre.query_start_loc, pre.seq_lens, meta.block_tables)
