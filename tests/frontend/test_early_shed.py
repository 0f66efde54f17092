"""Shedding before parsing (engine.frontend.early_shed): while a pool is saturated, a
sheddable request gets its 429 before body validation and tokenization; everything the early
look cannot settle (keys, bad JSON, unknown models, priority >= 0) takes the full path.
Admitted responses carry their frontend stage times (engine.frontend.timing); the pool
client counts the prefill backlog admission predicts from."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import httpx
from frontend.fake_pool import LIVE_WORKERS
from frontend.http_env import Env, assert_error, wait_for

from engine.frontend import timing
from engine.messages import PoolStats

KEY = {"Authorization": "Bearer k"}


def saturate(e: Env) -> None:
    for p in e.pools:  # far more waiting than two workers of 4 slots drain in a second
        p.stats = PoolStats(num_waiting=10_000, num_running=8, live_workers=LIVE_WORKERS)
    e.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=KEY)  # stats on
    assert wait_for(lambda: e.fe.admission.shed("tiny", -1) is not None)


def test_sheddable_requests_are_refused_before_validation(
        make_env: Callable[..., Env]) -> None:
    e = make_env(shed_queue_time_s=1.0, api_keys=("k",))
    bad = {"prompt": "x", "max_tokens": 1, "temperature": "hot"}  # the full path says 400
    assert_error(e.post("/v1/completions", bad, headers=KEY), 400, "invalid_request_error")
    saturate(e)
    r = e.post("/v1/completions", {**bad, "priority": -1}, headers=KEY)
    err = assert_error(r, 429, "rate_limit_error", "sheddable", "predicted queue wait")
    assert err["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) > 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = e.post("/v1/chat/completions", chat, headers={**KEY, "x-request-priority": "-2"})
    assert_error(r, 429, "rate_limit_error", "priority -2")
    # Not settled early: the full path answers as it always does.
    assert_error(e.post("/v1/completions", {**bad, "priority": 0}, headers=KEY), 400,
                 "invalid_request_error")
    assert_error(e.post("/v1/completions", {"prompt": "x", "priority": -1}), 401,
                 "authentication_error")  # a wrong key is told so, not shed
    r = e.client.post("/v1/completions", content=b'{"priority": -1, ',
                      headers={**KEY, "content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "not valid JSON")
    r = e.post("/v1/completions", {"model": "nope", "prompt": "x", "priority": -1},
               headers=KEY)
    assert_error(r, 404, "not_found_error")
    ok = e.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "priority": 1},
                headers=KEY)
    assert ok.status_code == 200, ok.text
    stages = timing.parse(ok.headers[timing.HEADER])  # where its time went, per stage
    assert list(stages) == ["parse", "tokenize", "admit", "pool", "predicted", "to_pool",
                            "queue", "chunks", "step", "out", "back", "wake", "execute",
                            "step_tokens", "step_requests", "queue_steps", "received"]
    assert all(ms >= 0 for ms in stages.values())
    # The pool's stamps split its stage (two clocks: perf_counter here, unix there).
    parts = sum(stages[s] for s in ("to_pool", "queue", "chunks", "step", "out", "back",
                                    "wake"))
    assert abs(parts - stages["pool"]) < 2.0, stages
    assert stages["step_tokens"] == 1 and stages["step_requests"] == 1
    assert abs(stages["received"] - time.time()) < 10
    metrics = e.client.get("/metrics").text
    assert ('engine:requests_refused_total{model_name="tiny",priority_class="sheddable",'
            'reason="shed"} 2.0') in metrics
    for p in e.pools:  # pressure gone: the same sheddable request is admitted again
        p.stats = None
    e.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=KEY)
    assert wait_for(lambda: e.post("/v1/completions", {"prompt": "x", "max_tokens": 1,
                                                       "priority": -1},
                                   headers=KEY).status_code == 200)


def test_requests_without_a_first_token_are_the_prefill_backlog(
        make_env: Callable[..., Env]) -> None:
    e = make_env()
    pool = e.fe.models[0].pool
    assert pool.prefill_backlog() == (0, 0)
    prompt = "hello world again"

    def hold() -> None:  # the fake pool answers nothing to tenant "hold"
        with contextlib.suppress(httpx.ReadTimeout):
            e.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "user": "hold"},
                   timeout=2)

    held = threading.Thread(target=hold)
    held.start()
    try:
        assert wait_for(lambda: pool.prefill_backlog() == (1, len(e.encode(prompt))))
    finally:
        held.join()  # its client gave up: the request is aborted
    assert wait_for(lambda: pool.prefill_backlog() == (0, 0))
    r = e.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200 and pool.prefill_backlog() == (0, 0)
