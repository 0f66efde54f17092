"""pytest-benchmark microbenchmarks of the hot paths.

    python -m pytest bench/micro --benchmark-enable   # measure (see docs/benchmarks.md)

In the normal test run they execute once each (``--benchmark-disable``), so they cannot rot.
"""

from __future__ import annotations

import pytest

from bench.scheduler import build, fake_result
from engine import ipc
from engine.config import SchedulerConfig
from engine.messages import (
    AddRequest,
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    PoolOutputs,
    PoolStats,
    RequestOutput,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.scheduler.block_manager import ROOT_HASH, chain_hash
from engine.scheduler.request import Request
from engine.scheduler.scheduler import Scheduler


@pytest.mark.parametrize("running", [64, 256, 1024])
def test_scheduler_step(benchmark, running):
    """schedule + update for all 8 workers, steady decode, ``running`` requests in all."""
    sched = build(running, 8, prompt_len=64, block_size=16, policy="fcfs",
                  placement="cache-aware", steps=10_000)
    workers = sorted(sched.workers)
    for w in workers:
        plan = sched.schedule(w, 0.0)
        sched.update(plan, fake_result(plan), 0.0)

    def step():
        for w in workers:
            plan = sched.schedule(w, 1.0)
            sched.update(plan, fake_result(plan), 1.0)

    benchmark(step)
    benchmark.extra_info["running"] = running


def _plan(num_decodes: int) -> StepPlan:
    sp = SamplingParams(temperature=0.0, max_tokens=128)
    return StepPlan(
        step_id=1, worker_id=0,
        new_requests=[NewRequestData(request_id="new-0", token_ids=list(range(512)), sampling=sp,
                                     block_ids=list(range(32)), num_computed_tokens=0,
                                     num_scheduled_tokens=512)],
        cached_requests=[CachedRequestData(request_id=f"req-{i}", num_scheduled_tokens=1)
                         for i in range(num_decodes)],
    )


def test_encode_step_plan(benchmark):
    plan = _plan(256)
    benchmark(ipc.encode, plan)


def test_decode_step_plan(benchmark):
    frame = ipc.encode(_plan(256))
    benchmark(ipc.POOL_TO_WORKER.decode, frame)


def test_block_hashing_2k_prompt(benchmark):
    tokens = tuple(range(2048))

    def hash_all():
        parent = ROOT_HASH
        for i in range(0, 2048, 16):
            parent = chain_hash(parent, tokens[i:i + 16])
        return parent

    benchmark(hash_all)


def test_incremental_detokenization(benchmark):
    from transformers import AutoTokenizer

    from engine.detokenizer import IncrementalDetokenizer
    from engine.models.default import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok.encode("Return a list of the names in the directory, sorted. " * 8)

    def stream():
        d = IncrementalDetokenizer(tok, ids[:4], stop=("\n\n",))
        for t in ids[4:]:
            d.append([t])
        return d.finish()

    benchmark(stream)


def _step_result() -> StepResult:
    """A worker's sampled tokens for 256 decoding requests (worker -> pool, every step)."""
    return StepResult(step_id=1, worker_id=0, request_ids=[f"req-{i}" for i in range(256)],
                      token_ids=list(range(256)), execute_time_s=0.01)


def _pool_outputs() -> PoolOutputs:
    """One new token for each of 256 requests (pool -> frontend, every step)."""
    return PoolOutputs(outputs=[RequestOutput(request_id=f"req-{i}", new_token_ids=[i])
                                for i in range(256)],
                       stats=PoolStats(num_running=256, kv_usage=[0.5], num_free_blocks=[100]))


def _add_request() -> AddRequest:
    """A new request with a 2k-token prompt (frontend -> pool, once per request)."""
    return AddRequest(request=EngineRequest(
        request_id="req-0", prompt_token_ids=tuple(range(2048)),
        sampling=SamplingParams(temperature=0.0, max_tokens=128)))


_MESSAGES = {
    "step_result": (_step_result, ipc.WORKER_TO_POOL),
    "pool_outputs": (_pool_outputs, ipc.POOL_TO_FRONTEND),
    "add_request": (_add_request, ipc.FRONTEND_TO_POOL),
}


@pytest.mark.parametrize("name", list(_MESSAGES))
def test_encode_message(benchmark, name):
    make, _ = _MESSAGES[name]
    benchmark(ipc.encode, make())


@pytest.mark.parametrize("name", list(_MESSAGES))
def test_decode_message(benchmark, name):
    make, codec = _MESSAGES[name]
    msg = make()
    assert benchmark(codec.decode, ipc.encode(msg)) == msg


_SYSTEM_PROMPT = tuple(range(512))


def _scheduler_with_cached_prefix(num_waiting: int) -> tuple[tuple[Scheduler], dict]:
    """One worker whose cache holds a 512-token system prompt, and ``num_waiting`` queued
    requests whose prompts are that prefix plus 64 tokens of their own."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=128),
                      block_size=16, max_model_len=4096)
    sched.add_worker(0, 4096, 0.0)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    sched.add(EngineRequest(request_id="warm", prompt_token_ids=(*_SYSTEM_PROMPT, 9999),
                            sampling=sp), 0.0)
    plan = sched.schedule(0, 0.0)
    sched.update(plan, fake_result(plan), 0.0)
    for i in range(num_waiting):
        own = tuple(range(10_000 + 64 * i, 10_000 + 64 * (i + 1)))
        sched.add(EngineRequest(request_id=f"r{i}", prompt_token_ids=_SYSTEM_PROMPT + own,
                                sampling=sp), 0.0)
    return (sched,), {}


def test_scheduler_admission_step(benchmark):
    """schedule + update of one step that admits 64 requests sharing a cached 512-token
    prefix: prefix lookups (hashing and verified matches), block allocation, the plan."""

    def admit(sched: Scheduler) -> StepPlan:
        plan = sched.schedule(0, 1.0)
        sched.update(plan, fake_result(plan), 1.0)
        return plan

    plan = benchmark.pedantic(admit, setup=lambda: _scheduler_with_cached_prefix(64), rounds=20)
    assert len(plan.new_requests) == 64
    assert all(r.num_computed_tokens == len(_SYSTEM_PROMPT) for r in plan.new_requests)


def test_prefix_match_2k_prompt(benchmark):
    """A placement probe: the cached prefix of a 2k-token prompt on a worker that holds it
    (hashes are computed once per request, so this is the verified match of 128 blocks)."""
    prompt = tuple(range(2048))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4096), block_size=16,
                      max_model_len=4096)
    sched.add_worker(0, 512, 0.0)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    sched.add(EngineRequest(request_id="warm", prompt_token_ids=prompt, sampling=sp), 0.0)
    plan = sched.schedule(0, 0.0)
    sched.update(plan, fake_result(plan), 0.0)
    probe = Request(EngineRequest(request_id="probe", prompt_token_ids=(*prompt, 1),
                                  sampling=sp), 4096)
    assert benchmark(sched.workers[0].cached_prefix_tokens, probe) == 2048
