"""Scheduling policies: queue order, admission preemption and victims, as small plugins.

A policy ranks; it never mutates scheduler state. The scheduler's step asks it through
hooks whose defaults do nothing: ``admission_victims`` (preemptive admission),
``urgent`` (exclusive prefill) and ``admission_gate`` (the outranked share); only
``priority`` turns them on, through its class flags. Select one by name (``--policy``) or by
import path (``package.module:Class``, a subclass of ``Policy``). Placement across workers is
a separate plugin (``engine.scheduler.placement``).

Built in:

- ``fcfs``: first come, first served; never preempts to admit.
- ``priority``: higher ``priority`` first, then arrival; a waiting request may preempt running
  requests of strictly lower priority when it cannot otherwise be admitted, a step that
  computes its prompt leaves them out (``exclusive_prefill``), and while it is on a worker
  they may fill at most 45% of the batch (``outranked_seq_share``); sheddable requests
  (priority < 0) compute at most 64 prompt tokens per step (``capped_prefill_tokens``),
  an idle worker takes the others' waiting requests that are not sheddable
  (``may_steal``) ahead of its own lower ones, and while a step computes a prompt, the
  requests it outranks sit out on every worker (``exclusive_prefill_across_workers``).
- ``sjf``: shortest prompt first; ``sjf-max-tokens`` uses the request's ``max_tokens`` as
  the predicted output length (subclass and set ``predict`` for a learned predictor).
- ``fair``: fair share across tenants, as in the Virtual Token Counter (VTC): the tenant
  that has been served the fewest weighted tokens goes first.
- ``lpm``: longest prefix match first (the most cached tokens on the worker), falling back to
  FCFS for long queues, as in SGLang.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

from engine.scheduler.request import Request, RequestStatus


class WorkerView(Protocol):
    """What a policy may read about a worker (``engine.scheduler.worker_state.WorkerState``)."""

    worker_id: int

    def cached_prefix_tokens(self, req: Request) -> int: ...


class Policy:
    """First come, first served. Subclass to change any part."""

    name = "fcfs"
    #: True: ``order`` re-ranks the waiting queue every step (keys that change over time).
    dynamic = False
    #: True: a waiting request may preempt running ones for which ``may_preempt`` holds.
    preemptive = False
    #: True: in a step where a request computes prompt tokens, the requests it may preempt
    #: sit out (running ones keep their blocks), so that step is short and its first token
    #: comes sooner. The price: those requests lose that step.
    exclusive_prefill = False
    #: A fraction of ``max_num_seqs``, or None: while a request that may preempt others is on
    #: a worker (running or first in its queue), the requests it outranks may hold at most
    #: this share of the batch's sequences; beyond it none of them is admitted (running ones
    #: are never evicted for it). The rest of the batch is kept for the higher class, and
    #: its steps stay short: a step a higher-priority arrival waits for, and each step of its
    #: prompt, carries at most that many outranked decodes. The price: outranked requests
    #: queue longer while the batch would otherwise be full of them.
    outranked_seq_share: float | None = None
    #: Prompt tokens per step for the requests ``prefill_capped`` picks, or None (no cap):
    #: their prefill is chunked across steps, so a step never carries much of it. A request
    #: that arrives while a step runs waits for that step, whatever its priority: under a
    #: flood of admitted sheddable prompts, uncapped steps of 512 prompt tokens made a
    #: critical request wait ~10x its own step (issue 15). The price: the capped kind's
    #: prefill takes more, smaller steps.
    capped_prefill_tokens: int | None = None
    #: True (with ``exclusive_prefill``): while a worker's step computes the prompt of the
    #: request ``urgent`` picked, the other workers' steps leave out the requests it
    #: outranks as well (running ones sit out, waiting ones are not admitted), so a worker
    #: with nothing else to run waits for that step to end. For workers that share CPU
    #: cores: under a flood the other worker's outranked decodes take the core a critical
    #: prompt's step needs, and that step ran 2-4x its time alone (issue 15). The price:
    #: outranked work pauses for the length of each such step on every worker. Applied only
    #: where ``SchedulerConfig.workers_share_cores`` is ``yes`` (``auto``: CPU workers).
    exclusive_prefill_across_workers = False

    def prefill_capped(self, req: Request) -> bool:
        """Whether ``req``'s prompt tokens count against ``capped_prefill_tokens``."""
        return False

    def may_steal(self, req: Request) -> bool:
        """Late binding: whether a worker about to step may take ``req``, waiting at the
        head of a busy worker's queue and ahead of its own waiting requests, from that
        queue. Placement binds a request to a worker when it arrives; when every worker is
        busy, the one it waits for may end its step after another does (a long step, a
        descheduled process): taken, it starts in the step about to be built, at the cost of
        its prefix-cache affinity. Never, by default."""
        return False

    def queue_key(self, req: Request) -> tuple[float, ...]:
        """Sort key of a worker's waiting queue (smaller first), fixed while the request waits."""
        return (req.arrival_time,)

    def order(self, waiting: list[Request], worker: WorkerView) -> list[Request]:
        """Admission order for dynamic policies; static ones keep the queue order."""
        return waiting

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        """Whether ``waiting`` may take ``running``'s place when it cannot be admitted."""
        return False

    def victim_key(self, req: Request) -> tuple[float, ...]:
        """Victims are taken in ascending order of this key: by default the latest admitted."""
        return (-req.admitted_seq,)

    def on_served(self, req: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Accounting hook: tokens just computed for ``req`` (prefill chunk) or produced."""

    # ------------------------------------------------------------------ step hooks

    def admission_victims(self, head: Request, running: Sequence[Request]) -> list[Request]:
        """Preemptive admission: the running requests ``head`` may take the place of when it
        cannot be admitted, in the order to preempt them (none unless ``preemptive``)."""
        if not self.preemptive:
            return []
        return sorted((r for r in running if self.may_preempt(head, r)), key=self.victim_key)

    def urgent(self, running: Sequence[Request], waiting: Sequence[Request],
               worker_id: int) -> Request | None:
        """Exclusive prefill: of the requests with prompt tokens to compute in this step
        (running chunks and the next waiting request), the first by ``queue_key``; the
        requests it may preempt sit the step out, keeping their blocks, so the step holds
        only work it does not outrank and its first token comes sooner. None (nobody sits
        out) unless ``exclusive_prefill``."""
        if not self.exclusive_prefill:
            return None
        candidates = [r for r in running if r.num_computed_tokens + 1 < r.num_tokens]
        for req in waiting:
            if req.status is RequestStatus.WAITING and req.worker_id == worker_id:
                candidates.append(req)
                break
        return min(candidates, key=self.queue_key) if candidates else None

    def outranked_limit(self, max_num_seqs: int) -> int | None:
        """The sequences the requests outranked by a worker's top request may hold
        (``outranked_seq_share`` of ``max_num_seqs``; None: all). ValueError for a share
        outside (0, 1]."""
        share = self.outranked_seq_share
        if share is None:
            return None
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--policy: {self.name}: outranked_seq_share must be in (0, 1], "
                             f"got {share}")
        return max(1, int(share * max_num_seqs))

    def admission_gate(self, running: list[Request], urgent: Request | None,
                       max_num_seqs: int, held: Request | None = None) -> AdmissionGate | None:
        """What stops admission early in a step: requests ``urgent`` or ``held`` (another
        worker's urgent request, ``exclusive_prefill_across_workers``) outranks, and those
        beyond the outranked share. None (nothing) by default."""
        limit = self.outranked_limit(max_num_seqs)
        if urgent is None and held is None and limit is None:
            return None
        return AdmissionGate(self, running, urgent, limit, held)


class AdmissionGate:
    """One step's admission stops for a policy that outranks: no waiting request ``urgent``
    or ``held`` outranks is admitted, and with ``limit``, the requests the worker's top request outranks
    (the top: its best running request, or the first that could be admitted) may hold at
    most ``limit`` sequences; running ones are never evicted for it."""

    __slots__ = ("_outranked", "held", "limit", "policy", "running", "seats", "top", "urgent")

    def __init__(self, policy: Policy, running: list[Request], urgent: Request | None,
                 limit: int | None, held: Request | None = None) -> None:
        self.policy = policy
        self.running = running  # the worker's, read when the first request asks
        self.urgent = urgent
        self.held = held
        self.limit = limit
        self.top: Request | None = None
        self.seats = 0  # outranked requests that may still join (once ``top`` is known)
        self._outranked = False

    def admits(self, req: Request) -> bool:
        """Whether ``req`` (and so anything after it in admission order) may be admitted."""
        may_preempt = self.policy.may_preempt
        if self.urgent is not None and may_preempt(self.urgent, req):
            return False
        if self.held is not None and may_preempt(self.held, req):
            return False
        if self.limit is None:
            return True
        if self.top is None:  # once per step, and only when something could be admitted
            key = self.policy.queue_key
            top = min(self.running, key=key, default=req)
            self.top = req if key(req) < key(top) else top
            self.seats = self.limit - sum(1 for r in self.running if may_preempt(self.top, r))
        self._outranked = may_preempt(self.top, req)
        return not (self._outranked and self.seats <= 0)

    def admitted(self, req: Request) -> None:
        """``req``, just let through by ``admits``, is in the step."""
        if self._outranked:
            self.seats -= 1


class PriorityPolicy(Policy):
    name = "priority"
    preemptive = True
    exclusive_prefill = True
    outranked_seq_share = 0.45
    capped_prefill_tokens = 64
    exclusive_prefill_across_workers = True

    def prefill_capped(self, req: Request) -> bool:
        return req.priority < 0  # sheddable: its latency matters least

    def may_steal(self, req: Request) -> bool:
        return req.priority >= 0  # not sheddable: its first token is what is waited for

    def queue_key(self, req: Request) -> tuple[float, ...]:
        return (-req.priority, req.arrival_time)

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        # Strictly lower only: equals never displace each other, so nothing thrashes.
        return running.priority < waiting.priority

    def victim_key(self, req: Request) -> tuple[float, ...]:
        return (req.priority, -req.admitted_seq)


class ShortestJobFirst(Policy):
    name = "sjf"
    predict: Callable[[Request], float] | None = None  # predicted output tokens

    def queue_key(self, req: Request) -> tuple[float, ...]:
        length = self.predict(req) if self.predict is not None else req.num_prompt_tokens
        return (float(length), req.arrival_time)


class ShortestMaxTokensFirst(ShortestJobFirst):
    name = "sjf-max-tokens"

    @staticmethod
    def predict(req: Request) -> float:
        return float(req.sampling.max_tokens)


class FairShare(Policy):
    """Virtual Token Counter: per-tenant counters of served tokens (prompt tokens weighted
    ``prompt_weight``, output tokens ``output_weight``); the least-served tenant goes first.
    A tenant that becomes active is lifted to the smallest counter among active tenants, so
    idle time does not bank credit."""

    name = "fair"
    dynamic = True
    prompt_weight = 1.0
    output_weight = 2.0

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}

    def order(self, waiting: list[Request], worker: WorkerView) -> list[Request]:
        if self.counters:
            floor = min(self.counters.values())
            for req in waiting:
                self.counters.setdefault(req.tenant, floor)
        return sorted(waiting, key=lambda r: (self.counters.get(r.tenant, 0.0), r.arrival_time))

    def on_served(self, req: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.counters[req.tenant] = (self.counters.get(req.tenant, 0.0)
                                     + self.prompt_weight * num_prompt_tokens
                                     + self.output_weight * num_output_tokens)


class LongestPrefixMatch(Policy):
    name = "lpm"
    dynamic = True
    max_ranked = 128  # beyond this queue length, ranking costs more than it gains: FCFS

    def order(self, waiting: list[Request], worker: WorkerView) -> list[Request]:
        if len(waiting) > self.max_ranked:
            return waiting
        return sorted(waiting, key=lambda r: (-worker.cached_prefix_tokens(r), r.arrival_time))


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Policy, PriorityPolicy, ShortestJobFirst, ShortestMaxTokensFirst, FairShare,
                LongestPrefixMatch)
}


def load_plugin(name: str, registry: Sequence[str], base: type, flag: str) -> type:
    """A class by import path ``module:Class`` that subclasses ``base``; ValueError names
    ``flag`` and the registered names otherwise."""
    if ":" not in name:
        raise ValueError(f"{flag}: unknown name {name!r}; known: {sorted(registry)} "
                         "or an import path module:Class")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{flag}: cannot load {name!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{flag}: {name!r} is not a subclass of {base.__module__}.{base.__name__}")
    return cls


def get_policy(name: str) -> Policy:
    """A policy by registered name or ``module:Class`` import path; ValueError names --policy."""
    cls = POLICIES.get(name) or load_plugin(name, list(POLICIES), Policy, "--policy")
    return cls()  # type: ignore[no-any-return]
