"""The engine core: the one drive loop around the pure ``Scheduler``.

Four things drive the scheduler: the pool process (engine/pool/service.py: workers behind
sockets), ``engine.LLM`` (runners in the caller's process), the simulator
(engine/sim/simulator.py: a cost model and an event clock) and the test fakes. Each used to
write its own schedule / run / update loop; they now configure an ``EngineCore``, feed it
arrivals, aborts and results, and read its outputs::

    core = EngineCore(scheduler)
    core.add_worker(0, handle, num_blocks, now)     # a runner behind a ``StepHandle``
    core.add(request, now); core.abort(ids, now)    # arrivals and aborts
    core.step(now)                                  # each ready, idle worker: schedule, submit
    core.complete(worker_id, result, now)           # a result that arrived later (sockets, sim)
    outputs = core.take_outputs()                   # new tokens and finishes, in order

A ``StepHandle`` is one worker's runner as the core sees it: ``ready()`` (may it take a plan
now: the pool greets a worker before its first plan) and ``submit(plan, now)``, which either
runs the plan and returns its ``StepResult`` at once (``InProcess``: ``LLM``, the test fakes;
the core applies it within the same ``step``) or returns None, the result coming later
through ``complete`` (the pool's socket, whose results arrive on the worker socket; the
simulator's worker, whose step ends at a time the cost model gives). A handle that finds its
worker gone raises ``WorkerLost``: the core removes the worker and its requests are
re-placed to be recomputed.

Which results count is decided here once: a result (or a failure) counts only if it answers
the plan in flight to that worker, from the incarnation it was sent to; anything else is
stale, and ``complete`` / ``fail`` return None for it (the pool logs and drops it).

Observer. ``observer`` (a ``CoreObserver``, default None) sees every input of the scheduler
and every decision, in order, with its ``now``: requests added and aborted, workers added and
removed, every ``schedule`` call the core makes (with its plan, or None), every result applied
(with the outputs it made) and every failed step. A recorder of scheduler inputs
(``--record-decisions``) or a per-step profiler (``--profile-steps``) plugs in here; so do
the tests' integrity checks (``IntegrityCheck``). Unused, it costs one ``is not None`` test
per call. Observers must not call back into the core.

Hot path: ``step`` and ``complete`` bind what they use to locals and allocate nothing the
scheduler does not (one list of the worker ids, as the pool's loop always made).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from engine.messages import EngineRequest, RequestOutput, StepPlan, StepResult
from engine.scheduler.scheduler import Scheduler


class WorkerLost(Exception):
    """Raised by ``StepHandle.submit`` when the plan cannot reach its worker."""


class StepHandle(Protocol):
    """One worker's runner, as the core drives it."""

    def ready(self) -> bool:
        """Whether the worker may be given a plan now (besides having none in flight)."""
        ...

    def submit(self, plan: StepPlan, now: float) -> StepResult | None:
        """Run or send ``plan``: its result now, or None when it will come to ``complete``."""
        ...


class InProcess:
    """A runner in this process: ``step(plan) -> StepResult`` runs at once (``LLM``, tests)."""

    __slots__ = ("step",)

    def __init__(self, step: Callable[[StepPlan], StepResult]) -> None:
        self.step = step

    def ready(self) -> bool:
        return True

    def submit(self, plan: StepPlan, now: float) -> StepResult:
        return self.step(plan)


class CoreObserver:
    """Sees every scheduler input and decision of an ``EngineCore``; each method does
    nothing here: override those you need. ``now`` is the core's caller's clock."""

    def on_add(self, request: EngineRequest, outputs: list[RequestOutput], now: float) -> None:
        """A request was queued (``outputs``: its error finish if refused at once)."""

    def on_abort(self, request_ids: Sequence[str], now: float) -> None:
        """The client (or a stop string) aborted these requests."""

    def on_worker_added(self, worker_id: int, num_blocks: int, incarnation: int,
                        now: float) -> None:
        """A worker (this incarnation of it) is up with an empty cache."""

    def on_worker_removed(self, worker_id: int, moved: list[str], now: float) -> None:
        """A worker is gone; ``moved``: its requests, re-placed to be recomputed."""

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        """The core asked the scheduler for ``worker_id``'s next step (None: nothing to run,
        or a plan still in flight). Called for every ``schedule`` call, so a replay of the
        inputs makes the same calls."""

    def on_result(self, plan: StepPlan, result: StepResult, outputs: list[RequestOutput],
                  now: float) -> None:
        """``result`` answered ``plan`` and was applied, making ``outputs``."""

    def on_fail(self, plan: StepPlan, message: str, now: float) -> None:
        """The worker raised running ``plan``; its requests ended with an error."""


class ObserverTee(CoreObserver):
    """Several observers, each told everything, in the order given."""

    def __init__(self, *observers: CoreObserver) -> None:
        self.observers = observers

    def on_add(self, request: EngineRequest, outputs: list[RequestOutput], now: float) -> None:
        for o in self.observers:
            o.on_add(request, outputs, now)

    def on_abort(self, request_ids: Sequence[str], now: float) -> None:
        for o in self.observers:
            o.on_abort(request_ids, now)

    def on_worker_added(self, worker_id: int, num_blocks: int, incarnation: int,
                        now: float) -> None:
        for o in self.observers:
            o.on_worker_added(worker_id, num_blocks, incarnation, now)

    def on_worker_removed(self, worker_id: int, moved: list[str], now: float) -> None:
        for o in self.observers:
            o.on_worker_removed(worker_id, moved, now)

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        for o in self.observers:
            o.on_plan(worker_id, plan, now)

    def on_result(self, plan: StepPlan, result: StepResult, outputs: list[RequestOutput],
                  now: float) -> None:
        for o in self.observers:
            o.on_result(plan, result, outputs, now)

    def on_fail(self, plan: StepPlan, message: str, now: float) -> None:
        for o in self.observers:
            o.on_fail(plan, message, now)


