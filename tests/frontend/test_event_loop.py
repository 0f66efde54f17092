"""The frontend's event loop: uvloop's where installed (engine/frontend/process.py), and the
frontend's ZeroMQ sockets work on it (the pool client's and the launcher's control socket).
gRPC and HTTP on it are covered end to end (tests/e2e)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from engine.frontend.process import loop_factory


def test_the_frontend_loop_is_uvloop_and_carries_zmq():
    uvloop = pytest.importorskip("uvloop")
    factory = loop_factory()
    assert factory is uvloop.new_event_loop

    async def roundtrip() -> tuple[type, bytes]:
        ctx = zmq.asyncio.Context()
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        try:
            port = a.bind_to_random_port("tcp://127.0.0.1")
            b.connect(f"tcp://127.0.0.1:{port}")
            await b.send(b"ping")
            got = await asyncio.wait_for(a.recv(), 5)
            return type(asyncio.get_running_loop()), got
        finally:
            a.close(0)
            b.close(0)
            ctx.term()

    with asyncio.Runner(loop_factory=factory) as runner:
        loop_type, got = runner.run(roundtrip())
    assert loop_type is uvloop.Loop and got == b"ping"
