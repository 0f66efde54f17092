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

#: Seconds after a non-sheddable request's arrival during which ``--reserved-workers`` stay
#: free of sheddable ones (the frontend's latency guard holds as long:
#: ``engine.frontend.admission.PROTECT_WINDOW_S``).
RESERVE_WINDOW_S = 10.0


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
        self.reserved_workers = config.reserved_workers or 0  # None: unresolved, none
        self._reserve_until = -float("inf")  # the latest non-sheddable arrival + the window
        self._now = -float("inf")  # the latest time a caller gave (the scheduler has no clock)
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

    def outranked_in_flight(self, worker_id: int) -> list[int]:
        """When ``worker_id``'s step in flight computes the prompt of a request that holds
        the others back (``Policy.exclusive_prefill_across_workers``, where the workers share
        cores): the other workers whose steps in flight hold only requests it outranks. The
        pool pauses them until that step ends (engine/pool/suspend.py)."""
        ws = self.workers.get(worker_id)
        urgent = ws.in_flight_urgent if ws is not None and self._hold_across else None
        if urgent is None or ws is None or ws.in_flight is None:
            return []
        may_preempt = self.policy.may_preempt
        return [w for w, other in self.workers.items()
                if other is not ws and other.in_flight is not None and other.in_flight_requests
                and all(may_preempt(urgent, r) for r in other.in_flight_requests)]

    def reserved_ids(self) -> list[int]:
        """The workers kept free of sheddable requests now (``--reserved-workers``): the
        highest ids among the live workers, one at least left for sheddable work; none
        unless a non-sheddable request arrived within ``RESERVE_WINDOW_S``. A critical
        request placed on one finds no sheddable step in flight there to wait for."""
        k = min(self.reserved_workers, len(self.workers) - 1)
        if k <= 0 or self._now > self._reserve_until:
            return []
        return sorted(self.workers)[-k:]

    # ------------------------------------------------------------------ moves

    def _tick(self, now: float) -> None:
        """A caller's ``now``: the clock reservation runs by."""
        if now > self._now:
            self._now = now

    def _note_arrival(self, req: Request, now: float) -> None:
        """A non-sheddable arrival starts (or extends) the reservation; when it starts, the
        sheddable requests waiting on the reserved workers move to the others (running ones
        finish where they are)."""
        if req.priority < 0 or not self.reserved_workers:
            return
        starting = not self.reserved_ids()
        self._reserve_until = now + RESERVE_WINDOW_S
        if not starting:
            return
        reserved = self.reserved_ids()
        others = [ws for w, ws in self.workers.items() if w not in reserved]
        for w in reserved:
            ws = self.workers[w]
            for key, seq, moved in [e for e in ws.waiting if e[2].priority < 0]:
                ws.unqueue(moved)
                worker_id, moved.placement_scores = self.placement.choose(moved, others)
                to = self.workers[worker_id]
                moved.worker_id = worker_id
                moved.predicted_cached_tokens = to.cached_prefix_tokens(moved)
                to.enqueue(moved, key, seq)

    def _place(self, req: Request) -> None:
        if not self.workers:
            self.unplaced.append(req)
            return
        candidates = list(self.workers.values())
        if req.priority < 0 and self.reserved_workers:
            reserved = self.reserved_ids()
            if reserved:
                candidates = [ws for ws in candidates if ws.worker_id not in reserved]
        worker_id, scores = self.placement.choose(req, candidates)
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
            reserved_worker_ids=self.reserved_ids(),
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
