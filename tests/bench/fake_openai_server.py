"""A small OpenAI-compatible streaming server with known delays, for the load generator tests.

``POST /v1/completions`` streams ``max_tokens`` token events, the first ``TTFT_S`` after the
request and the next ones ``ITL_S`` apart, then a usage chunk (prompt tokens, completion
tokens, and ``cached_tokens`` = half the prompt) and ``[DONE]``. The first prompt token picks
another behaviour (see ``Behaviour``), so one workload can hit every outcome. ``serve()`` runs
it under uvicorn on a free port in a background thread; it keeps every request body and
``Authorization`` header it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TTFT_S = 0.1
ITL_S = 0.03
RETRY_AFTER_S = 2


class Behaviour:
    """First prompt token -> what the server does; any other token (below 1,000,000, so any
    generated workload's) gets a normal stream."""

    RATE_LIMITED = 1_000_429  # HTTP 429 with Retry-After
    SERVER_ERROR = 1_000_500  # HTTP 500
    HANG = 1_000_408  # HTTP 200, then nothing: the client times out
    ERROR_EVENT = 1_000_001  # one token, then an error event
    TRUNCATED = 1_000_002  # one token, then the connection closes without [DONE]


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # {"body": ..., "authorization": ...}
        self.app = Starlette(routes=[Route("/v1/completions", self.completions,
                                           methods=["POST"])])

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.received.append({"body": body,
                              "authorization": request.headers.get("authorization")})
        prompt: list[int] = body["prompt"]
        match prompt[0]:
            case Behaviour.RATE_LIMITED:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=429,
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
            case Behaviour.SERVER_ERROR:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        return StreamingResponse(self._events(prompt, body["max_tokens"]),
                                 media_type="text/event-stream")

    async def _events(self, prompt: list[int], max_tokens: int) -> AsyncIterator[str]:
        if prompt[0] == Behaviour.HANG:
            await asyncio.sleep(60)
        start = time.perf_counter()
        for i in range(max_tokens):
            # sleep to an absolute deadline, so that scheduling noise does not accumulate
            await asyncio.sleep(max(0.0, start + TTFT_S + i * ITL_S - time.perf_counter()))
            last = i == max_tokens - 1
            yield _event({"choices": [{"index": 0, "text": f" t{i}",
                                       "finish_reason": "length" if last else None}]})
            if prompt[0] == Behaviour.ERROR_EVENT:
                yield _event({"error": {"message": "worker died", "code": 500}})
                return
            if prompt[0] == Behaviour.TRUNCATED:
                return
        yield _event({"choices": [], "usage": {
            "prompt_tokens": len(prompt), "completion_tokens": max_tokens,
            "total_tokens": len(prompt) + max_tokens,
            "prompt_tokens_details": {"cached_tokens": len(prompt) // 2}}})
        yield "data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@contextlib.contextmanager
def serve() -> Iterator[tuple[str, FakeOpenAIServer]]:
    """Run a fake server on a free port: (its base URL, the server)."""
    fake = FakeOpenAIServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        host, port = sock.getsockname()
        yield f"http://{host}:{port}", fake
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
