"""Admission pieces with a fake clock and a stand-in pool client: constant-time key check,
token-bucket rate limits, the queue-wait prediction from the pool's state (queued prompt
tokens, step rates, slots, KV, requests finishing) and the shedding rule."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import msgspec
import pytest

from engine.config import FrontendConfig
from engine.frontend import admission as admission_module
from engine.frontend.admission import (
    PROTECT_WINDOW_S,
    Admission,
    ApiKeys,
    PoolLoad,
    RateLimiter,
    Refusal,
    Shedder,
)
from engine.frontend.drain import COLD_STEP_S, Backlog, predict
from engine.frontend.guard import GUARD_RETRY_S, LAG_MIN_IN_FLIGHT, LOOP_LAG_LIMIT_S, LoopLag
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
        self.num_added = 0
        self.num_protected = 0  # open requests of priority >= 0
        self.unstarted_tokens = 0  # prompt tokens of in-flight requests without a first token

    def prefill_backlog(self) -> tuple[int, int]:
        return 0, self.unstarted_tokens

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
    # No completions yet: the 2 requests beyond the 4 busy slots wait for running ones, each
    # predicted to take the mean output budget (16) of cold steps (0.1 s): 4 slots per 1.6 s.
    assert load.prediction().bound == "slots"
    assert load.predicted_wait() == pytest.approx(2 / (4 / (16 * COLD_STEP_S)))
    pool.num_active = 9  # sent since the stats: counted as waiting at once
    assert load.num_waiting == 5
    for _ in range(5):  # 2 requests finish per second: the measured rate takes over
        clock.t += 1
        pool.num_finished += 2
        pool.report(PoolStats(num_waiting=5, num_running=4, live_workers=1))
    assert load.drain_rate() == pytest.approx(2.0)
    assert load.predicted_wait() == pytest.approx(2.5)


def fresh_pool(clock: Clock, free_blocks: int = 1000) -> tuple[FakePool, PoolLoad]:
    """A fresh two-worker pool: nothing ran, nothing finished, 16-token KV blocks."""
    pool = FakePool()
    load = PoolLoad(pool, max_num_seqs=64, max_num_batched_tokens=512,  # type: ignore[arg-type]
                    clock=clock)
    pool.report(PoolStats(live_workers=2, block_size=16, num_free_blocks=[free_blocks] * 2,
                          num_blocks=[free_blocks] * 2))
    return pool, load


def burst(pool: FakePool, load: PoolLoad, shedder: Shedder, n: int, prompt: int,
          max_tokens: int = 64) -> tuple[int, list[Refusal]]:
    """``n`` simultaneous sheddable requests, before the pool reports again."""
    admitted, refused = 0, []
    for _ in range(n):
        refusal = shedder.admit(load, priority=-1)
        if refusal is None:
            load.note_sent(prompt, max_tokens)
            pool.num_active += 1
            pool.num_added += 1
            admitted += 1
        else:
            refused.append(refusal)
    return admitted, refused


def test_a_fresh_engine_sheds_a_first_burst_by_its_queued_prompt_tokens() -> None:
    clock = Clock()
    pool, load = fresh_pool(clock)
    admitted, refused = burst(pool, load, Shedder(shed_queue_time_s=1.0), 400, prompt=200)
    # Cold prefill rate: one 512-token budget per 0.1 s per worker, 10,240 tokens/s in all;
    # 1 s of it holds 51.2 prompts of 200 tokens: the 53rd sees 52 * 200 tokens ahead.
    assert admitted == 52 and len(refused) == 348
    assert all(r.reason == "shed" and r.status == 429 for r in refused)
    assert load.prediction().bound == "prefill"
    assert refused[0].retry_after_s == pytest.approx(52 * 200 / 10_240)
    assert refused[0].retry_after == "2" and "prompt tokens queued" in refused[0].message
    # Critical requests are never shed, however deep the queue.
    assert Shedder(1.0).admit(load, priority=0) is None


def test_the_prefill_rate_comes_from_the_pools_full_steps() -> None:
    clock = Clock()
    pool, load = fresh_pool(clock)
    assert load.steps.tokens_per_s() == 512 / COLD_STEP_S
    # Two full steps of 512 tokens in 20 ms each; small decode steps do not count.
    pool.report(PoolStats(live_workers=2, step_num_tokens=[512, 3, 512, 2],
                          step_times_s=[0.02, 0.01, 0.02, 0.01]))
    assert load.steps.tokens_per_s() == pytest.approx(25_600)
    assert load.steps.step_s() == pytest.approx(0.015)
    # 40,000 tokens queued in the pool, 2 workers, 64 running decodes per worker taking
    # 64 of each step's 512 tokens: 25,600 * 2 * 7/8 = 44,800 prefill tokens/s.
    pool.report(PoolStats(live_workers=2, num_waiting=100, num_waiting_tokens=40_000,
                          num_running=128 - 100, block_size=16,
                          num_free_blocks=[10_000, 10_000]))
    pool.num_active = 128
    prediction = load.prediction()
    assert prediction.bound == "prefill"
    assert prediction.wait_s == pytest.approx(40_000 / (25_600 * 2 * (1 - 14 / 512)))


def test_prompts_beyond_the_free_kv_wait_for_running_requests() -> None:
    clock = Clock()
    pool, load = fresh_pool(clock, free_blocks=50)  # 1,600 free tokens in all
    pool.num_active = 12
    pool.report(PoolStats(live_workers=2, num_waiting=4, num_waiting_tokens=3_200,
                          num_running=8, block_size=16, num_free_blocks=[50, 50],
                          step_num_tokens=[512], step_times_s=[0.01]))
    prediction = load.prediction()
    # Half the queued tokens do not fit: 2 of the 4 requests wait for the 8 running ones to
    # finish, each after 16 steps of 10 ms: 50 finishing per second.
    assert prediction.bound == "kv"
    assert prediction.wait_s == pytest.approx(2 / (8 / (16 * 0.01)))
    assert predict(Backlog(live_workers=1, waiting_requests=0, waiting_tokens=0,
                           running_requests=3), max_num_seqs=4, budget=512,
                   tokens_per_s=1e4, step_s=0.01, finish_rate=0,
                   mean_output_tokens=16).wait_s == 0.0


def test_requests_sent_since_the_stats_count_with_their_prompts() -> None:
    clock = Clock()
    pool, load = fresh_pool(clock)
    for prompt in (100, 300, 500):
        load.note_sent(prompt, 16)
    pool.num_added = 3
    pool.num_active = 2  # the pool's stats say nothing of the last two sent
    backlog = load.backlog()
    assert backlog.waiting_requests == 2 and backlog.waiting_tokens == 800
    load.note_sent(1000, 16)  # admitted, its generation not started: not added yet
    backlog = load.backlog()
    assert load.num_not_added == 1
    assert backlog.waiting_requests == 3 and backlog.waiting_tokens == 1800
    clock.t += 2  # a request that never reached the pool client stops counting
    assert load.num_not_added == 0 and load.backlog().waiting_requests == 2
    pool.num_added = 4
    assert backlog.free_kv_tokens == 2 * 1000 * 16
    pool.report(PoolStats(live_workers=2, num_waiting=2, num_waiting_tokens=800))
    assert load.backlog().waiting_tokens == 800  # now counted by the pool, not twice
    # The pool took them into its running set before their prefill was done: its queue is
    # empty, but the frontend still waits for their first tokens.
    pool.report(PoolStats(live_workers=2, num_running=2))
    pool.unstarted_tokens = 800
    assert load.backlog().waiting_tokens == 800


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


@pytest.fixture
def busy_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's step signal without its busy gate (tested on its own below): these tests
    report a few steps, not a second's worth."""
    monkeypatch.setattr(admission_module, "GUARD_BUSY_MIN", 0.0)


