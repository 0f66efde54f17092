"""SIGKILL the frontend under 16 concurrent greedy streams: every client sees its connection
fail (none hangs); the launcher restarts the frontend on the same HTTP and gRPC ports; the
pool, told by the launcher, aborts the dead frontend's requests, so the KV blocks are back
at their idle baseline as soon as the new frontend reports, and the pool was never stopped
(the same process, its stats fresh); new requests get the greedy text of before.

And a restart storm (``--max-restarts 2``: a worker killed twice): the frontend says
NOT_SERVING with the reason on /health and ``grpc.health.v1``, then the engine exits 1.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import pytest
from e2e.engine_proc import (
    GREEDY_PROMPTS,
    Streams,
    alive,
    children,
    free_blocks,
    launched,
    wait_idle,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_KV_BLOCKS = 256
MAX_TOKENS = 400
PROMPTS = list(GREEDY_PROMPTS)
CHECKS = PROMPTS[:3]


def _pid(launcher_pid: int, name: str) -> int | None:
    pids = [pid for pid, args in children(launcher_pid) if args.startswith(name)]
    return pids[0] if pids else None


def _greedy(base: str, prompt: str) -> str:
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": "default", "prompt": prompt, "max_tokens": 24, "temperature": 0.0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigkill_the_frontend_mid_stream_restarts_it_and_frees_the_kv() -> None:
    with launched("--workers", "2", "--num-kv-blocks", str(NUM_KV_BLOCKS)) as (proc, port):
        base = f"http://127.0.0.1:{proc.http_port}"  # type: ignore[attr-defined]
        expected = {p: _greedy(base, p) for p in CHECKS}
        idle = [NUM_KV_BLOCKS] * 2
        assert wait_idle(port, idle) == idle
        frontend, pool = _pid(proc.pid, "engine-frontend"), _pid(proc.pid, "engine-pool-0")
        assert frontend is not None and pool is not None

        streams = Streams(base, PROMPTS, MAX_TOKENS)
        streams.wait_under_way()
        assert free_blocks(port) != idle  # the streams hold KV
        os.kill(frontend, signal.SIGKILL)
        killed_at = time.time()
        streams.join(timeout=30)
        assert all(not t.is_alive() for t in streams.threads), "a client hangs"
        assert not streams.out and sorted(streams.errors) == sorted(PROMPTS), streams.out.keys()

        deadline = time.time() + 60
        while time.time() < deadline and not _healthy(base):
            time.sleep(0.1)
        back_after = time.time() - killed_at
        assert _healthy(base), "the frontend did not come back on its HTTP port"
        restarted = _pid(proc.pid, "engine-frontend")
        assert restarted is not None and restarted != frontend and not alive(frontend)
        print(f"frontend back after {back_after:.1f} s")
        # Its first reports already show every block free: the pool aborted the dead
        # frontend's 16 requests while it was gone (had it stalled on its send to the
        # frontend, they would still be running: 400 tokens each).
        assert wait_idle(port, idle, timeout=2) == idle  # gRPC: the same port too
        assert _pid(proc.pid, "engine-pool-0") == pool, "the pool was restarted"
        for prompt, text in expected.items():
            assert _greedy(base, prompt) == text, prompt
        streams = Streams(base, PROMPTS[:4], 16)
        out = streams.join(timeout=60)
        assert not streams.errors and sorted(out) == sorted(PROMPTS[:4])
        assert wait_idle(port, idle) == idle
        assert proc.poll() is None


def _grpc_health(port: int) -> tuple[int, str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp, call = health_pb2_grpc.HealthStub(ch).Check.with_call(
            health_pb2.HealthCheckRequest(service=""), timeout=2)
    reason = dict(call.trailing_metadata() or ()).get("engine-health-reason", "")
    return resp.status, str(reason)


def test_a_restart_storm_reports_not_serving_then_exits_non_zero() -> None:
    with launched("--workers", "1", "--max-restarts", "2", "--restart-window", "120") as (
            proc, port):
        base = f"http://127.0.0.1:{proc.http_port}"  # type: ignore[attr-defined]
        assert _healthy(base) or wait_idle(port, free_blocks(port))
        worker = _pid(proc.pid, "engine-worker-0-0")
        assert worker is not None
        os.kill(worker, signal.SIGKILL)  # the first failure: restarted at once
        deadline = time.time() + 30
        while time.time() < deadline and _pid(proc.pid, "engine-worker-0-0") in (None, worker):
            time.sleep(0.05)
        second = _pid(proc.pid, "engine-worker-0-0")
        assert second not in (None, worker)
        os.kill(second, signal.SIGKILL)  # the second within the window: a storm
        seen_http = seen_grpc = None
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None and not (seen_http and seen_grpc):
            try:
                r = httpx.get(f"{base}/health", timeout=1)
                if r.status_code == 503 and "restart storm" in (r.json().get("reason") or ""):
                    seen_http = r.json()["reason"]
                status, reason = _grpc_health(port)
                if status == health_pb2.HealthCheckResponse.NOT_SERVING and "restart storm" in reason:
                    seen_grpc = reason
            except (httpx.HTTPError, grpc.RpcError):
                pass
            time.sleep(0.05)
        assert seen_http and "worker-0-0 exited" in seen_http and "--max-restarts 2" in seen_http
        assert seen_grpc and "restart storm" in seen_grpc
        assert proc.wait(timeout=30) == 1
