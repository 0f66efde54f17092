"""The HTTP API in-process (uvicorn on a background event loop) against fake pools that bind
the real pool sockets (tests/frontend/fake_pool.py): request mapping, SSE framing, errors in
OpenAI's shape, API keys, rate limits, shedding, queue timeouts, disconnects, metrics."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from frontend.fake_pool import (
    CHAT_TEMPLATE,
    EOS,
    LIVE_WORKERS,
    SLOW_TOKEN_S,
    BackgroundFrontend,
    FakePool,
    make_model_dir,
)

from engine.client import generate as client_generate
from engine.config import FrontendConfig, ModelConfig
from engine.frontend.admission import Admission
from engine.frontend.grpc_server import start_grpc_server
from engine.frontend.http_server import start_http_server
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.proto import pb2, pb2_grpc
from engine.frontend.serving import ModelRegistry
from engine.messages import PoolStats
from engine.models.info import load_model_info

MAX_NUM_SEQS = 4


class HttpFrontend(BackgroundFrontend):
    """The HTTP and gRPC servers, sharing one admission state, over two fake pools."""

    def __init__(self, run_dir: str, model_dir: Path, cfg: FrontendConfig) -> None:
        self.cfg = cfg
        super().__init__(run_dir, model_dir, [
            load_model_info(ModelConfig(path=str(model_dir), served_name=name))
            for name in ("tiny", "tiny-b")])
        self.url = f"http://127.0.0.1:{self.http.port}"

    async def _serve(self) -> None:
        registry = ModelRegistry(self.models)
        self.metrics = EngineMetrics()
        for m in registry:
            self.metrics.add_pool(m.name, m.pool)
        self.admission = Admission(registry, self.cfg, MAX_NUM_SEQS)
        self.api = OpenAIServer(registry, self.cfg, self.admission, self.metrics)
        self.http = await start_http_server(self.api, "127.0.0.1", 0)
        self.grpc, self.grpc_port = await start_grpc_server(registry, "127.0.0.1", 0,
                                                            self.metrics, self.admission)

    async def _unserve(self) -> None:
        await self.grpc.stop(0)
        await self.http.stop(1)
        self.admission.close()


class Env:
    def __init__(self, tmp: Path, cfg: FrontendConfig) -> None:
        self.model_dir = make_model_dir(tmp / "tiny")
        self.run_dir = tempfile.mkdtemp(prefix="http-")  # short: ipc paths have a length limit
        self.pools = [FakePool(self.run_dir, 0), FakePool(self.run_dir, 1)]
        self.fe = HttpFrontend(self.run_dir, self.model_dir, cfg)
        self.client = httpx.Client(base_url=self.fe.url, timeout=20)

    def close(self) -> None:
        self.client.close()
        self.fe.close()
        for p in self.pools:
            p.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def encode(self, text: str) -> list[int]:
        return list(self.fe.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.fe.tokenizer.decode(ids))

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("http"), FrontendConfig(max_prompt_tokens=40,
                                                            max_output_tokens=30,
                                                            max_request_bytes=4096))
    yield e
    e.close()




def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def sse(resp: httpx.Response) -> list[Any]:
    """The events of an SSE body; the last must be [DONE]."""
    events = [line[len("data: "):] for line in resp.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def assert_error(resp: httpx.Response, status: int, type_: str, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_ and set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    return err


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
