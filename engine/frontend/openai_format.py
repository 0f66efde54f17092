"""The OpenAI API's wire shapes: errors, the choices of a response, and the bodies of
``/v1/completions`` and ``/v1/chat/completions`` responses and stream chunks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi.responses import JSONResponse

from engine.frontend.admission import Refusal
from engine.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from engine.frontend.serving import Delta, GenerationFailed, ServedModel
from engine.frontend.tool_parsers import CallDelta, Parsed, ToolStream, parse
from engine.frontend.tools import ToolPlan
from engine.messages import EngineRequest
from engine.prompt_logprobs import PromptLogprob


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
    prompt_logprobs: list[PromptLogprob | None] | None = None

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        self.token_ids += d.token_ids
        if d.logprobs:
            self.logprobs += d.logprobs
        if d.top_logprobs:
            self.top_logprobs += d.top_logprobs
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
        if d.usage is not None:
            self.cached_tokens = d.usage.cached_tokens



def failed_error(e: GenerationFailed) -> ApiError:
    if e.unavailable:
        return ApiError(503, str(e), "service_unavailable", "pool_unavailable",
                        headers={"Retry-After": "1"})
    return ApiError(500, f"the engine failed the request: {e}", "internal_error")



def usage(choices: Sequence[Choice]) -> dict[str, Any]:
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



def sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


_encode = msgspec.json.Encoder().encode


def sse_event_fast(obj: Any) -> bytes:
    """``sse_event`` through msgspec, as bytes (what the ASGI server writes): the same JSON
    value (compact, non-ASCII as is; escapes may be spelled differently), several times
    cheaper per streamed token. Only for bodies without floats that may be infinite or NaN
    (logprobs): JSON has no spelling for them, and ``json.dumps`` writes ``-Infinity`` (which
    Python clients read back) where msgspec writes null."""
    return b"data: " + _encode(obj) + b"\n\n"


#: JSON has no infinity: a logprob of -inf (a masked token) is sent as this, as vLLM does.
MIN_LOGPROB = -9999.0


class Format:
    def __init__(self, rid: str, created: int, model: ServedModel,
                 body: CompletionRequest | ChatCompletionRequest) -> None:
        self.head = {"id": rid, "object": "", "created": created, "model": model.name}
        self.tokenizer = model.tokenizer
        self.logprobs = body.logprobs is not None and body.logprobs is not False
        self.prompt_k: int | None = body.prompt_logprobs

    def token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def prompt_logprobs(self, entries: Sequence[PromptLogprob | None] | None) -> Any:
        """vLLM's ``prompt_logprobs``: None for the first token, then per prompt token a
        map token id -> {logprob, rank, decoded_token} holding the token itself and the
        ``prompt_logprobs`` most likely ones."""
        if entries is None or self.prompt_k is None:
            return None
        out: list[Any] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            row = {str(e.token_id): self._vllm_entry(e.token_id, e.logprob, e.rank)}
            for rank, (t, lp) in enumerate(e.top[: self.prompt_k], 1):
                row.setdefault(str(t), self._vllm_entry(t, lp, rank))
            out.append(row)
        return out

    def _vllm_entry(self, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": max(logprob, MIN_LOGPROB), "rank": rank,
                "decoded_token": self.token(token_id)}


class TextFormat(Format):
    """``/v1/completions`` response bodies.

    With ``echo`` and ``logprobs`` the legacy logprobs object covers the echoed prompt first
    (its first token's logprob and top logprobs null), then the generated tokens; streamed,
    the prompt and its logprobs go out with the choice's first chunk (they are known then).
    """

    def __init__(self, rid: str, created: int, model: ServedModel,
                 body: CompletionRequest) -> None:
        super().__init__(rid, created, model, body)
        self.head["object"] = "text_completion"
        self.k = body.logprobs or 0
        self.echo_logprobs = bool(body.echo) and self.logprobs

    def _logprobs(self, ids: Sequence[int], lps: Sequence[float],
                  top: Sequence[Sequence[tuple[int, float]]] | None,
                  prompt: Sequence[PromptLogprob | None] | None = None,
                  prompt_ids: Sequence[int] = ()) -> Any:
        """The legacy logprobs object of ``prompt`` (the echoed prompt's entries, with
        ``prompt_ids``) and then of the generated tokens ``ids``."""
        if not self.logprobs:
            return None
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[Any] = []
        if prompt is not None:
            for t, e in zip(prompt_ids, prompt, strict=True):
                tokens.append(self.token(t))
                if e is None:
                    token_lps.append(None)
                    tops.append(None)
                    continue
                token_lps.append(max(e.logprob, MIN_LOGPROB))
                row = {tokens[-1]: token_lps[-1]}
                for a, b in e.top[: self.k]:
                    row.setdefault(self.token(a), max(b, MIN_LOGPROB))
                tops.append(row)
        tokens += [self.token(t) for t in ids]
        token_lps += list(lps)
        tops += ([{self.token(t): lp for t, lp in row} for row in top] if top
                 else [None] * len(ids))
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def opening(self, choices: Sequence[Choice]) -> list[dict[str, Any]]:
        if self.echo_logprobs:  # the prompt goes with the first chunk, with its logprobs
            return []
        echo = [c for c in choices if c.prompt_text]
        return [{**self.head, "choices": [{"index": c.index, "text": c.prompt_text,
                                           "logprobs": None, "finish_reason": None}]}
                for c in echo]

    def chunk(self, c: Choice, d: Delta) -> dict[str, Any]:
        text, prompt = d.text, None
        if self.echo_logprobs and d.prompt_logprobs is not None:
            text, prompt = (c.prompt_text or "") + text, d.prompt_logprobs
        return {**self.head, "choices": [{
            "index": c.index, "text": text,
            "logprobs": self._logprobs(d.token_ids, d.logprobs or [], d.top_logprobs, prompt,
                                       c.request.prompt_token_ids),
            "finish_reason": d.finish_reason}]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    def full(self, choices: Sequence[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [{
            "index": c.index, "text": (c.prompt_text or "") + "".join(c.text),
            "logprobs": self._logprobs(c.token_ids, c.logprobs, c.top_logprobs,
                                       c.prompt_logprobs if self.echo_logprobs else None,
                                       c.request.prompt_token_ids),
            "finish_reason": c.finish_reason,
            **({"prompt_logprobs": self.prompt_logprobs(c.prompt_logprobs)}
               if self.prompt_k is not None else {})} for c in choices], "usage": usage}


class ChatFormat(Format):
    """``/v1/chat/completions`` response bodies. With a ``ToolPlan`` whose output holds
    calls (auto with a parser, required, named), each choice's text goes through its own
    ``ToolStream``: content and ``tool_calls`` deltas in OpenAI's shape (a call's first delta
    carries its index, id, type and name; later ones argument fragments), and
    ``finish_reason`` "tool_calls" when the model stopped after calling."""

    def __init__(self, rid: str, created: int, model: ServedModel,
                 body: ChatCompletionRequest, tools: ToolPlan | None = None) -> None:
        super().__init__(rid, created, model, body)
        self.head["object"] = "chat.completion"
        self.chunk_head = {**self.head, "object": "chat.completion.chunk"}
        self.tools = tools
        self._streams: dict[int, ToolStream | None] = {}

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

    def _stream(self, c: Choice) -> ToolStream | None:
        if c.index not in self._streams:
            self._streams[c.index] = self.tools.stream() if self.tools else None
        return self._streams[c.index]

    def chunk(self, c: Choice, d: Delta) -> dict[str, Any]:
        stream = self._stream(c)
        finish = d.finish_reason
        if stream is None:
            delta: dict[str, Any] = {"content": d.text} if d.text else {}
        else:
            update = stream.step(d.text, final=finish is not None)
            delta = {"content": update.content} if update.content else {}
            if update.calls:
                delta["tool_calls"] = [_call_delta(x) for x in update.calls]
            if finish is not None:
                finish = _finish_reason(finish, stream.result())
        return {**self.chunk_head, "choices": [{
            "index": c.index, "delta": delta,
            "logprobs": self._logprobs(d.token_ids, d.logprobs or [], d.top_logprobs),
            "finish_reason": finish}]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.chunk_head, "choices": [], "usage": usage}

    def _message(self, c: Choice) -> tuple[dict[str, Any], str | None]:
        text = "".join(c.text)
        stream = self.tools.stream() if self.tools else None
        if stream is None:
            return {"role": "assistant", "content": text}, c.finish_reason
        parsed = parse(stream, text)
        if not parsed.calls:
            return {"role": "assistant", "content": parsed.content or ""}, c.finish_reason
        calls = [{"id": t.id, "type": "function",
                  "function": {"name": t.name, "arguments": t.arguments}}
                 for t in parsed.calls]
        return ({"role": "assistant", "content": parsed.content, "tool_calls": calls},
                _finish_reason(c.finish_reason, parsed))

    def full(self, choices: Sequence[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        # vLLM's chat extension: one prompt per request, its logprobs at the top level.
        prompt = ({"prompt_logprobs": self.prompt_logprobs(choices[0].prompt_logprobs)}
                  if self.prompt_k is not None and choices else {})
        out = []
        for c in choices:
            message, finish = self._message(c)
            out.append({"index": c.index, "message": message,
                        "logprobs": self._logprobs(c.token_ids, c.logprobs, c.top_logprobs),
                        "finish_reason": finish})
        return {**self.head, "choices": out, "usage": usage, **prompt}


def _call_delta(d: CallDelta) -> dict[str, Any]:
    if d.id is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {"index": d.index, "id": d.id, "type": "function",
            "function": {"name": d.name, "arguments": d.arguments}}


def _finish_reason(finish: str | None, parsed: Parsed) -> str | None:
    """"tool_calls" when the model stopped on its own after calling ("length" stays)."""
    return "tool_calls" if finish == "stop" and parsed.calls else finish
