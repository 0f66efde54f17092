"""The request side of the soak (bench.soak): what each request is, how it is sent, and the
one outcome it ends in.

Each request is drawn from a seeded generator (``draw_request``): ``/v1/chat/completions`` or
``/v1/completions``, streamed or not, greedy with ``ignore_eos`` so that a completed request
must have exactly ``max_tokens`` tokens; ``run_request`` sends it (closing a stream, or a
non-streamed connection, early when the request is one of the client aborts) and classifies
it: ``completed``, ``aborted`` (by us), ``cut`` (a transport error on a connection open
while a frontend was killed), ``failed`` or ``lost``. ``summarize`` counts the outcomes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

COMPLETED, ABORTED, CUT, FAILED, LOST = "completed", "aborted", "cut", "failed", "lost"
OUTCOMES = (COMPLETED, ABORTED, CUT, FAILED, LOST)
_FAILED_FINISH_REASONS = ("abort", "error")
#: A /health 200 this soon after a kill may predate the death (engine.frontend.health's
#: STALE_AFTER_S, 1 s, plus a heartbeat).
HEALTH_STALE_S = 1.25
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
          "small", "birds", "sing", "about", "rivers", "import", "def", "return", "class",
          "lambda", "yield", "value", "list", "dict")


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestSpec:
    """One request of the load. ``abort_after_events``: a stream closed after that many
    token events; ``abort_after_s``: a non-streamed request abandoned after that delay."""

    index: int
    chat: bool
    stream: bool
    prompt: str
    max_tokens: int
    abort_after_events: int | None = None
    abort_after_s: float | None = None

    @property
    def kind(self) -> str:
        return ("chat" if self.chat else "completions") + (" stream" if self.stream else "")


def draw_request(rng: random.Random, index: int, abort_fraction: float,
                 stream_fraction: float = 0.7) -> RequestSpec:
    chat, stream = rng.random() < 0.5, rng.random() < stream_fraction
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 64)))
    max_tokens = rng.randint(8, 96)
    events = seconds = None
    if rng.random() < abort_fraction:
        if stream:
            events = rng.randint(1, max_tokens - 1)
        else:
            seconds = rng.uniform(0.02, 0.5)
    return RequestSpec(index, chat, stream, prompt, max_tokens, events, seconds)


def request_body(spec: RequestSpec, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": spec.stream}
    if spec.chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Result:
    """What became of one request; times in seconds since the run started."""

    index: int
    kind: str
    max_tokens: int
    sent_s: float
    end_s: float = 0.0
    outcome: str = FAILED
    reason: str = ""  # why it failed, was lost or was cut ("" when completed or aborted)
    tokens: int = 0  # output tokens (usage, else token events)
    finish_reason: str | None = None


@dataclass
class StreamState:
    """A server-sent event stream, event by event (``feed``), then its verdict (``end``)."""

    token_events: int = 0
    usage_tokens: int | None = None
    finish_reason: str | None = None
    error: str = ""

    def feed(self, event: Mapping[str, Any]) -> None:
        if "error" in event:
            self.error = f"error event: {json.dumps(event['error'])[:160]}"
            return
        if choices := event.get("choices"):
            choice = choices[0]
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content"):
                self.token_events += 1
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if usage := event.get("usage"):
            self.usage_tokens = int(usage.get("completion_tokens", 0))

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.token_events

    def end(self) -> tuple[str, str]:
        """(outcome, reason) of a stream the server ended (with ``[DONE]`` or not)."""
        return answer_outcome(self.finish_reason, self.error)


def answer_outcome(finish_reason: str | None, error: str = "") -> tuple[str, str]:
    """The outcome of an answer the server finished: an error event or a failed finish
    reason is a failure; no finish reason at all is a lost request (the client cannot tell
    whether its text is whole)."""
    if error:
        return FAILED, error
    if finish_reason in _FAILED_FINISH_REASONS:
        return FAILED, f"finish_reason {finish_reason}"
    if finish_reason is None:
        return LOST, "ended without finish_reason"
    return COMPLETED, ""


#: A request sent this soon after a frontend kill may still go out on a kept-alive
#: connection to the dead process (the client cannot know yet): its reset is a cut too.
CUT_GRACE_S = 2.0
_CONNECT_ERRORS = ("ConnectError", "ConnectTimeout")


def transport_outcome(sent_s: float, end_s: float, frontend_kills_s: Iterable[float],
                      error: str) -> tuple[str, str]:
    """A connection error or reset (``error``: the exception's name): ``cut`` when it was on
    a connection open at a frontend kill (the request in flight then, or sent on a kept-alive
    connection within ``CUT_GRACE_S`` after it; a refused new connection is not one), else
    ``failed``."""
    for k in frontend_kills_s:
        if sent_s <= k <= end_s or (error not in _CONNECT_ERRORS
                                    and k <= sent_s <= k + CUT_GRACE_S):
            return CUT, error
    return FAILED, error


async def run_request(client: httpx.AsyncClient, base_url: str, spec: RequestSpec,
                      model: str, timeout_s: float, t0: float,
                      frontend_kills_s: list[float]) -> Result:
    """Send ``spec`` and return its outcome; never raises (but for cancellation)."""
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    res = Result(spec.index, spec.kind, spec.max_tokens, time.monotonic() - t0)
    body = request_body(spec, model)
    transport_error = ""
    try:
        async with asyncio.timeout(timeout_s) as overall:
            if spec.stream:
                await _stream(client, base_url + path, body, spec, res)
            else:
                await _unary(client, base_url + path, body, spec, res)
    except TimeoutError:
        if not overall.expired():  # pragma: no cover - a timeout raised by the server code
            raise
        res.outcome, res.reason = LOST, f"no answer within {timeout_s:g} s"
    except httpx.TimeoutException as e:
        res.outcome, res.reason = LOST, f"{type(e).__name__} (client timeout)"
    except httpx.HTTPError as e:
        transport_error = type(e).__name__
    res.end_s = time.monotonic() - t0
    if transport_error:
        res.outcome, res.reason = transport_outcome(res.sent_s, res.end_s, frontend_kills_s,
                                                    transport_error)
    return res


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                  spec: RequestSpec, res: Result) -> None:
    state = StreamState()
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            res.outcome, res.reason = FAILED, f"HTTP {resp.status_code}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                state.feed(json.loads(data))
            except (ValueError, TypeError, AttributeError, IndexError):
                state.error = f"malformed event: {data[:80]}"
                break
            if (spec.abort_after_events is not None
                    and state.token_events >= spec.abort_after_events
                    and state.finish_reason is None):
                res.outcome, res.tokens = ABORTED, state.tokens
                return  # leaving the block closes the connection mid-stream
    res.outcome, res.reason = state.end()
    res.tokens, res.finish_reason = state.tokens, state.finish_reason


async def _unary(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                 spec: RequestSpec, res: Result) -> None:
    abort = asyncio.timeout(spec.abort_after_s)
    try:
        async with abort:
            resp = await client.post(url, json=body)
    except TimeoutError:
        if abort.expired():  # we gave up: the connection is closed under the server
            res.outcome = ABORTED
            return
        raise
    if resp.status_code != 200:
        res.outcome, res.reason = FAILED, f"HTTP {resp.status_code}"
        return
    try:
        answer = resp.json()
        choice = answer["choices"][0]
        res.finish_reason = choice.get("finish_reason")
        res.tokens = int((answer.get("usage") or {}).get("completion_tokens", 0))
        res.outcome, res.reason = answer_outcome(res.finish_reason)
    except (ValueError, KeyError, IndexError, TypeError):
        res.outcome, res.reason = FAILED, "malformed answer"


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """Counts per outcome and per request kind, failure reasons, and completed requests
    whose token count is not their ``max_tokens`` (``ignore_eos``: it must be)."""
    outcomes = Counter(r.outcome for r in results)
    by_kind: dict[str, Counter[str]] = {}
    for r in results:
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
    completed = [r for r in results if r.outcome == COMPLETED]
    mismatched = [r.index for r in completed if r.tokens != r.max_tokens]
    return {
        "requests": len(results),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "by_kind": {k: {o: c.get(o, 0) for o in OUTCOMES} for k, c in sorted(by_kind.items())},
        "completed_tokens": sum(r.tokens for r in completed),
        "token_count_mismatches": len(mismatched),
        "mismatched_requests": mismatched[:20],
        "failure_reasons": dict(Counter(r.reason for r in results if r.outcome == FAILED)),
        "cut_reasons": dict(Counter(r.reason for r in results if r.outcome == CUT)),
        "lost_requests": [{"index": r.index, "kind": r.kind, "reason": r.reason}
                          for r in results if r.outcome == LOST][:20],
    }