def test_the_guard_step_signal_needs_busy_workers() -> None:
    """Steps slower than light ones count only while the workers are busy: a pool at
    moderate load has slow steps (prefill chunks, larger batches) but idles between them,
    and a critical request rarely waits for one."""
    clock = Clock()
    pool, load = fresh_pool(clock)  # two workers
    guarded = Shedder(shed_queue_time_s=1.0, latency_factor=1.5)
    load.note_protected()
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 8, step_times_s=[0.01] * 8,
                          step_batch_sizes=[1] * 8))
    # 3x slower steps, 0.6 s of them in a second on two workers: busy 0.3 + 0.04.
    clock.t += 0.5
    pool.report(PoolStats(live_workers=2, step_num_tokens=[40] * 20,
                          step_times_s=[0.03] * 20, step_batch_sizes=[8] * 20))
    assert load.steps.slowdown() == pytest.approx(3.0)
    assert load.busy_fraction() == pytest.approx(0.34)
    assert guarded.admit(load, priority=-1) is None
    # The same steps back to back on both workers: 1.8 s more in the second.
    clock.t += 0.4
    pool.report(PoolStats(live_workers=2, step_num_tokens=[40] * 60,
                          step_times_s=[0.03] * 60, step_batch_sizes=[8] * 60))
    assert load.busy_fraction() >= admission_module.GUARD_BUSY_MIN
    refusal = guarded.admit(load, priority=-1)
    assert refusal is not None and "3.0x slower" in refusal.message
    clock.t += admission_module.BUSY_WINDOW_S + 0.01  # a second without steps: idle
    assert load.busy_fraction() == 0.0 and guarded.admit(load, priority=-1) is None


