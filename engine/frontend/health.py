"""Whether the engine can serve, told the same way by every API: ``GET /health``, the gRPC
``engine.v1.Engine/Health`` RPC and the standard ``grpc.health.v1.Health`` service (what
Kubernetes gRPC probes, Envoy and grpcurl ask).

A pool is healthy while its latest stats are fresh and count a live worker. A pool sends its
stats at least every ``engine.pool.service.STATS_INTERVAL_S`` (0.25 s), idle or not, so a
silence longer than ``STALE_AFTER_S`` (1 s, four heartbeats) means its scheduler process is
dead, stuck, or cut off from this frontend. The engine serves while every pool is healthy;
otherwise the reasons name each pool that is not, and why.

The engine may also be declared not serving as a whole (``report_not_serving``): when a
restart storm stops it, the launcher tells the frontend (``NotServing``), which says so with
the launcher's reason for a moment before everything stops, so probes and load balancers see
why the endpoint is going away.

The verdict is computed when asked (nothing is cached), except for ``grpc.health.v1``'s
``Watch``, which streams changes: ``StandardHealth.keep_fresh`` re-evaluates every
``WATCH_INTERVAL_S``, so a watcher hears of a death within ``STALE_AFTER_S +
WATCH_INTERVAL_S`` and of the recovery within ``WATCH_INTERVAL_S`` of the pool's next stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from engine.messages import PoolStats

if TYPE_CHECKING:
    from engine.frontend.serving import ServedModel

#: How often a pool sends its stats (``engine.pool.service.STATS_INTERVAL_S``).
POOL_HEARTBEAT_S = 0.25
#: A pool whose latest stats are older than this is down: four heartbeats missed.
STALE_AFTER_S = 1.0
#: How often ``grpc.health.v1`` watchers' status is re-evaluated.
WATCH_INTERVAL_S = 0.1

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class PoolHealth:
    name: str
    reason: str | None  # None: healthy
    stats: PoolStats | None  # the latest stats, however old
    age_s: float | None  # seconds since they arrived; None before the first

    @property
    def ok(self) -> bool:
        return self.reason is None


#: Set once by ``report_not_serving``: the engine is stopping, and why (process-wide: one
#: frontend per process, and the verdict only ever goes from serving to stopping).
_stopping: str | None = None


def report_not_serving(reason: str) -> None:
    """From now on every health API says NOT_SERVING with ``reason`` (the engine stops)."""
    global _stopping
    _stopping = reason


@dataclass(frozen=True)
class EngineHealth:
    pools: list[PoolHealth]
    stopping: str | None = None  # the engine is stopping, and why

    @property
    def ok(self) -> bool:
        return self.stopping is None and all(p.ok for p in self.pools)

    @property
    def reason(self) -> str | None:
        """Why the engine does not serve ("; "-joined: the engine's stop, then one per
        unhealthy pool), or None."""
        reasons = [p.reason for p in self.pools if p.reason is not None]
        if self.stopping is not None:
            reasons.insert(0, f"engine stopping: {self.stopping}")
        return "; ".join(reasons) or None


def pool_health(model: ServedModel, now: float) -> PoolHealth:
    pool = model.pool
    stats, at = pool.stats, pool.stats_at
    age = None if at is None else max(0.0, now - at)
    reason: str | None = None
    if pool.broken is not None:
        reason = pool.broken
    elif stats is None or age is None:
        reason = f"pool {model.name!r} has not reported yet"
    elif age > STALE_AFTER_S:
        reason = (f"pool {model.name!r} has not reported for {age:.1f} s (it reports every "
                  f"{POOL_HEARTBEAT_S:g} s): its scheduler is down, stuck or unreachable")
    elif stats.live_workers <= 0:
        reason = f"pool {model.name!r} has no live worker"
    return PoolHealth(model.name, reason, stats, age)


def check(models: Iterable[ServedModel], now: float | None = None) -> EngineHealth:
    """The engine's health now (``now`` on ``time.monotonic``'s clock)."""
    t = time.monotonic() if now is None else now
    return EngineHealth([pool_health(m, t) for m in models], _stopping)


class StandardHealth(grpc_health.aio.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` over ``check``: the same status for the whole server
    (service ``""``) and for each of ``services`` (the engine's service names). ``Check``
    evaluates at once, and sends the reason in the trailing metadata ``engine-health-reason``
    when NOT_SERVING; ``Watch`` streams every change (``keep_fresh`` must run)."""

    def __init__(self, models: Iterable[ServedModel], services: Iterable[str]) -> None:
        super().__init__()
        self.models = list(models)
        self.services = ("", *services)
        self._status: int | None = None

    async def refresh(self) -> EngineHealth:
        health = check(self.models)
        status = SERVING if health.ok else NOT_SERVING
        if status != self._status:
            self._status = status
            for name in self.services:
                await self.set(name, status)
        return health

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        health = await self.refresh()
        if health.reason is not None and request.service in self.services:
            context.set_trailing_metadata(
                (("engine-health-reason", health.reason.encode("ascii", "replace").decode()),))
        return await super().Check(request, context)

    async def keep_fresh(self, server: grpc.aio.Server) -> None:
        """Re-evaluate every ``WATCH_INTERVAL_S`` until ``server`` has stopped."""
        stopped = asyncio.ensure_future(server.wait_for_termination())
        try:
            while not stopped.done():
                await self.refresh()
                await asyncio.wait([stopped], timeout=WATCH_INTERVAL_S)
        finally:
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
