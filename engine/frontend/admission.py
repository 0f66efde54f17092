"""Admission control in the frontend: API keys, per-key rate limits, and load shedding,
shared by the HTTP and gRPC APIs (``Admission``).

Shedding keeps critical traffic fast under overload. Each pool's pressure is estimated from
what the frontend sees at once (its own count of requests in flight, the pool's latest
``PoolStats``) and from the pool's drain rate (requests finished per second over a sliding
window). The predicted queue wait is the number of requests waiting over the drain rate.
When it exceeds ``shed_queue_time_s`` the pool is saturated: sheddable requests (priority
< 0) are refused with 429 and a ``Retry-After`` equal to the predicted wait; everything
else queues in the scheduler, whose priority policy serves it first, and gives up with 503
after ``max_queue_time_s`` without a first token (see ``engine.frontend.http``). Before the
first completions there is no drain rate; the pool then counts as saturated once its
waiting requests reach one full batch per live worker.

Rate limits are token buckets per API key (one shared bucket when no keys are configured):
requests per minute, and tokens per minute charged at admission as prompt tokens plus
``max_tokens`` (the most the request can cost, as OpenAI's limiter estimates it).
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.config import FrontendConfig
from engine.frontend.pool_client import PoolClient
from engine.frontend.serving import ServedModel
from engine.messages import PoolStats

#: Seconds of history behind a pool's drain rate.
DRAIN_WINDOW_S = 10.0


@dataclass(frozen=True)
class Refusal:
    """Why a request is not admitted: HTTP status, OpenAI error type, and retry hint."""

    status: int
    reason: str  # metrics label: shed, rate_limit, ...
    message: str
    retry_after_s: float | None = None

    @property
    def retry_after(self) -> str | None:
        """The ``Retry-After`` header: whole seconds, at least 1."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class ApiKeys:
    """Bearer-key check in constant time: every configured key is compared, always."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The matching key, or None. Without configured keys every caller is ``""``."""
        if not self._keys:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for key in self._keys:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(key, given):
                found = key.decode()
        return found


class TokenBucket:
    """``capacity`` units refilled evenly over a minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if it is now; inf if never)."""
        self._refill()
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class RateLimiter:
    """Per-key requests-per-minute and tokens-per-minute limits (None: unlimited)."""

    def __init__(self, rpm: int | None, tpm: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def admit(self, key: str, num_tokens: int) -> Refusal | None:
        """Charge one request of ``num_tokens`` to ``key``, or say why not."""
        if self.rpm is None and self.tpm is None:
            return None
        if key not in self._buckets:
            self._buckets[key] = (
                TokenBucket(self.rpm, self.clock) if self.rpm else None,
                TokenBucket(self.tpm, self.clock) if self.tpm else None,
            )
        requests, tokens = self._buckets[key]
        if tokens is not None and num_tokens > tokens.capacity:
            return Refusal(429, "rate_limit", f"request needs {num_tokens} tokens (prompt + "
                           f"max_tokens), more than the key's limit of {self.tpm} tokens per "
                           "minute (--rate-limit-tpm)")
        wait = max(requests.wait_for(1) if requests else 0.0,
                   tokens.wait_for(num_tokens) if tokens else 0.0)
        if wait > 0:
            return Refusal(429, "rate_limit", "rate limit exceeded for this API key "
                           f"(--rate-limit-rpm {self.rpm}, --rate-limit-tpm {self.tpm}); "
                           f"retry in {math.ceil(wait)} s", retry_after_s=wait)
        if requests:
            requests.take(1)
        if tokens:
            tokens.take(num_tokens)
        return None


class PoolLoad:
    """One pool's pressure as the frontend sees it, and its predicted queue wait."""

    def __init__(self, pool: PoolClient, max_num_seqs: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()  # (time, pool.num_finished)
        pool.stats_listeners.append(self._on_stats)

    def _on_stats(self, _stats: PoolStats) -> None:
        now = self.clock()
        self._samples.append((now, self.pool.num_finished))
        while len(self._samples) > 2 and now - self._samples[1][0] > DRAIN_WINDOW_S:
            self._samples.popleft()

    @property
    def num_waiting(self) -> int:
        """Waiting requests: the pool's count, or more if requests sent since its last
        stats are not in it yet."""
        stats = self.pool.stats
        if stats is None:
            return self.pool.num_active
        return max(stats.num_waiting, self.pool.num_active - stats.num_running)

    def drain_rate(self) -> float:
        """Requests finished per second over the window (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def predicted_wait(self) -> float:
        """Seconds a request arriving now is predicted to wait before it runs."""
        waiting = self.num_waiting
        if waiting == 0:
            return 0.0
        rate = self.drain_rate()
        if rate > 0:
            return waiting / rate
        live = self.pool.stats.live_workers if self.pool.stats else 0
        return math.inf if waiting >= self.max_num_seqs * max(live, 1) else 0.0


class Shedder:
    """Refuses sheddable requests to a saturated pool."""

    def __init__(self, shed_queue_time_s: float) -> None:
        self.shed_queue_time_s = shed_queue_time_s

    def admit(self, load: PoolLoad, priority: int) -> Refusal | None:
        if priority >= 0:
            return None
        wait = load.predicted_wait()
        if wait <= self.shed_queue_time_s:
            return None
        retry = wait if math.isfinite(wait) else self.shed_queue_time_s * 2
        return Refusal(429, "shed", f"the engine is saturated (predicted queue wait "
                       f"{'unknown' if math.isinf(wait) else f'{wait:.1f} s'} > "
                       f"--shed-queue-time {self.shed_queue_time_s} s) and this request is "
                       f"sheddable (priority {priority}); retry later", retry_after_s=retry)


class Admission:
    """The admission state of one frontend, shared by its APIs: a request is charged to its
    API key's rate limit and refused if sheddable and its pool is saturated."""

    def __init__(self, models: Iterable[ServedModel], cfg: FrontendConfig,
                 max_num_seqs: int) -> None:
        self.keys = ApiKeys(cfg.api_keys)
        self.limiter = RateLimiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        self.shedder = Shedder(cfg.shed_queue_time_s)
        self.loads = {m.name: PoolLoad(m.pool, max_num_seqs) for m in models}

    def admit(self, key: str, model_name: str, priority: int, num_tokens: int) -> Refusal | None:
        """Charge ``num_tokens`` (prompt + max_tokens of every choice) to ``key`` unless the
        request is refused; say why it is. A shed request costs the key nothing."""
        return self.shedder.admit(self.loads[model_name], priority) or self.limiter.admit(
            key, num_tokens)
