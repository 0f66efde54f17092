"""Handling of the OpenAI-compatible API's requests, independent of the ASGI wiring
(``engine.frontend.http_server``).

A request goes through, in order: the API key (``/v1/*`` only), body validation, model
routing (404 ``model_not_found``), prompt and output limits, the key's rate limit, load
shedding of sheddable requests (429 + ``Retry-After``); then it reaches its pool. The
response status is committed only when the first token exists (or the request failed), so a
request that waits longer than ``--max-queue-time`` gets a real 503, even when streaming.
Every refusal is an OpenAI-shaped error, never a 5xx for bad input. A client that
disconnects, streaming or not, aborts its request in the pool at once.

See docs/http.md for the endpoints, the extensions and the admission rules.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.chat import NoChatTemplate, chat_prompt_ids
from engine.config import FrontendConfig
from engine.frontend.admission import Admission
from engine.frontend.health import STALE_AFTER_S
from engine.frontend.health import check as check_health
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_format import (
    ApiError,
    ChatFormat,
    Choice,
    TextFormat,
    bad_request,
    failed_error,
    refusal_error,
    usage,
)
from engine.frontend.openai_protocol import (
    DEFAULT_ONLY,
    KNOWN_NO_OPS,
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    unsupported_field,
)
from engine.frontend.openai_stream import Generations, collect, sse, start, unless_disconnected
from engine.frontend.serving import (
    Delta,
    GenerationFailed,
    ModelNotFound,
    ModelRegistry,
    ServedModel,
    check,
    check_token_ids,
    encode_text,
    engine_request,
    resolve_max_tokens,
    sampling_params,
)
from engine.frontend.structured import structured_output
from engine.frontend.timing import HEADER as TIMING_HEADER
from engine.frontend.timing import note, pool_stages, server_timing, stamp
from engine.frontend.tools import (
    ToolPlan,
    constrain,
    plan_tools,
    template_messages,
    warn_if_template_ignores_tools,
)
from engine.messages import SamplingParams

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-request-priority"
MAX_N = 128

#: A request body of either endpoint (what their shared steps read).
Body = CompletionRequest | ChatCompletionRequest


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

    def _priority(self, body: Body, request: Request) -> int:
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
        refusal = self.admission.admit(key, model.name, priority, cost,
                                       [c.request for c in choices])
        if refusal is not None:
            self.metrics.count_refused(model.name, refusal.reason, priority)
            raise refusal_error(refusal)

    def _tokenized(self, request: Request, model: ServedModel) -> None:
        """Stamp the end of tokenization, and the queue wait predicted for the request."""
        stamp(request.scope, "tokenized")
        note(request.scope, "predicted", self.admission.loads[model.name].predicted_wait())

    def _check_limits(self, model: ServedModel, prompt_ids: Sequence[int],
                      max_tokens: int | None, param: str, allow_zero: bool) -> int:
        limit = self.cfg.max_prompt_tokens
        check(limit is None or len(prompt_ids) <= limit, f"prompt has {len(prompt_ids)} "
              f"tokens, more than --max-prompt-tokens {limit}", "prompt")
        out_limit = self.cfg.max_output_tokens
        check(out_limit is None or max_tokens is None or max_tokens <= out_limit,
              f"{param} {max_tokens} is more than --max-output-tokens {out_limit}", param)
        return resolve_max_tokens(max_tokens, len(prompt_ids), model.info.max_model_len, param,
                                  allow_zero=allow_zero)

    # -- shared by both endpoints

    def _sampling(self, body: Body, model: ServedModel, logprobs: int | None,
                  prompt_logprobs: int | None) -> SamplingParams:
        check(1 <= body.n <= MAX_N, f"n must be in [1, {MAX_N}], got {body.n}", "n")
        check(body.prompt_logprobs is None or not body.stream,
              "prompt_logprobs are not available with stream", "prompt_logprobs")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return sampling_params(
            vocab_size=model.info.vocab_size, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, min_tokens=body.min_tokens, seed=body.seed, stop=stop,
            stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos,
            logprobs=logprobs, repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias, allowed_token_ids=body.allowed_token_ids,
            prompt_logprobs=prompt_logprobs)

    async def _choices(self, body: Body, model: ServedModel, prompts: Sequence[list[int]],
                       max_tokens: int | None, param: str, logprobs: int | None,
                       priority: int, base_id: str, *, prompt_logprobs: int | None = None,
                       echo: bool = False) -> list[Choice]:
        """One choice per prompt and sample. ``max_tokens`` 0 (prefill only) is allowed when
        the answer is the prompt: ``echo``, or prompt logprobs."""
        sampling = self._sampling(body, model, logprobs, prompt_logprobs)
        structured = await structured_output(
            body, any_whitespace=self.cfg.structured_outputs_any_whitespace)
        if structured is not None:
            sampling = msgspec.structs.replace(sampling, structured=structured)
        allow_zero = echo or prompt_logprobs is not None
        choices = []
        for p, ids in enumerate(prompts):
            limit = self._check_limits(model, ids, max_tokens, param, allow_zero)
            for i in range(body.n):
                s = sampling
                if s.seed is not None and body.n > 1:  # n distinct samples, reproducibly
                    s = msgspec.structs.replace(s, seed=s.seed + i)
                req = engine_request(model, f"{base_id}-{p}-{i}", ids, s, limit,
                                     priority=priority, tenant=body.user or "",
                                     cache_salt=body.cache_salt or "")
                choices.append(Choice(index=p * body.n + i, request=req))
        return choices

    def _warn_unknown(self, body: Body) -> None:
        """Refuse OpenAI fields this engine does not implement; warn about fields nobody
        defines (ignored, as vLLM does)."""
        refused = unsupported_field(body.model_extra or {})
        if refused is not None:
            raise bad_request(refused[1], refused[0])
        extra = (set(body.model_extra or {}) - KNOWN_NO_OPS - UNSUPPORTED.keys()
                 - DEFAULT_ONLY.keys() - {"modalities"})
        if extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(extra)))

    async def _start(self, model: ServedModel, choices: Sequence[Choice],
                     request: Request) -> tuple[Generations, tuple[Choice, Delta] | None]:
        """Start every generation and wait for the first delta (the status is committed
        then): 503 after ``--max-queue-time`` without one, or if the pool is unreachable.
        A client that disconnects meanwhile aborts everything."""
        merged = start(model, choices, self.metrics)
        try:
            first = await unless_disconnected(
                request, asyncio.wait_for(merged.next(), self.cfg.max_queue_time_s))
        except TimeoutError:
            await merged.aclose()
            self.metrics.count_refused(model.name, "queue_timeout", choices[0].request.priority)
            silent = model.pool.silent_for()
            if silent is not None and silent > STALE_AFTER_S:  # the pool died, not back yet
                raise ApiError(503, f"the pool of model {model.name!r} is down (restarting; "
                               f"no report for {silent:.0f} s): the request waited "
                               f"--max-queue-time {self.cfg.max_queue_time_s} s; retry later",
                               "service_unavailable", "pool_unavailable",
                               headers={"Retry-After": "1"}) from None
            raise ApiError(503, f"no capacity: the request waited --max-queue-time "
                           f"{self.cfg.max_queue_time_s} s without being served; retry later",
                           "service_unavailable", "queue_timeout",
                           headers={"Retry-After": "1"}) from None
        except GenerationFailed as e:
            await merged.aclose()
            raise failed_error(e) from e
        except BaseException:
            await merged.aclose()
            raise
        return merged, first

    async def _respond(self, request: Request, body: Body, model: ServedModel,
                       choices: list[Choice], tools: ToolPlan | None = None) -> Response:
        merged, first = await self._start(model, choices, request)
        stamp(request.scope, "first")
        pool_stages(request.scope, first[1].timing if first is not None else None)
        timing = server_timing(request.scope)
        headers = {TIMING_HEADER: timing} if timing else {}
        created = int(time.time())
        fmt: ChatFormat | TextFormat
        if isinstance(body, ChatCompletionRequest):
            fmt = ChatFormat(f"chatcmpl-{secrets.token_hex(12)}", created, model, body, tools)
        else:
            fmt = TextFormat(f"cmpl-{secrets.token_hex(12)}", created, model, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(merged, first, choices, fmt, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        try:
            await unless_disconnected(request, collect(merged, first))
        except GenerationFailed as e:
            raise failed_error(e) from e
        finally:
            await merged.aclose()
        return JSONResponse(fmt.full(choices, usage(choices)), headers=headers)

    # -- endpoints

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        stamp(request.scope, "parsed")
        key = self.authenticate(request)
        self._warn_unknown(body)
        model = self._model(body.model)
        check(body.best_of in (None, 1), "best_of > 1 is not supported", "best_of")
        check(body.suffix is None, "suffix is not supported", "suffix")
        check(body.logprobs is None or 0 <= body.logprobs <= 5,
              f"logprobs must be in [0, 5], got {body.logprobs}", "logprobs")
        prompts, texts = self._prompts(body.prompt, model)
        priority = self._priority(body, request)
        # Echo with logprobs scores the echoed prompt too (OpenAI's legacy shape, what
        # lm-eval's loglikelihood reads); one computation serves both forms, each cut to its k.
        prompt_k = body.prompt_logprobs
        if body.echo and body.logprobs is not None and (prompt_k is None
                                                        or 0 <= prompt_k < body.logprobs):
            prompt_k = body.logprobs
        choices = await self._choices(body, model, prompts, body.max_tokens, "max_tokens",
                                      body.logprobs, priority, "cmpl",
                                      prompt_logprobs=prompt_k, echo=body.echo)
        for c in choices:
            c.prompt_text = texts[c.index // body.n] if body.echo else None
        self._tokenized(request, model)
        self._admit(key, model, choices, priority)
        stamp(request.scope, "admitted")
        return await self._respond(request, body, model, choices)

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
        stamp(request.scope, "parsed")
        key = self.authenticate(request)
        self._warn_unknown(body)
        model = self._model(body.model)
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                           self.cfg.tool_call_parser)
        check(body.top_logprobs is None or 0 <= body.top_logprobs <= 20,
              f"top_logprobs must be in [0, 20], got {body.top_logprobs}", "top_logprobs")
        check(not body.top_logprobs or body.logprobs,
              "top_logprobs needs logprobs: true", "top_logprobs")
        check(body.max_tokens is None or body.max_completion_tokens is None
              or body.max_tokens == body.max_completion_tokens,
              "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
        messages = template_messages(body.messages)
        if tools is not None:
            warn_if_template_ignores_tools(model.tokenizer, model.name)
        try:
            ids = chat_prompt_ids(model.tokenizer, messages, body.add_generation_prompt,
                                  tools.tools if tools is not None else None)
        except NoChatTemplate as e:
            raise bad_request(str(e), "messages") from e
        except Exception as e:  # the template itself refused (e.g. role order)
            raise bad_request(f"the chat template failed on these messages: {e}",
                              "messages") from e
        check(bool(ids), "messages render to an empty prompt", "messages")
        priority = self._priority(body, request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        choices = await self._choices(body, model, [ids], max_tokens, param,
                                      (body.top_logprobs or 0) if body.logprobs else None,
                                      priority, "chatcmpl", prompt_logprobs=body.prompt_logprobs)
        if tools is not None and tools.structured is not None:  # a forced tool choice
            for c in choices:
                c.request = constrain(c.request, tools.structured)
        self._tokenized(request, model)
        self._admit(key, model, choices, priority)
        stamp(request.scope, "admitted")
        return await self._respond(request, body, model, choices, tools)

    def list_models(self, request: Request) -> dict[str, Any]:
        self.authenticate(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "engine",
             "root": str(m.info.path), "max_model_len": m.info.max_model_len}
            for m in self.models]}

    def health(self) -> Response:
        """200 while every pool reported within the last second and has a live worker
        (``engine.frontend.health``), else 503 with the reason."""
        health = check_health(self.models)
        pools = {}
        for p in health.pools:
            stats = p.stats
            pools[p.name] = {
                "ok": p.ok, "reason": p.reason,
                "last_report_s": round(p.age_s, 3) if p.age_s is not None else None,
                "live_workers": stats.live_workers if stats else 0,
                "reserved_workers": len(stats.reserved_worker_ids) if stats else 0,
                "num_waiting": stats.num_waiting if stats else 0,
                "num_running": stats.num_running if stats else 0,
                "predicted_wait_s": _finite(self.admission.loads[p.name].predicted_wait())}
        body = {"status": "ok" if health.ok else "unavailable", "reason": health.reason,
                "pools": pools}
        return JSONResponse(body, status_code=200 if health.ok else 503)


def _finite(x: float) -> float | None:
    return x if x != float("inf") else None


def _decode(model: ServedModel, ids: Sequence[int]) -> str:
    return str(model.tokenizer.decode(list(ids)))
