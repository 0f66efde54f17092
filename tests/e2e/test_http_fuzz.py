"""Fuzzing the HTTP API of a launched engine with malformed and adversarial bodies: never a
5xx, never a hang, and the engine keeps serving valid requests.

Bodies mix the API's real field names with random ones, and valid values with hostile ones
(wrong types, huge or negative numbers, NaN, deep nesting, long strings, token ids outside
the vocabulary); some are not JSON at all. Derandomized, so CI runs the same examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from e2e.engine_proc import launched
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "logprobs",
          "top_logprobs", "echo", "ignore_eos", "min_tokens", "repetition_penalty",
          "stop_token_ids", "priority", "user", "cache_salt", "presence_penalty", "best_of",
          "logit_bias", "tools", "suffix", "add_generation_prompt", "frequency_penalty",
          "allowed_token_ids"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(),
    st.text(max_size=20), st.sampled_from(["default", "", "user", "assistant", "text"]),
    st.just(10**30), st.just(-(2**63)), st.text(min_size=500, max_size=2000))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | values},
    optional={"content": st.text(max_size=50) | values, "name": values}), max_size=4)
bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10),
    values | messages | st.lists(st.integers(-5, 5000), max_size=30), max_size=8)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with launched("--max-output-tokens", "8", "--max-prompt-tokens", "256") as (proc, _), \
            httpx.Client(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=60) as c:
        yield c
        ok = c.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert resp.json()["error"]["message"]  # OpenAI's error shape


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       priority=st.none() | st.text(max_size=6) | st.integers().map(str))
def test_fuzz_json_bodies(client: httpx.Client, body: dict, path: str,
                          priority: str | None) -> None:
    headers = {"content-type": "application/json"}
    if priority is not None and priority.isascii() and priority.isprintable():
        headers["x-request-priority"] = priority
    check(client.post(path, content=json.dumps(body).encode(), headers=headers))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                             "/v1/../v1/models", "/health"]))
def test_fuzz_raw_bytes(client: httpx.Client, raw: bytes, path: str) -> None:
    check(client.post(path, content=raw, headers={"content-type": "application/json"}))
