"""One worker as the scheduler sees it, and what is local to it.

The scheduler keeps one ``WorkerState`` per live worker: its waiting queue (sorted by the
policy's key), its running requests, its KV block pool with the prefix cache, the plan in
flight and the ids the worker must forget in its next plan. The operations here touch only
that worker; deciding what runs where (placement, steps, preemption) is the scheduler's.
"""

from __future__ import annotations

import bisect

from engine.messages import StepPlan
from engine.scheduler.block_manager import BlockManager
from engine.scheduler.request import Request, RequestStatus

Entry = tuple[tuple[float, ...], int, Request]  # (policy key, sequence, request)


class WorkerState:
    """One worker's queue, running set, KV blocks and in-flight plan."""

    def __init__(self, worker_id: int, num_blocks: int, block_size: int,
                 incarnation: int = 0, record_events: bool = False) -> None:
        self.worker_id = worker_id
        self.incarnation = incarnation  # the worker process's restart count; on its plans
        self.blocks = BlockManager(num_blocks, block_size, record_events)
        self.waiting: list[Entry] = []  # sorted by (key, sequence)
        self.running: list[Request] = []  # in admission order
        self.in_flight: StepPlan | None = None
        self.in_flight_requests: list[Request] = []  # of ``in_flight``, in plan order
        # The request whose prompt ``in_flight`` computes and which outranks others
        # (``Policy.urgent``), or None; read only while ``in_flight`` is set.
        self.in_flight_urgent: Request | None = None
        # Another worker's plan whose urgent request left this worker nothing to run
        # (``Policy.exclusive_prefill_across_workers``): no work here until it ends.
        self.held_by: StepPlan | None = None
        self.to_drop: list[str] = []  # ids the worker must forget in its next plan
        self.num_queued_tokens = 0  # uncomputed tokens of waiting requests
        # The last prefix probe: (request, its known tokens, blocks.version, cached tokens).
        self._probe: tuple[Request, int, int, int, int] | None = None

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    def cached_prefix_tokens(self, req: Request) -> int:
        """Prompt tokens of ``req`` this worker's cache holds now (full blocks).

        A hit is verified token by token, which on a long shared prefix costs tens of
        microseconds; placement probes the chosen worker and then asks again for the
        explanation, so the last answer is kept until the cache changes."""
        probe = self._probe
        blocks = self.blocks
        bs = blocks.block_size
        # At least one token is always computed: the last block of a full hit is not
        # counted (nor blocks that a request owed prompt logprobs must recompute).
        limit = req.max_cached_blocks(bs)
        if (probe is not None and probe[0] is req and probe[1] == req.num_tokens
                and probe[2] == limit and probe[3] == blocks.version):
            return probe[4]
        tokens = len(blocks.match_prefix(req.full_block_hashes(bs), req, req.cache_salt,
                                         limit)) * bs
        self._probe = (req, req.num_tokens, limit, blocks.version, tokens)
        return tokens

    # ------------------------------------------------------------------ queue

    def enqueue(self, req: Request, key: tuple[float, ...], seq: int) -> None:
        """Queue ``req`` in (``key``, ``seq``) order."""
        bisect.insort(self.waiting, (key, seq, req))
        self.num_queued_tokens += req.num_tokens - req.num_computed_tokens

    def unqueue(self, req: Request) -> None:
        for i, entry in enumerate(self.waiting):
            if entry[2] is req:
                del self.waiting[i]
                self.num_queued_tokens -= req.num_tokens - req.num_computed_tokens
                return
        raise AssertionError(f"{req} is not queued on worker {self.worker_id}")

    # ------------------------------------------------------------------ running

    def release(self, req: Request) -> None:
        """Take a running request off this worker: its blocks are freed (full ones stay
        cached until evicted) and the worker forgets it in its next plan."""
        self.blocks.free(req.block_ids)
        self.running.remove(req)
        self.to_drop.append(req.request_id)

    def register_blocks(self, req: Request) -> None:
        """Cache the blocks of ``req`` that became full and computed in the last step."""
        bs = self.blocks.block_size
        num_full = req.num_computed_tokens // bs
        hashes = req.full_block_hashes(bs)
        for i in range(req.num_registered_blocks, num_full):
            if req.cache_parent == -2:
                break
            canon = self.blocks.register(req.block_ids[i], hashes[i], req.cache_parent,
                                         req.token_slice(i * bs, (i + 1) * bs), req.cache_salt,
                                         hashes[i - 1] if i else None)
            req.cache_parent = -2 if canon is None else canon
        req.num_registered_blocks = num_full

    # ------------------------------------------------------------------ checks

    def check_integrity(self) -> list[str]:
        """Assert this worker's invariants; return the ids of its requests."""
        ids = []
        self.blocks.check_integrity([r.block_ids for r in self.running])
        keys = [(k, s) for k, s, _ in self.waiting]
        assert keys == sorted(keys), "waiting queue out of order"
        queued = sum(r.num_tokens - r.num_computed_tokens for _, _, r in self.waiting)
        assert queued == self.num_queued_tokens, "queued token count drifted"
        for req in self.running:
            assert req.status is RequestStatus.RUNNING and req.worker_id == self.worker_id
            assert req.block_ids, f"{req} runs without blocks"
            need = self.blocks.blocks_needed(req.num_computed_tokens, 0)
            assert len(req.block_ids) >= need, f"{req} holds too few blocks"
            assert req.num_computed_tokens < req.num_tokens, f"{req} has nothing to compute"
            ids.append(req.request_id)
        for _, _, req in self.waiting:
            assert req.status is RequestStatus.WAITING and req.worker_id == self.worker_id
            assert not req.block_ids and req.num_computed_tokens == 0, f"{req} waits holding KV"
            ids.append(req.request_id)
        return ids
