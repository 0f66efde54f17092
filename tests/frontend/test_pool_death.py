"""Pool death, seen from the frontend: the pool process dies and a new incarnation binds the
same addresses. The frontend resubmits every open request whose client is still there as a
continuation (the tokens already streamed), drops what the dead incarnation sends late,
answers new requests once the pool is back (503 + Retry-After after --max-queue-time if it
is not), and fails open streams if the pool stays silent for too long.

First the pool client against a hand-driven pool (exact messages), then the HTTP API over
``FakePool``s killed and restarted mid-stream."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio
from frontend.fake_pool import SLOW_TOKEN_S, FakePool
from frontend.http_env import Env, assert_error, sse, wait_for

from engine import ipc
from engine.frontend.pool_client import PoolClient
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineRequest,
    PoolOutputs,
    PoolStats,
    RequestOutput,
    SamplingParams,
)

# --------------------------------------------------------------------------- pool client


class HandPool:
    """The pool's two sockets, driven by the test; ``restart`` is a new incarnation."""

    def __init__(self, ctx: zmq.asyncio.Context, addrs: ipc.PoolAddresses) -> None:
        self.ctx, self.addrs = ctx, addrs
        self.incarnation = 0
        self.restart()

    def restart(self) -> None:
        self.pull = ipc.make_socket(self.ctx, zmq.PULL, self.addrs.requests, bind=True)
        self.push = ipc.make_socket(self.ctx, zmq.PUSH, self.addrs.outputs, bind=True)
        self.incarnation += 1

    def die(self) -> None:
        self.pull.close()
        self.push.close()

    async def send(self, *outs: RequestOutput, incarnation: int | None = None) -> None:
        stats = PoolStats(live_workers=1, pool_incarnation=incarnation or self.incarnation)
        await self.push.send(ipc.encode(PoolOutputs(outputs=list(outs), stats=stats)))

    async def recv(self) -> Any:
        return ipc.FRONTEND_TO_POOL.decode(await asyncio.wait_for(self.pull.recv(), 5))


def _request(rid: str) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=(1, 2, 3),
                         sampling=SamplingParams(max_tokens=8, temperature=0.0, seed=3))


