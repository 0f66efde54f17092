"""Priority preemption end to end: a critical request at a full engine starts at once, and
the sheddable requests it displaced finish with exactly their uninterrupted greedy output."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from e2e.engine_proc import launched

from engine import LLM, SamplingParams
from engine.frontend.proto import pb2, pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOW_PROMPTS = ["Return a list of", "The default value is", "Raise ValueError if", "Open the file"]
LOW_TOKENS = 120


@pytest.fixture(scope="module")
def engine():
    with launched("--policy", "priority", "--max-num-seqs", "4", "--num-kv-blocks", "64") as (
            proc, port):
        yield port
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)


def uninterrupted(prompts, max_tokens):
    llm = LLM()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, sp)]


def test_critical_request_preempts_and_displaced_outputs_are_unchanged(engine):
    port = engine
    started = {p: asyncio.Event() for p in LOW_PROMPTS}

    async def low(stub, prompt):
        req = pb2.GenerateRequest(prompt=prompt, max_tokens=LOW_TOKENS, temperature=0.0,
                                  ignore_eos=True, priority=-1)
        tokens = []
        async for resp in stub.Generate(req):
            tokens.extend(resp.token_ids)
            if len(tokens) >= 5:
                started[prompt].set()
        return tokens

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb2_grpc.EngineStub(ch)
            lows = [asyncio.create_task(low(stub, p)) for p in LOW_PROMPTS]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 60)
            sent = time.perf_counter()
            first_token_at = None
            last = None
            req = pb2.GenerateRequest(prompt="Create a new", max_tokens=16, temperature=0.0,
                                      ignore_eos=True, priority=10, explain=True)
            async for resp in stub.Generate(req):
                if first_token_at is None and resp.token_ids:
                    first_token_at = time.perf_counter()
                last = resp
            still_running = sum(not t.done() for t in lows)
            health = await stub.Health(pb2.HealthRequest())
            return await asyncio.gather(*lows), first_token_at - sent, last, still_running, health

    lows, ttft, last, still_running, health = asyncio.run(run())
    assert still_running >= 1, "the critical request should finish while sheddable ones run"
    assert health.pools[0].num_preemptions >= 1
    e = last.explanation
    assert e.placement == "cache-aware" and e.num_preemptions == 0
    assert e.queue_time_s < 0.5 and ttft < 2.0, (e.queue_time_s, ttft)
    assert lows == uninterrupted(LOW_PROMPTS, LOW_TOKENS)
