"""The global scheduler of one model pool: pure state, no sockets, no torch, no clock.

It owns every request and every worker's KV block table. The pool process calls it:

    add(request, now) / abort(ids, now)        from the frontend
    add_worker(id, num_blocks, now)            a worker said hello (start or restart)
    remove_worker(id, now)                     a worker died: its requests are re-placed
    schedule(worker_id, now) -> StepPlan       the next step for one idle worker
    update(plan, result, now) -> outputs       sampled tokens in; new tokens, finishes out
    drain_outputs() -> outputs                 finishes decided inside schedule() (rare)

Each worker has at most one plan in flight. A step packs running requests first (decodes
before prefill chunks, so a long prompt never stalls decodes), then admits waiting requests,
chunking prompts to fit one token budget and a sequence cap. When blocks run out the policy's
victim is preempted: its blocks are freed and it is recomputed later, its stream untouched.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from engine.config import SchedulerConfig
from engine.messages import (
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    PoolStats,
    RequestOutput,
    StepPlan,
    StepResult,
)
from engine.scheduler.block_manager import BlockManager
from engine.scheduler.policy import Policy, get_policy
from engine.scheduler.request import Request, RequestStatus


class WorkerState:
    """One worker's queue, running set, KV blocks and in-flight plan."""

    def __init__(self, worker_id: int, num_blocks: int, block_size: int) -> None:
        self.worker_id = worker_id
        self.blocks = BlockManager(num_blocks, block_size)
        self.waiting: list[tuple[tuple[float, ...], int, Request]] = []  # sorted by key
        self.running: list[Request] = []  # in admission order
        self.in_flight: StepPlan | None = None
        self.to_drop: list[str] = []  # ids the worker must forget in its next plan

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(r.num_uncomputed_tokens for _, _, r in self.waiting)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        block_size: int,
        max_model_len: int,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.policy = policy if policy is not None else get_policy(config.policy)
        self.requests: dict[str, Request] = {}
        self.workers: dict[int, WorkerState] = {}
        self.unplaced: list[Request] = []  # waiting for any live worker
        self.num_preemptions = 0
        self._next_step_id = 0
        self._seq = 0  # tie-breaker keeping queue order stable
        self._outputs: list[RequestOutput] = []  # finishes decided inside schedule()

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
            req.block_ids = []
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
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
        req = Request(request)
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
            outputs.append(RequestOutput(request_id=rid, new_token_ids=[], finish_reason="abort"))
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
        if ws is None or ws.in_flight is not None:
            return None
        budget = self.config.max_num_batched_tokens
        max_seqs = self.config.max_num_seqs
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        preempted = False

        # Running requests: decodes first, then unfinished prefill chunks.
        order = [r for r in ws.running if r.num_uncomputed_tokens <= 1]
        order += [r for r in ws.running if r.num_uncomputed_tokens > 1]
        scheduled: set[str] = set()
        for req in order:
            if budget <= 0 or len(scheduled) >= max_seqs:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted by an earlier request of this loop
            n = min(req.num_uncomputed_tokens, budget)
            new_block_ids = self._grow(ws, req, n, scheduled)
            if new_block_ids is None:
                preempted = True
                continue
            cached.append(CachedRequestData(request_id=req.request_id, num_scheduled_tokens=n,
                                            new_block_ids=new_block_ids))
            scheduled.add(req.request_id)
            budget -= n

        # Waiting requests, in policy order, while budget, sequence cap and blocks allow.
        # Nothing is admitted in a step that had to preempt: that would thrash.
        while not preempted and ws.waiting and budget > 0 and len(scheduled) < max_seqs:
            req = ws.waiting[0][2]
            if ws.blocks.blocks_needed(req.num_tokens + 1, 0) > ws.blocks.num_blocks:
                self._finish(req, "error", f"{req.num_tokens} tokens do not fit in the worker's "
                             f"KV cache of {ws.blocks.num_blocks} blocks")
                continue
            n = min(req.num_uncomputed_tokens, budget)
            need = ws.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
            if not ws.blocks.can_allocate(need):
                break
            ws.waiting.pop(0)
            req.block_ids = ws.blocks.allocate(need)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            ws.running.append(req)
            new.append(NewRequestData(
                request_id=req.request_id,
                token_ids=req.all_token_ids(),
                sampling=req.sampling,
                block_ids=list(req.block_ids),
                num_computed_tokens=req.num_computed_tokens,
                num_scheduled_tokens=n,
                num_output_tokens=len(req.output_token_ids),
            ))
            scheduled.add(req.request_id)
            budget -= n

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
        for rid, n in plan.scheduled():
            req = self.requests.get(rid)
            if req is not None and req.status is RequestStatus.RUNNING and req.worker_id == ws.worker_id:
                req.num_computed_tokens += n
        outputs: list[RequestOutput] = []
        logprobs = result.logprobs
        for i, (rid, token) in enumerate(zip(result.request_ids, result.token_ids, strict=True)):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING or req.worker_id != ws.worker_id:
                continue  # aborted while the step ran
            first = not req.output_token_ids
            req.output_token_ids.append(token)
            reason = req.stop_reason(token, self.max_model_len)
            outputs.append(RequestOutput(
                request_id=rid,
                new_token_ids=[token],
                finish_reason=reason,
                num_prompt_tokens=req.num_prompt_tokens if first else 0,
                num_cached_tokens=req.num_cached_tokens if first else 0,
                logprobs=[logprobs[i]] if logprobs is not None else None,
            ))
            if reason is not None:
                self._finish(req, reason)
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

    # ------------------------------------------------------------------ internals

    def _place(self, req: Request) -> None:
        if not self.workers:
            self.unplaced.append(req)
            return
        ws = self.workers[self.policy.place(req, list(self.workers.values()))]
        req.worker_id = ws.worker_id
        self._seq += 1
        bisect.insort(ws.waiting, (self.policy.queue_key(req), self._seq, req))

    def _grow(self, ws: WorkerState, req: Request, n: int, scheduled: set[str]) -> list[int] | None:
        """Allocate the blocks ``req`` needs for ``n`` more tokens, preempting victims that
        are not yet in this step. Returns the new block ids, or None if ``req`` itself had
        to be preempted (or, alone on the worker, ran out of KV and was finished)."""
        need = ws.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        while not ws.blocks.can_allocate(need):
            candidates = [r for r in ws.running if r.request_id not in scheduled]
            victim = self.policy.choose_victim(candidates)
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

    def _preempt(self, ws: WorkerState, req: Request) -> None:
        ws.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        ws.running.remove(req)
        ws.to_drop.append(req.request_id)
        self._seq += 1
        bisect.insort(ws.waiting, (self.policy.queue_key(req), self._seq, req))

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
            ws.waiting = [e for e in ws.waiting if e[2] is not req]
        elif req in self.unplaced:
            self.unplaced.remove(req)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

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
        )

    def check_integrity(self) -> None:
        """Assert every invariant of requests, queues and block pools."""
        seen: set[str] = set()
        for ws in self.workers.values():
            ws.blocks.check_integrity([r.block_ids for r in ws.running])
            keys = [(k, s) for k, s, _ in ws.waiting]
            assert keys == sorted(keys), "waiting queue out of order"
            for req in ws.running:
                assert req.status is RequestStatus.RUNNING and req.worker_id == ws.worker_id
                assert req.block_ids, f"{req} runs without blocks"
                need = ws.blocks.blocks_needed(req.num_computed_tokens, 0)
                assert len(req.block_ids) >= need, f"{req} holds too few blocks"
                seen.add(req.request_id)
            for _, _, req in ws.waiting:
                assert req.status is RequestStatus.WAITING and req.worker_id == ws.worker_id
                assert not req.block_ids and req.num_computed_tokens == 0, f"{req} waits holding KV"
                seen.add(req.request_id)
        for req in self.unplaced:
            assert req.status is RequestStatus.WAITING and not req.block_ids
            seen.add(req.request_id)
        assert seen == set(self.requests), "a request is lost or queued twice"
