"""Admission over HTTP and gRPC: API keys, rate limits, shedding, queue timeouts, client
disconnects (tests/frontend/http_env.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from frontend.fake_pool import LIVE_WORKERS, SLOW_TOKEN_S
from frontend.http_env import Env, assert_error, wait_for

from engine.client import generate as client_generate
from engine.frontend.proto import pb2, pb2_grpc
from engine.messages import PoolStats

# --------------------------------------------------------------------------- admission


def test_api_keys(make_env: Callable[..., Env]) -> None:
    e = make_env(api_keys=("k1", "k2"))
    assert_error(e.client.get("/v1/models"), 401, "authentication_error")
    bad = {"Authorization": "Bearer k3"}
    assert_error(e.post("/v1/completions", {"prompt": "x"}, headers=bad), 401,
                 "authentication_error")
    for key in ("k1", "k2"):
        r = e.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    e.post("/v1/completions", {"model": "tiny-b", "prompt": "x", "max_tokens": 1},
           headers={"Authorization": "Bearer k1"})  # both pools have reported
    assert e.client.get("/health").status_code == 200  # probes need no key
    assert e.client.get("/metrics").status_code == 200


def test_rate_limits_per_key(make_env: Callable[..., Env]) -> None:
    e = make_env(api_keys=("k1", "k2"), rate_limit_rpm=2, rate_limit_tpm=1000)
    k1, k2 = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2"))
    body = {"prompt": "x", "max_tokens": 1}
    assert [e.post("/v1/completions", body, headers=k1).status_code for _ in range(2)] == [200] * 2
    r = e.post("/v1/completions", body, headers=k1)
    assert_error(r, 429, "rate_limit_error", "--rate-limit-rpm 2")
    assert 1 <= int(r.headers["Retry-After"]) <= 30  # one request refills in 30 s
    assert e.post("/v1/completions", body, headers=k2).status_code == 200  # per key
    big = {"prompt": "x", "max_tokens": 30, "n": 40}
    assert_error(e.post("/v1/completions", big, headers=k2), 429, "rate_limit_error",
                 "--rate-limit-tpm")


def test_shedding_refuses_sheddable_only(make_env: Callable[..., Env]) -> None:
    e = make_env(shed_queue_time_s=1.0)
    for p in e.pools:  # saturated: far more waiting than the fake drains in a second
        p.stats = PoolStats(num_waiting=10_000, num_running=8, live_workers=LIVE_WORKERS)
    e.post("/v1/completions", {"prompt": "x", "max_tokens": 1})  # normal traffic: stats on
    body = {"prompt": "x", "max_tokens": 1}
    r = e.post("/v1/completions", {**body, "priority": -1})
    assert_error(r, 429, "rate_limit_error", "sheddable")
    assert int(r.headers["Retry-After"]) >= 1
    for priority in (0, 1):
        assert e.post("/v1/completions", {**body, "priority": priority}).status_code == 200
    metrics = e.client.get("/metrics").text
    assert ('engine:requests_refused_total{model_name="tiny",priority_class="sheddable",'
            'reason="shed"} 1.0') in metrics
    for p in e.pools:  # pressure gone: admitted again
        p.stats = None
    e.post("/v1/completions", body)
    assert wait_for(lambda: e.post("/v1/completions", {**body, "priority": -1}).status_code
                    == 200)


def test_queue_timeout_is_503_and_aborts(make_env: Callable[..., Env]) -> None:
    """One choice (iterated directly) and several (merged): every generation is aborted."""
    e = make_env(max_queue_time_s=0.3)
    for stream in (False, True):
        for n in (1, 3):
            before = len(e.pools[0].added)
            r = e.post("/v1/completions", {"prompt": "x", "user": "hold", "stream": stream,
                                           "n": n})
            assert_error(r, 503, "service_unavailable", "--max-queue-time")
            rids = [a.request_id for a in e.pools[0].added[before:]]
            assert len(rids) == n
            assert wait_for(lambda rids=rids: set(rids) <= set(e.pools[0].aborted))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts(env: Env, stream: bool, n: int) -> None:
    before = len(env.pools[0].added)
    with pytest.raises(httpx.ReadTimeout):
        env.post("/v1/completions", {"prompt": "x", "user": "hold", "stream": stream, "n": n},
                 timeout=0.5)
    assert wait_for(lambda: len(env.pools[0].added) == before + n)
    rids = [a.request_id for a in env.pools[0].added[before:]]
    assert wait_for(lambda: set(rids) <= set(env.pools[0].aborted))


def test_disconnect_mid_stream_aborts(env: Env) -> None:
    body = {"prompt": "Hello world", "max_tokens": 25, "user": "slow", "stream": True}
    with env.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event arrived, then the client goes away
    rid = env.pools[0].added[-1].request_id
    assert wait_for(lambda: rid in env.pools[0].aborted, timeout=25 * SLOW_TOKEN_S + 5)


def test_grpc_shares_keys_limits_and_shedding(make_env: Callable[..., Env]) -> None:
    e = make_env(api_keys=("k1",), rate_limit_rpm=3, shed_queue_time_s=1.0)
    with grpc.insecure_channel(f"127.0.0.1:{e.fe.grpc_port}") as channel:
        stub = pb2_grpc.EngineStub(channel)
        auth = (("authorization", "Bearer k1"),)

        def generate(priority: int = 0, metadata: Any = auth) -> list[Any]:
            req = pb2.GenerateRequest(prompt="Hello", max_tokens=1, priority=priority)
            return list(stub.Generate(req, metadata=metadata, timeout=10))

        with pytest.raises(grpc.RpcError) as err:
            generate(metadata=(("authorization", "Bearer nope"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb2.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Health(pb2.HealthRequest(), timeout=10)  # probes need no key
        assert generate()[-1].finish_reason == "length"
        done = client_generate("Hello", port=e.fe.grpc_port, api_key="k1", max_tokens=1)
        assert done.finish_reason == "length"  # the bundled client sends the key too
        for p in e.pools:  # saturated: far more waiting than the fake drains in a second
            p.stats = PoolStats(num_waiting=10_000, num_running=8, live_workers=LIVE_WORKERS)
        assert generate(priority=1)[-1].finish_reason == "length"  # critical: served
        with pytest.raises(grpc.RpcError) as err:
            generate(priority=-1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sheddable" in err.value.details()
        assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
        # A shed request costs nothing: the key's fourth charged request, over HTTP (which
        # shares the bucket), is the one over the limit.
        r = e.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                   headers={"Authorization": "Bearer k1"})
        assert_error(r, 429, "rate_limit_error", "--rate-limit-rpm 3")
