"""`python -m engine.launch --runner vllm --workers 2`: vLLM's worker in each worker process,
our scheduler in front, driven over gRPC.

One launch serves the module (two vLLM workers start in parallel: ~20 s on 2 cores), with
no --block-size: the launcher resolves the 32-token blocks vLLM's CPU attention needs and
hands them to the pool and both workers (a mismatch would fail every plan). Greedy
streams must equal the in-process native engine's tokens; a worker killed mid-stream is
restarted and its requests finish unchanged elsewhere; Ctrl-C leaves nothing behind.
The helpers are those of test_engine.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time

import pytest
from e2e.engine_proc import assert_ctrl_c_leaves_nothing, launched, wait_idle, worker_pids
from e2e.test_engine import _generate

if importlib.util.find_spec("vllm") is None:  # pragma: no cover - depends on the install
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vllm runner's tests: `make test` installs vLLM")
    pytest.skip("vLLM is not installed (make install-vllm)", allow_module_level=True)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK = 32  # what the launcher resolves for vLLM's CPU attention (a multiple of 32)
NUM_KV_BLOCKS = 64
MAX_TOKENS = 24
LONG_TOKENS = 160  # streams that last seconds: the kill lands mid-stream
PROMPTS = [
    "Return a list of", "The default value is", "Raise ValueError if", "This module provides",
    "Open the socket and", "Return the number of",
]


@pytest.fixture(scope="module")
def engine():
    with launched("--runner", "vllm", "--workers", "2",  # no --block-size: resolved
                  "--num-kv-blocks", str(NUM_KV_BLOCKS), timeout=240) as (proc, port):
        assert _wait_idle(port) == [NUM_KV_BLOCKS] * 2  # both workers (block 0 is vLLM's)
        yield proc, port


@pytest.fixture(scope="module")
def reference():
    """The in-process engine with the native runner, greedy, on the same prompts."""
    from engine import LLM, SamplingParams

    llm = LLM(block_size=BLOCK, num_kv_blocks=NUM_KV_BLOCKS)
    short = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    long = llm.generate(PROMPTS, SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0,
                                                ignore_eos=True))
    for runner in llm.runners:
        runner.close()
    return {"short": {p: o.token_ids for p, o in zip(PROMPTS, short, strict=True)},
            "long": {p: o.token_ids for p, o in zip(PROMPTS, long, strict=True)}}


def _wait_idle(port: int, timeout: float = 30.0) -> list[int]:
    return wait_idle(port, [NUM_KV_BLOCKS] * 2, timeout)


def test_concurrent_streams_match_native(engine, reference):
    _, port = engine

    async def run():
        return await asyncio.gather(*(_generate(port, p, max_tokens=MAX_TOKENS)
                                      for p in PROMPTS))

    for prompt, (tokens, _) in zip(PROMPTS, asyncio.run(run()), strict=True):
        assert tokens == reference["short"][prompt], prompt
    assert _wait_idle(port) == [NUM_KV_BLOCKS] * 2


def _long_streams(port: int, kill_pid: int | None = None):
    async def run():
        task = asyncio.gather(*(_generate(port, p, max_tokens=LONG_TOKENS, ignore_eos=True,
                                          explain=True) for p in PROMPTS))
        if kill_pid is not None:
            await asyncio.sleep(1.0)  # every stream is under way (they last seconds)
            os.kill(kill_pid, signal.SIGKILL)
        return await task

    return asyncio.run(run())


def test_sigkill_a_vllm_worker_mid_stream_loses_nothing(engine, reference):
    proc, port = engine
    before = worker_pids(proc.pid)
    assert len(before) == 2
    results = _long_streams(port, kill_pid=before["engine-worker-0-1"])
    for prompt, (tokens, last) in zip(PROMPTS, results, strict=True):
        assert tokens == reference["long"][prompt], prompt
        assert last.finish_reason == "length"
    assert any(last.explanation.num_preemptions > 0 or last.explanation.worker_id == 0
               for _, last in results)
    deadline = time.time() + 180  # a new vLLM worker imports vLLM and loads the model again
    after = before
    while time.time() < deadline:
        after = worker_pids(proc.pid)
        if len(after) == 2 and after["engine-worker-0-1"] != before["engine-worker-0-1"]:
            break
        time.sleep(0.5)
    assert after["engine-worker-0-1"] != before["engine-worker-0-1"], "worker was not restarted"
    time.sleep(1.0)  # the pool has seen the death; now wait for the new worker's hello
    assert _wait_idle(port, timeout=180) == [NUM_KV_BLOCKS] * 2
    # the restarted worker serves: both workers take part in the next batch, tokens unchanged
    results = _long_streams(port)
    for prompt, (tokens, _) in zip(PROMPTS, results, strict=True):
        assert tokens == reference["long"][prompt], prompt
    assert {last.explanation.worker_id for _, last in results} == {0, 1}
    assert _wait_idle(port) == [NUM_KV_BLOCKS] * 2


def test_ctrl_c_leaves_no_process_behind(engine):
    proc, _ = engine
    assert_ctrl_c_leaves_nothing(proc, timeout=60)


def test_a_burst_beyond_vllms_own_limits_is_served():
    """Issue 17: ``--max-num-batched-tokens 16384 --max-num-seqs 512`` reach the vLLM worker,
    so a burst of 400 requests, scheduled into steps of more than vLLM's default 256
    sequences, is served (it used to fail every request with HTTP 500)."""
    import httpx

    with launched("--runner", "vllm", "--max-num-batched-tokens", "16384",
                  "--max-num-seqs", "512", "--num-kv-blocks", "512", timeout=240) as (proc, _):
        base = f"http://127.0.0.1:{proc.http_port}/v1/completions"

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=120,
                                         limits=httpx.Limits(max_connections=400)) as client:
                replies = await asyncio.gather(*(client.post(base, json={
                    "model": "default", "prompt": f"Request {i} says", "max_tokens": 2,
                    "temperature": 0.0}) for i in range(400)))
            return [r.status_code for r in replies]

        codes = asyncio.run(burst())
        assert codes == [200] * 400, sorted(set(codes))
