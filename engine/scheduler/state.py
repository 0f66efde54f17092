"""What the scheduler knows, and the bookkeeping every part of it shares.

``SchedulerState`` holds the requests, the live workers (``WorkerState``: queue, running set,
KV blocks, plan in flight), the requests waiting for any worker, and the counters; and the
moves every step and result uses: place a request on a worker, preempt one, finish one,
explain one. ``StepFiller`` (filling.py) builds steps on it and ``Scheduler`` (scheduler.py)
is the face the pool drives. Callers outside engine/scheduler read it through the public
methods here (``in_flight``, ``num_waiting``, ``stats``), never through ``workers``.

Finishing has one rule: ``_finish`` ends a request and returns its final output (no token);
the caller sends it, or queues it (``_end``) for ``drain_outputs`` when it decides inside
``schedule`` and has nothing to return.
"""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.messages import Explanation, PoolStats, RequestOutput, StepPlan
from engine.scheduler.block_manager import KVEvent
from engine.scheduler.placement import Placement, get_placement
from engine.scheduler.policy import Policy, get_policy
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.worker_state import WorkerState


class SchedulerState:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        block_size: int,
        max_model_len: int,
        policy: Policy | None = None,
        placement: Placement | None = None,
        kv_events: bool = False,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.policy = policy if policy is not None else get_policy(config.policy)
        self.placement = placement if placement is not None else get_placement(config.placement)
        self._policy_counts_service = type(self.policy).on_served is not Policy.on_served
        # Exclusive prefill across workers only where the workers share CPU cores: on
        # separate devices a paused worker would give nothing to the critical step.
        self._hold_across = (self.policy.exclusive_prefill_across_workers
                             and config.workers_share_cores == "yes")
        self.policy.outranked_limit(config.max_num_seqs)  # refuses a bad share now
        self.requests: dict[str, Request] = {}
        self.workers: dict[int, WorkerState] = {}
        self.unplaced: list[Request] = []  # waiting for any live worker
        self.num_preemptions = 0
        self._next_step_id = 0
        self._seq = 0  # tie-breaker keeping queue order stable; admission order
        self._outputs: list[RequestOutput] = []  # finishes decided inside schedule()
        self._prefix_query_tokens = 0  # over workers that came and went
        self._prefix_hit_tokens = 0
        # KV events (None: not recorded) of workers that left, until drained; a worker's
        # cache is empty when it joins and gone when it leaves: each says AllBlocksCleared.
        self._kv_events: list[tuple[int, list[KVEvent]]] | None = [] if kv_events else None

    # ------------------------------------------------------------------ queries

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self, worker_id: int) -> bool:
        ws = self.workers.get(worker_id)
        if ws is None or ws.in_flight is not None or not (ws.running or ws.waiting):
            return False
        held_by = ws.held_by  # until that plan ends, only an arrival could give it work
        if held_by is not None:
            holder = self.workers.get(held_by.worker_id)
            return holder is None or holder.in_flight is not held_by
        return True

    def in_flight(self, worker_id: int) -> StepPlan | None:
        """The plan ``worker_id`` is running (None: idle, or not a live worker)."""
        ws = self.workers.get(worker_id)
        return ws.in_flight if ws is not None else None

    def num_waiting(self, worker_id: int) -> int:
        """Requests queued on ``worker_id`` (0 for a worker not live)."""
        ws = self.workers.get(worker_id)
        return len(ws.waiting) if ws is not None else 0

    # ------------------------------------------------------------------ moves

    def _place(self, req: Request) -> None:
        if not self.workers:
            self.unplaced.append(req)
            return
        worker_id, scores = self.placement.choose(req, list(self.workers.values()))
        ws = self.workers[worker_id]
        req.worker_id = worker_id
        req.placement_scores = scores
        req.predicted_cached_tokens = ws.cached_prefix_tokens(req)
        self._seq += 1
        ws.enqueue(req, self.policy.queue_key(req), self._seq)

    def _reset_kv(self, req: Request) -> None:
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.cache_parent = -1
        req.status = RequestStatus.WAITING

    def _preempt(self, ws: WorkerState, req: Request) -> None:
        ws.release(req)
        self._reset_kv(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._place(req)

    def _finish(self, req: Request, reason: str, error: str = "") -> RequestOutput:
        """End a request, release its blocks and return its final output (no token)."""
        ws = self.workers.get(req.worker_id) if req.worker_id is not None else None
        if req.status is RequestStatus.RUNNING and ws is not None:
            ws.release(req)
        elif ws is not None:
            ws.unqueue(req)
        elif req in self.unplaced:
            self.unplaced.remove(req)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        return RequestOutput(request_id=req.request_id, new_token_ids=[], finish_reason=reason,
                             error=error)

    def _end(self, req: Request, reason: str, error: str = "") -> None:
        """``_finish`` inside ``schedule``: the output waits for ``drain_outputs``."""
        self._outputs.append(self._finish(req, reason, error))

    def _explain(self, req: Request, now: float) -> Explanation:
        start = req.first_scheduled_time if req.first_scheduled_time is not None else now
        return Explanation(
            worker_id=req.worker_id if req.worker_id is not None else -1,
            placement=self.placement.name,
            placement_scores=req.placement_scores,
            predicted_cached_tokens=req.predicted_cached_tokens,
            realized_cached_tokens=req.num_cached_tokens,
            queue_time_s=max(0.0, start - req.arrival_time),
            num_preemptions=req.num_preemptions,
        )

    # ------------------------------------------------------------------ observability

    def stats(self) -> PoolStats:
        workers = [self.workers[w] for w in sorted(self.workers)]
        return PoolStats(
            num_waiting=sum(len(ws.waiting) for ws in workers) + len(self.unplaced),
            num_running=sum(len(ws.running) for ws in workers),
            num_waiting_tokens=sum(ws.num_queued_tokens for ws in workers),
            kv_usage=[ws.blocks.usage for ws in workers],
            num_free_blocks=[ws.blocks.num_free_blocks for ws in workers],
            block_size=self.block_size,
            num_blocks=[ws.blocks.num_blocks for ws in workers],
            num_preemptions=self.num_preemptions,
            live_workers=len(workers),
            prefix_query_tokens=self._prefix_query_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
        )

    def check_integrity(self) -> None:
        """Assert every invariant of requests, queues and block pools."""
        seen: list[str] = []
        for ws in self.workers.values():
            seen += ws.check_integrity()
        for req in self.unplaced:
            assert req.status is RequestStatus.WAITING and not req.block_ids
            seen.append(req.request_id)
        assert len(seen) == len(set(seen)), "a request is queued twice"
        assert set(seen) == set(self.requests), "a request is lost"
