"""The official ``openai`` client against a launched engine serving two model pools, with an
API key and a token rate limit: chat and completions (streamed and not), models.list(),
routing by model name, cached-token usage, the SDK's typed errors, and greedy chat equal to
the in-process API's."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from e2e.engine_proc import free_blocks, launched, metric, wait_idle

from engine.models.default import default_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def launched_engine() -> Iterator[tuple[str, int]]:
    model = str(default_model_dir())
    with launched("--model", model, "--model", model, "--served-model-name", "a",
                  "--served-model-name", "b", "--api-key", KEY,
                  "--rate-limit-tpm", "100000") as (proc, grpc_port):
        url = f"http://127.0.0.1:{proc.http_port}"
        health = httpx.get(f"{url}/health")  # healthy as soon as the ready line is out
        assert health.status_code == 200, health.text
        assert set(health.json()["pools"]) == {"a", "b"}
        yield url, grpc_port


@pytest.fixture(scope="module")
def engine(launched_engine: tuple[str, int]) -> str:
    return launched_engine[0]


@pytest.fixture(scope="module")
def client(engine: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["a", "b"]


def test_chat_greedy_equals_in_process(client: openai.OpenAI) -> None:
    from engine import LLM, SamplingParams

    reply = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=24,
                                           temperature=0)
    expected = LLM().chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0))
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    streamed = client.chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected.text)
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_stream_and_cached_tokens(client: openai.OpenAI) -> None:
    prompt = "def fibonacci(n):\n    " * 6  # several full KV blocks
    first = client.completions.create(model="a", prompt=prompt, max_tokens=8, temperature=0)
    again = client.completions.create(model="a", prompt=prompt, max_tokens=8, temperature=0)
    assert first.choices[0].text == again.choices[0].text
    assert again.usage.prompt_tokens == first.usage.prompt_tokens >= 32
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # a prefix-cache hit
    stream = client.completions.create(model="a", prompt=prompt, max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == first.choices[0].text


def test_requests_reach_the_pool_named(engine: str, client: openai.OpenAI) -> None:
    before = {m: metric(engine, "vllm:prefix_cache_queries_total", m) for m in "ab"}
    out = client.completions.create(model="b", prompt=[5, 6, 7, 8, 9, 10, 11], max_tokens=2)
    assert out.model == "b"
    deadline = time.time() + 10  # the pool's stats follow its outputs
    while time.time() < deadline and metric(engine, "vllm:prefix_cache_queries_total",
                                            "b") == before["b"]:
        time.sleep(0.1)
    assert metric(engine, "vllm:prefix_cache_queries_total", "b") >= before["b"] + 7
    assert metric(engine, "vllm:prefix_cache_queries_total", "a") == before["a"]


def test_typed_errors(engine: str, client: openai.OpenAI) -> None:
    wrong_key = openai.OpenAI(base_url=f"{engine}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="zzz", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.RateLimitError):  # 64 x 2000 tokens > 100000 per minute
        client.completions.create(model="a", prompt="x", n=64, max_tokens=2000)
    assert client.completions.create(model="a", prompt="x", max_tokens=1).choices


def test_disconnect_frees_kv_at_once(launched_engine: tuple[str, int]) -> None:
    url, grpc_port = launched_engine
    idle = wait_idle(grpc_port, free_blocks(grpc_port))
    body = {"model": "a", "prompt": "def f(x):" * 20, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert free_blocks(grpc_port) != idle  # the request holds KV blocks now
    start = time.time()
    assert wait_idle(grpc_port, idle, timeout=10) == idle
    assert time.time() - start < 5  # long before its 1500 tokens would have finished


def test_chat_top_logprobs_equal_in_process(client: openai.OpenAI) -> None:
    from engine import LLM, SamplingParams

    reply = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=5,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    expected = LLM().chat(MESSAGES, SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    assert len(content) == len(expected.token_ids) == 5
    for entry, lp, top in zip(content, expected.logprobs, expected.top_logprobs, strict=True):
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [v for _, v in top], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy took the best


def test_echo_logprobs_max_tokens_zero_equals_transformers(client: openai.OpenAI) -> None:
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0) with the official
    client: the prompt's tokens and logprobs (the first null), as transformers computes them
    (fp32, 1e-4); asked again once a plain request has cached the prompt, the same values."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    text = "Return the number of items in the container. If the container is empty, raise"
    ids = list(tok.encode(text))
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        lps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [None] + [lps[i - 1, ids[i]].item() for i in range(1, len(ids))]
    for attempt in range(2):
        r = client.completions.create(model="a", prompt=ids, echo=True, logprobs=1,
                                      max_tokens=0, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "length" and r.usage.completion_tokens == 0
        assert choice.text == tok.decode(ids)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and choice.logprobs.top_logprobs[0] is None
        assert got[1:] == pytest.approx(want[1:], abs=1e-4), attempt
        assert choice.logprobs.tokens == [tok.decode([t]) for t in ids]
        client.completions.create(model="a", prompt=ids, max_tokens=1)  # caches the prompt


# --------------------------------------------------------------------------- structured outputs


def test_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    """The SDK's parse() sends a strict json_schema response_format; the weak default model
    fills it because the grammar allows nothing else (bounded fields: it must close)."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=10)
        kind: Literal["cat", "dog", "fish"]
        age: int = Field(ge=0, le=30)
        vaccinated: bool

    for temperature in (0.0, 1.0):
        reply = client.chat.completions.parse(
            model="a", messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            response_format=Pet, max_tokens=200, temperature=temperature, seed=1)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        pet = choice.message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "fish")


def test_json_object_and_streamed_schema(client: openai.OpenAI) -> None:
    import json

    reply = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=120,
                                           temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    stream = client.completions.create(model="b", prompt="def f():", max_tokens=60,
                                       temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"json": schema}})
    chunks = list(stream)
    obj = json.loads("".join(c.choices[0].text for c in chunks))
    assert set(obj) == {"ok", "n"} and chunks[-1].choices[0].finish_reason == "stop"


def test_aborted_constrained_request_frees_kv(launched_engine: tuple[str, int]) -> None:
    url, grpc_port = launched_engine
    idle = wait_idle(grpc_port, free_blocks(grpc_port))
    body = {"model": "a", "prompt": "def f(x):" * 20, "max_tokens": 1500, "stream": True,
            "structured_outputs": {"regex": "[a-z ]{1400,}"}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert free_blocks(grpc_port) != idle
    assert wait_idle(grpc_port, idle, timeout=10) == idle
