"""pytest-benchmark microbenchmarks of the hot paths.

    python -m pytest bench/micro --benchmark-enable   # measure (see docs/benchmarks.md)

In the normal test run they execute once each (``--benchmark-disable``), so they cannot rot.
"""

from __future__ import annotations

import pytest

from bench.scheduler import build, fake_result
from engine import ipc
from engine.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from engine.scheduler.block_manager import ROOT_HASH, chain_hash


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
