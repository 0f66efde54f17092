"""Scheduling policies: small plugins that decide queue order, victims and placement.

A policy never mutates scheduler state; it only ranks. Select one by name (``--policy``);
``get_policy`` also loads a third-party class by import path (``package.module:Class``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol

from engine.scheduler.request import Request


class WorkerLoad(Protocol):
    """What placement may read about a worker (``engine.scheduler.scheduler.WorkerState``)."""

    worker_id: int

    @property
    def num_requests(self) -> int: ...

    @property
    def num_queued_tokens(self) -> int: ...


class Policy:
    """First come, first served with least-loaded placement. Subclass to change any part."""

    name = "fcfs"

    def queue_key(self, req: Request) -> tuple[float, ...]:
        """Sort key of the waiting queue: smaller runs first."""
        return (req.arrival_time,)

    def choose_victim(self, candidates: Sequence[Request]) -> Request:
        """Which running request to preempt when blocks run out: the latest admitted."""
        return candidates[-1]

    def place(self, req: Request, workers: Sequence[WorkerLoad]) -> int:
        """The worker a new (or re-placed) request queues on: the least loaded."""
        best = min(workers, key=lambda w: (w.num_requests, w.num_queued_tokens, w.worker_id))
        return best.worker_id


POLICIES: dict[str, type[Policy]] = {"fcfs": Policy}


def get_policy(name: str) -> Policy:
    """A policy by registered name or ``module:Class`` import path; ValueError names --policy."""
    if name in POLICIES:
        return POLICIES[name]()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--policy: cannot load {name!r}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ValueError(f"--policy: {name!r} is not a subclass of engine.scheduler.Policy")
        return cls()
    raise ValueError(f"--policy: unknown policy {name!r}; known: {sorted(POLICIES)} "
                     "or an import path module:Class")
