"""The frontend's connection to one pool (scheduler process), over ZeroMQ.

The pool binds; the client connects, so either may start first. ``add`` PUSHes an
``AddRequest`` and returns a ``RequestStream`` of that request's ``RequestOutput``s; one
background task PULLs ``PoolOutputs``, routes each output to its stream and keeps the latest
``PoolStats``. A stream always ends: with the pool's final output (a ``finish_reason``, or an
``error``, which is given ``finish_reason="error"``), with ``"abort"`` when aborted here, or
with an error when the client is closed or fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
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


class RequestStream:
    """The outputs of one request, in order; iteration ends after the final one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _put(self, out: RequestOutput) -> None:
        if not self.finished:
            self.finished = out.finish_reason is not None
            self.queue.put_nowait(out)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.queue.get()
            yield out
            if out.finish_reason is not None:
                return


class PoolClient:
    """Client side of one pool's request/output sockets. Create it inside a running loop."""

    def __init__(self, addresses: ipc.PoolAddresses, name: str = "pool",
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.name = name
        self.stats: PoolStats | None = None
        #: ``time.monotonic()`` when the latest stats arrived (health: is the pool alive?).
        self.stats_at: float | None = None
        #: Called with every PoolStats as it arrives (metrics, admission).
        self.stats_listeners: list[Callable[[PoolStats], None]] = []
        #: Requests the pool reported finished (any reason), cumulative: its drain rate.
        self.num_finished = 0
        #: Set once the pool's first stats arrived (it then has its live workers).
        self.has_stats = asyncio.Event()
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._push = ipc.make_socket(self._ctx, zmq.PUSH, addresses.requests, bind=False)
        self._pull = cast(zmq.asyncio.Socket,
                          ipc.make_socket(self._ctx, zmq.PULL, addresses.outputs, bind=False))
        self._streams: dict[str, RequestStream] = {}
        self._closed = False
        self._broken: str | None = None  # why the reader stopped, if it failed
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"pool-client-{name}")

    @property
    def broken(self) -> str | None:
        """Why the connection to the pool failed, or None while it works."""
        return self._broken

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def add(self, request: EngineRequest) -> RequestStream:
        """Send the request to the pool; its outputs arrive on the returned stream."""
        if self._closed or self._broken:
            raise RuntimeError(self._broken or f"pool client {self.name!r} is closed")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        stream = RequestStream(request.request_id)
        self._streams[request.request_id] = stream
        self._send(AddRequest(request=request))
        return stream

    def abort(self, request_ids: Iterable[str]) -> None:
        """Tell the pool to drop these requests; their open streams end with "abort"."""
        ids = list(request_ids)
        if not ids:
            return
        if not (self._closed or self._broken):
            self._send(AbortRequests(request_ids=ids))
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._put(RequestOutput(request_id=rid, new_token_ids=[],
                                          finish_reason="abort"))

    def fail_all(self, message: str) -> None:
        """End every open stream with an error (the pool is gone, or we are closing)."""
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            stream._put(RequestOutput(request_id=rid, new_token_ids=[],
                                      finish_reason="error", error=message))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.cancel()
        await asyncio.wait([self._reader])
        self.fail_all(f"pool client {self.name!r} closed")
        self._push.close()
        self._pull.close()

    def _send(self, msg: Any) -> None:
        # Unbounded high-water mark: a send never blocks, it completes (or queues) at once.
        self._push.send(ipc.encode(msg), copy=False)

    def _dispatch(self, msg: PoolOutputs) -> None:
        for out in msg.outputs:
            if out.finish_reason is not None:
                self.num_finished += 1
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted here already, or not ours
            if out.error and out.finish_reason is None:
                out = msgspec.structs.replace(out, finish_reason="error")
            if out.finish_reason is not None:
                del self._streams[out.request_id]
            stream._put(out)
        if msg.stats is not None:  # after the outputs, so listeners see them counted
            self.stats = msg.stats
            self.stats_at = time.monotonic()
            self.has_stats.set()
            for listener in self.stats_listeners:
                listener(msg.stats)

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
