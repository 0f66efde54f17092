"""One forward pass's flat batch as the host prepares it, and how a tensor-parallel leader
hands it to the other ranks of its group.

The leader of a tensor-parallel group (rank 0: the worker the pool talks to) keeps every
request's state and prepares each step's batch; the other ranks keep no request state at
all. They receive the batch and run the same forward pass on their shards of the weights and
KV heads, meeting the leader in each layer's all-reduce; the logits are the leader's alone,
so they compute none. The batch travels as two int64 CPU tensors over the group (gloo): a
header (its kind, and how long each part is) and the parts packed end to end. A header of
kind stop ends the follower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.models.parallel import TensorParallel
from engine.worker.sampler import PromptRows

_STOP, _BATCH = 0, 1
_HEADER = 4  # kind, tokens, sequences, block-table width


@dataclass
class HostBatch:
    """One forward pass's flat batch, on the host (numpy int64), and who samples."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray  # [sequences, width]
    logits_indices: np.ndarray  # rows of the flat batch whose logits are computed
    #: The requests that sample, in the order of the first logits rows.
    sampling_ids: list[str] = field(default_factory=list)
    #: The prompt-logprob rows, after the sampling ones (see ``PromptRows``).
    prompt_rows: list[PromptRows] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """One new token per request: a batch the decode graphs can run."""
        return len(self.input_ids) == len(self.seq_lens)


def tp_send(tp: TensorParallel, batch: HostBatch | None) -> None:
    """Broadcast ``batch`` (None: stop) from the group's rank 0 to the others."""
    import torch.distributed as dist

    src = dist.get_global_rank(tp.group, 0)
    if batch is None:
        dist.broadcast(torch.tensor([_STOP, 0, 0, 0]), src=src, group=tp.group)
        return
    tables = batch.block_tables
    header = torch.tensor([_BATCH, len(batch.input_ids), len(batch.seq_lens), tables.shape[1]])
    parts = (batch.input_ids, batch.positions, batch.slot_mapping, batch.query_start_loc,
             batch.seq_lens, tables.reshape(-1))
    payload = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
    dist.broadcast(header, src=src, group=tp.group)
    dist.broadcast(payload, src=src, group=tp.group)


def tp_recv(tp: TensorParallel) -> HostBatch | None:
    """The next batch the group's rank 0 broadcasts (with no logits rows: a follower
    samples nothing), or None when it says stop."""
    import torch.distributed as dist

    src = dist.get_global_rank(tp.group, 0)
    header = torch.zeros(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=src, group=tp.group)
    kind, tokens, seqs, width = header.tolist()
    if kind == _STOP:
        return None
    sizes = [tokens, tokens, tokens, seqs + 1, seqs, seqs * width]
    payload = torch.zeros(sum(sizes), dtype=torch.int64)
    dist.broadcast(payload, src=src, group=tp.group)
    ids, pos, slots, qsl, lens, tables = np.split(payload.numpy(), np.cumsum(sizes)[:-1])
    return HostBatch(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl,
                     seq_lens=lens, block_tables=tables.reshape(seqs, width),
                     logits_indices=np.zeros(0, dtype=np.int64))
