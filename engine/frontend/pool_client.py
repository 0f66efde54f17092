"""The frontend's connection to one pool (scheduler process), over ZeroMQ.

The pool binds; the client connects, so either may start first. ``add`` PUSHes an
``AddRequest`` and returns a ``RequestStream`` of that request's ``RequestOutput``s; one
background task PULLs ``PoolOutputs``, routes each output to its stream and keeps the latest
``PoolStats``. A stream always ends: with the pool's final output (a ``finish_reason``, or an
``error``, which is given ``finish_reason="error"``), with ``"abort"`` when aborted here, or
with an error when the client is closed or fails.

Pool death. The pool's stats carry its ``pool_incarnation``, drawn at start. Each stream keeps
its request and the tokens routed to it so far. When stats of a new incarnation arrive (the
launcher restarted the pool), every open stream is resubmitted as a continuation: the same
request with ``output_token_ids`` (the tokens already routed), so it goes on from its next
token: none repeated, none missing. A resubmission goes out under a new wire id
(``<id>+<n>``), so nothing of the earlier submission can reach its stream: late outputs of
the dead incarnation are dropped whole (their incarnation is a past one), and a copy of an
earlier ``AddRequest`` that ZeroMQ queued while the pool was down and delivered to the new
one is aborted there. A stream whose request was aborted here (its client left) is gone
and not resubmitted. Requests added while the pool is down are sent anyway (the new
incarnation gets them by resubmission); if no stats arrive for ``resume_timeout_s``, the
open streams end with an error and ``unavailable`` set (nothing waits forever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

from engine import ipc
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineRequest,
    PoolOutputs,
    PoolStats,
    RequestOutput,
)

log = logging.getLogger(__name__)


#: How often the client checks whether a silent pool has been gone too long.
WATCH_INTERVAL_S = 0.25


class RequestStream:
    """The outputs of one request, in order; iteration ends after the final one.

    ``output_token_ids``: every token routed to this stream, from whichever incarnation of
    the pool: what a continuation carries. ``wire_id``: the id of its latest submission.
    ``unavailable``: it ended because the pool could not be reached (nothing failed in it).
    """

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.request_id = request.request_id
        self.wire_id = request.request_id
        self.output_token_ids: list[int] = list(request.output_token_ids)
        self.num_submissions = 1
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self.unavailable = False
        self._ended = False  # the final output was handed out

    def _put(self, out: RequestOutput) -> None:
        if not self.finished:
            self.finished = out.finish_reason is not None
            self.output_token_ids += out.new_token_ids
            self.queue.put_nowait(out)

    def _continuation(self) -> EngineRequest:
        """The request to resubmit: a new wire id, the outputs so far."""
        self.num_submissions += 1
        self.wire_id = f"{self.request_id}+{self.num_submissions}"
        return msgspec.structs.replace(self.request, request_id=self.wire_id,
                                       output_token_ids=tuple(self.output_token_ids))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        # A plain awaitable, not an async generator: one frame less per streamed token.
        if self._ended:
            raise StopAsyncIteration
        out = await self.queue.get()
        self._ended = out.finish_reason is not None
        return out


class PoolClient:
    """Client side of one pool's request/output sockets. Create it inside a running loop."""

    def __init__(self, addresses: ipc.PoolAddresses, name: str = "pool",
                 ctx: zmq.asyncio.Context | None = None, *,
                 resume_timeout_s: float = 60.0, frontend_incarnation: int = 0) -> None:
        self.name = name
        #: This frontend process's incarnation, on every ``AddRequest`` (engine/pool/service.py:
        #: a pool told it died aborts its requests).
        self.frontend_incarnation = frontend_incarnation
        #: A pool silent this long takes its open streams down with it (503 to clients).
        self.resume_timeout_s = resume_timeout_s
        #: The pool incarnation the client talks to (None before its first stats).
        self.incarnation: int | None = None
        self._past_incarnations: set[int] = set()
        #: Requests resubmitted to a restarted pool, cumulative.
        self.num_resubmitted = 0
        self.stats: PoolStats | None = None
        #: ``time.monotonic()`` when the latest stats arrived (health: is the pool alive?).
        self.stats_at: float | None = None
        #: Called with every PoolStats as it arrives (metrics, admission).
        self.stats_listeners: list[Callable[[PoolStats], None]] = []
        #: Requests the pool reported finished (any reason), cumulative: its drain rate.
        self.num_finished = 0
        #: Requests added (``add``), cumulative: admission counts those admitted, not added yet.
        self.num_added = 0
        #: Set once the pool's first stats arrived (it then has its live workers).
        self.has_stats = asyncio.Event()
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._push = ipc.make_socket(self._ctx, zmq.PUSH, addresses.requests, bind=False)
        self._pull = cast(zmq.asyncio.Socket,
                          ipc.make_socket(self._ctx, zmq.PULL, addresses.outputs, bind=False))
        self._streams: dict[str, RequestStream] = {}  # by wire id
        self._by_id: dict[str, RequestStream] = {}  # the same streams, by request id
        self._closed = False
        self._broken: str | None = None  # why the reader stopped, if it failed
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop(), name=f"pool-client-{name}")
        self._watcher = loop.create_task(self._watch_loop(), name=f"pool-watch-{name}")

    @property
    def broken(self) -> str | None:
        """Why the connection to the pool failed, or None while it works."""
        return self._broken

    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def num_protected(self) -> int:
        """Open requests that are not sheddable (priority >= 0): what the latency guard of
        shedding protects (engine/frontend/guard.py). Counted when asked (admission asks
        only for sheddable requests, once nothing protected arrived recently)."""
        return sum(1 for s in self._by_id.values() if s.request.priority >= 0)

    def prefill_backlog(self) -> tuple[int, int]:
        """In-flight requests without a first token yet, and their tokens to compute (prompt,
        and a continuation's earlier outputs): the prefill work ahead, queued or running."""
        n = tokens = 0
        for s in self._streams.values():
            if len(s.output_token_ids) == len(s.request.output_token_ids):
                n += 1
                tokens += len(s.request.prompt_token_ids) + len(s.output_token_ids)
        return n, tokens

    def silent_for(self, now: float | None = None) -> float | None:
        """Seconds since the pool's latest stats (None before the first)."""
        if self.stats_at is None:
            return None
        return max(0.0, (time.monotonic() if now is None else now) - self.stats_at)

    def add(self, request: EngineRequest) -> RequestStream:
        """Send the request to the pool; its outputs arrive on the returned stream."""
        if self._closed or self._broken:
            raise RuntimeError(self._broken or f"pool client {self.name!r} is closed")
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already running")
        stream = RequestStream(request)
        self.num_added += 1
        self._streams[stream.wire_id] = self._by_id[stream.request_id] = stream
        self._send(AddRequest(request=request, frontend_incarnation=self.frontend_incarnation))
        return stream

    def abort(self, request_ids: Iterable[str]) -> None:
        """Tell the pool to drop these requests; their open streams end with "abort"."""
        ids = list(request_ids)
        if not ids:
            return
        streams = [s for s in (self._by_id.pop(rid, None) for rid in ids) if s is not None]
        if not (self._closed or self._broken):  # unknown ids too: the pool ignores them
            wire = {s.request_id: s.wire_id for s in streams}
            self._send(AbortRequests(request_ids=[wire.get(rid, rid) for rid in ids]))
        for stream in streams:
            del self._streams[stream.wire_id]
            stream._put(RequestOutput(request_id=stream.request_id, new_token_ids=[],
                                      finish_reason="abort"))

    def fail_all(self, message: str, *, unavailable: bool = True) -> None:
        """End every open stream with an error (the pool is gone, or we are closing)."""
        streams, self._streams, self._by_id = self._streams, {}, {}
        for stream in streams.values():
            stream.unavailable = unavailable
            stream._put(RequestOutput(request_id=stream.request_id, new_token_ids=[],
                                      finish_reason="error", error=message))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.cancel()
        self._watcher.cancel()
        await asyncio.wait([self._reader, self._watcher])
        self.fail_all(f"pool client {self.name!r} closed")
        self._push.close()
        self._pull.close()

    def _send(self, msg: Any) -> None:
        # Unbounded high-water mark: a send never blocks, it completes (or queues) at once.
        self._push.send(ipc.encode(msg), copy=False)

    def _dispatch(self, msg: PoolOutputs) -> None:
        incarnation = msg.stats.pool_incarnation if msg.stats is not None else 0
        if incarnation and incarnation != self.incarnation:
            if incarnation in self._past_incarnations:
                return  # a late message of a pool that died: its requests were resubmitted
            self._new_incarnation(incarnation)
        now = 0.0
        for out in msg.outputs:
            if out.timing is not None:  # a first token: when it was read here (Server-Timing)
                out.timing.received = now = now or time.time()
            if out.finish_reason is not None:
                self.num_finished += 1
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted here already, an earlier submission's, or not ours
            if out.error and out.finish_reason is None:
                out = msgspec.structs.replace(out, finish_reason="error")
            if out.finish_reason is not None:
                del self._streams[out.request_id]
                del self._by_id[stream.request_id]
            if out.request_id != stream.request_id:  # a resubmission: the caller's id
                out = msgspec.structs.replace(out, request_id=stream.request_id)
            stream._put(out)
        if msg.stats is not None:  # after the outputs, so listeners see them counted
            self.stats = msg.stats
            self.stats_at = time.monotonic()
            self.has_stats.set()
            for listener in self.stats_listeners:
                listener(msg.stats)

    def _new_incarnation(self, incarnation: int) -> None:
        """Stats of a pool process not heard before: the first, or a restarted one. A
        restarted pool lost every request: resubmit the open ones as continuations (a stale
        copy of an earlier submission, if ZeroMQ delivered one to it, is aborted first)."""
        previous, self.incarnation = self.incarnation, incarnation
        if previous is None:
            return
        self._past_incarnations.add(previous)
        streams = list(self._streams.values())
        log.warning("pool %s restarted (incarnation %x after %x): resubmitting %d requests",
                    self.name, incarnation, previous, len(streams))
        if not streams:
            return
        self._send(AbortRequests(request_ids=[s.wire_id for s in streams]))
        self._streams = {}
        for stream in streams:
            request = stream._continuation()
            self._streams[stream.wire_id] = stream
            self._send(AddRequest(request=request, frontend_incarnation=self.frontend_incarnation))
        self.num_resubmitted += len(streams)

    async def _watch_loop(self) -> None:
        """End the open streams when the pool has been silent for ``resume_timeout_s``: it
        died and was not restarted in time (or is stuck)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            silent = self.silent_for()
            if self._streams and silent is not None and silent > self.resume_timeout_s:
                log.error("pool %s silent for %.1f s: failing %d requests", self.name,
                          silent, len(self._streams))
                self.fail_all(f"pool {self.name!r} is down: no report for {silent:.0f} s")

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._pull.recv()
                try:
                    msg = ipc.POOL_TO_FRONTEND.decode(frame)
                except msgspec.DecodeError as e:
                    log.error("pool %s sent an undecodable frame: %s", self.name, e)
                    continue
                self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken socket: no stream may hang on it
            log.exception("pool %s reader failed", self.name)
            self._broken = f"connection to pool {self.name!r} failed: {e}"
            self.fail_all(self._broken)
