"""The global scheduler of one model pool: pure state, no sockets, no torch, no clock.

It owns every request and every worker's KV block table. The pool process calls it:

    add(request, now) / abort(ids, now)        from the frontend
    add_worker(id, num_blocks, now)            a worker said hello (start or restart)
    remove_worker(id, now)                     a worker died: its requests are re-placed
    schedule(worker_id, now) -> StepPlan       the next step for one idle worker
    update(plan, result, now) -> outputs       sampled tokens in; new tokens, finishes out
    drain_outputs() -> outputs                 finishes decided inside schedule() (rare)

Each worker has at most one plan in flight. A step for one worker:

1. priority preemption: if the policy allows, a waiting request that cannot be admitted takes
   the place of running requests of lower priority — only when freeing them is enough;
2. running requests, decodes before unfinished prefill chunks (a long prompt never stalls
   decodes); a request that needs a block when none is free preempts the policy's victim;
3. admission of waiting requests in policy order, each starting after its longest cached
   prefix, while the token budget, the sequence cap and the blocks allow (prompts are chunked
   to fit; nothing is admitted in a step whose decodes had to preempt).

A preempted request loses its blocks (its full blocks stay cached until evicted), is placed
again (it may move) and is recomputed later; its stream stays open and no token repeats.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from engine.config import SchedulerConfig
from engine.messages import (
    CachedRequestData,
    EngineRequest,
    Explanation,
    NewRequestData,
    PoolStats,
    RequestOutput,
    StepPlan,
    StepResult,
)
from engine.scheduler.block_manager import BlockManager
from engine.scheduler.placement import Placement, get_placement
from engine.scheduler.policy import Policy, get_policy
from engine.scheduler.request import Request, RequestStatus

Entry = tuple[tuple[float, ...], int, Request]  # (policy key, sequence, request)


class WorkerState:
    """One worker's queue, running set, KV blocks and in-flight plan."""

    def __init__(self, worker_id: int, num_blocks: int, block_size: int) -> None:
        self.worker_id = worker_id
        self.blocks = BlockManager(num_blocks, block_size)
        self.waiting: list[Entry] = []  # sorted by (key, sequence)
        self.running: list[Request] = []  # in admission order
        self.in_flight: StepPlan | None = None
        self.to_drop: list[str] = []  # ids the worker must forget in its next plan
        self.num_queued_tokens = 0  # uncomputed tokens of waiting requests

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
        """Prompt tokens of ``req`` this worker's cache holds now (full blocks)."""
        bs = self.blocks.block_size
        hashes = req.full_block_hashes(bs)
        max_blocks = (req.num_tokens - 1) // bs  # at least one token is always computed
        return len(self.blocks.match_prefix(hashes, req, req.cache_salt, max_blocks)) * bs


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        block_size: int,
        max_model_len: int,
        policy: Policy | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.policy = policy if policy is not None else get_policy(config.policy)
        self.placement = placement if placement is not None else get_placement(config.placement)
        self._policy_counts_service = type(self.policy).on_served is not Policy.on_served
        self.requests: dict[str, Request] = {}
        self.workers: dict[int, WorkerState] = {}
        self.unplaced: list[Request] = []  # waiting for any live worker
        self.num_preemptions = 0
        self._next_step_id = 0
        self._seq = 0  # tie-breaker keeping queue order stable; admission order
        self._outputs: list[RequestOutput] = []  # finishes decided inside schedule()
        self._prefix_query_tokens = 0  # over workers that came and went
        self._prefix_hit_tokens = 0

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker_id: int, num_blocks: int, now: float) -> None:
        if worker_id in self.workers:
            self.remove_worker(worker_id, now)
        self.workers[worker_id] = WorkerState(worker_id, num_blocks, self.block_size)
        pending, self.unplaced = self.unplaced, []
        for req in pending:
            self._place(req)

    def remove_worker(self, worker_id: int, now: float) -> list[str]:
        """Forget a dead worker; its requests lose their KV and queue elsewhere to be
        recomputed (their streams stay open). Returns the re-placed request ids."""
        ws = self.workers.pop(worker_id, None)
        if ws is None:
            return []
        moved = ws.running + [r for _, _, r in ws.waiting]
        for req in moved:
            self._reset_kv(req)
            req.worker_id = None
        for req in sorted(moved, key=self.policy.queue_key):
            self._place(req)
        return [r.request_id for r in moved]

    # ------------------------------------------------------------------ requests

    def add(self, request: EngineRequest, now: float) -> list[RequestOutput]:
        """Queue a request; returns an error output at once if it can never run."""
        rid = request.request_id
        if rid in self.requests:
            return [RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                  error=f"duplicate request id {rid!r}")]
        num_prompt = len(request.prompt_token_ids)
        error = ""
        if num_prompt == 0:
            error = "empty prompt"
        elif num_prompt >= self.max_model_len:
            error = f"prompt has {num_prompt} tokens; the model's context is {self.max_model_len}"
        elif self.workers and all(
            ws.blocks.blocks_needed(num_prompt + 1, 0) > ws.blocks.num_blocks
            for ws in self.workers.values()
        ):
            error = f"prompt of {num_prompt} tokens does not fit in any worker's KV cache"
        if error:
            return [RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                  num_prompt_tokens=num_prompt, error=error)]
        req = Request(request, self.max_model_len)
        self.requests[rid] = req
        self._place(req)
        return []

    def abort(self, request_ids: Iterable[str], now: float) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self._finish(req, "abort")
            outputs.append(RequestOutput(request_id=rid, new_token_ids=[], finish_reason="abort",
                                         explanation=self._explain(req, now)))
        return outputs

    def drain_outputs(self) -> list[RequestOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self, worker_id: int) -> bool:
        ws = self.workers.get(worker_id)
        return ws is not None and ws.in_flight is None and bool(ws.running or ws.waiting)

    # ------------------------------------------------------------------ steps

    def schedule(self, worker_id: int, now: float) -> StepPlan | None:
        """The next step for ``worker_id``, or None if it is busy or has nothing to run."""
        ws = self.workers.get(worker_id)
        if ws is None or ws.in_flight is not None or not (ws.running or ws.waiting):
            return None
        budget = self.config.max_num_batched_tokens
        max_seqs = self.config.max_num_seqs
        waiting = [r for _, _, r in ws.waiting]
        if self.policy.dynamic:
            waiting = self.policy.order(waiting, ws)
        if self.policy.preemptive and waiting and ws.running:
            self._preempt_for_waiting(ws, waiting)

        # 2. Running requests: decodes first, then unfinished prefill chunks.
        cached: list[CachedRequestData] = []
        scheduled: set[str] = set()
        preempted = False
        bs = self.block_size
        decodes: list[Request] = []
        chunks: list[Request] = []
        for r in ws.running:
            (decodes if r.num_computed_tokens + 1 >= r.num_tokens else chunks).append(r)
        for req in decodes + chunks if chunks else decodes:
            if budget <= 0 or len(scheduled) >= max_seqs:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted by an earlier request of this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            grown: list[int] = []  # most steps fit in the blocks the request holds
            if req.num_computed_tokens + n > len(req.block_ids) * bs:
                maybe = self._grow(ws, req, n, scheduled)
                if maybe is None:
                    preempted = True
                    continue
                grown = maybe
            cached.append(CachedRequestData(request_id=req.request_id, num_scheduled_tokens=n,
                                            new_block_ids=grown))
            scheduled.add(req.request_id)
            budget -= n

        # 3. Waiting requests, in policy order, while budget, sequence cap and blocks allow.
        new: list[NewRequestData] = []
        if not preempted:
            for req in waiting:
                if budget <= 0 or len(scheduled) >= max_seqs:
                    break
                if req.status is not RequestStatus.WAITING or req.worker_id != ws.worker_id:
                    continue  # re-placed by a preemption of this step
                data = self._admit(ws, req, budget, now)
                if data is None:
                    if req.request_id not in self.requests:
                        continue  # could never fit: failed, the next one may
                    break
                new.append(data)
                scheduled.add(req.request_id)
                budget -= data.num_scheduled_tokens

        if not scheduled:
            return None
        plan = StepPlan(step_id=self._next_step_id, worker_id=worker_id, new_requests=new,
                        cached_requests=cached, finished_request_ids=ws.to_drop)
        self._next_step_id += 1
        ws.to_drop = []
        ws.in_flight = plan
        return plan

    def update(self, plan: StepPlan, result: StepResult, now: float) -> list[RequestOutput]:
        """Apply a worker's result to the plan it answers; stale results are ignored."""
        ws = self.workers.get(plan.worker_id)
        if ws is None or ws.in_flight is not plan or result.step_id != plan.step_id:
            return []
        ws.in_flight = None
        # Hot path: one pass per scheduled request, one per sampled token; locals bound once.
        bs = self.block_size
        get = self.requests.get
        running = RequestStatus.RUNNING
        wid = ws.worker_id
        served = self.policy.on_served if self._policy_counts_service else None
        for items in (plan.new_requests, plan.cached_requests):
            for item in items:
                req = get(item.request_id)
                if req is None or req.status is not running or req.worker_id != wid:
                    continue  # aborted while the step ran
                before = req.num_computed_tokens
                req.num_computed_tokens = computed = before + item.num_scheduled_tokens
                if computed // bs > req.num_registered_blocks:
                    self._register_blocks(ws, req)
                if served is not None and before < req.num_prompt_tokens:
                    served(req, min(computed, req.num_prompt_tokens) - before, 0)
        outputs: list[RequestOutput] = []
        logprobs = result.logprobs
        for i, (rid, token) in enumerate(zip(result.request_ids, result.token_ids, strict=True)):
            req = get(rid)
            if req is None or req.status is not running or req.worker_id != wid:
                continue
            first = not req.output_token_ids
            reason = req.append_output(token)
            if served is not None:
                served(req, 0, 1)
            out = RequestOutput(
                request_id=rid,
                new_token_ids=[token],
                finish_reason=reason,
                num_prompt_tokens=req.num_prompt_tokens if first else 0,
                num_cached_tokens=req.num_cached_tokens if first else 0,
                logprobs=None if logprobs is None else [logprobs[i]],
            )
            if reason is not None:
                self._finish(req, reason)
                out.explanation = self._explain(req, now)
            outputs.append(out)
        return outputs

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        """A worker raised while running ``plan``: its requests end with an error."""
        ws = self.workers.get(plan.worker_id)
        if ws is None or ws.in_flight is not plan:
            return []
        ws.in_flight = None
        outputs = []
        for rid, _ in plan.scheduled():
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, "error")
                outputs.append(RequestOutput(request_id=rid, new_token_ids=[],
                                             finish_reason="error", error=message))
        return outputs

    # ------------------------------------------------------------------ admission

    def _admit(self, ws: WorkerState, req: Request, budget: int, now: float) -> NewRequestData | None:
        """Admit ``req`` after its cached prefix if the blocks for its first chunk are free."""
        blocks = ws.blocks
        bs = self.block_size
        if blocks.blocks_needed(req.num_tokens + 1, 0) > blocks.num_blocks:
            self._finish(req, "error", f"{req.num_tokens} tokens do not fit in the worker's "
                         f"KV cache of {blocks.num_blocks} blocks")
            return None
        hit = blocks.match_prefix(req.full_block_hashes(bs), req, req.cache_salt,
                                  (req.num_tokens - 1) // bs)
        num_hit = len(hit) * bs
        n = min(req.num_tokens - num_hit, budget)
        need = blocks.blocks_needed(num_hit + n, len(hit))
        if not blocks.can_allocate(need + blocks.num_unreferenced(hit)):
            return None
        self._unqueue(ws, req)
        blocks.acquire(hit)
        req.block_ids = hit + blocks.allocate(need)
        req.num_computed_tokens = num_hit
        req.num_registered_blocks = len(hit)
        req.cache_parent = hit[-1] if hit else -1
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
            req.num_cached_tokens = num_hit
            self._prefix_query_tokens += req.num_prompt_tokens
            self._prefix_hit_tokens += num_hit
        req.status = RequestStatus.RUNNING
        self._seq += 1
        req.admitted_seq = self._seq
        ws.running.append(req)
        return NewRequestData(
            request_id=req.request_id,
            token_ids=req.all_token_ids(),
            sampling=req.sampling,
            block_ids=list(req.block_ids),
            num_computed_tokens=num_hit,
            num_scheduled_tokens=n,
            num_output_tokens=len(req.output_token_ids),
        )

    def _preempt_for_waiting(self, ws: WorkerState, waiting: list[Request]) -> None:
        """Make room for waiting requests that outrank running ones (policy permitting).

        Only when the victims' blocks plus the free ones are enough for the waiting request's
        first chunk is anything preempted: never a preemption that cannot help.
        """
        blocks = ws.blocks
        bs = self.block_size
        reserved_blocks = 0
        reserved_seqs = 0
        budget = self.config.max_num_batched_tokens
        for head in waiting:
            if head.status is not RequestStatus.WAITING:
                continue
            hit = blocks.match_prefix(head.full_block_hashes(bs), head, head.cache_salt,
                                      (head.num_tokens - 1) // bs)
            n = min(head.num_tokens - len(hit) * bs, budget)
            need = blocks.blocks_needed(len(hit) * bs + n, len(hit)) + reserved_blocks
            seqs = len(ws.running) + reserved_seqs + 1
            if blocks.can_allocate(need) and seqs <= self.config.max_num_seqs:
                reserved_blocks = need
                reserved_seqs += 1
                continue
            victims = sorted((r for r in ws.running if self.policy.may_preempt(head, r)),
                             key=self.policy.victim_key)
            freeable = sum(blocks.num_sole_owner(v.block_ids) for v in victims)
            if not victims or blocks.num_free_blocks + freeable < need:
                return  # preempting could not admit it: leave everything running
            for victim in victims:
                if blocks.can_allocate(need) and len(ws.running) + reserved_seqs < self.config.max_num_seqs:
                    break
                self._preempt(ws, victim)
            reserved_blocks = need
            reserved_seqs += 1

    def _grow(self, ws: WorkerState, req: Request, n: int, scheduled: set[str]) -> list[int] | None:
        """Allocate the blocks ``req`` needs for ``n`` more tokens, preempting victims that
        are not yet in this step. Returns the new block ids, or None if ``req`` itself had
        to be preempted (or, alone on the worker, ran out of KV and was finished)."""
        need = ws.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        if need == 0:
            return []
        while not ws.blocks.can_allocate(need):
            candidates = [r for r in ws.running if r.request_id not in scheduled]
            victim = min(candidates, key=self.policy.victim_key)
            if victim is req and len(ws.running) == 1:
                # Alone on the worker and out of blocks: the whole cache cannot hold it.
                self._finish(req, "length", "")
                return None
            self._preempt(ws, victim)
            if victim is req:
                return None
        new_block_ids = ws.blocks.allocate(need)
        req.block_ids.extend(new_block_ids)
        return new_block_ids

    def _register_blocks(self, ws: WorkerState, req: Request) -> None:
        """Cache the request's blocks that became full and computed in this step."""
        bs = self.block_size
        num_full = req.num_computed_tokens // bs
        hashes = req.full_block_hashes(bs)
        for i in range(req.num_registered_blocks, num_full):
            if req.cache_parent == -2:
                break
            canon = ws.blocks.register(req.block_ids[i], hashes[i], req.cache_parent,
                                       req.token_slice(i * bs, (i + 1) * bs), req.cache_salt)
            req.cache_parent = -2 if canon is None else canon
        req.num_registered_blocks = num_full

    # ------------------------------------------------------------------ internals

    def _place(self, req: Request) -> None:
        if not self.workers:
            self.unplaced.append(req)
            return
        worker_id, scores = self.placement.choose(req, list(self.workers.values()))
        ws = self.workers[worker_id]
        req.worker_id = worker_id
        req.placement_scores = scores
        req.predicted_cached_tokens = ws.cached_prefix_tokens(req)
        self._enqueue(ws, req)

    def _enqueue(self, ws: WorkerState, req: Request) -> None:
        self._seq += 1
        bisect.insort(ws.waiting, (self.policy.queue_key(req), self._seq, req))
        ws.num_queued_tokens += req.num_tokens - req.num_computed_tokens

    def _unqueue(self, ws: WorkerState, req: Request) -> None:
        for i, entry in enumerate(ws.waiting):
            if entry[2] is req:
                del ws.waiting[i]
                ws.num_queued_tokens -= req.num_tokens - req.num_computed_tokens
                return
        raise AssertionError(f"{req} is not queued on worker {ws.worker_id}")

    def _reset_kv(self, req: Request) -> None:
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.cache_parent = -1
        req.status = RequestStatus.WAITING

    def _preempt(self, ws: WorkerState, req: Request) -> None:
        ws.blocks.free(req.block_ids)
        ws.running.remove(req)
        ws.to_drop.append(req.request_id)
        self._reset_kv(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._place(req)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request and release its blocks. With ``error`` given (even empty) the
        caller has no output to return, so one is queued for ``drain_outputs``."""
        if error is not None:
            self._outputs.append(RequestOutput(request_id=req.request_id, new_token_ids=[],
                                               finish_reason=reason, error=error))
        ws = self.workers.get(req.worker_id) if req.worker_id is not None else None
        if req.status is RequestStatus.RUNNING and ws is not None:
            ws.blocks.free(req.block_ids)
            ws.running.remove(req)
            ws.to_drop.append(req.request_id)
        elif ws is not None:
            self._unqueue(ws, req)
        elif req in self.unplaced:
            self.unplaced.remove(req)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

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
            num_preemptions=self.num_preemptions,
            live_workers=len(workers),
            prefix_query_tokens=self._prefix_query_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
        )

    def check_integrity(self) -> None:
        """Assert every invariant of requests, queues and block pools."""
        seen: set[str] = set()
        for ws in self.workers.values():
            ws.blocks.check_integrity([r.block_ids for r in ws.running])
            keys = [(k, s) for k, s, _ in ws.waiting]
            assert keys == sorted(keys), "waiting queue out of order"
            queued = sum(r.num_tokens - r.num_computed_tokens for _, _, r in ws.waiting)
            assert queued == ws.num_queued_tokens, "queued token count drifted"
            for req in ws.running:
                assert req.status is RequestStatus.RUNNING and req.worker_id == ws.worker_id
                assert req.block_ids, f"{req} runs without blocks"
                need = ws.blocks.blocks_needed(req.num_computed_tokens, 0)
                assert len(req.block_ids) >= need, f"{req} holds too few blocks"
                assert req.num_computed_tokens < req.num_tokens, f"{req} has nothing to compute"
                seen.add(req.request_id)
            for _, _, req in ws.waiting:
                assert req.status is RequestStatus.WAITING and req.worker_id == ws.worker_id
                assert not req.block_ids and req.num_computed_tokens == 0, f"{req} waits holding KV"
                seen.add(req.request_id)
        for req in self.unplaced:
            assert req.status is RequestStatus.WAITING and not req.block_ids
            seen.add(req.request_id)
        assert seen == set(self.requests), "a request is lost or queued twice"
