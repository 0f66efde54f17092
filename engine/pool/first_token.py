"""Pool-side timestamps of each request up to its first token (issue 15: where a critical
request's time goes under a flood).

``FirstTokenTimer`` is the pool's ``CoreObserver`` (engine/core.py): it sees each request
arrive (``on_add``), each plan go out (``on_plan``: the core submits a plan right after
asking for it) and each result applied (``on_result``, with the outputs it made). The first
output with tokens of a request gets a ``PoolTiming`` (engine/messages.py): when the pool
took the request, when it was first in a plan, when the plan that gave its first token went
out and came back (with that step's size and the worker's own time), and, set by
``on_flush`` as the batch goes out, when the output left the pool. The frontend adds when it
read it and puts the stages in ``Server-Timing`` (engine/frontend/timing.py).

Its own clock, not the core's ``now``: the pool reads ``now`` once per loop turn, before it
drains its sockets, so a turn that drained a flood of ``AddRequest`` s would date the plans
of that turn too early by the time it spent. Cost: two dict operations per request and one
clock read per plan; the timing struct rides only on a request's first output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from engine.core import CoreObserver
from engine.messages import EngineRequest, PoolTiming, RequestOutput, StepPlan, StepResult


class FirstTokenTimer(CoreObserver):
    """Stamps requests until their first token, then forgets them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.arrived: dict[str, float] = {}  # request id -> taken by the pool (no token yet)
        self.scheduled: dict[str, float] = {}  # request id -> first in a plan (no token yet)
        self.plan_sent: dict[int, float] = {}  # worker id -> its plan in flight went out
        #: worker id -> (its latest step went out, came back, its tokens)
        self.prev_step: dict[int, tuple[float, float, int]] = {}
        self.num_results = 0  # steps come back so far
        #: request id -> (num_results when it came, then its worker's previous step) while
        #: it waits for a first token
        self.waited: dict[str, tuple[int, tuple[float, float, int]]] = {}
        self.unsent: list[PoolTiming] = []  # stamped, their output not gone out yet

    @property
    def num_pending(self) -> int:
        """Requests held without a first token (a test's leak check)."""
        return len(self.arrived)

    def on_add(self, request: EngineRequest, outputs: list[RequestOutput], now: float) -> None:
        if not outputs:  # refused at once otherwise: it finishes with an error
            self.arrived[request.request_id] = self.clock()
            self.waited[request.request_id] = (self.num_results, (0.0, 0.0, 0))

    def on_abort(self, request_ids: Sequence[str], now: float) -> None:
        for rid in request_ids:
            self._forget(rid)

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        if plan is None:
            return
        t = self.plan_sent[worker_id] = self.clock()
        scheduled, arrived = self.scheduled, self.arrived
        for r in plan.new_requests:  # a request is in a plan first as a new one
            rid = r.request_id
            if rid in arrived and rid not in scheduled:
                scheduled[rid] = t
                prev = self.prev_step.get(worker_id, (0.0, 0.0, 0))
                self.waited[rid] = (self.num_results - self.waited.get(rid, (0, prev))[0], prev)

    def on_result(self, plan: StepPlan, result: StepResult, outputs: list[RequestOutput],
                  now: float) -> None:
        self.num_results += 1
        t_done = self.clock()
        t_sent = self.plan_sent.get(plan.worker_id, t_done)
        self.prev_step[plan.worker_id] = (t_sent, t_done, plan.num_scheduled_tokens)
        arrived = self.arrived
        if not arrived:
            return
        for out in outputs:
            rid = out.request_id
            if rid not in arrived:
                continue
            if out.new_token_ids:
                out.timing = PoolTiming(
                    arrived=arrived.pop(rid), scheduled=self.scheduled.pop(rid, t_sent),
                    step_sent=t_sent, step_done=t_done, execute_s=result.execute_time_s,
                    step_tokens=plan.num_scheduled_tokens, step_requests=plan.num_requests)
                steps, (p_sent, p_done, p_tokens) = self.waited.pop(rid, (0, (0.0, 0.0, 0)))
                out.timing.prev_step_sent, out.timing.prev_step_done = p_sent, p_done
                out.timing.prev_step_tokens, out.timing.queue_steps = p_tokens, steps
                self.unsent.append(out.timing)
            elif out.finish_reason is not None:
                self._forget(rid)

    def on_fail(self, plan: StepPlan, message: str, now: float) -> None:
        for rid, _ in plan.scheduled():
            self._forget(rid)

    def on_flush(self, outputs: Sequence[RequestOutput], now: float) -> None:
        """``outputs`` go out to the frontend now: stamp them; forget any request among
        them that finished without a token (finishes decided inside ``schedule``)."""
        for timing in self.unsent:
            timing.sent = now
        self.unsent.clear()
        if self.arrived:
            for out in outputs:
                if out.finish_reason is not None:
                    self._forget(out.request_id)

    def _forget(self, request_id: str) -> None:
        self.arrived.pop(request_id, None)
        self.scheduled.pop(request_id, None)
        self.waited.pop(request_id, None)
