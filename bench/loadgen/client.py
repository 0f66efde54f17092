"""One streamed completion request: what is sent, what came back, and when.

Timings follow ``vllm bench serve`` (its ``async_request_openai_completions``) so that figures
compare with the field's: the clock starts just before the request is sent; every server-sent
event that carries ``choices`` is one token event (TTFT at the first, an ITL gap before each
next one), and the request's latency (E2E) ends at the last token event, not at ``[DONE]``.
Token counts come from the usage chunk (``stream_options.include_usage``): output tokens (the
token events when no usage comes), prompt tokens and, when the server reports them, cached
prompt tokens.

Every request ends in exactly one outcome:

- ``completed``: HTTP 200, at least one token event, ``[DONE]`` received;
- ``rate_limited``: HTTP 429, with the ``Retry-After`` it gave (not retried: a refusal is a
  result of the server's admission control, and retrying would change the offered load);
- ``timeout``: no complete answer within the client's timeout (tokens may have arrived);
- ``error``: anything else: another status, a connection failure, an error event, a malformed
  or truncated stream, no token at all, or a finish reason of ``abort`` or ``error``.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from engine.sim.workloads import SimRequest

COMPLETED, RATE_LIMITED, TIMEOUT, ERROR = "completed", "rate_limited", "timeout", "error"
OUTCOMES = (COMPLETED, RATE_LIMITED, TIMEOUT, ERROR)
PRIORITY_MODES = ("as-is", "negate", "omit")
_FAILED_FINISH_REASONS = ("abort", "error")


@dataclass(frozen=True)
class ClientConfig:
    """Where and how requests are sent.

    ``priority_mode``: ``as-is`` sends the workload's priority (this engine: higher is more
    urgent); ``negate`` sends its opposite (vLLM serves lower values first); ``omit`` sends none
    (a server without priority scheduling; vLLM refuses a non-zero one then).
    """

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    priority_mode: str = "as-is"
    # Text sent as the prompt instead of the token ids, by request id: for a server or router
    # that takes text prompts only (sglang-router 0.3 refuses token-id completions).
    prompt_texts: Mapping[str, str] | None = None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/v1/completions"


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times in seconds (``*_s``), ``token_times_s`` since
    the request was sent, the others since the run started."""

    request_id: str
    priority: int
    scheduled_s: float  # when it was due (arrival, or its predecessor's end + think time)
    sent_s: float = 0.0
    end_s: float = 0.0
    outcome: str = ERROR
    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int | None = None  # None: the server did not report it
    token_times_s: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.token_times_s[-1] if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None with fewer than 2 output tokens."""
        if self.num_output_tokens < 2 or not self.token_times_s:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in itertools.pairwise(times)]

    def to_json(self) -> dict[str, Any]:
        """The record without its token times (ITL is summarised, not stored per request)."""
        return {
            "request_id": self.request_id, "priority": self.priority, "outcome": self.outcome,
            "status": self.status, "error": self.error, "retry_after_s": self.retry_after_s,
            "finish_reason": self.finish_reason, "scheduled_s": self.scheduled_s,
            "sent_s": self.sent_s, "end_s": self.end_s, "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "num_cached_tokens": self.num_cached_tokens,
        }


def build_payload(req: SimRequest, cfg: ClientConfig) -> dict[str, Any]:
    """The request body: token ids as the prompt, greedy, EOS ignored so that the output has
    exactly the workload's length on every server."""
    payload: dict[str, Any] = {
        "model": cfg.model,
        "prompt": (cfg.prompt_texts[req.request_id] if cfg.prompt_texts is not None
                   else list(req.prompt_token_ids)),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.priority_mode != "omit":
        payload["priority"] = -req.priority if cfg.priority_mode == "negate" else req.priority
    return payload


def make_client(cfg: ClientConfig) -> httpx.AsyncClient:
    """One client for the whole run, without a connection limit: httpx's default (100) would
    queue requests inside the client and count that wait as server latency."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None))


async def send(client: httpx.AsyncClient, req: SimRequest, cfg: ClientConfig,
               scheduled_s: float, run_start: float) -> RequestRecord:
    """Send ``req`` now and record its outcome; never raises for what the server does."""
    rec = RequestRecord(req.request_id, req.priority, scheduled_s,
                        num_prompt_tokens=len(req.prompt_token_ids))
    sent = time.perf_counter()
    rec.sent_s = sent - run_start
    try:
        async with asyncio.timeout(cfg.timeout_s):
            async with client.stream("POST", cfg.endpoint, json=build_payload(req, cfg)) as resp:
                rec.status = resp.status_code
                if resp.status_code == 200:
                    _conclude(rec, await _read_stream(resp, rec, sent))
                else:
                    await _read_refusal(resp, rec)
    except (TimeoutError, httpx.TimeoutException):
        rec.outcome, rec.error = TIMEOUT, f"no complete answer within {cfg.timeout_s:g} s"
    except httpx.HTTPError as e:
        rec.outcome, rec.error = ERROR, f"{type(e).__name__}: {e}"
    rec.end_s = time.perf_counter() - run_start
    return rec


async def _read_refusal(resp: httpx.Response, rec: RequestRecord) -> None:
    body = (await resp.aread()).decode(errors="replace")
    if resp.status_code == 429:
        rec.outcome = RATE_LIMITED
        rec.retry_after_s = parse_retry_after(resp.headers.get("retry-after"))
    else:
        rec.outcome = ERROR
    rec.error = f"HTTP {resp.status_code}: {body[:200]}"


async def _read_stream(resp: httpx.Response, rec: RequestRecord, sent: float) -> str:
    """Consume the server-sent events into ``rec``; returns an error message, "" if none."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            return ""
        elapsed = time.perf_counter() - sent
        try:
            error = _apply_event(rec, json.loads(data), elapsed)
        except (ValueError, TypeError, AttributeError, IndexError):
            error = f"malformed event: {data[:200]}"
        if error:
            return error
    return "stream ended without [DONE]"


def _apply_event(rec: RequestRecord, event: dict[str, Any], elapsed: float) -> str:
    """Record one decoded event; returns an error message, "" if none."""
    if "error" in event:
        return f"error event: {json.dumps(event['error'])[:200]}"
    if choices := event.get("choices"):
        rec.token_times_s.append(elapsed)
        rec.finish_reason = choices[0].get("finish_reason") or rec.finish_reason
    if usage := event.get("usage"):
        rec.num_prompt_tokens = int(usage.get("prompt_tokens", rec.num_prompt_tokens))
        rec.num_output_tokens = int(usage.get("completion_tokens", rec.num_output_tokens))
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            rec.num_cached_tokens = int(cached)
    return ""


def _conclude(rec: RequestRecord, error: str) -> None:
    if not rec.num_output_tokens:  # no usage chunk: count the token events instead
        rec.num_output_tokens = len(rec.token_times_s)
    if not error and not rec.token_times_s:
        error = "no token in the stream"
    if not error and rec.finish_reason in _FAILED_FINISH_REASONS:
        error = f"finish_reason {rec.finish_reason!r}"
    rec.outcome, rec.error = (ERROR, error) if error else (COMPLETED, "")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date
    (RFC 9110); None when absent or unreadable."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