def test_the_latency_guard_sheds_while_steps_are_slower_than_light_ones(busy_pool: None) -> None:
    clock = Clock()
    pool, load = fresh_pool(clock)
    guarded = Shedder(shed_queue_time_s=1.0, latency_factor=1.5)
    load.note_protected()  # a critical request arrived: there is latency to protect
    # Light steps (one request) of 10 ms, then batches three times as slow.
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 8, step_times_s=[0.01] * 8,
                          step_batch_sizes=[1] * 8))
    assert load.steps.slowdown() is None  # 8 steps: no trend yet
    pool.report(PoolStats(live_workers=2, step_num_tokens=[40] * 8, step_times_s=[0.03] * 8,
                          step_batch_sizes=[40] * 8))
    assert load.steps.slowdown() == pytest.approx(2.0)  # median of the last 16: 20 ms
    refusal = guarded.admit(load, priority=-1)
    assert refusal is not None and refusal.reason == "shed" and "2.0x slower" in refusal.message
    assert refusal.retry_after_s == GUARD_RETRY_S  # nothing queued: the least retry
    assert guarded.admit(load, priority=0) is None
    assert Shedder(shed_queue_time_s=1.0).admit(load, priority=-1) is None  # factor 0: off
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 16, step_times_s=[0.012] * 16,
                          step_batch_sizes=[2] * 16))  # light again: admitted again
    # The reference is the light steps' lower quartile: 10 ms, the slowest ones 12 ms.
    assert load.steps.slowdown() == pytest.approx(1.2)
    assert guarded.admit(load, priority=-1) is None


def test_the_guard_reference_is_the_uncontended_light_decode_step(busy_pool: None) -> None:
    """Under a flood on shared cores the light steps a pool still runs are a critical
    prompt's step (one request, a whole prompt) and decodes slowed by the flood's CPU use;
    neither may become the reference, or the guard would stop seeing the slowdown."""
    clock = Clock()
    pool, load = fresh_pool(clock)
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 40, step_times_s=[0.002] * 40,
                          step_batch_sizes=[1] * 40))  # alone: 2 ms decodes
    assert load.steps.light_step_s() == pytest.approx(0.002)
    # The flood: 6 ms batches, critical prompts of 74 tokens in steps of their own, and
    # the odd light decode slowed to 3.5 ms.
    for _ in range(10):
        pool.report(PoolStats(live_workers=2, step_num_tokens=[47] * 12 + [74, 1, 2],
                              step_times_s=[0.006] * 12 + [0.0055, 0.0035, 0.0035],
                              step_batch_sizes=[9] * 12 + [1, 1, 2]))
    assert load.steps.light_step_s() == pytest.approx(0.002)
    assert load.steps.slowdown() == pytest.approx(3.0)
    load.note_protected()
    refusal = Shedder(shed_queue_time_s=1.0, latency_factor=1.5).admit(load, priority=-1)
    assert refusal is not None and "3.0x slower" in refusal.message
    # A pool that only ever runs prompts (no decode steps) has no reference: no guard.
    pool2, load2 = fresh_pool(clock)
    pool2.report(PoolStats(live_workers=1, step_num_tokens=[74] * 40, step_times_s=[0.005] * 40,
                           step_batch_sizes=[1] * 40))
    assert load2.steps.light_step_s() is None and load2.steps.slowdown() is None


def test_the_latency_guard_holds_only_while_there_is_latency_to_protect(busy_pool: None) -> None:
    """Sheddable work alone is not held back by the guard (its batches may grow up to the
    queue-time bound); a non-sheddable arrival turns the guard on for ``PROTECT_WINDOW_S``,
    and an open non-sheddable request keeps it on."""
    clock = Clock()
    pool, load = fresh_pool(clock)
    guarded = Shedder(shed_queue_time_s=1.0, latency_factor=1.5)
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 8 + [40] * 8,
                          step_times_s=[0.01] * 8 + [0.03] * 8,
                          step_batch_sizes=[1] * 8 + [40] * 8))
    assert load.steps.slowdown() == pytest.approx(2.0)
    assert not load.protects_latency() and guarded.admit(load, priority=-1) is None
    load.note_protected()
    assert guarded.admit(load, priority=-1) is not None
    clock.t += PROTECT_WINDOW_S + 0.1  # the critical request long finished
    assert guarded.admit(load, priority=-1) is None
    pool.num_protected = 1  # one still open (a long stream)
    assert guarded.admit(load, priority=-1) is not None


