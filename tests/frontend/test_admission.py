"""Admission pieces with a fake clock and a stand-in pool client: constant-time key check,
token-bucket rate limits, the drain-rate estimate and the shedding rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from engine.frontend.admission import ApiKeys, PoolLoad, RateLimiter, Refusal, Shedder
from engine.messages import PoolStats


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakePool:
    """What PoolLoad reads of a PoolClient."""

    def __init__(self) -> None:
        self.stats: PoolStats | None = None
        self.stats_listeners: list[Callable[[PoolStats], None]] = []
        self.num_finished = 0
        self.num_active = 0

    def report(self, stats: PoolStats) -> None:
        self.stats = stats
        for listener in self.stats_listeners:
            listener(stats)


def test_api_keys() -> None:
    keys = ApiKeys(["alpha", "beta"])
    assert keys.check("Bearer beta") == "beta" and keys.check("bearer  alpha ") == "alpha"
    for bad in (None, "", "beta", "Basic beta", "Bearer gamma", "Bearer betaa"):
        assert keys.check(bad) is None
    assert ApiKeys([]).check(None) == ""  # no keys configured: everyone is ""


def test_rate_limiter_buckets_refill_over_a_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=2, tpm=100, clock=clock)
    assert limiter.admit("k", 10) is None and limiter.admit("k", 10) is None
    refused = limiter.admit("k", 10)
    assert refused is not None and refused.status == 429 and refused.reason == "rate_limit"
    assert refused.retry_after == "30"  # one request per 30 s
    assert limiter.admit("other", 10) is None  # per key
    clock.t += 30
    assert limiter.admit("k", 10) is None
    clock.t += 60  # both buckets full again
    assert limiter.admit("k", 90) is None
    short = limiter.admit("k", 20)  # 10 tokens left, the next 10 come in 6 s
    assert short is not None and short.retry_after == "6"
    never = limiter.admit("k", 101)
    assert never is not None and never.retry_after is None and "--rate-limit-tpm" in never.message
    assert RateLimiter(None, None).admit("k", 10**9) is None


def test_refusal_retry_after_rounds_up_to_whole_seconds() -> None:
    assert Refusal(429, "shed", "", 0.2).retry_after == "1"
    assert Refusal(429, "shed", "", 2.01).retry_after == "3"
    assert Refusal(503, "x", "").retry_after is None


def test_predicted_wait_from_the_drain_rate() -> None:
    clock, pool = Clock(), FakePool()
    load = PoolLoad(pool, max_num_seqs=4, clock=clock)  # type: ignore[arg-type]
    assert load.predicted_wait() == 0.0  # nothing waiting
    pool.num_active = 6
    pool.report(PoolStats(num_waiting=2, num_running=4, live_workers=1))
    assert load.num_waiting == 2
    assert load.predicted_wait() == 0.0  # no drain rate yet, less than a batch waiting
    pool.num_active = 9  # sent since the stats: counted as waiting at once
    assert load.num_waiting == 5 and math.isinf(load.predicted_wait())
    for _ in range(5):  # 2 requests finish per second
        clock.t += 1
        pool.num_finished += 2
        pool.report(PoolStats(num_waiting=5, num_running=4, live_workers=1))
    assert load.drain_rate() == pytest.approx(2.0)
    assert load.predicted_wait() == pytest.approx(2.5)


def test_shedder_refuses_only_sheddable_requests_above_the_threshold() -> None:
    clock, pool = Clock(), FakePool()
    load = PoolLoad(pool, max_num_seqs=4, clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        clock.t += 1
        pool.num_finished += 1
        pool.report(PoolStats(num_waiting=3, num_running=4, live_workers=1))
    shedder = Shedder(shed_queue_time_s=2.0)
    assert load.predicted_wait() == pytest.approx(3.0)
    refusal = shedder.admit(load, priority=-1)
    assert refusal is not None and refusal.reason == "shed" and refusal.retry_after == "3"
    assert shedder.admit(load, priority=0) is None and shedder.admit(load, priority=5) is None
    assert Shedder(shed_queue_time_s=5.0).admit(load, priority=-1) is None
