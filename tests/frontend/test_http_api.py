"""The HTTP API in-process against fake pools (tests/frontend/http_env.py): request mapping,
SSE framing, streaming, echo and logprobs, chat, models, health, metrics."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from frontend.fake_pool import CHAT_TEMPLATE, EOS
from frontend.http_env import Env, assert_error, sse, wait_for

# --------------------------------------------------------------------------- completions


def test_completion_maps_request_and_response(env: Env) -> None:
    prompt = "Hello world, hello again."
    ids = env.encode(prompt)
    r = env.post("/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": len(ids) + 2, "temperature": 0.5,
        "seed": 7, "top_k": 5, "min_tokens": 1, "repetition_penalty": 1.1, "ignore_eos": True,
        "stop_token_ids": [3], "user": "acme", "priority": 3, "cache_salt": "s"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = (ids + ids)[: len(ids) + 2]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["text"] == env.decode(expected) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected),
                             "prompt_tokens_details": {"cached_tokens": 3}}
    sent = env.pools[0].added[-1]
    sp = sent.sampling
    assert sent.prompt_token_ids == tuple(ids) and sent.eos_token_ids == (EOS,)
    assert (sent.priority, sent.tenant, sent.cache_salt) == (3, "acme", "s")
    assert (sp.temperature, sp.seed, sp.top_k, sp.min_tokens, sp.repetition_penalty,
            sp.ignore_eos, sp.stop_token_ids, sp.max_tokens) == (
        0.5, 7, 5, 1, 1.1, True, (3,), len(ids) + 2)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_penalties_logit_bias_and_allowed_ids_reach_the_pool(env: Env, path: str) -> None:
    fields = {"presence_penalty": 0.5, "frequency_penalty": -1.25,
              "logit_bias": {"7": -100, "12": 2.5}, "allowed_token_ids": [7, 12, 40],
              "max_tokens": 2}
    body = ({"prompt": "Hello"} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "Hello"}]})
    r = env.post(path, body | fields)
    assert r.status_code == 200, r.text
    sp = env.pools[0].added[-1].sampling
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.25)
    assert sp.logit_bias == ((7, -100.0), (12, 2.5))
    assert sp.allowed_token_ids == (7, 12, 40)


def test_streaming_completion_with_usage(env: Env) -> None:
    ids = env.encode("The quick brown fox")
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 5, "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    chunks, usage = events[:-1], events[-1]
    assert len(chunks) == 5  # one event per token: streamed, not buffered
    assert "".join(c["choices"][0]["text"] for c in chunks) == env.decode((ids * 2)[:5])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert len({c["id"] for c in events}) == 1


def test_batched_prompts_n_and_seeds(env: Env) -> None:
    r = env.post("/v1/completions", {"prompt": ["Hello world", "The quick"], "n": 2,
                                     "max_tokens": 3, "seed": 10})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    hello = env.encode("Hello world")
    assert choices[0]["text"] == choices[1]["text"] == env.decode((hello * 3)[:3])
    seeds = sorted(req.sampling.seed for req in env.pools[0].added[-4:])
    assert seeds == [10, 10, 11, 11]  # n samples differ, reproducibly
    usage = r.json()["usage"]
    prompt_tokens = len(env.encode("Hello world")) + len(env.encode("The quick"))
    assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == 12


def test_echo_and_logprobs(env: Env) -> None:
    r = env.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "echo": True,
                                     "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("Hello")
    assert env.pools[0].added[-1].sampling.logprobs == 0


def _legacy_prompt_part(env: Env, ids: list[int], k: int) -> dict[str, Any]:
    """The echoed prompt's part of the legacy logprobs object, from the fake pool's made-up
    prompt logprobs (token i at -i/10, its top-k ``token + 1 + j`` at -0.1 j)."""
    tokens = [env.decode([t]) for t in ids]
    tops: list[Any] = [None]
    for i in range(1, len(ids)):
        row = {tokens[i]: -i / 10}
        for j in range(k):
            row.setdefault(env.decode([ids[i] + 1 + j]), -0.1 * j)
        tops.append(row)
    return {"tokens": tokens, "token_logprobs": [None] + [-i / 10 for i in range(1, len(ids))],
            "top_logprobs": tops}


def test_echo_logprobs_max_tokens_zero_scores_the_prompt(env: Env) -> None:
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0 -> the prompt with its
    tokens' logprobs (the first null) and no generated token."""
    ids = env.encode("Hello world again")
    r = env.post("/v1/completions", {"prompt": "Hello world again", "max_tokens": 0,
                                     "echo": True, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello world again" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    want = _legacy_prompt_part(env, ids, 2)
    assert {k: lp[k] for k in want} == want
    offsets = [sum(len(t) for t in want["tokens"][:i]) for i in range(len(ids))]
    assert lp["text_offset"] == offsets
    assert "prompt_logprobs" not in choice  # the extension was not asked for
    sent = env.pools[0].added[-1].sampling
    assert (sent.max_tokens, sent.prompt_logprobs, sent.logprobs) == (0, 2, 2)
    # With generated tokens: the prompt's entries, then theirs.
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 2, "echo": True,
                                     "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == want["token_logprobs"] + [-0.5, -0.5]
    assert lp["tokens"] == want["tokens"] + [env.decode([t]) for t in ids[:2]]
    # Streamed: the prompt and its logprobs come with the first chunk.
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 2, "echo": True,
                                     "logprobs": 0, "stream": True})
    chunks = sse(r)
    first = chunks[0]["choices"][0]
    assert first["text"] == env.decode(ids) + env.decode([ids[0]])
    assert first["logprobs"]["token_logprobs"] == want["token_logprobs"] + [-0.5]
    assert len(chunks) == 2


