"""Forced tool calls end to end with the official ``openai`` client on the default model
(random-ish weights: it knows nothing of tools, so only the grammar makes the calls valid):
a named function and ``required``, streamed and not, each call's arguments valid JSON for
the listed schema. Auto parsing needs a model that writes calls; it is tested against the
scripted fake pool (tests/frontend/test_tool_calls_http.py).

These need the worker-side structured outputs (the ``sampling.structured`` grammar); without
them the output is free text and the arguments are not JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from e2e.engine_proc import launched

from engine.models.default import default_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                          "metric": {"type": "boolean"}},
           "required": ["city", "days", "metric"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
         "required": ["zone"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with launched("--model", str(default_model_dir()), "--served-model-name", "default",
                  "--tool-call-parser", "hermes") as (proc, _):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{proc.http_port}/v1", api_key="x",
                            max_retries=0, timeout=120)


def calls_of(reply: Any, stream: bool) -> tuple[list[tuple[str, str]], str | None]:
    """(name, arguments) per call, and the finish reason, from a reply or a stream."""
    if not stream:
        choice = reply.choices[0]
        assert choice.message.content is None
        return [(c.function.name, c.function.arguments)
                for c in choice.message.tool_calls or []], choice.finish_reason
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in reply:
        choice = chunk.choices[0]
        assert not choice.delta.content
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name  # index, id and name first
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
    return [(name, args) for name, args in calls.values()], finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_named_tool_choice(client: openai.OpenAI, stream: bool, temperature: float) -> None:
    reply = client.chat.completions.create(
        model="default", messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=3,
        temperature=temperature, stream=stream,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finish = calls_of(reply, stream)
    assert finish == "tool_calls"
    [(name, arguments)] = calls
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_choice(client: openai.OpenAI, stream: bool, temperature: float) -> None:
    reply = client.chat.completions.create(
        model="default", messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=5,
        temperature=temperature, stream=stream, tool_choice="required",
        parallel_tool_calls=False)
    calls, finish = calls_of(reply, stream)
    assert finish == "tool_calls"
    [(name, arguments)] = calls
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_unknown_tool_name_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="default", messages=MESSAGES, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rocket"}})
    assert e.value.param == "tool_choice"
