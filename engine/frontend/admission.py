"""Admission control in the frontend: API keys, per-key rate limits, and load shedding,
shared by the HTTP and gRPC APIs (``Admission``).

Shedding keeps critical traffic fast under overload. Each pool's predicted queue wait comes
from its real state (``engine.frontend.drain``): the prompt tokens queued ahead against the
prefill rate of its recent steps, the requests beyond its free slots and the prompt tokens
beyond its free KV against the rate at which running requests finish (measured over a
sliding window once requests finish, predicted from the output budgets before), counting the
requests this frontend sent since the pool's latest ``PoolStats``. When the wait exceeds
``shed_queue_time_s`` the pool is saturated: sheddable requests (priority < 0) are refused
with 429 and a ``Retry-After`` equal to the predicted wait (the queue's drain time);
everything else queues in the scheduler, whose priority policy serves it first, and gives up
with 503 after ``max_queue_time_s`` without a first token (see ``engine.frontend.http``).
A fresh engine sheds from its first request: no completion history is needed.
With ``--shed-latency-factor`` (``engine.frontend.guard``), sheddable requests are also
refused while the pool's steps run that many times slower than its light steps, or the
frontend's event loop lags: what critical requests would pay for them. The guard holds only
while there are such requests to protect (a non-sheddable one open on the pool or arrived
within ``PROTECT_WINDOW_S``), and its step signal only while the workers are busy
(``GUARD_BUSY_MIN``). While the pool keeps workers free of sheddable requests
(``--reserved-workers``, ``PoolStats.reserved_worker_ids``), every one of these judges the
workers sheddable work may run on: their steps, their busy time, their slots and free KV.

Rate limits are token buckets per API key (one shared bucket when no keys are configured):
requests per minute, and tokens per minute charged at admission as prompt tokens plus
``max_tokens`` (the most the request can cost, as OpenAI's limiter estimates it).
"""

from __future__ import annotations

import hmac
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.config import FrontendConfig
from engine.frontend.drain import Backlog, Prediction, StepTimes, predict
from engine.frontend.guard import GUARD_RETRY_S, LoopLag, guard_reason
from engine.frontend.pool_client import PoolClient
from engine.frontend.serving import DEFAULT_MAX_TOKENS, ServedModel
from engine.messages import EngineRequest, PoolStats

