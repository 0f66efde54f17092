"""Two engine replicas behind SGLang's router (``sglang_router.launch_router --policy
cache_aware``, installed by the dev extra): the router registers both from their
``/server_info`` and ``/model_info``, and chat, streamed chat and shared-prefix completions
sent through it with the openai client come back complete; the shared-prefix requests stay
on one replica, whose prefix cache then serves them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from e2e.engine_proc import launched

from bench.router_compare import RouterSpec
from bench.servers import Server

pytest.importorskip("sglang_router")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """(router URL, [replica URLs])."""
    log = tmp_path_factory.mktemp("router") / "router.log"
    with ExitStack() as stack:
        replicas = []
        for _ in range(2):
            proc, _grpc = stack.enter_context(launched("--workers", "1"))
            replicas.append(f"http://127.0.0.1:{proc.http_port}")
        router = stack.enter_context(Server(RouterSpec("router", MODEL, tuple(replicas)),
                                            Path(log), ready_timeout_s=60))
        yield router.url, replicas


def finished(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$",
                                            text, re.M))


def test_router_registers_both_replicas_from_their_discovery_endpoints(cluster) -> None:
    url, replicas = cluster
    workers = httpx.get(f"{url}/workers", timeout=10).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(replicas)
    for w in workers:
        assert w["is_healthy"] and w["model_id"] == MODEL
        meta = w["metadata"]  # read from /server_info and /model_info
        assert meta["served_model_name"] == MODEL and meta["model_type"] == "llama"
        assert meta["architectures"] == '["LlamaForCausalLM"]'


def test_chat_and_streamed_chat_through_the_router(cluster) -> None:
    import openai

    url, _ = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Write a haiku about queues."}]
    greedy = {"max_tokens": 12, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(model=MODEL, messages=messages, **greedy)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    parts = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                **greedy):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == whole.choices[0].message.content  # greedy: the same text


def test_shared_prefix_requests_stay_on_one_replica_and_hit_its_cache(cluster) -> None:
    import openai

    url, replicas = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    system = ("You are a careful assistant for a logistics company. Answer briefly, cite the "
              "policy section, and never invent tracking numbers. " * 4)
    before = [finished(r) for r in replicas]
    cached = []
    for i in range(6):  # one at a time: the router's load stays balanced, its tree decides
        out = client.completions.create(model=MODEL, prompt=f"{system}Question {i}: where?",
                                        max_tokens=4, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length" and out.usage is not None
        details = out.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details is not None else 0)
    moved = [finished(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sorted(moved) == [0, 6], moved  # one replica served every shared-prefix request
    assert cached[0] == 0 or cached[0] is None
    assert all(c and c >= 32 for c in cached[1:]), cached  # its prefix cache served them
