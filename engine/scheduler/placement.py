"""Placement: which worker a request queues on, through pluggable scorers.

The scheduler allocated every block of every worker, so ``cached_prefix_tokens`` is exact:
what that worker's cache holds of the request's prompt right now.

Built in (``--placement``):

- ``cache-aware``: a weighted sum of scorers — the cached prefix (tokens the worker would not
  recompute), minus queued prefill tokens, running decodes and KV usage — with a hot-spot
  guard: a worker whose load exceeds ``hot_ratio`` times the least-loaded worker's (plus
  ``hot_slack`` tokens) loses its cache advantage, so one popular prefix cannot pile every
  request onto one worker.
- ``least-loaded``: fewest queued plus running requests, then fewest queued tokens.
- ``round-robin``: workers in turn, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from engine.scheduler.policy import load_plugin
from engine.scheduler.request import Request


class WorkerLoad(Protocol):
    """What placement may read about a worker (``engine.scheduler.worker_state.WorkerState``)."""

    worker_id: int

    @property
    def num_requests(self) -> int: ...

    @property
    def num_queued_tokens(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def kv_usage(self) -> float: ...

    def cached_prefix_tokens(self, req: Request) -> int: ...


class Placement:
    """Base class: score every worker, pick the highest (ties: lowest worker id)."""

    name = "base"

    def scores(self, req: Request, workers: Sequence[WorkerLoad]) -> dict[int, float]:
        raise NotImplementedError

    def choose(self, req: Request, workers: Sequence[WorkerLoad]) -> tuple[int, dict[int, float]]:
        """The chosen worker id and every worker's score (kept for the explanation)."""
        scores = self.scores(req, workers)
        best, best_score = -1, -math.inf
        for w, score in scores.items():  # once per request per worker: no key function
            if score > best_score or (score == best_score and w < best):
                best, best_score = w, score
        return best, scores


class LeastLoaded(Placement):
    name = "least-loaded"

    def scores(self, req: Request, workers: Sequence[WorkerLoad]) -> dict[int, float]:
        # Requests dominate; queued tokens break ties (scaled below one request).
        return {w.worker_id: -(w.num_requests + w.num_queued_tokens / 1e9) for w in workers}


class RoundRobin(Placement):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def scores(self, req: Request, workers: Sequence[WorkerLoad]) -> dict[int, float]:
        ids = sorted(w.worker_id for w in workers)
        pick = ids[self._next % len(ids)]
        self._next += 1
        return {w: 1.0 if w == pick else 0.0 for w in ids}


class CacheAware(Placement):
    name = "cache-aware"
    prefix_weight = 1.0  # per cached prompt token
    queue_weight = 1.0  # per queued prefill token
    decode_weight = 8.0  # per running request (a decode costs about this many prefill tokens)
    kv_weight = 64.0  # per unit of KV usage (0..1)
    hot_ratio = 2.0
    hot_slack = 256.0  # tokens of load every worker may carry before the guard applies

    def load(self, w: WorkerLoad) -> float:
        return w.num_queued_tokens + self.decode_weight * w.num_running

    def scores(self, req: Request, workers: Sequence[WorkerLoad]) -> dict[int, float]:
        loads = [self.load(w) for w in workers]
        hot_above = self.hot_ratio * min(loads) + self.hot_slack
        prefix_w, queue_w = self.prefix_weight, self.queue_weight
        decode_w, kv_w = self.decode_weight, self.kv_weight
        out = {}
        for w, load in zip(workers, loads, strict=True):
            cached = w.cached_prefix_tokens(req) if load <= hot_above else 0
            out[w.worker_id] = (prefix_w * cached - queue_w * w.num_queued_tokens
                                - decode_w * w.num_running - kv_w * w.kv_usage)
        return out


PLACEMENTS: dict[str, type[Placement]] = {
    cls.name: cls for cls in (CacheAware, LeastLoaded, RoundRobin)
}


def get_placement(name: str) -> Placement:
    """A placement by registered name or ``module:Class``; ValueError names --placement."""
    cls = PLACEMENTS.get(name) or load_plugin(name, list(PLACEMENTS), Placement, "--placement")
    return cls()  # type: ignore[no-any-return]