def _out(rid: str, *tokens: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput(request_id=rid, new_token_ids=list(tokens), finish_reason=finish)


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def _drain(stream: Any) -> list[RequestOutput]:
    outs = []
    while not stream.queue.empty():
        outs.append(stream.queue.get_nowait())
    return outs


async def _pool_client_scenario(run_dir: str) -> None:
    ctx = zmq.asyncio.Context()
    addrs = ipc.pool_addresses(run_dir, 0)
    pool = HandPool(ctx, addrs)
    client = PoolClient(addrs, "m", ctx, resume_timeout_s=1.0)
    try:
        await pool.send()
        await _until(lambda: client.incarnation == 1)
        a, b, c = (client.add(_request(r)) for r in "abc")
        assert [(await pool.recv()).request.request_id for _ in range(3)] == ["a", "b", "c"]
        await pool.send(_out("a", 5), _out("b", 6), _out("a", 7))
        await _until(lambda: a.queue.qsize() == 2 and b.queue.qsize() == 1)

        pool.die()  # mid-stream; then c's client leaves during the outage
        client.abort(["c"])
        assert c.finished and [o.finish_reason for o in _drain(c)] == ["abort"]
        pool.restart()
        await pool.send()  # the new incarnation's first stats
        msgs = []
        while sum(isinstance(m, AddRequest) for m in msgs) < 2:
            msgs.append(await pool.recv())
        aborted = [rid for m in msgs if isinstance(m, AbortRequests) for rid in m.request_ids]
        adds = [m.request for m in msgs if isinstance(m, AddRequest)]
        # the earlier submissions are aborted first (a stale copy may have reached it)
        first_add = next(i for i, m in enumerate(msgs) if isinstance(m, AddRequest))
        assert {"a", "b"} <= {rid for m in msgs[:first_add] if isinstance(m, AbortRequests)
                              for rid in m.request_ids}
        assert [(r.request_id, r.output_token_ids) for r in adds] == [("a+2", (5, 7)),
                                                                      ("b+2", (6,))]
        assert all(r.sampling == _request("a").sampling for r in adds)  # original params
        assert "c" not in {r.request_id.split("+")[0] for r in adds}  # its client left
        assert set(aborted) <= {"a", "b", "c"}
        assert client.num_resubmitted == 2

        await pool.send(_out("a", 99), incarnation=1)  # late, from the dead incarnation
        await pool.send(_out("a", 98), _out("b", 97))  # a stale submission's, on the new one
        await pool.send(_out("a+2", 8, finish="length"))
        await _until(lambda: a.finished)
        assert [(o.request_id, o.new_token_ids) for o in _drain(a)] == [
            ("a", [5]), ("a", [7]), ("a", [8])]
        assert [o.new_token_ids for o in _drain(b)] == [[6]]
        assert a.output_token_ids == [5, 7, 8] and client.num_active == 1

        pool.die()  # and it does not come back: b fails as unavailable, nothing hangs
        await _until(lambda: b.finished, timeout=5)
        (end,) = _drain(b)
        assert end.finish_reason == "error" and "down" in end.error and b.unavailable
        assert client.num_active == 0
        pool.restart()
    finally:
        await client.close()
        pool.die()
        ctx.term()


def test_pool_client_resubmits_continuations_to_a_new_incarnation() -> None:
    run_dir = tempfile.mkdtemp(prefix="death-")
    try:
        asyncio.run(_pool_client_scenario(run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- HTTP


def _stream_text(e: Env, body: dict[str, Any], out: dict[str, Any], key: str,
                 events: threading.Event | None = None) -> None:
    with e.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(line)
                if events is not None:
                    events.set()
        out[key] = sse(httpx.Response(200, text="\n\n".join(chunks) + "\n\ndata: [DONE]\n\n"))


def test_streams_and_requests_complete_across_a_pool_restart(
        make_env: Callable[..., Env]) -> None:
    e = make_env(max_queue_time_s=10)
    bodies = [{"prompt": p, "max_tokens": 20, "user": "slow",
               "stream_options": {"include_usage": True}}
              for p in ("Hello world", "The quick brown fox", "héllo wörld, façade")]
    undisturbed = {i: e.post("/v1/completions", {**b, "user": ""}).json()["choices"][0]["text"]
                   for i, b in enumerate(bodies)}
    results: dict[str, Any] = {}
    started = threading.Event()
    threads = []
    for i, b in enumerate(bodies):
        threads.append(threading.Thread(target=_stream_text, args=(e, b, results, f"s{i}",
                                                                   started)))
        threads.append(threading.Thread(target=lambda i=i, b=b: results.__setitem__(
            f"n{i}", e.post("/v1/completions", b))))
    for t in threads:
        t.start()
    assert started.wait(5)
    time.sleep(5 * SLOW_TOKEN_S)  # a few tokens out
    e.pools[0].kill()
    time.sleep(0.3)
    new = e.pools[0] = FakePool(e.run_dir, 0)
    for t in threads:
        t.join(20)
    # all six were in flight (20 tokens take 1 s): each reached the new pool, and those
    # that had tokens out as continuations
    assert len({r.request_id.split("+")[0] for r in new.added}) == 2 * len(bodies)
    assert len([r for r in new.added if r.output_token_ids]) >= len(bodies)
    for i in range(len(bodies)):
        events = results[f"s{i}"]
        text = "".join(ev["choices"][0]["text"] for ev in events if ev["choices"])
        assert text == undisturbed[i]
        assert events[-1]["usage"]["completion_tokens"] == 20
        assert [ev["choices"][0]["finish_reason"] for ev in events if ev["choices"]][-1] \
            == "length"
        resp = results[f"n{i}"]
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == undisturbed[i]
        assert resp.json()["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_left_during_the_outage_is_not_resubmitted(
        make_env: Callable[..., Env], stream: bool) -> None:
    e = make_env(max_queue_time_s=10)
    body = {"prompt": "Hello world", "max_tokens": 30, "user": "slow", "stream": stream}
    pool = e.fe.models[0].pool
    if stream:
        with e.client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: dropping it would close the connection now
            next(lines)  # a token arrived
            e.pools[0].kill()
            assert pool.num_active == 1
        # the client has gone mid-stream, during the outage
    else:
        def leave() -> None:  # the client gives up while the pool is down
            with pytest.raises(httpx.ReadTimeout):
                e.post("/v1/completions", body, timeout=1.0)

        t = threading.Thread(target=leave)
        t.start()
        assert wait_for(lambda: pool.num_active == 1 and e.pools[0].added)
        time.sleep(4 * SLOW_TOKEN_S)
        e.pools[0].kill()
        t.join(5)
    rid = e.pools[0].added[-1].request_id
    assert wait_for(lambda: pool.num_active == 0)
    new = e.pools[0] = FakePool(e.run_dir, 0)
    assert e.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert not any(r.request_id.startswith(rid) for r in new.added)


def test_new_requests_during_an_outage_wait_then_503(make_env: Callable[..., Env]) -> None:
    e = make_env(max_queue_time_s=0.5)
    e.pools[0].kill()
    time.sleep(1.3)  # the pool is silent beyond health's limit
    for stream in (False, True):
        r = e.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": stream})
        err = assert_error(r, 503, "service_unavailable", "down", "--max-queue-time")
        assert err["code"] == "pool_unavailable" and int(r.headers["Retry-After"]) >= 1
    assert e.client.get("/health").status_code == 503
    # a request that arrives while it is down is served once it is back within its wait
    e.fe.api.cfg = dataclasses.replace(e.fe.api.cfg, max_queue_time_s=5)
    result: dict[str, httpx.Response] = {}

    def late() -> None:
        result["r"] = e.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3})

    t = threading.Thread(target=late)
    t.start()
    time.sleep(0.3)
    e.pools[0] = FakePool(e.run_dir, 0)
    t.join(10)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["usage"]["completion_tokens"] == 3
    assert wait_for(lambda: e.client.get("/health").status_code == 200)
