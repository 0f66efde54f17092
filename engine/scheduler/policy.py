"""Scheduling policies: queue order, admission preemption and victims, as small plugins.

A policy ranks; it never mutates scheduler state. Select one by name (``--policy``) or by
import path (``package.module:Class``, a subclass of ``Policy``). Placement across workers is
a separate plugin (``engine.scheduler.placement``).

Built in:

- ``fcfs``: first come, first served; never preempts to admit.
- ``priority``: higher ``priority`` first, then arrival; a waiting request may preempt running
  requests of strictly lower priority when it cannot otherwise be admitted, a step that
  computes its prompt leaves them out (``exclusive_prefill``), and while it is on a worker
  they may fill at most 45% of the batch (``outranked_seq_share``).
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

from engine.scheduler.request import Request


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


class PriorityPolicy(Policy):
    name = "priority"
    preemptive = True
    exclusive_prefill = True
    outranked_seq_share = 0.45

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
