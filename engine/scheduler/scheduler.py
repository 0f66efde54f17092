"""The global scheduler of one model pool: pure state, no sockets, no torch, no clock.

It owns every request and every worker's KV block table. The pool process calls it (as
vLLM's engine core calls its scheduler: add, schedule, update, finish):

    add(request, now) / abort(ids, now)        from the frontend
    add_worker(id, num_blocks, now, inc)       a worker said hello (start or restart)
    remove_worker(id, now)                     a worker died: its requests are re-placed
    schedule(worker_id, now) -> StepPlan       the next step for one idle worker
    update(plan, result, now) -> outputs       sampled tokens in; new tokens, finishes out
    fail_step(plan, message) -> outputs        the worker raised running the plan
    drain_outputs() -> outputs                 finishes decided inside schedule() (rare)
    drain_kv_events() -> [(worker id, events)] with ``kv_events``: prefix-cache changes
    in_flight(id), num_waiting(id), has_work(id), stats()   what the pool may read

Each worker has at most one plan in flight, addressed to the worker's incarnation (its
restart count, given by ``add_worker``); a result counts only if it answers that plan, from
that incarnation. Which incarnation is current is the pool's call (engine/pool/service.py).

Before its step, an idle worker may take waiting requests off the heads of busy workers'
queues (``policy.may_steal``: late binding; ``priority`` takes those not sheddable). While
non-sheddable requests arrive, ``--reserved-workers`` are kept free of sheddable ones
(``SchedulerState.reserved_ids``: placement, the move when it starts, no stealing).
A step for one worker fills a ``StepBuilder`` (token budget, seats, new and cached requests;
engine/scheduler/step.py) in three passes (engine/scheduler/filling.py), asking the policy's
hooks (engine/scheduler/policy.py; all do nothing but for ``priority``):

1. preemptive admission (``admission_victims``): a waiting request that cannot be admitted
   takes the place of running requests it outranks, only when freeing them is enough;
2. running requests, decodes before unfinished prefill chunks (a long prompt never stalls
   decodes); a request that needs a block when none is free preempts the policy's victim.
   With exclusive prefill (``urgent``), the running requests outranked by the request whose
   prompt this step computes sit the step out (they keep their blocks), so it is short;
3. admission of waiting requests in policy order, each after its longest cached prefix,
   while the budget, the seats, the blocks and the policy's gate (``admission_gate``: the
   requests ``urgent`` outranks, the outranked share of ``max_num_seqs``) allow; nothing is
   admitted in a step whose running requests had to give up their place.

A preempted request loses its blocks (its full blocks stay cached until evicted), is placed
again (it may move) and is recomputed later; its stream stays open and no token repeats.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.messages import (
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    RequestOutput,
    StepPlan,
    StepResult,
)
from engine.scheduler.block_manager import KV_CLEARED, KVEvent
from engine.scheduler.filling import StepFiller
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.step import StepBuilder
from engine.scheduler.worker_state import WorkerState


class Scheduler(StepFiller):
    """The pool's scheduler; its state and bookkeeping are ``SchedulerState``'s
    (engine/scheduler/state.py), the filling of a step ``StepFiller``'s."""

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker_id: int, num_blocks: int, now: float,
                   incarnation: int = 0) -> None:
        """A worker (``incarnation`` of it) is up with an empty cache; one of the same id
        still known is replaced, its requests re-placed."""
        if worker_id in self.workers:
            self.remove_worker(worker_id, now)
        self._tick(now)
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
        self._tick(now)
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
        self._tick(now)
        self._note_arrival(req, now)
        self._place(req)
        return []

    def abort(self, request_ids: Iterable[str], now: float) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            out = self._finish(req, "abort")
            out.explanation = self._explain(req, now)
            outputs.append(out)
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

    # ------------------------------------------------------------------ steps

    def schedule(self, worker_id: int, now: float) -> StepPlan | None:
        """The next step for ``worker_id``, or None if it is busy or has nothing to run."""
        ws = self.workers.get(worker_id)
        self._tick(now)
        if ws is None or ws.in_flight is not None or not (ws.running or ws.waiting):
            return None
        policy = self.policy
        if len(self.workers) > 1:
            self._steal(ws)
        waiting = self._waiting(ws)
        if waiting and ws.running and policy.preemptive:
            self._make_room(ws, waiting)  # 1. preemptive admission
        step = StepBuilder(self.config.max_num_batched_tokens, self.config.max_num_seqs,
                           policy.capped_prefill_tokens)
        urgent = policy.urgent(ws.running, waiting, worker_id)
        holder = self._holder(ws) if self._hold_across else None
        held = holder.in_flight_urgent if holder is not None else None
        running, sitting_out = self._sit_out(ws, urgent, held)
        self._schedule_running(ws, running, step)  # 2. running requests
        if waiting and not step.preempted:  # 3. admission
            gate = policy.admission_gate(ws.running, urgent, self.config.max_num_seqs, held)
            self._admit_waiting(ws, waiting, step, gate, now)
        if sitting_out and urgent is not None and not step.holds(urgent):
            self._schedule_running(ws, sitting_out, step)  # nothing outranked them after all
        if step.empty:
            ws.held_by = holder.in_flight if holder is not None else None
            return None
        ws.held_by = None
        plan = step.build(self._next_step_id, worker_id, ws.incarnation, ws.to_drop)
        self._next_step_id += 1
        ws.to_drop = []
        ws.in_flight = plan
        ws.in_flight_requests = step.requests()
        ws.in_flight_urgent = urgent if urgent is not None and step.holds(urgent) else None
        return plan

    def _holder(self, ws: WorkerState) -> WorkerState | None:
        """Of the other workers, the one whose step in flight computes the top urgent
        request's prompt (exclusive prefill across workers): ``ws``'s step leaves out the
        requests that one outranks. None: no such step."""
        key = self.policy.queue_key
        top: WorkerState | None = None
        top_key: tuple[float, ...] = ()
        for other in self.workers.values():
            urgent = other.in_flight_urgent
            if other is ws or urgent is None or other.in_flight is None:
                continue
            k = key(urgent)
            if top is None or k < top_key:
                top, top_key = other, k
        return top

    def _steal(self, ws: WorkerState) -> None:
        """Late binding (``policy.may_steal``): take from the head of each busy worker's
        queue the requests that go before this worker's own waiting head (a reserved worker
        no sheddable one)."""
        may_steal = self.policy.may_steal
        reserved = bool(self.reserved_workers) and ws.worker_id in self.reserved_ids()
        for other in self.workers.values():
            if other is ws or other.in_flight is None:
                continue
            queue = other.waiting
            while queue and may_steal(queue[0][2]) and (
                    not reserved or queue[0][2].priority >= 0) and (
                    not ws.waiting or queue[0][:2] < ws.waiting[0][:2]):
                key, seq, req = queue[0]
                other.unqueue(req)
                req.worker_id = ws.worker_id
                req.predicted_cached_tokens = ws.cached_prefix_tokens(req)
                ws.enqueue(req, key, seq)

    def _waiting(self, ws: WorkerState) -> list[Request]:
        """The worker's waiting requests in admission order (a copy: steps re-place some)."""
        if not ws.waiting:
            return []
        waiting = [r for _, _, r in ws.waiting]
        return self.policy.order(waiting, ws) if self.policy.dynamic else waiting

    def _sit_out(self, ws: WorkerState, urgent: Request | None, held: Request | None = None,
                 ) -> tuple[Iterable[Request], list[Request]]:
        """The running requests that run in this step first (a copy: the step may preempt
        some) and those that sit it out unless ``urgent`` is not in the step: the ones
        ``urgent`` outranks (exclusive prefill). Those ``held`` (another worker's urgent
        request) outranks are in neither: they sit the step out whatever it holds."""
        if urgent is None and held is None:
            return tuple(ws.running), []
        may_preempt = self.policy.may_preempt
        kept: list[Request] = []
        sitting_out: list[Request] = []
        for r in ws.running:
            if held is not None and may_preempt(held, r):
                continue
            (sitting_out if urgent is not None and may_preempt(urgent, r) else kept).append(r)
        return kept, sitting_out

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
            if reason is not None:  # the token's output carries the finish
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
        out = self._finish(req, "length")
        out.num_prompt_tokens = req.num_prompt_tokens
        out.num_cached_tokens = req.num_cached_tokens
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
                outputs.append(self._finish(req, "error", message))
        return outputs
