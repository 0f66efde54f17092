"""The step being built for one worker: what is left of its limits and what is in it so far.

``Scheduler.schedule`` makes one ``StepBuilder`` per step and fills it in two passes (running
requests, then waiting ones; engine/scheduler/filling.py); ``build`` turns it into the
``StepPlan`` sent to the worker. The builder only records: every decision (blocks, victims,
policy) is the scheduler's.

- ``budget``: tokens the step may still compute (``max_num_batched_tokens`` less those in it);
- ``seats``: sequences it may still hold (``max_num_seqs`` less those in it);
- ``capped_budget``: prompt tokens it may still compute for requests the policy caps
  (``Policy.capped_prefill_tokens``; None: no cap), within ``budget``;
- ``new`` / ``admitted``: admitted requests' first chunks and the requests (plan order);
- ``cached`` / ``scheduled``: running requests' deltas and the requests;
- ``preempted``: a running request needed a block and lost its own place for it (preempted,
  or finished alone out of KV); nothing is admitted after that (no thrash).
"""

from __future__ import annotations

from engine.messages import CachedRequestData, NewRequestData, StepPlan
from engine.scheduler.request import Request


class StepBuilder:
    __slots__ = ("admitted", "budget", "cached", "capped_budget", "new", "preempted",
                 "scheduled", "seats")

    def __init__(self, budget: int, seats: int, capped_budget: int | None = None) -> None:
        self.budget = budget
        self.seats = seats
        self.capped_budget = capped_budget
        self.new: list[NewRequestData] = []
        self.admitted: list[Request] = []  # the requests of ``new``
        self.cached: list[CachedRequestData] = []
        self.scheduled: list[Request] = []  # the requests of ``cached``
        self.preempted = False

    def add_new(self, req: Request, data: NewRequestData) -> None:
        self.new.append(data)
        self.admitted.append(req)
        self.budget -= data.num_scheduled_tokens
        self.seats -= 1

    def add_cached(self, req: Request, delta: CachedRequestData) -> None:
        self.cached.append(delta)
        self.scheduled.append(req)
        self.budget -= delta.num_scheduled_tokens
        self.seats -= 1

    def prompt_room(self, capped: bool) -> int:
        """Prompt tokens a request may still compute in this step (``capped``: the policy
        caps its kind)."""
        if capped and self.capped_budget is not None:
            return min(self.budget, self.capped_budget)
        return self.budget

    def spend_capped(self, capped: bool, n: int) -> None:
        if capped and self.capped_budget is not None:
            self.capped_budget -= n

    def holds(self, req: Request) -> bool:
        return req in self.scheduled or req in self.admitted

    @property
    def empty(self) -> bool:
        return not (self.scheduled or self.admitted)

    def requests(self) -> list[Request]:
        """The step's requests in plan order (new ones first), as ``StepResult`` answers."""
        return self.admitted + self.scheduled if self.admitted else self.scheduled

    def build(self, step_id: int, worker_id: int, incarnation: int,
              finished_request_ids: list[str]) -> StepPlan:
        return StepPlan(step_id=step_id, worker_id=worker_id, incarnation=incarnation,
                        new_requests=self.new, cached_requests=self.cached,
                        finished_request_ids=finished_request_ids)
