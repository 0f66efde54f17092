"""The whole engine as users run it: `python -m engine.launch` with 2 workers, driven over gRPC.

One launch serves every test of this module (start-up costs seconds on 2 cores); the tests
run in file order, the worker kill near the end and Ctrl-C last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from e2e.engine_proc import (
    GREEDY_PROMPTS,
    assert_ctrl_c_leaves_nothing,
    children,
    launched,
    nice_of,
    wait_idle,
    worker_pids,
)

from engine.frontend.proto import pb2, pb2_grpc
from engine.models.default import default_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_KV_BLOCKS = 256
MAX_TOKENS = 24
PROMPTS = list(GREEDY_PROMPTS)


@pytest.fixture(scope="module")
def engine():
    with launched("--workers", "2", "--num-kv-blocks", str(NUM_KV_BLOCKS)) as running:
        yield running


@pytest.fixture(scope="module")
def reference():
    """transformers' greedy generate on the same model and prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids  # as the frontend tokenizes
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        refs[prompt] = out[0, ids.shape[1]:].tolist()
    return refs


async def _generate(port: int, prompt: str, **kw) -> tuple[list[int], pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb2_grpc.EngineStub(ch)
        req = pb2.GenerateRequest(prompt=prompt, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                                  temperature=0.0, **kw)
        tokens, last = [], None
        async for resp in stub.Generate(req):
            tokens.extend(resp.token_ids)
            last = resp
        return tokens, last


async def _many(port: int) -> list[list[int]]:
    results = await asyncio.gather(*(_generate(port, p) for p in PROMPTS))
    return [tokens for tokens, _ in results]


def _wait_idle(port: int, timeout: float = 20.0) -> list[int]:
    return wait_idle(port, [NUM_KV_BLOCKS] * 2, timeout)


def test_16_concurrent_streams_match_transformers(engine, reference):
    _, port = engine
    outputs = asyncio.run(_many(port))
    for prompt, tokens in zip(PROMPTS, outputs, strict=True):
        assert tokens == reference[prompt], prompt
    assert _wait_idle(port) == [NUM_KV_BLOCKS] * 2


def test_cancelled_stream_frees_its_kv_blocks(engine):
    _, port = engine

    async def cancel_after_some_tokens():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb2_grpc.EngineStub(ch)
            call = stub.Generate(pb2.GenerateRequest(prompt="Return the", max_tokens=1000,
                                                     temperature=0.0, ignore_eos=True))
            n = 0
            async for resp in call:
                n += len(resp.token_ids)
                if n >= 40:  # 3 blocks of 16 are in use by now
                    call.cancel()
                    break
            return n

    assert asyncio.run(cancel_after_some_tokens()) >= 40
    assert _wait_idle(port) == [NUM_KV_BLOCKS] * 2


@pytest.mark.parametrize(
    "fields,code,needle",
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ({"prompt": "word " * 3000}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"prompt": "hi", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"prompt": "hi", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
    ],
)
def test_bad_input_gets_a_clear_status_and_disturbs_nothing(engine, reference, fields, code, needle):
    _, port = engine

    async def run():
        good = asyncio.create_task(_generate(port, PROMPTS[0]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                async for _ in pb2_grpc.EngineStub(ch).Generate(pb2.GenerateRequest(**fields)):
                    pass
        return err.value, await good

    error, (tokens, _) = asyncio.run(run())
    assert error.code() == code
    assert needle in error.details()
    assert tokens == reference[PROMPTS[0]]


def test_non_utf8_prompt_is_invalid_argument(engine):
    _, port = engine
    # field 3 (prompt), wire type 2, 2 bytes that are not UTF-8
    raw = bytes([0x1A, 0x02, 0xFF, 0xFE])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_stream("/engine.v1.Engine/Generate", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(call(raw, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()


def test_cli_client_streams_and_prints_json(engine, reference):
    _, port = engine
    base = [sys.executable, "-m", "engine.client", PROMPTS[2], "--grpc-port", str(port),
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    res = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60, check=True)
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["token_ids"] == reference[PROMPTS[2]]
    assert final["usage"]["completion_tokens"] == len(final["token_ids"])
    streamed = subprocess.run(base, capture_output=True, text=True, timeout=60, check=True)
    assert streamed.stdout.strip() == final["text"].strip()


def test_cpu_workers_keep_one_free_of_sheddable_work_while_others_arrive(engine):
    """Two CPU workers resolve ``--reserved-workers`` to 1: a request of priority 0 (not
    sheddable) holds worker 1 free of sheddable ones for 10 s, which ``/health`` says."""
    import httpx

    proc, _ = engine
    base = f"http://127.0.0.1:{proc.http_port}"
    done = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": "default", "prompt": PROMPTS[0], "max_tokens": 2})
    assert done.status_code == 200
    deadline = time.monotonic() + 5
    while True:  # the pool's next stats (every 0.25 s) carry it
        pool = httpx.get(f"{base}/health", timeout=10).json()["pools"]["default"]
        if pool["reserved_workers"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert pool["reserved_workers"] == 1, pool


def test_the_frontend_serves_on_uvloop(engine):
    """The frontend's one event loop is uvloop's (a dependency; engine/frontend/process.py):
    its library is mapped into the frontend process, which imports it only to run on it."""
    proc, _ = engine
    frontends = [pid for pid, args in children(proc.pid) if args.startswith("engine-frontend")]
    assert len(frontends) == 1
    with open(f"/proc/{frontends[0]}/maps") as f:
        assert "/uvloop/loop." in f.read()


def test_sigkill_a_worker_mid_stream_loses_nothing(engine, reference):
    proc, port = engine
    before = worker_pids(proc.pid)
    assert len(before) == 2
    # CPU workers run under SCHED_IDLE (--worker-sched resolves to idle), the frontend and
    # the pool at the normal policy, not niced.
    assert {os.sched_getscheduler(pid) for pid in before.values()} == {os.SCHED_IDLE}
    others = [pid for pid, args in children(proc.pid) if not args.startswith("engine-worker")]
    assert others and {os.sched_getscheduler(pid) for pid in others} == {os.SCHED_OTHER}
    assert {nice_of(pid) for pid in others} == {0}

    async def run():
        task = asyncio.gather(*(_generate(port, p) for p in PROMPTS))
        await asyncio.sleep(1.0)  # every stream is under way
        os.kill(before["engine-worker-0-1"], signal.SIGKILL)
        return [tokens for tokens, _ in await task]

    outputs = asyncio.run(run())
    for prompt, tokens in zip(PROMPTS, outputs, strict=True):
        assert tokens == reference[prompt], prompt
    deadline = time.time() + 60
    while time.time() < deadline:
        after = worker_pids(proc.pid)
        if len(after) == 2 and after["engine-worker-0-1"] != before["engine-worker-0-1"]:
            break
        time.sleep(0.2)
    assert after["engine-worker-0-1"] != before["engine-worker-0-1"], "worker was not restarted"
    assert os.sched_getscheduler(after["engine-worker-0-1"]) == os.SCHED_IDLE  # restarted too
    assert _wait_idle(port, timeout=60) == [NUM_KV_BLOCKS] * 2


def test_ctrl_c_leaves_no_process_behind(engine):
    proc, _ = engine
    assert_ctrl_c_leaves_nothing(proc)