#: Seconds of history behind a pool's drain rate.
DRAIN_WINDOW_S = 10.0
#: Latest requests sent whose prompt lengths are kept (those the pool has not counted yet).
SENT_WINDOW = 4096
#: Seconds an admitted request counts as not yet added to its pool client, at most.
NOT_ADDED_TTL_S = 1.0
#: Weight of each new request in the mean output budget.
OUTPUT_EWMA = 0.05
#: Seconds after a non-sheddable request's arrival during which the latency guard protects
#: the pool's traffic (as long as one is open, too): between critical arrivals the sheddable
#: work stays held back, so the next one does not meet full batches.
PROTECT_WINDOW_S = 10.0
#: Seconds of step times behind a pool's busy fraction (``PoolLoad.busy_fraction``).
BUSY_WINDOW_S = 1.0
#: The latency guard's step signal counts only while the pool's workers spend at least this
#: share of the time in steps: below it they are idle often enough that a critical request
#: rarely waits for a step, and slower steps are only their own size (docs/benchmarks.md,
#: "Flood", seventh pass: priority-mix at 5 req/s per worker, busy 0.27 at the median and
#: 0.56 at most per second, had 17-43% of its sheddable requests shed without it).
GUARD_BUSY_MIN = 0.75


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
    """One pool's pressure as the frontend sees it, and its predicted queue wait
    (``engine.frontend.drain``)."""

    def __init__(self, pool: PoolClient, max_num_seqs: int, max_num_batched_tokens: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()  # (time, pool.num_finished)
        self.steps = StepTimes(max_num_batched_tokens)
        #: (time, prompt tokens) of the latest requests admitted, newest last: the ones not
        #: added to the pool client yet, and those the pool's latest stats do not count, are
        #: among them.
        self._sent_prompts: deque[tuple[float, int]] = deque(maxlen=SENT_WINDOW)
        self._num_admitted = 0
        self._mean_output = float(DEFAULT_MAX_TOKENS)
        self._protected_at: float | None = None  # the latest non-sheddable arrival
        #: (time, seconds of steps) per stats message within ``BUSY_WINDOW_S``, and their sum.
        self._busy: deque[tuple[float, float]] = deque()
        self._busy_s = 0.0
        pool.stats_listeners.append(self._on_stats)

    def _on_stats(self, stats: PoolStats) -> None:
        now = self.clock()
        self._samples.append((now, self.pool.num_finished))
        while len(self._samples) > 2 and now - self._samples[1][0] > DRAIN_WINDOW_S:
            self._samples.popleft()
        reserved = stats.reserved_worker_ids
        counted = ([w not in reserved for w in stats.step_worker_ids]
                   if reserved and len(stats.step_worker_ids) == len(stats.step_times_s)
                   else None)
        self.steps.add(stats.step_num_tokens, stats.step_times_s, stats.step_batch_sizes,
                       counted)
        if stats.step_times_s:
            spent = (sum(stats.step_times_s) if counted is None else
                     sum(t for t, c in zip(stats.step_times_s, counted, strict=True) if c))
            self._busy.append((now, spent))
            self._busy_s += spent
        self._forget_busy(now)

    def _forget_busy(self, now: float) -> None:
        """Drop the step times older than ``BUSY_WINDOW_S`` from the busy window."""
        while self._busy and now - self._busy[0][0] > BUSY_WINDOW_S:
            self._busy_s -= self._busy.popleft()[1]

    def busy_fraction(self) -> float:
        """The share of the latest ``BUSY_WINDOW_S`` the pool's live workers that serve
        sheddable work (not reserved) spent in steps (from sending a plan to its result: a
        step slowed by CPU contention counts whole)."""
        self._forget_busy(self.clock())  # a pool gone quiet sends stats with no steps
        return max(0.0, self._busy_s) / (BUSY_WINDOW_S * self.num_sheddable_workers)

    @property
    def num_sheddable_workers(self) -> int:
        """The live workers that sheddable requests may be placed on (at least 1): those not
        reserved for non-sheddable ones (``--reserved-workers``)."""
        stats = self.pool.stats
        if stats is None:
            return 1
        return max(1, stats.live_workers - len(stats.reserved_worker_ids))

    def note_sent(self, prompt_tokens: int, max_tokens: int) -> None:
        """An admitted request, about to reach the pool (any priority: all of them load it)."""
        self._sent_prompts.append((self.clock(), prompt_tokens))
        self._num_admitted += 1
        self._mean_output += OUTPUT_EWMA * (max_tokens - self._mean_output)

    def note_protected(self) -> None:
        """A non-sheddable request arrived (admitted or not): latency matters on this pool."""
        self._protected_at = self.clock()

    def protects_latency(self) -> bool:
        """Whether the latency guard holds sheddable work back: a non-sheddable request is
        open, or arrived within ``PROTECT_WINDOW_S``. With only sheddable traffic there is
        nothing to protect, and its batches may grow as large as the queue-time bound lets
        them."""
        if self._protected_at is not None and (
                self.clock() - self._protected_at <= PROTECT_WINDOW_S):
            return True
        return self.pool.num_protected > 0

    @property
    def num_not_added(self) -> int:
        """Requests admitted but not yet added to the pool client (their generation task has
        not started: a burst is admitted faster than it is sent). Only those admitted within
        ``NOT_ADDED_TTL_S`` count, so a request that failed in between cannot linger."""
        pending = self._num_admitted - self.pool.num_added
        if pending <= 0:
            return 0
        oldest = self.clock() - NOT_ADDED_TTL_S
        recent = 0
        for t, _ in reversed(self._sent_prompts):
            if t < oldest or recent >= pending:
                break
            recent += 1
        return recent

    @property
    def num_unseen(self) -> int:
        """Requests added since the pool's latest stats (not in its counts yet)."""
        stats = self.pool.stats
        if stats is None:
            return self.pool.num_active
        return max(0, self.pool.num_active - stats.num_running - stats.num_waiting)

    @property
    def num_waiting(self) -> int:
        """Waiting requests: the pool's count, and those it has not seen yet."""
        stats = self.pool.stats
        return (stats.num_waiting if stats else 0) + self.num_unseen + self.num_not_added

    def _latest_prompts(self, n: int) -> int:
        return sum(tokens for _, tokens in itertools.islice(reversed(self._sent_prompts), n))

    def backlog(self) -> Backlog:
        """The pool's backlog, as a sheddable request meets it: the workers it may be placed
        on (``num_sheddable_workers``) and their free KV; the waiting and running requests
        of them all (a reserved worker's few non-sheddable ones count as if theirs, erring
        toward shedding). Its queued prompt tokens are the most of two views: the
        pool's count plus the prompts it has not seen (admitted, not yet added; added since
        its stats), and the frontend's: the prompts of every request in flight without a
        first token, plus those admitted, not yet added (the pool admits requests to its
        running set before their prefill is done, and their remaining chunks are in no count
        of its own)."""
        stats = self.pool.stats
        not_added = self.num_not_added
        unseen = not_added + self.num_unseen
        _, unstarted_tokens = self.pool.prefill_backlog()
        frontend_view = unstarted_tokens + self._latest_prompts(not_added)
        pool_view = self._latest_prompts(unseen)
        if stats is None:
            return Backlog(live_workers=0, waiting_requests=unseen,
                           waiting_tokens=max(pool_view, frontend_view), running_requests=0)
        free_blocks = stats.num_free_blocks
        if stats.reserved_worker_ids and len(stats.worker_ids) == len(free_blocks):
            free_blocks = [n for w, n in zip(stats.worker_ids, free_blocks, strict=True)
                           if w not in stats.reserved_worker_ids]
        free_kv = (sum(free_blocks) * stats.block_size
                   if stats.block_size and free_blocks else None)
        return Backlog(live_workers=self.num_sheddable_workers,
                       waiting_requests=stats.num_waiting + unseen,
                       waiting_tokens=max(stats.num_waiting_tokens + pool_view, frontend_view),
                       running_requests=stats.num_running, free_kv_tokens=free_kv)

    def drain_rate(self) -> float:
        """Requests finished per second over the window (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def prediction(self) -> Prediction:
        """The predicted wait of a request arriving now, and what bounds it."""
        return predict(self.backlog(), max_num_seqs=self.max_num_seqs, budget=self.budget,
                       tokens_per_s=self.steps.tokens_per_s(), step_s=self.steps.step_s(),
                       finish_rate=self.drain_rate(), mean_output_tokens=self._mean_output)

    def predicted_wait(self) -> float:
        """Seconds a request arriving now is predicted to wait before it runs."""
        return self.prediction().wait_s


class Shedder:
    """Refuses sheddable requests to a saturated pool, with ``Retry-After`` set to the
    predicted drain time of its queue; and, with a ``latency_factor``, while serving them
    would slow down everything else (``engine.frontend.guard``)."""

    def __init__(self, shed_queue_time_s: float, latency_factor: float = 0.0,
                 loop_lag: LoopLag | None = None) -> None:
        self.shed_queue_time_s = shed_queue_time_s
        self.latency_factor = latency_factor
        self.loop_lag = loop_lag

    def admit(self, load: PoolLoad, priority: int) -> Refusal | None:
        if priority >= 0:
            return None
        predicted = load.prediction()
        wait = predicted.wait_s
        if wait > self.shed_queue_time_s:
            return Refusal(429, "shed", f"the engine is saturated (predicted queue wait "
                           f"{wait:.1f} s > --shed-queue-time {self.shed_queue_time_s} s: "
                           f"{predicted.detail}) and this request is sheddable (priority "
                           f"{priority}); retry later", retry_after_s=wait)
        if not self.latency_factor or not load.protects_latency():
            return None
        busy = load.busy_fraction()
        slowdown = load.steps.slowdown() if busy >= GUARD_BUSY_MIN else None
        why = guard_reason(slowdown, self.loop_lag, self.latency_factor, load.pool.num_active)
        if why is None:
            return None
        return Refusal(429, "shed", f"the engine is busy ({why}; predicted queue wait "
                       f"{wait:.1f} s) and this request is sheddable (priority {priority}); "
                       "retry later", retry_after_s=max(wait, GUARD_RETRY_S))


class Admission:
    """The admission state of one frontend, shared by its APIs: a request is charged to its
    API key's rate limit and refused if sheddable and its pool is saturated."""

    def __init__(self, models: Iterable[ServedModel], cfg: FrontendConfig,
                 max_num_seqs: int, max_num_batched_tokens: int = 512) -> None:
        self.keys = ApiKeys(cfg.api_keys)
        self.limiter = RateLimiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        self.loop_lag = LoopLag.on_running_loop() if cfg.shed_latency_factor else None
        self.shedder = Shedder(cfg.shed_queue_time_s, cfg.shed_latency_factor, self.loop_lag)
        self.loads = {m.name: PoolLoad(m.pool, max_num_seqs, max_num_batched_tokens)
                      for m in models}

    def close(self) -> None:
        if self.loop_lag is not None:
            self.loop_lag.close()

    def shed(self, model_name: str, priority: int) -> Refusal | None:
        """The shedding decision alone (nothing charged): what the HTTP server asks before
        it parses and tokenizes a request (``engine.frontend.early_shed``)."""
        load = self.loads.get(model_name)
        return self.shedder.admit(load, priority) if load is not None else None

    def admit(self, key: str, model_name: str, priority: int, num_tokens: int,
              requests: Sequence[EngineRequest] = ()) -> Refusal | None:
        """Charge ``num_tokens`` (prompt + max_tokens of every choice) to ``key`` unless the
        request is refused; say why it is. A shed request costs the key nothing. The
        admitted ``requests`` (about to be sent) count in the pool's backlog until its
        stats do."""
        load = self.loads[model_name]
        if priority >= 0:
            load.note_protected()
        refusal = self.shedder.admit(load, priority) or self.limiter.admit(key, num_tokens)
        if refusal is None:
            for r in requests:
                load.note_sent(len(r.prompt_token_ids) + len(r.output_token_ids),
                               r.sampling.max_tokens)
        return refusal
