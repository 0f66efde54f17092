"""What the HTTP API refuses, in OpenAI's error shape with ``param``: fields it cannot
honour, bad and malformed bodies, a pool's error (tests/frontend/http_env.py)."""

from __future__ import annotations

from typing import Any

import pytest
from frontend.http_env import Env, assert_error


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens", "echo or prompt_logprobs"),
    ({"prompt": "Hi", "max_tokens": 0, "logprobs": 1}, "max_tokens", ">= 1"),
    ({"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
    ({"prompt": "Hi", "prompt_logprobs": -1}, "prompt_logprobs", "[0, 20]"),
    ({"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
    ({"prompt": "Hi", "max_tokens": -1, "echo": True}, "max_tokens", ">= 0"),
])
def test_prompt_logprobs_and_max_tokens_zero_refusals(env: Env, body: dict, param: str,
                                                      words: str) -> None:
    err = assert_error(env.post("/v1/completions", body), 400, "invalid_request_error", words)
    assert err["param"] == param


@pytest.mark.parametrize(("field", "value"), [
    ("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"),
    ("web_search_options", {}), ("verbosity", "low"), ("no_stop_trim", True),
    ("return_hidden_states", True), ("skip_special_tokens", False),
])
def test_openai_fields_that_would_change_the_answer_are_refused(env: Env, field: str,
                                                                 value: object) -> None:
    """Nothing OpenAI defines is silently ignored: what is not implemented is a 400 naming
    the field; null values, modalities ["text"] and bookkeeping fields pass."""
    base = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    err = assert_error(env.post("/v1/chat/completions", base | {field: value}), 400,
                       "invalid_request_error", "")
    assert err["param"] == field
    ok = base | {field: None, "modalities": ["text"], "store": True, "metadata": {"a": "b"},
                 "prompt_cache_key": "k", "safety_identifier": "u", "no_stop_trim": False,
                 "separate_reasoning": True}
    assert env.post("/v1/chat/completions", ok).status_code == 200


def test_content_parts_other_than_text_are_refused(env: Env) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = env.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]})
    err = assert_error(r, 400, "invalid_request_error", "")
    assert err["param"].startswith("messages"), err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), [
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", ["nope", "tiny"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 31}, 400, "max_tokens",
     ["--max-output-tokens 30"]),
    ("/v1/completions", {"prompt": list(range(5, 50))}, 400, "prompt",
     ["--max-prompt-tokens 40"]),
    ("/v1/completions", {"prompt": [10**6]}, 400, "prompt", ["vocabulary"]),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ["empty"]),
    ("/v1/completions", {}, 400, "prompt", ["required"]),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", [">= 0"]),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", []),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", []),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", []),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty",
     ["[-2, 2]"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "frequency_penalty": -3}, 400, "frequency_penalty", ["[-2, 2]"]),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "high"}, 400, "frequency_penalty",
     []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias",
     ["[-100, 100]"]),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "up"}}, 400, "logit_bias", []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"hello": 1}}, 400, "logit_bias",
     ["integers"]),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, 400, "logit_bias", []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"9" * 100: 1}}, 400, "logit_bias", []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10**400}}, 400, "logit_bias", []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1, "05": 2}}, 400, "logit_bias",
     ["twice"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {"320": 5}}, 400, "logit_bias", ["vocabulary"]),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids",
     ["at least one"]),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [3, 320]}, 400,
     "allowed_token_ids", ["vocabulary"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "allowed_token_ids": ["a"]}, 400, "allowed_token_ids", []),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens",
     []),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", []),
    ("/v1/completions", {"prompt": "x", "priority": 2**40}, 400, "priority", []),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", []),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", []),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools", []),
])
def test_bad_requests_are_openai_errors(env: Env, path: str, body: Any, status: int,
                                        param: str, words: list[str]) -> None:
    err = assert_error(env.post(path, body), status,
                       "not_found_error" if status == 404 else "invalid_request_error", *words)
    assert err["param"] == param


def test_malformed_bodies(env: Env) -> None:
    r = env.client.post("/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "not valid JSON")
    r = env.client.post("/v1/completions", content=b"x" * 5000,
                        headers={"content-type": "application/json"})
    assert_error(r, 413, "invalid_request_error", "--max-request-bytes 4096")
    r = env.client.post("/v1/completions", json={"prompt": "x", "priority": 1},
                        headers={"x-request-priority": "high"})
    assert r.status_code == 200  # the body's priority wins; the header is not read
    r = env.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                        headers={"x-request-priority": "high"})
    assert_error(r, 400, "invalid_request_error", "x-request-priority")
    r = env.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                        headers={"x-request-priority": "-5"})
    assert r.status_code == 200 and env.pools[0].added[-1].priority == -5


def test_unknown_fields_are_ignored_with_a_warning(env: Env,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="engine.frontend.openai_server"):
        r = env.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "frobnicate": 3,
                                         "metadata": {"a": "b"}})
    assert r.status_code == 200
    warnings = [rec.getMessage() for rec in caplog.records]
    assert any("frobnicate" in w for w in warnings), warnings
    assert not any("metadata" in w for w in warnings)  # a known OpenAI field, no-op here


def test_pool_error_is_a_500_in_openai_shape(env: Env) -> None:
    r = env.post("/v1/completions", {"prompt": "x", "user": "fail"})
    assert_error(r, 500, "internal_error", "worker exploded")