class IntegrityCheck(CoreObserver):
    """``check_integrity()`` after every schedule call and every result (tests; slow)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        self.scheduler.check_integrity()

    def on_result(self, plan: StepPlan, result: StepResult, outputs: list[RequestOutput],
                  now: float) -> None:
        self.scheduler.check_integrity()


class EngineCore:
    """The scheduler, a ``StepHandle`` per live worker, and the outputs not yet taken."""

    def __init__(self, scheduler: Scheduler, observer: CoreObserver | None = None,
                 handles: Mapping[int, StepHandle] | None = None) -> None:
        """``handles``: for workers ``scheduler`` has already (tests that set it up by
        hand); ``add_worker`` adds the others."""
        self.scheduler = scheduler
        self.observer = observer
        self.handles: dict[int, StepHandle] = dict(handles or {})  # in the worker order
        self.outputs: list[RequestOutput] = []

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    def take_outputs(self) -> list[RequestOutput]:
        """The outputs made since the last call, in the order they were made."""
        outputs, self.outputs = self.outputs, []
        return outputs

    def has_work(self) -> bool:
        """Whether ``step`` would give some worker a plan now (the pool polls without
        waiting while it does)."""
        has_work = self.scheduler.has_work
        return any(has_work(w) and h.ready() for w, h in self.handles.items())

    # ------------------------------------------------------------------ inputs

    def add_worker(self, worker_id: int, handle: StepHandle, num_blocks: int, now: float,
                   incarnation: int = 0) -> None:
        """Worker ``worker_id`` (this incarnation) is up behind ``handle``; one of that id
        still known is replaced, its requests re-placed."""
        self.scheduler.add_worker(worker_id, num_blocks, now, incarnation)
        self.handles.pop(worker_id, None)  # re-inserted last, as the scheduler's
        self.handles[worker_id] = handle
        if self.observer is not None:
            self.observer.on_worker_added(worker_id, num_blocks, incarnation, now)

    def remove_worker(self, worker_id: int, now: float) -> list[str]:
        """Forget a dead worker; returns its requests' ids, re-placed to be recomputed."""
        self.handles.pop(worker_id, None)
        moved = self.scheduler.remove_worker(worker_id, now)
        if self.observer is not None:
            self.observer.on_worker_removed(worker_id, moved, now)
        return moved

    def add(self, request: EngineRequest, now: float) -> None:
        outputs = self.scheduler.add(request, now)
        if self.observer is not None:
            self.observer.on_add(request, outputs, now)
        if outputs:
            self.outputs += outputs

    def abort(self, request_ids: Sequence[str], now: float) -> None:
        if self.observer is not None:
            self.observer.on_abort(request_ids, now)
        self.outputs += self.scheduler.abort(request_ids, now)

    # ------------------------------------------------------------------ the step

    def step(self, now: float, worker_ids: Iterable[int] | None = None) -> int:
        """Offer a step to each worker of ``worker_ids`` (default: every live worker, in
        order) whose handle is ready: schedule, submit, and apply a result that comes back
        at once. Then collect the finishes decided inside ``schedule``. Returns the number
        of plans submitted (0 with work left: nothing could run)."""
        sched, handles, observer = self.scheduler, self.handles, self.observer
        schedule = sched.schedule
        num_plans = 0
        for w in list(handles) if worker_ids is None else worker_ids:
            handle = handles.get(w)
            if handle is None or not handle.ready():
                continue
            plan = schedule(w, now)
            if observer is not None:
                observer.on_plan(w, plan, now)
            if plan is None:
                continue
            num_plans += 1
            try:
                result = handle.submit(plan, now)
            except WorkerLost:
                self.remove_worker(w, now)
                continue
            if result is not None:
                self._apply(plan, result, now)
        outputs = sched.drain_outputs()
        if outputs:
            self.outputs += outputs
        return num_plans

    def complete(self, worker_id: int, result: StepResult, now: float) -> StepPlan | None:
        """A result that arrived after ``submit``: applied if it answers the plan in flight
        to ``worker_id`` (returned); None for a stale one (dropped)."""
        plan = self.in_flight(worker_id, result.step_id, result.incarnation)
        if plan is not None:
            self._apply(plan, result, now)
        return plan

    def fail(self, worker_id: int, step_id: int, incarnation: int, message: str,
             now: float) -> StepPlan | None:
        """The worker raised running step ``step_id``: its requests end with an error.
        Returns the plan, or None when the failure is stale (dropped)."""
        plan = self.in_flight(worker_id, step_id, incarnation)
        if plan is not None:
            if self.observer is not None:
                self.observer.on_fail(plan, message, now)
            self.outputs += self.scheduler.fail_step(plan, message)
        return plan

    def in_flight(self, worker_id: int, step_id: int, incarnation: int) -> StepPlan | None:
        """The plan in flight to ``worker_id`` if it is step ``step_id`` of ``incarnation``."""
        plan = self.scheduler.in_flight(worker_id)
        if plan is None or plan.step_id != step_id or plan.incarnation != incarnation:
            return None
        return plan

    def _apply(self, plan: StepPlan, result: StepResult, now: float) -> None:
        outputs = self.scheduler.update(plan, result, now)
        if self.observer is not None:
            self.observer.on_result(plan, result, outputs, now)
        self.outputs += outputs
