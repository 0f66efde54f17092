"""pytest-benchmark: what KV events cost the scheduler's loop, at their worst.

    python -m pytest bench/micro/test_kv_events_cost.py --benchmark-enable

Each round admits four new 512-token prompts (``max_tokens`` 1) on one worker whose cache
holds exactly them, prefills them in one step and finishes them: every step registers 128
blocks and evicts the 128 the previous step cached. With ``kv_events`` the step also drains
the events and hands them to a real ``KVEventPublisher`` (its thread encodes and sends them on
an ipc PUB socket nobody reads), as the pool does. Building the requests is not timed.
"""

from __future__ import annotations

import itertools

import pytest

from bench.scheduler import fake_result
from engine.config import KVEventsConfig, SchedulerConfig
from engine.kv_events import KVEventPublisher
from engine.messages import EngineRequest, SamplingParams
from engine.scheduler.scheduler import Scheduler

PROMPT_LEN = 512
BATCH = 4


@pytest.mark.parametrize("kv_events", [False, True], ids=["events-off", "events-on"])
def test_prefill_step_registering_and_evicting(benchmark, kv_events, tmp_path):
    cfg = SchedulerConfig(max_num_batched_tokens=BATCH * PROMPT_LEN, max_num_seqs=BATCH)
    sched = Scheduler(cfg, block_size=16, max_model_len=4096, kv_events=kv_events)
    sched.add_worker(0, BATCH * (PROMPT_LEN // 16 + 1), 0.0)
    publisher = (KVEventPublisher(KVEventsConfig(endpoint=f"ipc://{tmp_path}/kv"), 0, 16)
                 if kv_events else None)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ids = itertools.count()

    def add_batch() -> None:
        for _ in range(BATCH):
            i = next(ids)
            prompt = tuple((i * 7919 + j * 31) % 32000 for j in range(PROMPT_LEN))
            sched.add(EngineRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sp),
                      0.0)

    def step() -> None:
        plan = sched.schedule(0, 1.0)
        assert plan is not None and len(plan.new_requests) == BATCH
        sched.update(plan, fake_result(plan), 1.0)
        if publisher is not None:
            publisher.publish(sched.drain_kv_events(), 1.0)

    try:
        add_batch()
        step()  # fill the cache: every later step evicts
        benchmark.pedantic(step, setup=add_batch, rounds=200, warmup_rounds=5)
        assert sched.num_unfinished == 0
        if publisher is not None:
            assert sched.workers[0].blocks.events == []
    finally:
        if publisher is not None:
            publisher.close()
