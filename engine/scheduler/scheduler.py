"""The global scheduler of one model pool: pure state, no sockets, no torch, no clock.

It owns every request and every worker's KV block table. The pool process calls it:

    add(request, now) / abort(ids, now)        from the frontend
    add_worker(id, num_blocks, now, inc)       a worker said hello (start or restart)
    remove_worker(id, now)                     a worker died: its requests are re-placed
    schedule(worker_id, now) -> StepPlan       the next step for one idle worker
    update(plan, result, now) -> outputs       sampled tokens in; new tokens, finishes out
    drain_outputs() -> outputs                 finishes decided inside schedule() (rare)
    drain_kv_events() -> [(worker id, events)] with ``kv_events``: prefix-cache changes

Each worker has at most one plan in flight, addressed to the worker's incarnation (its
restart count, given by ``add_worker``); a result counts only if it answers that plan, from
that incarnation. Which incarnation is current is the pool's call (engine/pool/service.py).
A step for one worker:

1. priority preemption: if the policy allows, a waiting request that cannot be admitted takes
   the place of running requests of lower priority — only when freeing them is enough;
2. running requests, decodes before unfinished prefill chunks (a long prompt never stalls
   decodes); a request that needs a block when none is free preempts the policy's victim;
3. admission of waiting requests in policy order, each starting after its longest cached
   prefix, while the token budget, the sequence cap and the blocks allow (prompts are chunked
   to fit; nothing is admitted in a step whose decodes had to preempt).

With a policy that has ``exclusive_prefill`` (``priority``), a step in which a request computes
prompt tokens leaves out the requests that request outranks (they keep their blocks and run
in the next step), so the step is short and the important request's first token comes soon.
With ``outranked_seq_share`` (``priority``: 0.45), while a request is on a worker, the requests
it outranks are admitted only up to that share of ``max_num_seqs``: the batch keeps room for
the higher class, and its steps stay short.

A preempted request loses its blocks (its full blocks stay cached until evicted), is placed
again (it may move) and is recomputed later; its stream stays open and no token repeats.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

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
from engine.scheduler.block_manager import KV_CLEARED, KVEvent
from engine.scheduler.placement import Placement, get_placement
from engine.scheduler.policy import Policy, get_policy
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.worker_state import WorkerState


class Scheduler:
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
        share = self.policy.outranked_seq_share
        if share is not None and not 0.0 < share <= 1.0:
            raise ValueError(f"--policy: {self.policy.name}: outranked_seq_share must be in "
                             f"(0, 1], got {share}")
        # Sequences the requests outranked by a worker's top request may hold (None: all).
        self._outranked_max_seqs = (None if share is None
                                    else max(1, int(share * config.max_num_seqs)))
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

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker_id: int, num_blocks: int, now: float,
                   incarnation: int = 0) -> None:
        """A worker (``incarnation`` of it) is up with an empty cache; one of the same id
        still known is replaced, its requests re-placed."""
        if worker_id in self.workers:
            self.remove_worker(worker_id, now)
        ws = WorkerState(worker_id, num_blocks, self.block_size, incarnation,
                         self._kv_events is not None)
        if ws.blocks.events is not None:
            ws.blocks.events.append((KV_CLEARED,))
        self.workers[worker_id] = ws
        pending, self.unplaced = self.unplaced, []
        for req in pending:
            self._place(req)

    def remove_worker(self, worker_id: int, now: float) -> list[str]:
        """Forget a dead worker; its requests lose their KV and queue elsewhere to be
        recomputed (their streams stay open). Returns the re-placed request ids."""
        ws = self.workers.pop(worker_id, None)
        if ws is None:
            return []
        if self._kv_events is not None and ws.blocks.events is not None:
            self._kv_events.append((worker_id, [*ws.blocks.events, (KV_CLEARED,)]))
        moved = ws.running + [r for _, _, r in ws.waiting]
        for req in moved:
            self._reset_kv(req)
            req.worker_id = None
        for req in sorted(moved, key=self.policy.queue_key):
            self._place(req)
        return [r.request_id for r in moved]

    # ------------------------------------------------------------------ requests

    def add(self, request: EngineRequest, now: float) -> list[RequestOutput]:
        """Queue a request; returns an error output at once if it can never run.

        A continuation (``request.output_token_ids``: resubmitted after its pool died) is
        queued as a preempted request with those outputs; one whose outputs already end it
        finishes at once, with no new token."""
        rid = request.request_id
        if rid in self.requests:
            return [RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                  error=f"duplicate request id {rid!r}")]
        num_prompt = len(request.prompt_token_ids)
        num_known = num_prompt + len(request.output_token_ids)
        error = ""
        if num_prompt == 0:
            error = "empty prompt"
        elif num_prompt >= self.max_model_len:
            error = f"prompt has {num_prompt} tokens; the model's context is {self.max_model_len}"
        elif num_known > self.max_model_len:
            error = (f"prompt and outputs have {num_known} tokens; the model's context is "
                     f"{self.max_model_len}")
        elif self.workers and all(
            ws.blocks.blocks_needed(num_known + 1, 0) > ws.blocks.num_blocks
            for ws in self.workers.values()
        ):
            error = f"prompt of {num_known} tokens does not fit in any worker's KV cache"
        if error:
            return [RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                  num_prompt_tokens=num_prompt, error=error)]
        req = Request(request, self.max_model_len)
        reason = req.finished_by_outputs()
        if reason is not None:
            return [RequestOutput(request_id=rid, new_token_ids=[], finish_reason=reason,
                                  num_prompt_tokens=num_prompt)]
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

    def drain_kv_events(self) -> list[tuple[int, list[KVEvent]]]:
        """The KV events recorded since the last drain, per worker id in the order they
        happened (empty unless built with ``kv_events``)."""
        if self._kv_events is None:
            return []
        out, self._kv_events = self._kv_events, []
        for w, ws in self.workers.items():
            events = ws.blocks.events
            if events:
                out.append((w, events))
                ws.blocks.events = []
        return out

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
        waiting: list[Request] = []
        if ws.waiting:
            waiting = [r for _, _, r in ws.waiting]
            if self.policy.dynamic:
                waiting = self.policy.order(waiting, ws)
            if self.policy.preemptive and ws.running:  # 1. priority preemption
                self._preempt_for_waiting(ws, waiting)
        running = tuple(ws.running)  # a copy: scheduling may preempt requests
        deferred: list[Request] = []
        urgent = self._urgent(ws, waiting) if self.policy.exclusive_prefill else None
        if urgent is not None:
            may_preempt = self.policy.may_preempt
            kept: list[Request] = []
            for r in running:
                (deferred if may_preempt(urgent, r) else kept).append(r)
            running = tuple(kept)
        # The step being built: deltas of running requests and new ones, in plan order.
        cached: list[CachedRequestData] = []
        scheduled: list[Request] = []  # the requests of ``cached``
        new: list[NewRequestData] = []
        admitted: list[Request] = []  # the requests of ``new``
        # 2. running requests, 3. waiting ones (nothing new after a preemption: no thrash).
        budget, ok = self._schedule_running(ws, running, self.config.max_num_batched_tokens,
                                            cached, scheduled, admitted)
        if ok and waiting:
            budget = self._admit_waiting(ws, waiting, budget, new, admitted, len(scheduled),
                                         now, urgent)
        if deferred and urgent not in scheduled and urgent not in admitted:
            # Nothing outranked them after all.
            self._schedule_running(ws, deferred, budget, cached, scheduled, admitted)
        if not scheduled and not admitted:
            return None
        plan = StepPlan(step_id=self._next_step_id, worker_id=worker_id,
                        incarnation=ws.incarnation, new_requests=new, cached_requests=cached,
                        finished_request_ids=ws.to_drop)
        self._next_step_id += 1
        ws.to_drop = []
        ws.in_flight = plan
        ws.in_flight_requests = admitted + scheduled if admitted else scheduled
        return plan

    def _schedule_running(self, ws: WorkerState, requests: Iterable[Request], budget: int,
                          cached: list[CachedRequestData], scheduled: list[Request],
                          admitted: list[Request]) -> tuple[int, bool]:
        """Add running ``requests`` to the step (``cached``, ``scheduled``; ``admitted`` holds
        its new requests): decodes first, then unfinished prefill chunks, so a long prompt
        never stalls decodes. Returns the budget left, and False if a request needing a
        block had to preempt.

        The loop runs once per running request per step, so the common decode (one token,
        within the blocks it holds) costs a few attribute reads and reuses the request's
        fixed delta."""
        running = RequestStatus.RUNNING
        bs = self.block_size
        chunks: list[Request] = []
        ok = True
        max_seqs = self.config.max_num_seqs - len(admitted)
        room = min(budget, max_seqs - len(scheduled))  # a decode: one token, one sequence
        num_decodes = 0
        for req in requests:
            computed = req.num_computed_tokens
            if computed + 1 < req.num_tokens:
                chunks.append(req)
                continue
            if num_decodes >= room:
                break
            if req.status is not running:
                continue  # preempted by an earlier request of this loop
            if computed < len(req.block_ids) * bs:
                cached.append(req.decode_delta)
            else:
                delta = self._continue(ws, req, 1, scheduled, admitted)
                if delta is None:
                    ok = False
                    continue
                cached.append(delta)
            scheduled.append(req)
            num_decodes += 1
        budget -= num_decodes
        for req in chunks:
            if budget <= 0 or len(scheduled) >= max_seqs:
                break
            if req.status is not running:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            delta = self._continue(ws, req, n, scheduled, admitted)
            if delta is None:
                ok = False
                continue
            cached.append(delta)
            scheduled.append(req)
            budget -= n
        return budget, ok

    def _admit_waiting(self, ws: WorkerState, waiting: list[Request], budget: int,
                       new: list[NewRequestData], admitted: list[Request], num_running: int,
                       now: float, urgent: Request | None) -> int:
        """Admit waiting requests in policy order while budget, sequence cap (``num_running``
        are in the step already) and blocks allow, none that ``urgent`` outranks (see
        ``_urgent``), and, with the policy's ``outranked_seq_share``, none beyond the
        sequences allowed to the requests that the worker's top request outranks (see
        ``_outranked_seats``). Returns the budget left."""
        max_seqs = self.config.max_num_seqs - num_running
        may_preempt = self.policy.may_preempt
        limit = self._outranked_max_seqs
        top: Request | None = None
        seats = 0  # outranked requests that may still join (with ``limit``, once ``top`` is known)
        for req in waiting:
            if budget <= 0 or len(admitted) >= max_seqs:
                break
            if req.status is not RequestStatus.WAITING or req.worker_id != ws.worker_id:
                continue  # re-placed by a preemption of this step
            if urgent is not None and may_preempt(urgent, req):
                break
            outranked = False
            if limit is not None:
                if top is None:  # once per step, and only when something could be admitted
                    top, seats = self._outranked_seats(ws, req, limit)
                outranked = may_preempt(top, req)
                if outranked and seats <= 0:
                    break
            data = self._admit(ws, req, budget, now)
            if data is None:
                if req.request_id not in self.requests:
                    continue  # could never fit: failed, the next one may
                break
            new.append(data)
            admitted.append(req)
            budget -= data.num_scheduled_tokens
            if outranked:
                seats -= 1
        return budget

    def _outranked_seats(self, ws: WorkerState, head: Request, limit: int) -> tuple[Request, int]:
        """The worker's top request by the policy's queue key (running, or ``head``: the
        first waiting request that could be admitted) and how many more of the requests it
        outranks may join the batch: ``limit`` less those running (deferred ones included)."""
        key = self.policy.queue_key
        top = min(ws.running, key=key, default=head)
        if key(head) < key(top):
            top = head
        may_preempt = self.policy.may_preempt
        return top, limit - sum(1 for r in ws.running if may_preempt(top, r))

    def _urgent(self, ws: WorkerState, waiting: list[Request]) -> Request | None:
        """For policies with ``exclusive_prefill``: of the requests with prompt tokens to
        compute in this step (running chunks and the next waiting request), the first by the
        policy's queue key. The running requests it may preempt sit the step out, keeping their
        blocks, and so do waiting ones: the step holds only work it does not outrank and is
        as short as it can be, so the urgent request's first token comes sooner."""
        candidates = [r for r in ws.running if r.num_computed_tokens + 1 < r.num_tokens]
        for req in waiting:
            if req.status is RequestStatus.WAITING and req.worker_id == ws.worker_id:
                candidates.append(req)
                break
        return min(candidates, key=self.policy.queue_key) if candidates else None

    def update(self, plan: StepPlan, result: StepResult, now: float) -> list[RequestOutput]:
        """Apply a worker's result to the plan it answers; stale results (another step, or
        another incarnation of the worker) are ignored."""
        ws = self.workers.get(plan.worker_id)
        if (ws is None or ws.in_flight is not plan or result.step_id != plan.step_id
                or result.incarnation != plan.incarnation):
            return []
        ws.in_flight = None
        reqs, ws.in_flight_requests = ws.in_flight_requests, []
        # Hot path: one pass per scheduled request, one per sampled token; locals bound once.
        # The plan's requests are known by object (``in_flight_requests``), so the common
        # case needs no lookup by id.
        bs = self.block_size
        running = RequestStatus.RUNNING
        served = self.policy.on_served if self._policy_counts_service else None
        items: list[NewRequestData | CachedRequestData] = [*plan.new_requests,
                                                           *plan.cached_requests]
        sampling: list[Request | None] = []  # requests whose every known token is now computed
        for req, item in zip(reqs, items, strict=True):
            if req.status is not running:
                continue  # aborted while the step ran
            before = req.num_computed_tokens
            req.num_computed_tokens = computed = before + item.num_scheduled_tokens
            if computed // bs > req.num_registered_blocks:
                ws.register_blocks(req)
            if computed == req.num_tokens:
                sampling.append(req)
            if served is not None and before < req.num_prompt_tokens:
                served(req, min(computed, req.num_prompt_tokens) - before, 0)
        outputs: list[RequestOutput] = []
        if result.prompt_logprobs:  # before the tokens: every position precedes the first
            outputs = self._prompt_logprobs(ws.worker_id, result)
        rids = result.request_ids
        logprobs = result.logprobs
        if len(sampling) != len(rids):  # tokens of aborted requests, or a worker's own order
            sampling = [None] * len(rids)
        get = self.requests.get
        wid = ws.worker_id
        ended = result.grammar_ended_ids
        for i, (expected, rid, token) in enumerate(zip(sampling, rids, result.token_ids,
                                                       strict=True)):
            if expected is not None and expected.request_id == rid:
                req = expected
            else:  # not in plan order: look it up
                found = get(rid)
                if found is None or found.status is not running or found.worker_id != wid:
                    continue
                req = found
            if req.sampling.max_tokens == 0:  # prefill only: the token sampled is dropped
                outputs.append(self._finish_prefill_only(req, now))
                continue
            first = not req.output_token_ids
            reason = req.append_output(token)
            if ended and rid in ended:
                reason = "stop"
            if served is not None:
                served(req, 0, 1)
            if first:
                out = RequestOutput(request_id=rid, new_token_ids=[token],
                                    num_prompt_tokens=req.num_prompt_tokens,
                                    num_cached_tokens=req.num_cached_tokens)
            else:
                out = RequestOutput(request_id=rid, new_token_ids=[token])
            if logprobs is not None:
                out.logprobs = [logprobs[i]]
                if result.top_token_ids is not None and result.top_logprobs is not None:
                    out.top_token_ids = [result.top_token_ids[i]]
                    out.top_logprobs = [result.top_logprobs[i]]
            if reason is not None:
                out.finish_reason = reason
                self._finish(req, reason)
                out.explanation = self._explain(req, now)
            outputs.append(out)
        return outputs

    def _prompt_logprobs(self, worker_id: int, result: StepResult) -> list[RequestOutput]:
        """Outputs carrying the prompt logprobs of ``result``, each prompt position once: rows
        a request already sent (scored again after a preemption, or from a prefix it had to
        recompute) are dropped, and so are rows that would leave a gap."""
        outputs = []
        for chunk in result.prompt_logprobs or ():
            req = self.requests.get(chunk.request_id)
            if (req is None or req.status is not RequestStatus.RUNNING
                    or req.worker_id != worker_id or chunk.first > req.next_prompt_logprob):
                continue
            rows = chunk.trimmed(req.next_prompt_logprob)
            if rows is None:
                continue
            req.next_prompt_logprob = rows.first + len(rows.token_logprobs)
            outputs.append(RequestOutput(request_id=req.request_id, new_token_ids=[],
                                         prompt_logprobs=rows))
        return outputs

    def _finish_prefill_only(self, req: Request, now: float) -> RequestOutput:
        """A ``max_tokens`` 0 request (echo, prompt logprobs) whose prompt is now computed:
        it ends with "length" and no token."""
        out = RequestOutput(request_id=req.request_id, new_token_ids=[], finish_reason="length",
                            num_prompt_tokens=req.num_prompt_tokens,
                            num_cached_tokens=req.num_cached_tokens)
        self._finish(req, "length")
        out.explanation = self._explain(req, now)
        return out

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        """A worker raised while running ``plan``: its requests end with an error."""
        ws = self.workers.get(plan.worker_id)
        if ws is None or ws.in_flight is not plan:
            return []
        ws.in_flight = None
        ws.in_flight_requests = []
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
                                  req.max_cached_blocks(bs))
        num_hit = len(hit) * bs
        n = min(req.num_tokens - num_hit, budget)
        need = blocks.blocks_needed(num_hit + n, len(hit))
        if not blocks.can_allocate(need + blocks.num_unreferenced(hit)):
            return None
        ws.unqueue(req)
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
            sampling=(req.sampling if req.wants_prompt_logprobs
                      or req.sampling.prompt_logprobs is None  # all sent: none to compute
                      else msgspec.structs.replace(req.sampling, prompt_logprobs=None)),
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
                                      head.max_cached_blocks(bs))
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

    def _continue(self, ws: WorkerState, req: Request, n: int, scheduled: list[Request],
                  admitted: list[Request]) -> CachedRequestData | None:
        """The delta running ``n`` more tokens of ``req``, with the blocks they need; when
        none are free, victims not yet in the step (``scheduled``, ``admitted``) are
        preempted. None if ``req`` itself had to be preempted (or, alone on the worker, ran
        out of KV and was finished)."""
        blocks = ws.blocks
        need = blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        if not blocks.can_allocate(need):
            taken = {*scheduled, *admitted}
            while not blocks.can_allocate(need):
                victim = min((r for r in ws.running if r not in taken), key=self.policy.victim_key)
                if victim is req and len(ws.running) == 1:
                    # Alone on the worker and out of blocks: the whole cache cannot hold it.
                    self._finish(req, "length", "")
                    return None
                self._preempt(ws, victim)
                if victim is req:
                    return None
        new_block_ids = blocks.allocate(need) if need else []
        req.block_ids.extend(new_block_ids)
        return CachedRequestData(request_id=req.request_id, num_scheduled_tokens=n,
                                 new_block_ids=new_block_ids)

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

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request and release its blocks. With ``error`` given (even empty) the
        caller has no output to return, so one is queued for ``drain_outputs``."""
        if error is not None:
            self._outputs.append(RequestOutput(request_id=req.request_id, new_token_ids=[],
                                               finish_reason=reason, error=error))
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