def test_prompt_logprobs_extension_in_vllms_shape(env: Env) -> None:
    ids = env.encode("Hello world")
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None
    want = [None] + [{str(ids[i]): {"logprob": -i / 10, "rank": i,
                                    "decoded_token": env.decode([ids[i]])},
                      str(ids[i] + 1): {"logprob": 0.0, "rank": 1,
                                        "decoded_token": env.decode([ids[i] + 1])}}
                     for i in range(1, len(ids))]
    assert choice["prompt_logprobs"] == want
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 0, "prompt_logprobs": 0})
    choice = r.json()["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert [list(e) if e else e for e in choice["prompt_logprobs"]] == \
        [None] + [[str(t)] for t in ids[1:]]
    r = env.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    sent = env.pools[0].added[-1]
    pl = r.json()["prompt_logprobs"]
    assert len(pl) == len(sent.prompt_token_ids) and pl[0] is None
    assert all(len(e) == 3 for e in pl[1:])


def test_top_logprobs_in_both_shapes(env: Env) -> None:
    ids = env.encode("Hello world")
    r = env.post("/v1/completions", {"prompt": ids, "max_tokens": 2, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["tokens"] == [env.decode([t]) for t in ids[:2]]
    assert lp["top_logprobs"][0] == {env.decode([ids[0]]): -0.5, env.decode([ids[0] + 1]): -1.5}
    assert env.pools[0].added[-1].sampling.logprobs == 2
    r = env.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(c["top_logprobs"]) == 3 for c in content)
    first = content[0]
    assert first["logprob"] == -0.5 and first["top_logprobs"][0]["token"] == first["token"]
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.5, -2.5]
    assert first["bytes"] == list(first["token"].encode())
    r = env.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                          "top_logprobs": 3})
    assert_error(r, 400, "invalid_request_error", "logprobs: true")


def test_stop_string_ends_stream_and_aborts(env: Env) -> None:
    prompt = "Hello world, hello again."
    r = env.post("/v1/completions", {"prompt": prompt, "max_tokens": 30, "stop": ", hello"})
    choice = r.json()["choices"][0]
    assert choice == {**choice, "text": "Hello world", "finish_reason": "stop"}
    rid = env.pools[0].added[-1].request_id
    assert wait_for(lambda: rid in env.pools[0].aborted)


# --------------------------------------------------------------------------- chat


def test_chat_uses_template_and_streams_role_first(env: Env) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                             {"type": "text", "text": "world"}]}]
    r = env.post("/v1/chat/completions", {"model": "tiny-b", "messages": messages,
                                          "max_completion_tokens": 4, "stream": True,
                                          "logprobs": True})
    assert r.status_code == 200, r.text
    events = sse(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    sent = env.pools[1].added[-1]  # routed to the model named
    text = ("<s>system: Be brief.\n<s>user: Hello world\n<s>assistant: ")
    assert CHAT_TEMPLATE and sent.prompt_token_ids == tuple(env.encode(text))
    assert sent.sampling.max_tokens == 4 and sent.sampling.logprobs == 0
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == env.fe.tokenizer.decode(list(sent.prompt_token_ids[:4]),
                                              skip_special_tokens=True)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_non_streaming(env: Env) -> None:
    r = env.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 3})
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 3


def test_listening_socket_lets_asyncio_set_nodelay(env: Env) -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket says
    IPPROTO_TCP; without it every keep-alive response waited ~40 ms on the client's delayed
    ACK (measured with bench.frontend_overhead)."""
    [server] = env.fe.http.server.servers
    assert all(sock.proto == socket.IPPROTO_TCP for sock in server.sockets)


def test_models_health_metrics_openapi(env: Env) -> None:
    models = env.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-b"]
    assert env.client.get("/health").json()["status"] == "ok"
    env.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    text = env.client.get("/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds",
                 "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 'vllm:request_success_total{finished_reason="length",model_name="tiny"}'):
        assert name in text, name
    schema = env.client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
