"""The HTTP server: the OpenAI-compatible API (``engine.frontend.openai_server``) as a
FastAPI app on uvicorn, on the frontend's event loop beside the gRPC server.

The app refuses bodies over ``--max-request-bytes`` (413) before parsing them, reshapes every
error (FastAPI's validation errors and Starlette's own refusals included) into OpenAI's
error JSON, and serves ``/health``, ``/metrics`` and ``/openapi.json`` beside ``/v1/*``, and
``/server_info`` / ``/model_info`` for routers (``engine.frontend.discovery``).
See docs/http.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.frontend import discovery
from engine.frontend.early_shed import EarlyShed
from engine.frontend.metrics import CONTENT_TYPE
from engine.frontend.openai_format import ApiError, bad_request
from engine.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.openai_stream import ClientGone
from engine.frontend.serving import InvalidRequest

log = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection is kept open. It must outlast every client's own
#: idle timeout: a client reuses a connection it believes open, and if the server closed it
#: a moment before, that request meets a reset and gets no response. uvicorn's default, 5 s,
#: is exactly httpx's keepalive_expiry, and the server's timer starts first (when it sent
#: the response, before the client read it): under load a few requests in a thousand hit
#: that window (docs/http.md, "Keep-alive"). Above Go's and reqwest's 90 s (Envoy-based
#: gateways and routers pool upstream connections that long) and nginx's 75 s.
KEEP_ALIVE_TIMEOUT_S = 120


# --------------------------------------------------------------------------- ASGI wiring


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 (OpenAI's error shape) before the
    app parses them: at once when ``Content-Length`` says so, else as soon as the bytes
    received pass the limit.

    The client still gets the 413 even though it sends its whole body before reading: uvicorn
    keeps the connection open after the response and drops the rest of that body as it
    arrives (tests/frontend/test_http_limits.py checks it, 8 MiB over). A client that sent
    ``Expect: 100-continue`` gets no ``100 Continue``, so it never sends the body; its 413
    closes the connection, whose next bytes would otherwise be taken for that body.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[Message] = []
        size = 0
        while not too_big:
            message = await receive()
            chunks.append(message)
            size += len(message.get("body", b""))
            too_big = size > self.limit
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if too_big:
            expecting = headers.get(b"expect", b"").lower() == b"100-continue" and not chunks
            err = ApiError(413, f"request body larger than --max-request-bytes {self.limit}",
                           "invalid_request_error", "request_too_large",
                           headers={"connection": "close"} if expecting else None)
            await err.response()(scope, receive, send)
            return

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="engine", version="0.1.0",
                  description="OpenAI-compatible API of the engine (see docs/http.md)")

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(InvalidRequest)
    async def invalid(_request: Request, e: InvalidRequest) -> Response:
        return bad_request(e.message, e.param).response()

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        parts = []
        if errors and errors[0].get("type") == "json_invalid":
            return bad_request(f"the request body is not valid JSON: "
                               f"{errors[0].get('ctx', {}).get('error', '')}").response()
        for err in errors[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors \
            else None
        return bad_request("; ".join(parts) or "invalid request body", param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        # Starlette's own refusals (no route, wrong method, an unreadable body), reshaped.
        if e.status_code == 404:
            return ApiError(404, f"no route {request.url.path}", "not_found_error").response()
        if e.status_code == 405:
            return ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                            "invalid_request_error").response()
        type_ = "invalid_request_error" if e.status_code < 500 else "internal_error"
        return ApiError(e.status_code, str(e.detail), type_, headers=dict(e.headers or {})
                        ).response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return server.list_models(request)

    @app.get("/health")
    async def health() -> Response:
        return server.health()

    @app.get("/server_info")
    async def server_info(request: Request) -> dict[str, Any]:
        server.authenticate(request)  # as /v1/models: it names the model paths
        return discovery.server_info(server.models, {
            name: load.max_num_seqs for name, load in server.admission.loads.items()})

    @app.get("/model_info")
    async def model_info(request: Request, model: str | None = None) -> dict[str, Any]:
        server.authenticate(request)
        return discovery.model_info(server._model(model))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(EarlyShed, server=server)  # inside BodyLimit: 413 comes first
    app.add_middleware(BodyLimit, limit=server.cfg.max_request_bytes)
    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the frontend process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class HttpServer:
    server: _Server
    task: asyncio.Task[None]
    port: int

    async def stop(self, grace_s: float) -> None:
        self.server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), grace_s)
        self.server.force_exit = True
        await self.task


async def start_http_server(server: OpenAIServer, host: str, port: int) -> HttpServer:
    """Bind (``port=0`` picks one) and serve on the running loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle's algorithm holds a response's body behind its headers until the
    # client's delayed ACK (~40 ms per keep-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {e.strerror}") from e
    bound = sock.getsockname()[1]
    config = uvicorn.Config(build_app(server), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1, lifespan="off",
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S)
    srv = _Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]), name="http-server")
    while not srv.started:
        if task.done():
            task.result()
            raise OSError("the HTTP server stopped during startup")
        await asyncio.sleep(0.01)
    log.info("HTTP serving on %s:%d", host, bound)
    return HttpServer(srv, task, bound)

