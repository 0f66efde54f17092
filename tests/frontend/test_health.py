"""Health that tells the truth (issue 14): ``GET /health``, the gRPC ``Engine/Health`` RPC and
the standard ``grpc.health.v1`` service flip to 503 / NOT_SERVING within 2 s of a pool going
silent (dead or stuck) or losing its last worker, with the reason, and back after recovery;
server reflection lists the services. Against the fake pools of tests/frontend/fake_pool.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from frontend.http_env import Env
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.config import FrontendConfig
from engine.frontend.proto import SERVICE, pb2, pb2_grpc
from engine.messages import PoolStats

FLIP_S = 2.0  # what the issue allows, from the death to the probe's answer
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, FrontendConfig())
    yield e
    e.close()


@pytest.fixture
def channel(env: Env) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{env.fe.grpc_port}") as ch:
        yield ch


def flip_time(cond: Callable[[], bool], limit: float = FLIP_S + 1) -> float:
    """Seconds until ``cond()`` holds (fails after ``limit``)."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < limit, "health did not flip"
        time.sleep(0.02)
    return time.monotonic() - start


def http_status(env: Env) -> int:
    return env.client.get("/health").status_code


def check(channel: grpc.Channel, service: str = "") -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status


class Watcher:
    """A ``grpc.health.v1`` Watch stream read in a thread: the statuses it received."""

    def __init__(self, channel: grpc.Channel, service: str = "") -> None:
        self.statuses: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for resp in self._call:
                self.statuses.append(resp.status)
        except grpc.RpcError:
            pass  # cancelled

    def last(self) -> int | None:
        return self.statuses[-1] if self.statuses else None

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


def test_silent_pool_flips_every_health_view_and_back(env: Env, channel: grpc.Channel) -> None:
    watch = Watcher(channel)
    watch_engine = Watcher(channel, SERVICE)
    try:
        assert flip_time(lambda: watch.last() == SERVING and watch_engine.last() == SERVING) < 1
        assert http_status(env) == 200
        assert check(channel) == SERVING and check(channel, SERVICE) == SERVING

        env.pools[1].silent = True  # the scheduler of "tiny-b" dies (or hangs)
        assert flip_time(lambda: http_status(env) == 503) < FLIP_S
        body = env.client.get("/health").json()
        assert body["status"] == "unavailable"
        assert "'tiny-b' has not reported" in body["reason"] and "tiny'" not in body["reason"]
        assert body["pools"]["tiny-b"]["ok"] is False and body["pools"]["tiny"]["ok"] is True
        assert body["pools"]["tiny-b"]["last_report_s"] > 1.0
        h = pb2_grpc.EngineStub(channel).Health(pb2.HealthRequest(), timeout=5)
        assert not h.ok and h.status == "NOT_SERVING" and "'tiny-b'" in h.reason
        assert [p.ok for p in h.pools] == [True, False] and "not reported" in h.pools[1].reason
        assert check(channel) == NOT_SERVING and check(channel, SERVICE) == NOT_SERVING
        assert flip_time(lambda: watch.last() == NOT_SERVING
                         and watch_engine.last() == NOT_SERVING, 1) < 1

        env.pools[1].silent = False  # restarted: it reports again
        assert flip_time(lambda: http_status(env) == 200) < FLIP_S
        assert env.client.get("/health").json()["reason"] is None
        assert check(channel) == SERVING
        assert flip_time(lambda: watch.last() == SERVING, 1) < 1
        assert watch.statuses == [SERVING, NOT_SERVING, SERVING]
    finally:
        watch.close()
        watch_engine.close()


def test_pool_without_live_workers_is_not_serving(env: Env, channel: grpc.Channel) -> None:
    assert http_status(env) == 200
    env.pools[0].stats = PoolStats(live_workers=0)  # its last worker died
    assert flip_time(lambda: http_status(env) == 503) < FLIP_S
    assert env.client.get("/health").json()["reason"] == "pool 'tiny' has no live worker"
    call = health_pb2_grpc.HealthStub(channel).Check.with_call(
        health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert call[0].status == NOT_SERVING
    assert dict(call[1].trailing_metadata())["engine-health-reason"] == (
        "pool 'tiny' has no live worker")
    env.pools[0].stats = None  # a worker registered again
    assert flip_time(lambda: check(channel) == SERVING) < FLIP_S
    assert http_status(env) == 200


def test_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as e:
        check(channel, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [listed] = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    [described] = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=5)
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and any(b"Generate" in f for f in files)  # what grpcurl describe reads


def test_health_is_open_without_an_api_key(tmp_path: Path) -> None:
    e = Env(tmp_path, FrontendConfig(api_keys=("k",)))
    try:
        assert httpx.get(f"{e.fe.url}/health").status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{e.fe.grpc_port}") as ch:
            assert check(ch) == SERVING
    finally:
        e.close()
