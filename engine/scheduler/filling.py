"""Filling a step: running requests first, then admissions, with the preemptions they need.

Each method adds to the ``StepBuilder`` it is given (engine/scheduler/step.py) and returns
nothing; the order and the policy's hooks are ``Scheduler.schedule``'s:

- ``_make_room``: preemptive admission (policies with ``admission_victims``): a waiting
  request that cannot be admitted takes the place of running requests, only when freeing
  them is enough;
- ``_schedule_running``: decodes, then unfinished prefill chunks (a long prompt never stalls
  decodes); ``_continue`` gives a request the blocks for its tokens, preempting the policy's
  victim when none is free (a step in which a running request lost its place admits nothing:
  no thrash);
- ``_admit_waiting``: waiting requests in policy order, each after its longest cached prefix
  (``_admit``), while the budget, the seats, the blocks and the policy's gate allow.

Prompt tokens of the requests the policy caps (``Policy.prefill_capped``: ``priority``'s
sheddable ones) come out of a second, smaller budget per step (``capped_prefill_tokens``),
in running chunks and admissions alike: their prefill is chunked across steps, so every
step stays short, and so does the wait of a request that arrives while one runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from engine.messages import CachedRequestData, NewRequestData
from engine.scheduler.policy import AdmissionGate
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.state import SchedulerState
from engine.scheduler.step import StepBuilder
from engine.scheduler.worker_state import WorkerState


class StepFiller(SchedulerState):
    def _schedule_running(self, ws: WorkerState, requests: Iterable[Request],
                          step: StepBuilder) -> None:
        """Add running ``requests`` to ``step``: decodes first, then unfinished prefill
        chunks, so a long prompt never stalls decodes. A request needing a block when none
        is free preempts (see ``_continue``).

        The loop runs once per running request per step, so the common decode (one token,
        within the blocks it holds) costs a few attribute reads and reuses the request's
        fixed delta; the builder's lists and counts are bound once."""
        running = RequestStatus.RUNNING
        bs = self.block_size
        chunks: list[Request] = []
        add_delta, add_req = step.cached.append, step.scheduled.append
        room = min(step.budget, step.seats)  # a decode: one token, one sequence
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
                add_delta(req.decode_delta)
            else:
                delta = self._continue(ws, req, 1, step)
                if delta is None:
                    continue
                add_delta(delta)
            add_req(req)
            num_decodes += 1
        step.budget -= num_decodes
        step.seats -= num_decodes
        capped_kind = self.policy.prefill_capped
        for req in chunks:
            if step.budget <= 0 or step.seats <= 0:
                break
            capped = capped_kind(req)
            n = min(req.num_tokens - req.num_computed_tokens, step.prompt_room(capped))
            if req.status is not running or n <= 0:
                continue
            delta = self._continue(ws, req, n, step)
            if delta is not None:
                step.add_cached(req, delta)
                step.spend_capped(capped, n)

    def _continue(self, ws: WorkerState, req: Request, n: int,
                  step: StepBuilder) -> CachedRequestData | None:
        """The delta running ``n`` more tokens of ``req``, with the blocks they need; when
        none are free, victims not yet in ``step`` are preempted. None if ``req`` itself had
        to be preempted (or, alone on the worker, ran out of KV and was finished): then
        ``step.preempted``."""
        blocks = ws.blocks
        need = blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        if not blocks.can_allocate(need):
            taken = {*step.scheduled, *step.admitted}
            while not blocks.can_allocate(need):
                victim = min((r for r in ws.running if r not in taken), key=self.policy.victim_key)
                if victim is req and len(ws.running) == 1:
                    # Alone on the worker and out of blocks: the whole cache cannot hold it.
                    self._end(req, "length")
                    step.preempted = True
                    return None
                self._preempt(ws, victim)
                if victim is req:
                    step.preempted = True
                    return None
        new_block_ids = blocks.allocate(need) if need else []
        req.block_ids.extend(new_block_ids)
        return CachedRequestData(request_id=req.request_id, num_scheduled_tokens=n,
                                 new_block_ids=new_block_ids)

    def _admit_waiting(self, ws: WorkerState, waiting: list[Request], step: StepBuilder,
                       gate: AdmissionGate | None, now: float) -> None:
        """Admit waiting requests in policy order while the budget, the seats and the blocks
        allow, and the policy's ``gate`` (None: no gate) lets them through."""
        wid = ws.worker_id
        capped_kind = self.policy.prefill_capped
        for req in waiting:
            if step.budget <= 0 or step.seats <= 0:
                break
            if req.status is not RequestStatus.WAITING or req.worker_id != wid:
                continue  # re-placed by a preemption of this step
            capped = capped_kind(req)
            room = step.prompt_room(capped)
            if room <= 0:
                continue  # its kind's share of the step is spent; others may still join
            if gate is not None and not gate.admits(req):
                break
            data = self._admit(ws, req, room, now)
            if data is None:
                if req.request_id not in self.requests:
                    continue  # could never fit: failed, the next one may
                break
            step.add_new(req, data)
            step.spend_capped(capped, data.num_scheduled_tokens)
            if gate is not None:
                gate.admitted(req)

    def _admit(self, ws: WorkerState, req: Request, budget: int, now: float) -> NewRequestData | None:
        """Admit ``req`` after its cached prefix if the blocks for its first chunk are free."""
        blocks = ws.blocks
        bs = self.block_size
        if blocks.blocks_needed(req.num_tokens + 1, 0) > blocks.num_blocks:
            self._end(req, "error", f"{req.num_tokens} tokens do not fit in the worker's "
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

    def _make_room(self, ws: WorkerState, waiting: list[Request]) -> None:
        """Preemptive admission: make room for waiting requests that may displace running
        ones (``policy.admission_victims``). Only when the victims' blocks plus the free ones
        are enough for the waiting request's first chunk is anything preempted: never a
        preemption that cannot help."""
        blocks = ws.blocks
        bs = self.block_size
        max_seqs = self.config.max_num_seqs
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
            if blocks.can_allocate(need) and seqs <= max_seqs:
                reserved_blocks = need
                reserved_seqs += 1
                continue
            victims = self.policy.admission_victims(head, ws.running)
            freeable = sum(blocks.num_sole_owner(v.block_ids) for v in victims)
            if not victims or blocks.num_free_blocks + freeable < need:
                return  # preempting could not admit it: leave everything running
            for victim in victims:
                if blocks.can_allocate(need) and len(ws.running) + reserved_seqs < max_seqs:
                    break
                self._preempt(ws, victim)
            reserved_blocks = need
            reserved_seqs += 1