def test_admission_notes_non_sheddable_arrivals_even_when_refused() -> None:
    pool = FakePool()
    model = SimpleNamespace(name="m", pool=pool)  # what Admission reads of a served model
    admission = Admission([model], FrontendConfig(rate_limit_rpm=2),  # type: ignore[list-item]
                          max_num_seqs=4)
    load = admission.loads["m"]
    assert not load.protects_latency()
    assert admission.admit("", "m", priority=-1, num_tokens=10) is None
    assert not load.protects_latency()  # sheddable traffic protects nothing
    assert admission.admit("", "m", priority=0, num_tokens=10) is None
    assert load.protects_latency()
    refused = admission.admit("", "m", priority=1, num_tokens=10)  # over the rate limit
    assert refused is not None and refused.reason == "rate_limit"
    admission.close()


def test_the_latency_guard_sheds_while_the_event_loop_lags_under_load() -> None:
    clock = Clock()
    pool, load = fresh_pool(clock)
    lag = LoopLag()
    for _ in range(20):
        lag.sample(0.02)  # every timer 20 ms late
    assert lag.lag_s > LOOP_LAG_LIMIT_S
    guarded = Shedder(shed_queue_time_s=1.0, latency_factor=1.5, loop_lag=lag)
    pool.num_protected = 1  # a critical request is open
    pool.num_active = LAG_MIN_IN_FLIGHT - 1  # few requests: the lag is not theirs
    assert guarded.admit(load, priority=-1) is None
    pool.num_active = LAG_MIN_IN_FLIGHT
    refusal = guarded.admit(load, priority=-1)
    assert refusal is not None and "event loop lags" in refusal.message
    for _ in range(40):
        lag.sample(-0.001)  # on time again (early counts as 0)
    assert lag.lag_s < LOOP_LAG_LIMIT_S and guarded.admit(load, priority=-1) is None


def test_sheddable_load_is_judged_on_the_workers_it_may_run_on() -> None:
    """While the pool keeps a worker free of sheddable requests (``reserved_worker_ids``),
    the guard and the prediction judge the others: their steps (not the reserved worker's
    light critical ones, which would pull the median down to light), their busy time (one
    full worker is a full pool for sheddable work, not half of one), their free KV."""
    clock = Clock()
    pool, load = fresh_pool(clock)
    guarded = Shedder(shed_queue_time_s=1.0, latency_factor=1.5)
    load.note_protected()
    pool.report(PoolStats(live_workers=2, step_num_tokens=[1] * 8, step_times_s=[0.01] * 8,
                          step_batch_sizes=[1] * 8, step_worker_ids=[0, 1] * 4))
    # A second of steps: worker 0 back to back on sheddable batches 3x slower than light
    # steps, worker 1 (reserved) a light critical decode now and then, more of them.
    clock.t += 0.9
    flood = PoolStats(live_workers=2, worker_ids=[0, 1], block_size=16,
                      num_free_blocks=[10, 500], step_num_tokens=[40] * 30 + [1] * 40,
                      step_times_s=[0.03] * 30 + [0.01] * 40,
                      step_batch_sizes=[8] * 30 + [1] * 40,
                      step_worker_ids=[0] * 30 + [1] * 40, reserved_worker_ids=[1])
    pool.report(flood)
    assert load.num_sheddable_workers == 1
    assert load.busy_fraction() == pytest.approx(0.98)  # 0.9 s + the first 8 light steps
    assert load.steps.slowdown() == pytest.approx(3.0)
    refusal = guarded.admit(load, priority=-1)
    assert refusal is not None and "3.0x slower" in refusal.message
    backlog = load.backlog()
    assert (backlog.live_workers, backlog.free_kv_tokens) == (1, 10 * 16)
    # The same steps with nothing reserved: the light ones count, the pool is half busy.
    clock2 = Clock()
    pool2, load2 = fresh_pool(clock2)
    load2.note_protected()
    pool2.report(PoolStats(live_workers=2, step_num_tokens=[1] * 8, step_times_s=[0.01] * 8,
                           step_batch_sizes=[1] * 8))
    clock2.t += 0.9
    pool2.report(msgspec.structs.replace(flood, reserved_worker_ids=[]))
    assert load2.busy_fraction() < admission_module.GUARD_BUSY_MIN
    assert load2.steps.slowdown() == pytest.approx(1.0)
    assert guarded.admit(load2, priority=-1) is None
    assert load2.backlog().live_workers == 2
