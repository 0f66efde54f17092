"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), on the frontend's event loop beside
the gRPC server.

A request goes through, in order: the body-size limit, the API key (``/v1/*`` only), body
validation, model routing (404 ``model_not_found``), prompt and output limits, the key's
rate limit, load shedding of sheddable requests (429 + ``Retry-After``); then it reaches its
pool. The response status is committed only when the first token exists (or the request
failed), so a request that waits longer than ``--max-queue-time`` gets a real 503, even
when streaming. Every refusal is an OpenAI-shaped error, never a 5xx for bad input. A client
that disconnects, streaming or not, aborts its request in the pool at once.

See docs/http.md for the endpoints, the extensions and the admission rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.chat import NoChatTemplate, chat_prompt_ids
from engine.config import FrontendConfig
from engine.frontend.admission import Admission, Refusal
from engine.frontend.metrics import CONTENT_TYPE, EngineMetrics
from engine.frontend.openai_protocol import (
    KNOWN_NO_OPS,
    ChatCompletionRequest,
    CompletionRequest,
)
from engine.frontend.serving import (
    Delta,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    ModelRegistry,
    ServedModel,
    check,
    check_token_ids,
    encode_text,
    engine_request,
    generate,
    resolve_max_tokens,
    sampling_params,
)
from engine.messages import EngineRequest

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-request-priority"
MAX_N = 128


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers = param, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", None, param)


def refusal_error(r: Refusal) -> ApiError:
    headers = {"Retry-After": r.retry_after} if r.retry_after else {}
    if r.status == 429:
        return ApiError(429, r.message, "rate_limit_error", "rate_limit_exceeded",
                        headers=headers)
    return ApiError(r.status, r.message, "service_unavailable", r.reason, headers=headers)


# --------------------------------------------------------------------------- choices


@dataclass
class Choice:
    """One generation of a response; ``index`` is ``prompt * n + sample``, OpenAI's order."""

    index: int
    request: EngineRequest
    prompt_text: str | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.token_ids += d.token_ids
        if d.logprobs:
            self.logprobs += d.logprobs
        if d.top_logprobs:
            self.top_logprobs += d.top_logprobs
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
        if d.usage is not None:
            self.cached_tokens = d.usage.cached_tokens


class Merged:
    """The deltas of several generations, interleaved as they arrive: ``(choice, delta)``.

    ``aclose`` (also on cancellation) stops every generation still running, which aborts
    it in its pool.
    """

    def __init__(self, model: ServedModel, choices: Sequence[Choice],
                 metrics: EngineMetrics) -> None:
        self._queue: asyncio.Queue[tuple[Choice, Delta | Exception | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(model, c, metrics)) for c in choices]
        self._open = len(choices)

    async def _pump(self, model: ServedModel, choice: Choice, metrics: EngineMetrics) -> None:
        try:
            async for delta in generate(model, choice.request, metrics):
                self._queue.put_nowait((choice, delta))
            self._queue.put_nowait((choice, None))
        except Exception as e:  # delivered to the consumer (cancellation propagates)
            self._queue.put_nowait((choice, e))

    async def next(self) -> tuple[Choice, Delta] | None:
        """The next delta, or None when every generation has ended."""
        while self._open:
            choice, item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            return choice, item
        return None

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --------------------------------------------------------------------------- the API


class OpenAIServer:
    """Request handling, independent of the ASGI wiring (``build_app``)."""

    def __init__(self, models: ModelRegistry, cfg: FrontendConfig, admission: Admission,
                 metrics: EngineMetrics) -> None:
        self.models = models
        self.cfg = cfg
        self.metrics = metrics
        self.admission = admission

    # -- admission

    def authenticate(self, request: Request) -> str:
        key = self.admission.keys.check(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", "invalid_api_key")
        return key

    def _model(self, name: str | None) -> ServedModel:
        try:
            return self.models.get(name)
        except ModelNotFound as e:
            raise ApiError(404, e.message, "not_found_error", "model_not_found",
                           "model") from e

    def _priority(self, body: Any, request: Request) -> int:
        if body.priority is not None:
            return int(body.priority)
        header = request.headers.get(PRIORITY_HEADER)
        if header is None:
            return 0
        try:
            return int(header)
        except ValueError:
            raise bad_request(f"header {PRIORITY_HEADER} must be an integer, got {header!r}",
                              PRIORITY_HEADER) from None

    def _admit(self, key: str, model: ServedModel, choices: Sequence[Choice],
               priority: int) -> None:
        cost = sum(len(c.request.prompt_token_ids) + c.request.sampling.max_tokens
                   for c in choices)
        refusal = self.admission.admit(key, model.name, priority, cost)
        if refusal is not None:
            self.metrics.count_refused(model.name, refusal.reason, priority)
            raise refusal_error(refusal)

    def _check_limits(self, model: ServedModel, prompt_ids: Sequence[int],
                      max_tokens: int | None, param: str) -> int:
        limit = self.cfg.max_prompt_tokens
        check(limit is None or len(prompt_ids) <= limit, f"prompt has {len(prompt_ids)} "
              f"tokens, more than --max-prompt-tokens {limit}", "prompt")
        out_limit = self.cfg.max_output_tokens
        check(out_limit is None or max_tokens is None or max_tokens <= out_limit,
              f"{param} {max_tokens} is more than --max-output-tokens {out_limit}", param)
        return resolve_max_tokens(max_tokens, len(prompt_ids), model.info.max_model_len, param)

    # -- shared by both endpoints

    def _sampling(self, body: Any, model: ServedModel, logprobs: int | None) -> Any:
        check(1 <= body.n <= MAX_N, f"n must be in [1, {MAX_N}], got {body.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(body, name)
            check(not value, f"{name} is not supported (use repetition_penalty)", name)
        check(not body.logit_bias, "logit_bias is not supported", "logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return sampling_params(
            vocab_size=model.info.vocab_size, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, min_tokens=body.min_tokens, seed=body.seed, stop=stop,
            stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos,
            logprobs=logprobs, repetition_penalty=body.repetition_penalty)

    def _choices(self, body: Any, model: ServedModel, prompts: Sequence[list[int]],
                 max_tokens: int | None, param: str, logprobs: int | None,
                 priority: int, base_id: str) -> list[Choice]:
        sampling = self._sampling(body, model, logprobs)
        choices = []
        for p, ids in enumerate(prompts):
            limit = self._check_limits(model, ids, max_tokens, param)
            for i in range(body.n):
                s = sampling
                if s.seed is not None and body.n > 1:  # n distinct samples, reproducibly
                    s = msgspec.structs.replace(s, seed=s.seed + i)
                req = engine_request(model, f"{base_id}-{p}-{i}", ids, s, limit,
                                     priority=priority, tenant=body.user or "",
                                     cache_salt=body.cache_salt or "")
                choices.append(Choice(index=p * body.n + i, request=req))
        return choices

    def _warn_unknown(self, body: Any) -> None:
        extra = set(body.model_extra or {}) - KNOWN_NO_OPS
        if extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(extra)))

    async def _start(self, model: ServedModel, choices: Sequence[Choice],
                     request: Request) -> tuple[Merged, tuple[Choice, Delta] | None]:
        """Start every generation and wait for the first delta (the status is committed
        then): 503 after ``--max-queue-time`` without one, or if the pool is unreachable.
        A client that disconnects meanwhile aborts everything."""
        merged = Merged(model, choices, self.metrics)
        try:
            first = await _unless_disconnected(
                request, asyncio.wait_for(merged.next(), self.cfg.max_queue_time_s))
        except TimeoutError:
            await merged.aclose()
            self.metrics.count_refused(model.name, "queue_timeout", choices[0].request.priority)
            raise ApiError(503, f"no capacity: the request waited --max-queue-time "
                           f"{self.cfg.max_queue_time_s} s without being served; retry later",
                           "service_unavailable", "queue_timeout",
                           headers={"Retry-After": "1"}) from None
        except GenerationFailed as e:
            await merged.aclose()
            raise _failed(e) from e
        except BaseException:
            await merged.aclose()
            raise
        return merged, first

    async def _respond(self, request: Request, body: Any, model: ServedModel,
                       choices: list[Choice], kind: str) -> Response:
        merged, first = await self._start(model, choices, request)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        fmt_class = _ChatFormat if kind == "chat" else _TextFormat
        fmt = fmt_class(rid, created, model, body)
        if body.stream:
            return StreamingResponse(_sse(merged, first, choices, fmt, body),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await _unless_disconnected(request, _collect(merged, first))
        except GenerationFailed as e:
            raise _failed(e) from e
        finally:
            await merged.aclose()
        return JSONResponse(fmt.full(choices, _usage(choices)))

    # -- endpoints

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        key = self.authenticate(request)
        self._warn_unknown(body)
        model = self._model(body.model)
        check(body.best_of in (None, 1), "best_of > 1 is not supported", "best_of")
        check(body.suffix is None, "suffix is not supported", "suffix")
        check(body.logprobs is None or 0 <= body.logprobs <= 5,
              f"logprobs must be in [0, 5], got {body.logprobs}", "logprobs")
        prompts, texts = self._prompts(body.prompt, model)
        priority = self._priority(body, request)
        choices = self._choices(body, model, prompts, body.max_tokens, "max_tokens",
                                body.logprobs, priority, "cmpl")
        for c in choices:
            c.prompt_text = texts[c.index // body.n] if body.echo else None
        self._admit(key, model, choices, priority)
        return await self._respond(request, body, model, choices, "text")

    def _prompts(self, prompt: Any, model: ServedModel) -> tuple[list[list[int]], list[str]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        check(bool(items), "prompt is empty", "prompt")
        check(len(items) <= MAX_N, f"at most {MAX_N} prompts per request", "prompt")
        ids, texts = [], []
        for item in items:
            if isinstance(item, str):
                ids.append(encode_text(model, item))
                texts.append(item)
            else:
                ids.append(check_token_ids(model, item))
                texts.append(_decode(model, ids[-1]))
        return ids, texts

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        key = self.authenticate(request)
        self._warn_unknown(body)
        model = self._model(body.model)
        check(not body.tools, "tools are not supported", "tools")
        check(body.top_logprobs is None or 0 <= body.top_logprobs <= 20,
              f"top_logprobs must be in [0, 20], got {body.top_logprobs}", "top_logprobs")
        check(not body.top_logprobs or body.logprobs,
              "top_logprobs needs logprobs: true", "top_logprobs")
        check(body.max_tokens is None or body.max_completion_tokens is None
              or body.max_tokens == body.max_completion_tokens,
              "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
        messages = [{"role": m.role, "content": _content(m.content)}
                    | ({"name": m.name} if m.name else {}) for m in body.messages]
        try:
            ids = chat_prompt_ids(model.tokenizer, messages, body.add_generation_prompt)
        except NoChatTemplate as e:
            raise bad_request(str(e), "messages") from e
        except Exception as e:  # the template itself refused (e.g. role order)
            raise bad_request(f"the chat template failed on these messages: {e}",
                              "messages") from e
        check(bool(ids), "messages render to an empty prompt", "messages")
        priority = self._priority(body, request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        choices = self._choices(body, model, [ids], max_tokens, param,
                                (body.top_logprobs or 0) if body.logprobs else None, priority,
                                "chatcmpl")
        self._admit(key, model, choices, priority)
        return await self._respond(request, body, model, choices, "chat")

    def list_models(self, request: Request) -> dict[str, Any]:
        self.authenticate(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "engine",
             "root": str(m.info.path), "max_model_len": m.info.max_model_len}
            for m in self.models]}

    def health(self) -> Response:
        pools = {}
        ok = True
        for m in self.models:
            stats = m.pool.stats
            live = stats.live_workers if stats is not None else 0
            pools[m.name] = {"live_workers": live,
                             "num_waiting": stats.num_waiting if stats else 0,
                             "num_running": stats.num_running if stats else 0,
                             "predicted_wait_s": _finite(self.admission.loads[m.name].predicted_wait())}
            ok = ok and live > 0
        return JSONResponse({"status": "ok" if ok else "unavailable", "pools": pools},
                            status_code=200 if ok else 503)


def _finite(x: float) -> float | None:
    return x if x != float("inf") else None


def _failed(e: GenerationFailed) -> ApiError:
    if e.unavailable:
        return ApiError(503, str(e), "service_unavailable", "pool_unavailable",
                        headers={"Retry-After": "1"})
    return ApiError(500, f"the engine failed the request: {e}", "internal_error")


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _decode(model: ServedModel, ids: Sequence[int]) -> str:
    return str(model.tokenizer.decode(list(ids)))


def _usage(choices: Sequence[Choice]) -> dict[str, Any]:
    # Every choice of one prompt shares the prompt: count it once per prompt.
    prompts: dict[tuple[int, ...], Choice] = {}
    for c in choices:
        prompts.setdefault(c.request.prompt_token_ids, c)
    prompt = sum(len(p) for p in prompts)
    cached = sum(c.cached_tokens for c in prompts.values())
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _collect(merged: Merged, first: tuple[Choice, Delta] | None) -> None:
    item = first
    while item is not None:
        choice, delta = item
        choice.add(delta)
        item = await merged.next()


class ClientGone(Exception):
    """The client disconnected before its response started."""


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``await work``, unless the client disconnects first: then cancel it (which aborts
    its generations) and raise ``ClientGone``. After the body was read, ``receive`` only
    ever yields ``http.disconnect``."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _sse(merged: Merged, first: tuple[Choice, Delta] | None, choices: list[Choice],
               fmt: Any, body: Any) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        for chunk in fmt.opening(choices):
            yield _event(chunk)
        item = first
        while item is not None:
            choice, delta = item
            choice.add(delta)
            yield _event(fmt.chunk(choice, delta))
            item = await merged.next()
        if include_usage:
            yield _event(fmt.usage_chunk(_usage(choices)))
    except GenerationFailed as e:
        err = _failed(e)
        yield _event({"error": {"message": err.message, "type": err.type, "param": None,
                                "code": err.code}})
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Format:
    def __init__(self, rid: str, created: int, model: ServedModel, body: Any) -> None:
        self.head = {"id": rid, "object": "", "created": created, "model": model.name}
        self.tokenizer = model.tokenizer
        self.logprobs = body.logprobs is not None and body.logprobs is not False

    def token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


class _TextFormat(_Format):
    """``/v1/completions`` response bodies."""

    def __init__(self, rid: str, created: int, model: ServedModel, body: Any) -> None:
        super().__init__(rid, created, model, body)
        self.head["object"] = "text_completion"

    def _logprobs(self, ids: Sequence[int], lps: Sequence[float],
                  top: Sequence[Sequence[tuple[int, float]]] | None) -> Any:
        if not self.logprobs:
            return None
        tops: list[Any] = ([{self.token(t): lp for t, lp in row} for row in top] if top
                           else [None] * len(ids))
        return {"tokens": [self.token(t) for t in ids], "token_logprobs": list(lps),
                "top_logprobs": tops, "text_offset": []}

    def opening(self, choices: Sequence[Choice]) -> list[dict[str, Any]]:
        echo = [c for c in choices if c.prompt_text]
        return [{**self.head, "choices": [{"index": c.index, "text": c.prompt_text,
                                           "logprobs": None, "finish_reason": None}]}
                for c in echo]

    def chunk(self, c: Choice, d: Delta) -> dict[str, Any]:
        return {**self.head, "choices": [{
            "index": c.index, "text": d.text,
            "logprobs": self._logprobs(d.token_ids, d.logprobs or [], d.top_logprobs),
            "finish_reason": d.finish_reason}]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    def full(self, choices: Sequence[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [{
            "index": c.index, "text": (c.prompt_text or "") + "".join(c.text),
            "logprobs": self._logprobs(c.token_ids, c.logprobs, c.top_logprobs),
            "finish_reason": c.finish_reason} for c in choices], "usage": usage}


class _ChatFormat(_Format):
    """``/v1/chat/completions`` response bodies."""

    def __init__(self, rid: str, created: int, model: ServedModel, body: Any) -> None:
        super().__init__(rid, created, model, body)
        self.head["object"] = "chat.completion"
        self.chunk_head = {**self.head, "object": "chat.completion.chunk"}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, ids: Sequence[int], lps: Sequence[float],
                  top: Sequence[Sequence[tuple[int, float]]] | None) -> Any:
        if not self.logprobs:
            return None
        rows = top or [()] * len(ids)
        return {"content": [{**self._entry(t, lp),
                             "top_logprobs": [self._entry(a, b) for a, b in row]}
                            for t, lp, row in zip(ids, lps, rows, strict=False)]}

    def opening(self, choices: Sequence[Choice]) -> list[dict[str, Any]]:
        return [{**self.chunk_head, "choices": [{
            "index": c.index, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None}]} for c in choices]

    def chunk(self, c: Choice, d: Delta) -> dict[str, Any]:
        return {**self.chunk_head, "choices": [{
            "index": c.index, "delta": {"content": d.text} if d.text else {},
            "logprobs": self._logprobs(d.token_ids, d.logprobs or [], d.top_logprobs),
            "finish_reason": d.finish_reason}]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.chunk_head, "choices": [], "usage": usage}

    def full(self, choices: Sequence[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [{
            "index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": self._logprobs(c.token_ids, c.logprobs, c.top_logprobs),
            "finish_reason": c.finish_reason} for c in choices], "usage": usage}


# --------------------------------------------------------------------------- ASGI wiring


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 400 before the app parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
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
            err = bad_request(f"request body larger than --max-request-bytes {self.limit}")
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

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

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
                            timeout_graceful_shutdown=1, lifespan="off")
    srv = _Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]), name="http-server")
    while not srv.started:
        if task.done():
            task.result()
            raise OSError("the HTTP server stopped during startup")
        await asyncio.sleep(0.01)
    log.info("HTTP serving on %s:%d", host, bound)
    return HttpServer(srv, task, bound)

